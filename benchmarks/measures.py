"""The measurements of benchmarks/run.py: each returns harness rows (or raises Unavailable, with why).

Every rate is taken after a warm-up step (compilation reported apart as compile_s) and between two
jax.block_until_ready; ratios alternate A and B in this process (harness.alternate).
"""

import importlib.util
import itertools
import json
import os
import re
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

import jax
import numpy as np

from benchmarks import harness
from bigmodel_jax import speed
from bigmodel_jax.errors import TRACEBACK_ENV

ROOT = Path(__file__).resolve().parents[1]


class Unavailable(Exception):
  """A benchmark that cannot run here (no data, no GPU): reported as unmeasured, not as a failure."""


def load(name: str, text: str = ""):
  """configs/<file>.py's get_config(variant) for "file:variant", quiet (no progress bar, no persistent cache)."""
  file, _, variant = name.partition(":")
  spec = importlib.util.spec_from_file_location(f"_bench_{file}", ROOT / "configs" / f"{file}.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config(variant)
  config.train.progress_bar = False
  config.train.compilation_cache = False
  if config.data.name == "tiny_shakespeare":
    if not text:
      raise Unavailable("tiny Shakespeare is not on this machine: pass --text=input.txt")
    config.data.path = text
  return config


def _bare_run(config, workdir: Path, steps: int):
  from bigmodel_jax import train
  config.train.num_steps = max(steps, config.schedule.get("warmup_steps", 0) + 1)
  return train.build_run(config, workdir)


def _batches(run, steps: int):
  from bigmodel_jax.data import pipeline
  return iter(pipeline.train_dataset(run.dataset, run.config.data, seed=run.config.seed,
                                     num_steps=run.config.train.num_steps))


def _step_rate(run, state: list, feed, steps: int) -> float:
  """steps-1 train steps fed by feed() after one more (not timed), -> steps/s."""
  step = run.steps.train_step
  state[0], m = step(state[0], feed())
  jax.block_until_ready(m)
  start = time.perf_counter()
  for _ in range(steps - 1):
    state[0], m = step(state[0], feed())
  jax.block_until_ready(m)
  return (steps - 1) / (time.perf_counter() - start)


def _feed_rate(state: list, feed, steps: int) -> float:
  """steps-1 calls of a data.feed (the train loop's own way of feeding its steps) after one more (not timed),
  continuing from the state's step -> steps/s."""
  step = int(jax.device_get(state[0].step))
  feed.set_state({"next_index": step})
  state[0], m = feed(state[0], step)
  jax.block_until_ready(m)
  start = time.perf_counter()
  for s in range(step + 1, step + steps):
    state[0], m = feed(state[0], s)
  jax.block_until_ready(m)
  return (steps - 1) / (time.perf_counter() - start)


def _feed(run, on_device: bool | None = None):
  """The run's data.feed (config.data.on_device's, or `on_device`'s) for as many rounds as a benchmark takes."""
  from bigmodel_jax.data import feed
  return feed.make_feed(run, on_device, num_steps=10**7)


def _compile_s(run, state: list, batch) -> float:
  start = time.perf_counter()
  state[0], m = run.steps.train_step(state[0], batch)
  jax.block_until_ready(m)
  return time.perf_counter() - start


def window_steps(config, steps: int) -> int:
  """At least `steps`, and one log window past the config's first checkpoint save: the full loop's timed window
  (first step done -> last train record) then holds a save at the config's own checkpoint_every."""
  return max(steps, config.train.checkpoint_every + config.train.log_every)


def full_loop_rate(records: list[dict]) -> tuple[float, float, int, int]:
  """A train_and_evaluate run's steps/s off its metrics.jsonl, from the steps and times of the records bounding the
  window: the first step done (the startup record, at step steps_per_call) to the last train record.
  -> (steps/s, window seconds, first step, last step)."""
  first = next(r for r in records if r["split"] == "startup")
  last = max((r for r in records if r["split"] == "train"), key=lambda r: r["step"])
  seconds = max(last["time"] - first["time"], 1e-3)  # metrics.jsonl's times are to the millisecond
  return (last["step"] - first["step"]) / seconds, seconds, first["step"], last["step"]


def host_overhead(name: str, steps: int, repeats: int, images: bool = False) -> list[dict]:
  """Our full loop (train_and_evaluate: the config's steps_per_call steps per dispatch, logging every log_every,
  metrics fetched one step late, the config's checkpoint cadence; periodic evals off) vs a bare loop calling the
  single compiled train step once per batch on the same batches (same feed, seed and host->device transfer): several
  steps per dispatch is how the full loop sheds host overhead, so the two are not the same k-step function. `steps`
  grows to window_steps (a save inside the timed window). `images`: a second row, the full loop's images/s."""
  from bigmodel_jax import train
  config = load(name)
  steps, t, windows = window_steps(config, steps), config.train, []
  with tempfile.TemporaryDirectory() as tmp:
    tmp = Path(tmp)
    run = _bare_run(load(name), tmp / "bare", steps)
    state, feed = [run.steps.layout.place(run.steps.init())], _feed(run)
    start = time.perf_counter()
    _feed_rate(state, feed, 1)  # compiles
    compile_s = time.perf_counter() - start

    def bare():  # the loop's own feed (host batches, or data.on_device's gather), one compiled step per call
      return _feed_rate(state, feed, steps)

    def full():
      workdir = Path(tempfile.mkdtemp(dir=tmp))
      c = load(name)
      c.train.num_steps = steps
      for e in c.evals.values():
        e.every = 0  # evaluated once, after the last step (outside the timed window)
      train.train_and_evaluate(c, workdir)
      windows.append(full_loop_rate(_records(workdir)))
      return windows[-1][0]

    full_rates, bare_rates = harness.alternate(full, bare, repeats)
    run.checkpointer.close()
    run.writer.close()
  ratios = [f / b for f, b in zip(full_rates, bare_rates)]
  _, _, first, last = windows[0]
  saves = (last - 1) // t.checkpoint_every - first // t.checkpoint_every  # at steps strictly inside the window
  seconds, batch = harness.summary([w[1] for w in windows])["median"], config.data.batch_size
  rows = [harness.row(
      "host_overhead", name, "full train loop", "steps/s", "full: (last train record's step - first step's record's "
      "step) / (their times' difference); bare: steps after the first / seconds; ratio = full / bare per round",
      full_rates, compile_s=compile_s, reference=("bare jit loop: the single train step once per batch", bare_rates),
      ratios=ratios, target=">= 0.97x", meets=harness.summary(ratios)["median"] >= 0.97,
      notes=f"batch {batch}, {steps} steps; ours steps_per_call {t.steps_per_call} (steps per dispatch), the bare "
            f"loop the single compiled step per call; log_every {t.log_every}, checkpoint_every {t.checkpoint_every}: "
            f"{saves} save(s) in the timed window (steps {first}-{last}, {seconds:.2f} s; record times to 1 ms)")]
  if images:
    rows.append(harness.row("images_per_s", name, "full train loop images/s", "images/s",
                            f"the full loop's steps/s (the host_overhead row's rounds) x batch size {batch}",
                            [r * batch for r in full_rates], target="report",
                            notes=f"{steps} steps, evaluations outside the window; the wall clock to accuracy: "
                                  "time_to_accuracy's row"))
  return rows


def input_pipeline(name: str, steps: int, repeats: int, text: str = "") -> dict:
  """The step fed as the config's train loop feeds it (a numpy gather and a host->device transfer each step, or
  under config.data.on_device nothing sent and the batch gathered in the step) vs the plain step on the same
  batches, staged on the device beforehand."""
  with tempfile.TemporaryDirectory() as tmp:
    run = _bare_run(load(name, text), Path(tmp) / "run", steps)
    layout, state, feed = run.steps.layout, [run.steps.layout.place(run.steps.init())], _feed(run)
    staged = [layout.train_batch(b) for b in itertools.islice(_batches(run, steps), steps)]
    _compile_s(run, state, staged[0])
    start = time.perf_counter()
    _feed_rate(state, feed, 1)  # compiles the fed step (data.on_device: its own function)
    compile_s = time.perf_counter() - start

    def fed():
      return _feed_rate(state, feed, steps)

    def prestaged():
      batches = iter(staged)
      return _step_rate(run, state, lambda: next(batches), steps)

    fed_rates, staged_rates = harness.alternate(fed, prestaged, repeats)
    run.checkpointer.close()
    run.writer.close()
  ratios = [a / b for a, b in zip(fed_rates, staged_rates)]
  return harness.row("input_pipeline", name, "step fed by the pipeline", "steps/s",
                     "steps after the first / seconds; ratio = pipeline-fed / pre-staged per round", fed_rates,
                     compile_s=compile_s, reference=("pre-staged device batches", staged_rates), ratios=ratios,
                     target=">= 0.97x", meets=harness.summary(ratios)["median"] >= 0.97,
                     notes="data.on_device: the split on the device, no batch sent" if run.config.data.on_device
                     else "batches drawn on the host and sent each step")


def _main(args: list[str], env: dict, timeout: float = 900) -> float:
  """Runs bigmodel_jax.main; -> the wall-clock time (time.time()) it was launched at."""
  launched = time.time()
  proc = subprocess.run([sys.executable, "-m", "bigmodel_jax.main", *args, "--config.train.progress_bar=false"],
                        cwd=ROOT, env={**os.environ, **env}, capture_output=True, text=True, timeout=timeout,
                        preexec_fn=harness.die_with(os.getpid()))  # a crash of the suite ends its run too
  if proc.returncode != 0:
    # its traceback into our output (gpu_slot.sh keeps that in $OUT/run.log): absl's INFO lines left out
    told = [l for l in proc.stderr.splitlines() if not re.match(r"I\d{4} ", l)][-80:]
    print(f"bigmodel_jax.main {' '.join(args)} failed (status {proc.returncode}); its stderr ends:\n"
          + "\n".join(told), file=sys.stderr, flush=True)
    error = RuntimeError(f"bigmodel_jax.main {' '.join(args)} failed: {proc.stderr.strip().splitlines()[-1:]}")
    error.stderr = proc.stderr
    raise error
  return launched


def _cudnn_failed(error: Exception) -> bool:
  """A run's failure names cuDNN outside its log lines (absl's "I1206 ..." lines name the attention taken)."""
  lines = getattr(error, "stderr", str(error)).splitlines()
  return any("cudnn" in l.lower() for l in lines if not re.match(r"[IWE]\d{4} ", l))


def _records(workdir: Path, partial: bool = False) -> list[dict]:
  """metrics.jsonl's records; `partial`: of a run that was killed, whose last line may be cut short (left out)."""
  lines = (workdir / "metrics.jsonl").read_text().splitlines()
  if partial and lines:
    try:
      json.loads(lines[-1])
    except ValueError:
      lines.pop()
  return [json.loads(l) for l in lines]


def time_to_first_step(name: str, repeats: int) -> list[dict]:
  """Process start -> first step completed (the run's own startup record), a fresh process each time: cold = an
  empty compilation cache, warm = the cache the cold run filled."""
  file, _, variant = name.partition(":")
  config_flag = f"--config=configs/{file}.py" + (f":{variant}" if variant else "")
  cold, warm = [], []
  with tempfile.TemporaryDirectory() as tmp:
    tmp = Path(tmp)
    _main([config_flag, f"--workdir={tmp / 'fetch'}"], {"BIGMODEL_JAX_CACHE_DIR": str(tmp / "c_fetch")})  # data cached
    for i in range(repeats):
      cache = {"BIGMODEL_JAX_CACHE_DIR": str(tmp / f"cache{i}")}
      for kind, values in (("cold", cold), ("warm", warm)):
        workdir = tmp / f"{kind}{i}"
        launched = _main([config_flag, f"--workdir={workdir}"], cache)
        values.append(next(r["time"] for r in _records(workdir) if r["split"] == "startup") - launched)
  formula = "time.time() at the first step's record - time.time() before the process was started"
  return [harness.row("time_to_first_step", name, "cold compilation cache", "s", formula, cold, target="<= 30 s",
                      meets=harness.summary(cold)["median"] <= 30),
          harness.row("time_to_first_step", name, "warm compilation cache", "s", formula, warm, target="<= 5 s",
                      meets=harness.summary(warm)["median"] <= 5)]


def checkpoint_stall(name: str, repeats: int, text: str) -> dict:
  """How long the loop is blocked by an async save (until save() returns: the arrays are copied off the
  device) vs a blocking save of the same state (until it is committed)."""
  from bigmodel_jax.checkpoint import Checkpointer
  with tempfile.TemporaryDirectory() as tmp:
    tmp = Path(tmp)
    run = _bare_run(load(name, text), tmp / "run", 2)
    state = run.steps.layout.plain(run.steps.init())
    num_bytes = sum(x.nbytes for x in jax.tree.leaves(state))
    savers = {kind: Checkpointer(tmp / kind, keep=2, async_save=kind == "async") for kind in ("async", "blocking")}
    step = [0]

    def save(kind):
      def measure():
        step[0] += 1
        savers["async"].wait()  # the previous async save finishes outside the timed window
        start = time.perf_counter()
        savers[kind].save(step[0], state, {"next_index": 0}, {"step": step[0]})
        return time.perf_counter() - start
      return measure

    save("async")(), save("blocking")()  # warm-up: orbax's first save sets up its threads and directories
    async_s, blocking_s = harness.alternate(save("async"), save("blocking"), repeats)
    for saver in savers.values():
      saver.close()
    run.checkpointer.close()
    run.writer.close()
  ratios = [a / b for a, b in zip(async_s, blocking_s)]
  return harness.row("checkpoint_stall", name, "loop blocked by an async save", "s",
                     "seconds until save() returns; ratio = async / blocking per round", async_s,
                     reference=("blocking save of the same state", blocking_s), ratios=ratios, target="<= 10%",
                     meets=harness.summary(ratios)["median"] <= 0.10,
                     notes=f"{num_bytes / 2**20:.1f} MiB of train state")


LM_SIZES = {  # synthetic-token language models: (layers, heads, dims, window, batch, vocab, dtype)
    "tiny": (2, 2, 64, 64, 4, 256, "float32"),  # the GPU suite's tiny check passes dtype="bfloat16": GPT-2's path
    "cpu": (4, 4, 128, 64, 12, 65, "float32"),  # configs/shakespeare_char_gpt.py:cpu's model and batch
    "gpt2_124m": (12, 12, 768, 1024, 16, 50304, "bfloat16"),  # GPT-2 small, nanoGPT's padded vocabulary
}


def lm_throughput(size: str, steps: int, repeats: int = 3, dtype: str = "") -> dict:
  """Tokens/s and MFU of the `gpt` train step (AdamW, the codebase's own step) on pre-staged random tokens, attention
  as config.model.attention "auto" takes it (the row says which it took), in `dtype` (default: the size's). Should a
  step that took cuDNN's attention fail, the row is measured again in the einsum form and says so: a short GPU slot
  still gives the step's number."""
  from bigmodel_jax.models import attention
  try:
    return _lm_throughput(size, steps, repeats, "auto", dtype)
  except Exception as e:
    if "cudnn" not in attention.TAKEN:
      raise
    print("lm_throughput: the step with cuDNN's attention failed; measuring it again in the einsum form",
          file=sys.stderr, flush=True)
    traceback.print_exc()
    try:
      row = _lm_throughput(size, steps, repeats, "einsum", dtype)
    except Exception:
      raise e from None
    row["notes"] += f"; cuDNN's attention failed ({type(e).__name__}: {_gist(e)}), measured in the einsum form"
    return row


def _gist(e: Exception, limit: int = 240) -> str:
  """An error's reason in one line: its message's last line, the end of it where long (a trace-time failure comes
  wrapped in a UserError whose own words come first and the cause last; XLA's messages end in the cause too)."""
  lines = [l.strip() for l in str(e).splitlines() if l.strip()] or [type(e).__name__]
  return lines[-1] if len(lines[-1]) <= limit else "..." + lines[-1][-limit:]


def _lm_throughput(size: str, steps: int, repeats: int, attention: str, dtype: str = "") -> dict:
  from bigmodel_jax import parallel, train
  from bigmodel_jax.data import Dataset
  from bigmodel_jax.models import attention as attention_lib
  from bigmodel_jax.tasks import get_task
  attention_lib.TAKEN.clear()
  layers, heads, dim, window, batch, vocab, size_dtype = LM_SIZES[size]
  dtype = dtype or size_dtype
  config = load("shakespeare_char_gpt", text="unused")
  config.data.seq_len, config.data.batch_size = window, batch
  config.model.update(num_layers=layers, num_heads=heads, embed_dim=dim, max_len=window, dropout_rate=0.0,
                      attention_dropout_rate=0.0, gelu="tanh", attention=attention)  # GPT-2 (llm.c's: no dropout)
  config.train.dtype = dtype
  rng = np.random.default_rng(0)
  held_out = rng.integers(0, vocab, (batch, window + 1)).astype(np.int32)
  dataset = Dataset("random_tokens", {"tokens": rng.integers(0, vocab, batch * window * 64).astype(np.int32)}, None,
                    "lm", vocab_size=vocab, validation={"inputs": held_out[:, :-1], "targets": held_out[:, 1:],
                                                        "token_mask": np.ones((batch, window), np.float32)})
  task = get_task(config, dataset)
  steps_ = train.make_steps(config, dataset, task, parallel.make_mesh(config.mesh),
                            max(steps * repeats + 10, config.schedule.warmup_steps + 1))
  layout = steps_.layout
  tokens = [rng.integers(0, vocab, (batch, window + 1)).astype(np.int32) for _ in range(8)]
  batches = [layout.train_batch({"inputs": t[:, :-1], "targets": t[:, 1:], "mask": np.ones(batch, np.float32)})
             for t in tokens]
  state = [layout.place(steps_.init())]
  start = time.perf_counter()
  state[0], m = steps_.train_step(state[0], batches[0])
  jax.block_until_ready(m)
  compile_s = time.perf_counter() - start
  rates = []
  for _ in range(repeats):
    start = time.perf_counter()
    for i in range(steps):
      state[0], m = steps_.train_step(state[0], batches[i % len(batches)])
    jax.block_until_ready(m)
    rates.append(steps * batch * window / (time.perf_counter() - start))
  params = steps_.abstract_state.params
  flops = {a: speed.gpt_flops_per_token(config.model, params, window, a) for a in (6, 12)}
  device = jax.devices()[0]
  peak = speed.peak_flops(device.device_kind, dtype)
  peak_name, vendor = f"{device.device_kind} dense {dtype} peak", peak is not None
  if not vendor:  # MFU against what this device reaches on a big matmul: reported, never held to the target
    side = 512 if size == "tiny" else 2048  # a check's: a CPU's bfloat16 matmul is slow
    peak, peak_name = speed.measured_matmul_flops(dtype, side), f"a {side}^2 {dtype} matmul measured here"
  peak *= jax.device_count()
  used = " and ".join(sorted(attention_lib.TAKEN))  # what attend() took while the step was traced
  mfu = [r * flops[6] / peak for r in rates]
  nano = harness.summary([r * flops[12] / peak for r in rates])["median"]
  return harness.row("lm_throughput", f"gpt {size}: {layers}L {dim}d {heads}H T={window} batch {batch} vocab {vocab}",
                     "tokens/s", "tokens/s", "tokens / seconds over `steps` steps; MFU = tokens/s x (6N + 6LdT) / "
                     "peak; N without the position table", rates, compile_s=compile_s,
                     target=">= 40% MFU" if size == "gpt2_124m" else "report",
                     meets=harness.summary(mfu)["median"] >= 0.40 if size == "gpt2_124m" and vendor else None,
                     notes=f"MFU {harness.summary(mfu)['median']:.1%} against {peak_name} ({peak / 1e12:.3g} TFLOP/s); "
                           f"nanoGPT's 6N + 12LdT: {nano:.1%}; {dtype} compute; attention {used}")


def _on_gpu() -> bool:
  return jax.default_backend() == "gpu"


def time_to_loss(name: str, text: str, target: float, overrides: tuple[str, ...] = ()) -> dict:
  """Wall clock from launching the run (bigmodel_jax.main with `overrides`) to its first validation loss <= target,
  evaluations included. On a GPU, a run that fails (not one that times out) with attention "auto" or "cudnn" (cuDNN's
  kernel, never run here before) is launched once more in the einsum form, within the first launch's time limit, and
  the row says so: a short GPU slot still gives the recipe's number. A run that succeeds is launched once; one
  stopped at the time limit after an evaluation is measured from what its metrics.jsonl holds by then."""
  if not text:
    raise Unavailable("tiny Shakespeare is not on this machine: pass --text=input.txt")
  file, _, variant = name.partition(":")
  args = [f"--config=configs/{file}.py" + (f":{variant}" if variant else ""), f"--config.data.path={text}",
          *overrides]
  limit, retried = 480, ""  # inside one device command's 10 minutes, a retry included
  with tempfile.TemporaryDirectory() as tmp:
    # a failure's whole traceback, not main's one line: its frames name cuDNN's code where it failed there (the
    # retry's cue; jax's own checks, e.g. of the head size, need not say "cuDNN"), and run.log keeps it
    env = {"BIGMODEL_JAX_CACHE_DIR": str(Path(tmp) / "cache"), TRACEBACK_ENV: "1"}
    deadline = time.time() + limit
    workdir = Path(tmp) / "run"
    try:
      launched, stopped = _launch_within(args, workdir, env, limit)
    except RuntimeError as e:
      if not _on_gpu() or not _cudnn_failed(e):  # an OOM, a NaN stop, a data error: no retry
        raise
      workdir = Path(tmp) / "run_einsum"  # a fresh run, not a resume of the failed one
      try:
        launched, stopped = _launch_within([*args, "--config.model.attention=einsum"], workdir, env,
                                           max(deadline - time.time(), 1))
      except (RuntimeError, subprocess.TimeoutExpired) as again:
        raise RuntimeError(f"{e}; then in the einsum form: {again}") from None
      retried = f"; the run failed in cuDNN's attention ({str(e)[-160:]}): this is the einsum form's, run again"
    records = _records(workdir, partial=bool(stopped))
  validation = [r for r in records if r["split"] == "validation"]
  reached = next((r for r in validation if r["loss"] <= target), None)
  best = min(r["loss"] for r in validation)
  total = max(r["time"] for r in records) - launched
  value = reached["time"] - launched if reached else total
  return harness.row("nanogpt_shakespeare_char", name, f"wall clock to validation loss <= {target}", "s",
                     "time.time() at the first validation record at or below the target - launch", [value],
                     target="<= 60 s", meets=reached is not None and value <= 60,
                     notes=f"best validation loss {best:.4f}" + ("" if reached else " (target not reached: the value "
                                                                  "is the whole run)")
                     + (f"; {' '.join(overrides)}" if overrides else "") + retried + stopped)


def _launch_within(args: list[str], workdir: Path, env: dict, limit: float) -> tuple[float, str]:
  """_main in `workdir` for at most `limit` seconds. A run stopped at the limit after at least one validation record
  still counts (its records are flushed one by one): -> (launch time, a note saying where it was stopped, or "")."""
  launched = time.time()
  try:
    return _main([*args, f"--workdir={workdir}"], env, timeout=limit), ""
  except subprocess.TimeoutExpired:
    records = _records(workdir, partial=True) if (workdir / "metrics.jsonl").is_file() else []
    if not any(r["split"] == "validation" for r in records):
      raise
    print(f"bigmodel_jax.main {' '.join(args)}: stopped at its {limit:.0f} s limit", file=sys.stderr, flush=True)
    return launched, (f"; the run was stopped at its {limit:.0f} s limit after step "
                      f"{max(r['step'] for r in records)} (the value is from the records it wrote by then)")
