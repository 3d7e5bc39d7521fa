"""The config schema: shared defaults (`base_config`), validation, and run-compatibility checks.

Config files under configs/ start from `base_config()` and override what their experiment needs, so
every field exists (and can be overridden from the command line) in every experiment.
"""

import difflib
import inspect
from typing import Any, Callable

import ml_collections

from bigmodel_jax.errors import UserError
from bigmodel_jax.parallel import RULES

# Fields that change how a run is operated, not what it computes: they may differ on resume.
RUNTIME_FIELDS = ("data.data_dir", "data.num_threads", "data.prefetch", "data.on_device", "data.eval_batch_size",
                  "train.log_every", "train.checkpoint_every", "train.keep_checkpoints",
                  "train.allow_config_change", "train.allow_data_change", "train.progress_bar", "train.compilation_cache",
                  "train.trackers", "train.tracking.",
                  "predict.", "sample.", "export.", "serve.", "quantize.",
                  "evals.", "eval.",  # when and where the run is evaluated, not what it trains
                  # the layout, not the math: a checkpoint restores onto any mesh (resharded on restore)
                  "mesh.", "parallel.", "train.grad_accum_steps", "train.steps_per_call", "model.remat",
                  "model.attention",  # the attention kernel (einsum, cuDNN's), not its math
                  "init.")  # read only while the workdir has no checkpoint; never again once it resumes


