"""Runs configs and prints a results table against each one's expected number (README's results table).

    python experiments/reproduce.py                      # every reproduction below, in runs/reproduce/
    python experiments/reproduce.py mnist_cnn digits_mlp # some of them
    python experiments/reproduce.py shakespeare_char_gpt:cpu shakespeare_lstm:cpu \
        --config.data.path=/path/to/tinyshakespeare/input.txt   # overrides go to every run

Each row trains (or resumes) configs/<name>.py[:variant] in runs/reproduce/<name> through the normal entry
point, then reads final_metrics.json. Expected values and their sources are in each config's docstring.
"""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# name -> (metric shown, expected, how it is judged)
EXPECTED = {
    "digits_mlp": ("accuracy", ">= 0.96"),
    "mnist_cnn": ("accuracy", ">= 0.990"),
    "mnist_mlp": ("accuracy", "~ 0.982"),
    "fashion_mnist_cnn": ("accuracy", "~ 0.91"),
    "linear_regression": ("coefficients", "w ~ 3.0, b ~ 4.5 (+-0.1)"),
    "spam_transformer": ("accuracy", "> 0.696 (majority class); bag-of-words models ~0.95+"),
    "shakespeare_char_gpt:cpu": ("loss", "~ 1.88 val loss (nanoGPT README, CPU recipe)"),
    "shakespeare_lstm:cpu": ("loss", "above the GPT :cpu loss at the same budget"),
    "shakespeare_char_gpt": ("loss", "~ 1.47 val loss (nanoGPT README; a GPU run)"),
}
GPU_SIZED = {"shakespeare_char_gpt"}  # hours on a CPU: run only when named


def run(name: str, out: Path, overrides: list[str]) -> dict:
  file, _, variant = name.partition(":")
  workdir = out / name.replace(":", "_")
  config = f"--config=configs/{file}.py" + (f":{variant}" if variant else "")
  subprocess.run([sys.executable, "-m", "bigmodel_jax.main", config, f"--workdir={workdir}", *overrides],
                 cwd=ROOT, check=True)
  return json.loads((workdir / "final_metrics.json").read_text())


def main(args: list[str]) -> None:
  names = [a for a in args if not a.startswith("--")]
  overrides = [a for a in args if a.startswith("--")]
  out = ROOT / "runs" / "reproduce"
  rows = ["| config | metric | result | expected |", "|---|---|---|---|"]
  for name in names or [n for n in EXPECTED if n not in GPU_SIZED]:
    metric, expected = EXPECTED[name]
    final = run(name, out, overrides)
    if metric == "coefficients":
      c = final["coefficients"]
      result = f"w {c['weights'][0][0]:.3f}, b {c['bias'][0]:.3f}"
    else:
      result = f"{final[metric]:.4f}"
    rows.append(f"| {name} | {metric} | {result} | {expected} |")
  print("\n".join(rows))


if __name__ == "__main__":
  main(sys.argv[1:])
