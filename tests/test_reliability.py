"""Failures a user meets, each reproduced the way they meet it: Ctrl-C or SIGTERM at any moment of start-up, a
runaway sample, a damaged or odd file in a workdir, a read-only workdir, a full disk. Each ends with its exit code
and one stderr line naming the file or field, and every committed checkpoint is still there."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import TINY_SHAKESPEARE
from test_errors import assert_one_error, checkpoint_files, error_lines

ROOT = Path(__file__).resolve().parents[1]
SMOKE = ["--config=configs/digits_mlp.py:smoke", "--config.train.progress_bar=false"]
TRAINED = [*SMOKE, "--config.train.checkpoint_every=20"]  # `trained`'s command: relaunched, it resumes


def ok(proc):
  assert proc.returncode == 0, proc.stderr[-3000:]
  return proc


@pytest.fixture(scope="module")
def trained(cli, tmp_path_factory) -> Path:
  workdir = tmp_path_factory.mktemp("reliability") / "digits"
  ok(cli(*TRAINED, f"--workdir={workdir}"))
  return workdir


def copy_of(workdir: Path, tmp_path: Path) -> Path:
  target = tmp_path / "copy"
  shutil.copytree(workdir, target)
  return target


# --- signals ----------------------------------------------------------------------------------------------------

def interpreter_start() -> float:
  """Seconds this machine takes now to start python and import the package: before that no code of the package
  can run (a signal then is the interpreter's own business). Measured, since a loaded machine takes much longer."""
  times = []
  for _ in range(2):
    start = time.monotonic()
    subprocess.run([sys.executable, "-c", "import bigmodel_jax"], cwd=ROOT, check=True)
    times.append(time.monotonic() - start)
  return max(times)


@pytest.mark.parametrize("signum,delay", [(signal.SIGINT, 0.1), (signal.SIGINT, 0.5), (signal.SIGINT, 1.2),
                                          (signal.SIGTERM, 0.2), (signal.SIGTERM, 1.0)],
                         ids=["int-0.1s", "int-0.5s", "int-1.2s", "term-0.2s", "term-1.0s"])
def test_a_signal_during_start_up_exits_at_once_with_its_code(cli, tmp_path, signum, delay):
  """Before the loop: no KeyboardInterrupt inside an extension's import, none swallowed by a library (the run then
  trained to completion with exit 0), no C++ abort; the exit comes within a second, whatever is running.
  `delay` counts from the package's import."""
  start = 1.5 * interpreter_start()
  proc = cli(*SMOKE, "--config.train.num_steps=100000", f"--workdir={tmp_path / 'run'}", popen=True)
  time.sleep(start + delay)
  sent = time.monotonic()
  proc.send_signal(signum)
  out, _ = proc.communicate(timeout=60)
  assert time.monotonic() - sent < 5, out[-2000:]
  assert proc.returncode == 128 + signum, out[-3000:]
  lines = error_lines(out)
  assert len(lines) == 1 and signal.Signals(signum).name in lines[0], out[-3000:]
  assert "Traceback" not in out


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["int", "term"])
def test_a_signal_while_a_restore_captures_stderr_still_says_why_it_stopped(signum):
  """A checkpoint restore points fd 2 at a file while orbax reads (a resume, an eval, the best step's test metrics):
  a Ctrl-C or SIGTERM then exited with its code and no line at all."""
  script = ("import os, signal, tempfile, time\n"
            "from bigmodel_jax import interrupts, checkpoint\n"
            "interrupts.install()\n"
            "with tempfile.TemporaryFile() as f:\n"
            "  checkpoint._redirect_stderr(f.fileno())\n"
            f"  os.kill(os.getpid(), {int(signum)})\n"
            "  time.sleep(30)\n")
  proc = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=60,
                        env={**os.environ, "JAX_PLATFORMS": "cpu"})
  assert proc.returncode == 128 + signum
  assert proc.stderr.strip().splitlines()[-1].startswith(f"error: {signal.Signals(signum).name}: stopped")


