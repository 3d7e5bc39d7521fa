"""--mode=export --workdir=RUN: the trained model as files that run with jax and numpy alone -> RUN/export/

  params.npz          every array the model needs, by name (int8 weights + scales for a quantized model)
  predict.jaxexport   classifiers/regressors: a serialized jax.export.Exported (StableHLO) with a symbolic batch,
                      preprocessing inside:  exported.call(params, raw_inputs) -> {'prediction', 'probability'}
  prefill.jaxexport   language models: prefill(params, tokens B x T) -> (next-token logits B x V, cache)
  decode.jaxexport    decode(params, cache, tokens B, index) -> (logits B x V, cache): one token at position
                      `index` of the fixed-size KV cache (positions < the context only)
  predict.onnx        classifiers/regressors, where jax2onnx (the `onnx` extra) converts every operation: the same
                      function for onnxruntime, inputs "inputs", outputs in signature.json (else its "onnx" says why)
  signature.json      names, shapes, dtypes, preprocessing, labels / vocabulary, versions, date and the run's
                      workdir (an --output_dir holding another run's export is refused, never replaced)

A token id outside 0..vocab_size-1 gives its row NaN logits (a text classifier: NaN probabilities, prediction -1).

Using it, with neither this package nor flax installed:
  import jax, numpy as np
  exported = jax.export.deserialize(open("export/predict.jaxexport", "rb").read())
  params = dict(np.load("export/params.npz"))
  exported.call(params, raw_inputs)   # raw_inputs: examples as the dataset gives them (signature.json's dtype)

jax.export's compatibility: an artifact runs on jax releases for about 6 months after the one that wrote it
(jax's serialization guarantee); re-export from the checkpoint with a newer jax when that window has passed.
"""

import datetime
import json
import os
import shutil
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from bigmodel_jax import errors, inference, runinfo
from bigmodel_jax.models import attention
from bigmodel_jax.errors import UserError

ONNX_MISSING = ("not written: jax2onnx is not installed (pip install 'bigmodel_jax[onnx]': jax2onnx 0.13.0, the "
                "newest release that installs beside orbax-checkpoint>=0.12.8; later ones require orbax-checkpoint<0.11.37)")
ONNX_LM = ("not written: a language model's prefill/decode pair carries its KV cache as a pytree, which this "
           "export writes as StableHLO only")
COMPATIBILITY = ("jax.export artifacts are guaranteed to deserialize and run on jax releases for at least 6 months "
                 "after the jax version that wrote them; re-export from the checkpoint after that")
PLATFORMS = ("cpu", "cuda", "rocm", "tpu")


def platforms(field: str) -> tuple[str, ...]:
  names = tuple(p.strip() for p in field.split(",") if p.strip())
  bad = [p for p in names if p not in PLATFORMS]
  if not names or bad:
    raise UserError(f"config.export.platforms: {field!r} must be a comma-separated list of {', '.join(PLATFORMS)}")
  return names


def specs(tree):
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(np.shape(x), x.dtype), tree)


def export(model, checkpoint_step: int | None) -> dict:
  """Writes RUN/export/ (or --output_dir/export/) -> {'step', 'directory', 'files'}."""
  e = model.config.export
  targets = platforms(e.platforms)
  inference.check_deployable(model.config, "export")
  errors.made_by(model.outputs / "export", "signature.json", model.workdir, "export")  # a shared --output_dir
  step, state = model.restore_step(checkpoint_step)
  variables, forward = model.variables(state), None
  if e.quantized:
    from bigmodel_jax import quantize
    variables, forward = quantize.load(model, step)
  with attention.portable():  # every platform's artifact in the einsum form, whichever device traces it
    return write(model, step, variables, forward, targets, quantized=bool(e.quantized))


