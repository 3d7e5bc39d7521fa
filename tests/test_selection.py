"""Model selection reads validation, never test: the validation split, the best checkpoint, early stopping,
and workdirs from before validation splits."""

import dataclasses
import json
import shutil

import numpy as np
import pytest

from bigmodel_jax import train
from bigmodel_jax.data import DATASETS, VALIDATION_SEED, load_dataset, seeded_split
from bigmodel_jax.data.images import digits
from conftest import load_config


@DATASETS.register("digits_wrong_test_labels")
def digits_wrong_test_labels(root, data_config=None):
  """digits with every test label moved to the next class: the better a model gets, the worse it tests, so
  validation and test disagree on the best step."""
  d = digits(root, data_config)
  return dataclasses.replace(d, name="digits_wrong_test_labels",
                             test={**d.test, "targets": (d.test["targets"] + 1) % 10})


def records(workdir, split):
  return [r for r in map(json.loads, (workdir / "metrics.jsonl").read_text().splitlines()) if r["split"] == split]


def digits_config(**train_fields):
  config = load_config("digits_mlp")
  config.train.num_epochs = 4
  config.evals.test.every = -1  # test each epoch too: to see that selection ignores it
  for k, v in train_fields.items():
    config.train[k] = v
  return config


def test_validation_is_a_fixed_slice_of_train_independent_of_the_seed():
  config = load_config("digits_mlp")
  a = load_dataset(config.data)
  config.seed = 7
  b = load_dataset(config.data)
  np.testing.assert_array_equal(a.validation["inputs"], b.validation["inputs"])
  assert a.num_examples("train") + a.num_examples("validation") == 1438 and a.num_examples("validation") == 144
  train_rows = {x.tobytes() for x in a.train["inputs"]}
  assert not any(x.tobytes() in train_rows for x in a.validation["inputs"][:20])  # held out, not copied
  _, held_out = seeded_split(1438, 0.1, VALIDATION_SEED)
  assert len(held_out) == 144


def test_tiny_shakespeare_validation_is_nanogpts_last_ten_percent(tmp_path):
  path = tmp_path / "input.txt"
  path.write_text("".join(chr(ord("a") + i % 26) for i in range(1000)))
  config = load_config("shakespeare_char_gpt", "smoke")
  config.data.path, config.data.seq_len = str(path), 8
  data = load_dataset(config.data)
  assert data.test is None and data.eval_splits == ("validation",)
  assert data.num_examples("train") == 900 and data.validation["inputs"].size >= 99


def test_best_checkpoint_follows_validation_not_test(tmp_path):
  config = digits_config()
  config.data.name = "digits_wrong_test_labels"
  final = train.train_and_evaluate(config, tmp_path)
  val, test = records(tmp_path, "validation"), records(tmp_path, "test")
  assert [r["step"] for r in val] == [r["step"] for r in test] == [40, 80, 120, 160]
  best_val = max(val, key=lambda r: (r["accuracy"], -r["step"]))["step"]
  best_test = max(test, key=lambda r: (r["accuracy"], -r["step"]))["step"]
  assert best_val != best_test  # they disagree ...
  assert final["best_step"] == best_val  # ... and selection follows validation
  steps = sorted(int(p.name) for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit())
  assert best_val in steps  # kept as 'best' beside the latest
  # the test metrics reported beside the best are that checkpoint's, measured when it was saved
  assert final["best"]["test"]["accuracy"] == next(r["accuracy"] for r in test if r["step"] == best_val)


def test_early_stopping_stops_on_validation_and_a_relaunch_does_not_train_on(tmp_path):
  config = digits_config(num_epochs=30)
  config.train.early_stopping.patience = 2
  config.train.early_stopping.min_delta = 0.01
  final = train.train_and_evaluate(config, tmp_path)
  val = records(tmp_path, "validation")
  assert final["stopped_early"] and final["step"] < 30 * 40 and final["step"] == val[-1]["step"]
  best = final["best"]
  assert best["value"] == max(r["accuracy"] for r in val)
  after = [r["accuracy"] for r in val if r["step"] > best["step"]]
  assert len(after) == 2 and all(a <= best["value"] + 0.01 for a in after)
  assert records(tmp_path, "test")[-1]["step"] == final["step"]  # every evaluator ran at the stop
  again = train.train_and_evaluate(config, tmp_path)  # the same command again: evaluates only
  assert again["step"] == final["step"] and again["params_sha256"] == final["params_sha256"]
  assert again["best_step"] == final["best_step"]


def test_selection_resumes_bit_exact(tmp_path):
  """Killed between evaluations (its later checkpoints lost), a run resumes its selection and early stopping too."""
  config = digits_config(num_epochs=8, checkpoint_every=60, keep_checkpoints=100)
  config.train.early_stopping.patience = 3
  whole = train.train_and_evaluate(config, tmp_path)
  for p in (tmp_path / "checkpoints").iterdir():
    if p.name.isdigit() and int(p.name) > 100:  # as if killed at step 100..119: the last checkpoint is step 100
      shutil.rmtree(p)
  (tmp_path / "final_metrics.json").unlink()
  resumed = train.train_and_evaluate(config, tmp_path)
  for key in ("step", "best_step", "params_sha256", "stopped_early", "best", "validation", "test"):
    assert resumed[key] == whole[key], key