def base_config() -> ml_collections.ConfigDict:
  """Every field, with its default. Each field's trailing comment is its one-line meaning (`--print_config` and
  `--help` show it); a comment block above a section describes the section."""
  c = ml_collections.ConfigDict()
  c.seed = 0  # seeds parameter init, dropout and the data order
  c.data = dict(
      name="digits",  # dataset: a registered name, or tfds:<name> for a TFDS dataset
      data_dir="",  # where datasets are cached; "" = $BIGMODEL_JAX_DATA_DIR or ~/.cache/bigmodel_jax/data
      batch_size=32,  # global batch size, over all devices and processes
      eval_batch_size=1000,  # rows per evaluation batch (the last one is padded and masked)
      shuffle=True,  # reshuffle the training split each epoch
      drop_remainder=True,  # drop each epoch's last incomplete training batch
      normalize="unit",  # none | unit ([0, 1]) | standardize (train-set mean/std per channel)
      augment=dict(
          random_crop_padding=0,  # pad by this many pixels and crop back at a random offset; 0: off
          horizontal_flip=False),  # flip training images left-right at random
      # grain read threads: 0 builds each batch (one numpy gather) on the training thread, which measured
      # fastest on 2 CPU cores (benchmarks/step_overhead.py); raise it for heavy augmentation
      num_threads=0,  # grain read threads (0: batches built on the training thread)
      prefetch=4,  # batches read ahead when num_threads > 0
      # the training split on the device(s), each batch gathered inside the train step from the example indices the
      # host draws as it always does (same batches, same resume); for splits that fit, without augmentation
      on_device=False,  # keep the training split on the device; only each batch's indices are sent per step
      # text datasets
      path="",  # a local text file instead of fetching (tiny_shakespeare)
      seq_len=128,  # tokens per example: LM window (block size) or classifier input length (truncated/padded)
      tokenizer=dict(
          name="char",  # char | byte | sentencepiece | gpt2_bpe, bert_wordpiece (from bigmodel_jax.convert)
          vocab_size=8000,  # sentencepiece: vocabulary size to train
          model_type="unigram",  # sentencepiece: unigram | bpe
          mask_token=False),  # sentencepiece: a [MASK] piece (id 3) for masked language modelling
      strip_headers=True,  # emails (spam_assassin): drop the header block
      as_corpus=False,  # a labelled text dataset read as a corpus of its documents, labels unused (pretraining)
      # datasets without a published validation split hold out this fraction of the training split as
      # 'validation': a fixed slice (its own seed, not config.seed), so it never moves between runs or trials
      validation_fraction=0.1,  # share of the training split held out as validation (where none is published)
      # learning curves in labelled data: train on a fixed seeded subset of the training split (taken after validation
      # is held out, its own seed, so every run and both arms of a comparison see the same examples)
      train_fraction=1.0)  # share of the training split trained on (labelled rows; a text stream's first part)
  c.model = model_config("mlp")  # the model: its name and its constructor's arguments (model_config(name, ...))
  c.task = dict(
      name="classification",  # the task: its loss, metrics and predictions
      label_smoothing=0.0,  # classification: share of each target spread over all classes
      mask_rate=0.15)  # masked_language_modeling: share of tokens selected (80% [MASK], 10% random, 10% kept)
  c.optimizer = dict(
      name="adam",  # the optax optimizer
      learning_rate=1e-3,  # peak learning rate (the schedule scales it)
      b1=0.9,  # adam/adamw: first-moment decay
      b2=0.999,  # adam/adamw: second-moment decay
      eps=1e-8,  # adam/adamw: denominator epsilon
      momentum=0.0,  # sgd: momentum (0: none)
      nesterov=False,  # sgd: Nesterov momentum
      weight_decay=0.0,  # decoupled weight decay (adamw, sgd)
      grad_clip_norm=0.0,  # clip gradients to this global norm; 0: off
      decay_embeddings=False,  # weight decay on kernels only, or also on embeddings
      mu_dtype="float32",  # adam/adamw first moment: float32 | bfloat16 (halves its memory)
      frozen=())  # parameter-name patterns (fnmatch, e.g. "hidden.*") never updated: zero updates, no state
  c.schedule = dict(
      name="constant",  # learning-rate schedule over the training steps
      warmup_steps=0,  # steps of linear warmup from 0
      end_factor=0.0)  # end lr = learning_rate * end_factor
  # Several named optimizers instead of the one above (a GAN's generator and discriminator, per-group learning
  # rates): config.optimizers.<name> = optim.section_config(params="generator", ...), each with its own schedule.
  c.optimizers = ml_collections.ConfigDict()  # named optimizers (empty: config.optimizer for all parameters)
  # Initial weights from another run's checkpoint (a fresh workdir only; a resume reads its own checkpoints):
  # rules "PATTERN=load|skip" are tried in order on each parameter's dotted name; the first that matches decides.
  # One no rule matches is loaded when every rule skips, else kept as initialised. RUN/init.json records it all.
  c.init = dict(
      workdir="",  # a trained run's workdir whose checkpoint initialises this run ("": a fresh initialisation)
      step=-1,  # the checkpoint step of init.workdir to load; -1: its latest
      rules=())  # "PATTERN=load|skip" rules in order, e.g. ("head.*=skip",); (): load every parameter
  c.train = dict(
      num_epochs=1,  # passes over the training split (when num_steps <= 0)
      num_steps=-1,  # training steps; > 0 overrides num_epochs
      log_every=100,  # steps between train-metric log lines
      checkpoint_every=1000,  # steps between checkpoints (and one at the end)
      keep_checkpoints=3,  # latest checkpoints kept (the best one is kept besides)
      # model selection reads the evaluator `best_eval` (a validation split, never test): the checkpoint kept as
      # 'best', best_step in final_metrics.json, and early stopping after `patience` evaluations without an
      # improvement of more than min_delta (patience 0: off)
      best_eval="validation",  # the evaluator model selection reads (a validation split); "": select nothing
      best_metric="accuracy",  # the metric selection compares (a metric of the task)
      best_mode="max",  # max | min: whether larger best_metric is better
      early_stopping=dict(
          patience=0,  # stop after this many evaluations without improvement; 0: off
          min_delta=0.0),  # an improvement must exceed this
      allow_config_change=False,  # let a workdir's run continue with a different config
      allow_data_change=False,  # let a resume, eval, predict or sample use data or a tokenizer it was not trained on
      progress_bar=True,  # a progress bar on a terminal (plain log lines elsewhere)
      compilation_cache=True,  # JAX's persistent compilation cache ($BIGMODEL_JAX_CACHE_DIR)
      dtype="float32",  # compute dtype: float32 | bfloat16 (parameters and optimizer state stay float32)
      grad_accum_steps=1,  # split each batch into k microbatches run in turn: same update, ~1/k activation memory
      steps_per_call=1,  # train steps per dispatch (a lax.scan over k batches): less host work per step, same math
      trackers="tensorboard",  # where metrics go besides metrics.jsonl: comma-separated tensorboard | mlflow | wandb
      tracking=dict(
          experiment="",  # MLflow experiment / W&B group; "": $BIGMODEL_JAX_EXPERIMENT or bigmodel_jax
          mlflow_tracking_uri="",  # "": sqlite:///$PWD/mlflow.db
          wandb_project="bigmodel_jax",  # W&B project (offline runs)
          wandb_dir=""))  # where W&B offline runs go; "": the workdir
  # Devices: a mesh of named axes (sizes multiply to the device count; -1 = the rest). data: batch split,
  # params replicated; fsdp: batch split, params + optimizer state sharded; tensor: heads/MLP units split.
  c.mesh = dict(
      data=-1,  # data-parallel ways: batch split, parameters replicated (-1: the rest of the devices)
      fsdp=1,  # FSDP ways: batch split, parameters and optimizer state sharded
      tensor=1)  # tensor-parallel ways: attention heads and MLP units split
  c.parallel = dict(
      strategy="jit",  # jit (any mesh) | pmap (pure data parallel)
      rules=dict(RULES))  # logical axis -> mesh axes (parallel.RULES); override one row per flag
  # Evaluators: config.evals.<name> = dict(split=..., every=...), each logged under its split in metrics.jsonl and
  # TensorBoard. every: N steps, -1 = the end of each epoch, 0 = the end of training only (and always at the end).
  c.evals = dict(
      validation=dict(
          split="validation",  # the split this evaluator reads: validation | test
          every=-1),  # evaluate every N steps; -1: each epoch; 0: at the end only
      test=dict(
          split="test",  # the split this evaluator reads: validation | test
          every=0))  # evaluate every N steps; -1: each epoch; 0: at the end only
  # GAN quality (task 'adversarial'): a trained classifier run's workdir, or the config trained once and cached
  # (~/.cache/bigmodel_jax/classifiers or $BIGMODEL_JAX_CLASSIFIER_DIR); seed: the fixed eval noise
  c.eval = dict(
      classifier_workdir="",  # GAN quality: a trained classifier run's workdir ("": train classifier_config)
      classifier_config="configs/mnist_cnn.py",  # GAN quality: the classifier trained once and cached
      seed=0)  # GAN quality: seed of the fixed evaluation noise
  c.predict = dict(num_images=25)  # --mode=predict: test images in the grid (misclassified first)
  # --mode=sample (language models): text generated from the checkpoint, with a KV cache
  c.sample = dict(
      prompt="\n",  # the text generation starts from
      num_tokens=500,  # tokens to generate per sample
      temperature=0.8,  # softmax temperature; 0: always the most likely token
      top_k=200,  # sample among the k most likely tokens; 0: no top-k filter
      top_p=1.0,  # nucleus: the smallest set of tokens with this probability; 1: no filter
      seed=0,  # sampling seed
      num_samples=1)  # samples to generate
  # --mode=export: RUN/export/ (jax.export StableHLO + params.npz + signature.json; runs with jax and numpy only)
  c.export = dict(
      platforms="cpu,cuda",  # the platforms the artifacts run on (comma-separated: cpu, cuda, rocm, tpu)
      quantized=False)  # export the int8 model of --mode=quantize (RUN/quantized/) instead of the float one
  # --mode=serve: an HTTP server (POST /v1/predict, POST /v1/completions, GET /healthz, GET /v1/models)
  c.serve = dict(
      host="127.0.0.1",  # the address it binds; 0.0.0.0 serves every interface
      port=8000,  # the TCP port; 0 picks a free one (the log line names it)
      max_batch=32,  # concurrent requests share one model call of up to this many examples
      batch_timeout_ms=5.0,  # how long a request waits for others to join its batch
      max_body_bytes=8_000_000,  # larger request bodies are refused (413)
      max_tokens=1024,  # the most tokens one completion may ask for
      quantized=False)  # serve the int8 model of --mode=quantize instead of the float one
  # --mode=quantize: int8 weights with per-channel scales (RUN/quantized/), measured against the float model
  c.quantize = dict(
      split="test",  # where accuracy / loss before and after are measured
      min_size=1024,  # weights with fewer values stay float32 (biases, norms, small layers)
      repeats=5)  # speed: median of this many timings of each model (float, int8 in turn)
  return c


