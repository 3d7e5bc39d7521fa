"""A run killed at any moment resumes bit-identically; SIGTERM saves a checkpoint first."""

import json
import signal

import pytest

from conftest import load_config, wait_for_checkpoint

ARGS = ["--config=configs/digits_mlp.py", "--config.train.num_steps=2500", "--config.evals.validation.every=1000",
        "--config.train.checkpoint_every=500", "--config.train.log_every=100"]


@pytest.fixture(scope="module")
def reference_dir(cli, tmp_path_factory):
  workdir = tmp_path_factory.mktemp("uninterrupted")
  proc = cli(*ARGS, f"--workdir={workdir}")
  assert proc.returncode == 0, proc.stderr[-2000:]
  return workdir


@pytest.fixture(scope="module")
def reference(reference_dir):
  return json.loads((reference_dir / "final_metrics.json").read_text())


def history(workdir) -> list[dict]:
  """metrics.jsonl's train and evaluation records without their timings: what an interrupted run must repeat."""
  timings = ("time", "steps_per_s", "examples_per_s", "images_per_s", "tokens_per_s")
  records = [json.loads(l) for l in (workdir / "metrics.jsonl").read_text().splitlines()]
  return [{k: v for k, v in r.items() if k not in timings} for r in records if r["split"] != "startup"]


def start_and_wait_for_checkpoint(cli, workdir, args=ARGS):
  return wait_for_checkpoint(cli(*args, f"--workdir={workdir}", popen=True), workdir, 500)


def stop_with_sigterm_and_resume(cli, workdir, args, resume_args):
  """A run of `args` stopped by SIGTERM after its first checkpoint (exit 128 + SIGTERM), then relaunched with
  `resume_args` to its end (exit 0)."""
  proc = start_and_wait_for_checkpoint(cli, workdir, args)
  proc.send_signal(signal.SIGTERM)
  out, _ = proc.communicate(timeout=60)
  assert proc.returncode == 128 + signal.SIGTERM, out[-2000:]
  resumed = cli(*resume_args, f"--workdir={workdir}")
  assert resumed.returncode == 0, resumed.stderr[-2000:]


def test_sigkill_then_relaunch_is_bit_identical(cli, tmp_path, reference):
  proc = start_and_wait_for_checkpoint(cli, tmp_path)
  proc.send_signal(signal.SIGKILL)
  proc.wait(timeout=30)
  assert proc.returncode == -signal.SIGKILL
  assert not (tmp_path / "final_metrics.json").exists()
  resumed = cli(*ARGS, f"--workdir={tmp_path}")
  assert resumed.returncode == 0, resumed.stderr[-2000:]
  assert "resumed from checkpoint at step" in resumed.stderr
  final = json.loads((tmp_path / "final_metrics.json").read_text())
  assert final["params_sha256"] == reference["params_sha256"]
  assert final == reference
  # the records of steps redone after the restart appear once: metrics.jsonl reads as one run
  records = [json.loads(l) for l in (tmp_path / "metrics.jsonl").read_text().splitlines()]
  train_steps = [r["step"] for r in records if r["split"] == "train"]
  assert train_steps == sorted(set(train_steps)) and train_steps[-1] == 2500


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_sigterm_saves_a_checkpoint_that_resumes_exactly(cli, tmp_path, reference_dir, reference, sig):
  """Its metrics history too: the log window the signal cut short (it lands between log steps) is kept in the
  checkpoint, not recorded, so the resumed run's record at that window's log step averages the same steps."""
  proc = start_and_wait_for_checkpoint(cli, tmp_path)
  proc.send_signal(sig)
  out, _ = proc.communicate(timeout=60)
  assert proc.returncode == 128 + sig, out[-2000:]
  error = [l for l in out.splitlines() if l.startswith("error:")]
  assert len(error) == 1 and f"{sig.name}: saved a checkpoint at step" in error[0]
  saved_step = int(error[0].split("at step ")[1].split()[0])
  assert (tmp_path / "checkpoints" / str(saved_step)).exists()
  resumed = cli(*ARGS, f"--workdir={tmp_path}")
  assert resumed.returncode == 0, resumed.stderr[-2000:]
  assert f"resumed from checkpoint at step {saved_step}" in resumed.stderr
  assert json.loads((tmp_path / "final_metrics.json").read_text()) == reference
  assert history(tmp_path) == history(reference_dir)


def test_several_steps_per_call_train_the_same_run_and_resume_exactly(cli, tmp_path, reference):
  """steps_per_call=7 (not a divisor of the 500-step checkpoint cadence: single steps fill up to each
  checkpoint) gives the one-step-per-call run's final metrics, also after a SIGTERM and a relaunch."""
  args = [*ARGS, "--config.train.steps_per_call=7"]
  stop_with_sigterm_and_resume(cli, tmp_path, args, args)
  assert json.loads((tmp_path / "final_metrics.json").read_text()) == reference
  records = [json.loads(l) for l in (tmp_path / "metrics.jsonl").read_text().splitlines()]
  train_steps = [r["step"] for r in records if r["split"] == "train"]
  assert train_steps == sorted(set(train_steps)) and train_steps[-1] == 2500


def test_data_on_device_trains_the_same_run_and_resumes_exactly_either_way(cli, tmp_path, reference):
  """config.data.on_device set the other way from the config's (the split on the device, each step gathering its
  batch): the same run, bit for bit, also when it is stopped with SIGTERM and relaunched the config's way."""
  other = f"--config.data.on_device={not load_config('digits_mlp').data.on_device}"
  stop_with_sigterm_and_resume(cli, tmp_path, [*ARGS, other, "--config.train.steps_per_call=3"], ARGS)
  assert json.loads((tmp_path / "final_metrics.json").read_text()) == reference


def test_a_second_run_in_the_same_workdir_is_refused(cli, tmp_path):
  long_run = [*ARGS, "--config.train.num_steps=100000"]  # still running when the second one starts
  proc = start_and_wait_for_checkpoint(cli, tmp_path, long_run)
  try:
    second = cli(*long_run, f"--workdir={tmp_path}")
    assert second.returncode == 2
    assert f"error: --workdir: {tmp_path} is in use by another training run (pid {proc.pid})" in second.stderr
  finally:
    proc.kill()
    proc.wait()
  # the lock died with its process: the workdir can be continued (here, finished early)
  shorter = [*long_run, "--config.train.num_steps=600", "--config.train.allow_config_change=true"]
  assert cli(*shorter, f"--workdir={tmp_path}").returncode == 0
