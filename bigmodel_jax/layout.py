"""Layouts (config.parallel.strategy, a registry): where the train state and batches live, and how the steps
are compiled for that. `jit` works on any mesh (explicit in/out shardings, the state donated); `pmap` is pure
data parallel (one replica per device, gradients averaged over the replica axis weighted by real rows). The
steps themselves (state.py) never ask which layout they run on; shardings come from parallel.py.
"""

import abc
import contextlib
import contextvars

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from bigmodel_jax.errors import UserError
from bigmodel_jax.parallel import (DATA_AXIS, batch_sharding, batch_shards, describe, global_batch, make_rules,
                                   param_specs, replicated, state_shardings)
from bigmodel_jax.registry import Registry

_REPLICA_AXIS: contextvars.ContextVar[str | None] = contextvars.ContextVar("replica_axis", default=None)


def replica_axis() -> str | None:
  """The pmap axis name while a pmap layout traces a step (for cross-replica batch statistics), else None."""
  return _REPLICA_AXIS.get()


@contextlib.contextmanager
def _replica_axis(name: str):
  token = _REPLICA_AXIS.set(name)
  try:
    yield
  finally:
    _REPLICA_AXIS.reset(token)


LAYOUTS: Registry = Registry("strategy", "config.parallel.strategy")


