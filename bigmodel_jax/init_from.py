"""A fresh run's initial weights from another run's checkpoint (config.init), chosen by parameter name.

    --config.init.workdir=RUN [--config.init.step=N] [--config.init.rules='("head.*=skip",)']

Names are the dotted parameter paths (`hidden.0.kernel`, `head.bias`; batch statistics by their module's path
too). Rules "PATTERN=load|skip" are tried in order (fnmatch, or a prefix: `hidden` is `hidden.*`); the first that
matches decides. A parameter no rule matches is loaded if every rule is a skip (`head.*=skip`: all but the head),
and keeps its new initialisation if some rule loads (`hidden.*=load`: the hidden layers only); no rules: load all.

Everything is checked when the run is built, before anything is written into its workdir (a source without a
checkpoint, a rule matching nothing, a loaded parameter whose shape differs: one line each). The new run's first
state is its own init with the selected values put in (cast to its dtypes, placed with its shardings); RUN/init.json
and that launch's run_info.jsonl line record where they came from. A resume restores the run's own checkpoints and
never reads the source again.
"""

import dataclasses
import fnmatch
import json
from pathlib import Path

import jax
import ml_collections
from absl import logging

from bigmodel_jax import run_config, runinfo
from bigmodel_jax.data import fingerprint
from bigmodel_jax.config_checks import parse_rules
from bigmodel_jax.errors import UserError
from bigmodel_jax.inference import is_key, leaf_name

FILE = "init.json"


@dataclasses.dataclass
class Source:
  """The checked values a fresh run starts from."""
  workdir: Path
  step: int
  params_sha256: str
  values: dict  # 'params/hidden/0/kernel' (inference.leaf_name) -> numpy array in the new run's dtype
  loaded: list  # dotted names loaded
  kept: list  # dotted names kept as the new run initialised them

  def record(self) -> dict:
    return {"workdir": str(self.workdir), "step": self.step, "params_sha256": self.params_sha256,
            "loaded": self.loaded, "kept": self.kept}


def dotted(name: str) -> str:
  """'params/hidden/0/kernel' -> 'hidden.0.kernel' (the names rules, optimizers and freezing match)."""
  return name.split("/", 1)[1].replace("/", ".")


def matches(pattern: str, name: str) -> bool:
  return fnmatch.fnmatchcase(name, pattern) or name.startswith(pattern + ".")


def targets(abstract_state) -> dict:
  """leaf_name -> abstract leaf of what init can load: every parameter, and float model state (batch statistics)."""
  flat, _ = jax.tree_util.tree_flatten_with_path({"params": abstract_state.params,
                                                  "model_state": abstract_state.model_state})
  return {leaf_name(path): leaf for path, leaf in flat
          if leaf_name(path).startswith("params/") or (not is_key(leaf) and jax.numpy.issubdtype(leaf.dtype, jax.numpy.floating))}


def tokenizer_dir(config) -> Path | None:
  """The init source's tokenizer directory, which a run initialised from it reads its text with (the embedding's
  rows are that tokenizer's ids); None without config.init.workdir or where the source has none."""
  if not config.init.workdir:
    return None
  directory = Path(config.init.workdir).expanduser().absolute() / "tokenizer"
  return directory if (directory / "tokenizer.json").is_file() else None


def load_source(config, workdir: Path, dataset=None):
  """(Inference of the source run, restored step, state), each way it can fail one line naming config.init."""
  from bigmodel_jax import config as config_lib
  from bigmodel_jax.inference import Inference
  from bigmodel_jax.workdir import has_checkpoints
  i, field = config.init, "config.init.workdir"
  source = Path(i.workdir).expanduser().absolute()
  if source == workdir:
    raise UserError(f"{field}: {source} is this run's own --workdir; name another run's workdir")
  if not source.is_dir():
    raise UserError(f"{field}: {source} does not exist or is not a directory; name a trained run's workdir")
  if not (source / "config.json").is_file():
    raise UserError(f"{field}: {source} is not a run's workdir (no config.json); name a trained run's workdir")
  if not has_checkpoints(source):
    raise UserError(f"{field}: no checkpoints in {source}; train that run first or name another workdir")
  saved = run_config.load(source / "config.json", "name another workdir", f"{field}: ")
  source_config = ml_collections.ConfigDict(run_config.as_config_values(saved))
  config_lib.fit_mesh(source_config)  # read on this machine's devices, whatever mesh it trained on
  model = Inference.load(source_config, source)
  try:
    # only its arrays are taken (their shapes are checked): not the source's task or data fields, so not checked
    step, state = model.restore_step(None if i.step < 0 else i.step, flag="--config.init.step", check_config=False)
  except UserError as e:
    raise UserError(f"config.init.step: {e}") from None
  if dataset is not None and step > 0:  # step 0 (a converted Hugging Face model's) has trained on nothing here
    try:
      check_held_out(dataset, config.data, source_config, source)
    except UserError:
      model.close()
      raise
  return model, step, state


def check_held_out(dataset, data_config, source_config, source: Path) -> None:
  """A source run trained on this run's data must have held out at least its validation examples: validation is a
  fixed seeded slice of the training split (a text file's last share), so a smaller share left some of this run's
  validation examples in the source's training split, and selection would score examples its weights have seen."""
  if not dataset.held_out:
    return
  try:
    record = json.loads((source / fingerprint.FILE).read_text())
  except (OSError, ValueError):
    record = None
  record = record if isinstance(record, dict) else {}
  data, theirs = record.get("data"), record.get("held_out")  # what it read, and the share it held out
  if not isinstance(theirs, (int, float)) or isinstance(theirs, bool):  # an older run: its config says
    theirs = source_config.data.get("validation_fraction", 0.0)
  if theirs >= dataset.held_out:
    return
  digests = lambda d: sorted(str(v.get("sha256")) for v in d.values() if isinstance(v, dict))
  same = (digests(data) == digests(dataset.fingerprint) if isinstance(data, dict) and data else
          all(source_config.data.get(k, "") == data_config.get(k, "") for k in ("name", "path")))
  if same:
    raise UserError(f"config.init.workdir: {source} trained on {dataset.name} holding out data.validation_fraction="
                    f"{theirs}, less than this run's {dataset.held_out}: its weights have seen some of this run's "
                    f"validation examples; set --config.data.validation_fraction={theirs}, or start from a run that "
                    f"held out at least {dataset.held_out}")


