"""Masked language modelling: BERT's selection (15% of the real tokens, never padding, 80/10/10), a fixed
evaluation selection per example, loss and accuracy on the selection only; config.data.train_fraction's fixed
subset; and pretrain -> fine-tune through the command line (the tokenizer and the trunk taken over)."""

import json
import math
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from bigmodel_jax.config import base_config, model_config
from bigmodel_jax.data import TRAIN_FRACTION_SEED, Dataset
from bigmodel_jax.data.tokenizers import MASK_PIECE, SentencePieceTokenizer
from bigmodel_jax.errors import UserError
from bigmodel_jax.models import build_model
from bigmodel_jax.tasks.masked_language_modeling import MaskedLanguageModeling

from conftest import error_lines

TEXT = (math.__doc__ + "\n" + np.__doc__ + "\n" + json.__doc__).splitlines()
L = 64
CONFIG = base_config()  # task.mask_rate 0.15


@pytest.fixture(scope="module")
def tokenizer():
  return SentencePieceTokenizer.train(TEXT, 200, "bpe", mask_token=True)


def dataset(tokenizer, kind="text"):
  return types.SimpleNamespace(name="docs", kind=kind, is_text=kind in ("text", "lm"), tokenizer=tokenizer,
                               vocab_size=tokenizer.vocab_size)


def padded_rows(tokenizer, n: int, seed: int = 0) -> np.ndarray:
  """n rows of real text of random lengths 0..L, padded with 0 (row 0 all padding, row 1 one token)."""
  rng = np.random.default_rng(seed)
  stream = np.concatenate([tokenizer.encode(t) for t in TEXT if t])
  rows = np.zeros((n, L), np.int32)
  for i in range(n):
    length = 0 if i == 0 else 1 if i == 1 else int(rng.integers(2, L + 1))
    start = int(rng.integers(0, len(stream) - L))
    rows[i, :length] = stream[start:start + length]
  return rows


def test_the_mask_piece_is_one_id_and_never_a_random_replacement(tokenizer):
  assert tokenizer.mask_id == 3 and tokenizer.encode(MASK_PIECE).tolist() == [3]
  task = MaskedLanguageModeling(CONFIG, dataset(tokenizer))
  assert not set(task.replacements.tolist()) & {0, tokenizer.mask_id, *tokenizer.special_ids}
  assert len(task.replacements) == tokenizer.vocab_size - len({0, 3, *tokenizer.special_ids})


def test_selection_is_15_percent_of_real_tokens_then_80_10_10(tokenizer):
  task = MaskedLanguageModeling(CONFIG, dataset(tokenizer))
  tokens = padded_rows(tokenizer, 2000)
  keys = jax.random.split(jax.random.PRNGKey(0), len(tokens))
  inputs, positions, selected, original = map(np.asarray, task.corrupt(jnp.asarray(tokens), keys))
  p = math.ceil(0.15 * L)
  assert positions.shape == selected.shape == original.shape == (len(tokens), p)
  lengths = (tokens != 0).sum(1)
  expected = np.where(lengths > 0, np.clip(np.round(0.15 * lengths), 1, p), 0)
  np.testing.assert_array_equal(selected.sum(1), expected)
  assert selected[0].sum() == 0 and selected[1].sum() == 1  # an empty row selects nothing, one token selects it
  picked = np.take_along_axis(tokens, positions, 1)
  np.testing.assert_array_equal(original, picked)
  assert (picked[selected] != 0).all()  # padding is never selected
  for pos, sel in zip(positions, selected):
    assert len(set(pos[sel].tolist())) == sel.sum()  # distinct positions
  sel_mask = np.zeros_like(tokens, bool)
  for i in range(len(tokens)):
    sel_mask[i, positions[i][selected[i]]] = True
  np.testing.assert_array_equal(inputs[~sel_mask], tokens[~sel_mask])  # everything not selected is unchanged
  new = inputs[sel_mask]
  old = tokens[sel_mask]
  n = len(new)
  masked = (new == task.mask_id).mean()
  kept = (new == old).mean()
  random = 1 - masked - kept
  # binomial counts over n ~ 10^4 selections: 5 standard deviations; a random token equals the original with
  # chance ~1/vocab, so `kept` may exceed 10% by that much and `random` fall short by it
  sd = lambda q: 5 * math.sqrt(q * (1 - q) / n)
  chance = 1 / len(task.replacements)
  assert abs(masked - 0.8) <= sd(0.8)
  assert abs(kept - 0.1) <= sd(0.1) + chance and abs(random - 0.1) <= sd(0.1) + chance
  assert np.isin(new[(new != task.mask_id) & (new != old)], task.replacements).all()


