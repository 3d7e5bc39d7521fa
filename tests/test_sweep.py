"""Sweeps: real trial processes (digits_mlp, a few hundred steps), results, kill and resume, searches, bad input."""

import csv
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from bigmodel_jax.errors import UserError
from bigmodel_jax.sweeps import product, seeds, spec, zipped
from bigmodel_jax.sweeps.manifest import Manifest
from bigmodel_jax.sweeps import report

ROOT = Path(__file__).resolve().parents[1]
FIXED = ('base = "configs/digits_mlp.py"\n'
         'overrides = {"train.num_steps": 300, "train.log_every": 50, "train.checkpoint_every": 50, '
         '"evals.validation.every": 100}\n')
GOOD = 'from bigmodel_jax.sweeps import product, seeds\n' + FIXED + \
    'def sweep():\n  yield from product({"optimizer.learning_rate": [1e-3, 3e-3]}, seeds(2))\n'
WITH_FAILING = GOOD + '  yield {"data.batch_size": 5000}  # a valid config that main refuses on the data: exit 2, its error line\n'
WITH_ADDED = GOOD + '  yield {"optimizer.learning_rate": 1e-2, "seed": 0}\n'
SEARCH = 'import optuna\n' + FIXED + '''metric, mode = "accuracy", "max"
num_trials = 4
def sampler(asked):
  return optuna.samplers.RandomSampler(seed=asked)
def search(trial):
  return {"optimizer.learning_rate": trial.suggest_float("learning_rate", 1e-3, 1e-2, log=True)}
'''


@pytest.fixture(scope="session")
def sweep_env(cache_dir, tmp_path_factory) -> dict:
  path = os.pathsep.join([str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])])
  return {**os.environ, "JAX_PLATFORMS": "cpu", "BIGMODEL_JAX_CACHE_DIR": str(cache_dir), "PYTHONPATH": path,
          "BIGMODEL_JAX_DATA_DIR": str(tmp_path_factory.mktemp("data")), "PYTHONUNBUFFERED": "1"}


def run_sweep(env: dict, *args, popen: bool = False, timeout: float = 300):
  """python -m bigmodel_jax.sweep *args from the repo root; popen: in its own process group, output piped."""
  cmd = [sys.executable, "-m", "bigmodel_jax.sweep", *map(str, args)]
  if popen:
    return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
  return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


def write(path: Path, text: str) -> Path:
  path.write_text(text)
  return path


def wait_until(condition, proc, timeout: float = 240) -> None:
  deadline = time.time() + timeout
  while not condition():
    assert proc.poll() is None, proc.stdout.read()[-3000:]
    assert time.time() < deadline, "timed out"
    time.sleep(0.01)


def trial_dirs(workdir: Path) -> list[Path]:
  return sorted(p for p in workdir.iterdir() if p.is_dir() and "=" in p.name)


def final(directory: Path) -> dict:
  return json.loads((directory / "final_metrics.json").read_text())


def launches(directory: Path) -> int:
  return len((directory / "run_info.jsonl").read_text().splitlines())


def results(workdir: Path) -> dict:
  with open(workdir / "results.csv") as f:
    return {row["trial"]: row for row in csv.DictReader(f)}


def killed_mid_training(workdir: Path) -> bool:
  """Some trial has a checkpoint but has not finished."""
  return any((d / "checkpoints" / "50").exists() and not (d / "final_metrics.json").exists()
             for d in trial_dirs(workdir)) if workdir.exists() else False


@pytest.fixture(scope="module")
def grid(sweep_env, tmp_path_factory):
  """The 5-trial sweep (4 good, 1 failing) run once, uninterrupted, 2 at a time."""
  folder = tmp_path_factory.mktemp("grid")
  workdir = folder / "out"
  proc = run_sweep(sweep_env, write(folder / "grid.py", WITH_FAILING), f"--workdir={workdir}", "--parallel=2")
  return folder, workdir, proc


# --- helpers and sweep files, in process


def test_product_zip_and_seeds():
  assert product({"a": [1, 2]}, seeds(2)) == [{"a": 1, "seed": 0}, {"a": 1, "seed": 1}, {"a": 2, "seed": 0},
                                              {"a": 2, "seed": 1}]
  assert product(zipped({"a": [1, 2], "b": ["x", "y"]}), {"c": [True]}) == [{"a": 1, "b": "x", "c": True},
                                                                           {"a": 2, "b": "y", "c": True}]
  with pytest.raises(ValueError, match="different lengths"):
    zipped({"a": [1, 2], "b": [1]})


def test_trials_are_named_from_their_overrides(tmp_path):
  sweep = spec.load(write(tmp_path / "s.py", FIXED + '''
def sweep():
  yield {"optimizer.name": "sgd", "model.hidden_sizes": (64, 32), "seed": 1}
  yield {"optimizer.learning_rate": 1e-4, "model.hidden_sizes": (8,), "train.trackers": "tensorboard,mlflow"}
'''))
  assert [t.name for t in sweep.trials] == ["optimizer.name=sgd,hidden_sizes=64-32,seed=1",
                                            # one key order for every trial: first seen first
                                            "hidden_sizes=8,learning_rate=0.0001,trackers=tensorboard,mlflow"]
  assert sweep.metric == "accuracy" and sweep.mode == "max"  # the base config's selection
  loss = spec.load(write(tmp_path / "l.py", FIXED + "metric = 'loss'\ndef sweep():\n  yield {'seed': 0}\n"))
  assert loss.mode == "min"  # a metric without a mode: its own direction, not the base config's max
  assert sweep.config.train.num_steps == 300  # the fixed overrides are applied
  assert spec.format_value((8,)) == "(8,)" and spec.format_value(False) == "false"
  assert spec.format_value(("hidden.*",)) == "('hidden.*',)"  # unquoted, config_flags could not parse it


def printed_fields(argv) -> dict[str, str]:
  """{field: value} of the fields main's --print_config marks as changed, for a trial's command `argv`."""
  proc = subprocess.run([sys.executable, *argv, "--print_config"], cwd=ROOT, capture_output=True, text=True,
                        timeout=120, env={**os.environ, "JAX_PLATFORMS": "cpu"})
  assert proc.returncode == 0, proc.stderr[-2000:]
  return {line.split()[1]: line.split("=", 1)[1].split("#")[0].strip() for line in proc.stdout.splitlines()
          if line.startswith("* ")}


def test_a_trials_command_line_is_what_main_parses(tmp_path):
  """A trial's command, parsed by main (--print_config), gives the trial's values (a tuple of strings was written
  unquoted: --dry_run passed and every trial failed)."""
  from bigmodel_jax.sweeps import trials
  sweep = spec.load(write(tmp_path / "s.py", FIXED + "def sweep():\n  yield {'optimizer.frozen': ('hidden.*',), "
                          "'model.hidden_sizes': (16, 8), 'optimizer.nesterov': True, 'optimizer.name': 'sgd'}\n"))
  argv = trials.command(sweep, sweep.trials[0], tmp_path / "t")
  fields = printed_fields(argv)
  assert fields["optimizer.frozen"] == "['hidden.*']" and fields["model.hidden_sizes"] == "[16, 8]"
  assert fields["optimizer.nesterov"] == "True" and fields["optimizer.name"] == "'sgd'"


