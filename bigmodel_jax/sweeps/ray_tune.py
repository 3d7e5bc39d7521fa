"""The Ray executor (--executor=ray, the optional extra bigmodel_jax[ray]): Ray Tune runs one trial per task with
the resources the sweep file asks for (`resources = {"cpu": 1, "gpu": 1}`).

Each Tune trial is a TrialTrainable in a Ray worker: it starts bigmodel_jax.main in a child process and reports
every validation record of the trial's metrics.jsonl to Tune as it appears (`step` = the training step), so an
ASHA scheduler (`asha = {"grace_period": 100, "max_t": 1000}`, in training steps) can stop weak trials early:
a stopped trial gets SIGTERM, saves a checkpoint and is marked 'pruned'. The sweep workdir must be on a
filesystem every Ray node sees (the trials write their records there), and so must the directory the sweep was
launched from: each trial runs there, as a local one does, so a relative path (data.path=in.txt) is the same file.
Stopping the sweep (SIGTERM, Ctrl-C) drops a stop file in the workdir that every running trial watches: each stops
its process (checkpoint first) and ends.
"""

import collections
import itertools
import logging
import math
import os
import signal
import socket
import time
from pathlib import Path
from typing import Iterator

import ray
from ray import tune

from bigmodel_jax import interrupts
from bigmodel_jax.errors import UserError
from bigmodel_jax.sweeps import trials as trials_lib
from bigmodel_jax.sweeps.spec import Sweep, Trial

STOP_FILE = ".stop"
POLL_S = 0.5
CONNECT_TIMEOUT_S = 3
ASHA_MAX_T = 10 ** 9
GPU_MEMORY = 0.9  # of a GPU, scaled by a fractional "gpu" resource
FORWARDED_ENV = ("PYTHONPATH",)  # to the workers, so they import this checkout's bigmodel_jax
FORWARDED_PREFIX = "BIGMODEL_JAX_"  # the package's settings (data and cache dirs...), to every trial


def resolve_address(address: str) -> str:
  """'auto' ($RAY_ADDRESS, else the cluster `ray start` left on this machine) or host:port -> host:port, checked to
  accept a TCP connection within seconds (ray.init itself would wait much longer for a dead address)."""
  given = address
  if address == "auto":
    current = Path("/tmp/ray/ray_current_cluster")
    address = os.environ.get("RAY_ADDRESS") or (current.read_text().strip() if current.is_file() else "")
    if not address:
      raise UserError("--ray_address=auto: no running Ray cluster found on this machine; start one (ray start "
                      "--head) or pass --ray_address=host:port")
  host, _, port = address.removeprefix("ray://").rpartition(":")
  if not host or not port.isdigit():
    raise UserError(f"--ray_address={given}: expected host:port (e.g. 127.0.0.1:6379) or auto")
  try:
    socket.create_connection((host, int(port)), timeout=CONNECT_TIMEOUT_S).close()
  except OSError as e:
    raise UserError(f"--ray_address={given}: no Ray cluster answers at {host}:{port} ({e.strerror or e}); start "
                    "one (ray start --head) or fix the address") from None
  return address


def metric_key(metric: str) -> str:
  return f"validation_{metric}"


class TrialTrainable(tune.Trainable):
  """One trial in a Ray worker; step() returns its next validation record (or its end, with done=True)."""

  def setup(self, config):
    self.spec = config["trial"]
    self.key, self.stop_file = metric_key(self.spec["metric"]), Path(self.spec["stop_file"])
    self.tail = trials_lib.MetricsTail(Path(self.spec["dir"]) / trials_lib.METRICS, self.spec["eval"])
    self.pending, self.last = collections.deque(), {self.key: math.nan, "step": 0}
    gpu = self.spec.get("gpu", 0)
    env = {"XLA_PYTHON_CLIENT_PREALLOCATE": "false",
           "XLA_PYTHON_CLIENT_MEM_FRACTION": f"{GPU_MEMORY * gpu:.3f}"} if 0 < gpu < 1 else {}
    self.launch = None if self.stop_file.exists() else trials_lib.Launch(self.spec, env)

  def step(self):
    while self.launch is not None:
      exit_code = self.launch.proc.poll()
      self.pending.extend(self.tail.new())
      if self.pending:
        record = self.pending.popleft()
        self.last = {self.key: record.get(self.spec["metric"], math.nan), "step": record["step"]}
        return dict(self.last)
      if exit_code is None and self.stop_file.exists():
        self.launch.stop()
        exit_code = self.launch.proc.wait()
      if exit_code is not None:
        self.launch.finish(exit_code)
        self.launch = None
        break
      time.sleep(POLL_S)
    return {**self.last, "done": True}

  def cleanup(self):
    if self.launch is None:
      return
    if self.launch.proc.poll() is None:  # stopped by the scheduler (ASHA)
      self.launch.stop()
      self.launch.finish(self.launch.proc.wait(), status="pruned")
    else:  # it ended while Tune still had its records to read (their step comes after its exit): as it ended
      self.launch.finish(self.launch.proc.returncode)


RECORD_WAIT_S = 15  # how long a stopped trial's worker may take to record its end


