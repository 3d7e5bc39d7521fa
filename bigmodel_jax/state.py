"""The train state and the compiled steps: pure functions of (state, batch), compiled once.

NNX modules are split into (graphdef, params, model_state) once, outside the steps; each step merges
them inside the trace, so no Python graph traversal happens per call.

The step interface. The shared step here does what every model needs: it derives the step's key,
hands (state, batch, key) to the task's `update`, and counts the step. A task's update is written with
the `Steps` methods below, which keep the machinery in one place:

  grads, model_state, metrics = steps.grads(loss_fn, state, batch, key, wrt="discriminator")
  state, more_metrics = steps.apply_gradients(state, grads, model_state, wrt="discriminator")

`grads` runs `loss_fn(model, batch, rngs) -> (loss, metrics)` in the compute dtype (mixed precision:
float32 master weights, gradients back in float32), over `grad_accum_steps` microbatches, averaged over
the replicas of the layout (pmap) and weighted by real rows; `rngs` holds one key per example, derived
from (seed, step, row of the global batch), so dropout and noise are the same on every layout and for
every microbatch split. `apply_gradients` steps one named optimizer (or all) over the parameters it owns.
A supervised task's update is those two calls (tasks.Task.update); a GAN makes them twice.

Where the arrays live (shardings, pmap replication, bytes per device) is the layout's business
(layout.Layout); the steps here are compiled by it.
"""

from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx, struct

from bigmodel_jax import layout, optim
from bigmodel_jax.models.layers import ExampleRngs, real_rows, seed_key
from bigmodel_jax.registry import Registry

DTYPES: Registry = Registry("compute dtype", "config.train.dtype")
DTYPES.register("float32")(jnp.float32)
DTYPES.register("bfloat16")(jnp.bfloat16)


class TrainState(struct.PyTreeNode):
  step: jax.Array  # int32 scalar: number of updates applied
  params: nnx.State  # trainable nnx.Param variables, always float32 ("master" weights)
  model_state: nnx.State  # everything else the model carries (e.g. batch statistics)
  opt_state: dict[str, Any]  # one optimizer state per named optimizer (optim.make_optimizers)
  rng: jax.Array  # raw uint32 PRNG key; step keys are fold_in(rng, step) so resume is exact


