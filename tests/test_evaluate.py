"""--mode=eval and --mode=predict on a trained workdir: metrics, predictions and pictures."""

import csv
import json

import numpy as np
import pytest

SMOKE = "--config=configs/digits_mlp.py:smoke"


@pytest.fixture(scope="module")
def trained(cli, tmp_path_factory):
  workdir = tmp_path_factory.mktemp("trained")
  proc = cli(SMOKE, f"--workdir={workdir}")
  assert proc.returncode == 0, proc.stderr[-2000:]
  return workdir


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
