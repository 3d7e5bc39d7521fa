"""What a trained model is without its dataset: `RUN/model.json`, written when training starts.

It holds what the data decided at run time and the config does not say: the inputs the model takes (shape,
the dtype of a raw example as the dataset gives it, the preprocessing with its constants: unit scale,
train-set mean/std), what its outputs mean (class names, a vocabulary in RUN/tokenizer/, a regression value)
and the sizes the model is built from (input_shape, num_outputs, vocab_size). With config.json and a
checkpoint it rebuilds the model with no dataset (inference.Inference): sample, export, serve and quantize.
A workdir from before it gets one computed once from its dataset (a log line says so).

`apply(preprocessing, x, xp)` is the one preprocessing function: the input pipeline runs it in numpy, the
exported and served model in jax.numpy, on the same constants.
"""

import hashlib
import json
from pathlib import Path

import numpy as np
from absl import logging

from bigmodel_jax import runinfo
from bigmodel_jax.errors import UserError

FILE = "model.json"
FORMAT = 1


def preprocessing(dataset, data_config) -> dict:
  """Raw example -> model input, as data: {'normalize', 'scale', 'mean', 'std'} (token ids stay ids)."""
  if dataset.is_text:
    return {"normalize": "none", "scale": 1.0, "mean": None, "std": None, "token_ids": True}
  out = {"normalize": data_config.normalize, "scale": float(dataset.input_scale), "mean": None, "std": None,
         "token_ids": False}
  if data_config.normalize == "standardize":
    from bigmodel_jax.data import pipeline
    mean, std = pipeline.train_statistics(dataset)
    out.update(mean=np.asarray(mean, np.float32).tolist(), std=np.asarray(std, np.float32).tolist())
  return out


def apply(pre: dict, x, xp=np):
  """Raw inputs -> float32 model inputs by `pre` (preprocessing()); `xp` is numpy or jax.numpy."""
  if pre["token_ids"]:
    return x
  if pre["normalize"] == "none":
    return x.astype(xp.float32)
  scaled = x.astype(xp.float32) / xp.float32(pre["scale"])
  if pre["normalize"] == "unit":
    return scaled
  return (scaled - xp.asarray(pre["mean"], xp.float32)) / xp.asarray(pre["std"], xp.float32)


def raw_dtype(dataset) -> str:
  """The dtype a raw example comes in: integer pixels and token ids as they are, real values as float32."""
  arrays = dataset.train if "inputs" in dataset.train else dataset.split(dataset.eval_splits[0])
  dtype = np.dtype(arrays["inputs"].dtype)
  return dtype.name if np.issubdtype(dtype, np.integer) else "float32"


def describe(dataset, task, config) -> dict:
  """The model card of a run on `dataset` (see the module docstring)."""
  if dataset.is_token_stream:
    outputs = {"kind": "next_token_logits", "vocab_size": dataset.vocab_size}
  elif dataset.num_classes:
    outputs = {"kind": "class_probabilities", "class_names": list(dataset.class_names)}
  else:
    outputs = {"kind": "value"}
  return {"format": FORMAT, "dataset": dataset.name, "kind": dataset.kind, "task": config.task.name,
          "model": config.model.name, "input_shape": list(dataset.input_shape), "input_dtype": raw_dtype(dataset),
          "num_outputs": int(task.num_outputs), "num_classes": int(dataset.num_classes),
          "class_names": list(dataset.class_names), "vocab_size": int(dataset.vocab_size),
          "tokenizer": "tokenizer" if dataset.tokenizer is not None else None,
          "chars_per_token": {k: float(v) for k, v in dataset.chars_per_token.items()},
          "preprocessing": preprocessing(dataset, config.data), "outputs": outputs}


def write(workdir: Path, card: dict) -> None:
  runinfo.write_text_atomic(Path(workdir) / FILE, json.dumps(card, indent=2) + "\n")


def sha256(card: dict) -> str:
  """The digest of what the card says the model takes and gives (chars_per_token, a measurement, aside), in a
  canonical form: each checkpoint's meta records it, so a model.json changed after training (by hand, say) is caught
  before export, serve, sample or quantize build a model on it (check())."""
  kept = {k: v for k, v in card.items() if k != "chars_per_token"}
  return hashlib.sha256(json.dumps(kept, sort_keys=True).encode()).hexdigest()


def check(workdir: Path, card: dict, recorded: str | None, step: int, digests) -> None:
  """Refuses a card whose digest is not the one checkpoint `step` recorded (None: a checkpoint from before the
  record, or one the card did not come with: nothing to check). `digests()`: every kept step's recorded digest, read
  on a mismatch to name the steps saved under this card (after a resume that changed the data or preprocessing)."""
  now = sha256(card)
  if not recorded or now == recorded:
    return
  path, matching = Path(workdir) / FILE, [s for s, d in sorted(digests().items()) if d == now]
  if matching:
    raise UserError(f"checkpoint step {step} was saved under another {path} than the one there now (a resume that "
                    "changed the data or its preprocessing?); use a step saved under this one: "
                    f"{', '.join(map(str, matching))}")
  raise UserError(f"{path} is not the model card checkpoint step {step} was trained with (changed since); put back "
                  "the original, or delete it and it is rebuilt from the run's dataset")


