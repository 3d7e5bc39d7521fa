"""The text models' math: causal masking, KV-cache decoding equal to the full forward pass, sampling rules,
padding invariance of the encoder, logical axis names, a tiny GPT memorising real text, and bad fields.
Rematerialised and scanned layers give the same initial values, outputs, gradients and samples as plain ones.

Models are built abstractly (nnx.eval_shape) and filled with numpy random parameters: a real initialisation
compiles one random kernel per parameter shape, seconds on a 2-core CPU for nothing these tests need. Token
inputs are synthetic where the property is about the math (any ids will do); learning uses real text.
"""

import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from bigmodel_jax import sample
from bigmodel_jax.data.tokenizers import CharTokenizer
from bigmodel_jax.errors import UserError
from bigmodel_jax.models.layers import seed_key
from bigmodel_jax.models.rnn import LSTMLM
from bigmodel_jax.models.transformer import GPT, EncoderClassifier

VOCAB = 11
MAX_LEN = 16
LOGICAL_AXES = {"vocab", "embed", "heads", "head_dim", "mlp", "positions", "layers", None}
REMATS = ["none", "full", "dots", "dots_no_batch"]


def build(cls, *, std=0.3, seed=0, **fields):
  """`cls(**fields)` with numpy-random parameters: kernels N(0, std), LayerNorm scales 1 + N(0, std)."""
  abstract = nnx.eval_shape(lambda: cls(rngs=nnx.Rngs(0), **fields))
  graphdef, state = nnx.split(abstract)
  rng = np.random.default_rng(seed)

  def fill(path, a):
    if jax.dtypes.issubdtype(a.dtype, jax.dtypes.prng_key):  # an nnx.RNN's own rng stream (unused here)
      return jax.random.key(seed)
    if not jnp.issubdtype(a.dtype, jnp.floating):
      return jnp.zeros(a.shape, a.dtype)
    value = std * rng.normal(size=a.shape)
    return jnp.asarray(value + 1.0 if "scale" in jax.tree_util.keystr(path) else value, a.dtype)
  return nnx.merge(graphdef, jax.tree_util.tree_map_with_path(fill, state))


def stack_layers(tree):
  """A looped model's pure-dict state (or gradients) in the scanned layout: trunk.blocks.{0..L-1}.x stacked
  into trunk.blocks.x."""
  blocks = tree["trunk"]["blocks"]
  stacked = jax.tree.map(lambda *xs: jnp.stack(xs), *(blocks[i] for i in sorted(blocks)))
  return {**tree, "trunk": {**tree["trunk"], "blocks": stacked}}


def scanned(model, cls, **fields):
  """The scan_layers=True twin of a looped model: the same parameter values, stacked."""
  graphdef, state = nnx.split(nnx.eval_shape(lambda: cls(rngs=nnx.Rngs(0), **fields, scan_layers=True)))
  nnx.replace_by_pure_dict(state, stack_layers(nnx.to_pure_dict(nnx.state(model))))
  return nnx.merge(graphdef, state)


def gpt(positions="learned", max_len=MAX_LEN, scan_layers=False):
  # Untied output head and N(0, 1) weights: a random model whose greedy continuations vary (a tied random
  # one tends to repeat one token forever, which would make the decoding comparisons weak).
  fields = dict(input_shape=(max_len,), num_outputs=VOCAB, vocab_size=VOCAB, num_layers=2, num_heads=2,
                embed_dim=16, max_len=max_len, positions=positions, tie_embeddings=False)
  model = build(GPT, std=1.0, **fields)
  return scanned(model, GPT, **fields) if scan_layers else model


def lstm():
  return build(LSTMLM, std=1.0, input_shape=(MAX_LEN,), num_outputs=VOCAB, vocab_size=VOCAB, embed_dim=8,
               hidden_size=16, num_layers=2)


def encoder(pooling, positions="learned", seq_len=MAX_LEN):
  return build(EncoderClassifier, input_shape=(seq_len,), num_outputs=3, vocab_size=VOCAB, num_layers=2,
               num_heads=2, embed_dim=16, max_len=seq_len + 1, positions=positions, pooling=pooling)