def test_a_signal_handled_just_before_the_handlers_are_put_back_is_not_taken_again():
  """A server drained its SIGTERM in a millisecond and put the early handler back before the watcher thread read
  the signal's byte: the watcher then took it for a new signal and the clean exit 0 became 143 (seen on CI). A
  long switch interval keeps the watcher from the interpreter until the main thread blocks, as a busy one did."""
  script = ("import os, signal, sys, time\n"
            "from bigmodel_jax import interrupts\n"
            "interrupts.install()\n"
            "sys.setswitchinterval(2.0)\n"
            "seen = []\n"
            "previous = {s: signal.signal(s, lambda n, _: seen.append(n)) for s in interrupts.SIGNALS}\n"
            "os.kill(os.getpid(), signal.SIGTERM)\n"
            "for _ in range(10): pass\n"  # the taker's handler runs here
            "interrupts.restore(previous)\n"
            "time.sleep(1)\n"  # the watcher reads the byte now, with the early handler back
            "print('handled', seen)\n")
  proc = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=60,
                        env={**os.environ, "JAX_PLATFORMS": "cpu"})
  assert proc.returncode == 0 and proc.stdout.strip() == f"handled [{int(signal.SIGTERM)}]", proc.stderr[-2000:]
  # and a signal after the handlers are back still ends the process at once
  script = script.replace("print('handled', seen)\n", "os.kill(os.getpid(), signal.SIGINT)\ntime.sleep(30)\n")
  proc = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=60,
                        env={**os.environ, "JAX_PLATFORMS": "cpu"})
  assert proc.returncode == 128 + signal.SIGINT and "error: SIGINT: stopped" in proc.stderr, proc.stderr[-2000:]


def test_a_signal_held_as_a_holding_block_closes_is_not_lost():
  """The watcher thread had read `holding()`'s open list and was about to hold a SIGTERM in it when the main thread
  closed the block and made its last check: the signal was lost and the process went on to exit 0. A trace hook
  stalls the watcher at that line, as losing the interpreter there would."""
  script = ("import inspect, os, signal, sys, threading, time\n"
            "from bigmodel_jax import interrupts\n"
            "lines, first = inspect.getsourcelines(interrupts._watch)\n"
            "line = first + next(i for i, text in enumerate(lines) if 'holding.append' in text)\n"
            "def local(frame, event, arg):\n"
            "  if event == 'line' and frame.f_lineno == line:\n"
            "    time.sleep(0.3)\n"
            "  return local\n"
            "threading.settrace(lambda frame, event, arg: local if frame.f_code.co_name == '_watch' else None)\n"
            "interrupts.install()\n"
            "threading.settrace(None)\n"
            "with interrupts.holding():\n"
            "  os.kill(os.getpid(), signal.SIGTERM)\n"
            "  time.sleep(0.1)\n"  # the watcher has the open list and waits at the append
            "time.sleep(1)\n"
            "print('went on')\n")
  proc = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=60,
                        env={**os.environ, "JAX_PLATFORMS": "cpu"})
  assert proc.returncode == 128 + signal.SIGTERM and "went on" not in proc.stdout, (proc.stdout, proc.stderr[-2000:])
  assert error_lines(proc.stderr) == [proc.stderr.strip()], proc.stderr[-2000:]


def test_two_ctrl_c_during_training_save_first_then_exit(cli, tmp_path):
  workdir = tmp_path / "run"
  proc = cli(*SMOKE, "--config.train.num_steps=100000", "--config.train.checkpoint_every=100000",
             f"--workdir={workdir}", popen=True)
  deadline = time.monotonic() + 90
  while not ((workdir / "metrics.jsonl").exists() and "startup" in (workdir / "metrics.jsonl").read_text()):
    assert time.monotonic() < deadline and proc.poll() is None, "training did not start"
    time.sleep(0.1)
  proc.send_signal(signal.SIGINT)
  time.sleep(0.05)
  proc.send_signal(signal.SIGINT)  # a second one during the save: honoured once the save has committed
  out, _ = proc.communicate(timeout=60)
  # a test process held off the CPU may send the second one after the save: it then ends the process at once,
  # with 130 and its own line, or, as the interpreter is ending, by the signal itself (-2: a shell's 130)
  assert proc.returncode in (130, -signal.SIGINT), out[-3000:]
  lines = error_lines(out)
  assert "saved a checkpoint at step" in lines[0] or "after saving a checkpoint at step" in lines[0], lines
  names = [p.name for p in (workdir / "checkpoints").iterdir()]
  assert [n for n in names if n.isdigit()] and not [n for n in names if "tmp" in n], names


