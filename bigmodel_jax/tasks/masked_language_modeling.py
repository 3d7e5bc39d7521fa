"""BERT's masked language modelling: 15% of the tokens selected, 80% of those replaced by [MASK], 10% by a random
token, 10% kept; the loss and accuracy count the selected positions only.

Inputs are padded token ids (0 = padding, never selected): a text classification dataset's rows (its labels
unused) or a corpus' windows. Training draws the selection per example from the step's key; evaluation uses a
fixed selection per example (seeded by its index in the split), so every evaluation scores the same positions.
The [MASK] id is the tokenizer's (`config.data.tokenizer.mask_token=True`), and a classifier initialised from
the run (config.init) reads its text with the same tokenizer.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax

from bigmodel_jax.errors import UserError
from bigmodel_jax.tasks import TASKS, SupervisedTask, Task

EVAL_SEED = 0  # the evaluation selection: fold_in(PRNGKey(EVAL_SEED), index of the example in its split)


@TASKS.register("masked_language_modeling")
class MaskedLanguageModeling(Task):
  metric_names = ("loss", "accuracy", "perplexity")

  def __init__(self, config, dataset):
    if not dataset.is_text:
      raise UserError(f"config.task.name: 'masked_language_modeling' needs text (e.g. spam_assassin, "
                      f"shakespeare_plays); {dataset.name!r} is {dataset.kind} data")
    mask_id = getattr(dataset.tokenizer, "mask_id", None)
    if mask_id is None:
      raise UserError("config.data.tokenizer.mask_token: masked language modelling needs a [MASK] id; use "
                      "--config.data.tokenizer.name=sentencepiece --config.data.tokenizer.mask_token=True")
    t = config.task
    self.mask_rate = float(t.get("mask_rate", 0.15))
    self.mask_id = mask_id
    self.num_outputs = dataset.vocab_size
    # random replacements are ordinary tokens: never padding, unknown or [MASK]
    special = set(dataset.tokenizer.special_ids) | {mask_id}
    self.replacements = np.array([i for i in range(dataset.vocab_size) if i not in special], np.int32)

  def output_shape(self, input_shape) -> tuple[int, ...]:
    return (input_shape[0], self.num_outputs)  # logits at every position

  def corrupt(self, tokens_BxL, keys_Bx2, weights_B):
    """-> (inputs with the selection replaced, selected B x L as float weights)."""
    def one(tokens_L, key):
      k_select, k_kind, k_token = jax.random.split(key, 3)
      select = jax.random.uniform(k_select, tokens_L.shape) < self.mask_rate
      kind = jax.random.uniform(k_kind, tokens_L.shape)
      random = jnp.asarray(self.replacements)[jax.random.randint(k_token, tokens_L.shape, 0, len(self.replacements))]
      return select, kind, random
    select, kind, random = jax.vmap(one)(tokens_BxL, keys_Bx2)
    select = select & (tokens_BxL != 0)
    inputs = jnp.where(select & (kind < 0.8), self.mask_id, jnp.where(select & (kind < 0.9), random, tokens_BxL))
    return inputs.astype(tokens_BxL.dtype), select.astype(jnp.float32) * weights_B[:, None]

  def _sums(self, model, batch, keys, *, train, rngs=None):
    tokens = batch["inputs"].astype(jnp.int32)
    inputs, weights = self.corrupt(tokens, keys, batch["mask"])
    logits = model(inputs, train=train, rngs=rngs).astype(jnp.float32)
    losses = optax.softmax_cross_entropy_with_integer_labels(logits, tokens)
    correct = jnp.argmax(logits, -1) == tokens
    return {"loss": (losses * weights).sum(), "correct": (correct * weights).sum(), "count": weights.sum()}

  update = SupervisedTask.update  # gradients of `loss` over the batch, then the optimizer steps

  def loss(self, model, batch, rngs):
    sums = self._sums(model, batch, rngs.mask(), train=True, rngs=rngs)
    count = jnp.maximum(sums["count"], 1.0)
    loss = sums["loss"] / count
    return loss, {"loss": loss, "accuracy": sums["correct"] / count, "perplexity": jnp.exp(loss)}

  def evaluate_batch(self, model, batch):
    keys = jax.vmap(lambda i: jax.random.fold_in(jax.random.PRNGKey(EVAL_SEED), i))(batch["index"])
    return self._sums(model, batch, keys, train=False)

  def finalize(self, sums, split: str = "test") -> dict:
    loss = float(sums["loss"] / max(float(sums["count"]), 1.0))
    return {"loss": loss, "perplexity": math.exp(min(loss, 700.0)),
            "accuracy": float(sums["correct"] / max(float(sums["count"]), 1.0))}

  def predict_batch(self, model, batch):
    raise UserError("--mode=predict is for classifiers and regressors; a masked language model is scored by "
                    "--mode=eval (masked-token loss and accuracy), and fine-tuned by a classifier with "
                    "config.init.workdir")