class Layout(abc.ABC):
  """Shardings of the train state and batches on the run's mesh, placement, and the compiled steps' wrappers.

  The train loop holds the state in the train step's layout (`place`); eval, predict and checkpoints take the
  plain one (`plain`). Batches come in as this process's rows (`train_batch` / `eval_batch`), with `row`, each
  row's index in the global batch, added for per-example randomness.
  """

  def __init__(self, mesh: Mesh, abstract_state, logical_specs, rules=None):
    self.mesh = mesh
    self.rules = make_rules() if rules is None else rules
    self.abstract_state = abstract_state
    self.param_partition = param_specs(abstract_state.params, logical_specs, mesh, self.rules)
    self.state_sharding = state_shardings(abstract_state, self.param_partition, mesh)
    # A restore target: shapes, dtypes and the shardings of *this* mesh (never the saved ones).
    self.restore_target = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                                       abstract_state, self.state_sharding)
    self.batch_sharding = batch_sharding(mesh, self.rules)
    self.batch_shards = batch_shards(mesh, self.rules)
    self.replicated = replicated(mesh)
    self._rows: dict[int, np.ndarray] = {}  # each row's index in the global batch, by local batch size

  def compile_init(self, init):
    return jax.jit(init, out_shardings=self.state_sharding)

  def compile_eval(self, eval_step):
    return jax.jit(eval_step, in_shardings=(self.state_sharding, self.batch_sharding, self.replicated),
                   out_shardings=self.replicated, donate_argnums=2)

  def compile_predict(self, predict_step):
    return jax.jit(predict_step, in_shardings=(self.state_sharding, self.batch_sharding),
                   out_shardings=self.replicated)

  name: str  # its config.parallel.strategy

  @abc.abstractmethod
  def compile_train(self, train_step, stacked: bool = False, data: bool = False):
    """The train step (state, batch) -> (state, metrics), compiled for this layout; `stacked`: its batch is
    several steps' batches stacked on a leading axis (train_batches), its metrics stacked likewise; `data`: its
    second argument is not a batch but arrays placed by place_data (config.data.on_device), never donated."""

  @abc.abstractmethod
  def place_data(self, arrays: dict[str, np.ndarray]) -> dict[str, jax.Array]:
    """Arrays every device keeps whole (config.data.on_device: the training split and its index table), placed
    for compile_train(data=True); each process passes the same arrays."""

  def place(self, state):
    return state

  def plain(self, state):
    return state

  def _with_rows(self, local_batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    n = len(local_batch["mask"])
    if n not in self._rows:  # made once per batch size, not per step
      self._rows[n] = np.arange(n, dtype=np.int32) + np.int32(jax.process_index() * n)
    return {**local_batch, "row": self._rows[n]}

  def train_batch(self, local_batch: dict[str, np.ndarray]) -> dict[str, jax.Array]:
    return global_batch(self._with_rows(local_batch), self.batch_sharding)

  def train_batches(self, local_batches: list[dict[str, np.ndarray]]) -> dict[str, jax.Array]:
    """Several steps' batches, stacked on a new leading axis (k x batch x ...) in one transfer."""
    return global_batch(_stack([self._with_rows(b) for b in local_batches]), self.stacked_batch_sharding)

  @property
  def stacked_batch_sharding(self) -> NamedSharding:
    return NamedSharding(self.mesh, P(None, *self.batch_sharding.spec))

  def eval_batch(self, local_batch: dict[str, np.ndarray]) -> dict[str, jax.Array]:
    return global_batch(self._with_rows(local_batch), self.batch_sharding)

  def constrain_batch(self, batch):
    """The rows of a global batch made inside a step (config.data.on_device: its example indices, before they
    are gathered) that each device keeps: split over the data axes like a batch sent in."""
    return batch

  def constrain_microbatches(self, micro):
    """Microbatches (k x B/k x ...) stay split over the data axes like the batch."""
    return micro

  def mean_over_replicas(self, tree, rows):
    """Averages per-replica means (weighted by each replica's real rows); jit's arrays are already global."""
    return tree

  def sync_model_state(self, model_state):
    return model_state

  def describe(self) -> list[str]:
    lines = describe(self.mesh, self.abstract_state, self.state_sharding, self.param_partition)
    return [f"{lines[0]}; strategy {self.name}", *lines[1:]]


@LAYOUTS.register("jit")
class JitLayout(Layout):
  """jax.jit over the mesh with explicit in/out shardings: data, FSDP and tensor parallel, the state donated."""
  name = "jit"

  def compile_train(self, train_step, stacked: bool = False, data: bool = False):
    batches = self.stacked_batch_sharding if stacked else self.batch_sharding
    return jax.jit(train_step, in_shardings=(self.state_sharding, self.replicated if data else batches),
                   out_shardings=(self.state_sharding, self.replicated), donate_argnums=0)

  def constrain_batch(self, batch):
    return jax.lax.with_sharding_constraint(batch, self.batch_sharding)

  def place_data(self, arrays: dict[str, np.ndarray]) -> dict[str, jax.Array]:
    return {k: jax.make_array_from_callback(a.shape, self.replicated, lambda index, a=a: a[index])
            for k, a in arrays.items()}

  def constrain_microbatches(self, micro):
    spec = P(None, *self.batch_sharding.spec)
    return jax.lax.with_sharding_constraint(micro, NamedSharding(self.mesh, spec))


@LAYOUTS.register("pmap")
class PmapLayout(Layout):
  """jax.pmap over the data axis: the state replicated with a leading device axis, gradients and metrics
  averaged with a psum weighted by each device's real rows, float model state (batch statistics) averaged."""
  name = "pmap"

  def __init__(self, mesh: Mesh, abstract_state, logical_specs, rules=None):
    if jax.process_count() > 1:
      raise UserError("config.parallel.strategy: 'pmap' runs on one process here; multi-host runs use 'jit' (the "
                      "same data parallelism with config.mesh.data=-1)")
    if mesh.shape["fsdp"] > 1 or mesh.shape["tensor"] > 1:
      raise UserError(f"config.parallel.strategy: 'pmap' is pure data parallel, but the mesh has fsdp="
                      f"{mesh.shape['fsdp']} tensor={mesh.shape['tensor']}; set config.mesh.fsdp=1 and "
                      "config.mesh.tensor=1, or use strategy 'jit'")
    super().__init__(mesh, abstract_state, logical_specs, rules)
    if self.batch_shards != mesh.size:  # pmap gives each device its own rows whatever the rule: checked by that rule
      raise UserError(f"config.parallel.rules.batch: 'pmap' splits the batch over the data axis, but the rule is "
                      f"{','.join(self.rules['batch'])!r}; set it to 'data,fsdp' (the default), or use strategy 'jit'")
    self.devices = list(mesh.devices.flat)
    self._stacked = NamedSharding(Mesh(np.array(self.devices), (DATA_AXIS,)), P(DATA_AXIS))
    n = len(self.devices)
    self._replicate = jax.jit(lambda s: jax.tree.map(lambda x: jnp.broadcast_to(x, (n, *x.shape)), s),
                              out_shardings=self._stacked)
    self._unreplicate = jax.jit(lambda s: jax.tree.map(lambda x: x[0], s), out_shardings=self.state_sharding)

  def compile_train(self, train_step, stacked: bool = False, data: bool = False):
    def traced(state, batch):
      with _replica_axis(DATA_AXIS):
        return train_step(state, batch)
    # metrics come back once (out_axes None): they are the same on every device after the mean
    return jax.pmap(traced, axis_name=DATA_AXIS, devices=self.devices, donate_argnums=0, out_axes=(0, None))

  def place(self, state):
    return self._replicate(state)

  def place_data(self, arrays: dict[str, np.ndarray]) -> dict[str, jax.Array]:
    n = len(self.devices)  # one copy per replica, on the leading device axis like the state
    return {k: jax.device_put(np.broadcast_to(a, (n, *np.shape(a))), self._stacked) for k, a in arrays.items()}

  def constrain_batch(self, batch):
    """This replica's rows of a global batch made inside the step (those the host would send it)."""
    i, n = jax.lax.axis_index(DATA_AXIS), len(self.devices)
    return jax.tree.map(lambda x: jax.lax.dynamic_slice_in_dim(x, i * (x.shape[0] // n), x.shape[0] // n), batch)

  def plain(self, state):
    return self._unreplicate(state)

  def train_batch(self, local_batch: dict[str, np.ndarray]) -> dict[str, jax.Array]:
    n = len(self.devices)
    split = {k: v.reshape(n, v.shape[0] // n, *v.shape[1:]) for k, v in self._with_rows(local_batch).items()}
    return global_batch(split, self._stacked)

  def train_batches(self, local_batches: list[dict[str, np.ndarray]]) -> dict[str, jax.Array]:
    n = len(self.devices)  # device x step x rows: each device scans over its own rows of every step
    stacked = _stack([self._with_rows(b) for b in local_batches])
    split = {k: np.swapaxes(v.reshape(v.shape[0], n, v.shape[1] // n, *v.shape[2:]), 0, 1) for k, v in stacked.items()}
    return global_batch(split, self._stacked)

  def mean_over_replicas(self, tree, rows):
    if replica_axis() is None:  # traced outside pmap (an abstract check): one replica
      return tree
    total = jax.lax.psum(rows, DATA_AXIS)
    return jax.tree.map(lambda x: jax.lax.psum(x * rows, DATA_AXIS) / jnp.maximum(total, 1.0), tree)

  def sync_model_state(self, model_state):
    if replica_axis() is None:
      return model_state
    # float model state (batch statistics) is averaged; keys and counters are the same on every device
    return jax.tree.map(
        lambda x: jax.lax.pmean(x, DATA_AXIS) if jnp.issubdtype(x.dtype, jnp.floating) else x, model_state)


def _stack(batches: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
  return {k: np.stack([b[k] for b in batches]) for k in batches[0]}


def make_layout(strategy: str, mesh: Mesh, abstract_state, logical_specs, rules=None) -> Layout:
  """config.parallel.strategy -> the Layout that compiles and places the run's steps on `mesh`."""
  return LAYOUTS.get(strategy)(mesh, abstract_state, logical_specs, rules)
