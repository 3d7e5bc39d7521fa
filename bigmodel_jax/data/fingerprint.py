"""What data a run trained on: `<workdir>/data_fingerprint.json`, checked whenever the run is used again.

A resume, eval, predict or sample against other data than the checkpoints were trained on would run and exit 0
with numbers that mean nothing; this makes it one line naming the file. The fingerprint holds the sha256 of each
file a dataset read (config.data.path, the verified files of the data dir) or, for data that comes from no file of
ours (digits, diabetes, synthetic_linear, TFDS), of the loaded arrays or texts; and the tokenizer's vocabulary.

It is written when a run first trains. A resume with config.train.allow_data_change records the data it goes on
with (the earlier record kept under "earlier"); a workdir from before fingerprints gets one at its next training
launch (eval, predict and sample record nothing). Each checkpoint's meta records its tokenizer's fingerprint too
(check_checkpoint), which catches checkpoints copied in from a run whose text has as many characters.
"""

import contextlib
import contextvars
import hashlib
import json
from pathlib import Path

import numpy as np
from absl import logging

from bigmodel_jax.errors import UserError

FILE = "data_fingerprint.json"
FORMAT = 1
ALLOW = "--config.train.allow_data_change=true"

_NOTED: contextvars.ContextVar[dict | None] = contextvars.ContextVar("noted_files", default=None)
_SHA256: dict[tuple, str] = {}  # (path, size, mtime_ns) -> sha256 of files hashed by this process


@contextlib.contextmanager
def recording():
  """Collects the files a dataset function reads (note_file) into the dict it yields."""
  files = {}
  token = _NOTED.set(files)
  try:
    yield files
  finally:
    _NOTED.reset(token)


def note_file(key: str, path: Path, sha256: str) -> None:
  """Records that the dataset being loaded read `path` (its role: `key`), whose sha256 is known."""
  files = _NOTED.get()
  if files is not None:
    path = Path(path).absolute()
    files[key] = {"path": str(path), "size": path.stat().st_size, "sha256": sha256}


def file_sha256(path: Path) -> str:
  """sha256 of a file, hashed once per process while its size and mtime stay the same."""
  path = Path(path).absolute()
  st = path.stat()
  key = (str(path), st.st_size, st.st_mtime_ns)
  if key not in _SHA256:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
      for block in iter(lambda: f.read(1 << 20), b""):
        digest.update(block)
    _SHA256[key] = digest.hexdigest()
  return _SHA256[key]


def content_sha256(loaded) -> str:
  """sha256 of a loaded Dataset's arrays or a TextCorpus's texts and labels, split by split."""
  digest = hashlib.sha256()
  for split in ("train", "validation", "test"):
    value = getattr(loaded, split, None)
    if value is None:
      continue
    items = sorted(value.items()) if isinstance(value, dict) else [("texts", value)]
    labels = getattr(loaded, f"{split}_labels", None)
    items += [("labels", labels)] if labels is not None else []
    for key, item in items:
      if key == "texts":
        digest.update(f"{split}/texts|{len(item)}|".encode())
        for text in item:
          data = text.encode("utf-8", errors="surrogatepass")
          digest.update(len(data).to_bytes(8, "little") + data)
      else:
        arr = np.ascontiguousarray(item)
        digest.update(f"{split}/{key}|{arr.dtype}|{arr.shape}|".encode() + arr.tobytes())
  return digest.hexdigest()


def of_loaded(loaded, files: dict) -> dict:
  """A dataset's data fingerprint: the files it read, else (generated or bundled data) its content's digest."""
  return dict(files) if files else {"arrays": {"sha256": content_sha256(loaded)}}


def tokenizer_fingerprint(tokenizer) -> dict:
  record = tokenizer.record()
  canonical = json.dumps(record, sort_keys=True, ensure_ascii=False).encode()
  return {"name": record["name"], "vocab_size": record["vocab_size"], "sha256": hashlib.sha256(canonical).hexdigest()}


def current(dataset) -> dict:
  """The fingerprint of what this launch reads: the data (absent when only a tokenizer was loaded, for sampling)
  and the tokenizer."""
  out = {"format": FORMAT, "dataset": dataset.name}
  if dataset.fingerprint:  # (and the share of it held out as validation: what config.init checks)
    out["data"], out["held_out"] = dataset.fingerprint, dataset.held_out
  if dataset.tokenizer is not None:
    out["tokenizer"] = tokenizer_fingerprint(dataset.tokenizer)
  return out


def _read(path: Path) -> dict:
  try:
    record = json.loads(path.read_text())
    if not isinstance(record, dict):
      raise ValueError("not a JSON object")
    data, tokenizer = record.get("data", {}), record.get("tokenizer", {})
    if not (isinstance(data, dict) and all(isinstance(v, dict) and isinstance(v.get("sha256"), str)
                                           and isinstance(v.get("path", ""), str) for v in data.values())
            and isinstance(tokenizer, dict) and isinstance(record.get("earlier", []), list)):
      raise ValueError("its data, tokenizer or earlier entry is not what this version writes")
    return record
  except (OSError, ValueError) as e:
    raise UserError(f"{path} cannot be read ({e}); restore it, or delete it to record the data the next training "
                    "launch reads") from None


