"""Models built from config: output shapes, the tutorial CNN's parameter count, dropout, bad fields.

Every distinct parameter shape costs an XLA compilation of the random initialiser (about a second on a
busy 2-core CPU), so shapes and counts are checked abstractly (nnx.eval_shape traces the real code
without compiling it) and forward-pass tests fill the model's parameters with numpy random values.
"""

import jax
import ml_collections
import numpy as np
import pytest
from flax import nnx

from bigmodel_jax.config import model_config
from bigmodel_jax.errors import UserError
from bigmodel_jax.models import build_model


def build(name, input_shape, num_outputs, seed=0, **fields):
  return build_model(model_config(name, **fields), input_shape=input_shape, num_outputs=num_outputs,
                     rngs=nnx.Rngs(params=seed))


def abstract(name, input_shape, num_outputs, **fields):
  """The model with ShapeDtypeStructs for parameters: traced, never compiled or run."""
  return nnx.eval_shape(lambda: build(name, input_shape, num_outputs, **fields))


def concrete(name, input_shape, num_outputs, **fields):
  """The model with numpy-random parameters (its structure comes from the real constructor)."""
  graphdef, state = nnx.split(abstract(name, input_shape, num_outputs, **fields))
  rng = np.random.default_rng(0)
  return nnx.merge(graphdef, jax.tree.map(lambda a: (0.3 * rng.normal(size=a.shape)).astype(a.dtype), state))


def num_params(model) -> int:
  return sum(int(np.size(x)) for x in jax.tree.leaves(nnx.state(model, nnx.Param)))


def inputs(shape, seed=0):
  return np.random.default_rng(seed).uniform(size=shape).astype(np.float32)


@pytest.mark.parametrize("name,input_shape,num_outputs,fields", [
    ("mlp", (8, 8, 1), 10, dict(hidden_sizes=(16, 8))),
    ("mlp", (10,), 1, dict(hidden_sizes=())),
    ("cnn", (28, 28, 1), 10, {}),
    ("cnn", (8, 8, 1), 10, dict(conv_features=(4, 8), pool_after=1, dense_features=(16, 16), padding="SAME")),
    ("cnn", (32, 32, 3), 7, dict(conv_features=(8,), dense_features=())),
    ("linear", (10,), 1, {}),
    ("linear", (8, 8, 1), 10, dict(use_bias=False)),
])
def test_output_shapes(name, input_shape, num_outputs, fields):
  model = abstract(name, input_shape, num_outputs, **fields)
  for batch in (1, 5):
    x = jax.ShapeDtypeStruct((batch, *input_shape), np.float32)
    out = nnx.eval_shape(lambda m, x: m(x, train=False), model, x)
    assert out.shape == (batch, num_outputs) and out.dtype == np.float32


def test_seed_cnn_has_the_tensorflow_tutorial_parameter_count():
  # Conv 320 + Conv 18,496 + Conv 36,928 + Dense 36,928 (3x3x64 -> 64) + Dense 650 (64 -> 10)
  assert num_params(abstract("cnn", (28, 28, 1), 10)) == 93_322


def test_linear_parameter_count_and_coefficients():
  model = concrete("linear", (3,), 1)
  assert num_params(model) == 4
  coef = model.coefficients()
  x = inputs((5, 3))
  expected = x @ np.array(coef["weights"]) + np.array(coef["bias"])  # y = x W + b with the reported W, b
  np.testing.assert_allclose(model(x, train=False), expected, rtol=1e-5, atol=1e-6)
  assert "bias" not in concrete("linear", (3,), 1, use_bias=False).coefficients()


def test_mlp_parameter_count():
  assert num_params(abstract("mlp", (8, 8, 1), 10, hidden_sizes=(16, 8))) == (64 * 16 + 16) + (16 * 8 + 8) + (8 * 10 + 10)