def transformer_depth(num_layers=2, embed_dim=16, num_heads=2, seq_len=MAX_LEN, mlp_ratio=4) -> int:
  """Roundings on the longest path of a pre-LN Transformer's forward pass: a reduction of n terms adds up to n
  (per layer two LayerNorms' mean and variance, the q/k/v and output projections, the attention scores, the
  softmax sum and its weighted sum, the MLP's two matmuls; then the final LayerNorm and the head)."""
  per_layer = 2 * 2 * embed_dim + 2 * embed_dim + embed_dim // num_heads + 2 * seq_len + (1 + mlp_ratio) * embed_dim
  return num_layers * per_layer + 2 * embed_dim + embed_dim


def lstm_depth(num_layers=2, embed_dim=8, hidden_size=16, seq_len=MAX_LEN) -> int:
  """An LSTM's recurrence is sequential: every step's gates reduce over its input and hidden state."""
  return num_layers * seq_len * (embed_dim + hidden_size) + hidden_size


def tolerance(reference, depth: int, dtype=np.float32) -> float:
  """Absolute tolerance for two evaluation orders of the same float computation (a KV-cache step vs the full
  pass, a scan vs a loop): at most `depth` roundings of the values' scale, the linear worst-case bound. It holds
  whatever order a CPU's vector width or FMA picks (AVX2 and AVX-512 sum differently), unlike a tolerance read
  off one machine's result."""
  return float(jnp.finfo(dtype).eps) * depth * float(np.abs(reference).max())


DEPTHS = {"learned": transformer_depth(), "rotary": transformer_depth(), "scanned": transformer_depth(),
          "lstm": lstm_depth()}


@pytest.fixture(scope="module")
def models():
  # "scanned": the "learned" model's parameters with scan_layers=True
  return {"learned": gpt("learned"), "rotary": gpt("rotary"), "scanned": gpt("learned", scan_layers=True),
          "lstm": lstm()}


@nnx.jit
def forward(model, tokens_BxT):
  return model(tokens_BxT, train=False)


@nnx.jit
def extend(model, tokens_BxT, cache, index):
  return model.extend(tokens_BxT, cache, index)


def tokens(shape, seed=0, low=2):
  """Synthetic ids (no padding 0 / unknown 1 unless low says so)."""
  return np.random.default_rng(seed).integers(low, VOCAB, size=shape).astype(np.int32)


# --- causal masking -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("positions", ["learned", "rotary", "scanned"])
def test_gpt_is_causal(models, positions):
  model = models[positions]
  base = tokens((MAX_LEN,))
  # row t: the base sequence with token t changed
  changed = np.tile(base, (MAX_LEN, 1))
  for t in range(MAX_LEN):
    changed[t, t] = (base[t] - 1) % (VOCAB - 2) + 2  # the next id after base[t] among 2..VOCAB-1
  logits = np.asarray(forward(model, jnp.asarray(np.vstack([base[None], changed]))))
  reference, others = logits[0], logits[1:]
  for t in range(MAX_LEN):
    np.testing.assert_allclose(others[t, :t], reference[:t], rtol=0, atol=1e-6,
                               err_msg=f"token {t} changed an earlier position")
    assert np.abs(others[t, t:] - reference[t:]).max() > 1e-3, f"token {t} changed nothing at or after itself"


# --- KV cache --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["learned", "rotary", "scanned", "lstm"])
@pytest.mark.parametrize("prefix", [1, 5])
def test_extend_one_token_at_a_time_equals_the_full_forward_pass(models, name, prefix):
  model = models[name]
  seq = jnp.asarray(tokens((3, MAX_LEN), seed=1))
  full = np.asarray(forward(model, seq))
  cache = model.init_cache(3)
  logits, cache = extend(model, seq[:, :prefix], cache, 0)
  steps = [np.asarray(logits)]
  for t in range(prefix, MAX_LEN):
    logits, cache = extend(model, seq[:, t:t + 1], cache, t)
    steps.append(np.asarray(logits))
  np.testing.assert_allclose(np.concatenate(steps, axis=1), full, rtol=0, atol=tolerance(full, DEPTHS[name]))
  assert np.abs(full).max() > 0.1  # logits that are not trivially small, so the tolerance means something


# --- generate ---------------------------------------------------------------------------------------------------

