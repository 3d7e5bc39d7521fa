"""The train state and the compiled steps: pure functions of (state, batch), compiled once.

NNX modules are split into (graphdef, params, model_state) once, outside the steps; each step
merges them inside the trace, so no Python graph traversal happens per call.
"""

from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax
from flax import nnx, struct

from bigmodel_jax import parallel


class TrainState(struct.PyTreeNode):
  step: jax.Array  # int32 scalar: number of updates applied
  params: nnx.State  # trainable nnx.Param variables
  model_state: nnx.State  # everything else the model carries (e.g. batch statistics)
  opt_state: Any
  rng: jax.Array  # raw uint32 PRNG key; step keys are fold_in(rng, step) so resume is exact


class Stepper:
  """Owns the graphdef and the jitted init/train/eval/predict functions for one run."""

  def __init__(self, make_model: Callable[[nnx.Rngs], nnx.Module], tx: optax.GradientTransformation,
               schedule: optax.Schedule, task, mesh, seed: int, input_shape: tuple[int, ...], input_dtype=jnp.float32):
    self.task, self.tx, self.schedule, self.mesh = task, tx, schedule, mesh

    def init() -> TrainState:
      model = make_model(nnx.Rngs(params=jax.random.fold_in(jax.random.PRNGKey(seed), 0)))
      _, params, model_state = nnx.split(model, nnx.Param, ...)
      return TrainState(step=jnp.zeros((), jnp.int32), params=params, model_state=model_state,
                        opt_state=tx.init(params), rng=jax.random.fold_in(jax.random.PRNGKey(seed), 1))

    abstract_model = nnx.eval_shape(lambda: make_model(nnx.Rngs(params=0)))
    self.graphdef = nnx.split(abstract_model, nnx.Param, ...)[0]
    self.abstract_state = jax.eval_shape(init)
    example = {"inputs": jax.ShapeDtypeStruct((1, *input_shape), input_dtype)}
    self.output_shape = jax.eval_shape(self._outputs, self.abstract_state, example).shape  # fails early on misfit
    self.state_sharding = parallel.state_shardings(self.abstract_state, mesh)
    # A restore target: shapes, dtypes and the shardings of *this* mesh.
    self.restore_target = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                                       self.abstract_state, self.state_sharding)
    replicated, batch = parallel.replicated(mesh), parallel.batch_sharding(mesh)
    self.init = jax.jit(init, out_shardings=self.state_sharding)
    self.train_step = jax.jit(self._train_step, in_shardings=(self.state_sharding, batch),
                              out_shardings=(self.state_sharding, replicated), donate_argnums=0)
    self.eval_step = jax.jit(self._eval_step, in_shardings=(self.state_sharding, batch, replicated),
                             out_shardings=replicated, donate_argnums=2)
    self.predict_step = jax.jit(self._predict_step, in_shardings=(self.state_sharding, batch),
                                out_shardings=replicated)

  def model(self, state: TrainState) -> nnx.Module:
    """The NNX module holding `state`'s values (for eval, summaries, inspection; not per step)."""
    return nnx.merge(self.graphdef, state.params, state.model_state)

  def _train_step(self, state: TrainState, batch):
    step_rng = jax.random.fold_in(state.rng, state.step)

    def loss_fn(params):
      model = nnx.merge(self.graphdef, params, state.model_state)
      outputs = model(batch["inputs"], train=True, rngs=nnx.Rngs(dropout=step_rng))
      loss, metrics = self.task.train_loss(outputs, batch)
      return loss, (metrics, nnx.state(model, nnx.Not(nnx.Param)))

    (_, (metrics, model_state)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    updates, opt_state = self.tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    metrics = {**metrics, "grad_norm": optax.global_norm(grads), "param_norm": optax.global_norm(params),
               "learning_rate": self.schedule(state.step)}
    new_state = state.replace(step=state.step + 1, params=params, opt_state=opt_state, model_state=model_state)
    return new_state, metrics

  def _outputs(self, state: TrainState, batch):
    return self.model(state)(batch["inputs"], train=False)

  def _eval_step(self, state: TrainState, batch, sums):
    step_sums = self.task.eval_sums(self._outputs(state, batch), batch)
    return jax.tree.map(jnp.add, sums, step_sums)

  def zero_sums(self, example_batch):
    """Zeroed accumulators shaped like the task's eval sums."""
    shapes = jax.eval_shape(lambda s, b: self.task.eval_sums(self._outputs(s, b), b),
                            self.abstract_state, example_batch)
    return jax.tree.map(lambda a: jnp.zeros(a.shape, a.dtype), shapes)

  def _predict_step(self, state: TrainState, batch):
    # the mask comes back replicated with the predictions, so every process can drop padding rows
    return {**self.task.predict(self._outputs(state, batch)), "mask": batch["mask"]}
