"""BERT's WordPiece tokenizer (`config.data.tokenizer.name="bert_wordpiece"`), read from a Hugging Face directory.

Like gpt2_bpe (data/bpe.py) it is not learnt from text: it comes with converted BERT weights (bigmodel_jax.convert
hf-to-run --model=bert), whose embedding rows are its ids (vocab.txt, one token a line). [PAD] is id 0 in BERT's
vocabularies, as our encoders' padding mask needs (a vocabulary where it is not is refused), and [MASK] is the id
masked language modelling puts in. `encode` gives the word pieces of the text only, without [CLS] / [SEP] (as
transformers' `encode(text, add_special_tokens=False)`): a corpus is a stream of pieces cut into windows.

The published algorithm in pure Python, as transformers 5's BertTokenizer (the `tokenizers` library) runs it:
the special tokens of the vocabulary written in the text ([MASK], [CLS], ...) are their ids, never split; the
text between them is cleaned (control characters dropped, whitespace to spaces), CJK ideographs get spaces
around them (tokenize_chinese_chars), it is lower-cased (do_lower_case) and accents are stripped (strip_accents;
None: when lower-casing), then split on whitespace and punctuation, each word greedily into the longest pieces
of the vocabulary ("##" for pieces inside a word); a word that does not split is [UNK]. The settings come from
tokenizer_config.json beside vocab.txt, or from tokenizer.json's BertNormalizer where that is the only file (what
transformers 5's save_pretrained writes). Decoding joins pieces with spaces (the casing, accents and spacing
before punctuation are gone: it is lossy, as BERT's own).
"""

import functools
import hashlib
import json
import re
import unicodedata
from pathlib import Path

import numpy as np

from bigmodel_jax.data.tokenizers import Tokenizer
from bigmodel_jax.errors import UserError
from bigmodel_jax.runinfo import write_text_atomic

NAME = "bert_wordpiece"
VOCAB_FILE = "vocab.txt"
SPECIAL = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")
MAX_WORD_CHARS = 100  # longer words are [UNK] (BERT's max_input_chars_per_word)


def _is_cjk(cp: int) -> bool:
  return any(lo <= cp <= hi for lo, hi in ((0x4E00, 0x9FFF), (0x3400, 0x4DBF), (0x20000, 0x2A6DF), (0x2A700, 0x2B73F),
                                          (0x2B740, 0x2B81F), (0x2B820, 0x2CEAF), (0xF900, 0xFAFF), (0x2F800, 0x2FA1F)))


def _is_punctuation(c: str) -> bool:
  cp = ord(c)
  return 33 <= cp <= 47 or 58 <= cp <= 64 or 91 <= cp <= 96 or 123 <= cp <= 126 or \
      unicodedata.category(c).startswith("P")


def words(text: str, lower_case: bool, strip_accents: bool | None = None, chinese_chars: bool = True) -> list[str]:
  """BERT's basic tokenizer: cleaned, (CJK-split, lower-cased, accent-stripped) words and punctuation marks."""
  out = []
  for c in text:
    cp = ord(c)
    if cp == 0 or cp == 0xFFFD or (unicodedata.category(c).startswith("C") and c not in "\t\n\r"):
      continue
    out.append(" " if c.isspace() else f" {c} " if chinese_chars and _is_cjk(cp) else c)
  text = "".join(out)
  if lower_case:
    text = text.lower()
  if lower_case if strip_accents is None else strip_accents:
    text = "".join(c for c in unicodedata.normalize("NFD", text) if unicodedata.category(c) != "Mn")
  pieces = []
  for word in text.split():
    start = 0
    for i, c in enumerate(word):
      if _is_punctuation(c):
        pieces.extend([w for w in (word[start:i], c) if w])
        start = i + 1
    if start < len(word):
      pieces.append(word[start:])
  return pieces


