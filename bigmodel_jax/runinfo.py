"""What a run was: resolved config and provenance, written into the workdir."""

import importlib.metadata
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import jax

import bigmodel_jax

PACKAGES = ("jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "grain", "ml_collections",
            "tensorflow-datasets", "numpy")


def git_commit() -> str | None:
  try:
    out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(bigmodel_jax.__file__).parent,
                         capture_output=True, text=True, timeout=5)
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                           cwd=Path(bigmodel_jax.__file__).parent, capture_output=True, text=True, timeout=5)
  except (OSError, subprocess.SubprocessError):
    return None
  if out.returncode != 0:
    return None
  return out.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")


def provenance() -> dict:
  versions = {}
  for name in PACKAGES:
    try:
      versions[name] = importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
      pass
  return {
      "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
      "bigmodel_jax": bigmodel_jax.__version__,
      "git_commit": git_commit(),
      "python": sys.version.split()[0],
      "versions": versions,
      "command": sys.argv,
      "process_index": jax.process_index(),
      "process_count": jax.process_count(),
      "devices": [str(d) for d in jax.devices()],
      "local_devices": [str(d) for d in jax.local_devices()],
      "platform": jax.default_backend(),
  }


def write_bytes_atomic(path: Path, data: bytes) -> None:
  """Written whole, then renamed into place: a kill never leaves half a file."""
  tmp = path.with_name(path.name + ".tmp")
  tmp.write_bytes(data)
  os.replace(tmp, path)


def write_text_atomic(path: Path, text: str) -> None:
  write_bytes_atomic(path, text.encode())


def unused_path(path: Path, make_dir: bool = False) -> Path:
  """`path`, or the first of <stem>_2<suffix>, _3, ... that does not exist: a later --mode=predict/sample call
  keeps what an earlier one wrote. `make_dir` creates the directory, atomically, so two calls at once differ too."""
  path, n = Path(path), 1
  while True:
    candidate = path if n == 1 else path.with_name(f"{path.stem}_{n}{path.suffix}")
    if make_dir:
      try:
        candidate.mkdir(parents=True)
        return candidate
      except FileExistsError:
        pass
    elif not candidate.exists():
      return candidate
    n += 1


def write_run_records(workdir: Path, config, write_config: bool = True, init: dict | None = None) -> None:
  """config.json (the resolved config; `write_config` False keeps the one there) and one provenance line per
  launch in run_info.jsonl (`init`: where a fresh run's initial weights came from, init_from.Source.record)."""
  workdir.mkdir(parents=True, exist_ok=True)
  if write_config:  # train.allow_config_change and allow_data_change are permissions for the launch that gave them,
    # not properties of the run: a relaunch, eval or sample from RUN/config.json must not inherit them
    record = json.loads(config.to_json_best_effort())
    record["train"]["allow_config_change"] = record["train"]["allow_data_change"] = False
    write_text_atomic(workdir / "config.json", json.dumps(record, indent=2, sort_keys=True) + "\n")
  with open(workdir / "run_info.jsonl", "a") as f:
    f.write(json.dumps({**provenance(), **({"init": init} if init else {})}) + "\n")


def to_host(tree):
  """numpy copies of a pytree's arrays, whole even where an array's shards live on other processes.

  With several processes, call it on all of them with the same tree: a sharded array is gathered collectively.
  """
  import numpy as np
  from jax.experimental import multihost_utils

  def fetch(x):
    if not isinstance(x, jax.Array) or x.is_fully_addressable:
      return np.asarray(jax.device_get(x))
    if x.sharding.is_fully_replicated:  # this process already holds all of it
      return np.asarray(x.addressable_data(0))
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))  # e.g. FSDP parameters across hosts
  return jax.tree.map(fetch, tree)


def fingerprint(params) -> str:
  """sha256 over every parameter's path, dtype, shape and bytes: equal iff the parameters are bit-identical.

  Collective with several processes (see to_host): every process gets the same hash.
  """
  import hashlib
  import numpy as np
  digest = hashlib.sha256()
  leaves = jax.tree_util.tree_leaves_with_path(to_host(params))
  for path, leaf in sorted(leaves, key=lambda kv: jax.tree_util.keystr(kv[0])):
    arr = np.ascontiguousarray(leaf)
    digest.update(f"{jax.tree_util.keystr(path)}|{arr.dtype}|{arr.shape}|".encode())
    digest.update(arr.tobytes())
  return digest.hexdigest()