@pytest.fixture(scope="module")
def model(tokenizer):
  config = model_config("encoder_mlm", num_layers=1, num_heads=2, embed_dim=16, max_len=L + 1)
  return build_model(config, input_shape=(L,), num_outputs=tokenizer.vocab_size, rngs=nnx.Rngs(0),
                     vocab_size=tokenizer.vocab_size)


def test_eval_selection_is_fixed_per_example_and_the_loss_counts_it_only(tokenizer, model):
  task = MaskedLanguageModeling(CONFIG, dataset(tokenizer))
  tokens = padded_rows(tokenizer, 12, seed=1)
  index = np.arange(100, 112)
  batch = lambda rows: {"inputs": jnp.asarray(tokens[rows]), "index": jnp.asarray(index[rows]),
                        "mask": jnp.ones(len(rows), jnp.float32)}
  whole = {k: float(v) for k, v in task.evaluate_batch(model, batch(np.arange(12))).items()}
  again = {k: float(v) for k, v in task.evaluate_batch(model, batch(np.arange(12))).items()}
  assert whole == again
  # the same examples in another order and in other batches: the same selection, so the same sums
  halves = [task.evaluate_batch(model, batch(rows)) for rows in (np.arange(11, 5, -1), np.arange(6))]
  for k in whole:
    assert sum(float(h[k]) for h in halves) == pytest.approx(whole[k], rel=1e-5)
  lengths = (tokens != 0).sum(1)
  assert whole["count"] == np.where(lengths > 0, np.clip(np.round(0.15 * lengths), 1, 10), 0).sum()
  # padded rows of the batch (mask 0) count nothing
  padded = batch(np.arange(12))
  padded["mask"] = jnp.asarray(np.r_[np.ones(6), np.zeros(6)], jnp.float32)
  first = task.evaluate_batch(model, batch(np.arange(6)))
  assert float(task.evaluate_batch(model, padded)["count"]) == float(first["count"])
  final = task.finalize({k: np.asarray(v) for k, v in halves[1].items()})
  assert final["perplexity"] == pytest.approx(math.exp(final["loss"]), rel=1e-6) and 0 <= final["accuracy"] <= 1


def test_needs_text_and_a_mask_id(tokenizer):
  with pytest.raises(UserError, match="config.data.tokenizer.mask_token"):
    MaskedLanguageModeling(CONFIG, dataset(SentencePieceTokenizer.train(TEXT, 200, "bpe")))
  with pytest.raises(UserError, match="needs text"):
    MaskedLanguageModeling(CONFIG, dataset(tokenizer, kind="image"))