@pytest.mark.parametrize("name,input_shape,fields", [
    ("mlp", (8, 8, 1), dict(hidden_sizes=(64, 64), dropout_rate=0.5)),
    ("cnn", (12, 12, 1), dict(conv_features=(4,), pool_after=1, dense_features=(32,), dropout_rate=0.5)),
])
def test_dropout_only_in_training(name, input_shape, fields):
  model = concrete(name, input_shape, 10, **fields)
  x = inputs((4, *input_shape))
  train_a = model(x, train=True, rngs=nnx.Rngs(dropout=1))
  train_a2 = model(x, train=True, rngs=nnx.Rngs(dropout=1))
  train_b = model(x, train=True, rngs=nnx.Rngs(dropout=2))
  np.testing.assert_array_equal(train_a, train_a2)  # same rng, same mask
  assert not np.allclose(train_a, train_b)  # another rng, another mask
  eval_a = model(x, train=False)
  eval_b = model(x, train=False, rngs=nnx.Rngs(dropout=2))
  np.testing.assert_array_equal(eval_a, eval_b)  # no dropout at eval, whatever the rng
  assert not np.allclose(train_a, eval_a)
  # the same weights without dropout give the eval output in training mode too
  no_dropout = concrete(name, input_shape, 10, **{**fields, "dropout_rate": 0.0})
  np.testing.assert_allclose(no_dropout(x, train=True, rngs=nnx.Rngs(dropout=1)), eval_a, rtol=1e-6, atol=1e-6)


def test_same_seed_same_init_other_seed_other_init():
  """The one real initialisation here: a tiny model, so a single initialiser shape is compiled."""
  a, b, c = (build("linear", (4,), 4, seed=s, use_bias=False) for s in (0, 0, 1))
  kernel = lambda m: np.asarray(m.dense.kernel[...])
  np.testing.assert_array_equal(kernel(a), kernel(b))
  assert not np.allclose(kernel(a), kernel(c))
  assert 0 < np.std(kernel(a)) < 2  # a scaled random init, not zeros


def test_unknown_model_field_is_a_user_error():
  with pytest.raises(UserError, match="bogus"):
    model_config("cnn", bogus=1)
  stray = ml_collections.ConfigDict(dict(name="mlp", hidden_sizes=(4,), bogus=1))
  with pytest.raises(UserError, match=r"config\.model\.bogus"):
    build_model(stray, input_shape=(3,), num_outputs=2, rngs=nnx.Rngs(params=0))
  with pytest.raises(UserError, match="unknown model 'wavenet'.*valid: cnn, dcgan, encoder_classifier, encoder_mlm, gpt"):
    model_config("wavenet")
  with pytest.raises(UserError, match="activation"):
    build("mlp", (3,), 2, activation="swishy")


@pytest.mark.parametrize("shape,window,strides", [((3, 26, 26, 4), (2, 2), None), ((2, 11, 9, 3), (2, 2), (2, 2)),
                                                  ((2, 9, 9, 2), (3, 3), (2, 2)), ((2, 9, 7, 2), (3, 3), None),
                                                  ((2, 6, 6, 3), (2, 3), None)])
@pytest.mark.parametrize("ties", [False, True])
def test_max_pool_equals_nnx_max_pool_in_values_and_gradients(shape, window, strides, ties):
  """The reshape form (tiling windows, odd edges dropped as VALID does) and the fallback (overlapping windows)
  give nnx.max_pool's values and gradients exactly: with ties too (inputs rounded to a few values, as a ReLU of a
  constant background ties a window), whose gradient goes to the window's first maximum as reduce_window's does."""
  from bigmodel_jax.models.layers import max_pool
  x = np.random.default_rng(0).normal(size=shape).astype(np.float32)
  x = jax.numpy.asarray(np.maximum(np.round(x), 0) if ties else x)
  ours = lambda x: max_pool(x, window, strides)
  theirs = lambda x: nnx.max_pool(x, window_shape=window, strides=strides or window)
  np.testing.assert_array_equal(ours(x), theirs(x))
  weights = np.random.default_rng(1).normal(size=theirs(x).shape).astype(np.float32)
  grad = lambda f: jax.grad(lambda x: (f(x) * weights).sum())(x)
  np.testing.assert_array_equal(grad(ours), grad(theirs))
  if ties:
    assert (np.asarray(grad(ours)) == 0).mean() > (np.asarray(x) == 0).mean() / 2  # ties were there to break


