"""Transformer encoders over padded token ids (0 = padding): a text classifier (`encoder_classifier`) and BERT's
masked language model (`encoder_mlm`), on the trunk of models/transformer.py (pre- or post-LayerNorm blocks, see
there). `pooling="cls"` puts a learned [CLS] vector in front of every sequence; BERT's own [CLS] is a token id of
its vocabulary, so a converted BERT (bigmodel_jax.convert) uses `pooling="mean"`, which prepends nothing.
"""

import jax.numpy as jnp
from flax import nnx

from bigmodel_jax.errors import UserError
from bigmodel_jax.models import MODELS
from bigmodel_jax.models.layers import Dropout
from bigmodel_jax.models.transformer import GELUS, Trunk, _check_text, axes, layer_norm


class Encoder(nnx.Module):
  """What both encoders are built from: the trunk and the learned [CLS] vector (pooling "cls"; None for "mean"), the
  same parameter names and shapes in both, so a classifier fine-tuned from a masked LM loads `trunk.*` and `cls`;
  then the model's own head, by the subclass's `make_head(**fields)` (Encoder itself is not a model)."""
  name = ""  # the registered model name, for errors

  def __init__(self, *, input_shape, num_outputs: int, vocab_size: int, rngs: nnx.Rngs, num_layers: int = 4,
               num_heads: int = 4, embed_dim: int = 256, mlp_ratio: int = 4, max_len: int = 513,
               positions: str = "learned", pooling: str = "cls", dropout_rate: float = 0.1, use_bias: bool = True,
               remat: str = "none", scan_layers: bool = False,
               norm: str = "pre", layer_norm_eps: float = 1e-5, gelu: str = "tanh", embed_norm: bool = False,
               type_vocab_size: int = 0, attention: str = "auto"):
    if pooling not in ("cls", "mean"):
      raise UserError(f"config.model.pooling: unknown {pooling!r}; valid: cls, mean (cls: a learned [CLS] vector in "
                      "front of the tokens)")
    _check_text(self.name, vocab_size, input_shape, max_len, extra=int(pooling == "cls"))
    self.pooling = pooling
    self.trunk = Trunk(vocab_size=vocab_size, max_len=max_len, rngs=rngs, num_layers=num_layers, num_heads=num_heads,
                       embed_dim=embed_dim, mlp_ratio=mlp_ratio, positions=positions, dropout_rate=dropout_rate,
                       use_bias=use_bias, remat=remat, scan_layers=scan_layers, norm=norm,
                       layer_norm_eps=layer_norm_eps, gelu=gelu, embed_norm=embed_norm, type_vocab_size=type_vocab_size,
                       attention=attention)
    self.cls = (nnx.Param(nnx.initializers.normal(0.02)(rngs.params(), (1, 1, embed_dim)), **axes(None, None, "embed"))
                if pooling == "cls" else None)
    self.make_head(num_outputs=num_outputs, vocab_size=vocab_size, embed_dim=embed_dim, dropout_rate=dropout_rate,
                   use_bias=use_bias, layer_norm_eps=layer_norm_eps, gelu=gelu, rngs=rngs)

  def encode(self, tokens_BxL, *, train: bool, rngs):
    """The encoder over padded ids (0 = padding, masked out of attention), after the learned [CLS] vector where
    there is one -> (B x S x D, keep B x S), S = L (+ 1 with [CLS] at position 0)."""
    keep_BxL = tokens_BxL != 0
    if self.cls is not None:  # a learned [CLS] vector in front of every sequence
      keep_BxL = jnp.pad(keep_BxL, ((0, 0), (1, 0)), constant_values=True)
    positions = jnp.arange(keep_BxL.shape[1])
    x = self.trunk.embed_tokens(tokens_BxL, positions, None if self.cls is None else self.cls[...])
    x, _ = self.trunk(x, positions_T=positions, train=train, rngs=rngs, mask=keep_BxL[:, None, None, :])
    return x, keep_BxL


@MODELS.register("encoder_classifier")
class EncoderClassifier(Encoder):
  """BERT-style Transformer encoder over padded token ids (0 = padding), pooled, then a linear classifier."""
  name = "encoder_classifier"

  def make_head(self, *, num_outputs, embed_dim, dropout_rate, rngs, **_):
    self.dropout = Dropout(dropout_rate)
    self.head = nnx.Linear(embed_dim, num_outputs, kernel_metadata=axes("embed", None), bias_metadata=axes(None),
                           rngs=rngs)

  def __call__(self, tokens_BxL, *, train: bool, rngs: nnx.Rngs | None = None):
    x, keep_BxL = self.encode(tokens_BxL, train=train, rngs=rngs)
    if self.cls is not None:
      pooled = x[:, 0]
    else:
      weights = keep_BxL[..., None].astype(x.dtype)
      pooled = (x * weights).sum(1) / jnp.maximum(weights.sum(1), 1.0)
    return self.head(self.dropout(pooled, deterministic=not train, rngs=rngs))


@MODELS.register("encoder_mlm")
class EncoderMLM(Encoder):
  """BERT-style masked language model: the encoder_classifier's trunk (and [CLS] vector: the same parameter names
  and shapes, so a classifier fine-tuned from it loads `trunk.*` and `cls`) with BERT's MLM head: dense -> GELU ->
  LayerNorm -> logits over the vocabulary tied to the token embedding, plus a bias. Logits at every input position.
  """
  name = "encoder_mlm"

  def make_head(self, *, vocab_size, embed_dim, use_bias, layer_norm_eps, gelu, rngs, **_):
    self.mlm_head = MLMHead(embed_dim, vocab_size, use_bias=use_bias, rngs=rngs, layer_norm_eps=layer_norm_eps,
                            gelu=gelu)

  def __call__(self, tokens_BxL, *, train: bool, rngs: nnx.Rngs | None = None, positions_BxP=None):
    """Logits B x L x V at every position, or B x P x V at `positions_BxP` only (the masked ones: training
    computes the vocabulary projection, most of the cost, for those alone, as BERT does)."""
    x, _ = self.encode(tokens_BxL, train=train, rngs=rngs)
    if self.cls is not None:
      x = x[:, 1:]  # the token positions
    if positions_BxP is not None:
      x = jnp.take_along_axis(x, positions_BxP[..., None], axis=1)
    return self.mlm_head(x, self.trunk.embed)


class MLMHead(nnx.Module):
  """BERT's prediction head (cls.predictions): transform (dense, GELU, LayerNorm), then the token embedding's
  transpose + a bias. Its GELU and LayerNorm eps are the trunk's."""

  def __init__(self, dim: int, vocab_size: int, *, use_bias: bool, rngs: nnx.Rngs, layer_norm_eps: float = 1e-5,
               gelu: str = "tanh"):
    self.gelu = gelu
    self.dense = nnx.Linear(dim, dim, kernel_init=nnx.initializers.normal(0.02), kernel_metadata=axes("embed", None),
                            bias_metadata=axes(None), rngs=rngs)
    self.ln = layer_norm(dim, use_bias, rngs, layer_norm_eps)
    self.bias = nnx.Param(jnp.zeros((vocab_size,)), **axes("vocab"))

  def __call__(self, x_BxLxD, embed: nnx.Embed):
    return embed.attend(self.ln(GELUS.get(self.gelu)(self.dense(x_BxLxD)))) + self.bias[...]
