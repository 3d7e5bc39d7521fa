"""Run records: metrics.jsonl, TensorBoard event files, a progress bar (or log lines off a TTY)."""

import json
import sys
import time
from pathlib import Path

import numpy as np
import tqdm
from absl import logging

from bigmodel_jax import runinfo


def _scalar(v):
  if isinstance(v, (np.ndarray, np.generic)) and np.ndim(v) == 0:
    return v.item()
  return v


def _step_of(line: str) -> float:
  try:
    return json.loads(line)["step"]
  except (json.JSONDecodeError, KeyError, TypeError):
    return float("inf")  # a line cut short by a kill: dropped


class MetricsWriter:
  """Appends {'step', 'split', **metrics} lines to metrics.jsonl and scalars to TensorBoard.

  Only the chief process (process 0) writes; other processes get a writer that does nothing.
  """

  def __init__(self, workdir: Path, enabled: bool = True, config=None):
    self.enabled = enabled
    if not enabled:
      return
    from tensorboardX import SummaryWriter
    self._jsonl = open(Path(workdir) / "metrics.jsonl", "a")
    self._tb = SummaryWriter(str(Path(workdir) / "tensorboard"))

  def drop_after(self, step: int) -> None:
    """Removes records past `step` (a resumed run redoes those steps), so the file reads as one run."""
    if not self.enabled:
      return
    self._jsonl.close()
    path = Path(self._jsonl.name)
    runinfo.write_text_atomic(path, "".join(line for line in path.read_text().splitlines(keepends=True)
                                            if _step_of(line) <= step))
    self._jsonl = open(path, "a")

  def write(self, step: int, split: str, metrics: dict) -> None:
    if not self.enabled:
      return
    record = {"step": int(step), "split": split, "time": round(time.time(), 3)}
    record.update({k: _scalar(v) for k, v in metrics.items()})
    self._jsonl.write(json.dumps(record) + "\n")
    self._jsonl.flush()
    for k, v in record.items():
      if k not in ("step", "split", "time") and isinstance(v, (int, float)):
        self._tb.add_scalar(f"{split}/{k}", v, step)
    self._tb.flush()

  def finish(self, final_metrics: dict) -> None:
    """The run's final metrics (final_metrics.json), once training and the final evaluations are done."""

  def close(self) -> None:
    if self.enabled:
      self._jsonl.close()
      self._tb.close()


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
