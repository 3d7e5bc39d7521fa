"""Metric math on host-side accumulated sums (device code only accumulates sums; see tasks/)."""

import warnings

import numpy as np


def classification_metrics(confusion_TxP: np.ndarray) -> dict[str, float]:
  """Accuracy and macro precision/recall/F1 from a confusion matrix (rows = true, cols = predicted).

  Classes with no predictions (or no examples) count as 0 precision (recall), as scikit-learn's
  zero_division=0 does, and still count in the macro mean. A class with neither (absent from a small split and
  never predicted) is left out of it, as scikit-learn's default labels (those of y_true and y_pred) leave it:
  counted as 0, it would put a perfect classifier's macro F1 below 1.
  """
  cm = np.asarray(confusion_TxP, dtype=np.float64)
  tp = np.diag(cm)
  predicted, actual = cm.sum(axis=0), cm.sum(axis=1)
  precision = np.divide(tp, predicted, out=np.zeros_like(tp), where=predicted > 0)
  recall = np.divide(tp, actual, out=np.zeros_like(tp), where=actual > 0)
  denom = precision + recall
  f1 = np.divide(2 * precision * recall, denom, out=np.zeros_like(tp), where=denom > 0)
  total, seen = cm.sum(), (predicted + actual) > 0
  macro = lambda x: float(x[seen].mean()) if seen.any() else 0.0
  return {
      "accuracy": float(tp.sum() / total) if total else 0.0,
      "precision": macro(precision),
      "recall": macro(recall),
      "f1": macro(f1),
  }


def regression_metrics(count: float, sse: float, sae: float, sum_y: float, sum_y2: float) -> dict[str, float]:
  """MSE, MAE and R^2 = 1 - SSE / SST from streaming sums."""
  sst = sum_y2 - sum_y * sum_y / count
  return {"mse": sse / count, "mae": sae / count, "r2": 1.0 - sse / sst if sst > 0 else 0.0}


def classifier_score(mean_p_C: np.ndarray, mean_plogp: float) -> float:
  """exp E_x[KL(p(y|x) || p(y))] (the Inception Score formula) from E[p(y|x)] and E[sum_y p log p]."""
  p = np.asarray(mean_p_C, np.float64)
  marginal = float((p * np.log(np.maximum(p, 1e-30))).sum())
  return float(np.exp(mean_plogp - marginal))


def gaussian_from_moments(n: float, sum_F: np.ndarray, outer_FxF: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """Mean and (unbiased) covariance of features from their count, sum and sum of outer products."""
  mean = sum_F / n
  cov = (outer_FxF - n * np.outer(mean, mean)) / max(n - 1.0, 1.0)
  return mean, cov


def frechet_distance(mu1, cov1, mu2, cov2) -> float:
  """||mu1 - mu2||^2 + tr(cov1 + cov2 - 2 (cov1 cov2)^1/2) between two Gaussians (the FID formula)."""
  from scipy import linalg
  with warnings.catch_warnings():  # a singular product is handled below
    warnings.simplefilter("ignore")
    root = linalg.sqrtm(cov1 @ cov2)
  if not np.isfinite(root).all():  # a singular product: nudge both, as the FID reference code does
    offset = np.eye(len(cov1)) * 1e-6
    with warnings.catch_warnings():
      warnings.simplefilter("ignore")
      root = linalg.sqrtm((cov1 + offset) @ (cov2 + offset))
  root = np.real(root)
  return float(((mu1 - mu2) ** 2).sum() + np.trace(cov1) + np.trace(cov2) - 2.0 * np.trace(root))
