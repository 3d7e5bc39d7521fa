"""Checkpoint retention: the latest K plus the latest one saved as best, also across restarts."""

import jax
import jax.numpy as jnp
import numpy as np

from bigmodel_jax.checkpoint import Checkpointer


def save(ckpt, step, best=False):
  ckpt.save(step, {"w": jnp.full((2,), step, jnp.float32)}, {"next_index": step}, {"step": step}, best)
  ckpt.wait()


def test_latest_k_plus_best_survive_a_restart(tmp_path):
  ckpt = Checkpointer(tmp_path, keep=2, keep_best=True)
  save(ckpt, 10, best=True)
  save(ckpt, 20, best=True)  # the best
  save(ckpt, 30)
  save(ckpt, 40)
  assert ckpt.all_steps() == [20, 30, 40]
  ckpt.close()
  ckpt = Checkpointer(tmp_path, keep=2, keep_best=True)  # a resumed run
  save(ckpt, 50)
  save(ckpt, 60)
  assert ckpt.all_steps() == [20, 50, 60]
  state, data, meta = ckpt.restore(20, {"w": jnp.zeros((2,), jnp.float32)})
  assert float(state["w"][0]) == 20 and data == {"next_index": 20} and meta == {"step": 20}
  ckpt.close()


def test_a_later_best_replaces_the_earlier_one(tmp_path):
  ckpt = Checkpointer(tmp_path, keep=1, keep_best=True)
  for step, best in [(1, True), (2, True), (3, False), (4, False)]:
    save(ckpt, step, best)
  assert ckpt.all_steps() == [2, 4]
  save(ckpt, 5, best=True)
  assert ckpt.all_steps() == [5]
  ckpt.close()


def test_unreadable_checkpoint_is_a_user_error_and_stderr_is_left_alone(tmp_path, capfd):
  import os
  import sys

  import numpy as np
  import pytest

  from bigmodel_jax.errors import DamagedCheckpointError, UserError
  ckpt = Checkpointer(tmp_path / "checkpoints", keep=2)
  save(ckpt, 10)
  for path in (tmp_path / "checkpoints" / "10" / "state" / "d").iterdir():
    path.write_bytes(np.random.default_rng(0).bytes(path.stat().st_size))
  with pytest.raises(DamagedCheckpointError, match=r"10 is damaged: state/d/\w+ differs from its digest.json"):
    ckpt.restore(10, {"w": jnp.zeros((2,), jnp.float32)})
  (tmp_path / "checkpoints" / "10" / "digest.json").unlink()  # as a step written before digests: orbax's own error
  with pytest.raises(UserError, match="cannot be read"):
    ckpt.restore(10, {"w": jnp.zeros((2,), jnp.float32)})
  ckpt.close()
  assert (tmp_path / "checkpoints" / "10").is_dir()  # nothing deleted
  assert "restoring step 10" in (tmp_path / "restore_error.log").read_text()
  capfd.readouterr()
  print("still here", file=sys.stderr, flush=True)
  os.write(2, b"fd 2 too\n")
  err = capfd.readouterr().err
  assert "still here" in err and "fd 2 too" in err


