"""Scale-out on 8 simulated CPU devices (conftest gives this process 8): data / FSDP / tensor / mixed meshes
match one device, parameters are really sharded, pmap == jit, gradient accumulation == the whole batch at
once, bf16 keeps float32 master weights, checkpoints restore onto other meshes, and bad layouts are one line.

Each test builds the real steps (train.make_stepper) for a tiny GPT on tiny Shakespeare or the MLP on digits,
on a mesh over a subset of the devices, and feeds both runs the same batches.
"""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from bigmodel_jax import parallel, train
from bigmodel_jax.checkpoint import Checkpointer
from bigmodel_jax.data import load_dataset, pipeline
from bigmodel_jax.errors import UserError
from bigmodel_jax.tasks import get_task
from conftest import TINY_SHAKESPEARE, load_config

needs_tiny = pytest.mark.skipif(not TINY_SHAKESPEARE.is_file(), reason="no local copy of tiny Shakespeare")
STEPS = 3


def gpt_config():
  c = load_config("shakespeare_char_gpt", "smoke")  # 2 layers, 32 dims, block 32, batch 8
  c.data.path = str(TINY_SHAKESPEARE)
  c.model.num_heads = 8  # so that tensor=8 divides the heads (head size 4)
  return c


def digits_config():
  c = load_config("digits_mlp", "smoke")
  c.model.dropout_rate = 0.0
  return c


_DATASETS = {}


def dataset_for(config):
  key = (config.data.name, config.data.path)
  if key not in _DATASETS:
    _DATASETS[key] = load_dataset(config.data, None, create_tokenizer=True)
  return _DATASETS[key]


def stepper_for(config, devices: int, **mesh):
  dataset = dataset_for(config)
  mesh_config = ml_collections.ConfigDict({"data": -1, "fsdp": 1, "tensor": 1, **mesh})
  return train.make_steps(config, dataset, get_task(config, dataset),
                            parallel.make_mesh(mesh_config, devices=jax.devices()[:devices]), total_steps=100)


def train_steps(config, stepper, steps=STEPS, state=None):
  """Runs `steps` train steps on the run's first batches -> (losses, plain final state)."""
  batches = iter(pipeline.train_dataset(dataset_for(config), config.data, seed=config.seed, num_steps=steps))
  state = stepper.layout.place(stepper.init() if state is None else state)
  losses = []
  for _ in range(steps):
    state, metrics = stepper.train_step(state, stepper.layout.train_batch(next(batches)))
    losses.append(float(metrics["loss"]))
  return losses, stepper.layout.plain(state)


def close(a, b, rtol=2e-5):
  np.testing.assert_allclose(a, b, rtol=rtol, atol=rtol)


@pytest.fixture(scope="module")
def gpt_reference():
  config = gpt_config()
  return train_steps(config, stepper_for(config, 1))


def param(state, name):
  """A parameter array by its dotted name, e.g. 'trunk.blocks.0.attn.qkv.kernel'."""
  node = state.params
  for part in name.split("."):
    node = node[int(part) if part.isdigit() else part]
  return node[...] if hasattr(node, "get_value") else node


QKV, FC1, EMBED = "trunk.blocks.0.attn.qkv.kernel", "trunk.blocks.0.mlp.fc1.kernel", "trunk.embed.embedding"


@needs_tiny
@pytest.mark.parametrize("mesh, qkv_shard, fc1_shard", [
    ({"data": 8}, (32, 3, 8, 4), (32, 128)),
    ({"fsdp": 8}, (4, 3, 8, 4), (4, 128)),
    ({"tensor": 8}, (32, 3, 1, 4), (32, 16)),
    ({"data": 2, "fsdp": 2, "tensor": 2}, (16, 3, 4, 4), (16, 64)),
])
def test_meshes_match_one_device_and_shard_parameters(gpt_reference, mesh, qkv_shard, fc1_shard):
  config = gpt_config()
  stepper = stepper_for(config, 8, **mesh)
  losses, state = train_steps(config, stepper)
  close(losses, gpt_reference[0])
  qkv, fc1 = param(state, QKV), param(state, FC1)
  assert qkv.shape == (32, 3, 8, 4) and fc1.shape == (32, 128)
  # really sharded: every device holds a shard of the expected shape, not a copy of the whole
  assert {s.data.shape for s in qkv.addressable_shards} == {qkv_shard}
  assert {s.data.shape for s in fc1.addressable_shards} == {fc1_shard}
  assert len(qkv.addressable_shards) == 8
  # Adam's moments live where their parameter does
  mu = state.opt_state["default"][-1][0].mu  # chain(clip, adamw) -> adamw's ScaleByAdamState
  assert param(type("S", (), {"params": mu}), QKV).sharding == qkv.sharding
  close(np.asarray(qkv), np.asarray(param(gpt_reference[1], QKV)), rtol=1e-3)


