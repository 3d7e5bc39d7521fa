"""Bad input of every kind: a non-zero exit, exactly one 'error:' line naming the field or file, no traceback,
and nothing of value destroyed (checkpoints survive a refused or failed run)."""

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest

from conftest import ROOT, error_lines, load_config

SMOKE = "--config=configs/digits_mlp.py:smoke"


def assert_one_error(proc, *needles, code=2):
  """Exit `code`, no traceback, and exactly one non-log stderr line: 'error: ...' containing every needle."""
  assert "Traceback" not in proc.stderr, proc.stderr
  lines = error_lines(proc.stderr)
  assert len(lines) == 1, lines
  assert lines[0].startswith("error:"), lines
  for needle in needles:
    assert needle in lines[0], (needle, lines[0])
  assert proc.returncode == code, (proc.returncode, lines[0])
  return lines[0]


def checkpoint_files(workdir: Path) -> dict[str, str]:
  """sha256 of every file under workdir/checkpoints, by relative path."""
  root = workdir / "checkpoints"
  return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
          for p in sorted(root.rglob("*")) if p.is_file()}


def step_dirs(workdir: Path) -> set[int]:
  return {int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit()}


@pytest.fixture(scope="module")
def trained(cache_dir, tmp_path_factory) -> Path:
  """One digits_mlp:smoke run (2 epochs, 80 steps), shared; tests copy it before changing anything."""
  base = tmp_path_factory.mktemp("trained")
  env = {**os.environ, "JAX_PLATFORMS": "cpu", "BIGMODEL_JAX_CACHE_DIR": str(cache_dir),
         "BIGMODEL_JAX_DATA_DIR": str(base / "data"), "PYTHONUNBUFFERED": "1"}
  proc = subprocess.run([sys.executable, "-m", "bigmodel_jax.main", SMOKE, f"--workdir={base / 'work'}"],
                        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert json.loads(proc.stdout)["step"] == 80
  return base / "work"


BAD_INPUTS = [
    pytest.param([SMOKE, "--config.optimizer.learning_rat=1e-3"],
                 ["--config.optimizer.learning_rat", "did you mean", "'learning_rate'"], id="misspelled-field"),
    pytest.param([SMOKE, "--config.optimizer.learning_rate=abc"],
                 ["--config.optimizer.learning_rate", "abc"], id="wrong-type"),
    pytest.param([SMOKE, "--config.optimizer.learning_rate=-0.1"],
                 ["config.optimizer.learning_rate", "positive", "-0.1"], id="negative-lr"),
    pytest.param([SMOKE, "--config.train.num_epochs=0"], ["config.train.num_epochs", "> 0"], id="zero-epochs"),
    pytest.param([SMOKE, "--config.data.batch_size=0"], ["config.data.batch_size", "> 0"], id="zero-batch"),
    pytest.param([SMOKE, "--config.model.name=mlpp"],
                 ["config.model.name", "'mlpp'", "did you mean 'mlp'", "valid: cnn, dcgan, encoder_classifier, encoder_mlm, gpt"],
                 id="model"),
    pytest.param([SMOKE, "--config.task.name=segmentation"],
                 ["config.task.name", "'segmentation'", "valid: adversarial, classification, language_modeling, masked_language_modeling, regression"],
                 id="task"),
    pytest.param([SMOKE, "--config.data.name=cifar"],
                 ["config.data.name", "'cifar'", "valid: diabetes, digits, fashion_mnist, mnist, shakespeare_plays"],
                 id="dataset"),
    pytest.param([SMOKE, "--config.optimizer.name=lion"],
                 ["config.optimizer.name", "'lion'", "valid: adam, adamw, sgd"], id="optimizer"),
    pytest.param([SMOKE, "--config.schedule.name=step"],
                 ["config.schedule.name", "'step'", "valid: constant, cosine, linear, warmup_cosine"], id="schedule"),
    pytest.param(["--config=configs/no_such_config.py"], ["configs/no_such_config.py"], id="missing-file"),
    pytest.param(["--config=bigmodel_jax/errors.py"], ["bigmodel_jax/errors.py", "get_config"], id="no-get-config"),
    pytest.param(["--config=configs/digits_mlp.py:bogus"], ["digits_mlp", "'bogus'", "valid: smoke"],
                 id="unknown-variant"),
    pytest.param([SMOKE, "--config.optimiser.learning_rate=1e-3"],
                 ["--config.optimiser.learning_rate", "did you mean 'optimizer'"], id="misspelled-section"),
    pytest.param([SMOKE, "--config.seed=-1"], ["config.seed", ">= 0"], id="negative-seed"),
    pytest.param([SMOKE, "--config.seed=18446744073709551616"], ["config.seed", "below 2**63"],
                 id="seed-too-large"),  # was blamed on config.model (an OverflowError in its init)
    pytest.param([SMOKE, "--config.schedule.name=warmup_cosine", "--config.schedule.warmup_steps=1000"],
                 ["config.schedule.warmup_steps", "80 training steps"], id="warmup-longer-than-run"),
    pytest.param(["--config=configs/mnist_cnn.py:smoke", "--config.data.name=digits"],
                 ["config.model", "'cnn'", "(8, 8, 1)"], id="model-does-not-fit-input"),
    pytest.param([SMOKE, "--config.model.hidden_sizes=(64,0)"], ["config.model.hidden_sizes", "each entry", ">= 1"],
                 id="zero-width-layer"),
    pytest.param([SMOKE, "--config.model.name=cnn"],
                 ["config.model.hidden_sizes", "model_config('cnn')"], id="switch-model-on-command-line"),
    pytest.param([SMOKE, "--checkpoint_step=3"], ["--checkpoint_step", "modes on a checkpoint (eval, predict"], id="checkpoint-step-in-train"),
    pytest.param([SMOKE, "--config.data.on_device=true", "--config.data.augment.horizontal_flip=true"],
                 ["config.data.on_device", "augmentation", "data.on_device=False"], id="on-device-with-augmentation"),
    pytest.param([SMOKE, "--config.data.validation_fraction=1.5"], ["config.data.validation_fraction", "(0, 1)"],
                 id="validation-fraction"),
    pytest.param([SMOKE, "--config.data.validation_fraction=0"],
                 ["config.train.best_eval", "'validation'", "digits does not have", "validation_fraction"],
                 id="selection-without-validation-split"),
    pytest.param([SMOKE, "--config.train.best_eval=test"],
                 ["config.train.best_eval", "'test' split", "never test"], id="select-on-test"),
    pytest.param([SMOKE, "--config.train.best_eval=valid"],
                 ["config.train.best_eval", "'valid' is not an evaluator", "test, validation"], id="unknown-evaluator"),
    pytest.param([SMOKE, "--config.train.best_metric=bleu"],
                 ["config.train.best_metric", "'bleu'", "valid: accuracy, precision"], id="selection-metric"),
    pytest.param([SMOKE, "--config.train.best_metric=loss"],  # best_mode max: the highest loss would be the best
                 ["config.train.best_mode", "'max' selects the worst loss; set min"], id="selection-direction"),
    pytest.param([SMOKE, "--config.evals.test.split=train"], ["config.evals.test.split", "validation, test"],
                 id="evaluator-split"),
    pytest.param([SMOKE, "--config.evals.test.every=-5"], ["config.evals.test.every", "-1 (each epoch)"],
                 id="evaluator-every"),
    pytest.param([SMOKE, "--config.train.eval_every=5"],
                 ["--config.train.eval_every", "no such config field", "config.evals.<name>.every"], id="moved-field"),
    pytest.param([SMOKE, "--config.train.zzz=1"],
                 ["--config.train.zzz", "no such config field", "config.train has:", "num_steps"], id="no-close-field"),
    pytest.param(["--config=configs/shakespeare_char_gpt.py:smoke,cpu"],
                 ["shakespeare_char_gpt", "'smoke' and 'cpu'", "data.seq_len"], id="conflicting-variants"),
    pytest.param(["--config=configs/shakespeare_char_gpt.py:smoke,tiny"],
                 ["shakespeare_char_gpt", "'tiny'", "valid: cpu, plays, smoke"], id="unknown-composed-variant"),
    pytest.param([SMOKE, "--config.evals.extra.split=test"],
                 ["--config.evals.extra.split", "no such config field", "added in a config file"], id="new-evaluator"),
    pytest.param([SMOKE, "--config.data.validation_fraction=0.99"],
                 ["config.data.batch_size", "14 training examples", "data.validation_fraction=0.99"],
                 id="validation-leaves-too-little"),
    pytest.param([SMOKE, "--config.train.best_eval=", "--config.train.early_stopping.patience=2"],
                 ["config.train.early_stopping.patience", "train.best_eval"], id="early-stopping-without-selection"),
    # A stray config.model field cannot be given on the command line (the config is locked: it is reported as
    # a misspelled field); models/test_models_shapes.py checks build_model's own error for it.
]


@pytest.mark.parametrize("args,needles", BAD_INPUTS)
def test_bad_input_is_one_line(cli, tmp_path, args, needles):
  workdir = tmp_path / "work"
  proc = cli(*args, f"--workdir={workdir}")
  assert_one_error(proc, *needles)
  assert not (workdir / "checkpoints").exists()  # refused before anything was written


def test_unknown_tfds_dataset_fails_fast(cli, tmp_path):
  start = time.monotonic()
  proc = cli(SMOKE, "--config.data.name=tfds:nosuchdataset", f"--workdir={tmp_path / 'work'}", timeout=90)
  assert time.monotonic() - start < 60
  assert_one_error(proc, "config.data.name", "nosuchdataset")


@pytest.mark.parametrize("with_config", [True, False])
def test_eval_on_an_empty_workdir(cli, tmp_path, with_config):
  workdir = tmp_path / "empty"
  workdir.mkdir()
  if with_config:
    assert_one_error(cli(SMOKE, "--mode=eval", f"--workdir={workdir}"), "no checkpoint", str(workdir))
  else:
    assert_one_error(cli("--mode=eval", f"--workdir={workdir}"), "no config.json", str(workdir), "pass --config")


def test_incompatible_workdir_is_refused_and_untouched(cli, trained, tmp_path):
  workdir = Path(shutil.copytree(trained, tmp_path / "work"))
  steps, files = step_dirs(workdir), checkpoint_files(workdir)
  saved_config = (workdir / "config.json").read_bytes()
  assert steps == {40, 80} and files

  proc = cli(SMOKE, "--config.optimizer.learning_rate=0.01", "--config.train.log_every=7", f"--workdir={workdir}")
  line = assert_one_error(proc, "optimizer.learning_rate", "0.001 -> 0.01", "allow_config_change", str(workdir))
  assert "log_every" not in line  # a runtime field may change on resume: only the learning rate is named
  assert step_dirs(workdir) == steps
  assert checkpoint_files(workdir) == files
  assert (workdir / "config.json").read_bytes() == saved_config

  proc = cli(SMOKE, "--config.optimizer.learning_rate=0.01", "--config.train.allow_config_change=true",
             f"--workdir={workdir}")
  assert proc.returncode == 0, error_lines(proc.stderr)
  assert json.loads(proc.stdout)["step"] == 80  # resumed the finished run instead of starting over
  assert step_dirs(workdir) == steps


def test_non_finite_loss_keeps_restorable_checkpoints(cli, tmp_path):
  from bigmodel_jax import train
  workdir = tmp_path / "work"
  overrides = {"optimizer.learning_rate": 3.0, "train.checkpoint_every": 5, "train.log_every": 5}
  proc = cli("--config=configs/linear_regression.py", *(f"--config.{k}={v}" for k, v in overrides.items()),
             f"--workdir={workdir}")
  line = assert_one_error(proc, "non-finite", code=3)
  bad_step = int(re.search(r"at step (\d+)", line).group(1))
  last_good = int(re.search(r"last good checkpoint: step (\d+)", line).group(1))
  assert not (workdir / "final_metrics.json").exists()

  config = load_config("linear_regression")
  config.optimizer.learning_rate = overrides["optimizer.learning_rate"]
  config.train.checkpoint_every = overrides["train.checkpoint_every"]
  config.train.log_every = overrides["train.log_every"]
  run = train.build_run(config, workdir, for_training=False)
  try:
    steps = run.checkpointer.all_steps()
    assert steps and max(steps) == last_good < bad_step
    for step in steps:
      state, _, meta = run.checkpointer.restore(step, run.steps.layout.restore_target)
      assert int(state.step) == meta["step"] == step
      for leaf in jax.tree.leaves(state.params):
        assert np.all(np.isfinite(np.asarray(leaf))), (step, leaf)
  finally:
    run.checkpointer.close()
    run.writer.close()


def test_corrupt_checkpoint_is_one_line_and_not_deleted(cli, trained, tmp_path):
  """A step without a digest (written before checkpoints had them) that orbax cannot read; a damaged step with its
  digest is set aside and the resume falls back (test_integrity.py)."""
  workdir = Path(shutil.copytree(trained, tmp_path / "work"))
  latest = max(step_dirs(workdir))
  for digest in (workdir / "checkpoints").glob("*/digest.json"):  # a run written before checkpoints had digests
    digest.unlink()
  data_dir = workdir / "checkpoints" / str(latest) / "state" / "d"
  corrupted = {}
  rng = np.random.default_rng(0)
  for path in data_dir.iterdir():
    corrupted[path] = rng.bytes(path.stat().st_size)
    path.write_bytes(corrupted[path])
  assert corrupted

  proc = cli(SMOKE, f"--workdir={workdir}")
  assert_one_error(proc, str(workdir / "checkpoints" / str(latest)), "cannot be read")
  assert step_dirs(workdir) == {40, latest}  # nothing deleted, not even the corrupt step
  for path, blob in corrupted.items():
    assert path.read_bytes() == blob


def test_a_resume_with_another_optimizer_names_it_and_keeps_the_checkpoints(cli, trained, tmp_path):
  """optimizer fields may change on a resume, but not the optimizer's state: it was 'cannot be read, move that step
  away', and every step failed alike."""
  workdir = Path(shutil.copytree(trained, tmp_path / "work"))
  before = checkpoint_files(workdir)
  proc = cli(SMOKE, f"--workdir={workdir}", "--config.optimizer.name=sgd", "--config.train.num_epochs=3",
             "--config.train.allow_config_change=true")
  assert_one_error(proc, "holds the state of another optimizer than the config builds (opt_state.",
                   "revert optimizer.name", f"--config.init.workdir={workdir}")
  assert checkpoint_files(workdir) == before


@pytest.mark.parametrize("record", ["[]", '{"init_timestamp_nsecs": "yesterday"}'])
def test_a_steps_damaged_orbax_metadata_names_that_step(cli, trained, tmp_path, record):
  """orbax reads every step's _CHECKPOINT_METADATA when the checkpoints open: one damaged by hand is named, with
  the step to move away (not the whole directory), and nothing is deleted."""
  workdir = Path(shutil.copytree(trained, tmp_path / "work"))
  oldest = min(step_dirs(workdir))
  file = workdir / "checkpoints" / str(oldest) / "_CHECKPOINT_METADATA"
  file.write_text(record)
  before = checkpoint_files(workdir)
  assert_one_error(cli(f"--workdir={workdir}", "--mode=eval"), str(file), f"move checkpoint step {oldest} out of")
  assert checkpoint_files(workdir) == before
  shutil.move(file.parent, tmp_path / "aside")
  proc = cli(f"--workdir={workdir}", "--mode=eval")
  assert proc.returncode == 0 and json.loads(proc.stdout)["step"] == 80, proc.stderr[-2000:]


# evaluator-fields: was the ConfigDict's YAML repr, one line per field; a-...-set-to-none: was a TypeError traceback
@pytest.mark.parametrize("source,needles", [
    ("def get_config(arg=None):\n  x = = 3\n", ["line 2", "syntax error"]),
    ("import ml_collections\ndef get_config(arg=None):\n  return ml_collections.ConfigDict({'seed': 0})\n",
     ["config.data: missing", "base_config()"]),
    (None, ["is a directory", "name a config file in it"]),
    ("def get_config(arg=None):\n  return {'seed': 0}\n",
     ["get_config() in", "returned an object of type dict", "a ConfigDict"]),
    ("def get_config(arg=None):\n  pass\n", ["get_config() in", "returned None", "a ConfigDict"]),
    ("def get_config(arg=None):\n  steps = 10\n  return int('ten')\n",
     ["my_config.py, line 3: ValueError: invalid literal for int()"]),
    ("from bigmodel_jax.config import base_config\ndef get_config(arg=None):\n  c = base_config()\n"
     "  c.evals.ema = dict(split='validation', every=-1, decay=0.9)\n  return c\n",
     ["config.evals.ema: must be dict(split=..., every=...), got {'decay': 0.9, 'every': -1, 'split': 'validation'}"]),
    ("from bigmodel_jax.config import base_config\ndef get_config(arg=None):\n  c = base_config()\n"
     "  c.train.num_steps = None\n  return c\n",
     ["config.train.num_steps: must be an integer like its default -1, got None"]),
    ("from bigmodel_jax.config import base_config\ndef get_config(arg=None):\n  c = base_config()\n"
     "  c.data.augment = None\n  return c\n", ["config.data.augment: must be a section of fields, got None"]),
    ("from bigmodel_jax.config import base_config\nfrom bigmodel_jax.optim import section_config\n"
     "def get_config(arg=None):\n  c = base_config()\n  c.optimizers.g = section_config(learning_rate=None)\n"
     "  return c\n", ["config.optimizers.g.learning_rate: must be a number like its default 0.001, got None"]),
], ids=["syntax-error", "missing-sections", "a-directory", "returns-a-dict", "returns-none", "raises",
        "evaluator-fields", "a-field-set-to-none", "a-section-set-to-none", "a-named-optimizers-field-set-to-none"])
def test_broken_config_file_is_one_line(cli, tmp_path, source, needles):
  path = tmp_path / "my_config.py"
  if source is None:
    path.mkdir()
  else:
    path.write_text(source)
  assert_one_error(cli(f"--config={path}", f"--workdir={tmp_path / 'work'}"), *needles)


def test_workdir_that_is_a_file(cli, tmp_path):
  (tmp_path / "file").write_text("not a directory")
  assert_one_error(cli(SMOKE, f"--workdir={tmp_path / 'file'}"), "--workdir", "not a directory")


def test_a_checkpoints_file_in_the_workdir_is_refused_before_training(cli, tmp_path):
  """Was found only at the first save, after training up to it: '.../checkpoints/40.orbax-checkpoint-tmp: Not a
  directory', saying nothing of what to do."""
  (tmp_path / "checkpoints").write_text("not a directory")
  assert_one_error(cli(SMOKE, f"--workdir={tmp_path}"), f"--workdir: {tmp_path / 'checkpoints'} is not a directory",
                   "move it away")
  assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoints"]


def test_failure_before_the_first_checkpoint_does_not_lock_the_workdir(cli, tmp_path):
  workdir = tmp_path / "work"
  proc = cli("--config=configs/linear_regression.py", "--config.optimizer.learning_rate=3", f"--workdir={workdir}")
  assert_one_error(proc, "non-finite", "no checkpoint was written", code=3)
  fixed = cli("--config=configs/linear_regression.py:smoke", f"--workdir={workdir}")  # the corrected command
  assert fixed.returncode == 0, error_lines(fixed.stderr)


@pytest.mark.parametrize("how", ["config.json edited, relaunched from it", "config.json deleted"])
def test_a_resume_with_a_config_its_checkpoint_was_not_trained_with_is_refused(cli, trained, tmp_path, how):
  workdir = Path(shutil.copytree(trained, tmp_path / "work"))
  final, files = (workdir / "final_metrics.json").read_bytes(), checkpoint_files(workdir)
  if how == "config.json deleted":
    (workdir / "config.json").unlink()
    args = [SMOKE, "--config.model.activation=gelu"]
  else:
    config = json.loads((workdir / "config.json").read_text())
    config["model"]["activation"] = "gelu"
    (workdir / "config.json").write_text(json.dumps(config))
    args = [f"--config={workdir / 'config.json'}"]
  proc = cli(*args, f"--workdir={workdir}")
  assert_one_error(proc, "--config: model.activation is 'gelu', but checkpoint step 80", "trained with 'relu'",
                   "allow_config_change")
  assert (workdir / "final_metrics.json").read_bytes() == final and checkpoint_files(workdir) == files


def test_model_change_with_allow_config_change_leaves_the_run_intact(cli, trained, tmp_path):
  workdir = Path(shutil.copytree(trained, tmp_path / "work"))
  saved_config, files = (workdir / "config.json").read_bytes(), checkpoint_files(workdir)
  proc = cli(SMOKE, "--config.model.hidden_sizes=(64,)", "--config.train.allow_config_change=true",
             f"--workdir={workdir}")
  assert_one_error(proc, "holds a different model", "hidden.0.kernel", "new --workdir")
  assert (workdir / "config.json").read_bytes() == saved_config
  assert checkpoint_files(workdir) == files
  again = cli(SMOKE, f"--workdir={workdir}")  # the original command still continues the run
  assert again.returncode == 0 and json.loads(again.stdout)["step"] == 80


@pytest.mark.parametrize("record, kind", [("manifest.json", "a sweep"), ("report.json", "reproductions")])
def test_training_into_a_sweeps_or_reproductions_workdir_is_refused(cli, tmp_path, record, kind):
  """A run launched on the sweep's directory rather than a trial's would mix its records into the sweep's."""
  (tmp_path / record).write_text("{}")
  proc = cli(SMOKE, f"--workdir={tmp_path}")
  assert_one_error(proc, f"--workdir: {tmp_path} holds {kind} ({record}), not a training run")
  assert sorted(p.name for p in tmp_path.iterdir()) == [record]


@pytest.mark.parametrize("inside", ["checkpoints", "checkpoints/80", "checkpoints/new"])
def test_training_inside_a_runs_checkpoints_is_refused(cli, trained, tmp_path, inside):
  """runs/x/checkpoints mistyped for runs/x: was trained into with exit 0, and a step directory given so gained files
  its digest lacks, so run x's latest checkpoint then read as damaged."""
  workdir = Path(shutil.copytree(trained, tmp_path / "work"))
  files = checkpoint_files(workdir)
  proc = cli(SMOKE, f"--workdir={workdir / inside}")
  assert_one_error(proc, f"--workdir: {workdir / inside} is ", f"the checkpoints of the training run in {workdir}")
  assert checkpoint_files(workdir) == files and sorted(p.name for p in (workdir / "checkpoints").iterdir()) == [
      "40", "80"]


def test_a_workdir_under_checkpoints_beside_a_lone_config_json_is_not_a_runs(tmp_path):
  """A config.json copied out of a run to edit (--config=config.json --workdir=checkpoints/fork) is no training run:
  its folder's checkpoints/ holds workdirs, not a run's steps (was refused as 'inside .../checkpoints, the
  checkpoints of the training run in ...')."""
  from bigmodel_jax import errors
  (tmp_path / "config.json").write_text("{}")
  errors.refuse_other_workdir(tmp_path / "checkpoints" / "fork", "a training run")
  (tmp_path / "run_info.jsonl").write_text("{}\n")
  with pytest.raises(errors.UserError, match="the checkpoints of the training run in"):
    errors.refuse_other_workdir(tmp_path / "checkpoints" / "fork", "a training run")