def test_a_runs_config_json_is_a_base_and_another_file_is_one_line(tmp_path):
  """base = a run's config.json (a run's record is a config: main takes --config=RUN/config.json) was a traceback
  wall ('NoneType' object has no attribute 'loader'), as was any base that is not a .py file."""
  from bigmodel_jax.sweeps import trials
  (tmp_path / "run").mkdir()
  json_file = tmp_path / "run" / "config.json"
  json_file.write_text(spec.load(write(tmp_path / "s.py", FIXED + "def sweep():\n  yield {}\n")).config.to_json())
  sweep = spec.load(write(tmp_path / "j.py", f"base = {str(json_file)!r}\ndef sweep():\n  yield {{'seed': 1}}\n"))
  assert sweep.config.train.num_steps == 300 and sweep.config.data.name == "digits"
  argv = trials.command(sweep, sweep.trials[0], tmp_path / "t")
  fields = printed_fields(argv)
  assert fields["seed"] == "1" and fields["train.num_steps"] == "300"
  for base, message in [(f"{json_file}:smoke", "a config.json has no variants; set its fields in overrides"),
                        (str(tmp_path / "s.py").replace(".py", ".txt"), "is neither a config file (.py) nor a run's")]:
    Path(base.partition(":")[0]).touch()
    with pytest.raises(UserError, match=f"^{tmp_path / 'b.py'}: base .*{re.escape(message)}"):
      spec.load(write(tmp_path / "b.py", f"base = {base!r}\ndef sweep():\n  yield {{'seed': 1}}\n"))


@pytest.mark.parametrize("body, message", [
    ("x = 1\n", "no sweep() generator of override dicts (or search(trial) with num_trials)"),
    ("def sweep():\n  yield from []\n", "sweep() yielded no trials"),
    ("def sweep():\n  yield {'seed': 0}\n  yield {'seed': 0}\n", "trials 0 and 1 are the same (seed=0)"),
    ("metric = 'bleu'\ndef sweep():\n  yield {'seed': 0}\n",
     "metric 'bleu' is not produced by the evaluators of task 'classification'; valid: accuracy"),
    ("mode = 'up'\ndef sweep():\n  yield {'seed': 0}\n", "mode must be 'max' or 'min'"),
    ("metric, mode = 'loss', 'max'\ndef sweep():\n  yield {'seed': 0}\n",
     "mode 'max' would select the worst loss (it is better lower); set mode = 'min'"),
    ("def sweep():\n  yield {'model.hidden_sizes': 'wide'}\n",
     "model.hidden_sizes='wide': configs/digits_mlp.py has tuple (128, 128) there; give a value of that type"),
    ("def sweep():\n  yield {'train': 3}\n", "'train' is a section of configs/digits_mlp.py"),
    ("def search(trial):\n  return {'seed': 0}\n", "a search needs num_trials"),
    ("num_trials = 2\ndef search(trial):\n  return {'seed': 0}\ndef sweep():\n  yield {'seed': 0}\n",
     "defines both sweep() and search(); keep one"),
    ("def sweep():\n  yield {'optimizer.momentum': 0.0}\n  yield {'optimizer.momentum': 0.9}\n",
     "trials 0 and 1 are the same (base; optimizer.momentum has no effect: adam takes no momentum"),
    ("def sweep():\n  yield {'train.num_epochs': 1}\n  yield {'train.num_epochs': 5}\n",
     "are the same (base; train.num_epochs has no effect: train.num_steps=300 sets the run's"),
    ("def sweep():\n  yield {'seed': 0, 'optimizer.learning_rate': 1}\n"
     "  yield {'optimizer.learning_rate': 1.0, 'seed': 0}\n", "trials 0 and 1 are the same (seed=0,learning_rate=1.0)"),
    ("def sweep():\n  yield {'optimizer.learning_rate': 3e-3}\n  yield {'optimizer.learning_rate': 3e-3, 'seed': 0}\n",
     "trials 0 and 1 are the same (learning_rate=0.003 and learning_rate=0.003,seed=0 make one config"),
    ("def sweep():\n  yield {'train.tracking.experiment': 'a/b'}\n  yield {'train.tracking.experiment': 'a_b'}\n",
     "trials 0 and 1 differ but would share the directory experiment=a_b"),
    ("def sweep():\n  yield {'train.num_steps': True}\n", "train.num_steps=True: configs/digits_mlp.py has int"),
    ("def sweep():\n  yield {'train.num_steps': 2.5}\n",
     "train.num_steps=2.5: configs/digits_mlp.py has int 300 there; give a value of that type"),
    ("def sweep():\n  yield {'optimizer.learning_rate': None}\n", "optimizer.learning_rate=None"),
    ("def sweep():\n  yield {'data.normalize': 'bogus'}\n", "config.data.normalize: must be none, unit or"),
    ("def sweep():\n  yield {'train.best_eval': 'test'}\n", "config.train.best_eval: evaluator 'test'"),
    ("def sweep():\n  yield {'train.log_every': 5}\n",
     "train.log_every is also in the fixed overrides (train.log_every=50); set it in one place"),
    ("num_trials = 2\ndef search(trial):\n  return {'train.log_every': trial.suggest_int('e', 5, 20)}\n",
     "search(trial): train.log_every is also in the fixed overrides"),
], ids=["no-sweep", "empty", "duplicate", "metric", "mode", "mode-direction", "type", "section", "num-trials", "both",
        "no-effect", "epochs-with-steps", "same-config", "base-value", "one-directory", "bool-for-int", "float-for-int",
        "none", "invalid-value", "select-on-test", "fixed-too", "fixed-too-search"])
def test_bad_sweep_files(tmp_path, body, message):
  with pytest.raises(UserError, match="^" + str(tmp_path / "s.py") + ".*") as e:
    spec.load(write(tmp_path / "s.py", FIXED + body))
  assert message in str(e.value)


def test_bad_override_keys_are_listed_for_every_trial_with_suggestions(tmp_path):
  with pytest.raises(UserError) as e:
    spec.load(write(tmp_path / "s.py", FIXED.replace("train.log_every", "train.log_evry") + '''
def sweep():
  for lr in (1e-3, 3e-3):
    yield {"optimizer.learning_rat": lr, "seed": 0}
'''))
  assert str(e.value).splitlines() == [
      f"{tmp_path / 's.py'}: overrides: 'train.log_evry' is not a field of configs/digits_mlp.py "
      "(did you mean 'train.log_every'?)"]
  with pytest.raises(UserError) as e:
    spec.load(write(tmp_path / "s.py", FIXED + '''
def sweep():
  for lr in (1e-3, 3e-3):
    yield {"optimizer.learning_rat": lr, "seed": 0}
  yield {"seed": 1}
'''))
  lines = str(e.value).splitlines()
  assert len(lines) == 2 and all("is not a field of configs/digits_mlp.py (did you mean 'optimizer.learning_rate'?)"
                                 in line for line in lines)
  assert "trial 0 (optimizer.learning_rat=0.001, seed=0)" in lines[0] and "trial 1" in lines[1]


def test_sweep_variants_and_their_names(tmp_path):
  path = write(tmp_path / "s.py", FIXED + "def sweep():\n  yield {'seed': 0}\n"
               "def sweep_small():\n  yield {'seed': 1}\ndef sweep_tiny():\n  yield {'seed': 2}\n")
  assert [t.name for t in spec.load(path, "small").trials] == ["seed=1"]
  with pytest.raises(UserError, match=r"^--sweep=big: .* has no sweep_big\(\) or search_big\(\); valid: small, tiny$"):
    spec.load(path, "big")


