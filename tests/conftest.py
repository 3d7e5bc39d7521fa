"""Shared test helpers: CPU only, offline, a shared compilation cache, and a CLI runner."""

import atexit
import collections
import os
import re
import shutil
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# Tests check behaviour, not speed: XLA:CPU compiles their programs (in process and in every subprocess, which
# inherit it) without LLVM's optimisation passes, the same HLO at less compile time (most tests are short runs
# dominated by compiling). Tolerances hold either way: they come from dtypes and depths, not from one build's code.
# The results differ from the optimised code's in the last bits: a test compares runs compiled alike. XLA_FLAGS that
# already name the option keep theirs (XLA_FLAGS=--xla_backend_optimization_level=3 tests the code users run).
TEST_XLA_FLAGS = "--xla_backend_optimization_level=0"
if "xla_backend_optimization_level" in os.environ.get("XLA_FLAGS", ""):
  TEST_XLA_FLAGS = ""
else:
  os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {TEST_XLA_FLAGS}".strip()

import jax  # noqa: E402

# In-process tests see 8 CPU devices (sharding tests pick meshes over subsets of them); the `cli` fixture's
# subprocesses see one unless a test passes XLA_FLAGS=--xla_force_host_platform_device_count=N.
jax.config.update("jax_num_cpu_devices", 8)

# One persistent compilation cache for the session: in-process runs (which rebuild the same steps many times) and
# CLI subprocesses alike compile each program once. It must be set before the first compilation.
COMPILATION_CACHE = Path(tempfile.mkdtemp(prefix="bigmodel_jax_test_cache_"))
atexit.register(shutil.rmtree, COMPILATION_CACHE, ignore_errors=True)
jax.config.update("jax_compilation_cache_dir", str(COMPILATION_CACHE))
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


def pytest_xdist_auto_num_workers(config) -> int:
  """`-n auto` (the README's test command): one worker more than the cores. A test spends part of its time waiting
  on a subprocess's start, a signal or a server, and the last files run alone: the whole suite on 2 cores took
  1514 s with 2 workers and 1346 s with 3 (same commit, 2026-12-07, `time pytest -n N --dist loadfile tests`)."""
  return len(os.sched_getaffinity(0)) + 1


# Seconds of worker time the slowest test files took (the whole suite on 2 cores, 3 workers, --junitxml; 2026-12-07).
# --dist loadfile hands the files out in collection order once xdist's own reordering (by number of tests) is off:
# longest first, so the files left running alone at the end are short ones. By number of tests, files of a few long
# tests (Ray, multi-process, resume) came last and ran on with the other workers idle. Files not listed: 2 s a test.
FILE_SECONDS = {
    "test_text_train.py": 313, "test_errors.py": 301, "test_gan.py": 270, "test_export.py": 253,
    "test_reliability.py": 199, "models/test_transformer.py": 193, "test_data_integrity.py": 186,
    "test_sweep.py": 175, "test_reproduce.py": 175, "test_cli.py": 163,
    "tasks/test_masked_language_modeling.py": 141, "test_evaluate.py": 134, "test_benchmarks.py": 133,
    "test_parallel.py": 132, "test_convert.py": 129, "models/test_resnet_vit.py": 124, "test_quantize.py": 121,
    "test_serve.py": 106, "test_sweep_ray.py": 88, "test_resume.py": 87, "test_parallel_cli.py": 86,
    "data/test_feed.py": 80, "test_multihost.py": 76, "test_integrity.py": 68, "test_deploy_guards.py": 66,
    "models/test_models_shapes.py": 64}


def pytest_configure(config):
  if getattr(config.option, "loadscopereorder", None):
    config.option.loadscopereorder = False


def pytest_collection_modifyitems(items):
  """Longest files first (FILE_SECONDS); a file's tests keep their order (the sort is stable)."""
  counts = collections.Counter(item.path for item in items)
  def seconds(item):
    name = item.path.relative_to(ROOT / "tests").as_posix() if item.path.is_relative_to(ROOT / "tests") else ""
    return FILE_SECONDS.get(name, 2.0 * counts[item.path])
  items.sort(key=lambda item: -seconds(item))


# A local copy of tiny Shakespeare for tests (its GitHub URL is unreachable offline): the project's shared
# folder beside the checkout, or this workplace's; tests that need it skip where neither exists.
TINY_SHAKESPEARE = next((p for p in (ROOT.parent / "shared" / "data" / "tinyshakespeare" / "input.txt",
                                     Path("/work/shared/data/tinyshakespeare/input.txt")) if p.is_file()),
                        Path("/work/shared/data/tinyshakespeare/input.txt"))


CLOSED_STDOUT = "error: SIGPIPE: stdout was closed by its reader (e.g. | head) before all of it was printed"


