"""Metric math on host-side accumulated sums (device code only accumulates sums; see tasks/)."""

import numpy as np


def classification_metrics(confusion_TxP: np.ndarray) -> dict[str, float]:
  """Accuracy and macro precision/recall/F1 from a confusion matrix (rows = true, cols = predicted).

  Classes with no predictions (or no examples) count as 0 precision (recall), as scikit-learn's
  zero_division=0 does, and still count in the macro mean.
  """
  cm = np.asarray(confusion_TxP, dtype=np.float64)
  tp = np.diag(cm)
  predicted, actual = cm.sum(axis=0), cm.sum(axis=1)
  precision = np.divide(tp, predicted, out=np.zeros_like(tp), where=predicted > 0)
  recall = np.divide(tp, actual, out=np.zeros_like(tp), where=actual > 0)
  denom = precision + recall
  f1 = np.divide(2 * precision * recall, denom, out=np.zeros_like(tp), where=denom > 0)
  total = cm.sum()
  return {
      "accuracy": float(tp.sum() / total) if total else 0.0,
      "precision": float(precision.mean()),
      "recall": float(recall.mean()),
      "f1": float(f1.mean()),
  }


def regression_metrics(count: float, sse: float, sae: float, sum_y: float, sum_y2: float) -> dict[str, float]:
  """MSE, MAE and R^2 = 1 - SSE / SST from streaming sums."""
  sst = sum_y2 - sum_y * sum_y / count
  return {"mse": sse / count, "mae": sae / count, "r2": 1.0 - sse / sst if sst > 0 else 0.0}
