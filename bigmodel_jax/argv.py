"""The command line before absl parses it (main.parse_flags): flag values, the overridden config fields, and the
rewrite that loads a config.json (given as --config, or a workdir's own) through run_config.py. No heavy imports:
a bad command line fails before jax loads."""

import os
import re
from pathlib import Path

from bigmodel_jax.errors import UserError

RUN_CONFIG_FILE = Path(__file__).with_name("run_config.py")  # loads a config.json for config_flags


def flag_value(argv: list[str], name: str) -> str | None:
  """The value of --name=V or --name V in argv (the last one given), before absl has parsed anything."""
  value = None
  for i, arg in enumerate(argv):
    if arg.startswith(f"--{name}="):
      value = arg.split("=", 1)[1]
    elif arg == f"--{name}" and i + 1 < len(argv):
      value = argv[i + 1]
  return value


def overridden_fields(argv: list[str]) -> list[str]:
  """The config fields set on the command line (--config.a.b=V, --config.a.b V, --noconfig.a.b), in order."""
  fields = []
  for arg in argv:
    match = re.match(r"--(?:no)?config\.([\w.]+)", arg)
    if match:
      fields.append(match.group(1))
  return fields


# Fields that name a file or directory: a leading '~' is the user's home wherever the value comes from (the shell
# leaves the '~' of --config.data.path=~/x as it is; a config file or a config.json may hold one).
PATH_FIELDS = frozenset({"data.path", "data.data_dir", "init.workdir", "eval.classifier_workdir",
                         "eval.classifier_config", "train.tracking.wandb_dir"})


def expand_paths(config):
  """`config` (a ConfigDict or a config.json's dict; None: none) with PATH_FIELDS' '~' expanded, in place; -> it."""
  for field in PATH_FIELDS if config is not None else ():
    *parents, leaf = field.split(".")
    section = config
    try:
      for part in parents:
        section = section[part]
      value = section[leaf]
    except (KeyError, TypeError, AttributeError):
      continue  # a config missing the field: validation names it
    if isinstance(value, str) and value.startswith("~"):
      section[leaf] = os.path.expanduser(value)
  return config


def rewrite_argv(argv: list[str]) -> list[str]:
  """--config=RUN/config.json, and no --config in eval/predict/sample (or --print_config) on a workdir with a
  config.json: config_flags loads the JSON through run_config.py, so overrides apply to it as to a config file."""
  # --workdir=~/runs/x: the shell leaves a '~' after '=' as it is (a directory named '~' in the current one)
  argv = [f"{a.split('=', 1)[0]}={os.path.expanduser(a.split('=', 1)[1])}" if a.startswith(("--workdir=~",
          "--output_dir=~", "--config=~")) else a for a in argv]
  config = flag_value(argv, "config")
  # a path ending in .json is the file whole (a workdir named by its time, runs/t08:45, has colons in it), unless it
  # is a config file's argument (configs/x.py:params.json, or a sweep trial's run_config.py:RUN/config.json)
  if config is not None and not config.split(":", 1)[0].endswith(".py") and (
      config.endswith(".json") or config.rsplit(":", 1)[0].endswith(".json")):
    if not config.endswith(".json"):
      raise UserError(f"--config: {config}: a config.json has no variants; override fields with --config.<field>=...")
    for i, arg in enumerate(argv):  # in place: config_flags takes overrides only after --config
      if arg == f"--config={config}":
        argv[i] = f"--config={RUN_CONFIG_FILE}:{config}"
      elif arg == "--config" and i + 1 < len(argv) and argv[i + 1] == config:
        argv[i + 1] = f"{RUN_CONFIG_FILE}:{config}"
  elif config is None:
    workdir, mode = flag_value(argv, "workdir"), flag_value(argv, "mode") or "train"
    if workdir and (mode != "train" or "--print_config" in argv) and (Path(workdir) / "config.json").is_file():
      argv.insert(1, f"--config={RUN_CONFIG_FILE}:{Path(workdir) / 'config.json'}")
  return argv
