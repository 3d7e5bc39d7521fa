"""The benchmark harness: every benchmark of a suite, one table, a JSON of the rows, RESULTS.md from it.

    python -m benchmarks.run --suite=cpu                      # ~7.5 min on 2 CPU cores
    python -m benchmarks.run --suite=gpu --out=$OUT/gpu.json --text=shared/data/tinyshakespeare/input.txt
    python -m benchmarks.run --import_results=gpu.json        # that JSON into results/ and RESULTS.md
    python -m benchmarks.run --suite=cpu --size=tiny --only=host_overhead   # seconds: checks the pieces
    python -m benchmarks.run --suite=gpu --out=$OUT/gpu.json --continue_from_out --previous_status=139  # after a crash

Each row states the machine, device kind and count, versions, the config, the formula, the median with min-max
of repeated measurements (warm-up excluded, compile time apart, device work synchronised before the clock is
read). A ratio is measured in this process, alternating A and B round by round (benchmarks/harness.py), so a
noisy shared machine still gives a stable ratio. The JSON is rewritten after every benchmark (a run cut short
keeps what it measured) to --out, or, for a whole full-size run, to benchmarks/results/<suite>.json, and then
benchmarks/RESULTS.md is rewritten from every suite's JSON (tiny and --only runs go to the temp dir). A
benchmark that cannot run (no data, no PyTorch) or fails is listed as not measured, the rest run, and the exit
status is 3. --budget_s (default 450 s for the full-size GPU suite, which must finish in an 8-minute slot; none
otherwise) stops starting benchmarks once that many seconds have passed since the harness started: the ones left
are listed as not measured (the suite's budget_s ran out), the rows measured are kept. Targets: issue "Speed measured
against peers and the hardware"; NOTES.md says what was changed, predicted and measured.

A hard crash in one benchmark (a segfault, an XLA check failure, an OOM kill) cannot be caught in the process it
kills, and would lose the benchmarks after it for that slot. So before each benchmark the JSON names it ("running"),
and it records the wall-clock start of the suite ("started_unix"), the benchmarks chosen ("benchmarks") and those
that ended ("finished"). --continue_from_out goes on from the JSON at --out, in a new process: its rows and
not-measured entries are kept, the benchmark that was running is listed as not measured (the process died during
it; --previous_status, the status the shell saw, says how), every benchmark that ended is skipped, and the rest run
under the same budget_s, counted from the first process's start. A JSON of another suite, size or --only, or one
that cannot be continued, is refused (exit 2). benchmarks/gpu_slot.sh run does this after a crash, twice at most.

The GPU suite runs nanoGPT's shakespeare_char first (the full 5000 steps), then GPT-2 124M throughput, then the
seed CNN (the full loop's images/s and host overhead, then wall clock to 99% test accuracy); at --size=tiny its
language-model rows compute in bfloat16 as the full size does, so a CPU checks the same code path. The GPU machine
has no network: give it tiny Shakespeare (--text=...) and, for the CNN, a data dir holding MNIST
(BIGMODEL_JAX_DATA_DIR).
"""

import datetime
import json
import os
import signal
import sys
import tempfile
import time
from pathlib import Path

STARTED = time.monotonic()  # the suite's budget counts from here: imports and JAX's start-up included
STARTED_UNIX = time.time()  # the same moment on the wall clock, in the JSON: a continuation's budget counts from it

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")  # the runs it starts need GPU memory too

from absl import app, flags  # noqa: E402

from benchmarks import harness, measures, vs_pytorch  # noqa: E402
from bigmodel_jax.errors import UserError, writable_directory  # noqa: E402

_SUITE = flags.DEFINE_enum("suite", "cpu", ["cpu", "gpu"], "Which benchmarks: the CPU suite or the one-GPU suite.")
_SIZE = flags.DEFINE_enum("size", "full", ["full", "tiny"], "tiny: every piece at a seconds-long size (a check, "
                          "not a measurement).")
_OUT = flags.DEFINE_string("out", "", "Where the JSON goes (default benchmarks/results/<suite>.json, and then "
                           "RESULTS.md is rewritten).")