class WordPieceTokenizer(Tokenizer):
  """BERT's vocabulary: [PAD] = 0, [UNK], [CLS], [SEP], [MASK] special (never sampled, never a random replacement)."""
  name = NAME

  def __init__(self, tokens: list[str], lower_case: bool = True, strip_accents: bool | None = None,
               chinese_chars: bool = True):
    self.tokens, self.lower_case = list(tokens), bool(lower_case)
    self.strip_accents = None if strip_accents is None else bool(strip_accents)
    self.chinese_chars = bool(chinese_chars)
    self.vocab = {t: i for i, t in enumerate(self.tokens)}
    if self.vocab.get("[PAD]") != 0 or "[UNK]" not in self.vocab or "[MASK]" not in self.vocab:
      raise ValueError("not a BERT vocabulary ([PAD] must be id 0, and [UNK] and [MASK] present)")
    self.vocab_size = len(self.tokens)
    self.unk_id, self.mask_id = self.vocab["[UNK]"], self.vocab["[MASK]"]
    self.special_ids = tuple(self.vocab[t] for t in SPECIAL if t in self.vocab)
    # written in a text, a special token is its id (transformers' added tokens: matched as written, before cleaning)
    self._specials = re.compile("(" + "|".join(re.escape(t) for t in SPECIAL if t in self.vocab) + ")")

  @functools.lru_cache(maxsize=1 << 16)
  def _word_ids(self, word: str) -> tuple[int, ...]:
    if len(word) > MAX_WORD_CHARS:
      return (self.unk_id,)
    ids, start = [], 0
    while start < len(word):
      end = len(word)
      while end > start and (("##" if start else "") + word[start:end]) not in self.vocab:
        end -= 1
      if end == start:
        return (self.unk_id,)
      ids.append(self.vocab[("##" if start else "") + word[start:end]])
      start = end
    return tuple(ids)

  def encode(self, text: str, *, strict: bool = False) -> np.ndarray:
    ids, unknown = [], []
    for k, segment in enumerate(self._specials.split(text)):
      if k % 2:  # a special token
        ids.append(self.vocab[segment])
        continue
      for word in words(segment, self.lower_case, self.strip_accents, self.chinese_chars):
        piece_ids = self._word_ids(word)
        if piece_ids == (self.unk_id,):
          unknown.append(word)
        ids.extend(piece_ids)
    if strict and unknown:
      from bigmodel_jax.data.tokenizers import _unknown_error
      raise _unknown_error(list(dict.fromkeys(unknown)), f"tokenizer's WordPiece vocabulary of {self.vocab_size}")
    return np.asarray(ids, np.int32)

  def decode(self, ids) -> str:
    ids = np.asarray(ids, np.int64).reshape(-1)
    pieces = [self.tokens[i] if 0 <= i < self.vocab_size else "[UNK]" for i in ids.tolist() if i != self.pad_id]
    return " ".join(pieces).replace(" ##", "")

  def _text(self) -> str:
    return "".join(t + "\n" for t in self.tokens)

  def _config(self) -> dict:
    # the other settings only where they are not BERT's defaults: the record (which data fingerprints hash) of
    # tokenizers saved before they existed stays as it was
    return {"lower_case": self.lower_case,
            **({"strip_accents": self.strip_accents} if self.strip_accents is not None else {}),
            **({"tokenize_chinese_chars": False} if not self.chinese_chars else {}),
            "vocab_sha256": hashlib.sha256(self._text().encode()).hexdigest()}

  def save(self, directory: Path) -> None:
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    write_text_atomic(directory / VOCAB_FILE, self._text())
    super().save(directory)


def read_vocab(path: Path) -> list[str]:
  return [line.rstrip("\n").rstrip("\r") for line in path.read_text(encoding="utf-8").splitlines(keepends=True)]


def _setting(settings: dict, key: str, default, source: Path, none_ok: bool = False):
  value = settings.get(key, default)
  if not isinstance(value, bool) and not (none_ok and value is None):
    raise UserError(f"{source}: {key}={json.dumps(value)[:60]} is not true or false{' or null' if none_ok else ''}; "
                    "fix it, or give the model's own tokenizer files")
  return value


