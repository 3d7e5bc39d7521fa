"""Checkpoints with orbax (the only module that imports it).

One checkpoint = {train state, data iterator position, run metadata}, written asynchronously and
atomically (orbax writes to a temporary directory and renames it when complete). Retention keeps
the latest `keep` checkpoints plus the best one: the latest saved with best=True (the run's model selection,
evaluate.Selection, decides which step that is; ties and all).
"""

import os
import sys
import tempfile
import time
import traceback
from collections.abc import Mapping
from pathlib import Path

import jax
import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers as policies

from bigmodel_jax.errors import ModelMismatchError, UserError

BEST = "best_step"  # the metric orbax keeps the best checkpoint by


class Checkpointer:

  def __init__(self, directory: str | Path, *, keep: int = 3, keep_best: bool = False, async_save: bool = True):
    self.directory = Path(directory).absolute()
    keep_policies = [policies.LatestN(n=keep)]
    if keep_best:  # a best checkpoint carries the metric {BEST: its step}: the highest is the latest best
      keep_policies.append(policies.BestN(get_metric_fn=lambda m: m[BEST], n=1, keep_checkpoints_without_metrics=False))
    options = ocp.CheckpointManagerOptions(
        preservation_policy=policies.AnyPreservationPolicy(keep_policies),
        # best_fn also makes orbax write each step's metrics to disk, so 'best' survives a restart
        best_fn=(lambda m: m[BEST]) if keep_best else None, best_mode="max",
        enable_async_checkpointing=async_save, create=True)
    handlers = {"state": ocp.StandardCheckpointHandler(), "data": ocp.JsonCheckpointHandler(),
                "meta": ocp.JsonCheckpointHandler()}
    try:
      self._manager = ocp.CheckpointManager(self.directory, options=options, item_handlers=handlers)
    except Exception as e:  # orbax reads every step's metadata on open
      raise UserError(f"checkpoint directory {self.directory} cannot be read ({_short(e)}); "
                      "move it away or use a new --workdir") from None

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def all_steps(self) -> list[int]:
    return list(self._manager.all_steps())

  def save(self, step: int, state, data_state: dict, meta: dict, best: bool = False) -> None:
    """Starts an async save; arrays are copied off the device before this returns (donation-safe). `best`: this
    step is the run's new best (kept, with the latest `keep`, until a later best)."""
    self._manager.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(data_state),
        meta=ocp.args.JsonSave(meta)), metrics={BEST: step} if best else None, force=True)

  def restore(self, step: int, target) -> tuple:
    """-> (state, data_state, meta); `target` holds ShapeDtypeStructs with the *current* shardings."""
    if step not in self.all_steps():
      raise UserError(f"checkpoint step {step} not found in {self.directory}; available: {self.all_steps()}")
    with tempfile.TemporaryFile() as captured:  # per process: eval may run beside training
      saved_stderr = _redirect_stderr(captured.fileno())
      try:
        self._check_param_shapes(step, target)
        legacy = self._unnamed_optimizer(step, target)
        restored = self._manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(target if legacy is None else target.replace(opt_state=target.opt_state[legacy])),
            data=ocp.args.JsonRestore(), meta=ocp.args.JsonRestore()))
      except UserError:  # a config problem, found from readable metadata: nothing left in flight
        _restore_stderr(saved_stderr, captured)
        raise
      except Exception as e:
        # tensorstore reads still in flight print "Event loop is closed" tracebacks from their own threads
        # as they finish: let them land in the capture, then keep all of it in the workdir's log
        _wait_until_quiet(captured)
        _restore_stderr(saved_stderr)
        log = self.directory.parent / "restore_error.log"
        with open(log, "a") as f:
          f.write(f"--- {time.strftime('%Y-%m-%d %H:%M:%S')} pid {os.getpid()}: restoring step {step}\n")
          captured.seek(0)
          f.write(captured.read().decode(errors="replace"))
          traceback.print_exception(e, file=f)
        raise UserError(f"checkpoint {self.directory / str(step)} cannot be read ({_short(e)}; details in {log}); "
                        "move that step directory away to resume from an earlier one, or use a new --workdir") from None
      _restore_stderr(saved_stderr, captured)
    state = restored.state if legacy is None else restored.state.replace(opt_state={legacy: restored.state.opt_state})
    return state, restored.data, restored.meta

  def _unnamed_optimizer(self, step: int, target) -> str | None:
    """A checkpoint written before optimizers had names holds one optimizer state, not {name: state}: the name of
    the target's single optimizer to restore it under, or None for a checkpoint of today's layout."""
    try:
      saved = self._manager.item_metadata(step)["state"]["opt_state"]
    except Exception:  # unreadable metadata: the restore itself will say what is wrong
      return None
    if isinstance(saved, Mapping) or not isinstance(target.opt_state, Mapping) or len(target.opt_state) != 1:
      return None
    return next(iter(target.opt_state))

  def _check_param_shapes(self, step: int, target) -> None:
    """A checkpoint of another model (after allow_config_change) is a config problem, not a corrupt file."""
    try:
      saved = _param_shapes(self._manager.item_metadata(step)["state"]["params"])
    except Exception:  # unreadable metadata: the restore itself will say what is wrong
      return
    wanted = _param_shapes(target.params)
    diffs = {k: (saved.get(k), wanted.get(k)) for k in sorted(set(saved) | set(wanted))
             if saved.get(k) != wanted.get(k)}
    if diffs:
      listed = [f"{k}: {a} saved, {b} now" for k, (a, b) in diffs.items()]
      raise ModelMismatchError(f"checkpoint {self.directory / str(step)} holds a different model than the config "
                               f"builds ({'; '.join(listed[:3])}{'; ...' if len(listed) > 3 else ''}); revert the "
                               "model change or use a new --workdir", diffs)

  def wait(self) -> None:
    self._manager.wait_until_finished()

  def close(self) -> None:
    self._manager.wait_until_finished()
    self._manager.close()


def _param_shapes(tree) -> dict[str, tuple]:
  """{'hidden.0.kernel': shape} for a params tree or its orbax metadata (nnx's '.value' level dropped)."""
  out = {}
  for path, leaf in jax.tree_util.tree_leaves_with_path(tree):
    names = [str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in path]
    out[".".join(n for n in names if n != "value")] = tuple(leaf.shape)
  return out


def _short(e: Exception) -> str:
  text = str(e).strip().splitlines()
  return f"{type(e).__name__}: {text[0][:200] if text else ''}"


def _redirect_stderr(fd: int) -> int:
  """Points file descriptor 2 (Python and C++ writers alike) at `fd`; returns a copy of the old one."""
  sys.stderr.flush()
  saved = os.dup(2)
  os.dup2(fd, 2)
  return saved


def _restore_stderr(saved: int, replay=None) -> None:
  """Puts fd 2 back; with `replay`, passes on what was captured meanwhile (a normal restore's output)."""
  sys.stderr.flush()
  os.dup2(saved, 2)
  os.close(saved)
  if replay is not None:
    replay.seek(0)
    text = replay.read().decode(errors="replace")
    if text:
      sys.stderr.write(text)


def _wait_until_quiet(captured, quiet_s: float = 0.5, limit_s: float = 5.0) -> None:
  """Waits until nothing more has been written to `captured` for `quiet_s` (at most `limit_s`)."""
  deadline, size, since = time.time() + limit_s, -1, time.time()
  while time.time() < deadline:
    now = os.fstat(captured.fileno()).st_size
    if now != size:
      size, since = now, time.time()
    elif time.time() - since >= quiet_s:
      return
    time.sleep(0.05)