# --- sampling ---------------------------------------------------------------------------------------------------

@pytest.mark.skipif(not TINY_SHAKESPEARE.is_file(), reason="no local copy of tiny Shakespeare")
def test_a_long_sample_streams_and_stops_on_ctrl_c(cli, tmp_path):
  workdir = tmp_path / "gpt"
  ok(cli("--config=configs/shakespeare_char_gpt.py:smoke", f"--config.data.path={TINY_SHAKESPEARE}",
         "--config.train.num_steps=10", "--config.train.progress_bar=false", f"--workdir={workdir}"))
  assert_one_error(cli(f"--workdir={workdir}", "--mode=sample", "--config.sample.num_tokens=1000000000"),
                   "config.sample.num_tokens", "at most 1000000")
  proc = subprocess.Popen(
      [sys.executable, "-m", "bigmodel_jax.main", f"--workdir={workdir}", "--mode=sample",
       "--config.sample.num_tokens=1000000", "--config.sample.prompt=ROMEO:"], cwd=ROOT,
      env={**os.environ, "JAX_PLATFORMS": "cpu"}, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
  received = b""
  while len(received) < 2000:  # text arrives while the million tokens are still being generated
    chunk = proc.stdout.read1(4096)
    assert chunk, proc.stderr.read().decode()[-2000:]
    received += chunk
  assert received.startswith(b"ROMEO:") and proc.poll() is None
  proc.send_signal(signal.SIGINT)
  _, err = proc.communicate(timeout=30)
  assert proc.returncode == 130
  assert len(error_lines(err.decode())) == 1 and "--mode=sample stopped" in err.decode()


# --- damaged or odd workdir files -------------------------------------------------------------------------------

def test_a_config_json_section_that_is_not_one_is_one_line(cli, trained, tmp_path):
  workdir = copy_of(trained, tmp_path)
  saved = json.loads((workdir / "config.json").read_text())
  saved["data"] = "x"
  (workdir / "config.json").write_text(json.dumps(saved))
  assert_one_error(cli(f"--workdir={workdir}", "--mode=eval"), str(workdir / "config.json"), "data is 'x'",
                   "not a section")


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_a_mistyped_value_in_config_json_is_one_line(cli, trained, tmp_path, mode):
  workdir = copy_of(trained, tmp_path)
  saved = json.loads((workdir / "config.json").read_text())
  saved["data"]["batch_size"] = "thirty-two"
  (workdir / "config.json").write_text(json.dumps(saved))
  before = checkpoint_files(workdir)
  args = TRAINED if mode == "train" else []
  assert_one_error(cli(*args, f"--workdir={workdir}", f"--mode={mode}"),
                   str(workdir / "config.json"), "data.batch_size", "'thirty-two'", "integer")
  assert checkpoint_files(workdir) == before


@pytest.mark.parametrize("kind", ["binary", "directory"])
def test_an_unreadable_metrics_jsonl_is_one_line(cli, trained, tmp_path, kind):
  workdir = copy_of(trained, tmp_path)
  path = workdir / "metrics.jsonl"
  path.unlink()
  if kind == "binary":
    path.write_bytes(bytes(range(256)) * 8)
  else:
    path.mkdir()
  before = checkpoint_files(workdir)
  assert_one_error(cli(*TRAINED, f"--workdir={workdir}"), str(path))
  assert checkpoint_files(workdir) == before


def test_a_lock_file_that_is_a_directory_is_one_line(cli, trained, tmp_path):
  workdir = copy_of(trained, tmp_path)
  (workdir / ".train.lock").unlink(missing_ok=True)
  (workdir / ".train.lock").mkdir()
  before = checkpoint_files(workdir)
  line = assert_one_error(cli(*TRAINED, f"--workdir={workdir}"),
                          str(workdir / ".train.lock"), "lock file")
  assert "cannot create" not in line  # the lock file is to blame, not the workdir
  assert checkpoint_files(workdir) == before


def test_output_dir_is_only_for_reading_modes(cli, trained, tmp_path):
  assert_one_error(cli(*SMOKE, f"--workdir={tmp_path / 'w'}", f"--output_dir={tmp_path / 'o'}"),
                   "--output_dir", "modes on a checkpoint (eval, predict, sample")


# --- read-only workdir, full disk (need a mount: skipped where the test may not make one) ----------------------

def _mount(*args) -> bool:
  return subprocess.run(["mount", *args], capture_output=True).returncode == 0


@pytest.fixture
def read_only(trained, tmp_path):
  """`trained`, seen through a read-only bind mount (or with its write bits cleared, for a non-root user)."""
  yield from _read_only_view(trained, tmp_path / "ro")


def _read_only_view(source: Path, target: Path):
  target.mkdir()
  if os.geteuid() == 0:
    if not (_mount("--bind", str(source), str(target)) and _mount("-o", "remount,bind,ro", str(target))):
      subprocess.run(["umount", str(target)], capture_output=True)
      pytest.skip("cannot make a read-only bind mount here")
    yield target
    subprocess.run(["umount", str(target)], capture_output=True)
  else:
    shutil.rmtree(target)
    shutil.copytree(source, target)
    for p in [target, *target.rglob("*")]:
      p.chmod(p.stat().st_mode & ~0o222)
    yield target
    for p in [target, *target.rglob("*")]:
      p.chmod(p.stat().st_mode | 0o200)


def test_training_in_a_read_only_workdir_names_the_workdir(cli, read_only):
  before = checkpoint_files(read_only)
  line = assert_one_error(cli(*TRAINED, f"--workdir={read_only}"), f"--workdir: {read_only}", "not writable")
  assert "lock" not in line.split(";")[0]
  assert checkpoint_files(read_only) == before


@pytest.mark.parametrize("mode", ["eval", "predict"])
def test_eval_on_a_read_only_workdir_is_one_line_or_writes_elsewhere(cli, read_only, tmp_path, mode):
  before = checkpoint_files(read_only)
  assert_one_error(cli(f"--workdir={read_only}", f"--mode={mode}"), "--output_dir", str(read_only))
  out = tmp_path / "outputs"
  ok(cli(f"--workdir={read_only}", f"--mode={mode}", f"--output_dir={out}"))
  if mode == "eval":
    assert (out / "metrics.jsonl").exists() and any(out.glob("eval_step*.json"))
  else:  # predictions only: no metrics
    assert any(out.glob("predict_step*")) and not (out / "metrics.jsonl").exists()
  assert checkpoint_files(read_only) == before


@pytest.fixture
def quantized_read_only(cli, trained, tmp_path):
  """A copy of `trained` quantized (quantized/ beside its checkpoints), then seen read-only."""
  copy = copy_of(trained, tmp_path)
  ok(cli(f"--workdir={copy}", "--mode=quantize", "--config.quantize.repeats=1"))
  yield from _read_only_view(copy, tmp_path / "qro")


def test_a_read_only_workdir_serves_its_quantized_model_and_export_says_where_it_is(cli, quantized_read_only, tmp_path):
  """Was: serve, which writes nothing, refused a read-only workdir ('pass --output_dir'), and with --output_dir it
  looked for quantized/ there only: 'no quantized model ...; run --mode=quantize first' of a workdir that has one."""
  workdir, before = quantized_read_only, checkpoint_files(quantized_read_only)
  proc = cli(f"--workdir={workdir}", "--mode=serve", "--config.serve.port=0", "--config.serve.quantized=true",
             popen=True)
  try:
    lines = []
    for line in proc.stdout:  # the log, then the line naming the port
      lines.append(line)
      if line.startswith("serving "):
        break
    assert lines and lines[-1].startswith("serving mlp (digits) step"), "".join(lines)[-3000:]
  finally:
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=60) == 0
  out = tmp_path / "out"
  assert_one_error(cli(f"--workdir={workdir}", "--mode=export", "--config.export.quantized=true",
                       f"--output_dir={out}"), f"no quantized model in {out / 'quantized'}",
                   f"run --mode=quantize first, or copy {workdir / 'quantized'} there")
  shutil.copytree(workdir / "quantized", out / "quantized")
  ok(cli(f"--workdir={workdir}", "--mode=export", "--config.export.quantized=true", f"--output_dir={out}"))
  assert json.loads((out / "export" / "signature.json").read_text())["quantized"] is True
  # the copy names the run through the path it was made under: the same run (a bind mount here), so it is replaced
  ok(cli(f"--workdir={workdir}", "--mode=quantize", "--config.quantize.repeats=1", f"--output_dir={out}"))
  assert checkpoint_files(workdir) == before


