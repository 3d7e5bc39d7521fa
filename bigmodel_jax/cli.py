"""What the command line tells a user before anything runs: --help, --list_configs and --print_config.

Field meanings come from base_config()'s own comments (each field's trailing comment), so the schema and its
documentation are one text.
"""

import ast
import functools
import importlib.util
import inspect
import io
import math
import tokenize
from pathlib import Path

from bigmodel_jax import config as config_lib
from bigmodel_jax.errors import UserError

HELP = """\
bigmodel_jax: an experiment is a config file under configs/.

usage: python -m bigmodel_jax.main --config=FILE[:VARIANT[,VARIANT...]] --workdir=DIR [--mode=MODE] [--config.FIELD=VALUE ...]
       (or: bigmodel-jax ...)

modes:
  train    train, resuming from the workdir's latest checkpoint if it has one (the default)
             python -m bigmodel_jax.main --config=configs/mnist_cnn.py:smoke --workdir=runs/smoke
  eval     every evaluator of config.evals on a checkpoint (default latest; --checkpoint_step=N)
             python -m bigmodel_jax.main --workdir=runs/smoke --mode=eval
  predict  test-split predictions: predictions.csv and pictures (misclassified examples first)
             python -m bigmodel_jax.main --workdir=runs/smoke --mode=predict --config.predict.num_images=49
  sample   language models: text generated from a checkpoint with a KV cache (GANs: images)
             python -m bigmodel_jax.main --workdir=runs/gpt --mode=sample --config.sample.prompt="ROMEO:"
  export   RUN/export/: params.npz, jax.export functions and signature.json, runnable without this package
             python -m bigmodel_jax.main --workdir=runs/smoke --mode=export
  serve    the model behind HTTP: POST /v1/predict, /v1/completions for language models (config.serve)
             python -m bigmodel_jax.main --workdir=runs/smoke --mode=serve --config.serve.port=8000
  quantize int8 weights into RUN/quantized/ with a before/after report (config.quantize)
             python -m bigmodel_jax.main --workdir=runs/smoke --mode=quantize

the modes other than train start from the workdir's config.json: --config is not needed, and their own fields
(sample.*, predict.*, evals.*, serve.*, data.eval_batch_size, ...) are overridden directly; what the run computed
is not.

finding things out:
  --list_configs                  the experiments in configs/ with their descriptions and variants
  --config=FILE --print_config    the resolved config (every field, its value and meaning), the parameter
                                  count and the number of training steps; writes nothing into a workdir
  --config=FILE:smoke,plays       variants compose, applied left to right; command-line fields win over them
  --config=RUN/config.json        a run's record as a config: relaunch it or fork it with overrides
  --helpfull                      every flag, including absl's

sweeps: python -m bigmodel_jax.sweep FILE --workdir=DIR    reproductions: python -m bigmodel_jax.reproduce --help
Hugging Face GPT-2 / BERT weights: python -m bigmodel_jax.convert hf-to-run --model=gpt2 --src=HF_DIR --workdir=RUN
                                   (a run to sample / fine-tune); run-to-hf --workdir=RUN --dst=HF_DIR (and back)
exit codes: 0 ok, 2 bad input (one line on stderr naming the field or file), 3 non-finite loss,
            130 Ctrl-C, 143 SIGTERM (a checkpoint is saved first), 141 stdout closed by its reader (| head)
"""


