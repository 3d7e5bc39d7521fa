"""Training metrics between log steps: fetched a few calls late, checked finite, summarized per log window."""

import math
import time

import jax
import numpy as np

from bigmodel_jax.checkpoint import Checkpointer
from bigmodel_jax.errors import NonFiniteLossError


class TrainMetrics:
  """Per-step metrics stay on device until a log step. They are read IN_FLIGHT calls late, so the device has
  those calls queued while the host reads a window's scalars (one transfer each) and writes its record."""

  IN_FLIGHT = 4  # 4 calls cover the ~15 ms a 200-step window's fetch and record take (the seed CNN's step: 5 ms)

  def __init__(self):
    self.pending: list[tuple[int, int, dict]] = []  # (last step, steps, metrics) of each train call
    self.window_start = time.perf_counter()
    self.carried = (0, 0.0)  # (steps, seconds) of a held window put back by resume(): timed by the launch that ran them

  def add(self, step: int, metrics: dict, steps: int = 1) -> None:
    """A call's metrics: of step `step`, or (steps > 1) of steps step-steps+1 .. step, stacked."""
    self.pending.append((step, steps, metrics))

  def held(self, window: list[tuple[int, dict]], seconds: float) -> dict:
    """A log window cut short by a preemption, as a checkpoint keeps it (JSON): resume() puts it back, so the
    record at the window's log step averages the same steps as an uninterrupted run's (its rates: their seconds)."""
    keys = window[-1][1].keys()
    return {"steps": [s for s, _ in window], "dtypes": {k: str(np.asarray(window[-1][1][k]).dtype) for k in keys},
            "metrics": {k: [np.asarray(m[k]).item() for _, m in window] for k in keys}, "seconds": seconds}

  def resume(self, held: dict | None) -> None:
    """The held window of the checkpoint a run resumes from, before its new steps (same dtypes: same means)."""
    if held and held["steps"]:  # one call of its steps: a window is split only where a call crosses a log step
      n = len(held["steps"])  # one step: unstacked, as add() takes a one-step call
      self.add(held["steps"][-1], {k: np.asarray(v if n > 1 else v[0], held["dtypes"][k])
                                   for k, v in held["metrics"].items()}, n)
      self.carried = (len(held["steps"]), float(held.get("seconds", 0.0)))

  def window_closed(self, log_every: int) -> bool:
    """Whether the call IN_FLIGHT calls back was the first after a log step (s - 1 divisible by log_every): the
    windows up to that step can be read by fetch(log_every, keep=IN_FLIGHT)."""
    if len(self.pending) <= self.IN_FLIGHT:  # nothing before it (the run's first call, or just after a full fetch)
      return False
    return crosses(self.pending[-self.IN_FLIGHT - 1][0], self.pending[-self.IN_FLIGHT][0], log_every)

  def fetch(self, log_every: int, keep: int = 0) -> list[list[tuple[int, dict]]]:
    """The pending calls' metrics on the host but those of the newest `keep` calls: one (step, metrics) per step,
    in log windows (a window ends with the last call before a log step's)."""
    ready = self.pending[:-keep] if keep else self.pending
    self.pending = self.pending[-keep:] if keep else []
    windows, previous = [], None
    for step, n, metrics in jax.device_get(ready):
      if not windows or crosses(previous, step, log_every):
        windows.append([])
      windows[-1].extend([(step, metrics)] if n == 1 else
                         [(step - n + 1 + i, {k: v[i] for k, v in metrics.items()}) for i in range(n)])
      previous = step
    return windows

  def read(self, log_every: int, keep: int = 0) -> list[tuple[list[tuple[int, dict]], float]]:
    """fetch()'s windows, each with its seconds: the time since the last read, shared out by the steps this launch
    ran (a held window's steps bring their own seconds)."""
    windows = self.fetch(log_every, keep)
    if not windows:
      return []
    now = time.perf_counter()
    (carried, carried_s), self.carried = self.carried, (0, 0.0)
    per_step = (now - self.window_start) / max(sum(len(w) for w in windows) - carried, 1)
    self.window_start = now
    return [(w, per_step * (len(w) - carried * (i == 0)) + carried_s * (i == 0)) for i, w in enumerate(windows)]


def crosses(previous: int, step: int, log_every: int) -> bool:
  """Whether a call ending at `step`, after one ending at `previous`, holds a log step."""
  return (step - 1) // log_every > (previous - 1) // log_every


def check_finite(fetched: list[tuple[int, dict]], checkpointer: Checkpointer) -> None:
  for step, m in fetched:
    bad = [k for k in m if k.split("/")[-1].endswith(("loss", "grad_norm", "param_norm")) and not np.isfinite(m[k])]
    if bad:
      checkpointer.wait()
      last = checkpointer.latest_step()
      kept = f"last good checkpoint: step {last}" if last is not None else "no checkpoint was written"
      raise NonFiniteLossError(f"non-finite {bad[0]} ({m[bad[0]]}) at step {step}; training stopped, nothing "
                               f"saved after it ({kept}); lower config.optimizer.learning_rate or set "
                               "config.optimizer.grad_clip_norm")


def summarize(fetched: list[tuple[int, dict]], seconds: float, global_batch: int, tokens_per_example: int = 0) -> dict:
  keys = fetched[-1][1].keys()  # (a held window from before an allow_config_change resume may lack some)
  out = {k: float(np.mean([m[k] for _, m in fetched if k in m])) for k in keys}
  for k in keys:  # the rate in force at the window's end, not its average
    if k.split("/")[-1] == "learning_rate":
      out[k] = float(fetched[-1][1][k])
  if "perplexity" in out and "loss" in out:  # exp of the mean loss, as an eval's (not the mean of each part's exp)
    out["perplexity"] = math.exp(min(out["loss"], 700.0))
  out["steps_per_s"] = len(fetched) / seconds if seconds > 0 else 0.0
  out["examples_per_s"] = out["steps_per_s"] * global_batch
  if tokens_per_example:  # text: token positions per second (padding included for classifiers)
    out["tokens_per_s"] = out["examples_per_s"] * tokens_per_example
  return out
