"""Checkpoints with orbax (the only module that imports it).

One checkpoint = {train state, data iterator position, run metadata}, written asynchronously and
atomically (orbax writes to a temporary directory and renames it when complete). Retention keeps
the latest `keep` checkpoints plus the best one by an eval metric.
"""

import contextlib
import os
import sys
import time
import traceback
from pathlib import Path

import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers as policies

from bigmodel_jax.errors import UserError


class Checkpointer:

  def __init__(self, directory: str | Path, *, keep: int = 3, best_metric: str = "", best_mode: str = "max",
               async_save: bool = True):
    self.directory = Path(directory).absolute()
    self.best_metric = best_metric
    keep_policies = [policies.LatestN(n=keep)]
    if best_metric:
      keep_policies.append(policies.BestN(get_metric_fn=lambda m: m[best_metric], reverse=best_mode == "min",
                                          n=1, keep_checkpoints_without_metrics=False))
    options = ocp.CheckpointManagerOptions(
        preservation_policy=policies.AnyPreservationPolicy(keep_policies),
        # best_fn also makes orbax write each step's metrics to disk, so 'best' survives a restart
        best_fn=(lambda m: m[best_metric]) if best_metric else None, best_mode=best_mode,
        enable_async_checkpointing=async_save, create=True)
    try:
      self._manager = ocp.CheckpointManager(self.directory, options=options)
    except Exception as e:  # orbax reads every step's metadata on open
      raise UserError(f"checkpoint directory {self.directory} cannot be read ({_short(e)}); "
                      "move it away or use a new --workdir") from None

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def all_steps(self) -> list[int]:
    return list(self._manager.all_steps())

  def save(self, step: int, state, data_state: dict, meta: dict, metrics: dict | None = None) -> None:
    """Starts an async save; arrays are copied off the device before this returns (donation-safe)."""
    metrics = {k: v for k, v in (metrics or {}).items() if isinstance(v, (int, float))} or None
    if metrics is not None and self.best_metric not in metrics:
      metrics = None
    self._manager.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(data_state),
        meta=ocp.args.JsonSave(meta)), metrics=metrics, force=True)

  def restore(self, step: int, target) -> tuple:
    """-> (state, data_state, meta); `target` holds ShapeDtypeStructs with the *current* shardings."""
    if step not in self.all_steps():
      raise UserError(f"checkpoint step {step} not found in {self.directory}; available: {self.all_steps()}")
    log = self.directory.parent / "restore_error.log"
    try:
      with _stderr_into(log):  # a failed tensorstore read also prints asyncio tracebacks; keep them in the log
        restored = self._manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(target), data=ocp.args.JsonRestore(), meta=ocp.args.JsonRestore()))
    except Exception as e:
      with open(log, "a") as f:
        traceback.print_exception(e, file=f)
      raise UserError(f"checkpoint {self.directory / str(step)} cannot be read ({_short(e)}; details in {log}); "
                      "move that step directory away to resume from an earlier one, or use a new --workdir") from None
    _replay(log)
    return restored.state, restored.data, restored.meta

  def wait(self) -> None:
    self._manager.wait_until_finished()

  def close(self) -> None:
    self._manager.wait_until_finished()
    self._manager.close()


def _short(e: Exception) -> str:
  text = str(e).strip().splitlines()
  return f"{type(e).__name__}: {text[0][:200] if text else ''}"


@contextlib.contextmanager
def _stderr_into(path: Path):
  """Sends file descriptor 2 (Python and C++ writers alike) into `path` for the duration."""
  sys.stderr.flush()
  saved = os.dup(2)
  with open(path, "wb") as f:
    os.dup2(f.fileno(), 2)
  try:
    yield
  except Exception:
    time.sleep(1.0)  # reads still in flight when orbax gave up report (noisily) a moment later
    raise
  finally:
    sys.stderr.flush()
    os.dup2(saved, 2)
    os.close(saved)


def _replay(path: Path) -> None:
  """A successful restore: pass on whatever it printed, and leave no log behind."""
  text = path.read_text(errors="replace")
  path.unlink(missing_ok=True)
  if text:
    sys.stderr.write(text)
