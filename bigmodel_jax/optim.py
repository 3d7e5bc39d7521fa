"""config.optimizer / config.schedule -> an optax GradientTransformation."""

import jax
import optax

from bigmodel_jax.errors import UserError
from bigmodel_jax.registry import Registry

OPTIMIZERS: Registry = Registry("optimizer", "config.optimizer.name")
SCHEDULES: Registry = Registry("schedule", "config.schedule.name")


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


def make_schedule(config, total_steps: int) -> optax.Schedule:
  s = config.schedule
  if s.name in ("warmup_cosine", "linear") and s.warmup_steps >= total_steps:
    raise UserError(f"config.schedule.warmup_steps: {s.warmup_steps} is not below the run's {total_steps} "
                    "training steps; shorten the warmup or train longer")
  return SCHEDULES.get(s.name)(config.optimizer.learning_rate, s, total_steps)


def decay_mask(params):
  """Weight decay applies to matrices and kernels, not to biases or norm scales (ndim <= 1)."""
  return jax.tree.map(lambda p: p.ndim > 1, params)


@OPTIMIZERS.register("sgd")
def _sgd(lr, o):
  return optax.sgd(lr, momentum=o.momentum or None, nesterov=o.nesterov)


@OPTIMIZERS.register("adam")
def _adam(lr, o):
  return optax.adam(lr, b1=o.b1, b2=o.b2, eps=o.eps, mu_dtype=o.mu_dtype)


@OPTIMIZERS.register("adamw")
def _adamw(lr, o):
  return optax.adamw(lr, b1=o.b1, b2=o.b2, eps=o.eps, mu_dtype=o.mu_dtype, weight_decay=o.weight_decay,
                     mask=decay_mask)


def make_optimizer(config, schedule: optax.Schedule) -> optax.GradientTransformation:
  """clip (optional) -> coupled weight decay (sgd/adam, optional) -> optimizer following `schedule`.

  The caller keeps `schedule` to log the learning rate, so the logged value is the one applied.
  """
  o = config.optimizer
  chain = []
  if o.grad_clip_norm > 0:
    chain.append(optax.clip_by_global_norm(o.grad_clip_norm))
  if o.weight_decay > 0 and o.name != "adamw":  # adamw decouples decay itself
    chain.append(optax.add_decayed_weights(o.weight_decay, mask=decay_mask))
  chain.append(OPTIMIZERS.get(o.name)(schedule, o))
  return optax.chain(*chain)
