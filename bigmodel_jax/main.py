"""Entry point: python -m bigmodel_jax.main --config=configs/x.py[:variant] --workdir=DIR [--mode=...]

Multi-host: start the same command once per host, adding --coordinator_address=HOST0:PORT --num_processes=N
--process_id=I (or nothing under SLURM srun, Open MPI mpirun or a multi-host Cloud TPU slice on GKE/multislice:
jax finds those itself); every process trains on its rows of each global batch, process 0 writes the records.

Bad input of any kind ends with one line on stderr naming the field or file and what to do, and a
non-zero exit: 2 for bad input, 3 for a non-finite loss, 143 after a SIGTERM checkpoint. An exception raised
inside a model's or task's own code is named with its file, line and message; --verbosity=1 or
BIGMODEL_JAX_TRACEBACK=1 prints its full traceback too.
"""

import json
import logging as std_logging
import os
import re
import sys
import threading
from pathlib import Path

from absl import app, flags, logging
import ml_collections
from ml_collections import config_flags

from bigmodel_jax import distributed, errors
from bigmodel_jax.errors import TRACEBACK_ENV, NonFiniteLossError, UserError

# config_flags logs its own warning for a get_config that returned None, before flags are parsed (absl adds a line
# of its own then); load_config says it in the error line instead.
std_logging.getLogger("absl").addFilter(
    lambda record: not (record.pathname.endswith("config_flags.py") and "returned None" in record.getMessage()))
_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Experiment config file, e.g. configs/mnist_cnn.py or configs/mnist_cnn.py:smoke.",
    lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and run records.")
_MODE = flags.DEFINE_enum("mode", "train", ["train", "eval", "predict", "sample", "export", "serve", "quantize"],
                          "train (resumes if the workdir has checkpoints); on a checkpoint: eval, predict, sample "
                          "(generative models, see config.sample), export (RUN/export/, see config.export), serve "
                          "(HTTP, see config.serve) or quantize (int8 weights, see config.quantize).")
_CHECKPOINT_STEP = flags.DEFINE_integer("checkpoint_step", None,
                                        "modes other than train: checkpoint step (default, or -1: the latest).")
_OUTPUT_DIR = flags.DEFINE_string("output_dir", None,
                                   "modes other than train: where their outputs go (default: the workdir; e.g. for a "
                                   "read-only workdir, whose checkpoints are then only read).")
_PRINT_CONFIG = flags.DEFINE_boolean("print_config", False,
                                     "Print the resolved config (every field, its value and meaning), the parameter "
                                     "count and the number of training steps, then exit; writes nothing.")
_LIST_CONFIGS = flags.DEFINE_boolean("list_configs", False,
                                     "List the experiments in configs/ with their descriptions and variants, then exit.")

_COORDINATOR = flags.DEFINE_string(
    "coordinator_address", None, "Multi-host: HOST:PORT where process 0 serves the coordinator, reachable from "
    "every host; with --num_processes and --process_id (SLURM, Open MPI and multi-host TPU slices need none).")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None,
                                      "Multi-host: how many processes the run has; start each with the same flags.")
_PROCESS_ID = flags.DEFINE_integer("process_id", None,
                                   "Multi-host: this process's index, 0..num_processes-1 (0 hosts the coordinator).")
_DISTRIBUTED_TIMEOUT = flags.DEFINE_integer("distributed_timeout", 300,
                                            "Multi-host: seconds to wait for every process to join.")

CACHE_DIR_ENV = "BIGMODEL_JAX_CACHE_DIR"
# After an error in a multi-process run, how long to wait at jax's exit barrier for the others: enough for
# processes failing together to leave together, short enough not to hang beside ones still training.
EXIT_BARRIER_S = 10


def fail(message: str, code: int = 2, cause: BaseException | None = None):
  if cause is not None and (os.environ.get(TRACEBACK_ENV, "") not in ("", "0") or flags.FLAGS["verbosity"].value >= 1):
    import traceback
    traceback.print_exception(cause, file=sys.stderr)  # the error behind the one line, for a bug report
  sys.stderr.write(f"error: {message}\n")  # one write: no other thread's output lands between it and its newline
  sys.stderr.flush()
  # The error is said. What libraries print while the process winds down after it (e.g. tensorstore reads
  # of an unreadable checkpoint still finishing) would only bury that line.
  devnull = os.open(os.devnull, os.O_WRONLY)
  os.dup2(devnull, 2)
  if distributed.started():
    _exit_after(EXIT_BARRIER_S, code)
  sys.exit(code)


