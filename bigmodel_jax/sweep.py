"""Ablation sweeps: python -m bigmodel_jax.sweep experiments/sweeps/mnist_lr_width.py --workdir=sweeps/lr_width

Every trial of the sweep file (see bigmodel_jax/sweeps/__init__.py for the format) is a normal run of
bigmodel_jax.main in its own process and in its own subdirectory of --workdir, named from its overrides, with
its full run record plus stdout.log / stderr.log. Unattended: a crashing trial is recorded as failed with its
error line and the sweep goes on; the same command again skips finished trials, resumes interrupted ones from
their own checkpoints and runs trials added to the file since; SIGTERM / Ctrl-C stop the trials cleanly
(each saves a checkpoint). At the end (or with --report): results.csv, results.md and plots/ in --workdir.

    --parallel=N               trials at a time (local: each pinned to its own CPUs / GPU)
    --executor=ray --ray_address=auto|host:port   on a Ray cluster, via Ray Tune (pip install 'bigmodel_jax[ray]')
    --sweep=small              the file's sweep_small() instead of sweep()
    --report                   only rewrite the results from what --workdir holds (the sweep file is optional)
    --dry_run                  list the trials and their commands; run nothing

Exit status: 0 when every trial of the sweep is done, 1 when some failed or did not finish (the rest ran), 2 for bad input (one
line per problem, nothing run or changed), 128+signal after SIGTERM / SIGINT (everything resumable).
"""

import os
import sys
import time
from pathlib import Path

from absl import app, flags

from bigmodel_jax.errors import UserError, closed_stdout, fail, parse_flags, writable_directory
from bigmodel_jax.registry import Registry

_WORKDIR = flags.DEFINE_string("workdir", None, "Sweep directory: one subdirectory per trial, manifest, results.")
_SWEEP = flags.DEFINE_string("sweep", "", "Run the sweep file's sweep_<name>() (or search_<name>()) instead of "
                             "sweep() (or search()).")
_PARALLEL = flags.DEFINE_integer("parallel", None, "Trials at a time (local: default 1; ray: default as many as the "
                                 "cluster's resources fit).")
_EXECUTOR = flags.DEFINE_string("executor", "local", "local (processes on this machine) or ray (Ray Tune).")
_RAY_ADDRESS = flags.DEFINE_string("ray_address", "auto", "--executor=ray: the cluster, host:port, or auto "
                                   "($RAY_ADDRESS or the cluster `ray start` runs on this machine).")
_REPORT = flags.DEFINE_bool("report", False, "Only write results.csv / results.md / plots from the workdir.")
_DRY_RUN = flags.DEFINE_bool("dry_run", False, "List the trials and their commands, run nothing.")

EXECUTORS: Registry = Registry("executor", "--executor")


@EXECUTORS.register("local")
def _local(parallel: int | None, address: str):
  from bigmodel_jax.sweeps.local import LocalExecutor
  if parallel is not None and parallel < 1:
    raise UserError(f"--parallel: must be >= 1, got {parallel}")
  return LocalExecutor(parallel or 1)


@EXECUTORS.register("ray")
def _ray(parallel: int | None, address: str):
  from bigmodel_jax.sweeps.spec import require
  ray_tune = require("bigmodel_jax.sweeps.ray_tune", "ray", "--executor=ray")
  if parallel is not None and parallel < 0:
    raise UserError(f"--parallel: must be >= 0 (0: as many as the cluster fits), got {parallel}")
  return ray_tune.RayExecutor(address, parallel or 0)


