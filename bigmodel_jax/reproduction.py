"""The reproduction registry's types and checks: experiments/reproductions.py declares REPRODUCTIONS, a list of
Reproduction(name, config, targets, needs, seeds, source, ...); load_registry reads and checks them (config,
variant, overrides, metrics, bounds) before anything runs. The tool that runs them is bigmodel_jax.reproduce."""

import dataclasses
import importlib.util
import os
import re
import socket
import urllib.parse
from pathlib import Path

import bigmodel_jax
from bigmodel_jax import argv

ROOT = Path(bigmodel_jax.__file__).resolve().parents[1]  # a source checkout: experiments/ is not installed
REGISTRY = ROOT / "experiments" / "reproductions.py"
NEEDS = ("cpu", "gpu", "network")
BOUND = re.compile(r"^\s*(>=|<=|>|<|~)\s*([-+0-9.eE]+)\s*(?:(?:±|\+-|\+/-)\s*([0-9.eE]+))?\s*$")
NAME = re.compile(r"^[a-z0-9_]+$")  # a directory name under the workdir
ACCELERATORS = ("gpu", "tpu")  # jax backends that satisfy needs 'gpu'
NETWORK_TIMEOUT_S = 3.0


class BadInput(Exception):
  """A bad registry, flag or name: printed as one line, exit 2."""


@dataclasses.dataclass(frozen=True)
class Target:
  """A number a reproduction must reach: `metric` of final_metrics.json's `split` section, within `bound`.

  split: validation | test | best (the selected checkpoint's value of the selection metric, on validation) or
  any other section (a dotted path, e.g. "coefficients"); metric: a dotted path in it ("weights.0.0").
  bound: ">= 0.99", "<= 1.5", "> 0.696", "~ 1.88 ± 0.05" (also "+-").
  """
  split: str
  metric: str
  bound: str

  def check(self, value: float) -> bool:
    op, ref, tol = parse_bound(self.bound)
    return {">=": value >= ref, "<=": value <= ref, ">": value > ref, "<": value < ref,
            "~": abs(value - ref) <= tol}[op]

  @property
  def label(self) -> str:
    return f"{self.split} {self.metric}" if self.split != "best" else f"best validation {self.metric}"


@dataclasses.dataclass(frozen=True)
class Download:
  """A dataset a run fetches: no network is needed when every file is under the data dir, else a host of `urls`."""
  files: tuple[str, ...]  # relative to the data dir (config.data.data_dir, $BIGMODEL_JAX_DATA_DIR, ~/.cache/...)
  urls: tuple[str, ...]
  hint: str = ""  # another way to the data, for the skip message


@dataclasses.dataclass(frozen=True)
class Reproduction:
  name: str
  config: str  # configs/<file>.py[:variant], relative to the repo root
  targets: tuple[Target, ...]
  source: str  # where the target comes from: paper, README, URL
  needs: tuple[str, ...] = ("cpu",)  # cpu | gpu (too slow on a CPU) | network (with `download`)
  seeds: tuple[int, ...] = (0,)  # >= 3 where a run is short: the mean is judged
  overrides: dict = dataclasses.field(default_factory=dict)  # config field -> value, for every seed
  download: Download | None = None
  note: str = ""  # cost, caveats


def parse_bound(bound: str) -> tuple[str, float, float]:
  match = BOUND.match(bound)
  if not match or (match[1] == "~") != (match[3] is not None):
    raise ValueError(f"bad bound {bound!r}; write '>= 0.99', '<= 1.5', '> 0.7' or '~ 1.88 ± 0.05'")
  return match[1], float(match[2]), float(match[3] or 0)


def metric_value(final: dict, target: Target) -> float:
  """`target`'s number in final_metrics.json, or ValueError saying what is there instead."""
  if target.split == "best":
    best = final.get("best")
    if not isinstance(best, dict) or best.get("metric") != target.metric:
      raise ValueError(f"final_metrics.json has no best {target.metric!r} (best: {best!r})")
    value = best.get("value")
  else:
    value = final
    for part in [*target.split.split("."), *target.metric.split(".")]:
      if isinstance(value, list) and part.isdigit() and int(part) < len(value):
        value = value[int(part)]
      elif isinstance(value, dict) and part in value:
        value = value[part]
      else:
        keys = ", ".join(value) if isinstance(value, dict) else type(value).__name__
        raise ValueError(f"final_metrics.json has no {target.split}.{target.metric} (no {part!r}; has: {keys})")
  if not isinstance(value, (int, float)) or isinstance(value, bool):
    raise ValueError(f"final_metrics.json's {target.label} is {value!r}, not a number")
  return float(value)


