"""Hugging Face weights in and out: a GPT-2 or BERT model directory <-> a run workdir.

    python -m bigmodel_jax.convert hf-to-run --model=gpt2|bert --src=HF_DIR --workdir=RUN [--seq_len=N]
        [--data_path=TEXT_FILE]
    python -m bigmodel_jax.convert run-to-hf --workdir=RUN --dst=HF_DIR [--step=N]

hf-to-run reads what `save_pretrained` writes (config.json + model.safetensors, or its shards and index) and the
tokenizer files beside it (GPT-2: vocab.json + merges.txt or tokenizer.json; BERT: vocab.txt or tokenizer.json),
and makes RUN a run like any trained one: config.json (our config generated from theirs: hf_weights.py says what
maps to what), the tokenizer in RUN/tokenizer/, model.json, and a checkpoint at step 0 written by the codebase's
own Checkpointer from its own TrainState. So --mode=eval works on it (a GPT-2 run's sample / export / serve /
quantize too), and a fine-tuning run starts from it with --config.init.workdir=RUN (init_from.py; the new run takes
RUN's tokenizer).
RUN/hf_config.json keeps the model's own config.json, which run-to-hf writes back with our fields in it.

run-to-hf writes a `gpt` run as GPT2LMHeadModel and an `encoder_mlm` run as BertForMaskedLM: config.json,
model.safetensors (float32, tied weights not stored, as transformers 5 saves; a scan_layers run's stacked blocks
unstacked) and the tokenizer files, loadable by transformers' from_pretrained. Both ways need numpy and
safetensors only (not torch or transformers).

Bad input is one line and exit 2, and nothing is written into the target: everything is built in a staging
directory beside it, renamed into place when complete.
"""

import json
import os
import shutil
import tempfile
from pathlib import Path

from absl import app, flags, logging

from bigmodel_jax import hf_weights
from bigmodel_jax.errors import UserError, fail, parse_flags

def define_flags() -> None:
  """The command's flags, defined only when it runs as a command: importing this module as a library (the tests,
  beside bigmodel_jax.sweep or main, which have their own --workdir) defines none."""
  flags.DEFINE_enum("model", None, sorted(hf_weights.MODELS), "hf-to-run: the architecture of --src.")
  flags.DEFINE_string("src", None, "hf-to-run: the Hugging Face model directory (save_pretrained's layout).")
  flags.DEFINE_string("workdir", None, "The run: written by hf-to-run (new or empty), read by run-to-hf.")
  flags.DEFINE_string("dst", None, "run-to-hf: the Hugging Face model directory to write (new or empty).")
  flags.DEFINE_integer("step", None, "run-to-hf: the checkpoint step to write (default: the latest).")
  flags.DEFINE_string("data_path", "", "hf-to-run: the run's config.data.path, a text file that --mode=eval reads "
                      "(default: tiny Shakespeare, fetched).")
  flags.DEFINE_integer("seq_len", None, "hf-to-run: the run's config.data.seq_len (default: the model's "
                       "positions, at most 1024).")


COMMANDS = ("hf-to-run", "run-to-hf")
HF_CONFIG = "hf_config.json"  # in a converted run: the model's own config.json
WEIGHTS, INDEX = "model.safetensors", "model.safetensors.index.json"
TASKS = {"gpt2": "language_modeling", "bert": "masked_language_modeling"}


def _tokenizer_module(model: str):
  from bigmodel_jax.data import bpe, wordpiece
  return bpe if model == "gpt2" else wordpiece


def read_hf_dir(model: str, src: Path) -> tuple[dict, dict, object]:
  """(config.json's contents, tensors by name, tokenizer) of a Hugging Face directory, checked."""
  if not src.is_dir():
    raise UserError(f"--src: {src} does not exist or is not a directory; give a Hugging Face model directory "
                    "(what save_pretrained writes)")
  file = src / "config.json"
  if not file.is_file():
    raise UserError(f"--src: {src} has no config.json; give the directory save_pretrained wrote (config.json + "
                    f"{WEIGHTS})")
  try:
    hf = json.loads(file.read_text(encoding="utf-8"))
  except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
    raise UserError(f"{file}: cannot be read as JSON ({e}); restore the model's config.json") from None
  model_type = hf.get("model_type") if isinstance(hf, dict) else None
  supported = {t: m for m, (t, _) in hf_weights.MODELS.items()}
  if model_type not in supported:
    raise UserError(f"{file}: model_type {model_type!r} is not supported; supported: {', '.join(supported)} "
                    "(GPT2LMHeadModel, BertForMaskedLM)")
  if supported[model_type] != model:
    raise UserError(f"--model={model}, but {file} is a {model_type!r} model; pass --model={supported[model_type]}")
  return hf, read_tensors(src), read_tokenizer(model, src)