def _exit_after(seconds: float, code: int) -> None:
  """Ends the process with `code` after `seconds`, whatever the main thread is blocked in (a daemon timer)."""
  def exit_now():
    sys.stdout.flush()
    os._exit(code)
  timer = threading.Timer(seconds, exit_now)
  timer.daemon = True
  timer.start()


def config_error(e: Exception, argv: list[str]) -> str:
  """One line for anything config_flags raises while loading the file or applying an override."""
  text = " ".join(str(a) for a in e.args) if e.args else repr(e)
  text = text.replace("\\n", "\n").replace("\\'", "'")
  from bigmodel_jax import argv as argv_lib
  path = (argv_lib.flag_value(argv, "config") or "?").split(":")[0]
  suggestion = re.search(r"'(\w+)'.*Did you mean \"(\w+)\"", text, re.S)
  if suggestion:
    field, close = suggestion.groups()
    flag = next((a.split("=")[0] for a in argv if a.startswith("--config.") and
                 re.search(rf"\.{field}(\.|=|$)", a.split("=")[0])), f"--config...{field}")
    return f"{flag}: no such config field (did you mean {close!r}?)"
  missing = re.fullmatch(r"""['"]*(\w+)['"]*""", text.strip())
  if isinstance(e, (AttributeError, KeyError)) and missing:  # an override of a field the config does not have
    field = missing.group(1)
    flag = next((a.split("=")[0] for a in argv if a.startswith("--config.") and
                 re.search(rf"\.{field}(\.|=|$)", a.split("=")[0])), None)
    if flag is not None:
      from bigmodel_jax.config import MOVED_FIELDS
      key = flag.removeprefix("--config.")
      moved = MOVED_FIELDS.get(key)
      return f"{flag}: no such config field" + (f" (it moved to {moved})" if moved else f"; {section_fields(key)}")
  if isinstance(e, UserError):
    return str(e)
  if isinstance(e, ValueError) and "variant" in text:  # config.apply_variant: an unknown or conflicting variant
    return f"--config: {path}: {lines_of(text)[-1]}"
  if isinstance(e, SyntaxError):
    return f"--config: {path}, line {e.lineno}: syntax error ({e.msg})"
  if isinstance(e, IsADirectoryError) or Path(path).is_dir():
    return f"--config: {path} is a directory; name a config file in it, e.g. --config=configs/mnist_cnn.py"
  if isinstance(e, OSError) and "Failed loading config file" in text:
    return f"--config: cannot read config file {path!r} (no such file?); pass a path like configs/mnist_cnn.py"
  if isinstance(e, AttributeError) and "get_config" in text:
    return f"--config: {path} has no get_config() function; a config file defines get_config(arg)"
  lines = lines_of(text)
  return f"--config: {path}: {type(e).__name__}: {lines[-1] if lines else text}"


def lines_of(text: str) -> list[str]:
  return [line.strip() for line in text.strip().splitlines() if line.strip()]


def section_fields(key: str) -> str:
  """What the section of a mistyped field `key` (e.g. train.zzz) does have, for the error line."""
  from bigmodel_jax import config as config_lib
  section, value = key.rsplit(".", 1)[0] if "." in key else "", config_lib.base_config()
  if section.split(".")[0] == "model":
    return "config.model's fields are its constructor's arguments: --print_config lists them"
  if section.split(".")[0] in ("evals", "optimizers"):
    return f"new entries of config.{section.split('.')[0]} are added in a config file"
  try:
    for part in filter(None, section.split(".")):
      value = value[part]
    names = sorted(value.keys())
  except (KeyError, AttributeError):
    return "--print_config lists every field"
  return f"config{'.' + section if section else ''} has: {', '.join(names)}"


