"""The step interface's promises: weight decay by parameter role in every layout, randomness that depends on
(seed, step, example) and not on the layout, models found by file without an import list, and a bug inside a
model's own code named with its message (and its traceback on request)."""

import uuid

import jax
import numpy as np
import pytest

from bigmodel_jax import optim, train
from bigmodel_jax.optim import decays
from conftest import ROOT, TINY_SHAKESPEARE, error_lines, load_config
from test_parallel import close, gpt_config, stepper_for, train_steps

needs_tiny = pytest.mark.skipif(not TINY_SHAKESPEARE.is_file(), reason="no local copy of tiny Shakespeare")


def decayed_groups(stepper):
  """{parameter path with layer indices and the stacked layer axis folded: decayed?}."""
  mask = optim.decay_mask(stepper.abstract_state.params)
  out = {}
  for path, value in jax.tree_util.tree_leaves_with_path(mask):
    name = optim._name(path)
    out[".".join(p for p in name.split(".") if not p.isdigit())] = value
  return out


def test_decay_roles():
  assert decays("trunk.blocks.0.attn.qkv.kernel") and decays("convs.1.kernel")
  assert not decays("trunk.blocks.attn.qkv.bias") and not decays("trunk.ln_f.scale") and not decays("head.bias")
  assert not decays("trunk.embed.embedding") and decays("trunk.embed.embedding", decay_embeddings=True)
  assert decays("trunk.type_embed", decay_embeddings=True) and not decays("trunk.type_embed")  # BERT's token types
  assert not decays("bn1.mean")


@needs_tiny
def test_scan_layers_decays_the_same_parameters_and_trains_the_same():
  losses = {}
  for scan in (False, True):
    config = gpt_config()
    config.model.use_bias = True  # 3-D qkv biases: decayed by the old ndim rule
    config.model.scan_layers = scan
    config.optimizer.name, config.optimizer.weight_decay, config.optimizer.learning_rate = "adamw", 0.5, 1e-2
    stepper = stepper_for(config, 1)
    groups = decayed_groups(stepper)
    assert groups["trunk.blocks.attn.qkv.kernel"] and groups["trunk.blocks.mlp.fc1.kernel"]
    assert not groups["trunk.blocks.attn.qkv.bias"] and not groups["trunk.blocks.ln1.scale"]
    assert not groups["trunk.blocks.ln1.bias"] and not groups["trunk.embed.embedding"]
    losses[scan] = train_steps(config, stepper, steps=4)[0]
    if scan:
      assert groups == unscanned
    unscanned = groups
  close(losses[True], losses[False], rtol=1e-5)


def dropout_config():
  c = load_config("digits_mlp", "smoke")
  c.model.dropout_rate = 0.3
  return c


def test_dropout_is_the_same_on_every_layout_and_microbatch_split():
  """digits_mlp with dropout: one device, 8 devices under jit, pmap, and 4 microbatches give the same numbers."""
  reference, ref_state = train_steps(dropout_config(), stepper_for(dropout_config(), 1), steps=4)
  variants = []
  for strategy, devices, k in (("jit", 8, 1), ("pmap", 8, 1), ("jit", 1, 4), ("pmap", 8, 2)):
    config = dropout_config()
    config.parallel.strategy, config.train.grad_accum_steps = strategy, k
    variants.append(train_steps(config, stepper_for(config, devices), steps=4))
  for losses, state in variants:
    close(losses, reference, rtol=1e-5)
    for a, b in zip(jax.tree.leaves(state.params), jax.tree.leaves(ref_state.params)):
      close(np.asarray(a), np.asarray(b), rtol=1e-4)
  # and dropout really acts: without it the losses differ
  config = dropout_config()
  config.model.dropout_rate = 0.0
  assert not np.allclose(train_steps(config, stepper_for(config, 1), steps=4)[0], reference, rtol=1e-3)


MODEL_SOURCE = '''
from flax import nnx
from bigmodel_jax.models import MODELS


@MODELS.register("{name}")
class Probe(nnx.Module):
  def __init__(self, *, input_shape, num_outputs, rngs, width: int = 8, fail: bool = False,
               fail_in_training: bool = False):
    self.fail, self.fail_in_training = fail, fail_in_training
    self.dense = nnx.Linear(64, width, rngs=rngs)
    self.head = nnx.Linear(width, num_outputs, rngs=rngs)

  def __call__(self, x, *, train, rngs=None):
    if self.fail or (train and self.fail_in_training):
      raise RuntimeError("probe model exploded on purpose")
    return self.head(nnx.relu(self.dense(x.reshape(x.shape[0], -1))))
'''

CONFIG_SOURCE = '''
from bigmodel_jax.config import base_config, model_config


def get_config(arg=""):
  c = base_config()
  c.data.name = "digits"
  c.model = model_config("{name}")
  c.train.num_steps = 20
  c.train.log_every = 10
  return c
'''


@pytest.fixture
def probe_model(tmp_path):
  """A model file dropped into bigmodel_jax/models/ (removed afterwards) and a config naming it."""
  name = f"probe_{uuid.uuid4().hex[:8]}"
  path = ROOT / "bigmodel_jax" / "models" / f"{name}.py"
  path.write_text(MODEL_SOURCE.replace("{name}", name))
  config = tmp_path / "probe.py"
  config.write_text(CONFIG_SOURCE.replace("{name}", name))
  try:
    yield name, config
  finally:
    path.unlink()


def test_a_new_model_file_is_found_by_name(cli, tmp_path, probe_model):
  name, config = probe_model
  proc = cli(f"--config={config}", f"--workdir={tmp_path / 'work'}")
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert (tmp_path / "work" / "final_metrics.json").is_file()


def test_an_exception_in_a_models_own_code_shows_its_message(cli, tmp_path, probe_model):
  _, config = probe_model
  args = (f"--config={config}", "--config.model.fail=true", f"--workdir={tmp_path / 'work'}")
  proc = cli(*args)
  assert proc.returncode == 2
  lines = error_lines(proc.stderr)
  assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
  assert "probe model exploded on purpose" in lines[0] and "RuntimeError" in lines[0]
  assert "probe_" in lines[0] and "in __call__" in lines[0]  # where: the model's file and function
  assert "does not fit" not in lines[0]
  verbose = cli(*args, env={"BIGMODEL_JAX_TRACEBACK": "1"})
  assert verbose.returncode == 2 and "Traceback (most recent call last)" in verbose.stderr
  assert 'raise RuntimeError("probe model exploded on purpose")' in verbose.stderr
  assert cli(*args, "--verbosity=1").stderr.count("Traceback (most recent call last)") >= 1


def test_an_exception_only_in_training_mode_is_one_line_and_writes_nothing(cli, tmp_path, probe_model):
  _, config = probe_model
  workdir = tmp_path / "work"
  proc = cli(f"--config={config}", "--config.model.fail_in_training=true", f"--workdir={workdir}")
  assert proc.returncode == 2
  lines = error_lines(proc.stderr)
  assert len(lines) == 1 and "probe model exploded on purpose" in lines[0], proc.stderr[-2000:]
  assert not (workdir / "config.json").exists() and not (workdir / "checkpoints").exists()
