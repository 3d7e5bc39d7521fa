"""One trial: its command line (a normal run of bigmodel_jax.main), its process and logs, how each launch ended.

A trial's directory is a complete run record of main plus stdout.log / stderr.log (every launch appended, each
after a '==== launch' line) and sweep_trial.json: its overrides, command and every launch's end (status, exit
code, error line, wall time). Executors launch trials from `launch_spec`, a plain dict, so a Ray worker on
another machine can launch one too.
"""

import fcntl
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

from bigmodel_jax.sweeps.spec import Sweep, Trial, format_value
from bigmodel_jax.trackers import EXPERIMENT_ENV  # trackers group a sweep's trials by it

STDOUT, STDERR, RECORD, FINAL, METRICS = "stdout.log", "stderr.log", "sweep_trial.json", "final_metrics.json", \
    "metrics.jsonl"
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)
LOCK_WAIT_S = 120  # how long a launch waits for an earlier launch of its trial to finish saving


def command(sweep: Sweep, trial: Trial, directory: Path) -> list[str]:
  """The interpreter's arguments for one trial."""
  config = f"--config={sweep.base_file}" + (f":{sweep.base_variant}" if sweep.base_variant else "")
  overrides = {**sweep.overrides, **trial.overrides}
  return ["-m", "bigmodel_jax.main", config, f"--workdir={directory}",
          *(f"--config.{k}={format_value(v)}" for k, v in overrides.items()), "--config.train.progress_bar=false"]


def launch_spec(sweep: Sweep, trial: Trial, workdir: Path) -> dict:
  """What launching `trial` takes, as JSON-able data: its directory, arguments, environment, selection metric."""
  directory = (Path(workdir) / trial.name).absolute()
  return {"name": trial.name, "overrides": {k: list(v) if isinstance(v, tuple) else v
                                            for k, v in trial.overrides.items()},
          "dir": str(directory), "argv": command(sweep, trial, directory), "env": {EXPERIMENT_ENV: sweep.name},
          "metric": sweep.metric, "eval": sweep.config.train.best_eval or "validation",
          "cwd": str(Path.cwd())}  # the launch directory: a relative path (data.path=in.txt) is read from it


def read_json(path: Path) -> dict | None:
  """A JSON object's file, or None: missing, unreadable, cut short, or not an object (a trial whose
  final_metrics.json is damaged is not done: relaunched, its finished run evaluates again and rewrites it)."""
  try:
    value = json.loads(Path(path).read_text())
  except (OSError, UnicodeDecodeError, json.JSONDecodeError):
    return None
  return value if isinstance(value, dict) else None


def read_record(directory: Path) -> dict:
  return read_json(Path(directory) / RECORD) or {}


def is_done(directory: Path) -> bool:
  return bool(read_json(Path(directory) / FINAL))


def selection(final: dict, metric: str, mode: str) -> tuple[float | None, float | None, int | None]:
  """(validation value, test value beside it, step) a sweep selects on: the run's best checkpoint when it was
  chosen by the same metric and mode, else the final validation metrics. Test is reported, never chosen on."""
  best = final.get("best") or {}
  if best.get("metric") == metric and best.get("mode", mode) == mode and best.get("value") is not None:
    return best["value"], (best.get("test") or {}).get(metric), best.get("step", final.get("best_step"))
  return (final.get("validation") or {}).get(metric), (final.get("test") or {}).get(metric), final.get("step")


def is_selection_record(record, eval_name: str) -> bool:
  """A training's metrics.jsonl line of the evaluator the run selects on (lines carry 'eval': its name); not a
  --mode=eval line (split 'eval': any checkpoint, in any order), nor a line that is no record (a hand edit)."""
  return (isinstance(record, dict) and isinstance(record.get("step"), int) and record.get("split") != "eval"
          and record.get("eval", record.get("split")) == eval_name)


def read_metrics(directory: Path) -> list[dict]:
  """The records of a trial's metrics.jsonl ([] when it cannot be read: missing, a directory); undecodable bytes
  and lines that are no JSON object (cut short by a kill, a hand edit) are skipped."""
  records = []
  try:
    lines = (Path(directory) / METRICS).read_bytes().decode(errors="replace").splitlines()
  except OSError:
    return records
  for line in lines:
    try:
      record = json.loads(line)
    except json.JSONDecodeError:
      continue  # a line cut short by a kill
    if isinstance(record, dict):
      records.append(record)
  return records


class MetricsTail:
  """The lines a running trial adds to its metrics.jsonl. A resumed run rewrites the file (dropping the steps it
  redoes), so a replaced or shorter file is read again from the start; `new` skips steps already seen."""

  def __init__(self, path: Path, eval_name: str):
    self.path, self.eval_name = Path(path), eval_name
    self.offset, self.inode, self.last_step = 0, None, -math.inf

  def new(self) -> list[dict]:
    try:
      stat = os.stat(self.path)
      if stat.st_ino != self.inode or stat.st_size < self.offset:
        self.inode, self.offset = stat.st_ino, 0
      with open(self.path, "rb") as f:
        f.seek(self.offset)
        data = f.read()
    except OSError:
      return []
    end = data.rfind(b"\n") + 1  # whole lines only; the rest is read once complete
    self.offset += end
    out = []
    for line in data[:end].decode(errors="replace").splitlines():
      try:
        record = json.loads(line)
      except json.JSONDecodeError:
        continue
      if is_selection_record(record, self.eval_name) and record.get("step", -1) > self.last_step:
        self.last_step = record["step"]
        out.append(record)
    return out


