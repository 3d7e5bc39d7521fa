"""The local executor (the default): trials as processes on this machine, `parallel` at a time, each pinned to its
own CPUs and, on a GPU machine, its own GPU (trials sharing a GPU get a share of its memory each).

SIGTERM or Ctrl-C on the sweep is passed on to the running trials as SIGTERM; each saves a checkpoint and exits,
and the sweep waits for them, so everything resumes with the same command.
"""

import math
import os
import signal
import subprocess
import time
from pathlib import Path
from typing import Iterator

from bigmodel_jax import interrupts
from bigmodel_jax.sweeps import trials as trials_lib
from bigmodel_jax.sweeps.spec import Sweep, Trial

POLL_S = 0.2
GPU_MEMORY = 0.9  # of each GPU, split between the trials sharing it


def visible_gpus() -> list[str]:
  """GPU ids this process may use: CUDA_VISIBLE_DEVICES if set, else what nvidia-smi lists (none without it)."""
  if "CUDA_VISIBLE_DEVICES" in os.environ:
    return [g.strip() for g in os.environ["CUDA_VISIBLE_DEVICES"].split(",") if g.strip() not in ("", "-1")]
  try:
    out = subprocess.run(["nvidia-smi", "--query-gpu=index", "--format=csv,noheader"], capture_output=True,
                         text=True, timeout=10)
  except (OSError, subprocess.SubprocessError):
    return []
  return [line.strip() for line in out.stdout.splitlines() if line.strip()] if out.returncode == 0 else []


def slots(parallel: int, gpus: list[str] | None = None) -> list[tuple[dict, list[int] | None]]:
  """(environment, CPUs) for each of `parallel` trial slots: CPUs split into contiguous blocks, GPUs dealt out
  round-robin; trials on one GPU don't preallocate and each is capped at its share of the memory."""
  gpus = visible_gpus() if gpus is None else gpus
  cpus = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
  per_gpu = math.ceil(parallel / len(gpus)) if gpus else 0
  out = []
  for i in range(parallel):
    env = {}
    if gpus:
      env["CUDA_VISIBLE_DEVICES"] = gpus[i % len(gpus)]
      if per_gpu > 1:
        env.update(XLA_PYTHON_CLIENT_PREALLOCATE="false", XLA_PYTHON_CLIENT_MEM_FRACTION=f"{GPU_MEMORY / per_gpu:.3f}")
    if parallel == 1 or not cpus:
      mine = None
    elif parallel <= len(cpus):
      mine = cpus[i * len(cpus) // parallel:(i + 1) * len(cpus) // parallel]
    else:
      mine = [cpus[i % len(cpus)]]
    out.append((env, mine))
  return out


class LocalExecutor:
  def __init__(self, parallel: int = 1):
    self.parallel = parallel

  def run(self, sweep: Sweep, workdir: Path, trials: Iterator[Trial], events) -> int | None:
    """Runs trials as slots free up until `trials` is exhausted -> the signal number that stopped the sweep,
    or None. events.started(trial) / events.finished(trial, end) / events.tick() / events.message(text)."""
    free, running, stop = list(range(self.parallel)), {}, []
    devices = slots(self.parallel)

    def on_signal(signum, _):
      if not stop:
        events.message(f"{signal.Signals(signum).name}: stopping {len(running)} running trial(s); each saves a "
                       "checkpoint first, then the same command resumes the sweep")
      stop.append(signum)
      for launch, _ in running.values():
        launch.stop()

    previous = {s: signal.signal(s, on_signal) for s in trials_lib.STOP_SIGNALS}
    try:
      exhausted = False
      while True:
        while free and not stop and not exhausted:
          trial = next(trials, None)
          if trial is None:
            exhausted = True
            break
          slot = free.pop(0)
          env, cpus = devices[slot]
          running[slot] = (trials_lib.Launch(trials_lib.launch_spec(sweep, trial, workdir), env, cpus), trial)
          events.started(trial)
          if stop:  # the signal came while it was starting
            running[slot][0].stop()
        if not running:
          break
        time.sleep(POLL_S)
        for slot, (launch, trial) in list(running.items()):
          exit_code = launch.proc.poll()
          if exit_code is not None:
            del running[slot]
            free.append(slot)
            events.finished(trial, launch.finish(exit_code))
        events.tick()
    finally:
      interrupts.restore(previous)
      for launch, trial in running.values():  # left only by an error (e.g. in a search): stop them, as a signal would
        launch.stop()
        events.finished(trial, launch.finish(launch.proc.wait()))
    return stop[0] if stop else None