def _from_tokenizer_json(record: dict, source: Path) -> tuple[list[str], bool, bool | None, bool]:
  """(tokens, lower_case, strip_accents, chinese_chars) of a `tokenizers` WordPiece tokenizer.json; BERT's
  pieces only (the settings vocab.txt cannot carry are refused, so run-to-hf writes the same tokenizer back)."""
  model = record.get("model")
  if not isinstance(model, dict) or model.get("type") != "WordPiece":
    kind = model.get("type") if isinstance(model, dict) else None
    raise UserError(f"{source}: not a WordPiece tokenizer (model type {kind!r}); give BERT's vocab.txt or its "
                    "tokenizer.json")
  for key, wanted in (("unk_token", "[UNK]"), ("continuing_subword_prefix", "##"),
                      ("max_input_chars_per_word", MAX_WORD_CHARS)):
    if model.get(key, wanted) != wanted:
      raise UserError(f"{source}: model.{key}={json.dumps(model[key])[:60]} is not supported (BERT's is "
                      f"{json.dumps(wanted)}); give a BERT tokenizer")
  normalizer, pre = record.get("normalizer") or {}, record.get("pre_tokenizer") or {}
  if not isinstance(normalizer, dict) or normalizer.get("type") != "BertNormalizer" or \
      not _setting(normalizer, "clean_text", True, source):
    raise UserError(f"{source}: normalizer is not BERT's (a BertNormalizer with clean_text); give BERT's vocab.txt "
                    "and tokenizer_config.json instead")
  if not isinstance(pre, dict) or pre.get("type") != "BertPreTokenizer":
    raise UserError(f"{source}: pre_tokenizer is not BERT's (BertPreTokenizer); give BERT's vocab.txt and "
                    "tokenizer_config.json instead")
  vocab = dict(model["vocab"])
  vocab.update({t["content"]: t["id"] for t in record.get("added_tokens") or []})
  tokens = sorted(vocab, key=vocab.get)
  if [vocab[t] for t in tokens] != list(range(len(tokens))):
    raise UserError(f"{source}: model.vocab's ids are not 0..{len(tokens) - 1}, each once; give the model's own "
                    "tokenizer.json")
  lower = _setting(normalizer, "lowercase", True, source)
  return tokens, lower, _setting(normalizer, "strip_accents", None, source, True), \
      _setting(normalizer, "handle_chinese_chars", True, source)


def from_hf_dir(directory: Path) -> WordPieceTokenizer | None:
  """BERT's tokenizer of a Hugging Face directory: vocab.txt with do_lower_case / strip_accents /
  tokenize_chinese_chars from tokenizer_config.json, else tokenizer.json alone; None where it has neither."""
  directory = Path(directory)
  source = directory / VOCAB_FILE
  try:
    if source.is_file():
      file = directory / "tokenizer_config.json"
      settings = json.loads(file.read_text(encoding="utf-8")) if file.is_file() else {}
      if not isinstance(settings, dict):
        raise ValueError(f"{file.name} is not a JSON object")
      return WordPieceTokenizer(read_vocab(source), _setting(settings, "do_lower_case", True, file),
                                _setting(settings, "strip_accents", None, file, True),
                                _setting(settings, "tokenize_chinese_chars", True, file))
    source = directory / "tokenizer.json"
    if not source.is_file():
      return None
    record = json.loads(source.read_text(encoding="utf-8"))
    if not isinstance(record, dict):
      raise ValueError("not a JSON object")
    return WordPieceTokenizer(*_from_tokenizer_json(record, source))
  except (OSError, UnicodeDecodeError, json.JSONDecodeError, AttributeError, KeyError, TypeError, ValueError) as e:
    raise UserError(f"{source}: not a BERT WordPiece vocabulary ({type(e).__name__}: {e}); fix it, or give the "
                    "model's own vocab.txt") from None


def load(directory: Path, record: dict) -> WordPieceTokenizer:
  """The tokenizer a run saved; ValueError / OSError / KeyError for load_tokenizer to name the file."""
  tokenizer = WordPieceTokenizer(read_vocab(Path(directory) / VOCAB_FILE), record["lower_case"],
                                 record.get("strip_accents"), record.get("tokenize_chinese_chars", True))
  if tokenizer.record() != record:
    raise ValueError(f"{VOCAB_FILE} is not the file it was saved with (its sha256 differs)")
  return tokenizer