def prepare(config, steps, workdir: Path, dataset=None) -> Source | None:
  """config.init read and checked against the new run's model (steps.abstract_state) and, given the run's
  `dataset`, its validation split (check_held_out); None without init.workdir."""
  if not config.init.workdir:
    return None
  rules = parse_rules(config.init.rules)
  model, step, state = load_source(config, workdir, dataset)
  try:
    source = model.variables(state)
  finally:
    model.close()
  wanted = targets(steps.abstract_state)
  names = {n: dotted(n) for n in wanted}
  for pattern, action in rules:
    if not any(matches(pattern, d) for d in names.values()):
      some = ", ".join(list(dict.fromkeys(d for d in names.values()))[:4])
      raise UserError(f"config.init.rules: {pattern}={action} matches no parameter of the new model (its names: "
                      f"{some}, ...); fix the pattern or drop the rule")
    first = {d: next((p, a) for p, a in rules if matches(p, d)) for d in names.values() if matches(pattern, d)}
    other = next((rule for rule in first.values() if rule[1] != action), None)
    if (pattern, action) not in first.values() and other:  # every name it matches is decided by an earlier rule
      raise UserError(f"config.init.rules: {pattern}={action} decides nothing: each parameter it matches is decided "
                      f"by an earlier rule ({other[0]}={other[1]}; the first rule that matches decides); put it before")
  unmatched = "skip" if any(a == "load" for _, a in rules) else "load"  # load rules choose; skip rules only exclude
  values, loaded, kept = {}, [], []
  for name, leaf in wanted.items():
    d = names[name]
    action = next((a for p, a in rules if matches(p, d)), unmatched)
    if action != "load":
      kept.append(d)
      continue
    skip = f"--config.init.rules='(\"{d.rsplit('.', 1)[0]}=skip\",)'"  # a prefix: it and what is under it
    if name not in source:
      raise UserError(f"config.init.workdir: {d} of the new model is not in {model.workdir} step {step}; skip it "
                      f"with {skip} (rules apply in order) or fix config.model")
    if tuple(source[name].shape) != tuple(leaf.shape):
      raise UserError(f"config.init.workdir: {d} has shape {tuple(source[name].shape)} in {model.workdir} step "
                      f"{step} but {tuple(leaf.shape)} in the new model; skip it with {skip} (rules apply in order) "
                      "or make config.model match")
    values[name] = source[name].astype(leaf.dtype)
    loaded.append(d)
  trained = set().union(*(_true_names(o.mask) for o in steps.optimizers.values()))
  random_frozen = [d for name, d in names.items() if name.startswith("params/") and d in kept and d not in trained]
  if random_frozen:
    listed = ", ".join(random_frozen[:4]) + (", ..." if len(random_frozen) > 4 else "")
    frozen = "config.optimizers.<name>.frozen" if config.optimizers else "config.optimizer.frozen"
    raise UserError(f"config.init.rules: {listed} not loaded but frozen ({frozen}) would never leave its random "
                    "initialisation; load what is frozen, or do not freeze it")
  return Source(model.workdir, step, params_sha256(model.workdir, step, state), values, loaded, kept)


def _true_names(mask) -> set[str]:
  """The dotted names where an optimizer's ownership mask is True (the parameters it updates)."""
  return {leaf_name(path).replace("/", ".") for path, owned in jax.tree_util.tree_flatten_with_path(mask)[0] if owned}


def params_sha256(workdir: Path, step: int, state) -> str:
  """The source's parameter fingerprint: its final_metrics.json's where that is this step's, else computed."""
  from bigmodel_jax.sweeps.trials import read_json
  final = read_json(workdir / "final_metrics.json") or {}  # damaged (not an object): computed
  if final.get("step") == step and isinstance(final.get("params_sha256"), str) and final["params_sha256"]:
    return final["params_sha256"]
  return runinfo.fingerprint(state.params)


def apply(state, source: Source):
  """The fresh `state` with the source's selected values in place, each with its leaf's dtype and sharding."""
  def put(path, leaf):
    name = leaf_name(path)
    if name not in source.values:
      return leaf
    value = source.values[name]
    sharding = getattr(leaf, "sharding", None)
    if sharding is None:
      return jax.numpy.asarray(value)
    return jax.make_array_from_callback(value.shape, sharding, lambda index: value[index])
  tree = jax.tree_util.tree_map_with_path(put, {"params": state.params, "model_state": state.model_state})
  logging.info("initialised from %s step %d: loaded %d parameter arrays, kept %d as initialised%s", source.workdir,
               source.step, len(source.loaded), len(source.kept),
               f" ({', '.join(source.kept[:4])}{', ...' if len(source.kept) > 4 else ''})" if source.kept else "")
  return state.replace(params=tree["params"], model_state=tree["model_state"])


def write_record(workdir: Path, source: Source) -> None:
  """RUN/init.json: where the run's initial weights came from."""
  runinfo.write_text_atomic(workdir / FILE, json.dumps(source.record(), indent=2) + "\n")
