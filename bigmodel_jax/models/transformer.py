"""Transformer blocks shared by a decoder-only LM (`gpt`) and the encoders of models/encoder.py (`encoder_classifier`,
`encoder_mlm`).

Pre-LayerNorm residual blocks: x + Dropout(Attention(LN(x))), then x + Dropout(MLP(LN(x))), GELU MLP, learned or
rotary positions, attention by config.model.attention (models/attention.py: einsum, cudnn, or auto, the default:
cuDNN's flash attention on an NVIDIA GPU with bfloat16 compute, einsum elsewhere). Options for weights converted
from other codebases (bigmodel_jax.convert), each default leaving the model as it was: `norm="post"` (BERT's LN(x +
Dropout(Attention(x))) blocks, no final LayerNorm), `layer_norm_eps`, `gelu="exact"` (erf; "tanh" is GPT-2's
approximation), `embed_norm` (a LayerNorm after the embeddings), `type_vocab_size` (BERT's token-type table; every
token has type 0) and `attention_dropout_rate` (nanoGPT's dropout on the attention probabilities). Every parameter
carries logical axis names (`out_sharding` metadata, read with `nnx.get_partition_spec`), so a rules table can map
them onto mesh axes without model code mentioning devices (parallel.RULES does). Logical axes: vocab, embed, heads,
head_dim, mlp, positions, and layers (the leading axis of scanned blocks' parameters). Attention probabilities get
dropout only with attention_dropout_rate > 0, in training, always through the einsum form (cuDNN's kernel here has
none).

Depth: `remat` recomputes each block in the backward pass instead of keeping its activations (a
REMAT_POLICIES name), and `scan_layers` stores the blocks stacked (parameters `trunk.blocks.attn.qkv.kernel`
of shape num_layers x ..., instead of `trunk.blocks.0.attn.qkv.kernel`, ...) and runs them with one
`jax.lax.scan`, so a deep model compiles one block instead of num_layers. Neither changes the numbers:
initial values, outputs and gradients are the same for every combination (layer i's dropout key is
fold_in(key, i) on every path).

The LM decodes with a KV cache: `init_cache` allocates per-layer keys/values for `max_len`
positions (one stacked array per k/v with scanned layers) and `extend(tokens, cache, index)` runs only the
new positions against the cached ones.
"""

import math
from functools import partial

import jax
import jax.numpy as jnp
from flax import nnx

from bigmodel_jax.errors import UserError
from bigmodel_jax.models import MODELS, require_positive
from bigmodel_jax.models.attention import ATTENTIONS, attend
from bigmodel_jax.registry import Registry
from bigmodel_jax.models.layers import LINEAR_OUTPUT, Dropout, ExampleRngs, fold_in, linear_dot_general, own_dtype

POSITIONS: Registry = Registry("position encoding", "config.model.positions")
POSITIONS.register("learned")("learned")
POSITIONS.register("rotary")("rotary")
# config.model.remat -> jax.checkpoint policy: which intermediates of a block the backward pass may keep
REMAT_POLICIES: Registry = Registry("remat policy", "config.model.remat")
# (the projections' dots run inside linear_dot_general's custom VJP, out of the policies' sight: kept by name)
_projections = jax.checkpoint_policies.save_only_these_names(LINEAR_OUTPUT)
for _name, _policy in {"none": None, "full": jax.checkpoint_policies.nothing_saveable,
                       "dots": jax.checkpoint_policies.save_from_both_policies(
                           jax.checkpoint_policies.dots_saveable, _projections),
                       "dots_no_batch": jax.checkpoint_policies.save_from_both_policies(
                           jax.checkpoint_policies.dots_with_no_batch_dims_saveable, _projections)}.items():
  REMAT_POLICIES.register(_name)(_policy)
NORMS: Registry = Registry("block normalisation", "config.model.norm")
NORMS.register("pre")("pre")  # x + f(LN(x)), then a final LayerNorm (GPT-2)
NORMS.register("post")("post")  # LN(x + f(x)), no final LayerNorm (BERT)
GELUS: Registry = Registry("GELU form", "config.model.gelu")
GELUS.register("tanh")(partial(jax.nn.gelu, approximate=True))  # GPT-2's gelu_new (and nnx.gelu's default)


