"""Multi-process runs: jax.distributed from explicit flags or the launcher's environment, with every way the
processes can fail to meet turned into one error line instead of a hang or a C++ abort.

One process per host (or per GPU set); process 0 hosts the coordinator. SLURM srun, Open MPI mpirun and
multi-host Cloud TPU slices are detected as jax does; anything else passes --coordinator_address,
--num_processes and --process_id (bigmodel_jax/main.py defines the flags).
"""

import contextlib
import errno
import os
import socket
import sys
import tempfile
import threading
import zlib

from absl import logging

from bigmodel_jax.errors import UserError


def started() -> bool:
  if "jax" not in sys.modules:
    return False
  import jax
  return jax.distributed.is_initialized()


def cluster_launch() -> str | None:
  """The multi-process launcher jax.distributed.initialize() detects from the environment, if any.

  Mirrors jax._src.clusters (Open MPI first, then SLURM, then Cloud TPU), but only where more than one process
  was started: e.g. a SLURM batch script with one task trains alone, without waiting for a coordinator.
  """
  env = os.environ
  def count(*names):
    return next((int(env[n]) for n in names if env.get(n, "").isdigit()), 1)
  flags_hint = "pass --coordinator_address, --num_processes and --process_id instead"
  if count("OMPI_COMM_WORLD_SIZE") > 1:
    if "OMPI_MCA_orte_hnp_uri" not in env:  # jax reads the coordinator from it; Open MPI 5 no longer sets it
      raise UserError(f"Open MPI started {count('OMPI_COMM_WORLD_SIZE')} processes but jax finds its coordinator "
                      f"only under Open MPI <= 4 (OMPI_MCA_orte_hnp_uri is unset); {flags_hint}")
    return f"Open MPI ({count('OMPI_COMM_WORLD_SIZE')} processes)"
  tasks = count("SLURM_STEP_NUM_TASKS", "SLURM_NTASKS")
  if tasks > 1 and "SLURM_PROCID" in env:
    missing = [n for n in ("SLURM_JOB_ID", "SLURM_STEP_NODELIST", "SLURM_NTASKS", "SLURM_LOCALID") if n not in env]
    if missing:
      raise UserError(f"SLURM runs {tasks} tasks but {', '.join(missing)} is unset, which jax needs to find the "
                      f"coordinator; start the tasks with srun, or {flags_hint}")
    return f"SLURM ({tasks} tasks)"
  hosts = [h for h in (env.get("TPU_PROCESS_ADDRESSES") or env.get("TPU_WORKER_HOSTNAMES") or "").split(",") if h]
  slices = count("MEGASCALE_NUM_SLICES")
  if len(hosts) > 1 or slices > 1:
    return f"Cloud TPU ({len(hosts) or 1} hosts x {slices} slices)"
  return None


def distributed_setup(coordinator_address: str | None, num_processes: int | None, process_id: int | None,
                      timeout: int) -> tuple[str, dict] | None:
  """(how, jax.distributed.initialize kwargs) from the flags or the launcher's environment; None: one process."""
  given = {"--coordinator_address": coordinator_address, "--num_processes": num_processes,
           "--process_id": process_id}
  if timeout < 1:
    raise UserError(f"--distributed_timeout: {timeout} must be >= 1 (seconds to wait for every process to join)")
  if all(v is None for v in given.values()):
    launcher = cluster_launch()
    return (launcher, {}) if launcher else None
  missing = [k for k, v in given.items() if v is None]
  if missing:
    named = " and ".join(k for k, v in given.items() if v is not None)
    raise UserError(f"{named} given without {' and '.join(missing)}; a multi-process run needs all three, e.g. "
                    "--coordinator_address=host0:1234 --num_processes=2 --process_id=0 (then 1 on the other host)")
  address, n, i = given.values()
  if n < 1:
    raise UserError(f"--num_processes: {n} must be >= 1 (the number of processes, one per host)")
  if not 0 <= i < n:
    raise UserError(f"--process_id: {i} is out of range for --num_processes={n}; use 0..{n - 1}, one per process")
  host, _, port = address.rpartition(":")
  if not host or not port.isdigit() or not 0 < int(port) < 65536:
    raise UserError(f"--coordinator_address: {address!r} is not HOST:PORT (e.g. 10.0.0.1:1234, process 0's host)")
  if i == 0:
    check_port_free(int(port))
  return (f"--coordinator_address={address} (process {i} of {n})",
          {"coordinator_address": address, "num_processes": n, "process_id": i})


def check_port_free(port: int) -> None:
  """Process 0 serves the coordinator on every interface at `port` (jax's default bind address); a port in use
  makes jax crash with a segfault, so say it first."""
  for family, host in ((socket.AF_INET6, "::"), (socket.AF_INET, "0.0.0.0")):
    with socket.socket(family, socket.SOCK_STREAM) as probe:
      probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as gRPC does: a TIME_WAIT port is free
      try:
        probe.bind((host, port))
        return
      except OSError as e:
        if e.errno == errno.EADDRNOTAVAIL and family == socket.AF_INET6:
          continue  # no IPv6 here: jax falls back to IPv4 too
        raise UserError(f"--coordinator_address: process 0 cannot listen on port {port} ({e.strerror}); pick a "
                        "free port, the same on every process") from None


