"""Training metrics between log steps: fetched one step late, checked finite, summarized per log window."""

import time

import jax
import numpy as np

from bigmodel_jax.checkpoint import Checkpointer
from bigmodel_jax.errors import NonFiniteLossError


class TrainMetrics:
  """Per-step metrics stay on device until a log step; they are fetched one step late so the device
  always has the next step queued while the host reads the previous ones."""

  def __init__(self):
    self.pending: list[tuple[int, int, dict]] = []  # (last step, steps, metrics) of each train call
    self.window_start = time.perf_counter()

  def add(self, step: int, metrics: dict, steps: int = 1) -> None:
    """A call's metrics: of step `step`, or (steps > 1) of steps step-steps+1 .. step, stacked."""
    self.pending.append((step, steps, metrics))

  def fetch(self, keep_last: bool) -> list[tuple[int, dict]]:
    """The pending calls' metrics on the host, one (step, metrics) per step; keep_last: not the newest call's."""
    ready = self.pending[:-1] if keep_last else self.pending
    self.pending = self.pending[-1:] if keep_last else []
    out = []
    for step, n, metrics in jax.device_get(ready):
      out.extend([(step, metrics)] if n == 1 else
                 [(step - n + 1 + i, {k: v[i] for k, v in metrics.items()}) for i in range(n)])
    return out


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
  keys = fetched[-1][1].keys()
  out = {k: float(np.mean([m[k] for _, m in fetched])) for k in keys}
  for k in keys:  # the rate in force at the window's end, not its average
    if k.split("/")[-1] == "learning_rate":
      out[k] = float(fetched[-1][1][k])
  out["steps_per_s"] = len(fetched) / seconds if seconds > 0 else 0.0
  out["examples_per_s"] = out["steps_per_s"] * global_batch
  if tokens_per_example:  # text: token positions per second (padding included for classifiers)
    out["tokens_per_s"] = out["examples_per_s"] * tokens_per_example
  return out
