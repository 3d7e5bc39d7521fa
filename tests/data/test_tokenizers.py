"""Tokenizers: exact round trips, padding, vocabularies, strict prompts, save/load, sentencepiece training."""

import importlib
import inspect
import json
from pathlib import Path

import numpy as np
import pytest
from ml_collections import ConfigDict

from bigmodel_jax.data import tokenizers
from bigmodel_jax.data.tokenizers import ByteTokenizer, CharTokenizer, get_tokenizer, load_tokenizer
from bigmodel_jax.errors import UserError
from conftest import TINY_SHAKESPEARE

SHAKESPEARE = TINY_SHAKESPEARE
UNICODE = "café — naïve ☃\n\tdone"
MODULES = ("argparse", "ast", "asyncio", "collections", "csv", "dataclasses", "datetime", "decimal", "difflib",
           "email.message", "enum", "fractions", "functools", "heapq", "http.client", "inspect", "io", "itertools",
           "json", "logging", "os", "pathlib", "pickle", "random", "re", "shutil", "statistics", "string",
           "subprocess", "tarfile", "textwrap", "threading", "typing", "unittest", "urllib.request", "zipfile")


def tokenizer_config(name="sentencepiece", vocab_size=500, model_type="unigram"):
  return ConfigDict(dict(name=name, vocab_size=vocab_size, model_type=model_type))


@pytest.fixture(scope="module")
def docs() -> tuple[str, str]:
  """Real English (~270 k characters): docstrings of stdlib modules and their classes and functions,
  as (train, held-out) texts."""
  found = []
  for name in MODULES:
    module = importlib.import_module(name)
    found.append(inspect.getdoc(module))
    for _, member in sorted(vars(module).items()):
      if (inspect.isfunction(member) or inspect.isclass(member)) and member.__module__ == module.__name__:
        found.append(inspect.getdoc(member))
  found = [d for d in found if d]
  split = len(found) * 9 // 10
  return "\n\n".join(found[:split]), "\n\n".join(found[split:])


@pytest.fixture(scope="module")
def spm_tokenizers(docs):
  """{model_type: tokenizer} trained on the docstrings with 500 pieces."""
  return {t: get_tokenizer(tokenizer_config(model_type=t), [docs[0]], None, create=True)
          for t in ("unigram", "bpe")}


@pytest.fixture(params=["char", "byte", "unigram", "bpe"])
def any_tokenizer(request, spm_tokenizers, docs):
  if request.param in spm_tokenizers:
    return spm_tokenizers[request.param]
  return tokenizers.build_tokenizer(tokenizer_config(request.param), [docs[0] + UNICODE])


def test_char_vocabulary_is_pad_unk_then_sorted_characters():
  tok = CharTokenizer.build(["hello", "world"])
  assert tok.chars == "dehlorw" and tok.vocab_size == 9 and tok.pad_id == 0
  ids = tok.encode("hello")
  assert ids.dtype == np.int32 and ids.tolist() == [4, 3, 5, 5, 6]
  assert tok.encode("hex").tolist() == [4, 3, 1]  # 'x' is unknown
  assert tok.decode(tok.encode("hex")) == "he\ufffd"


def test_char_round_trips_unicode_and_skips_padding():
  tok = CharTokenizer.build([UNICODE, "abc"])
  ids = tok.encode(UNICODE)
  assert len(ids) == len(UNICODE) and (ids >= 2).all()
  assert tok.decode(ids) == UNICODE
  assert tok.decode(np.concatenate([ids, [0, 0, 0]])) == UNICODE
  assert tok.decode([tok.vocab_size, 10**6]) == "\ufffd\ufffd"  # ids past the vocabulary (a padded model vocab)


@pytest.mark.skipif(not SHAKESPEARE.exists(), reason="shared tinyshakespeare not present")
def test_char_vocabulary_of_tiny_shakespeare_matches_nanogpt():
  text = SHAKESPEARE.read_text()
  n = int(len(text) * 0.9)
  tok = tokenizers.build_tokenizer(tokenizer_config("char"), [text[:n]])
  assert tok.vocab_size == 65 + 2
  ids = tok.encode(text)
  assert (ids >= 2).all() and tok.decode(ids) == text
  # nanoGPT's shakespeare_char ids are ours minus 2: its vocabulary is the same sorted characters.
  assert tok.encode("\n !")[0] == 2 and tok.chars[:3] == "\n !"