HELP_FLAGS = ("-h", "--help", "-help", "--helpshort", "-?")
def parse_flags(argv: list[str]) -> list[str]:
  """absl flag parsing, with every failure (bad override, bad type, missing file) turned into one line."""
  from bigmodel_jax import argv as argv_lib
  if any(a in HELP_FLAGS for a in argv[1:]):
    from bigmodel_jax import cli
    print(cli.HELP, end="", flush=True)
    sys.exit(0)
  if "--helpfull" in argv[1:]:
    from bigmodel_jax import cli
    print(cli.HELP + "\nflags:\n" + flags.FLAGS.get_help(), flush=True)
    sys.exit(0)
  try:
    argv = argv_lib.rewrite_argv(argv)
  except UserError as e:
    fail(str(e))
  try:
    return flags.FLAGS(argv)
  except flags.Error as e:
    lines = [line.strip() for line in str(e).strip().splitlines() if line.strip()]
    override = next((a.split("=")[0] for a in argv if a.startswith("--config.")), None)
    if override and not any(a.startswith("--config=") or a == "--config" for a in argv):
      mode, workdir = argv_lib.flag_value(argv, "mode") or "train", argv_lib.flag_value(argv, "workdir")
      if mode != "train" and workdir:
        fail(f"--workdir: no config.json in {workdir} to apply {override} to; fix the path, or pass --config")
      fail(f"{override}: overrides need the config file too; add --config=configs/<experiment>.py (or "
           "--config=<workdir>/config.json to start from a run's config)")
    variant = re.search(r"(?:UnknownVariant|ValueError): (.*variant.*)", str(e))
    if variant:  # config.apply_variant: an unknown variant, or two that conflict
      fail(f"--config: {argv_lib.flag_value(sys.argv, 'config')}: {variant.group(1).strip()}")
    if "Traceback" in str(e):  # an exception inside the config file: its last line says what, its frame where
      path = (argv_lib.flag_value(argv, "config") or "").split(":")[0]
      at = [n for f, n in re.findall(r'File "([^"]+)", line (\d+)', str(e))
            if path and Path(f).absolute() == Path(path).absolute()]
      fail(f"{lines[0].split(': Error whilst')[0]}{f', line {at[-1]}' if at else ''}: {lines[-1]}")
    fail(f"{lines[0]}; see --helpfull")
  except Exception as e:  # config_flags raises KeyError/AttributeError/OSError/... from the config file
    fail(config_error(e, argv))


class _QuietLibraries(std_logging.Filter):
  """orbax and grain log every save and thread at INFO; keep their warnings, drop the chatter."""

  def filter(self, record):
    noisy = any(part in record.pathname for part in ("/orbax/", "/grain/", "/jax/_src/"))
    if noisy and record.exc_info and flags.FLAGS["verbosity"].value < 1:
      return False  # a background save's failure with its traceback: orbax raises it in the caller, said in one line
    if noisy and "did not provide metrics" in record.getMessage():
      return False  # orbax warns on every save between evals; those checkpoints are kept as 'latest'
    return record.levelno >= std_logging.WARNING or not noisy


def setup_jax(config) -> None:
  import jax
  if config.train.compilation_cache:
    cache = os.environ.get(CACHE_DIR_ENV) or str(Path.home() / ".cache" / "bigmodel_jax" / "jax_cache")
    jax.config.update("jax_compilation_cache_dir", cache)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


def load_config():
  """The config --config names (a file, or a config.json), or None."""
  try:
    config = _CONFIG.value  # config_flags loads the file lazily; a failed load raises on first use
    if config is not None and type(config).__module__.startswith("ml_collections.config_flags"):
      config.keys()  # a file that failed to load: config_flags' stand-in raises the error on first use
    if (config is not None or _CONFIG.present) and not isinstance(config, ml_collections.ConfigDict):
      path = config_flags.get_config_filename(flags.FLAGS["config"])  # loaded, but get_config returned no config
      got = "None" if config is None else f"an object of type {type(config).__name__}"
      fail(f"--config: get_config() in {path} returned {got}; it must return a ConfigDict "
           "(start from bigmodel_jax.config.base_config())")
  except Exception as e:
    fail(config_error(e.__cause__ or e, sys.argv))
  return config