# Fields that do nothing under some settings: (field, when it has no effect, why). A field given on the command line
# that has no effect is said in one warning line, rather than recorded as if it had mattered.
NO_EFFECT = [
    ("schedule.warmup_steps", lambda c: c.schedule.name in ("constant", "cosine"),
     lambda c: f"schedule {c.schedule.name!r} has no warmup (warmup_cosine and linear have)"),
    ("schedule.end_factor", lambda c: c.schedule.name == "constant", lambda c: "the constant schedule does not decay"),
    ("optimizer.momentum", lambda c: c.optimizer.name != "sgd", lambda c: f"{c.optimizer.name} takes no momentum (sgd does)"),
    ("optimizer.nesterov", lambda c: c.optimizer.name != "sgd", lambda c: f"{c.optimizer.name} takes no nesterov (sgd does)"),
    ("data.tokenizer.vocab_size", lambda c: c.data.tokenizer.name != "sentencepiece",
     lambda c: f"the {c.data.tokenizer.name} tokenizer's vocabulary is its characters or bytes (sentencepiece's is sized)"),
    ("train.num_epochs", lambda c: c.train.num_steps > 0,
     lambda c: f"train.num_steps={c.train.num_steps} sets the run's length (num_steps > 0 overrides num_epochs)"),
    *((f"sample.{f}", lambda c: c.task.name == "adversarial",
       lambda c: "a GAN samples config.sample.num_samples images from config.sample.seed's noise (no text)")
      for f in ("prompt", "num_tokens", "temperature", "top_k", "top_p")),
]
# Fields that do nothing in one mode (NO_EFFECT's form; NO_EFFECT's note wins for the same field). --mode=serve
# takes config.sample as its requests' defaults, and a request may set another temperature: sample's only.
GREEDY = "sample.temperature=0 takes the most likely token at every step (greedy): nothing is drawn"
MODE_NO_EFFECT = {"sample": [  # a GAN draws its noise from sample.seed whatever the temperature
    (f"sample.{f}", lambda c: c.sample.temperature == 0 and c.task.name != "adversarial",
     lambda c, why=why: f"{GREEDY}{why}") for f, why in (("top_k", ""), ("top_p", ""),
                                                           ("seed", " (the seed only names the file)"))] + [
    ("sample.num_samples", lambda c: c.sample.temperature == 0 and c.sample.num_samples > 1
     and c.task.name != "adversarial",
     lambda c: f"{GREEDY}, so its {c.sample.num_samples} texts are one text repeated")]}


def resolve_overrides(config, overridden: list[str]) -> list[str]:
  """A command-line field beats what the config file or its variant set, also where another field would make it
  meaningless: train.num_epochs given (without train.num_steps) clears a num_steps > 0 that would override it. A
  field given that has no effect (NO_EFFECT; config.optimizer beside named config.optimizers) is said. A path
  field's '~' is the home directory (argv.PATH_FIELDS). -> one line per such change, to log."""
  from bigmodel_jax.argv import expand_paths
  expand_paths(config)
  notes = []
  if not all(section in config for section in ("train", "schedule", "optimizer", "data", "optimizers")):
    return notes  # a config file missing sections: validation says which
  if "train.num_epochs" in overridden and "train.num_steps" not in overridden and config.train.num_steps > 0:
    notes.append(f"--config.train.num_epochs={config.train.num_epochs} replaces the config's train.num_steps="
                 f"{config.train.num_steps} (num_steps > 0 overrides num_epochs); training runs "
                 f"{config.train.num_epochs} epoch(s)")
    config.train.num_steps = -1
  return notes + idle_notes(config, overridden)


def idle_notes(config, overridden: list[str], mode: str = "train") -> list[str]:
  """One line per field given that has no effect in `config` under --mode=`mode` (config.optimizer.* beside named
  config.optimizers: one line with where to set them), to log: training and the modes on a checkpoint say them
  alike."""
  named = config.get("optimizers")
  notes = [f"--config.{field} has no effect: {why}" for field, why in idle_fields(config, overridden, mode).items()
           if not (named and field.startswith("optimizer."))]
  if named and any(f.startswith("optimizer.") for f in overridden):
    notes.append("--config.optimizer.* has no effect: this config trains with the named config.optimizers "
                 f"({', '.join(named)}); set --config.optimizers.<name>.<field>")
  return notes


def idle_fields(config, overridden: list[str], mode: str = "train") -> dict[str, str]:
  """{field given: why it has no effect in `config` under --mode=`mode`} (NO_EFFECT, MODE_NO_EFFECT;
  config.optimizer.* beside named config.optimizers): idle_notes says them, and a sweep refuses two trials that
  differ only in them."""
  def said(idle, why) -> str | None:
    # a config missing the fields it reads (a mode on a hand-made workdir takes its --config file as it is): none
    # said here, validation names what is missing
    try:
      return why(config) if idle(config) else None
    except (AttributeError, KeyError):
      return None
  out = {field: note for field, idle, why in [*MODE_NO_EFFECT.get(mode, []), *NO_EFFECT]
         if field in overridden and (note := said(idle, why))}
  if config.get("optimizers"):
    out.update({f: f"this config trains with the named config.optimizers ({', '.join(config.optimizers)})"
                for f in overridden if f.startswith("optimizer.")})
  return out


