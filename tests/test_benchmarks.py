"""The benchmark harness cannot rot: its smallest case runs and its rows are well formed (a check of behaviour,
never of timings)."""

import json
import math
import os
import random
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from conftest import ROOT

sys.path.insert(0, str(ROOT))
from benchmarks import harness, measures  # noqa: E402

VALUE_KEYS = {"median", "min", "max", "n"}


def run_suite(tmp_path, suite, only, *flags, status=0):
  out = tmp_path / f"{suite}.json"
  proc = subprocess.run([sys.executable, "-m", "benchmarks.run", f"--suite={suite}", "--size=tiny", f"--only={only}",
                         f"--out={out}", *flags], cwd=ROOT, env={**os.environ, "JAX_PLATFORMS": "cpu"},
                        capture_output=True, text=True, timeout=600)
  assert proc.returncode == status, proc.stderr[-3000:]
  return json.loads(out.read_text()), proc.stdout


def small_text(path: Path) -> str:
  """A few KB of made-up lines: enough for shakespeare_char_gpt:smoke, offline."""
  rng = random.Random(0)
  words = "the king queen lord thou art love night day sweet death come speak hath".split()
  path.write_text("\n".join(" ".join(rng.choice(words) for _ in range(8)) for _ in range(800)) + "\n")
  return str(path)


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
  data, _ = run_suite(tmp_path, "gpu", "nanogpt_shakespeare_char,lm_throughput,host_overhead",
                      f"--text={small_text(tmp_path / 'input.txt')}")
  for row in data["rows"]:
    well_formed(row)
  rows = {r["benchmark"]: r for r in data["rows"]}
  assert list(rows) == ["nanogpt_shakespeare_char", "lm_throughput", "host_overhead", "images_per_s"]
  # the LM rows take the full size's bfloat16 path, not float32
  assert "--config.train.dtype=bfloat16" in rows["nanogpt_shakespeare_char"]["notes"]
  assert "bfloat16 compute" in rows["lm_throughput"]["notes"]
  assert "1 save(s) in the timed window" in rows["host_overhead"]["notes"]  # a checkpoint save is timed
  assert "steps_per_call 10" in rows["host_overhead"]["notes"]  # says the bare loop is not the k-step one
  batch = measures.load("digits_mlp").data.batch_size  # images/s = the full loop's steps/s x batch size
  assert rows["images_per_s"]["value"]["median"] == pytest.approx(rows["host_overhead"]["value"]["median"] * batch)


def test_the_full_loops_rate_counts_from_its_first_steps_record_and_a_save_is_timed():
  records = [{"step": 10, "split": "startup", "time": 100.0}]  # steps_per_call 10: the first record is at step 10
  records += [{"step": s, "split": "train", "time": 100.0 + (s - 10) / 1000} for s in range(20, 230, 20)]
  records += [{"step": 220, "split": "validation", "time": 105.0}]
  rate, seconds, first, last = measures.full_loop_rate(records)
  assert (first, last) == (10, 220) and rate == pytest.approx(1000) and seconds == pytest.approx(0.21)
  for name in ("digits_mlp", "mnist_mlp", "mnist_cnn"):
    t = measures.load(name).train
    assert measures.window_steps(measures.load(name), 600) > t.checkpoint_every + t.steps_per_call


INFO = "I1206 09:00:00.000000 1 attention.py:95] config.model.attention auto: cuDNN flash attention\n"


def _fake_main(fail_first: bool, calls: list, stderr: str = INFO + "error: CUDNN_STATUS_EXECUTION_FAILED\n"):
  def run(args, env, timeout=900):
    calls.append(args)
    if fail_first and len(calls) == 1:
      error = RuntimeError(f"bigmodel_jax.main failed: {stderr.splitlines()[-1:]}")
      error.stderr = stderr
      raise error
    workdir = Path(next(a for a in args if a.startswith("--workdir=")).split("=", 1)[1])
    workdir.mkdir(parents=True)
    workdir.joinpath("metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in (
        {"step": 20, "split": "validation", "time": 1010.0, "loss": 1.5},
        {"step": 40, "split": "validation", "time": 1020.0, "loss": 1.4})))
    return 1000.0
  return run