@GELUS.register("exact")
def gelu_exact(x: jax.Array) -> jax.Array:
  """x Phi(x) as PyTorch's nn.GELU() (nanoGPT's, BERT's gelu) computes it: x (1 + erf(x / sqrt 2)) / 2, in float32
  at least (1 + erf cancels in the negative tail: in bfloat16 it would be 0 from -3.5 and 45% off at -3), then cast
  back. The same function as jax.nn.gelu(approximate=False)'s erfc form to float rounding, and on XLA:CPU 1.45x
  faster forward and backward (erfc's tails take selects and an exponential)."""
  x32 = x.astype(jnp.promote_types(x.dtype, jnp.float32))
  return (0.5 * x32 * (1 + jax.lax.erf(x32 * (1 / math.sqrt(2))))).astype(x.dtype)


LAYERS = {nnx.PARTITION_NAME: "layers"}  # the logical name of the stacked axis of scanned blocks


def axes(*names):
  """Logical-axis metadata for a parameter; not applied eagerly (parallel.py places parameters)."""
  return {"out_sharding": names, "eager_sharding": False}


def rotary(x_BxTxHxD: jax.Array, positions_T: jax.Array, base: float = 10000.0) -> jax.Array:
  """Rotary position embedding (RoFormer), rotating the two halves of each head's features."""
  half = x_BxTxHxD.shape[-1] // 2
  freqs = base ** (-jnp.arange(half, dtype=jnp.float32) / half)
  angles = positions_T.astype(jnp.float32)[:, None] * freqs[None, :]  # T x D/2
  sin, cos = jnp.sin(angles)[None, :, None, :], jnp.cos(angles)[None, :, None, :]
  x1, x2 = x_BxTxHxD[..., :half].astype(jnp.float32), x_BxTxHxD[..., half:].astype(jnp.float32)
  return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], -1).astype(x_BxTxHxD.dtype)


class Attention(nnx.Module):
  """Multi-head self-attention with a fused QKV projection, computed by `attend` (`implementation`:
  config.model.attention); `dropout_rate` > 0 drops attention probabilities in training (the einsum form)."""

  def __init__(self, dim: int, num_heads: int, *, rotary_positions: bool, use_bias: bool, out_std: float,
               rngs: nnx.Rngs, dropout_rate: float = 0.0, implementation: str = "auto"):
    self.num_heads, self.head_dim = num_heads, dim // num_heads
    self.implementation = ATTENTIONS.get(implementation)
    self.rotary = rotary_positions
    self.dropout = Dropout(dropout_rate)
    init = nnx.initializers.normal(0.02)
    self.qkv = nnx.LinearGeneral(dim, (3, num_heads, self.head_dim), use_bias=use_bias, kernel_init=init,
                                 kernel_metadata=axes("embed", None, "heads", "head_dim"),
                                 bias_metadata=axes(None, "heads", "head_dim"), dot_general=linear_dot_general,
                                 rngs=rngs)
    self.out = nnx.LinearGeneral((num_heads, self.head_dim), dim, axis=(-2, -1), use_bias=use_bias,
                                 kernel_init=nnx.initializers.normal(out_std),
                                 kernel_metadata=axes("heads", "head_dim", "embed"), bias_metadata=axes("embed"),
                                 dot_general=linear_dot_general, rngs=rngs)

  def __call__(self, x_BxTxD, *, positions_T, mask=None, is_causal=False, cache=None, index=None, train=False,
               rngs=None):
    """-> (output, cache). With a cache, keys/values of these T positions are written at `index` and the
    queries attend to every cached position up to their own."""
    q, k, v = jnp.moveaxis(self.qkv(x_BxTxD), 2, 0)  # each B x T x H x Dh
    if self.rotary:
      q, k = rotary(q, positions_T), rotary(k, positions_T)
    if cache is not None:
      k = jax.lax.dynamic_update_slice(cache["k"], k.astype(cache["k"].dtype), (0, index, 0, 0))
      v = jax.lax.dynamic_update_slice(cache["v"], v.astype(cache["v"].dtype), (0, index, 0, 0))
      cache = {"k": k, "v": v}
      k, v = k.astype(q.dtype), v.astype(q.dtype)  # a float32 cache beside bfloat16 activations
      mask = (jnp.arange(k.shape[1])[None, :] <= positions_T[:, None])[None, None]  # 1 x 1 x T x S
      is_causal = False
    drop = partial(self.dropout, deterministic=False, rngs=rngs) if train and self.dropout.rate > 0 else None
    # decoding with a cache takes einsum's form even under "cudnn" (cuDNN's kernel here takes no cache)
    implementation = "auto" if cache is not None and self.implementation == "cudnn" else self.implementation
    out = attend(q, k, v, implementation=implementation, mask=mask, is_causal=is_causal, drop=drop)
    return self.out(out), cache