def test_a_missing_base_config_or_sweep_file(tmp_path):
  with pytest.raises(UserError, match="base config 'configs/nope.py' not found"):
    spec.load(write(tmp_path / "s.py", "base = 'configs/nope.py'\ndef sweep():\n  yield {}\n"))
  with pytest.raises(UserError, match="cannot read sweep file"):
    spec.load(tmp_path / "absent.py")
  with pytest.raises(UserError, match=r"cannot read sweep file .*manifest.json' \(no such file, or not a .py file"):
    spec.load(write(tmp_path / "manifest.json", "{}"))  # a traceback wall ('NoneType' object has no 'loader')
  with pytest.raises(UserError, match=r"line 1: syntax error"):
    spec.load(write(tmp_path / "s.py", "base = (\n"))


def test_a_workdir_another_sweep_process_holds_is_refused_with_its_pid(tmp_path):
  """One sweep process per workdir: a second names the first's pid; once it is gone the lock is taken again."""
  sweep = spec.load(write(tmp_path / "a.py", FIXED + "def sweep():\n  yield {'seed': 0}\n"))
  manifest = Manifest.open(tmp_path / "out", sweep)
  holder = subprocess.Popen([sys.executable, "-c", "import sys\nfrom pathlib import Path\n"
                             "from bigmodel_jax.sweeps import spec\nfrom bigmodel_jax.sweeps.manifest import Manifest\n"
                             "lock = Manifest.open(Path(sys.argv[1]), spec.load(Path(sys.argv[2]))).lock()\n"
                             "print('locked', flush=True); sys.stdin.read()", str(tmp_path / "out"),
                             str(tmp_path / "a.py")], cwd=ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            text=True)
  try:
    assert holder.stdout.readline().strip() == "locked"
    with pytest.raises(UserError, match=rf"^--workdir: {tmp_path / 'out'} is in use by another sweep "
                                        rf"\(pid {holder.pid}\); wait for it or stop it$"):
      manifest.lock()
  finally:
    holder.stdin.close()
    holder.wait()
  assert (tmp_path / "out" / ".sweep.lock").read_text() == str(holder.pid)
  manifest.lock()
  assert (tmp_path / "out" / ".sweep.lock").read_text() == str(os.getpid())


def test_a_workdir_holding_another_sweep_is_refused(tmp_path):
  first = spec.load(write(tmp_path / "a.py", FIXED + "def sweep():\n  yield {'seed': 0}\n"))
  Manifest.open(tmp_path / "out", first).sync(first)
  other = spec.load(write(tmp_path / "b.py", FIXED.replace("digits_mlp.py", "linear_regression.py") +
                          "metric = 'mse'\nmode = 'min'\ndef sweep():\n  yield {'seed': 0}\n"))
  with pytest.raises(UserError, match=r"holds a different sweep \(base: 'configs/digits_mlp.py' here, "
                                      r"'configs/linear_regression.py' in .*b.py\); use another --workdir"):
    Manifest.open(tmp_path / "out", other)
  (tmp_path / "run").mkdir()
  (tmp_path / "run" / "config.json").write_text("{}")
  with pytest.raises(UserError, match=r"holds a training run \(config.json\), not a sweep"):
    Manifest.open(tmp_path / "run", first)
  (tmp_path / "run" / "config.json").unlink()
  (tmp_path / "run" / "checkpoints").mkdir()  # a run's checkpoints without its config.json: a run all the same
  with pytest.raises(UserError, match=r"holds a training run \(checkpoints\), not a sweep"):
    Manifest.open(tmp_path / "run", first)
  (tmp_path / "reproductions").mkdir()
  (tmp_path / "reproductions" / "report.json").write_text("{}")
  with pytest.raises(UserError, match=r"holds reproductions \(report.json\), not a sweep; use another --workdir"):
    Manifest.open(tmp_path / "reproductions", first)


def test_an_unreachable_ray_address_fails_within_seconds():
  from bigmodel_jax.sweeps.ray_tune import resolve_address
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]  # free, and nothing listens there
  start = time.time()
  with pytest.raises(UserError, match=rf"^--ray_address=127.0.0.1:{port}: no Ray cluster answers at 127.0.0.1:{port}"):
    resolve_address(f"127.0.0.1:{port}")
  with pytest.raises(UserError, match="expected host:port"):
    resolve_address("somewhere")
  assert time.time() - start < 10


def test_missing_extras_are_named(tmp_path, monkeypatch):
  from bigmodel_jax import sweep as sweep_cli
  monkeypatch.setitem(sys.modules, "optuna", None)
  with pytest.raises(UserError, match=r"search\(\) needs optuna, which is not installed: pip install "
                                      r"'bigmodel_jax\[search\]'"):
    spec.load(write(tmp_path / "s.py", FIXED + "num_trials = 2\ndef search(trial):\n  return {}\n"))
  monkeypatch.setitem(sys.modules, "ray", None)
  monkeypatch.delitem(sys.modules, "bigmodel_jax.sweeps.ray_tune", raising=False)
  with pytest.raises(UserError, match=r"--executor=ray needs ray, which is not installed: pip install "
                                      r"'bigmodel_jax\[ray\]'"):
    sweep_cli.EXECUTORS.get("ray")(None, "auto")


def test_report_groups_over_seeds_and_selects_on_validation_only(tmp_path):
  """Synthetic run records: the best group by validation, whatever test says."""
  data = {"identity": {"kind": "grid", "base": "configs/x.py", "overrides": {}}, "name": "synthetic",
          "metric": "accuracy", "mode": "max", "eval": "validation", "labels": {"optimizer.learning_rate": "lr"},
          "trials": {}}
  for lr, val, test in [(0.1, [0.90, 0.92], [0.99, 0.99]), (0.01, [0.95, 0.97], [0.80, 0.82])]:
    for seed, (v, t) in enumerate(zip(val, test)):
      name = f"lr={lr},seed={seed}"
      (tmp_path / name).mkdir()
      (tmp_path / name / "final_metrics.json").write_text(json.dumps({
          "step": 10, "validation": {"accuracy": v}, "test": {"accuracy": t}, "best_step": 10,
          "best": {"eval": "validation", "metric": "accuracy", "mode": "max", "value": v, "step": 10,
                   "test": {"accuracy": t}}}))
      (tmp_path / name / "metrics.jsonl").write_text("".join(json.dumps(
          {"step": s, "split": "validation", "eval": "validation", "accuracy": v * s / 10}) + "\n" for s in (5, 10)))
      data["trials"][name] = {"status": "done", "overrides": {"optimizer.learning_rate": lr, "seed": seed},
                              "in_sweep": True, "wall_s": 1.0, "error": ""}
  shutil.copytree(tmp_path / "lr=0.1,seed=0", tmp_path / "005,lr=0.1,seed=0")  # a search asked it again
  data["trials"]["005,lr=0.1,seed=0"] = {**data["trials"]["lr=0.1,seed=0"]}
  paths = report.write(tmp_path, data)
  md = (tmp_path / "results.md").read_text()
  table = [line for line in md.splitlines() if line.startswith("| 0.")]
  assert table == ["| 0.01 | 0.96 ± 0.014 | 0.81 ± 0.014 | 2 |", "| 0.1 | 0.91 ± 0.014 | 0.99 ± 0 | 2 |"]  # not n=3
  assert "counted once): `005,lr=0.1,seed=0` (as `lr=0.1,seed=0`)" in md
  assert "**Best**: lr=0.01: validation accuracy 0.96 ± 0.014 (n=2); test accuracy 0.81 ± 0.014." in md
  assert {p.name for p in paths} >= {"results.csv", "results.md", "accuracy_vs_lr.png", "validation_curves.png"}
  (tmp_path / "lr=0.1,seed=1" / "final_metrics.json").write_text("[]")  # damaged since the manifest said done
  report.write(tmp_path, data)
  md = (tmp_path / "results.md").read_text()
  assert "| 0.1 | 0.9 | 0.99 | 1 |" in md and "`lr=0.1,seed=1` (incomplete)" in md, md
  record = json.loads((tmp_path / "lr=0.01,seed=1" / "final_metrics.json").read_text())
  del record["best"]["test"]  # the best step's checkpoint was deleted: validation from 2 seeds, test from 1
  (tmp_path / "lr=0.01,seed=1" / "final_metrics.json").write_text(json.dumps(record))
  report.write(tmp_path, data)
  md = (tmp_path / "results.md").read_text()
  assert "| 0.01 | 0.96 ± 0.014 | 0.8 (n=1) | 2 |" in md and "test accuracy 0.8 (n=1)." in md, md