def test_char_strict_lists_unknown_characters_in_one_sentence():
  tok = CharTokenizer.build(["hello world"])
  with pytest.raises(UserError) as e:
    tok.encode("hello café ☃ é", strict=True)
  message = str(e.value)
  assert message == "'c', 'a', 'f', 'é', '☃' are not in the tokenizer's vocabulary of 8 characters"
  with pytest.raises(UserError, match=r"^'x' is not in"):
    tok.encode("x", strict=True)
  with pytest.raises(UserError, match=r"^'a', 'b', 'c', 'f', 'g', 'i', 'j', 'k', 'm', 'n' and 9 more are not in"):
    tok.encode("abcdefghijklmnopqrstuvwxyz", strict=True)
  assert tok.encode("hello", strict=True).tolist() == tok.encode("hello").tolist()


def test_byte_round_trips_any_text():
  tok = ByteTokenizer()
  ids = tok.encode(UNICODE, strict=True)
  assert tok.vocab_size == 257 and ids.dtype == np.int32
  assert ids.tolist() == [b + 1 for b in UNICODE.encode("utf-8")]
  assert tok.decode(ids) == UNICODE
  assert tok.decode(ids[:4]) == "caf\ufffd"  # half of 'é' decodes as a replacement character
  assert tok.decode([300]) == "\ufffd"


def test_encode_batch_truncates_and_right_pads(any_tokenizer):
  tok = any_tokenizer
  texts = ["a short text", "the one that is much too long to fit in the row at all, however short the pieces", ""]
  full = [tok.encode(t) for t in texts]
  batch = tok.encode_batch(texts, max_len=12)
  assert batch.shape == (3, 12) and batch.dtype == np.int32
  for row, ids, text in zip(batch, full, texts):
    n = min(len(ids), 12)
    assert row[:n].tolist() == ids[:n].tolist() and (row[n:] == 0).all()
    if len(ids) <= 12:
      assert tok.decode(row) == text  # pad skipped
  assert len(full[1]) > 12 and (batch[2] == 0).all()


def test_round_trip_is_exact(any_tokenizer, docs):
  """Lossless for any text made of known characters: spaces, tabs, newlines and unicode kept as they are."""
  known = set(docs[0])
  for text in (docs[1], "  two  spaces,\n\n\ttab and blank lines\n", " leading space"):
    text = "".join(c for c in text if c in known)
    ids = any_tokenizer.encode(text, strict=True)
    assert any_tokenizer.decode(ids) == text


@pytest.mark.parametrize("model_type", ["unigram", "bpe"])
def test_sentencepiece_compresses_held_out_text(spm_tokenizers, docs, model_type):
  tok = spm_tokenizers[model_type]
  assert tok.name == "sentencepiece" and tok.vocab_size == 500 and tok.model_type == model_type
  ids = tok.encode(docs[1])
  assert ids.dtype == np.int32 and ids.min() >= 1 and ids.max() < 500
  assert len(docs[1]) / len(ids) > 1.6  # measured: 1.8 (unigram), 2.0 (bpe) characters per piece; 1.0 for char
  assert (ids == tokenizers.UNK_ID).mean() < 0.001


def test_sentencepiece_encodes_lines_as_the_whole_text(spm_tokenizers, docs):
  """encode() splits at newlines for speed; the ids are those sentencepiece gives the whole text."""
  for tok in spm_tokenizers.values():
    assert tok.encode(docs[1]).tolist() == tok._sp.encode(docs[1])


def test_sentencepiece_training_is_deterministic_and_quiet(docs, spm_tokenizers, capfd):
  capfd.readouterr()
  again = tokenizers.build_tokenizer(tokenizer_config(model_type="unigram"), [docs[0]])
  assert capfd.readouterr().err == ""  # sentencepiece's training log silenced
  assert again.model == spm_tokenizers["unigram"].model
  assert again.encode(docs[1]).tolist() == spm_tokenizers["unigram"].encode(docs[1]).tolist()


def test_sentencepiece_learns_from_train_texts_only(docs):
  tok = tokenizers.build_tokenizer(tokenizer_config(vocab_size=120), [docs[0]])
  assert tok.encode("☃").tolist() == [tokenizers.UNK_ID]
  assert tok.decode(tok.encode("a☃b")) == "a\ufffdb"


