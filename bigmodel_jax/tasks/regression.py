"""Scalar regression with mean squared error: MSE, MAE and R^2."""

import jax.numpy as jnp

from bigmodel_jax import metrics
from bigmodel_jax.errors import UserError
from bigmodel_jax.tasks import TASKS, SupervisedTask


@TASKS.register("regression")
class Regression(SupervisedTask):
  metric_names = ("mse", "mae", "r2", "loss")

  def __init__(self, config, dataset):
    if dataset.is_text:
      raise UserError(f"config.task.name: 'regression' needs real-valued targets; {dataset.name!r} is text "
                      f"(use task {'language_modeling' if dataset.is_token_stream else 'classification'!r})")
    if dataset.num_classes:
      raise UserError(f"config.task.name: 'regression' needs real-valued targets; {dataset.name!r} "
                      "has class labels (use task 'classification')")

  num_outputs = 1

  def output_shape(self, input_shape) -> tuple[int, ...]:
    return (1,)

  def train_loss(self, outputs_Bx1, batch):
    mask = batch["mask"]
    err = outputs_Bx1[:, 0] - batch["targets"]
    mse = (err ** 2 * mask).sum() / jnp.maximum(mask.sum(), 1.0)
    return mse, {"loss": mse}

  def eval_sums(self, outputs_Bx1, batch):
    mask, y = batch["mask"], batch["targets"]
    err = outputs_Bx1[:, 0] - y
    return {"count": mask.sum(), "sse": (err ** 2 * mask).sum(), "sae": (jnp.abs(err) * mask).sum(),
            "sum_y": (y * mask).sum(), "sum_y2": (y ** 2 * mask).sum()}

  def finalize(self, sums, split: str = "test") -> dict:
    s = {k: float(v) for k, v in sums.items()}
    out = metrics.regression_metrics(s["count"], s["sse"], s["sae"], s["sum_y"], s["sum_y2"])
    return {"loss": out["mse"], **out}

  def predict(self, outputs_Bx1):
    return {"prediction": outputs_Bx1[:, 0]}