def with_stdout_closed(*args, env: dict | None = None, timeout: float = 300) -> tuple[int, str]:
  """`python -m *args` from the repo root, its stdout's reader gone before the first byte (| head) -> (status,
  stderr)."""
  proc = subprocess.Popen([sys.executable, "-m", *map(str, args)], cwd=ROOT, text=True, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, env={**os.environ, "JAX_PLATFORMS": "cpu", **(env or {})})
  proc.stdout.close()
  _, err = proc.communicate(timeout=timeout)
  return proc.returncode, err


@pytest.fixture(scope="session")
def cache_dir() -> Path:
  """The session's JAX compilation cache (also for subprocess runs, so repeated runs start fast)."""
  return COMPILATION_CACHE


@pytest.fixture(scope="session")
def classifier_dir(tmp_path_factory) -> Path:
  """Where GAN quality classifiers are trained once for the session (in-process runs and CLI runs alike)."""
  path = tmp_path_factory.mktemp("classifiers")
  os.environ["BIGMODEL_JAX_CLASSIFIER_DIR"] = str(path)
  return path


@pytest.fixture(scope="session")
def cli(cache_dir, classifier_dir, tmp_path_factory):
  """cli(*args, timeout=...) runs `python -m bigmodel_jax.main *args` from the repo root in a subprocess
  (session-scoped, so module-scoped fixtures can use it too); optimized=True compiles with LLVM's optimisations, for
  runs long enough that they cost more time than they save."""
  data_dir = tmp_path_factory.mktemp("data")
  def run(*args, timeout: float = 120, env: dict | None = None, popen: bool = False, optimized: bool = False):
    full_env = {**os.environ, "JAX_PLATFORMS": "cpu", "BIGMODEL_JAX_CACHE_DIR": str(cache_dir),
                "BIGMODEL_JAX_DATA_DIR": str(data_dir), "PYTHONUNBUFFERED": "1",
                "BIGMODEL_JAX_CLASSIFIER_DIR": str(classifier_dir), **(env or {})}
    flags = [f for f in full_env.get("XLA_FLAGS", "").split() if f != TEST_XLA_FLAGS]  # a test's own, and ours
    full_env["XLA_FLAGS"] = " ".join(flags if optimized or not TEST_XLA_FLAGS else [*flags, TEST_XLA_FLAGS])
    cmd = [sys.executable, "-m", "bigmodel_jax.main", *args]
    if popen:
      return subprocess.Popen(cmd, cwd=ROOT, env=full_env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    return subprocess.run(cmd, cwd=ROOT, env=full_env, capture_output=True, text=True, timeout=timeout)
  return run


def trained_run(cli, tmp_path_factory, name: str, *args: str, timeout: float = 300) -> Path:
  """A run trained by the CLI into a fresh temp dir (for module fixtures: each test file writes its own outputs
  into its own run)."""
  workdir = tmp_path_factory.mktemp(name)
  proc = cli(*args, f"--workdir={workdir}", timeout=timeout)
  assert proc.returncode == 0, proc.stderr[-2000:]
  return workdir


def wait_for_checkpoint(proc, workdir: Path, step: int, timeout: float = 120):
  """Waits until `proc` (a cli(..., popen=True) run) has committed checkpoint `step` in `workdir`."""
  deadline = time.time() + timeout
  while not (workdir / "checkpoints" / str(step)).exists():  # orbax renames a checkpoint into place when complete
    assert proc.poll() is None, proc.stdout.read()[-2000:]
    assert time.time() < deadline, f"no checkpoint within {timeout:.0f} s"
    time.sleep(0.01)
  return proc


def load_config(name: str, variant: str = ""):
  """configs/<name>.py's get_config(variant), as the CLI would build it."""
  import importlib.util
  spec = importlib.util.spec_from_file_location(name, ROOT / "configs" / f"{name}.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(variant)


def error_lines(stderr: str) -> list[str]:
  """Lines of stderr that are not absl INFO/WARNING log lines (those look like 'I1123 12:00:00.1 ...')."""
  return [l for l in stderr.splitlines() if l.strip() and not re.match(r"^[IW]\d{4} ", l)]


def tensorboard_scalars(directory: Path) -> dict[str, list[tuple[int, float]]]:
  """{tag: [(step, value), ...]} of the TensorBoard event files directly in `directory` (not its runs below), read
  from the TFRecord framing with tensorboardX's proto."""
  from tensorboardX.proto import event_pb2
  scalars = {}
  for path in sorted(directory.glob("events.out.tfevents.*")):
    data = path.read_bytes()
    pos = 0
    while pos < len(data):
      (length,) = struct.unpack("<Q", data[pos:pos + 8])
      event = event_pb2.Event.FromString(data[pos + 12:pos + 12 + length])
      for v in event.summary.value:
        scalars.setdefault(v.tag, []).append((event.step, v.simple_value))
      pos += 12 + length + 4
  return scalars
