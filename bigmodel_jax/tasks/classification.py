"""Softmax cross-entropy classification: accuracy, macro precision/recall/F1, confusion matrix."""

import jax
import jax.numpy as jnp
import numpy as np
import optax

from bigmodel_jax import metrics
from bigmodel_jax.errors import UserError
from bigmodel_jax.tasks import SupervisedTask, TASKS, require_padding_0


@TASKS.register("classification")
class Classification(SupervisedTask):
  metric_names = ("accuracy", "precision", "recall", "f1", "loss")

  def __init__(self, config, dataset):
    if dataset.num_classes < 2:
      kind, task = (("a text corpus", "language_modeling") if dataset.is_token_stream else ("a regression set", "regression"))
      raise UserError(f"config.task.name: 'classification' needs a labelled dataset; "
                      f"{dataset.name!r} is {kind} (use task {task!r})")
    if dataset.kind == "text":
      require_padding_0(dataset, "classification")
    self.num_classes = dataset.num_classes
    self.label_smoothing = config.task.get("label_smoothing", 0.0)

  @property
  def num_outputs(self) -> int:
    return self.num_classes

  def output_shape(self, input_shape) -> tuple[int, ...]:
    return (self.num_classes,)  # one row of logits per example

  def train_loss(self, logits_BxC, batch):
    labels = jax.nn.one_hot(batch["targets"], self.num_classes)
    if self.label_smoothing:
      labels = optax.smooth_labels(labels, self.label_smoothing)
    mask = batch["mask"]
    count = jnp.maximum(mask.sum(), 1.0)
    loss = (optax.softmax_cross_entropy(logits_BxC, labels) * mask).sum() / count
    correct = (jnp.argmax(logits_BxC, -1) == batch["targets"]) * mask
    return loss, {"loss": loss, "accuracy": correct.sum() / count}

  def eval_sums(self, logits_BxC, batch):
    mask = batch["mask"]
    losses = optax.softmax_cross_entropy_with_integer_labels(logits_BxC, batch["targets"])
    true = jax.nn.one_hot(batch["targets"], self.num_classes) * mask[:, None]
    pred = jax.nn.one_hot(jnp.argmax(logits_BxC, -1), self.num_classes)
    return {"loss": (losses * mask).sum(), "count": mask.sum(),
            "confusion": jnp.einsum("bt,bp->tp", true, pred)}

  def finalize(self, sums, split: str = "test") -> dict:
    out = {"loss": float(sums["loss"] / sums["count"])}
    out.update(metrics.classification_metrics(sums["confusion"]))
    out["confusion_matrix"] = np.asarray(sums["confusion"]).astype(int).tolist()
    return out

  def predict(self, logits_BxC):
    probs = jax.nn.softmax(logits_BxC.astype(jnp.float32), -1)
    return {"prediction": jnp.argmax(probs, -1), "probability": probs}
