"""A sweep file loaded and checked before anything runs: base config, fixed overrides, trials (or search), metric.

Every mistake is a UserError naming the file and what to do; override problems are listed for every trial
that has them, so one run of the command shows them all.
"""

import copy
import dataclasses
import difflib
import hashlib
import importlib
import importlib.util
import logging
import re
from pathlib import Path
from typing import Callable

import ml_collections

from bigmodel_jax import config as config_lib
from bigmodel_jax.errors import UserError, where

MAX_LISTED = 20  # bad-override lines shown before "... and N more"
MAX_NAME = 150  # longer trial names are cut and end in a hash of the whole name


@dataclasses.dataclass(frozen=True)
class Trial:
  name: str  # its subdirectory of the sweep workdir, made from its overrides
  overrides: dict  # this trial's own overrides (the sweep's fixed ones come on top of the base config)
  number: int | None = None  # its Optuna trial number, in a search


@dataclasses.dataclass
class Sweep:
  path: Path
  sha256: str  # of the sweep file's text
  name: str  # the experiment name trackers group the trials by (the file's stem)
  variant: str  # --sweep: "" for sweep() / search()
  base: str  # as the file writes it, "configs/x.py[:variant]"
  base_file: Path  # resolved, absolute
  base_variant: str
  overrides: dict  # fixed, for every trial
  config: ml_collections.ConfigDict  # the base config with the fixed overrides
  metric: str  # selection metric, read on the validation split only
  mode: str  # max | min
  labels: dict  # override key -> its short name in trial names and tables (shortest unique suffix)
  trials: list[Trial] | None = None  # a grid
  search: Callable | None = None  # or a define-by-run Optuna search: trial -> overrides
  num_trials: int = 0
  sampler: Callable | None = None  # (asked) or () -> an optuna sampler (search.Search._sampler)
  resources: dict = dataclasses.field(default_factory=lambda: {"cpu": 1})  # per trial, for Ray
  asha: dict | None = None  # Ray: ASHAScheduler arguments (grace_period, max_t, reduction_factor)

  @property
  def kind(self) -> str:
    return "search" if self.search is not None else "grid"

  def label(self, key: str) -> str:
    return self.labels.get(key) or label_of(key, self.config)


def require(module: str, extra: str, what: str):
  """Imports an optional dependency, or says which extra installs it."""
  try:
    return importlib.import_module(module)
  except ImportError as e:
    raise UserError(f"{what} needs {e.name or module}, which is not installed: pip install 'bigmodel_jax[{extra}]'") \
        from None


def plain(value):
  """numpy scalars -> Python, lists -> tuples: one form for names, command lines and comparisons."""
  if isinstance(value, (list, tuple)):
    return tuple(plain(v) for v in value)
  if hasattr(value, "item") and not isinstance(value, (str, bytes)):
    return value.item()
  return value


def format_value(value) -> str:
  """A value as --config.<key>=<value> reads it (config_flags parses it by the field's type)."""
  if isinstance(value, bool):
    return "true" if value else "false"
  if isinstance(value, (list, tuple)):  # a Python literal: config_flags reads a tuple's elements so (strings quoted)
    return repr(tuple(plain(value)))
  return value if isinstance(value, str) else repr(value)


def leaf_keys(config, prefix: str = "") -> list[str]:
  keys = []
  for key, value in config.items():
    if isinstance(value, ml_collections.ConfigDict):
      keys += leaf_keys(value, f"{prefix}{key}.")
    else:
      keys.append(f"{prefix}{key}")
  return keys


def label_of(key: str, config) -> str:
  """The shortest dotted suffix of `key` that no other field of `config` ends with: learning_rate for
  optimizer.learning_rate, optimizer.name for optimizer.name (data.name, model.name... exist too)."""
  keys = leaf_keys(config)
  parts = key.split(".")
  for n in range(1, len(parts)):
    suffix = ".".join(parts[-n:])
    if sum(k == suffix or k.endswith("." + suffix) for k in keys) == 1:
      return suffix
  return key


