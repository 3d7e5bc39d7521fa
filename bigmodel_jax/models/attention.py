"""Attention's math and the choice of its implementation (config.model.attention), for the Transformers of
models/transformer.py.

"einsum" writes softmax(q k^T / sqrt(Dh)) v out (any backend; the only form with dropout on the probabilities);
"cudnn" is jax.nn.dot_product_attention's cuDNN flash attention (an NVIDIA GPU, 16-bit compute); "auto", the
default, takes cuDNN's where it applies and einsum's elsewhere. jax.nn.dot_product_attention's own default is its
XLA form on every backend (jax 0.10-0.12: "defaults to XLA for now"), never cuDNN's; on XLA:CPU the einsum form,
whose softmax has jax.nn.softmax's custom derivative, is 1.6x faster forward and backward (benchmarks/NOTES.md).
"""

import contextlib
import math

import jax
import jax.numpy as jnp
from absl import logging

from bigmodel_jax.errors import UserError
from bigmodel_jax.registry import Registry

ATTENTIONS: Registry = Registry("attention implementation", "config.model.attention")
for _name in ("auto", "einsum", "cudnn"):
  ATTENTIONS.register(_name)(_name)
TAKEN: set[str] = set()  # what attend() took while tracing ("cudnn", "einsum"); a benchmark may clear and read it
_LOGGED: set[str] = set()
_PORTABLE = [False]  # inside portable(): einsum only


@contextlib.contextmanager
def portable():
  """Attention traced inside takes the einsum form whatever config.model.attention says and whatever device traces
  it: an artifact exported for several platforms (export.py) cannot hold cuDNN's kernel."""
  before, _PORTABLE[0] = _PORTABLE[0], True
  try:
    yield
  finally:
    _PORTABLE[0] = before


def attention(q, k, v, *, mask=None, is_causal=False, drop=None):
  """softmax(q k^T / sqrt(Dh)) v written out (config.model.attention "einsum"), with dropout on the attention
  probabilities (`drop`, as nanoGPT's attn_dropout) where given. q: B x T x H x Dh, k/v: B x S x H x Dh, mask
  broadcastable to B x H x T x S (True: attend). Logits and softmax in float32, as jax.nn.dot_product_attention's."""
  logits = jnp.einsum("bthd,bshd->bhts", q, k, preferred_element_type=jnp.float32) / math.sqrt(q.shape[-1])
  if is_causal:
    causal = jnp.tril(jnp.ones((q.shape[1], k.shape[1]), bool))[None, None]
    mask = causal if mask is None else mask & causal
  if mask is not None:
    logits = jnp.where(mask, logits, jnp.finfo(jnp.float32).min)  # a row with no key left averages them all
  probs = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
  if drop is not None:
    probs = drop(probs)
  return jnp.einsum("bhts,bshd->bthd", probs, v)


def _device():
  return jax.local_devices()[0]  # this process's own (a multi-process run's first device may be another's)


def cudnn_applies(q, mask=None, drop=None) -> str:
  """"" where jax.nn.dot_product_attention(implementation="cudnn") takes these queries, else why not."""
  if drop is not None:
    return "it has no dropout on the probabilities (config.model.attention_dropout_rate)"
  device = _device()
  platform = str(getattr(getattr(device, "client", None), "platform_version", "")).lower()
  if device.platform != "gpu" or "cuda" not in platform:
    return f"it needs an NVIDIA GPU (this is {device.platform}{' ' + platform if device.platform == 'gpu' else ''})"
  try:
    major = int(str(device.compute_capability).split(".")[0])
  except (AttributeError, ValueError):
    major = 0
  if major < 8:
    return f"it needs compute capability 8.0+, got {getattr(device, 'compute_capability', '?')}"
  if q.dtype not in (jnp.bfloat16, jnp.float16):
    return f"it needs 16-bit queries (config.train.dtype bfloat16), got {q.dtype}"
  if q.shape[-1] % 8 or q.shape[-1] > 128:
    return f"it needs a head size that is a multiple of 8 and at most 128, got {q.shape[-1]}"
  if mask is not None:
    return "it takes causal masking only here (no padding masks or caches)"
  return ""


def attend(q, k, v, *, implementation: str = "auto", mask=None, is_causal=False, drop=None):
  """Attention by config.model.attention: "einsum" (`attention`), "cudnn" (a UserError naming why where it does not
  apply), "auto" (cuDNN's where it applies, else einsum's; what it took is logged once per kind of call). Inside
  portable(), einsum's."""
  if implementation == "einsum" or _PORTABLE[0]:
    why = "" if implementation == "einsum" else "an export for several platforms"
  else:
    why = cudnn_applies(q, mask, drop)
    if why and implementation == "cudnn":
      raise UserError(f"config.model.attention: 'cudnn' does not apply here: {why}; use 'auto' or 'einsum'")
  taken = "einsum" if implementation == "einsum" or why else "cudnn"
  TAKEN.add(taken)
  decision = "cuDNN flash attention" if taken == "cudnn" else "the einsum form" + (f", as {why}" if why else "")
  if decision not in _LOGGED:  # traced once per compile and layer: said once per process
    _LOGGED.add(decision)
    logging.info("config.model.attention %s: %s", implementation, decision)
  if taken == "einsum":
    return attention(q, k, v, mask=mask, is_causal=is_causal, drop=drop)
  return jax.nn.dot_product_attention(q, k, v, is_causal=is_causal, implementation="cudnn")
