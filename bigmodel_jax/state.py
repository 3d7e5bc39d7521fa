"""The train state and the compiled steps: pure functions of (state, batch), compiled once.

NNX modules are split into (graphdef, params, model_state) once, outside the steps; each step
merges them inside the trace, so no Python graph traversal happens per call.

One step function serves every layout. `strategy='jit'` compiles it with jax.jit over the run's mesh:
explicit in/out shardings from parallel.py (data / FSDP / tensor parallel), the state donated.
`strategy='pmap'` compiles the same function with jax.pmap over the data axis: the state is replicated
with a leading device axis and gradients are averaged with lax.pmean. Mixed precision and gradient
accumulation live here too, so they work the same under both.
"""

from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx, struct
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from bigmodel_jax import parallel
from bigmodel_jax.errors import UserError

STRATEGIES = ("jit", "pmap")
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


class TrainState(struct.PyTreeNode):
  step: jax.Array  # int32 scalar: number of updates applied
  params: nnx.State  # trainable nnx.Param variables, always float32 ("master" weights)
  model_state: nnx.State  # everything else the model carries (e.g. batch statistics)
  opt_state: Any
  rng: jax.Array  # raw uint32 PRNG key; step keys are fold_in(rng, step) so resume is exact


def cast_floats(tree, dtype):
  return jax.tree.map(lambda x: x.astype(dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x, tree)


class Stepper:
  """Owns the graphdef and the compiled init/train/eval/predict functions for one run."""

  def __init__(self, make_model: Callable[[nnx.Rngs], nnx.Module], tx: optax.GradientTransformation,
               schedule: optax.Schedule, task, mesh: Mesh, seed: int, input_shape: tuple[int, ...],
               input_dtype=jnp.float32, *, rules=None, strategy: str = "jit", compute_dtype: str = "float32",
               grad_accum_steps: int = 1):
    if strategy not in STRATEGIES:
      raise UserError(f"config.parallel.strategy: unknown {strategy!r}; valid: {', '.join(STRATEGIES)}")
    if compute_dtype not in DTYPES:
      raise UserError(f"config.train.dtype: unknown {compute_dtype!r}; valid: {', '.join(DTYPES)}")
    if strategy == "pmap" and jax.process_count() > 1:
      raise UserError("config.parallel.strategy: 'pmap' runs on one process here; multi-host runs use 'jit' (the "
                      "same data parallelism with config.mesh.data=-1)")
    if strategy == "pmap" and (mesh.shape["fsdp"] > 1 or mesh.shape["tensor"] > 1):
      raise UserError(f"config.parallel.strategy: 'pmap' is pure data parallel, but the mesh has fsdp="
                      f"{mesh.shape['fsdp']} tensor={mesh.shape['tensor']}; set config.mesh.fsdp=1 and "
                      "config.mesh.tensor=1, or use strategy 'jit'")
    self.task, self.tx, self.schedule, self.mesh = task, tx, schedule, mesh
    self.rules = parallel.make_rules() if rules is None else rules
    self.strategy, self.grad_accum_steps = strategy, grad_accum_steps
    self.compute_dtype = DTYPES[compute_dtype]
    self._axis_name = parallel.DATA_AXIS if strategy == "pmap" else None

    def init() -> TrainState:
      model = make_model(nnx.Rngs(params=jax.random.fold_in(jax.random.PRNGKey(seed), 0)))
      _, params, model_state = nnx.split(model, nnx.Param, ...)
      return TrainState(step=jnp.zeros((), jnp.int32), params=params, model_state=model_state,
                        opt_state=tx.init(params), rng=jax.random.fold_in(jax.random.PRNGKey(seed), 1))

    abstract_model = nnx.eval_shape(lambda: make_model(nnx.Rngs(params=0)))
    self.graphdef, abstract_params, _ = nnx.split(abstract_model, nnx.Param, ...)
    self.abstract_state = jax.eval_shape(init)
    example = {"inputs": jax.ShapeDtypeStruct((1, *input_shape), input_dtype)}
    self.output_shape = jax.eval_shape(self._outputs, self.abstract_state, example).shape  # fails early on misfit
    # where every parameter lives: the models' logical axis names through the rules table
    self.param_partition = parallel.param_specs(self.abstract_state.params, nnx.get_partition_spec(abstract_params),
                                                mesh, self.rules)
    self.state_sharding = parallel.state_shardings(self.abstract_state, self.param_partition, mesh)
    # A restore target: shapes, dtypes and the shardings of *this* mesh (never the saved ones).
    self.restore_target = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                                       self.abstract_state, self.state_sharding)
    replicated = parallel.replicated(mesh)
    self.batch_sharding = parallel.batch_sharding(mesh, self.rules)
    self.batch_shards = parallel.batch_shards(mesh, self.rules)
    self.init = jax.jit(init, out_shardings=self.state_sharding)
    self.eval_step = jax.jit(self._eval_step, in_shardings=(self.state_sharding, self.batch_sharding, replicated),
                             out_shardings=replicated, donate_argnums=2)
    self.predict_step = jax.jit(self._predict_step, in_shardings=(self.state_sharding, self.batch_sharding),
                                out_shardings=replicated)
    if strategy == "jit":
      self.train_step = jax.jit(self._train_step, in_shardings=(self.state_sharding, self.batch_sharding),
                                out_shardings=(self.state_sharding, replicated), donate_argnums=0)
      self._train_batch_sharding = self.batch_sharding
    else:
      # pmap: the state carries a leading axis of one replica per device; metrics come back once (out_axes None)
      devices = list(mesh.devices.flat)
      self._pmap_mesh = Mesh(np.array(devices), (parallel.DATA_AXIS,))
      stacked = NamedSharding(self._pmap_mesh, P(parallel.DATA_AXIS))
      self.train_step = jax.pmap(self._train_step, axis_name=parallel.DATA_AXIS, devices=devices,
                                 donate_argnums=0, out_axes=(0, None))
      self._train_batch_sharding = stacked
      n = len(devices)
      self._replicate = jax.jit(lambda s: jax.tree.map(lambda x: jnp.broadcast_to(x, (n, *x.shape)), s),
                                out_shardings=stacked)
      self._unreplicate = jax.jit(lambda s: jax.tree.map(lambda x: x[0], s), out_shardings=self.state_sharding)

  def model(self, state: TrainState) -> nnx.Module:
    """The NNX module holding `state`'s values (for eval, summaries, inspection; not per step)."""
    return nnx.merge(self.graphdef, state.params, state.model_state)

  # --- layouts: the train loop holds the state in the train step's layout; eval and checkpoints use the plain one

  def place(self, state: TrainState) -> TrainState:
    """A plain state -> the train step's layout (pmap: one replica per device)."""
    return state if self.strategy == "jit" else self._replicate(state)

  def plain(self, state: TrainState) -> TrainState:
    """The train step's layout -> a plain state on the mesh (what eval, predict and checkpoints take)."""
    return state if self.strategy == "jit" else self._unreplicate(state)

  def train_batch(self, local_batch: dict[str, np.ndarray]) -> dict[str, jax.Array]:
    """This process's rows -> the train step's global batch (pmap: split into a leading device axis)."""
    if self.strategy == "pmap":
      n = len(self.mesh.local_devices)
      local_batch = {k: v.reshape(n, v.shape[0] // n, *v.shape[1:]) for k, v in local_batch.items()}
    return parallel.global_batch(local_batch, self._train_batch_sharding)

  def eval_batch(self, local_batch: dict[str, np.ndarray]) -> dict[str, jax.Array]:
    return parallel.global_batch(local_batch, self.batch_sharding)

  # --- the step functions

  def _loss_and_grads(self, params, model_state, batch, rng):
    def loss_fn(params):
      # mixed precision: compute in compute_dtype from float32 master weights; the cast is inside the
      # differentiated function, so gradients arrive in float32
      model = nnx.merge(self.graphdef, cast_floats(params, self.compute_dtype), model_state)
      outputs = model(cast_floats(batch["inputs"], self.compute_dtype), train=True, rngs=nnx.Rngs(dropout=rng))
      loss, metrics = self.task.train_loss(outputs.astype(jnp.float32), batch)
      return loss, (metrics, nnx.state(model, nnx.Not(nnx.Param)))

    (_, (metrics, model_state)), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    return grads, cast_floats(model_state, jnp.float32), metrics

  def _accumulated_grads(self, params, model_state, batch, rng):
    """Gradients of the whole batch, computed over grad_accum_steps microbatches in turn (lax.scan).

    Done inside the step rather than with optax.MultiSteps, so that one call is still one update (the step
    count, schedule, data position and checkpoints do not change with k) and it composes with pmap.
    Microbatch i takes rows i, i+k, i+2k, ...: each device keeps its own rows (no data moves). Each
    microbatch's mean is weighted by its real rows (mask), so the result is the whole batch's masked mean
    even when padding rows fall unevenly. -> (grads, model_state, metrics, real rows)
    """
    k = self.grad_accum_steps
    if k == 1:
      return (*self._loss_and_grads(params, model_state, batch, rng), batch["mask"].sum())
    micro = jax.tree.map(lambda x: jnp.swapaxes(x.reshape(x.shape[0] // k, k, *x.shape[1:]), 0, 1), batch)
    if self._axis_name is None:  # jit: keep each microbatch split over the data axes like the batch
      spec = P(None, *self.batch_sharding.spec)
      micro = jax.lax.with_sharding_constraint(micro, NamedSharding(self.mesh, spec))
    first = jax.tree.map(lambda x: x[0], micro)
    shapes = jax.eval_shape(self._loss_and_grads, params, model_state, first, rng)
    zeros = jax.tree.map(lambda a: jnp.zeros(a.shape, jnp.float32), (shapes[0], shapes[2]))

    def body(carry, xs):
      (grads_sum, metrics_sum), model_state = carry
      i, microbatch = xs
      grads, model_state, metrics = self._loss_and_grads(params, model_state, microbatch, jax.random.fold_in(rng, i))
      rows = microbatch["mask"].sum()
      summed = jax.tree.map(lambda acc, x: acc + rows * x, (grads_sum, metrics_sum), (grads, metrics))
      return (summed, model_state), None

    ((grads, metrics), model_state), _ = jax.lax.scan(body, (zeros, model_state), (jnp.arange(k), micro))
    rows = batch["mask"].sum()
    mean = lambda tree: jax.tree.map(lambda x: x / jnp.maximum(rows, 1.0), tree)
    return mean(grads), model_state, mean(metrics), rows

  def _train_step(self, state: TrainState, batch):
    step_rng = jax.random.fold_in(state.rng, state.step)
    if self._axis_name:  # pmap: each device draws its own dropout for its own rows
      step_rng = jax.random.fold_in(step_rng, jax.lax.axis_index(self._axis_name))
    grads, model_state, metrics, rows = self._accumulated_grads(state.params, state.model_state, batch, step_rng)
    if self._axis_name:  # pmap: average over devices, weighted by real rows; jit's sharded mean spans the batch
      total = jax.lax.psum(rows, self._axis_name)
      grads, metrics = jax.tree.map(lambda x: jax.lax.psum(x * rows, self._axis_name) / jnp.maximum(total, 1.0),
                                    (grads, metrics))
      # float model state (batch statistics) is averaged; keys and counters are the same on every device
      model_state = jax.tree.map(
          lambda x: jax.lax.pmean(x, self._axis_name) if jnp.issubdtype(x.dtype, jnp.floating) else x, model_state)
    updates, opt_state = self.tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    metrics = {**metrics, "grad_norm": optax.global_norm(grads), "param_norm": optax.global_norm(params),
               "learning_rate": self.schedule(state.step)}
    new_state = state.replace(step=state.step + 1, params=params, opt_state=opt_state, model_state=model_state)
    return new_state, metrics

  def _outputs(self, state: TrainState, batch):
    model = nnx.merge(self.graphdef, cast_floats(state.params, self.compute_dtype), state.model_state)
    return model(cast_floats(batch["inputs"], self.compute_dtype), train=False).astype(jnp.float32)

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

  def describe(self) -> list[str]:
    """The run log's account of the layout: mesh, bytes per device, each parameter group's sharding."""
    lines = parallel.describe(self.mesh, self.abstract_state, self.state_sharding, self.param_partition)
    extra = [f"strategy {self.strategy}", f"compute dtype {jnp.dtype(self.compute_dtype).name}"]
    if self.grad_accum_steps > 1:
      extra.append(f"{self.grad_accum_steps} microbatches per step")
    return [f"{lines[0]}; {', '.join(extra)}", *lines[1:]]
