"""A sweep's results, from its manifest and the trials' run records.

results.csv: one row per trial (overrides, the selected validation value and the test value beside it, every
final validation and test metric, best step, wall time, status, error line). results.md: trials grouped over
seeds (mean ± std, n), sorted by the validation metric, the best group named with its test metric beside it.
plots/: the validation metric against each swept hyperparameter (error bars over seeds) and every trial's
validation curve. Selection reads validation metrics only; test metrics are reported, never selected on.
"""

import csv
import dataclasses
import json
import math
import re
from pathlib import Path

import numpy as np

from bigmodel_jax.sweeps import trials as trials_lib
from bigmodel_jax.sweeps.spec import format_value

SEED = "seed"
PLOTS = "plots"
MAX_TICKS = 10


@dataclasses.dataclass
class Row:
  name: str
  status: str
  in_sweep: bool
  overrides: dict
  value: float | None  # the validation value selected on
  test: float | None  # the test value beside it
  step: int | None  # the step it comes from (the best checkpoint's, for a finished trial)
  final: dict
  wall_s: float
  error: str
  curve: list  # [(step, validation value)] from metrics.jsonl


def _finite(x) -> bool:
  return isinstance(x, (int, float)) and math.isfinite(x)


def rows(workdir: Path, data: dict) -> list[Row]:
  metric, mode, eval_name = data["metric"], data["mode"], data.get("eval", "validation")
  out = []
  for name, entry in data["trials"].items():
    directory = Path(workdir) / name
    records = [r for r in trials_lib.read_metrics(directory) if trials_lib.is_selection_record(r, eval_name)]
    curve = [(r["step"], r[metric]) for r in records if _finite(r.get(metric))]
    final = trials_lib.read_json(directory / trials_lib.FINAL)
    if final is not None:
      status, (value, test, step) = "done", trials_lib.selection(final, metric, mode)
    else:  # an unfinished trial: its latest validation value, for the CSV only
      # a trial recorded as done whose final_metrics.json no longer reads: unfinished (a sweep launch reruns it)
      status, test = "incomplete" if entry["status"] == "done" else entry["status"], None
      value, step = (curve[-1][1], curve[-1][0]) if curve else (None, None)
    out.append(Row(name, status, entry.get("in_sweep", True), entry.get("overrides", {}), value, test, step,
                   final or {}, entry.get("wall_s", 0.0), entry.get("error", ""), curve))
  return out


def _keys(rows: list[Row], seed: bool = True) -> list[str]:
  keys = []
  for row in rows:
    keys += [k for k in row.overrides if k not in keys and (seed or k != SEED)]
  return keys


def _scalars(section) -> list[str]:
  return [k for k, v in (section or {}).items() if _finite(v)]


def write_csv(path: Path, rows: list[Row], data: dict) -> Path:
  metric, keys = data["metric"], _keys(rows)
  validation = sorted({k for r in rows for k in _scalars(r.final.get("validation"))})
  test = sorted({k for r in rows for k in _scalars(r.final.get("test"))})
  header = ["trial", "status", "in_sweep", *keys, f"validation_{metric}", f"test_{metric}", "best_step",
            *(f"validation.{k}" for k in validation), *(f"test.{k}" for k in test), "final_step", "wall_s", "error"]
  with open(path, "w", newline="") as f:
    writer = csv.writer(f)
    writer.writerow(header)
    for r in rows:
      writer.writerow([r.name, r.status, r.in_sweep,
                       *(format_value(r.overrides[k]) if k in r.overrides else "" for k in keys),
                       r.value, r.test, r.step, *((r.final.get("validation") or {}).get(k) for k in validation),
                       *((r.final.get("test") or {}).get(k) for k in test), r.final.get("step"), r.wall_s, r.error])
  return path


@dataclasses.dataclass
class Group:
  overrides: dict  # without the seed
  rows: list
  repeats: list = dataclasses.field(default_factory=list)  # finished again with a seed already in rows: not counted

  def stats(self, attr: str) -> tuple[float, float, int]:
    values = np.array([getattr(r, attr) for r in self.rows if _finite(getattr(r, attr))], dtype=float)
    if not len(values):
      return math.nan, math.nan, 0
    return float(values.mean()), float(values.std(ddof=1)) if len(values) > 1 else math.nan, len(values)

  @property
  def in_sweep(self) -> bool:
    return all(r.in_sweep for r in self.rows)


