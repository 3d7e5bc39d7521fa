"""A run's config.json: read (type-checked against base_config()), completed with fields added since it was
written, compared with a new config, and loaded as a config file: `--config=RUN/config.json` relaunches or forks
a run from its record, and eval / predict / sample load the workdir's own config through it (so config_flags
applies --config.* overrides to it, type-checked, as to any config file). main.py points config_flags here:
--config=<this file>:<json path>.
"""

import json
from pathlib import Path

import ml_collections

from bigmodel_jax import config as config_lib
from bigmodel_jax.argv import expand_paths
from bigmodel_jax.errors import UserError


def get_config(path: str = "") -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict(as_config_values(load(Path(path), "use a config file under configs/", "--config: ")))


def load(file: Path, otherwise: str, prefix: str = "") -> dict:
  """A config.json read, type-checked and completed (read()); each way it can fail is one line naming the file,
  ending in `otherwise` (what else the user can do)."""
  try:
    saved = json.loads(file.read_text())
  except OSError as e:
    raise UserError(f"{prefix}cannot read {file} ({e.strerror}); {otherwise}") from None
  except (json.JSONDecodeError, UnicodeDecodeError):
    raise UserError(f"{prefix}{file} is not valid JSON; restore it (run_info.jsonl has each launch's command) or "
                    f"{otherwise}") from None
  if not isinstance(saved, dict) or "model" not in saved:
    raise UserError(f"{prefix}{file} is not a run's config.json (no model section); {otherwise}")
  return read(file, saved)


def read(file: Path, saved: dict) -> dict:
  """A config.json's contents, completed (with_defaults) and each field's type checked against its default: a
  hand-edited `"batch_size": "thirty-two"` is one line naming the file and field, not a traceback later."""
  for key, value in config_lib.base_config().to_dict().items():
    if isinstance(value, dict) and key in saved and not isinstance(saved[key], dict):
      raise UserError(f"{file}: {key} is {saved[key]!r}, not a section of fields; restore it (run_info.jsonl has each "
                      "launch's command) or move the workdir away")
  completed = expand_paths(with_defaults(saved))  # a hand-written '~/data.txt'
  wrong = wrong_kind(completed)
  if wrong:
    key, value, default = wrong
    raise UserError(f"{file}: {key} is {value!r}, not {kind(default)} like its default {default!r}; fix the value "
                    "(run_info.jsonl has each launch's command) or move the workdir away")
  return completed


def wrong_kind(config: dict) -> tuple[str, object, object] | None:
  """The first field of `config` (a dict) whose value is not of its default's kind (a config.json's "thirty-two", a
  config file's None): (field, value, default), or None."""
  defaults = config_lib.flatten(config_lib.base_config().to_dict())
  try:
    defaults.update({f"model.{k}": v for k, v in config_lib.flatten(
        config_lib.model_config(config["model"]["name"]).to_dict()).items()})
  except (KeyError, TypeError, UserError):
    pass  # an unknown model name: validation names it
  named = config.get("optimizers")
  if isinstance(named, dict) and named:  # each named optimizer's fields, of optim.section_config()'s kinds
    from bigmodel_jax.optim import section_config
    section = config_lib.flatten(section_config().to_dict())
    defaults.update({f"optimizers.{name}.{k}": v for name in named for k, v in section.items()})
  return next(((key, value, defaults[key]) for key, value in config_lib.flatten(config).items()
               if key in defaults and not _same_kind(value, defaults[key])), None)


def kind(value) -> str:
  return {bool: "a boolean", int: "an integer", float: "a number", str: "a string"}.get(type(value), "a list")


def _same_kind(value, default) -> bool:
  if isinstance(default, bool) or isinstance(value, bool):
    return isinstance(value, bool) and isinstance(default, bool)
  if isinstance(default, float):
    return isinstance(value, (int, float))
  if isinstance(default, (list, tuple)):
    return isinstance(value, (list, tuple))
  return isinstance(value, type(default)) or default is None


def as_config_values(value):
  """JSON's lists back to the tuples config files write (conv_features=(32, 64)): config_flags can override a
  tuple field from the command line, not a list one."""
  if isinstance(value, dict):
    return {k: as_config_values(v) for k, v in value.items()}
  if isinstance(value, list):
    return tuple(as_config_values(v) for v in value)
  return value


def legacy_fields(saved: dict) -> dict:
  """What a config.json from before validation splits (no `evals`) means in today's fields: no validation split
  held out, test evaluated as often as train.eval_every said, nothing selected."""
  every = saved.get("train", {}).get("eval_every", -1)
  return {"data": {"validation_fraction": 0.0}, "evals": {"test": {"split": "test", "every": every}},
          "train": {"best_eval": "", "early_stopping": {"patience": 0, "min_delta": 0.0}}}


def with_defaults(saved: dict) -> dict:
  """A workdir's config.json completed with fields added to base_config() since it was written (at their
  defaults, which reproduce what the older version did), so older runs still evaluate and resume."""
  if "evals" not in saved:  # older than validation splits: keep its meaning, not today's defaults
    legacy = legacy_fields(saved)
    saved = {**saved, "evals": legacy["evals"], "data": {**saved.get("data", {}), **legacy["data"]},
             "train": {**{k: v for k, v in saved.get("train", {}).items() if k != "eval_every"}, **legacy["train"]}}
  base = json.loads(config_lib.base_config().to_json_best_effort())
  try:
    base["model"] = json.loads(config_lib.model_config(saved["model"]["name"]).to_json_best_effort())
  except (KeyError, TypeError, UserError):
    base.pop("model")
  named = saved.get("optimizers")
  if isinstance(named, dict) and named:  # each named optimizer's fields added since (optimizers.<name>.frozen)
    from bigmodel_jax.optim import section_config
    section = json.loads(section_config().to_json_best_effort())
    base["optimizers"] = {name: section for name, value in named.items() if isinstance(value, dict)}

  def merge(defaults: dict, values: dict) -> dict:
    out = dict(values)
    for key, value in defaults.items():
      if key not in out:
        out[key] = value
      elif isinstance(value, dict) and isinstance(out[key], dict) and key != "evals":  # a run's evaluators are its own
        out[key] = merge(value, out[key])
    return out
  return merge(base, saved)


