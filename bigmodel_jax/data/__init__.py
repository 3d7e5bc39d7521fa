"""Datasets by name: `config.data.name` -> a `Dataset` of in-memory numpy arrays.

Add a dataset with one function registered in `DATASETS`; `tfds:<name>` reaches any TFDS dataset.
"""

import dataclasses

import numpy as np

from bigmodel_jax.registry import Registry

DATASETS: Registry = Registry("dataset", "config.data.name")


@dataclasses.dataclass(eq=False)  # hashable by identity, so per-dataset results can be cached
class Dataset:
  """A real dataset held in memory. Splits are {'inputs': N x ..., 'targets': N} numpy arrays."""
  name: str
  train: dict[str, np.ndarray]
  test: dict[str, np.ndarray]
  kind: str  # 'image' (N,H,W,C) or 'tabular' (N,D)
  num_classes: int = 0  # 0 = regression
  class_names: tuple[str, ...] = ()
  input_scale: float = 1.0  # divide raw inputs by this for [0, 1] (255 for uint8 images)

  @property
  def input_shape(self) -> tuple[int, ...]:
    return tuple(self.train["inputs"].shape[1:])

  def split(self, name: str) -> dict[str, np.ndarray]:
    return {"train": self.train, "test": self.test}[name]


def load_dataset(data_config) -> Dataset:
  """Builds the dataset named by config.data.name (fetching files into the data dir if needed)."""
  from bigmodel_jax.data import fetch, tfds_source  # tfds_source imports tensorflow_datasets: only when used
  name = data_config.name
  root = fetch.data_dir(data_config.get("data_dir", ""))
  if name.startswith("tfds:"):
    return tfds_source.load(name.removeprefix("tfds:"), root)
  return DATASETS.get(name)(root)


def seeded_split(n: int, test_fraction: float, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
  """A fixed train/test split of n examples (independent of the experiment seed, so test sets never move)."""
  order = np.random.default_rng(seed).permutation(n)
  n_test = int(round(n * test_fraction))
  return np.sort(order[n_test:]), np.sort(order[:n_test])


from bigmodel_jax.data import images, tabular  # noqa: E402,F401  (each registers its datasets)
