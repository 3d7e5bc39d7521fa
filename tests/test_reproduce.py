"""The reproduction tool: real runs of the registry's entries through main, judged against their targets; a report
card that says PASS, FAIL (a target out of reach), SKIPPED (no GPU, no network, with why) and ERROR (a failed run)."""

import contextlib
import json
import os
import shutil
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from conftest import ROOT, error_lines


@pytest.fixture(scope="module")
def reproduce(cache_dir, tmp_path_factory):
  """reproduce(*args): `python -m bigmodel_jax.reproduce *args` from the repo root (CPU, offline, empty data dir)."""
  data_dir = tmp_path_factory.mktemp("data")
  env = {**os.environ, "JAX_PLATFORMS": "cpu", "BIGMODEL_JAX_CACHE_DIR": str(cache_dir),
         "BIGMODEL_JAX_DATA_DIR": str(data_dir), "PYTHONPATH": str(ROOT)}
  def run(*args, timeout: float = 300):
    return subprocess.run([sys.executable, "-m", "bigmodel_jax.reproduce", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)
  return run


@pytest.fixture(scope="module")
def card(reproduce, tmp_path_factory) -> Path:
  """The shipped linear_regression reproduction (its first seed), run for real; -> the tool's workdir."""
  workdir = tmp_path_factory.mktemp("card")
  proc = reproduce("linear_regression", "--seeds=1", f"--workdir={workdir}")
  assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
  return workdir


def registry(tmp_path: Path, entries: str) -> Path:
  path = tmp_path / "registry.py"
  path.write_text("from bigmodel_jax.reproduction import Download, Reproduction, Target\n"
                  f"REPRODUCTIONS = [\n{textwrap.indent(textwrap.dedent(entries), '    ')}]\n")
  return path


def test_linear_regression_passes_with_the_shipped_settings(card):
  entry = json.loads((card / "report.json").read_text())["reproductions"]["linear_regression"]
  final = json.loads((card / "linear_regression" / "seed_0" / "final_metrics.json").read_text())
  assert entry["status"] == "PASS", entry
  w, b = entry["targets"]
  assert (w["values"], b["values"]) == ([final["coefficients"]["weights"][0][0]], [final["coefficients"]["bias"][0]])
  assert abs(w["mean"] - 3.0) <= 0.1 and abs(b["mean"] - 4.5) <= 0.1 and w["n"] == 1
  row = next(line for line in (card / "report.md").read_text().splitlines() if line.startswith("| linear_regression"))
  assert "| PASS (1 of 3 seeds) |" in row and f"{w['mean']:.4f}" in row


def test_relaunch_skips_finished_runs_and_readme_prints_the_table(card, reproduce):
  proc = reproduce("linear_regression", "--seeds=1", f"--workdir={card}")
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert "seed 0: finished earlier" in proc.stdout
  assert json.loads((card / "linear_regression" / "seed_0" / "reproduce.json").read_text())["launches"] == 1
  table = reproduce("--readme", str(card / "report.json"))
  assert table.returncode == 0, table.stderr
  lines = table.stdout.strip().splitlines()
  assert lines[0].startswith("| reproduction |") and len(lines) == 3 and "| PASS" in lines[2]
  assert table.stdout.strip() in (card / "report.md").read_text()


def test_other_flags_on_a_finished_run_are_refused_and_its_row_is_kept(card, reproduce, tmp_path):
  workdir = shutil.copytree(card, tmp_path / "card")
  before = (workdir / "report.json").read_text()
  proc = reproduce("linear_regression", "--seeds=1", f"--workdir={workdir}", "--override=train.num_epochs=5")
  assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1, proc.stderr[-2000:]
  assert "holds a finished run made with" in proc.stderr and "use another --workdir" in proc.stderr
  assert (workdir / "report.json").read_text() == before  # the PASS row stays


def test_an_unfinished_seed_relaunched_with_another_override_is_refused_up_front(card, reproduce, tmp_path):
  """A seed cut short, relaunched with another --override: each seed's launch was refused by main (the run holds
  another config), an ERROR row per seed that replaced the reproduction's row; it is one line before anything runs."""
  workdir = shutil.copytree(card, tmp_path / "card")
  (workdir / "linear_regression" / "seed_0" / "final_metrics.json").unlink()  # its checkpoints stay
  before = (workdir / "report.json").read_text()
  proc = reproduce("linear_regression", "--seeds=1", f"--workdir={workdir}", "--override=optimizer.learning_rate=0.05")
  assert proc.returncode == 2 and proc.stderr.strip().splitlines() == [proc.stderr.strip()], proc.stderr[-2000:]
  assert proc.stderr.strip() == (
      f"error: --workdir: {workdir / 'linear_regression' / 'seed_0'} holds a run with a different config "
      "(optimizer.learning_rate: 0.1 -> 0.05); use a new --workdir or pass --override=train.allow_config_change=true "
      "to continue it anyway")
  assert (workdir / "report.json").read_text() == before and "running" not in proc.stdout
  from bigmodel_jax.reproduce import other_resume
  from bigmodel_jax.reproduction import REGISTRY, load_registry
  seed_dir = workdir / "linear_regression" / "seed_0"
  config = json.loads((seed_dir / "config.json").read_text())
  del config["evals"]  # a run from before validation splits: main adopts it as it was, then compares
  (seed_dir / "config.json").write_text(json.dumps(config))
  assert other_resume(load_registry(REGISTRY)[0], 0, seed_dir, {}) == ""


@pytest.mark.parametrize("override, says", [("optimizer.learning_rate=abc", "a float field"),
                                            ("train.num_epochs=1e3", "an int field"),
                                            ("train.progress_bar=yes", "a bool field")])
def test_an_override_of_the_wrong_type_is_refused_before_anything_runs(reproduce, tmp_path, override, says):
  proc = reproduce("linear_regression", f"--workdir={tmp_path / 'w'}", f"--override={override}")
  assert proc.returncode == 2 and proc.stderr.strip().splitlines() == [proc.stderr.strip()], proc.stderr[-2000:]
  assert proc.stderr.startswith(f"error: --override={override}: {says}") and not (tmp_path / "w").exists()


@pytest.mark.parametrize("override, says", [
    ("train.dtype=foo", "config.train.dtype: unknown compute dtype 'foo'; valid: bfloat16, float32"),
    ("data.batch_size=-3", "config.data.batch_size: must be > 0, got -3"),
    ("train=5", "'train' is a section of the config; override its fields (train.<field>)")])
def test_an_override_main_would_refuse_is_one_line_before_any_seed_runs(reproduce, tmp_path, override, says):
  proc = reproduce("linear_regression", f"--workdir={tmp_path / 'w'}", f"--override={override}")
  assert proc.returncode == 2 and proc.stderr.strip().splitlines() == [proc.stderr.strip()], proc.stderr[-2000:]
  assert proc.stderr.startswith(f"error: --override={override}: {says} (in configs/linear_regression.py, "
                                "reproduction 'linear_regression')")
  assert "seed" not in proc.stdout and not (tmp_path / "w").exists()


def test_an_override_that_fits_only_some_reproductions_says_to_name_those(reproduce, tmp_path):
  """'all --override=data.path=...' (the docstring's example) ran every seed of every other reproduction into an
  ERROR row (their datasets read no file); refused up front, the line says the override goes to every one named."""
  (tmp_path / "in.txt").write_text("some text\n")
  proc = reproduce("all", f"--workdir={tmp_path / 'w'}", f"--override=data.path={tmp_path / 'in.txt'}")
  assert proc.returncode == 2 and proc.stderr.strip().splitlines() == [proc.stderr.strip()], proc.stderr[-2000:]
  assert proc.stderr.startswith(f"error: --override=data.path={tmp_path / 'in.txt'}: config.data.path: dataset ")
  assert proc.stderr.strip().endswith("; fix the override, or name only the reproductions it fits (it goes to every "
                                      "one)")
  assert not (tmp_path / "w").exists()


def test_an_override_that_selects_another_best_checkpoint_than_the_target_reads_is_refused(reproduce, tmp_path):
  """A 'best' target is the value of the checkpoint the registry's selection picks: --override=train.best_metric=loss
  trained every seed, then each was an ERROR row (no best accuracy); train.best_eval='' selected nothing."""
  path = registry(tmp_path, """
      Reproduction("best_run", "configs/digits_mlp.py:smoke", (Target("best", "accuracy", ">= 0.5"),), "a test",
                   overrides={"train.best_metric": "accuracy", "train.best_mode": "max"}),
  """)
  for override, field in (("train.best_metric=loss", "best_metric='accuracy'"),
                          ("train.best_eval=", "best_eval='validation'")):
    proc = reproduce("best_run", f"--registry={path}", f"--workdir={tmp_path / 'w'}", f"--override={override}",
                     "--override=train.best_mode=min" if "loss" in override else "--seeds=1")
    assert proc.returncode == 2 and proc.stderr.strip().splitlines() == [proc.stderr.strip()], proc.stderr[-2000:]
    assert proc.stderr.startswith(f"error: --override={override}: the target best validation accuracy >= 0.5 is the "
                                  f"value of the checkpoint selected with train.{field}; the runs would select another")
    assert not (tmp_path / "w").exists()


def test_an_override_of_no_field_names_the_closest_one(reproduce, tmp_path):
  from bigmodel_jax.reproduction import load_config, missing_field
  config = load_config("configs/linear_regression.py")
  assert missing_field(config, {"optimizer.learning_rate": 0.1}) == ("", "")
  assert missing_field(config, {"train.num_epoch": 5}) == ("train.num_epoch=5", " (did you mean 'train.num_epochs'?)")
  assert missing_field(config, {"optimiser.learning_rate": 1}) == ("optimiser.learning_rate=1",
                                                                   " (did you mean 'optimizer'?)")
  assert missing_field(config, {"optimizer.learning_rate.x": 1}) == ("optimizer.learning_rate.x=1", "")  # below a value
  proc = reproduce("linear_regression", f"--workdir={tmp_path / 'w'}", "--override=optimizer.learnin_rate=0.1")
  assert proc.returncode == 2 and proc.stderr.strip().splitlines() == [proc.stderr.strip()], proc.stderr[-2000:]
  assert proc.stderr.strip().endswith("has no such config field (did you mean 'optimizer.learning_rate'?)")
  assert not (tmp_path / "w").exists()


def test_an_unwritable_workdir_is_refused_before_anything_runs(reproduce, tmp_path):
  (tmp_path / "file").write_text("")
  proc = reproduce("linear_regression", f"--workdir={tmp_path / 'file' / 'w'}")
  assert proc.returncode == 2 and proc.stderr.startswith("error: --workdir: cannot write in"), proc.stderr[-2000:]
  assert "running" not in proc.stdout


@pytest.mark.parametrize("damage", ["{", '{"reproductions": []}', '{"reproductions": {"other": {"name": "other"}}}'])
def test_a_damaged_report_json_is_refused_before_anything_runs(card, reproduce, tmp_path, damage):
  workdir = shutil.copytree(card, tmp_path / "card")
  (workdir / "report.json").write_text(damage)
  shutil.rmtree(workdir / "linear_regression" / "seed_0")  # a seed that would otherwise train first
  proc = reproduce("linear_regression", "--seeds=1", f"--workdir={workdir}")
  assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1, proc.stderr[-2000:]
  assert proc.stderr.startswith(f"error: {workdir / 'report.json'}: not a") and "move it away" in proc.stderr
  assert not (workdir / "linear_regression" / "seed_0").exists() and (workdir / "report.json").read_text() == damage


def test_report_card_fail_skipped_error_merged_with_earlier_results(card, reproduce, tmp_path):
  path = registry(tmp_path, """
      Reproduction("out_of_reach", "configs/linear_regression.py",
                   (Target("coefficients", "weights.0.0", "~ 30 ± 0.1"),), "an impossible target",
                   overrides={"train.num_epochs": 200}),
      Reproduction("needs_gpu", "configs/digits_mlp.py", (Target("test", "accuracy", ">= 0.5"),), "a test",
                   needs=("gpu",)),
      Reproduction("needs_network", "configs/digits_mlp.py", (Target("test", "accuracy", ">= 0.5"),), "a test",
                   needs=("cpu", "network"), download=Download(("nowhere/data.bin",), ("https://host.invalid/data",))),
      Reproduction("broken_run", "configs/digits_mlp.py", (Target("test", "accuracy", ">= 0.5"),), "a test",
                   overrides={"optimizer.learning_rate": -1.0}),
  """)
  workdir = shutil.copytree(card, tmp_path / "card")  # its report holds linear_regression's PASS
  proc = reproduce("all", f"--registry={path}", f"--workdir={workdir}")
  assert proc.returncode == 1, proc.stderr[-2000:]  # a FAIL and an ERROR
  report = json.loads((workdir / "report.json").read_text())["reproductions"]
  assert list(report) == ["out_of_reach", "needs_gpu", "needs_network", "broken_run", "linear_regression"]
  assert report["linear_regression"]["status"] == "PASS"
  fail = report["out_of_reach"]
  final = json.loads((workdir / "out_of_reach" / "seed_0" / "final_metrics.json").read_text())  # it really ran
  assert fail["status"] == "FAIL" and not fail["targets"][0]["met"], fail
  assert fail["targets"][0]["values"] == [final["coefficients"]["weights"][0][0]] and final["step"] == 200
  rows = {line.split(" | ")[0].lstrip("| "): line for line in (workdir / "report.md").read_text().splitlines()
          if line.startswith("| ") and not line.startswith("| reproduction")}
  assert "| FAIL: missed coefficients weights.0.0 |" in rows["out_of_reach"]
  assert "SKIPPED: no GPU (jax's backend here is cpu)" in rows["needs_gpu"]
  assert "SKIPPED: no network (host.invalid unreachable, nowhere/data.bin not in the data dir)" in rows["needs_network"]
  assert "- no network (host.invalid unreachable, nowhere/data.bin not in the data dir); put nowhere/data.bin in " \
      in (workdir / "report.md").read_text()
  assert "ERROR: seed 0: exit 2: error: config.optimizer.learning_rate" in rows["broken_run"]
  assert not (workdir / "needs_gpu").exists() and not (workdir / "needs_network").exists()


def test_a_backend_jax_cannot_start_is_named_not_called_none(monkeypatch):
  """A GPU reproduction's skip line said "jax's backend here is none" whatever stopped jax from starting."""
  from bigmodel_jax import reproduce as reproduce_lib
  monkeypatch.setenv("JAX_PLATFORMS", "nosuchplatform")
  found = reproduce_lib.accelerator()
  assert found.startswith("not known: `import jax; jax.default_backend()` failed (") and "nosuchplatform" in found
  monkeypatch.setenv("JAX_PLATFORMS", "cpu")
  assert reproduce_lib.accelerator() == "cpu"


def test_unknown_name_lists_the_valid_ones(reproduce, tmp_path):
  proc = reproduce("mnist_cnnn", f"--workdir={tmp_path}")
  assert proc.returncode == 2 and "Traceback" not in proc.stderr
  (line,) = error_lines(proc.stderr)
  assert line.startswith("error: unknown reproduction 'mnist_cnnn'; valid: all, linear_regression, digits_mlp, ")
  listing = reproduce("--list")
  assert listing.returncode == 0, listing.stderr
  names = [row.split()[0] for row in listing.stdout.strip().splitlines()[1:]]
  assert line.endswith(", ".join(names)) and {"mnist_cnn", "shakespeare_char_gpt", "cifar10_resnet"} <= set(names)
  gpt = next(row for row in listing.stdout.splitlines() if row.startswith("shakespeare_char_gpt "))
  assert gpt.split()[1:] == ["configs/shakespeare_char_gpt.py", "best", "validation", "loss", "~", "1.4697", "±",
                             "0.03", "gpu,network", "3"]


@pytest.mark.parametrize("entry, needle", [
    ('Reproduction("bad_config", "configs/nope.py", (Target("test", "accuracy", ">= 0.5"),), "a test")',
     f"reproduction 'bad_config': config file {ROOT / 'configs/nope.py'} does not exist"),
    ('Reproduction("bad_metric", "configs/digits_mlp.py", (Target("test", "acuracy", ">= 0.5"),), "a test")',
     "reproduction 'bad_metric': metric 'acuracy' is not a metric of task 'classification'; valid: accuracy,"),
    ('Reproduction("bad_bound", "configs/digits_mlp.py", (Target("test", "accuracy", "about 0.5"),), "a test")',
     "reproduction 'bad_bound': bad bound 'about 0.5'"),
], ids=["config", "metric", "bound"])
def test_bad_registry_entry_is_one_line(reproduce, tmp_path, entry, needle):
  proc = reproduce("--list", f"--registry={registry(tmp_path, entry + ',')}")
  assert proc.returncode == 2 and "Traceback" not in proc.stderr
  (line,) = error_lines(proc.stderr)
  assert line.startswith("error: ") and needle in line, line


def test_a_finished_seed_of_an_edited_config_file_is_refused_not_averaged(reproduce, tmp_path):
  config = tmp_path / "linear.py"
  shutil.copy(ROOT / "configs" / "linear_regression.py", config)
  path = registry(tmp_path, f"""
      Reproduction("linear", "{config}", (Target("coefficients", "weights.0.0", "~ 3.0 ± 0.5"),), "a test",
                   seeds=(0, 1), overrides={{"train.num_epochs": 20}}),
  """)
  workdir = tmp_path / "w"
  assert reproduce("linear", f"--registry={path}", f"--workdir={workdir}", "--seeds=1").returncode == 0
  config.write_text(config.read_text().replace("learning_rate = 0.1", "learning_rate = 0.05"))
  proc = reproduce("linear", f"--registry={path}", f"--workdir={workdir}")  # seed 1 would run the edited file
  assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1, proc.stdout[-2000:] + proc.stderr
  assert "holds a finished run of another config" in proc.stderr
  assert "optimizer.learning_rate: 0.1 -> 0.05" in proc.stderr
  assert not (workdir / "linear" / "seed_1").exists()


def test_a_seed_dir_holding_a_run_trained_by_hand_with_another_seed_is_refused(card, reproduce, tmp_path):
  """A finished run without the tool's record (trained by hand, or copied) had only its unflagged fields compared:
  seed 0's run put in seed_1/ was judged as seed 1."""
  workdir = tmp_path / "w"
  copied = shutil.copytree(card / "linear_regression" / "seed_0", workdir / "linear_regression" / "seed_1")
  (copied / "reproduce.json").unlink()
  proc = reproduce("linear_regression", "--seeds=2", f"--workdir={workdir}", "--dry_run")
  assert proc.returncode == 2 and len(error_lines(proc.stderr)) == 1, proc.stdout[-2000:] + proc.stderr
  assert f"{copied} holds a finished run of another config" in proc.stderr and "seed: 0 -> 1" in proc.stderr
  shutil.copytree(card / "linear_regression" / "seed_0", workdir / "linear_regression" / "seed_0")
  shutil.rmtree(copied)  # the same seed, by hand: judged as the tool's own
  os.remove(workdir / "linear_regression" / "seed_0" / "reproduce.json")
  assert reproduce("linear_regression", "--seeds=1", f"--workdir={workdir}", "--dry_run").returncode == 0


def test_a_training_runs_workdir_is_refused_before_anything_runs(reproduce, tmp_path):
  """--workdir=runs/mnist_cnn (a run, not a place for reproductions) would mix seeds and a report into the run."""
  (tmp_path / "config.json").write_text("{}")
  proc = reproduce("linear_regression", "--seeds=1", f"--workdir={tmp_path}")
  assert proc.returncode == 2 and len(error_lines(proc.stderr)) == 1, proc.stderr[-2000:]
  assert proc.stderr.startswith(f"error: --workdir: {tmp_path} holds a training run (config.json)")
  assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json"]


def test_overrides_given_in_another_order_are_the_same_finished_run(tmp_path):
  from bigmodel_jax.reproduce import other_settings
  (tmp_path / "final_metrics.json").write_text(json.dumps({"step": 10}))
  made = ["--config=configs/linear_regression.py", "--config.train.num_epochs=5",
          "--config.optimizer.learning_rate=0.05", "--config.seed=0"]
  (tmp_path / "reproduce.json").write_text(json.dumps({"flags": made}))
  argv = [sys.executable, "-m", "bigmodel_jax.main", made[0], f"--workdir={tmp_path}", made[2], made[1], made[3]]
  assert other_settings(argv, tmp_path) == ""
  other = [*argv[:4], "--config.train.num_epochs=6", made[2], made[3]]
  assert other_settings(other, tmp_path) == " ".join(made)


def test_a_relative_path_in_an_override_is_the_callers(tmp_path, monkeypatch):
  """Was: --override=data.path=input.txt, given in the caller's directory, was read from the repo root (the runs'
  working directory): another file, or a missing one."""
  from bigmodel_jax.reproduce import parse_overrides
  monkeypatch.chdir(tmp_path)
  overrides = parse_overrides(["data.path=texts/input.txt", "--config.init.workdir=../runs/pre",
                               "data.data_dir=/data", "optimizer.learning_rate=0.1"])
  assert overrides == {"data.path": str(tmp_path / "texts" / "input.txt"), "data.data_dir": "/data",
                       "init.workdir": str(tmp_path / "../runs/pre"), "optimizer.learning_rate": "0.1"}
  (tmp_path / "mine.py").write_text("")  # a classifier config of the caller's; the checkout's stays as main finds it
  assert parse_overrides(["eval.classifier_config=mine.py"]) == {"eval.classifier_config": str(tmp_path / "mine.py")}
  assert parse_overrides(["eval.classifier_config=configs/mnist_cnn.py"]) == {
      "eval.classifier_config": "configs/mnist_cnn.py"}


def test_a_seed_finished_with_a_relative_path_is_the_same_run_given_absolute(tmp_path, monkeypatch):
  """A seed finished before paths were made absolute recorded data.path=texts/in.txt, which its run read from the
  repo root: the same command given there now (ROOT/texts/in.txt) is that run, not one 'made with other settings'."""
  from bigmodel_jax.reproduce import other_settings, parse_overrides
  (tmp_path / "final_metrics.json").write_text(json.dumps({"step": 10}))
  made = ["--config=configs/tiny_shakespeare.py", "--config.data.path=texts/in.txt", "--config.seed=0"]
  (tmp_path / "reproduce.json").write_text(json.dumps({"flags": made}))
  monkeypatch.chdir(ROOT)
  path = parse_overrides(["data.path=texts/in.txt"])["data.path"]
  argv = [sys.executable, "-m", "bigmodel_jax.main", made[0], f"--workdir={tmp_path}", f"--config.data.path={path}",
          made[2]]
  assert other_settings(argv, tmp_path) == ""
  monkeypatch.chdir(tmp_path)  # the same words in another directory: another file
  path = parse_overrides(["data.path=texts/in.txt"])["data.path"]
  assert other_settings([*argv[:5], f"--config.data.path={path}", made[2]], tmp_path) == " ".join(made)


def test_a_home_relative_path_in_an_override_is_expanded(monkeypatch, tmp_path):
  """The shell leaves --override=FIELD=~/x as it is, and the runs read eval.classifier_workdir and
  train.tracking.wandb_dir without expanding it (a directory named '~' in the repo root)."""
  from bigmodel_jax.reproduce import parse_overrides
  monkeypatch.setenv("HOME", str(tmp_path))
  overrides = parse_overrides(["eval.classifier_workdir=~/cls", "train.tracking.wandb_dir=~/wandb"])
  assert overrides == {"eval.classifier_workdir": str(tmp_path / "cls"),
                       "train.tracking.wandb_dir": str(tmp_path / "wandb")}


@pytest.mark.skipif(shutil.which("setpriv") is None, reason="the parent-death signal is set by util-linux's setpriv")
def test_a_seed_whose_tool_is_killed_outright_is_saved_and_resumed_by_the_relaunch(reproduce, cache_dir, tmp_path):
  """The tool SIGKILLed (OOM, kill -9) while a seed trains: the run got no signal and trained on, orphaned, and the
  relaunch that should resume it was an ERROR row (the workdir in use by that orphan)."""
  path = registry(tmp_path, """
      Reproduction("long_run", "configs/digits_mlp.py:smoke", (Target("test", "accuracy", ">= 0.5"),), "a test",
                   overrides={"train.num_steps": 2000, "train.checkpoint_every": 50}),
  """)
  workdir, env = tmp_path / "out", {**os.environ, "JAX_PLATFORMS": "cpu", "BIGMODEL_JAX_CACHE_DIR": str(cache_dir),
                                    "PYTHONPATH": str(ROOT)}
  tool = subprocess.Popen([sys.executable, "-m", "bigmodel_jax.reproduce", "long_run", f"--registry={path}",
                           f"--workdir={workdir}"], cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                          stderr=subprocess.DEVNULL)
  seed_dir = workdir / "long_run" / "seed_0"
  deadline = time.time() + 240
  while not (seed_dir / "checkpoints" / "50").exists():
    assert tool.poll() is None and time.time() < deadline, (seed_dir / "reproduce.log").read_text()[-2000:]
    time.sleep(0.05)
  tool.kill()
  tool.wait()
  proc = reproduce("long_run", f"--registry={path}", f"--workdir={workdir}")
  assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
  log = (seed_dir / "reproduce.log").read_text()
  assert "error: SIGTERM: saved a checkpoint" in log, log[-3000:]  # the orphan saved and stopped; then it resumed
  assert len((seed_dir / "run_info.jsonl").read_text().splitlines()) == 2


HOLDER = """
import fcntl, sys, time
from pathlib import Path
lock = open(Path(sys.argv[1]) / ".train.lock", "a")
fcntl.flock(lock, fcntl.LOCK_EX)
print("locked", flush=True)
time.sleep(0.5)
with open(Path(sys.argv[1]) / "reproduce.log", "a") as log:
  log.write("error: SIGTERM: saved a checkpoint at step 50; the same command resumes\\n")
"""


def test_the_error_of_a_relaunch_that_waited_is_its_own(tmp_path):
  """The relaunch waits for the run of the killed launch, which writes its last lines into the same log as it saves:
  those were read as this launch's, so a relaunch that failed without an error line (OOM-killed again, say) was an
  ERROR row saying 'error: SIGTERM: saved a checkpoint'."""
  from bigmodel_jax.reproduce import run_seed
  holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(tmp_path)], stdout=subprocess.PIPE, text=True)
  assert holder.stdout.readline().strip() == "locked"
  record = run_seed([sys.executable, "-c", "import sys; print('Killed'); sys.exit(137)"], tmp_path)
  holder.wait()
  assert record["error"] == "exit 137: Killed"


