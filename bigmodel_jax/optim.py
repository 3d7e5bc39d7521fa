"""Optimizers from the config: optax transformations, schedules, clipping, weight decay by parameter role.

A run has one optimizer (`config.optimizer` + `config.schedule`, named "default") or several named ones
(`config.optimizers.<name>`, each a whole optimizer section with its own `schedule` and a `params`
pattern saying which parameters it owns). Every parameter is owned by exactly one optimizer; each
optimizer's state covers only its own parameters (optax.masked), and its states are sharded and
checkpointed like the parameters.
"""

import dataclasses
import fnmatch
import math
from typing import Any

import jax
import ml_collections
import optax

from bigmodel_jax.errors import UserError
from bigmodel_jax.registry import Registry

OPTIMIZERS: Registry = Registry("optimizer", "config.optimizer.name")
SCHEDULES: Registry = Registry("schedule", "config.schedule.name")
DEFAULT = "default"  # the name of the one optimizer built from config.optimizer
MU_DTYPES = ("float32", "bfloat16")


@SCHEDULES.register("constant")
def _constant(lr, s, total_steps):
  return optax.constant_schedule(lr)


@SCHEDULES.register("cosine")
def _cosine(lr, s, total_steps):
  return optax.cosine_decay_schedule(lr, decay_steps=total_steps, alpha=s.end_factor)


@SCHEDULES.register("warmup_cosine")
def _warmup_cosine(lr, s, total_steps):
  return optax.warmup_cosine_decay_schedule(0.0, lr, warmup_steps=s.warmup_steps,
                                            decay_steps=total_steps, end_value=lr * s.end_factor)


@SCHEDULES.register("linear")
def _linear(lr, s, total_steps):
  warmup = optax.linear_schedule(0.0, lr, s.warmup_steps)
  decay = optax.linear_schedule(lr, lr * s.end_factor, max(total_steps - s.warmup_steps, 1))
  return optax.join_schedules([warmup, decay], [s.warmup_steps]) if s.warmup_steps else decay


# --- weight decay by parameter role (the last name of a parameter's path), the same in every layout
DECAYED = ("kernel",)  # dense, conv, attention and LSTM weight matrices, however they are stacked
EMBEDDINGS = ("embedding", "pos_embed", "type_embed", "cls")  # token / position / token-type embeddings, prefix vectors
# everything else (biases, LayerNorm/BatchNorm scales, ...) is never decayed


def _name(path) -> str:
  names = [str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in path]
  return ".".join(n for n in names if n != "value")


def decays(name: str, decay_embeddings: bool = False) -> bool:
  role = name.rsplit(".", 1)[-1]
  return role in DECAYED or (decay_embeddings and role in EMBEDDINGS)


def decay_mask(params, decay_embeddings: bool = False):
  """True for the parameters weight decay applies to: kernels, and embeddings if asked; never biases or norms."""
  return jax.tree_util.tree_map_with_path(lambda p, _: decays(_name(p), decay_embeddings), params)


@OPTIMIZERS.register("sgd")
def _sgd(lr, o, mask):
  return optax.sgd(lr, momentum=o.momentum or None, nesterov=o.nesterov)


@OPTIMIZERS.register("adam")
def _adam(lr, o, mask):
  return optax.adam(lr, b1=o.b1, b2=o.b2, eps=o.eps, mu_dtype=o.mu_dtype)


@OPTIMIZERS.register("adamw")
def _adamw(lr, o, mask):
  return optax.adamw(lr, b1=o.b1, b2=o.b2, eps=o.eps, mu_dtype=o.mu_dtype, weight_decay=o.weight_decay, mask=mask)


# --- config sections

def section_config(**overrides) -> ml_collections.ConfigDict:
  """One named optimizer for config.optimizers.<name>: every optimizer field, a schedule, and `params`
  (fnmatch patterns of parameter paths, comma-separated; 'generator' owns generator.*)."""
  from bigmodel_jax.config import base_config
  base = base_config()
  section = ml_collections.ConfigDict({**base.optimizer.to_dict(), "schedule": base.schedule.to_dict(), "params": "*"})
  for key, value in overrides.items():
    if key not in section:
      raise UserError(f"config.optimizers: {key!r} is not an optimizer field; valid: {', '.join(sorted(section))}")
    if isinstance(value, dict):
      section[key].update(value)
    else:
      section[key] = value
  return section


