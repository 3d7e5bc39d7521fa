"""ResNet (BatchNorm) and ViT (the Transformer trunk on patches): shapes and parameter counts, one-line errors for
bad fields (in-process and through the CLI), running averages in eval, the same batch statistics on every layout,
and a ViT that learns digits with scanned layers matching looped ones.

Shapes are checked abstractly (nnx.eval_shape); everything that runs uses the real compiled steps
(train.make_steps) on scikit-learn's 8x8 digits with a ResNet-8 of width 4 or a 2-layer ViT of 32 dims.
"""

import jax
import numpy as np
import pytest
from flax import nnx

from bigmodel_jax.config import model_config
from bigmodel_jax.errors import UserError
from bigmodel_jax.models import build_model
from conftest import error_lines, load_config
from bigmodel_jax.data import pipeline
from test_parallel import dataset_for, stepper_for, train_steps

STEPS = 3
# float32 has ~1e-7 relative precision; a depth-8 net's activations and its batch statistics pass ~10 reductions
# whose order changes with the layout, and 3 Adam steps amplify that a little: 1e-4 leaves two orders of margin
RTOL = 1e-4


def abstract(name, input_shape, num_outputs=10, **fields):
  return nnx.eval_shape(lambda: build_model(model_config(name, **fields), input_shape=input_shape,
                                            num_outputs=num_outputs, rngs=nnx.Rngs(params=0)))


def num_params(model) -> int:
  return sum(int(np.size(x)) for x in jax.tree.leaves(nnx.state(model, nnx.Param)))


@pytest.mark.parametrize("name, input_shape, fields, features", [
    ("resnet", (28, 28, 1), {}, 64),
    ("resnet", (32, 32, 3), dict(depth=8, width=8, shortcut="B"), 32),
    ("resnet", (32, 32, 3), dict(depth=8, stem="imagenet"), 64),
    ("vit", (28, 28, 1), dict(num_layers=2, embed_dim=32), 32),
    ("vit", (32, 32, 3), dict(num_layers=2, embed_dim=32, patch_size=8, pooling="mean", scan_layers=True), 32),
])
def test_output_shapes(name, input_shape, fields, features):
  model = abstract(name, input_shape, 7, **fields)
  for batch in (1, 5):
    x = jax.ShapeDtypeStruct((batch, *input_shape), np.float32)
    assert nnx.eval_shape(lambda m, x: m(x, train=False), model, x).shape == (batch, 7)
    assert nnx.eval_shape(lambda m, x: m(x, train=True), model, x).shape == (batch, 7)
    assert nnx.eval_shape(lambda m, x: m.features(x), model, x).shape == (batch, features)


def test_resnet_parameter_counts_are_the_papers():
  # He et al. 2016, table 6: ResNet-20 0.27M, -32 0.46M, -56 0.85M, -110 1.7M (option A: shortcuts are free)
  counts = {d: num_params(abstract("resnet", (32, 32, 3), depth=d)) for d in (20, 32, 56, 110)}
  assert counts == {20: 269_722, 32: 464_154, 56: 853_018, 110: 1_727_962}
  assert num_params(abstract("resnet", (32, 32, 3), shortcut="B")) > counts[20]  # two 1x1 projections + BN


def test_resnet_has_batch_statistics_and_vit_carries_logical_axes():
  stats = nnx.state(abstract("resnet", (8, 8, 1), depth=8, width=4), nnx.BatchStat)
  assert {p[-1] for p, _ in nnx.to_flat_state(stats)} == {"mean", "var"}
  assert len(nnx.to_flat_state(stats)) == 2 * (1 + 2 * 3)  # stem + two per block, 3 blocks
  specs = nnx.get_partition_spec(nnx.state(abstract("vit", (28, 28, 1), num_layers=2, embed_dim=32), nnx.Param))
  flat = {".".join(map(str, p)): tuple(s) for p, s in nnx.to_flat_state(specs)}
  assert flat["patch_embed.kernel"] == (None, "embed")
  assert flat["trunk.pos_embed"] == ("positions", "embed")
  assert flat["trunk.blocks.0.attn.qkv.kernel"] == ("embed", None, "heads", "head_dim")
  assert flat["head.kernel"] == ("embed", None)
  assert not any(k.startswith("trunk.embed.") for k in flat)  # no token vocabulary