def test_a_lock_file_that_is_a_directory_is_the_runs_one_line_error(tmp_path):
  """Waiting for a killed launch's run opened .train.lock: a directory there was a traceback wall that ended the
  tool (IsADirectoryError), where the run says what is wrong with it in one line, an ERROR row."""
  from bigmodel_jax.reproduce import run_seed
  (tmp_path / ".train.lock").mkdir()
  record = run_seed([sys.executable, "-c", "import sys; print('error: .train.lock is a directory'); sys.exit(2)"],
                    tmp_path)
  assert record["error"] == "exit 2: error: .train.lock is a directory"


@contextlib.contextmanager
def another_tool_holding(workdir: Path):
  """A process holding WORKDIR/.reproduce.lock as a reproduce tool does (its pid in it) -> that process."""
  holder = subprocess.Popen([sys.executable, "-c", "import fcntl, os, sys\n"
                             "f = open(sys.argv[1], 'a+'); fcntl.flock(f, fcntl.LOCK_EX)\n"
                             "f.truncate(0); f.write(str(os.getpid()))\n"
                             "f.flush(); print('locked', flush=True); sys.stdin.read()",
                             str(workdir / ".reproduce.lock")], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            text=True)
  try:
    assert holder.stdout.readline().strip() == "locked"
    yield holder
  finally:
    holder.stdin.close()
    holder.wait()


