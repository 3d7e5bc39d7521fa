"""--mode=quantize --workdir=RUN: int8 post-training weight quantization -> RUN/quantized/ (or --output_dir/quantized/)

  params.npz    every array the model needs, by name: each quantized weight NAME as int8 plus NAME.scale (float32,
                one per output channel, broadcastable to NAME), every other array as the float32 of the checkpoint
  report.json   the run's workdir (an --output_dir holding another run's quantized/ is refused, never replaced),
                the step and the digest of its checkpoint's files (export and serve refuse int8 weights made from
                another checkpoint of that step); the task's metrics before and after on config.quantize.split;
                weight bytes before and after; examples/s (tokens/s for language models) of the jitted predict
                (prefill) function, float and int8, measured alternately in one process on this machine

The scheme: symmetric per-channel int8, weight only (activations stay in the compute dtype). scale = max|w| / 127
per channel, int8 = round(w / scale):
  nnx.Linear, nnx.Conv kernels     one scale per output channel (reduced over every axis but the last)
  nnx.LinearGeneral kernels        one scale per output unit (reduced over the input axes)
  nnx.Embed embeddings             one scale per row (vocabulary entry)
Scanned layers (a leading "layers" axis) get their scales per layer. Arrays with fewer than config.quantize.min_size
values, biases, norms and every other array stay float32. `load` gives the arrays and a model function that
dequantizes (int8 * scale) inside the traced function, so what is stored, passed and exported is the int8 arrays.

Why not qwix (google/qwix 0.1.8, with flax 0.12.8 / jax 0.10.2; checked with qwix.PtqProvider and
qwix.quantize_model, rule QuantizationRule(module_path=".*", weight_qtype=jnp.int8), no activation quantization):
  * the MLP worked (int8 qvalue + float32 scale leaves, plain named arrays, jax.export fine), but
  * the CNN failed: "ValueError: conv_general_dilated requires same act_qtype and weight_qtype. Got:
    rule.act_qtype=None rule.weight_qtype=<class 'jax.numpy.int8'>" (no weight-only convolutions);
  * in the GPT and the encoder every Transformer block stayed float32: our Trunk applies its blocks as pure
    functions of their state (nnx.split / nnx.merge, for jax.checkpoint and jax.lax.scan), which qwix's
    interception of the model's own module calls never sees; only the classifier head was quantized (GPT: nothing);
  * nnx.Embed lookups (a gather, not a dot_general) are not quantized, the biggest array of a small LM.
So the per-channel scheme above is this module's own (channel_axes, quantize_array, dequantize below).
"""

import json
import os
import shutil
import statistics
import time
import zipfile
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from flax import nnx

from bigmodel_jax import errors, runinfo
from bigmodel_jax.errors import UserError
from bigmodel_jax.inference import check_deployable, leaf_name

SCALE = ".scale"  # NAME.scale: the float32 scales of the int8 array NAME
MIN_SECONDS = 0.2  # each speed measurement calls the function until this much time has passed
MISSING = "config.export.quantized / config.serve.quantized: "


def directory(model) -> Path:
  return model.outputs / "quantized"


# --- the scheme


def channel_axes(model) -> dict[str, tuple[int, ...]]:
  """{variable name: the axes its scale is reduced over} for every weight the scheme quantizes (any size)."""
  abstract = model.steps.model(model.steps.abstract_state)
  out = {}
  for path, node in nnx.iter_graph(abstract):
    prefix = "params/" + "/".join(str(p) for p in path)
    if isinstance(node, nnx.LinearGeneral):
      name, ndim = f"{prefix}/kernel", len(node.in_features) + len(node.out_features) + len(node.batch_axis)
      inputs = tuple(range(len(node.batch_axis), len(node.batch_axis) + len(node.in_features)))
    elif isinstance(node, (nnx.Linear, nnx.Conv, nnx.ConvTranspose)):
      name = f"{prefix}/kernel"
      ndim = 2 if isinstance(node, nnx.Linear) else len(node.kernel_size) + 2
      inputs = tuple(range(ndim - 1))
    elif isinstance(node, nnx.Embed):
      name, ndim, inputs = f"{prefix}/embedding", 2, (1,)
    else:
      continue
    kernel = getattr(node, name.rsplit("/", 1)[1], None)
    if kernel is None:
      continue
    extra = len(kernel.shape) - ndim  # scanned layers: a leading layers axis keeps its own scales
    out[name] = tuple(extra + a for a in inputs)
  return out


