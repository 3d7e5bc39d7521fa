"""Two real processes (1 CPU device each) joined by jax.distributed train, checkpoint and resume like one
process with 2 devices; bad multi-process flags end with one error line, never a hang."""

import json
import shutil
import socket
import re
import time
from concurrent.futures import ThreadPoolExecutor

import portpicker
import pytest

from conftest import error_lines

ARGS = ["--config=configs/digits_mlp.py:smoke", "--config.model.dropout_rate=0.0", "--config.train.log_every=4",
        "--config.train.steps_per_call=10"]  # stacked batches across processes, the sync point counting calls
ONE_DEVICE = {"XLA_FLAGS": ""}  # each process of a multi-process run: one CPU device
TWO_DEVICES = {"XLA_FLAGS": "--xla_force_host_platform_device_count=2"}
TIMEOUT = 240  # per group of processes; a hang fails the test instead of stalling the suite


def run_together(cli, commands: list[tuple[list[str], dict]], timeout: float = TIMEOUT) -> list:
  """Runs every (args, env) at once, each killed after `timeout` s (which fails the test): [CompletedProcess]."""
  with ThreadPoolExecutor(len(commands)) as pool:
    futures = [pool.submit(cli, *args, env={**ONE_DEVICE, **env}, timeout=timeout) for args, env in commands]
    return [f.result() for f in futures]


def distributed(port: int, num_processes: int, process_id: int, timeout: int = 60) -> list[str]:
  return [f"--coordinator_address=127.0.0.1:{port}", f"--num_processes={num_processes}", f"--process_id={process_id}",
          f"--distributed_timeout={timeout}"]


def train_losses(workdir):
  lines = [json.loads(l) for l in (workdir / "metrics.jsonl").read_text().splitlines()]
  return [(r["step"], r["loss"]) for r in lines if r["split"] == "train"]


def final(workdir) -> dict:
  return json.loads((workdir / "final_metrics.json").read_text())


def assert_one_error(proc, *needles: str) -> str:
  assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
  lines = error_lines(proc.stderr)
  assert len(lines) == 1 and lines[0].startswith("error:"), lines
  for needle in needles:
    assert needle in lines[0], (needle, lines[0])
  assert proc.returncode == 2, (proc.returncode, lines[0])
  assert not proc.stdout.strip(), proc.stdout
  return lines[0]


@pytest.fixture(scope="module")
def runs(cli, tmp_path_factory):
  """digits_mlp:smoke (80 steps) by two processes into one workdir, and by one process with two devices."""
  base = tmp_path_factory.mktemp("multihost")
  port = portpicker.pick_unused_port()
  results = run_together(cli, [
      ([*ARGS, f"--workdir={base / 'two'}", *distributed(port, 2, 0)], {}),
      ([*ARGS, f"--workdir={base / 'two'}", *distributed(port, 2, 1)], {}),
      ([*ARGS, f"--workdir={base / 'one'}"], TWO_DEVICES)])
  for proc in results:
    assert proc.returncode == 0, proc.stderr[-3000:]
  return base, results


def test_two_processes_match_one_process(runs):
  base, results = runs
  two, one = base / "two", base / "one"
  # the gradient all-reduce sums two values: the same in any order, so the parameters are bit-identical
  assert final(two)["params_sha256"] == final(one)["params_sha256"]
  assert train_losses(two) == train_losses(one)
  assert final(two) == final(one)
  # both processes print the summary (stdout holds only it); process 1 computed the same fingerprint
  summary = without_matrices(final(one))
  assert [json.loads(p.stdout) for p in results] == [summary] * 3
  assert all(f"process {i} of 2, 1 local devices" in p.stderr for i, p in enumerate(results[:2]))


def without_matrices(record):
  if isinstance(record, dict):
    return {k: without_matrices(v) for k, v in record.items() if k != "confusion_matrix"}
  return record


