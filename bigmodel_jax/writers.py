"""Run records: metrics.jsonl and the experiment trackers (TensorBoard, MLflow, W&B: trackers.py), a progress bar
(or log lines off a TTY)."""

import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import tqdm
from absl import logging

from bigmodel_jax import errors, runinfo, trackers
from bigmodel_jax.errors import UserError


def _scalar(v):
  if isinstance(v, (np.ndarray, np.generic)) and np.ndim(v) == 0:
    return v.item()
  return v


def _step_of(line: str) -> float:
  try:
    return json.loads(line)["step"]
  except (json.JSONDecodeError, KeyError, TypeError):
    return float("inf")  # a line cut short by a kill: dropped


def _open_records(path: Path):
  try:
    f = open(path, "a")
    if f.tell():  # a last line cut short by a kill: the next record starts a line of its own
      with open(path, "rb") as tail:
        tail.seek(-1, os.SEEK_END)
        if tail.read(1) != b"\n":
          f.write("\n")
    return f
  except OSError as e:  # a directory, or no permission, where metrics.jsonl goes
    raise UserError(f"{path}: cannot be opened for appending metrics ({e.strerror}); move it away or fix its "
                    "permissions") from None


class MetricsWriter:
  """Appends {'step', 'split', 'time', **metrics} lines to metrics.jsonl and sends them to the trackers of
  config.train.trackers (TensorBoard by default; see trackers.py).

  Only the chief process (process 0) writes; other processes get a writer that does nothing. Trackers that keep a
  run of their own (MLflow, W&B) start when training does (`drop_after`), so --mode=eval/predict leaves them be;
  TensorBoard keeps --mode=eval's records out of the training run's event files (trackers.TensorBoard). A
  tracker that fails later logs one warning and is off for the rest of the launch: training goes on.
  """

  def __init__(self, workdir: Path, enabled: bool = True, config=None):
    self.enabled = enabled
    if not enabled:
      return
    self.workdir = Path(workdir)
    self._created = not (self.workdir / "metrics.jsonl").exists()  # removed at close if nothing was written
    self._jsonl = _open_records(self.workdir / "metrics.jsonl")
    self._pending = {name: trackers.TRACKERS.get(name)(config, self.workdir)
                     for name in (trackers.names(config) if config is not None else ["tensorboard"])}
    self._active: dict[str, trackers.Tracker] = {}
    self._state: dict[str, dict] = {}  # per resuming tracker: its run, and the last step sent per metric prefix
    self._finished = False
    for name, tracker in list(self._pending.items()):
      if not tracker.resumes:
        self._start(name, tracker, {})

  def _start(self, name: str, tracker, previous: dict, after: int | None = None) -> None:
    tracker.check_installed(name)
    try:
      state, continued = tracker.start(previous)
    except UserError:
      raise
    except Exception as e:
      raise UserError(f"config.train.trackers: {name} could not start {errors.where(e)}") from e
    del self._pending[name]
    self._active[name] = tracker
    if tracker.resumes:
      self._state[name] = {**state, "last_steps": previous.get("last_steps", {}) if continued else {}}
      sent = max(self._state[name]["last_steps"].values(), default=-1)
      if after is not None and sent > after:  # values a killed launch sent past the step this launch resumes from
        self._call(name, tracker.mark_discarded, after + 1, sent)

  def drop_after(self, step: int) -> None:
    """Training (re)starts after `step`: records past it are removed (a resumed run redoes those steps), so the
    file reads as one run; then the trackers that keep a run of their own start, or continue theirs, and are sent
    the records they lack."""
    if not self.enabled:
      return
    for tracker in self._active.values():
      tracker.check_place()
    self._jsonl.close()
    path = Path(self._jsonl.name)
    try:
      text = path.read_text()
    except UnicodeDecodeError:
      raise UserError(f"{path} is not a text file of JSON lines (binary data); move it away to keep it, and the "
                      "run goes on with a new one") from None
    runinfo.write_text_atomic(path, "".join(line for line in text.splitlines(keepends=True) if _step_of(line) <= step))
    self._jsonl = _open_records(path)
    for tracker in self._active.values():  # TensorBoard hides the events a killed launch wrote past `step`
      tracker.purge_after = step
    previous = trackers.read_state(self.workdir)
    for name, tracker in list(self._pending.items()):
      self._start(name, tracker, previous.get(name, {}), after=step)
    if self._state:
      self._send([json.loads(line) for line in path.read_text().splitlines()], replay=True)

  def write(self, step: int, split: str, metrics: dict) -> None:
    if not self.enabled:
      return
    record = {"step": int(step), "split": split, "time": round(time.time(), 3)}
    record.update({k: _scalar(v) for k, v in metrics.items()})
    self._jsonl.write(json.dumps(record) + "\n")
    self._jsonl.flush()
    self._send([record])

  def _send(self, records: list[dict], replay: bool = False) -> None:
    """To each active tracker, the records it lacks: a resuming tracker skips what an earlier launch sent it (a
    resumed run redoes steps), and only resuming trackers get a `replay` of metrics.jsonl."""
    for name, tracker in list(self._active.items()):
      if tracker.resumes:
        last = self._state[name]["last_steps"]
        new = [r for r in records if r["step"] > last.get(_sent_key(r), -1)]
      else:
        new = [] if replay else records
      if new and self._call(name, tracker.write, new) and tracker.resumes:
        last.update({_sent_key(r): r["step"] for r in new})
    self._save_state()

  def _save_state(self) -> None:
    if self._state:
      state = {trackers.ORIGIN: str(self.workdir.absolute()), **self._state}  # a copy of the workdir tells itself
      runinfo.write_text_atomic(self.workdir / trackers.STATE_FILE, json.dumps(state, indent=2) + "\n")

  def _call(self, name: str, method, *args) -> bool:
    try:
      method(*args)
      return True
    except Exception as e:
      missed = "a relaunch sends it what it missed" if self._active[name].resumes else "what it misses is in " \
               "metrics.jsonl only"  # TensorBoard is sent no earlier records
      logging.warning("tracker %s failed %s; it is off for the rest of this launch (metrics.jsonl and the other "
                      "trackers go on; %s)", name, errors.where(e), missed)
      del self._active[name]
      return False

  def finish(self, final_metrics: dict) -> None:
    """The run's final metrics (final_metrics.json), once training and the final evaluations are done."""
    if not self.enabled:
      return
    self._finished = True
    for name, tracker in list(self._active.items()):
      last = self._state[name]["last_steps"] if tracker.resumes else {}
      # a relaunched finished run evaluates again: a tracker that has these final metrics is not sent them twice
      if final_metrics["step"] > last.get("final", -1) and self._call(name, tracker.finish, final_metrics):
        last["final"] = final_metrics["step"]
    self._save_state()

  def close(self) -> None:
    if not self.enabled:
      return
    empty = self._created and not self._jsonl.tell()  # e.g. --mode=predict, which has no metrics
    self._jsonl.close()
    if empty:
      Path(self._jsonl.name).unlink(missing_ok=True)
    status = "finished" if self._finished else _stop_reason(sys.exc_info()[1])
    for name, tracker in list(self._active.items()):
      self._call(name, tracker.close, status)
    self._active.clear()