def test_a_checkpoint_from_before_named_optimizers_restores(tmp_path):
  """Workdirs written when the train state held one unnamed optimizer state still resume and evaluate."""
  from conftest import load_config
  from test_parallel import stepper_for, train_steps
  config = load_config("digits_mlp", "smoke")
  steps = stepper_for(config, 1)
  _, state = train_steps(config, steps, steps=2)
  old_layout = state.replace(opt_state=state.opt_state["default"])
  saver = Checkpointer(tmp_path / "checkpoints", async_save=False)
  saver.save(2, old_layout, {}, {"step": 2})
  saver.close()
  restored, _, _ = Checkpointer(tmp_path / "checkpoints").restore(2, steps.layout.restore_target)
  assert list(restored.opt_state) == ["default"]
  for a, b in zip(jax.tree.leaves(restored), jax.tree.leaves(state)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_saves_in_the_background_hold_their_own_step_though_the_state_is_donated_after(tmp_path):
  """save() returns before the state is written; the loop then donates the arrays to the next step, which
  overwrites them in place. Each step on disk must still hold the values it was saved with."""
  step_fn = jax.jit(lambda s: {"w": s["w"] + 1.0}, donate_argnums=0)
  ckpt = Checkpointer(tmp_path, keep=10)
  state = {"w": jnp.zeros((256, 256), jnp.float32)}
  for step in range(1, 6):
    state = step_fn(state)  # w == step
    ckpt.save(step, state, {"next_index": step}, {"step": step})
    state = step_fn(step_fn(state))  # donated twice before the save is written
    state = {"w": state["w"] - 2.0}
  ckpt.wait()
  for step in range(1, 6):
    restored, _, _ = ckpt.restore(step, {"w": jax.ShapeDtypeStruct((256, 256), jnp.float32)})
    assert np.all(np.asarray(restored["w"]) == step), step
  ckpt.close()



def no_space_for_the_digest_of(step: int, monkeypatch):
  """Writing `step`'s digest (orbax's post-finalization hook, just before it commits the step) fails as on a full
  disk."""
  import errno
  from bigmodel_jax import checkpoint
  real = checkpoint.integrity.write

  def write(path):
    if path.name.split(".")[0] == str(step):
      raise OSError(errno.ENOSPC, "No space left on device", str(path))
    return real(path)

  monkeypatch.setattr(checkpoint.integrity, "write", write)

def test_a_failed_save_is_raised_once_at_the_next_save_and_close_then_closes(tmp_path, monkeypatch):
  """A save's error (here: no space for its digest) surfaces at the next save, as with orbax alone -- not one
  interval later, and not a second time at close()."""
  import errno
  no_space_for_the_digest_of(2, monkeypatch)
  ckpt = Checkpointer(tmp_path, keep=10)
  value = lambda step: {"w": jnp.full((4,), step, jnp.float32)}
  ckpt.save(1, value(1), {"next_index": 1}, {"step": 1})
  ckpt.save(2, value(2), {"next_index": 2}, {"step": 2})
  raised = None
  try:
    ckpt.save(3, value(3), {"next_index": 3}, {"step": 3})
  except OSError as e:
    raised = e
  assert raised is not None and raised.errno == errno.ENOSPC
  ckpt.close()  # does not raise it again
  assert ckpt.all_steps() == [1]


def test_a_run_whose_save_fails_releases_its_workdir(tmp_path, monkeypatch):
  """The training's error propagates, and the writers and the workdir's lock are closed all the same (a notebook
  can fix the disk and train again in the same process)."""
  import errno
  from conftest import load_config
  from bigmodel_jax import train
  from bigmodel_jax.workdir import lock_workdir
  no_space_for_the_digest_of(40, monkeypatch)
  config = load_config("digits_mlp", "smoke")
  config.train.num_steps, config.train.checkpoint_every, config.train.progress_bar = 100, 20, False
  workdir = tmp_path / "run"
  try:
    train.train_and_evaluate(config, workdir)
    raised = None
  except OSError as e:
    raised = e
  assert raised is not None and raised.errno == errno.ENOSPC
  assert sorted(p.name for p in (workdir / "checkpoints").iterdir() if p.name.isdigit()) == ["20"]
  lock_workdir(workdir).close()  # free


_CLOSED_LOOP = '''
import asyncio, sys, time
import numpy as np, tensorstore as ts
if sys.argv[2] == "hook":
  from bigmodel_jax.checkpoint import _drop_late_callbacks_on_closed_loops
  _drop_late_callbacks_on_closed_loops()
array = ts.open({"driver": "zarr", "kvstore": {"driver": "file", "path": sys.argv[1]}}, create=True,
                delete_existing=True, dtype=ts.float32, shape=[4000, 4000]).result()
data = np.random.rand(4000, 4000).astype(np.float32)
async def write(part):
  await part
async def start():  # four writes awaited on the loop, which closes while they are in flight (as a failed save's)
  for i in range(4):
    asyncio.ensure_future(write(array[i * 1000:(i + 1) * 1000].write(data[i * 1000:(i + 1) * 1000])))
  await asyncio.sleep(0)
loop = asyncio.new_event_loop()
loop.run_until_complete(start())
loop.close()
time.sleep(3)  # the writes finish and call back into the closed loop
'''


def test_tensorstore_callbacks_into_a_closed_loop_print_nothing_once_a_checkpointer_exists(tmp_path):
  """What a failed save leaves behind (tensorstore writes finishing after orbax's loop closed) reaches
  sys.unraisablehook as "Event loop is closed": a traceback each without the checkpointer's hook, nothing with it."""
  import subprocess
  import sys
  runs = {hook: subprocess.run([sys.executable, "-c", _CLOSED_LOOP, str(tmp_path / hook), hook],
                               capture_output=True, text=True, timeout=120) for hook in ("none", "hook")}
  assert runs["none"].stderr.count("RuntimeError: Event loop is closed") >= 1  # the case is real here
  assert "Event loop is closed" not in runs["hook"].stderr and "Traceback" not in runs["hook"].stderr


def test_a_step_deleted_while_the_checkpoints_open_is_read_again_not_called_damaged(tmp_path, monkeypatch):
  """An eval beside a training: its retention deletes a step while orbax reads every step's metadata on open."""
  import errno

  import pytest

  from bigmodel_jax import checkpoint
  from bigmodel_jax.errors import UserError
  ckpt = Checkpointer(tmp_path, keep=2)
  for step in (10, 20):
    save(ckpt, step)
  ckpt.close()
  real, calls = checkpoint.ocp.CheckpointManager, []

  def racing(directory, *args, vanish=1, **kwargs):  # the first `vanish` opens find step 10 gone mid-read
    calls.append(directory)
    if len(calls) <= vanish:
      raise FileNotFoundError(errno.ENOENT, "No such file or directory", str(tmp_path / "10"))
    return real(directory, *args, **kwargs)

  monkeypatch.setattr(checkpoint.ocp, "CheckpointManager", racing)
  ckpt = Checkpointer(tmp_path, keep=2)
  assert ckpt.all_steps() == [10, 20] and len(calls) == 2
  ckpt.close()
  monkeypatch.setattr(checkpoint.ocp, "CheckpointManager", lambda *a, **k: racing(*a, vanish=99, **k))
  with pytest.raises(UserError, match="changed while it was being read.*run again") as e:
    Checkpointer(tmp_path, keep=2)
  assert "move it away" not in str(e.value)


def test_an_eval_beside_a_training_with_keep_1_reads_the_new_latest_step(tmp_path):
  """The training's retention (keep=1) deletes the latest step between the eval's listing and its read: the eval
  takes the newest step then (was: 'disappeared while it was being read ... run again'), a bounded number of times."""
  import types

  import pytest

  from bigmodel_jax import evaluate
  from bigmodel_jax.errors import UserError
  trainer = Checkpointer(tmp_path, keep=1, async_save=False)
  save(trainer, 10)
  reader = Checkpointer(tmp_path, keep=1)  # the eval's view: step 10, listed
  target = {"w": jnp.zeros((2,), jnp.float32)}
  run = types.SimpleNamespace(checkpointer=reader, restore=lambda step: reader.restore(step, target))
  real_restore = reader.restore

  def racing(step, target, saves=[20]):  # the training commits its next step (deleting this one) as it is read
    if saves:
      save(trainer, saves.pop(0))
    return real_restore(step, target)

  reader.restore = racing
  step, state = evaluate.restore_for_eval(run, None, check_config=False)
  assert step == 20 and float(state["w"][0]) == 20
  reader.restore = lambda step, target: racing(step, target, saves=[step + 10])  # the training outruns every read
  with pytest.raises(UserError, match=r"checkpoint .*disappeared while it was being read"):
    evaluate.restore_for_eval(run, None, check_config=False)
  with pytest.raises(UserError, match=r"disappeared"):  # a step asked for by --checkpoint_step is not swapped
    reader.reload()
    evaluate.restore_for_eval(run, reader.latest_step(), check_config=False)
  trainer.close()
  reader.close()