def _difference(recorded: dict, now: dict, path: Path, workdir: Path) -> tuple[str, str] | None:
  """(what differs between the recorded fingerprint and this launch's, as the start of one error line; 'data' or
  'tokenizer files'), or None: the same."""
  old, new = recorded.get("data"), now.get("data")
  if old is not None and new is not None:
    for key in sorted(set(old) | set(new)):
      was, is_ = old.get(key), new.get(key)
      if was is not None and is_ is not None and was.get("sha256") == is_.get("sha256"):
        continue
      if is_ is None:
        return f"{path}: this run trained on {was.get('path', key)} ({key}), which the data read now lacks", "data"
      if "path" in is_:
        said = f"sha256 {is_['sha256'][:12]}, {path} records {was['sha256'][:12]}" if was else f"{path} has no {key}"
        return f"{is_['path']}: not the data this run trained on ({said})", "data"
      return (f"{path}: the {now.get('dataset')} data loaded now is not what this run trained on (the digest of its "
              "arrays differs; e.g. another version of the package that ships it)"), "data"
  old, new = recorded.get("tokenizer"), now.get("tokenizer")
  # another vocabulary size is said by the checkpoint restore, with the shapes it does not fit
  if old and new and old.get("vocab_size") == new["vocab_size"] and old.get("sha256") != new["sha256"]:
    return (f"{workdir / 'tokenizer' / 'tokenizer.json'}: not the tokenizer this run trained with (the same "
            f"{new['vocab_size']} ids, but its vocabulary differs from the one {path} records)"), "tokenizer files"
  return None


def check(workdir: Path, dataset, allow_change: bool) -> None:
  """Before a workdir's checkpoints are resumed, evaluated or sampled: the data and tokenizer must be what they
  were trained on (config.train.allow_data_change: go on anyway, with a warning). A workdir without a
  fingerprint (written before them, or by hand) is not checked."""
  from bigmodel_jax.workdir import has_checkpoints
  path = Path(workdir) / FILE
  if not path.exists() or not has_checkpoints(Path(workdir)):
    return
  difference = _difference(_read(path), current(dataset), path, Path(workdir))
  if difference is None:
    return
  problem, what = difference
  if allow_change:
    logging.warning("%s; going on with it, as config.train.allow_data_change is set", problem)
    return
  raise UserError(f"{problem}; put the run's own {what} back, use a new --workdir, or pass {ALLOW} to go on with "
                  "this one")


def record(workdir: Path, dataset, start_step: int) -> None:
  """When training starts (process 0): a new run's fingerprint; on a resume, the data it goes on with if that
  differs (allowed by check) or was never recorded."""
  from bigmodel_jax.runinfo import write_text_atomic
  path = Path(workdir) / FILE
  now = current(dataset)
  if start_step > 0 and path.exists():
    recorded = _read(path)
    if _difference(recorded, now, path, Path(workdir)) is None:
      return
    earlier = recorded.pop("earlier", [])
    now["earlier"] = [{**recorded, "until_step": start_step}, *earlier]
    logging.warning("%s: recording the data this run goes on with from step %d (the earlier record is kept under "
                    "'earlier')", path, start_step)
  elif start_step > 0:
    logging.info("%s: none yet (a run from before data fingerprints); recording the data it reads from step %d on",
                 path, start_step)
  write_text_atomic(path, json.dumps({**now, "since_step": start_step}, indent=2) + "\n")


# Each checkpoint's meta also records its tokenizer's fingerprint: data_fingerprint.json speaks for the workdir, and
# a checkpoint copied in from another run with the same number of ids (another text's characters) would restore and
# evaluate to numbers that mean nothing, with exit 0.
TOKENIZER_KEY = "tokenizer"


def checkpoint_record(dataset) -> dict:
  """What each checkpoint's meta records of the tokenizer it was trained with (nothing for a model without one)."""
  return {} if dataset.tokenizer is None else {TOKENIZER_KEY: tokenizer_fingerprint(dataset.tokenizer)}


def check_checkpoint(run, step: int) -> None:
  """Before checkpoint `step` of `run` (a train.Run or inference.Inference) is restored: the tokenizer loaded now
  must be the one the step recorded (a step saved before the record: nothing to check; another vocabulary size is
  said by the restore, with the shapes it does not fit); allow_data_change goes on with a warning."""
  if run.dataset.tokenizer is None:
    return
  recorded = run.checkpointer.meta_values(TOKENIZER_KEY, [step])[step]
  now = tokenizer_fingerprint(run.dataset.tokenizer)
  if not isinstance(recorded, dict) or recorded.get("vocab_size") != now["vocab_size"] \
      or recorded.get("sha256") == now["sha256"]:
    return
  problem = (f"checkpoint step {step} in {run.workdir} was trained with another tokenizer than "
             f"{Path(run.workdir) / 'tokenizer' / 'tokenizer.json'} (the same {now['vocab_size']} ids, another "
             "vocabulary: copied from another run?)")
  if run.config.train.get("allow_data_change", False):
    logging.warning("%s; going on with it, as config.train.allow_data_change is set", problem)
    return
  raise UserError(f"{problem}; put back the tokenizer files it was trained with, move the step away, or pass {ALLOW} "
                  "to go on with this one")
