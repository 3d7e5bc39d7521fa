"""Training behaviour: loss falls, accuracy beats chance, coefficients are recovered, run records are complete."""

import json

import numpy as np
import pytest

from bigmodel_jax import train
from bigmodel_jax.data import load_dataset
from conftest import load_config, tensorboard_scalars


@pytest.fixture(scope="module")
def digits_run(tmp_path_factory):
  config = load_config("digits_mlp")
  config.train.num_epochs = 4
  config.train.log_every = 10
  workdir = tmp_path_factory.mktemp("digits")
  final = train.train_and_evaluate(config, workdir)
  return config, workdir, final


def read_jsonl(path):
  return [json.loads(line) for line in path.read_text().splitlines()]


def test_digits_loss_falls_and_accuracy_beats_chance(digits_run):
  _, workdir, final = digits_run
  train_lines = [r for r in read_jsonl(workdir / "metrics.jsonl") if r["split"] == "train"]
  assert train_lines[-1]["loss"] < 0.5 * train_lines[0]["loss"]
  assert final["test"]["accuracy"] > 0.85 and final["validation"]["accuracy"] > 0.85  # chance is 0.10
  assert final["step"] == 4 * (1294 // 32)  # 1438 training images less the 144 held out for validation


def test_metrics_jsonl_and_final_metrics_fields(digits_run):
  _, workdir, final = digits_run
  records = read_jsonl(workdir / "metrics.jsonl")
  assert all({"step", "split", "time"} <= r.keys() for r in records)
  train_lines = [r for r in records if r["split"] == "train"]
  validation_lines = [r for r in records if r["split"] == "validation"]
  test_lines = [r for r in records if r["split"] == "test"]
  for r in train_lines:
    assert {"loss", "accuracy", "grad_norm", "learning_rate", "steps_per_s", "examples_per_s"} <= r.keys()
    assert r["examples_per_s"] == pytest.approx(32 * r["steps_per_s"])
  assert [r["step"] for r in validation_lines] == [40, 80, 120, 160]  # once per epoch
  assert [r["step"] for r in test_lines] == [160]  # at the end only
  for r in validation_lines + test_lines:
    assert {"loss", "accuracy", "precision", "recall", "f1"} <= r.keys() and r["eval"] == r["split"]
  saved = json.loads((workdir / "final_metrics.json").read_text())
  assert saved["params_sha256"] == final["params_sha256"] and len(saved["params_sha256"]) == 64
  assert saved["test"]["accuracy"] == test_lines[-1]["accuracy"]
  assert saved["validation"]["accuracy"] == validation_lines[-1]["accuracy"]
  assert saved["evals"]["test"] == saved["test"]
  best = max(validation_lines, key=lambda r: (r["accuracy"], -r["step"]))  # the first of the best
  assert saved["best_step"] == best["step"] == saved["best"]["step"]
  assert saved["best"]["value"] == best["accuracy"] and saved["best"]["metric"] == "accuracy"
  assert np.asarray(saved["test"]["confusion_matrix"]).sum() == 359  # every test image, counted once
  assert np.asarray(saved["validation"]["confusion_matrix"]).sum() == 144
  assert "seconds_to_first_step" in next(r for r in records if r["split"] == "startup")


def test_run_records(digits_run):
  config, workdir, _ = digits_run
  assert json.loads((workdir / "config.json").read_text())["model"]["hidden_sizes"] == [128, 128]
  info = json.loads((workdir / "run_info.jsonl").read_text().splitlines()[0])
  assert {"bigmodel_jax", "git_commit", "versions", "devices", "command", "platform"} <= info.keys()
  assert "jax" in info["versions"] and "orbax-checkpoint" in info["versions"]


def test_tensorboard_events(digits_run):
  _, workdir, _ = digits_run
  assert ({"train/loss", "train/examples_per_s", "validation/accuracy", "test/accuracy", "test/f1"}
          <= tensorboard_scalars(workdir / "tensorboard").keys())


def test_checkpoints_keep_latest_and_best(digits_run):
  config, workdir, _ = digits_run
  steps = sorted(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit())
  best = json.loads((workdir / "final_metrics.json").read_text())["best_step"]
  assert steps[-1] == 160 and best in steps and len(steps) <= config.train.keep_checkpoints + 1


def test_linear_regression_recovers_coefficients(tmp_path):
  config = load_config("linear_regression")
  config.mesh.data, config.mesh.tensor = 4, 2  # this process has 8 devices (conftest); 100 points split 4 ways
  final = train.train_and_evaluate(config, tmp_path)
  w = final["coefficients"]["weights"][0][0]
  b = final["coefficients"]["bias"][0]
  assert abs(w - 3.0) < 0.1 and abs(b - 4.5) < 0.1
  # gradient descent converged to the least-squares solution of the same 100 points
  data = load_dataset(config.data).train
  design = np.hstack([data["inputs"], np.ones((100, 1), np.float32)])
  w_ls, b_ls = np.linalg.lstsq(design, data["targets"], rcond=None)[0]
  assert w == pytest.approx(w_ls, abs=2e-3) and b == pytest.approx(b_ls, abs=2e-3)
  assert final["test"]["mse"] == pytest.approx(1 / 12, rel=0.3)  # the U(0, 1) noise variance
  assert final["test"]["r2"] > 0.95


@pytest.mark.parametrize("per_call", [1, 2])
def test_log_windows_end_at_log_steps_though_read_calls_late(per_call):
  """The loop reads a window's metrics IN_FLIGHT calls after its log step; windows still end at log steps, also
  where a full read (an eval at step 8, the end at 13) takes several windows at once."""
  from bigmodel_jax.train_metrics import TrainMetrics
  log_every, metrics, windows = 3, TrainMetrics(), []
  for end in range(per_call, 14, per_call):
    metrics.add(end, {"loss": np.arange(end - per_call + 1, end + 1, dtype=np.float32)} if per_call > 1
                else {"loss": np.float32(end)}, per_call)
    if metrics.window_closed(log_every):
      windows += metrics.fetch(log_every, keep=TrainMetrics.IN_FLIGHT)
    if end == 8 or end + per_call > 13:
      windows += metrics.fetch(log_every)
  steps = [[s for s, _ in w] for w in windows]
  assert all(float(m["loss"]) == s for w in windows for s, m in w)
  # log steps (s - 1 divisible by 3): 4, 7, 10, 13; a window ends with the call before a log step's call
  assert steps == ([[1, 2, 3], [4, 5, 6], [7, 8], [9], [10, 11, 12], [13]] if per_call == 1 else
                   [[1, 2], [3, 4, 5, 6], [7, 8], [9, 10, 11, 12]])


@pytest.mark.parametrize("held_steps", [1, 2])
def test_a_held_window_of_one_step_resumes(held_steps):
  """A SIGTERM one step past a log step (steps_per_call 1, the default) held a window of one step: the resume added
  it back as a one-step call with its values still stacked, and every relaunch of the run crashed in summarize."""
  import json
  from bigmodel_jax.train_metrics import TrainMetrics, summarize
  metrics = lambda s: {"loss": np.float32(s), "learning_rate": np.float32(0.1)}
  whole, first, resumed = TrainMetrics(), TrainMetrics(), TrainMetrics()
  for s in range(1, 45):
    whole.add(s, metrics(s))
  for s in range(1, 21):
    first.add(s, metrics(s))
  first.read(20)  # logged at step 20; SIGTERM after held_steps more
  for s in range(21, 21 + held_steps):
    first.add(s, metrics(s))
  held = json.loads(json.dumps(first.held(first.fetch(20)[0], 0.5)))  # as the checkpoint keeps it
  assert len(held["steps"]) == held_steps
  resumed.resume(held)
  for s in range(21 + held_steps, 45):
    resumed.add(s, metrics(s))
  means = lambda windows: [summarize(w, 1.0, 32)["loss"] for w, _ in windows]
  assert means(resumed.read(20)) == means(whole.read(20))[1:] == [30.5, 42.5]  # steps 21-40, 41-44


def test_a_log_window_held_by_a_preemption_goes_on_after_the_resume():
  """A window cut short by SIGTERM is kept in the checkpoint (JSON) and put back by the resumed run: its record
  averages the same float32 values of the same steps, and the window still ends with the call before a log step."""
  import json
  from bigmodel_jax.train_metrics import TrainMetrics, summarize
  values = np.random.default_rng(0).random(12, dtype=np.float32)
  def calls(metrics, ends):
    for end in ends:
      metrics.add(end, {"loss": values[end - 2:end], "lr": np.arange(2, dtype=np.int32)}, 2)
  whole, first, second = TrainMetrics(), TrainMetrics(), TrainMetrics()
  calls(whole, [2, 4, 6, 8, 10, 12])
  calls(first, [2, 4, 6])
  windows = first.fetch(5)  # log steps 6, 11: windows [1..4], [5..10], [11, 12]
  assert [s for s, _ in windows[-1]] == [5, 6]
  held = json.loads(json.dumps(first.held(windows[-1], 2.0)))  # steps 5 and 6 took 2 s
  second.resume(held)
  calls(second, [8, 10, 12])
  timed = TrainMetrics()
  timed.resume(held)
  calls(timed, [8, 10, 12])
  timed.window_start -= 6.0  # steps 7-12 took 6 s here: window 5-10 took 2 + 4 s (not 6 s for 4 + 2 steps)
  assert [seconds for _, seconds in timed.read(5)] == pytest.approx([6.0, 2.0], rel=0.01)
  expected = whole.fetch(5)[1:]
  resumed = second.fetch(5)
  steps = lambda windows: [[s for s, _ in w] for w in windows]
  assert steps(resumed) == steps(expected) == [[5, 6, 7, 8, 9, 10], [11, 12]]
  assert [summarize(w, 1.0, 1) for w in resumed] == [summarize(w, 1.0, 1) for w in expected]
  assert all(np.asarray(m["lr"]).dtype == np.int32 for w in resumed for _, m in w)
  changed = TrainMetrics()  # a resume whose config adds a metric (allow_config_change): the held steps lack it
  changed.resume(held)
  changed.add(8, {"loss": values[6:8], "lr": np.arange(2, dtype=np.int32), "new": np.ones(2, np.float32)}, 2)
  assert summarize(changed.fetch(5)[0], 1.0, 1)["new"] == 1.0
