"""Run diffs: python -m bigmodel_jax.compare RUN_A RUN_B [...] [--out=PATH]

RUN_* are workdirs of bigmodel_jax.main runs (a sweep's trial directories are runs too). Prints the config fields
that differ, the final metrics side by side with their differences from the first run (final_metrics.json:
validation, test, the best validation value and its step), whether the final parameters are bit-identical
(params_sha256), and writes the train loss and validation metric curves of every run into one PNG (--out:
a file, or a directory to put compare.png in; default ./compare.png). Bad input: one line on stderr, exit 2.
"""

import argparse
import json
import os
import sys
from pathlib import Path

from bigmodel_jax import config as config_lib, errors
from bigmodel_jax.errors import UserError
from bigmodel_jax.sweeps.trials import read_json
from bigmodel_jax.trackers import final_values

USAGE = "python -m bigmodel_jax.compare RUN_A RUN_B [...] [--out=PATH]"


class RunRecords:
  """What one run directory holds for a comparison."""

  def __init__(self, label: str, path: Path):
    from bigmodel_jax.workdir import saved_config
    self.label, self.path = label, path
    if not path.exists():
      raise UserError(f"RUN: {path} does not exist; pass the --workdir of a bigmodel_jax.main run")
    config = saved_config(path) if path.is_dir() else None
    if config is None:
      inside = sorted(p.parent.name for p in path.glob("*/config.json"))
      hint = f"; it holds runs: {', '.join(inside[:5])}{' ...' if len(inside) > 5 else ''}" if inside else ""
      raise UserError(f"RUN: {path} is not a run directory (no config.json); pass the --workdir of a "
                      f"bigmodel_jax.main run{hint}")
    self.config = config_lib.flatten(config)
    final = path / "final_metrics.json"
    self.final = read_json(final)
    if self.final is None and final.exists():
      raise UserError(f"RUN: {final} is not a JSON object of metrics (damaged?); relaunch the run's command: a "
                      "finished run evaluates again and rewrites it")
    self.records = []
    if (path / "metrics.jsonl").exists():
      try:
        text = (path / "metrics.jsonl").read_text(errors="replace")
      except OSError as e:
        raise UserError(f"RUN: {path / 'metrics.jsonl'} cannot be read ({e.strerror or e}); restore it or move it "
                        "away") from None
      for line in text.splitlines():
        try:
          record = json.loads(line)
        except json.JSONDecodeError:
          continue  # a line cut short by a kill
        if isinstance(record, dict) and "split" in record and isinstance(record.get("step"), int):
          self.records.append(record)

  @property
  def last_step(self) -> int | None:
    return max((r["step"] for r in self.records), default=None)


def label(i: int) -> str:
  return chr(ord("A") + i) if i < 26 else f"R{i + 1}"


def show(value) -> str:
  if isinstance(value, float):
    return f"{value:.6g}"
  if value is None:
    return "-"
  return value if isinstance(value, str) and value else json.dumps(value)


def table(header: list[str], rows: list[list[str]]) -> list[str]:
  widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
  return ["  ".join(cell.ljust(w) if i == 0 else cell.rjust(w) for i, (cell, w) in enumerate(zip(r, widths))).rstrip()
          for r in [header, *rows]]


def config_section(runs: list[RunRecords]) -> list[str]:
  keys = sorted(set().union(*(r.config for r in runs)))
  differ = [k for k in keys if len({json.dumps(r.config.get(k, "<absent>")) for r in runs}) > 1]
  if not differ:
    return ["config: identical"]
  lines = [f"config: {len(differ)} {'fields differ' if len(differ) > 1 else 'field differs'}"
           + (" (runtime: may change on resume, not what the run computes)" if any(map(config_lib.is_runtime_field, differ)) else "")]
  differ.sort(key=config_lib.is_runtime_field)  # what changes the numbers first
  name = lambda k: k + (" (runtime)" if config_lib.is_runtime_field(k) else "")
  if len(runs) == 2:
    a, b = runs
    return lines + [f"  {name(k)}: {show(a.config.get(k, '<absent>'))} -> {show(b.config.get(k, '<absent>'))}"
                    for k in differ]
  rows = [[name(k), *(show(r.config.get(k, "<absent>")) for r in runs)] for k in differ]
  return lines + ["  " + line for line in table(["field", *(r.label for r in runs)], rows)]


def metrics_section(runs: list[RunRecords]) -> list[str]:
  """final_metrics.json side by side: every number, and each run's difference from the first run."""
  values, lines = [], []
  for r in runs:
    if r.final is None:
      at = f" (metrics.jsonl ends at step {r.last_step})" if r.last_step is not None else ""
      lines.append(f"{r.label}: no final_metrics.json yet: training has not finished{at}")
      values.append({})
      continue
    numbers, labels = final_values(r.final)
    values.append({"step": r.final.get("step"),
                   **{k.removeprefix("final/"): v for k, v in {**numbers, **labels}.items()}})
  keys = list(dict.fromkeys(k for v in values for k in v if k != "params_sha256"))
  if not keys:
    return lines
  task = [r.config.get("task.name") for r in runs]  # another task's loss (squared error, not cross-entropy) and
  for r, t in zip(runs[1:], task[1:]):              # metrics are not the same measures: only counts are differenced
    if t != task[0]:
      lines.append(f"{r.label}: task {t}, not {runs[0].label}'s {task[0]}: its metrics get no difference")
  header = ["metric"]
  for i, r in enumerate(runs):
    header += [r.label] if i == 0 else [r.label, f"{r.label}-{runs[0].label}"]
  rows = []
  for k in keys:
    row, first = [k], values[0].get(k)
    for i, v in enumerate(values):
      row.append(show(v.get(k)))
      if i:
        numeric = all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in (first, v.get(k)))
        # best/* of runs that select on different metrics or evaluators are not the same measure
        same = not k.startswith("best/") or all(values[0].get(f"best/{f}") == v.get(f"best/{f}")
                                                for f in ("metric", "eval", "mode"))
        same = same and (task[i] == task[0] or k in ("step", "best_step", "num_params"))
        row.append(f"{v[k] - first:+.4g}" if numeric and same else "")
    rows.append(row)
  return ["metrics (final_metrics.json):", *lines, *("  " + line for line in table(header, rows))]


