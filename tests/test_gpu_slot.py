"""benchmarks/gpu_slot.sh run, the GPU slot's one command, with a stand-in Python: what it installs from, the data it
unpacks, the arguments the suite gets, that the suite's output and exit status come back ($OUT/run.log), and that a
suite whose process is killed during a benchmark is continued from its JSON."""

import gzip
import os
import shutil
import subprocess
import sys
from pathlib import Path

from conftest import ROOT

FAKE_PYTHON = """#!/usr/bin/env bash
if [[ "$1" == "-" || "$1" == "-c" ]]; then exec {real} "$@"; fi  # requirements() and running(): a real Python
[[ "$1" == "-m" ]] || exit 90
case "$2" in
  pip) echo "$*" >> "$CALLS"; [[ "$3" == list ]] && echo "jax 0.11.2"
       if [[ -n "${{PIP_FAILS:-}}" && "$*" == *find-links* ]]; then echo "no version of tqdm>=4.66" >&2; exit 1; fi
       exit 0 ;;
  benchmarks.run) echo "suite: ${{*:3}} PYTHONPATH=$PYTHONPATH DATA=$BIGMODEL_JAX_DATA_DIR"
                  echo "a traceback" >&2; echo "${{*:3}}" >> "$CALLS.suite"
                  if [[ -n "${{REFUSE:-}}" && "$*" == *--continue_from_out* ]]; then exit 2; fi  # JSON untouched
                  if [[ -n "${{EARLY:-}}" ]]; then kill -11 $$; fi  # a crash before the JSON is first written
                  tries=$(wc -l < "$CALLS.suite") names=(- lm_throughput host_overhead time_to_accuracy)
                  if (( tries <= ${{CRASHES:-0}} )); then  # killed as the OOM killer kills, each try in the next one
                    printf '{{"running": "%s"}}' "${{names[tries]}}" > "$OUT/gpu.json"; kill -9 $$; fi
                  echo '{{}}' > "$OUT/gpu.json"; exit "${{STATUS:-3}}" ;;
esac
exit 91
"""


def slot(tmp_path):
  repo = tmp_path / "repo"
  (repo / "benchmarks").mkdir(parents=True)
  shutil.copy(ROOT / "benchmarks" / "gpu_slot.sh", repo / "benchmarks")
  shutil.copy(ROOT / "pyproject.toml", repo)
  (repo / ".gpu" / "wheels").mkdir(parents=True)
  (repo / ".gpu" / "mnist").mkdir()
  (repo / ".gpu" / "mnist" / "train-labels-idx1-ubyte.gz").write_bytes(gzip.compress(b"labels"))
  (repo / ".gpu" / "input.txt").write_text("ROMEO:\n")
  python = tmp_path / "python"
  python.write_text(FAKE_PYTHON.format(real=sys.executable))
  python.chmod(0o755)
  out = tmp_path / "out"
  out.mkdir()
  env = {**os.environ, "PYTHON": str(python), "OUT": str(out), "CALLS": str(tmp_path / "calls"),
         "BIGMODEL_JAX_DATA_DIR": str(tmp_path / "data"), "PATH": os.environ["PATH"]}
  return repo, out, env


def test_the_slot_runs_the_suite_with_its_data_and_keeps_its_output_and_status(tmp_path):
  repo, out, env = slot(tmp_path)
  proc = subprocess.run(["bash", str(repo / "benchmarks" / "gpu_slot.sh"), "run", "--size=tiny"], env=env,
                        capture_output=True, text=True, timeout=60)
  assert proc.returncode == 3, proc.stderr  # the suite's own status: some benchmark not measured
  pip = (tmp_path / "calls").read_text().splitlines()
  install = next(c for c in pip if c.startswith("-m pip install"))
  assert "--no-index --find-links .gpu/wheels" in install and "flax>=" in install and "grain>=" in install
  assert " jax" not in install and "tensorflow-datasets" not in install  # the image's CUDA jax is kept
  assert (tmp_path / "data" / "mnist" / "train-labels-idx1-ubyte").read_bytes() == b"labels"
  log = (out / "run.log").read_text()
  assert f"suite: --suite=gpu --out={out}/gpu.json --text=.gpu/input.txt --size=tiny PYTHONPATH={repo}" in log
  assert "a traceback" in log and (out / "gpu.json").exists() and (out / "nvidia-smi.txt").exists()