def quantize_array(w: np.ndarray, axes: tuple[int, ...]) -> tuple[np.ndarray, np.ndarray]:
  """w (float) -> (int8 values, float32 scales with `axes` of size 1): w ~= int8 * scale."""
  w = np.asarray(w, np.float32)
  scale = np.max(np.abs(w), axis=axes, keepdims=True) / np.float32(127)
  scale = np.where(scale > 0, scale, np.float32(1)).astype(np.float32)
  return np.clip(np.rint(w / scale), -127, 127).astype(np.int8), scale


def quantize_variables(model, variables: dict) -> dict[str, np.ndarray]:
  """The float variables -> the int8 ones (NAME int8 + NAME.scale; small and other arrays as they are)."""
  min_size, channels = model.config.quantize.min_size, channel_axes(model)
  out = {}
  for name, value in variables.items():
    axes = channels.get(name) if value.size >= min_size else None
    if axes is not None and np.issubdtype(value.dtype, np.floating):
      out[name], out[name + SCALE] = quantize_array(value, axes)
    else:
      out[name] = value
  return out


def dequantize(variables: dict, xp=jnp) -> dict:
  """int8 variables -> float32 ones (int8 * scale), with numpy (xp=np) or inside a trace (jnp)."""
  out = {}
  for name, value in variables.items():
    if name.endswith(SCALE):
      continue
    scale = variables.get(name + SCALE)
    out[name] = value if scale is None else xp.asarray(value).astype(xp.float32) * xp.asarray(scale)
  return out


def model_function(model):
  """int8 variables -> the NNX model with the dequantized weights (inside the trace of whoever calls it)."""
  float_model = model.model_function()
  return lambda variables: float_model(dequantize(variables))


def load(model, step: int) -> tuple[dict[str, np.ndarray], object]:
  """RUN/quantized/'s int8 variables of checkpoint `step` and the model function that reads them."""
  where = directory(model)
  params, report = where / "params.npz", where / "report.json"
  if not (params.is_file() and report.is_file()):
    made = model.workdir / "quantized"  # --output_dir's is read, never the workdir's: say where one is
    copy = f", or copy {made} there" if made != where and (made / "report.json").is_file() else ""
    raise UserError(f"{MISSING}no quantized model in {where}; run --mode=quantize first{copy}")
  again = f"run --mode=quantize --checkpoint_step={step} again"
  try:
    made = json.loads(report.read_text())
    made_from = made.get("step")
  except (OSError, UnicodeDecodeError, ValueError, AttributeError):
    raise UserError(f"{MISSING}{report} is not a readable quantization report (damaged?); {again}") from None
  if made_from != step:
    raise UserError(f"{MISSING}the quantized model in {where} is of step {made_from}, not of step {step}; run "
                    f"--mode=quantize --checkpoint_step={step} first")
  if made.get("checkpoint_sha256") not in (None, checkpoint_digest(model, step)):  # None: a report from before
    raise UserError(f"{MISSING}the quantized model in {where} was made from another checkpoint step {step} than "
                    f"the one in {model.checkpointer.directory} now (retrained since?); {again}")
  try:
    with np.load(params) as npz:
      variables = {k: npz[k] for k in npz.files}
  except (OSError, ValueError, zipfile.BadZipFile, EOFError) as e:
    raise UserError(f"{MISSING}{params} cannot be read ({type(e).__name__}); {again}") from None
  problem = _not_the_models(variables, model.variable_shapes())
  if problem:
    raise UserError(f"{MISSING}{params} does not hold this model's arrays ({problem}); {again}")
  return variables, model_function(model)


