"""BERT's masked language modelling: 15% of each example's tokens selected, 80% of those replaced by [MASK], 10% by
a random token, 10% kept; the loss and accuracy count the selected positions only, and the model projects only
those onto the vocabulary (encoder_mlm's positions_BxP).

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
from bigmodel_jax.tasks import TASKS, SupervisedTask, Task, require_padding_0

EVAL_SEED = 0  # the evaluation selection: fold_in(PRNGKey(EVAL_SEED), index of the example in its split)
USE = ("a masked language model is scored by --mode=eval (masked-token loss and accuracy), and fine-tuned by a "
       "classifier with config.init.workdir")  # what --mode=predict and --mode=sample say instead


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
    require_padding_0(dataset, "masked_language_modeling")
    t = config.task
    self.mask_rate = float(t.get("mask_rate", 0.15))
    self.mask_id = mask_id
    self.num_outputs = dataset.vocab_size
    # random replacements are ordinary tokens: never padding, unknown or [MASK]
    special = set(dataset.tokenizer.special_ids) | {mask_id}
    self.replacements = np.array([i for i in range(dataset.vocab_size) if i not in special], np.int32)

  def output_shape(self, input_shape) -> tuple[int, ...]:
    return (input_shape[0], self.num_outputs)  # logits at every position

  def corrupt(self, tokens_BxL, keys_Bx2):
    """BERT's selection: round(mask_rate x the example's tokens) positions (at least 1) at random, each then
    [MASK] (80%), a random token (10%) or kept (10%). -> (corrupted inputs B x L, the P = ceil(mask_rate x L)
    candidate positions B x P, their weights B x P (1: selected), the original tokens there B x P)."""
    length = tokens_BxL.shape[1]
    p = max(1, math.ceil(self.mask_rate * length))
    replacements = jnp.asarray(self.replacements)

    def one(tokens_L, key):
      k_order, k_kind, k_token = jax.random.split(key, 3)
      real = tokens_L != 0
      count = self._count(real.sum(), length)
      # real tokens in a random order first (padding scores -1): the first `count` are the selection
      _, positions = jax.lax.top_k(jnp.where(real, jax.random.uniform(k_order, (length,)), -1.0), p)
      selected = jnp.arange(p) < count
      original = tokens_L[positions]
      kind = jax.random.uniform(k_kind, (p,))
      random = replacements[jax.random.randint(k_token, (p,), 0, len(replacements))]
      new = jnp.where(kind < 0.8, self.mask_id, jnp.where(kind < 0.9, random, original))
      inputs = tokens_L.at[positions].set(jnp.where(selected, new, original).astype(tokens_L.dtype))
      return inputs, positions, selected, original

    return jax.vmap(one)(tokens_BxL, keys_Bx2)

  def _count(self, real_tokens, length: int):
    """How many positions an example with `real_tokens` of `length` has selected: round(mask_rate x real_tokens),
    at least 1 and at most ceil(mask_rate x length); none without real tokens."""
    p = max(1, math.ceil(self.mask_rate * length))
    return jnp.where(real_tokens > 0, jnp.clip(jnp.round(real_tokens * self.mask_rate), 1, p), 0)

  def weight(self, batch):
    """The selected positions of the real rows (what the loss is a mean over; rows of unequal length select
    unequal numbers), known from the inputs alone."""
    inputs = batch["inputs"]
    return (self._count((inputs != 0).sum(1), inputs.shape[1]) * batch["mask"]).sum()

  def _sums(self, model, batch, keys, *, train, rngs=None):
    inputs, positions, selected, targets = self.corrupt(batch["inputs"].astype(jnp.int32), keys)
    weights = selected.astype(jnp.float32) * batch["mask"][:, None]
    logits = model(inputs, train=train, rngs=rngs, positions_BxP=positions).astype(jnp.float32)
    losses = optax.softmax_cross_entropy_with_integer_labels(logits, targets)
    correct = jnp.argmax(logits, -1) == targets
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
    raise UserError(f"--mode=predict is for classifiers and regressors; {USE}")

  def sample(self, run, model, step: int) -> dict:
    raise UserError(f"--mode=sample is for generative models (language models, GANs); {USE}")
