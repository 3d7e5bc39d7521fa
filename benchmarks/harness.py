"""The benchmark harness's parts: what a row states, repeated and alternating measurements, the printed table,
and benchmarks/RESULTS.md written from the suites' JSON (never by hand)."""

import json
import os
import platform
import statistics
import time
import traceback
from pathlib import Path

import jax

RESULTS_DIR = Path(__file__).with_name("results")  # <suite>.json, one per suite, as the harness last wrote it
RESULTS_MD = Path(__file__).with_name("RESULTS.md")


def _cpu_name() -> str:
  try:
    with open("/proc/cpuinfo") as f:
      for line in f:
        if line.startswith("model name"):
          return line.split(":", 1)[1].strip()
  except OSError:
    pass
  return platform.processor() or platform.machine()


def die_with(parent: int):
  """-> a subprocess's preexec_fn (`parent`: os.getpid() of the process starting it): on Linux, the kernel kills the
  child when its parent dies (a benchmark's crash must not leave its training run using the GPU beside the suite's
  continuation); a parent that died already, between the fork and that request, ends it at once; elsewhere nothing."""
  def preexec() -> None:
    import ctypes
    import signal
    try:
      ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (AttributeError, OSError):
      return
    if os.getppid() != parent:  # reparented: the parent was gone before the kernel was told
      os._exit(1)
  return preexec


