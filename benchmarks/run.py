"""The benchmark harness: every benchmark of a suite, one table, a JSON of the rows, RESULTS.md from it.

    python -m benchmarks.run --suite=cpu                      # ~7.5 min on 2 CPU cores
    python -m benchmarks.run --suite=gpu --out=$OUT/gpu.json --text=shared/data/tinyshakespeare/input.txt
    python -m benchmarks.run --import_results=gpu.json        # that JSON into results/ and RESULTS.md
    python -m benchmarks.run --suite=cpu --size=tiny --only=host_overhead   # seconds: checks the pieces

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

The GPU suite runs nanoGPT's shakespeare_char first (the full 5000 steps), then GPT-2 124M throughput, then the
seed CNN (the full loop's images/s and host overhead, then wall clock to 99% test accuracy); at --size=tiny its
language-model rows compute in bfloat16 as the full size does, so a CPU checks the same code path. The GPU machine
has no network: give it tiny Shakespeare (--text=...) and, for the CNN, a data dir holding MNIST
(BIGMODEL_JAX_DATA_DIR).
"""

import datetime
import json
import os
import sys
import tempfile
import time
from pathlib import Path

STARTED = time.monotonic()  # the suite's budget counts from here: imports and JAX's start-up included

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
  ctx = harness.context()
  print(harness.describe(ctx), flush=True)
  now = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
  data = {"suite": name, "size": size, "date": now, "command": "python -m benchmarks.run " + " ".join(sys.argv[1:]),
          "context": ctx, "rows": [], "unmeasured": []}
  budget = _BUDGET.value if _BUDGET.value is not None else (GPU_BUDGET_S if name == "gpu" and size == "full" else None)
  budget = budget if budget is not None and budget >= 0 else None
  data["budget_s"] = budget
  chosen = {b: fn for b, fn in benchmarks.items() if not _ONLY.value or b in _ONLY.value}
  harness.run_benchmarks(chosen, data, out, (measures.Unavailable, UserError), budget, STARTED)
  print("\n" + "\n".join(harness.table(data["rows"])))
  print(f"\nrows: {out}")
  if complete and not _OUT.value:
    print(f"written: {harness.write_results_md()}")
  if data["unmeasured"]:
    print("not measured: " + "; ".join(data["unmeasured"]), file=sys.stderr)
    sys.exit(3)  # the rows that did run are written; a missing row is not a success


if __name__ == "__main__":
  app.run(main)