# --- what a reproduction needs ------------------------------------------------------------------------------


def reachable(url: str, timeout: float = NETWORK_TIMEOUT_S) -> bool:
  parts = urllib.parse.urlsplit(url)
  try:
    socket.create_connection((parts.hostname, parts.port or (443 if parts.scheme == "https" else 80)),
                             timeout=timeout).close()
    return True
  except OSError:
    return False


def skip_reason(r: Reproduction, overrides: dict, backend) -> tuple[str, str]:
  """Why this machine cannot run `r` ("" if it can), and what would help. backend(): jax's backend, asked once."""
  if "gpu" in r.needs and backend() not in ACCELERATORS:
    return f"no GPU (jax's backend here is {backend()})", "run it where jax sees a GPU"
  if r.download is not None:
    fields = {**r.overrides, **overrides}
    if fields.get("data.path"):
      return "", ""
    from bigmodel_jax.data import fetch
    root = fetch.data_dir(str(fields.get("data.data_dir", "")))
    missing = [f for f in r.download.files if not (root / f).exists()]
    if missing and not any(reachable(u) for u in r.download.urls):
      hosts = ", ".join(sorted({urllib.parse.urlsplit(u).hostname for u in r.download.urls}))
      return (f"no network ({hosts} unreachable, {missing[0]} not in the data dir)",
              f"put {', '.join(r.download.files)} in {root} from a machine with network"
              + (f", or {r.download.hint}" if r.download.hint else ""))
  return "", ""


# --- overrides and flags ------------------------------------------------------------------------------------


# Fields naming a file or directory. A reproduction's runs start in the repo root (their configs' paths are the
# registry's, relative to it): a relative path given in --override is the caller's, made absolute from its cwd.
PATH_FIELDS = argv.PATH_FIELDS - {"eval.classifier_config"}  # a config file: callers_path's own rule


def callers_path(key: str, value: str, base: Path | None = None) -> str:
  """`value` of field `key`, a path made absolute from `base` (the cwd); '~' expanded (the shell leaves it in
  --override=FIELD=~/x, and not every run expands it)."""
  if key == "eval.classifier_config" and value:  # a config file: the caller's where it is one, else main finds it
    path = (base or Path.cwd()) / os.path.expanduser(value)  # in the checkout (configs/mnist_cnn.py)
    return str(path) if path.is_file() else value
  if key not in PATH_FIELDS or not value:
    return value
  path = Path(os.path.expanduser(value))
  return str(path if path.is_absolute() else (base or Path.cwd()) / path)


def flag_as_read(flag: str) -> str:
  """A run's --config.FIELD=VALUE flag with a path as its run read it (a relative one from the repo root, where the
  runs start): a seed recorded before callers_path, with data.path=texts/in.txt, is the same run as one given
  ROOT/texts/in.txt now."""
  key, sep, value = flag.removeprefix("--config.").partition("=")
  return f"--config.{key}={callers_path(key, value, ROOT)}" if flag.startswith("--config.") and sep else flag


def same_flags(made: list, flags: list[str]) -> bool:
  """Whether a finished seed's recorded flags are `flags` in any order, a path as its run read it."""
  return sorted(map(flag_as_read, map(str, made))) == sorted(map(flag_as_read, flags))


def flag_value(value) -> str:
  """A config value as main's --config.a.b=VALUE text."""
  return str(value).lower() if isinstance(value, bool) else str(value)


# --- the registry -------------------------------------------------------------------------------------------


