"""A trained model rebuilt from its workdir alone (config.json, model.json, tokenizer/, a checkpoint): no dataset.

    model = Inference.load(config, workdir)       # the model card's shapes and constants, an empty Dataset
    step, state = model.restore_latest()
    predict = model.predict_function()            # (variables, raw inputs) -> the task's predictions
    predict(model.variables(state), raw_BxI)      # {'prediction': B, 'probability': B x C} / {'prediction': B}

`predict_function` is preprocess (model_card.apply, the pipeline's own constants) -> model -> the task's
prediction, as one pure function of flat named arrays: sample, serve and quantize call it, export serializes
it. Language models have `lm_functions`: a prefill over the prompt and a one-token decode over a fixed-size
KV cache (an LSTM's carry), the pieces sample.generate is made of.
"""

import dataclasses
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from bigmodel_jax import model_card, parallel
from bigmodel_jax.checkpoint import Checkpointer
from bigmodel_jax.data import fingerprint
from bigmodel_jax.errors import UserError
from bigmodel_jax.state import cast_floats

SCHEDULE_STEPS = 10 ** 6  # the optimizer's schedule length is no part of the model; any length builds its state


def leaf_name(path) -> str:
  """'params/trunk/blocks/0/attn/qkv/kernel' for a pytree path (nnx's trailing '.value' dropped)."""
  parts = []
  for entry in path:
    part = getattr(entry, "key", getattr(entry, "name", getattr(entry, "idx", None)))
    parts.append(str(part))
  if parts and parts[-1] == "value":
    parts.pop()
  return "/".join(parts)


def is_key(x) -> bool:
  return jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key)


NOT_DEPLOYED = {  # task -> (the model, what it is for instead)
    "adversarial": ("a GAN (task adversarial)", "its use is sampling images from noise (--mode=sample)"),
    "masked_language_modeling": (
        "a masked language model (task masked_language_modeling)",
        "it is pretraining; fine-tune a classifier from it (config.init.workdir=this run, as "
        "configs/spam_bert_finetune.py does) and deploy that run")}
DEPLOY_MODES = {"serve": ("served", "serving"), "export": ("exported", "export"),
                "quantize": ("quantized", "quantization")}


def check_deployable(config, mode: str) -> None:
  """--mode=serve / export / quantize: one line for a model they do not cover (a GAN, a masked language model),
  saying what it is for."""
  if config.task.name in NOT_DEPLOYED:
    (model, use), (done, noun) = NOT_DEPLOYED[config.task.name], DEPLOY_MODES[mode]
    raise UserError(f"--mode={mode}: {model} is not {done}: {use}; {noun} covers classifiers, regressors and "
                    "language models that predict the next token")