@functools.cache
def field_meanings() -> dict[str, str]:
  """{'data.batch_size': 'global batch size, ...'} from the trailing comment on each field's line in base_config()."""
  source = inspect.getsource(config_lib.base_config)
  lines = source.splitlines()
  comments = {}
  for token in tokenize.generate_tokens(io.StringIO(source).readline):
    if token.type == tokenize.COMMENT and lines[token.start[0] - 1][:token.start[1]].strip():  # after code
      comments[token.start[0]] = token.string.lstrip("#").strip()
  meanings = {}

  def visit(value: ast.expr, path: str, end_line: int) -> None:
    if isinstance(value, ast.Call) and getattr(value.func, "id", "") == "dict" and value.keywords:
      for keyword in value.keywords:  # a field's comment follows it: on the line where its value ends
        visit(keyword.value, f"{path}.{keyword.arg}", keyword.value.end_lineno)
    else:
      meanings[path] = comments.get(end_line, "")

  for node in ast.walk(ast.parse(source)):
    if isinstance(node, ast.Assign) and isinstance(node.targets[0], ast.Attribute):
      target, parts = node.targets[0], []
      while isinstance(target, ast.Attribute):
        parts.insert(0, target.attr)
        target = target.value
      visit(node.value, ".".join(parts[0:]), node.end_lineno)
  return {path.removeprefix("."): meaning for path, meaning in meanings.items()}


def _choices(key: str) -> str:
  """The valid names of a field that names a registry entry."""
  from bigmodel_jax import optim
  from bigmodel_jax.data import DATASETS
  from bigmodel_jax.data.tokenizers import TOKENIZERS
  from bigmodel_jax.layout import LAYOUTS
  from bigmodel_jax.models import MODELS
  from bigmodel_jax.state import DTYPES
  from bigmodel_jax.tasks import TASKS
  tables = {"data.name": DATASETS, "model.name": MODELS, "task.name": TASKS, "optimizer.name": optim.OPTIMIZERS,
            "schedule.name": optim.SCHEDULES, "data.tokenizer.name": TOKENIZERS, "parallel.strategy": LAYOUTS,
            "train.dtype": DTYPES}
  return f" (one of: {', '.join(tables[key].names())})" if key in tables else ""


def meaning(key: str, model_class: str = "") -> str:
  meanings = field_meanings()
  if key in meanings:
    return meanings[key] + _choices(key)
  section = key.split(".")[0]
  if key == "model.name":
    return meanings["model"] + _choices(key)
  if section == "model":
    return f"an argument of the model's constructor ({model_class})"
  if section == "evals":
    return meanings.get(f"evals.validation.{key.split('.')[-1]}", "")
  if key.startswith("parallel.rules."):
    return "logical axis -> mesh axes (comma-separated; '': replicated)"
  return meanings.get(section, "")


def _order(keys) -> list[str]:
  """base_config()'s own order (seed, data, model, task, ...); fields it does not list sit with their section."""
  rank = {k: i for i, k in enumerate(field_meanings())}

  def place(key: str):
    parts = key.split(".")
    for n in range(len(parts), 0, -1):
      if ".".join(parts[:n]) in rank:
        return rank[".".join(parts[:n])], "" if key == "model.name" else key
    return len(rank), key
  return sorted(keys, key=place)


def describe_fields(config) -> list[str]:
  """One line per field: `name = value  # meaning`, a * where it differs from the default (base_config(), and for
  config.model the model's own constructor defaults)."""
  from bigmodel_jax.models import MODELS
  defaults = config_lib.flatten(config_lib.base_config().to_dict())
  flat = config_lib.flatten(config.to_dict())
  try:
    model_class = MODELS.get(config.model.name).__name__
    defaults.update({f"model.{k}": v for k, v in config_lib.flatten(config_lib.model_config(config.model.name)
                                                                    .to_dict()).items()})
    defaults["model.name"] = config.model.name
  except (UserError, KeyError, AttributeError):
    model_class = "?"
  width = max(len(k) for k in flat)
  lines = []
  for key in _order(flat):
    value = flat[key]
    mark = "*" if defaults.get(key, "<absent>") != value else " "
    note = meaning(key, model_class)
    lines.append(f"{mark} {key:<{width}} = {value!r}" + (f"  # {note}" if note else ""))
  return lines