def _name_value(value, digits: int | None) -> str:
  if isinstance(value, (list, tuple)):
    return "-".join(_name_value(v, digits) for v in value)
  if isinstance(value, float) and digits:
    return format(value, f".{digits}g")
  return format_value(value)


def trial_name(overrides: dict, labels: dict, digits: int | None = None, prefix: str = "") -> str:
  """'learning_rate=0.001,conv_features=16-32-32,seed=0': a directory name read from the overrides."""
  name = prefix + (",".join(f"{labels[k]}={_name_value(v, digits)}" for k, v in overrides.items()) or "base")
  name = re.sub(r"[^A-Za-z0-9._,=+-]", "_", name)
  if len(name) > MAX_NAME:
    name = name[:MAX_NAME - 9] + "-" + hashlib.sha256(name.encode()).hexdigest()[:8]
  return name


def _import(path: Path):
  spec = importlib.util.spec_from_file_location(f"_sweep_{path.stem}", path) if path.is_file() else None
  if spec is None:  # no such file, or not a Python file (a sweep's manifest.json, say)
    raise UserError(f"cannot read sweep file {str(path)!r} (no such file, or not a .py file?); pass a path like "
                    "experiments/sweeps/mnist_lr_width.py")
  module = importlib.util.module_from_spec(spec)
  try:
    spec.loader.exec_module(module)
  except SyntaxError as e:
    raise UserError(f"{path}, line {e.lineno}: syntax error ({e.msg})") from None
  except UserError as e:
    raise UserError(f"{path}: {e}") from None
  except Exception as e:
    raise UserError(f"{path} failed while loading {where(e)}") from e
  return module


def _resolve_base(base: str, path: Path) -> tuple[Path, str]:
  """base = 'configs/x.py[:variant]' or a run's config.json, relative to the current directory or to a folder above
  the sweep file -> (the config file, its variant): a config.json is loaded as main loads it, through run_config.py."""
  file, _, variant = base.partition(":")
  candidates = [Path(file)] if Path(file).is_absolute() else [Path.cwd() / file] + [
      folder / file for folder in path.resolve().parents]
  found = next((c for c in candidates if c.is_file()), None)
  if found is None:
    raise UserError(f"{path}: base config {file!r} not found (looked in the current directory and the folders "
                    "above the sweep file); set base = \"configs/<experiment>.py\"")
  if found.suffix not in (".py", ".json"):
    raise UserError(f"{path}: base {file!r} is neither a config file (.py) nor a run's config.json")
  if found.suffix == ".json" and variant:
    raise UserError(f"{path}: base {base!r}: a config.json has no variants; set its fields in overrides")
  from bigmodel_jax.argv import RUN_CONFIG_FILE
  return (RUN_CONFIG_FILE, str(found.resolve())) if found.suffix == ".json" else (found.resolve(), variant)


def _load_config(file: Path, variant: str, path: Path, base: str) -> ml_collections.ConfigDict:
  spec = importlib.util.spec_from_file_location(f"_sweep_base_{file.stem}", file)
  module = importlib.util.module_from_spec(spec)
  try:
    spec.loader.exec_module(module)
    config = module.get_config(variant) if variant else module.get_config()
  except UserError as e:
    raise UserError(f"{path}: base {base}: {e}") from None
  except Exception as e:
    detail = str(e) if isinstance(e, (ValueError, AttributeError)) else where(e)
    raise UserError(f"{path}: base {base}: {detail}") from e
  if not isinstance(config, ml_collections.ConfigDict):
    raise UserError(f"{path}: base {base}: get_config() returned {type(config).__name__}, not a ConfigDict")
  return config


