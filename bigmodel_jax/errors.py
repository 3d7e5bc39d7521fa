"""The one exception type for bad input: main prints its message as one line and exits non-zero. The tools with
their own absl flags (sweep.py, convert.py) end the same way through `fail` and `parse_flags` here."""

import json
import os
import sys
import tempfile
from pathlib import Path


class UserError(Exception):
  """Bad input from the user (config, flags, data, checkpoint). The message says what and how to fix it."""


class NonFiniteLossError(UserError):
  """Training produced a NaN/Inf loss or gradient; the last good checkpoint is kept."""


class ModelMismatchError(UserError):
  """A checkpoint's parameter shapes differ from the model the config builds. `diffs`: {name: (saved, now)}."""

  def __init__(self, message: str, diffs: dict[str, tuple]):
    super().__init__(message)
    self.diffs = diffs


class CheckpointGoneError(UserError):
  """A checkpoint step deleted while it was being read: the retention of a training running beside an eval."""

  def __init__(self, step_dir: Path):
    super().__init__(f"checkpoint {step_dir} disappeared while it was being read (the retention of a training "
                     "running in this workdir?); run again")


class DamagedCheckpointError(UserError):
  """A checkpoint step's files differ from the digest written when it was saved. `detail`: which file and how."""

  def __init__(self, message: str, step: int, detail: str):
    super().__init__(message)
    self.step, self.detail = step, detail


TRACEBACK_ENV = "BIGMODEL_JAX_TRACEBACK"  # =1: print the full traceback behind a one-line error
TRACEBACK_HINT = f"full traceback: --verbosity=1 or {TRACEBACK_ENV}=1"


def brief(e: BaseException) -> str:
  """'OSError: ...': an error's type and first line (where() gives its last, and the frame)."""
  lines = [line for line in str(e).strip().splitlines() if line.strip()] or [repr(e)]
  return f"{type(e).__name__}: {lines[0][:300]}"


def where(e: BaseException) -> str:
  """'at models/cnn.py:45 in __call__ (TypeError: ...)': the innermost frame outside jax/flax/optax, and the error."""
  import traceback
  frames = [f for f in traceback.extract_tb(e.__traceback__)
            if not any(part in f.filename for part in ("/jax/", "/jaxlib/", "/flax/", "/optax/", "/contextlib.py"))]
  lines = [line for line in str(e).strip().splitlines() if line.strip()] or [repr(e)]
  text = f"({type(e).__name__}: {lines[-1][:200]})"
  if not frames:
    return text
  frame = frames[-1]
  path = frame.filename
  for root in ("bigmodel_jax/", "site-packages/"):
    if root in path:
      path = path[path.rindex(root):]
      break
  return f"at {path}:{frame.lineno} in {frame.name} {text}"


def closed_stdout(what: str) -> str:
  """The line for stdout's reader gone (a pipe into head), `what` saying what became of the output; stdout then
  points at /dev/null, so nothing later fails writing to it (Python's flush at exit would make the status 120)."""
  try:
    os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
  except (OSError, ValueError):  # no stdout at all
    pass
  return f"SIGPIPE: stdout was closed by its reader (e.g. | head) {what}"


def out_of_space(e: BaseException, workdir, outputs=None) -> str | None:
  """One line for a write that failed for lack of disk space (ENOSPC: an OSError, or orbax/tensorstore's
  RESOURCE_EXHAUSTED wrapping one) anywhere in `e`'s chain: the path, and the last checkpoint committed before it
  (orbax renames a step into place only when complete, so every numbered step directory is whole). `outputs`: an
  eval/predict/sample launch writing there, which saves no checkpoint. None if `e` is something else."""
  import errno
  import re
  from pathlib import Path
  chain, seen = [], e
  while seen is not None and len(chain) < 10:
    chain.append(seen)
    seen = seen.__cause__ or seen.__context__
  hit = next((x for x in chain if (isinstance(x, OSError) and x.errno == errno.ENOSPC)
              or "No space left on device" in str(x) or "os_error_code='28'" in str(x)), None)
  if hit is None:
    return None
  path = getattr(hit, "filename", None) or next(iter(re.findall(r'"(/[^"]+)"', str(hit))), None) or outputs or workdir
  if outputs is not None:
    return f"{path}: no space left on device; free some space, or pass --output_dir=DIR on another disk"
  checkpoints = Path(workdir) / "checkpoints"
  steps = sorted(int(p.name) for p in checkpoints.iterdir() if p.name.isdigit()) if checkpoints.is_dir() else []
  last = (f"the last good checkpoint is step {steps[-1]} in {checkpoints} (intact)" if steps
          else "no checkpoint was committed yet")
  return (f"{path}: no space left on device; {last}; free some space (or use a --workdir on another disk) and "
          "launch the same command again")


