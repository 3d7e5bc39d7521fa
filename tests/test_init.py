"""config.init: a new run's weights from another run's checkpoint, by parameter name; config.optimizer.frozen."""

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest

from bigmodel_jax import run_config, runinfo, train
from bigmodel_jax.errors import UserError
from bigmodel_jax.inference import Inference
from conftest import error_lines, load_config

SMOKE = "--config=configs/digits_mlp.py:smoke"


@pytest.fixture(scope="module")
def source(cli, tmp_path_factory):
  workdir = tmp_path_factory.mktemp("init") / "source"
  proc = cli(SMOKE, f"--workdir={workdir}")
  assert proc.returncode == 0, proc.stderr[-2000:]
  return workdir


def variables(workdir, step=None):
  model = Inference.load(run_config.get_config(str(workdir / "config.json")), workdir)
  try:
    step, state = model.restore_step(step)
    return {k.split("/", 1)[1].replace("/", "."): v for k, v in model.variables(state).items()
            if k.startswith("params/")}
  finally:
    model.close()


def fresh_state(config, workdir):
  """The state a fresh run starts from (in-process: 8 CPU devices, another mesh than the source's one)."""
  run = train.build_run(config, workdir)
  try:
    state, _, _ = train.restore_or_init(run)
    return run, state
  finally:
    run.checkpointer.close()
    run.lock.close()


def config_from(source, **init):
  config = load_config("digits_mlp", "smoke")
  config.init.workdir = str(source)
  for k, v in init.items():
    config.init[k] = v
  return config


def test_init_loads_every_parameter_onto_the_new_mesh(source, tmp_path):
  run, state = fresh_state(config_from(source), tmp_path / "new")
  final = json.loads((source / "final_metrics.json").read_text())
  assert runinfo.fingerprint(state.params) == final["params_sha256"]  # bit-identical to the source's
  assert run.init_source.params_sha256 == final["params_sha256"] and run.init_source.step == final["step"]
  assert sorted(run.init_source.loaded) == sorted(variables(source)) and run.init_source.kept == []


def test_bad_init_is_one_line_before_anything_is_written(source, tmp_path):
  new = tmp_path / "new"
  no_checkpoints = tmp_path / "untrained"
  no_checkpoints.mkdir()
  shutil.copy(source / "config.json", no_checkpoints / "config.json")
  cases = [(config_from(no_checkpoints), "config.init.workdir: no checkpoints in"),
           (config_from(source, rules=("trunk.*=load",)), "config.init.rules: trunk.*=load matches no parameter"),
           (config_from(source, step=12345), "config.init.step: "),
           (config_from(source, rules=("hidden.*=keep",)), "is not 'PATTERN=load' or 'PATTERN=skip'"),
           (config_from(source, rules=("hidden.*=load", "hidden.0.*=skip")),  # hidden.0 would load, said nothing
            "config.init.rules: hidden.0.*=skip decides nothing: each parameter it matches is decided by an earlier "
            "rule")]
  frozen = load_config("digits_mlp", "smoke")
  frozen.optimizer.frozen = ("trunk.*",)
  cases.append((frozen, "config.optimizer.frozen: 'trunk.*' matches no parameter"))
  swapped = config_from(source, rules=("head.*=skip",))  # the head left random, and frozen: it would never train
  swapped.optimizer.frozen = ("head.*",)
  cases.append((swapped, "config.init.rules: head.bias, head.kernel not loaded but frozen (config.optimizer.frozen)"))
  wider = config_from(source)  # the source held out 10% of digits' training split; its weights saw the rest
  wider.data.validation_fraction = 0.2
  cases.append((wider, "holding out data.validation_fraction=0.1, less than this run's 0.2: its weights have seen"))
  for config, message in cases:
    with pytest.raises(UserError, match=re.escape(message)):
      train.build_run(config, new)
    assert not new.exists()
  narrower = config_from(source)  # 5%: a subset of the source's validation slice, never trained on by it
  narrower.data.validation_fraction = 0.05
  run, _ = fresh_state(narrower, new)
  assert run.init_source is not None


def test_the_held_out_share_a_source_recorded_is_the_one_checked(source, tmp_path):
  """data_fingerprint.json records the share of the data a run held out (tiny_shakespeare's fixed 10%, whatever
  data.validation_fraction says): that share, not the config field, is compared with the new run's."""
  copy = Path(shutil.copytree(source, tmp_path / "source"))
  assert json.loads((copy / "data_fingerprint.json").read_text())["held_out"] == 0.1
  saved = json.loads((copy / "config.json").read_text())
  saved["data"]["validation_fraction"] = 0.0  # as a loader that ignores the field would leave it
  (copy / "config.json").write_text(json.dumps(saved))
  run, _ = fresh_state(config_from(copy), tmp_path / "new")
  assert run.init_source is not None