def resolve_config(workdir: Path | None):
  """The config this launch runs: training takes --config with its command-line fields (which beat what the
  config or its variant set); eval/predict/sample take the run's own config.json with their own fields set."""
  from bigmodel_jax import argv as argv_lib, cli
  from bigmodel_jax.workdir import use_run_config
  # a path field's '~' (--config.data.path=~/x: the shell leaves it) is the home directory
  given, overridden = argv_lib.expand_paths(load_config()), argv_lib.overridden_fields(sys.argv)
  if _MODE.value != "train" and workdir is not None:
    config = use_run_config(workdir, given, overridden, _MODE.value)
    for note in cli.idle_notes(config, overridden, _MODE.value):  # a field it takes, of no use to this run
      logging.warning("%s", note)
    return config
  if given is None:
    fail("--config is required (e.g. --config=configs/mnist_cnn.py; --list_configs lists them)")
  for note in cli.resolve_overrides(given, overridden):
    logging.warning("%s", note)
  return given


def outputs() -> Path | None:
  """Where an eval/predict/sample launch writes (None: training, which writes checkpoints into its workdir)."""
  if _MODE.value == "train":
    return None
  return Path(_OUTPUT_DIR.value) if _OUTPUT_DIR.value else Path(_WORKDIR.value)


def output_dir(workdir: Path) -> Path | None:
  """--output_dir, created; without it the workdir, which must then be writable (said before anything runs). serve
  writes nothing (it only reads a quantized model there): a read-only workdir serves as it is."""
  target = Path(_OUTPUT_DIR.value) if _OUTPUT_DIR.value else workdir
  checkpoints = (workdir / "checkpoints").resolve()
  if checkpoints == target.resolve() or checkpoints in target.resolve().parents:  # a file there damages a step
    raise UserError(f"--output_dir: {target} is inside {workdir}'s checkpoints/, which hold only checkpoints; give a "
                    "directory outside it")
  if _MODE.value != "serve":
    errors.writable_directory(target, "--output_dir" if _OUTPUT_DIR.value else "--workdir",
                              f"--mode={_MODE.value}'s outputs ",
                              "pass --output_dir=DIR for them (the checkpoints are only read)")
  return target.absolute() if _OUTPUT_DIR.value else None