_RANGES = [
    ("learning_rate", lambda v: v > 0 and math.isfinite(v), "must be a positive number"),
    ("momentum", lambda v: 0 <= v < 1, "must be in [0, 1)"),
    ("b1", lambda v: 0 <= v < 1, "must be in [0, 1)"),
    ("b2", lambda v: 0 <= v < 1, "must be in [0, 1)"),
    ("eps", lambda v: v > 0, "must be > 0"),
    ("weight_decay", lambda v: v >= 0, "must be >= 0"),
    ("grad_clip_norm", lambda v: v >= 0, "must be >= 0 (0 = no clipping)"),
    ("mu_dtype", lambda v: v in MU_DTYPES, f"must be one of {', '.join(MU_DTYPES)}"),
]
_SCHEDULE_RANGES = [
    ("warmup_steps", lambda v: v >= 0, "must be >= 0"),
    ("end_factor", lambda v: 0 <= v <= 1, "must be in [0, 1]"),
]


def sections(config) -> dict[str, tuple[Any, Any, str]]:
  """{name: (optimizer section, schedule section, config field prefix)} for every optimizer of the run."""
  named = config.get("optimizers") or {}
  if not named:
    return {DEFAULT: (config.optimizer, config.schedule, "optimizer")}
  return {name: (s, s.schedule, f"optimizers.{name}") for name, s in named.items()}


def validate(config) -> None:
  """Every optimizer section of the config: known names and values in range (one line naming the field)."""
  named = config.get("optimizers") or {}
  if named:  # the single optimizer's sections would be silently unused: refuse edits to them
    from bigmodel_jax.config import base_config
    base = base_config()
    for part in ("optimizer", "schedule"):
      changed = [k for k in base[part] if config[part][k] != base[part][k]]
      if changed:
        raise UserError(f"config.{part}.{changed[0]}: unused, because this run has named optimizers "
                        f"({', '.join(named)}); set config.optimizers.<name>.{'schedule.' if part == 'schedule' else ''}"
                        f"{changed[0]} instead")
  reference, build = section_config(), "build each named optimizer with bigmodel_jax.optim.section_config(...)"
  for name, o in named.items():  # whole sections first: sections() reads each one's schedule
    for field, keys in ((f"optimizers.{name}", reference), (f"optimizers.{name}.schedule", reference.schedule)):
      section = o if keys is reference else o.schedule
      if not isinstance(section, ml_collections.ConfigDict):
        raise UserError(f"config.{field}: must be a section of fields, got {section!r}; {build}")
      for key in keys:
        if key not in section:
          raise UserError(f"config.{field}.{key}: missing; {build}")
  for name, (o, s, field) in sections(config).items():
    sched_field = "schedule" if field == "optimizer" else f"{field}.schedule"
    for key, ok, message in _RANGES:
      if not ok(o[key]):
        raise UserError(f"config.{field}.{key}: {message}, got {o[key]!r}")
    for key, ok, message in _SCHEDULE_RANGES:
      if not ok(s[key]):
        raise UserError(f"config.{sched_field}.{key}: {message}, got {s[key]!r}")
    _get(OPTIMIZERS, o.name, f"config.{field}.name")
    _get(SCHEDULES, s.name, f"config.{sched_field}.name")


def _get(registry: Registry, name: str, field: str):
  try:
    return registry.get(name)
  except UserError as e:
    raise UserError(str(e).replace(registry.field, field, 1)) from None


def _schedule(o, s, total_steps: int, sched_field: str, per_step: int = 1) -> optax.Schedule:
  """The schedule over the optimizer's own updates: `per_step` per training step (a GAN's d_steps), so its
  warmup and its decay both span the training steps the config gives."""
  if s.name in ("warmup_cosine", "linear") and s.warmup_steps >= total_steps:
    raise UserError(f"config.{sched_field}.warmup_steps: {s.warmup_steps} is not below the run's {total_steps} "
                    "training steps; shorten the warmup or train longer")
  if per_step != 1:
    s = ml_collections.ConfigDict({**s.to_dict(), "warmup_steps": s.warmup_steps * per_step})
  return _get(SCHEDULES, s.name, f"config.{sched_field}.name")(o.learning_rate, s, total_steps * per_step)


def _transformation(o, schedule, field: str) -> optax.GradientTransformation:
  """clip (optional) -> coupled weight decay (sgd/adam, optional) -> optimizer following `schedule`."""
  mask = lambda params: decay_mask(params, o.get("decay_embeddings", False))
  chain = []
  if o.grad_clip_norm > 0:
    chain.append(optax.clip_by_global_norm(o.grad_clip_norm))
  if o.weight_decay > 0 and o.name != "adamw":  # adamw decouples decay itself
    chain.append(optax.add_decayed_weights(o.weight_decay, mask=mask))
  chain.append(_get(OPTIMIZERS, o.name, f"config.{field}.name")(schedule, o, mask))
  return optax.chain(*chain)


def make_schedule(config, total_steps: int) -> optax.Schedule:
  """config.optimizer's schedule (the single-optimizer form)."""
  return _schedule(config.optimizer, config.schedule, total_steps, "schedule")


def make_optimizer(config, schedule: optax.Schedule) -> optax.GradientTransformation:
  """config.optimizer's transformation over all parameters (the single-optimizer form)."""
  return _transformation(config.optimizer, schedule, "optimizer")


