"""train_and_evaluate(config, workdir): the training loop, top to bottom.

step -> maybe log -> maybe evaluate (config.evals) -> maybe checkpoint; restarts resume from the latest checkpoint
(train state + data position + RNG + model selection so far) and end bit-identical to an uninterrupted run.
Model selection (the 'best' checkpoint, best_step, early stopping) reads the validation evaluator only; test
metrics are reported beside it, never selected on.
"""

import dataclasses
import json
import os
import signal
import time
from pathlib import Path

import jax
import numpy as np
from absl import logging
from jax.experimental import multihost_utils

import bigmodel_jax
from bigmodel_jax import (distributed, errors, evaluate, init_from, interrupts, model_card, optim, parallel, run_config,
                          runinfo, speed, workdir as run_dirs)
from bigmodel_jax.checkpoint import Checkpointer
from bigmodel_jax.data import Dataset, feed, fingerprint, load_dataset, pipeline
from bigmodel_jax.errors import ModelMismatchError, UserError
from bigmodel_jax.models import build_model
from bigmodel_jax.state import Steps
from bigmodel_jax.tasks import get_task
from bigmodel_jax.train_metrics import TrainMetrics, check_finite, crosses, summarize
from bigmodel_jax.writers import MetricsWriter, Progress
from bigmodel_jax.workdir import adopt_legacy_config, check_workdir, has_checkpoints, lock_workdir


class Preempted(Exception):
  """SIGTERM or SIGINT arrived; a checkpoint was saved (sample: its text written). args = (signum, message)."""


@dataclasses.dataclass
class Run:
  """Everything one run is built from its config: data, task, mesh, compiled steps, checkpoints, writers."""
  config: object
  workdir: Path
  dataset: Dataset
  task: object
  mesh: object
  steps: Steps
  checkpointer: Checkpointer
  writer: MetricsWriter
  total_steps: int
  steps_per_epoch: int
  evaluators: list = dataclasses.field(default_factory=list)  # evaluate.Evaluator for each config.evals entry
  lock: object = None  # the open workdir lock file while training
  save_tokenizer: bool = False  # a new tokenizer, to be written into the workdir when training starts
  legacy: bool = False  # a run from before validation splits: its config.json stays as that version wrote it
  output_dir: Path | None = None  # eval/predict/sample: where their outputs go (--output_dir), else the workdir
  init_source: init_from.Source | None = None  # a fresh run's initial weights from another run (config.init)

  @property
  def outputs(self) -> Path:
    return self.output_dir or self.workdir

  def restore(self, step: int):
    """Checkpoint `step` -> (state, data_state, meta), restored onto this run's mesh."""
    return restore_checked(self, step)


def restore_checked(run, step: int):
  """run.checkpointer's step restored onto run.steps' layout; a vocabulary that does not match is blamed on the
  workdir's tokenizer files (run: a Run or an inference.Inference)."""
  fingerprint.check_checkpoint(run, step)  # a checkpoint copied from a run with another text of as many ids
  try:
    return run.checkpointer.restore(step, run.steps.layout.restore_target)
  except ModelMismatchError as e:
    vocab = run.dataset.vocab_size
    # the tokenizer is to blame only if every differing dimension is the vocabulary size (the embedding, the head)
    changed = [(k, a) for k, (a, b) in e.diffs.items()
               if a and b and len(a) == len(b) and all(x == y or y == vocab for x, y in zip(a, b))]
    if run.dataset.tokenizer is None or len(changed) != len(e.diffs):
      raise
    name, saved = changed[0]
    raise UserError(f"{run.workdir / 'tokenizer' / 'tokenizer.json'}: its vocabulary has {vocab} ids but checkpoint "
                    f"step {step} was trained with another ({name}: {saved}); put back the run's own tokenizer "
                    "files or use a new --workdir") from None