def in_use(workdir: Path, pid: int) -> list[str]:
  return [f"error: --workdir: {workdir} is in use by another reproduce (pid {pid}); wait for it or stop it (the "
          "same command then resumes its seeds)"]


def test_a_second_tool_in_the_same_workdir_is_refused(reproduce, tmp_path):
  """The same command launched twice (two terminals): the second waited on the first's seeds, failed on their
  locks and merged ERROR rows into the report the first was writing."""
  workdir = tmp_path / "w"
  workdir.mkdir()
  with another_tool_holding(workdir) as holder:
    proc = reproduce("linear_regression", "--seeds=1", f"--workdir={workdir}")
  assert proc.returncode == 2 and proc.stderr.strip().splitlines() == in_use(workdir, holder.pid), proc.stderr[-2000:]
  assert sorted(p.name for p in workdir.iterdir()) == [".reproduce.lock"]


def test_a_second_tool_with_other_overrides_is_told_the_workdir_is_in_use(card, reproduce, tmp_path):
  """The lock was taken after the seeds' checks: a second tool with other overrides was told the seed the first one
  is running holds another config, and to pass train.allow_config_change=true."""
  workdir = shutil.copytree(card, tmp_path / "card")
  (workdir / "linear_regression" / "seed_0" / "final_metrics.json").unlink()  # the first tool is running it
  with another_tool_holding(workdir) as holder:
    proc = reproduce("linear_regression", "--seeds=1", f"--workdir={workdir}",
                     "--override=optimizer.learning_rate=0.05")
  assert proc.returncode == 2 and proc.stderr.strip().splitlines() == in_use(workdir, holder.pid), proc.stderr[-2000:]