def check_override(config, key, value, keys: list[str], base: str) -> str | None:
  """What is wrong with overriding `key` by `value` in config (no such field, a section, a wrong type), or None;
  if nothing, `config` now holds the value (converted as the CLI would: int -> float, list -> tuple)."""
  if not isinstance(key, str):
    return f"override keys are dotted field names like 'optimizer.learning_rate', got {key!r}"
  *parents, leaf = key.split(".")
  section = config
  for part in parents:
    section = section.get(part) if isinstance(section, ml_collections.ConfigDict) else None
  if not isinstance(section, ml_collections.ConfigDict) or leaf not in section:
    close = difflib.get_close_matches(key, keys, n=1)
    return f"{key!r} is not a field of {base}" + (f" (did you mean {close[0]!r}?)" if close else "")
  old = section[leaf]
  if isinstance(old, ml_collections.ConfigDict):
    return f"{key!r} is a section of {base}; override its fields ({key}.<field>)"
  # the command line cannot carry None, nor a bool into a number field (ml_collections would retype the field)
  if (value is None) != (old is None) or (isinstance(value, bool) != isinstance(old, bool) and old is not None):
    return f"{key}={value!r}: {base} has {type(old).__name__} {old!r} there; give a value of that type"
  try:  # ml_collections checks the type (and converts int -> float, list -> tuple)
    section[leaf] = value
  except (TypeError, ValueError):  # ml_collections' 'Could not override field ... cannot be casted'
    return f"{key}={value!r}: {base} has {type(old).__name__} {old!r} there; give a value of that type"
  return None


def problems(config, overrides, keys: list[str], base: str) -> list[str]:
  """Every problem of an overrides dict, one line each: its fields, then the config it makes (config.validate
  without what depends on the devices a trial will have)."""
  if not isinstance(overrides, dict):
    return [f"overrides must be a dict like {{'optimizer.learning_rate': 1e-3}}, got {type(overrides).__name__}"]
  trial = copy.deepcopy(config)
  found = [p for k, v in overrides.items() if (p := check_override(trial, k, v, keys, base))]
  if found:
    return found
  try:
    config_lib.validate_fields(trial)
  except UserError as e:
    return [str(e)]
  return []


def canonical(config, overrides: dict) -> dict:
  """The overrides as the config holds them (1 -> 1.0 for a float field), for names and duplicate checks."""
  trial = copy.deepcopy(config)
  return {k: plain(config_lib.get_field(trial, k)) for k in overrides
          if check_override(trial, k, overrides[k], [], "") is None}


def trial_config(sweep: "Sweep", overrides: dict) -> tuple[ml_collections.ConfigDict, dict[str, str]]:
  """(the config main runs a trial with: the base, the fixed overrides, the trial's, resolved as main resolves a
  command line; {field of the trial's: why it has no effect there})."""
  from bigmodel_jax import cli
  config = copy.deepcopy(sweep.config)
  for key, value in overrides.items():
    check_override(config, key, value, [], "")
  given = [*sweep.overrides, *overrides]
  cli.resolve_overrides(config, given)
  return config, {k: why for k, why in cli.idle_fields(config, given).items() if k in overrides}


def _listed(lines: list[str]) -> str:
  more = len(lines) - MAX_LISTED
  return "\n".join(lines[:MAX_LISTED] + ([f"... and {more} more"] if more > 0 else []))


def _generators(module, path: Path, variant: str) -> tuple[Callable | None, Callable | None]:
  """(sweep generator, search function) the --sweep variant picks; exactly one is set."""
  names = sorted({n.split("_", 1)[1] for n, v in vars(module).items()
                  if re.fullmatch(r"(sweep|search)_\w+", n) and callable(v)})
  suffix = f"_{variant}" if variant else ""
  grid, search = getattr(module, f"sweep{suffix}", None), getattr(module, f"search{suffix}", None)
  grid, search = (grid if callable(grid) else None), (search if callable(search) else None)
  if variant and grid is None and search is None:
    valid = f"valid: {', '.join(names)}" if names else "it defines only the default sweep() / search()"
    raise UserError(f"--sweep={variant}: {path} has no sweep_{variant}() or search_{variant}(); {valid}")
  if grid is None and search is None:
    raise UserError(f"{path}: no sweep() generator of override dicts (or search(trial) with num_trials); define "
                    "one, e.g. def sweep(): yield {'optimizer.learning_rate': 1e-3}")
  if grid is not None and search is not None:  # one of them would be ignored without a word
    raise UserError(f"{path}: defines both sweep{suffix}() and search{suffix}(); keep one (or name them apart: "
                    "sweep_<name>() / search_<name>(), picked by --sweep=<name>)")
  return grid, (search if grid is None else None)


