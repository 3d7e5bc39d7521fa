"""Evaluators (config.evals) of a train state on a split, and the eval-only / predict entry points on a checkpoint."""

import csv
import dataclasses
import json
import math
import os
from pathlib import Path

import jax
import numpy as np
from absl import logging
from flax import nnx

from bigmodel_jax import run_config, runinfo
from bigmodel_jax.data import pipeline
from bigmodel_jax.errors import CheckpointGoneError, DamagedCheckpointError, UserError
from bigmodel_jax.workdir import claim_output_dir


@dataclasses.dataclass(frozen=True)
class Evaluator:
  """config.evals.<name>: the task's metrics on `split`, every `every` steps (-1: each epoch; 0: at the end only).
  Every evaluator also runs at the end of training."""
  name: str
  split: str
  every: int

  def due(self, step: int, steps_per_epoch: int) -> bool:
    if self.every > 0:
      return step % self.every == 0
    return self.every == -1 and step % steps_per_epoch == 0


def evaluators(config, dataset) -> list[Evaluator]:
  """The run's evaluators on the splits its dataset has (one on a missing split is skipped, with a warning;
  the selection evaluator cannot be: a run that selects needs its validation split)."""
  out = []
  for name in sorted(config.evals):
    e = config.evals[name]
    if e.split not in dataset.eval_splits:
      if name == config.train.best_eval:
        raise UserError(f"config.train.best_eval: evaluator {name!r} reads the {e.split!r} split, which "
                        f"{dataset.name} does not have (it has: {', '.join(dataset.eval_splits)}); set "
                        "config.data.validation_fraction in (0, 1), or train.best_eval='' to select nothing")
      # a fact of the dataset (tiny Shakespeare has no test split), not a problem: said at --verbosity=1
      logging.debug("dataset %s has no %s split: evaluator %r skipped", dataset.name, e.split, name)
      continue
    out.append(Evaluator(name, e.split, e.every))
  if not out:
    raise UserError(f"config.evals: no evaluator reads a split {dataset.name} has ({', '.join(dataset.eval_splits)}); "
                    "add one, e.g. c.evals.validation = dict(split='validation', every=-1)")
  return out


@dataclasses.dataclass
class Selection:
  """Model selection on the validation evaluator `eval`: the best `metric` so far and its step, and how many of its
  evaluations since then did not improve on it by more than min_delta (early stopping after `patience`; 0: never).
  Kept in each checkpoint's metadata, so a resumed run selects and stops exactly as an uninterrupted one."""
  eval: str
  metric: str
  mode: str
  patience: int = 0
  min_delta: float = 0.0
  best_value: float | None = None
  best_step: int | None = None
  stale: int = 0

  @classmethod
  def from_config(cls, config, saved: dict | None = None) -> "Selection | None":
    t = config.train
    if not t.best_eval:
      return None
    selection = cls(t.best_eval, t.best_metric, t.best_mode, t.early_stopping.patience, t.early_stopping.min_delta)
    if saved and all(saved.get(k) == getattr(selection, k) for k in ("eval", "metric", "mode")):
      selection.best_value, selection.best_step, selection.stale = saved["best_value"], saved["best_step"], saved["stale"]
    return selection

  def update(self, step: int, metrics: dict) -> None:
    value = float(metrics[self.metric])  # NaN is never best (nothing would compare better after it)
    better = not math.isnan(value) and (self.best_value is None or math.isnan(self.best_value) or (
        value > self.best_value + self.min_delta if self.mode == "max" else value < self.best_value - self.min_delta))
    if better:
      self.best_value, self.best_step, self.stale = value, step, 0
    else:
      self.stale += 1

  @property
  def stop(self) -> bool:
    return self.patience > 0 and self.stale >= self.patience

  def record(self) -> dict:
    return dataclasses.asdict(self)


def evaluate_split(run, state, split: str) -> dict:
  """Task metrics over every example of `split` (sums accumulate on device; one fetch at the end)."""
  sums = None
  for local in pipeline.eval_batches(run.dataset, split, run.config.data, process_index=jax.process_index(),
                                     process_count=jax.process_count(),
                                     multiple_of=run.steps.layout.batch_shards):
    batch = run.steps.layout.eval_batch(local)
    if sums is None:
      sums = run.steps.zero_sums(batch)
    sums = run.steps.eval_step(state, batch, sums)
  return run.task.finalize(jax.device_get(sums), split)


