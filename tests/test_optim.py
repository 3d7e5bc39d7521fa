"""optim.py: schedule values at their landmarks, the weight-decay mask, optimizer steps and clipping."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from bigmodel_jax import optim
from bigmodel_jax.config import base_config
from bigmodel_jax.models import build_model

LR, TOTAL, WARMUP, END = 0.5, 110, 10, 0.1


def make_optimizer(c):
  return optim.make_optimizer(c, optim.make_schedule(c, TOTAL))


def make_config(**optimizer):
  c = base_config()
  c.optimizer.learning_rate = LR
  c.optimizer.update(optimizer)
  return c


def schedule(name, warmup=0, end_factor=END):
  c = make_config()
  c.schedule.name, c.schedule.warmup_steps, c.schedule.end_factor = name, warmup, end_factor
  s = optim.make_schedule(c, TOTAL)
  return lambda step: float(s(step))


def test_constant_schedule():
  s = schedule("constant")
  assert [s(t) for t in (0, TOTAL // 2, TOTAL)] == pytest.approx([LR] * 3)


def test_cosine_schedule():
  s = schedule("cosine")
  assert s(0) == pytest.approx(LR)
  assert s(TOTAL // 2) == pytest.approx(LR * (END + (1 - END) * 0.5), rel=1e-5)  # cos(pi/2) = 0: halfway
  assert s(TOTAL) == pytest.approx(LR * END, rel=1e-5)
  assert s(TOTAL // 4) > s(TOTAL // 2) > s(3 * TOTAL // 4)


def test_warmup_cosine_schedule():
  s = schedule("warmup_cosine", warmup=WARMUP)
  assert s(0) == 0.0
  assert s(WARMUP // 2) == pytest.approx(LR / 2, rel=1e-5)
  assert s(WARMUP) == pytest.approx(LR, rel=1e-5)
  mid = WARMUP + (TOTAL - WARMUP) // 2  # the cosine spans the steps after the warmup
  assert s(mid) == pytest.approx(LR * (END + (1 - END) * 0.5), rel=1e-5)
  assert s(TOTAL) == pytest.approx(LR * END, rel=1e-5)


def test_linear_schedule_with_warmup():
  s = schedule("linear", warmup=WARMUP)
  assert s(0) == 0.0
  assert s(WARMUP // 2) == pytest.approx(LR / 2, rel=1e-5)
  assert s(WARMUP) == pytest.approx(LR, rel=1e-5)
  mid = WARMUP + (TOTAL - WARMUP) // 2
  assert s(mid) == pytest.approx(LR * (1 + END) / 2, rel=1e-5)
  assert s(TOTAL) == pytest.approx(LR * END, rel=1e-5)


def test_linear_schedule_without_warmup():
  s = schedule("linear", end_factor=0.0)
  assert s(0) == pytest.approx(LR)
  assert s(TOTAL // 2) == pytest.approx(LR / 2, rel=1e-5)
  assert s(TOTAL) == pytest.approx(0.0, abs=1e-7)


def mlp_params():
  c = base_config()
  c.model.hidden_sizes = (5,)
  model = build_model(c.model, input_shape=(4,), num_outputs=3, rngs=nnx.Rngs(params=0))
  return nnx.state(model, nnx.Param)


def test_decay_mask_excludes_1d_params():
  params = mlp_params()
  mask = optim.decay_mask(params)
  pairs = list(zip(jax.tree.leaves(params), jax.tree.leaves(mask)))
  assert len(pairs) == 4  # two kernels, two biases
  for p, decays in pairs:
    assert decays == (p.ndim > 1)
  assert sorted(bool(d) for _, d in pairs) == [False, False, True, True]


@pytest.mark.parametrize("name,extra", [("adamw", {}), ("sgd", {"momentum": 0.9})])
def test_weight_decay_spares_biases(name, extra):
  """With a zero gradient only weight decay moves params: kernels shrink, biases stay put."""
  params = mlp_params()
  tx = make_optimizer(make_config(name=name, weight_decay=0.1, **extra))
  zero = jax.tree.map(jnp.zeros_like, params)
  updates, _ = tx.update(zero, tx.init(params), params)
  for p, u in zip(jax.tree.leaves(params), jax.tree.leaves(updates)):
    if p.ndim > 1:
      np.testing.assert_allclose(u, -LR * 0.1 * p, rtol=1e-5, atol=1e-8)
    else:
      assert not np.any(u)


def sgd_steps(grads, **optimizer):
  """Updates from two SGD steps with the given gradients on a single parameter vector."""
  tx = make_optimizer(make_config(name="sgd", **optimizer))
  params = {"w": jnp.ones((3, 2))}
  state = tx.init(params)
  out = []
  for g in grads:
    updates, state = tx.update({"w": g}, state, params)
    params = optax.apply_updates(params, updates)
    out.append(np.asarray(updates["w"]))
  return out


G1, G2 = jnp.full((3, 2), 1.0), jnp.full((3, 2), 2.0)


def test_sgd_plain_momentum_and_nesterov_steps():
  u1, u2 = sgd_steps([G1, G2])
  np.testing.assert_allclose(u1, -LR * G1)
  np.testing.assert_allclose(u2, -LR * G2)
  u1, u2 = sgd_steps([G1, G2], momentum=0.9)
  np.testing.assert_allclose(u1, -LR * G1, rtol=1e-6)
  np.testing.assert_allclose(u2, -LR * (G2 + 0.9 * G1), rtol=1e-6)  # trace t2 = g2 + m t1
  u1, u2 = sgd_steps([G1, G2], momentum=0.9, nesterov=True)
  np.testing.assert_allclose(u1, -LR * (G1 + 0.9 * G1), rtol=1e-6)  # g + m t1 with t1 = g
  t2 = G2 + 0.9 * G1
  np.testing.assert_allclose(u2, -LR * (G2 + 0.9 * t2), rtol=1e-6)


def test_adamw_first_step():
  params = mlp_params()
  tx = make_optimizer(make_config(name="adamw", weight_decay=0.01))
  grads = jax.tree.map(lambda p: jnp.full_like(p, -3.0), params)
  updates, _ = tx.update(grads, tx.init(params), params)
  new = optax.apply_updates(params, updates)
  for p, u, n in zip(jax.tree.leaves(params), jax.tree.leaves(updates), jax.tree.leaves(new)):
    # first Adam step: m_hat / sqrt(v_hat) = sign(g) = -1, so the update is +lr (minus decoupled decay)
    decay = 0.01 * p if p.ndim > 1 else 0.0
    np.testing.assert_allclose(u, LR * (1.0 - decay), rtol=1e-5, atol=1e-6)
    assert np.all(np.isfinite(n))


def test_warmup_schedule_reaches_the_optimizer():
  c = make_config(name="sgd")
  c.schedule.name, c.schedule.warmup_steps = "linear", WARMUP
  tx = make_optimizer(c)
  params = {"w": jnp.ones(3)}
  state = tx.init(params)
  steps = []
  for _ in range(WARMUP + 1):
    updates, state = tx.update({"w": jnp.ones(3)}, state, params)
    steps.append(float(-updates["w"][0]))
  assert steps[0] == 0.0  # step 0 of a warmup has learning rate 0
  assert steps[WARMUP // 2] == pytest.approx(LR / 2, rel=1e-5)
  assert steps[WARMUP] == pytest.approx(LR, rel=1e-5)


def test_an_optimizer_stepping_several_times_per_step_warms_up_and_decays_over_the_same_steps():
  """A GAN's discriminator steps d_steps times per training step: its schedule is indexed by its own update count,
  so both its warmup and its decay are stretched d times (warmup_steps counts training steps, as for the generator)."""
  c = base_config()
  schedule = dict(name="warmup_cosine", warmup_steps=WARMUP, end_factor=END)
  c.optimizers = {n: optim.section_config(params=n, learning_rate=LR, schedule=schedule) for n in ("g", "d")}
  params = {n: {"kernel": jax.ShapeDtypeStruct((2, 2), jnp.float32)} for n in ("g", "d")}
  opts = optim.make_optimizers(c, TOTAL, params, updates_per_step={"d": 3})
  g, d = opts["g"].schedule, opts["d"].schedule
  for step in (0, WARMUP // 2, WARMUP, WARMUP + 7, TOTAL // 2, TOTAL):
    assert float(d(3 * step)) == pytest.approx(float(g(step)), rel=1e-5, abs=1e-9), step
  assert float(d(3 * (WARMUP // 2))) == pytest.approx(LR / 2, rel=1e-5)  # mid-warmup in training steps
  c.optimizers.d.schedule.warmup_steps = TOTAL + 5  # longer than the run in training steps: refused
  with pytest.raises(optim.UserError, match="optimizers.d.schedule.warmup_steps"):
    optim.make_optimizers(c, TOTAL, params, updates_per_step={"d": 3})


def test_grad_clip_norm_bounds_the_update():
  c = make_config(name="sgd", grad_clip_norm=1.0)
  c.optimizer.learning_rate = 1.0
  tx = make_optimizer(c)
  params = {"a": jnp.zeros((4, 3)), "b": jnp.zeros(3)}
  grads = {"a": jnp.full((4, 3), 1e6), "b": jnp.full(3, -2e6)}
  updates, _ = tx.update(grads, tx.init(params), params)
  moved = optax.apply_updates(params, updates)
  delta = float(optax.global_norm(jax.tree.map(jnp.subtract, moved, params)))
  assert delta <= 1.0 + 1e-5
  assert delta == pytest.approx(1.0, rel=1e-5)  # clipped to the bound, not zeroed
  direction = np.asarray(updates["a"]).ravel()[0] / np.asarray(updates["b"])[0]
  assert direction == pytest.approx(-0.5, rel=1e-5)  # the clipped step keeps the gradient's direction
  # without clipping the same step moves by the full gradient norm
  plain = make_optimizer(make_config(name="sgd"))
  unclipped, _ = plain.update(grads, plain.init(params), params)
  assert float(optax.global_norm(unclipped)) > 1e5


@pytest.mark.parametrize("entry, message", [
    (dict(name="adam"), "config.optimizers.g.b1: missing; build each named optimizer with"),
    (5, "config.optimizers.g: must be a section of fields, got 5"),
], ids=["incomplete", "not-a-section"])
def test_a_named_optimizer_that_is_not_a_whole_section_is_one_error(entry, message):
  """Was a KeyError/AttributeError traceback: each section's schedule was read before its fields were checked."""
  config = base_config()
  config.optimizers = dict(g=entry)
  with pytest.raises(optim.UserError) as raised:
    optim.validate(config)
  assert str(raised.value).startswith(message), str(raised.value)