def initialize(setup: tuple[str, dict] | None, config, timeout: int, run_flags: str) -> None:
  """jax.distributed.initialize (for distributed_setup()'s answer) before anything touches a JAX backend.

  jax aborts the process from C++ (or waits on) when processes are missing, so a watchdog thread turns an
  incomplete join into one error line; a collective then checks that every process got the same flags.
  """
  if setup is None:
    logging.debug("single process (no --coordinator_address, no multi-process launcher detected)")
    return
  import jax
  how, kwargs = setup
  n = kwargs.get("num_processes")
  if kwargs:
    start = (f"start {n} processes, --process_id=0..{n - 1}, each with the same --num_processes={n} and "
             f"--coordinator_address (process 0's host:port, reachable from every host)")
    message = (f"--num_processes/--coordinator_address: not all {n} processes joined the coordinator at "
               f"{kwargs['coordinator_address']} within {timeout} s (--distributed_timeout); {start}")
  else:
    message = (f"{how}: not every process joined within {timeout} s (--distributed_timeout); check that each task "
               "runs this same command, or pass --coordinator_address, --num_processes and --process_id")
  watchdog = threading.Timer(timeout, lambda: _joined_too_late(message, kwargs.get("coordinator_address")))
  watchdog.daemon = True
  logging.info("multi-process run via %s: connecting (waiting up to %d s for every process)", how, timeout)
  watchdog.start()
  try:
    # jax's own limit comes later than the watchdog: when it passes, jax ends the process without a word
    jax.distributed.initialize(**kwargs, initialization_timeout=timeout + 60)
    jax.devices()  # the backend gathers every process's devices: a process that thinks there are more waits here
    mismatch = check_same_flags(config, n or jax.process_count(), run_flags)
  except UserError:
    raise
  except Exception as e:
    lines = [line for line in str(e).strip().splitlines() if line.strip()] or [type(e).__name__]
    raise UserError(f"{message} ({type(e).__name__}: {lines[0][:200]})") from None
  finally:
    watchdog.cancel()
  if mismatch:
    raise UserError(mismatch)
  logging.info("process %d of %d, %d local devices (%s), %d devices in all", jax.process_index(),
               jax.process_count(), jax.local_device_count(), jax.local_devices()[0].platform, jax.device_count())
  # Native collectives (gloo on CPU) print to file descriptor 1 whenever they connect a new device group; stdout
  # is for the run's summary alone, so fd 1 now leads to stderr and Python's stdout keeps the original stream.
  sys.stdout.flush()
  summary_fd = os.dup(1)
  os.dup2(2, 1)
  sys.stdout = os.fdopen(summary_fd, "w", buffering=1)


def _joined_too_late(message: str, address: str | None) -> None:
  if address:
    host = address.rpartition(":")[0].strip("[]")
    try:
      socket.getaddrinfo(host, None)
    except OSError:
      message = f"--coordinator_address: host {host!r} does not resolve; use process 0's host name or IP address"
  sys.stderr.write(f"error: {message}\n")  # one write: no other thread's output lands between it and its newline
  sys.stderr.flush()
  sys.stdout.flush()
  os._exit(2)


@contextlib.contextmanager
def _stdout_to_log():
  """What native code writes to file descriptor 1 meanwhile becomes INFO log lines."""
  sys.stdout.flush()
  saved = os.dup(1)
  with tempfile.TemporaryFile() as captured:
    os.dup2(captured.fileno(), 1)
    try:
      yield
    finally:
      os.dup2(saved, 1)
      os.close(saved)
      captured.seek(0)
      for line in captured.read().decode(errors="replace").splitlines():
        if line.strip():
          logging.info("%s", line)


def check_same_flags(config, num_processes: int, run_flags: str) -> str | None:
  """All processes compare --num_processes, the resolved config and the mode: a message if they differ."""
  import jax
  import numpy as np
  from jax.experimental import multihost_utils

  def crc(text: str) -> int:
    return zlib.crc32(text.encode()) & 0x7FFFFFFF  # int32: jax runs without x64
  mine = np.array([num_processes, crc(config.to_json_best_effort(sort_keys=True)),
                   crc(run_flags)], np.int32)
  with _stdout_to_log():  # the first collective connects gloo (CPU), which prints to stdout, where the summary goes
    every = multihost_utils.process_allgather(mine, tiled=False)  # [process, 3]
  if len(set(every[:, 0])) > 1 or every[0, 0] != jax.process_count():
    values = ", ".join(f"process {p}: {v}" for p, v in enumerate(every[:, 0]))
    n = every[0, 0]
    return (f"--num_processes: the processes were started with different values ({values}); process 0 (the "
            f"coordinator) expects {n}: start {n} processes, each with --num_processes={n} and the same "
            "--coordinator_address")
  for column, what in ((1, "--config (file or overrides)"), (2, "--mode/--checkpoint_step")):
    differ = [p for p, v in enumerate(every[:, column]) if v != every[0, column]]
    if differ:
      return (f"{what}: process {differ[0]} was started with a different value than process 0; start every "
              "process with the same flags (only --process_id differs)")
  return None


def chief_decides(message: str, max_bytes: int = 2048) -> str:
  """Process 0's `message` on every process ('' = go on). A check only process 0 makes (its lock, its files)
  must stop the others too, or they wait for it in their next collective until jax's heartbeat timeout."""
  import jax
  import numpy as np
  from jax.experimental import multihost_utils
  if jax.process_count() == 1:
    return message
  raw = message.encode()[:max_bytes]
  buffer = np.zeros(max_bytes, np.uint8)
  buffer[:len(raw)] = np.frombuffer(raw, np.uint8)
  out = np.asarray(multihost_utils.broadcast_one_to_all(buffer))
  return bytes(out).rstrip(b"\0").decode(errors="replace")
