"""Checkpoints with orbax (the only module that imports it).

One checkpoint = {train state, data iterator position, run metadata}, written asynchronously and
atomically (orbax writes to a temporary directory and renames it when complete). In a single-process run the
training loop only dispatches a device-side copy of the state and hands the whole orbax save to one background
thread (orbax's own synchronous part -- the device->host copy, its thread start-ups and bookkeeping -- blocked the
loop for 35-80 ms per save); a multi-process save is collective and stays in the caller's thread. Retention keeps
the latest `keep` checkpoints plus the best one: the latest saved with best=True (the run's model selection,
evaluate.Selection, decides which step that is; ties and all). Each step carries a digest of its files (integrity.py),
written before orbax commits the step and checked before every restore: a damaged step is never read as if intact.
"""

import json
import os
import re
import sys
import tempfile
import time
import traceback
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp
from absl import logging
from orbax.checkpoint import checkpoint_managers as policies

from bigmodel_jax import distributed, integrity
from bigmodel_jax.errors import CheckpointGoneError, DamagedCheckpointError, ModelMismatchError, UserError

BEST = "best_step"  # the metric orbax keeps the best checkpoint by
DAMAGED = "damaged"  # checkpoints/damaged/<step>: where a resume moves damaged steps aside (never deletes them)
try:  # orbax writes a step into <step><suffix>, then renames it into place
  from orbax.checkpoint._src.path.atomicity import TMP_DIR_SUFFIX
except ImportError:
  TMP_DIR_SUFFIX = ".orbax-checkpoint-tmp"