class _Events(tune.Callback):
  """Tune's trial events -> the sweep's (runs in the driver)."""

  def __init__(self, by_name: dict, events, session_start: float, stop_file: Path):
    self.by_name, self.events, self.session_start, self.stop_file = by_name, events, session_start, stop_file

  def on_trial_start(self, iteration, trials, trial, **info):
    self.events.started(self.by_name[trial.config["trial"]["name"]])

  def _last_launch(self, spec) -> dict | None:
    launches = trials_lib.read_record(spec["dir"]).get("launches", [])
    return launches[-1] if launches and launches[-1]["start"] >= self.session_start else None

  def _ended(self, trial, error: str = ""):
    spec = trial.config["trial"]
    end = self._last_launch(spec)
    # A trial the scheduler (ASHA) stopped completes here while its worker may still be recording 'pruned' (or was
    # killed before it could: its process then got SIGTERM and checkpointed): give the record a moment to land.
    deadline = time.time() + RECORD_WAIT_S
    while end is None and not error and not self.stop_file.exists() and time.time() < deadline:
      time.sleep(POLL_S)
      end = self._last_launch(spec)
    if end is None:  # not recorded yet: stopped, never launched, or finished while its worker was still reporting
      status = "failed" if error else "done" if trials_lib.is_done(spec["dir"]) else (
          "pending" if self.stop_file.exists() else "pruned")
      end = {"status": status, "exit_code": None, "error": error, "wall_s": 0.0}
    self.events.finished(self.by_name[spec["name"]], end)

  def on_trial_complete(self, iteration, trials, trial, **info):
    self._ended(trial)

  def on_trial_error(self, iteration, trials, trial, **info):
    self._ended(trial, f"the Ray task failed ({getattr(trial, 'error_file', None) or 'see the Ray logs'})")


class RayExecutor:
  def __init__(self, address: str, parallel: int = 0):
    """Joins the cluster at `address` now, so a wrong one fails before the sweep touches its workdir."""
    self.parallel = parallel
    address = resolve_address(address)
    env_vars = {k: os.pathsep.join(str(Path(p).absolute()) for p in os.environ[k].split(os.pathsep) if p)
                for k in FORWARDED_ENV if k in os.environ}  # a worker starts elsewhere: PYTHONPATH=. is this cwd
    logging.getLogger("ray").setLevel(logging.ERROR)
    try:
      ray.init(address=address, runtime_env={"env_vars": env_vars} if env_vars else None, log_to_driver=False,
               logging_level=logging.ERROR)
    except Exception as e:  # e.g. a cluster that wants an auth token (RAY_AUTH_MODE=token)
      cause = e.__cause__ or e
      lines = [line.strip() for line in str(cause).splitlines() if line.strip()] or [type(cause).__name__]
      raise UserError(f"--ray_address={address}: cannot join the Ray cluster ({lines[-1][:400]})") from e

  def run(self, sweep: Sweep, workdir: Path, trials: Iterator[Trial], events) -> int | None:
    """Runs a grid as one Tune experiment, a search in rounds of --parallel trials -> the stopping signal or None."""
    workdir = Path(workdir).absolute()
    stop_file = workdir / STOP_FILE
    stop_file.unlink(missing_ok=True)
    stop = []

    def on_signal(signum, _):
      if not stop:
        events.message(f"{signal.Signals(signum).name}: stopping the running trials; each saves a checkpoint first, "
                       "then the same command resumes the sweep")
      stop.append(signum)
      stop_file.touch()

    os.environ["TUNE_DISABLE_SIGINT_HANDLER"] = "1"  # ours: the trials stop through the stop file
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")  # with verbose=0: no experiment tables between our lines
    previous = {s: signal.signal(s, on_signal) for s in trials_lib.STOP_SIGNALS}
    try:
      size = None if sweep.kind == "grid" else max(self.parallel, 1)
      while not stop:
        batch = list(itertools.islice(trials, size))
        if not batch:
          break
        self._fit(sweep, workdir, batch, events, stop_file)
    finally:
      interrupts.restore(previous)
      ray.shutdown()
      stop_file.unlink(missing_ok=True)
    return stop[0] if stop else None

  def _fit(self, sweep: Sweep, workdir: Path, batch: list[Trial], events, stop_file: Path) -> None:
    forwarded = {k: v for k, v in os.environ.items() if k.startswith(FORWARDED_PREFIX)}
    specs = []
    for trial in batch:
      launch = trials_lib.launch_spec(sweep, trial, workdir)
      specs.append({**launch, "env": {**forwarded, **launch["env"]}, "stop_file": str(stop_file),
                    "gpu": sweep.resources.get("gpu", 0)})
    scheduler = None
    if sweep.asha:
      from ray.tune.schedulers import ASHAScheduler
      # time is the training step; a trial ends by itself at its last step, so no max_t unless the file sets one
      scheduler = ASHAScheduler(time_attr="step", **{"max_t": ASHA_MAX_T, **sweep.asha})
    tuner = tune.Tuner(
        tune.with_resources(TrialTrainable, dict(sweep.resources)),
        param_space={"trial": tune.grid_search(specs)},
        tune_config=tune.TuneConfig(metric=metric_key(sweep.metric), mode=sweep.mode, scheduler=scheduler,
                                    max_concurrent_trials=self.parallel or None,
                                    trial_name_creator=lambda t: t.config["trial"]["name"],
                                    trial_dirname_creator=lambda t: t.trial_id),
        run_config=tune.RunConfig(name=f"{sweep.name}_{int(time.time())}", storage_path=str(workdir / "ray"),
                                  verbose=0, failure_config=tune.FailureConfig(max_failures=0),
                                  # the trials checkpoint themselves (main), into their own directories
                                  checkpoint_config=tune.CheckpointConfig(checkpoint_at_end=False),
                                  callbacks=[_Events({t.name: t for t in batch}, events, time.time(), stop_file)]))
    tuner.fit()
