"""A run's config.json as a config file: `--config=RUN/config.json` relaunches or forks a run from its record, and
eval / predict / sample load the workdir's own config through it (so config_flags applies --config.* overrides
to it, type-checked, as to any config file). main.py points config_flags here: --config=<this file>:<json path>.
"""

import json
from pathlib import Path

import ml_collections

from bigmodel_jax import config as config_lib
from bigmodel_jax.errors import UserError


def get_config(path: str = "") -> ml_collections.ConfigDict:
  file = Path(path)
  try:
    saved = json.loads(file.read_text())
  except OSError as e:
    raise UserError(f"--config: cannot read {file} ({e.strerror})") from None
  except (json.JSONDecodeError, UnicodeDecodeError):
    raise UserError(f"--config: {file} is not valid JSON; restore it (run_info.jsonl has each launch's command) "
                    "or use a config file under configs/") from None
  if not isinstance(saved, dict) or "model" not in saved:
    raise UserError(f"--config: {file} is not a run's config.json (no model section)")
  return ml_collections.ConfigDict(_tuples(config_lib.with_defaults(saved)))


def _tuples(value):
  """JSON's lists back to the tuples config files write (conv_features=(32, 64)): config_flags can override a
  tuple field from the command line, not a list one."""
  if isinstance(value, dict):
    return {k: _tuples(v) for k, v in value.items()}
  if isinstance(value, list):
    return tuple(_tuples(v) for v in value)
  return value
