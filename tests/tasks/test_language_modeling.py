"""Language modelling: the masked cross-entropy and its derived metrics against numpy, eval windows that score
every token once, and random training windows that are reproducible per step and split across processes."""

import math
import types

import jax.numpy as jnp
import numpy as np
import pytest

from bigmodel_jax.data import corpus, pipeline
from bigmodel_jax.data.tokenizers import CharTokenizer
from bigmodel_jax.errors import UserError
from bigmodel_jax.tasks.language_modeling import LanguageModeling

# Real text for the token streams (the numbers the tests check do not depend on which text it is)
TEXT = math.__doc__ + "\n" + np.__doc__[:2000]
V = 7


def lm_task(chars_per_token=1.0, kind="lm"):
  dataset = types.SimpleNamespace(name="corpus", kind=kind, vocab_size=V, chars_per_token={"test": chars_per_token},
                                  num_classes=2 if kind == "text" else 0, is_token_stream=kind == "lm",
                                  is_text=kind in ("lm", "text"))
  return LanguageModeling(None, dataset)


def batch(seed=0, b=3, t=5, with_token_mask=True):
  rng = np.random.default_rng(seed)
  out = {"logits": rng.normal(size=(b, t, V)).astype(np.float32) * 2,
         "targets": rng.integers(0, V, size=(b, t)).astype(np.int32),
         "mask": np.array([1, 1, 0], np.float32)[:b]}
  if with_token_mask:
    out["token_mask"] = (rng.random((b, t)) < 0.7).astype(np.float32)
  return out


def numpy_masked_cross_entropy(logits, targets, weights):
  logp = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True)) \
      - logits.max(-1, keepdims=True)
  nll = -np.take_along_axis(logp, targets[..., None], -1)[..., 0]
  correct = logits.argmax(-1) == targets
  return (nll * weights).sum() / weights.sum(), (correct * weights).sum() / weights.sum()


def as_jax(b):
  return {k: jnp.asarray(v) for k, v in b.items() if k != "logits"}


@pytest.mark.parametrize("with_token_mask", [True, False])
def test_loss_is_the_masked_mean_cross_entropy(with_token_mask):
  b = batch(with_token_mask=with_token_mask)
  weights = b["mask"][:, None] * b.get("token_mask", np.ones_like(b["targets"], np.float32))
  expected_loss, expected_accuracy = numpy_masked_cross_entropy(b["logits"], b["targets"], weights)
  task = lm_task()
  loss, metrics = task.train_loss(jnp.asarray(b["logits"]), as_jax(b))
  assert float(loss) == pytest.approx(expected_loss, rel=1e-5)
  assert float(metrics["loss"]) == pytest.approx(expected_loss, rel=1e-5)
  assert float(metrics["accuracy"]) == pytest.approx(expected_accuracy, rel=1e-6)
  final = task.finalize({k: np.asarray(v) for k, v in task.eval_sums(jnp.asarray(b["logits"]), as_jax(b)).items()})
  assert final["loss"] == pytest.approx(expected_loss, rel=1e-5)
  assert final["accuracy"] == pytest.approx(expected_accuracy, rel=1e-6)


def test_masked_tokens_and_rows_do_not_count():
  b = batch()
  task = lm_task()
  loss, _ = task.train_loss(jnp.asarray(b["logits"]), as_jax(b))
  excluded = (b["mask"][:, None] * b["token_mask"]) == 0
  assert excluded[2].all() and excluded[:2].any() and not excluded.all()
  # anything at an excluded position (logits, targets) leaves the loss as it was
  other = {**b, "logits": np.where(excluded[..., None], 100 * b["logits"], b["logits"]),
           "targets": np.where(excluded, (b["targets"] + 1) % V, b["targets"])}
  other_loss, _ = task.train_loss(jnp.asarray(other["logits"]), as_jax(other))
  assert float(other_loss) == pytest.approx(float(loss), rel=1e-6)
  sums = task.eval_sums(jnp.asarray(b["logits"]), as_jax(b))
  assert float(sums["count"]) == (~excluded).sum()
  # a batch that is all padding divides by nothing: the train loss stays finite (0)
  empty = {**b, "mask": np.zeros(3, np.float32)}
  empty_loss, _ = task.train_loss(jnp.asarray(b["logits"]), as_jax(empty))
  assert float(empty_loss) == 0.0


