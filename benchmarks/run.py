"""The benchmark harness: every benchmark of a suite, one table, a JSON of the rows, RESULTS.md from it.

    python -m benchmarks.run --suite=cpu                      # ~10 min on 2 CPU cores
    python -m benchmarks.run --suite=gpu --out=$OUT/gpu.json   # one H100/H200, < 8 min
    python -m benchmarks.run --suite=cpu --size=tiny --only=host_overhead   # seconds: checks the pieces

Each row states the machine, device kind and count, versions, the config, the formula, the median with min-max
of repeated measurements (warm-up excluded, compile time apart, device work synchronised before the clock is
read). A ratio is measured in this process, alternating A and B round by round (benchmarks/harness.py), so a
noisy shared machine still gives a stable ratio. --out (default benchmarks/results/<suite>.json) gets the JSON;
with the default --out, benchmarks/RESULTS.md is rewritten from every suite's JSON. Targets: issue "Speed
measured against peers and the hardware"; NOTES.md says what was changed, predicted and measured.

The GPU machine has no network: give it tiny Shakespeare (--text=...) and a data dir holding MNIST
(BIGMODEL_JAX_DATA_DIR); a benchmark whose data is missing is listed as unmeasured, and the rest run.
"""

import datetime
import json
import sys
import time
from pathlib import Path

from absl import app, flags

from benchmarks import harness, measures
from bigmodel_jax.errors import UserError

_SUITE = flags.DEFINE_enum("suite", "cpu", ["cpu", "gpu"], "Which benchmarks: the CPU suite or the one-GPU suite.")
_SIZE = flags.DEFINE_enum("size", "full", ["full", "tiny"], "tiny: every piece at a seconds-long size (a check, "
                          "not a measurement).")
_OUT = flags.DEFINE_string("out", "", "Where the JSON goes (default benchmarks/results/<suite>.json, and then "
                           "RESULTS.md is rewritten).")
_ONLY = flags.DEFINE_list("only", [], "Run only these benchmarks of the suite (names as in the table).")
_TEXT = flags.DEFINE_string("text", "", "tiny Shakespeare's input.txt for the language-model rows (default: the "
                            "shared copy beside the checkout where there is one, else fetched).")
_REPEATS = flags.DEFINE_integer("repeats", 0, "Alternating rounds per ratio (default: 3 full, 2 tiny).")

ROOT = Path(__file__).resolve().parents[1]
SHARED_TEXT = ROOT.parent / "shared" / "data" / "tinyshakespeare" / "input.txt"


def suite(name: str, size: str, text: str, repeats: int) -> dict:
  """{benchmark name: a function -> list of rows}, in the order they run."""
  tiny = size == "tiny"
  # steps per measurement: about 5-15 s of each loop on 2 CPU cores
  steps = (lambda c: 40) if tiny else {"digits_mlp": 1000, "mnist_mlp": 600, "mnist_cnn": 300,
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
        "vs_pytorch": lambda: measures.vs_pytorch("mnist_cnn:smoke" if tiny else "mnist_cnn", 20 if tiny else 300,
                                                  repeats),
    }
  return {
      "lm_throughput": lambda: [measures.lm_throughput("tiny" if tiny else "gpt2_124m", 5 if tiny else 300)],
      "nanogpt_shakespeare_char": lambda: [measures.time_to_loss("shakespeare_char_gpt:smoke" if tiny else
                                                                 "shakespeare_char_gpt", text, 1.47)],
      "host_overhead": lambda: [measures.host_overhead(c, steps(c) * (1 if tiny else 10), repeats)
                                for c in (["digits_mlp"] if tiny else ["mnist_cnn"])],
  }


def main(argv):
  del argv
  size, name = _SIZE.value, _SUITE.value
  repeats = _REPEATS.value or (2 if size == "tiny" else 3)
  text = _TEXT.value or (str(SHARED_TEXT) if SHARED_TEXT.is_file() else "")
  benchmarks = suite(name, size, text, repeats)
  unknown = [b for b in _ONLY.value if b not in benchmarks]
  if unknown:
    print(f"error: --only: {', '.join(unknown)} not in the {name} suite; valid: {', '.join(benchmarks)}",
          file=sys.stderr)
    sys.exit(2)
  ctx = harness.context()
  print(harness.describe(ctx), flush=True)
  rows, unmeasured = [], []
  for benchmark, fn in benchmarks.items():
    if _ONLY.value and benchmark not in _ONLY.value:
      continue
    start = time.perf_counter()
    try:
      made = fn()
    except (measures.Unavailable, UserError) as e:  # no data, GPU or PyTorch here: said, and the rest runs
      unmeasured.append(f"{benchmark}: {e}")
      print(f"{benchmark}: not measured ({e})", flush=True)
      continue
    made = [r for group in made for r in (group if isinstance(group, list) else [group])]
    rows += made
    print("\n".join(harness.table(made)[2:]) + f"   [{time.perf_counter() - start:.0f} s]", flush=True)
  now = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
  data = {"suite": name, "size": size, "date": now,
          "command": "python -m benchmarks.run " + " ".join(sys.argv[1:]), "context": ctx, "rows": rows,
          "unmeasured": unmeasured}
  out = Path(_OUT.value) if _OUT.value else harness.RESULTS_DIR / f"{name}.json"
  out.parent.mkdir(parents=True, exist_ok=True)
  out.write_text(json.dumps(data, indent=2) + "\n")
  print("\n" + "\n".join(harness.table(rows)))
  print(f"\nrows: {out}")
  if not _OUT.value and size == "full":
    print(f"written: {harness.write_results_md()}")


if __name__ == "__main__":
  app.run(main)
