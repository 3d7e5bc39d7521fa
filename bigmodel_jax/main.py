"""Entry point: python -m bigmodel_jax.main --config=configs/x.py[:variant] --workdir=DIR [--mode=...]

Multi-host: start the same command once per host, adding --coordinator_address=HOST0:PORT --num_processes=N
--process_id=I (or nothing under SLURM srun, Open MPI mpirun or a multi-host Cloud TPU slice on GKE/multislice:
jax finds those itself); every process trains on its rows of each global batch, process 0 writes the records.

Bad input of any kind ends with one line on stderr naming the field or file and what to do, and a
non-zero exit: 2 for bad input, 3 for a non-finite loss, 143 after a SIGTERM checkpoint.
"""

import contextlib
import errno
import json
import logging as std_logging
import os
import re
import socket
import sys
import tempfile
import threading
import zlib
from pathlib import Path

from absl import app, flags, logging
from ml_collections import config_flags

from bigmodel_jax.errors import NonFiniteLossError, UserError

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Experiment config file, e.g. configs/mnist_cnn.py or configs/mnist_cnn.py:smoke.",
    lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and run records.")
_MODE = flags.DEFINE_enum("mode", "train", ["train", "eval", "predict", "sample"],
                          "train (resumes if the workdir has checkpoints); eval, predict or sample (language "
                          "models: generate text, see config.sample) on a checkpoint.")
_CHECKPOINT_STEP = flags.DEFINE_integer("checkpoint_step", None,
                                        "eval/predict/sample: checkpoint step (default latest).")

_COORDINATOR = flags.DEFINE_string(
    "coordinator_address", None, "Multi-host: HOST:PORT where process 0 serves the coordinator, reachable from "
    "every host; with --num_processes and --process_id (SLURM, Open MPI and multi-host TPU slices need none).")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None,
                                      "Multi-host: how many processes the run has; start each with the same flags.")
_PROCESS_ID = flags.DEFINE_integer("process_id", None,
                                   "Multi-host: this process's index, 0..num_processes-1 (0 hosts the coordinator).")
_DISTRIBUTED_TIMEOUT = flags.DEFINE_integer("distributed_timeout", 300,
                                            "Multi-host: seconds to wait for every process to join.")

CACHE_DIR_ENV = "BIGMODEL_JAX_CACHE_DIR"
# After an error in a multi-process run, how long to wait at jax's exit barrier for the others: enough for
# processes failing together to leave together, short enough not to hang beside ones still training.
EXIT_BARRIER_S = 10


def fail(message: str, code: int = 2):
  print(f"error: {message}", file=sys.stderr, flush=True)
  # The error is said. What libraries print while the process winds down after it (e.g. tensorstore reads
  # of an unreadable checkpoint still finishing) would only bury that line.
  devnull = os.open(os.devnull, os.O_WRONLY)
  os.dup2(devnull, 2)
  if _distributed_started():
    _exit_after(EXIT_BARRIER_S, code)
  sys.exit(code)


def _exit_after(seconds: float, code: int) -> None:
  """Ends the process with `code` after `seconds`, whatever the main thread is blocked in (a daemon timer)."""
  def exit_now():
    sys.stdout.flush()
    os._exit(code)
  timer = threading.Timer(seconds, exit_now)
  timer.daemon = True
  timer.start()


def config_error(e: Exception, argv: list[str]) -> str:
  """One line for anything config_flags raises while loading the file or applying an override."""
  text = " ".join(str(a) for a in e.args) if e.args else repr(e)
  text = text.replace("\\n", "\n").replace("\\'", "'")
  path = next((a.split("=", 1)[1] for a in argv if a.startswith("--config=")), "?").split(":")[0]
  suggestion = re.search(r"'(\w+)'.*Did you mean \"(\w+)\"", text, re.S)
  if suggestion:
    field, close = suggestion.groups()
    flag = next((a.split("=")[0] for a in argv if a.startswith("--config.") and
                 re.search(rf"\.{field}(\.|=|$)", a.split("=")[0])), f"--config...{field}")
    return f"{flag}: no such config field (did you mean {close!r}?)"
  if isinstance(e, SyntaxError):
    return f"--config: {path}, line {e.lineno}: syntax error ({e.msg})"
  if isinstance(e, OSError) and "Failed loading config file" in text:
    return f"--config: cannot read config file {path!r} (no such file?); pass a path like configs/mnist_cnn.py"
  if isinstance(e, AttributeError) and "get_config" in text:
    return f"--config: {path} has no get_config() function; a config file defines get_config(arg)"
  lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
  return f"--config: {path}: {type(e).__name__}: {lines[-1] if lines else text}"


