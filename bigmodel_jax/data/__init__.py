"""Datasets by name: `config.data.name` -> a `Dataset` of in-memory numpy arrays.

Add a dataset with one function `fn(root, data_config)` registered in `DATASETS`, returning a `Dataset`
(arrays) or a `TextCorpus` (raw text, tokenized here by config.data.tokenizer); `tfds:<name>` reaches
any TFDS dataset.
"""

import dataclasses
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from bigmodel_jax.registry import Registry, import_submodules

DATASETS: Registry = Registry("dataset", "config.data.name")


@dataclasses.dataclass(eq=False)  # hashable by identity, so per-dataset results can be cached
class Dataset:
  """A real dataset held in memory. Splits are {'inputs': N x ..., 'targets': N} numpy arrays."""
  name: str
  train: dict[str, np.ndarray]
  test: dict[str, np.ndarray]
  kind: str  # 'image' (N,H,W,C), 'tabular' (N,D), 'text' (N,L token ids, 0 = padding) or 'lm' (see below)
  num_classes: int = 0  # 0 = regression (or language modelling)
  class_names: tuple[str, ...] = ()
  input_scale: float = 1.0  # divide raw inputs by this for [0, 1] (255 for uint8 images)
  # Text: the tokenizer that made the ids, its vocabulary size, and characters per token of the test
  # split (for bits per character). 'lm' datasets hold train = {'tokens': 1-D stream} (batches are random
  # windows of it) and test = {'inputs','targets','token_mask'}: the stream cut into consecutive windows.
  tokenizer: Any = None
  vocab_size: int = 0
  chars_per_token: float = 1.0
  test_texts: Sequence[str] = ()  # raw text of each test example (text classification), for predictions.csv

  @property
  def input_shape(self) -> tuple[int, ...]:
    split = self.train if "inputs" in self.train else self.test
    return tuple(split["inputs"].shape[1:])

  @property
  def is_text(self) -> bool:
    """Inputs are token ids (text classification or language modelling), not values to normalise."""
    return self.kind in ("text", "lm")

  @property
  def is_token_stream(self) -> bool:
    """A language-modelling corpus: train is one token stream cut into random windows."""
    return self.kind == "lm"

  @property
  def is_image(self) -> bool:
    return self.kind == "image"

  @property
  def input_dtype(self):
    return self.test["inputs"].dtype if self.is_text else np.float32

  def num_examples(self, split: str = "train") -> int:
    arrays = self.split(split)
    return len(arrays["tokens"] if "tokens" in arrays else arrays["targets"])

  def split(self, name: str) -> dict[str, np.ndarray]:
    return {"train": self.train, "test": self.test}[name]


@dataclasses.dataclass(eq=False)
class TextCorpus:
  """A text dataset before tokenization: documents (language modelling) or labelled examples."""
  name: str
  train: list[str]  # LM: documents, concatenated in order; classification: one string per example
  test: list[str]
  train_labels: np.ndarray | None = None  # int32 class ids (classification); None for language modelling
  test_labels: np.ndarray | None = None
  class_names: tuple[str, ...] = ()


def load_dataset(data_config, tokenizer_dir: Path | None = None, create_tokenizer: bool = True) -> Dataset:
  """Builds the dataset named by config.data.name (fetching files into the data dir if needed).

  Text is tokenized by config.data.tokenizer; the tokenizer is kept in `tokenizer_dir` (a run's
  workdir/tokenizer) so eval, sampling and resume use the same one. `create_tokenizer` (a run's first
  training launch) trains (subword) or builds (char) it and saves it there; otherwise it must exist.
  """
  from bigmodel_jax.data import fetch, tfds_source  # tfds_source imports tensorflow_datasets: only when used
  name = data_config.name
  root = fetch.data_dir(data_config.get("data_dir", ""))
  if name.startswith("tfds:"):
    loaded = tfds_source.load(name.removeprefix("tfds:"), root)
  else:
    loaded = DATASETS.get(name)(root, data_config)
  if isinstance(loaded, TextCorpus):
    from bigmodel_jax.data import corpus
    return corpus.tokenize(loaded, data_config, tokenizer_dir, create_tokenizer)
  return loaded


def seeded_split(n: int, test_fraction: float, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
  """A fixed train/test split of n examples (independent of the experiment seed, so test sets never move)."""
  order = np.random.default_rng(seed).permutation(n)
  n_test = int(round(n * test_fraction))
  return np.sort(order[n_test:]), np.sort(order[:n_test])


import_submodules(__name__)  # every module of this package registers its datasets