def read_tensors(src: Path) -> dict:
  from safetensors.numpy import load_file
  if (src / WEIGHTS).is_file():
    files = [src / WEIGHTS]
  elif (src / INDEX).is_file():
    try:
      files = [src / f for f in sorted(set(json.loads((src / INDEX).read_text())["weight_map"].values()))]
    except (OSError, ValueError, KeyError, AttributeError) as e:
      raise UserError(f"{src / INDEX}: not a safetensors index ({type(e).__name__}: {e}); re-save the model") from None
  else:
    legacy = [f for f in ("pytorch_model.bin", "tf_model.h5", "flax_model.msgpack") if (src / f).exists()]
    raise UserError(f"--src: {src} has no {WEIGHTS}" + (f", only {legacy[0]}: re-save it with model.save_pretrained("
                                                        "DIR, safe_serialization=True)" if legacy else
                                                        "; give the directory save_pretrained wrote"))
  tensors = {}
  for f in files:
    try:
      tensors.update(load_file(f))
    except Exception as e:  # safetensors' own errors: a truncated file, a dtype numpy lacks (bfloat16)
      raise UserError(f"{f}: cannot be read as safetensors ({type(e).__name__}: {str(e).splitlines()[0][:200]}); "
                      "re-save it in float32 with save_pretrained(DIR, safe_serialization=True)") from None
  return tensors


def read_tokenizer(model: str, src: Path):
  tokenizer = _tokenizer_module(model).from_hf_dir(src)
  if tokenizer is None:
    files = "vocab.json + merges.txt, or tokenizer.json" if model == "gpt2" else "vocab.txt, or tokenizer.json"
    raise UserError(f"--src: {src} has no tokenizer files ({files}); copy the model's own there: the run reads and "
                    "writes text with its ids" + (" and masks with its [MASK] id" if model == "bert" else ""))
  return tokenizer


def target_dir(path: Path, flag: str) -> Path:
  """A directory to write into: new or empty (a run with checkpoints is named as such)."""
  from bigmodel_jax.workdir import has_checkpoints
  path = path.expanduser().absolute()
  if path.exists() and not path.is_dir():
    raise UserError(f"{flag}: {path} exists and is not a directory; pick a new path")
  if path.is_dir() and has_checkpoints(path):
    raise UserError(f"{flag}: {path} already holds a run with checkpoints; pick a new directory (nothing was changed)")
  if path.is_dir() and any(path.iterdir()):
    raise UserError(f"{flag}: {path} is not empty; pick a new or empty directory (nothing was changed)")
  return path


def staged(target: Path, build) -> None:
  """build(staging_dir) beside `target`, then renamed into place: a failure leaves `target` as it was, and
  removes the parent directories made for it."""
  created = [p for p in (target.parent, *target.parent.parents) if not p.exists()]  # deepest first
  target.parent.mkdir(parents=True, exist_ok=True)
  done = False
  try:
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.converting-", dir=target.parent))
    try:
      build(staging)
      if target.is_dir():
        target.rmdir()  # empty (target_dir checked)
      os.replace(staging, target)
      done = True
    finally:
      shutil.rmtree(staging, ignore_errors=True)
  finally:
    for directory in created if not done else ():
      try:
        directory.rmdir()
      except OSError:  # something else was put there meanwhile: leave it
        break


def run_config(model: str, fields: dict, tokenizer, seq_len: int, data_path: str = ""):
  """Our config of a converted model: the model, its tokenizer and task; a corpus (tiny_shakespeare, or
  --config.data.path) to fine-tune or evaluate on, with fine-tuning's usual optimizer."""
  from bigmodel_jax.config import base_config, model_config
  c = base_config()
  c.data.name = "tiny_shakespeare"
  c.data.tokenizer.name = tokenizer.name
  c.data.seq_len = seq_len
  c.data.path = data_path
  c.model = model_config(hf_weights.MODELS[model][1], **fields)
  c.task.name = TASKS[model]
  c.optimizer.name, c.optimizer.learning_rate = "adamw", 1e-4
  c.train.best_metric, c.train.best_mode = "loss", "min"
  return c