def main(argv):
  if len(argv) > 1:
    fail(f"unexpected arguments {argv[1:]}; flags look like --config.optimizer.learning_rate=1e-3")
  logging.get_absl_handler().addFilter(_QuietLibraries())
  if _LIST_CONFIGS.value:
    from bigmodel_jax import cli
    try:
      print(cli.list_configs(), flush=True)
    except UserError as e:
      fail(str(e))
    except BrokenPipeError:
      fail(errors.closed_stdout("before all of it was printed"), code=141)
    return
  if _WORKDIR.value is not None and not _WORKDIR.value.strip():
    fail("--workdir is empty; give the directory for checkpoints and metrics, e.g. --workdir=runs/mnist_cnn")
  if _PRINT_CONFIG.value:
    from bigmodel_jax import cli, config as config_lib
    try:
      config = resolve_config(Path(_WORKDIR.value) if _WORKDIR.value else None)
      config_lib.validate_fields(config, training=_MODE.value == "train")
      cli.print_config(config, next((a.split("=", 1)[1] for a in sys.argv if a.startswith("--config=")),
                                    f"{_WORKDIR.value}/config.json"), Path(_WORKDIR.value) if _WORKDIR.value else None)
    except UserError as e:
      fail(str(e), cause=e.__cause__)
    except BrokenPipeError:
      fail(errors.closed_stdout("before all of it was printed"), code=141)
    return
  if _WORKDIR.value is None:
    fail("--workdir is required (where checkpoints and metrics go)")
  try:
    setup = distributed.distributed_setup(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value,
                                          _DISTRIBUTED_TIMEOUT.value)  # before the slow imports: fails at once
  except UserError as e:
    fail(str(e))
  from bigmodel_jax import config as config_lib, evaluate, sample, train
  workdir = Path(_WORKDIR.value)
  if _MODE.value == "train" and _OUTPUT_DIR.value is not None:
    fail("--output_dir is for the modes on a checkpoint (eval, predict, sample, export, serve, quantize); training "
         "writes into its --workdir")
  if _MODE.value == "train" and _CHECKPOINT_STEP.value is not None:
    fail("--checkpoint_step is for the modes on a checkpoint (eval, predict, sample, export, serve, quantize); training always resumes from the latest checkpoint")
  built = False  # the run's own config has been validated and its model built (later errors are not about it)
  try:
    config = resolve_config(workdir)  # first: a typo fails at once, not after waiting for the other processes
    # before anything below touches a JAX backend (validate counts devices)
    distributed.initialize(setup, config, _DISTRIBUTED_TIMEOUT.value, f"{_MODE.value} {_CHECKPOINT_STEP.value}")
    if _MODE.value != "train" and "mesh" in config:
      refitted = config_lib.fit_mesh(config)  # e.g. a pod run's checkpoint evaluated on a laptop
      if refitted:
        logging.warning("%s", refitted)
    config_lib.validate(config, training=_MODE.value == "train")
    setup_jax(config)
    if _MODE.value == "train":
      result = train.train_and_evaluate(config, workdir)
    elif not (workdir / "checkpoints").is_dir():
      raise UserError(f"--workdir: no checkpoints in {workdir}; train first (--mode=train) or fix the path")
    elif _MODE.value in ("eval", "predict"):  # these read the dataset's splits
      run = train.build_run(config, workdir, for_training=False, output_dir=output_dir(workdir))
      built = True
      try:
        result = {"eval": evaluate.eval_only, "predict": evaluate.predict}[_MODE.value](run, _CHECKPOINT_STEP.value)
      finally:
        run.checkpointer.close()
        run.writer.close()
    else:  # the model rebuilt from the workdir alone (model.json): no dataset is read
      import importlib
      from bigmodel_jax import inference
      model = inference.Inference.load(config, workdir, output_dir(workdir))
      built = True
      try:  # sample.sample, export.export, serve.serve, quantize.quantize
        entry = getattr(importlib.import_module(f"bigmodel_jax.{_MODE.value}"), _MODE.value)
        result = entry(model, _CHECKPOINT_STEP.value)
      finally:
        model.close()
  except NonFiniteLossError as e:
    fail(str(e), code=3)
  except UserError as e:
    fail(str(e) if built else from_run_config(str(e), workdir), cause=e.__cause__)
  except train.Preempted as e:
    signum, message = e.args
    fail(message, code=128 + signum)
  except OSError as e:  # e.g. the disk filled up under a log write
    fail(errors.out_of_space(e, workdir, outputs()) or f"{getattr(e, 'filename', None) or workdir}: {e.strerror or e}",
         cause=e)
  except Exception as e:
    message = errors.out_of_space(e, workdir, outputs())  # orbax's async save reports a full disk as a ValueError
    if message is None:
      raise
    fail(message, cause=e)
  except KeyboardInterrupt:
    fail("interrupted before training started; nothing was saved" if _MODE.value == "train"
         else f"--mode={_MODE.value} interrupted; its outputs may be incomplete", code=130)
  try:
    if "texts" not in result:
      print(json.dumps(evaluate.without_matrices(result), indent=2), flush=True)
    elif not result.get("streamed"):  # a language model's samples: the text itself (one was printed as it came)
      print(sample.SEPARATOR.join(result["texts"]), flush=True)
  except BrokenPipeError:
    fail(errors.closed_stdout("before the result was all written; the files the log names hold all of it"), code=141)


def from_run_config(message: str, workdir: Path) -> str:
  """An error about a config field that a mode on a checkpoint read from the workdir's config.json names that file:
  every field but those set on the command line, and the runtime ones a --config file gives."""
  from bigmodel_jax import argv as argv_lib
  from bigmodel_jax.config import is_runtime_field
  field = re.match(r"config\.([\w.]+): ", message)
  file = workdir / "config.json"
  if (_MODE.value == "train" or not field or not file.is_file() or field.group(1) in argv_lib.overridden_fields(sys.argv)
      or (is_runtime_field(field.group(1)) and argv_lib.flag_value(sys.argv, "config") is not None)):
    return message
  try:  # a field of the run's own config (not of another run it reads, such as a GAN's classifier)
    section = json.loads(file.read_text())
    for part in field.group(1).split("."):
      section = section[part]
  except (OSError, ValueError, KeyError, TypeError):
    return message
  return f"{file}: {message}"


def run():
  """Console script `bigmodel-jax`."""
  from bigmodel_jax import interrupts
  interrupts.install()
  app.run(main, flags_parser=parse_flags)


if __name__ == "__main__":
  run()
