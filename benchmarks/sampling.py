"""Sampling speed: KV-cache decoding (--mode=sample) vs re-running the model on the whole prefix per token.

    python benchmarks/sampling.py --config=configs/shakespeare_char_gpt.py --num_tokens=200

Builds the config's language model with fresh weights (speed does not depend on them), then generates
`num_tokens` tokens from a one-token prompt both ways, greedy, and prints tokens/s and the ratio. The
reference re-runs the model on a fixed max_len window each step (one compilation, as nanoGPT's
generate crops to block_size), so it is what decoding without a cache costs. Both produce the same tokens.
"""

import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags
from flax import nnx
from ml_collections import config_flags

from bigmodel_jax.models import build_model
from bigmodel_jax.sample import generate

_CONFIG = config_flags.DEFINE_config_file("config", "configs/shakespeare_char_gpt.py", "LM config.")
_TOKENS = flags.DEFINE_integer("num_tokens", 200, "Tokens to generate (at most the model's max_len - 1).")
VOCAB = 67  # the char vocabulary of tiny Shakespeare


def main(_):
  config, n = _CONFIG.value, _TOKENS.value
  seq_len = config.data.seq_len
  model = build_model(config.model, input_shape=(seq_len,), num_outputs=VOCAB, vocab_size=VOCAB,
                      rngs=nnx.Rngs(params=0))
  max_len = model.max_len or seq_len
  n = min(n, max_len - 1)
  prompt = np.array([5], np.int32)

  generate(model, prompt, n, temperature=0.0)  # compile
  start = time.perf_counter()
  cached = generate(model, prompt, n, temperature=0.0)
  cached_s = time.perf_counter() - start

  graphdef, state = nnx.split(model)

  @jax.jit
  def next_greedy(state, window_1xL, length):
    logits = nnx.merge(graphdef, state)(window_1xL, train=False)
    return jnp.argmax(logits[0, length - 1]).astype(jnp.int32)

  def full_recompute():
    window = jnp.zeros((1, max_len), jnp.int32).at[0, 0].set(prompt[0])
    out = []
    for i in range(n):
      token = next_greedy(state, window, i + 1)  # causal: padding after position i changes nothing before it
      window = window.at[0, i + 1].set(token)
      out.append(token)
    return np.asarray(jax.device_get(out))

  full_recompute()  # compile
  start = time.perf_counter()
  reference = full_recompute()
  full_s = time.perf_counter() - start

  print(f"\n{config.model.name} ({sum(np.size(x) for x in jax.tree.leaves(state)) / 1e6:.2f} M params), "
        f"{n} tokens, greedy, {jax.devices()[0].device_kind}")
  print(f"{'decoding':36s} {'tokens/s':>10s} {'ratio':>7s}")
  print(f"{'full recompute of a max_len window':36s} {n / full_s:10.1f} {1.0:7.2f}")
  print(f"{'KV cache (--mode=sample)':36s} {n / cached_s:10.1f} {full_s / cached_s:7.2f}")
  print(f"same tokens: {bool(np.array_equal(cached[0], reference))}")


if __name__ == "__main__":
  app.run(main)