@needs_tiny
def test_sharding_follows_the_rules_table():
  config = gpt_config()
  stepper = stepper_for(config, 8, data=2, fsdp=2, tensor=2)
  specs = stepper.layout.param_partition
  assert specs[QKV] == jax.sharding.PartitionSpec("fsdp", None, "tensor", None)  # (embed, -, heads, head_dim)
  assert specs["trunk.blocks.0.attn.out.kernel"] == jax.sharding.PartitionSpec("tensor", None, "fsdp")
  assert specs[FC1] == jax.sharding.PartitionSpec("fsdp", "tensor")
  assert specs["trunk.blocks.0.mlp.fc2.kernel"] == jax.sharding.PartitionSpec("tensor", "fsdp")
  assert specs[EMBED] == jax.sharding.PartitionSpec(None, "fsdp")  # vocab replicated by default (67 ids)
  assert stepper.layout.batch_sharding.spec == jax.sharding.PartitionSpec(("data", "fsdp"))
  lines = stepper.describe()
  assert lines[0].startswith("mesh data=2 x fsdp=2 x tensor=2 over 8 devices")
  assert any("trunk.blocks.*.attn.qkv.kernel: 2 x [32, 3, 8, 4] P('fsdp', None, 'tensor', None) -> [16, 3, 4, 4]"
             in line for line in lines)
  # a rules override moves the embedding's vocabulary onto the tensor axis: 67 ids do not divide by 2
  config.parallel.rules.vocab = "tensor"
  with pytest.raises(UserError, match=r"config.mesh.tensor: 2 does not divide dimension 0 "
                                      r"\('vocab', size 67\) of parameter trunk.embed.embedding"):
    stepper_for(config, 8, data=2, fsdp=2, tensor=2)


def test_fsdp_shards_unannotated_models_and_per_device_bytes():
  config = digits_config()
  one, fsdp = stepper_for(config, 1), stepper_for(config, 8, fsdp=8)
  assert fsdp.layout.param_partition["hidden.0.kernel"] == jax.sharding.PartitionSpec(None, "fsdp")  # [64, 128]
  total = parallel.total_bytes(one.abstract_state.params)
  assert parallel.per_device_bytes(one.abstract_state.params, one.layout.state_sharding.params) == total
  sharded = parallel.per_device_bytes(fsdp.abstract_state.params, fsdp.layout.state_sharding.params)
  assert sharded < total / 4  # the 10-unit head bias cannot split 8 ways and stays whole
  losses_one, _ = train_steps(config, one)
  losses_fsdp, _ = train_steps(config, fsdp)
  close(losses_fsdp, losses_one)


def test_pmap_matches_jit():
  config = digits_config()
  jit_losses, jit_state = train_steps(config, stepper_for(config, 8))
  config.parallel.strategy = "pmap"
  stepper = stepper_for(config, 8)
  placed = stepper.layout.place(stepper.init())
  assert placed.params["head"]["kernel"][...].shape == (8, 128, 10)  # one replica per device
  pmap_losses, pmap_state = train_steps(config, stepper)
  close(pmap_losses, jit_losses, rtol=1e-5)
  for a, b in zip(jax.tree.leaves(pmap_state.params), jax.tree.leaves(jit_state.params)):
    close(np.asarray(a), np.asarray(b), rtol=1e-4)


@pytest.mark.parametrize("devices, strategy", [(1, "jit"), (8, "jit"), (8, "pmap")])
def test_grad_accumulation_equals_the_whole_batch(devices, strategy):
  config = digits_config()
  config.optimizer.name = "sgd"  # compare parameters after SGD: Adam would amplify reduction-order noise
  config.optimizer.learning_rate = 0.1
  config.parallel.strategy = strategy
  whole_losses, whole = train_steps(config, stepper_for(config, devices))
  config.train.grad_accum_steps = 4 if devices == 1 else 2  # 32 rows: 4 x 8, or 2 x 16 over 8 devices
  accum_losses, accum = train_steps(config, stepper_for(config, devices))
  close(accum_losses, whole_losses, rtol=1e-5)
  for a, b in zip(jax.tree.leaves(accum.params), jax.tree.leaves(whole.params)):
    close(np.asarray(a), np.asarray(b), rtol=1e-5)


