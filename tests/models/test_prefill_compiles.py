"""Prompt lengths and compilations: a server's clients choose the length of every prompt, so a new length must
compile nothing once the few power-of-two prefill pieces (and the decode loop) are compiled."""

import jax
import numpy as np
import pytest

from bigmodel_jax import sample
from test_transformer import MAX_LEN, gpt, lstm, naive_greedy, tokens

LOWERING = "/jax/core/compile/jaxpr_to_mlir_module_duration"  # every compilation, persistent cache hit or not


def lowerings(fn) -> int:
  """How many computations `fn()` lowers (each a compilation): jit'd functions and eager jnp operations alike."""
  count = [0]

  def listener(event, duration, **kwargs):
    count[0] += event == LOWERING

  jax.monitoring.register_event_duration_secs_listener(listener)
  try:
    fn()
  finally:
    jax.monitoring.unregister_event_duration_listener(listener)
  return count[0]


@pytest.mark.parametrize("make,samples", [(gpt, 5), (lstm, 7)], ids=["gpt", "lstm"])
def test_prompts_of_new_lengths_compile_nothing_once_the_pieces_have(make, samples):
  """Was: each new prompt length compiled a prefill of its own (without bound for an LSTM); then, with pieces of
  power-of-two lengths, still an eager tile and a slice per piece on the device for each new length. Now a
  prompt is tiled and cut on the host: lengths 1, 2, 4, 8, 16 (a full context: the refill) compile every shape.
  `samples`: a batch no other test uses (an eager operation's compilation is shared by every model)."""
  model = make()
  generate = lambda n: sample.generate(model, tokens((n,), seed=n), 2, num_samples=samples, temperature=0,
                                       banned_ids=(0, 1))[0]
  for n in (1, 2, 4, 8, MAX_LEN):
    generate(n)
  new_lengths = [3, 5, 6, 7, 9, 10, 11, 12, 13, 14, 15]
  out = {}
  assert lowerings(lambda: out.update({n: generate(n) for n in new_lengths})) == 0
  for n in new_lengths:  # the same tokens as one pass over the prompt would give
    np.testing.assert_array_equal(out[n], naive_greedy(model, tokens((n,), seed=n), 2, max_len=model.max_len))
