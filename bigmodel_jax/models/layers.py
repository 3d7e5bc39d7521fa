"""Layers whose behaviour must not depend on how the batch is laid out over devices.

`ExampleRngs` holds one key per example (the train step derives it from (seed, step, row of the global
batch)); `Dropout` draws each example's mask from its own key, so an example's mask is the same whether
the batch runs on one device, is split by pmap, or in grad-accumulation microbatches. `BatchNorm`
normalises with the statistics of the whole global batch on every layout: under jit the sharded batch
is one array, and under pmap the layout names its replica axis (layout.replica_axis) so the batch
moments are averaged across devices.
"""

import zlib

import jax
import jax.numpy as jnp
from flax import nnx

from bigmodel_jax import layout


def is_single_key(key) -> bool:
  """One key (a typed key, or a raw uint32 pair) rather than one per example."""
  return key.ndim == (0 if jax.dtypes.issubdtype(key.dtype, jax.dtypes.prng_key) else 1)


def fold_in(key, i):
  """fold_in for one key or one key per example."""
  return jax.random.fold_in(key, i) if is_single_key(key) else jax.vmap(jax.random.fold_in, (0, None))(key, i)


class ExampleRngs:
  """Random streams keyed per example: `rngs.dropout()` / `rngs.noise()` return one key per row (B x 2).

  Each stream counts its draws, so successive layers get different keys; `fold_in(i)` derives a child
  (e.g. layer i of a scanned stack) that is the same however the layers are run.
  """

  def __init__(self, keys_Bx2: jax.Array):
    self.keys = keys_Bx2
    self._counts: dict[str, int] = {}

  def fold_in(self, i) -> "ExampleRngs":
    return ExampleRngs(fold_in(self.keys, i))

  def draw(self, stream: str) -> jax.Array:
    count = self._counts.get(stream, 0)
    self._counts[stream] = count + 1
    return self.fold_in(zlib.crc32(stream.encode()) + count).keys

  def __getattr__(self, stream: str):
    if stream.startswith("_"):
      raise AttributeError(stream)
    return lambda: self.draw(stream)


class Dropout(nnx.Module):
  """Inverted dropout with a mask per example drawn from that example's key (see ExampleRngs); given plain
  nnx.Rngs (a model called directly, outside the train step), one key draws the whole batch's mask."""

  def __init__(self, rate: float):
    self.rate = float(rate)

  def __call__(self, x, *, deterministic: bool, rngs: ExampleRngs | None = None):
    if deterministic or self.rate == 0.0:
      return x
    if rngs is None:
      raise ValueError("Dropout in training mode needs rngs (one key per example)")
    keep = 1.0 - self.rate
    keys = rngs.dropout()
    if is_single_key(keys):
      mask = jax.random.bernoulli(keys, keep, x.shape)
    else:
      mask = jax.vmap(lambda k: jax.random.bernoulli(k, keep, x.shape[1:]))(keys)
    return jnp.where(mask, x / keep, jnp.zeros_like(x)).astype(x.dtype)


class BatchNorm(nnx.BatchNorm):
  """nnx.BatchNorm over every example of the global batch, on any layout; running averages in eval.

  The running mean and variance are nnx.BatchStat variables: part of the train state's model_state,
  checkpointed and restored like the parameters.
  """

  def __init__(self, num_features: int, *, rngs: nnx.Rngs, momentum: float = 0.9, epsilon: float = 1e-5, **kwargs):
    super().__init__(num_features, momentum=momentum, epsilon=epsilon, use_running_average=False,
                     scale_metadata={"eager_sharding": False}, bias_metadata={"eager_sharding": False},
                     rngs=rngs, **kwargs)

  def __call__(self, x, *, train: bool):
    axis = layout.replica_axis()  # None under jit; the pmap axis while the layout traces a step
    if self.axis_name != axis:  # (set only when it changes: a module built outside a trace may be called in one)
      self.axis_name = axis
    return super().__call__(x, use_running_average=not train)


def max_pool(x_BxHxWxC: jax.Array, window: tuple[int, int], strides: tuple[int, int] | None = None,
             padding="VALID") -> jax.Array:
  """nnx.max_pool's values. Windows that tile the input (strides == window, no padding) are a reshape and a max:
  on XLA:CPU the seed CNN's train step ran 1.8x faster than with reduce_window, whose gradient (select_and_scatter)
  is slow there (benchmarks/NOTES.md). The values are the same; the gradient of a window whose maximum is tied
  (common: a ReLU of a constant background) is shared by the tied elements instead of given to one, the same total:
  so a CNN trains slightly differently from runs made with reduce_window. Other windows (ResNet's overlapping
  3x3 / 2) are nnx.max_pool's."""
  strides = tuple(strides or window)
  if strides != tuple(window) or padding != "VALID":
    return nnx.max_pool(x_BxHxWxC, window_shape=tuple(window), strides=strides, padding=padding)
  (b, h, w, c), (kh, kw) = x_BxHxWxC.shape, window
  x = x_BxHxWxC[:, :h - h % kh, :w - w % kw]  # VALID: a partial window at the edge is dropped
  return x.reshape(b, h // kh, kh, w // kw, kw, c).max(axis=(2, 4))