# runtime fields that a finished run's result depends on all the same: where its step 0 came from, when it was
# validated (the steps its best is chosen from), a GAN's quality classifier (compared by sweeps and reproduce)
RESULT_FIELDS = ("init.", "evals.", "eval.")


def config_differences(saved: dict, current: dict, counted: tuple[str, ...] = ()) -> list[str]:
  """Fields whose values differ between a workdir's saved config and the new one (runtime fields aside, but for
  those under the `counted` prefixes)."""
  a, b = config_lib.flatten(saved), config_lib.flatten(current)
  diffs = []
  for key in sorted(set(a) | set(b)):
    if config_lib.is_runtime_field(key) and not key.startswith(counted):
      continue
    if a.get(key, "<absent>") != b.get(key, "<absent>"):
      diffs.append(f"{key}: {a.get(key, '<absent>')!r} -> {b.get(key, '<absent>')!r}")
  return diffs


# Fields that shape only how a run trains, not what its checkpoints compute (evaluations read the validation split
# by its own seed; dropout is off): a resume may change them without changing what an earlier step evaluates to.
# data.train_fraction too, unless the inputs are standardized by the statistics of the training split it cuts.
TRAINING_ONLY_FIELDS = ("seed", "optimizer.", "optimizers.", "schedule.", "data.batch_size", "data.shuffle",
                        "data.drop_remainder", "data.augment.", "data.path", "train.", "model.dropout_rate",
                        "model.attention_dropout_rate", "task.d_steps")
RECORD_KEY = "config"  # a checkpoint meta's record of defining_fields()


def defining_fields(config) -> dict:
  """The flattened fields a checkpoint's outputs depend on besides its arrays: the model, the task, the data's
  splits and preprocessing, train.dtype (runtime and training-only fields aside). Each save records them, so a
  config.json edited after training is caught before a mode on a checkpoint computes anything with it
  (check_recorded)."""
  flat = config_lib.flatten(json.loads(config.to_json_best_effort()))
  skipped = TRAINING_ONLY_FIELDS + (() if flat.get("data.normalize") == "standardize" else ("data.train_fraction",))
  return {k: v for k, v in flat.items() if k == "train.dtype"
          or not (config_lib.is_runtime_field(k) or config_lib.is_runtime_field(k, skipped))}


def differences(recorded: dict, now: dict) -> list[str]:
  """The fields whose values differ between a step's record and defining_fields() now (a field added since the
  record, at the default that reproduces it, or removed since, is not compared)."""
  return sorted(k for k in set(recorded) & set(now) if recorded[k] != now[k])


def recorded(checkpointer, step: int) -> dict | None:
  """Checkpoint `step`'s record of defining_fields() (None: unreadable, or saved before the record)."""
  record = checkpointer.meta_values(RECORD_KEY, [step])[step]
  return record if isinstance(record, dict) else None


def check_recorded(run, step: int, flag: str = "--checkpoint_step", training: bool = False) -> None:
  """Refuses to use checkpoint `step` of `run` (a train.Run or inference.Inference) with a config whose
  defining_fields() differ from those the step recorded (a step saved before the record: nothing to check), in one
  line naming the field: where a kept step was saved under this config (after a resume with
  train.allow_config_change), naming those steps and `flag`. `training`: a launch about to resume from `step`
  (config.json edited or deleted, or checkpoints copied from another run), unless it allows changes."""
  workdir, config, record = run.workdir, run.config, recorded(run.checkpointer, step)
  if record is None or (training and config.train.allow_config_change):
    return
  now = defining_fields(config)
  diffs = differences(record, now)
  if not diffs:
    return
  key, file = diffs[0], Path(workdir) / "config.json"
  file = file if file.is_file() else "--config"  # a workdir written by hand, described by --config
  was, now_is = record[key], now[key]
  more = f" (also {', '.join(diffs[1:4])}{', ...' if len(diffs) > 4 else ''} differ)" if len(diffs) > 1 else ""
  if training:
    raise UserError(f"--config: {key} is {now_is!r}, but checkpoint step {step} in {workdir} was trained with "
                    f"{was!r}{more}; relaunch with its own config (run_info.jsonl has each launch's command), use a "
                    "new --workdir, or pass --config.train.allow_config_change=true to continue it anyway")
  matching = [s for s, r in sorted(run.checkpointer.meta_values(RECORD_KEY).items())
              if isinstance(r, dict) and not differences(r, now)]
  if matching:
    raise UserError(f"checkpoint step {step} was saved with {key}={was!r}{more}, but {file} says {now_is!r} (a resume "
                    "with train.allow_config_change?); use a step saved under this config: "
                    f"{', '.join(map(str, matching))} ({flag}=N)")
  raise UserError(f"{file}: {key} is {now_is!r}, but checkpoint step {step} was trained with {was!r}{more} (changed "
                  "since); put the trained value back (run_info.jsonl has each launch's command)")
