"""bigmodel_jax.convert: Hugging Face GPT-2 / BERT in and out, checked against transformers itself (no download:
tiny randomly initialised models and tokenizers made here). Skipped where torch or transformers is not installed."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from conftest import ROOT, error_lines

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")

LAYERS, HEADS, DIM, POSITIONS = 2, 4, 32, 64
WORDS = ("the king shall speak to his people and the queen hears what the lords say of war and peace; "
         "ROMEO: what's here? JULIET: 'tis I, my love. 123 4567 naïve café —\n").split(" ")


def corpus(n_words: int = 6000, seed: int = 0) -> str:
  rng = np.random.default_rng(seed)
  return " ".join(rng.choice(WORDS, n_words))


def depth(seq_len: int, mlp_ratio: int = 4) -> int:
  """Roundings on the longest path (as tests/models/test_transformer.py's transformer_depth), plus the embedding
  LayerNorm and BERT's MLM head transform."""
  per_layer = 2 * 2 * DIM + 2 * DIM + DIM // HEADS + 2 * seq_len + (1 + mlp_ratio) * DIM
  return LAYERS * per_layer + 6 * DIM


def tolerance(reference, d: int) -> float:
  return float(np.finfo(np.float32).eps) * d * float(np.abs(reference).max())


@pytest.fixture(scope="module")
def hf_dirs(tmp_path_factory):
  """A GPT2LMHeadModel with a byte-level BPE trained here, and a BertForMaskedLM with a small WordPiece vocab."""
  root = tmp_path_factory.mktemp("hf")
  bpe = tokenizers.ByteLevelBPETokenizer()
  bpe.train_from_iterator([corpus()], vocab_size=300, special_tokens=["<|endoftext|>"], show_progress=False)
  gpt2 = root / "gpt2"
  gpt2.mkdir()
  bpe.save_model(str(gpt2))
  vocab = len(json.loads((gpt2 / "vocab.json").read_text()))
  torch.manual_seed(0)
  model = transformers.GPT2LMHeadModel(transformers.GPT2Config(
      n_layer=LAYERS, n_head=HEADS, n_embd=DIM, n_positions=POSITIONS, vocab_size=vocab, bos_token_id=vocab - 1,
      eos_token_id=vocab - 1)).eval()
  model.save_pretrained(gpt2, safe_serialization=True)
  bert = root / "bert"
  words = sorted({w.strip(".,;:?'\n").lower() for w in WORDS} - {""})
  pieces = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *".,;:?'—", *"abcdefghijklmnopqrstuvwxyz0123456789", *words,
            "##s", "##e", "##ing"]
  bert.mkdir()
  (bert / "vocab.txt").write_text("".join(p + "\n" for p in dict.fromkeys(pieces)))
  torch.manual_seed(1)
  model = transformers.BertForMaskedLM(transformers.BertConfig(
      num_hidden_layers=LAYERS, num_attention_heads=HEADS, hidden_size=DIM, intermediate_size=4 * DIM,
      max_position_embeddings=POSITIONS, vocab_size=len(dict.fromkeys(pieces)))).eval()
  model.save_pretrained(bert, safe_serialization=True)
  return {"gpt2": gpt2, "bert": bert}


def env(cache_dir):
  return {**os.environ, "JAX_PLATFORMS": "cpu", "BIGMODEL_JAX_CACHE_DIR": str(cache_dir), "PYTHONUNBUFFERED": "1"}


@pytest.fixture(scope="module")
def convert(cache_dir):
  def run(*args, timeout: float = 300):
    return subprocess.run([sys.executable, "-m", "bigmodel_jax.convert", *args], cwd=ROOT, env=env(cache_dir),
                          capture_output=True, text=True, timeout=timeout)
  return run


@pytest.fixture(scope="module")
def runs(hf_dirs, convert, tmp_path_factory):
  root = tmp_path_factory.mktemp("runs")
  for model, src in hf_dirs.items():
    proc = convert("hf-to-run", f"--model={model}", f"--src={src}", f"--workdir={root / model}")
    assert proc.returncode == 0, proc.stderr[-3000:]
  return {m: root / m for m in hf_dirs}