def naive_greedy(model, prompt, num_tokens, max_len=None, banned=(0, 1), sliding=False):
  """The whole model re-run on the context every step; argmax of the last position, `banned` ids excluded.

  With a `max_len`, sample.py's refill rule: a token is drawn from a context of up to max_len tokens; once it
  grows past max_len, the context restarts from its last max_len // 2 (`sliding`: another rule, for contrast:
  a window of the last max_len tokens, re-run every step). The context is right-padded
  to one fixed width so that one compilation serves every step; a causal model's logits at the context's last
  position do not see the padding after it (test_gpt_is_causal).
  """
  context = list(prompt[-max_len:] if max_len else prompt)
  width = max_len or len(prompt) + num_tokens
  out = []
  for _ in range(num_tokens):
    if max_len and len(context) > max_len:
      context = context[-(max_len if sliding else max_len // 2):]
    padded = np.zeros((1, width), np.int32)
    padded[0, :len(context)] = context
    logits = np.array(forward(model, jnp.asarray(padded))[0, len(context) - 1])
    logits[list(banned)] = -np.inf
    out.append(int(np.argmax(logits)))
    context.append(out[-1])
  return np.asarray(out)


@pytest.mark.parametrize("positions", ["learned", "rotary", "scanned"])
def test_greedy_generate_equals_naive_greedy_within_max_len(models, positions):
  model = models[positions]
  prompt = tokens((5,), seed=2)
  out = sample.generate(model, prompt, MAX_LEN - 5, temperature=0, num_samples=2, banned_ids=(0, 1))
  assert out.shape == (2, MAX_LEN - 5) and out.dtype == np.int32
  expected = naive_greedy(model, prompt, MAX_LEN - 5)
  np.testing.assert_array_equal(out[0], expected)
  np.testing.assert_array_equal(out[1], expected)  # temperature 0: every sample is the same
  assert len(set(expected.tolist())) > 2  # not a degenerate model that repeats one token


@pytest.fixture(scope="module")
def short_gpt():
  return gpt("learned", max_len=8)


@pytest.mark.parametrize("prompt_len", [3, 8, 13], ids=["short-prompt", "prompt=max_len", "prompt>max_len"])
def test_greedy_generate_past_max_len_follows_the_refill_rule(short_gpt, prompt_len):
  prompt = tokens((prompt_len,), seed=3)
  out = sample.generate(short_gpt, prompt, 21, temperature=0, banned_ids=(0, 1))
  expected = naive_greedy(short_gpt, prompt, 21, max_len=8)
  np.testing.assert_array_equal(out[0], expected)
  # the comparison can tell refill rules apart: another rule gives other tokens on this model and prompt
  assert not np.array_equal(expected, naive_greedy(short_gpt, prompt, 21, max_len=8, sliding=True))


def test_generate_context_caps_a_longer_max_len(models):
  # sampling attends to at most the trained sequence length (`context`), even where max_len allows more
  model = models["learned"]
  prompt = tokens((3,), seed=5)
  out = sample.generate(model, prompt, 21, temperature=0, banned_ids=(0, 1), context=8)
  np.testing.assert_array_equal(out[0], naive_greedy(model, prompt, 21, max_len=8))


def test_scanned_gpt_samples_the_same_tokens_as_the_looped_one(short_gpt):
  short_scanned = gpt("learned", max_len=8, scan_layers=True)  # short_gpt's parameters, stacked
  assert jax.tree.map(jnp.shape, short_scanned.init_cache(3)) == {"k": (2, 3, 8, 2, 8), "v": (2, 3, 8, 2, 8)}
  # sampled (not only greedy: test_greedy_generate_equals_naive_greedy_within_max_len has that), and past
  # max_len, so the stacked cache is also refilled as the per-layer one is
  prompt = tokens((4,), seed=9)
  settings = dict(num_samples=3, temperature=1.0, seed=2, banned_ids=(0, 1))
  np.testing.assert_array_equal(sample.generate(short_scanned, prompt, 21, **settings),
                                sample.generate(short_gpt, prompt, 21, **settings))


def test_lstm_greedy_generate_equals_naive_greedy(models):
  model = models["lstm"]
  prompt = tokens((4,), seed=4)
  expected = naive_greedy(model, prompt, 2 * MAX_LEN)
  assert len(set(expected.tolist())) > 2  # a random model whose continuation varies
  out = sample.generate(model, prompt, 2 * MAX_LEN, temperature=0, banned_ids=(0, 1))  # no position limit
  np.testing.assert_array_equal(out[0], expected)



def test_a_bfloat16_lstm_computes_in_bfloat16(models):
  """train.dtype bfloat16 casts the parameters: the lookup and the carries are then bfloat16, so the cells and the
  head compute in it (before, nnx.Embed's float32 setting and float32 zero carries made it all float32)."""
  from bigmodel_jax.state import cast_floats
  graphdef, params = nnx.split(models["lstm"])
  bf16, x = nnx.merge(graphdef, cast_floats(params, jnp.bfloat16)), tokens((2, MAX_LEN))
  logits = bf16(x, train=False)
  assert logits.dtype == jnp.bfloat16 and all(c.dtype == jnp.bfloat16 for pair in bf16.init_cache(2) for c in pair)
  full = models["lstm"](x, train=False)
  assert full.dtype == jnp.float32  # float32 unchanged
  # bfloat16's roundings where float32 had its own, as a random walk over the recurrence's depth (~1% seen here; the
  # linear worst case, tolerance(), would be several times the logits themselves)
  bound = float(jnp.finfo(jnp.bfloat16).eps) * np.sqrt(lstm_depth()) * float(np.abs(full).max())
  np.testing.assert_allclose(np.asarray(logits, np.float32), full, rtol=0, atol=bound)
  first, cache = bf16.extend(x[:, :5], bf16.init_cache(2), 0)  # decoding: the same dtype, the full pass's values
  rest, _ = bf16.extend(x[:, 5:], cache, 5)
  assert rest.dtype == jnp.bfloat16
  np.testing.assert_allclose(np.concatenate([first, rest], 1).astype(np.float32), np.asarray(logits, np.float32),
                             rtol=0, atol=bound)

def test_banned_ids_are_never_sampled(models):
  model = models["learned"]
  prompt = tokens((3,), seed=5)
  banned = tuple(range(0, VOCAB - 3))  # only the last three ids may appear
  out = sample.generate(model, prompt, 12, num_samples=8, temperature=2.0, banned_ids=banned, seed=1)
  assert set(out.ravel().tolist()) == {VOCAB - 3, VOCAB - 2, VOCAB - 1}
  # greedy with its favourite token banned takes the next best every time, as the naive loop does
  top = int(np.bincount(naive_greedy(model, prompt, 12)).argmax())
  without_top = sample.generate(model, prompt, 12, temperature=0, banned_ids=(0, 1, top))[0]
  assert top not in without_top.tolist()
  np.testing.assert_array_equal(without_top, naive_greedy(model, prompt, 12, banned=(0, 1, top)))


def test_top_k_1_and_tiny_top_p_are_greedy(models):
  logits = jnp.asarray(np.random.default_rng(0).normal(size=(500, VOCAB)) * 3, jnp.float32)
  argmax = np.asarray(jnp.argmax(logits, -1))
  for seed in (0, 1):
    key = jax.random.key(seed)
    draw = lambda t, k, p: sample.next_token(logits, key, sample.sampling_knobs(t, k, p), greedy=False)
    np.testing.assert_array_equal(draw(1.0, 1, 1.0), argmax)
    np.testing.assert_array_equal(draw(1.0, 0, 1e-6), argmax)
    assert not np.array_equal(draw(1.0, 0, 1.0), argmax)
  # through generate too: top_k=1 at temperature 1 decodes exactly as greedy
  model = models["rotary"]
  prompt = tokens((4,), seed=6)
  np.testing.assert_array_equal(sample.generate(model, prompt, 10, temperature=1.0, top_k=1, seed=5)[0],
                                naive_greedy(model, prompt, 10, banned=()))


def test_same_seed_same_tokens_other_seed_other_tokens(models):
  model = models["learned"]
  prompt = tokens((4,), seed=7)
  a = sample.generate(model, prompt, 10, num_samples=3, temperature=1.0, seed=3)
  b = sample.generate(model, prompt, 10, num_samples=3, temperature=1.0, seed=3)
  c = sample.generate(model, prompt, 10, num_samples=3, temperature=1.0, seed=4)
  np.testing.assert_array_equal(a, b)
  assert not np.array_equal(a, c)
  assert not np.array_equal(a[0], a[1])  # the samples of one call differ from each other too


def test_seeds_2_to_the_32_apart_sample_other_tokens(models):
  """Without x64, jax.random.PRNGKey keeps a seed's low 32 bits: seed 2**32 + 3 sampled seed 3's very tokens."""
  np.testing.assert_array_equal(seed_key(3), jax.random.PRNGKey(3))  # below 2**32: the key it always was
  model = models["learned"]
  prompt = tokens((4,), seed=7)
  a, b = (sample.generate(model, prompt, 10, num_samples=3, temperature=1.0, seed=s) for s in (3, 2 ** 32 + 3))
  assert not np.array_equal(a, b)


def test_filter_logits_keeps_the_top_k_and_the_nucleus():
  logits = jnp.log(jnp.asarray([[0.5, 0.3, 0.15, 0.05]]))
  kept = lambda **kw: np.isfinite(np.asarray(sample.filter_logits(logits, temperature=1.0, **kw)))[0].tolist()
  assert kept(top_k=2, top_p=1.0) == [True, True, False, False]
  assert kept(top_k=0, top_p=0.7) == [True, True, False, False]  # 0.5 < 0.7 <= 0.5 + 0.3
  assert kept(top_k=0, top_p=0.5) == [True, False, False, False]
  assert kept(top_k=0, top_p=1.0) == [True] * 4


# --- encoder classifier ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("pooling,positions", [("cls", "learned"), ("mean", "learned"), ("mean", "rotary")])
def test_encoder_padding_does_not_change_logits(pooling, positions):
  model = encoder(pooling, positions)
  text = tokens((5,), seed=8)
  rows = np.zeros((4, MAX_LEN), np.int32)
  rows[:3, :5] = text  # padded to MAX_LEN
  rows[1, 2] = (text[2] - 1) % (VOCAB - 2) + 2  # one real token changed
  rows[2, 5] = 2  # one more real token
  # rows[3]: all padding (an email whose body is empty), which must still give finite logits
  logits = np.asarray(forward(model, jnp.asarray(rows)))
  assert np.isfinite(logits).all()
  for length in (5,):  # the same text with no padding
    fewer_pads = np.asarray(forward(model, jnp.asarray(rows[:1, :length])))
    np.testing.assert_allclose(fewer_pads[0], logits[0], rtol=0, atol=tolerance(logits[0], transformer_depth()))
  assert np.abs(logits[1] - logits[0]).max() > 1e-3
  assert np.abs(logits[2] - logits[0]).max() > 1e-3


# --- logical axis names ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("cls,fields", [
    (GPT, dict(positions="learned", tie_embeddings=False)),
    (GPT, dict(positions="rotary", use_bias=True)),
    (EncoderClassifier, dict(pooling="cls")),
    (EncoderClassifier, dict(pooling="mean")),
    (GPT, dict(positions="rotary", use_bias=True, scan_layers=True)),
    (EncoderClassifier, dict(pooling="cls", scan_layers=True)),
], ids=["gpt-learned-untied", "gpt-rotary-bias", "encoder-cls", "encoder-mean", "gpt-scanned", "encoder-scanned"])
def test_parameters_carry_logical_axis_names(cls, fields):
  model = nnx.eval_shape(lambda: cls(input_shape=(8,), num_outputs=VOCAB, vocab_size=VOCAB, num_layers=2, num_heads=2,
                                     embed_dim=16, max_len=9, rngs=nnx.Rngs(0), **fields))
  params = nnx.state(model, nnx.Param)
  specs = nnx.get_partition_spec(params)
  is_spec = lambda x: isinstance(x, jax.sharding.PartitionSpec)
  flat_specs = {jax.tree_util.keystr(p): s for p, s in jax.tree_util.tree_flatten_with_path(specs, is_leaf=is_spec)[0]}
  flat_params = {jax.tree_util.keystr(p): a for p, a in jax.tree_util.tree_flatten_with_path(params)[0]}
  assert flat_specs.keys() == flat_params.keys() and len(flat_specs) > 10
  for path, spec in flat_specs.items():
    assert is_spec(spec), (path, spec)
    assert set(spec) <= LOGICAL_AXES, (path, spec)
    assert len(spec) == flat_params[path].ndim, (path, spec)  # one name (or None) per axis
  named = {path: tuple(spec) for path, spec in flat_specs.items()}
  qkv = [path for path in named if "qkv" in path and "kernel" in path]
  if fields.get("scan_layers"):  # one stacked kernel for both layers; every block parameter leads with "layers"
    assert qkv == ["['trunk']['blocks']['attn']['qkv']['kernel'].value"], qkv
    assert named[qkv[0]] == ("layers", "embed", None, "heads", "head_dim") and flat_params[qkv[0]].shape[0] == 2
    assert all((named[p][0] == "layers") == ("['blocks']" in p) for p in named), named
  else:
    assert len(qkv) == 2 and all(named[p] == ("embed", None, "heads", "head_dim") for p in qkv)
    assert "layers" not in {n for spec in named.values() for n in spec}
  assert named["['trunk']['embed']['embedding'].value"] == ("vocab", "embed")
  if fields.get("positions") != "rotary":
    assert named["['trunk']['pos_embed'].value"] == ("positions", "embed")
  # every matrix is named on at least one axis, so FSDP / tensor parallel can split it
  for path, a in flat_params.items():
    if a.ndim >= 2:
      assert any(n is not None for n in named[path]), path