def synthetic_sweep(workdir: Path, curves: dict) -> None:
  """A finished grid's manifest and trial records: {trial name: [(step, validation accuracy), ...]} (the last the
  best and final one), learning rate 0.1 for each, seeds 0, 1, ..."""
  trials = {}
  for seed, (name, curve) in enumerate(curves.items()):
    (workdir / name).mkdir(parents=True)
    step, value = curve[-1]
    (workdir / name / "final_metrics.json").write_text(json.dumps({
        "step": step, "validation": {"accuracy": value}, "test": {"accuracy": value}, "best_step": step,
        "best": {"eval": "validation", "metric": "accuracy", "mode": "max", "value": value, "step": step,
                 "test": {"accuracy": value}}}))
    (workdir / name / "metrics.jsonl").write_text("".join(json.dumps(
        {"step": s, "split": "validation", "eval": "validation", "accuracy": v}) + "\n" for s, v in curve))
    trials[name] = {"status": "done", "overrides": {"optimizer.learning_rate": 0.1, "seed": seed}, "in_sweep": True}
  (workdir / "manifest.json").write_text(json.dumps({
      "identity": {"kind": "grid", "base": "configs/x.py", "overrides": {}}, "name": "synthetic", "trials": trials,
      "metric": "accuracy", "mode": "max", "eval": "validation", "labels": {"optimizer.learning_rate": "lr"}}))


def test_a_report_reads_past_a_damaged_metrics_jsonl(sweep_env, tmp_path):
  """A trial's metrics.jsonl with bytes that are not UTF-8 or a line that is JSON but no record (a hand edit, a bad
  copy) ended --report (and a sweep's last step) in a UnicodeDecodeError / AttributeError traceback: the report
  now skips what is not a record, and the trials' results are all there."""
  synthetic_sweep(tmp_path, {"lr=0.1,seed=0": [(5, 0.5), (10, 0.9)], "lr=0.1,seed=1": [(5, 0.6), (10, 0.8)]})
  with open(tmp_path / "lr=0.1,seed=0" / "metrics.jsonl", "ab") as f:
    f.write(b"\xff\xfe\x00 not text\n")
  with open(tmp_path / "lr=0.1,seed=1" / "metrics.jsonl", "a") as f:
    f.write('[1, 2]\n7\n{"split": "validation", "accuracy": 0.1}\n{"step": "x", "eval": "validation"}\n')
  proc = run_sweep(sweep_env, "--report", f"--workdir={tmp_path}", timeout=120)
  assert proc.returncode == 0 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
  md = (tmp_path / "results.md").read_text()
  assert "| 0.1 | 0.85 ± 0.071 | 0.85 ± 0.071 | 2 |" in md, md
  assert (tmp_path / "plots" / "validation_curves.png").stat().st_size > 1000


def test_mode_eval_records_are_not_the_trials_validation_curve(tmp_path):
  """`--mode=eval --checkpoint_step=20` on a trial appends {"split": "eval", "eval": "validation", "step": 20} to its
  metrics.jsonl. The report took it for a training evaluation: the curve went back to step 20, and an unfinished
  trial's latest validation value (results.csv) was that old checkpoint's. Now only the training's records count."""
  synthetic_sweep(tmp_path, {"lr=0.1,seed=0": [(20, 0.5), (40, 0.7), (60, 0.9)]})
  with open(tmp_path / "lr=0.1,seed=0" / "metrics.jsonl", "a") as f:
    for name, split in (("test", "test"), ("validation", "validation")):
      f.write(json.dumps({"step": 20, "split": "eval", "eval": name, "eval_split": split, "accuracy": 0.5}) + "\n")
  (tmp_path / "lr=0.1,seed=0" / "final_metrics.json").unlink()  # stopped before its end: not finished
  data = Manifest.load(tmp_path).data
  data["trials"]["lr=0.1,seed=0"]["status"] = "interrupted"
  (row,) = report.rows(tmp_path, data)
  assert row.curve == [(20, 0.5), (40, 0.7), (60, 0.9)] and (row.step, row.value) == (60, 0.9), row


# --- real sweeps


def test_a_sweep_writes_results_and_goes_on_past_a_failing_trial(grid):
  folder, workdir, proc = grid
  assert proc.returncode == 1, proc.stderr[-3000:]  # one trial failed; the others ran
  rows = results(workdir)
  assert {name: row["status"] for name, row in rows.items()} == {
      "learning_rate=0.001,seed=0": "done", "learning_rate=0.001,seed=1": "done",
      "learning_rate=0.003,seed=0": "done", "learning_rate=0.003,seed=1": "done", "batch_size=5000": "failed"}
  error = ("error: config.data.batch_size: 5000 is larger than the 1294 training examples of 'digits' (the rest of "
           "its training split is validation: data.validation_fraction=0.1) with drop_remainder")
  assert rows["batch_size=5000"]["error"] == error and f"trial batch_size=5000 failed: {error}" in proc.stderr
  for name, row in rows.items():
    if row["status"] == "done":
      f = final(workdir / name)
      assert float(row["validation_accuracy"]) == f["best"]["value"] and int(row["best_step"]) == f["best_step"]
      assert float(row["test_accuracy"]) == f["best"]["test"]["accuracy"]
  md = (workdir / "results.md").read_text()
  assert md.count("| 2 |") == 2 and "**Best**: learning_rate=" in md and f"`batch_size=5000`: {error}" in md
  assert (workdir / "plots" / "accuracy_vs_learning_rate.png").stat().st_size > 1000
  assert (workdir / "plots" / "validation_curves.png").stat().st_size > 1000
  trial = workdir / "learning_rate=0.001,seed=0"
  assert {"stdout.log", "stderr.log", "sweep_trial.json", "config.json", "metrics.jsonl"} <= {
      p.name for p in trial.iterdir()}
  record = json.loads((trial / "sweep_trial.json").read_text())
  assert record["env"] == {"BIGMODEL_JAX_EXPERIMENT": "grid"} and "--config.train.progress_bar=false" in record["argv"]
  assert json.loads((trial / "config.json").read_text())["optimizer"]["learning_rate"] == 0.001


