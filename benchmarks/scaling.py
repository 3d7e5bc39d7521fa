"""Step time of one config on different layouts, all measured in this process against 1 device.

    python benchmarks/scaling.py --config=configs/shakespeare_char_gpt.py:cpu --config.data.path=input.txt \\
        --devices=8 --steps=20
    python benchmarks/scaling.py --config=configs/shakespeare_char_gpt.py --layouts=1:data=1,fsdp:fsdp=-1 \\
        --dtypes=float32,bfloat16      # on a GPU host: mixed precision vs float32, and FSDP memory

On CPU, `--devices=8` simulates 8 devices with jax_num_cpu_devices (they share this machine's cores, so
the question is overhead, not speed-up). Each layout is NAME:MESH with MESH as comma-separated axis=size
(axes not named are 1; `1:data=1` uses the first device only). Prints ms/step, ratio to the first layout, per-device bytes of
parameters + optimizer state, and peak device memory where the platform reports it.
"""

import sys
import tempfile
import time

from absl import app, flags
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", "configs/digits_mlp.py", "Config to measure.")
_DEVICES = flags.DEFINE_integer("devices", 0, "CPU only: simulate this many devices (0 = what the platform has).")
_STEPS = flags.DEFINE_integer("steps", 20, "Timed steps per layout (after 3 warm-up steps).")
_LAYOUTS = flags.DEFINE_string(
    "layouts", "1 device:data=1,data:data=-1,fsdp:fsdp=-1,data x tensor:data=-1;tensor=2,"
    "data x fsdp x tensor:data=2;fsdp=2;tensor=-1,pmap:data=-1;strategy=pmap",
    "Comma-separated NAME:axis=size;axis=size;... (strategy=pmap picks the pmap step).")
_DTYPES = flags.DEFINE_string("dtypes", "float32", "Comma-separated compute dtypes to measure each layout in.")


def parse_layout(text: str):
  name, _, spec = text.partition(":")
  sizes = dict(part.split("=") for part in spec.split(";") if part)
  strategy = sizes.pop("strategy", "jit")
  return name, {"data": 1, "fsdp": 1, "tensor": 1, **{k: int(v) for k, v in sizes.items()}}, strategy


def main(_):
  import jax
  import ml_collections
  if _DEVICES.value:
    jax.config.update("jax_num_cpu_devices", _DEVICES.value)
  from bigmodel_jax import parallel, train
  from bigmodel_jax.data import load_dataset, pipeline
  from bigmodel_jax.errors import UserError
  from bigmodel_jax.tasks import get_task

  config = _CONFIG.value
  total_steps = max(_STEPS.value + 10, config.schedule.warmup_steps + 1)  # the schedule needs its warmup
  dataset = load_dataset(config.data, None, create_tokenizer=True)
  task = get_task(config, dataset)
  rows = []
  for layout in _LAYOUTS.value.split(","):
    name, sizes, strategy = parse_layout(layout)
    devices = jax.devices()[:1] if sizes == {"data": 1, "fsdp": 1, "tensor": 1} else jax.devices()
    for dtype in _DTYPES.value.split(","):
      config.train.dtype, config.parallel.strategy = dtype, strategy
      try:
        mesh = parallel.make_mesh(ml_collections.ConfigDict(sizes), devices=devices)
        stepper = train.make_steps(config, dataset, task, mesh, total_steps=total_steps)
        parallel.check_batch(mesh, stepper.layout.rules, config.data.batch_size, "data.batch_size",
                             config.train.grad_accum_steps)
      except UserError as e:
        print(f"skipping {name} ({dtype}): {e}", file=sys.stderr)
        continue
      batches = iter(pipeline.train_dataset(dataset, config.data, seed=0, num_steps=total_steps))
      device_batches = [stepper.layout.train_batch(next(batches)) for _ in range(_STEPS.value + 3)]
      state = stepper.layout.place(stepper.init())
      for b in device_batches[:3]:  # compile and warm up
        state, metrics = stepper.train_step(state, b)
      jax.block_until_ready(metrics)
      start = time.perf_counter()
      for b in device_batches[3:]:
        state, metrics = stepper.train_step(state, b)
      jax.block_until_ready(metrics)
      ms = (time.perf_counter() - start) / _STEPS.value * 1e3
      held = (parallel.per_device_bytes(stepper.abstract_state.params, stepper.layout.state_sharding.params)
              + parallel.per_device_bytes(stepper.abstract_state.opt_state, stepper.layout.state_sharding.opt_state))
      stats = jax.devices()[0].memory_stats() or {}
      peak = stats.get("peak_bytes_in_use")
      rows.append((name, dict(mesh.shape), dtype, ms, held, peak, float(metrics["loss"])))
      del state, device_batches

  if not rows:
    sys.exit("no layout could be measured (see the lines above)")
  base = rows[0][3]
  print(f"\n{config.model.name} on {dataset.name}, global batch {config.data.batch_size}, {jax.device_count()} x "
        f"{jax.devices()[0].device_kind} ({jax.default_backend()}), {_STEPS.value} timed steps")
  print(f"{'layout':22s} {'mesh (data,fsdp,tensor)':24s} {'dtype':9s} {'ms/step':>9s} {'ratio':>6s} "
        f"{'params+opt MiB/dev':>19s} {'peak GiB':>9s} {'last loss':>10s}")
  for name, shape, dtype, ms, held, peak, loss in rows:
    mesh_text = ",".join(str(shape[a]) for a in parallel.MESH_AXES)
    peak_text = f"{peak / 2**30:9.2f}" if peak else f"{'-':>9s}"
    print(f"{name:22s} {mesh_text:24s} {dtype:9s} {ms:9.2f} {ms / base:6.2f} {held / 2**20:19.2f} {peak_text} "
          f"{loss:10.4f}")


if __name__ == "__main__":
  app.run(main)