def hf_to_run(model: str, src: Path, workdir: Path, seq_len: int | None, data_path: str = "") -> dict:
  from bigmodel_jax import config as config_lib, init_from, model_card, parallel, runinfo, train
  from bigmodel_jax.checkpoint import Checkpointer
  from bigmodel_jax.data import fingerprint
  from bigmodel_jax.inference import SCHEDULE_STEPS
  from bigmodel_jax.run_config import RECORD_KEY, defining_fields
  from bigmodel_jax.tasks import get_task
  src, workdir = src.expanduser().absolute(), target_dir(Path(workdir), "--workdir")
  hf, tensors, tokenizer = read_hf_dir(model, src)
  fields = hf_weights.model_fields(model, hf, str(src / "config.json"))
  vocab_size = hf_weights.config_vocab_size(hf, str(src / "config.json"))
  params = hf_weights.to_ours(model, fields, tensors, str(src / WEIGHTS), vocab_size)
  rows = params["trunk.embed.embedding"].shape[0]
  if tokenizer.vocab_size != rows:
    raise UserError(f"--src: the tokenizer in {src} has {tokenizer.vocab_size} ids but the embedding has {rows} rows; "
                    "give the model's own tokenizer files")
  seq_len = min(fields["max_len"], 1024) if seq_len is None else seq_len
  if not 1 <= seq_len <= fields["max_len"]:
    raise UserError(f"--seq_len: {seq_len} must be between 1 and the model's {fields['max_len']} positions")
  if data_path and not Path(data_path).expanduser().is_file():
    raise UserError(f"--data_path: {data_path} is not a file; give a text file (or leave it out for tiny Shakespeare)")
  data_path = str(Path(data_path).expanduser().absolute()) if data_path else ""
  config = run_config(model, fields, tokenizer, seq_len, data_path)
  config_lib.validate(config, training=False)

  def build(staging: Path):
    tokenizer.save(staging / "tokenizer")
    card = model_card.language_model_card(staging, config)
    model_card.write(staging, card)
    dataset = model_card.described_dataset(card, staging, config.data)
    task = get_task(config, dataset)
    steps = train.make_steps(config, dataset, task, parallel.make_mesh(config.mesh), SCHEDULE_STEPS,
                             check_train_step=False)
    values = {"params/" + name.replace(".", "/"): value for name, value in params.items()}
    wanted = init_from.targets(steps.abstract_state)
    if set(wanted) != set(values) or any(tuple(wanted[n].shape) != v.shape for n, v in values.items()):
      raise AssertionError(f"converted parameters do not fit the model: {sorted(set(wanted) ^ set(values))[:4]}")
    state = init_from.apply(steps.init(), init_from.Source(src, 0, "", values, sorted(params), []))
    checkpointer = Checkpointer(staging / "checkpoints", keep=config.train.keep_checkpoints, async_save=False)
    try:
      checkpointer.save(0, steps.layout.plain(state), {"next_index": 0}, {"step": 0, "epoch": 0.0,
                      "model_card_sha256": model_card.sha256(card), RECORD_KEY: defining_fields(config),
                      **fingerprint.checkpoint_record(dataset)})
    finally:
      checkpointer.close()
    runinfo.write_run_records(staging, config)
    runinfo.write_text_atomic(staging / HF_CONFIG, json.dumps(hf, indent=2) + "\n")

  staged(workdir, build)
  num = int(sum(v.size for v in params.values()))
  logging.info("converted %s (%d parameters) into %s", src, num, workdir)
  return {"workdir": str(workdir), "model": config.model.name, "num_params": num, "vocab_size": rows,
          "tokenizer": tokenizer.name}