class MLP(nnx.Module):
  def __init__(self, dim: int, hidden: int, *, use_bias: bool, out_std: float, rngs: nnx.Rngs, gelu: str = "tanh"):
    self.gelu = gelu
    self.fc1 = nnx.Linear(dim, hidden, use_bias=use_bias, kernel_init=nnx.initializers.normal(0.02),
                          kernel_metadata=axes("embed", "mlp"), bias_metadata=axes("mlp"),
                          dot_general=linear_dot_general, rngs=rngs)
    self.fc2 = nnx.Linear(hidden, dim, use_bias=use_bias, kernel_init=nnx.initializers.normal(out_std),
                          kernel_metadata=axes("mlp", "embed"), bias_metadata=axes("embed"),
                          dot_general=linear_dot_general, rngs=rngs)

  def __call__(self, x):
    return self.fc2(GELUS.get(self.gelu)(self.fc1(x)))


def layer_norm(dim: int, use_bias: bool, rngs: nnx.Rngs, eps: float = 1e-5) -> nnx.LayerNorm:
  return nnx.LayerNorm(dim, epsilon=eps, use_bias=use_bias, scale_metadata=axes("embed"),
                       bias_metadata=axes("embed"), rngs=rngs)


class Block(nnx.Module):
  """Residual block: attention then MLP, each followed by dropout; LayerNorm before each (pre) or after each
  residual sum (post: ln1 after attention, ln2 after the MLP, as BERT's)."""

  def __init__(self, dim: int, num_heads: int, mlp_ratio: int, *, rotary_positions: bool, use_bias: bool,
               dropout_rate: float, num_layers: int, rngs: nnx.Rngs, norm: str = "pre", layer_norm_eps: float = 1e-5,
               gelu: str = "tanh", attention_dropout_rate: float = 0.0, attention: str = "auto"):
    out_std = 0.02 / math.sqrt(2 * num_layers)  # GPT-2: residual projections scaled by depth
    self.post_norm = NORMS.get(norm) == "post"
    self.ln1 = layer_norm(dim, use_bias, rngs, layer_norm_eps)
    self.attn = Attention(dim, num_heads, rotary_positions=rotary_positions, use_bias=use_bias, out_std=out_std,
                          rngs=rngs, dropout_rate=attention_dropout_rate, implementation=attention)
    self.ln2 = layer_norm(dim, use_bias, rngs, layer_norm_eps)
    self.mlp = MLP(dim, mlp_ratio * dim, use_bias=use_bias, out_std=out_std, rngs=rngs, gelu=gelu)
    self.dropout = Dropout(dropout_rate)

  def __call__(self, x, *, positions_T, train, rngs, mask=None, is_causal=False, cache=None, index=None):
    drop = partial(self.dropout, deterministic=not train, rngs=rngs)
    attend = partial(self.attn, positions_T=positions_T, mask=mask, is_causal=is_causal, cache=cache, index=index,
                     train=train, rngs=rngs)
    if self.post_norm:
      h, cache = attend(x)
      x = self.ln1(x + drop(h))
      return self.ln2(x + drop(self.mlp(x))), cache
    h, cache = attend(self.ln1(x))
    x = x + drop(h)
    x = x + drop(self.mlp(self.ln2(x)))
    return x, cache


