"""Datasets by name: `config.data.name` -> a `Dataset` of in-memory numpy arrays.

Add a dataset with one function `fn(root, data_config)` registered in `DATASETS`, returning a `Dataset`
(arrays) or a `TextCorpus` (raw text, tokenized here by config.data.tokenizer); `tfds:<name>` reaches
any TFDS dataset.

Splits: train, validation and test. A dataset gives its published validation split where it has one; otherwise
`load_dataset` holds out config.data.validation_fraction of the training split as a fixed seeded slice
(VALIDATION_SEED, never config.seed: it does not move between runs or sweep trials). Model selection reads
validation; test is only reported. A dataset may have no test split (tiny_shakespeare: nanoGPT's 90/10).
"""

import dataclasses
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from bigmodel_jax.errors import UserError
from bigmodel_jax.registry import Registry, import_submodules

DATASETS: Registry = Registry("dataset", "config.data.name")
VALIDATION_SEED = 1  # the held-out validation slice of a training split (test splits carved by seeded_split use 0)
TRAIN_FRACTION_SEED = 2  # the subset config.data.train_fraction keeps (not config.seed: the same rows for every seed)
EVAL_SPLITS = ("validation", "test")


@dataclasses.dataclass(eq=False)  # hashable by identity, so per-dataset results can be cached
class Dataset:
  """A real dataset held in memory. Splits are {'inputs': N x ..., 'targets': N} numpy arrays (None: no such split)."""
  name: str
  train: dict[str, np.ndarray]
  test: dict[str, np.ndarray] | None
  kind: str  # 'image' (N,H,W,C), 'tabular' (N,D), 'text' (N,L token ids, 0 = padding) or 'lm' (see below)
  num_classes: int = 0  # 0 = regression (or language modelling)
  class_names: tuple[str, ...] = ()
  input_scale: float = 1.0  # divide raw inputs by this for [0, 1] (255 for uint8 images)
  # Text: the tokenizer that made the ids, its vocabulary size, and characters per token of each split (for
  # bits per character). 'lm' datasets hold train = {'tokens': 1-D stream} (batches are random windows of it)
  # and validation/test = {'inputs','targets','token_mask'}: the stream cut into consecutive windows.
  tokenizer: Any = None
  vocab_size: int = 0
  chars_per_token: dict[str, float] = dataclasses.field(default_factory=dict)  # split -> chars/token (default 1)
  test_texts: Sequence[str] = ()  # raw text of each test example (text classification), for predictions.csv
  validation: dict[str, np.ndarray] | None = None
  fingerprint: dict = dataclasses.field(default_factory=dict)  # the files or arrays it came from (fingerprint.py)
  held_out: float = 0.0  # the share of the loaded training data held out as validation (0: a published split, none)

  @property
  def eval_splits(self) -> tuple[str, ...]:
    """The held-out splits this dataset has: validation and/or test."""
    return tuple(s for s in EVAL_SPLITS if getattr(self, s) is not None)

  @property
  def input_shape(self) -> tuple[int, ...]:
    split = self.train if "inputs" in self.train else self.split(self.eval_splits[0])
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
    return self.split(self.eval_splits[0])["inputs"].dtype if self.is_text else np.float32

  def num_examples(self, split: str = "train") -> int:
    arrays = self.split(split)
    return len(arrays["tokens"] if "tokens" in arrays else arrays["targets"])

  def split(self, name: str) -> dict[str, np.ndarray]:
    arrays = {"train": self.train, "validation": self.validation, "test": self.test}.get(name)
    if arrays is None:
      raise UserError(f"dataset {self.name} has no {name!r} split (it has: train, {', '.join(self.eval_splits)})")
    return arrays

  def hold_out_validation(self, fraction: float) -> "Dataset":
    """The training split less a fixed seeded `fraction` of it, which becomes the validation split."""
    if self.validation is not None or fraction <= 0:
      return self
    train, val = seeded_split(self.num_examples("train"), fraction, VALIDATION_SEED)
    if len(train) == 0 or len(val) == 0:
      raise UserError(f"config.data.validation_fraction: {fraction} of the {self.num_examples('train')} training "
                      f"examples of {self.name} leaves {len(train)} to train on and {len(val)} to validate on; "
                      "pick a fraction that leaves both non-empty")
    return dataclasses.replace(self, train={k: v[train] for k, v in self.train.items()},
                               validation={k: v[val] for k, v in self.train.items()}, held_out=fraction)

  def take_train_fraction(self, fraction: float) -> "Dataset":
    """The training split cut to a fixed seeded `fraction` of its examples (a token stream: its first `fraction`)."""
    if fraction >= 1:
      return self
    n = self.num_examples("train")
    if "tokens" in self.train:
      keep = int(n * fraction)
      train = {"tokens": self.train["tokens"][:keep]}
      window = self.input_shape[0] + 1 if self.eval_splits else 1
      if keep < window:
        raise UserError(f"config.data.train_fraction: {fraction} of the {n} training tokens of {self.name} keeps "
                        f"{keep}, fewer than one window of data.seq_len + 1 = {window}; raise it")
    else:
      keep = int(round(n * fraction))
      rows = np.sort(np.random.default_rng(TRAIN_FRACTION_SEED).permutation(n)[:keep])
      train = {k: v[rows] for k, v in self.train.items()}
    if keep == 0:
      raise UserError(f"config.data.train_fraction: {fraction} of the {n} training examples of {self.name} is none; "
                      "raise it")
    return dataclasses.replace(self, train=train)