@pytest.mark.parametrize("devices, strategy, accum", [(1, "jit", 1), (8, "jit", 1), (8, "pmap", 1), (8, "jit", 2)])
def test_several_steps_per_call_are_the_same_steps(devices, strategy, accum):
  """train_steps (a lax.scan over k stacked batches) computes what k train_step calls do, on every layout; the
  metrics come back stacked, one row per step."""
  config = digits_config()
  config.model.dropout_rate = 0.1  # per-step keys: the scan must fold in each step's own
  config.parallel.strategy, config.train.grad_accum_steps = strategy, accum
  stepper = stepper_for(config, devices)
  one_losses, one = train_steps(config, stepper, steps=4)
  batches = iter(pipeline.train_dataset(dataset_for(config), config.data, seed=config.seed, num_steps=4))
  state, metrics = stepper.train_steps(stepper.layout.place(stepper.init()),
                                       stepper.layout.train_batches([next(batches) for _ in range(4)]))
  assert metrics["loss"].shape == (4,)
  close(np.asarray(metrics["loss"]), one_losses, rtol=1e-6)
  state = stepper.layout.plain(state)
  assert int(state.step) == 4
  for a, b in zip(jax.tree.leaves(state.params), jax.tree.leaves(one.params)):
    close(np.asarray(a), np.asarray(b), rtol=1e-6)


@needs_tiny
def test_bfloat16_compute_keeps_float32_master_weights(gpt_reference):
  config = gpt_config()
  config.train.dtype = "bfloat16"
  config.optimizer.mu_dtype = "bfloat16"
  losses, state = train_steps(config, stepper_for(config, 1))
  assert {x.dtype for x in jax.tree.leaves(state.params)} == {jnp.dtype(jnp.float32)}
  adam = state.opt_state["default"][-1][0]
  assert {x.dtype for x in jax.tree.leaves(adam.mu)} == {jnp.dtype(jnp.bfloat16)}
  assert {x.dtype for x in jax.tree.leaves(adam.nu)} == {jnp.dtype(jnp.float32)}
  close(losses, gpt_reference[0], rtol=2e-2)  # bf16 rounding, same model and data
  assert losses != gpt_reference[0]  # it did compute in bf16