def test_a_failed_nanogpt_run_on_a_gpu_is_launched_once_more_in_the_einsum_form(monkeypatch, tmp_path):
  calls = []
  monkeypatch.setattr(measures, "_main", _fake_main(True, calls))
  monkeypatch.setattr(measures, "_on_gpu", lambda: True)
  row = measures.time_to_loss("shakespeare_char_gpt:smoke", str(tmp_path / "input.txt"), 1.47)
  assert len(calls) == 2 and "--config.model.attention=einsum" in calls[1]
  assert "--config.model.attention=einsum" not in calls[0] and row["value"]["median"] == 20.0
  assert "einsum form" in row["notes"] and "CUDNN_STATUS_EXECUTION_FAILED" in row["notes"]
  calls.clear()  # a run that succeeds is launched once
  monkeypatch.setattr(measures, "_main", _fake_main(False, calls))
  row = measures.time_to_loss("shakespeare_char_gpt:smoke", str(tmp_path / "input.txt"), 1.47)
  assert len(calls) == 1 and "einsum" not in row["notes"]


def test_a_nanogpt_run_prints_its_whole_traceback_where_it_fails(monkeypatch, tmp_path):
  """main's one-line error would hide a cuDNN failure whose message does not say cuDNN (e.g. jax's head-size check):
  the traceback's frames do."""
  envs = []
  monkeypatch.setattr(measures, "_main", lambda args, env, timeout=900: envs.append(env) or 1000.0)
  monkeypatch.setattr(measures, "_records", lambda workdir, partial=False: [
      {"step": 20, "split": "validation", "time": 1010.0, "loss": 1.4}])
  measures.time_to_loss("shakespeare_char_gpt:smoke", str(tmp_path / "input.txt"), 1.47)
  assert envs[0]["BIGMODEL_JAX_TRACEBACK"] == "1"
  stderr = ('Traceback (most recent call last):\n  File "jax/_src/cudnn/fused_attention_stablehlo.py", line 384\n'
            "NotImplementedError: The head dim must be <= 128 and a multiple of 8, but got 160.\n"
            "error: config.model: 'gpt' on tiny_shakespeare inputs of shape (256,) failed at "
            "bigmodel_jax/models/attention.py:101 in attend (NotImplementedError: The head dim must be <= 128)\n")
  error = RuntimeError("failed")
  error.stderr = stderr
  assert measures._cudnn_failed(error)


def test_a_nanogpt_run_failing_elsewhere_than_cudnn_is_not_retried(monkeypatch, tmp_path):
  """An out-of-memory (its log naming the cuDNN attention it took) is not cuDNN's failure: no second launch."""
  calls = []
  monkeypatch.setattr(measures, "_main", _fake_main(True, calls, INFO + "error: RESOURCE_EXHAUSTED: out of memory\n"))
  monkeypatch.setattr(measures, "_on_gpu", lambda: True)
  with pytest.raises(RuntimeError, match="RESOURCE_EXHAUSTED"):
    measures.time_to_loss("shakespeare_char_gpt:smoke", str(tmp_path / "input.txt"), 1.47)
  assert len(calls) == 1