def final_metrics(run, state, evaluated: dict, selection) -> dict:
  """final_metrics.json: every evaluator on the final state (also under its split's name), the best validation
  value with its step and the test metrics of that checkpoint, the parameters' fingerprint."""
  final_step = int(jax.device_get(state.step))
  evals = {}
  for e in run.evaluators:  # an evaluator that did not run at the final step (a resumed, finished run) runs now
    step, metrics = evaluated.get(e.name, (None, None))
    evals[e.name] = metrics if step == final_step else evaluate_split(run, state, e.split)
  final = {"step": final_step}
  for e in reversed(run.evaluators):  # the first evaluator of a split names it
    final[e.split] = evals[e.name]
  final["evals"] = evals
  if selection is not None and selection.best_step is not None:
    best = {"eval": selection.eval, "metric": selection.metric, "mode": selection.mode,
            "value": selection.best_value, "step": selection.best_step}
    reported = [e for e in run.evaluators if e.name != selection.eval]
    if selection.best_step == final_step:
      best.update({e.name: evals[e.name] for e in reported})
    elif selection.best_step in run.checkpointer.all_steps():  # the 'best' checkpoint, kept by the checkpointer
      run.checkpointer.wait()
      recorded = run_config.recorded(run.checkpointer, selection.best_step)
      changed = run_config.differences(recorded, run_config.defining_fields(run.config)) if recorded else []
      if changed:  # saved before a resume that changed what a step computes: not evaluated under today's config
        logging.warning("the best step %d was saved under another config (%s differ): final_metrics.json's best has "
                        "no %s metrics", selection.best_step, ", ".join(changed), "/".join(e.name for e in reported))
      else:
        best_state, _, _ = run.restore(selection.best_step)
        best.update({e.name: evaluate_split(run, best_state, e.split) for e in reported})
    else:
      logging.warning("the best step %d has no checkpoint in %s (deleted?): final_metrics.json's best has no %s "
                      "metrics", selection.best_step, run.checkpointer.directory, "/".join(e.name for e in reported))
    final["best"], final["best_step"] = best, selection.best_step
  final["stopped_early"] = bool(selection is not None and selection.stop)
  final["params_sha256"] = runinfo.fingerprint(state.params)
  final["num_params"] = int(sum(np.size(x) for x in jax.tree.leaves(state.params)))
  if hasattr(run.steps.model(state), "coefficients"):  # read from whole host copies (FSDP across hosts)
    final["coefficients"] = nnx.merge(run.steps.graphdef, *runinfo.to_host((state.params, state.model_state)))\
        .coefficients()
  return final


def set_aside_final(workdir: Path) -> None:
  """A finished run trained further (relaunched with more steps): its final_metrics.json no longer describes the
  run (compare, sweeps and reproductions take it as the run's result) until training ends and writes a new one;
  the old one is kept as final_metrics_step<N>.json."""
  path = Path(workdir) / "final_metrics.json"
  if not path.is_file():
    return
  try:
    step = json.loads(path.read_text()).get("step", "earlier")
  except (OSError, ValueError, AttributeError):
    step = "earlier"
  target = runinfo.unused_path(path.with_name(f"final_metrics_step{step}.json"))
  os.replace(path, target)
  logging.info("the run trains on past its earlier end: its final_metrics.json moved to %s", target.name)


def loggable(metrics: dict) -> dict:
  """Scalars only (a classifier's confusion matrix stays in final_metrics.json)."""
  return {k: v for k, v in metrics.items() if k != "confusion_matrix"}


def without_matrices(record):
  """A result to print (main): confusion matrices, at any depth, stay in the JSON files."""
  if isinstance(record, dict):
    return {k: without_matrices(v) for k, v in record.items() if k != "confusion_matrix"}
  return record