def test_sentencepiece_strict_lists_unknown_characters(spm_tokenizers):
  tok = spm_tokenizers["unigram"]
  with pytest.raises(UserError) as e:
    tok.encode("snow ☃☄ and ☃", strict=True)
  assert str(e.value) == "'☃', '☄' are not in the tokenizer's vocabulary of 500 sentencepiece pieces"


def test_a_lone_surrogate_is_an_unknown_character_never_a_crash(any_tokenizer):
  """Was: sentencepiece raised TypeError ('List elements must be str or bytes') for a lone surrogate, which JSON's
  "\\ud800" and a command line's undecodable byte give: a traceback in --mode=sample, a 500 in --mode=serve."""
  text = "ab\ud800c\udcff"
  assert any_tokenizer.encode_batch([text, "ab"], 8).shape == (2, 8)
  if any_tokenizer.name != "byte":  # bytes represent any text: strict never fails
    with pytest.raises(UserError, match=r"^'\\ud800', '\\udcff' are not in the tokenizer's vocabulary"):
      any_tokenizer.encode(text, strict=True)


def test_sentencepiece_vocab_size_errors_name_the_config_field():
  text = ["the quick brown fox jumps over the lazy dog\n" * 30]
  with pytest.raises(UserError, match=r"config\.data\.tokenizer\.vocab_size=500 .*at most \d+"):
    tokenizers.build_tokenizer(tokenizer_config(vocab_size=500), text)
  with pytest.raises(UserError, match=r"config\.data\.tokenizer\.vocab_size=10 .*at least \d+"):
    tokenizers.build_tokenizer(tokenizer_config(vocab_size=10), text)
  with pytest.raises(UserError, match="no training text"):
    tokenizers.build_tokenizer(tokenizer_config(), [""])


def test_save_and_load_give_identical_encodings(any_tokenizer, docs, tmp_path):
  any_tokenizer.save(tmp_path)
  record = json.loads((tmp_path / "tokenizer.json").read_text())
  assert record["name"] == any_tokenizer.name and record["vocab_size"] == any_tokenizer.vocab_size
  loaded = load_tokenizer(tmp_path)
  assert type(loaded) is type(any_tokenizer) and loaded.vocab_size == any_tokenizer.vocab_size
  assert loaded.encode(docs[1]).tolist() == any_tokenizer.encode(docs[1]).tolist()
  if any_tokenizer.name == "char":
    assert record["chars"] == any_tokenizer.chars
  if any_tokenizer.name == "sentencepiece":
    assert record["model_file"] == "spm.model" and (tmp_path / "spm.model").read_bytes() == any_tokenizer.model
  assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["tokenizer.json"] + (
      ["spm.model"] if any_tokenizer.name == "sentencepiece" else []))  # no temporary files left


def test_get_tokenizer_builds_saves_then_reuses(tmp_path):
  config = tokenizer_config("char")
  built = get_tokenizer(config, ["abcxyz"], tmp_path, create=True)
  assert built.chars == "abcxyz" and (tmp_path / "tokenizer.json").exists()
  # Later runs (eval, resume) get the saved vocabulary even if the texts they see differ.
  again = get_tokenizer(config, ["abc"], tmp_path, create=False)
  assert again.chars == "abcxyz"
  assert get_tokenizer(config, ["abc"], None, create=True).chars == "abc"
  # A new build (a first training run: no checkpoint yet) replaces what an earlier failed attempt left.
  assert get_tokenizer(config, ["ab"], tmp_path, create=True).chars == "ab"
  assert get_tokenizer(config, ["abc"], tmp_path, create=False).chars == "ab"


def test_get_tokenizer_errors(spm_tokenizers, tmp_path):
  with pytest.raises(UserError, match=r"none/tokenizer\.json is missing, but the run's checkpoints .* put back"):
    get_tokenizer(tokenizer_config("char"), ["abc"], tmp_path / "none", create=False)
  get_tokenizer(tokenizer_config("byte"), ["abc"], tmp_path / "byte", create=True)
  with pytest.raises(UserError, match=r"byte/tokenizer\.json is a byte tokenizer but config\.data\.tokenizer\.name "
                                      r"is char; use a new --workdir"):
    get_tokenizer(tokenizer_config("char"), ["abc"], tmp_path / "byte", create=False)
  spm_tokenizers["unigram"].save(tmp_path / "spm")
  with pytest.raises(UserError, match=r"with vocab_size 500 but config\.data\.tokenizer\.vocab_size is 8000"):
    get_tokenizer(tokenizer_config(vocab_size=8000), ["abc"], tmp_path / "spm", create=False)
  with pytest.raises(UserError, match=r"with model_type unigram but config\.data\.tokenizer\.model_type is bpe"):
    get_tokenizer(tokenizer_config(model_type="bpe"), ["abc"], tmp_path / "spm", create=False)