def test_max_pool_gradient_in_bfloat16_and_under_vmap():
  """The written-out gradient keeps the input's dtype and batches (vmap) like reduce_window's."""
  from bigmodel_jax.models.layers import max_pool
  x = jax.random.normal(jax.random.PRNGKey(0), (3, 2, 8, 8, 4)).astype(jax.numpy.bfloat16)
  ours = jax.vmap(jax.grad(lambda x: max_pool(x, (2, 2)).astype(jax.numpy.float32).sum()))(x)
  theirs = jax.vmap(jax.grad(lambda x: nnx.max_pool(x, (2, 2), (2, 2)).astype(jax.numpy.float32).sum()))(x)
  assert ours.dtype == jax.numpy.bfloat16
  np.testing.assert_array_equal(np.asarray(ours, np.float32), np.asarray(theirs, np.float32))


@pytest.mark.parametrize("x_shape, kernel_shape, k", [((4, 3, 8), (8, 24), 1), ((5, 24), (24, 6), 1),
                                                      ((2, 3, 4, 5), (5, 3, 2, 4), 1), ((2, 3, 4, 5), (4, 5, 7), 2)])
def test_linear_dot_general_equals_dot_general_in_values_and_gradients(x_shape, kernel_shape, k):
  """Linear (the kernel's gradient transposing the smaller operand on CPU) and LinearGeneral's contractions
  (qkv: a kernel of several output axes; out: two contracted axes): the same values and gradients as
  lax.dot_general, to float32 rounding (the same sums, in another order)."""
  from bigmodel_jax.models.layers import linear_dot_general
  x = jax.random.normal(jax.random.PRNGKey(0), x_shape)
  kernel = jax.random.normal(jax.random.PRNGKey(1), kernel_shape)
  numbers = ((tuple(range(len(x_shape) - k, len(x_shape))), tuple(range(k))), ((), ()))
  loss = lambda dot: lambda x, w: (jax.numpy.sin(dot(x, w, numbers)) * jax.numpy.arange(1.0, 2.0, 0.01)[
      :kernel_shape[-1]]).sum()
  ours, theirs = linear_dot_general(x, kernel, numbers), jax.lax.dot_general(x, kernel, numbers)
  assert ours.shape == theirs.shape
  np.testing.assert_allclose(ours, theirs, rtol=1e-5, atol=1e-4)  # sums of <= 24 products of O(1) terms
  grads = [jax.grad(loss(dot), (0, 1))(x, kernel) for dot in (linear_dot_general, jax.lax.dot_general)]
  for a, b in zip(*grads):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-4)


def test_linear_dot_general_passes_other_contractions_to_dot_general():
  from bigmodel_jax.models.layers import linear_dot_general
  x, y = jax.random.normal(jax.random.PRNGKey(0), (3, 4, 5)), jax.random.normal(jax.random.PRNGKey(1), (3, 5, 2))
  batched = (((2,), (1,)), ((0,), (0,)))  # a batch axis: not a Linear's contraction
  np.testing.assert_array_equal(linear_dot_general(x, y, batched), jax.lax.dot_general(x, y, batched))
  assert "custom_vjp" not in str(jax.make_jaxpr(lambda a, b: linear_dot_general(a, b, batched))(x, y))
  linear = jax.make_jaxpr(lambda a, b: linear_dot_general(a, b, (((2,), (0,)), ((), ()))))(x, y[0])
  assert ("custom_vjp" in str(linear)) == (jax.default_backend() == "cpu")  # its own gradient on CPU only