# --- rematerialisation and scanned layers -----------------------------------------------------------------------

TRAIN_FIELDS = dict(input_shape=(MAX_LEN,), num_outputs=3, vocab_size=VOCAB, num_layers=2, num_heads=2, embed_dim=16,
                    max_len=MAX_LEN + 1, dropout_rate=0.3, use_bias=True)


def compile_fast(fn, *args):
  """fn jitted for these args, with XLA's backend optimisations off: they cost seconds of compilation per model
  on a 2-core CPU and change nothing these equalities test (both sides are compiled alike) -> (compiled, jaxpr)."""
  traced = jax.jit(fn).trace(*args)
  return traced.lower().compile({"xla_backend_optimization_level": 0}), traced.jaxpr


def train_loss_and_grads(cls, key, remat="none", scan_layers=False):
  """As state.py's train step: the model merged inside a jitted value_and_grad, in train mode with dropout
  -> (loss, gradients as a pure dict, the primitives of the loss's jaxpr)."""
  model = build(cls, remat=remat, **TRAIN_FIELDS)  # the same values for every remat: the same paths, filled alike
  if scan_layers:
    model = scanned(model, cls, remat=remat, **TRAIN_FIELDS)
  if cls is GPT:
    ids = jnp.asarray(tokens((2, MAX_LEN), seed=10))
    loss_of = lambda logits: optax.softmax_cross_entropy_with_integer_labels(logits[:, :-1], ids[:, 1:]).mean()
  else:
    ids = jnp.asarray(tokens((2, MAX_LEN), seed=10, low=0))  # with padding
    loss_of = lambda logits: optax.softmax_cross_entropy_with_integer_labels(logits, jnp.asarray([0, 2])).mean()
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)

  def loss_fn(p):
    return loss_of(nnx.merge(graphdef, p, rest)(ids, train=True, rngs=nnx.Rngs(dropout=key)))

  step, jaxpr = compile_fast(jax.value_and_grad(loss_fn), params)
  loss, grads = step(params)
  primitives = set(re.findall(r"= (\w+)\[", str(jaxpr)))  # nested jaxprs (scan bodies) print inline
  return float(loss), nnx.to_pure_dict(grads), primitives


