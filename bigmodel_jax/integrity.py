"""Checkpoint digests: the sha256 of every file of a step's items, in <step>/digest.json.

Orbax reads back whatever bytes are on disk: a flipped bit in a parameter shard restores as a wrong number (an eval
loss of 1e26, a resume that trains on from garbage). The digest is written while the step is still orbax's
temporary directory, after every process has written its files and before the rename that commits it, so each
committed step carries its digest (a kill leaves no step without one) and retention only ever deletes an older step
after a newer one is committed with its digest. Restores check it first. Orbax's own per-step record, which it
reads for every step when the checkpoints open, is checked when that fails (unreadable_step_metadata).
"""

import hashlib
import json
from pathlib import Path

from bigmodel_jax import runinfo

FILE = "digest.json"
FORMAT = 1


class Mismatch(Exception):
  """The step's files differ from its digest; the message says which file and how."""


def item_files(step_dir: Path) -> list[Path]:
  """Every file under the step's item directories (state, data, meta, metrics). Orbax's own top-level records
  (_CHECKPOINT_METADATA, commit_success.txt) change at commit and are not covered."""
  return sorted(p for d in step_dir.iterdir() if d.is_dir() for p in d.rglob("*") if p.is_file())


def compute(step_dir: Path) -> dict[str, str]:
  """{path relative to the step directory: sha256 hex} of item_files."""
  out = {}
  for path in item_files(step_dir):
    with open(path, "rb") as f:
      out[path.relative_to(step_dir).as_posix()] = hashlib.file_digest(f, "sha256").hexdigest()
  return out


def write(step_dir: Path) -> dict:
  """Computes and writes step_dir/digest.json (whole, then renamed into place); -> the record."""
  files = compute(Path(step_dir))
  total = hashlib.sha256("".join(f"{k} {v}\n" for k, v in files.items()).encode()).hexdigest()
  record = {"format": FORMAT, "algorithm": "sha256", "sha256": total, "files": files}
  runinfo.write_text_atomic(Path(step_dir) / FILE, json.dumps(record, indent=1) + "\n")
  return record


def recorded_sha256(step_dir: Path) -> str | None:
  """The digest of a step's files, as its digest.json records it (None: none, or unreadable)."""
  try:
    return json.loads((Path(step_dir) / FILE).read_text()).get("sha256")
  except (OSError, ValueError, AttributeError):
    return None


def verify(step_dir: Path) -> bool:
  """True: every item file matches the digest; False: there is no digest (a step written before digests).
  Raises Mismatch naming the first differing file (changed, missing, or not in the digest)."""
  step_dir = Path(step_dir)
  path = step_dir / FILE
  if not path.exists():
    if any((p / FILE).is_file() for p in step_dir.parent.iterdir() if p.name.isdigit() and p != step_dir):
      raise Mismatch(f"its {FILE} is missing, though other steps of this run have theirs (a version that writes "
                     "digests wrote it)")
    return False
  try:
    record = json.loads(path.read_text())
    wanted = record["files"]
    if record.get("format") != FORMAT or record.get("algorithm") != "sha256" or not isinstance(wanted, dict):
      raise ValueError(f"format {record.get('format')!r}")
  except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError) as e:
    raise Mismatch(f"its {FILE} is unreadable ({type(e).__name__}: {str(e)[:80]})") from None
  found = compute(step_dir)
  problems = [f"{name} differs from its {FILE}" for name in sorted(set(wanted) & set(found)) if wanted[name] != found[name]]
  problems += [f"{name} is missing" for name in sorted(set(wanted) - set(found))]
  problems += [f"{name} is not in its {FILE}" for name in sorted(set(found) - set(wanted))]
  if problems:
    more = f" (and {len(problems) - 1} more file{'s' if len(problems) > 2 else ''})" if len(problems) > 1 else ""
    raise Mismatch(problems[0] + more)
  return True


def unreadable_step_metadata(directory: Path) -> Path | None:
  """The first step's _CHECKPOINT_METADATA (orbax's own record, read for every step when a manager opens) that does
  not read as orbax reads it, or None."""
  try:
    from orbax.checkpoint._src.metadata import step_metadata_serialization
  except ImportError:  # moved in another orbax: only a file that is not a JSON object is found
    step_metadata_serialization = None
  steps = sorted((p for p in directory.iterdir() if p.name.isdigit()), key=lambda p: int(p.name))
  for file in (p / "_CHECKPOINT_METADATA" for p in steps):
    try:
      record = json.loads(file.read_text())
    except (OSError, ValueError):
      continue  # absent or not JSON: orbax reads the step without it
    try:
      if not isinstance(record, dict):
        raise ValueError
      if step_metadata_serialization is not None:
        step_metadata_serialization.deserialize(record)
    except Exception:
      return file
  return None