def params_section(runs: list[RunRecords]) -> list[str]:
  """Bit-identical final parameters share a params_sha256."""
  groups: dict[str, list[str]] = {}
  missing, damaged = [], []
  for r in runs:
    sha = (r.final or {}).get("params_sha256")
    if isinstance(sha, str) and sha:
      groups.setdefault(sha, []).append(r.label)
    else:  # a number or a list (a hand edit) is no digest
      (missing if sha is None else damaged).append(r.label)
  lines = []
  if len(groups) == 1 and not missing and not damaged:
    lines.append(f"parameters: bit-identical (params_sha256 {next(iter(groups))[:12]}...)")
  elif groups:
    same = "; ".join(f"{' = '.join(g)} ({sha[:12]}...)" for sha, g in groups.items())
    lines.append(f"parameters: {'all different' if all(len(g) == 1 for g in groups.values()) else 'differ'}: {same}")
  if missing:
    lines.append(f"parameters of {', '.join(missing)}: unknown (no params_sha256: training has not finished)")
  if damaged:
    lines.append(f"parameters of {', '.join(damaged)}: unknown (final_metrics.json's params_sha256 is not a digest)")
  return lines


def curve_metric(runs: list[RunRecords]) -> tuple[str, str]:
  """(evaluator, metric) to plot beside the train loss: the first run's selection (validation accuracy by default),
  else validation or test loss where the records have no such evaluator."""
  c = runs[0].config
  for evaluator, metric in ((c.get("train.best_eval"), c.get("train.best_metric")), ("validation", "loss"),
                            ("test", c.get("train.best_metric")), ("test", "loss")):
    if evaluator and any(_evaluator(rec) == evaluator and metric in rec for r in runs for rec in r.records):
      return evaluator, metric
  return "validation", c.get("train.best_metric") or "loss"


def _evaluator(record: dict) -> str | None:
  """The evaluator a training run's metrics.jsonl line comes from (None: train, startup, --mode=eval lines)."""
  if record["split"] in ("train", "startup", "eval"):
    return None
  return record.get("eval", record["split"])


def plot(runs: list[RunRecords], path: Path) -> Path:
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  evaluator, metric = curve_metric(runs)
  fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
  for r in runs:
    name = f"{r.label}: {r.path.name}"
    train = [(rec["step"], rec["loss"]) for rec in r.records if rec["split"] == "train" and "loss" in rec]
    evals = [(rec["step"], rec[metric]) for rec in r.records if _evaluator(rec) == evaluator and metric in rec]
    for ax, points in ((left, train), (right, evals)):
      if points:
        ax.plot(*zip(*points), marker="." if len(points) < 30 else None, label=name)
  for ax, title in ((left, "train loss"), (right, f"{evaluator} {metric}")):
    ax.set_title(title)
    ax.set_xlabel("step")
    ax.grid(alpha=0.3)
    if ax.get_lines():
      ax.legend(fontsize=8)
  fig.tight_layout()
  try:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
  except OSError as e:
    raise UserError(f"--out: cannot write {path} ({e.strerror or e}); give a writable path") from None
  finally:
    plt.close(fig)
  return path


def compare(paths: list[str], out: str = "compare.png") -> list[str]:
  """The report's lines; writes the curves PNG (out: a file, or a directory for compare.png)."""
  if len(paths) < 2:
    raise UserError(f"compare needs at least two runs, got {len(paths)}; usage: {USAGE}")
  runs = [RunRecords(label(i), Path(p)) for i, p in enumerate(paths)]
  if not out:
    raise UserError("--out: empty; give a file for the curves (compare.png) or a directory to put it in")
  target = Path(out)
  if target.is_dir() or not target.suffix or out.endswith(("/", os.sep)):  # a directory to put compare.png in
    target = target / "compare.png"
  from matplotlib.backends.backend_agg import FigureCanvasAgg
  formats = FigureCanvasAgg.get_supported_filetypes()
  if target.suffix.lower().lstrip(".") not in formats:
    raise UserError(f"--out={out}: the curves are a picture: end the file name in .{', .'.join(formats)} (or give a "
                    "directory)")
  lines = ["runs:", *(f"  {r.label}: {r.path}" for r in runs)]
  lines += config_section(runs) + metrics_section(runs) + params_section(runs)
  lines.append(f"curves: {plot(runs, target)}")
  return lines


class _Parser(argparse.ArgumentParser):
  def error(self, message):  # one line, like every other bad input
    raise UserError(f"{message}; usage: {USAGE}")


def main(argv: list[str] | None = None) -> int:
  parser = _Parser(prog="python -m bigmodel_jax.compare", description=__doc__.split("\n\n")[1],
                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("runs", nargs="*", metavar="RUN", help="run directories (workdirs), two or more")
  parser.add_argument("--out", default="compare.png",
                      help="the curves picture (.png, or .pdf/.svg), or a directory to write compare.png in")
  try:
    args = parser.parse_args(argv)
    lines = compare(args.runs, args.out)
  except UserError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  try:
    print("\n".join(lines), flush=True)
  except BrokenPipeError:  # | head
    print(f"error: {errors.closed_stdout('before all of it was printed')}", file=sys.stderr)
    return 141
  return 0


if __name__ == "__main__":
  sys.exit(main())