def _not_the_models(variables: dict, wanted: dict) -> str | None:
  """What in a params.npz does not fit the model's variables (names and shapes, NAME.scale broadcast), or None."""
  names = {n[:-len(SCALE)] if n.endswith(SCALE) else n for n in variables}
  if missing := sorted(set(wanted) - names):
    return f"no {missing[0]}"
  if extra := sorted(names - set(wanted)):
    return f"{extra[0]}, which the model has not"
  for name, shape in wanted.items():
    if name not in variables:
      return f"{name + SCALE} without {name}"
    value, scale = variables[name], variables.get(name + SCALE)
    if (value.dtype == np.int8) != (scale is not None):
      return f"{name} is {value.dtype} {'without' if scale is None else 'with'} {name + SCALE}"
    try:  # the array is the weight's shape, and its scales broadcast over it without growing it
      got = value.shape if scale is None or np.broadcast_shapes(value.shape, scale.shape) == value.shape else \
          f"{value.shape} with scales {scale.shape}"
    except ValueError:
      got = f"{value.shape} with scales {scale.shape}"
    if got != shape:
      return f"{name} is {got}, the model's {shape}"
  return None


def checkpoint_digest(model, step: int) -> str | None:
  """The digest of checkpoint `step`'s files, which ties a quantization to the weights it read."""
  from bigmodel_jax import integrity
  return integrity.recorded_sha256(model.checkpointer.directory / str(step))


# --- --mode=quantize


def quantize(model, checkpoint_step: int | None) -> dict:
  """Writes RUN/quantized/ (params.npz, report.json) -> the report (also logged)."""
  config = model.config
  check_deployable(config, "quantize")
  if not (isinstance(config.quantize.repeats, int) and config.quantize.repeats >= 1):
    raise UserError(f"config.quantize.repeats: must be an integer >= 1, got {config.quantize.repeats!r}")
  errors.made_by(directory(model), "report.json", model.workdir, "quantize")  # a shared --output_dir
  step, state = model.restore_step(checkpoint_step)
  split = config.quantize.split
  run = _with_data(model, split)
  floats = model.variables(state)
  int8 = quantize_variables(model, floats)
  qstate = state.replace(params=_params_tree(state.params, dequantize(int8, np)))
  from bigmodel_jax.evaluate import evaluate_split, loggable
  before = loggable(evaluate_split(run, state, split))
  after = loggable(evaluate_split(run, qstate, split))
  names = [n for n in int8 if n + SCALE in int8]
  weights = {
      "float_bytes": _bytes(floats), "int8_bytes": _bytes(int8), "ratio": _bytes(floats) / _bytes(int8),
      "quantized_arrays": len(names), "quantized_float_bytes": _bytes({n: floats[n] for n in names}),
      "quantized_int8_bytes": _bytes({k: int8[k] for n in names for k in (n, n + SCALE)}),
      "float32_arrays_kept": len(floats) - len(names)}
  weights["quantized_ratio"] = weights["quantized_float_bytes"] / weights["quantized_int8_bytes"] if names else None
  if not names:  # say so, rather than a report whose "int8" model is the float one and a quantized_ratio of 0.0
    logging.warning("nothing was quantized: no weight of this %s has config.quantize.min_size=%d values or more "
                    "(lower it to quantize smaller ones); the int8 model is the float one", model.card["model"],
                    config.quantize.min_size)
  report = {
      "step": step, "checkpoint_sha256": checkpoint_digest(model, step), "task": config.task.name,
      "model": model.card["model"], "split": split,
      "scheme": "symmetric per-channel int8 weights (scale = max|w|/127), float activations",
      "min_size": config.quantize.min_size, "float": before, "int8": after,
      "change": {k: after[k] - before[k] for k in before if isinstance(before[k], (int, float))},
      "weights": weights, "speed": _speed(model, run, split, floats, int8), "quantized": names,
      "workdir": str(model.workdir.resolve())}  # the run: an --output_dir holding another run's is kept
  if jax.process_index() == 0:
    _write(directory(model), int8, report)
  report["directory"] = str(directory(model))
  logging.info("quantized step %d: %s %s; weights %.2f MiB -> %.2f MiB (%.2fx); speed %s",
               step, split, _headline(config.task.name, before, after), weights["float_bytes"] / 2 ** 20,
               weights["int8_bytes"] / 2 ** 20, weights["ratio"], report["speed"])
  return report