def cast_floats(tree, dtype):
  return jax.tree.map(lambda x: x.astype(dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x, tree)


def example_keys(key: jax.Array, rows: jax.Array) -> jax.Array:
  """One key per example: fold_in(key, global row), so a row's randomness does not depend on the layout."""
  return jax.vmap(jax.random.fold_in, (None, 0))(key, rows.astype(jnp.uint32))


class Steps:
  """The compiled init/train/eval/predict functions of one run, over the layout's shardings."""

  def __init__(self, make_model: Callable[[nnx.Rngs], nnx.Module], make_optimizers, task, layout_config, mesh,
               seed: int, input_shape: tuple[int, ...], input_dtype=jnp.float32, *, rules=None,
               compute_dtype: str = "float32", grad_accum_steps: int = 1):
    """`make_optimizers(abstract_params) -> {name: optim.Optimizer}` (each owns a part of the parameters)."""
    self.task = task
    self.input_shape = tuple(input_shape)
    self.compute_dtype = DTYPES.get(compute_dtype)
    self.grad_accum_steps = grad_accum_steps
    abstract_model = nnx.eval_shape(lambda: make_model(nnx.Rngs(params=0)))
    self.graphdef, abstract_params, _ = nnx.split(abstract_model, nnx.Param, ...)
    self.optimizers = optimizers = make_optimizers(abstract_params)

    def init() -> TrainState:
      model = make_model(nnx.Rngs(params=jax.random.fold_in(seed_key(seed), 0)))
      _, params, model_state = nnx.split(model, nnx.Param, ...)
      return TrainState(step=jnp.zeros((), jnp.int32), params=params, model_state=model_state,
                        opt_state={name: o.tx.init(params) for name, o in optimizers.items()},
                        rng=jax.random.fold_in(seed_key(seed), 1))

    self.abstract_state = jax.eval_shape(init)
    example = {"inputs": jax.ShapeDtypeStruct((1, *input_shape), input_dtype),
               "mask": jax.ShapeDtypeStruct((1,), jnp.float32), "index": jax.ShapeDtypeStruct((1,), jnp.int32)}
    # runs the model abstractly on one example: a misfit fails here, before anything is compiled
    self.output_shape = jax.eval_shape(lambda s, b: task.outputs(self.model(s, cast=True), b),
                                       self.abstract_state, example).shape
    self.layout = layout.make_layout(layout_config, mesh, self.abstract_state,
                                       nnx.get_partition_spec(abstract_params), rules)
    self.init = self.layout.compile_init(init)
    self.train_step = self.layout.compile_train(self._train_step)
    self.train_steps = self.layout.compile_train(self._train_steps, stacked=True)  # k steps per call
    self.eval_step = self.layout.compile_eval(self._eval_step)
    self.predict_step = self.layout.compile_predict(self._predict_step)
    self._on_device = {}  # on_device(k): compiled on first use

  def model(self, state: TrainState, cast: bool = False) -> nnx.Module:
    """The NNX module holding `state`'s values (`cast`: parameters in the compute dtype)."""
    params = cast_floats(state.params, self.compute_dtype) if cast else state.params
    # tree.map copies the Variables: calling the module (even in training mode) never writes into `state`
    return nnx.merge(self.graphdef, params, jax.tree.map(lambda x: x, state.model_state))

  # --- the pieces a task's update is made of

  def grads(self, loss_fn, state: TrainState, batch, key, *, wrt: str | None = None, model_state=None):
    """Gradients of `loss_fn(model, batch, rngs) -> (loss, {metric: scalar})` over the whole global batch,
    w.r.t. the parameters optimizer `wrt` owns (None: all). -> (grads, model_state, metrics)

    Microbatch i of grad_accum_steps takes rows i, i+k, ... (each device keeps its own rows), run in turn by
    lax.scan inside the one step, so steps, schedules and checkpoints do not change with k; each microbatch's
    mean is weighted by what it is a mean over (the task's weight: its real rows, a masked LM's selected tokens),
    so padding never counts and the update is the whole batch's however the batch is split.
    """
    params = state.params
    model_state = state.model_state if model_state is None else model_state
    owned = None if wrt is None else self.optimizers[wrt].mask
    k = self.grad_accum_steps

    def one(model_state, microbatch):
      def f(p):
        if owned is not None:  # parameters of other optimizers are constants here
          p = jax.tree.map(lambda own, x: x if own else jax.lax.stop_gradient(x), owned, p)
        # fresh Variables in this trace (tree.map rebuilds them), so BatchNorm may update its statistics
        model = nnx.merge(self.graphdef, cast_floats(p, self.compute_dtype), jax.tree.map(lambda x: x, model_state))
        inputs = {**microbatch, "inputs": cast_floats(microbatch["inputs"], self.compute_dtype)}
        with real_rows(microbatch["mask"]):  # BatchNorm's statistics leave padding rows out
          loss, metrics = loss_fn(model, inputs, ExampleRngs(example_keys(key, microbatch["row"])))
        return loss, (metrics, nnx.state(model, nnx.Not(nnx.Param)))

      (_, (metrics, new_model_state)), g = jax.value_and_grad(f, has_aux=True)(params)
      metrics = jax.tree.map(lambda x: x.astype(jnp.float32), metrics)
      return g, cast_floats(new_model_state, jnp.float32), metrics

    if k == 1:
      grads, model_state, metrics = one(model_state, batch)
    else:
      micro = jax.tree.map(lambda x: jnp.swapaxes(x.reshape(x.shape[0] // k, k, *x.shape[1:]), 0, 1), batch)
      micro = self.layout.constrain_microbatches(micro)
      shapes = jax.eval_shape(one, model_state, jax.tree.map(lambda x: x[0], micro))
      zeros = jax.tree.map(lambda a: jnp.zeros(a.shape, jnp.float32), (shapes[0], shapes[2]))

      def body(carry, microbatch):
        sums, model_state = carry
        g, model_state, metrics = one(model_state, microbatch)
        rows = self.task.weight(microbatch)
        return (jax.tree.map(lambda acc, x: acc + rows * x, sums, (g, metrics)), model_state), None

      ((grads, metrics), model_state), _ = jax.lax.scan(body, (zeros, model_state), micro)
      rows = jnp.maximum(self.task.weight(batch), 1.0)
      grads, metrics = jax.tree.map(lambda x: x / rows, (grads, metrics))
    # pmap: a weighted mean over the replicas (jit's arrays already span the global batch)
    grads, metrics = self.layout.mean_over_replicas((grads, metrics), self.task.weight(batch))
    return grads, self.layout.sync_model_state(model_state), metrics

  def apply_gradients(self, state: TrainState, grads, model_state=None, *, wrt: str | None = None):
    """Steps optimizer `wrt` (None: every optimizer) over the parameters it owns. -> (state, metrics)
    metrics: grad_norm, param_norm, learning_rate (per optimizer, `name/grad_norm`, with several)."""
    names = list(self.optimizers) if wrt is None else [wrt]
    params, opt_state, metrics = state.params, dict(state.opt_state), {}
    for name in names:
      o = self.optimizers[name]
      owned = lambda tree: [x for own, x in zip(jax.tree.leaves(o.mask), jax.tree.leaves(tree)) if own]
      updates, opt_state[name] = o.tx.update(grads, opt_state[name], params)
      params = jax.tree.map(lambda own, p, u: p + u.astype(p.dtype) if own else p, o.mask, params, updates)
      prefix = "" if len(self.optimizers) == 1 else f"{name}/"
      metrics.update({f"{prefix}grad_norm": optax.global_norm(owned(grads)),
                      f"{prefix}learning_rate": o.schedule(state.step * o.updates_per_step)})
    metrics["param_norm"] = optax.global_norm(params)
    new_model_state = state.model_state if model_state is None else model_state
    return state.replace(params=params, opt_state=opt_state, model_state=new_model_state), metrics

  # --- the compiled functions

  def train_step_function(self, state: TrainState, batch):
    """The uncompiled train step (for an abstract check with jax.eval_shape)."""
    return self._train_step(state, batch)

  def _train_step(self, state: TrainState, batch):
    new_state, metrics = self.task.update(self, state, batch, jax.random.fold_in(state.rng, state.step))
    return new_state.replace(step=state.step + 1), metrics

  def _train_steps(self, state: TrainState, batches):
    """len(batches) train steps in one call (config.train.steps_per_call): the same step, scanned over batches
    stacked on a leading axis; metrics come back stacked likewise."""
    return jax.lax.scan(self._train_step, state, batches)

  def on_device(self, k: int):
    """config.data.on_device (data.feed.DeviceFeed): k train steps in one call, (state, data) -> (state, metrics),
    each step gathering its batch from `data` by its own step counter (metrics stacked when k > 1)."""
    if k not in self._on_device:
      from bigmodel_jax.data import feed

      def one(state, data):
        return self._train_step(state, feed.gather(data, state.step, self.input_shape[0], self.layout.constrain_batch))

      def several(state, data):
        return jax.lax.scan(lambda s, _: one(s, data), state, None, length=k)
      self._on_device[k] = self.layout.compile_train(one if k == 1 else several, data=True)
    return self._on_device[k]

  def _eval_step(self, state: TrainState, batch, sums):
    step_sums = self.task.evaluate_batch(self.model(state, cast=True), self._cast_inputs(batch))
    return jax.tree.map(jnp.add, sums, step_sums)

  def _cast_inputs(self, batch):
    return {**batch, "inputs": cast_floats(batch["inputs"], self.compute_dtype)}

  def zero_sums(self, example_batch):
    """Zeroed accumulators shaped like the task's eval sums."""
    shapes = jax.eval_shape(lambda s, b: self.task.evaluate_batch(self.model(s, cast=True), self._cast_inputs(b)),
                            self.abstract_state, example_batch)
    return jax.tree.map(lambda a: jnp.zeros(a.shape, a.dtype), shapes)

  def _predict_step(self, state: TrainState, batch):
    # the mask comes back replicated with the predictions, so every process can drop padding rows
    return {**self.task.predict_batch(self.model(state, cast=True), self._cast_inputs(batch)), "mask": batch["mask"]}

  def describe(self) -> list[str]:
    """The run log's account of the layout: mesh, bytes per device, each parameter group's sharding."""
    lines = self.layout.describe()
    extra = [f"compute dtype {jnp.dtype(self.compute_dtype).name}"]
    if self.grad_accum_steps > 1:
      extra.append(f"{self.grad_accum_steps} microbatches per step")
    if len(self.optimizers) > 1:
      extra.append("optimizers " + ", ".join(f"{n} ({o.num_params:,} values)" for n, o in self.optimizers.items()))
    return [f"{lines[0]}, {', '.join(extra)}", *lines[1:]]


def num_values(tree) -> int:
  return int(sum(np.size(x) for x in jax.tree.leaves(tree)))