def parse_flags(argv: list[str]) -> list[str]:
  """absl flag parsing, with every failure (bad override, bad type, missing file) turned into one line."""
  try:
    return flags.FLAGS(argv)
  except flags.Error as e:
    lines = [line.strip() for line in str(e).strip().splitlines() if line.strip()]
    override = next((a.split("=")[0] for a in argv if a.startswith("--config.")), None)
    if override and not any(a.startswith("--config=") or a == "--config" for a in argv):
      fail(f"{override}: overrides need the config file too; add --config=configs/<experiment>.py (the run's "
           "config is in <workdir>/config.json)")
    if "Traceback" in str(e):  # an exception inside the config file: its last line says what
      fail(f"{lines[0].split(': Error whilst')[0]}: {lines[-1]}")
    fail(f"{lines[0]}; see --helpfull")
  except Exception as e:  # config_flags raises KeyError/AttributeError/OSError/... from the config file
    fail(config_error(e, argv))


class _QuietLibraries(std_logging.Filter):
  """orbax and grain log every save and thread at INFO; keep their warnings, drop the chatter."""

  def filter(self, record):
    noisy = any(part in record.pathname for part in ("/orbax/", "/grain/", "/jax/_src/"))
    if noisy and "did not provide metrics" in record.getMessage():
      return False  # orbax warns on every save between evals; those checkpoints are kept as 'latest'
    return record.levelno >= std_logging.WARNING or not noisy


def setup_jax(config) -> None:
  import jax
  if config.train.compilation_cache:
    cache = os.environ.get(CACHE_DIR_ENV) or str(Path.home() / ".cache" / "bigmodel_jax" / "jax_cache")
    jax.config.update("jax_compilation_cache_dir", cache)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


def _distributed_started() -> bool:
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


def distributed_setup() -> tuple[str, dict] | None:
  """(how, jax.distributed.initialize kwargs) from the flags or the launcher's environment; None: one process."""
  given = {"--coordinator_address": _COORDINATOR.value, "--num_processes": _NUM_PROCESSES.value,
           "--process_id": _PROCESS_ID.value}
  timeout = _DISTRIBUTED_TIMEOUT.value
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


def initialize_distributed(setup: tuple[str, dict] | None, config) -> None:
  """jax.distributed.initialize (for distributed_setup()'s answer) before anything touches a JAX backend.

  jax aborts the process from C++ (or waits on) when processes are missing, so a watchdog thread turns an
  incomplete join into one error line; a collective then checks that every process got the same flags.
  """
  if setup is None:
    logging.info("single process (no --coordinator_address, no multi-process launcher detected)")
    return
  import jax
  how, kwargs = setup
  timeout = _DISTRIBUTED_TIMEOUT.value
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
    mismatch = check_same_flags(config, n or jax.process_count())
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


def _joined_too_late(message: str, address: str | None) -> None:
  if address:
    host = address.rpartition(":")[0].strip("[]")
    try:
      socket.getaddrinfo(host, None)
    except OSError:
      message = f"--coordinator_address: host {host!r} does not resolve; use process 0's host name or IP address"
  print(f"error: {message}", file=sys.stderr, flush=True)
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