@dataclasses.dataclass(eq=False)
class TextCorpus:
  """A text dataset before tokenization: documents (language modelling) or labelled examples."""
  name: str
  train: list[str]  # LM: documents, concatenated in order; classification: one string per example
  test: list[str] | None  # None: no test split
  train_labels: np.ndarray | None = None  # int32 class ids (classification); None for language modelling
  test_labels: np.ndarray | None = None
  class_names: tuple[str, ...] = ()
  validation: list[str] | None = None  # the published validation split, else held out by hold_out_validation
  validation_labels: np.ndarray | None = None
  held_out: float = 0.0  # as Dataset.held_out (a text file's last data.validation_fraction included)

  def hold_out_validation(self, fraction: float) -> "TextCorpus":
    """A fixed seeded `fraction` of the training examples (documents) as the validation split; a language-model
    corpus of one document (a text file) gives the last `fraction` of its text instead."""
    if self.validation is not None or fraction <= 0:
      return self
    if self.train_labels is None and len(self.train) == 1:
      text = self.train[0]
      k = int(len(text) * (1 - fraction))
      return dataclasses.replace(self, train=[text[:k]], validation=[text[k:]], held_out=fraction)
    train, val = seeded_split(len(self.train), fraction, VALIDATION_SEED)
    if len(train) == 0 or len(val) == 0:
      raise UserError(f"config.data.validation_fraction: {fraction} of the {len(self.train)} training examples of "
                      f"{self.name} leaves {len(train)} to train on and {len(val)} to validate on; pick a fraction "
                      "that leaves both non-empty")
    labels = self.train_labels
    return dataclasses.replace(self, train=[self.train[i] for i in train], validation=[self.train[i] for i in val],
                               train_labels=None if labels is None else labels[train],
                               validation_labels=None if labels is None else labels[val], held_out=fraction)


def load_dataset(data_config, tokenizer_dir: Path | None = None, create_tokenizer: bool = True) -> Dataset:
  """Builds the dataset named by config.data.name (fetching files into the data dir if needed).

  Text is tokenized by config.data.tokenizer; the tokenizer is kept in `tokenizer_dir` (a run's
  workdir/tokenizer) so eval, sampling and resume use the same one. `create_tokenizer` (a run's first
  training launch) trains (subword) or builds (char) it and saves it there; otherwise it must exist.
  """
  from bigmodel_jax.data import fetch, fingerprint, tfds_source  # tfds_source imports tensorflow_datasets lazily
  name = data_config.name
  root = fetch.data_dir(data_config.get("data_dir", ""))
  try:
    with fingerprint.recording() as files:  # what it read, for the run's data_fingerprint.json
      if name.startswith("tfds:"):
        loaded = tfds_source.load(name.removeprefix("tfds:"), root)
      else:
        loaded = DATASETS.get(name)(root, data_config)
  except NotADirectoryError as e:  # the data dir is a file (datasets that never read it, e.g. digits, do not care)
    raise fetch.not_a_directory(root, data_config.get("data_dir", "")) or e from None
  digests = fingerprint.of_loaded(loaded, files)
  loaded = loaded.hold_out_validation(data_config.get("validation_fraction", 0.0))
  held_out = loaded.held_out
  if data_config.get("as_corpus", False):
    loaded = as_corpus(loaded)
  if isinstance(loaded, TextCorpus):
    from bigmodel_jax.data import corpus
    loaded = corpus.tokenize(loaded, data_config, tokenizer_dir, create_tokenizer)
  loaded = loaded.take_train_fraction(data_config.get("train_fraction", 1.0))  # the tokenizer learnt from all of it
  loaded.fingerprint, loaded.held_out = digests, held_out
  return loaded


def as_corpus(loaded) -> "TextCorpus":
  """A labelled text dataset's documents as an unlabelled corpus (config.data.as_corpus): each split one stream of
  its documents, for pretraining on a dataset's own text (its training split only; held-out splits stay held out)."""
  if not isinstance(loaded, TextCorpus):
    raise UserError(f"config.data.as_corpus: {loaded.name} is not a text dataset; use it with a text dataset such "
                    "as spam_assassin")
  return dataclasses.replace(loaded, train_labels=None, test_labels=None, validation_labels=None, class_names=())


def seeded_split(n: int, test_fraction: float, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
  """A fixed train/test split of n examples (independent of the experiment seed, so test sets never move)."""
  order = np.random.default_rng(seed).permutation(n)
  n_test = int(round(n * test_fraction))
  return np.sort(order[n_test:]), np.sort(order[:n_test])


import_submodules(__name__)  # every module of this package registers its datasets