def test_train_fraction_keeps_the_same_rows_whatever_else_changes():
  n = 1000
  train = {"inputs": np.arange(n)[:, None] * np.ones((1, 3), np.int32), "targets": np.arange(n) % 2}
  data = Dataset("rows", train, None, "text", num_classes=2)
  tenth = data.take_train_fraction(0.1)
  assert tenth.num_examples("train") == 100
  kept = tenth.train["inputs"][:, 0]
  np.testing.assert_array_equal(tenth.train["targets"], kept % 2)  # rows kept whole
  np.testing.assert_array_equal(kept, np.sort(np.random.default_rng(TRAIN_FRACTION_SEED).permutation(n)[:100]))
  np.testing.assert_array_equal(data.take_train_fraction(0.1).train["inputs"], tenth.train["inputs"])
  assert data.take_train_fraction(1.0) is data
  with pytest.raises(UserError, match="config.data.train_fraction: 0.0001 .* is none"):
    data.take_train_fraction(0.0001)
  stream = Dataset("stream", {"tokens": np.arange(1000)}, None, "lm")
  np.testing.assert_array_equal(stream.take_train_fraction(0.25).train["tokens"], np.arange(250))


# --- pretrain -> fine-tune on the command line -------------------------------------------------------------------

PRETRAIN = "--config=configs/spam_bert_pretrain.py:smoke"
FINETUNE = "--config=configs/spam_bert_finetune.py:smoke"