def error_line(path: Path, offset: int) -> str:
  """The last 'error: ...' line main printed on stderr after `offset` (this launch's part of the log)."""
  try:
    with open(path, "rb") as f:
      f.seek(offset)
      text = f.read().decode(errors="replace")
  except OSError:
    return ""
  errors = [line.strip() for line in text.splitlines() if line.startswith("error: ")]
  return errors[-1] if errors else ""


def wait_for_lock(directory: Path, timeout: float = LOCK_WAIT_S) -> None:
  """An earlier launch of this trial may still be saving its checkpoint (its sweep died, so it got SIGTERM):
  wait for it to release the workdir rather than fail on main's lock. After `timeout` main says who holds it."""
  path = directory / ".train.lock"
  if not path.exists():
    return
  deadline = time.time() + timeout
  try:
    f = open(path, "a")
  except OSError:  # a directory, say: main says in one line what is wrong with it
    return
  with f:
    while True:
      try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        fcntl.flock(f, fcntl.LOCK_UN)
        return
      except OSError:
        if time.time() > deadline:
          return
        time.sleep(0.2)


def wrappers(cpus: list[int] | None = None) -> list[str]:
  """Wrappers that exec the trial: pinned to `cpus` (taskset) and sent SIGTERM if its parent dies (setpriv), so
  it checkpoints and stops instead of training on, orphaned, when the sweep (a Ray worker, reproduce) is killed."""
  prefix = []
  if cpus and shutil.which("taskset"):
    prefix += ["taskset", "-c", ",".join(map(str, cpus))]
  if shutil.which("setpriv"):
    prefix += ["setpriv", "--pdeathsig", "TERM", "--"]
  return prefix


class Launch:
  """One start of a trial's process. Its output appends to the trial's logs; `finish` records how it ended."""

  def __init__(self, spec: dict, env: dict | None = None, cpus: list[int] | None = None):
    self.spec, self.dir = spec, Path(spec["dir"])
    self.dir.mkdir(parents=True, exist_ok=True)
    wait_for_lock(self.dir)
    stderr_path = self.dir / STDERR
    self.stderr_offset = stderr_path.stat().st_size if stderr_path.exists() else 0
    self.start = time.time()
    argv = [sys.executable, *spec["argv"]]
    stamp = f"==== launch {time.strftime('%Y-%m-%d %H:%M:%S')}: {' '.join(argv)}\n"
    with open(self.dir / STDOUT, "a") as out, open(stderr_path, "a") as err:
      out.write(stamp)
      err.write(stamp)
      out.flush()
      err.flush()
      self.stderr_offset += len(stamp.encode())
      self.proc = subprocess.Popen(wrappers(cpus) + argv, stdin=subprocess.DEVNULL, stdout=out, stderr=err,
                                   env={**os.environ, **spec["env"], **(env or {})}, cwd=spec.get("cwd"))
    if cpus and not shutil.which("taskset") and hasattr(os, "sched_setaffinity"):
      os.sched_setaffinity(self.proc.pid, cpus)  # before the interpreter has started any thread; they inherit it

  def stop(self) -> None:
    """SIGTERM: main saves a checkpoint and exits 143; the same command resumes it."""
    if self.proc.poll() is None:
      self.proc.send_signal(signal.SIGTERM)

  def finish(self, exit_code: int, status: str | None = None) -> dict:
    """How this launch ended -> {'status': done | interrupted | failed | <status>, 'exit_code', 'error', ...},
    appended to the trial's sweep_trial.json."""
    stopped = {128 + s for s in STOP_SIGNALS} | {-s for s in STOP_SIGNALS}
    error = ""
    if status is None:
      if exit_code == 0 and is_done(self.dir):
        status = "done"
      elif exit_code in stopped:
        status = "interrupted"
      else:
        status = "failed"
        error = error_line(self.dir / STDERR, self.stderr_offset) or (
            f"killed by {signal.Signals(-exit_code).name}" if exit_code < 0 else
            f"exit code {exit_code} without final_metrics.json" if exit_code == 0 else
            f"exit code {exit_code} (see {self.dir / STDERR})")
    end = {"status": status, "exit_code": exit_code, "error": error, "start": self.start,
           "wall_s": round(time.time() - self.start, 3)}
    from bigmodel_jax.runinfo import write_text_atomic
    record = read_record(self.dir)
    record.update(name=self.spec["name"], overrides=self.spec["overrides"], argv=self.spec["argv"],
                  env=self.spec["env"])
    record["launches"] = record.get("launches", []) + [end]
    write_text_atomic(self.dir / RECORD, json.dumps(record, indent=2) + "\n")
    return end