@pytest.mark.parametrize("mode, inside", [("predict", "checkpoints/{latest}"), ("export", "checkpoints")])
def test_an_output_dir_inside_the_checkpoints_is_refused_before_a_step_is_damaged(cli, trained, tmp_path, mode, inside):
  """Was: --mode=predict --output_dir=RUN/checkpoints/<latest> wrote predict_step<N>/ into the step, which from then on
  was refused as damaged ('... is not in its digest.json'); export put export/ among the steps."""
  workdir = copy_of(trained, tmp_path)
  before = checkpoint_files(workdir)
  latest = max(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit())
  out = workdir / inside.format(latest=latest)
  assert_one_error(cli(f"--workdir={workdir}", f"--mode={mode}", f"--output_dir={out}"),
                   f"--output_dir: {out} is inside {workdir}'s checkpoints/")
  assert checkpoint_files(workdir) == before
  ok(cli(f"--workdir={workdir}", "--mode=eval", f"--checkpoint_step={latest}"))


@pytest.fixture
def small_disk(tmp_path):
  target = tmp_path / "disk"
  target.mkdir()
  if os.geteuid() != 0 or not _mount("-t", "tmpfs", "-o", "size=2m", "tmpfs", str(target)):
    pytest.skip("cannot mount a small tmpfs here")
  yield target
  subprocess.run(["umount", str(target)], capture_output=True)


