"""Regression datasets: scikit-learn's diabetes and the seed's synthetic y = 3x + 4 + U(0,1)."""

from pathlib import Path

import numpy as np

from bigmodel_jax.data import DATASETS, Dataset, seeded_split


@DATASETS.register("diabetes")
def diabetes(root: Path, data_config=None) -> Dataset:
  """442 patients x 10 standardised features -> disease progression; fixed 80/20 split."""
  del root
  from sklearn.datasets import load_diabetes
  x, y = load_diabetes(return_X_y=True)
  train, test = seeded_split(len(x), 0.2)
  split = lambda idx: {"inputs": x[idx].astype(np.float32), "targets": y[idx].astype(np.float32)}
  return Dataset("diabetes", train=split(train), test=split(test), kind="tabular")


SYNTHETIC_SEED = 42


@DATASETS.register("synthetic_linear")
def synthetic_linear(root: Path, data_config=None) -> Dataset:
  """The seed's regression: x ~ U(0, 2), y = 3x + 4 + U(0, 1) noise, 100 training points (seeded).

  The noise has mean 0.5, so least squares recovers w = 3 and b = 4.5. The test and validation splits are
  100 more points each from the same law (drawn after the others, so train and test are the seed's).
  """
  del root
  rng = np.random.default_rng(SYNTHETIC_SEED)
  def draw(n):
    x = rng.uniform(0.0, 2.0, size=(n, 1)).astype(np.float32)
    y = (3.0 * x[:, 0] + 4.0 + rng.uniform(0.0, 1.0, size=n)).astype(np.float32)
    return {"inputs": x, "targets": y}
  train, test = draw(100), draw(100)
  return Dataset("synthetic_linear", train=train, test=test, validation=draw(100), kind="tabular")