def test_running_again_skips_finished_trials_runs_added_ones_keeps_removed_ones(grid, sweep_env):
  folder, workdir, _ = grid
  proc = run_sweep(sweep_env, write(folder / "grid.py", WITH_ADDED), f"--workdir={workdir}", "--parallel=2")
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "5 trials on configs/digits_mlp.py, 4 already done; 1 to run" in proc.stderr
  assert all(launches(d) == 1 for d in trial_dirs(workdir) if (d / "final_metrics.json").exists())
  rows = results(workdir)
  assert rows["batch_size=5000"]["in_sweep"] == "False" and rows["batch_size=5000"]["status"] == "failed"
  assert rows["learning_rate=0.01,seed=0"]["status"] == "done" and len(rows) == 6
  assert run_sweep(sweep_env, "--report", f"--workdir={workdir}").returncode == 0


def test_a_finished_trial_made_with_another_config_is_not_taken_as_done(grid, tmp_path):
  """A done trial is skipped and reported: one whose run had another config (the base config edited since, or the
  manifest moved away and another sweep file launched there) would be reported under settings it never ran."""
  folder, workdir, _ = grid
  copy = Path(shutil.copytree(workdir, tmp_path / "out"))
  sweep = spec.load(folder / "grid.py")
  Manifest.open(copy, sweep).sync(sweep)  # as it ran: nothing differs
  config = json.loads((copy / "learning_rate=0.003,seed=1" / "config.json").read_text())
  config["model"]["hidden_sizes"] = [4]  # what an edit of the base file between launches makes of a later trial
  (copy / "learning_rate=0.003,seed=1" / "config.json").write_text(json.dumps(config))
  with pytest.raises(UserError, match=r"trial learning_rate=0\.003,seed=1 finished with another config than .* "
                                      r"\(model\.hidden_sizes: \[4\] -> \[128, 128\]\).*move .* away to run it again"):
    Manifest.open(copy, sweep).sync(sweep)
  shutil.rmtree(copy / "learning_rate=0.003,seed=1")
  config = json.loads((copy / "learning_rate=0.003,seed=0" / "config.json").read_text())
  config["init"]["workdir"] = "/elsewhere/pretrained"  # started from other weights (a runtime field of a run)
  (copy / "learning_rate=0.003,seed=0" / "config.json").write_text(json.dumps(config))
  with pytest.raises(UserError, match=r"trial learning_rate=0\.003,seed=0 .*\(init\.workdir: '/elsewhere/pretrained'"):
    Manifest.open(copy, sweep).sync(sweep)
  shutil.rmtree(copy / "learning_rate=0.003,seed=0")
  config = json.loads((copy / "learning_rate=0.001,seed=1" / "config.json").read_text())
  config["evals"]["validation"]["every"] = 50  # validated at other steps: its best was chosen among others
  (copy / "learning_rate=0.001,seed=1" / "config.json").write_text(json.dumps(config))
  with pytest.raises(UserError, match=r"trial learning_rate=0\.001,seed=1 .*\(evals\.validation\.every: 50 -> 100"):
    Manifest.open(copy, sweep).sync(sweep)
  shutil.rmtree(copy / "learning_rate=0.001,seed=1")
  (copy / "manifest.json").unlink()  # moved away; another sweep file (more steps) launched in the same workdir
  longer = spec.load(write(tmp_path / "grid.py", (folder / "grid.py").read_text().replace('"train.num_steps": 300',
                                                                                           '"train.num_steps": 2000')))
  with pytest.raises(UserError, match=r"finished with another config .*\(train\.num_steps: 300 -> 2000\)"):
    Manifest.open(copy, longer).sync(longer)
  assert not (copy / "manifest.json").exists()  # refused before anything is written


def test_a_trial_cut_short_with_another_config_is_refused_before_anything_runs(grid, tmp_path):
  """A trial stopped with a checkpoint, then the base config edited: the relaunch ran the other trials with the new
  config and launched this one for main to refuse (a failed trial), one sweep of two configs; refused up front."""
  folder, workdir, _ = grid
  copy = Path(shutil.copytree(workdir, tmp_path / "out"))
  sweep = spec.load(folder / "grid.py")
  trial = copy / "learning_rate=0.003,seed=1"
  (trial / "final_metrics.json").unlink()  # cut short: its checkpoints stay
  assert trial.name in [t.name for t in Manifest.open(copy, sweep).sync(sweep)]  # as it ran: resumed
  config = json.loads((trial / "config.json").read_text())
  config["model"]["hidden_sizes"] = [4]  # what an edit of the base file between launches makes of it
  (trial / "config.json").write_text(json.dumps(config))
  with pytest.raises(UserError, match=r"^--workdir: trial learning_rate=0\.003,seed=1 stopped unfinished with another "
                                      r"config than .* \(model\.hidden_sizes: \[4\] -> \[128, 128\]\).*move .* away"):
    Manifest.open(copy, sweep).sync(sweep)
  config["model"]["hidden_sizes"] = [128, 128]
  del config["evals"]  # a run from before validation splits: main adopts it as it was, then compares
  (trial / "config.json").write_text(json.dumps(config))
  assert trial.name in [t.name for t in Manifest.open(copy, sweep).sync(sweep)]


def test_a_searchs_failed_trial_with_another_config_does_not_hold_up_the_search(grid, tmp_path):
  """A search never runs a failed trial again (the study asks new ones): one with a checkpoint whose config differs
  from the sweep's now (the base config fixed after its trials diverged) refused the relaunch, 'move it away to run
  it again'. Only the trials the study resumes (left running) are checked."""
  from bigmodel_jax.sweeps.search import Search
  folder, workdir, _ = grid
  sweep = spec.load(write(tmp_path / "s.py", FIXED + "num_trials = 2\ndef search(trial):\n  return {"
                          "'optimizer.learning_rate': 3e-3, 'seed': trial.suggest_int('seed', 1, 1)}\n"))
  search = Search(sweep, tmp_path / "out", Manifest.open(tmp_path / "out", sweep))
  failed, running = search._ask(), search._ask()
  for trial in (failed, running):  # each stopped with a checkpoint
    shutil.copytree(workdir / "learning_rate=0.003,seed=1", tmp_path / "out" / trial.name)
    (tmp_path / "out" / trial.name / "final_metrics.json").unlink()
    config = json.loads((tmp_path / "out" / trial.name / "config.json").read_text())
    config["model"]["hidden_sizes"] = [4]  # the base file edited since
    (tmp_path / "out" / trial.name / "config.json").write_text(json.dumps(config))
  search.tell(failed, "failed")
  search.manifest.update(failed.name, status="failed")
  search.manifest.update(running.name, status="interrupted")
  search.manifest.save()
  with pytest.raises(UserError, match=rf"^--workdir: trial {re.escape(running.name)} stopped unfinished"):
    Manifest.open(tmp_path / "out", sweep).sync(sweep)  # resumed by the study: main would refuse it
  shutil.rmtree(tmp_path / "out" / running.name)
  manifest = Manifest.open(tmp_path / "out", sweep)
  assert manifest.sync(sweep) == [] and manifest.trials[failed.name]["status"] == "failed"