@pytest.mark.parametrize("save_on, restore_on", [
    ((8, {"data": 8}), (1, {})),
    ((1, {}), (4, {"fsdp": 4})),
    ((8, {"data": 8}), (8, {"data": 2, "fsdp": 4})),
])
def test_checkpoint_restores_onto_another_mesh(tmp_path, save_on, restore_on):
  config = digits_config()
  saver = stepper_for(config, save_on[0], **save_on[1])
  _, state = train_steps(config, saver, steps=2)
  checkpointer = Checkpointer(tmp_path / "checkpoints", async_save=False)
  checkpointer.save(2, state, {}, {"step": 2})
  checkpointer.close()
  loader = stepper_for(config, restore_on[0], **restore_on[1])
  restored, _, _ = Checkpointer(tmp_path / "checkpoints").restore(2, loader.layout.restore_target)
  for a, b, want in zip(jax.tree.leaves(restored), jax.tree.leaves(state), jax.tree.leaves(loader.layout.state_sharding)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert a.sharding == want  # the new mesh's layout, not the saved one
    assert len(a.sharding.device_set) == restore_on[0]
  # and training continues on the new mesh
  losses, _ = train_steps(config, loader, steps=1, state=restored)
  assert np.isfinite(losses[0])


def mesh(**sizes):
  return ml_collections.ConfigDict({"data": -1, "fsdp": 1, "tensor": 1, **sizes})


@pytest.mark.parametrize("sizes, message", [
    ({"data": 3}, r"config.mesh: data=3 x fsdp=1 x tensor=1 = 3 devices, but this run has 8; the sizes must "
                  r"multiply to 8"),
    ({"data": 3, "fsdp": -1}, r"config.mesh: data=3 x fsdp=-1 x tensor=1 needs a multiple of 3 devices"),
    ({"fsdp": -1}, r"config.mesh: only one axis may be -1"),
    ({"tensor": 0}, r"config.mesh.tensor: must be an integer >= 1, or -1"),
])
def test_bad_mesh_sizes(sizes, message):
  with pytest.raises(UserError, match=message):
    parallel.make_mesh(mesh(**sizes))


def test_bad_rules():
  with pytest.raises(UserError, match=r"config.parallel.rules.embed: 'fspd' is not a mesh axis; valid: data, fsdp, "
                                      r"tensor"):
    parallel.make_rules({**parallel.RULES, "embed": "fspd"})
  with pytest.raises(UserError, match=r"config.parallel.rules.hidden: not a logical axis"):
    parallel.make_rules({**parallel.RULES, "hidden": "tensor"})
  with pytest.raises(UserError, match=r"config.parallel.rules.mlp: missing"):
    parallel.make_rules({k: v for k, v in parallel.RULES.items() if k != "mlp"})


def test_batch_must_split_over_the_data_axes():
  rules = parallel.make_rules()
  m = parallel.make_mesh(mesh(data=2, fsdp=2, tensor=2))
  parallel.check_batch(m, rules, 12, "data.batch_size")  # 4 batch shards: the tensor axis does not split it
  with pytest.raises(UserError, match=r"config.data.batch_size: 10 is not divisible by the 4 batch shards \(mesh "
                                      r"data=2 x fsdp=2\); use a multiple of 4"):
    parallel.check_batch(m, rules, 10, "data.batch_size")
  with pytest.raises(UserError, match=r"config.data.batch_size: 12 is not divisible by the 8 batch shards per "
                                      r"microbatch \(config.train.grad_accum_steps=2\)"):
    parallel.check_batch(m, rules, 12, "data.batch_size", grad_accum_steps=2)


@needs_tiny
def test_tensor_axis_must_divide_the_heads():
  config = gpt_config()
  config.model.num_heads = 2
  with pytest.raises(UserError, match=r"config.mesh.tensor: 8 does not divide dimension \d \('heads', size 2\) of "
                                      r"parameter trunk.blocks.0.attn.(qkv|out).kernel .*rules.heads=''"):
    stepper_for(config, 8, tensor=8)


def test_seeds_2_to_the_32_apart_initialise_other_weights():
  """Without x64, jax.random.PRNGKey keeps a seed's low 32 bits: config.seed 2**32 + 3 trained seed 3's model."""
  initial = []
  for seed in (3, 2 ** 32 + 3):
    config = digits_config()
    config.seed = seed
    initial.append(np.concatenate([np.ravel(x) for x in jax.tree.leaves(stepper_for(config, 1).init().params)]))
  assert not np.array_equal(*initial)


def test_pmap_needs_a_pure_data_mesh():
  config = digits_config()
  config.parallel.strategy = "pmap"
  with pytest.raises(UserError, match=r"config.parallel.strategy: 'pmap' is pure data parallel, but the mesh has "
                                      r"fsdp=8"):
    stepper_for(config, 8, fsdp=8)
  config.parallel.rules = dict(parallel.RULES, batch="")  # pmap splits it anyway: batch 32 over 3 devices crashed
  with pytest.raises(UserError, match=r"config.parallel.rules.batch: 'pmap' splits the batch over the data axis, but "
                                      r"the rule is ''; set it to 'data,fsdp'"):
    stepper_for(config, 3)


@needs_tiny
def test_scanned_rematerialised_gpt_on_a_mixed_mesh_matches_one_device(gpt_reference):
  config = gpt_config()
  config.model.scan_layers, config.model.remat = True, "full"  # same initial values, stacked; same numbers
  stepper = stepper_for(config, 8, data=2, fsdp=2, tensor=2)
  name = "trunk.blocks.attn.qkv.kernel"
  assert stepper.layout.param_partition[name] == jax.sharding.PartitionSpec(None, "fsdp", None, "tensor", None)
  losses, state = train_steps(config, stepper)
  close(losses, gpt_reference[0])
  assert {s.data.shape for s in param(state, name).addressable_shards} == {(2, 16, 3, 4, 4)}


def first_batch(config):
  return next(iter(pipeline.train_dataset(dataset_for(config), config.data, seed=config.seed, num_steps=1)))


@pytest.mark.parametrize("strategy, devices, k", [("jit", 1, 4), ("pmap", 8, 1), ("pmap", 8, 2)])
def test_padding_rows_weigh_nothing_however_the_batch_is_split(strategy, devices, k):
  """A last, padded batch (drop_remainder=False): microbatches and devices hold unequal numbers of real rows,
  and the update is still the whole batch's masked mean."""
  config = digits_config()
  config.optimizer.name, config.optimizer.learning_rate = "sgd", 0.1
  batch = first_batch(config)
  batch["mask"] = batch["mask"].copy()
  batch["mask"][-3:] = 0.0  # rows 29-31: uneven over 4 strided microbatches, and all on the last devices

  def one_step(stepper):
    state, metrics = stepper.train_step(stepper.layout.place(stepper.init()), stepper.layout.train_batch(batch))
    return float(metrics["loss"]), stepper.layout.plain(state)

  loss, reference = one_step(stepper_for(config, 1))
  config.parallel.strategy, config.train.grad_accum_steps = strategy, k
  split_loss, split = one_step(stepper_for(config, devices))
  close(split_loss, loss, rtol=1e-5)
  for a, b in zip(jax.tree.leaves(split.params), jax.tree.leaves(reference.params)):
    close(np.asarray(a), np.asarray(b), rtol=1e-5)


@needs_tiny
def test_pmap_keeps_non_float_model_state():
  """The LSTM carries PRNG keys and counters as model state: pmap averages only float state."""
  config = load_config("shakespeare_lstm", "smoke")
  config.data.path = str(TINY_SHAKESPEARE)
  config.parallel.strategy = "pmap"
  losses, state = train_steps(config, stepper_for(config, 2))
  assert all(np.isfinite(losses))