def build_run(config, workdir: str | Path, for_training: bool = True, output_dir: Path | None = None) -> Run:
  """Everything a run needs from its config. `for_training` also takes the workdir's training lock. (What needs
  only the trained model, not the data -- sample, export, serve -- is inference.Inference.)"""
  workdir = Path(workdir).absolute()
  legacy = adopt_legacy_config(workdir, config)
  check_workdir(workdir, config)
  # Text is tokenized by the workdir's tokenizer once a checkpoint exists; before that, training makes a new one
  # (saved when training starts, so a run that fails on bad input leaves nothing behind).
  new_tokenizer = for_training and not has_checkpoints(workdir)
  # ... unless its weights come from another run (config.init): then it takes that run's tokenizer, ids and all
  adopted = init_from.tokenizer_dir(config) if new_tokenizer else None
  try:
    dataset = load_dataset(config.data, adopted or (None if new_tokenizer else workdir / "tokenizer"),
                           create_tokenizer=new_tokenizer and adopted is None)
  except UserError as e:
    if adopted is None:
      raise
    raise UserError(f"config.init.workdir: this run reads text with {adopted.parent.name}'s tokenizer, but {e}") from None
  fingerprint.check(workdir, dataset, config.train.get("allow_data_change", False))  # what its checkpoints saw
  task = get_task(config, dataset)
  if legacy and "test" not in dataset.eval_splits:  # what that version called test (tiny_shakespeare's last 10%)
    config.evals.test.split = "validation"
  evaluators = evaluate.evaluators(config, dataset)
  steps_per_epoch = pipeline.steps_per_epoch(dataset, config.data)
  if steps_per_epoch == 0:
    held_out = (f" (the rest of its training split is validation: data.validation_fraction="
                f"{config.data.validation_fraction})" if dataset.validation is not None and config.data.validation_fraction
                else "")
    raise UserError(f"config.data.batch_size: {config.data.batch_size} is larger than the "
                    f"{dataset.num_examples('train')} training examples of {dataset.name!r}{held_out} with "
                    "drop_remainder")
  t = config.train
  total_steps = t.num_steps if t.num_steps > 0 else t.num_epochs * steps_per_epoch
  steps = make_steps(config, dataset, task, parallel.make_mesh(config.mesh), total_steps, check_train_step=for_training)
  # another run's weights (config.init), checked before anything is written; a resume never reads them
  fresh = for_training and not has_checkpoints(workdir)
  init_source = init_from.prepare(config, steps, workdir, dataset) if fresh else None
  chief = jax.process_index() == 0
  refused, lock, created = "", None, run_dirs.first_missing(workdir) if chief else None
  if chief:
    try:
      workdir.mkdir(parents=True, exist_ok=True)
      lock = lock_workdir(workdir) if for_training else None
    except OSError as e:
      refused = f"--workdir: cannot create {workdir} ({e.strerror}); pick a writable path"
    except UserError as e:
      refused = str(e)
  refused = distributed.chief_decides(refused)  # the others stop too, rather than wait for process 0 in a collective
  if refused:
    raise UserError(refused)
  # e.g. the GAN's quality classifier: only once the config and the workdir are known good
  try:
    task.setup(workdir, for_training)
  except UserError:
    if created and lock is not None:  # refused (e.g. its classifier): no new workdir is left holding only its lock
      run_dirs.drop_new_workdir(workdir, lock, created)
    raise
  checkpointer = Checkpointer(workdir / "checkpoints", keep=t.keep_checkpoints, keep_best=bool(t.best_eval))
  return Run(config, workdir, dataset, task, steps.layout.mesh, steps, checkpointer,
             MetricsWriter(output_dir or workdir, chief, config), total_steps, steps_per_epoch, evaluators, lock,
             new_tokenizer and dataset.tokenizer is not None, legacy, output_dir, init_source)


