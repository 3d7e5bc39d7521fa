"""LSTM language model: embedding -> stacked LSTM -> linear next-token logits (the seed's "GPT").

Decodes like the Transformer LM (`init_cache` / `extend`), with the LSTM carries as its cache, so
--mode=sample works on either.
"""

import jax.numpy as jnp
from flax import nnx

from bigmodel_jax.models import MODELS, require_positive
from bigmodel_jax.models.transformer import _check_text, axes
from bigmodel_jax.models.layers import Dropout, own_dtype


@MODELS.register("lstm_lm")
class LSTMLM(nnx.Module):

  def __init__(self, *, input_shape, num_outputs: int, vocab_size: int, rngs: nnx.Rngs, embed_dim: int = 256,
               hidden_size: int = 512, num_layers: int = 2, dropout_rate: float = 0.0):
    require_positive(embed_dim=embed_dim, hidden_size=hidden_size, num_layers=num_layers)
    _check_text("lstm_lm", vocab_size, input_shape, max_len=input_shape[0])
    self.max_len = None  # no position limit: the carry summarises any prefix
    self.embed = nnx.Embed(vocab_size, embed_dim, embedding_init=nnx.initializers.normal(0.02),
                           embedding_metadata=axes("vocab", "embed"), promote_dtype=own_dtype, rngs=rngs)
    sizes = [embed_dim] + [hidden_size] * num_layers
    self.layers = nnx.List([
        nnx.RNN(nnx.OptimizedLSTMCell(a, b, kernel_metadata=axes("embed", "mlp"),
                                      recurrent_kernel_metadata=axes("mlp", "mlp"), bias_metadata=axes("mlp"),
                                      rngs=rngs), return_carry=True)
        for a, b in zip(sizes[:-1], sizes[1:])])
    self.dropout = Dropout(dropout_rate)
    self.head = nnx.Linear(hidden_size, num_outputs, kernel_metadata=axes("mlp", "vocab"), bias_metadata=axes("vocab"),
                           rngs=rngs)

  def _run(self, tokens_BxT, carries, train, rngs):
    x = self.dropout(self.embed(tokens_BxT), deterministic=not train, rngs=rngs)
    new_carries = []
    for layer, carry in zip(self.layers, carries):
      carry, x = layer(x, initial_carry=carry)
      x = self.dropout(x, deterministic=not train, rngs=rngs)
      new_carries.append(carry)
    return self.head(x), new_carries

  def __call__(self, tokens_BxT, *, train: bool, rngs: nnx.Rngs | None = None):
    logits, _ = self._run(tokens_BxT, self.init_cache(tokens_BxT.shape[0]), train, rngs)
    return logits  # B x T x V

  def init_cache(self, batch_size: int, dtype=None) -> list:
    """Zeroed carries (c, h) per layer. dtype: the embedding table's unless given (bfloat16 when the parameters are
    cast to it for config.train.dtype: the cells then compute in it, as a GPT's blocks do)."""
    dtype = dtype or self.embed.embedding[...].dtype
    return [tuple(jnp.zeros((batch_size, layer.cell.hidden_features), dtype) for _ in range(2))
            for layer in self.layers]

  def extend(self, tokens_BxT, cache, index):
    del index  # the carry already knows where it is
    return self._run(tokens_BxT, cache, False, None)