def sizes(config, workdir: Path | None = None) -> list[str]:
  """The model's parameter count and the number of training steps, built abstractly (nothing is compiled, nothing
  written into a workdir; the dataset is read from its cache, fetched there first if it is not, and a text run's
  tokenizer is made in memory)."""
  from bigmodel_jax import parallel
  from bigmodel_jax.data import load_dataset, pipeline
  from bigmodel_jax.tasks import get_task
  from bigmodel_jax.train import make_steps
  tokenizer = None if workdir is None else Path(workdir) / "tokenizer"
  if tokenizer is not None and tokenizer.is_dir():  # a trained text run: its own tokenizer
    dataset = load_dataset(config.data, tokenizer, create_tokenizer=False)
  else:
    dataset = load_dataset(config.data, None, create_tokenizer=True)
  task = get_task(config, dataset)
  config_lib.fit_mesh(config)  # a mesh for more devices than here counts the same parameters
  per_epoch, t = pipeline.steps_per_epoch(dataset, config.data), config.train
  steps = make_steps(config, dataset, task, parallel.make_mesh(config.mesh),
                     t.num_steps if t.num_steps > 0 else max(1, t.num_epochs * per_epoch), check_train_step=False)
  import jax
  params = sum(math.prod(x.shape) for x in jax.tree.leaves(steps.abstract_state.params))
  total = (f"{t.num_steps:,} (train.num_steps)" if t.num_steps > 0 else
           f"{t.num_epochs * per_epoch:,} ({t.num_epochs} epochs x {per_epoch:,} steps of batch {config.data.batch_size})")
  splits = ", ".join(f"{s} {dataset.num_examples(s):,}" for s in ("train", *dataset.eval_splits))
  return [f"parameters: {params:,} ({config.model.name} on inputs of shape {tuple(dataset.input_shape)})",
          f"training steps: {total}",
          f"examples{f' (windows of {config.data.seq_len} tokens)' if dataset.is_token_stream else ''}: {splits}"]


def print_config(config, source: str, workdir: Path | None = None) -> None:
  print(f"# {source}: the resolved config (*: differs from the default)")
  print("\n".join(describe_fields(config)))
  print("\n".join(sizes(config, workdir)), flush=True)


def configs_dir() -> Path | None:
  """configs/ of the current directory, else of the checkout the package runs from."""
  for directory in (Path("configs"), Path(__file__).resolve().parents[1] / "configs"):
    if directory.is_dir() and any(directory.glob("*.py")):
      return directory
  return None


def variants_of(path: Path) -> list[str]:
  """The variants a config file's get_config accepts (apply_variant names them when asked for LIST_VARIANTS)."""
  spec = importlib.util.spec_from_file_location(f"_config_{path.stem}", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  try:
    module.get_config(config_lib.LIST_VARIANTS)
  except config_lib.UnknownVariant as e:
    return e.valid
  return []


def list_configs() -> str:
  directory = configs_dir()
  if directory is None:
    raise UserError("--list_configs: no configs/ directory here or beside the package; run it from the checkout")
  rows = []
  for path in sorted(directory.glob("*.py")):
    try:
      variants = ", ".join(variants_of(path)) or "-"
      doc = (ast.get_docstring(ast.parse(path.read_text())) or "").strip().splitlines()
    except Exception as e:  # a broken config file is listed, not fatal
      variants, doc = "?", [f"(cannot load: {type(e).__name__}: {e})"]
    rows.append((str(path), variants, doc[0] if doc else ""))
  width = max(len(r[0]) for r in rows)
  lines = [f"{'config':<{width}}  variants (:name, compose with commas)", ""]
  for path, variants, doc in rows:
    lines += [f"{path:<{width}}  {variants}", f"{'':<{width}}  {doc}"]
  return "\n".join(lines)
