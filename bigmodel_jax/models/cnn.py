"""The seed's Keras CNN: Conv32(3x3)-MaxPool-Conv64-MaxPool-Conv64-Flatten-Dense64-Dense10 (configurable)."""

from typing import Sequence

import jax
from flax import nnx

from bigmodel_jax.models import MODELS, activation as get_activation, require_positive
from bigmodel_jax.models.layers import Dropout, conv_general_dilated, max_pool


@MODELS.register("cnn")
class CNN(nnx.Module):
  """Conv blocks ('VALID' padding, as Keras' default) with 2x2 max-pooling between them, then dense layers.

  `conv_features=(32, 64, 64)` with `pool_after=2` and `dense_features=(64,)` is the TensorFlow CNN
  tutorial model: a 2x2 max pool follows each of the first `pool_after` convolutions.
  """

  def __init__(self, *, input_shape: Sequence[int], num_outputs: int, rngs: nnx.Rngs,
               conv_features: Sequence[int] = (32, 64, 64), kernel_size: int = 3, pool_after: int = 2,
               dense_features: Sequence[int] = (64,), activation: str = "relu", dropout_rate: float = 0.0,
               padding: str = "VALID"):
    require_positive(conv_features=conv_features, kernel_size=kernel_size, dense_features=dense_features)
    self.act = get_activation(activation)
    self.pool_after = pool_after
    h, w, c = input_shape
    self.convs = nnx.List()
    for i, features in enumerate(conv_features):
      self.convs.append(nnx.Conv(c, features, (kernel_size, kernel_size), padding=padding, rngs=rngs,
                                 conv_general_dilated=conv_general_dilated))
      if padding == "VALID":
        h, w = h - kernel_size + 1, w - kernel_size + 1
      if i < pool_after:
        h, w = h // 2, w // 2
      c = features
    sizes = [h * w * c, *dense_features]
    self.dense = nnx.List([nnx.Linear(a, b, rngs=rngs) for a, b in zip(sizes[:-1], sizes[1:])])
    self.dropout = Dropout(dropout_rate)
    self.head = nnx.Linear(sizes[-1], num_outputs, rngs=rngs)

  def __call__(self, x_BxHxWxC: jax.Array, *, train: bool, rngs=None) -> jax.Array:
    return self.head(self.features(x_BxHxWxC, train=train, rngs=rngs))

  def features(self, x_BxHxWxC: jax.Array, *, train: bool = False, rngs=None) -> jax.Array:
    """The penultimate activations (the head's inputs): e.g. the feature space of a Frechet distance."""
    x = x_BxHxWxC
    for i, conv in enumerate(self.convs):
      x = self.act(conv(x))
      if i < self.pool_after:
        x = max_pool(x, (2, 2))
    x = x.reshape(x.shape[0], -1)
    for layer in self.dense:
      x = self.dropout(self.act(layer(x)), deterministic=not train, rngs=rngs)
    return x
