"""Evaluation of a train state on a split, and the eval-only / predict entry points on a checkpoint."""

import csv
import json

import jax
import numpy as np
from absl import logging

from bigmodel_jax import runinfo
from bigmodel_jax.data import pipeline
from bigmodel_jax.errors import UserError


def evaluate_split(run, state, split: str = "test") -> dict:
  """Task metrics over every example of `split` (sums accumulate on device; one fetch at the end)."""
  sums = None
  for local in pipeline.eval_batches(run.dataset, split, run.config.data, process_index=jax.process_index(),
                                     process_count=jax.process_count(),
                                     multiple_of=run.steps.layout.batch_shards):
    batch = run.steps.layout.eval_batch(local)
    if sums is None:
      sums = run.steps.zero_sums(batch)
    sums = run.steps.eval_step(state, batch, sums)
  return run.task.finalize(jax.device_get(sums))


def restore_for_eval(run, checkpoint_step: int | None):
  step = checkpoint_step if checkpoint_step is not None else run.checkpointer.latest_step()
  if step is None:
    raise UserError(f"no checkpoint in {run.checkpointer.directory}; train first (--mode=train) or fix --workdir")
  state, _, _ = run.restore(step)
  return step, state


def eval_only(run, checkpoint_step: int | None) -> dict:
  step, state = restore_for_eval(run, checkpoint_step)
  metrics = evaluate_split(run, state)
  run.writer.write(step, "eval", {k: v for k, v in metrics.items() if k != "confusion_matrix"})
  if jax.process_index() == 0:
    record = json.dumps({"step": step, **metrics}, indent=2) + "\n"
    runinfo.write_text_atomic(run.workdir / f"eval_step{step}.json", record)
  return {"step": step, **metrics}


def predict(run, checkpoint_step: int | None) -> dict:
  """The task's predictions for the test split, written by the task (a CSV and pictures; a GAN: a sample grid)."""
  if run.dataset.is_token_stream:
    raise UserError("--mode=predict is for classifiers and regressors; a language model generates text with "
                    "--mode=sample")
  step, state = restore_for_eval(run, checkpoint_step)
  outputs = []
  for local in pipeline.eval_batches(run.dataset, "test", run.config.data, process_index=jax.process_index(),
                                     process_count=jax.process_count(),
                                     multiple_of=run.steps.layout.batch_shards):
    out = jax.device_get(run.steps.predict_step(state, run.steps.layout.eval_batch(local)))
    outputs.append({k: v[out["mask"] > 0] for k, v in out.items() if k != "mask"})
  preds = {k: np.concatenate([o[k] for o in outputs]) for k in outputs[0]}
  if jax.process_index() != 0:
    return {"step": step}
  out_dir = run.workdir / f"predict_step{step}"
  out_dir.mkdir(parents=True, exist_ok=True)
  files, summary = run.task.write_predictions(run, preds, step, out_dir)
  for f in files:
    logging.info("wrote %s", f)
  return {"step": step, **summary, "files": [str(f) for f in files]}


def write_supervised_predictions(run, preds: dict, step: int, out_dir) -> tuple[list, dict]:
  """predictions.csv for the test split, plus pictures: an image grid and a confusion matrix (classifiers) or a
  fit (regressors). -> (files, summary metrics)"""
  from bigmodel_jax import metrics, plots
  test = run.dataset.test
  with open(out_dir / "predictions.csv", "w", newline="") as f:
    w = csv.writer(f)
    probs = preds.get("probability")
    texts = run.dataset.test_texts  # text classification: the start of each example, to read errors by
    w.writerow(["index", "target", "prediction"]
               + ([f"p_{n}" for n in run.dataset.class_names] if probs is not None else []) + (["text"] if texts else []))
    for i, (t, p) in enumerate(zip(test["targets"], preds["prediction"])):
      w.writerow([i, t.item(), p.item()] + ([f"{x:.6f}" for x in probs[i]] if probs is not None else [])
                 + ([" ".join(texts[i].split())[:200]] if texts else []))
  files = [out_dir / "predictions.csv"]
  summary = {}
  if run.dataset.num_classes:
    confusion = np.zeros((run.dataset.num_classes,) * 2, np.int64)
    np.add.at(confusion, (test["targets"], preds["prediction"]), 1)
    summary = metrics.classification_metrics(confusion)
    files.append(plots.confusion_matrix(confusion, run.dataset.class_names, out_dir / "confusion_matrix.png",
                                        title=f"{run.dataset.name}, step {step}"))
    if run.dataset.is_image:
      files.append(plots.image_grid(test["inputs"], test["targets"], preds["prediction"], run.dataset.class_names,
                                    out_dir / "test_images.png", num=run.config.predict.num_images))
  else:
    files.append(plots.scatter_fit(test["inputs"], test["targets"], preds["prediction"], out_dir / "fit.png"))
  return files, summary
