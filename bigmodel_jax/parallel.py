"""Meshes and shardings: config.mesh -> a jax Mesh; logical-axis rules -> where each array lives.

One mesh with three named axes, outermost first: `data` (pure data parallel: the batch is split,
parameters replicated), `fsdp` (the batch is split too, and parameters plus optimizer state are
sharded; XLA all-gathers weights just in time), `tensor` (Megatron-style: attention heads and MLP
hidden units are split, the batch is not). One device is the 1x1x1 mesh. Models never mention
devices: they name their parameters' axes (`embed`, `heads`, `mlp`, ...) and RULES below maps those
logical names onto mesh axes — the only table of its kind (config.parallel.rules overrides it).
Parameters without names (mlp, cnn, linear models) are sharded over `fsdp` along their largest
dimension that divides evenly, else replicated.

Data axes go outermost so that on many hosts each process holds whole rows of the batch, and tensor
innermost so that its frequent collectives stay on the fastest links (NVLink, one host).

Where a run's train state and batches live, and how its steps are compiled over this mesh, is a Layout
(layout.py).
"""

import math
import re
from collections import defaultdict

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from bigmodel_jax.errors import UserError

MESH_AXES = ("data", "fsdp", "tensor")
DATA_AXIS = "data"  # the pmap axis name

# logical axis -> mesh axes (comma-separated, "" = replicated). `batch` places the batch dimension of the
# inputs; the rest are the parameter axes the models annotate.
RULES = {
    "batch": "data,fsdp",
    "embed": "fsdp",  # model width: every weight matrix has it once, so FSDP shards each of them
    "heads": "tensor",
    "mlp": "tensor",
    "head_dim": "",
    "vocab": "",  # vocabularies are rarely divisible (50257, 67): opt in with rules.vocab=tensor
    "positions": "",
    "layers": "",  # the stacked axis of scanned Transformer blocks
}


def mesh_shape(mesh_config, num_devices: int) -> dict[str, int]:
  """config.mesh -> {'data': n, 'fsdp': n, 'tensor': n}, with one -1 taking the devices left over."""
  sizes = {a: mesh_config[a] for a in MESH_AXES}
  extra = sorted(set(mesh_config.keys()) - set(MESH_AXES))
  if extra:
    raise UserError(f"config.mesh.{extra[0]}: not a mesh axis; the axes are {', '.join(MESH_AXES)}")
  for axis, size in sizes.items():
    if not isinstance(size, int) or (size < 1 and size != -1):
      raise UserError(f"config.mesh.{axis}: must be an integer >= 1, or -1 for the devices left over; got {size!r}")
  rest = [a for a, s in sizes.items() if s == -1]
  if len(rest) > 1:
    raise UserError(f"config.mesh: only one axis may be -1 (the rest), got {', '.join(rest)}")
  fixed = math.prod(s for s in sizes.values() if s != -1)
  if rest:
    if num_devices % fixed:
      raise UserError(f"config.mesh: {_describe(sizes)} needs a multiple of {fixed} devices, but this run has "
                      f"{_devices(num_devices)}; pick sizes whose product divides {num_devices}")
    sizes[rest[0]] = num_devices // fixed
  elif fixed != num_devices:
    raise UserError(f"config.mesh: {_describe(sizes)} = {fixed} devices, but this run has {_devices(num_devices)}; "
                    f"the sizes must multiply to {num_devices} (set one axis to -1 to take the rest)")
  return sizes


def _describe(sizes: dict) -> str:
  return " x ".join(f"{a}={s}" for a, s in sizes.items())


def _devices(n: int) -> str:
  procs = jax.process_count()
  return f"{n} ({procs} processes x {n // procs})" if procs > 1 else str(n)


def make_mesh(mesh_config, devices=None) -> Mesh:
  """The run's mesh over `devices` (default: every device of every process), with 'Auto' (GSPMD) axes."""
  devices = list(jax.devices() if devices is None else devices)
  sizes = mesh_shape(mesh_config, len(devices))
  return jax.make_mesh(tuple(sizes.values()), MESH_AXES, axis_types=(jax.sharding.AxisType.Auto,) * len(MESH_AXES),
                       devices=devices)


