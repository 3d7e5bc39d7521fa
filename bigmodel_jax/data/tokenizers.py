"""Tokenizers by name (`config.data.tokenizer.name`): char, byte, sentencepiece (unigram or BPE), and gpt2_bpe /
bert_wordpiece (GPT-2's and BERT's, converted with their weights: data/bpe.py, data/wordpiece.py).

Every tokenizer maps text to int32 ids with 0 = padding (gpt2_bpe: <|endoftext|>, its `pad_id`) (models derive
padding masks from it) and is saved into a run's workdir as tokenizer.json (+ spm.model), so eval, sampling and
resume use the very same ids.
"""

import abc
import hashlib
import io
import itertools
import json
import re
import time
from pathlib import Path
from typing import Sequence

import jax
import numpy as np
from absl import logging

from bigmodel_jax.errors import UserError
from bigmodel_jax.registry import Registry
from bigmodel_jax.runinfo import write_bytes_atomic, write_text_atomic

JSON_FILE = "tokenizer.json"
SPM_FILE = "spm.model"
PAD_ID = 0
UNK_ID = 1
MASK_PIECE = "[MASK]"  # sentencepiece's masked-LM piece (tokenizer.mask_token): a user-defined symbol, id 3
# A lone surrogate (JSON's "\ud800", a command line's undecodable byte) is no character; sentencepiece refuses it
SURROGATE = re.compile("[\ud800-\udfff]")
# config.data.tokenizer.name -> build(tokenizer_config, train_texts): a new tokenizer, learnt from the training
# split's texts only (char: their characters; a held-out character is unk): nothing held out shapes a vocabulary.
TOKENIZERS: Registry = Registry("tokenizer", "config.data.tokenizer.name")


