"""Runs configs and prints a results table against each one's expected number (README's results table).

    python experiments/reproduce.py                      # every reproduction below, in runs/reproduce/
    python experiments/reproduce.py mnist_cnn digits_mlp # some of them

Each row trains (or resumes) configs/<name>.py in runs/reproduce/<name> through the normal entry point,
then reads final_metrics.json. Expected values and their sources are in each config's docstring.
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
}


def run(name: str, out: Path) -> dict:
  workdir = out / name
  subprocess.run([sys.executable, "-m", "bigmodel_jax.main", f"--config=configs/{name}.py", f"--workdir={workdir}"],
                 cwd=ROOT, check=True)
  return json.loads((workdir / "final_metrics.json").read_text())


def main(names: list[str]) -> None:
  out = ROOT / "runs" / "reproduce"
  rows = ["| config | metric | result | expected |", "|---|---|---|---|"]
  for name in names or list(EXPECTED):
    metric, expected = EXPECTED[name]
    final = run(name, out)
    if metric == "coefficients":
      c = final["coefficients"]
      result = f"w {c['weights'][0][0]:.3f}, b {c['bias'][0]:.3f}"
    else:
      result = f"{final[metric]:.4f}"
    rows.append(f"| {name} | {metric} | {result} | {expected} |")
  print("\n".join(rows))


if __name__ == "__main__":
  main(sys.argv[1:])