def test_an_install_that_cannot_meet_every_range_still_runs_the_suite(tmp_path):
  """An image with an older tqdm (say) than our ranges: the staged wheels the image lacks (or holds outside our
  ranges) alone, and the suite runs anyway; the image's in-range packages are kept."""
  repo, out, env = slot(tmp_path)
  import flax
  for wheel in (f"flax-{flax.__version__}-py3-none-any.whl", "flax-0.1.0-py3-none-any.whl",
                "absent_from_the_image-1.0-py3-none-any.whl", "tqdm-999.0-py3-none-any.whl"):
    (repo / ".gpu" / "wheels" / wheel).write_bytes(b"")
  pyproject = repo / "pyproject.toml"  # the image's tqdm (this venv's) below the range
  pyproject.write_text(pyproject.read_text().replace('"tqdm>=4.66"', '"tqdm>=999"'))
  proc = subprocess.run(["bash", str(repo / "benchmarks" / "gpu_slot.sh"), "run"], env={**env, "PIP_FAILS": "1"},
                        capture_output=True, text=True, timeout=60)
  assert proc.returncode == 3, proc.stderr
  assert "no version of tqdm>=4.66" in proc.stdout + proc.stderr and "going on" in proc.stderr
  installs = [c for c in (tmp_path / "calls").read_text().splitlines() if c.startswith("-m pip install")]
  assert len(installs) == 2 and "--no-deps" in installs[1]
  assert "absent_from_the_image-1.0" in installs[1] and "tqdm-999.0" in installs[1]
  assert "flax" not in installs[1]  # this venv's flax is in our range
  assert "suite: --suite=gpu" in (out / "run.log").read_text()


STRICT_PACKAGING = """
from pip._vendor.packaging.requirements import Requirement as _Requirement
from pip._vendor.packaging.specifiers import SpecifierSet
from pip._vendor.packaging.version import Version

class Strict(SpecifierSet):  # as packaging 22 to 24 (pip 24's): a version that is not PEP 440 raises
  def contains(self, item, prereleases=None):
    return super().contains(Version(item), prereleases=prereleases)

class Requirement(_Requirement):
  def __init__(self, text):
    super().__init__(text)
    self.specifier = Strict(str(self.specifier))
"""


def test_an_image_package_of_no_pep_440_version_does_not_end_the_slot(tmp_path):
  """The fallback's unmet() on an image holding grain at a version packaging cannot parse (a source build's, say):
  that staged wheel is installed, and the suite runs."""
  repo, out, env = slot(tmp_path)
  for wheel in ("grain-0.2.18-py3-none-any.whl", "absent_from_the_image-1.0-py3-none-any.whl"):
    (repo / ".gpu" / "wheels" / wheel).write_bytes(b"")
  site = tmp_path / "site"
  (site / "packaging").mkdir(parents=True)
  (site / "packaging" / "__init__.py").write_text("")
  (site / "packaging" / "requirements.py").write_text(STRICT_PACKAGING)
  (site / "grain-0.dist-info").mkdir()
  (site / "grain-0.dist-info" / "METADATA").write_text("Metadata-Version: 2.1\nName: grain\nVersion: 0.2.18-dev!\n")
  proc = subprocess.run(["bash", str(repo / "benchmarks" / "gpu_slot.sh"), "run"],
                        env={**env, "PIP_FAILS": "1", "PYTHONPATH": str(site)}, capture_output=True, text=True,
                        timeout=60)
  assert proc.returncode == 3, proc.stderr
  installs = [c for c in (tmp_path / "calls").read_text().splitlines() if c.startswith("-m pip install")]
  assert len(installs) == 2 and "grain-0.2.18" in installs[1] and "absent_from_the_image-1.0" in installs[1]
  assert "suite: --suite=gpu" in (out / "run.log").read_text()