@pytest.fixture(scope="module")
def pretrained(cli, tmp_path_factory):
  workdir = tmp_path_factory.mktemp("mlm") / "pretrain"
  proc = cli(PRETRAIN, f"--workdir={workdir}", "--config.train.progress_bar=false", timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  return workdir


def test_pretraining_scores_masked_tokens_on_validation(pretrained):
  records = [json.loads(l) for l in (pretrained / "metrics.jsonl").read_text().splitlines()]
  train = [r for r in records if r.get("split") == "train"]
  validation = [r for r in records if r.get("split") == "validation"]
  assert validation and all(0 <= r["accuracy"] <= 1 and math.isfinite(r["loss"]) for r in validation)
  assert train[-1]["loss"] < train[0]["loss"]
  assert json.loads((pretrained / "tokenizer" / "tokenizer.json").read_text())["mask_token"] is True


def test_fine_tuning_takes_the_trunk_and_the_tokenizer(cli, pretrained, tmp_path):
  workdir = tmp_path / "tuned"
  proc = cli(FINETUNE, f"--workdir={workdir}", f"--config.init.workdir={pretrained}",
             "--config.data.train_fraction=0.1", "--config.train.progress_bar=false", timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  init = json.loads((workdir / "init.json").read_text())
  assert any(n.startswith("trunk.") for n in init["loaded"]) and "cls" in init["loaded"]
  assert init["kept"] and all(n.startswith("head.") for n in init["kept"])
  assert (workdir / "tokenizer" / "spm.model").read_bytes() == (pretrained / "tokenizer" / "spm.model").read_bytes()
  final = json.loads((workdir / "final_metrics.json").read_text())
  assert {"accuracy", "f1"} <= set(final["test"])


def test_a_tokenizer_that_differs_from_the_init_runs_is_one_line(cli, pretrained, tmp_path):
  workdir = tmp_path / "tuned"
  proc = cli(FINETUNE, f"--workdir={workdir}", f"--config.init.workdir={pretrained}",
             "--config.data.tokenizer.vocab_size=500", timeout=300)
  lines = error_lines(proc.stderr)
  assert proc.returncode == 2 and len(lines) == 1 and "config.init.workdir" in lines[0], proc.stderr[-2000:]
  assert not workdir.exists() or not any(workdir.rglob("*.json"))


def test_pretraining_without_a_mask_piece_is_one_line(cli, tmp_path):
  workdir = tmp_path / "work"
  proc = cli(PRETRAIN, f"--workdir={workdir}", "--config.data.tokenizer.mask_token=False", timeout=300)
  lines = error_lines(proc.stderr)
  assert proc.returncode == 2 and len(lines) == 1 and "config.data.tokenizer.mask_token" in lines[0], proc.stderr
  assert not (workdir / "checkpoints").exists()


def test_bad_mask_rate_padding_and_fraction_are_one_line(tokenizer):
  from bigmodel_jax import config as config_lib
  for rate in (0.0, -0.1, 1.0, 1.5):
    c = base_config()
    c.task.mask_rate = rate
    with pytest.raises(UserError, match=r"config.task.mask_rate: .*must be in \(0, 1\)"):
      config_lib.validate_fields(c)
  # a tokenizer that pads with another id than 0 (GPT-2's byte-level BPE pads with <|endoftext|>)
  other = types.SimpleNamespace(name="gpt2_bpe", pad_id=50256, mask_id=3, special_ids=(50256,), vocab_size=50257)
  with pytest.raises(UserError, match="config.data.tokenizer.name: .*pads with id 50256"):
    MaskedLanguageModeling(CONFIG, dataset(other))
  from bigmodel_jax.tasks.classification import Classification
  labelled = types.SimpleNamespace(**vars(dataset(other)), num_classes=2, is_token_stream=False)
  with pytest.raises(UserError, match="'classification' on docs needs padding id 0"):
    Classification(CONFIG, labelled)
  windows = {"inputs": np.ones((4, 32), np.int32), "targets": np.ones((4, 32), np.int32),
             "token_mask": np.ones((4, 32), np.float32)}
  stream = Dataset("stream", {"tokens": np.arange(1000)}, None, "lm", validation=windows)
  assert stream.take_train_fraction(0.033).num_examples("train") == 33  # one window of 32 + 1
  with pytest.raises(UserError, match="config.data.train_fraction: 0.03 .* keeps 30, fewer than one window"):
    stream.take_train_fraction(0.03)


@pytest.mark.parametrize("devices, strategy, k", [(1, "jit", 4), (8, "pmap", 2)])
def test_the_update_is_the_whole_batchs_however_it_is_split(tokenizer, devices, strategy, k):
  """Rows of unequal length select unequal numbers of tokens: split into microbatches or over pmap replicas, the
  update is still the mean over the whole batch's selected tokens (it was the mean of each part's own mean)."""
  from bigmodel_jax import parallel, train
  rows = padded_rows(tokenizer, 16, seed=2)
  split = {"inputs": rows, "targets": np.zeros(len(rows), np.int32)}
  data = Dataset("docs", split, None, "text", tokenizer=tokenizer, vocab_size=tokenizer.vocab_size, validation=split)
  c = base_config()
  c.model = model_config("encoder_mlm", num_layers=1, num_heads=2, embed_dim=16, max_len=L + 1, dropout_rate=0.0)
  c.task.name, c.data.batch_size, c.data.seq_len = "masked_language_modeling", len(rows), L
  c.optimizer.name, c.optimizer.learning_rate, c.schedule.name = "sgd", 0.5, "constant"
  batch = {"inputs": rows, "targets": split["targets"], "mask": np.ones(len(rows), np.float32)}

  def one_step(devices):
    mesh = parallel.make_mesh(c.mesh, devices=jax.devices()[:devices])
    steps = train.make_steps(c, data, MaskedLanguageModeling(c, data), mesh, total_steps=10)
    state, metrics = steps.train_step(steps.layout.place(steps.init()), steps.layout.train_batch(batch))
    return float(metrics["loss"]), steps.layout.plain(state)

  loss, whole = one_step(1)
  c.parallel.strategy, c.train.grad_accum_steps = strategy, k
  split_loss, parts = one_step(devices)
  # the mean over <= 16 x 10 selected tokens, summed in another order: at most 160 float32 roundings apart (the
  # linear bound, 1.9e-5 relative; measured 2 ulps, 9.5e-7, under --xla_cpu_max_isa=SSE4_2, 0.18 of the old 1e-6).
  # The mean of each part's own mean, the bug this catches, weighs the tokens unequally: off by far more.
  assert split_loss == pytest.approx(loss, rel=160 * float(np.finfo(np.float32).eps))
  for a, b in zip(jax.tree.leaves(parts.params), jax.tree.leaves(whole.params)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)
