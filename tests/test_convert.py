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


def perturbed(model, seed: int):
  """Every parameter moved off its initial value (LayerNorm scales off 1, biases off 0), so a LayerNorm or bias
  mapped to the wrong place changes the logits."""
  torch.manual_seed(seed)
  with torch.no_grad():
    for p in model.parameters():
      p.add_(0.1 * torch.randn_like(p))
  return model


@pytest.fixture(scope="module")
def hf_dirs(tmp_path_factory):
  """A GPT2LMHeadModel with a byte-level BPE trained here, and a BertForMaskedLM with a small WordPiece vocab;
  gpt2_json and bert_json: the same models with only a tokenizer.json (bert_json's written by transformers 5's
  save_pretrained, as its BERT directories are)."""
  root = tmp_path_factory.mktemp("hf")
  bpe = tokenizers.ByteLevelBPETokenizer()
  bpe.train_from_iterator([corpus()], vocab_size=300, special_tokens=["<|endoftext|>"], show_progress=False)
  gpt2 = root / "gpt2"
  gpt2.mkdir()
  bpe.save_model(str(gpt2))
  gpt2_json = root / "gpt2_json"
  gpt2_json.mkdir()
  bpe.save(str(gpt2_json / "tokenizer.json"))
  vocab = len(json.loads((gpt2 / "vocab.json").read_text()))
  torch.manual_seed(0)
  model = transformers.GPT2LMHeadModel(transformers.GPT2Config(
      n_layer=LAYERS, n_head=HEADS, n_embd=DIM, n_positions=POSITIONS, vocab_size=vocab, bos_token_id=vocab - 1,
      eos_token_id=vocab - 1)).eval()
  perturbed(model, 10).save_pretrained(gpt2, safe_serialization=True)
  model.save_pretrained(gpt2_json, safe_serialization=True)
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
  perturbed(model, 11).save_pretrained(bert, safe_serialization=True)
  bert_json = root / "bert_json"
  model.save_pretrained(bert_json, safe_serialization=True)
  transformers.BertTokenizer.from_pretrained(bert).save_pretrained(bert_json)
  assert not (bert_json / "vocab.txt").exists() and (bert_json / "tokenizer.json").is_file()
  return {"gpt2": gpt2, "bert": bert, "gpt2_json": gpt2_json, "bert_json": bert_json}


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
  for model in ("gpt2", "bert"):
    proc = convert("hf-to-run", f"--model={model}", f"--src={hf_dirs[model]}", f"--workdir={root / model}")
    assert proc.returncode == 0, proc.stderr[-3000:]
  return {m: root / m for m in ("gpt2", "bert")}


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
    assert torch.equal(cls.from_pretrained(dst).eval()(tokens).logits,
                       cls.from_pretrained(hf_dirs[model]).eval()(tokens).logits)
  tokenizer = transformers.AutoTokenizer.from_pretrained(dst)  # the tokenizer files written beside the weights
  assert tokenizer.encode("the king", add_special_tokens=False) == \
      transformers.AutoTokenizer.from_pretrained(hf_dirs[model]).encode("the king", add_special_tokens=False)
  assert tokenizer.model_max_length == POSITIONS


