"""Ablation sweeps: each trial is a normal run of bigmodel_jax.main, in its own process and subdirectory.

    python -m bigmodel_jax.sweep experiments/sweeps/mnist_lr_width.py --workdir=sweeps/lr_width --parallel=2

A sweep file names a base config and yields override dicts (Kauldron-style generators):

    from bigmodel_jax.sweeps import product, seeds
    base = "configs/digits_mlp.py"                 # optionally ":variant"
    overrides = {"train.num_steps": 300}           # fixed, for every trial
    def sweep():                                   # --sweep=small picks sweep_small() instead
      yield from product({"optimizer.learning_rate": [1e-3, 3e-3]}, seeds(3))

or an Optuna search instead of a grid: `search(trial)` returning the overrides of one trial (define-by-run) with
`num_trials`. Optional: `metric` / `mode` (selection on the validation split; default the base config's
train.best_metric, and the metric's own direction, else the base config's best_mode), `resources` and `asha` (Ray
executor). The modules: spec (loading and checking a sweep file), trials (one trial's process and records),
manifest, local / ray_tune (executors), search, report.
This package's own namespace holds only the helpers below, so sweep files import it cheaply.
"""

import itertools


def _axes(axis) -> list[list[dict]]:
  """A product() argument as axes: a dict {key: [values]} is one axis per key; a list of dicts is one axis."""
  if isinstance(axis, dict):
    axes = []
    for key, values in axis.items():
      if not isinstance(values, (list, tuple, range)):
        raise TypeError(f"product: the values of {key!r} must be a list, got {values!r}")
      axes.append([{key: v} for v in values])
    return axes
  values = list(axis)
  if not all(isinstance(v, dict) for v in values):
    raise TypeError(f"product: an axis must be a dict of value lists or a list of override dicts, got {axis!r}")
  return [values]


def product(*axes) -> list[dict]:
  """Every combination, the last axis varying fastest: product({"a": [1, 2]}, seeds(2)) -> 4 override dicts.

  An axis is a dict {key: [values, ...]} (each key its own axis) or a list of override dicts (zipped(...),
  seeds(n), a hand-written list).
  """
  flat = [a for axis in axes for a in _axes(axis)]
  return [{k: v for part in combo for k, v in part.items()} for combo in itertools.product(*flat)]


def zipped(axis: dict) -> list[dict]:
  """Values paired up, not combined: zipped({"a": [1, 2], "b": [3, 4]}) -> [{a: 1, b: 3}, {a: 2, b: 4}]."""
  lengths = {key: len(values) for key, values in axis.items()}
  if len(set(lengths.values())) > 1:
    raise ValueError(f"zipped: value lists of different lengths {lengths}")
  return [dict(zip(axis, values)) for values in zip(*axis.values())]


def seeds(n: int, start: int = 0) -> list[dict]:
  """[{"seed": start}, ..., {"seed": start + n - 1}]: results are grouped over these (mean ± std)."""
  return [{"seed": s} for s in range(start, start + n)]