def model_config(name: str, **overrides) -> ml_collections.ConfigDict:
  """config.model for a registered model: every constructor argument with its default, then overrides."""
  from bigmodel_jax.models import DATA_ARGS, MODELS
  params = inspect.signature(MODELS.get(name).__init__).parameters
  fields = {k: p.default for k, p in params.items()
            if k not in ("self", *DATA_ARGS) and p.default is not inspect.Parameter.empty}
  unknown = set(overrides) - set(fields)
  if unknown:
    raise UserError(f"config.model: {sorted(unknown)} are not fields of model {name!r}; valid: {sorted(fields)}")
  fields.update(overrides)
  return ml_collections.ConfigDict({"name": name, **fields})


class UnknownVariant(ValueError):
  """A variant name a config file does not define; `valid` lists the ones it does."""

  def __init__(self, message: str, valid: list[str] = ()):
    super().__init__(message)
    self.valid = valid


LIST_VARIANTS = "?"  # get_config(LIST_VARIANTS) raises UnknownVariant naming the file's variants (--list_configs)


def apply_variant(config: ml_collections.ConfigDict, variant: str, config_name: str,
                  **variants: dict[str, Any]) -> ml_collections.ConfigDict:
  """Applies `variants[variant]` ({'train.num_steps': 100, ...}) to config; "" keeps it as it is.

  Config files call it last: `return apply_variant(c, variant, "mnist_cnn", smoke={...})`, so
  `--config=configs/mnist_cnn.py:smoke` works and an unknown variant names the valid ones. Variants compose:
  "smoke,plays" applies smoke, then plays; two that set one field to different values are refused.
  """
  names = [name.strip() for name in variant.split(",")] if variant else []
  for name in names:
    if name not in variants:
      raise UnknownVariant(f"unknown variant {name!r} of {config_name}; valid: {', '.join(sorted(variants))}"
                           + (" (several: a,b)" if len(variants) > 1 else ""), sorted(variants))
  set_by: dict[str, tuple[str, Any]] = {}
  for name in names:
    for path, value in variants[name].items():
      if path in set_by and set_by[path][1] != value:
        first, before = set_by[path]
        raise ValueError(f"variants {first!r} and {name!r} of {config_name} both set {path} ({before!r} and "
                         f"{value!r}); use one of them (and set {path} with --config.{path}=... if you want another value)")
      set_by[path] = (name, value)
      *parents, leaf = path.split(".")
      section = config
      for part in parents:
        section = section[part]
      section[leaf] = value
  return config


