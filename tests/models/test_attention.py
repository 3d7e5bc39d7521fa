"""config.model.attention (einsum, cudnn, auto) and the exact GELU's erf form: the same function as the forms they
replaced, to float rounding, and a clear error where cuDNN's kernel cannot run (this CPU)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from bigmodel_jax.config import model_config
from bigmodel_jax.errors import UserError
from bigmodel_jax.models.transformer import GPT, attend, gelu_exact
from test_transformer import MAX_LEN, VOCAB, build, tokens, tolerance

FIELDS = dict(input_shape=(MAX_LEN,), num_outputs=VOCAB, vocab_size=VOCAB, num_layers=2, num_heads=2, embed_dim=16,
              max_len=MAX_LEN)


def test_gelu_exact_is_jaxs_erfc_form_to_float_rounding_tails_included():
  x = jnp.linspace(-12.0, 12.0, 4801, dtype=jnp.float32)  # the far tails too: erf's 1 + erf(-x) cancels there
  ours, erfc = gelu_exact(x), jax.nn.gelu(x, approximate=False)
  # a few roundings of values up to 12 (the erf rational approximation, the product and the halving)
  np.testing.assert_allclose(ours, erfc, rtol=0, atol=tolerance(erfc, 8))
  grad = jax.vmap(jax.grad(gelu_exact))(x)
  np.testing.assert_allclose(grad, jax.vmap(jax.grad(lambda t: jax.nn.gelu(t, approximate=False)))(x), rtol=0,
                             atol=tolerance(grad, 16))
  assert float(grad[0]) == pytest.approx(0.0, abs=1e-6) and float(grad[-1]) == pytest.approx(1.0, abs=1e-6)
  assert ours.dtype == jnp.float32 and gelu_exact(x.astype(jnp.bfloat16)).dtype == jnp.bfloat16


@pytest.mark.parametrize("causal", [True, False])
def test_einsum_attention_is_jaxs_own_xla_form(causal):
  rng = np.random.default_rng(1)
  q, k, v = (jnp.asarray(rng.normal(size=(2, 7, 3, 8)), jnp.float32) for _ in range(3))
  mask = None if causal else jnp.asarray(rng.random((2, 1, 1, 7)) < 0.7).at[..., 0].set(True)
  ref = jax.nn.dot_product_attention(q, k, v, mask=mask, is_causal=causal, implementation="xla")
  for implementation in ("einsum", "auto"):  # auto is einsum on a CPU
    out = attend(q, k, v, implementation=implementation, mask=mask, is_causal=causal)
    np.testing.assert_allclose(out, ref, rtol=0, atol=tolerance(ref, 2 * 8 + 2 * 7 + 8))


def test_auto_on_a_cpu_is_einsum_bit_for_bit_in_the_model_and_its_gradients():
  x = tokens((2, MAX_LEN))
  einsum, auto = build(GPT, **FIELDS, attention="einsum"), build(GPT, **FIELDS, attention="auto")
  np.testing.assert_array_equal(auto(x, train=False), einsum(x, train=False))
  grad = lambda m: nnx.grad(lambda m: jnp.sum(m(x, train=False) ** 2))(m)
  jax.tree.map(np.testing.assert_array_equal, nnx.to_pure_dict(grad(auto)), nnx.to_pure_dict(grad(einsum)))


def test_cudnn_where_it_cannot_run_is_one_line_naming_the_field_and_why():
  model = build(GPT, **FIELDS, attention="cudnn")
  with pytest.raises(UserError) as e:
    model(tokens((2, MAX_LEN)), train=False)
  message = str(e.value)
  assert "\n" not in message and message.startswith("config.model.attention: 'cudnn'") and "GPU" in message


def test_an_unknown_attention_names_the_valid_ones():
  with pytest.raises(UserError, match=r"config.model.attention: unknown .*'flash'.*auto, cudnn, einsum"):
    nnx.eval_shape(lambda: GPT(rngs=nnx.Rngs(0), **FIELDS, attention="flash"))


@pytest.mark.parametrize("name", ["gpt", "encoder_classifier", "encoder_mlm", "vit"])
def test_every_transformer_has_the_field_defaulting_to_auto(name):
  assert model_config(name).attention == "auto"
