"""The benchmark harness cannot rot: its smallest case runs and its rows are well formed (a check of behaviour,
never of timings)."""

import json
import math
import os
import subprocess
import sys


from conftest import ROOT

sys.path.insert(0, str(ROOT))
from benchmarks import harness  # noqa: E402

VALUE_KEYS = {"median", "min", "max", "n"}


def run_suite(tmp_path, suite, only):
  out = tmp_path / f"{suite}.json"
  proc = subprocess.run([sys.executable, "-m", "benchmarks.run", f"--suite={suite}", "--size=tiny", f"--only={only}",
                         f"--out={out}"], cwd=ROOT, env={**os.environ, "JAX_PLATFORMS": "cpu"}, capture_output=True,
                        text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  return json.loads(out.read_text()), proc.stdout


def well_formed(row):
  assert {"benchmark", "config", "measure", "unit", "formula", "value", "target", "meets", "notes"} <= set(row)
  assert row["formula"] and row["unit"] and set(row["value"]) == VALUE_KEYS
  v = row["value"]
  assert all(math.isfinite(v[k]) for k in ("median", "min", "max")) and v["min"] <= v["median"] <= v["max"]
  if "ratio" in row:
    assert row["reference"]["measure"] and set(row["ratio"]) == VALUE_KEYS and row["ratio"]["median"] > 0
    assert row["ratio"]["n"] == row["value"]["n"] == row["reference"]["value"]["n"]  # one ratio per round
  assert row["meets"] in (True, False, None)


def test_cpu_suite_rows_are_well_formed_and_results_md_is_written_from_them(tmp_path):
  data, stdout = run_suite(tmp_path, "cpu", "host_overhead,input_pipeline,lm_throughput")
  assert data["suite"] == "cpu" and data["size"] == "tiny"
  assert {"machine", "device", "versions"} <= set(data["context"]) and data["context"]["versions"]["jax"]
  assert [r["benchmark"] for r in data["rows"]] == ["host_overhead", "input_pipeline", "lm_throughput"]
  for row in data["rows"]:
    well_formed(row)
  assert data["rows"][0]["compile_s"] > 0 and "MFU" in data["rows"][2]["notes"]
  assert "| host_overhead |" in stdout
  md = harness.write_results_md(tmp_path, tmp_path / "RESULTS.md")
  text = md.read_text()
  assert "## cpu suite (tiny size)" in text and text.count("| host_overhead |") == 1 and data["command"] in text


def test_gpu_suite_pieces_run_on_cpu_at_tiny_size(tmp_path):
  data, _ = run_suite(tmp_path, "gpu", "lm_throughput,host_overhead")
  for row in data["rows"]:
    well_formed(row)


def test_unknown_benchmark_is_one_line(tmp_path):
  proc = subprocess.run([sys.executable, "-m", "benchmarks.run", "--suite=cpu", "--only=warp_drive"], cwd=ROOT,
                        capture_output=True, text=True, timeout=120)
  assert proc.returncode == 2 and proc.stderr.strip().splitlines()[-1].startswith("error: --only: warp_drive")


def test_alternate_flips_the_order_and_summary_is_median_min_max():
  calls = []
  a, b = harness.alternate(lambda: calls.append("a") or 1.0, lambda: calls.append("b") or 2.0, 4)
  assert calls == ["a", "b", "b", "a", "a", "b", "b", "a"] and a == [1.0] * 4 and b == [2.0] * 4
  assert harness.summary([3, 1, 2]) == {"median": 2.0, "min": 1.0, "max": 3.0, "n": 3}


def test_a_benchmark_that_cannot_run_is_listed_and_the_exit_status_says_so(tmp_path):
  out = tmp_path / "gpu.json"
  proc = subprocess.run([sys.executable, "-m", "benchmarks.run", "--suite=gpu", "--size=tiny", f"--out={out}",
                         "--only=nanogpt_shakespeare_char,lm_throughput", f"--text={tmp_path / 'missing.txt'}"],
                        cwd=ROOT, env={**os.environ, "JAX_PLATFORMS": "cpu"}, capture_output=True, text=True,
                        timeout=600)
  assert proc.returncode == 3, proc.stderr[-2000:]
  data = json.loads(out.read_text())  # written all the same, with the rows that did run
  assert [r["benchmark"] for r in data["rows"]] == ["lm_throughput"]
  assert len(data["unmeasured"]) == 1 and data["unmeasured"][0].startswith("nanogpt_shakespeare_char: failed")
