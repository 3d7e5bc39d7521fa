"""config.model.attention (einsum, cudnn, auto) and the exact GELU's erf form: the same function as the forms they
replaced, to float rounding; "auto"'s choice on a (faked) GPU, with jax.nn.dot_product_attention spied on; a clear
error where cuDNN's kernel cannot run; bfloat16 runs that compute in bfloat16."""

import math
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from bigmodel_jax.config import model_config
from bigmodel_jax.errors import UserError
from bigmodel_jax.models import attention as attention_lib
from bigmodel_jax.models.attention import attend, attention
from bigmodel_jax.models.transformer import GPT, gelu_exact
from bigmodel_jax.state import cast_floats
from test_transformer import MAX_LEN, VOCAB, build, tokens, tolerance, transformer_depth

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


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_gelu_exact_in_16_bits_is_the_true_value_rounded_once(dtype):
  x = jnp.linspace(-6.0, 6.0, 1201).astype(dtype)
  ours = gelu_exact(x)
  assert ours.dtype == dtype
  exact = np.array([t * (1 + math.erf(t / math.sqrt(2))) / 2 for t in np.asarray(x, np.float64)])
  # computed in float32 and rounded once to the 16-bit format: an ulp of the value, plus float32's rounding of
  # 1 + erf, at most eps32 / 2 absolute, times x / 2 (where 1 + erf cancels, below -5, the value is under 3e-7),
  # plus float16's subnormal spacing there.
  # Computed in 16 bits it would cancel from -3: 0 from -3.5 in bfloat16, 45% off at -3.
  x64, ulp, eps32 = np.asarray(x, np.float64), float(jnp.finfo(dtype).eps), float(jnp.finfo(jnp.float32).eps)
  error = np.abs(np.asarray(ours, np.float64) - exact)
  bound = ulp * np.abs(exact) + eps32 * np.abs(x64) + float(jnp.finfo(dtype).smallest_subnormal)
  assert np.all(error <= bound), x64[np.argmax(error - bound)]


@pytest.mark.parametrize("causal", [True, False])
def test_einsum_attention_is_jaxs_own_xla_form(causal):
  rng = np.random.default_rng(1)
  q, k, v = (jnp.asarray(rng.normal(size=(3, 7, 3, 8)), jnp.float32) for _ in range(3))
  mask = None if causal else jnp.asarray(rng.random((3, 1, 1, 7)) < 0.7).at[..., 0].set(True).at[2].set(False)
  ref = jax.nn.dot_product_attention(q, k, v, mask=mask, is_causal=causal, implementation="xla")
  for implementation in ("einsum", "auto"):  # auto is einsum on a CPU
    out = attend(q, k, v, implementation=implementation, mask=mask, is_causal=causal)
    np.testing.assert_allclose(out, ref, rtol=0, atol=tolerance(ref, 2 * 8 + 2 * 7 + 8))
  if mask is not None:  # a row with every key masked: the mean of the values, as jax's form gives, not NaN
    np.testing.assert_allclose(out[2], jnp.broadcast_to(v[2].mean(0), out[2].shape), rtol=0,
                               atol=tolerance(ref, 2 * 7))


def test_auto_on_a_cpu_is_einsum_bit_for_bit_in_the_model_and_its_gradients():
  x = tokens((2, MAX_LEN))
  einsum, auto = build(GPT, **FIELDS, attention="einsum"), build(GPT, **FIELDS, attention="auto")
  np.testing.assert_array_equal(auto(x, train=False), einsum(x, train=False))
  grad = nnx.jit(nnx.grad(lambda m: jnp.sum(m(x, train=False) ** 2)))
  jax.tree.map(np.testing.assert_array_equal, nnx.to_pure_dict(grad(auto)), nnx.to_pure_dict(grad(einsum)))


def fake_gpu(version="cuda 12.8", capability="9.0"):
  return types.SimpleNamespace(platform="gpu", client=types.SimpleNamespace(platform_version=version),
                               compute_capability=capability)


@pytest.fixture
def on_a_fake_gpu(monkeypatch):
  """attend() sees an H100 (or the device given to `use`); jax.nn.dot_product_attention records its calls and
  answers with the einsum form (there is no cuDNN here)."""
  calls = []

  def spy(q, k, v, *, is_causal=False, implementation=None, **rest):
    calls.append({"implementation": implementation, "is_causal": is_causal, "dtype": q.dtype, **rest})
    return attention(q, k, v, is_causal=is_causal)
  monkeypatch.setattr(jax.nn, "dot_product_attention", spy)
  use = lambda device: monkeypatch.setattr(attention_lib, "_device", lambda: device)
  use(fake_gpu())
  return calls, use


def qkv(dtype=jnp.bfloat16, head=32, t=8):
  rng = np.random.default_rng(0)
  return [jnp.asarray(rng.normal(size=(2, t, 2, head)), dtype) for _ in range(3)]


def test_auto_takes_cudnn_only_where_it_applies(on_a_fake_gpu):
  calls, use = on_a_fake_gpu
  attend(*qkv(), is_causal=True)
  assert calls == [{"implementation": "cudnn", "is_causal": True, "dtype": jnp.bfloat16}]
  attend(*qkv(jnp.float16), is_causal=False)
  assert calls[-1] == {"implementation": "cudnn", "is_causal": False, "dtype": jnp.float16}
  calls.clear()
  mask = jnp.ones((2, 1, 1, 8), bool)
  for q, k, v, kwargs in [(*qkv(jnp.float32), {}), (*qkv(), {"mask": mask}), (*qkv(), {"drop": lambda p: p}),
                          (*qkv(head=136), {}), (*qkv(head=12), {})]:
    out = attend(q, k, v, is_causal=True, **kwargs)
    assert out.shape == q.shape
  assert calls == []  # float32, a padding mask or cache, dropout, a head over 128 or not a multiple of 8: einsum
  for device in (fake_gpu("rocm 6.2", "gfx90a"), fake_gpu("rocm 6.2", "9.0"), fake_gpu(capability="7.5"),
                 fake_gpu(capability="sm_xx")):
    use(device)
    attend(*qkv(), is_causal=True)  # AMD GPUs, a pre-Ampere one, an unreadable capability: einsum, no crash
  assert calls == []