_ONLY = flags.DEFINE_list("only", [], "Run only these benchmarks of the suite (names as in the table).")
_TEXT = flags.DEFINE_string("text", "", "tiny Shakespeare's input.txt for the language-model rows (default: the "
                            "shared copy beside the checkout where there is one; else those rows are not measured).")
_IMPORT = flags.DEFINE_string("import_results", "", "A suite's JSON written elsewhere (--out on a GPU machine): "
                              "copied into benchmarks/results/ and RESULTS.md rewritten; nothing is run.")
_REPEATS = flags.DEFINE_integer("repeats", 0, "Alternating rounds per ratio (default: 3 full, 2 tiny).")
_BUDGET = flags.DEFINE_float("budget_s", None, "Seconds the suite may take: no benchmark starts after them (the rest "
                             "are listed as not measured). Default: 450 for the full --suite=gpu, else none; "
                             "negative: none.")
_CONTINUE = flags.DEFINE_bool("continue_from_out", False, "Continue the suite whose JSON --out holds, after its "
                               "process died: its rows kept, the benchmark it died in listed as not measured, the "
                               "ones not begun run within its budget_s, counted from its start.")
_PREVIOUS = flags.DEFINE_integer("previous_status", None, "With --continue_from_out: the exit status the shell saw "
                                 "when the earlier process ended (128+N, or -N: signal N), named in the reason.")
GPU_BUDGET_S = 450  # of an 8-minute slot: the check does not predict a benchmark's length, the last begun finishes

ROOT = Path(__file__).resolve().parents[1]
SHARED_TEXT = ROOT.parent / "shared" / "data" / "tinyshakespeare" / "input.txt"


def suite(name: str, size: str, text: str, repeats: int) -> dict:
  """{benchmark name: a function -> list of rows}, in the order they run."""
  tiny = size == "tiny"
  # steps per measurement: about 1-15 s of each loop on 2 CPU cores; host_overhead takes at least
  # measures.window_steps (mnist_mlp 1100, mnist_cnn 1200): its timed window holds a checkpoint save
  steps = (lambda c: 40) if tiny else {"digits_mlp": 2000, "mnist_mlp": 600, "mnist_cnn": 600,
                                       "shakespeare_char_gpt:cpu": 120}.get
  if name == "cpu":
    overhead = ["digits_mlp"] if tiny else ["digits_mlp", "mnist_mlp", "mnist_cnn"]
    return {
        "host_overhead": lambda: [measures.host_overhead(c, steps(c), repeats) for c in overhead],
        "input_pipeline": lambda: [measures.input_pipeline(c, steps(c), repeats, text)
                                   for c in (["digits_mlp"] if tiny else ["mnist_cnn", "shakespeare_char_gpt:cpu"])],
        "time_to_first_step": lambda: measures.time_to_first_step("digits_mlp:smoke" if tiny else "mnist_cnn:smoke",
                                                                  repeats=1 if tiny else 2),
        "checkpoint_stall": lambda: [measures.checkpoint_stall(c, repeats, text)
                                     for c in (["shakespeare_char_gpt:smoke"] if tiny
                                               else ["shakespeare_char_gpt:cpu", "shakespeare_char_gpt"])],
        "lm_throughput": lambda: [measures.lm_throughput("tiny" if tiny else "cpu", 5 if tiny else 30)],
        "vs_pytorch": lambda: vs_pytorch.vs_pytorch("mnist_cnn:smoke" if tiny else "mnist_cnn", 20 if tiny else 300,
                                                    repeats),
        "vs_pytorch_gpt": lambda: vs_pytorch.vs_pytorch("shakespeare_char_gpt:smoke" if tiny else
                                                        "shakespeare_char_gpt:cpu", 20 if tiny else 150, repeats, text),
        "time_to_accuracy": lambda: vs_pytorch.time_to_accuracy("mnist_cnn:smoke" if tiny else "mnist_cnn",
                                                                0.5 if tiny else 0.99, 50 if tiny else -1),
    }
  return {  # the longest and most wanted first: a run cut short still has it
      "nanogpt_shakespeare_char": lambda: [measures.time_to_loss(  # tiny: in bfloat16, as the full recipe
          "shakespeare_char_gpt:smoke" if tiny else "shakespeare_char_gpt", text, 1.47,
          ("--config.train.dtype=bfloat16",) if tiny else ())],
      "lm_throughput": lambda: [measures.lm_throughput("tiny" if tiny else "gpt2_124m", 5 if tiny else 300,
                                                       dtype=measures.LM_SIZES["gpt2_124m"][-1])],
      "host_overhead": lambda: [measures.host_overhead(c, steps(c) * (1 if tiny else 10), repeats, images=True)
                                for c in (["digits_mlp"] if tiny else ["mnist_cnn"])],
      "time_to_accuracy": lambda: vs_pytorch.time_to_accuracy("mnist_cnn:smoke" if tiny else "mnist_cnn",
                                                              0.5 if tiny else 0.99, 50 if tiny else -1, pytorch=False),
  }