def write(model, step: int, variables: dict, forward=None, targets: tuple[str, ...] = ("cpu",),
          quantized: bool = False) -> dict:
  """The artifacts of `variables` (forward: their variables -> model function, default the float one's)."""
  final = model.outputs / "export"
  staging = model.outputs / ".export.tmp"
  shutil.rmtree(staging, ignore_errors=True)
  staging.mkdir(parents=True)
  np.savez(staging / "params.npz", **variables)
  param_specs = specs(variables)
  card = model.card
  batch = jax.export.symbolic_shape("batch")[0]
  if model.dataset.is_token_stream:
    prefill, decode = model.lm_functions(forward)
    limit = (f"tokens <= {model.context()}",) if model.context() else ()  # an LSTM: any prompt length
    batch, tokens = jax.export.symbolic_shape("batch, tokens", constraints=limit)
    tokens_spec = jax.ShapeDtypeStruct((batch, tokens), jnp.int32)
    exported = {"prefill": jax.export.export(jax.jit(prefill), platforms=targets)(param_specs, tokens_spec)}
    _, cache_spec = jax.eval_shape(prefill, param_specs, tokens_spec)
    batch = jax.export.symbolic_shape("batch")[0]  # decode's own scope (prefill's has `tokens` in it)
    cache_spec = jax.tree.map(lambda a: jax.ShapeDtypeStruct(tuple(d if isinstance(d, int) else batch for d in a.shape),
                                                             a.dtype), cache_spec)
    exported["decode"] = jax.export.export(jax.jit(decode), platforms=targets)(
        param_specs, cache_spec, jax.ShapeDtypeStruct((batch,), jnp.int32), jax.ShapeDtypeStruct((), jnp.int32))
    functions = {
        "prefill": {"inputs": {"params": "params.npz", "tokens": ["batch", "tokens", "int32"]},
                    "outputs": {"logits": ["batch", card["vocab_size"], "float32"], "cache": "the KV cache (or carry)"}},
        "decode": {"inputs": {"params": "params.npz", "cache": "prefill's cache", "tokens": ["batch", "int32"],
                              "index": "int32 position of these tokens (the prompt's length, then +1 each)"},
                   "outputs": {"logits": ["batch", card["vocab_size"], "float32"], "cache": "the updated cache"}}}
    extra = {"context": model.context(), "vocab_size": card["vocab_size"], "tokenizer": _tokenizer(model)}
    onnx = ONNX_LM
  else:
    raw = jax.ShapeDtypeStruct((batch, *card["input_shape"]), np.dtype(card["input_dtype"]))
    exported = {"predict": jax.export.export(jax.jit(model.predict_function(forward)), platforms=targets)(
        param_specs, raw)}
    out_specs = jax.eval_shape(model.predict_function(forward), param_specs, raw)
    functions = {"predict": {
        "inputs": {"params": "params.npz", "inputs": ["batch", *card["input_shape"], card["input_dtype"]]},
        "outputs": {k: [*(d if isinstance(d, int) else str(d) for d in v.shape),
                                  v.dtype.name] for k, v in out_specs.items()}}}
    extra = {"class_names": card.get("class_names", [])}
    if model.dataset.tokenizer is not None:  # a text classifier: ids of text padded / cut to input_shape[0]
      extra["tokenizer"] = {**_tokenizer(model), "seq_len": card["input_shape"][0],
                            "padding": f"id {model.dataset.tokenizer.pad_id} (pad_id) after the text; longer texts "
                                       "keep their first seq_len ids"}
    high = model.dataset.vocab_size - 1 if model.dataset.tokenizer is not None else 16  # test ids within the vocab
    onnx = write_onnx(model.predict_function(forward), variables, raw, sorted(out_specs), staging / "predict.onnx",
                      high)
  if model.dataset.tokenizer is not None:
    model.dataset.tokenizer.save(staging / "tokenizer")
  for name, exp in exported.items():
    (staging / f"{name}.jaxexport").write_bytes(exp.serialize())
  signature = {
      "model": card["model"], "task": card["task"], "dataset": card["dataset"], "step": step,
      "quantized": quantized, "functions": functions, "preprocessing": card["preprocessing"],
      "outputs": card["outputs"], **extra, "platforms": list(targets), "jax_version": jax.__version__,
      "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
      "compatibility": COMPATIBILITY, "onnx": onnx,
      "parameters": {k: [list(v.shape), v.dtype.name] for k, v in variables.items()},
      "workdir": str(model.workdir.resolve())}  # the run: an --output_dir holding another run's export is kept
  runinfo.write_text_atomic(staging / "signature.json", json.dumps(signature, indent=2) + "\n")
  _replace(staging, final)
  files = sorted(str(p) for p in final.iterdir())
  logging.info("exported step %d to %s (%s)", step, final, ", ".join(Path(f).name for f in files))
  return {"step": step, "directory": str(final), "files": files, "onnx": onnx}