@pytest.mark.parametrize("name, input_shape, fields, message", [
    ("resnet", (28, 28, 1), dict(depth=21), r"^config\.model\.depth: 21 .* must be 6n\+2 \(8, 20, 32, 44, 56, 110"),
    ("resnet", (28, 28, 1), dict(depth=2), r"^config\.model\.depth: 2 "),
    ("resnet", (28, 28, 1), dict(width=0), r"^config\.model\.width: must be an integer >= 1"),
    ("resnet", (28, 28, 1), dict(shortcut="C"), r"^config\.model\.shortcut: unknown 'C'; valid: A"),
    ("resnet", (28, 28, 1), dict(stem="big"), r"^config\.model\.stem: unknown 'big'; valid: cifar, imagenet"),
    ("resnet", (64,), {}, r"^config\.data\.name: model 'resnet' needs images \(H x W x C\).*\(64,\)"),
    ("vit", (30, 30, 1), dict(patch_size=4),
     r"^config\.model\.patch_size: 4 does not divide the 30x30 image; pick a divisor of 30$"),
    ("vit", (28, 32, 3), dict(patch_size=8), r"^config\.model\.patch_size: 8 .* 28x32 .* common divisor of 28 and 32"),
    ("vit", (28, 28, 1), dict(pooling="max"), r"^config\.model\.pooling: unknown 'max'; valid: cls, mean"),
    ("vit", (28, 28, 1), dict(embed_dim=30, num_heads=4), r"^config\.model\.embed_dim: 30 is not divisible"),
])
def test_bad_fields_are_one_line_user_errors(name, input_shape, fields, message):
  with pytest.raises(UserError, match=message) as e:  # built for real (under eval_shape JAX adds a note)
    build_model(model_config(name, **fields), input_shape=input_shape, num_outputs=10, rngs=nnx.Rngs(params=0))
  assert "\n" not in str(e.value)


@pytest.mark.parametrize("config, override, field", [
    ("fashion_mnist_resnet", "--config.model.depth=21", "config.model.depth"),
    ("fashion_mnist_vit", "--config.model.patch_size=3", "config.model.patch_size"),
])
def test_bad_fields_through_the_cli(cli, tmp_path, config, override, field):
  workdir = tmp_path / "work"
  # digits (8x8, bundled): nothing to fetch; 3 does not divide 8
  proc = cli(f"--config=configs/{config}.py:smoke", "--config.data.name=digits", override, f"--workdir={workdir}")
  assert proc.returncode == 2, proc.stderr[-2000:]
  assert "Traceback" not in proc.stderr
  lines = error_lines(proc.stderr)
  assert len(lines) == 1 and lines[0].startswith("error:") and field in lines[0], lines
  assert not workdir.exists() or not any(workdir.rglob("*")), sorted(workdir.rglob("*"))


def resnet_config():
  c = load_config("digits_mlp", "smoke")  # digits, batch 32, Adam 1e-3
  c.model = model_config("resnet", depth=8, width=4)
  return c


@pytest.fixture(scope="module")
def resnet_reference():
  """(losses, final state) of 3 steps on 1 device, and the initial state."""
  config = resnet_config()
  stepper = stepper_for(config, 1)
  return train_steps(config, stepper), stepper.layout.plain(stepper.layout.place(stepper.init())), stepper


def batch_stats(state):
  return {".".join(map(str, p)): np.asarray(v) for p, v in nnx.to_flat_state(nnx.State(state.model_state))}


