"""--mode=eval and --mode=predict on a trained workdir: metrics, predictions and pictures, and what each leaves."""

import csv
import json
import shutil

import numpy as np
import pytest

from bigmodel_jax import plots, runinfo
from conftest import error_lines, tensorboard_scalars, trained_run

SMOKE = "--config=configs/digits_mlp.py:smoke"


@pytest.fixture(scope="module")
def trained(cli, tmp_path_factory):
  return trained_run(cli, tmp_path_factory, "trained", SMOKE)


def test_eval_mode_reproduces_final_metrics(cli, trained):
  final = json.loads((trained / "final_metrics.json").read_text())
  proc = cli(f"--workdir={trained}", "--mode=eval")  # the config comes from the workdir
  assert proc.returncode == 0, proc.stderr[-2000:]
  result = json.loads((trained / f"eval_step{final['step']}.json").read_text())
  for split in ("validation", "test"):  # every evaluator of the run
    assert result[split]["accuracy"] == final[split]["accuracy"] and result[split]["f1"] == final[split]["f1"]


def test_eval_an_earlier_checkpoint(cli, trained):
  steps = sorted(int(p.name) for p in (trained / "checkpoints").iterdir() if p.name.isdigit())
  proc = cli(SMOKE, f"--workdir={trained}", "--mode=eval", f"--checkpoint_step={steps[0]}")
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert json.loads((trained / f"eval_step{steps[0]}.json").read_text())["step"] == steps[0]
  missing = cli(SMOKE, f"--workdir={trained}", "--mode=eval", "--checkpoint_step=12345")
  assert missing.returncode == 2 and "checkpoint step 12345 not found" in missing.stderr


def test_checkpoint_step_minus_one_is_the_latest_as_init_step_minus_one_is(cli, trained, tmp_path):
  """--checkpoint_step=-1 was 'checkpoint step -1 not found'; config.init.step=-1 means the latest."""
  latest = max(int(p.name) for p in (trained / "checkpoints").iterdir() if p.name.isdigit())
  proc = cli(f"--workdir={trained}", "--mode=eval", "--checkpoint_step=-1", f"--output_dir={tmp_path}")
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert json.loads((tmp_path / f"eval_step{latest}.json").read_text())["step"] == latest
  below = cli(f"--workdir={trained}", "--mode=eval", "--checkpoint_step=-2", f"--output_dir={tmp_path / 'b'}")
  assert below.returncode == 2 and "--checkpoint_step=-2: give a step >= 0, or -1 for the latest" in below.stderr


def test_an_output_dir_holds_one_runs_outputs(cli, trained, tmp_path):
  """Was: two runs evaluated into one --output_dir shared eval_step<N>.json (the second replaced the first's) and
  appended to one metrics.jsonl; the directory records its run (workdir.OUTPUTS_RECORD) and another's is refused."""
  out = tmp_path / "out"
  assert cli(f"--workdir={trained}", "--mode=eval", f"--output_dir={out}").returncode == 0
  assert json.loads((out / "outputs_of.json").read_text())["workdir"] == str(trained.resolve())
  before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
  other = shutil.copytree(trained, tmp_path / "other", ignore=shutil.ignore_patterns("eval_step*", "predict_step*"))
  proc = cli(f"--workdir={other}", "--mode=predict", f"--output_dir={out}")
  lines = error_lines(proc.stderr)
  said = f"error: --output_dir: {out} holds another run's outputs ({trained.resolve()})"
  assert len(lines) == 1 and lines[0].startswith(said), lines
  assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before  # nothing of the other run's written
  (tmp_path / "mine").mkdir()
  (tmp_path / "mine" / "metrics.jsonl").write_text("{}\n")  # outputs from before the record, or by hand
  proc = cli(f"--workdir={trained}", "--mode=eval", f"--output_dir={tmp_path / 'mine'}")
  lines = error_lines(proc.stderr)
  assert len(lines) == 1 and "outputs whose outputs_of.json does not name this run" in lines[0], lines
  (tmp_path / "damaged").mkdir()
  (tmp_path / "damaged" / "outputs_of.json").write_text("{")  # a record cut short, and no outputs: taken over
  assert cli(f"--workdir={trained}", "--mode=eval", f"--output_dir={tmp_path / 'damaged'}").returncode == 0
  assert json.loads((tmp_path / "damaged" / "outputs_of.json").read_text())["workdir"] == str(trained.resolve())
  proc = cli(f"--workdir={trained}", "--mode=eval", f"--output_dir={other}")  # a run's workdir, its outputs or not
  assert proc.returncode == 2 and f"--output_dir: {other} is another run's workdir" in proc.stderr, proc.stderr[-2000:]
  assert not (other / "outputs_of.json").exists()
  refused = cli(f"--workdir={trained}", "--mode=sample", f"--output_dir={tmp_path / 'fresh'}")  # not generative
  assert refused.returncode == 2 and not list((tmp_path / "fresh").iterdir())  # no record of a run that wrote nothing