@pytest.mark.parametrize("channels, kernel, strides, padding, size", [
    (1, 3, 1, "VALID", (13, 11)), (3, 3, 1, "SAME", (13, 11)), (1, 4, 2, "SAME", (13, 11)), (2, 3, 2, "SAME", (12, 10)),
    (3, 3, (1, 2), "VALID", (13, 11)), (8, 3, 2, ((1, 0), (2, 1)), (13, 11)), (3, 3, 1, ((1, 1), (1, 1)), (13, 11)),
    (2, 3, (2, 1), "CIRCULAR", (9, 12))])
def test_conv_general_dilated_equals_nnx_conv_in_values_and_gradients(channels, kernel, strides, padding, size):
  """The im2col form (few taps x input channels: the seed CNN's, DCGAN's and ResNet's first layers), strided and
  padded as nnx.Conv pads (CIRCULAR: nnx pads, then calls it VALID): the same output shape, values and gradients as
  lax.conv_general_dilated, to float32 rounding (sums of <= 72 products of O(1) terms, in another order)."""
  from bigmodel_jax.models.layers import conv_general_dilated
  make = lambda **kw: nnx.Conv(channels, 5, (kernel, kernel), strides=strides, padding=padding, rngs=nnx.Rngs(0), **kw)
  ours, theirs = make(conv_general_dilated=conv_general_dilated), make()
  x = jax.random.normal(jax.random.PRNGKey(1), (2, *size, channels))
  assert ours(x).shape == theirs(x).shape
  np.testing.assert_allclose(ours(x), theirs(x), rtol=1e-5, atol=1e-5)
  weights = jax.random.normal(jax.random.PRNGKey(2), theirs(x).shape)
  grads = lambda conv: jax.grad(lambda m, x: (m(x) * weights).sum(), (0, 1))(conv, x)
  (ours_kernel, ours_x), (theirs_kernel, theirs_x) = grads(ours), grads(theirs)
  np.testing.assert_allclose(ours_x, theirs_x, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(ours_kernel.kernel[...], theirs_kernel.kernel[...], rtol=1e-5, atol=1e-4)  # 286 terms
  assert ("concatenate" in str(jax.make_jaxpr(lambda x: ours(x))(x))) == (jax.default_backend() == "cpu")


@pytest.mark.parametrize("case", ["wide", "dilated", "bfloat16", "negative padding", "empty output", "1-D"])
def test_conv_general_dilated_leaves_other_convolutions_to_lax(case):
  """lax's own convolution, bit for bit (its results and its errors): 144 taps x channels (XLA's kernel is faster
  there), dilations, bfloat16 (the im2col gradient would sum its taps in bfloat16), negative padding, an output
  with no pixels, other ranks."""
  from bigmodel_jax.models.layers import conv_general_dilated
  jnp = jax.numpy
  lhs, rhs = jax.random.normal(jax.random.PRNGKey(0), (2, 9, 9, 2)), jax.random.normal(jax.random.PRNGKey(1), (3, 3, 2, 4))
  numbers, strides, padding, kwargs = ("NHWC", "HWIO", "NHWC"), (1, 1), "VALID", {}
  if case == "wide":
    lhs, rhs = jnp.ones((2, 9, 9, 16)), jnp.ones((3, 3, 16, 4))
  elif case == "dilated":
    kwargs = {"rhs_dilation": (2, 2)}
  elif case == "bfloat16":
    lhs, rhs = lhs.astype(jnp.bfloat16), rhs.astype(jnp.bfloat16)
  elif case == "negative padding":
    padding = ((-1, -1), (0, -1))
  elif case == "empty output":
    lhs = lhs[:, :2]
  else:
    lhs, rhs, numbers, strides = lhs[:, 0], rhs[0], ("NWC", "WIO", "NWC"), (1,)
  conv = lambda f: lambda a: f(a, rhs, strides, padding, dimension_numbers=numbers, **kwargs)
  np.testing.assert_array_equal(conv(conv_general_dilated)(lhs), conv(jax.lax.conv_general_dilated)(lhs))
  assert "concatenate" not in str(jax.make_jaxpr(conv(conv_general_dilated))(lhs))