def our_logits(workdir: Path, tokens: np.ndarray) -> np.ndarray:
  import ml_collections
  from bigmodel_jax import run_config
  from bigmodel_jax.inference import Inference
  config = ml_collections.ConfigDict(run_config.as_config_values(run_config.load(workdir / "config.json", "")))
  model = Inference.load(config, workdir)
  try:
    _, state = model.restore_step()
    module = model.model_function()(model.variables(state))
  finally:
    model.close()
  return np.asarray(module(tokens, train=False))


def test_gpt2_logits_equal_transformers(hf_dirs, runs):
  hf = transformers.GPT2LMHeadModel.from_pretrained(hf_dirs["gpt2"]).eval()
  tokens = np.random.default_rng(0).integers(0, hf.config.vocab_size, (3, POSITIONS))
  with torch.no_grad():
    reference = hf(torch.as_tensor(tokens)).logits.numpy()
  ours = our_logits(runs["gpt2"], tokens.astype(np.int32))
  error, tol = float(np.abs(ours - reference).max()), tolerance(reference, depth(POSITIONS))
  print(f"GPT-2 max |logit difference| {error:.3g} (tolerance {tol:.3g})")
  assert error <= tol


def test_bert_logits_equal_transformers_with_padding(hf_dirs, runs):
  hf = transformers.BertForMaskedLM.from_pretrained(hf_dirs["bert"]).eval()
  rng = np.random.default_rng(1)
  tokens = rng.integers(5, hf.config.vocab_size, (3, 40))
  tokens[0, 25:], tokens[1, 7:] = 0, 0  # [PAD] = 0: padded rows, masked by attention_mask there, by id 0 here
  with torch.no_grad():
    reference = hf(torch.as_tensor(tokens), attention_mask=torch.as_tensor(tokens != 0).long()).logits.numpy()
  ours = our_logits(runs["bert"], tokens.astype(np.int32))
  keep = tokens != 0  # transformers' outputs at padded positions attend like ours, but compare the text's
  error, tol = float(np.abs(ours - reference)[keep].max()), tolerance(reference, depth(40))
  print(f"BERT max |logit difference| {error:.3g} (tolerance {tol:.3g})")
  assert error <= tol


@pytest.mark.parametrize("model", ["gpt2", "bert"])
def test_run_to_hf_round_trips(model, hf_dirs, runs, convert, tmp_path):
  from safetensors.numpy import load_file
  dst = tmp_path / "out"
  proc = convert("run-to-hf", f"--workdir={runs[model]}", f"--dst={dst}")
  assert proc.returncode == 0, proc.stderr[-3000:]
  original, written = load_file(hf_dirs[model] / "model.safetensors"), load_file(dst / "model.safetensors")
  assert sorted(written) == sorted(original)
  for name, value in original.items():
    assert written[name].dtype == value.dtype and np.array_equal(written[name], value), name
  cls = transformers.GPT2LMHeadModel if model == "gpt2" else transformers.BertForMaskedLM
  tokens = torch.as_tensor(np.random.default_rng(2).integers(5, 60, (2, 16)))
  with torch.no_grad():
    assert torch.equal(cls.from_pretrained(dst).eval()(tokens).logits, cls.from_pretrained(hf_dirs[model]).eval()(tokens).logits)
  tokenizer = transformers.AutoTokenizer.from_pretrained(dst)  # the tokenizer files written beside the weights
  assert tokenizer.encode("the king", add_special_tokens=False) == \
      transformers.AutoTokenizer.from_pretrained(hf_dirs[model]).encode("the king", add_special_tokens=False)


def test_tokenizer_ids_equal_transformers(hf_dirs):
  from bigmodel_jax.data import bpe, wordpiece
  ours, theirs = bpe.from_hf_dir(hf_dirs["gpt2"]), transformers.GPT2Tokenizer.from_pretrained(hf_dirs["gpt2"])
  texts = ["ROMEO: what's here?\n\n  I'll  go.  ", "naïve café 123 4567 — the<|endoftext|>king", "日本語😀\t\r\n x"]
  for text in texts:
    ids = ours.encode(text)
    assert ids.tolist() == theirs.encode(text), text
    assert ours.decode(ids) == text.replace("<|endoftext|>", "")  # byte-level: lossless but for the pad (eos)
  ours, theirs = wordpiece.from_hf_dir(hf_dirs["bert"]), transformers.BertTokenizer.from_pretrained(hf_dirs["bert"])
  for text in ["The King speaks; the QUEEN hears.", "Naïve café — peace?", "zzz 日 x"]:
    assert ours.encode(text).tolist() == theirs.encode(text, add_special_tokens=False), text
  assert ours.pad_id == 0 and ours.mask_id == theirs.mask_token_id