def _check(ok: bool, field: str, message: str) -> None:
  if not ok:
    raise UserError(f"config.{field}: {message}")


RANGES: list[tuple[str, Callable[[Any], bool], str]] = [
    *((f, lambda v: 0 <= v < 2**63, "must be >= 0 and below 2**63 (a PRNG key's 64-bit seed)")
      for f in ("seed", "sample.seed", "eval.seed")),
    ("data.validation_fraction", lambda v: 0 <= v < 1, "must be in (0, 1), or 0 for no validation split"),
    ("data.train_fraction", lambda v: 0 < v <= 1, "must be in (0, 1]: the share of the training split to train on"),
    ("task.mask_rate", lambda v: 0 < v < 1, "must be in (0, 1): the share of tokens masked (BERT: 0.15)"),
    ("train.early_stopping.patience", lambda v: v >= 0, "must be >= 0 (evaluations without improvement; 0: off)"),
    ("train.early_stopping.min_delta", lambda v: v >= 0, "must be >= 0"),
    ("data.batch_size", lambda v: v > 0, "must be > 0"),
    ("data.eval_batch_size", lambda v: v > 0, "must be > 0"),
    ("data.num_threads", lambda v: v >= 0, "must be >= 0"),
    ("data.prefetch", lambda v: v >= 0, "must be >= 0"),
    ("data.augment.random_crop_padding", lambda v: v >= 0, "must be >= 0"),
    ("data.normalize", lambda v: v in ("none", "unit", "standardize"), "must be none, unit or standardize"),
    ("task.label_smoothing", lambda v: 0 <= v < 1, "must be in [0, 1)"),
    ("train.log_every", lambda v: v > 0, "must be > 0"),
    ("train.checkpoint_every", lambda v: v > 0, "must be > 0"),
    ("train.keep_checkpoints", lambda v: v >= 1, "must be >= 1"),
    ("train.best_mode", lambda v: v in ("max", "min"), "must be max or min"),
    ("predict.num_images", lambda v: v > 0, "must be > 0"),
    ("data.seq_len", lambda v: v > 0, "must be > 0"),
    ("data.tokenizer.vocab_size", lambda v: v >= 8, "must be >= 8"),
    ("data.tokenizer.model_type", lambda v: v in ("unigram", "bpe"), "must be unigram or bpe"),
    ("sample.num_tokens", lambda v: 0 < v <= 1_000_000,  # sample.MAX_TOKENS
     "must be > 0 and at most 1000000 per call (how many tokens to generate; for more, sample again with the "
     "text as the prompt)"),
    ("sample.temperature", lambda v: v == 0 or 1e-4 <= v <= 1e4, "must be 0 (greedy) or at least 1e-4 and at most 1e4"),
    ("sample.top_k", lambda v: v >= 0, "must be >= 0 (0 = no top-k filter)"),
    ("sample.top_p", lambda v: 0 < v <= 1, "must be in (0, 1] (1 = no nucleus filter)"),
    ("sample.num_samples", lambda v: v > 0, "must be > 0"),
    ("train.grad_accum_steps", lambda v: v >= 1, "must be >= 1"),
    ("train.steps_per_call", lambda v: v >= 1, "must be >= 1 (1 = one step per dispatch)"),
]