def restore_for_eval(run, checkpoint_step: int | None, flag: str | None = "--checkpoint_step",
                     check_config: bool = True, tries: int = 3):
  """(step, state) of checkpoint `checkpoint_step` (default: the latest); a damaged one is one line naming the
  intact steps and the flag (`flag`) that picks one (None: the caller reads the latest step, no other).
  `check_config`: refuse a config that differs from the one the step recorded in a field that decides what it
  computes (run_config.check_recorded), before anything is read. The latest step deleted while it is read (an eval
  beside a training's retention): the newest then, up to `tries`."""
  if checkpoint_step is not None and checkpoint_step < 0:  # -1: the latest, as config.init.step=-1 means
    if checkpoint_step != -1:
      raise UserError(f"{flag or '--checkpoint_step'}={checkpoint_step}: give a step >= 0, or -1 for the latest")
    checkpoint_step = None
  for attempt in range(1, tries + 1):
    step = checkpoint_step if checkpoint_step is not None else run.checkpointer.latest_step()
    if step is None:
      raise UserError(f"no checkpoint in {run.checkpointer.directory}; train first (--mode=train) or fix --workdir")
    if check_config:
      run_config.check_recorded(run, step, flag or "--checkpoint_step")
    try:
      state, _, _ = run.restore(step)
      return step, state
    except CheckpointGoneError:
      if checkpoint_step is not None or attempt == tries:
        raise
      logging.info("checkpoint step %d was deleted while it was read; reading the newest step", step)
      run.checkpointer.reload()
    except DamagedCheckpointError as e:
      if flag is None:
        raise UserError(f"{e}; put back an intact copy of step {step}") from None
      intact = run.checkpointer.intact_steps()
      use = (f"intact steps: {', '.join(map(str, intact))}; pass {flag}={intact[-1]} to use one" if intact
             else "no step is intact")
      raise UserError(f"{e}; {use} (or put back an intact copy of step {step})") from None


def eval_only(run, checkpoint_step: int | None) -> dict:
  """Every evaluator of the run on one checkpoint -> {'step', <evaluator name>: metrics} (also eval_step<N>.json)."""
  step, state = restore_for_eval(run, checkpoint_step)
  claim_output_dir(run, "eval")
  result = {"step": step}
  for e in evaluators(run.config, run.dataset):
    result[e.name] = evaluate_split(run, state, e.split)
    # split "eval": records of --mode=eval stay apart from the training run's own evaluations (in TensorBoard,
    # a run of their own: tensorboard/eval_step<N>/)
    run.writer.write(step, "eval", {"eval": e.name, "eval_split": e.split, **loggable(result[e.name])})
  if jax.process_index() == 0:
    runinfo.write_text_atomic(run.outputs / f"eval_step{step}.json", json.dumps(result, indent=2) + "\n")
  return result


def predict(run, checkpoint_step: int | None) -> dict:
  """The task's predictions for the test split, written by the task (a CSV and pictures; a GAN: a sample grid)."""
  if run.dataset.is_token_stream:  # a language model's text, or a masked one's (a converted BERT's)
    from bigmodel_jax.tasks import masked_language_modeling
    use = masked_language_modeling.USE if run.config.task.name == "masked_language_modeling" else \
        "a language model generates text with --mode=sample"
    raise UserError(f"--mode=predict is for classifiers and regressors; {use}")
  run.dataset.split("test")  # predictions are for the test split
  step, state = restore_for_eval(run, checkpoint_step)
  claim_output_dir(run, "predict")
  outputs = []
  for local in pipeline.eval_batches(run.dataset, "test", run.config.data, process_index=jax.process_index(),
                                     process_count=jax.process_count(),
                                     multiple_of=run.steps.layout.batch_shards):
    out = jax.device_get(run.steps.predict_step(state, run.steps.layout.eval_batch(local)))
    outputs.append({k: v[out["mask"] > 0] for k, v in out.items() if k != "mask"})
  preds = {k: np.concatenate([o[k] for o in outputs]) for k in outputs[0]}
  if jax.process_index() != 0:
    return {"step": step}
  # an earlier call's outputs (another config.predict, or a checkpoint since retrained) stay: _2, _3, ...
  out_dir = runinfo.unused_path(run.outputs / f"predict_step{step}", make_dir=True)
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