@pytest.mark.parametrize("chars_per_token", [1.0, 3.7])
def test_perplexity_and_bits_per_char(chars_per_token):
  b = batch(seed=1)
  task = lm_task(chars_per_token)
  final = task.finalize({k: np.asarray(v) for k, v in task.eval_sums(jnp.asarray(b["logits"]), as_jax(b)).items()})
  assert set(final) == set(LanguageModeling.metric_names)
  assert final["perplexity"] == pytest.approx(math.exp(final["loss"]), rel=1e-9)
  assert final["bits_per_char"] == pytest.approx(final["loss"] / math.log(2) / chars_per_token, rel=1e-9)
  # a uniform model: loss ln V, perplexity V, log2 V bits per token
  uniform = task.finalize({k: np.asarray(v) for k, v in
                           task.eval_sums(jnp.zeros_like(jnp.asarray(b["logits"])), as_jax(b)).items()})
  assert uniform["loss"] == pytest.approx(math.log(V), rel=1e-6)
  assert uniform["perplexity"] == pytest.approx(V, rel=1e-5)
  assert uniform["bits_per_char"] * chars_per_token == pytest.approx(math.log2(V), rel=1e-6)


def test_task_refuses_a_classification_dataset_and_predict():
  with pytest.raises(UserError, match=r"config\.task\.name: 'language_modeling' needs a text corpus"):
    lm_task(kind="text")
  with pytest.raises(UserError, match="--mode=sample"):
    lm_task().predict(jnp.zeros((1, 2, V)))


@pytest.fixture(scope="module")
def ids():
  return CharTokenizer.build([TEXT]).encode(TEXT)


@pytest.mark.parametrize("length,seq_len", [(2, 8), (9, 8), (17, 8), (20, 8), (1000, 32), (1001, 32)])
def test_windows_score_every_token_after_the_first_exactly_once(ids, length, seq_len):
  stream = ids[:length]
  w = corpus.windows(stream, seq_len)
  n = -(-(length - 1) // seq_len)
  assert w["inputs"].shape == w["targets"].shape == w["token_mask"].shape == (n, seq_len)
  keep = w["token_mask"].ravel() > 0
  np.testing.assert_array_equal(w["targets"].ravel()[keep], stream[1:])
  np.testing.assert_array_equal(w["inputs"].ravel()[keep], stream[:-1])  # each target after its own context
  # within a window, the targets are the inputs shifted by one
  np.testing.assert_array_equal(w["inputs"][:, 1:], w["targets"][:, :-1])
  assert w["token_mask"].sum() == length - 1


def test_random_windows_are_reproducible_shifted_and_split_across_processes(ids):
  gather = pipeline.random_windows(ids, 16, 8, seed=3)
  first, again, other = gather(5), gather(5), gather(6)
  for key in ("inputs", "targets", "mask"):
    np.testing.assert_array_equal(first[key], again[key])
  assert not np.array_equal(first["inputs"], other["inputs"])
  assert not np.array_equal(first["inputs"], pipeline.random_windows(ids, 16, 8, seed=4)(5)["inputs"])
  assert first["inputs"].shape == first["targets"].shape == (8, 16) and np.all(first["mask"] == 1)
  np.testing.assert_array_equal(first["inputs"][:, 1:], first["targets"][:, :-1])
  text = ids.tobytes()
  for row_in, row_target in zip(first["inputs"], first["targets"]):
    window = np.concatenate([row_in, row_target[-1:]])
    assert window.tobytes() in text  # a real stretch of the stream
  halves = [pipeline.random_windows(ids, 16, 8, seed=3, process_index=i, process_count=2)(5) for i in range(2)]
  for key in ("inputs", "targets", "mask"):
    assert halves[0][key].shape[0] == 4
    np.testing.assert_array_equal(np.concatenate([h[key] for h in halves]), first[key])


def test_random_windows_reach_both_ends_of_the_stream():
  stream = np.arange(40, dtype=np.int32)
  gather = pipeline.random_windows(stream, 8, 64, seed=0)
  starts = np.concatenate([gather(step)["inputs"][:, 0] for step in range(20)])
  assert starts.min() == 0 and starts.max() == len(stream) - 9  # the last window ends on the last token