class Checkpointer:

  def __init__(self, directory: str | Path, *, keep: int = 3, keep_best: bool = False, async_save: bool = True):
    """Without `async_save`, save() returns once the step is committed (orbax still saves asynchronously: the digest
    is written by its post-finalization hook, which only async saves have)."""
    _drop_late_callbacks_on_closed_loops()
    self.directory = Path(directory).absolute()
    self._sync, self._saving, self._checked = not async_save, None, {}
    # saves handed to a background thread: async, and one process (a multi-process save is collective)
    self._background = ThreadPoolExecutor(1, "checkpoint") if async_save and jax.process_count() == 1 else None
    self._pending = None  # the background save in flight (its exception is raised by the next call that joins it)
    keep_policies = [policies.LatestN(n=keep)]
    if keep_best:  # a best checkpoint carries the metric {BEST: its step}: the highest is the latest best
      keep_policies.append(policies.BestN(get_metric_fn=lambda m: m[BEST], n=1, keep_checkpoints_without_metrics=False))
    options = ocp.CheckpointManagerOptions(
        preservation_policy=policies.AnyPreservationPolicy(keep_policies),
        # best_fn also makes orbax write each step's metrics to disk, so 'best' survives a restart
        best_fn=(lambda m: m[BEST]) if keep_best else None, best_mode="max",
        enable_async_checkpointing=True, create=True,
        async_options=ocp.AsyncOptions(post_finalization_callback=self._write_digest))
    handlers = {"state": ocp.StandardCheckpointHandler(), "data": ocp.JsonCheckpointHandler(),
                "meta": ocp.JsonCheckpointHandler()}
    for attempt in range(3):
      try:
        self._manager = ocp.CheckpointManager(self.directory, options=options, item_handlers=handlers)
        break
      except Exception as e:  # orbax reads every step's metadata on open
        # a step deleted while orbax read it: the retention of a training running beside this eval, not damage
        missing = Path(e.filename or "/") if isinstance(e, FileNotFoundError) else self.directory
        gone = missing != self.directory and missing.is_relative_to(self.directory)
        if gone and attempt < 2:
          continue
        if gone:
          raise UserError(f"checkpoint directory {self.directory} changed while it was being read ({_short(e)}; the "
                          "retention of a training running in this workdir?); run again") from None
        step_file = integrity.unreadable_step_metadata(self.directory)
        if step_file is not None:  # one step's file, damaged by hand: the other steps are fine
          raise UserError(f"{step_file} cannot be read ({_short(e)}); move checkpoint step {step_file.parent.name} "
                          f"out of {self.directory} (or put back an intact copy of it)") from None
        raise UserError(f"checkpoint directory {self.directory} cannot be read ({_short(e)}); "
                        "move it away or use a new --workdir") from None

  def latest_step(self) -> int | None:
    self._join()
    return self._manager.latest_step()

  def all_steps(self) -> list[int]:
    self._join()
    return list(self._manager.all_steps())

  def reload(self) -> None:
    """The steps on disk now (another process's saves and retention since this one listed them)."""
    self._join()
    self._manager.reload()

  def save(self, step: int, state, data_state: dict, meta: dict, best: bool = False) -> None:
    """Starts an async save (donation-safe: the caller may donate `state`'s arrays once this returns). `best`: this
    step is the run's new best (kept, with the latest `keep`, until a later best). In the background: returns once
    a device-side copy of the state is dispatched (where the devices have room for one; else orbax copies it to the
    host first, here)."""
    self._join()
    # The previous save is committed (its digest hook has run: `_saving` is free). Waited for here, in the caller's
    # thread, so that its error (a full disk, say) is raised at this save, once, as orbax raises it once per thread.
    self._manager.wait_until_finished()
    self._checked.pop(step, None)
    if self._background is None or not _fits_a_copy(state):
      self._save(step, state, data_state, meta, best)
    else:
      self._pending = self._background.submit(self._save, step, _copy(state), data_state, meta, best)

  def _save(self, step: int, state, data_state: dict, meta: dict, best: bool) -> None:
    self._saving = step
    self._manager.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(data_state),
        meta=ocp.args.JsonSave(meta)), metrics={BEST: step} if best else None, force=True)
    if self._sync:
      self._manager.wait_until_finished()

  def _join(self) -> None:
    """Until the background save in flight has been handed to orbax; re-raises what it raised (once). A Ctrl-C
    while waiting leaves it pending, to be joined again."""
    if self._pending is None:
      return
    try:
      self._pending.result()
    finally:
      if self._pending.done():
        self._pending = None

  def _write_digest(self) -> None:
    """Orbax's post-finalization hook (primary process, background thread): every process has written its files
    into the temporary step directory and the rename that commits it comes next. A failure here fails the save."""
    tmp = self.directory / f"{self._saving}{TMP_DIR_SUFFIX}"
    start = time.perf_counter()
    record = integrity.write(tmp if tmp.is_dir() else self.directory / str(self._saving))  # else: commit-file storage
    logging.info("checkpoint step %s: digest of %d files in %.3f s", self._saving, len(record["files"]),
                 time.perf_counter() - start)

  def verify(self, step: int) -> bool:
    """True: step's files match its digest; False: it has none (written before digests; restored unverified, said
    in one log line). Raises DamagedCheckpointError."""
    if step not in self._checked:
      step_dir = self.directory / str(step)
      try:
        self._checked[step] = integrity.verify(step_dir)
      except integrity.Mismatch as e:
        if not step_dir.is_dir():  # e.g. a training's retention deleted it while an eval beside it was reading it
          raise CheckpointGoneError(step_dir) from None
        raise DamagedCheckpointError(f"checkpoint {step_dir} is damaged: {e}", step, str(e)) from None
      if not self._checked[step]:
        logging.warning("checkpoint step %d has no %s (written before checkpoints had digests): restoring it "
                        "unverified", step, integrity.FILE)
    return self._checked[step]

  def intact_steps(self) -> list[int]:
    """The steps that pass verify() (those without a digest included)."""
    out = []
    for step in self.all_steps():
      try:
        self.verify(step)
        out.append(step)
      except DamagedCheckpointError:
        pass
    return out

  def newest_intact(self) -> tuple[int | None, list[DamagedCheckpointError]]:
    """For a resume: (the newest step that passes verify() or None if there is no checkpoint, the damaged steps
    after it). Every step damaged: a UserError, and nothing is changed."""
    damaged = []
    for step in sorted(self.all_steps(), reverse=True):
      try:
        self.verify(step)
        return step, damaged
      except DamagedCheckpointError as e:
        damaged.append(e)
    if damaged:
      listed = "; ".join(f"step {e.step}: {e.detail}" for e in reversed(damaged))
      raise UserError(f"every checkpoint in {self.directory} is damaged ({listed}); nothing was changed: put back "
                      "intact copies of those step directories, or use a new --workdir")
    return None, []

  def set_aside(self, damaged: list[DamagedCheckpointError], resumed: int) -> None:
    """Moves damaged steps (newer than `resumed`) to checkpoints/damaged/<step>, out of the way of retention (they
    would take the place of intact steps among the latest kept) and of the saves that redo their step numbers."""
    if not damaged:
      return
    self._join()
    if jax.process_count() > 1:  # every process has read them before one moves them
      from jax.experimental import multihost_utils
      multihost_utils.sync_global_devices("bigmodel_jax:set_aside_damaged")
    moved, refused = [], ""
    for e in sorted(damaged, key=lambda e: e.step):
      target, n = self.directory / DAMAGED / str(e.step), 1
      while target.exists():  # the same step damaged again after an earlier resume
        n += 1
        target = self.directory / DAMAGED / f"{e.step}_{n}"
      if jax.process_index() == 0 and not refused:
        try:
          target.parent.mkdir(exist_ok=True)
          os.replace(self.directory / str(e.step), target)
        except OSError as error:
          refused = (f"checkpoint {self.directory / str(e.step)} is damaged ({e.detail}) and cannot be moved to "
                     f"{target} ({error.strerror}); move it away yourself to resume from step {resumed}")
      moved.append(f"{e.step} ({e.detail})")
    refused = distributed.chief_decides(refused)  # also the barrier after the moves
    if refused:
      raise UserError(refused)
    self._manager.reload()
    logging.warning("damaged checkpoint step%s %s: moved to %s, resuming from step %d, the newest intact one",
                    "s" if len(moved) > 1 else "", ", ".join(moved), self.directory / DAMAGED, resumed)

  def item_file(self, step: int, item: str) -> Path:
    """The file a JSON item (data, meta) of `step` is stored in."""
    return self.directory / str(step) / item / "metadata"

  def meta_values(self, key: str, steps=None) -> dict:
    """{step: its meta's `key`} for `steps` (default: every kept step); None: unreadable, or saved before that key
    was recorded."""
    out = {}
    for step in self.all_steps() if steps is None else steps:
      try:
        out[step] = json.loads(self.item_file(step, "meta").read_text()).get(key)
      except (OSError, ValueError, AttributeError):
        out[step] = None
    return out

  def restore(self, step: int, target) -> tuple:
    """-> (state, data_state, meta); `target` holds ShapeDtypeStructs with the *current* shardings."""
    self._join()
    if step not in self.all_steps():
      raise UserError(f"checkpoint step {step} not found in {self.directory}; available: {self.all_steps()}")
    self.verify(step)
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
        # what tensorstore's reads still in flight print as they finish lands in the capture (their "Event loop is
        # closed" callbacks are dropped by _drop_late_callbacks_on_closed_loops); all of it goes to the workdir's log
        _wait_until_quiet(captured)
        _restore_stderr(saved_stderr)
        log = self.directory.parent / "restore_error.log"
        with open(log, "a") as f:
          f.write(f"--- {time.strftime('%Y-%m-%d %H:%M:%S')} pid {os.getpid()}: restoring step {step}\n")
          captured.seek(0)
          f.write(captured.read().decode(errors="replace"))
          traceback.print_exception(e, file=f)
        mismatched = re.findall(r"^(\S+):$", str(e), re.M) if "structures do not match" in str(e) else []
        if mismatched and all(p.startswith("opt_state") for p in mismatched):  # the parameters' shapes were checked
          raise UserError(f"checkpoint {self.directory / str(step)} holds the state of another optimizer than the "
                          f"config builds ({mismatched[0]}); a run goes on only with the optimizer it trained with: "
                          "revert optimizer.name / optimizer.frozen / config.optimizers, or start a new --workdir "
                          f"from its weights with --config.init.workdir={self.directory.parent}") from None
        if not (self.directory / str(step)).is_dir():
          raise CheckpointGoneError(self.directory / str(step)) from None
        raise UserError(f"checkpoint {self.directory / str(step)} cannot be read ({_short(e)}; details in {log}); "
                        "move that step directory away to resume from an earlier one, or use a new --workdir") from None
      _restore_stderr(saved_stderr, captured)
    state = restored.state if legacy is None else restored.state.replace(opt_state={legacy: restored.state.opt_state})
    saved = getattr(state, "step", None)  # a train state: its own step counter (the data position is checked by train)
    if saved is not None and int(jax.device_get(saved)) != step:
      raise UserError(f"checkpoint {self.directory / str(step)}: its train state is at step "
                      f"{int(jax.device_get(saved))}, not {step}; put back the step's own files, or move that step "
                      "directory away to resume from an earlier one")
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
    """Until the save in flight is committed (with its digest)."""
    self._join()
    self._manager.wait_until_finished()

  def close(self) -> None:
    self.wait()
    if self._background is not None:
      self._background.shutdown()
    self._manager.close()


