"""Layers whose behaviour must not depend on how the batch is laid out over devices.

`ExampleRngs` holds one key per example (the train step derives it from (seed, step, row of the global
batch)); `Dropout` draws each example's mask from its own key, so an example's mask is the same whether
the batch runs on one device, is split by pmap, or in grad-accumulation microbatches. `BatchNorm`
normalises with the statistics of the whole global batch on every layout: under jit the sharded batch
is one array, and under pmap the layout names its replica axis (layout.replica_axis) so the batch
moments are averaged across devices.
"""

import contextlib
import contextvars
import math
import zlib
from functools import partial

import jax
import jax.numpy as jnp
from flax import nnx
from flax.nnx.nn import dtypes
from jax.ad_checkpoint import checkpoint_name

from bigmodel_jax import layout


def is_single_key(key) -> bool:
  """One key (a typed key, or a raw uint32 pair) rather than one per example."""
  return key.ndim == (0 if jax.dtypes.issubdtype(key.dtype, jax.dtypes.prng_key) else 1)


def seed_key(seed: int) -> jax.Array:
  """jax.random.PRNGKey(seed) for any seed below 2**63: without jax_enable_x64, PRNGKey keeps only a seed's low 32
  bits (seed 2**32 + 5 made seed 5's key: the same initial weights, dropout and samples); the high bits are folded in.
  The very key PRNGKey gives below 2**32."""
  key = jax.random.PRNGKey(seed & 0xFFFFFFFF)
  return key if seed < 2 ** 32 else jax.random.fold_in(key, seed >> 32)


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


_REAL_ROWS: contextvars.ContextVar = contextvars.ContextVar("real_rows", default=None)


@contextlib.contextmanager
def real_rows(mask_B):
  """While a train step traces its loss: which rows of the (micro)batch are real examples (1) and which are
  padding (0, the last batch of an epoch with data.drop_remainder=false), for BatchNorm's statistics."""
  token = _REAL_ROWS.set(mask_B)
  try:
    yield
  finally:
    _REAL_ROWS.reset(token)


class BatchNorm(nnx.BatchNorm):
  """nnx.BatchNorm over every real example of the global batch, on any layout; running averages in eval.

  The running mean and variance are nnx.BatchStat variables: part of the train state's model_state,
  checkpointed and restored like the parameters. Padding rows (`real_rows`) count in neither the batch's
  statistics nor the running averages; under pmap each replica's sums are added up before dividing, so replicas
  with fewer real rows (or none) weigh what they hold.
  """

  def __init__(self, num_features: int, *, rngs: nnx.Rngs, momentum: float = 0.9, epsilon: float = 1e-5, **kwargs):
    super().__init__(num_features, momentum=momentum, epsilon=epsilon, use_running_average=False,
                     scale_metadata={"eager_sharding": False}, bias_metadata={"eager_sharding": False},
                     rngs=rngs, **kwargs)

  def __call__(self, x, *, train: bool):
    axis = layout.replica_axis()  # None under jit; the pmap axis while the layout traces a step
    if self.axis_name != axis:  # (set only when it changes: a module built outside a trace may be called in one)
      self.axis_name = axis
    rows = _REAL_ROWS.get()
    if not train or rows is None:
      return super().__call__(x, use_running_average=not train)
    if rows.shape != x.shape[:1]:
      raise ValueError(f"BatchNorm: {rows.shape[0]} rows are marked real or padding, but its input is {x.shape}")
    real = jnp.broadcast_to(rows.reshape(-1, *[1] * (x.ndim - 1)) > 0, x.shape)
    return self._masked(x, real, axis)

  def _masked(self, x, real, axis):
    """Training on the real rows: their sums (added over the replicas under pmap; nnx.BatchNorm would average the
    replicas' means with equal weights) divided by their count. Without a real row (a microbatch of padding only
    under grad accumulation) the running averages are kept, and normalise it (nnx's masked mean: NaN)."""
    axes = tuple(range(x.ndim - 1))
    scale = self.scale[...] if self.scale is not None else None
    bias = self.bias[...] if self.bias is not None else None
    # the dtype nnx.BatchNorm returns: its input's and variables' common one (or its own dtype)
    own = [a for a in (x, self.mean[...], self.var[...], scale, bias) if a is not None]
    dtype = self.dtype or jnp.result_type(*own)
    x32 = x.astype(jnp.promote_types(dtype, jnp.float32))
    sums = jnp.stack([jnp.where(real, x32, 0).sum(axes), jnp.where(real, x32 * x32, 0).sum(axes),
                      real.sum(axes).astype(x32.dtype)])
    total, total_sq, n = sums if axis is None else jax.lax.psum(sums, axis)
    running_mean, running_var = self.mean[...], self.var[...]
    # no real row: the running averages, kept as they are and normalising with their usual scale (a variance of
    # 0 would multiply each layer's activations by 1/sqrt(epsilon), to inf through a deep net: NaN gradients)
    mean = jnp.where(n > 0, total / jnp.maximum(n, 1.0), running_mean)
    var = jnp.where(n > 0, jnp.maximum(0.0, total_sq / jnp.maximum(n, 1.0) - mean * mean), running_var)
    m = self.momentum
    self.mean[...] = jax.lax.stop_gradient(jnp.where(n > 0, m * running_mean + (1 - m) * mean, running_mean))
    self.var[...] = jax.lax.stop_gradient(jnp.where(n > 0, m * running_var + (1 - m) * var, running_var))
    y = (x32 - mean) * jax.lax.rsqrt(var + self.epsilon)
    y = y * scale if scale is not None else y
    return (y + bias if bias is not None else y).astype(dtype)