@pytest.mark.parametrize("edit", ["no-metric", "no-trials", "trial-a-string", "identity-a-list", "no-overrides",
                                  "labels-a-number"])
def test_a_hand_damaged_manifest_is_one_line(grid, tmp_path, edit):
  folder, workdir, _ = grid
  copy = Path(shutil.copytree(workdir, tmp_path / "out"))
  data = json.loads((copy / "manifest.json").read_text())
  if edit == "no-metric":
    del data["metric"]
  elif edit == "no-trials":
    del data["trials"]
  elif edit == "trial-a-string":
    data["trials"]["learning_rate=0.001,seed=0"] = "done"
  elif edit == "no-overrides":  # --report would group every trial as one setting
    for entry in data["trials"].values():
      entry.pop("overrides")
  elif edit == "labels-a-number":
    data["labels"] = 5
  else:
    data["identity"] = ["grid"]
  (copy / "manifest.json").write_text(json.dumps(data))
  sweep = spec.load(folder / "grid.py")
  with pytest.raises(UserError, match=r"manifest.json: not a sweep manifest this version reads .* move it away"):
    Manifest.load(copy)  # --report
  if edit not in ("no-metric", "labels-a-number"):  # a launch records these from the sweep file
    with pytest.raises(UserError, match=r"manifest.json: not a sweep manifest this version reads"):
      Manifest.open(copy, sweep)


def test_a_killed_sweep_resumes_bit_identical(grid, sweep_env, tmp_path):
  _, reference, _ = grid
  workdir = tmp_path / "out"
  three = GOOD.replace("seeds(2))", "seeds(2))[:3]")  # the grid's first three trials
  proc = run_sweep(sweep_env, write(tmp_path / "grid.py", three), f"--workdir={workdir}", "--parallel=2", popen=True)
  wait_until(lambda: killed_mid_training(workdir) and any((d / "final_metrics.json").exists()
                                                          for d in trial_dirs(workdir)), proc)
  os.killpg(proc.pid, signal.SIGKILL)  # the sweep and its trials, at once
  proc.wait(timeout=30)
  interrupted = [d.name for d in trial_dirs(workdir) if not (d / "final_metrics.json").exists()]
  assert interrupted
  resumed = run_sweep(sweep_env, tmp_path / "grid.py", f"--workdir={workdir}", "--parallel=2")
  assert resumed.returncode == 0, resumed.stderr[-3000:]
  for d in trial_dirs(workdir):
    assert final(d)["params_sha256"] == final(reference / d.name)["params_sha256"], d.name
    assert d.name in interrupted or launches(d) == 1  # finished before the kill: not run again
  assert any(launches(workdir / name) == 2 for name in interrupted)  # some trial did resume from its checkpoint
  assert [row["status"] for row in results(workdir).values()] == ["done"] * 3


def test_a_search_stopped_by_sigterm_resumes(sweep_env, tmp_path):
  import optuna
  workdir = tmp_path / "out"
  path = write(tmp_path / "search.py", SEARCH)
  proc = run_sweep(sweep_env, path, f"--workdir={workdir}", "--parallel=2", popen=True)
  wait_until(lambda: killed_mid_training(workdir), proc)
  proc.send_signal(signal.SIGTERM)
  out, _ = proc.communicate(timeout=120)
  assert proc.returncode == 128 + signal.SIGTERM, out[-3000:]
  assert "SIGTERM: stopping" in out
  stopped = [d for d in trial_dirs(workdir) if not (d / "final_metrics.json").exists()]
  assert stopped and all(json.loads((d / "sweep_trial.json").read_text())["launches"][-1]["status"] == "interrupted"
                         for d in stopped)
  resumed = run_sweep(sweep_env, path, f"--workdir={workdir}", "--parallel=2")
  assert resumed.returncode == 0, resumed.stderr[-3000:]
  study = optuna.load_study(study_name="search", storage=optuna.storages.JournalStorage(
      optuna.storages.journal.JournalFileBackend(str(workdir / "optuna.journal"))))
  assert [t.state.name for t in study.trials] == ["COMPLETE"] * 4
  dirs = trial_dirs(workdir)
  assert len(dirs) == 4 and all((d / "final_metrics.json").exists() for d in dirs)
  assert any(launches(d) == 2 for d in stopped)  # resumed from its own checkpoint
  for t in study.trials:  # each trial's value is its run's validation selection
    assert t.value == final(workdir / t.user_attrs["name"])["best"]["value"]
  assert len({t.params["learning_rate"] for t in study.trials}) == 4  # the continued study asked new settings
  assert len(results(workdir)) == 4


@pytest.mark.parametrize("sampler", ["", "def sampler():\n  return optuna.samplers.RandomSampler(seed=0)\n",
                                     "def sampler(asked):\n  return optuna.samplers.RandomSampler(seed=asked)\n"],
                         ids=["default", "fixed-seed", "seeded-by-count"])
def test_a_continued_search_asks_new_settings(tmp_path, sampler):
  """A sampler seeded as at the study's start asked the first launch's trials again: the report then counted the
  repeats as more runs of one setting."""
  from bigmodel_jax.sweeps.search import Search
  sweep = spec.load(write(tmp_path / "s.py", "import optuna\n" + FIXED + "num_trials = 4\n" + sampler +
                          "def search(trial):\n  return {'optimizer.learning_rate': "
                          "trial.suggest_float('learning_rate', 1e-3, 1e-2, log=True)}\n"))
  asked = []
  for _ in range(2):  # two launches of the same command, two trials each
    search = Search(sweep, tmp_path / "out", Manifest.open(tmp_path / "out", sweep))
    for _ in range(2):
      trial = search._ask()
      search.tell(trial, "failed")
      asked.append(trial.overrides["optimizer.learning_rate"])
  assert len(set(asked)) == 4, asked


def test_a_study_that_optimizes_the_other_way_is_refused(tmp_path):
  """A study keeps the direction it was created with (optuna ignores another on load): one made maximizing loss
  (before a sweep's metric set its own direction) would go on steering towards the worst trials."""
  import optuna
  from bigmodel_jax.sweeps.search import JOURNAL, Search
  sweep = spec.load(write(tmp_path / "s.py", "metric = 'loss'\nnum_trials = 2\n" + FIXED +
                          "def search(trial):\n  return {'seed': trial.suggest_int('seed', 0, 9)}\n"))
  (tmp_path / "out").mkdir()
  optuna.create_study(storage=optuna.storages.JournalStorage(optuna.storages.journal.JournalFileBackend(
      str(tmp_path / "out" / JOURNAL))), study_name="s", direction="maximize")
  with pytest.raises(UserError, match=r"holds a search that maximizes loss, but .*s.py asks to minimize it"):
    Search(sweep, tmp_path / "out", Manifest.open(tmp_path / "out", sweep))