def edited_copy(trained, tmp_path, **fields):
  """A copy of the run whose config.json has `fields` ("section__key": value) changed by hand."""
  copy = shutil.copytree(trained, tmp_path / "copy", ignore=shutil.ignore_patterns("eval_step*", "predict_step*"))
  config = json.loads((copy / "config.json").read_text())
  for field, value in fields.items():
    section, key = field.split("__")
    config[section][key] = value
  (copy / "config.json").write_text(json.dumps(config, indent=2))
  return copy


def test_a_config_json_changed_after_training_is_refused_before_anything_is_computed(cli, trained, tmp_path):
  copy = edited_copy(trained, tmp_path, model__activation="gelu", data__normalize="none")
  for mode in ("eval", "predict", "export"):
    proc = cli(f"--workdir={copy}", f"--mode={mode}", "--output_dir=" + str(tmp_path / "out"))
    lines = error_lines(proc.stderr)
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr[-2000:]
    assert lines[0].startswith(f"error: {copy / 'config.json'}: data.normalize is 'none', but checkpoint step "), lines
    assert "trained with 'unit' (also model.activation differ) (changed since)" in lines[0], lines
  assert not [p for p in (tmp_path / "out").rglob("*") if p.is_file()]  # no metrics, predictions or export


@pytest.mark.parametrize("field, value", [("model__activation", "foo"), ("data__eval_batch_size", 0)])
def test_an_invalid_value_in_config_json_names_the_file(cli, trained, tmp_path, field, value):
  copy = edited_copy(trained, tmp_path, **{field: value})
  lines = error_lines(cli(f"--workdir={copy}", "--mode=eval").stderr)
  said = f"error: {copy / 'config.json'}: config.{field.replace('__', '.')}: "
  assert len(lines) == 1 and lines[0].startswith(said), lines


def test_a_config_json_changed_only_where_training_reads_it_still_evaluates(cli, trained, tmp_path):
  copy = edited_copy(trained, tmp_path, optimizer__learning_rate=0.5, data__batch_size=7, train__num_epochs=9,
                     model__dropout_rate=0.5, data__train_fraction=0.5)
  final = json.loads((trained / "final_metrics.json").read_text())
  proc = cli(f"--workdir={copy}", "--mode=eval")
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert json.loads((copy / f"eval_step{final['step']}.json").read_text())["test"] == final["test"]


def test_what_a_checkpoint_records_of_its_config():
  from bigmodel_jax import run_config
  from conftest import load_config
  gpt = run_config.defining_fields(load_config("shakespeare_char_gpt", "smoke"))
  assert {"model.num_layers", "model.gelu", "task.name", "data.seq_len", "train.dtype"} <= gpt.keys()
  assert not {"model.attention", "model.dropout_rate", "optimizer.learning_rate", "train.num_steps", "seed"} & gpt.keys()
  mlp = load_config("digits_mlp", "smoke")
  assert "data.train_fraction" not in run_config.defining_fields(mlp)
  mlp.data.normalize = "standardize"  # the statistics come from the training split train_fraction cuts
  assert run_config.defining_fields(mlp)["data.train_fraction"] == 1.0


