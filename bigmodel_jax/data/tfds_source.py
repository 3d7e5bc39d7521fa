"""Any TFDS dataset by name (`config.data.name = 'tfds:cifar10'`), read into memory as numpy arrays.

Offline, tfds.load retries for minutes before failing; here an unprepared dataset first checks that
the TFDS bucket is reachable (3 s) and that TensorFlow (needed to *build* most datasets) is installed,
and fails with one line otherwise. Prepared ArrayRecord data is read with `tfds.data_source`, no TF.
A dataset whose input is text (imdb_reviews: ('text', 'label')) comes back as a `TextCorpus`.
"""

import socket
from pathlib import Path

import numpy as np

from bigmodel_jax.data import Dataset, TextCorpus
from bigmodel_jax.errors import UserError

TFDS_HOST = ("storage.googleapis.com", 443)


def _reachable(host: tuple[str, int], timeout: float = 3.0) -> bool:
  try:
    socket.create_connection(host, timeout=timeout).close()
    return True
  except OSError:
    return False


def _read_split(source, input_key: str, target_key: str | None) -> tuple[list, np.ndarray]:
  inputs, targets = [], []
  for start in range(0, len(source), 4096):
    records = source.__getitems__(range(start, min(start + 4096, len(source))))
    inputs += [r[input_key] for r in records]
    targets += [r[target_key] for r in records] if target_key else []
  return inputs, np.asarray(targets, dtype=np.int32)


def _is_text(feature) -> bool:
  """tfds.features.Text or a scalar string Tensor (both build and read without TensorFlow; records hold bytes)."""
  return tuple(feature.shape) == () and np.dtype(feature.np_dtype).kind in "OSU"


def _decode(values: list) -> list[str]:
  return [v.decode("utf-8", errors="replace") if isinstance(v, bytes) else str(v) for v in values]


def load(name: str, root: Path) -> Dataset | TextCorpus:
  import tensorflow_datasets as tfds
  directory = root / "tfds"
  try:
    builder = tfds.builder(name, data_dir=directory, file_format="array_record")
  except tfds.core.registered.DatasetNotFoundError:
    raise UserError(f"config.data.name: TFDS has no dataset {name!r}; see "
                    "https://www.tensorflow.org/datasets/catalog") from None
  except (ValueError, AssertionError) as e:  # a malformed name, config or version string
    lines = [line for line in str(e).strip().splitlines() if line.strip()] or [type(e).__name__]
    raise UserError(f"config.data.name: 'tfds:{name}' is not a valid TFDS name ({lines[0][:150]}); "
                    "use tfds:<name>, tfds:<name>/<config> or tfds:<name>:<version>") from None
  if not builder.is_prepared():
    if not _reachable(TFDS_HOST):
      raise UserError(f"config.data.name: tfds:{name} is not prepared in {directory} and "
                      f"{TFDS_HOST[0]} is unreachable; prepare it on a machine with network "
                      "(`tfds build` with --file_format=array_record) and copy it there, or use a dataset "
                      "that needs no TFDS (mnist, fashion_mnist, digits; text: shakespeare_plays, spam_assassin)")
    try:
      import tensorflow  # noqa: F401  (TFDS needs it to build datasets)
    except ImportError:
      raise UserError(f"config.data.name: building tfds:{name} needs TensorFlow; "
                      "pip install 'bigmodel_jax[tfds]'") from None
    builder.download_and_prepare(file_format="array_record")
  keys, features = builder.info.supervised_keys, builder.info.features
  texts = [k for k in features if _is_text(features[k])]
  # language-modelling text (lm1b: supervised keys ('text', 'text'), or a lone text feature): documents, no labels
  lm_key = keys[0] if keys and len(set(keys)) == 1 else (texts[0] if not keys and len(texts) == 1 else None)
  if lm_key is None and (not keys or len(keys) != 2):
    raise UserError(f"config.data.name: tfds:{name} has no (input, label) supervised keys")
  splits = builder.as_data_source()
  held_out = [s for s in ("validation", "test") if s in splits]  # a published validation split is used as such
  if "train" not in splits or not held_out:
    raise UserError(f"config.data.name: tfds:{name} needs a train split and a validation or test split, has "
                    f"{list(splits)}")
  if lm_key is not None:
    docs = {s: _decode(_read_split(splits[s], lm_key, None)[0]) for s in ("train", *held_out)}
    return TextCorpus(f"tfds:{name}", train=docs["train"], test=docs.get("test"), validation=docs.get("validation"))
  input_key, target_key = keys
  read = {s: _read_split(splits[s], input_key, target_key) for s in ("train", *held_out)}
  label = builder.info.features[target_key]
  if _is_text(builder.info.features[input_key]):
    texts = {s: _decode(x) for s, (x, _) in read.items()}
    return TextCorpus(f"tfds:{name}", train=texts["train"], test=texts.get("test"), train_labels=read["train"][1],
                      test_labels=read["test"][1] if "test" in read else None, class_names=tuple(label.names),
                      validation=texts.get("validation"),
                      validation_labels=read["validation"][1] if "validation" in read else None)
  arrays = {s: {"inputs": np.stack(x), "targets": y} for s, (x, y) in read.items()}
  image = arrays["train"]["inputs"].ndim == 4
  return Dataset(f"tfds:{name}", train=arrays["train"], test=arrays.get("test"), validation=arrays.get("validation"),
                 kind="image" if image else "tabular", num_classes=int(label.num_classes),
                 class_names=tuple(label.names),
                 input_scale=255.0 if arrays["train"]["inputs"].dtype == np.uint8 else 1.0)
