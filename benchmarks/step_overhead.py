"""Where a training step's time goes: compiled step alone vs with the data pipeline vs the full loop.

    python benchmarks/step_overhead.py --config=configs/mnist_cnn.py --steps=500

Prints steps/s for (1) the jitted train step on one device-resident batch, (2) the grain data
pipeline alone, (3) step + pipeline + host->device transfer, (4) the real train loop
(train_and_evaluate with logging; eval and checkpoints only at the end), each as a ratio to (1),
all measured in this process. A loop that keeps the device fed has ratios close to 1.
"""

import tempfile
import time

import jax
from absl import app, flags
from ml_collections import config_flags

from bigmodel_jax import train
from bigmodel_jax.data import pipeline

_CONFIG = config_flags.DEFINE_config_file("config", "configs/digits_mlp.py", "Config to measure.")
_STEPS = flags.DEFINE_integer("steps", 300, "Steps per measurement.")


def timed(fn, steps: int) -> float:
  fn(5)  # warm-up (compilation, thread start)
  start = time.perf_counter()
  fn(steps)
  return steps / (time.perf_counter() - start)


def main(_):
  config, steps = _CONFIG.value, _STEPS.value
  config.train.num_steps = 10 * steps + 20
  config.train.progress_bar = False
  config.train.compilation_cache = False
  with tempfile.TemporaryDirectory() as tmp:
    run = train.build_run(config, tmp)
    stepper, mesh = run.steps, run.mesh
    state = [stepper.layout.place(stepper.init())]
    batches = iter(pipeline.train_dataset(run.dataset, config.data, seed=0, num_steps=config.train.num_steps))
    fixed = stepper.layout.train_batch(next(batches))

    def step_only(n):
      for _ in range(n):
        state[0], m = stepper.train_step(state[0], fixed)
      jax.block_until_ready(m)

    def data_only(n):
      for _ in range(n):
        next(batches)

    def step_and_data(n):
      for _ in range(n):
        state[0], m = stepper.train_step(state[0], stepper.layout.train_batch(next(batches)))
      jax.block_until_ready(m)

    results = {"jitted step, fixed device batch": timed(step_only, steps),
               "data pipeline alone": timed(data_only, steps),
               "step + pipeline + transfer": timed(step_and_data, steps)}
    run.checkpointer.close()
    run.writer.close()

  with tempfile.TemporaryDirectory() as tmp:
    config.train.num_steps = steps
    for e in config.evals.values():
      e.every = 0  # evaluated at the end only
    config.train.checkpoint_every = 10 ** 9
    start = time.perf_counter()
    train.train_and_evaluate(config, tmp)
    total = time.perf_counter() - start
    lines = [l for l in open(f"{tmp}/metrics.jsonl") if '"split": "train"' in l]
    import json
    rates = [json.loads(l)["steps_per_s"] for l in lines[1:]]  # the first window includes warm-up
    results["train loop (metrics.jsonl steps/s)"] = sum(rates) / len(rates) if rates else float("nan")
    print(f"full train_and_evaluate of {steps} steps incl. start-up and final eval: {total:.1f} s")

  reference = results["jitted step, fixed device batch"]
  print(f"\n{config.model.name} on {run.dataset.name}, global batch {config.data.batch_size}, "
        f"{jax.device_count()} {jax.default_backend()} device(s)")
  print(f"{'measurement':42s} {'steps/s':>10s} {'ratio':>7s}")
  for name, rate in results.items():
    print(f"{name:42s} {rate:10.1f} {rate / reference:7.2f}")


if __name__ == "__main__":
  app.run(main)