@functools.cache
def plain_training_run(cls):
  return train_loss_and_grads(cls, jax.random.key(7))


@pytest.mark.parametrize("scan_layers", [False, True], ids=["loop", "scan"])
@pytest.mark.parametrize("remat", REMATS)
@pytest.mark.parametrize("cls", [GPT, EncoderClassifier], ids=["gpt", "encoder"])
def test_remat_and_scan_do_not_change_loss_or_gradients(cls, remat, scan_layers):
  loss0, grads0, _ = plain_training_run(cls)
  if remat == "none" and not scan_layers:  # the reference itself: its dropout is on, and another key changes it
    assert abs(train_loss_and_grads(cls, jax.random.key(8))[0] - loss0) > 1e-3
    return
  loss, grads, primitives = train_loss_and_grads(cls, jax.random.key(7), remat, scan_layers)
  # it really is rematerialised (remat2 in jax 0.10, checkpoint later) and scanned
  assert bool(primitives & {"remat2", "checkpoint"}) == (remat != "none"), primitives
  assert ("scan" in primitives) == scan_layers, primitives
  np.testing.assert_allclose(loss, loss0, rtol=1e-6)
  expected = stack_layers(grads0) if scan_layers else grads0
  assert jax.tree.structure(grads) == jax.tree.structure(expected)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), grads, expected)