@dataclasses.dataclass
class Optimizer:
  """One named optimizer: its transformation (over its own parameters only), schedule and ownership mask."""
  name: str
  tx: optax.GradientTransformation
  schedule: optax.Schedule
  mask: Any  # a params-shaped tree of Python bools: True where this optimizer owns the parameter
  num_params: int
  updates_per_step: int = 1  # its schedule is indexed by its own update count: step * updates_per_step


def _owns(patterns: str, name: str) -> bool:
  return any(fnmatch.fnmatchcase(name, p) or name.startswith(p + ".") for p in
             (p.strip() for p in patterns.split(",")) if p)


def frozen_params(patterns, owned: set[str], field: str, groups: list[str]) -> set[str]:
  """The names among `owned` that config.<field>.frozen's patterns freeze (each pattern must freeze something)."""
  if isinstance(patterns, str) or not all(isinstance(p, str) and p for p in patterns):
    raise UserError(f"config.{field}.frozen: must be a tuple of parameter-name patterns, e.g. ('hidden.*',), "
                    f"got {patterns!r}")
  frozen = set()
  for pattern in patterns:
    matched = {n for n in owned if _owns(pattern, n)}
    if not matched:
      raise UserError(f"config.{field}.frozen: {pattern!r} matches no parameter; parameter groups: "
                      f"{', '.join(groups)} (e.g. '{groups[0]}.*'; names like {', '.join(sorted(owned)[:3])})")
    frozen |= matched
  if frozen and frozen == owned:
    raise UserError(f"config.{field}.frozen: {tuple(patterns)!r} freezes every parameter, so nothing would train; "
                    "leave some parameters unfrozen")
  return frozen


def make_optimizers(config, total_steps: int, abstract_params, required: tuple[str, ...] = (),
                    updates_per_step: dict[str, int] | None = None) -> dict[str, Optimizer]:
  """Every optimizer of the run over the parameters it owns; `required`: the names the task's update steps;
  `updates_per_step`: how often each steps per train step (a GAN's d_steps), so its schedule spans the run."""
  named = sections(config)
  task = config.task.name
  if required:
    if list(named) == [DEFAULT]:
      raise UserError(f"config.optimizers: task {task!r} steps {len(required)} optimizers ({', '.join(required)}); "
                      "give each one with config.optimizers.<name> = optim.section_config(params=...)")
    missing = [n for n in required if n not in named]
    if missing:
      raise UserError(f"config.optimizers.{missing[0]}: missing; task {task!r} steps optimizers "
                      f"{', '.join(required)}, the config has {', '.join(named)}")
    extra = [n for n in named if n not in required]
    if extra:
      raise UserError(f"config.optimizers.{extra[0]}: task {task!r} steps only {', '.join(required)}; remove it")
  leaves = jax.tree_util.tree_leaves_with_path(abstract_params)
  names = [_name(p) for p, _ in leaves]
  groups = sorted({n.split(".")[0] for n in names})
  owners = {n: [] for n in names}
  masks = {}
  for opt_name, (o, _, field) in named.items():
    patterns = "*" if field == "optimizer" else o.params
    owned = {n for n in names if _owns(patterns, n)}
    if not owned:
      raise UserError(f"config.{field}.params: {patterns!r} matches no parameter; parameter groups: "
                      f"{', '.join(groups)} (e.g. '{groups[0]}' owns {groups[0]}.*)")
    for n in owned:
      owners[n].append(opt_name)
    owned -= frozen_params(o.get("frozen", ()), owned, field, groups)  # zero updates, no optimizer state
    masks[opt_name] = jax.tree_util.tree_map_with_path(lambda p, _: _name(p) in owned, abstract_params)
  for n, who in owners.items():
    if len(who) != 1:
      problem = "is owned by no optimizer" if not who else f"is owned by {len(who)} optimizers ({', '.join(who)})"
      raise UserError(f"config.optimizers: parameter {n} {problem}; make the params patterns cover each parameter "
                      "exactly once")
  out = {}
  for opt_name, (o, s, field) in named.items():
    sched_field = "schedule" if field == "optimizer" else f"{field}.schedule"
    per_step = (updates_per_step or {}).get(opt_name, 1)
    schedule = _schedule(o, s, total_steps, sched_field, per_step)
    tx = _transformation(o, schedule, field)
    mask = masks[opt_name]
    if not all(jax.tree.leaves(mask)):  # the state covers only this optimizer's parameters
      tx = optax.masked(tx, mask)
    count = sum(math.prod(leaf.shape) for (p, leaf) in leaves if _name(p) in
                {n for n, who in owners.items() if who == [opt_name]})
    out[opt_name] = Optimizer(opt_name, tx, schedule, mask, count, per_step)
  return out