def test_tokenizer_ids_equal_transformers(hf_dirs, tmp_path):
  from bigmodel_jax.data import bpe, wordpiece
  from bigmodel_jax.data.tokenizers import load_tokenizer
  ours, theirs = bpe.from_hf_dir(hf_dirs["gpt2"]), transformers.GPT2Tokenizer.from_pretrained(hf_dirs["gpt2"])
  texts = ["ROMEO: what's here?\n\n  I'll  go.  ", "naïve café 123 4567 — the<|endoftext|>king",
           "日本語😀\t\r\n x"]
  for text in texts:
    ids = ours.encode(text)
    assert ids.tolist() == theirs.encode(text), text
    assert ours.decode(ids) == text.replace("<|endoftext|>", "")  # byte-level: lossless but for the pad (eos)
  assert bpe.from_hf_dir(hf_dirs["gpt2_json"]).record() == ours.record()  # tokenizer.json: the same vocab and merges
  texts = ["The King speaks; the QUEEN hears.", "Naïve café — peace?", "zzz 日 x", "the [MASK] speaks",
           "[CLS] the king[SEP] [UNK] [PAD]", "[mask] the"]
  ours, theirs = wordpiece.from_hf_dir(hf_dirs["bert"]), transformers.BertTokenizer.from_pretrained(hf_dirs["bert"])
  for text in texts:
    assert ours.encode(text).tolist() == theirs.encode(text, add_special_tokens=False), text
  assert ours.pad_id == 0 and ours.mask_id == theirs.mask_token_id
  # uncased without stripping accents, and no CJK splitting: from tokenizer_config.json beside vocab.txt, and from
  # the tokenizer.json save_pretrained writes; the saved and reloaded tokenizer behaves the same
  texts += ["naïve café", "NAÏVE Café", "the日本king 日"]
  for k, settings in enumerate([dict(strip_accents=False), dict(tokenize_chinese_chars=False),
                                dict(do_lower_case=False, strip_accents=True)]):
    theirs = transformers.BertTokenizer.from_pretrained(hf_dirs["bert"], **settings)
    (tmp_path / f"txt{k}").mkdir()
    (tmp_path / f"txt{k}" / "vocab.txt").write_text((hf_dirs["bert"] / "vocab.txt").read_text())
    (tmp_path / f"txt{k}" / "tokenizer_config.json").write_text(json.dumps(settings))
    theirs.save_pretrained(tmp_path / f"json{k}")
    for source in (tmp_path / f"txt{k}", tmp_path / f"json{k}"):
      ours = wordpiece.from_hf_dir(source)
      ours.save(tmp_path / "saved")
      reloaded = load_tokenizer(tmp_path / "saved")
      for text in texts:
        expected = theirs.encode(text, add_special_tokens=False)
        assert ours.encode(text).tolist() == reloaded.encode(text).tolist() == expected, (settings, source, text)


def test_bert_with_only_tokenizer_json_converts(hf_dirs, runs, convert, tmp_path):
  """transformers 5's save_pretrained writes BERT's tokenizer as tokenizer.json alone (no vocab.txt)."""
  from bigmodel_jax.data.tokenizers import load_tokenizer
  proc = convert("hf-to-run", "--model=bert", f"--src={hf_dirs['bert_json']}", f"--workdir={tmp_path / 'run'}")
  assert proc.returncode == 0, proc.stderr[-3000:]
  ours, theirs = load_tokenizer(tmp_path / "run" / "tokenizer"), transformers.AutoTokenizer.from_pretrained(
      hf_dirs["bert_json"])
  for text in ["The King speaks; the QUEEN hears.", "Naïve café — the [MASK] speaks?", "zzz 日 x"]:
    assert ours.encode(text).tolist() == theirs.encode(text, add_special_tokens=False), text
  assert ours.record() == load_tokenizer(runs["bert"] / "tokenizer").record()  # as from vocab.txt


def two_step_gpt(cli, run: Path, seed: int, *overrides: str) -> Path:
  """A char GPT (biases on, as GPT-2 has them) trained 2 steps on corpus(3000, seed) into `run` -> run."""
  text = run.parent / f"input{seed}.txt"
  text.write_text(corpus(3000, seed=seed))
  proc = cli("--config=configs/shakespeare_char_gpt.py:smoke", f"--workdir={run}", f"--config.data.path={text}",
             "--config.train.num_steps=2", "--config.schedule.warmup_steps=1", "--config.train.progress_bar=false",
             "--config.model.use_bias=true", *overrides, timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  return run


def test_scanned_run_to_hf(cli, convert, tmp_path):
  """A run with config.model.scan_layers (blocks stacked) is written per layer: transformers' logits are ours."""
  run = two_step_gpt(cli, tmp_path / "scanned", 4, "--config.model.scan_layers=true",
                     "--config.model.positions=learned")
  proc = convert("run-to-hf", f"--workdir={run}", f"--dst={tmp_path / 'hf'}")
  assert proc.returncode == 0, proc.stderr[-3000:]
  hf = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "hf").eval()
  seq_len = min(hf.config.n_positions, 32)
  tokens = np.random.default_rng(3).integers(0, hf.config.vocab_size, (2, seq_len))
  with torch.no_grad():
    reference = hf(torch.as_tensor(tokens)).logits.numpy()
  error = float(np.abs(our_logits(run, tokens.astype(np.int32)) - reference).max())
  assert error <= 1e-5 * float(np.abs(reference).max()), error


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