def stack_modules(modules) -> nnx.Module:
  """Identical modules -> one whose every variable holds theirs stacked on a leading "layers" axis."""
  graphdef = nnx.split(modules[0])[0]
  stacked = jax.tree.map(lambda *xs: jnp.stack(xs), *(nnx.split(m)[1] for m in modules))
  return nnx.merge(graphdef, nnx.spmd.add_axis(stacked, 0, LAYERS))


def _apply_block(graphdef, state, x, key, cache, positions_T, mask, *, train, is_causal, index):
  """A pure function of the block's state, so jax.checkpoint and jax.lax.scan can take it."""
  rngs = None if key is None else ExampleRngs(key)
  return nnx.merge(graphdef, state)(x, positions_T=positions_T, train=train, rngs=rngs, mask=mask,
                                    is_causal=is_causal, cache=cache, index=index)


class Trunk(nnx.Module):
  """Token (+ learned position, + token type 0) embedding (-> LayerNorm with embed_norm) -> dropout -> blocks ->
  final LayerNorm (pre-norm blocks only): shared by the Transformers (gpt, the encoders of models/encoder.py, and
  vit in models/vit.py, which embeds image patches itself: vocab_size 0)."""

  def __init__(self, *, vocab_size: int, max_len: int, num_layers: int, num_heads: int, embed_dim: int,
               mlp_ratio: int, positions: str, dropout_rate: float, use_bias: bool, remat: str, scan_layers: bool,
               rngs: nnx.Rngs, norm: str = "pre", layer_norm_eps: float = 1e-5, gelu: str = "tanh",
               embed_norm: bool = False, type_vocab_size: int = 0, attention_dropout_rate: float = 0.0,
               attention: str = "auto"):
    require_positive(num_layers=num_layers, num_heads=num_heads, embed_dim=embed_dim, mlp_ratio=mlp_ratio,
                     max_len=max_len)
    POSITIONS.get(positions)
    REMAT_POLICIES.get(remat)
    NORMS.get(norm)
    GELUS.get(gelu)
    ATTENTIONS.get(attention)
    if not isinstance(type_vocab_size, int) or type_vocab_size < 0:
      raise UserError(f"config.model.type_vocab_size: must be an integer >= 0 (0: no token-type table), got "
                      f"{type_vocab_size!r}")
    if not isinstance(layer_norm_eps, (int, float)) or layer_norm_eps <= 0:
      raise UserError(f"config.model.layer_norm_eps: must be a number > 0, got {layer_norm_eps!r}")
    if embed_dim % num_heads:
      raise UserError(f"config.model.embed_dim: {embed_dim} is not divisible by config.model.num_heads={num_heads}")
    if positions == "rotary" and (embed_dim // num_heads) % 2:
      raise UserError(f"config.model.embed_dim: rotary positions need an even head size, got "
                      f"{embed_dim}/{num_heads} = {embed_dim // num_heads}")
    self.max_len, self.num_layers, self.remat, self.scan_layers = max_len, num_layers, remat, bool(scan_layers)
    if not 0 <= attention_dropout_rate < 1:
      raise UserError(f"config.model.attention_dropout_rate: must be in [0, 1), got {attention_dropout_rate!r}")
    self.attention_dropout_rate = float(attention_dropout_rate)
    # vocab_size 0: no token embedding; the caller embeds its inputs (ViT's patches) before embed_tokens
    self.embed = nnx.Embed(vocab_size, embed_dim, embedding_init=nnx.initializers.normal(0.02),
                           embedding_metadata=axes("vocab", "embed"), promote_dtype=own_dtype,
                           rngs=rngs) if vocab_size else None
    self.pos_embed = (nnx.Param(nnx.initializers.normal(0.02)(rngs.params(), (max_len, embed_dim)),
                                **axes("positions", "embed")) if positions == "learned" else None)
    self.dropout = Dropout(dropout_rate)
    # scanned blocks are built one by one as the loop does, then stacked: the same initial values
    blocks = [Block(embed_dim, num_heads, mlp_ratio, rotary_positions=positions == "rotary", use_bias=use_bias,
                    dropout_rate=dropout_rate, num_layers=num_layers, rngs=rngs, norm=norm,
                    layer_norm_eps=layer_norm_eps, gelu=gelu, attention_dropout_rate=attention_dropout_rate,
                    attention=attention)
              for _ in range(num_layers)]
    self.blocks = stack_modules(blocks) if self.scan_layers else nnx.List(blocks)
    self.ln_f = layer_norm(embed_dim, use_bias, rngs, layer_norm_eps) if norm == "pre" else None
    # made after everything above, so the defaults (neither) draw the same initial values as before they existed
    self.type_embed = (nnx.Param(nnx.initializers.normal(0.02)(rngs.params(), (type_vocab_size, embed_dim)),
                                 **axes(None, "embed")) if type_vocab_size else None)
    self.embed_ln = layer_norm(embed_dim, use_bias, rngs, layer_norm_eps) if embed_norm else None

  def embed_tokens(self, tokens_BxT, positions_T, prefix_1x1xD=None):
    """Token embeddings (after an optional learned prefix vector, e.g. [CLS]) plus learned positions. Without
    a vocabulary (vocab_size 0) `tokens_BxT` are already vectors, B x T x embed_dim."""
    x = self.embed(tokens_BxT) if self.embed is not None else tokens_BxT
    if prefix_1x1xD is not None:
      x = jnp.concatenate([jnp.broadcast_to(prefix_1x1xD.astype(x.dtype), (x.shape[0], 1, x.shape[2])), x], 1)
    if self.pos_embed is not None:
      x = x + self.pos_embed[...][positions_T][None]
    if self.type_embed is not None:  # every token is of type 0 (BERT's single-segment inputs)
      x = x + self.type_embed[...][0]
    return x if self.embed_ln is None else self.embed_ln(x)

  def __call__(self, x_BxTxD, *, positions_T, train, rngs, mask=None, is_causal=False, cache=None, index=None):
    """-> (output, cache). The cache is a list of per-layer {"k", "v"}, or one {"k", "v"} stacked on the
    layer axis with scanned layers (GPT.init_cache makes either)."""
    x = self.dropout(x_BxTxD, deterministic=not train, rngs=rngs)
    # one key for every block, layer i folding in i: the same masks looped, scanned or rematerialised
    drops = self.dropout.rate > 0 or self.attention_dropout_rate > 0
    key = rngs.dropout() if train and drops and rngs is not None else None  # B keys
    layer_key = lambda i: None if key is None else fold_in(key, i)
    apply = partial(_apply_block, train=train, is_causal=is_causal, index=index)
    policy = REMAT_POLICIES.get(self.remat) if train and cache is None else None  # decoding needs no backward pass
    if policy is not None:
      # prevent_cse stops XLA merging the recomputation back into the forward pass; a scan body cannot be
      # merged so, and there the guard would only cost fusions (as jax.checkpoint's docs advise)
      apply = jax.checkpoint(apply, policy=policy, prevent_cse=not self.scan_layers, static_argnums=0)
    if self.scan_layers:
      graphdef, state = nnx.split(self.blocks)

      def body(x, layer):
        i, state_i, cache_i = layer
        state_i = nnx.spmd.remove_axis(state_i, 0, LAYERS)  # one layer's slice: its axis names lose "layers"
        return apply(graphdef, state_i, x, layer_key(i), cache_i, positions_T, mask)

      x, new_cache = jax.lax.scan(body, x, (jnp.arange(self.num_layers), state, cache))
    else:
      new_cache = []
      for i, block in enumerate(self.blocks):
        x, layer_cache = apply(*nnx.split(block), x, layer_key(i), None if cache is None else cache[i],
                               positions_T, mask)
        new_cache.append(layer_cache)
    return (x if self.ln_f is None else self.ln_f(x)), (new_cache if cache is not None else None)


def _check_text(model: str, vocab_size: int, input_shape, max_len: int, extra: int = 0) -> None:
  if not vocab_size:
    raise UserError(f"config.model.name: {model!r} reads token ids; use a text dataset (config.data.name such as "
                    "tiny_shakespeare, shakespeare_plays, spam_assassin)")
  if input_shape[0] + extra > max_len:
    raise UserError(f"config.data.seq_len: {input_shape[0]}{' + 1 [CLS]' if extra else ''} positions exceed "
                    f"config.model.max_len={max_len}; shorten data.seq_len or raise model.max_len")


@MODELS.register("gpt")
class GPT(nnx.Module):
  """Decoder-only Transformer LM (GPT-2 style): causal self-attention, next-token logits at every position."""

  def __init__(self, *, input_shape, num_outputs: int, vocab_size: int, rngs: nnx.Rngs, num_layers: int = 6,
               num_heads: int = 6, embed_dim: int = 384, mlp_ratio: int = 4, max_len: int = 256,
               positions: str = "learned", tie_embeddings: bool = True, dropout_rate: float = 0.0,
               use_bias: bool = False, remat: str = "none", scan_layers: bool = False,
               norm: str = "pre", layer_norm_eps: float = 1e-5, gelu: str = "tanh", embed_norm: bool = False,
               type_vocab_size: int = 0, attention_dropout_rate: float = 0.0, attention: str = "auto"):
    _check_text("gpt", vocab_size, input_shape, max_len)
    self.max_len = max_len
    self.trunk = Trunk(vocab_size=vocab_size, max_len=max_len, num_layers=num_layers, num_heads=num_heads,
                       embed_dim=embed_dim, mlp_ratio=mlp_ratio, positions=positions, dropout_rate=dropout_rate,
                       use_bias=use_bias, remat=remat, scan_layers=scan_layers, rngs=rngs, norm=norm,
                       layer_norm_eps=layer_norm_eps, gelu=gelu, embed_norm=embed_norm, type_vocab_size=type_vocab_size,
                       attention_dropout_rate=attention_dropout_rate, attention=attention)
    self.head = None if tie_embeddings else nnx.Linear(
        embed_dim, num_outputs, use_bias=False, kernel_init=nnx.initializers.normal(0.02),
        kernel_metadata=axes("embed", "vocab"), rngs=rngs)

  def _logits(self, x_BxTxD):
    return self.trunk.embed.attend(x_BxTxD) if self.head is None else self.head(x_BxTxD)

  def __call__(self, tokens_BxT, *, train: bool, rngs: nnx.Rngs | None = None):
    positions = jnp.arange(tokens_BxT.shape[1])
    x, _ = self.trunk(self.trunk.embed_tokens(tokens_BxT, positions), positions_T=positions, train=train, rngs=rngs,
                      is_causal=True)
    return self._logits(x)  # B x T x V

  def init_cache(self, batch_size: int, dtype=None) -> list[dict] | dict:
    """Zeroed keys/values: per layer B x max_len x H x Dh each; stacked (L x B x ...) with scanned layers. dtype: the
    embedding table's unless given (bfloat16 when the parameters are cast to it for config.train.dtype)."""
    trunk = self.trunk
    dtype = dtype or trunk.embed.embedding[...].dtype
    attn = trunk.blocks.attn if trunk.scan_layers else trunk.blocks[0].attn
    shape = (batch_size, self.max_len, attn.num_heads, attn.head_dim)
    if trunk.scan_layers:
      shape = (trunk.num_layers, *shape)
      return {"k": jnp.zeros(shape, dtype), "v": jnp.zeros(shape, dtype)}
    return [{"k": jnp.zeros(shape, dtype), "v": jnp.zeros(shape, dtype)} for _ in range(trunk.num_layers)]

  def extend(self, tokens_BxT, cache, index):
    """Logits for T new tokens at positions index..index+T-1, attending to the cache -> (logits, cache)."""
    positions = index + jnp.arange(tokens_BxT.shape[1])
    x, cache = self.trunk(self.trunk.embed_tokens(tokens_BxT, positions), positions_T=positions, train=False,
                          rngs=None, cache=cache, index=index)
    return self._logits(x), cache


def __getattr__(name: str):
  """The encoders moved to models/encoder.py; `from bigmodel_jax.models.transformer import EncoderClassifier` still
  works (lazily: encoder.py imports this module)."""
  if name in ("EncoderClassifier", "EncoderMLM", "MLMHead"):
    from bigmodel_jax.models import encoder
    return getattr(encoder, name)
  raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