def test_a_step_saved_under_an_earlier_config_names_the_steps_saved_under_this_one(cli, trained, tmp_path):
  copy = edited_copy(trained, tmp_path)
  old = sorted(int(p.name) for p in (copy / "checkpoints").iterdir() if p.name.isdigit())
  resumed = cli(SMOKE, f"--workdir={copy}", "--config.train.num_epochs=4", "--config.task.label_smoothing=0.1",
                "--config.train.allow_config_change=true")
  assert resumed.returncode == 0, resumed.stderr[-2000:]
  # the permission was that launch's: a relaunch from config.json does not inherit it
  assert json.loads((copy / "config.json").read_text())["train"]["allow_config_change"] is False
  new = sorted(int(p.name) for p in (copy / "checkpoints").iterdir() if p.name.isdigit() and int(p.name) > old[-1])
  proc = cli(f"--workdir={copy}", "--mode=eval", f"--checkpoint_step={old[-1]}")
  lines = error_lines(proc.stderr)
  assert proc.returncode == 2 and len(lines) == 1, proc.stderr[-2000:]
  assert lines[0].startswith(f"error: checkpoint step {old[-1]} was saved with task.label_smoothing=0.0, but "), lines
  assert lines[0].endswith(f"use a step saved under this config: {', '.join(map(str, new))} (--checkpoint_step=N)")
  assert cli(f"--workdir={copy}", "--mode=eval", f"--checkpoint_step={new[-1]}").returncode == 0


def test_a_finished_run_trained_further_sets_its_old_final_metrics_aside(cli, trained, tmp_path):
  copy = edited_copy(trained, tmp_path)
  old = (copy / "final_metrics.json").read_text()
  (copy / "metrics.jsonl").write_text((copy / "metrics.jsonl").read_text()[:-30])  # a last line cut short by a kill
  proc = cli(SMOKE, f"--workdir={copy}", "--config.train.num_epochs=3", "--config.train.allow_config_change=true")
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert (copy / f"final_metrics_step{json.loads(old)['step']}.json").read_text() == old
  assert json.loads((copy / "final_metrics.json").read_text())["step"] == 120
  assert cli(f"--workdir={copy}", "--mode=eval").returncode == 0
  (copy / "metrics.jsonl").write_text((copy / "metrics.jsonl").read_text()[:-30])
  assert cli(f"--workdir={copy}", "--mode=eval").returncode == 0  # appends after the cut line, not onto it
  assert json.loads((copy / "metrics.jsonl").read_text().splitlines()[-1])["split"] == "eval"


def test_predict_writes_predictions_and_pictures(cli, trained):
  final = json.loads((trained / "final_metrics.json").read_text())
  proc = cli(SMOKE, f"--workdir={trained}", "--mode=predict")
  assert proc.returncode == 0, proc.stderr[-2000:]
  out = trained / f"predict_step{final['step']}"
  rows = list(csv.DictReader(open(out / "predictions.csv")))
  assert len(rows) == 359
  accuracy = np.mean([r["target"] == r["prediction"] for r in rows])
  assert accuracy == pytest.approx(final["test"]["accuracy"])
  probs = np.array([[float(r[f"p_{c}"]) for c in range(10)] for r in rows])
  np.testing.assert_allclose(probs.sum(1), 1.0, atol=1e-4)
  assert all(int(r["prediction"]) == int(np.argmax(p)) for r, p in zip(rows, probs))
  for picture in ("test_images.png", "confusion_matrix.png"):
    assert (out / picture).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_predict_into_an_output_dir_leaves_only_its_predictions(cli, trained, tmp_path):
  proc = cli(f"--workdir={trained}", "--mode=predict", "--config.predict.num_images=4",
             f"--output_dir={tmp_path / 'out'}")
  assert proc.returncode == 0, proc.stderr[-2000:]
  step = json.loads((trained / "final_metrics.json").read_text())["step"]
  # no empty metrics.jsonl beside; the record of whose outputs the directory holds
  assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["outputs_of.json", f"predict_step{step}"]


