"""Language-model training throughput: tokens/s and model FLOP utilisation (MFU) of the compiled train step.

    python benchmarks/lm_throughput.py --config=configs/shakespeare_char_gpt.py:cpu --steps=50 \
        --config.data.path=/path/to/tinyshakespeare/input.txt    # offline; or --config.data.name=shakespeare_plays
    python benchmarks/lm_throughput.py --config=configs/shakespeare_char_gpt.py --steps=100   # on a GPU

Model FLOPs per token follow nanoGPT's estimate (PaLM appendix B): 6 * params + 12 * layers * dim * seq_len
(forward + backward, attention included). MFU is printed against two references: a large dense matmul
measured in this process on the same device (what the hardware reaches here, in the model's dtype), and,
on known accelerators, the vendor's dense peak (bigmodel_jax/speed.py; for float32 matmuls on GPU the TF32 one,
which XLA uses by default).
"""

import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags
from ml_collections import config_flags

from bigmodel_jax import speed, train
from bigmodel_jax.data import pipeline

_CONFIG = config_flags.DEFINE_config_file("config", "configs/shakespeare_char_gpt.py:cpu", "LM config to measure.")
_STEPS = flags.DEFINE_integer("steps", 50, "Timed train steps (after 5 warm-up steps).")
_MATMUL = flags.DEFINE_integer("matmul_size", 2048, "Side of the square reference matmul.")

def main(_):
  config, steps = _CONFIG.value, _STEPS.value
  config.train.num_steps = max(steps + 10, config.schedule.warmup_steps + 1)  # the schedule needs its warmup
  config.train.compilation_cache = False
  with tempfile.TemporaryDirectory() as tmp:
    run = train.build_run(config, tmp)
    state = run.steps.layout.place(run.steps.init())
    batches = iter(pipeline.train_dataset(run.dataset, config.data, seed=0, num_steps=config.train.num_steps))
    device_batches = [run.steps.layout.train_batch(next(batches)) for _ in range(steps + 5)]
    for b in device_batches[:5]:
      state, metrics = run.steps.train_step(state, b)
    jax.block_until_ready(metrics)
    start = time.perf_counter()
    for b in device_batches[5:]:
      state, metrics = run.steps.train_step(state, b)
    jax.block_until_ready(metrics)
    seconds = time.perf_counter() - start
    run.checkpointer.close()
    run.writer.close()

  m, seq_len = config.model, run.dataset.input_shape[0]
  num_params = sum(int(np.size(x)) for x in jax.tree.leaves(run.steps.abstract_state.params))
  layers, dim = m.get("num_layers", 0), m.get("embed_dim", 0)
  flops_per_token = 6 * num_params + (12 * layers * dim * seq_len if m.name == "gpt" else 0)
  tokens_per_s = steps * config.data.batch_size * seq_len / seconds
  model_flops = flops_per_token * tokens_per_s
  dtype = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}[config.train.dtype]  # the step's compute dtype
  reference = speed.measured_matmul_flops(dtype, _MATMUL.value) * jax.device_count()

  device = jax.devices()[0]
  print(f"\n{m.name} on {run.dataset.name}: {num_params / 1e6:.2f} M params, batch {config.data.batch_size} x "
        f"{seq_len} tokens, {jax.device_count()} x {device.device_kind} ({jax.default_backend()}), {dtype.__name__}")
  print(f"{'measurement':44s} {'value':>14s}")
  print(f"{'train steps/s':44s} {steps / seconds:14.2f}")
  print(f"{'tokens/s':44s} {tokens_per_s:14,.0f}")
  print(f"{'model TFLOP/s (6N + 12LDT per token)':44s} {model_flops / 1e12:14.4f}")
  label = f"{_MATMUL.value}^2 matmul TFLOP/s, same process"
  print(f"{label:44s} {reference / 1e12:14.4f}")
  print(f"{'MFU vs that matmul':44s} {model_flops / reference:14.1%}")
  stats = device.memory_stats() or {}  # GPUs/TPUs report their allocator's peak; CPUs report nothing
  if "peak_bytes_in_use" in stats:
    print(f"{'peak device memory (GiB)':44s} {stats['peak_bytes_in_use'] / 2**30:14.2f}")
  kind = "float32" if dtype == jnp.float32 else "bfloat16"
  peak = speed.peak_flops(device.device_kind, kind)  # bigmodel_jax/speed.py's table, as the run logs use
  if peak:
    label = f"MFU vs {device.device_kind} peak ({peak / 1e12:.0f} TFLOP/s {'TF32' if kind == 'float32' else 'bf16'})"
    print(f"{label:44s} {model_flops / (peak * jax.device_count()):14.1%}")

if __name__ == "__main__":
  app.run(main)