def test_a_nanogpt_run_stopped_at_the_time_limit_counts_what_it_evaluated_by_then(monkeypatch, tmp_path):
  def run(args, env, timeout=900):
    workdir = Path(next(a for a in args if a.startswith("--workdir=")).split("=", 1)[1])
    workdir.mkdir(parents=True)
    records = [{"step": 250, "split": "validation", "time": time.time() + 30, "loss": 1.6},
               {"step": 500, "split": "validation", "time": time.time() + 90, "loss": 1.45}]
    workdir.joinpath("metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records) + '{"step": 5')
    raise subprocess.TimeoutExpired(args, timeout)
  monkeypatch.setattr(measures, "_main", run)
  row = measures.time_to_loss("shakespeare_char_gpt:smoke", str(tmp_path / "input.txt"), 1.47)
  assert row["value"]["median"] == pytest.approx(90, abs=5) and row["meets"] is False  # 1.45 reached at ~90 s
  assert "stopped at its 480 s limit after step 500" in row["notes"]
  monkeypatch.setattr(measures, "_main", lambda args, env, timeout=900: (_ for _ in ()).throw(
      subprocess.TimeoutExpired(args, timeout)))  # nothing evaluated before the limit: still a failure
  with pytest.raises(subprocess.TimeoutExpired):
    measures.time_to_loss("shakespeare_char_gpt:smoke", str(tmp_path / "input.txt"), 1.47)

def test_a_failed_nanogpt_run_off_a_gpu_is_not_retried(monkeypatch, tmp_path):
  calls = []
  monkeypatch.setattr(measures, "_main", _fake_main(True, calls))
  monkeypatch.setattr(measures, "_on_gpu", lambda: False)
  with pytest.raises(RuntimeError, match="CUDNN"):
    measures.time_to_loss("shakespeare_char_gpt:smoke", str(tmp_path / "input.txt"), 1.47)
  assert len(calls) == 1


def test_benchmarks_not_begun_when_the_budget_is_spent_are_listed_and_the_rest_kept(tmp_path):
  now = [0.0]
  def bench(row_name, seconds):
    def fn():
      now[0] += seconds
      return [harness.row(row_name, "c", "m", "u", "f", [1.0])]
    return fn
  data, out = {"rows": [], "unmeasured": []}, tmp_path / "suite.json"
  harness.run_benchmarks({"a": bench("a", 6), "b": bench("b", 6), "c": bench("c", 6)}, data, out, budget_s=10,
                         started=0.0, clock=lambda: now[0])
  written = json.loads(out.read_text())
  assert [r["benchmark"] for r in written["rows"]] == ["a", "b"]  # b began at 6 s < 10 s
  assert written["unmeasured"] == ["c: not measured: the suite's budget_s ran out (12 s of 10 s spent before it began)"]


def test_a_spent_budget_skips_every_benchmark_and_the_exit_status_says_so(tmp_path):
  data, stdout = run_suite(tmp_path, "gpu", "lm_throughput,host_overhead", "--budget_s=0", status=3)
  assert data["rows"] == [] and data["budget_s"] == 0
  assert [u.split(":")[0] for u in data["unmeasured"]] == ["lm_throughput", "host_overhead"]
  assert all("the suite's budget_s ran out" in u for u in data["unmeasured"]) and "skipped" in stdout


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


@pytest.mark.parametrize("text, says", [
    ("{bad", "cannot read"), ("[1, 2]", "is not a suite's JSON"),
    ('{"suite": "../../x", "size": "full"}', "cpu or gpu"), ('{"suite": "cpu", "rows": []}', "has no 'size'"),
    ('{"suite": "gpu", "size": "tiny", "rows": []}', "'tiny'-size run"),
    ('{"suite": "gpu", "size": "full", "rows": "x"}', "no list of rows"),
    ('{"suite": "gpu", "size": "full", "rows": [{"benchmark": "b"}]}', "not a benchmarks.run JSON"),
    ('{"suite": "gpu", "size": "full", "rows": [], "unmeasured": [{"x": 1}], "date": "d", "command": "c", "context": '
     '{"machine": {"cpu": "c", "cores": 2}, "device": {"count": 1, "kind": "k", "backend": "cpu"}, "versions": {}}}',
     "not a benchmarks.run JSON")])
def test_a_bad_import_is_refused_in_one_line(tmp_path, capsys, text, says):
  from benchmarks import run
  bad = tmp_path / "gpu.json"
  bad.write_text(text)
  with pytest.raises(SystemExit) as exit_:
    run.imported(bad)
  assert exit_.value.code == 2
  err = capsys.readouterr().err.strip()
  assert len(err.splitlines()) == 1 and err.startswith("error: --import_results:") and says in err, err


def test_a_tiny_import_writes_nothing_and_an_unwritable_out_is_refused_before_measuring(tmp_path):
  before = {p: p.read_bytes() for p in [*harness.RESULTS_DIR.glob("*.json"), harness.RESULTS_MD] if p.exists()}
  tiny = tmp_path / "gpu.json"
  tiny.write_text(json.dumps({"suite": "gpu", "size": "tiny", "rows": [], "unmeasured": []}))
  for flags, says in [([f"--import_results={tiny}"], "error: --import_results:"),
                      (["--suite=cpu", "--size=tiny", "--only=vs_pytorch", f"--out={tmp_path}"], "error: --out:")]:
    proc = subprocess.run([sys.executable, "-m", "benchmarks.run", *flags], cwd=ROOT, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 2 and proc.stderr.strip().splitlines()[-1].startswith(says), proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
  after = {p: p.read_bytes() for p in [*harness.RESULTS_DIR.glob("*.json"), harness.RESULTS_MD] if p.exists()}
  assert after == before


@pytest.fixture
def a_fake_gpu(monkeypatch):
  """attend() sees an H100 and cuDNN's attention answers with XLA's form, or raises as a broken cuDNN would;
  speed.py knows the device's peak (the GPU branch of lm_throughput, on this CPU)."""
  import types
  import jax
  from bigmodel_jax import speed
  from bigmodel_jax.models import attention as attention_lib
  real, broken = jax.nn.dot_product_attention, []

  def cudnn(q, k, v, *args, implementation=None, **kwargs):
    assert implementation == "cudnn" and q.dtype == k.dtype == v.dtype == jax.numpy.bfloat16
    if broken:
      raise RuntimeError("INTERNAL: cuDNN error: CUDNN_STATUS_EXECUTION_FAILED")
    return real(q, k, v, *args, implementation="xla", **kwargs)
  monkeypatch.setattr(jax.nn, "dot_product_attention", cudnn)
  monkeypatch.setattr(attention_lib, "_device", lambda: types.SimpleNamespace(
      platform="gpu", client=types.SimpleNamespace(platform_version="cuda 13000"), compute_capability="9.0"))
  monkeypatch.setattr(speed, "peak_flops", lambda kind, dtype: 989e12 if dtype == "bfloat16" else None)
  layers, heads, dim, window, _, vocab, dtype = measures.LM_SIZES["tiny"]
  monkeypatch.setitem(measures.LM_SIZES, "tiny", (layers, heads, dim, window, 8, vocab, dtype))  # 8 devices here
  return broken


def test_lm_throughput_on_a_gpu_takes_cudnn_and_says_so(a_fake_gpu):
  row = measures.lm_throughput("tiny", 2, repeats=1, dtype="bfloat16")
  well_formed(row)
  assert "attention cudnn" in row["notes"] and "dense bfloat16 peak (7.91e+03 TFLOP/s)" in row["notes"]  # 8 x 989
  assert row["meets"] is None  # only GPT-2 124M is held to the MFU target


def test_lm_throughput_where_cudnn_fails_is_measured_in_the_einsum_form_naming_the_cause(a_fake_gpu, capsys):
  a_fake_gpu.append(True)
  row = measures.lm_throughput("tiny", 2, repeats=1, dtype="bfloat16")
  well_formed(row)
  assert "attention einsum" in row["notes"] and "measured in the einsum form" in row["notes"]
  assert "CUDNN_STATUS_EXECUTION_FAILED" in row["notes"]  # the cause, not only the wrapping error's first words
  assert "CUDNN_STATUS_EXECUTION_FAILED" in capsys.readouterr().err  # its traceback, for gpu_slot.sh's run.log


def test_a_failed_launch_prints_its_stderr_less_absl_info_lines(monkeypatch, capsys):
  stderr = "I1206 09:00:00.000000 1 train.py:1] step 250\nTraceback (most recent call last):\n  File \"x.py\"\n" \
           "jaxlib.XlaRuntimeError: INTERNAL: cuDNN failed\n"
  monkeypatch.setattr(measures.subprocess, "run", lambda *a, **k: subprocess.CompletedProcess(a, 1, "", stderr))
  with pytest.raises(RuntimeError, match="INTERNAL: cuDNN failed") as raised:
    measures._main(["--config=configs/x.py"], {})
  assert raised.value.stderr == stderr  # whole, for time_to_loss's cuDNN check
  err = capsys.readouterr().err
  assert "Traceback (most recent call last)" in err and "INTERNAL: cuDNN failed" in err and "step 250" not in err


def test_the_json_names_the_benchmark_running_and_those_that_ended(tmp_path):
  """What a continuation reads after a hard crash: written before each benchmark begins."""
  out, seen = tmp_path / "suite.json", []
  def bench(name):
    def fn():
      seen.append(json.loads(out.read_text())["running"])
      return [harness.row(name, "c", "m", "u", "f", [1.0])]
    return fn
  data = {"rows": [], "unmeasured": []}
  harness.run_benchmarks({"a": bench("a"), "b": lambda: 1 / 0, "c": bench("c")}, data, out)
  written = json.loads(out.read_text())
  assert seen == ["a", "c"] and "running" not in written and written["finished"] == ["a", "b", "c"]
  written.update(running="d", suite="gpu", size="full", date="d", command="c", context=CONTEXT)  # its last try died
  assert "b: failed (ZeroDivisionError: division by zero); d: the process died during it (not continued)." in (
      "\n".join(harness.section(written)))


def _running(out: Path) -> str:
  try:
    return json.loads(out.read_text()).get("running", "")
  except (OSError, ValueError):  # not written yet
    return ""


def test_a_suite_killed_during_a_benchmark_is_continued_from_its_json(tmp_path):
  """A hard crash (here SIGKILL, as the OOM killer sends) is not caught in the process it ends: the JSON names the
  benchmark it died in; --continue_from_out keeps the rows, lists that one as not measured and runs the rest."""
  out = tmp_path / "cpu.json"
  flags = [sys.executable, "-m", "benchmarks.run", "--suite=cpu", "--size=tiny", f"--out={out}",
           "--only=input_pipeline,checkpoint_stall,lm_throughput", f"--text={small_text(tmp_path / 'input.txt')}"]
  env = {**os.environ, "JAX_PLATFORMS": "cpu"}
  proc = subprocess.Popen(flags, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  try:
    deadline = time.monotonic() + 300
    while _running(out) != "checkpoint_stall":  # input_pipeline measured, checkpoint_stall begun
      assert proc.poll() is None and time.monotonic() < deadline, proc.returncode
      time.sleep(0.02)
  finally:
    proc.kill()
    proc.wait()
  killed = json.loads(out.read_text())
  assert killed["running"] == "checkpoint_stall" and killed["finished"] == ["input_pipeline"]
  assert [r["benchmark"] for r in killed["rows"]] == ["input_pipeline"]
  go_on = subprocess.run(flags + ["--continue_from_out", "--previous_status=137"], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=600)
  assert go_on.returncode == 3, go_on.stderr[-3000:]  # one benchmark not measured
  data = json.loads(out.read_text())
  assert data["rows"][0] == killed["rows"][0] and [r["benchmark"] for r in data["rows"]] == [
      "input_pipeline", "lm_throughput"]
  assert data["unmeasured"] == [
      "checkpoint_stall: not measured: the process died during it (exit status 137: signal 9, SIGKILL)"]
  assert "running" not in data and data["finished"] == ["input_pipeline", "checkpoint_stall", "lm_throughput"]
  assert data["started_unix"] == killed["started_unix"] and data["command"] == killed["command"]
  assert data["continuations"] == ["python -m benchmarks.run " + " ".join(flags[3:] + [
      "--continue_from_out", "--previous_status=137"])]
  refused = subprocess.run(flags[:4] + ["--size=full", f"--out={out}", "--continue_from_out"], cwd=ROOT, env=env,
                           capture_output=True, text=True, timeout=120)
  assert refused.returncode == 2 and "Traceback" not in refused.stderr, refused.stderr[-2000:]
  assert refused.stderr.strip().splitlines()[-1] == (
      f"error: --continue_from_out: {out} holds the cpu suite at tiny size, not --suite=cpu --size=full: continue a "
      "run with the flags it was started with")
  assert json.loads(out.read_text()) == data  # untouched


CONTEXT = {"machine": {"host": "h", "cpu": "c", "cores": 2}, "device": {"backend": "gpu", "kind": "H100", "count": 1},
           "versions": {"jax": "0"}}


def a_died_json(path: Path, **changes) -> Path:
  """A gpu tiny suite's JSON as a process killed during lm_throughput leaves it."""
  data = {"suite": "gpu", "size": "tiny", "date": "d", "command": "c", "context": CONTEXT, "rows": [],
          "unmeasured": [], "started_unix": time.time() - 100, "budget_s": 50.0,
          "benchmarks": ["lm_throughput", "host_overhead"], "finished": [], "running": "lm_throughput", **changes}
  path.write_text(json.dumps({k: v for k, v in data.items() if v is not None}))
  return path


def test_a_continuation_keeps_the_budget_counted_from_the_first_start(tmp_path):
  """100 s since the first process began, of a 50 s budget: the rest is listed, not run (no JAX work here)."""
  out = a_died_json(tmp_path / "gpu.json")
  proc = subprocess.run([sys.executable, "-m", "benchmarks.run", "--suite=gpu", "--size=tiny", f"--out={out}",
                         "--continue_from_out"], cwd=ROOT, env={**os.environ, "JAX_PLATFORMS": "cpu"},
                        capture_output=True, text=True, timeout=120)
  assert proc.returncode == 3, proc.stderr[-3000:]
  data = json.loads(out.read_text())
  assert data["rows"] == [] and data["budget_s"] == 50 and data["finished"] == ["lm_throughput", "host_overhead"]
  died, skipped = data["unmeasured"]
  assert died == "lm_throughput: not measured: the process ended while it ran (its exit status was not passed)"
  assert skipped.startswith("host_overhead: not measured: the suite's budget_s ran out (10") and "of 50 s" in skipped


@pytest.mark.parametrize("suite, size, only, changes, says", [
    ("cpu", "tiny", [], {}, "holds the gpu suite at tiny size, not --suite=cpu --size=tiny"),
    ("gpu", "full", [], {}, "holds the gpu suite at tiny size, not --suite=gpu --size=full"),
    ("gpu", "tiny", [], {"started_unix": None}, "was not written by a benchmarks.run that can be continued"),
    ("gpu", "tiny", [], {"benchmarks": ["warp_drive"]}, "was not written by a benchmarks.run that can be continued"),
    ("gpu", "tiny", [], {"context": None}, "was not written by a benchmarks.run that can be continued"),
    ("gpu", "tiny", ["lm_throughput"], {}, "is a run of --only=lm_throughput,host_overhead; give the same --only"),
    ("gpu", "tiny", [], {"suite": None}, "holds the None suite at tiny size")])
def test_a_continuation_of_another_runs_json_is_refused_in_one_line(tmp_path, capsys, suite, size, only, changes,
                                                                    says):
  from benchmarks import run
  out = a_died_json(tmp_path / "gpu.json", **changes)
  with pytest.raises(SystemExit) as exit_:
    run.continued(out, suite, size, only, run.suite(suite, size, "", 1), 139)
  assert exit_.value.code == 2
  err = capsys.readouterr().err.strip()
  assert len(err.splitlines()) == 1 and err.startswith(f"error: --continue_from_out: {out} ") and says in err, err
  with pytest.raises(SystemExit):  # not JSON at all
    run.continued(tmp_path / "missing.json", "gpu", "tiny", [], run.suite("gpu", "tiny", "", 1), None)
  assert "cannot read" in capsys.readouterr().err


def test_the_reason_names_the_signal_the_shell_saw():
  from benchmarks import run
  assert run.died(139) == "the process died during it (exit status 139: signal 11, SIGSEGV)"
  assert run.died(134).endswith("signal 6, SIGABRT)") and run.died(-9).endswith("signal 9, SIGKILL)")
  assert run.died(1) == "the process died during it (exit status 1)"
  assert run.died(255) == "the process died during it (exit status 255)"  # no signal 127: exit(-1)
  assert run.died(128 + signal.SIGRTMIN + 1).endswith(f"signal {signal.SIGRTMIN + 1})")


def test_a_launch_dies_with_the_suite_that_started_it(tmp_path):
  """measures._main's launches take harness.die_with(os.getpid()): a suite killed mid-launch (then continued by
  gpu_slot.sh) leaves no training run behind it."""
  parent = subprocess.Popen([sys.executable, "-c", textwrap.dedent("""
      import os, subprocess, sys, time
      from benchmarks import harness
      child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"],
                               preexec_fn=harness.die_with(os.getpid()))
      print(child.pid, flush=True)
      time.sleep(120)
      """)], cwd=ROOT, stdout=subprocess.PIPE, text=True, env={**os.environ, "JAX_PLATFORMS": "cpu"})
  child = int(parent.stdout.readline())
  parent.kill()
  parent.wait()
  def alive():
    try:
      return Path(f"/proc/{child}/status").read_text().split("State:")[1].split()[0] not in ("Z", "X")
    except (OSError, IndexError):
      return False
  deadline = time.time() + 10
  while alive() and time.time() < deadline:
    time.sleep(0.05)
  assert not alive()
  # a parent gone between the fork and the kernel's request (the child now another's): it never runs. Launched
  # from a process without JAX's threads (a preexec_fn forks: in this one that could deadlock)
  orphan = subprocess.run([sys.executable, "-c", textwrap.dedent("""
      import os, subprocess, sys
      from benchmarks import harness
      child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"],
                               preexec_fn=harness.die_with(os.getpid() + 1_000_000))
      print(child.wait(timeout=10))
      """)], cwd=ROOT, capture_output=True, text=True, timeout=60, env={**os.environ, "JAX_PLATFORMS": "cpu"})
  assert orphan.stdout.strip() == "1", orphan.stderr[-2000:]