def test_eval_scalars_go_to_their_own_tensorboard_run(cli, trained):
  """Training's event files stay as training wrote them (one launch: one file); each --mode=eval writes into
  tensorboard/eval_step<N>/, a failed one nowhere."""
  step = json.loads((trained / "final_metrics.json").read_text())["step"]
  root = trained / "tensorboard"
  training_files = {p.name: p.stat().st_size for p in root.glob("events.out.tfevents.*")}
  assert len(training_files) == 1  # even after the other tests' eval and predict calls
  eval_lines = sum(1 for line in open(trained / "metrics.jsonl") if '"split": "eval"' in line)
  for _ in range(2):
    proc = cli(f"--workdir={trained}", "--mode=eval")
    assert proc.returncode == 0, proc.stderr[-2000:]
  assert cli(f"--workdir={trained}", "--mode=eval", "--checkpoint_step=12345").returncode == 2
  assert {p.name: p.stat().st_size for p in root.glob("events.out.tfevents.*")} == training_files
  assert not any(tag.startswith("eval/") for tag in tensorboard_scalars(root))
  assert not (root / "eval_step12345").exists()
  scalars = tensorboard_scalars(root / f"eval_step{step}")
  result = json.loads((trained / f"eval_step{step}.json").read_text())
  for name in ("validation", "test"):
    points = scalars[f"eval/{name}/accuracy"]
    assert len(points) >= 2 and {s for s, _ in points} == {step}
    assert points[-1][1] == pytest.approx(result[name]["accuracy"])
  # metrics.jsonl keeps every eval record: two calls, two evaluators each
  assert sum(1 for line in open(trained / "metrics.jsonl") if '"split": "eval"' in line) == eval_lines + 4


def test_predict_twice_keeps_both_outputs(cli, trained):
  step = json.loads((trained / "final_metrics.json").read_text())["step"]
  earlier = sorted(trained.glob(f"predict_step{step}*"))
  events = sorted(trained.glob("tensorboard/**/events.out.tfevents.*"))
  for _ in range(2):
    proc = cli(f"--workdir={trained}", "--mode=predict")
    assert proc.returncode == 0, proc.stderr[-2000:]
  names = [f"predict_step{step}"] + [f"predict_step{step}_{n}" for n in range(2, len(earlier) + 3)]
  assert sorted(p.name for p in trained.glob(f"predict_step{step}*")) == sorted(names)
  for name in names:  # nothing overwritten or left half-written
    assert len(list(csv.DictReader(open(trained / name / "predictions.csv")))) == 359
    assert (trained / name / "test_images.png").is_file()
  assert json.loads(proc.stdout)["files"][0] == str(trained / names[-1] / "predictions.csv")
  assert sorted(trained.glob("tensorboard/**/events.out.tfevents.*")) == events  # predict writes no scalars


def test_unused_path_numbers_files_and_directories(tmp_path):
  """The one choice of a fresh name behind predict_step<N>/ and samples/ (text files and GAN directories)."""
  assert runinfo.unused_path(tmp_path / "step5_seed0.txt") == tmp_path / "step5_seed0.txt"
  (tmp_path / "step5_seed0.txt").write_text("")
  (tmp_path / "step5_seed0_2.txt").write_text("")
  assert runinfo.unused_path(tmp_path / "step5_seed0.txt") == tmp_path / "step5_seed0_3.txt"
  made = [runinfo.unused_path(tmp_path / "out" / "predict_step5", make_dir=True) for _ in range(3)]
  assert [p.name for p in made] == ["predict_step5", "predict_step5_2", "predict_step5_3"]
  assert all(p.is_dir() for p in made)


def test_the_grid_shows_misclassified_examples_first(tmp_path, monkeypatch):
  targets = np.array([0, 1, 2, 1, 0, 2, 1])
  predictions = np.array([0, 2, 2, 1, 1, 2, 0])  # wrong at 1, 4, 6
  np.testing.assert_array_equal(plots.misclassified_first(targets, predictions, 5), [1, 4, 6, 0, 2])
  np.testing.assert_array_equal(plots.misclassified_first(targets, predictions, 2), [1, 4])
  np.testing.assert_array_equal(plots.misclassified_first(targets, targets, 10), range(7))
  figures = []
  monkeypatch.setattr(plots.plt, "close", figures.append)  # keep the figure to read its titles
  images = np.random.default_rng(0).uniform(size=(7, 4, 4, 1))
  path = plots.image_grid(images, targets, predictions, ["a", "b", "c"], tmp_path / "grid.png", num=4)
  assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
  (figure,) = figures
  assert figure._suptitle.get_text() == "true / predicted: 3 of 7 misclassified, shown first"
  titles = [(ax.title.get_text(), ax.title.get_color()) for ax in figure.axes if ax.title.get_text()]
  assert titles == [("#1 b / c", "red"), ("#4 a / b", "red"), ("#6 b / a", "red"), ("#0 a / a", "black")]