def run_to_hf(workdir: Path, dst: Path, step: int | None) -> dict:
  import ml_collections
  from bigmodel_jax import config as config_lib, run_config as run_config_lib
  from bigmodel_jax.inference import Inference
  from bigmodel_jax.init_from import dotted
  workdir = Path(workdir).expanduser().absolute()
  if not (workdir / "config.json").is_file():
    raise UserError(f"--workdir: {workdir} is not a run's workdir (no config.json); name a run")
  saved = run_config_lib.load(workdir / "config.json", "name another run", "--workdir: ")
  ours = {m: hf for hf, (_, m) in hf_weights.MODELS.items()}
  name = saved["model"]["name"]
  if name not in ours:
    raise UserError(f"--workdir: {workdir} is a {name!r} run; run-to-hf writes gpt runs (as GPT-2) and encoder_mlm "
                    "runs (as BERT)")
  model, fields = ours[name], {k: v for k, v in saved["model"].items() if k != "name"}
  why = hf_weights.writable(model, fields)
  if why:
    raise UserError(f"--workdir: {workdir} cannot be written as {model}: {why}")
  dst = target_dir(Path(dst), "--dst")
  config = ml_collections.ConfigDict(run_config_lib.as_config_values(saved))
  config_lib.fit_mesh(config)
  run = Inference.load(config, workdir)
  try:
    restored, state = run.restore_step(step, flag="--step")
    variables = run.variables(state)
  finally:
    run.close()
  params = {dotted(n): v for n, v in variables.items() if n.startswith("params/")}
  tensors = hf_weights.to_hf(model, fields, params)
  vocab = int(params["trunk.embed.embedding"].shape[0])
  base = json.loads((workdir / HF_CONFIG).read_text()) if (workdir / HF_CONFIG).is_file() else None
  hf = hf_weights.hf_config(model, fields, vocab, base)
  tokenizer = run.dataset.tokenizer
  if tokenizer is not None and tokenizer.name == "gpt2_bpe":
    hf.update(bos_token_id=tokenizer.eos_id, eos_token_id=tokenizer.eos_id)

  def build(staging: Path):
    from safetensors.numpy import save_file
    save_file(tensors, str(staging / WEIGHTS), metadata={"format": "pt"})  # transformers reads "pt" files
    (staging / "config.json").write_text(json.dumps(hf, indent=2, sort_keys=True) + "\n")
    written = write_hf_tokenizer(tokenizer, staging, fields["max_len"])
    if not written:
      logging.warning("the run's %s tokenizer has no Hugging Face form: %s holds the weights and config only",
                      getattr(tokenizer, "name", None), dst)

  staged(dst, build)
  return {"dst": str(dst), "step": restored, "model": model, "tensors": len(tensors)}


def write_hf_tokenizer(tokenizer, directory: Path, max_len: int) -> bool:
  """GPT-2's vocab.json + merges.txt or BERT's vocab.txt (+ tokenizer_config.json; model_max_length: the model's
  positions) where the run's tokenizer is one of them -> whether it was."""
  name = getattr(tokenizer, "name", None)
  if name not in ("gpt2_bpe", "bert_wordpiece"):
    return False
  tokenizer.save(directory)
  (directory / "tokenizer.json").unlink()  # ours; transformers would read a file of that name as its own format
  settings = {"tokenizer_class": "GPT2Tokenizer"} if name == "gpt2_bpe" else \
      {"tokenizer_class": "BertTokenizer", "do_lower_case": tokenizer.lower_case,
       "strip_accents": tokenizer.strip_accents, "tokenize_chinese_chars": tokenizer.chinese_chars}
  settings["model_max_length"] = int(max_len)
  (directory / "tokenizer_config.json").write_text(json.dumps(settings, indent=2) + "\n")
  return True


def run(argv: list[str]) -> dict:
  if len(argv) != 1 or argv[0] not in COMMANDS:
    raise UserError(f"give one command, {' or '.join(COMMANDS)}: python -m bigmodel_jax.convert hf-to-run "
                    "--model=gpt2 --src=HF_DIR --workdir=RUN, or run-to-hf --workdir=RUN --dst=HF_DIR")
  f = flags.FLAGS
  if not f.workdir:
    raise UserError("--workdir is required (the run to write, or to read)")
  if argv[0] == "hf-to-run":
    if not f.model or not f.src:
      raise UserError("hf-to-run needs --model (gpt2 or bert) and --src (the Hugging Face model directory)")
    return hf_to_run(f.model, Path(f.src), Path(f.workdir), f.seq_len, f.data_path)
  if not f.dst:
    raise UserError("run-to-hf needs --dst (the Hugging Face model directory to write)")
  return run_to_hf(Path(f.workdir), Path(f.dst), f.step)


def main(argv):
  # orbax logs every step of a save at INFO: keep its warnings only
  logging.get_absl_handler().addFilter(lambda r: r.levelno >= logging.WARNING or "/orbax/" not in r.pathname)
  try:
    result = run(argv[1:])
  except UserError as e:
    fail(str(e))
  print(json.dumps(result, indent=2), flush=True)


if __name__ == "__main__":
  define_flags()
  app.run(main, flags_parser=parse_flags)