def test_converted_gpt2_fine_tunes_and_samples(runs, cli, tmp_path):
  text = tmp_path / "input.txt"
  text.write_text(corpus(8000, seed=3))
  new = tmp_path / "tuned"
  proc = cli(f"--config={runs['gpt2']}/config.json", f"--workdir={new}", f"--config.init.workdir={runs['gpt2']}",
             f"--config.data.path={text}", "--config.data.seq_len=32", "--config.data.batch_size=8",
             "--config.train.num_steps=6", "--config.train.log_every=1", "--config.train.progress_bar=false",
             "--config.optimizer.learning_rate=3e-3", timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  init = json.loads((new / "init.json").read_text())
  assert init["kept"] == [] and "trunk.blocks.0.attn.qkv.kernel" in init["loaded"]
  losses = [json.loads(l)["loss"] for l in (new / "metrics.jsonl").read_text().splitlines()
            if json.loads(l).get("split") == "train"]
  assert losses and losses[-1] < losses[0]  # training moves the converted weights
  proc = cli(f"--workdir={new}", "--mode=sample", "--config.sample.prompt=ROMEO:", "--config.sample.num_tokens=12",
             timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert proc.stdout.startswith("ROMEO:") and len(proc.stdout.strip()) > len("ROMEO:")
  proc = cli(f"--workdir={new}", "--mode=eval", timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  final = json.loads((new / "final_metrics.json").read_text())
  evaluated = json.loads((new / f"eval_step{final['step']}.json").read_text())
  assert np.isfinite(final["validation"]["loss"]) and evaluated["validation"] == final["validation"]


def one_error(proc) -> str:
  lines = error_lines(proc.stderr)
  assert proc.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: "), proc.stderr[-2000:]
  return lines[0]


def test_bad_input_is_one_line_and_writes_nothing(hf_dirs, runs, convert, tmp_path):
  import shutil
  def copy(name, model="gpt2"):
    shutil.copytree(hf_dirs[model], tmp_path / name)
    return tmp_path / name
  bin_only = copy("bin_only")
  (bin_only / "model.safetensors").rename(bin_only / "pytorch_model.bin")
  no_config = copy("no_config")
  (no_config / "config.json").unlink()
  llama = copy("llama")
  (llama / "config.json").write_text(json.dumps({**json.loads((llama / "config.json").read_text()), "model_type": "llama"}))
  small_vocab = copy("small_vocab")
  vocab = json.loads((small_vocab / "vocab.json").read_text())
  (small_vocab / "vocab.json").write_text(json.dumps(dict(list(vocab.items())[:-2] + [("<|endoftext|>", len(vocab) - 3)])))
  (small_vocab / "merges.txt").write_text("#version: 0.2\n")
  cases = [(("--model=gpt2", f"--src={bin_only}"), "safe_serialization=True"),
           (("--model=gpt2", f"--src={no_config}"), "no config.json"),
           (("--model=gpt2", f"--src={llama}"), "model_type 'llama' is not supported"),
           (("--model=gpt2", f"--src={hf_dirs['bert']}"), "pass --model=bert"),
           (("--model=gpt2", f"--src={small_vocab}"), "ids but the embedding has"),
           (("--model=gpt2", f"--src={hf_dirs['gpt2']}", f"--workdir={runs['bert']}"), "already holds a run")]
  for args, expected in cases:
    target = tmp_path / "target"
    if not any(a.startswith("--workdir") for a in args):
      args = (*args, f"--workdir={target}")
    before = sorted(p.relative_to(runs["bert"]) for p in runs["bert"].rglob("*"))
    line = one_error(convert("hf-to-run", *args))
    assert expected in line, line
    assert not target.exists() and sorted(p.relative_to(runs["bert"]) for p in runs["bert"].rglob("*")) == before
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".target")]  # no staging left behind
  other = tmp_path / "cnn_run"
  other.mkdir()
  (other / "config.json").write_text(json.dumps({"model": {"name": "cnn"}}))
  line = one_error(convert("run-to-hf", f"--workdir={other}", f"--dst={tmp_path / 'dst'}"))
  assert "'cnn' run" in line and not (tmp_path / "dst").exists()
