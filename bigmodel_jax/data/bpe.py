"""GPT-2's byte-level BPE (`config.data.tokenizer.name="gpt2_bpe"`), read from a Hugging Face model directory.

Not learnt from a run's text: it comes with converted GPT-2 weights (bigmodel_jax.convert hf-to-run), whose
embedding rows are its ids, and a run fine-tuned from that one (config.init.workdir) reads its text with it. Ids
are GPT-2's own (vocab.json), so our ids equal transformers' GPT2Tokenizer's on the same text.

Padding: GPT-2 has no pad token and its id 0 is "!", so this tokenizer's `pad_id` is <|endoftext|> (as
Hugging Face users set pad_token = eos_token): encode_batch right-pads with it and decode skips it. A causal LM
never looks at padding (positions after the text do not change earlier logits, and the language-modelling
windows carry their own token mask), so this is safe for `gpt`; the encoders mask id 0 as padding, so use this
tokenizer for language modelling, not for classification. <|endoftext|> is the one special id (never sampled);
written literally in a text it encodes to that id, as GPT2Tokenizer does.

Encoding is the published algorithm in pure Python (no `regex`, `tokenizers` or transformers needed): GPT-2's
pre-tokenizer pattern ('s|'t|'re|'ve|'m|'ll|'d| ?\\p{L}+| ?\\p{N}+| ?[^\\s\\p{L}\\p{N}]+|\\s+(?!\\S)|\\s+) as a scanner
over Unicode categories, each piece's UTF-8 bytes mapped to GPT-2's printable byte characters, then merges applied
lowest rank first (cached per piece). Whitespace is Python's str.isspace, which may differ from the Rust regex on
exotic control characters (U+001C..U+001F).
"""

import functools
import hashlib
import json
import unicodedata
from pathlib import Path
from typing import Sequence

import numpy as np

from bigmodel_jax.data.tokenizers import Tokenizer
from bigmodel_jax.errors import UserError
from bigmodel_jax.runinfo import write_text_atomic

NAME = "gpt2_bpe"
VOCAB_FILE, MERGES_FILE = "vocab.json", "merges.txt"
EOS = "<|endoftext|>"
CONTRACTIONS = ("'s", "'t", "'re", "'ve", "'m", "'ll", "'d")


@functools.cache
def byte_chars() -> tuple[str, ...]:
  """GPT-2's byte -> printable character table (bytes_to_unicode): printable Latin-1 bytes stand for themselves,
  the others for code points 256 and up, so every piece is a string of visible characters."""
  keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
  chars, extra = {}, 0
  for b in range(256):
    if b in keep:
      chars[b] = chr(b)
    else:
      chars[b] = chr(256 + extra)
      extra += 1
  return tuple(chars[b] for b in range(256))


def _kind(c: str) -> str:
  """'s' whitespace, 'L' letter, 'N' number, 'o' anything else: the classes GPT-2's pattern tells apart."""
  if c.isspace():
    return "s"
  category = unicodedata.category(c)[0]
  return category if category in "LN" else "o"


def pretokenize(text: str) -> list[str]:
  """GPT-2's pre-tokenizer: the pieces its regex finds, in order (they join back into `text`)."""
  pieces, i, n = [], 0, len(text)
  kinds = [_kind(c) for c in text]
  while i < n:
    if text[i] == "'":
      hit = next((c for c in CONTRACTIONS if text.startswith(c, i)), None)
      if hit:
        pieces.append(hit)
        i += len(hit)
        continue
    k = i + 1 if text[i] == " " and i + 1 < n else i
    if kinds[k] != "s":  # ' ?\p{L}+', ' ?\p{N}+' or ' ?[^\s\p{L}\p{N}]+': a run of one class
      j = k + 1
      while j < n and kinds[j] == kinds[k]:
        j += 1
      pieces.append(text[i:j])
      i = j
      continue
    j = i + 1  # whitespace: '\s+(?!\S)' leaves the last one before a non-space to the next piece; else '\s+'
    while j < n and kinds[j] == "s":
      j += 1
    end = j - 1 if j < n and j - i > 1 else j
    pieces.append(text[i:end])
    i = end
  return pieces