@pytest.mark.parametrize("cls,fields", [
    (GPT, dict(tie_embeddings=False, use_bias=True, positions="learned")),
    (EncoderClassifier, dict(pooling="cls", positions="rotary")),
], ids=["gpt", "encoder"])
def test_scanned_init_equals_the_looped_init_stacked(cls, fields):
  fields = dict(input_shape=(8,), num_outputs=3, vocab_size=VOCAB, num_layers=2, num_heads=2, embed_dim=16,
                max_len=9, **fields)
  init = lambda scan_layers: compile_fast(lambda: nnx.to_pure_dict(nnx.state(
      cls(rngs=nnx.Rngs(params=jax.random.key(0)), scan_layers=scan_layers, **fields))))[0]()
  looped, stacked = init(False), init(True)
  expected = stack_layers(looped)
  assert jax.tree.structure(stacked) == jax.tree.structure(expected)
  jax.tree.map(np.testing.assert_array_equal, stacked, expected)
  size = lambda tree: sum(a.size for a in jax.tree.leaves(tree))
  assert size(stacked) == size(looped)
  kernel = stacked["trunk"]["blocks"]["attn"]["qkv"]["kernel"]
  assert kernel.shape == (2, 16, 3, 2, 8) and not np.array_equal(kernel[0], kernel[1])  # layers drawn apart


