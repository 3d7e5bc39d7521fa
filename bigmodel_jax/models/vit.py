"""Vision Transformer (Dosovitskiy et al. 2021, arXiv:2010.11929) on the Transformer trunk of models/transformer.py.

The image is cut into non-overlapping patch_size x patch_size patches, each flattened and linearly projected
to embed_dim (the same as a conv with kernel = stride = patch_size); a learned [CLS] vector goes in front
(pooling="cls") or the outputs are averaged (pooling="mean"); learned position embeddings are added; then the
trunk's pre-LayerNorm blocks and final LayerNorm (transformer.Trunk with no vocabulary), and a linear head.
Parameters carry the trunk's logical axis names (embed, heads, mlp, positions, layers), so parallel.RULES
shards a ViT as it does the text Transformers; remat and scan_layers work as they do there.
"""

from typing import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from bigmodel_jax.errors import UserError
from bigmodel_jax.models import MODELS, require_positive
from bigmodel_jax.models.resnet import check_image
from bigmodel_jax.models.transformer import Trunk, axes

POOLINGS = ("cls", "mean")


def patches(x_BxHxWxC: jax.Array, p: int) -> jax.Array:
  """B x H x W x C -> B x (H/p * W/p) x (p*p*C), patches in row-major order, each flattened (row, col, channel)."""
  b, h, w, c = x_BxHxWxC.shape
  x = x_BxHxWxC.reshape(b, h // p, p, w // p, p, c).transpose(0, 1, 3, 2, 4, 5)
  return x.reshape(b, (h // p) * (w // p), p * p * c)


@MODELS.register("vit")
class ViT(nnx.Module):
  """Patch embedding -> [CLS] + learned positions -> Transformer blocks -> LayerNorm -> pool -> linear head."""

  def __init__(self, *, input_shape: Sequence[int], num_outputs: int, rngs: nnx.Rngs, patch_size: int = 4,
               num_layers: int = 6, num_heads: int = 4, embed_dim: int = 128, mlp_ratio: int = 2,
               pooling: str = "cls", dropout_rate: float = 0.0, use_bias: bool = True, remat: str = "none",
               scan_layers: bool = False, attention: str = "auto"):
    require_positive(patch_size=patch_size)
    h, w, c = check_image("vit", input_shape)
    if h % patch_size or w % patch_size:
      divisor = f"a divisor of {h}" if h == w else f"a common divisor of {h} and {w}"
      raise UserError(f"config.model.patch_size: {patch_size} does not divide the {h}x{w} image; pick {divisor}")
    if pooling not in POOLINGS:
      raise UserError(f"config.model.pooling: unknown {pooling!r}; valid: {', '.join(POOLINGS)}")
    self.patch_size, self.pooling = patch_size, pooling
    num_patches = (h // patch_size) * (w // patch_size)
    self.patch_embed = nnx.Linear(patch_size * patch_size * c, embed_dim, use_bias=use_bias,
                                  kernel_metadata=axes(None, "embed"), bias_metadata=axes("embed"), rngs=rngs)
    self.trunk = Trunk(vocab_size=0, max_len=num_patches + int(pooling == "cls"), num_layers=num_layers,
                       num_heads=num_heads, embed_dim=embed_dim, mlp_ratio=mlp_ratio, positions="learned",
                       dropout_rate=dropout_rate, use_bias=use_bias, remat=remat, scan_layers=scan_layers, rngs=rngs,
                       attention=attention)
    self.cls = (nnx.Param(jnp.zeros((1, 1, embed_dim)), **axes(None, None, "embed")) if pooling == "cls" else None)
    self.head = nnx.Linear(embed_dim, num_outputs, kernel_metadata=axes("embed", None), bias_metadata=axes(None),
                           rngs=rngs)

  def features(self, x_BxHxWxC: jax.Array, *, train: bool = False, rngs=None) -> jax.Array:
    """The pooled, LayerNormed encoder output (B x embed_dim): the head's input."""
    x = self.patch_embed(patches(x_BxHxWxC, self.patch_size))
    positions = jnp.arange(x.shape[1] + int(self.cls is not None))
    x = self.trunk.embed_tokens(x, positions, None if self.cls is None else self.cls[...])
    x, _ = self.trunk(x, positions_T=positions, train=train, rngs=rngs)
    return x[:, 0] if self.cls is not None else x.mean(axis=1)

  def __call__(self, x_BxHxWxC: jax.Array, *, train: bool, rngs=None) -> jax.Array:
    return self.head(self.features(x_BxHxWxC, train=train, rngs=rngs))