def test_a_study_of_another_metric_is_refused(tmp_path):
  """A study's values are its metric's: the sweep file's metric changed (accuracy -> f1, the same direction), the
  sampler went on steering by accuracy and f1 values mixed in one study."""
  from bigmodel_jax.sweeps.search import Search
  body = FIXED + "num_trials = 2\ndef search(trial):\n  return {'seed': trial.suggest_int('seed', 0, 9)}\n"
  sweep = spec.load(write(tmp_path / "s.py", body))
  search = Search(sweep, tmp_path / "out", Manifest.open(tmp_path / "out", sweep))
  search.tell(search._ask(), "failed")  # a trial asked and ended
  sweep = spec.load(write(tmp_path / "s.py", "metric = 'f1'\n" + body))
  with pytest.raises(UserError, match=r"holds a search of validation accuracy, but .*s.py asks for f1"):
    Search(sweep, tmp_path / "out", Manifest.open(tmp_path / "out", sweep))
  # a metric of the other direction too: said as a metric (was: 'holds a search that maximizes loss')
  sweep = spec.load(write(tmp_path / "s.py", "metric = 'loss'\n" + body))
  with pytest.raises(UserError, match=r"holds a search of validation accuracy, but .*s.py asks for loss"):
    Search(sweep, tmp_path / "out", Manifest.open(tmp_path / "out", sweep))


def test_a_study_made_before_studies_recorded_their_metric_is_refused_another(tmp_path):
  """A workdir from before the study recorded its metric: its manifest says which (accuracy); continued with f1,
  it was not refused (the study went on with f1 values told beside accuracy ones)."""
  import optuna
  from bigmodel_jax.sweeps.search import JOURNAL, Search
  body = FIXED + "num_trials = 2\ndef search(trial):\n  return {'seed': trial.suggest_int('seed', 0, 9)}\n"
  sweep = spec.load(write(tmp_path / "s.py", body))
  Manifest.open(tmp_path / "out", sweep).sync(sweep)  # the manifest as the old code wrote it: metric accuracy
  optuna.create_study(storage=optuna.storages.JournalStorage(optuna.storages.journal.JournalFileBackend(
      str(tmp_path / "out" / JOURNAL))), study_name=sweep.name, direction="maximize")  # no metric recorded
  sweep = spec.load(write(tmp_path / "s.py", "metric = 'f1'\n" + body))
  with pytest.raises(UserError, match=r"holds a search of validation accuracy, but .*s.py asks for f1"):
    Search(sweep, tmp_path / "out", Manifest.open(tmp_path / "out", sweep))


def test_a_search_whose_manifest_was_moved_away_finds_its_trials_again(tmp_path):
  """'move it away and launch the sweep file again (finished trials are found in their directories)': a search's
  were not (only a grid's are in its file): '0/N trials done', an empty results.md, and no trial ever run again."""
  from bigmodel_jax.sweeps.search import Search
  sweep = spec.load(write(tmp_path / "s.py", FIXED + "num_trials = 2\n"
                          "def search(trial):\n  return {'seed': trial.suggest_int('seed', 0, 9)}\n"))
  search = Search(sweep, tmp_path / "out", Manifest.open(tmp_path / "out", sweep))
  done, failed = search._ask(), search._ask()
  (tmp_path / "out" / done.name).mkdir()
  (tmp_path / "out" / done.name / "final_metrics.json").write_text('{"step": 1, "validation": {"accuracy": 0.5}}')
  search.tell(done, "done")
  search.tell(failed, "failed")
  manifest = Manifest.open(tmp_path / "out", sweep)  # none on disk: a new one, as after `mv manifest.json ...`
  Search(sweep, tmp_path / "out", manifest)  # as the sweep command does, before its sync
  manifest.sync(sweep)
  assert {n: (e["status"], e["overrides"]) for n, e in manifest.trials.items()} == {
      done.name: ("done", done.overrides), failed.name: ("failed", failed.overrides)}


def test_a_study_trial_without_this_sweeps_name_and_overrides_is_left_out(tmp_path, caplog):
  """A study's trial with a name but no overrides (a sweep killed between the two, or another tool's attrs), one
  with a name that is no directory of the workdir, one another tool completed: re-adopting the study's trials after
  the manifest was lost raised KeyError. They are left out of the manifest, said in one warning; a running one that
  was never this sweep's is ended, and none counts toward num_trials."""
  import optuna
  from bigmodel_jax.sweeps.search import Search
  sweep = spec.load(write(tmp_path / "s.py", FIXED + "num_trials = 2\n"
                          "def search(trial):\n  return {'seed': trial.suggest_int('seed', 0, 9)}\n"))
  search = Search(sweep, tmp_path / "out", Manifest.open(tmp_path / "out", sweep))
  ours = search._ask()
  search.tell(ours, "failed")
  cut_short = search.study.ask()  # running, named, no overrides
  search.study._storage.set_trial_user_attr(cut_short._trial_id, "name", "001,seed=3")
  escaping = search.study.ask()
  escaping.set_user_attr("overrides", {"seed": 1})
  escaping.set_user_attr("name", "../elsewhere")
  search.study.tell(escaping, state=optuna.trial.TrialState.FAIL)
  search.study.add_trial(optuna.trial.create_trial(params={"seed": 5}, value=0.5, distributions={
      "seed": optuna.distributions.IntDistribution(0, 9)}))  # completed by another tool: no attrs
  manifest = Manifest.open(tmp_path / "out", sweep)  # the manifest moved away
  search = Search(sweep, tmp_path / "out", manifest)
  assert {n: e["status"] for n, e in manifest.trials.items()} == {ours.name: "failed"}
  assert [r.getMessage().split(": ", 1)[1] for r in caplog.records if r.levelname == "WARNING"] == [
      "trial(s) 2, 3 of its study hold no name and overrides of this sweep (added by another tool?): left out of "
      "the manifest and the report"]
  asked = list(search.trials())
  assert [t.number for t in asked] == [4]  # one more of its own makes num_trials; the cut-short one is ended
  assert search.study.trials[1].state == optuna.trial.TrialState.FAIL


def test_a_study_journal_cut_short_continues_and_a_damaged_one_is_one_line(tmp_path):
  """optuna.journal with its last line cut short (the sweep killed, or the disk full, mid-write): optuna read past it
  but appended the next record to it, a JSONDecodeError traceback at the relaunch and at every one after. The cut
  line is dropped and the study goes on; a line damaged inside the journal (a hand edit) is one line."""
  from bigmodel_jax.sweeps.search import JOURNAL, Search
  sweep = spec.load(write(tmp_path / "s.py", FIXED + "num_trials = 3\n"
                          "def search(trial):\n  return {'seed': trial.suggest_int('seed', 0, 9)}\n"))
  search = Search(sweep, tmp_path / "out", Manifest.open(tmp_path / "out", sweep))
  first, second = search._ask(), search._ask()
  search.tell(first, "failed")
  journal = tmp_path / "out" / JOURNAL
  journal.write_bytes(journal.read_bytes()[:-10])  # the record of the first's end cut short: it is running again
  search = Search(sweep, tmp_path / "out", Manifest.open(tmp_path / "out", sweep))
  search.tell(search._ask(), "failed")
  search = Search(sweep, tmp_path / "out", Manifest.open(tmp_path / "out", sweep))  # it reads again
  assert [t.state.name for t in search.study.trials] == ["RUNNING", "RUNNING", "FAIL"]
  assert [t.user_attrs.get("name") for t in search.study.trials[:2]] == [first.name, second.name]
  lines = journal.read_bytes().splitlines(keepends=True)
  journal.write_bytes(b"".join([*lines[:2], b"{not json\n", *lines[2:]]))
  with pytest.raises(UserError, match=rf"^--workdir: {re.escape(str(journal))} is damaged \(JSONDecodeError: .*\); "
                                      "restore it, or move it away to start the search afresh"):
    Search(sweep, tmp_path / "out", Manifest.open(tmp_path / "out", sweep))