# --- learning ---------------------------------------------------------------------------------------------------

SONNET = "Shall I compare thee to a summer's day?\nThou art more lovely and more temperate:\n"


def test_tiny_gpt_memorises_real_text_and_greedy_generate_reproduces_it():
  tokenizer = CharTokenizer.build([SONNET])
  ids = tokenizer.encode(SONNET)
  model = build(GPT, std=0.02, input_shape=(len(ids) - 1,), num_outputs=tokenizer.vocab_size,
                vocab_size=tokenizer.vocab_size, num_layers=2, num_heads=2, embed_dim=32, max_len=96)
  graphdef, params = nnx.split(model)
  optimizer = optax.adam(1e-2)
  opt_state = optimizer.init(params)
  inputs, targets = jnp.asarray(ids[None, :-1]), jnp.asarray(ids[None, 1:])

  @jax.jit
  def train_step(params, opt_state):
    def loss_fn(p):
      logits = nnx.merge(graphdef, p)(inputs, train=False)
      return optax.softmax_cross_entropy_with_integer_labels(logits, targets).mean()
    loss, grads = jax.value_and_grad(loss_fn)(params)
    updates, opt_state = optimizer.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  losses = []
  for _ in range(150):
    params, opt_state, loss = train_step(params, opt_state)
    losses.append(float(loss))
  assert losses[0] > 2.5  # ~ln(vocab) at the start
  assert losses[-1] < 0.05, losses[-10:]
  trained = nnx.merge(graphdef, params)
  out = sample.generate(trained, ids[:1], len(ids) - 1, temperature=0)
  assert SONNET[0] + tokenizer.decode(out[0]) == SONNET


# --- bad input --------------------------------------------------------------------------------------------------

GPT_FIELDS = dict(num_outputs=VOCAB, vocab_size=VOCAB, num_layers=1, num_heads=2, embed_dim=16)