def groups(rows: list[Row], mode: str) -> list[Group]:
  """Finished trials that differ only in their seed, together; best first by mean validation value. A trial of a
  setting and seed already there (a search may ask one setting twice) is the same run again, bit for bit: it is
  kept apart as a repeat, not counted as one more run (n would grow and the std shrink with no new evidence)."""
  by_key = {}
  for r in rows:
    if r.status == "done" and _finite(r.value):
      rest = {k: v for k, v in r.overrides.items() if k != SEED}  # trials removed from the sweep group apart
      group = by_key.setdefault(json.dumps([rest, r.in_sweep], sort_keys=True), Group(rest, []))
      seen = any(o.overrides.get(SEED) == r.overrides.get(SEED) for o in group.rows)
      (group.repeats if seen else group.rows).append(r)
  return sorted(by_key.values(), key=lambda g: g.stats("value")[0], reverse=mode == "max")


def _mean_std(mean: float, std: float) -> str:
  if not math.isfinite(mean):
    return "–"
  return f"{mean:.4g} ± {std:.2g}" if math.isfinite(std) else f"{mean:.4g}"


def _test(group: Group, n: int) -> str:
  """The test mean ± std, with its own count where fewer seeds have one (a best checkpoint deleted, say)."""
  tm, ts, tn = group.stats("test")
  return _mean_std(tm, ts) + (f" (n={tn})" if tn != n and math.isfinite(tm) else "")


def _cell(value) -> str:
  return format_value(value).replace("|", "\\|")


def _described(overrides: dict, labels: dict) -> str:
  return ", ".join(f"{labels.get(k, k)}={format_value(v)}" for k, v in overrides.items()) or "the base config"


def write_markdown(path: Path, rows: list[Row], data: dict, plots: list[Path]) -> Path:
  metric, mode, labels = data["metric"], data["mode"], data.get("labels", {})
  ranked = groups(rows, mode)
  keys = _keys([r for g in ranked for r in g.rows], seed=False)
  counts = {}
  for r in rows:
    counts[r.status] = counts.get(r.status, 0) + 1
  base = data.get("identity", {}).get("base", "?")
  lines = [f"# Sweep `{data.get('name', '?')}` on {base}", "",
           f"{len(rows)} trials: " + ", ".join(f"{n} {s}" for s, n in sorted(counts.items())) +
           f". Selected on validation {metric} ({mode}), mean ± std over seeds (n runs each); test {metric} is "
           "reported beside it, never selected on.", ""]
  removed = any(not g.in_sweep for g in ranked)
  header = [labels.get(k, k) for k in keys] + [f"validation {metric}", f"test {metric}", "n"] + \
      (["note"] if removed else [])
  lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
  for g in ranked:
    vm, vs, n = g.stats("value")
    cells = [_cell(g.overrides[k]) if k in g.overrides else "–" for k in keys] + \
        [_mean_std(vm, vs), _test(g, n), str(n)] + (["" if g.in_sweep else "not in the current sweep"]
                                                           if removed else [])
    lines.append("| " + " | ".join(cells) + " |")
  best = next((g for g in ranked if g.in_sweep), None)
  if best is not None:
    vm, vs, n = best.stats("value")
    lines += ["", f"**Best**: {_described(best.overrides, labels)}: validation {metric} {_mean_std(vm, vs)} (n={n}); "
              f"test {metric} {_test(best, n)}."]
  repeats = [(r, g) for g in ranked for r in g.repeats]
  if repeats:
    lines += ["", "Repeats of a setting and seed already run (the same run again, counted once): " + ", ".join(
        f"`{r.name}` (as `{next(o.name for o in g.rows if o.overrides.get(SEED) == r.overrides.get(SEED))}`)"
        for r, g in repeats)]
  failed = [r for r in rows if r.status == "failed"]
  if failed:
    lines += ["", "Failed trials:", *(f"- `{r.name}`: {r.error or 'no error line (see its stderr.log)'}"
                                      for r in failed)]
  unfinished = [r for r in rows if r.status not in ("done", "failed")]
  if unfinished:
    lines += ["", "Not finished: " + ", ".join(f"`{r.name}` ({r.status})" for r in unfinished)]
  if plots:
    lines += ["", *(f"![{p.stem}]({p.relative_to(path.parent)})" for p in plots)]
  path.write_text("\n".join(lines) + "\n")
  return path