def test_only_process_0_writes_records(runs):
  base, _ = runs
  two = base / "two"
  records = [json.loads(l) for l in (two / "metrics.jsonl").read_text().splitlines()]
  keys = [(r["step"], r["split"]) for r in records]
  assert len(keys) == len(set(keys)), "a record was written twice"
  info = [json.loads(l) for l in (two / "run_info.jsonl").read_text().splitlines()]
  assert len(info) == 1 and info[0]["process_index"] == 0 and info[0]["process_count"] == 2
  assert len(info[0]["devices"]) == 2 and len(info[0]["local_devices"]) == 1
  assert sorted(p.name for p in (two / "checkpoints").iterdir() if p.name.isdigit()) == ["40", "80"]


def test_one_process_evaluates_and_two_resume_the_checkpoint(runs, cli, tmp_path):
  """--mode=eval on one process restores the two-process checkpoint. Two processes started by a (simulated)
  SLURM srun, with no distributed flags, resume it collectively onto an FSDP mesh (parameters sharded across the
  processes), fed from the host where the run was fed on the devices (config.data.on_device), and end where one
  process with two devices ends from its own checkpoint."""
  base, _ = runs
  resumed, reference = tmp_path / "resumed", tmp_path / "reference"
  shutil.copytree(base / "two", resumed)
  shutil.copytree(base / "one", reference)
  longer = [*ARGS, "--config.train.num_steps=100", "--config.train.allow_config_change=true",
            "--config.mesh.data=1", "--config.mesh.fsdp=2"]
  slurm = {"SLURM_JOB_ID": "7", "SLURM_STEP_NODELIST": "127.0.0.1", "SLURM_NTASKS": "2",
           "SLURM_STEP_NUM_TASKS": "2", "JAX_COORDINATOR_PORT": str(portpicker.pick_unused_port())}
  host_fed = [*longer, "--config.data.on_device=false"]  # the checkpoint's run gathered its batches on the devices
  results = run_together(cli, [
      (["--mode=eval", f"--workdir={base / 'two'}"], {}),
      ([*host_fed, f"--workdir={resumed}"], {**slurm, "SLURM_PROCID": "0", "SLURM_LOCALID": "0"}),
      ([*host_fed, f"--workdir={resumed}"], {**slurm, "SLURM_PROCID": "1", "SLURM_LOCALID": "1"}),
      ([*longer, f"--workdir={reference}"], TWO_DEVICES)])
  for proc in results:
    assert proc.returncode == 0, proc.stderr[-3000:]
  evaluated = json.loads((base / "two" / "eval_step80.json").read_text())["test"]
  trained = final(base / "two")["test"]
  assert evaluated["accuracy"] == trained["accuracy"]
  assert abs(evaluated["loss"] - trained["loss"]) <= 1e-6  # 1 device sums the batch in another order than 2
  for i, proc in enumerate(results[1:3]):
    assert "multi-process run via SLURM (2 tasks)" in proc.stderr and f"process {i} of 2" in proc.stderr
    assert "resumed from checkpoint at step 80" in proc.stderr
    # the fingerprint gathers the sharded parameters from both processes: both print the same one
    assert json.loads(proc.stdout)["params_sha256"] == final(reference)["params_sha256"]
  assert final(resumed)["step"] == 100 and final(resumed) == final(reference)
  assert train_losses(resumed) == train_losses(reference)


# --- bad input: one 'error:' line, exit 2, no traceback, no hang -------------------------------------------

def test_bad_distributed_flags(cli, tmp_path):
  busy = socket.socket(socket.AF_INET)  # process 0 would serve the coordinator on this port: taken
  busy.bind(("0.0.0.0", 0))
  busy.listen()
  cases = [
      (distributed(1234, 2, 2), ["--process_id", "out of range", "0..1"]),
      (distributed(1234, 0, 0), ["--num_processes", ">= 1"]),
      (["--num_processes=2"], ["--num_processes given without --coordinator_address and --process_id"]),
      (distributed(1234, 2, 0)[1:] + ["--coordinator_address=localhost"], ["--coordinator_address", "HOST:PORT"]),
      (distributed(busy.getsockname()[1], 2, 0), ["--coordinator_address", "cannot listen on port"]),
      ([*distributed(1234, 2, 0), "--distributed_timeout=0"], ["--distributed_timeout", ">= 1"]),
  ]
  try:
    results = run_together(cli, [([*ARGS, f"--workdir={tmp_path / str(i)}", *flags], {})
                                 for i, (flags, _) in enumerate(cases)])
  finally:
    busy.close()
  for (flags, needles), proc in zip(cases, results):
    assert_one_error(proc, *needles)
  assert not any(tmp_path.iterdir()), "a refused run left files behind"