def make_rules(rules_config=None) -> dict[str, tuple[str, ...]]:
  """config.parallel.rules (or RULES) -> {logical axis: (mesh axes)}, every name checked."""
  rules = dict(RULES if rules_config is None else rules_config)
  out = {}
  for logical, value in rules.items():
    if logical not in RULES:
      raise UserError(f"config.parallel.rules.{logical}: not a logical axis; the models name "
                      f"{', '.join(RULES)}")
    if not isinstance(value, str):
      raise UserError(f"config.parallel.rules.{logical}: must be a string of mesh axes like 'fsdp' or "
                      f"'data,fsdp' ('' = replicated), got {value!r}")
    axes = tuple(a.strip() for a in value.split(",") if a.strip())
    for a in axes:
      if a not in MESH_AXES:
        raise UserError(f"config.parallel.rules.{logical}: {a!r} is not a mesh axis; valid: {', '.join(MESH_AXES)}")
    if len(set(axes)) != len(axes):
      raise UserError(f"config.parallel.rules.{logical}: {value!r} names a mesh axis twice")
    out[logical] = axes
  missing = sorted(set(RULES) - set(out))
  if missing:
    raise UserError(f"config.parallel.rules.{missing[0]}: missing; every logical axis needs a rule ('' = replicated)")
  return out


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def batch_axes(mesh: Mesh, rules) -> tuple[str, ...]:
  return tuple(a for a in rules["batch"] if mesh.shape[a] > 1)


def batch_shards(mesh: Mesh, rules) -> int:
  """How many ways the batch is split: the product of the batch rule's mesh axis sizes."""
  return math.prod(mesh.shape[a] for a in rules["batch"])


def batch_sharding(mesh: Mesh, rules) -> NamedSharding:
  return NamedSharding(mesh, P(batch_axes(mesh, rules) or None))


def check_batch(mesh: Mesh, rules, batch_size: int, field: str, grad_accum_steps: int = 1) -> None:
  """The batch splits evenly over the data axes (and the processes feeding them), per microbatch."""
  shards = batch_shards(mesh, rules)
  split = " x ".join(f"{a}={mesh.shape[a]}" for a in rules["batch"]) or "none"
  if batch_size % (shards * grad_accum_steps):
    per = f" per microbatch (config.train.grad_accum_steps={grad_accum_steps})" if grad_accum_steps > 1 else ""
    raise UserError(f"config.{field}: {batch_size} is not divisible by the {shards * grad_accum_steps} batch shards"
                    f"{per} (mesh {split}); use a multiple of {shards * grad_accum_steps}")
  if shards % jax.process_count():
    raise UserError(f"config.mesh: the batch is split {shards} ways ({split}) over {jax.process_count()} processes; "
                    "each process must feed whole shards, so make data x fsdp a multiple of the process count")


def _name(path) -> str:
  """'trunk.blocks.0.attn.qkv.kernel' for a params-tree path (nnx's '.value' level dropped)."""
  names = [str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in path]
  return ".".join(n for n in names if n != "value")


def param_specs(abstract_params, logical_specs, mesh: Mesh, rules) -> dict[str, P]:
  """{param name: PartitionSpec over mesh axes}; a sharded dimension must divide by its mesh axes' size."""
  flat_specs = {_name(p): s for p, s in jax.tree_util.tree_leaves_with_path(
      logical_specs, is_leaf=lambda x: isinstance(x, P) or x is None)}
  out = {}
  for path, leaf in jax.tree_util.tree_leaves_with_path(abstract_params):
    name = _name(path)
    logical = tuple(flat_specs.get(name) or ())
    if not logical:
      out[name] = _unannotated_spec(leaf.shape, mesh)
      continue
    if len(logical) != len(leaf.shape):
      raise ValueError(f"parameter {name}: logical axes {logical} do not match its shape {leaf.shape}")
    spec, used = [], {}
    for dim, (size, axis_name) in enumerate(zip(leaf.shape, logical)):
      axes = tuple(a for a in rules.get(axis_name, ()) if mesh.shape[a] > 1) if axis_name else ()
      for a in axes:
        if a in used:
          raise UserError(f"config.parallel.rules: parameter {name} would be split over mesh axis {a!r} twice "
                          f"(its axes {used[a]!r} and {axis_name!r}); map them to different mesh axes")
        used[a] = axis_name
      ways = math.prod(mesh.shape[a] for a in axes)
      if size % ways:
        where = (f"config.mesh.{axes[0]}: {ways}" if len(axes) == 1 else
                 f"config.mesh: {' x '.join(f'{a}={mesh.shape[a]}' for a in axes)} = {ways}")
        raise UserError(f"{where} does not divide dimension {dim} ({axis_name!r}, "
                        f"size {size}) of parameter {name} {tuple(leaf.shape)}; pick a size that divides {size}, or "
                        f"replicate that axis with --config.parallel.rules.{axis_name}=''")
      spec.append(axes[0] if len(axes) == 1 else (axes or None))
    out[name] = P(*spec)
  return out