def test_a_resume_that_moves_the_early_stopping_evaluations_is_refused(tmp_path):
  """With early stopping, the validation evaluator's cadence decides where training stops: a relaunch that changed
  it went on to another final model (exit 0), as if evals.* only said when to report."""
  from bigmodel_jax.errors import UserError
  for patience in (3, 0):
    config = digits_config(num_steps=40, checkpoint_every=20)
    config.train.early_stopping.patience, config.evals.validation.every = patience, 10
    train.train_and_evaluate(config, tmp_path / str(patience))
    config.evals.validation.every = 20
    if patience:
      with pytest.raises(UserError, match=r"\(evals\.validation\.every: 10 -> 20\); use a new --workdir"):
        train.train_and_evaluate(config, tmp_path / str(patience))
    else:  # without early stopping, when to evaluate is the launch's choice
      assert train.train_and_evaluate(config, tmp_path / str(patience))["step"] == 40


def test_a_workdir_from_before_validation_splits_resumes_as_it_was(tmp_path):
  def legacy(config):  # what the code did before validation splits, in today's fields
    config.data.validation_fraction, config.train.best_eval = 0.0, ""
    config.evals = {"test": {"split": "test", "every": -1}}
    return config
  whole = train.train_and_evaluate(legacy(digits_config(num_epochs=3)), tmp_path / "whole")
  old = tmp_path / "old"
  train.train_and_evaluate(legacy(digits_config(num_epochs=3)), old)
  for p in (old / "checkpoints").iterdir():  # as if it was killed after its second epoch
    if p.name.isdigit() and int(p.name) > 88:
      shutil.rmtree(p)
  (old / "final_metrics.json").unlink()
  saved = json.loads((old / "config.json").read_text())  # as an older version wrote it
  del saved["evals"], saved["data"]["validation_fraction"], saved["train"]["best_eval"]
  del saved["train"]["early_stopping"], saved["train"]["trackers"], saved["train"]["tracking"]
  saved["train"]["eval_every"] = -1
  (old / "config.json").write_text(json.dumps(saved))
  resumed = train.train_and_evaluate(digits_config(num_epochs=3), old)  # today's config file, unchanged
  assert resumed["params_sha256"] == whole["params_sha256"] and resumed["step"] == 3 * (1438 // 32)
  assert "validation" not in resumed and "best" not in resumed and resumed["test"] == whole["test"]
  assert json.loads((old / "config.json").read_text()) == saved  # kept as that version wrote it ...
  again = train.train_and_evaluate(digits_config(num_epochs=3), old)  # ... so the same command works again
  assert again["test"] == whole["test"]


def test_a_config_file_setting_a_moved_field_is_refused(tmp_path):
  from bigmodel_jax import config as config_lib
  from bigmodel_jax.errors import UserError
  config = load_config("digits_mlp")
  config.train.eval_every = 5  # a config file written before evaluators
  with pytest.raises(UserError, match=r"config.train.eval_every: not a config field \(it moved to config.evals"):
    config_lib.validate(config)


@pytest.mark.parametrize("mode", ["max", "min"])
def test_a_nan_validation_value_is_never_the_best(mode):
  """Was: a NaN on the first evaluation became the best for good (no value compares better than NaN), so early
  stopping stopped `patience` evaluations later and the best checkpoint was the NaN one."""
  from bigmodel_jax.evaluate import Selection
  selection = Selection("validation", "metric", mode, patience=2)
  worse, better = (0.5, 0.7) if mode == "max" else (0.7, 0.5)
  for step, value in [(10, float("nan")), (20, worse), (30, float("nan")), (40, better)]:
    selection.update(step, {"metric": value})
  assert (selection.best_step, selection.best_value, selection.stale, selection.stop) == (40, better, 0, False)
  restored = Selection("validation", "metric", mode, patience=2, best_value=float("nan"), best_step=10)  # saved before
  restored.update(20, {"metric": worse})
  assert restored.best_step == 20


def test_a_gan_resume_with_another_quality_classifier_is_refused(tmp_path):
  """The best classifier_score is chosen across evaluations: a relaunch scoring with another classifier (eval.* is
  a runtime field elsewhere) compared two classifiers' scores and kept the 'best' with exit 0."""
  from bigmodel_jax.errors import UserError
  from bigmodel_jax.workdir import check_workdir
  config = load_config("mnist_dcgan", "smoke")
  (tmp_path / "checkpoints" / "10").mkdir(parents=True)
  (tmp_path / "config.json").write_text(config.to_json_best_effort())  # as a launch writes it
  check_workdir(tmp_path, config)  # the same config: goes on
  config.eval.classifier_workdir = str(tmp_path / "another_classifier")
  with pytest.raises(UserError, match=r"\(eval\.classifier_workdir: '' -> '.*another_classifier'\)"):
    check_workdir(tmp_path, config)


def test_a_gan_resume_names_its_classifier_by_the_directory_not_the_string(tmp_path, monkeypatch):
  """eval.classifier_workdir was compared as a string: the same classifier given relative then absolute, with a
  trailing slash or through a symlink was refused as another; a different directory still is."""
  from bigmodel_jax.errors import UserError
  from bigmodel_jax.workdir import check_workdir
  monkeypatch.chdir(tmp_path)
  (tmp_path / "runs" / "clf").mkdir(parents=True)
  (tmp_path / "link").symlink_to(tmp_path / "runs")
  config = load_config("mnist_dcgan", "smoke")
  config.eval.classifier_workdir = "runs/clf"
  gan = tmp_path / "gan"
  (gan / "checkpoints" / "10").mkdir(parents=True)
  (gan / "config.json").write_text(config.to_json_best_effort())
  for same in (str(tmp_path / "runs" / "clf"), "runs/clf/", "./runs//clf", str(tmp_path / "link" / "clf")):
    config.eval.classifier_workdir = same
    check_workdir(gan, config)
  config.eval.classifier_workdir = "runs/other"
  with pytest.raises(UserError, match=r"eval\.classifier_workdir: '.*runs/clf' -> '.*runs/other'"):
    check_workdir(gan, config)