def test_shape_mismatch_and_missing_source_are_one_line(cli, source, tmp_path):
  new = tmp_path / "new"
  proc = cli(SMOKE, f"--workdir={new}", f"--config.init.workdir={source}", "--config.model.hidden_sizes=(64,128)")
  assert proc.returncode == 2 and not new.exists()
  [line] = error_lines(proc.stderr)
  assert "hidden.0." in line and "(128,)" in line and "(64,)" in line and "=skip" in line, line
  proc = cli(SMOKE, f"--workdir={new}", f"--config.init.workdir={tmp_path / 'nowhere'}")
  assert proc.returncode == 2 and not new.exists()
  [line] = error_lines(proc.stderr)
  assert "config.init.workdir" in line and "nowhere" in line


def test_linear_probe_keeps_frozen_weights_and_resumes_without_the_source(cli, source, tmp_path):
  """Load all but the head, freeze the rest: the hidden layers stay the source's bit for bit while the new head
  trains; the run records its source, and resumes from its own checkpoints after the source is gone."""
  copy, probe = tmp_path / "copy", tmp_path / "probe"
  shutil.copytree(source, copy)
  args = [SMOKE, f"--workdir={probe}", f"--config.init.workdir={copy}", "--config.init.rules=('head.*=skip',)",
          "--config.optimizer.frozen=('hidden.*',)", "--config.train.checkpoint_every=2"]
  proc = cli(*args, "--config.train.num_steps=4")
  assert proc.returncode == 0, proc.stderr[-2000:]
  record = json.loads((probe / "init.json").read_text())
  final = json.loads((source / "final_metrics.json").read_text())
  assert record["workdir"] == str(copy) and record["step"] == final["step"]
  assert record["params_sha256"] == final["params_sha256"] and record["kept"] == ["head.bias", "head.kernel"]
  assert json.loads((probe / "run_info.jsonl").read_text().splitlines()[0])["init"] == record
  shutil.rmtree(copy)  # a resume reads the run's own checkpoints only
  proc = cli(*args, "--config.train.num_steps=8", "--config.train.allow_config_change=true")
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert "resumed from checkpoint at step 4" in proc.stderr
  assert len((probe / "run_info.jsonl").read_text().splitlines()) == 2 and "init" not in json.loads(
      (probe / "run_info.jsonl").read_text().splitlines()[1])
  src, early, last = variables(source), variables(probe, 4), variables(probe, 8)
  for name in src:
    if name.startswith("hidden."):
      assert np.array_equal(last[name], src[name]) and np.array_equal(early[name], src[name]), name
    else:  # the head: its own initialisation, trained
      assert not np.array_equal(early[name], src[name]) and not np.array_equal(last[name], early[name]), name
  # another init.workdir on a resume changes nothing it trains, nor the record a fork of config.json starts from
  elsewhere = [a.replace(str(copy), str(tmp_path / "elsewhere")) for a in args]
  proc = cli(*elsewhere, "--config.train.num_steps=8", "--config.train.allow_config_change=true")
  assert proc.returncode == 0 and "keeps that record" in proc.stderr, proc.stderr[-2000:]
  assert json.loads((probe / "config.json").read_text())["init"]["workdir"] == str(copy)


@pytest.mark.parametrize("final", ["[]", '{"step": 80, "params_sha256": 5}'])
def test_a_damaged_final_metrics_of_the_source_is_fingerprinted_from_its_weights(source, tmp_path, final):
  expected = json.loads((source / "final_metrics.json").read_text())["params_sha256"]
  damaged = shutil.copytree(source, tmp_path / "source")
  (damaged / "final_metrics.json").write_text(final)
  run, _ = fresh_state(config_from(damaged), tmp_path / "new")
  assert run.init_source.params_sha256 == expected


@pytest.mark.parametrize("rules", [(), ("head.*=skip",)])
def test_a_resume_with_the_recorded_init_says_nothing(tmp_path, monkeypatch, rules):
  """config.json's JSON lists against the config's tuples: the same init.* is not 'differs' (a plain relaunch of
  an interrupted run warned that its init differed, every time)."""
  config = config_from(tmp_path / "source", rules=rules)
  (tmp_path / "config.json").write_text(json.dumps(config.to_dict()))
  warnings = []
  monkeypatch.setattr(train.logging, "warning", lambda *args: warnings.append(args))
  run = type("R", (), {"workdir": tmp_path, "config": config, "legacy": False})()
  train.keep_recorded_init(run, 5)
  assert warnings == [] and tuple(config.init.rules) == rules
  config.init.workdir = str(tmp_path / "elsewhere")  # a real difference still warns, and keeps the record
  train.keep_recorded_init(run, 5)
  assert len(warnings) == 1 and config.init.workdir == str(tmp_path / "source")