@pytest.mark.parametrize("cls,fields,needles", [
    (GPT, dict(GPT_FIELDS, input_shape=(20,), max_len=16), ["config.data.seq_len", "20", "config.model.max_len=16"]),
    (EncoderClassifier, dict(GPT_FIELDS, input_shape=(16,), max_len=16, pooling="cls"),
     ["config.data.seq_len", "[CLS]", "config.model.max_len=16"]),
    (GPT, dict(GPT_FIELDS, input_shape=(8,), embed_dim=15), ["config.model.embed_dim", "15", "num_heads=2"]),
    (GPT, dict(GPT_FIELDS, input_shape=(8,), embed_dim=18, positions="rotary"), ["config.model.embed_dim", "even"]),
    (GPT, dict(GPT_FIELDS, input_shape=(8,), positions="sinusoidal"),
     ["config.model.positions", "'sinusoidal'", "learned, rotary"]),
    (EncoderClassifier, dict(GPT_FIELDS, input_shape=(8,), pooling="max"),
     ["config.model.pooling", "'max'", "cls, mean"]),
    (GPT, dict(GPT_FIELDS, input_shape=(8,), vocab_size=0), ["config.model.name", "'gpt'", "text dataset"]),
    (GPT, dict(GPT_FIELDS, input_shape=(8,), remat="everything"),
     ["config.model.remat", "'everything'", "dots, dots_no_batch, full, none"]),
    (EncoderClassifier, dict(GPT_FIELDS, input_shape=(8,), remat="dot", scan_layers=True),
     ["config.model.remat", "'dot'", "dots, dots_no_batch, full, none"]),
    (LSTMLM, dict(input_shape=(8,), num_outputs=2, vocab_size=0, embed_dim=8, hidden_size=8, num_layers=1),
     ["config.model.name", "'lstm_lm'", "text dataset"]),
], ids=["seq_len>max_len", "seq_len+cls>max_len", "embed_dim%heads", "rotary-odd-head", "positions", "pooling",
        "gpt-no-vocab", "gpt-remat", "encoder-remat", "lstm-no-vocab"])
def test_bad_model_fields_are_user_errors(cls, fields, needles):
  with pytest.raises(UserError) as e:
    nnx.eval_shape(lambda: cls(rngs=nnx.Rngs(0), **fields))
  message = str(e.value)
  assert "\n" not in message
  for needle in needles:
    assert needle in message, (needle, message)


# --- attention dropout (nanoGPT's attn_dropout) ----------------------------------------------------------------

@pytest.mark.parametrize("causal", [True, False])
def test_written_out_attention_equals_the_fused_one(causal):
  from bigmodel_jax.models.attention import attention
  rng = np.random.default_rng(0)
  q, k, v = (jnp.asarray(rng.normal(size=(3, 9, 2, 8)), jnp.float32) for _ in range(3))
  mask = None if causal else jnp.asarray(rng.random((3, 1, 1, 9)) < 0.7).at[:, :, :, 0].set(True)
  ours = attention(q, k, v, mask=mask, is_causal=causal)
  fused = jax.nn.dot_product_attention(q, k, v, mask=mask, is_causal=causal)
  # a softmax over 9 keys and two dot products of 8: a few dozen roundings of values of this scale
  np.testing.assert_allclose(ours, fused, atol=tolerance(fused, 2 * 8 + 2 * 9 + 8), rtol=0)


def test_attention_dropout_drops_probabilities_in_training_only():
  from bigmodel_jax.models.layers import ExampleRngs
  fields = dict(input_shape=(MAX_LEN,), num_outputs=VOCAB, vocab_size=VOCAB, num_layers=2, num_heads=2,
                embed_dim=16, max_len=MAX_LEN)
  plain, dropped = build(GPT, **fields), build(GPT, **fields, attention_dropout_rate=0.5)
  x = tokens((2, MAX_LEN))
  np.testing.assert_array_equal(dropped(x, train=False), plain(x, train=False))  # evaluation draws no masks
  keys = jax.random.split(jax.random.PRNGKey(0), 2)
  train = dropped(x, train=True, rngs=ExampleRngs(keys))
  assert np.array_equal(train, dropped(x, train=True, rngs=ExampleRngs(keys)))  # the example keys decide
  assert not np.allclose(train, plain(x, train=True, rngs=ExampleRngs(keys)))  # rate 0 draws nothing: the eval output
  np.testing.assert_array_equal(plain(x, train=True, rngs=ExampleRngs(keys)), plain(x, train=False))
  # each example's masks come from its own key: the first row alone gives the same logits
  np.testing.assert_allclose(dropped(x[:1], train=True, rngs=ExampleRngs(keys[:1])), train[:1], rtol=0,
                             atol=tolerance(train, transformer_depth()))
  with pytest.raises(UserError, match="config.model.attention_dropout_rate"):
    GPT(rngs=nnx.Rngs(0), **fields, attention_dropout_rate=1.0)
