"""Text datasets: real corpora with their known sizes, fixed splits, clear errors and fast offline failure."""

import functools
import http.server
import re
import socket
import threading
import time
from pathlib import Path

import ml_collections
import numpy as np
import pytest

from bigmodel_jax.data import DATASETS, TextCorpus, text
from bigmodel_jax.errors import UserError
from conftest import TINY_SHAKESPEARE

TINY = TINY_SHAKESPEARE
needs_tiny = pytest.mark.skipif(not TINY.is_file(), reason=f"no local copy of tiny Shakespeare at {TINY}")


def data_config(**fields):
  return ml_collections.ConfigDict({"path": "", "strip_headers": True, **fields})


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
  """One data dir for the module, so each registry archive is downloaded once."""
  return tmp_path_factory.mktemp("data")


class QuietHandler(http.server.SimpleHTTPRequestHandler):
  def log_message(self, *args):
    pass


@pytest.fixture
def serve(tmp_path):
  """serve(bytes) -> the URL of a local HTTP server returning those bytes as input.txt."""
  servers = []
  def start(body: bytes) -> str:
    (tmp_path / "www").mkdir()
    (tmp_path / "www" / "input.txt").write_bytes(body)
    handler = functools.partial(QuietHandler, directory=tmp_path / "www")
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True).start()
    servers.append(server)
    return f"http://127.0.0.1:{server.server_address[1]}/input.txt"
  yield start
  for server in servers:
    server.shutdown()
    server.server_close()


def closed_port_url() -> str:
  with socket.socket() as s:  # a port just released: nothing listens there, so connecting is refused at once
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
  return f"http://127.0.0.1:{port}/input.txt"


@needs_tiny
def test_tiny_shakespeare_from_data_path_has_nanogpt_split(tmp_path):
  corpus = DATASETS.get("tiny_shakespeare")(tmp_path, data_config(path=str(TINY)))
  assert isinstance(corpus, TextCorpus) and corpus.train_labels is None
  assert len(corpus.train) == len(corpus.validation) == 1
  assert len(corpus.train[0]) == 1_003_854 and len(corpus.validation[0]) == 111_540
  assert corpus.train[0] + corpus.validation[0] == TINY.read_text() and corpus.train[0].startswith("First Citizen:")
  assert not (tmp_path / "tiny_shakespeare").exists()  # a user file needs no fetch


@pytest.mark.parametrize("fraction, n_val", [(0.1, 100), (0.25, 250), (0.0, None)])
def test_data_path_text_holds_out_validation_fraction(tmp_path, fraction, n_val):
  file = tmp_path / "corpus.txt"
  file.write_text("abcdefghij" * 100)
  load = lambda: DATASETS.get("tiny_shakespeare")(tmp_path, data_config(path=str(file), validation_fraction=fraction))
  if n_val is None:  # no validation split: refused in one line (was silently the 90/10 split)
    with pytest.raises(UserError, match=r"config\.data\.validation_fraction: 0\.0; a text file"):
      load()
    return
  corpus = load()
  assert corpus.train[0] + corpus.validation[0] == file.read_text() and len(corpus.validation[0]) == n_val

@pytest.mark.parametrize("content", [None, "", " \n\t\n"])
def test_tiny_shakespeare_missing_or_empty_data_path_is_a_user_error(tmp_path, content):
  file = tmp_path / "corpus.txt"
  if content is not None:
    file.write_text(content)
  with pytest.raises(UserError, match=r"config\.data\.path: .*corpus\.txt") as e:
    DATASETS.get("tiny_shakespeare")(tmp_path, data_config(path=str(file)))
  assert "\n" not in str(e.value)


def test_tiny_shakespeare_fetch_fails_fast_when_unreachable(tmp_path, monkeypatch):
  monkeypatch.setattr(text, "TINY_SHAKESPEARE_URL", closed_port_url())
  start = time.time()
  with pytest.raises(UserError, match="tiny_shakespeare") as e:
    DATASETS.get("tiny_shakespeare")(tmp_path, data_config())
  assert time.time() - start < 10
  message = str(e.value)
  assert "--config.data.path=" in message and "shakespeare_plays" in message and "\n" not in message
  assert not (tmp_path / "tiny_shakespeare" / "input.txt").exists()


