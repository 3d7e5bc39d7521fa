"""Models built from config: output shapes, the tutorial CNN's parameter count, dropout, bad fields."""

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


def num_params(model) -> int:
  return sum(int(np.size(x)) for x in jax.tree.leaves(nnx.state(model, nnx.Param)))


def inputs(shape, seed=0):
  return jax.random.uniform(jax.random.PRNGKey(seed), shape)


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
  model = build(name, input_shape, num_outputs, **fields)
  for batch in (1, 5):
    out = model(inputs((batch, *input_shape)), train=False)
    assert out.shape == (batch, num_outputs)
    assert np.all(np.isfinite(out))


def test_seed_cnn_has_the_tensorflow_tutorial_parameter_count():
  # Conv 320 + Conv 18,496 + Conv 36,928 + Dense 36,928 (3x3x64 -> 64) + Dense 650 (64 -> 10)
  assert num_params(build("cnn", (28, 28, 1), 10)) == 93_322


def test_linear_parameter_count_and_coefficients():
  model = build("linear", (3,), 1)
  assert num_params(model) == 4
  coef = model.coefficients()
  assert np.array(coef["weights"]).shape == (3, 1) and np.array(coef["bias"]).shape == (1,)
  assert "bias" not in build("linear", (3,), 1, use_bias=False).coefficients()


def test_mlp_parameter_count():
  assert num_params(build("mlp", (8, 8, 1), 10, hidden_sizes=(16, 8))) == (64 * 16 + 16) + (16 * 8 + 8) + (8 * 10 + 10)


@pytest.mark.parametrize("name,input_shape,fields", [
    ("mlp", (8, 8, 1), dict(hidden_sizes=(64, 64), dropout_rate=0.5)),
    ("cnn", (12, 12, 1), dict(conv_features=(4,), pool_after=1, dense_features=(32,), dropout_rate=0.5)),
])
def test_dropout_only_in_training(name, input_shape, fields):
  model = build(name, input_shape, 10, **fields)
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
  no_dropout = build(name, input_shape, 10, **{**fields, "dropout_rate": 0.0})
  np.testing.assert_allclose(no_dropout(x, train=True, rngs=nnx.Rngs(dropout=1)), eval_a, rtol=1e-6, atol=1e-6)


def test_same_seed_same_init_other_seed_other_init():
  x = inputs((2, 8, 8, 1))
  a, b, c = (build("cnn", (8, 8, 1), 10, seed=s, conv_features=(4,), pool_after=1) for s in (0, 0, 1))
  np.testing.assert_array_equal(a(x, train=False), b(x, train=False))
  assert not np.allclose(a(x, train=False), c(x, train=False))


def test_unknown_model_field_is_a_user_error():
  with pytest.raises(UserError, match="bogus"):
    model_config("cnn", bogus=1)
  stray = ml_collections.ConfigDict(dict(name="mlp", hidden_sizes=(4,), bogus=1))
  with pytest.raises(UserError, match=r"config\.model\.bogus"):
    build_model(stray, input_shape=(3,), num_outputs=2, rngs=nnx.Rngs(params=0))
  with pytest.raises(UserError, match="valid: cnn, linear, mlp"):
    model_config("resnet")
  with pytest.raises(UserError, match="activation"):
    build("mlp", (3,), 2, activation="swishy")
