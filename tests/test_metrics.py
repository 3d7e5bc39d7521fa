"""metrics.py against independent references (scikit-learn, numpy), and the classification task's masking."""

import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from sklearn import metrics as skm

from bigmodel_jax import metrics
from bigmodel_jax.data import load_dataset
from bigmodel_jax.tasks import get_task

# rows = true class, cols = predicted class. Class 3 is never predicted (its column is all zero),
# so its precision is 0/0 (counted as 0, as zero_division=0) and its recall and F1 are 0.
CONFUSION = np.array([
    [5, 1, 2, 0],
    [0, 7, 1, 0],
    [3, 0, 4, 0],
    [1, 2, 1, 0],
])


def expand(confusion):
  """A confusion matrix -> the y_true / y_pred label lists it counts."""
  y_true, y_pred = [], []
  for t, row in enumerate(confusion):
    for p, count in enumerate(row):
      y_true += [t] * int(count)
      y_pred += [p] * int(count)
  return np.array(y_true), np.array(y_pred)


def test_classification_metrics_match_sklearn():
  y_true, y_pred = expand(CONFUSION)
  assert (skm.confusion_matrix(y_true, y_pred, labels=range(4)) == CONFUSION).all()  # the expansion is right
  precision, recall, f1, _ = skm.precision_recall_fscore_support(
      y_true, y_pred, labels=range(4), average="macro", zero_division=0)

  got = metrics.classification_metrics(CONFUSION)

  assert got["accuracy"] == pytest.approx(skm.accuracy_score(y_true, y_pred), abs=1e-12)
  assert got["precision"] == pytest.approx(precision, abs=1e-12)
  assert got["recall"] == pytest.approx(recall, abs=1e-12)
  assert got["f1"] == pytest.approx(f1, abs=1e-12)
  assert got["accuracy"] == pytest.approx(16 / 27)  # a hand check of the reference itself


def test_a_class_absent_from_the_split_and_never_predicted_is_left_out_of_the_macro_means():
  """A small validation split may lack a class: a perfect classifier there has macro F1 1 (scikit-learn's default
  labels, those seen in y_true or y_pred), not (C - 1) / C."""
  perfect = np.diag([3, 2, 0, 4]).astype(float)
  got = metrics.classification_metrics(perfect)
  assert got == pytest.approx({"accuracy": 1.0, "precision": 1.0, "recall": 1.0, "f1": 1.0})
  confusion = np.array([[5, 1, 0, 0], [0, 7, 0, 1], [0, 0, 0, 0], [1, 2, 0, 3]])  # class 2: no example, no prediction
  y_true, y_pred = expand(confusion)
  precision, recall, f1, _ = skm.precision_recall_fscore_support(y_true, y_pred, average="macro", zero_division=0)
  got = metrics.classification_metrics(confusion)
  assert (got["precision"], got["recall"], got["f1"]) == pytest.approx((precision, recall, f1), abs=1e-12)


def test_regression_metrics_match_numpy_and_sklearn():
  rng = np.random.default_rng(0)
  y = rng.normal(3.0, 2.0, size=200)
  pred = y + rng.normal(0.5, 1.0, size=200)
  err = pred - y

  got = metrics.regression_metrics(len(y), float((err ** 2).sum()), float(np.abs(err).sum()),
                                   float(y.sum()), float((y ** 2).sum()))

  assert got["mse"] == pytest.approx(np.mean(err ** 2), rel=1e-10)
  assert got["mae"] == pytest.approx(np.mean(np.abs(err)), rel=1e-10)
  assert got["r2"] == pytest.approx(skm.r2_score(y, pred), rel=1e-8)


@pytest.fixture(scope="module")
def classification(tmp_path_factory):
  dataset = load_dataset(ml_collections.ConfigDict(dict(name="digits", data_dir=str(tmp_path_factory.mktemp("d")))))
  return get_task(ml_collections.ConfigDict(dict(task=dict(name="classification", label_smoothing=0.0))), dataset)


def test_classification_eval_ignores_padding_rows(classification):
  assert classification.num_outputs == 10
  rng = np.random.default_rng(1)
  logits = rng.normal(size=(5, 10)).astype(np.float32)
  targets = np.array([3, 1, 4, 1, 5], np.int32)
  logits[0, 3] = 10.0  # row 0 right, the rest most likely wrong
  logits[4, 9] = -50.0  # the padding row: huge loss and a wrong prediction if it were counted
  logits[4, 0] = 50.0
  mask = np.array([1, 1, 1, 1, 0], np.float32)

  padded = classification.finalize(classification.eval_sums(
      jnp.asarray(logits), {"targets": jnp.asarray(targets), "mask": jnp.asarray(mask)}))
  real = classification.finalize(classification.eval_sums(
      jnp.asarray(logits[:4]), {"targets": jnp.asarray(targets[:4]), "mask": jnp.ones(4, jnp.float32)}))

  # independent reference over the 4 real rows only
  log_probs = logits[:4] - np.log(np.exp(logits[:4]).sum(-1, keepdims=True))
  ref_loss = -log_probs[np.arange(4), targets[:4]].mean()
  pred = logits[:4].argmax(-1)
  assert padded["loss"] == pytest.approx(ref_loss, rel=1e-5)
  assert padded["accuracy"] == pytest.approx(skm.accuracy_score(targets[:4], pred))
  confusion = np.array(padded["confusion_matrix"])
  assert confusion.shape == (10, 10) and confusion.sum() == 4
  assert (confusion == skm.confusion_matrix(targets[:4], pred, labels=range(10))).all()
  for key in ("loss", "accuracy", "precision", "recall", "f1"):
    assert padded[key] == pytest.approx(real[key], rel=1e-6), key


def test_a_logged_train_perplexity_is_exp_of_the_windows_mean_loss():
  """Was: the mean of each step's exp(loss) (and within a step, of each microbatch's or pmap replica's), which is
  not the perplexity of the mean loss that the same record logs beside it."""
  from bigmodel_jax.train_metrics import summarize
  steps = [(1, {"loss": 1.0, "perplexity": np.exp(1.0)}), (2, {"loss": 3.0, "perplexity": np.exp(3.0)})]
  out = summarize(steps, seconds=1.0, global_batch=4)
  assert out["loss"] == 2.0 and out["perplexity"] == pytest.approx(np.exp(2.0), rel=1e-12)
  assert summarize([(1, {"loss": 0.5, "accuracy": 0.25})], 1.0, 4).keys() >= {"loss", "accuracy"}  # no perplexity