def _numeric(values) -> bool:
  return all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values)


def _ordered(values) -> list[str]:
  """Distinct values as axis labels, in their own order where they have one ((8, 16) before (32, 64))."""
  unique = {format_value(v): v for v in values}
  try:
    return [format_value(v) for v in sorted(unique.values())]
  except TypeError:
    return sorted(unique)


def write_plots(directory: Path, rows: list[Row], data: dict) -> list[Path]:
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  metric, labels, ranked = data["metric"], data.get("labels", {}), groups(rows, data["mode"])
  grid = data.get("identity", {}).get("kind", "grid") == "grid"
  keys = [k for k in _keys([r for g in ranked for r in g.rows], seed=False)
          if len({json.dumps(g.overrides.get(k)) for g in ranked}) > 1]
  if not ranked:
    return []
  directory.mkdir(parents=True, exist_ok=True)
  paths = []
  for key in keys:  # one line per combination of the other swept values
    others = [k for k in keys if k != key]
    lines = {}
    for g in ranked:
      rest = json.dumps({k: g.overrides.get(k) for k in others})
      lines.setdefault(rest, []).append(g)
    fig, ax = plt.subplots(figsize=(6, 4))
    values = [g.overrides.get(key) for g in ranked]
    numeric = _numeric(values)
    categories = _ordered(values)
    for rest, line in lines.items():
      line.sort(key=lambda g: g.overrides.get(key) if numeric else categories.index(format_value(g.overrides.get(key))))
      x = [g.overrides.get(key) if numeric else categories.index(format_value(g.overrides.get(key))) for g in line]
      stats = [g.stats("value") for g in line]
      label = _described({k: v for k, v in json.loads(rest).items() if v is not None}, labels) if others else None
      ax.errorbar(x, [s[0] for s in stats], yerr=[0 if math.isnan(s[1]) else s[1] for s in stats],
                  fmt="o-" if grid else "o", capsize=3, label=label)
    if numeric and min(values) > 0 and max(values) / min(values) >= 10:
      ax.set_xscale("log")
    if numeric and len(set(values)) <= MAX_TICKS:  # a grid's few values: ticks at exactly those
      ax.set_xticks(sorted(set(values)), [format_value(v) for v in sorted(set(values))])
      ax.minorticks_off()
    if not numeric:
      ax.set_xticks(range(len(categories)), categories, rotation=20)
    ax.set_xlabel(labels.get(key, key))
    ax.set_ylabel(f"validation {metric}")
    ax.set_title(f"validation {metric} (mean ± std over seeds)", fontsize=10)
    if others and len(lines) > 1:
      ax.legend(fontsize=7)
    fig.tight_layout()
    paths.append(directory / f"{metric}_vs_{re.sub(r'[^A-Za-z0-9._-]', '_', labels.get(key, key))}.png")
    fig.savefig(paths[-1], dpi=100)
    plt.close(fig)
  fig, ax = plt.subplots(figsize=(7, 4.5))
  colors = plt.get_cmap("tab10" if len(ranked) <= 10 else "tab20")
  for i, g in enumerate(ranked):
    for j, r in enumerate(g.rows):
      if r.curve:
        steps, values = zip(*r.curve)
        ax.plot(steps, values, color=colors(i % colors.N), alpha=0.8, marker=".",
                label=_described(g.overrides, labels) if j == 0 and len(ranked) <= 20 else None)
  ax.set_xlabel("step")
  ax.set_ylabel(f"validation {metric}")
  ax.set_title("validation curves (one line per trial, one colour per setting)", fontsize=10)
  if len(ranked) <= 20:
    ax.legend(fontsize=6)
  fig.tight_layout()
  paths.append(directory / "validation_curves.png")
  fig.savefig(paths[-1], dpi=100)
  plt.close(fig)
  return paths


def write(workdir: Path, data: dict) -> list[Path]:
  """results.csv, results.md and plots/ in the sweep workdir -> their paths."""
  workdir = Path(workdir)
  table = rows(workdir, data)
  plots = write_plots(workdir / PLOTS, table, data)
  return [write_csv(workdir / "results.csv", table, data),
          write_markdown(workdir / "results.md", table, data, plots), *plots]