def load_registry(path: Path) -> list[Reproduction]:
  """experiments/reproductions.py's REPRODUCTIONS, each checked (config, variant, overrides, metrics, bounds)."""
  if not path.is_file():
    raise BadInput(f"no reproduction registry at {path}; experiments/ is not installed with the package: run from a "
                   "source checkout, or pass --registry=PATH")
  spec = importlib.util.spec_from_file_location("reproductions", path)
  if spec is None:  # not a Python file (a report.json, say)
    raise BadInput(f"--registry={path}: not a Python file; give a module like experiments/reproductions.py")
  module = importlib.util.module_from_spec(spec)
  try:
    spec.loader.exec_module(module)
  except Exception as e:
    raise BadInput(f"{path}: {type(e).__name__}: {e}") from None
  entries = getattr(module, "REPRODUCTIONS", None)
  if not isinstance(entries, (list, tuple)) or not all(isinstance(r, Reproduction) for r in entries):
    raise BadInput(f"{path}: needs REPRODUCTIONS, a list of bigmodel_jax.reproduction.Reproduction")
  seen = set()
  for r in entries:
    if r.name in seen:
      raise BadInput(f"{path}: reproduction {r.name!r} is declared twice")
    seen.add(r.name)
    check_entry(r, path)
  return list(entries)


def config_path(spec: str) -> Path:
  """configs/x.py[:variant] -> the file, relative to the repo root (where the runs start)."""
  return ROOT / spec.partition(":")[0]


def load_config(spec: str):
  """configs/x.py[:variant] -> its ConfigDict, as main builds it (before overrides)."""
  path, variant = config_path(spec), spec.partition(":")[2]
  module_spec = importlib.util.spec_from_file_location(path.stem, path)
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  return module.get_config(variant)


def check_entry(r: Reproduction, path: Path) -> None:
  """Raises BadInput naming the entry and what is wrong."""
  def bad(message):
    raise BadInput(f"{path}: reproduction {r.name!r}: {message}")
  if not NAME.match(r.name):
    bad("names are lower case letters, digits and '_' (each is a directory under the workdir)")
  if not r.targets or not all(isinstance(t, Target) for t in r.targets):
    bad("targets must be a non-empty tuple of Target(split, metric, bound)")
  for t in r.targets:
    try:
      parse_bound(t.bound)
    except ValueError as e:
      bad(str(e))
  if not r.needs or set(r.needs) - set(NEEDS):
    bad(f"needs {r.needs!r}: each of {', '.join(NEEDS)}")
  if ("network" in r.needs) != (r.download is not None):
    bad("needs 'network' exactly when it names a download (the files that make the network unnecessary)")
  if not r.seeds or len(set(r.seeds)) != len(r.seeds) or not all(isinstance(s, int) and s >= 0 for s in r.seeds):
    bad(f"seeds {r.seeds!r}: distinct integers >= 0")
  if not r.source:
    bad("source is empty; say where the target comes from")
  if not config_path(r.config).is_file():
    bad(f"config file {config_path(r.config)} does not exist (config paths are relative to the repo root)")
  try:
    config = load_config(r.config)
  except Exception as e:
    bad(f"config {r.config!r}: {type(e).__name__}: {e}")
  missing, hint = missing_field(config, r.overrides)
  if missing:
    bad(f"override {missing}: {r.config} has no such config field{hint}")
  from bigmodel_jax.tasks import TASKS
  metric_names = TASKS.get(config.task.name).metric_names
  for t in r.targets:
    if t.split in ("validation", "test", "best") and t.metric not in metric_names:
      bad(f"metric {t.metric!r} is not a metric of task {config.task.name!r}; valid: {', '.join(metric_names)}")
    best_metric = r.overrides.get("train.best_metric", config.train.best_metric)
    if t.split == "best" and t.metric != best_metric:
      bad(f"split 'best' holds the selection metric train.best_metric={best_metric!r}, not {t.metric!r}")


def wrong_type(config, overrides: dict) -> str:
  """The first override 'key=value' whose value main's command line would refuse for the field's type: a number
  field given something that is not a number, a bool field something that is not true or false ("" if none)."""
  from bigmodel_jax.config import get_field
  for key, value in overrides.items():
    old, text = get_field(config, key), str(value).strip()
    try:
      if isinstance(old, bool):
        if text.lower() not in ("true", "false", "t", "f", "1", "0"):  # absl's boolean parser
          return f"{key}={value}: a bool field (true or false)"
      elif isinstance(old, int):
        int(text)
      elif isinstance(old, float):
        float(text)
    except ValueError:
      return f"{key}={value}: {'an int' if isinstance(old, int) else 'a float'} field"
  return ""