def corrupt(directory: Path, how: str) -> None:
  path = directory / "tokenizer.json"
  record = json.loads(path.read_text())
  if how == "bad json":
    path.write_text(path.read_text()[:-5])
  elif how == "no name":
    path.write_text(json.dumps({"vocab_size": 3}))
  elif how == "vocab_size":
    path.write_text(json.dumps({**record, "vocab_size": record["vocab_size"] + 1}))
  elif how == "unsorted chars":
    path.write_text(json.dumps({**record, "chars": "ba"}))
  elif how == "no chars":
    path.write_text(json.dumps({"name": "char", "vocab_size": 4}))
  elif how == "no spm.model":
    (directory / "spm.model").unlink()
  elif how == "garbage spm.model":
    (directory / "spm.model").write_bytes(b"not a model")
    path.write_text(json.dumps({k: v for k, v in record.items() if k != "model_sha256"}))
  elif how == "other spm.model":
    (directory / "spm.model").write_bytes(b"not a model")


@pytest.mark.parametrize("how,kind,expected", [
    ("bad json", "char", r"tokenizer\.json cannot be read \(Unterminated string"),
    ("no name", "char", r"tokenizer\.json is corrupt \(needs a name"),
    ("vocab_size", "char", r"tokenizer\.json says vocab_size 5 but the tokenizer it describes has 4"),
    ("unsorted chars", "char", r"tokenizer\.json is corrupt \(ValueError: chars must be distinct and sorted\)"),
    ("no chars", "char", r"tokenizer\.json is corrupt \(KeyError: 'chars'\)"),
    ("vocab_size", "sentencepiece", r"tokenizer\.json says vocab_size 501 but the tokenizer it describes has 500"),
    ("no spm.model", "sentencepiece", r"spm\.model cannot be read \(No such file or directory\), and .*json"),
    ("garbage spm.model", "sentencepiece", r"spm\.model is not a sentencepiece model \(it does not parse\)"),
    ("other spm.model", "sentencepiece", r"spm\.model is not the model .*tokenizer\.json was saved with"),
])
def test_load_errors_name_the_file_and_say_what_to_do(how, kind, expected, spm_tokenizers, tmp_path):
  tok = spm_tokenizers["unigram"] if kind == "sentencepiece" else CharTokenizer("ab")
  tok.save(tmp_path)
  corrupt(tmp_path, how)
  with pytest.raises(UserError, match=expected) as e:
    load_tokenizer(tmp_path)
  message = str(e.value)
  assert str(tmp_path) in message and "\n" not in message and "new --workdir" in message


def test_load_missing_tokenizer(tmp_path):
  with pytest.raises(UserError, match=r"tokenizer\.json not found; train first \(--mode=train\), or check --workdir$"):
    load_tokenizer(tmp_path)


def test_held_out_text_never_shapes_the_vocabulary():
  """A character only validation or test text has is not in the vocabulary (it encodes as unk): the test split's
  content decides nothing of the model, not even its vocabulary size."""
  from bigmodel_jax.data import TextCorpus, corpus
  text = TextCorpus("t", train=["abcab"], test=["abz"], train_labels=np.array([0]), test_labels=np.array([1]),
                    class_names=("a", "b"), validation=["aby"], validation_labels=np.array([1]))
  config = ConfigDict(dict(tokenizer=tokenizer_config("char"), seq_len=4))
  dataset = corpus.tokenize(text, config, None, create_tokenizer=True)
  assert dataset.tokenizer.chars == "abc" and dataset.vocab_size == 5
  assert dataset.test["inputs"].tolist() == [[2, 3, 1, 0]] and dataset.validation["inputs"][0, 2] == 1
  lm = corpus.tokenize(TextCorpus("t", train=["abcabc"], test=["abzab"], validation=["abyab"]),
                       ConfigDict(dict(tokenizer=tokenizer_config("char"), seq_len=2)), None, create_tokenizer=True)
  assert lm.tokenizer.chars == "abc"