def check_same_flags(config, num_processes: int) -> str | None:
  """All processes compare --num_processes, the resolved config and the mode: a message if they differ."""
  import jax
  import numpy as np
  from jax.experimental import multihost_utils

  def crc(text: str) -> int:
    return zlib.crc32(text.encode()) & 0x7FFFFFFF  # int32: jax runs without x64
  mine = np.array([num_processes, crc(config.to_json_best_effort(sort_keys=True)),
                   crc(f"{_MODE.value} {_CHECKPOINT_STEP.value}")], np.int32)
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


def load_config(workdir: Path):
  """--config if given; in eval/predict mode, else the config saved in the workdir."""
  try:
    config = _CONFIG.value  # config_flags loads the file lazily; a failed load raises on first use
    if config is not None:
      config.keys()
    elif _CONFIG.present:  # the file loaded, but its get_config returned None
      path = config_flags.get_config_filename(flags.FLAGS["config"])
      fail(f"--config: get_config() in {path} returned None; it must return a ConfigDict")
  except Exception as e:
    fail(config_error(e.__cause__ or e, sys.argv))
  if config is not None:
    return config
  if _MODE.value != "train":
    import ml_collections
    from bigmodel_jax.train import saved_config
    saved = saved_config(workdir)  # a UserError if it is not valid JSON
    if saved is None:
      fail(f"--workdir: no config.json in {workdir}; fix the path, or pass --config")
    return ml_collections.ConfigDict(saved)
  fail("--config is required (e.g. --config=configs/mnist_cnn.py)")


def main(argv):
  if len(argv) > 1:
    fail(f"unexpected arguments {argv[1:]}; flags look like --config.optimizer.learning_rate=1e-3")
  if _WORKDIR.value is None:
    fail("--workdir is required (where checkpoints and metrics go)")
  logging.get_absl_handler().addFilter(_QuietLibraries())
  try:
    setup = distributed_setup()  # before the slow imports: bad multi-process flags fail at once
  except UserError as e:
    fail(str(e))
  from bigmodel_jax import config as config_lib, evaluate, sample, train
  workdir = Path(_WORKDIR.value)
  if _MODE.value == "train" and _CHECKPOINT_STEP.value is not None:
    fail("--checkpoint_step is for --mode=eval/predict/sample; training always resumes from the latest checkpoint")
  try:
    config = load_config(workdir)  # first: a typo fails at once, not after waiting for the other processes
    initialize_distributed(setup, config)  # before anything below touches a JAX backend (validate counts devices)
    if _MODE.value != "train" and "mesh" in config:
      refitted = config_lib.fit_mesh(config)  # e.g. a pod run's checkpoint evaluated on a laptop
      if refitted:
        logging.warning("%s", refitted)
    config_lib.validate(config)
    setup_jax(config)
    if _MODE.value == "train":
      result = train.train_and_evaluate(config, workdir)
    elif not (workdir / "checkpoints").is_dir():
      raise UserError(f"--workdir: no checkpoints in {workdir}; train first (--mode=train) or fix the path")
    else:
      run = train.build_run(config, workdir, for_training=False, need_data=_MODE.value != "sample")
      try:
        entry = {"eval": evaluate.eval_only, "predict": evaluate.predict, "sample": sample.sample}[_MODE.value]
        result = entry(run, _CHECKPOINT_STEP.value)
      finally:
        run.checkpointer.close()
        run.writer.close()
  except NonFiniteLossError as e:
    fail(str(e), code=3)
  except UserError as e:
    fail(str(e))
  except train.Preempted as e:
    signum, message = e.args
    fail(message, code=128 + signum)
  except KeyboardInterrupt:
    fail("interrupted before training started; nothing was saved" if _MODE.value == "train"
         else f"--mode={_MODE.value} interrupted; its outputs may be incomplete", code=130)
  if _MODE.value == "sample":
    print(sample.SEPARATOR.join(result["texts"]), flush=True)
    return
  summary = {k: v for k, v in result.items() if k != "confusion_matrix"}
  print(json.dumps(summary, indent=2), flush=True)


def run():
  """Console script `bigmodel-jax`."""
  app.run(main, flags_parser=parse_flags)


if __name__ == "__main__":
  run()