@needs_tiny
def test_tiny_shakespeare_fetch_verifies_and_caches(tmp_path, monkeypatch, serve):
  monkeypatch.setattr(text, "TINY_SHAKESPEARE_URL", serve(TINY.read_bytes()))
  corpus = DATASETS.get("tiny_shakespeare")(tmp_path, data_config())
  assert len(corpus.train[0]) + len(corpus.validation[0]) == 1_115_394
  assert (tmp_path / "tiny_shakespeare" / "input.txt").read_bytes() == TINY.read_bytes()
  monkeypatch.setattr(text, "TINY_SHAKESPEARE_URL", closed_port_url())  # now cached: no fetch needed
  assert DATASETS.get("tiny_shakespeare")(tmp_path, data_config()).validation == corpus.validation


def test_tiny_shakespeare_fetch_rejects_wrong_content(tmp_path, monkeypatch, serve):
  monkeypatch.setattr(text, "TINY_SHAKESPEARE_URL", serve(b"To be, or not to be\n"))
  with pytest.raises(UserError, match="tiny_shakespeare"):
    DATASETS.get("tiny_shakespeare")(tmp_path, data_config())
  assert not any((tmp_path / "tiny_shakespeare").glob("*"))  # nothing half-written or unverified left


def test_shakespeare_plays_split_by_work(root):
  corpus = DATASETS.get("shakespeare_plays")(root, data_config())
  works = corpus.train + corpus.test
  assert len(works) == 42 and len(corpus.test) == 4 and corpus.train_labels is None
  assert not set(corpus.train) & set(corpus.test)  # whole works on each side
  assert sum(map(len, works)) == 5_057_198
  assert all("by William Shakespeare" in w[:200] for w in works)
  titles = sorted(w.split("\n", 1)[0] for w in corpus.test)
  assert titles == ["LOVE'S LABOUR'S LOST", "ROMEO AND JULIET", "THE PASSIONATE PILGRIM", "THE TRAGEDY OF CORIOLANUS"]
  again = DATASETS.get("shakespeare_plays")(root, data_config())
  assert again.train == corpus.train and again.test == corpus.test


@pytest.fixture(scope="module")
def spam(root):
  return {strip: DATASETS.get("spam_assassin")(root, data_config(strip_headers=strip)) for strip in (True, False)}


def test_spam_assassin_sizes_labels_and_split(spam):
  corpus = spam[True]
  assert len(corpus.train) == len(corpus.train_labels) == 4_837 and len(corpus.test) == len(corpus.test_labels) == 1_209
  assert corpus.class_names == ("ham", "spam") and corpus.train_labels.dtype == np.int32
  labels = np.concatenate([corpus.train_labels, corpus.test_labels])
  assert np.bincount(labels).tolist() == [4_150, 1_896]  # 2,500 + 1,400 + 250 ham; 500 + 1,396 spam
  for split_labels in (corpus.train_labels, corpus.test_labels):
    assert 0.25 < split_labels.mean() < 0.38  # both classes on both sides, near the overall 31% spam
  # the split is by example and fixed: headers on or off select the same mails
  raw = spam[False]
  assert all(r.endswith(s) for r, s in zip(raw.train + raw.test, corpus.train + corpus.test))
  assert np.array_equal(raw.train_labels, corpus.train_labels)


def test_spam_assassin_strips_headers(spam):
  header_line = re.compile(r"From |[!-9;-~]+:|[ \t]")  # mbox From_ line, `Name:` field, or a folded continuation
  stripped, raw = spam[True].train + spam[True].test, spam[False].train + spam[False].test
  for r, s in zip(raw, stripped):  # what was dropped is exactly a header block: header lines, then a blank line
    dropped = r[:len(r) - len(s)]
    assert dropped.endswith("\n\n") and all(header_line.match(line) for line in dropped[:-2].split("\n"))
  assert sum("\nSubject: " in r[:len(r) - len(s)] for r, s in zip(raw, stripped)) > 0.99 * len(raw)
  assert not any(t.startswith(("From ", "Received:", "Delivered-To:")) for t in stripped)
  assert sum("\nReceived: " in t for t in stripped) < 0.01 * len(stripped)  # only in forwarded mails
  assert sum(map(len, stripped)) < 0.7 * sum(map(len, raw))


def test_spam_assassin_is_deterministic(root, spam):
  again = DATASETS.get("spam_assassin")(root, data_config())
  assert again.train == spam[True].train and again.test == spam[True].test
  assert np.array_equal(again.test_labels, spam[True].test_labels)