def test_missing_or_mismatched_processes(cli, tmp_path):
  """3 expected but 2 started: both give up after --distributed_timeout. Started with different
  --num_processes (2 and 3), or different configs: every process says so."""
  short, mismatched, other_config = (portpicker.pick_unused_port() for _ in range(3))
  cases = [
      (distributed(short, 3, 0, timeout=5), "not all 3 processes joined"),
      (distributed(short, 3, 1, timeout=5), "not all 3 processes joined"),
      (distributed(mismatched, 2, 0), "different values (process 0: 2, process 1: 3); process 0 (the coordinator) "
                                      "expects 2: start 2 processes, each with --num_processes=2"),
      (distributed(mismatched, 3, 1), "different values (process 0: 2, process 1: 3)"),
      (distributed(other_config, 2, 0), "--config (file or overrides): process 1"),
      ([*distributed(other_config, 2, 1), "--config.optimizer.learning_rate=0.1"], "--config (file or overrides)"),
  ]
  started = time.time()
  results = run_together(cli, [([*ARGS, f"--workdir={tmp_path / str(i)}", *flags], {})
                               for i, (flags, _) in enumerate(cases)], timeout=120)
  for (flags, needle), proc in zip(cases, results):
    line = assert_one_error(proc, needle)
    if "not all" in needle:
      assert "--num_processes/--coordinator_address" in line and "within 5 s (--distributed_timeout)" in line
  assert time.time() - started < 60  # the watchdog's 5 s, not jax's own limit (65 s), then a C++ abort


def test_a_refusal_by_process_0_stops_every_process(cli, tmp_path):
  """Only process 0 takes the workdir lock: when it is held, both processes say so, none hangs."""
  import fcntl
  tmp_path.mkdir(exist_ok=True)
  with open(tmp_path / ".train.lock", "a+") as held:
    fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
    port = portpicker.pick_unused_port()
    results = run_together(cli, [([*ARGS, f"--workdir={tmp_path}", *distributed(port, 2, i)], {}) for i in (0, 1)],
                           timeout=120)
  for proc in results:
    assert_one_error(proc, "--workdir", "in use by another training run")


def test_sigterm_to_one_process_checkpoints_all_at_one_step(cli, tmp_path):
  """A preemption notice reaching one process: both save the same step and exit 143; the run resumes."""
  import signal
  port = portpicker.pick_unused_port()
  long_run = [*ARGS, "--config.train.num_steps=100000", f"--workdir={tmp_path}"]
  procs = [cli(*long_run, *distributed(port, 2, i), env=ONE_DEVICE, popen=True) for i in (0, 1)]
  try:
    deadline = time.time() + 120
    while not (tmp_path / "metrics.jsonl").exists() or "train" not in (tmp_path / "metrics.jsonl").read_text():
      assert time.time() < deadline and all(p.poll() is None for p in procs)
      time.sleep(0.2)
    procs[1].send_signal(signal.SIGTERM)
    outputs = [p.communicate(timeout=120)[0] for p in procs]
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
  assert [p.returncode for p in procs] == [143, 143], outputs[0][-2000:] + outputs[1][-2000:]
  saved = [re.search(r"error: SIGTERM: saved a checkpoint at step (\d+)", out).group(1) for out in outputs]
  assert saved[0] == saved[1]
  # the newest checkpoint is the stop step (an epoch-end one may precede it when the notice comes later)
  assert max(int(p.name) for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit()) == int(saved[0])