def get_field(config, path: str):
  value = config
  for part in path.split("."):
    value = value[part]
  return value


def check_unknown_fields(config) -> None:
  """A field base_config() does not have (a typo in a config file, or a field that moved) is an error, not ignored."""
  known = flatten(base_config().to_dict())
  for key in flatten(config.to_dict()):
    if key.split(".")[0] in ("model", "task", "evals", "optimizers") or key.startswith("parallel.rules."):
      continue  # their entries vary (checked where they are read)
    if key not in known:
      close = difflib.get_close_matches(key, list(known), n=1)
      hint = (f"it moved to {MOVED_FIELDS[key]}" if key in MOVED_FIELDS else
              f"did you mean {close[0]!r}?" if close else "base_config() has no such field")
      raise UserError(f"config.{key}: not a config field ({hint})")


def check_structure(config, reference=None, prefix: str = "") -> None:
  """Every section and field of base_config() must exist (config.model's fields depend on the model)."""
  reference = base_config() if reference is None else reference
  for key, value in reference.items():
    if key not in config or isinstance(value, ml_collections.ConfigDict) and not hasattr(config[key], "items"):
      raise UserError(f"config.{prefix}{key}: " + (f"must be a section of fields, got {config[key]!r}" if key in config
                      else "missing; a config file should start from bigmodel_jax.config.base_config()"))
    if isinstance(value, ml_collections.ConfigDict) and key not in ("model", "evals"):  # their entries vary
      check_structure(config[key], value, f"{prefix}{key}.")
  if not prefix and "name" not in config.model:
    raise UserError("config.model.name: missing; build config.model with bigmodel_jax.config.model_config(name)")


def fit_mesh(config) -> str | None:
  """For eval/predict/sample: a mesh that does not fit this machine (e.g. a pod run's saved config evaluated
  on a laptop) becomes data parallel over the devices here. The layout never changes the numbers, and the
  checkpoint is resharded on restore. -> a message saying so, or None if the mesh fits."""
  from bigmodel_jax import parallel
  try:
    parallel.make_mesh(config.mesh)
    return None
  except UserError as e:
    config.mesh.data, config.mesh.fsdp, config.mesh.tensor = -1, 1, 1
    return f"{e}; evaluating data parallel over this machine's devices instead"


