"""A plain affine map y = x W + b (linear / logistic regression)."""

import math
from typing import Sequence

import jax
from flax import nnx

from bigmodel_jax.models import MODELS


@MODELS.register("linear")
class Linear(nnx.Module):
  """Flattened inputs -> one Dense layer. For regression its kernel and bias are the fitted coefficients."""

  def __init__(self, *, input_shape: Sequence[int], num_outputs: int, rngs: nnx.Rngs, use_bias: bool = True):
    self.dense = nnx.Linear(math.prod(input_shape), num_outputs, use_bias=use_bias, rngs=rngs)

  def __call__(self, x: jax.Array, *, train: bool, rngs: nnx.Rngs | None = None) -> jax.Array:
    del train, rngs
    return self.dense(x.reshape(x.shape[0], -1))

  def coefficients(self) -> dict[str, list]:
    """The fitted weights, reported in the run summary (the seed prints w and b)."""
    out = {"weights": self.dense.kernel[...].tolist()}
    if self.dense.bias is not None:
      out["bias"] = self.dense.bias[...].tolist()
    return out