def context() -> dict:
  """Machine, devices and versions: stated in every row."""
  from importlib.metadata import version
  versions = {"python": platform.python_version(),
              **{p: version(p) for p in ("jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "grain")}}
  devices = jax.devices()
  return {"machine": {"host": platform.node(), "cpu": _cpu_name(), "cores": os.cpu_count()},
          "device": {"backend": jax.default_backend(), "kind": devices[0].device_kind, "count": len(devices)},
          "versions": versions}


def summary(values) -> dict:
  """Median with min-max of repeated measurements (warm-up already excluded by the caller)."""
  values = [float(v) for v in values]
  return {"median": statistics.median(values), "min": min(values), "max": max(values), "n": len(values)}


def alternate(a, b, repeats: int) -> tuple[list[float], list[float]]:
  """a() and b() (each returning a measurement) in turn, `repeats` times each, in the same process; the order
  flips every round (ABBA...) so a drifting machine biases neither. -> (a's values, b's values)."""
  values_a, values_b = [], []
  for i in range(repeats):
    if i % 2 == 0:
      values_a.append(a())
      values_b.append(b())
    else:
      values_b.append(b())
      values_a.append(a())
  return values_a, values_b


def row(benchmark: str, config: str, measure: str, unit: str, formula: str, values, *, compile_s=None,
        reference: tuple[str, list] | None = None, ratios: list | None = None, target: str = "",
        meets: bool | None = None, notes: str = "") -> dict:
  """One measured row. `ratios`: per-round value/reference of alternating rounds (the stable number on a noisy
  machine); `target` and `meets` say what it is held to."""
  out = {"benchmark": benchmark, "config": config, "measure": measure, "unit": unit, "formula": formula,
         "value": summary(values), "compile_s": compile_s, "target": target, "meets": meets, "notes": notes}
  if reference is not None:
    out["reference"] = {"measure": reference[0], "value": summary(reference[1])}
  if ratios is not None:
    out["ratio"] = summary(ratios)
  return out


def write_json(out: Path, data: dict) -> None:
  """The suite's JSON, replaced atomically (a run killed mid-write leaves the previous one)."""
  out.parent.mkdir(parents=True, exist_ok=True)
  tmp = out.with_name(out.name + ".tmp")
  tmp.write_text(json.dumps(data, indent=2) + "\n")
  tmp.replace(out)


def run_benchmarks(benchmarks: dict, data: dict, out: Path, unavailable: tuple = (), budget_s: float | None = None,
                   started: float = 0.0, clock=time.monotonic) -> None:
  """Each benchmark's function (-> rows, or lists of rows) in turn, its rows added to data["rows"] and data written
  to `out` after every one, so a run cut short keeps what it measured. One that raises an `unavailable` exception
  (no data, GPU or PyTorch here) or fails loses only its own rows: data["unmeasured"] says why. With `budget_s`, a
  benchmark not yet begun when clock() - started >= budget_s is not started (listed as not measured): a suite
  that must fit a short GPU slot gives back what it measured instead of being killed mid-row.

  A hard crash (a segfault, an XLA check failure, an OOM kill) cannot be caught here: so data["running"] names
  the benchmark under way, written before it begins, and data["finished"] lists those that ended (measured,
  listed or skipped); a process that dies leaves both in `out`, and benchmarks.run --continue_from_out goes on."""
  finished = data.setdefault("finished", [])
  for benchmark, fn in benchmarks.items():
    elapsed = clock() - started
    if budget_s is not None and elapsed >= budget_s:
      data["unmeasured"].append(f"{benchmark}: not measured: the suite's budget_s ran out ({elapsed:.0f} s of "
                                f"{budget_s:g} s spent before it began)")
      print(f"{benchmark}: skipped (the suite's budget_s ran out)", flush=True)
      finished.append(benchmark)
      write_json(out, data)
      continue
    data["running"] = benchmark
    write_json(out, data)
    start = clock()
    try:
      made = fn()
    except unavailable as e:
      data["unmeasured"].append(f"{benchmark}: {e}")
      print(f"{benchmark}: not measured ({e})", flush=True)
    except Exception as e:  # a benchmark that breaks loses only its own rows
      data["unmeasured"].append(f"{benchmark}: failed ({type(e).__name__}: {(str(e).splitlines() or [''])[0][:300]})")
      print(f"{benchmark}: FAILED", flush=True)
      traceback.print_exc()
    else:
      made = [r for group in made for r in (group if isinstance(group, list) else [group])]
      data["rows"] += made
      print("\n".join(table(made)[2:]) + f"   [{clock() - start:.0f} s]", flush=True)
    del data["running"]
    finished.append(benchmark)
    write_json(out, data)


def timed_rate(fn, count: int) -> float:
  """count / seconds of fn() (which blocks until its device work is done)."""
  start = time.perf_counter()
  fn()
  return count / (time.perf_counter() - start)


def _number(x: float) -> str:
  if x == 0:
    return "0"
  magnitude = abs(x)
  return f"{x:,.0f}" if magnitude >= 1000 else f"{x:.3g}"


def _value(v: dict) -> str:
  return f"{_number(v['median'])} ({_number(v['min'])}-{_number(v['max'])})" if v["n"] > 1 else _number(v["median"])


def table(rows: list[dict], formulas: bool = False) -> list[str]:
  """Markdown table lines of the rows."""
  head = ["benchmark", "config", "measure", "median (min-max)", "unit", "ratio to reference", "compile s", "target",
          "meets", "notes"] + (["formula"] if formulas else [])
  lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
  for r in rows:
    ratio = f"{_value(r['ratio'])} vs {r['reference']['measure']}" if "ratio" in r else ""
    meets = {True: "yes", False: "**no**", None: "-"}[r["meets"]]
    cells = [r["benchmark"], f"`{r['config']}`", r["measure"], _value(r["value"]), r["unit"], ratio,
             "" if r["compile_s"] is None else f"{r['compile_s']:.1f}", r["target"] or "-", meets, r["notes"]]
    lines.append("| " + " | ".join(cells + ([r["formula"]] if formulas else [])) + " |")
  return lines


def describe(ctx: dict) -> str:
  m, d, v = ctx["machine"], ctx["device"], ctx["versions"]
  return (f"{d['count']} x {d['kind']} ({d['backend']}) on {m['cpu']}, {m['cores']} cores; "
          + ", ".join(f"{k} {x}" for k, x in v.items()))


def write_results_md(results_dir: Path = RESULTS_DIR, path: Path = RESULTS_MD) -> Path:
  """RESULTS.md from every suite's JSON in results_dir (the suites not run keep what they last measured)."""
  lines = ["# Benchmark results", "",
           "Written by `python -m benchmarks.run --suite=cpu|gpu` from `benchmarks/results/<suite>.json`; do not edit.",
           "Each value is the median of repeated measurements (min-max beside it), warm-up excluded, device work",
           "synchronised before the clock is read; ratios are per-round ratios of A and B measured alternately in",
           "one process. Formulas, per row, are in the last column.", ""]
  for file in sorted(results_dir.glob("*.json")):
    lines += section(json.loads(file.read_text()))
  path.write_text("\n".join(lines))
  return path


def section(data: dict) -> list[str]:
  """RESULTS.md's lines for one suite's JSON."""
  lines = [f"## {data['suite']} suite ({data['size']} size), {data['date']}", "", describe(data["context"]), "",
           f"`{data['command']}`", ""]
  lines += table(data["rows"], formulas=True) + [""]
  unmeasured = data.get("unmeasured", []) + ([f"{data['running']}: the process died during it (not continued)"]
                                             if data.get("running") else [])  # a suite whose last try crashed
  if unmeasured:
    lines += ["Not measured in this run: " + "; ".join(unmeasured) + ".", ""]
  return lines