def write_onnx(predict, variables: dict, raw_spec, output_names: list[str], path: Path, high: int = 16) -> str:
  """predict(variables, raw) as an ONNX graph with the variables as constants -> what signature.json says of it.
  `high`: the largest value of integer test inputs (a text classifier's: its vocabulary's last id)."""
  try:
    from jax2onnx import to_onnx
  except ImportError:
    return ONNX_MISSING
  import logging as std_logging
  noisy = [std_logging.getLogger(n) for n in ("jax2onnx", "onnx_ir")]  # per-op chatter, and plugins for other libraries
  levels = [n.level for n in noisy]
  for n in noisy:
    n.setLevel(std_logging.CRITICAL)
  try:
    proto = to_onnx(lambda raw: predict(variables, raw), [raw_spec], model_name="predict", input_names=["inputs"],
                    output_names=output_names)
  except Exception as e:  # an operation jax2onnx has no rule for
    return f"not written: jax2onnx cannot convert this model ({errors.where(e)})"
  finally:
    for n, level in zip(noisy, levels):
      n.setLevel(level)
  problem = _check_onnx(proto.SerializeToString(), predict, variables, raw_spec, output_names, high)
  if problem:
    return f"not written: {problem}"
  path.write_bytes(proto.SerializeToString())
  return f"{path.name}: input 'inputs' (raw examples, as predict.jaxexport), outputs {', '.join(output_names)}"


def _check_onnx(data: bytes, predict, variables: dict, raw_spec, output_names: list[str], high: int) -> str | None:
  """None if onnxruntime runs the graph and agrees with jax on a few examples, else what went wrong."""
  try:
    import onnxruntime
  except ImportError:
    return "onnxruntime, which checks it, is not installed (pip install 'bigmodel_jax[onnx]')"
  shape = (3, *raw_spec.shape[1:])
  rng = np.random.default_rng(0)
  if np.issubdtype(raw_spec.dtype, np.integer):
    raw = rng.integers(0, min(np.iinfo(raw_spec.dtype).max, high) + 1, shape).astype(raw_spec.dtype)
  else:
    raw = rng.standard_normal(shape).astype(raw_spec.dtype)
  try:
    session = onnxruntime.InferenceSession(data, providers=["CPUExecutionProvider"])
    got = dict(zip([o.name for o in session.get_outputs()], session.run(None, {"inputs": raw})))
  except Exception as e:  # e.g. a bfloat16 matmul onnxruntime's CPU kernels do not have
    return f"onnxruntime cannot run what jax2onnx wrote ({type(e).__name__}: {str(e).splitlines()[0][:160]})"
  want = jax.device_get(jax.jit(predict)(variables, raw))
  for name in output_names:
    a, b = np.asarray(got.get(name)), np.asarray(want[name])
    # float32 results agree to a few roundings; bfloat16 compute is compared at its own precision
    if a.shape != b.shape or not np.allclose(a, b, rtol=1e-2, atol=1e-4 if a.dtype.kind == "f" else 0):
      return f"onnxruntime's {name} differs from jax's on test inputs (max |diff| {np.max(np.abs(a - b)):.3g})"
  return None


def _tokenizer(model) -> dict | None:
  tokenizer = model.dataset.tokenizer
  if tokenizer is None:
    return None
  record = tokenizer.record()
  return {**record, "special_ids": list(tokenizer.special_ids),  # stand for no text: never sampled
          "files": "tokenizer/ (the run's own tokenizer files)"}


def _replace(staging: Path, final: Path) -> None:
  """The new export in place of an earlier one, never half of each: rename, then delete the old one."""
  old = final.with_name(".export.old")
  shutil.rmtree(old, ignore_errors=True)
  if final.exists():
    os.replace(final, old)
  os.replace(staging, final)
  shutil.rmtree(old, ignore_errors=True)