@dataclasses.dataclass
class Inference:
  """What eval-free uses of a checkpoint need; quacks like train.Run for sample.sample and restore_for_eval."""
  config: object
  workdir: Path
  card: dict
  dataset: object  # model_card.described_dataset: every field but the examples
  task: object
  steps: object  # state.Steps (its compiled functions are built lazily: only what is called compiles)
  checkpointer: Checkpointer
  output_dir: Path | None = None

  @property
  def outputs(self) -> Path:
    return self.output_dir or self.workdir

  @classmethod
  def load(cls, config, workdir: str | Path, output_dir: Path | None = None) -> "Inference":
    from bigmodel_jax import train
    from bigmodel_jax.tasks import get_task
    from bigmodel_jax.workdir import check_workdir, has_checkpoints
    workdir = Path(workdir).absolute()
    check_workdir(workdir, config)
    if not has_checkpoints(workdir):
      raise UserError(f"--workdir: no checkpoints in {workdir}; train first (--mode=train) or fix the path")
    card = model_card.load(workdir, config)
    dataset = model_card.described_dataset(card, workdir, config.data)
    fingerprint.check(workdir, dataset, config.train.get("allow_data_change", False))  # its tokenizer files
    task = get_task(config, dataset)
    steps = train.make_steps(config, dataset, task, parallel.make_mesh(config.mesh), SCHEDULE_STEPS,
                             check_train_step=False)
    t = config.train
    checkpointer = Checkpointer(workdir / "checkpoints", keep=t.keep_checkpoints, keep_best=bool(t.best_eval))
    return cls(config, workdir, card, dataset, task, steps, checkpointer, output_dir)

  def restore(self, step: int):
    from bigmodel_jax.train import restore_checked
    state, data_state, meta = restore_checked(self, step)
    model_card.check(self.workdir, self.card, (meta or {}).get("model_card_sha256"), step,
                     lambda: self.checkpointer.meta_values("model_card_sha256"))
    return state, data_state, meta

  def restore_step(self, step: int | None = None, flag: str = "--checkpoint_step", check_config: bool = True):
    """(step, state) of checkpoint `step` (default: the latest), with one-line errors for a missing or damaged one
    (naming `flag` as the way to pick another)."""
    from bigmodel_jax.evaluate import restore_for_eval
    return restore_for_eval(self, step, flag, check_config)

  def close(self) -> None:
    self.checkpointer.close()

  # --- the model as pure functions of named arrays

  def variables(self, state) -> dict[str, np.ndarray]:
    """Every array the model needs (parameters, then batch statistics etc.) by name, on the host."""
    flat, _ = jax.tree_util.tree_flatten_with_path({"params": state.params, "model_state": state.model_state})
    return {leaf_name(path): np.asarray(jax.device_get(jax.random.key_data(x) if is_key(x) else x)) for path, x in flat}

  def variable_shapes(self) -> dict[str, tuple[int, ...]]:
    """The shape of every array variables() gives, by name (an RNG key's: its raw data's)."""
    abstract = self.steps.abstract_state
    flat, _ = jax.tree_util.tree_flatten_with_path({"params": abstract.params, "model_state": abstract.model_state})
    return {leaf_name(path): tuple(jax.eval_shape(jax.random.key_data, a).shape if is_key(a) else a.shape)
            for path, a in flat}

  def model_function(self):
    """variables (as variables() names them) -> the NNX model holding them, inside a trace."""
    abstract = self.steps.abstract_state
    flat, treedef = jax.tree_util.tree_flatten_with_path({"params": abstract.params,
                                                          "model_state": abstract.model_state})
    names = [leaf_name(path) for path, _ in flat]
    graphdef, dtype = self.steps.graphdef, self.steps.compute_dtype

    def model(variables: dict):
      leaves = [jax.random.wrap_key_data(variables[n]) if is_key(a) else jnp.asarray(variables[n])
                for n, (_, a) in zip(names, flat)]  # a model's RNG keys travel as their raw uint32 data
      tree = jax.tree_util.tree_unflatten(treedef, leaves)
      return nnx.merge(graphdef, cast_floats(tree["params"], dtype), tree["model_state"])
    return model

  def predict_function(self, model_function=None):
    """(variables, raw inputs B x ...) -> the task's predictions; raw inputs as model.json's input_dtype says.
    `model_function` (variables -> model) is another form of the variables' (quantize.load's int8 weights)."""
    if self.dataset.is_token_stream or self.config.task.name == "adversarial":
      raise UserError(f"a {self.config.task.name} model has no per-example prediction; it generates "
                      "(--mode=sample)")
    model = model_function or self.model_function()
    pre, task, dtype = self.card["preprocessing"], self.task, self.steps.compute_dtype

    def predict(variables, raw_BxI):
      inputs = cast_floats(model_card.apply(pre, raw_BxI, jnp), dtype)
      out = task.predict(task.outputs(model(variables), {"inputs": inputs}))
      if not pre["token_ids"]:
        return out
      ok = self.in_vocab(raw_BxI)  # else NaN probabilities and class -1, never another text's answer
      return {k: jnp.where(ok.reshape(-1, *[1] * (v.ndim - 1)), v, jnp.nan if v.dtype.kind == "f" else -1)
              for k, v in out.items()}
    return predict

  def in_vocab(self, ids):
    """Per example (row of `ids`), whether its token ids are all in 0..vocab_size-1: the embedding's gather takes -1
    as the last row (a wrong answer that looks right) and gives NaN past the end; callers answer NaN instead."""
    ids = ids.reshape(ids.shape[0], -1)
    return ((ids >= 0) & (ids < self.dataset.vocab_size)).all(axis=1)

  def lm_functions(self, model_function=None):
    """(prefill, decode) of a language model:
      prefill(variables, tokens_BxT) -> (next-token logits B x V, cache)    the prompt, in one pass
      decode(variables, cache, tokens_B, index) -> (logits B x V, cache)    one token at position `index`
    A row with a token id outside 0..vocab_size-1 has NaN logits (in_vocab)."""
    if not self.dataset.is_token_stream:
      raise UserError("prefill/decode are for language models; this run classifies or regresses (predict)")
    model = model_function or self.model_function()

    def prefill(variables, tokens_BxT):
      m = model(variables)
      logits, cache = m.extend(tokens_BxT, m.init_cache(tokens_BxT.shape[0]), 0)
      return jnp.where(self.in_vocab(tokens_BxT)[:, None], logits[:, -1].astype(jnp.float32), jnp.nan), cache

    def decode(variables, cache, tokens_B, index):
      m = model(variables)
      logits, cache = m.extend(tokens_B[:, None], cache, index)
      logits = jnp.where(self.in_vocab(tokens_B)[:, None], logits[:, -1].astype(jnp.float32), jnp.nan)
      if getattr(m, "max_len", None):  # a position outside the cache would be clamped silently: NaN logits instead
        logits = jnp.where((index >= 0) & (index < m.max_len), logits, jnp.nan)
      return logits, cache
    return prefill, decode

  def context(self) -> int | None:
    """How many tokens a language model attends to: its trained sequence length (capped by its max_len); None: no
    limit (an LSTM's carry reads any length). sample.attended's rule, which sampling and serving apply."""
    from bigmodel_jax import sample
    lm = self.steps.model(self.steps.abstract_state)
    return sample.attended(lm, self.card["input_shape"][0]) if hasattr(lm, "max_len") else None