def test_eval_uses_running_averages_and_training_updates_them(resnet_reference):
  (_, trained), initial, stepper = resnet_reference
  before, after = batch_stats(initial), batch_stats(trained)
  assert before.keys() == after.keys() and len(before) == 14
  for name in before:  # mean 0 / var 1 at init; 3 steps of momentum 0.9 moved every channel
    assert not np.allclose(before[name], after[name]), name
  x = np.random.default_rng(0).uniform(size=(16, 8, 8, 1)).astype(np.float32)
  # a copy of the state's variables for each model: training mode writes its batch statistics into them
  model_of = lambda state: stepper.model(jax.tree.map(lambda x: x, state))
  model = model_of(trained)
  eval_all, eval_head = np.asarray(model(x, train=False)), np.asarray(model(x[:4], train=False))
  np.testing.assert_allclose(eval_all[:4], eval_head, rtol=1e-5, atol=1e-6)  # an example's output: its own
  shuffled = np.asarray(model(np.concatenate([x[:4], x[::-1][:12]]), train=False))
  np.testing.assert_allclose(shuffled[:4], eval_head, rtol=1e-5, atol=1e-6)
  # in training the batch's statistics are used: other examples change an example's output
  train_all = np.asarray(model_of(trained)(x, train=True))
  train_head = np.asarray(model_of(trained)(x[:4], train=True))
  assert not np.allclose(train_all[:4], train_head, rtol=1e-3, atol=1e-4)
  assert not np.allclose(train_all, eval_all, rtol=1e-3, atol=1e-4)


@pytest.mark.parametrize("layout", [dict(data=8), dict(fsdp=8), dict(strategy="pmap")], ids=str)
def test_batch_statistics_are_the_same_on_every_layout(resnet_reference, layout):
  (ref_losses, ref_state), _, _ = resnet_reference
  config = resnet_config()
  mesh = dict(layout)
  if mesh.pop("strategy", None):
    config.parallel.strategy = "pmap"
  losses, state = train_steps(config, stepper_for(config, 8, **mesh), steps=STEPS)
  np.testing.assert_allclose(losses, ref_losses, rtol=RTOL)
  ref, got = batch_stats(ref_state), batch_stats(state)
  assert got.keys() == ref.keys()
  for name in ref:  # each device saw 4 of the 32 rows; the statistics are still the whole batch's
    np.testing.assert_allclose(got[name], ref[name], rtol=RTOL, atol=1e-6, err_msg=name)


def padded_step(config, stepper, garbage: float):
  """One train step on the run's first batch with its last 13 of 32 rows made padding (as the last batch of an
  epoch with data.drop_remainder=false) holding `garbage` -> (loss, plain state)."""
  batch = next(iter(pipeline.train_dataset(dataset_for(config), config.data, seed=config.seed, num_steps=1)))
  mask, inputs = batch["mask"].copy(), batch["inputs"].copy()
  mask[19:], inputs[19:] = 0.0, garbage
  state, metrics = stepper.train_step(stepper.layout.place(stepper.init()),
                                      stepper.layout.train_batch({**batch, "mask": mask, "inputs": inputs}))
  return float(metrics["loss"]), stepper.layout.plain(state)


def test_padding_rows_count_in_no_batch_statistic():
  """Padding rows left out of BatchNorm's statistics and running averages: what they hold changes nothing (the same
  program on other values, bit for bit), and pmap, where replicas 5-7 hold only padding and replica 4 three real
  rows of four, gives jit's step (each replica's sums added before dividing; equal-weight means of the replicas'
  own statistics were off, and NaN for a replica without a real row)."""
  config = resnet_config()
  stepper = stepper_for(config, 1)
  (loss, state), (loss_other, state_other) = padded_step(config, stepper, 0.0), padded_step(config, stepper, 50.0)
  assert loss == loss_other
  for a, b in zip(jax.tree.leaves((state.params, state.model_state)),
                  jax.tree.leaves((state_other.params, state_other.model_state))):
    np.testing.assert_array_equal(a, b)
  config.parallel.strategy = "pmap"
  loss_pmap, state_pmap = padded_step(config, stepper_for(config, 8), 50.0)
  np.testing.assert_allclose(loss_pmap, loss, rtol=RTOL)
  ref, got = batch_stats(state), batch_stats(state_pmap)
  for name in ref:
    np.testing.assert_allclose(got[name], ref[name], rtol=RTOL, atol=1e-6, err_msg=name)
  # (not the parameters: a convolution's bias before BatchNorm has a gradient of ~0, whose sign Adam's first step
  # turns into +-learning_rate)