def test_a_registry_that_is_not_a_python_file_is_one_line(tmp_path):
  """--registry=WORKDIR/report.json (the card, not the registry) was a traceback wall ('NoneType' has no 'loader')."""
  from bigmodel_jax.reproduction import BadInput, load_registry
  (tmp_path / "report.json").write_text("{}")
  with pytest.raises(BadInput, match=r"^--registry=.*report.json: not a Python file; give a module like "):
    load_registry(tmp_path / "report.json")


def test_stdout_closed_by_its_reader_is_one_line(card):
  """reproduce --list | head -1 (or --readme) was a BrokenPipeError traceback, exit 1."""
  from conftest import CLOSED_STDOUT, with_stdout_closed
  for args in (["--list"], ["--readme", card / "report.json"]):
    status, err = with_stdout_closed("bigmodel_jax.reproduce", *args)
    assert status == 141 and err.strip().splitlines() == [CLOSED_STDOUT], (args, err[-3000:])


def test_stdout_closed_while_the_seeds_run_says_they_stopped(card, tmp_path):
  """reproduce all --workdir=W | head: the reader gone between seeds stopped the tool, but its line said only that
  stdout was closed 'before all of it was printed', as if the reproductions had run; it says they stopped."""
  from conftest import with_stdout_closed
  workdir = shutil.copytree(card, tmp_path / "card")
  status, err = with_stdout_closed("bigmodel_jax.reproduce", "linear_regression", "--seeds=1", f"--workdir={workdir}")
  assert status == 141 and err.strip().splitlines() == [
      "error: SIGPIPE: stdout was closed by its reader (e.g. | head) while the reproductions ran: stopped after 0 of "
      "1 (in the report); the same command resumes the rest"], err[-3000:]
  assert json.loads((workdir / "report.json").read_text())["reproductions"]["linear_regression"]["status"] == "PASS"
