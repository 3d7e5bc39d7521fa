"""Multi-layer perceptron on flattened inputs."""

import math
from typing import Sequence

import jax
from flax import nnx

from bigmodel_jax.models import MODELS, activation as get_activation, require_positive
from bigmodel_jax.models.layers import Dropout


@MODELS.register("mlp")
class MLP(nnx.Module):
  """Flatten -> [Dense -> activation -> Dropout] x len(hidden_sizes) -> Dense(num_outputs)."""

  def __init__(self, *, input_shape: Sequence[int], num_outputs: int, rngs: nnx.Rngs,
               hidden_sizes: Sequence[int] = (512, 512), activation: str = "relu", dropout_rate: float = 0.0):
    require_positive(hidden_sizes=hidden_sizes)
    self.act = get_activation(activation)
    sizes = [math.prod(input_shape), *hidden_sizes]
    self.hidden = nnx.List([nnx.Linear(a, b, rngs=rngs) for a, b in zip(sizes[:-1], sizes[1:])])
    self.dropout = Dropout(dropout_rate)
    self.head = nnx.Linear(sizes[-1], num_outputs, rngs=rngs)

  def __call__(self, x_BxI: jax.Array, *, train: bool, rngs=None) -> jax.Array:
    return self.head(self.features(x_BxI, train=train, rngs=rngs))

  def features(self, x_BxI: jax.Array, *, train: bool = False, rngs=None) -> jax.Array:
    """The penultimate activations (the head's inputs)."""
    x = x_BxI.reshape(x_BxI.shape[0], -1)
    for layer in self.hidden:
      x = self.dropout(self.act(layer(x)), deterministic=not train, rngs=rngs)
    return x