def test_what_attend_took_is_recorded_and_portable_takes_einsum(on_a_fake_gpu):
  calls, _ = on_a_fake_gpu
  attention_lib.TAKEN.clear()
  attend(*qkv(), is_causal=True)
  assert attention_lib.TAKEN == {"cudnn"} and len(calls) == 1
  attention_lib.TAKEN.clear()
  with attention_lib.portable():  # an export: no cuDNN kernel in an artifact for several platforms
    for implementation in ("auto", "cudnn"):
      attend(*qkv(), implementation=implementation, is_causal=True)
  assert attention_lib.TAKEN == {"einsum"} and len(calls) == 1
  attend(*qkv(), is_causal=True)  # and after it, cuDNN's again
  assert attention_lib.TAKEN == {"einsum", "cudnn"} and len(calls) == 2


def test_cudnn_where_it_cannot_run_is_one_line_naming_the_field_and_why(on_a_fake_gpu):
  with pytest.raises(UserError, match=r"^config.model.attention: 'cudnn' does not apply here: it needs 16-bit"):
    attend(*qkv(jnp.float32), implementation="cudnn", is_causal=True)
  with pytest.raises(UserError, match="no dropout"):
    attend(*qkv(), implementation="cudnn", is_causal=True, drop=lambda p: p)


def test_cudnn_on_this_cpu_is_a_one_line_error():
  model = build(GPT, **FIELDS, attention="cudnn")
  with pytest.raises(UserError) as e:
    model(tokens((2, MAX_LEN)), train=False)
  message = str(e.value)
  assert "\n" not in message and message.startswith("config.model.attention: 'cudnn'") and "GPU" in message


def test_a_bfloat16_gpt_computes_in_bfloat16_and_takes_cudnn_on_a_gpu(on_a_fake_gpu):
  """train.dtype bfloat16 casts the parameters; the embedding then looks up (and the tied head attends) in bfloat16,
  so attention gets bfloat16 queries: before, nnx.Embed's float32 setting made the whole network float32."""
  calls, _ = on_a_fake_gpu
  model = build(GPT, **{**FIELDS, "embed_dim": 32})  # 2 heads of 16
  graphdef, params = nnx.split(model)
  bf16 = nnx.merge(graphdef, cast_floats(params, jnp.bfloat16))
  logits = bf16(tokens((2, MAX_LEN)), train=False)
  assert logits.dtype == jnp.bfloat16
  assert calls and {c["dtype"] for c in calls} == {jnp.dtype(jnp.bfloat16)}
  assert {c["implementation"] for c in calls} == {"cudnn"}
  # in float32 nothing changed: einsum, float32 logits
  calls.clear()
  assert model(tokens((2, MAX_LEN)), train=False).dtype == jnp.float32 and calls == []


@pytest.mark.parametrize("scan", [False, True])
@pytest.mark.parametrize("implementation", ["auto", "cudnn"])
def test_a_bfloat16_gpt_decodes_with_its_cache_as_its_full_pass(on_a_fake_gpu, scan, implementation):
  """KV-cache decoding of a bfloat16 model (the cache in the table's dtype; a float32 one given explicitly is cast
  to the activations'), scanned layers too, and under "cudnn" (the cache takes einsum's form)."""
  calls, _ = on_a_fake_gpu
  model = build(GPT, **{**FIELDS, "embed_dim": 32, "scan_layers": scan, "attention": implementation})
  graphdef, params = nnx.split(model)
  bf16 = nnx.merge(graphdef, cast_floats(params, jnp.bfloat16))
  x = tokens((2, MAX_LEN))
  full = nnx.jit(lambda m, x: m(x, train=False))(bf16, x)
  extend = nnx.jit(lambda m, x, cache, t: m.extend(x, cache, t))
  assert {a.dtype for a in jax.tree.leaves(bf16.init_cache(2))} == {jnp.dtype(jnp.bfloat16)}
  for cache in (bf16.init_cache(2), bf16.init_cache(2, jnp.float32)):
    logits, cache = extend(bf16, x[:, :4], cache, 0)  # a prompt, then one token at a time
    steps = [logits]
    for t in range(4, 7):
      logits, cache = extend(bf16, x[:, t:t + 1], cache, t)
      steps.append(logits)
    decoded, reference = np.asarray(jnp.concatenate(steps, 1), np.float32), np.asarray(full[:, :7], np.float32)
    assert steps[-1].dtype == jnp.bfloat16
    np.testing.assert_allclose(decoded, reference, rtol=0,
                               atol=tolerance(reference, 2 * transformer_depth(embed_dim=32), np.dtype(jnp.bfloat16)))
  assert {c["implementation"] for c in calls} == {"cudnn"} and len(calls) == (1 if scan else 2)  # the full pass only


def test_an_unknown_attention_names_the_valid_ones():
  with pytest.raises(UserError, match=r"config.model.attention: unknown .*'flash'.*auto, cudnn, einsum"):
    nnx.eval_shape(lambda: GPT(rngs=nnx.Rngs(0), **FIELDS, attention="flash"))


@pytest.mark.parametrize("name", ["gpt", "encoder_classifier", "encoder_mlm", "vit"])
def test_every_transformer_has_the_field_defaulting_to_auto(name):
  assert model_config(name).attention == "auto"