def writable_directory(path, flag: str = "--workdir", what: str = "",
                       fix: str = "give a writable directory") -> None:
  """Refuses (UserError, one line naming `flag`, then `fix`) an empty path or a directory that cannot be made or
  written, before anything runs in it ('' would be the current directory). `what`: what goes there, for the
  message."""
  if not str(path).strip():
    raise UserError(f"{flag} is empty; give a directory")
  path = Path(path)
  if path.exists() and not path.is_dir():
    raise UserError(f"{flag}: {path} exists and is not a directory")
  try:
    path.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=path, prefix=".write-check."):
      pass
  except OSError as e:
    raise UserError(f"{flag}: cannot write {what}in {path} ({e.strerror or e}); {fix}") from None


def directory_name_free(path: Path, mode: str) -> None:
  """Refuses (one line) `path`, where --mode=`mode` puts its outputs as a directory, held by a file: it would be
  moved aside under a hidden name, and every later call would fail on it ('Not a directory')."""
  if path.is_symlink() or (path.exists() and not path.is_dir()):
    raise UserError(f"{path}: exists and is not a plain directory (a file or a link); --mode={mode} writes a "
                    "directory there: move it away")


def made_by(path: Path, record: str, workdir: Path, mode: str) -> None:
  """Refuses (one line) replacing `path`, --mode=`mode`'s output directory in an --output_dir, unless its `record`
  (JSON with "workdir") says this run wrote it: an --output_dir shared by runs would lose another run's outputs
  without a word. In the run's own workdir it is the run's (a copied workdir's too): replaced."""
  directory_name_free(path, mode)
  if same_directory(str(path.parent.resolve()), workdir) or not path.is_dir() or not any(path.iterdir()):
    return
  writer = recorded_workdir(path / record)
  if not same_directory(writer, workdir):
    whose = (f"another run's --mode={mode} outputs ({writer})" if writer else
             f"files whose {record} does not name this run (another run's, or from before {record} named it)")
    raise UserError(f"{path}: holds {whose}; pass another --output_dir or move it away (this run's would replace "
                    "them)")


def recorded_workdir(record: Path) -> str | None:
  """The workdir a record of whose outputs these are ({"workdir": ...}: export/, quantized/, an --output_dir) names:
  None where there is no record, "" where it cannot be read or names none."""
  try:
    recorded = json.loads(record.read_text())
  except FileNotFoundError:
    return None
  except (OSError, UnicodeDecodeError, ValueError):
    return ""
  recorded = recorded.get("workdir") if isinstance(recorded, dict) else None
  return recorded if isinstance(recorded, str) else ""


def same_directory(recorded, workdir: Path) -> bool:
  """Whether the path a record names is `workdir` (also through a bind mount or a link)."""
  try:
    return isinstance(recorded, str) and (recorded == str(Path(workdir).resolve())
                                          or os.path.samefile(recorded, workdir))
  except OSError:  # gone, or unreadable
    return False


# Each kind's records, its own first (a folder ends in '/'): a run's checkpoints mark it without its config.json too.
WORKDIR_RECORDS = {"a training run": ("config.json", "checkpoints/"), "a sweep": ("manifest.json",),
                   "reproductions": ("report.json",)}


def _holds(path: Path, record: str) -> bool:
  return (path / record).is_dir() if record.endswith("/") else (path / record).is_file()


def workdir_record(path: Path, besides: str = "") -> tuple[str, str] | None:
  """(kind, record) of the first WORKDIR_RECORDS record `path` holds, of a kind other than `besides`; else None."""
  return next(((kind, record) for kind, records in WORKDIR_RECORDS.items() if kind != besides
               for record in records if _holds(path, record)), None)


def refuse_other_workdir(path, kind: str, flag: str = "--workdir") -> None:
  """A training run, a sweep and reproductions each own their workdir (a sweep's trials and a reproduction's seeds
  are runs in its subdirectories): one holding another kind's record is refused rather than mixed into."""
  path = Path(path)
  # runs/x/checkpoints (or a step in it), mistyped for runs/x: its files would read as damage to x's checkpoints. A
  # run is its config.json with its launch records: a config.json alone (copied out to edit) is no run's
  within = next((p for p in (path.resolve(), *path.resolve().parents) if p.name == "checkpoints" and
                 _holds(p.parent, "config.json") and _holds(p.parent, "run_info.jsonl")), None)
  if within is not None:
    raise UserError(f"{flag}: {path} is {'' if within == path.resolve() else 'inside '}{within}, the checkpoints "
                    f"of the training run in {within.parent}, which hold only its checkpoints; use another {flag}")
  if _holds(path, WORKDIR_RECORDS[kind][0]):
    return
  if found := workdir_record(path, besides=kind):
    raise UserError(f"{flag}: {path} holds {found[0]} ({found[1].rstrip('/')}), not {kind}; use another {flag}")


def fail(message: str, code: int = 2):
  """Each line of `message` as 'error: ...' on stderr, then exit `code` (2: bad input)."""
  for line in message.splitlines():
    sys.stderr.write(f"error: {line}\n")
  sys.stderr.flush()
  sys.exit(code)


def parse_flags(argv: list[str]) -> list[str]:
  """absl flag parsing (an app.run flags_parser) whose failures are one line and exit 2."""
  from absl import flags
  try:
    return flags.FLAGS(argv)
  except flags.Error as e:
    fail(f"{str(e).strip().splitlines()[0]}; see --helpfull")