def fail(message: str):
  print(f"error: {message}", file=sys.stderr)
  sys.exit(2)


def imported(path: Path) -> dict:
  """A full-size suite's JSON, checked before anything is written: results/ only ever holds whole full-size runs
  of a known suite, which RESULTS.md can be rendered from (a bad file would break every later import)."""
  try:
    data = json.loads(path.read_text())
  except (OSError, UnicodeDecodeError, ValueError) as e:
    fail(f"--import_results: cannot read {path} as JSON ({getattr(e, 'strerror', None) or e})")
  if not isinstance(data, dict) or data.get("suite") not in ("cpu", "gpu"):
    fail(f"--import_results: {path} is not a suite's JSON (its 'suite' must be cpu or gpu): give the file a "
         "benchmarks.run --out wrote")
  if data.get("size") != "full":
    fail(f"--import_results: {path} holds a {data['size']!r}-size run; only a full-size run goes into benchmarks/"
         f"results/ (the {data['suite']} suite without --size=tiny)" if "size" in data else
         f"--import_results: {path} has no 'size'; give the file a benchmarks.run --out wrote")
  if not isinstance(data.get("rows"), list) or not isinstance(data.get("unmeasured", []), list):
    fail(f"--import_results: {path} has no list of rows")
  try:
    harness.section(data)  # what RESULTS.md renders from it
  except (KeyError, TypeError, AttributeError) as e:
    fail(f"--import_results: {path} is not a benchmarks.run JSON (missing or malformed {e}); nothing was written")
  return data


def died(status: int | None) -> str:
  """Why the benchmark a process was running is not measured, from the status the shell saw."""
  if status is None:
    return "the process ended while it ran (its exit status was not passed)"
  number = status - 128 if status > 128 else -status if status < 0 else None
  if number not in signal.valid_signals():  # an exit status above 128 that no signal gives (255: exit(-1))
    number = None
  try:
    name = f", {signal.Signals(number).name}" if number else ""
  except ValueError:  # a real-time signal
    name = ""
  return f"the process died during it (exit status {status}" + (f": signal {number}{name})" if number else ")")


def continued(out: Path, name: str, size: str, only: list[str], benchmarks: dict, status: int | None) -> dict:
  """The JSON at --out, checked to be this suite's and size's, made ready to go on: the benchmark it was running
  listed as not measured, so that it is skipped (run again, it would most likely crash again)."""
  try:
    data = json.loads(out.read_text())
  except (OSError, UnicodeDecodeError, ValueError) as e:
    fail(f"--continue_from_out: cannot read {out} as JSON ({getattr(e, 'strerror', None) or e})")
  if not isinstance(data, dict) or (data.get("suite"), data.get("size")) != (name, size):
    held = f"the {data.get('suite')} suite at {data.get('size')} size" if isinstance(data, dict) else "no suite"
    fail(f"--continue_from_out: {out} holds {held}, not --suite={name} --size={size}: continue a run with the "
         "flags it was started with")
  plan = data.get("benchmarks")
  try:
    harness.section(data)  # what RESULTS.md renders from it, once imported
    whole = (isinstance(data["rows"], list) and isinstance(data["unmeasured"], list)
             and isinstance(data["finished"], list) and isinstance(data["started_unix"], (int, float))
             and isinstance(plan, list) and set(plan) <= set(benchmarks))
  except (KeyError, TypeError, AttributeError):
    whole = False
  if not whole:
    fail(f"--continue_from_out: {out} was not written by a benchmarks.run that can be continued (its rows, "
         "unmeasured, finished, started_unix or benchmarks of this suite are missing or malformed)")
  if only and set(only) != set(plan):
    fail(f"--continue_from_out: {out} is a run of --only={','.join(plan)}; give the same --only, or none")
  if data.get("running"):
    data["unmeasured"].append(f"{data['running']}: not measured: {died(status)}")
    data["finished"].append(data.pop("running"))
  return data