def read(workdir: Path) -> dict | None:
  """The workdir's model card, or None where it has none (a run from before model.json)."""
  path = Path(workdir) / FILE
  if not path.is_file():
    return None
  try:
    card = json.loads(path.read_text())
  except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
    raise UserError(f"{path}: unreadable ({e}); delete it and it is rebuilt from the run's dataset") from None
  fix = "delete it and it is rebuilt from the run's dataset"
  if not isinstance(card, dict):
    raise UserError(f"{path}: not a model card (a JSON {type(card).__name__}, not an object); {fix}")
  missing = [k for k in ("format", "kind", "input_shape", "input_dtype", "num_outputs", "preprocessing") if k not in card]
  if missing:
    raise UserError(f"{path}: not a model card (missing {', '.join(missing)}); {fix}")
  if not isinstance(card["format"], int) or isinstance(card["format"], bool):
    raise UserError(f"{path}: format {card['format']!r} is not a version number; {fix}")
  if card["format"] > FORMAT:
    raise UserError(f"{path}: format {card['format']} is newer than this version reads ({FORMAT}); upgrade bigmodel_jax")
  shape = card["input_shape"]
  if not isinstance(shape, list) or not shape or not all(isinstance(d, int) and d > 0 for d in shape):
    raise UserError(f"{path}: input_shape {shape!r} is not a list of positive integers; {fix}")
  try:
    np.dtype(card["input_dtype"])
  except TypeError:
    raise UserError(f"{path}: input_dtype {card['input_dtype']!r} is not a dtype; {fix}") from None
  if card["kind"] not in ("image", "tabular", "text", "lm") or not isinstance(card["preprocessing"], dict):
    raise UserError(f"{path}: kind {card['kind']!r} or its preprocessing is not one this version knows; {fix}")
  return card


def load(workdir: Path, config) -> dict:
  """The workdir's model card; a workdir from before model.json gets one from its dataset, once."""
  card = read(workdir)
  if card is not None:
    return card
  from bigmodel_jax.data import load_dataset
  from bigmodel_jax.tasks import get_task
  if config.task.name == "language_modeling":  # its tokenizer and seq_len say it all: the text is not read
    logging.info("%s has no %s (a run from an earlier version): writing it from its tokenizer", workdir, FILE)
    card = language_model_card(workdir, config)
  else:
    logging.info("%s has no %s (a run from an earlier version): reading its dataset %s once to write it",
                 workdir, FILE, config.data.name)
    dataset = load_dataset(config.data, Path(workdir) / "tokenizer", create_tokenizer=False)
    card = describe(dataset, get_task(config, dataset), config)
  try:
    write(workdir, card)
  except OSError as e:  # a read-only workdir: use the card without keeping it
    logging.warning("could not write %s (%s); it is computed again next time", Path(workdir) / FILE, e.strerror)
  return card


def language_model_card(workdir: Path, config) -> dict:
  """The card of a language-model run from its tokenizer files and config.data.seq_len (bits per character, which
  needs the text, is then measured per token)."""
  from bigmodel_jax.data import tokenizers
  tokenizer = tokenizers.get_tokenizer(config.data.tokenizer, (), Path(workdir) / "tokenizer", create=False)
  return {"format": FORMAT, "dataset": config.data.name, "kind": "lm", "task": config.task.name,
          "model": config.model.name, "input_shape": [int(config.data.seq_len)], "input_dtype": "int32",
          "num_outputs": tokenizer.vocab_size, "num_classes": 0, "class_names": [], "vocab_size": tokenizer.vocab_size,
          "tokenizer": "tokenizer", "chars_per_token": {},
          "preprocessing": {"normalize": "none", "scale": 1.0, "mean": None, "std": None, "token_ids": True},
          "outputs": {"kind": "next_token_logits", "vocab_size": tokenizer.vocab_size}}


def described_dataset(card: dict, workdir: Path, data_config):
  """A `Dataset` with no examples that has everything else of the run's: shapes, classes, tokenizer, scale.
  Enough for a task and the compiled model, so nothing reads the training data."""
  from bigmodel_jax.data import Dataset, corpus, tokenizers
  tokenizer = None
  if card.get("tokenizer"):
    tokenizer = tokenizers.get_tokenizer(data_config.tokenizer, (), Path(workdir) / card["tokenizer"], create=False)
  shape, dtype = tuple(card["input_shape"]), np.dtype(card["input_dtype"])
  # the tokenizer's own size: edited tokenizer files then fail the checkpoint's shapes, named as theirs
  common = dict(tokenizer=tokenizer, vocab_size=tokenizer.vocab_size if tokenizer else card.get("vocab_size", 0),
                chars_per_token=card.get("chars_per_token", {}), fingerprint={})
  if card["kind"] == "lm":
    empty = np.zeros(shape[0] + 1, np.int32)
    return Dataset(card.get("dataset", data_config.name), train={"tokens": empty}, test=None,
                   validation=corpus.windows(empty, shape[0]), kind="lm", **common)
  arrays = {"inputs": np.zeros((0, *shape), dtype),
            "targets": np.zeros((0,), np.int32 if card.get("num_classes") else np.float32)}
  return Dataset(card.get("dataset", data_config.name), train=arrays, test=arrays, validation=arrays, kind=card["kind"],
                 num_classes=card.get("num_classes", 0), class_names=tuple(card.get("class_names", ())),
                 input_scale=card["preprocessing"].get("scale", 1.0), **common)