def _fixed_too(sweep: Sweep, overrides: dict) -> list[str]:
  """A trial's field that the fixed overrides also set (the trial's value would silently replace the fixed one)."""
  return [f"{k} is also in the fixed overrides ({k}={sweep.overrides[k]!r}); set it in one place"
          for k in overrides if k in sweep.overrides]


def _grid(fn: Callable, sweep: Sweep, keys: list[str]) -> list[Trial]:
  path, fname = sweep.path, f"{fn.__name__}()"
  try:
    items = list(fn())
  except Exception as e:
    raise UserError(f"{path}: {fname} failed {where(e)}") from e
  if not items:
    raise UserError(f"{path}: {fname} yielded no trials")
  bad = [f"{path}: {fname} yielded {item!r}; it must yield dicts of overrides like {{'seed': 0}}"
         for item in items if not isinstance(item, dict)]
  if bad:
    raise UserError(_listed(bad))
  items = [{k: plain(v) for k, v in item.items()} for item in items]
  bad = []
  for i, item in enumerate(items):
    bad += [f"{path}: trial {i} ({', '.join(f'{k}={v!r}' for k, v in item.items())}): {p}"
                 for p in problems(sweep.config, item, keys, sweep.base) + _fixed_too(sweep, item)]
  if bad:
    raise UserError(_listed(bad))
  order = list(dict.fromkeys(k for item in items for k in item))  # one key order for every trial's name
  items = [{k: v for k, v in canonical(sweep.config, item).items()} for item in items]
  items = [{k: item[k] for k in order if k in item} for item in items]
  sweep.labels = {k: label_of(k, sweep.config) for item in items for k in item}
  trials = [Trial(trial_name(item, sweep.labels), item) for item in items]
  first, named, duplicates = {}, {}, []
  for i, trial in enumerate(trials):
    # the config the trial runs, its fields with no effect put back: one run, whatever names it (a field set to the
    # value it has anyway, such as seed=0 beside no seed, is the trial without it)
    config, idle = trial_config(sweep, trial.overrides)
    for k in idle:
      check_override(config, k, config_lib.get_field(sweep.config, k), [], "")
    same = trial_name({k: v for k, v in trial.overrides.items() if k not in idle}, sweep.labels)
    key = config.to_json_best_effort(sort_keys=True)
    if key in first:
      why = f"; {'; '.join(f'{k} has no effect: {w}' for k, w in idle.items())}" if idle else ""
      other = first[key][1]
      shown = same if other == same else f"{other} and {same} make one config: a field set to the value it has anyway"
      duplicates.append(f"{path}: trials {first[key][0]} and {i} are the same ({shown}{why}); "
                        "remove one, or tell them apart (e.g. with seeds(n))")
    elif trial.name in named:  # values a directory name writes alike ('a/b' and 'a_b'): one directory for two runs
      duplicates.append(f"{path}: trials {named[trial.name]} and {i} differ but would share the directory "
                        f"{trial.name}; give values that differ in letters, digits or '._,=+-'")
    first.setdefault(key, (i, same))
    named.setdefault(trial.name, i)
  if duplicates:
    raise UserError(_listed(duplicates))
  return trials


def _check_search(fn: Callable, sweep: Sweep, keys: list[str], module) -> None:
  """A scratch in-memory study asks one trial: the overrides it gives are checked like a grid's."""
  optuna = require("optuna", "search", f"{sweep.path}: search()")
  optuna.logging.set_verbosity(logging.WARNING)
  num_trials = getattr(module, "num_trials", None)
  if not isinstance(num_trials, int) or isinstance(num_trials, bool) or num_trials <= 0:
    raise UserError(f"{sweep.path}: a search needs num_trials = <how many trials> (> 0), got {num_trials!r}")
  sweep.num_trials = num_trials
  try:
    overrides = fn(optuna.create_study().ask())
  except Exception as e:
    raise UserError(f"{sweep.path}: {fn.__name__}(trial) failed {where(e)}") from e
  bad = problems(sweep.config, overrides, keys, sweep.base)
  bad += _fixed_too(sweep, overrides) if isinstance(overrides, dict) else []
  if bad:
    raise UserError(_listed([f"{sweep.path}: {fn.__name__}(trial): {p}" for p in bad]))
  sweep.labels = {k: label_of(k, sweep.config) for k in overrides}
  sampler = getattr(module, "sampler", None)
  if sampler is not None and not callable(sampler):
    raise UserError(f"{sweep.path}: sampler must be a function returning an optuna sampler, got {sampler!r}")
  sweep.sampler = sampler