def test_a_microbatch_of_padding_only_keeps_the_running_averages():
  """grad_accum_steps=4 on a last batch with 2 real rows: microbatches 2 and 3 (rows 2, 6, ... and 3, 7, ...) hold
  padding only. They keep the running averages and add nothing (nnx's masked mean over no row was NaN, which went
  into the running averages and, times the loss's zero weight, into every gradient): the step is grad_accum_steps=2's,
  whose two microbatches hold the same real rows."""
  results = []
  for k in (2, 4):
    config = resnet_config()
    config.train.grad_accum_steps = k
    batch = next(iter(pipeline.train_dataset(dataset_for(config), config.data, seed=config.seed, num_steps=1)))
    batch = {**batch, "mask": np.where(np.arange(len(batch["mask"])) < 2, batch["mask"], 0.0).astype(np.float32)}
    stepper = stepper_for(config, 1)
    state, metrics = stepper.train_step(stepper.layout.place(stepper.init()), stepper.layout.train_batch(batch))
    results.append((float(metrics["loss"]), batch_stats(stepper.layout.plain(state))))
  (loss2, ref), (loss4, got) = results
  assert np.isfinite(loss4)
  np.testing.assert_allclose(loss4, loss2, rtol=RTOL)
  for name in ref:
    np.testing.assert_allclose(got[name], ref[name], rtol=RTOL, atol=1e-6, err_msg=name)


def test_batchnorm_without_a_real_row_normalises_with_its_running_averages():
  """A call whose rows are all padding: the running averages stay and normalise it, as in eval, so the output keeps
  its scale (a variance of 0 multiplied it by 1/sqrt(epsilon) per layer: inf through a deep net, then NaN)."""
  from bigmodel_jax.models.layers import BatchNorm, real_rows
  bn = BatchNorm(3, rngs=nnx.Rngs(0))
  bn.mean[...], bn.var[...] = np.array([1.0, -2.0, 0.5], np.float32), np.array([4.0, 0.25, 1.0], np.float32)
  x = np.random.default_rng(0).normal(size=(4, 2, 3)).astype(np.float32)
  expected = np.asarray(bn(x, train=False))

  @nnx.jit
  def padding_only(bn, x):
    with real_rows(np.zeros(4, np.float32)):
      return bn(x, train=True), bn.mean[...], bn.var[...]

  y, mean, var = padding_only(bn, x)
  np.testing.assert_allclose(y, expected, rtol=1e-6, atol=1e-6)
  np.testing.assert_array_equal(mean, [1.0, -2.0, 0.5])
  np.testing.assert_array_equal(var, [4.0, 0.25, 1.0])


def vit_config(**fields):
  c = load_config("digits_mlp", "smoke")
  c.model = model_config("vit", patch_size=4, num_layers=2, num_heads=2, embed_dim=32, **fields)  # 4 patches + [CLS]
  c.optimizer.learning_rate = 3e-3
  return c


def test_vit_learns_digits_and_scanned_layers_match_looped():
  config = vit_config()
  losses, _ = train_steps(config, stepper_for(config, 1), steps=40)
  assert np.isfinite(losses).all()
  assert np.mean(losses[-5:]) < 0.6 * losses[0], losses  # ~2.5 at init; ~1.0 measured after 40 steps
  scanned = vit_config(scan_layers=True, remat="full")
  scanned_losses, _ = train_steps(scanned, stepper_for(scanned, 1), steps=2)
  np.testing.assert_allclose(scanned_losses, losses[:2], rtol=1e-5)
