"""The Ray executor against a real local Ray instance (started here on 127.0.0.1, 2 CPUs, no dashboard)."""

import csv
import importlib.util
import json
import os
import subprocess
import sys

import pytest

from test_sweep import FIXED, ROOT, run_sweep, sweep_env, trial_dirs, write  # noqa: F401 (sweep_env is a fixture)

# not imported here: only the Ray head and the sweep's own process load Ray
pytestmark = pytest.mark.skipif(importlib.util.find_spec("ray") is None, reason="ray is not installed")

# a light local instance: no token auth, usage stats or memory monitor
RAY_ENV = {"RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0", "RAY_memory_monitor_refresh_ms": "0"}
# No ASHA here: which trial it stops, and when, depends on timing (see the README); this checks the executor itself.
SWEEP = FIXED + '''resources = {"cpu": 1}
def sweep():
  yield {"optimizer.learning_rate": 3e-3}
  yield {"optimizer.learning_rate": 1e-5}
'''


# The instance lives in a process of its own (the test process never holds a Ray driver or its threads): it prints
# its address, and shuts down when its stdin closes.
RAY_HEAD = """
import sys, ray
context = ray.init(num_cpus=2, include_dashboard=False, _node_ip_address="127.0.0.1",
                   object_store_memory=100 * 1024 * 1024)
print("127.0.0.1:" + context.address_info["gcs_address"].rsplit(":", 1)[1], flush=True)
sys.stdin.read()
ray.shutdown()
"""


@pytest.fixture(scope="module")
def ray_address():
  head = subprocess.Popen([sys.executable, "-c", RAY_HEAD], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                          text=True, env={**os.environ, **RAY_ENV})
  try:
    address = head.stdout.readline().strip()
    assert address.startswith("127.0.0.1:"), f"the Ray head did not start (exit {head.poll()})"
    yield address
  finally:
    head.stdin.close()
    try:
      head.wait(timeout=60)
    except subprocess.TimeoutExpired:
      head.kill()


def test_ray_tune_runs_the_trials_and_streams_their_validation_metrics(ray_address, sweep_env, tmp_path):
  workdir = tmp_path / "out"
  proc = run_sweep({**sweep_env, **RAY_ENV}, write(tmp_path / "ray_sweep.py", SWEEP), f"--workdir={workdir}",
                   "--executor=ray", f"--ray_address={ray_address}")
  assert proc.returncode == 0, proc.stderr[-3000:]
  with open(workdir / "results.csv") as f:
    rows = {row["trial"]: row for row in csv.DictReader(f)}
  assert set(rows) == {"learning_rate=0.003", "learning_rate=1e-05"}
  assert {row["status"] for row in rows.values()} == {"done"}
  for d in trial_dirs(workdir):
    launches = json.loads((d / "sweep_trial.json").read_text())["launches"]
    records = (d / "metrics.jsonl").read_text().splitlines()
    validation = [r["accuracy"] for r in map(json.loads, records) if r.get("eval") == "validation"]
    assert launches[-1]["status"] == "done" and launches[-1]["exit_code"] == 0 and len(validation) == 3
    # every validation record reached Tune as a result, as it appeared (the last result repeats the last one)
    reported = {}
    for path in (workdir / "ray").glob("*/*/result.json"):
      for result in map(json.loads, path.read_text().splitlines()):
        if result["config"]["trial"]["name"] == d.name:
          reported.setdefault(result["step"], result["validation_accuracy"])
    assert list(reported.values()) == validation


CLEANUP = """
import json, sys, types
from pathlib import Path
from bigmodel_jax.sweeps import ray_tune, trials
from bigmodel_jax.sweeps.ray_tune import TrialTrainable
directory = Path(sys.argv[1])
write_final = "import json, sys; json.dump(dict(step=5), open(sys.argv[1], 'w'))"
spec = {"name": "t", "overrides": {}, "dir": str(directory), "env": {},
        "argv": ["-c", write_final, str(directory / "final_metrics.json")]}
trainable = types.SimpleNamespace(launch=trials.Launch(spec))
trainable.launch.proc.wait()
ray_tune.RECORD_WAIT_S, ended = 0.5, []
callback = ray_tune._Events({"t": "t"}, types.SimpleNamespace(finished=lambda trial, end: ended.append(end["status"])),
                            0.0, directory / ".stop")
callback._ended(types.SimpleNamespace(config={"trial": spec}))  # Tune's end of the trial, before its worker's
TrialTrainable.cleanup(trainable)
print(json.dumps({"sweep": ended, "launches": trials.read_record(directory).get("launches")}))
"""


def test_a_trial_that_finished_before_the_scheduler_stopped_it_is_recorded_done(sweep_env, tmp_path):
  """ASHA may stop a trial whose process has already ended (Tune reads its validation records after the fact), and
  its worker, busy reporting them, records its end late: that end was never recorded, and the sweep marked the
  finished trial 'pruned' (the summary line and exit status counted it unfinished; a search's study: pruned)."""
  proc = subprocess.run([sys.executable, "-c", CLEANUP, str(tmp_path / "trial")], env={**sweep_env, **RAY_ENV},
                        capture_output=True, text=True, timeout=120)
  assert proc.returncode == 0, proc.stderr[-3000:]
  ended = json.loads(proc.stdout.splitlines()[-1])
  assert ended["sweep"] == ["done"]  # its final_metrics.json is there: done, whatever its worker has recorded
  assert ended["launches"] is not None and [(e["status"], e["exit_code"]) for e in ended["launches"]] == [("done", 0)]


def test_a_relative_path_is_read_from_the_launch_directory_as_the_local_runner_reads_it(ray_address, sweep_env,
                                                                                         tmp_path):
  """A trial ran in its Ray worker's directory (Tune's trial dir under WORKDIR/ray): data.path=in.txt, which the
  local runner reads from where the sweep was launched, did not exist there and every trial failed."""
  (tmp_path / "in.txt").write_text("".join(f"line {i}: the quick brown fox jumps over the lazy dog\n"
                                           for i in range(300)))
  path = write(tmp_path / "s.py", f'base = "{ROOT}/configs/shakespeare_char_gpt.py:smoke"\nresources = {{"cpu": 1}}\n'
               'overrides = {"train.num_steps": 4, "schedule.warmup_steps": 0, "evals.validation.every": 4, '
               '"data.path": "in.txt"}\ndef sweep():\n  yield {"seed": 0}\n')
  proc = subprocess.run([sys.executable, "-m", "bigmodel_jax.sweep", str(path), "--workdir=out", "--executor=ray",
                         f"--ray_address={ray_address}"], cwd=tmp_path, env={**sweep_env, **RAY_ENV},
                        capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
  assert [d.name for d in trial_dirs(tmp_path / "out")] == ["seed=0"]
