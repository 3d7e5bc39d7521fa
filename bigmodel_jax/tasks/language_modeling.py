"""Next-token prediction: masked cross-entropy, perplexity, bits per character, token accuracy."""

import math

import jax.numpy as jnp
import optax

from bigmodel_jax.errors import UserError
from bigmodel_jax.tasks import TASKS, SupervisedTask


@TASKS.register("language_modeling")
class LanguageModeling(SupervisedTask):
  metric_names = ("loss", "perplexity", "bits_per_char", "accuracy")

  def __init__(self, config, dataset):
    if not dataset.is_token_stream:
      hint = " (use task 'classification')" if dataset.num_classes else ""
      raise UserError(f"config.task.name: 'language_modeling' needs a text corpus (e.g. tiny_shakespeare, "
                      f"shakespeare_plays); {dataset.name!r} is not one ({dataset.kind} data){hint}")
    self.num_outputs = dataset.vocab_size
    self.chars_per_token = dict(dataset.chars_per_token)  # split -> chars per token (1 for a character tokenizer)

  def output_shape(self, input_shape) -> tuple[int, ...]:
    return (input_shape[0], self.num_outputs)  # next-token logits at every position

  @staticmethod
  def _weights(batch):
    """Per-token weights B x T: padding rows (mask) and the padded tail of the last eval window count 0."""
    weights = jnp.broadcast_to(batch["mask"][:, None], batch["targets"].shape)
    return weights * batch["token_mask"] if "token_mask" in batch else weights

  def _sums(self, logits_BxTxV, batch):
    weights = self._weights(batch)
    losses = optax.softmax_cross_entropy_with_integer_labels(logits_BxTxV.astype(jnp.float32), batch["targets"])
    correct = (jnp.argmax(logits_BxTxV, -1) == batch["targets"])
    return {"loss": (losses * weights).sum(), "correct": (correct * weights).sum(), "count": weights.sum()}

  def train_loss(self, logits_BxTxV, batch):
    """Mean next-token loss of the batch; its metrics are measured in training mode (with dropout)."""
    sums = self._sums(logits_BxTxV, batch)
    count = jnp.maximum(sums["count"], 1.0)
    loss = sums["loss"] / count
    return loss, {"loss": loss, "accuracy": sums["correct"] / count, "perplexity": jnp.exp(loss),
                  "bits_per_char": loss / math.log(2) / self.chars_per_token.get("train", 1.0)}

  def eval_sums(self, logits_BxTxV, batch):
    return self._sums(logits_BxTxV, batch)

  def finalize(self, sums, split: str = "test") -> dict:
    loss = float(sums["loss"] / sums["count"])
    return {"loss": loss, "perplexity": math.exp(min(loss, 700.0)),
            "bits_per_char": loss / math.log(2) / self.chars_per_token.get(split, 1.0),
            "accuracy": float(sums["correct"] / sums["count"])}

  def predict(self, logits_BxTxV):
    raise UserError("--mode=predict is for classifiers and regressors; a language model generates text with "
                    "--mode=sample")

  def sample(self, run, model, step: int) -> dict:
    from bigmodel_jax import sample
    return sample.sample_text(run, model, step)
