"""BERT's WordPiece tokenizer (`config.data.tokenizer.name="bert_wordpiece"`), read from a Hugging Face directory.

Like gpt2_bpe (data/bpe.py) it is not learnt from text: it comes with converted BERT weights (bigmodel_jax.convert
hf-to-run --model=bert), whose embedding rows are its ids (vocab.txt, one token a line). [PAD] is id 0 in BERT's
vocabularies, as our encoders' padding mask needs (a vocabulary where it is not is refused), and [MASK] is the id
masked language modelling puts in. `encode` gives the word pieces of the text only, without [CLS] / [SEP] (as
transformers' `encode(text, add_special_tokens=False)`): a corpus is a stream of pieces cut into windows.

The published algorithm in pure Python: clean the text (drop control characters, whitespace to spaces), put
spaces around CJK ideographs, lower-case and strip accents (do_lower_case, tokenizer_config.json), split on
whitespace and punctuation, then each word greedily into the longest pieces of the vocabulary ("##" for pieces
inside a word); a word that does not split is [UNK]. Decoding joins pieces with spaces (the casing, accents and
spacing before punctuation are gone: it is lossy, as BERT's own).
"""

import functools
import hashlib
import json
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


def words(text: str, lower_case: bool) -> list[str]:
  """BERT's basic tokenizer: cleaned, CJK-split, (lower-cased, accent-stripped) words and punctuation marks."""
  out = []
  for c in text:
    cp = ord(c)
    if cp == 0 or cp == 0xFFFD or (unicodedata.category(c).startswith("C") and c not in "\t\n\r"):
      continue
    out.append(" " if c.isspace() else f" {c} " if _is_cjk(cp) else c)
  text = "".join(out)
  if lower_case:
    text = "".join(c for c in unicodedata.normalize("NFD", text.lower()) if unicodedata.category(c) != "Mn")
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

  def __init__(self, tokens: list[str], lower_case: bool = True):
    self.tokens, self.lower_case = list(tokens), bool(lower_case)
    self.vocab = {t: i for i, t in enumerate(self.tokens)}
    if self.vocab.get("[PAD]") != 0 or "[UNK]" not in self.vocab or "[MASK]" not in self.vocab:
      raise ValueError("not a BERT vocabulary ([PAD] must be id 0, and [UNK] and [MASK] present)")
    self.vocab_size = len(self.tokens)
    self.unk_id, self.mask_id = self.vocab["[UNK]"], self.vocab["[MASK]"]
    self.special_ids = tuple(self.vocab[t] for t in SPECIAL if t in self.vocab)

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
    for word in words(text, self.lower_case):
      piece_ids = self._word_ids(word)
      if piece_ids == (self.unk_id,) and word != "[UNK]":
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
    return {"lower_case": self.lower_case, "vocab_sha256": hashlib.sha256(self._text().encode()).hexdigest()}

  def save(self, directory: Path) -> None:
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    write_text_atomic(directory / VOCAB_FILE, self._text())
    super().save(directory)


def read_vocab(path: Path) -> list[str]:
  return [line.rstrip("\n").rstrip("\r") for line in path.read_text(encoding="utf-8").splitlines(keepends=True)]


def from_hf_dir(directory: Path) -> WordPieceTokenizer | None:
  """BERT's tokenizer of a Hugging Face directory (vocab.txt, do_lower_case from tokenizer_config.json), or None."""
  path = Path(directory) / VOCAB_FILE
  if not path.is_file():
    return None
  try:
    settings = Path(directory) / "tokenizer_config.json"
    lower = json.loads(settings.read_text(encoding="utf-8")).get("do_lower_case", True) if settings.is_file() else True
    return WordPieceTokenizer(read_vocab(path), lower)
  except (OSError, UnicodeDecodeError, json.JSONDecodeError, AttributeError, ValueError) as e:
    raise UserError(f"{path}: not a BERT WordPiece vocabulary ({type(e).__name__}: {e}); fix it, or give the model's "
                    "own vocab.txt") from None


def load(directory: Path, record: dict) -> WordPieceTokenizer:
  """The tokenizer a run saved; ValueError / OSError / KeyError for load_tokenizer to name the file."""
  tokenizer = WordPieceTokenizer(read_vocab(Path(directory) / VOCAB_FILE), record["lower_case"])
  if tokenizer.record() != record:
    raise ValueError(f"{VOCAB_FILE} is not the file it was saved with (its sha256 differs)")
  return tokenizer


def not_learnt(tokenizer_config, train_texts, all_texts):
  raise UserError(f"config.data.tokenizer.name: {NAME} is not learnt from text; it comes with converted BERT weights "
                  "(python -m bigmodel_jax.convert hf-to-run --model=bert ...): start from that run with "
                  "--config.init.workdir=RUN, or pick char, byte or sentencepiece")
