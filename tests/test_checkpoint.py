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