def test_a_full_disk_is_one_line_and_keeps_the_committed_checkpoints(cli, small_disk):
  workdir = small_disk / "run"
  args = [*SMOKE, "--config.train.num_steps=400", "--config.train.checkpoint_every=20",
          "--config.train.keep_checkpoints=100", f"--workdir={workdir}"]
  proc = cli(*args)
  # tensorstore writes of the failed step still in flight report the closed loop of orbax's failed save through
  # sys.unraisablehook; the checkpointer's hook keeps them out: nothing but the one line
  assert "Traceback" not in proc.stderr and proc.returncode == 2, proc.stderr[-3000:]
  lines = error_lines(proc.stderr)
  assert len(lines) == 1 and "no space left on device" in lines[0] and "the last good checkpoint is step" in lines[0]
  line = lines[0]
  good = int(line.split("the last good checkpoint is step ")[1].split()[0])
  steps = sorted(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit())
  assert steps[-1] == good and steps == list(range(20, good + 1, 20))
  from bigmodel_jax import integrity
  assert all(integrity.verify(workdir / "checkpoints" / str(s)) for s in steps)  # each whole, digest and all
  # with room again, the same command resumes from it and finishes
  assert _mount("-o", "remount,size=16m", str(small_disk))
  resumed = ok(cli(*args))
  assert f"resumed from checkpoint at step {good}" in resumed.stderr


@pytest.mark.parametrize("override", ["--config.optimizer.learning_rate=-0.1", "--config.data.batch_size=100000",
                                      "--config.train.zzz=1"])
def test_a_one_line_error_is_all_of_stderr(cli, tmp_path, override):
  """Start-up logs nothing at the default verbosity before an error: the error really is the one line one sees."""
  proc = cli(*SMOKE, override, f"--workdir={tmp_path / 'w'}")
  assert proc.returncode == 2 and len(proc.stderr.splitlines()) == 1, proc.stderr


def test_a_full_output_dir_names_it_not_the_workdir(cli, trained, small_disk):
  (small_disk / "filler").write_bytes(b"\0" * (2 * 2**20 - 64 * 2**10))  # leave too little for a predict's PNGs
  line = assert_one_error(cli(f"--workdir={trained}", "--mode=predict", f"--output_dir={small_disk / 'out'}"),
                          "no space left on device", "--output_dir")
  assert str(trained) not in line and "checkpoint" not in line