def validate(config, training: bool = True) -> None:
  """Raises UserError naming the first field that is wrong and what would be right (`training`: also what
  only training needs, e.g. a batch that splits over this machine's devices)."""
  validate_fields(config, training)
  from bigmodel_jax import parallel
  mesh, rules = parallel.make_mesh(config.mesh), parallel.make_rules(config.parallel.rules)
  if training:  # eval batches are padded up to a multiple of the batch shards (padding rows are masked out)
    parallel.check_batch(mesh, rules, config.data.batch_size, "data.batch_size", config.train.grad_accum_steps)


def validate_fields(config, training: bool = True) -> None:
  """Everything validate checks that does not depend on this machine's devices (a sweep checks each trial's
  config with it before any trial runs, without touching an accelerator)."""
  check_structure(config)
  if training:  # a saved config.json of an older version may hold fields since removed; it still evaluates
    check_unknown_fields(config)
  from bigmodel_jax.data import DATASETS
  from bigmodel_jax.models import model_kwargs
  from bigmodel_jax import config_checks, optim
  from bigmodel_jax.tasks import TASKS, metric_mode

  config_checks.check_kinds(config)
  for path, ok, message in RANGES:
    value = get_field(config, path)
    _check(ok(value), path, f"{message}, got {value!r}")
  t = config.train
  _check(t.num_steps > 0 or t.num_epochs > 0, "train.num_epochs",
         f"must be > 0 (or set train.num_steps > 0), got {t.num_epochs!r}")
  if not config.data.name.startswith("tfds:"):
    DATASETS.get(config.data.name)
  from bigmodel_jax.data.text import READS_PATH
  _check(not config.data.path or config.data.name in READS_PATH, "data.path",
         f"dataset {config.data.name!r} does not read a file path (only {', '.join(READS_PATH)} does); leave it empty")
  model_kwargs(config.model)
  if "dropout_rate" in config.model:
    _check(0 <= config.model.dropout_rate < 1, "model.dropout_rate", f"must be in [0, 1), got {config.model.dropout_rate}")
  TASKS.get(config.task.name)
  optim.validate(config)
  # each name table checks its own field (and suggests the closest name)
  from bigmodel_jax.data.tokenizers import TOKENIZERS
  from bigmodel_jax.state import DTYPES
  TOKENIZERS.get(config.data.tokenizer.name)
  DTYPES.get(t.dtype)
  from bigmodel_jax.layout import LAYOUTS
  LAYOUTS.get(config.parallel.strategy)
  if training:  # trackers start with training only; eval/predict of a run logged to MLflow need no mlflow
    from bigmodel_jax import trackers
    trackers.check(config)
  config_checks.check_evals(config)
  config_checks.check_init(config)
  config_checks.check_on_device(config)
  metric_names = TASKS.get(config.task.name).metric_names
  _check(t.best_metric in metric_names, "train.best_metric",
         f"{t.best_metric!r} is not an eval metric of task {config.task.name!r}; valid: {', '.join(metric_names)}")
  mode = metric_mode(t.best_metric)  # the other way selects the worst checkpoint
  _check(mode in (None, t.best_mode), "train.best_mode",
         f"{t.best_mode!r} selects the worst {t.best_metric}; set {mode}")


# Fields that are gone, and where their meaning went: a config file still setting one is told so.
MOVED_FIELDS = {"train.eval_every": "config.evals.<name>.every (e.g. c.evals.validation.every = 250)"}


def is_runtime_field(key: str, fields: tuple = RUNTIME_FIELDS) -> bool:
  """A dotted field that changes how a run is operated, not what it computes: one of `fields` (a field, or a section
  ending in '.')."""
  return any(key == f or (f.endswith(".") and key.startswith(f)) for f in fields)


def flatten(d: dict, prefix: str = "") -> dict:
  """{'a': {'b': 1}} -> {'a.b': 1} (tuples as lists, as JSON has them)."""
  out = {}
  for k, v in d.items():
    if isinstance(v, dict):
      out.update(flatten(v, f"{prefix}{k}."))
    else:
      out[f"{prefix}{k}"] = list(v) if isinstance(v, tuple) else v
  return out