def make_steps(config, dataset: Dataset, task, mesh, total_steps: int, check_train_step: bool = True) -> Steps:
  """The compiled steps for config's model, task, optimizers and layout on `mesh` (benchmarks and tests pick meshes)."""
  make_model = lambda rngs: build_model(config.model, input_shape=dataset.input_shape, num_outputs=task.num_outputs,
                                        rngs=rngs, vocab_size=dataset.vocab_size)
  make_optimizers = lambda params: optim.make_optimizers(config, total_steps, params, task.optimizers,
                                                         task.updates_per_step)

  def failed(e: Exception) -> UserError:  # a shape that does not fit, or a bug in the model's or task's own code
    return UserError(f"config.model: {config.model.name!r} on {dataset.name} inputs of shape {dataset.input_shape} "
                     f"failed {errors.where(e)}; check the model fields ({errors.TRACEBACK_HINT})")

  try:  # builds the model abstractly and runs it on the dataset's input shape, without compiling
    steps = Steps(make_model, make_optimizers, task, config.parallel.strategy, mesh, config.seed, dataset.input_shape,
                  dataset.input_dtype, rules=parallel.make_rules(config.parallel.rules), compute_dtype=config.train.dtype,
                  grad_accum_steps=config.train.grad_accum_steps)
  except UserError:
    raise
  except Exception as e:
    raise failed(e) from e
  wanted = tuple(task.output_shape(dataset.input_shape))
  if tuple(steps.output_shape[1:]) != wanted:
    raise UserError(f"config.model.name: {config.model.name!r} outputs shape {tuple(steps.output_shape[1:])} per "
                    f"example but task {config.task.name!r} needs {wanted}; use a model made for that task (language "
                    "models: gpt, lstm_lm; text classifiers: encoder_classifier)")
  if check_train_step:  # the train step too, abstractly (no compiling): a bug in a task's update or in a model's
    # training path shows here, before anything is written
    example = next(pipeline.eval_batches(dataset, dataset.eval_splits[0], config.data))
    k = config.train.grad_accum_steps
    example = {key: jax.ShapeDtypeStruct((k, *v.shape[1:]), v.dtype) for key, v in example.items()}
    try:
      jax.eval_shape(steps.train_step_function, steps.abstract_state,
                     {**example, "row": jax.ShapeDtypeStruct((k,), np.int32)})
    except UserError:
      raise
    except Exception as e:
      raise failed(e) from e
  return steps


def keep_recorded_init(run: Run, start_step: int) -> None:
  """config.init says where a run's step 0 came from: a resume trains on from its own checkpoints whatever init.*
  it is given, so config.json keeps the recorded one (a fork of RUN/config.json would start from other weights)."""
  from bigmodel_jax.workdir import saved_config
  saved = saved_config(run.workdir) if start_step > 0 and not run.legacy else None
  if saved is None or not isinstance(saved.get("init"), dict):
    return
  if run_config.as_config_values(saved["init"]) == run_config.as_config_values(run.config.init.to_dict()):
    return  # the same record: config.json's lists are the config's tuples
  logging.warning("config.init.* differs from %s's, which records where step 0 came from; this run resumes from "
                  "step %d and keeps that record", run.workdir / "config.json", start_step)
  with run.config.unlocked():
    run.config.init.update(saved["init"])


def restore_or_init(run: Run):
  """The newest intact checkpoint of the workdir if there is one, else a fresh state. -> (state, data_state, meta)."""
  step, damaged = run.checkpointer.newest_intact()  # damaged newer steps: moved aside once this one restores
  if step is None:
    logging.info("no checkpoint in %s: starting from %s", run.checkpointer.directory,
                 f"{run.init_source.workdir} step {run.init_source.step}" if run.init_source else "scratch")
    state = run.steps.init()
    return (init_from.apply(state, run.init_source) if run.init_source else state), None, {}
  run_config.check_recorded(run, step, training=True)  # before the state is read
  state, data_state, meta = run.restore(step)
  pipeline.check_position(data_state, step, run.checkpointer.item_file(step, "data"))  # before anything trains
  run.checkpointer.set_aside(damaged, step)
  logging.info("resumed from checkpoint at step %d", step)
  return state, data_state, meta or {}


def train_and_evaluate(config, workdir: str | Path) -> dict:
  """Trains config's model on its dataset in workdir (resuming if possible); returns the final metrics."""
  run = build_run(config, workdir)
  try:
    return _train(run)
  finally:  # each closed even if one before it raises (a save's error surfacing at close)
    try:
      run.checkpointer.close()
    finally:
      try:
        run.writer.close()
      finally:
        if run.lock is not None:
          run.lock.close()  # releases the workdir even while the exception lives on (notebooks, tests)