def _drop_late_callbacks_on_closed_loops() -> None:
  """A failed orbax save (a full disk, say) ends its asyncio loop while other tensorstore writes of the step are still
  in flight; as each finishes, tensorstore's callback into that closed loop raises "RuntimeError: Event loop is
  closed", which it reports through sys.unraisablehook -- a traceback per write, around the run's one error line.
  They say nothing the error does not: they are logged at debug verbosity only. Any other unraisable exception goes
  to the hook that was there before."""
  if getattr(sys.unraisablehook, "_bigmodel_jax", False):
    return
  previous = sys.unraisablehook

  def hook(unraisable):
    if (unraisable.object is None and isinstance(unraisable.exc_value, RuntimeError)
        and str(unraisable.exc_value) == "Event loop is closed"):
      logging.vlog(1, "a tensorstore callback found its asyncio loop closed (an orbax save or restore that failed)")
      return
    previous(unraisable)

  hook._bigmodel_jax = True
  sys.unraisablehook = hook


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


# A copy made on the device, in the device's order: it reads the arrays before a later step that was given them
# (donated) overwrites them, and returns at once (asynchronous dispatch); orbax reads the copy off the device in
# the background thread.
_copy = jax.jit(lambda tree: jax.tree.map(jnp.copy, tree))


def _fits_a_copy(state, headroom: float = 0.9) -> bool:
  """Whether every device holding `state` has room for a second copy of its part (by the memory statistics of
  backends that report them, GPUs and TPUs; the CPU's copy is in host memory, which the process has anyway): a run
  sized to fill its accelerators saves the way orbax alone does rather than running out of memory at a save."""
  leaves = jax.tree.leaves(state)
  if not leaves or all(d.platform == "cpu" for d in leaves[0].devices()):
    return True
  need = {}
  for x in leaves:
    for shard in getattr(x, "addressable_shards", ()):
      need[shard.device] = need.get(shard.device, 0) + shard.data.nbytes
  for device, nbytes in need.items():
    stats = device.memory_stats()
    if stats and stats.get("bytes_limit") and stats.get("bytes_in_use", 0) + nbytes > headroom * stats["bytes_limit"]:
      return False
  return True