def _duration(seconds: float) -> str:
  seconds = int(round(seconds))
  return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m" if seconds >= 3600 else \
      f"{seconds // 60}m{seconds % 60:02d}s" if seconds >= 60 else f"{seconds}s"


class Progress:
  """The one status line of a sweep (done / running / failed, ETA); on a terminal it redraws in place, elsewhere
  a new line is printed when a count changes."""

  def __init__(self, name: str, total: int, done: int, parallel: int, stream=sys.stderr):
    self.name, self.total, self.done, self.parallel, self.stream = name, total, done, parallel, stream
    self.failed, self.running, self.durations = 0, {}, []
    self.tty, self.shown = stream.isatty(), ""

  def started(self, name: str) -> None:
    self.running[name] = time.time()
    self.draw()

  def finished(self, name: str, status: str, wall_s: float) -> None:
    self.running.pop(name, None)
    self.done += status == "done"
    self.failed += status == "failed"
    if status in ("done", "failed"):
      self.durations.append(wall_s)
    self.draw()

  def eta(self) -> str:
    if not self.durations:
      return "?"
    mean, now = sum(self.durations) / len(self.durations), time.time()
    waiting = max(self.total - self.done - self.failed - len(self.running), 0)
    work = waiting * mean + sum(max(mean - (now - t), 0) for t in self.running.values())
    return _duration(work / max(self.parallel or len(self.running), 1))

  def draw(self) -> None:
    counts = f"{self.name}: {self.done}/{self.total} done, {len(self.running)} running, {self.failed} failed"
    if self.tty:
      self.stream.write(f"\r\033[K{counts}, ETA {self.eta()}")
      self.stream.flush()
    elif counts != self.shown:
      print(f"{counts}, ETA {self.eta()}", file=self.stream, flush=True)
    self.shown = counts

  def message(self, text: str) -> None:
    if self.tty:
      self.stream.write("\r\033[K")
    print(text, file=self.stream, flush=True)
    if self.tty:
      self.draw()

  def close(self) -> None:
    if self.tty:
      self.stream.write("\n")
      self.stream.flush()


class Events:
  """What executors report, kept in the manifest, the progress line and (searches) the study."""

  def __init__(self, manifest, progress: Progress, search=None):
    self.manifest, self.progress, self.search = manifest, progress, search

  def started(self, trial) -> None:
    entry = self.manifest.trials[trial.name]
    self.manifest.update(trial.name, status="running", launches=entry.get("launches", 0) + 1)
    self.progress.started(trial.name)

  def finished(self, trial, end: dict) -> None:
    entry = self.manifest.trials[trial.name]
    self.manifest.update(trial.name, status=end["status"], error=end["error"], exit_code=end["exit_code"],
                         wall_s=round(entry.get("wall_s", 0.0) + end["wall_s"], 3))
    if end["status"] == "failed":
      self.progress.message(f"trial {trial.name} failed: {end['error']}")
    self.progress.finished(trial.name, end["status"], end["wall_s"])
    if self.search is not None:
      self.search.tell(trial, end["status"])

  def tick(self) -> None:
    if self.progress.tty:
      self.progress.draw()

  def message(self, text: str) -> None:
    self.progress.message(text)


def report(workdir: Path, data: dict) -> Path:
  from bigmodel_jax.sweeps import report as report_lib
  paths = report_lib.write(workdir, data)
  return paths[1]


def run(args: list[str]) -> int:
  """The sweep command -> its exit status. Raises UserError for bad input, before anything runs."""
  from bigmodel_jax.sweeps import spec
  from bigmodel_jax.sweeps.manifest import Manifest
  if _WORKDIR.value is None:
    raise UserError("--workdir is required (where the trials, the manifest and the results go)")
  if not _WORKDIR.value.strip():  # Path("") is the current directory
    raise UserError("--workdir is empty; give the directory for the trials, the manifest and the results")
  workdir = Path(_WORKDIR.value).expanduser()  # --workdir=~/x: the shell leaves a "~" after "=" as it is
  if len(args) > 1:
    raise UserError(f"unexpected arguments {args[1:]}; give one sweep file, then flags like --parallel=2")
  if not args:
    if not _REPORT.value:
      raise UserError("give the sweep file: python -m bigmodel_jax.sweep experiments/sweeps/<sweep>.py --workdir=DIR")
    print(report(workdir, Manifest.load(workdir).data))
    return 0
  sweep = spec.load(args[0], _SWEEP.value)
  manifest = Manifest.open(workdir, sweep)
  if _REPORT.value:
    print(report(workdir, Manifest.load(workdir).data))
    return 0
  if _DRY_RUN.value:
    from bigmodel_jax.sweeps.trials import launch_spec
    if sweep.kind == "search":
      print(f"an Optuna search of {sweep.num_trials} trials on {sweep.base}, {sweep.mode} validation {sweep.metric}")
    for trial in sweep.trials or []:
      print(f"{trial.name}: python {' '.join(launch_spec(sweep, trial, workdir)['argv'])}")
    return 0
  executor = EXECUTORS.get(_EXECUTOR.value)(_PARALLEL.value, _RAY_ADDRESS.value)  # e.g. Ray missing or unreachable
  writable_directory(workdir)
  lock = manifest.lock()
  try:
    search = None
    if sweep.kind == "search":  # its study's trials, also those a lost manifest no longer lists
      from bigmodel_jax.sweeps.search import Search
      search = Search(sweep, workdir, manifest)
    todo = manifest.sync(sweep)
    total = len(sweep.trials) if sweep.trials is not None else sweep.num_trials
    done = sum(manifest.trials[t.name]["status"] == "done" for t in sweep.trials) if sweep.trials is not None else \
        sum(e["status"] == "done" for e in manifest.trials.values())
    progress = Progress(sweep.name, total, done, getattr(executor, "parallel", 1))
    progress.message(f"sweep {sweep.name}: {total} trials on {sweep.base}, {done} already done; "
                     f"{'an Optuna search' if search else f'{len(todo)} to run'} in {workdir}")
    signum = executor.run(sweep, workdir, search.trials() if search else iter(todo), events=Events(
        manifest, progress, search))
    progress.close()
    results = report(workdir, manifest.data)
  finally:
    lock.close()
  in_sweep = [e for e in manifest.trials.values() if e.get("in_sweep", True)]
  failed = sum(e["status"] == "failed" for e in in_sweep)
  done = sum(e["status"] == "done" for e in in_sweep)
  finished = sum(e["status"] in ("done", "pruned") for e in in_sweep)  # pruned: stopped by ASHA, by design
  # a trial stopped from outside (SIGTERM) is not finished
  code = 128 + signum if signum else 1 if failed or finished < total else 0
  try:
    print(f"{sweep.name}: {done}/{total} trials done, {failed} failed; results: {results}", flush=True)
  except BrokenPipeError:  # | head: a failed trial's status 1 matters more than the closed pipe's 141
    if not code:
      raise
    sys.stderr.write(f"error: {closed_stdout('before all of it was printed')}\n")
    os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # what is left unprinted goes nowhere
  return code


def main(argv):
  try:
    code = run(argv[1:])
    sys.stdout.flush()  # a closed pipe found here, not in Python's flush at exit
  except UserError as e:
    fail(str(e))
  except BrokenPipeError:  # | head: the table is in the sweep's results files
    fail(closed_stdout("before all of it was printed"), code=141)
  sys.exit(code)


if __name__ == "__main__":
  app.run(main, flags_parser=parse_flags)