def _check_metric(sweep: Sweep) -> None:
  """The metric is the task's; a mode not given is the metric's own direction (else the base config's)."""
  from bigmodel_jax.tasks import TASKS, metric_mode
  if sweep.mode is None:
    sweep.mode = metric_mode(sweep.metric) or sweep.config.train.best_mode
  if sweep.mode not in ("max", "min"):
    raise UserError(f"{sweep.path}: mode must be 'max' or 'min', got {sweep.mode!r}")
  task = sweep.config.task.name
  names = TASKS.get(task).metric_names
  if sweep.metric not in names:
    close = difflib.get_close_matches(str(sweep.metric), names, n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    raise UserError(f"{sweep.path}: metric {sweep.metric!r} is not produced by the evaluators of task {task!r}{hint}; "
                    f"valid: {', '.join(names)}")
  if metric_mode(sweep.metric) not in (None, sweep.mode):
    raise UserError(f"{sweep.path}: mode {sweep.mode!r} would select the worst {sweep.metric} (it is better "
                    f"{'lower' if sweep.mode == 'max' else 'higher'}); set mode = {metric_mode(sweep.metric)!r}")


def load(path: str | Path, variant: str = "") -> Sweep:
  """The sweep file at `path` (its --sweep `variant`), checked whole: raises UserError on any problem."""
  path = Path(path)
  module = _import(path)
  base = getattr(module, "base", None)
  if not isinstance(base, str) or not base:
    raise UserError(f"{path}: no base config; a sweep file sets base = \"configs/<experiment>.py\" (optionally "
                    "':variant')")
  base_file, base_variant = _resolve_base(base, path)
  config = _load_config(base_file, base_variant, path, base)
  keys = leaf_keys(config)
  fixed = getattr(module, "overrides", None) or {}
  bad = problems(config, fixed, keys, base)
  if bad:
    raise UserError(_listed([f"{path}: overrides: {p}" for p in bad]))
  fixed = {k: plain(v) for k, v in fixed.items()}
  for key, value in fixed.items():
    *parents, leaf = key.split(".")
    section = config
    for part in parents:
      section = section[part]
    section[leaf] = value
  grid, search = _generators(module, path, variant)
  sweep = Sweep(path=path, sha256=hashlib.sha256(path.read_bytes()).hexdigest(), name=path.stem, variant=variant,
                base=base, base_file=base_file, base_variant=base_variant, overrides=fixed, config=config, labels={},
                metric=getattr(module, "metric", config.train.best_metric), mode=getattr(module, "mode", None),
                resources=getattr(module, "resources", None) or {"cpu": 1}, asha=getattr(module, "asha", None))
  _check_metric(sweep)
  if not isinstance(sweep.resources, dict) or not all(isinstance(v, (int, float)) for v in sweep.resources.values()):
    raise UserError(f"{path}: resources must be a dict like {{'cpu': 1, 'gpu': 1}}, got {sweep.resources!r}")
  if sweep.asha is not None and not isinstance(sweep.asha, dict):
    raise UserError(f"{path}: asha must be a dict of ASHAScheduler arguments (grace_period, max_t, reduction_factor)"
                    f" or None, got {sweep.asha!r}")
  if grid is not None:
    sweep.trials = _grid(grid, sweep, keys)
  else:
    sweep.search = search
    _check_search(search, sweep, keys, module)
  return sweep
