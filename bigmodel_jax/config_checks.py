"""Config checks of sections with entries of their own: evaluators (config.evals) and init (config.init)."""

import ml_collections

from bigmodel_jax.config import _check


def check_kinds(config) -> None:
  """Each field of the kind of its default (a config file may set one to None: a traceback at its first use)."""
  from bigmodel_jax.run_config import kind, wrong_kind
  wrong = wrong_kind(config.to_dict())
  if wrong:
    field, value, default = wrong
    _check(False, field, f"must be {kind(default)} like its default {default!r}, got {value!r}")


def check_evals(config) -> None:
  """config.evals entries and the selection fields that read them (selection reads validation, never test)."""
  from bigmodel_jax.data import EVAL_SPLITS
  fields = set(EVALUATOR)
  for name in config.evals:
    e = config.evals[name]
    _check(name not in RESERVED_EVAL_NAMES, f"evals.{name}",
           f"{name!r} names a field of final_metrics.json's 'best'; call the evaluator something else")
    _check(isinstance(e, ml_collections.ConfigDict) and set(e) == fields, f"evals.{name}",
           f"must be dict({', '.join(f'{k}=...' for k in EVALUATOR)}), got "  # a ConfigDict's repr is YAML lines
           f"{e.to_dict() if isinstance(e, ml_collections.ConfigDict) else e!r}")
    _check(e.split in EVAL_SPLITS, f"evals.{name}.split", f"must be one of {', '.join(EVAL_SPLITS)}, got {e.split!r}")
    _check(isinstance(e.every, int) and e.every >= -1, f"evals.{name}.every",
           f"must be N > 0 steps, -1 (each epoch) or 0 (the end only), got {e.every!r}")
  t = config.train
  if t.best_eval:
    _check(t.best_eval in config.evals, "train.best_eval",
           f"{t.best_eval!r} is not an evaluator (config.evals has: {', '.join(sorted(config.evals)) or 'none'}); "
           "name one, or '' to select nothing")
    split = config.evals[t.best_eval].split
    _check(split == "validation", "train.best_eval",
           f"evaluator {t.best_eval!r} reads the {split!r} split; model selection reads a validation split, never test")
  else:
    _check(t.early_stopping.patience == 0, "train.early_stopping.patience",
           "early stopping reads the selection evaluator; set train.best_eval (e.g. 'validation') or patience 0")


def check_on_device(config) -> None:
  """config.data.on_device: the split gathered on the device needs the host's batch as it is stored."""
  d = config.data
  _check(isinstance(d.on_device, bool), "data.on_device", f"must be True or False, got {d.on_device!r}")
  if not d.on_device:
    return
  _check(not (d.augment.random_crop_padding or d.augment.horizontal_flip), "data.on_device",
         "augmentation (data.augment.*) runs on the host, batch by batch; turn augmentation off or set "
         "data.on_device=False")


EVALUATOR = ("split", "every")  # the fields of one config.evals entry
RESERVED_EVAL_NAMES = ("eval", "metric", "mode", "value", "step")  # best's own fields (its evaluators sit beside)


INIT_ACTIONS = ("load", "skip")


def parse_rules(rules) -> list[tuple[str, str]]:
  """config.init.rules -> [(pattern, action)], each rule checked (one line naming the bad one)."""
  _check(isinstance(rules, (tuple, list)), "init.rules",
         f"must be a tuple of 'PATTERN=load|skip' strings, e.g. ('head.*=skip',), got {rules!r}")
  out = []
  for rule in rules:
    pattern, _, action = str(rule).rpartition("=")
    _check(isinstance(rule, str) and pattern.strip() and action.strip() in INIT_ACTIONS, "init.rules",
           f"{rule!r} is not 'PATTERN=load' or 'PATTERN=skip' (e.g. 'head.*=skip')")
    out.append((pattern.strip(), action.strip()))
  return out


def check_init(config) -> None:
  """config.init's fields (whether init.workdir holds a checkpoint is checked when a fresh run starts)."""
  i = config.init
  _check(isinstance(i.step, int) and i.step >= -1, "init.step", f"must be a step >= 0, or -1 (the latest), got {i.step!r}")
  parse_rules(i.rules)
  _check(bool(i.workdir) or (not i.rules and i.step == -1), "init.rules" if i.rules else "init.step",
         "set config.init.workdir (the run whose checkpoint initialises this one) too")