def as_main_reads(old, text: str):
  """`text` of a --config.FIELD=TEXT flag as main's command line parses it for a field holding `old` (ValueError if
  it cannot)."""
  from absl import flags
  from ml_collections.config_flags import tuple_parser
  parsers = {bool: flags.BooleanParser, int: flags.IntegerParser, float: flags.FloatParser,
             tuple: tuple_parser.TupleParser, list: tuple_parser.TupleParser}
  return parsers.get(type(old), flags.ArgumentParser)().parse(text)


def as_launched(config, fields: dict):
  """A copy of `config` with `fields` set as main's command line sets them (their text parsed for each field's
  kind) and resolved as main resolves them -> (that config, the first field it cannot take, as one line, or "")."""
  import copy
  from bigmodel_jax import cli, config as config_lib
  from bigmodel_jax.sweeps.spec import check_override
  config = copy.deepcopy(config)
  for key, value in fields.items():
    try:
      problem = check_override(config, key, as_main_reads(config_lib.get_field(config, key), flag_value(value)),
                               [], "the config")
    except ValueError:
      problem = "give a value of the field's type"
    if problem:
      return config, f"--override={key}={value}: {problem.removeprefix(f'{key}={value!r}: ')}"
  cli.resolve_overrides(config, list(fields))
  return config, ""


def invalid_overrides(config, fixed: dict, overrides: dict, targets: tuple = ()) -> str:
  """What a training launch would refuse in `config` with the registry's `fixed` overrides and the caller's
  `overrides` (each as main parses its text), checked as main checks its config before anything runs, devices
  aside (config.validate_fields), or a selection that leaves a 'best' target of `targets` unjudged or judged on
  another checkpoint: one line naming the override where one field is at fault ("" if nothing)."""
  from bigmodel_jax import config as config_lib
  from bigmodel_jax.errors import UserError

  def named(field: str, problem: str) -> str:
    given = [f"--override={k}={v}" for k, v in overrides.items() if k == field]
    return f"{' '.join(given or [f'--override={k}={v}' for k, v in overrides.items()])}: {problem}"
  registry, _ = as_launched(config, fixed)
  config, problem = as_launched(config, {**fixed, **overrides, "seed": 0})
  if problem:
    return problem
  try:
    config_lib.validate_fields(config)
  except UserError as e:
    return named(str(e).partition(":")[0].removeprefix("config."), str(e))  # its line starts with the field
  for t, field in ((t, f) for t in targets if t.split == "best" for f in ("best_eval", "best_metric", "best_mode")):
    if config.train[field] != registry.train[field]:  # the target is the best checkpoint's value, as selected there
      return named(f"train.{field}", f"the target {t.label} {t.bound} is the value of the checkpoint selected with "
                                     f"train.{field}={registry.train[field]!r}; the runs would select another")
  return ""


def missing_field(config, overrides: dict) -> tuple[str, str]:
  """The first override 'key=value' whose key is not a field of `config`, and ' (did you mean ...?)' naming the
  closest field beside it ("", "" if every key is a field)."""
  import difflib
  from bigmodel_jax.config import get_field
  for key, value in overrides.items():
    try:
      get_field(config, key)
    except (KeyError, AttributeError, TypeError):  # TypeError: a key below a value (lr.x)
      parts, node = key.split("."), config
      while len(parts) > 1 and hasattr(node, "keys") and parts[0] in node.keys():
        node, parts = node[parts[0]], parts[1:]
      close = difflib.get_close_matches(parts[0], list(node.keys()) if hasattr(node, "keys") else [], n=1)
      where = key[:len(key) - len(".".join(parts))]
      return f"{key}={value}", f" (did you mean {where + close[0]!r}?)" if close else ""
  return "", ""


def lock_workdir(workdir: Path, take: bool = True):
  """One reproduce tool per workdir (an flock the OS drops when the process dies): a second one waited on the
  first's seeds, failed on their locks and merged its ERROR rows into the same report. take=False only refuses a
  workdir another tool holds: asked before the seeds' checks, whose lines would blame a seed the other is running."""
  from bigmodel_jax.workdir import hold_lock
  path = workdir / ".reproduce.lock"
  if not take and not path.is_file():
    return None
  return hold_lock(open(path, "a+" if take else "r"), lambda pid: BadInput(
      f"--workdir: {workdir} is in use by another reproduce (pid {pid}); wait for it or stop it (the same command "
      "then resumes its seeds)"), take)