def _with_data(model, split: str):
  """The model with the dataset's examples (read for this measurement only), checked against its checkpoints."""
  import dataclasses
  from bigmodel_jax.data import fingerprint, load_dataset
  dataset = load_dataset(model.config.data, model.workdir / "tokenizer", create_tokenizer=False)
  fingerprint.check(model.workdir, dataset, model.config.train.get("allow_data_change", False))
  if split not in dataset.eval_splits:
    raise UserError(f"config.quantize.split: {dataset.name} has no {split!r} split (it has: "
                    f"{', '.join(dataset.eval_splits)}); pass --config.quantize.split={dataset.eval_splits[0]}")
  return dataclasses.replace(model, dataset=dataset)


def _params_tree(params, named: dict):
  """`params` (the state's tree) with its leaves replaced by named arrays, on the same devices."""
  flat, treedef = jax.tree_util.tree_flatten_with_path({"params": params})
  leaves = [jax.device_put(jnp.asarray(named[leaf_name(p)], x.dtype), x.sharding) for p, x in flat]
  return jax.tree_util.tree_unflatten(treedef, leaves)["params"]


def _bytes(arrays: dict) -> int:
  return int(sum(np.asarray(a).nbytes for a in arrays.values()))


def _headline(task: str, before: dict, after: dict) -> str:
  key = "accuracy" if task == "classification" else "loss"
  return f"{key} {before[key]:.4f} -> {after[key]:.4f}"


def _speed(model, run, split: str, floats: dict, int8: dict) -> dict:
  """Median examples/s (language models: prefill tokens/s) of the jitted function over one eval batch of the
  split, float and int8 measured in turn, config.quantize.repeats times each."""
  inputs = run.dataset.split(split)["inputs"][:model.config.data.eval_batch_size]
  if model.dataset.is_token_stream:
    functions = [model.lm_functions()[0], model.lm_functions(model_function(model))[0]]
    unit, per_call = "tokens/s", inputs.size
  else:
    functions = [model.predict_function(), model.predict_function(model_function(model))]
    unit, per_call = "examples/s", len(inputs)
  x = jnp.asarray(inputs)
  calls = []
  for f, variables in zip(functions, (floats, int8)):
    jitted, device_vars = jax.jit(f), jax.device_put(variables)
    jax.block_until_ready(jitted(device_vars, x))  # compiled before timing
    calls.append(lambda jitted=jitted, v=device_vars: jax.block_until_ready(jitted(v, x)))
  rates = [[], []]
  for _ in range(model.config.quantize.repeats):
    for i, call in enumerate(calls):
      n, start = 0, time.perf_counter()
      while (elapsed := time.perf_counter() - start) < MIN_SECONDS or n == 0:
        call()
        n += 1
      rates[i].append(n * per_call / elapsed)
  f, q = (statistics.median(r) for r in rates)
  return {"unit": unit, "batch": list(inputs.shape), "float": f, "int8": q, "int8_over_float": q / f,
          "repeats": model.config.quantize.repeats, "device": jax.devices()[0].device_kind}


def _write(final: Path, int8: dict, report: dict) -> None:
  """params.npz and report.json in place of an earlier quantization, never half of each."""
  staging, old = final.with_name(".quantized.tmp"), final.with_name(".quantized.old")
  shutil.rmtree(staging, ignore_errors=True)
  staging.mkdir(parents=True)
  np.savez(staging / "params.npz", **int8)
  runinfo.write_text_atomic(staging / "report.json", json.dumps(report, indent=2) + "\n")
  shutil.rmtree(old, ignore_errors=True)
  if final.exists():
    os.replace(final, old)
  os.replace(staging, final)
  shutil.rmtree(old, ignore_errors=True)