def _stop_reason(exc: BaseException | None) -> str:
  """How a run that did not finish ended: killed (SIGTERM/Ctrl-C, resumable as it is) or failed."""
  from bigmodel_jax.train import Preempted
  return "killed" if exc is None or isinstance(exc, (Preempted, KeyboardInterrupt)) else "failed"


class Progress:
  """A tqdm bar (step, loss, steps/s, ETA) on a terminal; plain periodic log lines elsewhere."""

  def __init__(self, total: int, initial: int, enabled: bool = True):
    self.tty = enabled and sys.stderr.isatty()
    self.enabled = enabled
    self.total = total
    self._bar = tqdm.tqdm(total=total, initial=initial, unit="step", dynamic_ncols=True) if self.tty else None
    self._handler = logging.get_absl_handler().python_handler
    self._stream = self._handler.stream
    if self._bar is not None:  # log lines go above the bar instead of through it
      self._handler.stream = _AboveBar()

  def advance(self, step: int) -> None:
    if self._bar is not None:
      self._bar.update(step - self._bar.n)

  def report(self, step: int, metrics: dict, steps_per_s: float) -> None:
    if not self.enabled:
      return
    if self._bar is not None:
      self._bar.set_postfix(loss=f"{metrics['loss']:.4f}", refresh=False)
      return
    eta = (self.total - step) / steps_per_s if steps_per_s > 0 else float("nan")
    logging.info("step %d/%d  loss %.4f  %.1f steps/s  ETA %s", step, self.total, metrics["loss"],
                 steps_per_s, time.strftime("%H:%M:%S", time.gmtime(eta)) if np.isfinite(eta) else "?")

  def close(self) -> None:
    if self._bar is not None:
      self._bar.close()
      self._handler.stream = self._stream


class _AboveBar:
  """A stream for the log handler that prints through tqdm.write, keeping the bar intact."""

  def write(self, text: str) -> None:
    if text.strip():
      tqdm.tqdm.write(text.rstrip("\n"), file=sys.stderr)

  def flush(self) -> None:
    sys.stderr.flush()


def _sent_key(record: dict) -> str:
  """What a resuming tracker's last sent step is kept under: the metric key, and for --mode=eval's records (of any
  checkpoint, in any order) also their step, so an eval of an earlier step is sent too."""
  key = trackers.metric_key(record)
  return f"{key}@{record['step']}" if record["split"] == "eval" else key