class Tokenizer(abc.ABC):
  """Shared interface: `encode` / `decode` one text, `encode_batch` to a padded (N, max_len) matrix, `save`."""
  name: str
  vocab_size: int  # including pad (and unk)
  pad_id: int = PAD_ID
  special_ids: tuple[int, ...] = (PAD_ID, UNK_ID)  # ids that stand for no text: never sampled
  mask_id: int | None = None  # the [MASK] id masked language modelling puts in (config.data.tokenizer.mask_token)

  @abc.abstractmethod
  def encode(self, text: str, *, strict: bool = False) -> np.ndarray:
    """int32 ids of `text`; with `strict`, text the vocabulary cannot represent raises UserError."""

  @abc.abstractmethod
  def decode(self, ids) -> str:
    """Text of `ids`, pad ids skipped; ids outside the vocabulary decode like unknown ones."""

  def _config(self) -> dict:
    """What tokenizer.json records besides name and vocab_size."""
    return {}

  def _encode_many(self, texts: Sequence[str]) -> list[np.ndarray]:
    return [self.encode(t) for t in texts]

  def encode_batch(self, texts: Sequence[str], max_len: int) -> np.ndarray:
    """(N, max_len) int32: each text's ids truncated to max_len and right-padded with pad_id."""
    out = np.full((len(texts), max_len), self.pad_id, np.int32)
    for row, ids in zip(out, self._encode_many(texts)):
      row[:len(ids)] = ids[:max_len]
    return out

  def record(self) -> dict:
    """What tokenizer.json holds: the ids' meaning (a run's data fingerprint hashes it)."""
    return {"name": self.name, "vocab_size": self.vocab_size, **self._config()}

  def save(self, directory: Path) -> None:
    """Writes directory/tokenizer.json last, so its presence means the tokenizer is complete."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    write_text_atomic(directory / JSON_FILE, json.dumps(self.record(), indent=2) + "\n")


def _known_ids(ids, vocab_size: int, unk_id: int) -> np.ndarray:
  """ids without padding, with ids outside [0, vocab_size) (a model's padded vocabulary) mapped to unk."""
  ids = np.asarray(ids, np.int64).reshape(-1)
  ids = ids[ids != PAD_ID]
  return np.where((ids >= 0) & (ids < vocab_size), ids, unk_id)


def _unknown_error(chars: Sequence[str], vocabulary: str) -> UserError:
  """One sentence naming up to 10 characters the vocabulary lacks (callers prefix the field name)."""
  shown = ", ".join(repr(c) for c in chars[:10]) + (f" and {len(chars) - 10} more" if len(chars) > 10 else "")
  return UserError(f"{shown} {'is' if len(chars) == 1 else 'are'} not in the {vocabulary}")


def _codepoints(text: str) -> np.ndarray:
  # surrogatepass: a lone surrogate (text read with errors='surrogateescape') is just an unknown character.
  return np.frombuffer(text.encode("utf-32-le", errors="surrogatepass"), np.uint32)


class CharTokenizer(Tokenizer):
  """One id per character: 0 = pad, 1 = unk, then the distinct characters in sorted order."""
  name = "char"

  def __init__(self, chars: str | Sequence[str]):
    chars = "".join(chars)
    if len(set(chars)) != len(chars) or list(chars) != sorted(chars):
      raise ValueError("chars must be distinct and sorted")
    self.chars = chars
    self.vocab_size = len(chars) + 2
    codes = _codepoints(chars).astype(np.int64)
    # A lookup table indexed by code point makes encoding one gather (5 M characters in ~50 ms); its last
    # entry, unk, catches every code point above the largest known one.
    top = int(codes.max()) + 1 if len(codes) else 0
    self._id_of_code = np.full(top + 1, UNK_ID, np.int32)
    self._id_of_code[codes] = np.arange(2, self.vocab_size, dtype=np.int32)
    self._code_of_id = np.concatenate([[0, 0xFFFD], codes]).astype(np.uint32)  # unk decodes as U+FFFD

  @classmethod
  def build(cls, texts: Sequence[str]) -> "CharTokenizer":
    return cls(sorted(set().union(*map(set, texts))))

  def encode(self, text: str, *, strict: bool = False) -> np.ndarray:
    codes = _codepoints(text)
    ids = self._id_of_code[np.minimum(codes, len(self._id_of_code) - 1)]
    if strict and (ids == UNK_ID).any():
      unknown = dict.fromkeys(text[i] for i in np.flatnonzero(ids == UNK_ID))  # first-seen order, no repeats
      raise _unknown_error(list(unknown), f"tokenizer's vocabulary of {len(self.chars)} characters")
    return ids

  def decode(self, ids) -> str:
    codes = self._code_of_id[_known_ids(ids, self.vocab_size, UNK_ID)]
    return codes.astype("<u4").tobytes().decode("utf-32-le", errors="surrogatepass")

  def _config(self) -> dict:
    return {"chars": self.chars}


class ByteTokenizer(Tokenizer):
  """UTF-8 bytes: id = byte + 1 (0 = pad). Represents any text, so strict never fails."""
  name = "byte"
  vocab_size = 257
  special_ids = (PAD_ID,)

  def encode(self, text: str, *, strict: bool = False) -> np.ndarray:
    data = text.encode("utf-8", errors="surrogatepass")
    return np.frombuffer(data, np.uint8).astype(np.int32) + 1

  def decode(self, ids) -> str:
    ids = _known_ids(ids, self.vocab_size, 0xFF + 1)  # byte 0xFF never occurs in UTF-8: decodes as U+FFFD
    return (ids - 1).astype(np.uint8).tobytes().decode("utf-8", errors="replace")


# Training reads at most this many characters (a seeded sample of lines): ~5 M characters train in
# seconds, and more text barely changes a vocabulary of a few thousand pieces.
MAX_TRAIN_CHARS = 10_000_000
MAX_LINE_CHARS = 4096  # longer lines are cut into pieces: sentencepiece skips sentences over max_sentence_length


def _training_lines(texts: Sequence[str], seed: int = 0) -> list[str]:
  lines = [line[i:i + MAX_LINE_CHARS] for text in texts for line in text.split("\n")
           for i in range(0, len(line), MAX_LINE_CHARS)]
  total = sum(map(len, lines))
  if total <= MAX_TRAIN_CHARS:
    return lines
  # Our own seeded sample: sentencepiece's shuffle_input_sentence draws a different sample every run, even
  # after spm.set_random_generator_seed (checked with sentencepiece 0.2.3).
  order = np.random.default_rng(seed).permutation(len(lines))
  lengths = np.array([len(line) for line in lines])[order]
  keep = np.sort(order[:int(np.searchsorted(np.cumsum(lengths), MAX_TRAIN_CHARS)) + 1])
  return [lines[i] for i in keep]


class SentencePieceTokenizer(Tokenizer):
  """Subword pieces (unigram or BPE) learnt by sentencepiece; 0 = pad, 1 = unk, '\\n' a piece of its own."""
  name = "sentencepiece"

  def __init__(self, model: bytes):
    import sentencepiece as spm
    self.model = model
    self._sp = spm.SentencePieceProcessor(model_proto=model)
    self.vocab_size = self._sp.get_piece_size()
    self._newline_id = self._sp.piece_to_id("\n")
    if self._sp.pad_id() != PAD_ID or self._sp.unk_id() != UNK_ID or self._sp.id_to_piece(self._newline_id) != "\n":
      raise ValueError("not a model trained by SentencePieceTokenizer.train (pad 0, unk 1, '\\n' a piece)")
    mask = self._sp.piece_to_id(MASK_PIECE)
    if mask != UNK_ID and self._sp.id_to_piece(mask) == MASK_PIECE:
      self.mask_id = mask
      self.special_ids = (PAD_ID, UNK_ID, mask)

  @property
  def model_type(self) -> str:
    from sentencepiece import sentencepiece_model_pb2
    proto = sentencepiece_model_pb2.ModelProto.FromString(self.model)
    return sentencepiece_model_pb2.TrainerSpec.ModelType.Name(proto.trainer_spec.model_type).lower()

  @classmethod
  def train(cls, texts: Sequence[str], vocab_size: int, model_type: str,
            mask_token: bool = False) -> "SentencePieceTokenizer":
    import sentencepiece as spm
    lines = _training_lines(texts)
    num_chars = len(set().union(*map(set, texts)))
    model = io.BytesIO()
    try:
      spm.SentencePieceTrainer.train(
          sentence_iterator=iter(lines), model_writer=model, vocab_size=vocab_size, model_type=model_type,
          pad_id=PAD_ID, unk_id=UNK_ID, bos_id=-1, eos_id=-1, unk_surface="\ufffd",
          # Lossless text: no normalization, spaces kept as they are, no dummy space before the text (the
          # stream's documents are encoded whole, so a line's first word is not preceded by a space) and
          # newlines (the line breaks between training sentences) as a piece of their own.
          normalization_rule_name="identity", remove_extra_whitespaces=False, add_dummy_prefix=False,
          user_defined_symbols=["\n", *([MASK_PIECE] if mask_token else [])], max_sentence_length=4 * MAX_LINE_CHARS,
          # Small alphabets (English: ~100 characters) keep every character, so nothing becomes unk;
          # large ones (Chinese, Japanese) leave their rarest characters out, as sentencepiece advises.
          character_coverage=1.0 if num_chars <= 256 else 0.9995,
          # The learnt pieces depend on how the work is split between threads: fix it, not the core count.
          num_threads=16, minloglevel=2)
    except RuntimeError as e:
      raise _training_error(str(e), vocab_size) from None
    return cls(model.getvalue())

  def _encode_many(self, texts: Sequence[str]) -> list[np.ndarray]:
    # Lines are encoded separately (in parallel) and joined by the newline piece: the same ids as the whole
    # text, since '\n' is always a piece of its own, but BPE on one 5 M character string is 5x slower.
    chain = itertools.chain.from_iterable
    lines = [SURROGATE.sub("\ufffd", text).split("\n") for text in texts]  # unknown, as the char tokenizer has it
    encoded = self._sp.encode(list(chain(lines)))
    # Every line's ids followed by a newline id, flat; each text then drops its last newline.
    flat = np.fromiter(chain(chain(zip(encoded, itertools.repeat([self._newline_id])))), np.int32)
    line_ends = np.cumsum([len(ids) + 1 for ids in encoded], dtype=np.int64)
    text_ends = line_ends[np.cumsum([len(t) for t in lines]) - 1] if lines else []
    starts = np.concatenate([[0], text_ends[:-1]]).astype(np.int64)
    return [flat[start:end - 1] for start, end in zip(starts, text_ends)]

  def encode(self, text: str, *, strict: bool = False) -> np.ndarray:
    ids = self._encode_many([text])[0]
    unknown = SURROGATE.findall(text) if strict else []  # surrogates first: no piece can hold one
    if strict and not unknown and (ids == UNK_ID).any():
      pieces = self._sp.encode(text, return_type="proto").pieces  # a run of unknown characters is one piece
      unknown = [c for p in pieces if p.id == UNK_ID for c in p.surface]
    if unknown:
      raise _unknown_error(list(dict.fromkeys(unknown)),
                           f"tokenizer's vocabulary of {self.vocab_size} sentencepiece pieces")
    return ids

  def decode(self, ids) -> str:
    return self._sp.decode(_known_ids(ids, self.vocab_size, UNK_ID).tolist())

  def _config(self) -> dict:
    # mask_token only where there is one: the record (which data fingerprints hash) of older tokenizers stays as it was
    return {"model_type": self.model_type, **({"mask_token": True} if self.mask_id is not None else {}),
            "model_file": SPM_FILE,
            "model_sha256": hashlib.sha256(self.model).hexdigest()}

  def save(self, directory: Path) -> None:
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    write_bytes_atomic(directory / SPM_FILE, self.model)
    super().save(directory)


def _training_error(message: str, vocab_size: int) -> UserError:
  """sentencepiece's check failures, said in terms of the config field to change."""
  field = f"config.data.tokenizer.vocab_size={vocab_size}"
  if m := re.search(r"Vocabulary size too high \(\d+\)\. Please set it to a value <= (\d+)", message):
    return UserError(f"{field} is more pieces than sentencepiece can learn from this training text (at most "
                     f"{m[1]}); lower it, or use more text")
  if m := re.search(r"Vocabulary size is smaller than required_chars\. \d+ vs (\d+)", message):
    return UserError(f"{field} is fewer pieces than the training text's {m[1]} distinct characters and special "
                     f"pieces; raise it to at least {m[1]}")
  if "all_chars_count" in message or "sentences_.empty()" in message:
    return UserError("config.data.tokenizer: sentencepiece has no training text to learn from (the train split "
                     "is empty)")
  return UserError(f"config.data.tokenizer: sentencepiece training failed: {message.splitlines()[0]}")


TOKENIZERS.register("char")(lambda c, train_texts: CharTokenizer.build(train_texts))
TOKENIZERS.register("byte")(lambda c, train_texts: ByteTokenizer())
TOKENIZERS.register("sentencepiece")(
    lambda c, train_texts: SentencePieceTokenizer.train(train_texts, c.vocab_size, c.model_type,
                                                                   c.get("mask_token", False)))
# converted with Hugging Face weights (bigmodel_jax.convert), not learnt: data/bpe.py and data/wordpiece.py
for _name, _model in (("gpt2_bpe", "gpt2"), ("bert_wordpiece", "bert")):
  TOKENIZERS.register(_name)(lambda c, train_texts, name=_name, model=_model: _not_learnt(name, model))


def _not_learnt(name: str, model: str):
  raise UserError(f"config.data.tokenizer.name: {name} is not learnt from text; it comes with converted "
                  f"{'GPT-2' if model == 'gpt2' else 'BERT'} weights (python -m bigmodel_jax.convert hf-to-run "
                  f"--model={model} ...): start from that run with --config.init.workdir=RUN, or pick char, byte or "
                  "sentencepiece")


def _converted(name: str):
  from bigmodel_jax.data import bpe, wordpiece  # they import this module
  return {"gpt2_bpe": bpe, "bert_wordpiece": wordpiece}[name]


def build_tokenizer(tokenizer_config, train_texts: Sequence[str]) -> Tokenizer:
  """A new tokenizer of config.data.tokenizer.name (TOKENIZERS)."""
  return TOKENIZERS.get(tokenizer_config.name)(tokenizer_config, train_texts)


def load_tokenizer(directory: Path) -> Tokenizer:
  """The tokenizer saved in `directory`; UserError naming the file if it is missing, unreadable or corrupt."""
  path = Path(directory) / JSON_FILE
  fix = "restore it, or start over in a new --workdir (a model only works with the tokenizer it was trained with)"
  if not path.exists():
    raise UserError(f"{path} not found; train first (--mode=train), or check --workdir")
  try:
    record = json.loads(path.read_text(encoding="utf-8"))
  except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
    raise UserError(f"{path} cannot be read ({e}); {fix}") from None
  if (not isinstance(record, dict) or record.get("name") not in TOKENIZERS.names()
      or not isinstance(record.get("vocab_size"), int)):
    raise UserError(f"{path} is corrupt (needs a name, one of {', '.join(TOKENIZERS.names())}, and an integer "
                    f"vocab_size); {fix}")
  name = record["name"]
  try:
    if name == "char":
      tokenizer = CharTokenizer(record["chars"])
    elif name == "byte":
      tokenizer = ByteTokenizer()
    elif name in ("gpt2_bpe", "bert_wordpiece"):
      try:
        tokenizer = _converted(name).load(path.parent, record)
      except OSError as e:
        raise UserError(f"{e.filename} cannot be read ({e.strerror}), and {path} needs it; {fix}") from None
    else:
      model_path = path.parent / record.get("model_file", SPM_FILE)
      try:
        model = model_path.read_bytes()
      except OSError as e:
        raise UserError(f"{model_path} cannot be read ({e.strerror}), and {path} needs it; {fix}") from None
      if record.get("model_sha256", digest := hashlib.sha256(model).hexdigest()) != digest:
        raise UserError(f"{model_path} is not the model {path} was saved with (its sha256 differs); {fix}")
      try:
        tokenizer = SentencePieceTokenizer(model)
      except RuntimeError:  # sentencepiece's message is its internal check, e.g. "[ParseFromArray(...)]"
        raise UserError(f"{model_path} is not a sentencepiece model (it does not parse); {fix}") from None
      except ValueError as e:
        raise UserError(f"{model_path} is {e}; {fix}") from None
  except (KeyError, TypeError, ValueError) as e:
    raise UserError(f"{path} is corrupt ({type(e).__name__}: {e}); {fix}") from None
  if tokenizer.vocab_size != record["vocab_size"]:
    raise UserError(f"{path} says vocab_size {record['vocab_size']} but the tokenizer it describes has "
                    f"{tokenizer.vocab_size}; {fix}")
  return tokenizer


def get_tokenizer(tokenizer_config, train_texts: Sequence[str], directory: Path | None, create: bool) -> Tokenizer:
  """`create`: a new tokenizer built from the texts, saved into `directory` (replacing what a run that never
  reached a checkpoint left there; `None` keeps it in memory). Else the one saved in `directory`, which must
  match the config: eval, sampling and resume use the ids the checkpoints were trained with."""
  if not create:
    if directory is None:
      raise UserError("no tokenizer directory given; train first (--mode=train)")
    if not (Path(directory) / JSON_FILE).exists():  # only asked for where the run has checkpoints
      raise UserError(f"{Path(directory) / JSON_FILE} is missing, but the run's checkpoints were trained with its ids; "
                      "put back the run's tokenizer files, or train anew in a new --workdir")
    tokenizer = load_tokenizer(directory)
    _check_matches(tokenizer, tokenizer_config, Path(directory) / JSON_FILE)
    return tokenizer
  start = time.perf_counter()
  tokenizer = build_tokenizer(tokenizer_config, train_texts)
  seconds = time.perf_counter() - start  # said at the default verbosity only when it took a while (subword training)
  logging.log(logging.INFO if seconds > 1 else logging.DEBUG, "built a %s tokenizer (%d ids) in %.1f s",
              tokenizer.name, tokenizer.vocab_size, seconds)
  # Char and byte are saved too, so a workdir always records its vocabulary. Every process builds the same
  # tokenizer (training is deterministic); one writes it, as processes may share the workdir.
  if directory is not None and jax.process_index() == 0:
    tokenizer.save(Path(directory))
  return tokenizer


def _check_matches(tokenizer: Tokenizer, tokenizer_config, path: Path) -> None:
  advice = "use a new --workdir, or set the config to match"
  if tokenizer.name != tokenizer_config.name:
    raise UserError(f"{path} is a {tokenizer.name} tokenizer but config.data.tokenizer.name is "
                    f"{tokenizer_config.name}; {advice}")
  if isinstance(tokenizer, SentencePieceTokenizer):
    for field, saved in (("vocab_size", tokenizer.vocab_size), ("model_type", tokenizer.model_type),
                         ("mask_token", tokenizer.mask_id is not None)):
      if saved != tokenizer_config.get(field, False):
        raise UserError(f"{path} is a sentencepiece tokenizer with {field} {saved} but "
                        f"config.data.tokenizer.{field} is {tokenizer_config[field]}; {advice}")