BATCH = """
import json, os, sys, tempfile, warnings
from pathlib import Path
from absl import flags
from bigmodel_jax import convert, errors
convert.define_flags()
argvs, made, watched = json.loads(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3])
results, stderr = [], os.dup(2)
for argv in argvs:
  flags.FLAGS.unparse_flags()
  with tempfile.TemporaryFile("w+") as told, warnings.catch_warnings():  # each warning shown anew, as in a new process
    sys.stderr.flush()
    os.dup2(told.fileno(), 2)
    try:
      convert.run(flags.FLAGS(["convert", *argv])[1:])
      message = None
    except errors.UserError as e:
      message = str(e)
    except Exception as e:
      message = f"not a UserError: {type(e).__name__}: {e}"
    finally:
      sys.stderr.flush()
      os.dup2(stderr, 2)
    told.seek(0)
    results.append((message, made.exists(), sorted(str(p.relative_to(watched)) for p in watched.rglob("*")),
                    told.read()))
print(json.dumps(results))
"""


def in_one_process(cache_dir: Path, argvs: list[list[str]], made: Path, watched: Path) -> list[tuple]:
  """Each command line through convert.run (the command's body; the command's one-line exit is tested apart) in
  one process: (its UserError's message or None, whether `made` exists after it, `watched`'s files after it, what
  it wrote to stderr). Twenty launches of the command would spend ~45 s importing."""
  proc = subprocess.run([sys.executable, "-c", BATCH, json.dumps(argvs), str(made), str(watched)], cwd=ROOT,
                        env=env(cache_dir), capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  return [tuple(r) for r in json.loads(proc.stdout.strip().splitlines()[-1])]


def test_bad_input_is_one_line_and_writes_nothing(hf_dirs, runs, convert, cache_dir, tmp_path):
  import shutil
  def copy(name, model="gpt2", **config):
    shutil.copytree(hf_dirs[model], tmp_path / name)
    if config:
      file = tmp_path / name / "config.json"
      file.write_text(json.dumps({**json.loads(file.read_text()), **config}))
    return tmp_path / name
  bin_only = copy("bin_only")
  (bin_only / "model.safetensors").rename(bin_only / "pytorch_model.bin")
  no_config = copy("no_config")
  (no_config / "config.json").unlink()
  small_vocab = copy("small_vocab")
  vocab = json.loads((small_vocab / "vocab.json").read_text())
  short = dict(list(vocab.items())[:-2] + [("<|endoftext|>", len(vocab) - 3)])
  (small_vocab / "vocab.json").write_text(json.dumps(short))
  (small_vocab / "merges.txt").write_text("#version: 0.2\n")
  prefix_space = copy("prefix_space", "gpt2_json")
  record = json.loads((prefix_space / "tokenizer.json").read_text())
  record["pre_tokenizer"]["add_prefix_space"] = True
  (prefix_space / "tokenizer.json").write_text(json.dumps(record))
  bpe_bert = copy("bpe_bert", "bert_json")
  shutil.copy(hf_dirs["gpt2_json"] / "tokenizer.json", bpe_bert / "tokenizer.json")
  yes_lower = copy("yes_lower", "bert")
  (yes_lower / "tokenizer_config.json").write_text(json.dumps({"do_lower_case": "yes"}))
  gpt2, bert = ("--model=gpt2", f"--src={hf_dirs['gpt2']}"), ("--model=bert",)
  cases = [(("--model=gpt2", f"--src={bin_only}"), "safe_serialization=True"),
           (("--model=gpt2", f"--src={no_config}"), "no config.json"),
           (("--model=gpt2", f"--src={copy('llama', model_type='llama')}"), "model_type 'llama' is not supported"),
           (("--model=gpt2", f"--src={hf_dirs['bert']}"), "pass --model=bert"),
           (("--model=gpt2", f"--src={small_vocab}"), "ids but the embedding has"),
           ((*gpt2, f"--workdir={runs['bert']}"), "already holds a run"),
           ((*gpt2, "--seq_len=0"), "--seq_len: 0 must be between 1 and the model's 64 positions"),
           (("--model=gpt2", f"--src={copy('npos', n_positions=128)}"),
            "transformer.wpe.weight has shape (64, 32), but config.json's n_positions=128 implies (128, 32)"),
           (("--model=gpt2", f"--src={copy('ninner', n_inner=64)}"),
            "transformer.h.0.mlp.c_fc.weight has shape (32, 128), but config.json's n_inner=64 implies (32, 64)"),
           (("--model=gpt2", f"--src={copy('vocab', vocab_size=500)}"), "config.json's vocab_size=500 implies"),
           ((*bert, f"--src={copy('types', 'bert', type_vocab_size=3)}"),
            "token_type_embeddings.weight has shape (2, 32), but config.json's type_vocab_size=3 implies (3, 32)"),
           ((*bert, f"--src={copy('inter', 'bert', intermediate_size=64)}"), "config.json's intermediate_size=64"),
           (("--model=gpt2", f"--src={copy('head0', n_head=0)}"), "config.json: n_head=0 is not a positive integer"),
           (("--model=gpt2", f"--src={copy('head3', n_head=3)}"), "n_head=3 does not divide n_embd=32"),
           (("--model=gpt2", f"--src={copy('layers', n_layer='2')}"), 'n_layer="2" is not a positive integer'),
           (("--model=gpt2", f"--src={copy('embd', n_embd=32.0)}"), "n_embd=32.0 is not a positive integer"),
           (("--model=gpt2", f"--src={copy('eps', layer_norm_epsilon='abc')}"),
            'layer_norm_epsilon="abc" is not a positive number'),
           (("--model=gpt2", f"--src={copy('drop', resid_pdrop=1.5)}"), "resid_pdrop=1.5 is not a number in [0, 1)"),
           ((*bert, f"--src={copy('bdrop', 'bert', attention_probs_dropout_prob=-0.1)}"),
            "attention_probs_dropout_prob=-0.1 is not a number in [0, 1)"),
           (("--model=gpt2", f"--src={prefix_space}"), "add_prefix_space=true"),
           ((*bert, f"--src={bpe_bert}"), "tokenizer.json: not a WordPiece tokenizer (model type 'BPE')"),
           ((*bert, f"--src={yes_lower}"), 'tokenizer_config.json: do_lower_case="yes" is not true or false')]
  target = tmp_path / "new" / "target"  # its parent is made only once the conversion is staged
  argvs = [["hf-to-run", *args, *([] if any(a.startswith("--workdir") for a in args) else [f"--workdir={target}"])]
           for args, _ in cases]
  before = sorted(str(p.relative_to(runs["bert"])) for p in runs["bert"].rglob("*"))
  line = one_error(convert(*argvs[0]))  # the command itself: one line, exit 2
  assert cases[0][1] in line and not (tmp_path / "new").exists(), line
  for (_, expected), (message, made, listing, told) in zip(cases, in_one_process(cache_dir, argvs, tmp_path / "new",
                                                                                 runs["bert"]), strict=True):
    assert message is not None and "\n" not in message and expected in message, (expected, message)
    assert error_lines(told) == [], (message, told[-2000:])  # the command's stderr: its one line, nothing else
    assert not made and listing == before, message  # nothing written, the run it would overwrite intact
  other = tmp_path / "cnn_run"
  other.mkdir()
  (other / "config.json").write_text(json.dumps({"model": {"name": "cnn"}}))
  line = one_error(convert("run-to-hf", f"--workdir={other}", f"--dst={tmp_path / 'dst'}"))
  assert "'cnn' run" in line and not (tmp_path / "dst").exists()


def test_a_failed_conversion_removes_the_parents_it_made(tmp_path):
  """staged() makes the target's missing parents; a failure while building removes them (not ones that were)."""
  from bigmodel_jax.convert import staged
  from bigmodel_jax.errors import UserError
  (tmp_path / "kept").mkdir()
  def build(staging):
    (staging / "half_written").write_text("x")
    raise UserError("failed")
  with pytest.raises(UserError):
    staged(tmp_path / "kept" / "a" / "b" / "target", build)
  assert [p.name for p in tmp_path.rglob("*")] == ["kept"]
  staged(tmp_path / "kept" / "a" / "target", lambda staging: (staging / "done").write_text("x"))
  assert (tmp_path / "kept" / "a" / "target" / "done").is_file()


def test_converted_run_on_its_data_path_takes_any_validation_fraction(hf_dirs, convert, tmp_path):
  """A converted run (hf-to-run --data_path) records its text file and validation_fraction 0.1 but trained on
  none of it: fine-tuning it on that file holding out more is no leak, not config.init's held-out refusal."""
  import ml_collections
  from bigmodel_jax import run_config, train
  text = tmp_path / "input.txt"
  text.write_text(corpus(8000, seed=4))
  converted = tmp_path / "converted"
  proc = convert("hf-to-run", "--model=gpt2", f"--src={hf_dirs['gpt2']}", f"--workdir={converted}",
                 f"--data_path={text}", "--seq_len=32")
  assert proc.returncode == 0, proc.stderr[-3000:]
  config = ml_collections.ConfigDict(run_config.as_config_values(run_config.load(converted / "config.json", "")))
  config.init.workdir, config.data.validation_fraction = str(converted), 0.2
  config.data.batch_size = 8
  run = train.build_run(config, tmp_path / "tuned")
  try:
    assert run.init_source is not None and run.init_source.step == 0
  finally:
    run.checkpointer.close()
    run.lock.close()


def test_a_converted_bert_says_what_it_is_for_in_sample_and_predict(hf_dirs, convert, cli, tmp_path):
  """Was: --mode=sample said 'use --mode=predict', and --mode=predict (a text file: a token stream) 'a language model
  generates text with --mode=sample': each sent the user to the other."""
  from test_errors import assert_one_error
  text = tmp_path / "input.txt"
  text.write_text(corpus(3000, seed=5))
  proc = convert("hf-to-run", "--model=bert", f"--src={hf_dirs['bert']}", f"--workdir={tmp_path / 'bert'}",
                 f"--data_path={text}", "--seq_len=32")
  assert proc.returncode == 0, proc.stderr[-3000:]
  for mode in ("sample", "predict"):
    line = assert_one_error(cli(f"--workdir={tmp_path / 'bert'}", f"--mode={mode}"), f"--mode={mode} is for",
                            "a masked language model is scored by --mode=eval", "config.init.workdir")
    assert "use --mode=predict" not in line and "with --mode=sample" not in line, line


def test_a_damaged_latest_step_names_run_to_hfs_own_flag(cli, convert, tmp_path):
  """run-to-hf picks a step with --step: the damaged-checkpoint line names it, not main's --checkpoint_step."""
  run = two_step_gpt(cli, tmp_path / "run", 5, "--config.train.checkpoint_every=1")
  largest = max((p for p in (run / "checkpoints" / "2").rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)
  largest.write_bytes(largest.read_bytes()[:100])
  line = one_error(convert("run-to-hf", f"--workdir={run}", f"--dst={tmp_path / 'hf'}"))
  assert "checkpoint" in line and "pass --step=1" in line and "--checkpoint_step" not in line, line
  assert not (tmp_path / "hf").exists()
  proc = convert("run-to-hf", f"--workdir={run}", f"--dst={tmp_path / 'hf'}", "--step=1")
  assert proc.returncode == 0, proc.stderr[-3000:]