def test_a_search_trial_refused_at_ask_is_asked_again_after_the_fix(tmp_path):
  """search(trial) giving a bad override stops the sweep (one line); the fixed file's relaunch asks a trial in its
  place, so the study can still reach num_trials (the refused one counted: '1/2 done' and exit 1 forever)."""
  from bigmodel_jax.sweeps.search import Search
  body = ("num_trials = 2\ndef search(trial):\n  key = 'optimizer.learning_rate' if trial.number == 0 else {!r}\n"
          "  return {{key: trial.suggest_float('learning_rate', 1e-3, 1e-2, log=True)}}\n")
  broken = spec.load(write(tmp_path / "s.py", FIXED + body.format("optimizer.learning_rat")))
  search = Search(broken, tmp_path / "out", Manifest.open(tmp_path / "out", broken))
  search.tell(search._ask(), "failed")  # trial 0 ran (and failed)
  with pytest.raises(UserError, match="trial 1: 'optimizer.learning_rat' is not a field"):
    search._ask()
  fixed = spec.load(write(tmp_path / "s.py", FIXED + body.format("optimizer.learning_rate")))
  again = list(Search(fixed, tmp_path / "out", Manifest.open(tmp_path / "out", fixed)).trials())
  assert [t.number for t in again] == [2]


def test_bad_input_on_the_command_line_is_one_line_and_runs_nothing(sweep_env, tmp_path):
  path = write(tmp_path / "s.py", FIXED + "def sweep():\n  yield {'optimizer.learning_rat': 1e-3}\n")
  proc = run_sweep(sweep_env, path, f"--workdir={tmp_path / 'out'}")
  assert proc.returncode == 2
  assert proc.stderr.strip().splitlines() == [
      f"error: {path}: trial 0 (optimizer.learning_rat=0.001): 'optimizer.learning_rat' is not a field of "
      "configs/digits_mlp.py (did you mean 'optimizer.learning_rate'?)"]
  assert not (tmp_path / "out").exists()
  proc = run_sweep(sweep_env, write(tmp_path / "ok.py", GOOD), f"--workdir={tmp_path / 'out'}", "--executor=slurm")
  assert proc.returncode == 2 and proc.stderr.strip().splitlines() == [
      "error: --executor: unknown executor 'slurm'; valid: local, ray"]


def test_an_empty_or_unwritable_workdir_is_refused_before_anything_runs(sweep_env, tmp_path):
  base = FIXED.replace("configs/", f"{ROOT}/configs/")  # found from any directory
  grid = write(tmp_path / "grid.py", base + "def sweep():\n  yield {'seed': 0}\n")
  (tmp_path / "file").write_text("")
  here = tmp_path / "cwd"
  here.mkdir()
  for workdir, says in (("", "error: --workdir is empty"), (tmp_path / "file" / "w", "error: --workdir: cannot write")):
    proc = subprocess.run([sys.executable, "-m", "bigmodel_jax.sweep", str(grid), f"--workdir={workdir}"], cwd=here,
                          env=sweep_env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and proc.stderr.strip().splitlines() == [proc.stderr.strip()], proc.stderr[-2000:]
    assert proc.stderr.startswith(says) and not list(here.iterdir())  # nothing written where it was launched


@pytest.mark.parametrize("content", [None, b"", b'{"step": 80, "test": {"acc', b"[]", b"\xff\xfe binary"])
def test_a_trial_without_a_readable_final_metrics_json_is_not_done(tmp_path, content):
  from bigmodel_jax.sweeps import trials
  if content is not None:
    (tmp_path / trials.FINAL).write_bytes(content)
  assert not trials.is_done(tmp_path) and trials.read_json(tmp_path / trials.FINAL) is None
  (tmp_path / trials.FINAL).write_text('{"step": 80}')
  assert trials.is_done(tmp_path)


def test_reordering_a_sweeps_axes_keeps_its_trials_names(tmp_path):
  """Trial names follow the overrides' key order: a sweep file whose axes were swapped named every trial anew
  ('seed=0,learning_rate=0.001'), so a relaunch ran its finished trials again. A trial the workdir holds is the
  same by its overrides and keeps the name it was given; a new workdir names trials as the file orders them."""
  from bigmodel_jax.sweeps import trials
  axes = '{"optimizer.learning_rate": [1e-3, 3e-3]}, seeds(2)'
  first = spec.load(write(tmp_path / "s.py", GOOD))
  Manifest.open(tmp_path / "out", first).sync(first)
  (tmp_path / "out" / "learning_rate=0.001,seed=1").mkdir()
  (tmp_path / "out" / "learning_rate=0.001,seed=1" / trials.FINAL).write_text('{"step": 300}')
  swap = lambda n: GOOD.replace(axes, f'seeds({n}), {{"optimizer.learning_rate": [1e-3, 3e-3]}}')
  swapped = spec.load(write(tmp_path / "s.py", swap(2)))
  assert swapped.trials[0].name == "seed=0,learning_rate=0.001"  # as the file orders them
  manifest = Manifest.open(tmp_path / "out", swapped)
  todo = manifest.sync(swapped)
  assert sorted(manifest.trials) == sorted(t.name for t in first.trials)  # no trial renamed, none added
  assert "learning_rate=0.001,seed=1" not in [t.name for t in todo] and len(todo) == 3
  assert all(e["in_sweep"] for e in manifest.trials.values())
  added = spec.load(write(tmp_path / "s.py", swap(3)))
  Manifest.open(tmp_path / "out", added)
  names = [t.name for t in added.trials]
  assert "seed=2,learning_rate=0.001" in names and "learning_rate=0.001,seed=0" in names


def test_a_tilde_after_the_equals_sign_is_the_home_directory(sweep_env, tmp_path):
  """--workdir=~/sw, which the shell leaves as it is (as main, reproduce and convert read theirs): was a directory
  named '~' in the current one."""
  sweep = write(tmp_path / "s.py", FIXED + "def sweep():\n  yield {'seed': 0}\n")
  proc = run_sweep({**sweep_env, "HOME": str(tmp_path)}, sweep, "--workdir=~/sw", "--dry_run")
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert f"--workdir={tmp_path / 'sw'}/" in proc.stdout and not (ROOT / "~").exists(), proc.stdout


def test_stdout_closed_by_its_reader_is_one_line(sweep_env, tmp_path):
  """sweep --dry_run | head -1 was a BrokenPipeError traceback, exit 1."""
  from conftest import CLOSED_STDOUT, with_stdout_closed
  sweep = write(tmp_path / "s.py", FIXED + "def sweep():\n  yield {'seed': 0}\n")
  status, err = with_stdout_closed("bigmodel_jax.sweep", sweep, f"--workdir={tmp_path / 'sw'}",
                                   "--dry_run", env=sweep_env)
  assert status == 141 and [l for l in err.splitlines() if l.startswith("error:")] == [CLOSED_STDOUT], err[-3000:]
  failing = write(tmp_path / "f.py", FIXED + "def sweep():\n  yield {'data.batch_size': 5000}\n")
  status, err = with_stdout_closed("bigmodel_jax.sweep", failing, f"--workdir={tmp_path / 'f'}", env=sweep_env)
  assert status == 1 and CLOSED_STDOUT in err and "trial batch_size=5000 failed" in err, err[-3000:]  # was 141