def own_dtype(arrays, *, dtype=None, inexact=True):
  """nnx.Embed's `promote_dtype=`: the arrays' own common dtype, not the one nnx.Embed fixes when it is built (its
  float32 table's): a table cast to bfloat16 for config.train.dtype then looks tokens up, and a tied head attends,
  in bfloat16, so the layers after it compute in bfloat16 too. The same values in float32."""
  return dtypes.promote_dtype(arrays, dtype=None, inexact=inexact)


LINEAR_OUTPUT = "linear_output"  # checkpoint_name of linear_dot_general's outputs: remat's dots policies keep them


def linear_dot_general(lhs, rhs, dimension_numbers, precision=None, preferred_element_type=None, out_sharding=None,
                       **kwargs):
  """lax.dot_general for nnx.Linear and nnx.LinearGeneral (`dot_general=`): the same values, and on XLA:CPU a kernel
  gradient that transposes the smaller of the layer's input and its output gradient. Left to itself, XLA:CPU
  transposes the larger one for the char GPT's MLP (tokens x 4*dim), fused with the exact GELU's gradient into a
  loop of strided reads that took 20% of the step; this way the train step ran 1.2-1.4x faster, other models unchanged
  (benchmarks/NOTES.md). No axis is merged or split, so sharded kernels stay sharded. Its output is named
  LINEAR_OUTPUT for remat's dots policies (which cannot see a dot inside a custom VJP), and it has no forward-mode
  derivative (jax.jvp). Other backends, and contractions other than an input's trailing axes with the kernel's
  leading ones, get lax.dot_general as it is."""
  (lc, rc), (lb, rb) = dimension_numbers
  k = len(lc)
  if (jax.default_backend() != "cpu" or not k or tuple(lc) != tuple(range(lhs.ndim - k, lhs.ndim))
      or tuple(rc) != tuple(range(k)) or rhs.ndim == k or lb or rb or precision is not None
      or preferred_element_type is not None or out_sharding is not None or kwargs):
    return jax.lax.dot_general(lhs, rhs, dimension_numbers, precision=precision,
                               preferred_element_type=preferred_element_type, out_sharding=out_sharding, **kwargs)
  return checkpoint_name(_linear(lhs, rhs, k), LINEAR_OUTPUT)


def _contract(a, b, k: int):
  """a's trailing k axes against b's leading k axes."""
  return jax.lax.dot_general(a, b, ((tuple(range(a.ndim - k, a.ndim)), tuple(range(k))), ((), ())))


@partial(jax.custom_vjp, nondiff_argnums=(2,))
def _linear(x, kernel, k: int):
  return _contract(x, kernel, k)


