"""Meshes and shardings. Single device is the 1-device mesh; data parallel shards the batch on 'data'.

The train/eval steps in state.py are compiled with the shardings made here, so later meshes
(fsdp, tensor) change this file and the configs, not the train loop.
"""

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

DATA_AXIS = "data"


def make_mesh() -> Mesh:
  """A 1-D data-parallel mesh over every device of every process (classic GSPMD 'Auto' axes)."""
  return jax.make_mesh((jax.device_count(),), (DATA_AXIS,), axis_types=(jax.sharding.AxisType.Auto,))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def batch_sharding(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P(DATA_AXIS))


def state_shardings(abstract_state, mesh: Mesh):
  """Sharding for every leaf of the train state: replicated (pure data parallel)."""
  return jax.tree.map(lambda _: replicated(mesh), abstract_state)


def global_batch(local_batch: dict[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
  """This process's slice of a batch -> global arrays sharded over the data axis."""
  sharding = batch_sharding(mesh)
  if jax.process_count() == 1:  # one batched transfer: ~2x cheaper per step than the general path
    return jax.device_put(local_batch, sharding)
  return {k: jax.make_array_from_process_local_data(sharding, v) for k, v in local_batch.items()}
