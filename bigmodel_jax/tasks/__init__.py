"""Tasks by name: `config.task.name` -> how a model is trained and evaluated for that kind of problem.

A task is a `Task` subclass registered in TASKS. The shared machinery (state.Steps) calls:
  update(steps, state, batch, key) -> (state, metrics)   one training update, inside the compiled train step
  evaluate_batch(model, batch)     -> {name: array of sums}   inside the compiled eval step
  finalize(sums, split)            -> {metric: value}    on host, after all eval batches of a split
  predict_batch(model, batch)      -> {name: per-example array}   for --mode=predict
  outputs(model, batch)            -> what the model gives for a batch (its shape is checked before training)
A supervised task (SupervisedTask) writes only the per-output pieces (train_loss, eval_sums, predict on
the model's outputs) and inherits the rest; a task with its own kind of update (a GAN: two optimizers, several
steps) overrides `update` and names its optimizers in `optimizers`. Batches are {'inputs', 'targets',
'mask', 'row', ...}; padding rows have mask 0 and never count.
"""

import abc

import jax.numpy as jnp

from bigmodel_jax.errors import UserError
from bigmodel_jax.registry import Registry, import_submodules

TASKS: Registry = Registry("task", "config.task.name")

# Which way each metric is better, where its name says so (a class fraction's best depends on the question):
# a selection in the other direction picks the worst checkpoint or trial, with exit 0.
LOWER_IS_BETTER = ("loss", "mse", "mae", "perplexity", "bits_per_char", "frechet_distance", "real_frechet_distance")
HIGHER_IS_BETTER = ("accuracy", "precision", "recall", "f1", "r2", "classifier_score", "real_classifier_score")


def metric_mode(metric: str) -> str | None:
  """'min' or 'max': the mode that selects the best value of `metric` (None: its name does not say)."""
  return "min" if metric in LOWER_IS_BETTER else "max" if metric in HIGHER_IS_BETTER else None


def require_padding_0(dataset, task: str) -> None:
  """Text rows are padded with the tokenizer's pad id, and the encoders (and masked LM selection) take id 0 as
  padding: a tokenizer that pads with another id (gpt2_bpe: <|endoftext|>; its id 0 is "!") would mask real text."""
  pad = getattr(dataset.tokenizer, "pad_id", 0)
  if pad != 0:
    raise UserError(f"config.data.tokenizer.name: {task!r} on {dataset.name} needs padding id 0 (the encoders' "
                    f"padding mask), but the {dataset.tokenizer.name} tokenizer pads with id {pad}; use char, byte, "
                    "sentencepiece or bert_wordpiece")


class Task(abc.ABC):
  """What the machinery needs of any task; SupervisedTask fills in the update for one loss on one output."""
  metric_names: tuple[str, ...] = ()
  optimizers: tuple[str, ...] = ()  # the config.optimizers names `update` steps; () = the run's optimizer(s)
  # how many times each optimizer steps per train step (a GAN's d_steps); its schedule spans them
  updates_per_step: dict[str, int] = {}
  num_outputs: int = 0
  # runtime config prefixes its evaluation depends on (a GAN: eval.*, its quality classifier): a resume may not
  # change them, as its metrics are compared across the run
  scored_by: tuple[str, ...] = ()

  @staticmethod
  def as_compared(config: dict) -> dict:
    """A saved or new config (a dict) as a resume compares its scored_by fields (the GAN: paths resolved)."""
    return config

  def setup(self, workdir=None, training: bool = True) -> None:
    """What the task needs beyond its config, once the run's inputs and `workdir` are checked (the GAN's quality
    classifier, checked against the one the workdir's evaluations were scored by; recorded there only if
    `training`: eval and predict read the workdir)."""

  @abc.abstractmethod
  def output_shape(self, input_shape) -> tuple[int, ...]:
    """The model output shape per example this task needs (checked before training)."""

  def weight(self, batch):
    """What a (micro)batch's mean loss and metrics are means over, counted: its real rows. Microbatches and pmap
    replicas are averaged weighted by it, so the update is the whole batch's mean however the batch is split."""
    return batch["mask"].sum()

  def outputs(self, model, batch, *, train: bool = False, rngs=None):
    return model(batch["inputs"], train=train, rngs=rngs).astype(jnp.float32)

  @abc.abstractmethod
  def update(self, steps, state, batch, key):
    """One training update -> (state, metrics), built from steps.grads / steps.apply_gradients."""

  @abc.abstractmethod
  def evaluate_batch(self, model, batch):
    """{name: array of sums} for one eval batch (padding rows weigh nothing)."""

  @abc.abstractmethod
  def finalize(self, sums, split: str = "test") -> dict:
    """The eval sums of a whole split (named `split`) -> {metric: value}."""

  @abc.abstractmethod
  def predict_batch(self, model, batch):
    """{name: per-example array} for --mode=predict."""

  def write_predictions(self, run, predictions: dict, step: int, out_dir) -> tuple[list, dict]:
    """--mode=predict's files from the test split's predictions -> (files, summary metrics)."""
    from bigmodel_jax import evaluate
    return evaluate.write_supervised_predictions(run, predictions, step, out_dir)

  def sample(self, run, model, step: int) -> dict:
    """--mode=sample: what a generative model makes from its checkpoint."""
    raise UserError(f"--mode=sample is for generative models (language models, GANs); task {run.config.task.name!r} "
                    "predicts (use --mode=predict)")


class SupervisedTask(Task):
  """One loss on the model's outputs: a task writes train_loss / eval_sums / predict on them, and inherits the rest."""

  def loss(self, model, batch, rngs):
    """(scalar loss, {metric: scalar}) of one (micro)batch in training mode."""
    return self.train_loss(self.outputs(model, batch, train=True, rngs=rngs), batch)

  def update(self, steps, state, batch, key):
    """One supervised update: gradients of the loss over the whole batch, then every optimizer steps."""
    grads, model_state, metrics = steps.grads(self.loss, state, batch, key)
    state, opt_metrics = steps.apply_gradients(state, grads, model_state)
    return state, {**metrics, **opt_metrics}

  def evaluate_batch(self, model, batch):
    return self.eval_sums(self.outputs(model, batch), batch)

  def predict_batch(self, model, batch):
    return self.predict(self.outputs(model, batch))

  @abc.abstractmethod
  def train_loss(self, outputs, batch):
    """(scalar loss, {metric: scalar}) from the model's outputs."""

  @abc.abstractmethod
  def eval_sums(self, outputs, batch):
    """{name: array of sums} from the model's outputs."""

  @abc.abstractmethod
  def predict(self, outputs):
    """{name: per-example array} from the model's outputs."""


def get_task(config, dataset) -> Task:
  """The task of config.task.name for `dataset`; tasks read config.task (and any other section they need)."""
  return TASKS.get(config.task.name)(config, dataset)


import_submodules(__name__)  # every module of this package registers its tasks