class GPT2BPETokenizer(Tokenizer):
  """Byte-level BPE over GPT-2's vocabulary and merges (see the module docstring for padding)."""
  name = NAME

  def __init__(self, vocab: dict[str, int], merges: Sequence[tuple[str, str]]):
    if EOS not in vocab:
      raise ValueError(f"not a GPT-2 vocabulary (no {EOS} token)")
    self.vocab, self.merges = dict(vocab), [tuple(m) for m in merges]
    self.vocab_size = max(vocab.values()) + 1
    self.pad_id = self.eos_id = vocab[EOS]
    self.special_ids = (self.eos_id,)
    self._ranks = {m: r for r, m in enumerate(self.merges)}
    self._token_of_id = {i: t for t, i in vocab.items()}
    chars = byte_chars()
    self._byte_of_char = {c: b for b, c in enumerate(chars)}
    self._chars = chars
    missing = [c for c in chars if c not in vocab]
    if missing:
      raise ValueError(f"not a byte-level vocabulary ({len(missing)} of the 256 byte tokens are missing)")

  @functools.lru_cache(maxsize=1 << 16)
  def _piece_ids(self, piece: str) -> tuple[int, ...]:
    parts = [self._chars[b] for b in piece.encode("utf-8", errors="surrogatepass")]
    while len(parts) > 1:
      ranked = [(self._ranks.get(pair, len(self._ranks)), i) for i, pair in enumerate(zip(parts, parts[1:]))]
      rank, i = min(ranked)
      if rank == len(self._ranks):
        break
      first, second = parts[i], parts[i + 1]
      merged, j = [], 0
      while j < len(parts):  # every occurrence of the pair, left to right
        if j + 1 < len(parts) and parts[j] == first and parts[j + 1] == second:
          merged.append(first + second)
          j += 2
        else:
          merged.append(parts[j])
          j += 1
      parts = merged
    return tuple(self.vocab[p] for p in parts)

  def encode(self, text: str, *, strict: bool = False) -> np.ndarray:
    """Any text is representable (bytes), so `strict` never fails."""
    ids = []
    for k, segment in enumerate(text.split(EOS)):
      if k:
        ids.append(self.eos_id)
      for piece in pretokenize(segment):
        ids.extend(self._piece_ids(piece))
    return np.asarray(ids, np.int32)

  def decode(self, ids) -> str:
    ids = np.asarray(ids, np.int64).reshape(-1)
    chars = "".join(self._token_of_id.get(int(i), "") for i in ids if i != self.pad_id)
    data = bytes(self._byte_of_char[c] for c in chars if c in self._byte_of_char)
    return data.decode("utf-8", errors="replace")

  def _files(self) -> dict[str, str]:
    return {VOCAB_FILE: json.dumps(self.vocab, ensure_ascii=False),
            MERGES_FILE: "#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in self.merges)}

  def _config(self) -> dict:
    return {"pad_id": self.pad_id, **{f"{Path(f).stem}_sha256": hashlib.sha256(t.encode()).hexdigest()
                                      for f, t in self._files().items()}}

  def save(self, directory: Path) -> None:
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    for file, text in self._files().items():
      write_text_atomic(directory / file, text)
    super().save(directory)


def read_merges(text: str) -> list[tuple[str, str]]:
  lines = [line for line in text.splitlines() if line and not line.startswith("#version")]
  return [tuple(line.split(" ")) for line in lines]


def _adds_prefix_space(pre) -> bool:
  """Whether a tokenizer.json pre_tokenizer (a ByteLevel one, or a Sequence holding one) adds a prefix space."""
  if isinstance(pre, dict):
    if pre.get("type") == "ByteLevel":
      return bool(pre.get("add_prefix_space"))
    return any(_adds_prefix_space(p) for p in pre.get("pretokenizers") or [])
  return False


def from_hf_dir(directory: Path) -> GPT2BPETokenizer | None:
  """The GPT-2 tokenizer of a Hugging Face model directory (vocab.json + merges.txt, else tokenizer.json), or None
  where it has neither. UserError naming the file if it is not a byte-level BPE."""
  directory = Path(directory)
  try:
    if (directory / VOCAB_FILE).is_file() and (directory / MERGES_FILE).is_file():
      source = directory / VOCAB_FILE
      vocab = json.loads(source.read_text(encoding="utf-8"))
      merges = read_merges((directory / MERGES_FILE).read_text(encoding="utf-8"))
    elif (directory / "tokenizer.json").is_file():
      source = directory / "tokenizer.json"
      record = json.loads(source.read_text(encoding="utf-8"))
      model = record.get("model") or {}
      if model.get("type") != "BPE" or "ByteLevel" not in json.dumps(record.get("pre_tokenizer")):
        raise UserError(f"{source}: not a byte-level BPE tokenizer (model {model.get('type')!r}); convert without "
                        "it by moving it away, or give GPT-2's vocab.json and merges.txt")
      if _adds_prefix_space(record.get("pre_tokenizer")):
        raise UserError(f"{source}: its ByteLevel pre_tokenizer has add_prefix_space=true (a space put before every "
                        "text), which GPT-2's has not and this tokenizer does not do; set it to false, or give "
                        "vocab.json and merges.txt")
      vocab = dict(model["vocab"])
      vocab.update({t["content"]: t["id"] for t in record.get("added_tokens", [])})
      merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in model["merges"]]
    else:
      return None
    return GPT2BPETokenizer(vocab, merges)
  except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
    raise UserError(f"{source}: not a GPT-2 tokenizer ({type(e).__name__}: {e}); fix it or move the tokenizer files "
                    "away to convert the weights alone") from None


def load(directory: Path, record: dict) -> GPT2BPETokenizer:
  """The tokenizer a run saved (tokenizer.json's `record` beside vocab.json and merges.txt); raises ValueError /
  OSError / KeyError, which load_tokenizer turns into one line naming the file."""
  directory = Path(directory)
  vocab = json.loads((directory / VOCAB_FILE).read_text(encoding="utf-8"))
  tokenizer = GPT2BPETokenizer(vocab, read_merges((directory / MERGES_FILE).read_text(encoding="utf-8")))
  if tokenizer.record() != record:
    raise ValueError(f"{VOCAB_FILE} / {MERGES_FILE} are not the files it was saved with (their sha256 differs)")
  return tokenizer