def _linear_fwd(x, kernel, k):
  return _linear(x, kernel, k), (x, kernel)


def _linear_bwd(k, residuals, dy):
  x, kernel = residuals
  n_in, n_out = k, kernel.ndim - k  # kernel: k input axes, then output axes; x: rows (batch, positions), then inputs
  dx = jax.lax.dot_general(dy, kernel, ((tuple(range(dy.ndim - n_out, dy.ndim)), tuple(range(n_in, kernel.ndim))),
                                        ((), ())))
  # rows in one axis (the leading ones, merged: a batch sharding stays one); then the smaller operand transposed to
  # (features, rows), a copy of its own behind the barrier (XLA would fold a plain transpose back into the dot)
  rows = math.prod(x.shape[:x.ndim - n_in])
  x2, dy2 = x.reshape(rows, *x.shape[x.ndim - n_in:]), dy.reshape(rows, *dy.shape[dy.ndim - n_out:])
  rows_last = lambda a: jax.lax.optimization_barrier(jnp.transpose(a, (*range(1, a.ndim), 0)))
  if math.prod(kernel.shape[:n_in]) <= math.prod(kernel.shape[n_in:]):
    dkernel = _contract(rows_last(x2), dy2, 1)  # (input axes, output axes)
  else:
    dkernel = _contract(rows_last(dy2), x2, 1)  # (output axes, input axes): turned below
    dkernel = jnp.transpose(dkernel, (*range(n_out, n_out + n_in), *range(n_out)))
  return dx.astype(x.dtype), dkernel.astype(kernel.dtype)


_linear.defvjp(_linear_fwd, _linear_bwd)


def max_pool(x_BxHxWxC: jax.Array, window: tuple[int, int], strides: tuple[int, int] | None = None,
             padding="VALID") -> jax.Array:
  """nnx.max_pool, values and gradients. Windows that tile the input (strides == window, no padding) are a reshape
  and a max, with reduce_window's gradient written out (`_tiled_max_pool`): on XLA:CPU the seed CNN's train step ran
  1.8x faster than with reduce_window, whose gradient (select_and_scatter) is slow there, and the written-out
  gradient (a window's first maximum takes it, as select_and_scatter gives it) another ~0.9 ms of a ~7.7 ms step
  faster than jax's own for a max, which shares a tied window's gradient (benchmarks/NOTES.md). It has no
  forward-mode derivative (jax.jvp), and a window holding a NaN passes no gradient on (reduce_window's passes it to
  an element selected by >= comparisons, which NaN fails; the loss is NaN then either way). Other windows (ResNet's
  overlapping 3x3 / 2) are nnx.max_pool's."""
  strides = tuple(strides or window)
  if strides != tuple(window) or padding != "VALID":
    return nnx.max_pool(x_BxHxWxC, window_shape=tuple(window), strides=strides, padding=padding)
  (_, h, w, _), (kh, kw) = x_BxHxWxC.shape, window
  return _tiled_max_pool(x_BxHxWxC[:, :h - h % kh, :w - w % kw], (kh, kw))  # VALID: a partial edge window dropped