def _train(run: Run) -> dict:
  config, t, chief = run.config, run.config.train, jax.process_index() == 0
  state, data_state, meta = restore_or_init(run)
  start_step = int(jax.device_get(state.step))
  selection = evaluate.Selection.from_config(config, meta.get("selection"))
  lines = run.steps.describe()  # the per-parameter sharding table only where there is something sharded
  for line in lines if run.steps.layout.mesh.size > 1 else [l for l in lines if not l.startswith("  ")]:
    logging.info("%s", line)
  layout = run.steps.layout
  state = layout.place(state)  # the train step's layout; eval and checkpoints take layout.plain(state)
  card = model_card.describe(run.dataset, run.task, config)  # its digest goes into each checkpoint's meta
  if chief:  # only now: a failed restore must not overwrite the config the checkpoints belong to
    keep_recorded_init(run, start_step)
    init = run.init_source.record() if run.init_source and start_step == 0 else None
    runinfo.write_run_records(run.workdir, config, write_config=not run.legacy, init=init)
    if init:
      init_from.write_record(run.workdir, run.init_source)
    if run.save_tokenizer:
      run.dataset.tokenizer.save(run.workdir / "tokenizer")
    fingerprint.record(run.workdir, run.dataset, start_step)
    model_card.write(run.workdir, card)  # rebuilds it without data
    run.writer.drop_after(start_step)  # records of steps a killed run did after its last checkpoint
  batches = feed.make_feed(run)  # batches sent from the host, or (data.on_device) gathered on the device
  logging.info("training %s on %s: steps %d -> %d (%d per epoch), global batch %d, %d devices",
               config.model.name, run.dataset.name, start_step, run.total_steps, run.steps_per_epoch,
               config.data.batch_size, jax.device_count())
  if start_step >= run.total_steps:  # e.g. resumed with a smaller train.num_steps: nothing left to train
    logging.info("checkpoint step %d is at or past the run's %d steps: evaluating only", start_step, run.total_steps)
  elif selection is not None and selection.stop:
    logging.info("the run stopped early at step %d (no better validation %s for %d evaluations): evaluating only",
                 start_step, selection.metric, selection.stale)
  elif data_state is not None:
    batches.set_state(data_state)

  preempted = []  # SIGTERM (preemption notice) or SIGINT (Ctrl-C): checkpoint, then exit
  # Several processes must stop at one step (the checkpoint is collective): jax's preemption service catches a
  # SIGTERM sent to any of them and names a step that all reach. So no Python SIGTERM handler there (it would
  # replace jax's), and Ctrl-C is passed on to it as a SIGTERM.
  multi, interrupted = jax.process_count() > 1, []
  def on_signal(signum, _):
    if multi:
      interrupted.append(signum)
      os.kill(os.getpid(), signal.SIGTERM)
    else:
      preempted.append(signum)
  progress = Progress(run.total_steps, start_step, enabled=chief and t.progress_bar)
  train_metrics = TrainMetrics()
  train_metrics.resume(meta.get("train_window"))  # a preempted launch's unfinished log window
  add_rates = speed.run_rates(config, run.dataset, run.steps.abstract_state.params)  # MFU, images/s
  evaluated: dict[str, tuple[int, dict]] = {}  # evaluator name -> (step, metrics) of its latest evaluation

  def run_evaluator(e, step, plain_state):
    metrics = evaluate.evaluate_split(run, plain_state, e.split)
    evaluated[e.name] = (step, metrics)
    run.writer.write(step, e.split, {"eval": e.name, **evaluate.loggable(metrics)})
    logging.info("step %d %s: %s", step, e.name, _brief(metrics))
    return metrics

  def log(keep=0, hold=False):  # hold: a preemption's unfinished window goes into its checkpoint, not a record
    windows = train_metrics.read(t.log_every, keep)  # several windows before an eval, a save, the end
    for i, (w, seconds) in enumerate(windows):
      check_finite(w, run.checkpointer)  # a window is recorded only if finite, and the ones before it are
      if hold and i == len(windows) - 1:
        return train_metrics.held(w, seconds)
      summary = add_rates(summarize(w, seconds, config.data.batch_size,
                                    run.dataset.input_shape[0] if run.dataset.is_text else 0))
      run.writer.write(w[-1][0], "train", summary)
      progress.report(w[-1][0], summary, summary["steps_per_s"])

  recorded = {"model_card_sha256": model_card.sha256(card), run_config.RECORD_KEY: run_config.defining_fields(config),
              **fingerprint.checkpoint_record(run.dataset)}

  def save(step, held=None):
    meta = {"step": step, "epoch": step / run.steps_per_epoch, **recorded, **({"train_window": held} if held else {})}
    if selection is not None:
      meta["selection"] = selection.record()
    best = selection is not None and selection.best_step == step
    run.checkpointer.save(step, layout.plain(state), batches.get_state(), meta, best)

  def host_acts_after(s):  # an evaluation, a checkpoint or the end follows step s
    return (s == run.total_steps or s % t.checkpoint_every == 0
            or any(e.due(s, run.steps_per_epoch) for e in run.evaluators))

  def call_length(step):  # steps_per_call steps in one dispatch, unless the host must act after one of them but
    # the last: then single steps up to it. A function of the step alone, so a resumed run calls as the first did.
    k = t.steps_per_call
    if k == 1 or step + k > end or any(host_acts_after(s) for s in range(step + 1, step + k)):
      return 1
    return k

  stopped = selection is not None and selection.stop  # a relaunch of a run that stopped early trains no more
  end = start_step if stopped else run.total_steps
  if chief and start_step < end:
    evaluate.set_aside_final(run.workdir)
  step = start_step
  previous_handlers = {sig: signal.signal(sig, on_signal)  # put back by the finally below, whatever happens
                       for sig in ((signal.SIGINT,) if multi else (signal.SIGTERM, signal.SIGINT))}
  try:
    sizes, s = set(), step  # the call lengths the loop will use (a function of the step alone): their functions
    while s < min(end, step + 100_000) and len(sizes) < 2:  # compiled before the first step, concurrently
      sizes.add(n := call_length(s))
      s += n
    batches.compile(state, sorted(sizes))
    for call in range(start_step + 1, end + 1):  # counts dispatches (the preemption sync point counts those)
      if step >= end:
        break
      n = call_length(step)
      state, metrics = batches(state, step, n)
      previous, step = step, step + n  # the updates done after this call
      train_metrics.add(step, metrics, n)
      progress.advance(step)
      if previous == start_step:
        jax.block_until_ready(metrics)
        startup = time.time() - bigmodel_jax.IMPORT_TIME
        logging.info("start-up: %.1f s from the package's first import to the first step done", startup)
        run.writer.write(step, "startup", {"seconds_to_first_step": startup})
        train_metrics.window_start = time.perf_counter()  # throughput excludes compilation
      if train_metrics.window_closed(t.log_every):
        log(keep=train_metrics.IN_FLIGHT)  # up to a log step; the calls after it keep the device busy meanwhile
      last = step == run.total_steps
      due = [e for e in run.evaluators if last or e.due(step, run.steps_per_epoch)]
      if multi and not preempted and multihost_utils.reached_preemption_sync_point(call):
        preempted.append(interrupted[0] if interrupted else signal.SIGTERM)
      if due or step % t.checkpoint_every == 0 or preempted:
        # every pending call; also checks the loss is finite before anything is saved
        held = log(hold=bool(preempted and not due and step % t.checkpoint_every  # its window goes on after step:
                             and not crosses(step, step + call_length(step), t.log_every)))  # the next call's
        plain = layout.plain(state)
        chosen = next((e for e in due if selection is not None and e.name == selection.eval), None)
        if chosen is not None:  # first: an early stop makes every evaluator run at this step
          selection.update(step, run_evaluator(chosen, step, plain))
          stopped = selection.stop
          if stopped:
            logging.info("early stopping at step %d: validation %s has not improved for %d evaluations (best %.6g "
                         "at step %d)", step, selection.metric, selection.stale, selection.best_value,
                         selection.best_step)
        for e in (run.evaluators if stopped else due):
          if e is not chosen:
            run_evaluator(e, step, plain)
        save(step, held)  # kept as 'best' if the validation evaluator just improved
        train_metrics.window_start = time.perf_counter()  # throughput excludes eval and checkpoint time
      if stopped:
        break
      if preempted:
        break
    run.checkpointer.wait()  # the last save commits while a signal is still only recorded (a second one too)
    after = f"saving a checkpoint at step {step}" if preempted else "training; every checkpoint is committed"
    interrupts.PHASE = f"after {after} (launch the same command again to {'resume' if preempted else 'evaluate'})"
  finally:
    interrupts.restore(previous_handlers)  # a signal until then is in `preempted`; after it, the early handler's
    progress.close()
  if preempted:
    raise Preempted(preempted[0], f"{signal.Signals(preempted[0]).name}: saved a checkpoint at step {step} in "
                    f"{run.checkpointer.directory}; launch the same command again to resume")

  state = layout.plain(state)
  final = evaluate.final_metrics(run, state, evaluated, selection)
  if chief:
    runinfo.write_text_atomic(run.workdir / "final_metrics.json", json.dumps(final, indent=2) + "\n")
  run.writer.finish(final)
  return final


def _brief(metrics: dict) -> str:
  return ", ".join(f"{k} {v:.4f}" for k, v in metrics.items() if isinstance(v, float))