def writable(out: Path) -> None:
  if out.is_dir():
    fail(f"--out: {out} is a directory; give a file path")
  try:
    writable_directory(out.parent, "--out", f"{out.name} ", "give a writable path")
  except UserError as e:
    fail(str(e))


def main(argv):
  del argv
  if _IMPORT.value:  # a suite run elsewhere (the GPU machine's $OUT): into results/ and RESULTS.md
    data = imported(Path(_IMPORT.value))
    harness.write_json(harness.RESULTS_DIR / f"{data['suite']}.json", data)
    print(f"written: {harness.write_results_md()}")
    return
  size, name = _SIZE.value, _SUITE.value
  repeats = _REPEATS.value or (2 if size == "tiny" else 3)
  text = _TEXT.value or (str(SHARED_TEXT) if SHARED_TEXT.is_file() else "")
  benchmarks = suite(name, size, text, repeats)
  unknown = [b for b in _ONLY.value if b not in benchmarks]
  if unknown:
    fail(f"--only: {', '.join(unknown)} not in the {name} suite; valid: {', '.join(benchmarks)}")
  complete = size == "full" and not _ONLY.value  # only a whole full-size run replaces results/<suite>.json
  out = Path(_OUT.value) if _OUT.value else (harness.RESULTS_DIR / f"{name}.json" if complete else
                                             Path(tempfile.gettempdir()) / f"benchmarks-{name}-{size}.json")
  writable(out)  # before anything is measured: a run must not end in a path it cannot write
  if _PREVIOUS.value is not None and not _CONTINUE.value:
    fail("--previous_status: only with --continue_from_out (the status of the process whose JSON it continues)")
  command = "python -m benchmarks.run " + " ".join(sys.argv[1:])
  if _CONTINUE.value:  # a process that died mid-suite: its JSON, its budget, the benchmarks it did not end
    data = continued(out, name, size, _ONLY.value, benchmarks, _PREVIOUS.value)
    data.setdefault("continuations", []).append(command)
    budget = data.get("budget_s") if _BUDGET.value is None else _BUDGET.value
    started = STARTED - (STARTED_UNIX - data["started_unix"])  # on the monotonic clock: the first process's start
    chosen = {b: benchmarks[b] for b in data["benchmarks"] if b not in data["finished"]}
    harness.write_json(out, data)  # the benchmark it died in is listed, whatever happens next
    print(harness.describe(data["context"]) + f"\ncontinuing {out}: {', '.join(chosen) or 'nothing'} left to run",
          flush=True)
  else:
    ctx = harness.context()
    print(harness.describe(ctx), flush=True)
    now = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    chosen = {b: fn for b, fn in benchmarks.items() if not _ONLY.value or b in _ONLY.value}
    data = {"suite": name, "size": size, "date": now, "command": command, "context": ctx, "rows": [],
            "unmeasured": [], "started_unix": STARTED_UNIX, "benchmarks": list(chosen), "finished": []}
    budget = _BUDGET.value if _BUDGET.value is not None else (GPU_BUDGET_S if name == "gpu" and size == "full"
                                                              else None)
    started = STARTED
  budget = budget if budget is not None and budget >= 0 else None
  data["budget_s"] = budget
  harness.run_benchmarks(chosen, data, out, (measures.Unavailable, UserError), budget, started)
  print("\n" + "\n".join(harness.table(data["rows"])))
  print(f"\nrows: {out}")
  if complete and not _OUT.value:
    print(f"written: {harness.write_results_md()}")
  if data["unmeasured"]:
    print("not measured: " + "; ".join(data["unmeasured"]), file=sys.stderr)
    sys.exit(3)  # the rows that did run are written; a missing row is not a success


if __name__ == "__main__":
  app.run(main)