def test_the_slot_without_out_or_staged_wheels_is_refused_in_one_line(tmp_path):
  repo, out, env = slot(tmp_path)
  script = ["bash", str(repo / "benchmarks" / "gpu_slot.sh"), "run"]
  proc = subprocess.run(script, env={k: v for k, v in env.items() if k != "OUT"}, capture_output=True, text=True)
  assert proc.returncode == 2 and "$OUT" in proc.stderr
  shutil.rmtree(repo / ".gpu" / "wheels")
  proc = subprocess.run(script, env=env, capture_output=True, text=True)
  assert proc.returncode == 2 and "no .gpu/wheels" in proc.stderr and not (out / "run.log").exists()


def test_a_suite_killed_during_a_benchmark_is_continued_from_its_json_twice_at_most(tmp_path):
  repo, out, env = slot(tmp_path)
  script = ["bash", str(repo / "benchmarks" / "gpu_slot.sh"), "run", "--size=tiny"]
  proc = subprocess.run(script, env={**env, "CRASHES": "1"}, capture_output=True, text=True, timeout=60)
  assert proc.returncode == 3, proc.stderr  # the continuation's: the killed benchmark is not measured
  first, again = (tmp_path / "calls.suite").read_text().splitlines()
  assert again == first + " --continue_from_out --previous_status=137"
  log = (out / "run.log").read_text()  # both tries, and why the second began
  assert log.count("suite: --suite=gpu") == 2 and "a traceback" in log
  assert "status 137 during lm_throughput; continuing from" in log and "(try 1 of 2)" in proc.stderr
  (tmp_path / "calls.suite").unlink()
  proc = subprocess.run(script, env={**env, "CRASHES": "9"}, capture_output=True, text=True, timeout=60)
  assert proc.returncode == 137 and len((tmp_path / "calls.suite").read_text().splitlines()) == 3  # 1 + 2 tries
  assert "(try 2 of 2)" in proc.stderr and "(try 3" not in proc.stderr


def test_a_suite_failing_outside_a_benchmark_is_not_continued(tmp_path):
  """No benchmark running in the JSON (a failure before or between benchmarks): nothing to continue; its status."""
  repo, out, env = slot(tmp_path)
  proc = subprocess.run(["bash", str(repo / "benchmarks" / "gpu_slot.sh"), "run"], env={**env, "STATUS": "1"},
                        capture_output=True, text=True, timeout=60)
  assert proc.returncode == 1 and len((tmp_path / "calls.suite").read_text().splitlines()) == 1
  assert "continuing" not in (out / "run.log").read_text()


def test_a_continuation_that_refuses_the_json_is_not_tried_again(tmp_path):
  """A continuation that ends without touching the JSON (it refused it, exit 2) would do so again: one try only."""
  repo, out, env = slot(tmp_path)
  proc = subprocess.run(["bash", str(repo / "benchmarks" / "gpu_slot.sh"), "run"],
                        env={**env, "CRASHES": "1", "REFUSE": "1"}, capture_output=True, text=True, timeout=60)
  assert proc.returncode == 2 and len((tmp_path / "calls.suite").read_text().splitlines()) == 2, proc.stderr
  assert "(try 1 of 2)" in proc.stderr and "(try 2" not in proc.stderr


def test_a_json_an_earlier_run_left_in_out_is_not_continued(tmp_path):
  """$OUT used twice (a local check): a suite dying before it first writes its JSON does not continue the earlier
  run's, whose rows would come back as this run's."""
  repo, out, env = slot(tmp_path)
  (out / "gpu.json").write_text('{"running": "nanogpt_shakespeare_char"}')
  proc = subprocess.run(["bash", str(repo / "benchmarks" / "gpu_slot.sh"), "run"], env={**env, "EARLY": "1"},
                        capture_output=True, text=True, timeout=60)
  assert proc.returncode == 139 and len((tmp_path / "calls.suite").read_text().splitlines()) == 1, proc.stderr
  assert "continuing" not in (out / "run.log").read_text() and not (out / "gpu.json").exists()