def _unannotated_spec(shape, mesh: Mesh) -> P:
  """FSDP for models without axis names: the largest dimension that `fsdp` divides, else replicated."""
  ways = mesh.shape["fsdp"]
  dims = [d for d in sorted(range(len(shape)), key=lambda d: -shape[d]) if shape[d] % ways == 0]
  if ways == 1 or not dims:
    return P()
  spec = [None] * len(shape)
  spec[dims[0]] = "fsdp"
  return P(*spec)


def state_shardings(abstract_state, param_partition: dict[str, P], mesh: Mesh):
  """Sharding for every leaf of the train state: parameters by their specs; optimizer leaves that mirror a
  parameter (Adam's moments, accumulated gradients) like that parameter; everything else replicated."""
  by_name = {n: (NamedSharding(mesh, s)) for n, s in param_partition.items()}
  shapes = {_name(p): leaf.shape for p, leaf in jax.tree_util.tree_leaves_with_path(abstract_state.params)}
  # longest names first, so 'head.kernel' never claims 'mlp.head.kernel'
  names = sorted(by_name, key=len, reverse=True)

  def place(path, leaf):
    name = _name(path)
    for p in names:
      if (name == p or name.endswith("." + p)) and tuple(leaf.shape) == tuple(shapes[p]):
        return by_name[p]
    return replicated(mesh)

  params = jax.tree_util.tree_map_with_path(lambda p, _: by_name[_name(p)], abstract_state.params)
  rest = jax.tree_util.tree_map_with_path(place, abstract_state.replace(params=None))
  return rest.replace(params=params)


def per_device_bytes(abstract_tree, shardings) -> int:
  """Bytes one device holds for these arrays under these shardings (the largest shard of each)."""
  total = 0
  for leaf, sharding in zip(jax.tree.leaves(abstract_tree), jax.tree.leaves(shardings)):
    total += math.prod(sharding.shard_shape(leaf.shape)) * np.dtype(leaf.dtype).itemsize
  return total


def total_bytes(abstract_tree) -> int:
  return sum(math.prod(leaf.shape) * np.dtype(leaf.dtype).itemsize for leaf in jax.tree.leaves(abstract_tree))


def describe(mesh: Mesh, abstract_state, shardings, param_partition: dict[str, P]) -> list[str]:
  """Log lines: the mesh, bytes per device for parameters and optimizer state, and each parameter group's
  sharding (layer indices folded: 'trunk.blocks.*.attn.qkv.kernel')."""
  mb = lambda n: f"{n / 2**20:.2f} MiB"
  lines = [f"mesh {_describe(dict(mesh.shape))} over {mesh.size} device{'s' if mesh.size > 1 else ''} ({jax.process_count()} process{'es' if jax.process_count() > 1 else ''}, "
           f"{jax.devices()[0].platform})"]
  for name, part in (("parameters", "params"), ("optimizer state", "opt_state")):
    tree, sh = getattr(abstract_state, part), getattr(shardings, part)
    count = sum(math.prod(x.shape) for x in jax.tree.leaves(tree))
    lines.append(f"{name}: {count:,} values, {mb(total_bytes(tree))} in all, {mb(per_device_bytes(tree, sh))} "
                 "per device")
  shapes = {_name(p): leaf.shape for p, leaf in jax.tree_util.tree_leaves_with_path(abstract_state.params)}
  groups = defaultdict(list)
  for name, spec in param_partition.items():
    groups[(re.sub(r"\.\d+\.", ".*.", name), tuple(shapes[name]), spec)].append(name)
  for (group, shape, spec), members in groups.items():
    shard = NamedSharding(mesh, spec).shard_shape(shape)
    count = f"{len(members)} x " if len(members) > 1 else ""
    lines.append(f"  {group}: {count}{list(shape)} {spec} -> {list(shard)} per device")
  return lines


def global_batch(local_batch: dict[str, np.ndarray], sharding: NamedSharding) -> dict[str, jax.Array]:
  """This process's rows of a batch -> global arrays laid out by `sharding` (leading axis = batch)."""
  if jax.process_count() == 1:  # one batched transfer: ~2x cheaper per step than the general path
    return jax.device_put(local_batch, sharding)
  return {k: jax.make_array_from_process_local_data(sharding, v) for k, v in local_batch.items()}