@partial(jax.custom_vjp, nondiff_argnums=(1,))
def _tiled_max_pool(x_BxHxWxC: jax.Array, window: tuple[int, int]) -> jax.Array:
  (b, h, w, c), (kh, kw) = x_BxHxWxC.shape, window
  return x_BxHxWxC.reshape(b, h // kh, kh, w // kw, kw, c).max(axis=(2, 4))


def _tiled_max_pool_fwd(x, window):
  y = _tiled_max_pool(x, window)
  return y, (x, y)


def _tiled_max_pool_bwd(window, residuals, g):
  """Each window's gradient to its first maximum in row-major order, as reduce_window's (select_and_scatter with
  >=, as PyTorch's max_pool2d): elementwise selects, no reduction (jax's rule for a max divides among ties)."""
  x, y = residuals
  (b, h, w, c), (kh, kw) = x.shape, window
  equal = x.reshape(b, h // kh, kh, w // kw, kw, c) == y[:, :, None, :, None]
  seen, rows = None, []
  for i in range(kh):
    row = []
    for j in range(kw):
      here = equal[:, :, i, :, j]
      row.append(jnp.where(here if seen is None else here & ~seen, g, jnp.zeros_like(g)))
      seen = here if seen is None else seen | here
    rows.append(jnp.stack(row, axis=3))
  return (jnp.stack(rows, axis=2).reshape(b, h, w, c),)


_tiled_max_pool.defvjp(_tiled_max_pool_fwd, _tiled_max_pool_bwd)


IM2COL_MAX_TAPS = 72  # kernel taps x input channels up to which conv_general_dilated is a matmul on XLA:CPU (0: never)


def conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation=None, rhs_dilation=None,
                         dimension_numbers=None, feature_group_count=1, batch_group_count=1, precision=None,
                         preferred_element_type=None, out_sharding=None):
  """lax.conv_general_dilated for nnx.Conv (`conv_general_dilated=`): the same function, and on XLA:CPU a float32 2-D
  convolution with few kernel taps x input channels (<= IM2COL_MAX_TAPS: a 3x3 layer over 1-8 channels, such as the
  first layer of the seed CNN, of a ResNet's cifar stem and of DCGAN's discriminator) written as im2col: the kernel's
  shifted (strided) views of the padded input concatenated on the channel axis, and one matmul. XLA:CPU's
  convolution kernels are slow for so few input channels: the seed CNN's first layer (1 channel, 3x3) took 0.93 ms
  forward and backward, against 0.60 ms this way; from 16 input channels on XLA's own are faster (benchmarks/NOTES.md;
  `python -m benchmarks.im2col` measures a config's step both ways). Values agree to float32 rounding (the same
  terms, summed in another order). Everything else gets lax.conv_general_dilated as it is: other backends (decided
  when traced), other dtypes (bfloat16 would sum the input gradient's taps in bfloat16), dilations, groups, layouts
  other than nnx.Conv's NHWC / HWIO, negative padding and empty outputs (lax's own results and errors)."""
  plain = lambda: jax.lax.conv_general_dilated(
      lhs, rhs, window_strides, padding, lhs_dilation=lhs_dilation, rhs_dilation=rhs_dilation,
      dimension_numbers=dimension_numbers, feature_group_count=feature_group_count, batch_group_count=batch_group_count,
      precision=precision, preferred_element_type=preferred_element_type, out_sharding=out_sharding)
  if (jax.default_backend() != "cpu" or lhs.ndim != 4 or rhs.ndim != 4 or feature_group_count != 1
      or batch_group_count != 1 or precision is not None or preferred_element_type is not None
      or out_sharding is not None or any(d != 1 for d in (*(lhs_dilation or ()), *(rhs_dilation or ())))
      or lhs.dtype != jnp.float32 or rhs.dtype != jnp.float32 or math.prod(rhs.shape[:3]) > IM2COL_MAX_TAPS
      or jax.lax.conv_dimension_numbers(lhs.shape, rhs.shape, dimension_numbers)
      != jax.lax.conv_dimension_numbers(lhs.shape, rhs.shape, ("NHWC", "HWIO", "NHWC"))
      or lhs.shape[3] != rhs.shape[2]):
    return plain()
  (kh, kw, cin, cout), (sh, sw) = rhs.shape, window_strides
  pads = jax.lax.padtype_to_pads(lhs.shape[1:3], (kh, kw), window_strides, padding) if isinstance(padding, str) \
      else [tuple(p) for p in padding]
  h, w = ((lhs.shape[1 + a] + sum(pads[a]) - k) // s + 1 for a, k, s in ((0, kh, sh), (1, kw, sw)))
  if min(min(p) for p in pads) < 0 or h <= 0 or w <= 0:
    return plain()
  x = jnp.pad(lhs, ((0, 0), *pads, (0, 0)))
  views = [x[:, i:i + sh * (h - 1) + 1:sh, j:j + sw * (w - 1) + 1:sw] for i in range(kh) for j in range(kw)]
  columns = jnp.concatenate(views, axis=-1) if len(views) > 1 else views[0]  # (B, h, w, kh*kw*cin): taps, channels
  return (columns.reshape(-1, kh * kw * cin) @ rhs.reshape(kh * kw * cin, cout)).reshape(lhs.shape[0], h, w, cout)
