"""A run's workdir: whether it has checkpoints, the config it was trained with, one training run at a time, and
workdirs written before validation splits."""

import contextlib
import errno
import fcntl
import json
import os
from pathlib import Path

from absl import logging

from bigmodel_jax import config as config_lib, run_config
from bigmodel_jax.errors import UserError, refuse_other_workdir


def has_checkpoints(workdir: Path) -> bool:
  """True once a checkpoint has been committed (orbax renames a step directory into place when complete)."""
  directory = workdir / "checkpoints"
  return directory.is_dir() and any(p.name.isdigit() for p in directory.iterdir())


def saved_config(workdir: Path) -> dict | None:
  path = workdir / "config.json"
  if not path.exists():
    return None
  return run_config.load(path, "move the workdir away")


def adopt_legacy_config(workdir: Path, config) -> bool:
  """A run from before validation splits (its config.json has no `evals`) goes on as it was: trained on the whole
  training split, evaluated on the split it called test, selecting nothing (there is no validation split to select
  on). Its config.json is kept as it was, so every relaunch is adopted alike. -> whether it is such a run."""
  path = workdir / "config.json"
  if not path.exists() or not has_checkpoints(workdir):
    return False
  try:
    raw = json.loads(path.read_text())
  except (OSError, json.JSONDecodeError, UnicodeDecodeError):
    return False  # saved_config says what is wrong with it
  if "evals" in raw:
    return False
  legacy = run_config.legacy_fields(raw)
  config.data.validation_fraction = legacy["data"]["validation_fraction"]
  config.train.best_eval = legacy["train"]["best_eval"]
  config.train.early_stopping.patience = legacy["train"]["early_stopping"]["patience"]
  config.evals = legacy["evals"]
  logging.warning("%s predates validation splits: it continues on the whole training split, evaluating test only "
                  "and selecting no best checkpoint", workdir)
  return True


def check_workdir(workdir: Path, config) -> None:
  """A workdir with checkpoints belongs to one config: refuse to continue it with a different one."""
  if workdir.exists() and not workdir.is_dir():
    raise UserError(f"--workdir: {workdir} exists and is not a directory")
  if (workdir / "checkpoints").exists() and not (workdir / "checkpoints").is_dir():  # found at the first save
    raise UserError(f"--workdir: {workdir / 'checkpoints'} is not a directory, but a run keeps its checkpoints "
                    "there; move it away or use another --workdir")
  refuse_other_workdir(workdir, "a training run")
  diffs = resume_differences(workdir, config)
  if diffs:
    raise UserError(f"{workdir} holds a run with a different config ({'; '.join(diffs)}); use a new --workdir "
                    "or pass --config.train.allow_config_change=true to continue it anyway")


def resume_differences(workdir: Path, config) -> list[str]:
  """How `config` differs from the config of the checkpointed run in `workdir` where continuing it would mix them
  ([] if it may continue: no run, no checkpoint, the same config or train.allow_config_change)."""
  saved = saved_config(workdir)
  if saved is None or not has_checkpoints(workdir) or config.train.allow_config_change:
    return []
  t = config.train  # with early stopping, the selection evaluator's cadence decides where training stops
  counted = (f"evals.{t.best_eval}.",) if t.best_eval and t.early_stopping.patience > 0 else ()
  from bigmodel_jax.tasks import TASKS
  task = TASKS.get(config.task.name)
  counted += task.scored_by  # a GAN's quality classifier
  current = task.as_compared(json.loads(config.to_json_best_effort()))
  return [d for d in run_config.config_differences(task.as_compared(saved), current, counted)
          if not (d.startswith("data.path:") and path_is_guarded(workdir))]


def path_is_guarded(workdir: Path) -> bool:
  """A run with a data fingerprint may read its text from another path: the fingerprint checks it is the same."""
  from bigmodel_jax.data import fingerprint
  return (workdir / fingerprint.FILE).is_file()


def lock_workdir(workdir: Path):
  """One training run per workdir: an flock the OS drops when the process dies, even by SIGKILL.

  Taken before orbax opens the checkpoint directory, which would clean up a live run's in-flight save.
  """
  path = workdir / ".train.lock"
  try:
    lock = open(path, "a+")
  except OSError as e:  # a directory or an unwritable file where the lock goes
    if not path.is_dir() and not os.access(workdir, os.W_OK) or e.errno == errno.EROFS:
      raise UserError(f"--workdir: {workdir} is not writable ({e.strerror}); training writes its checkpoints there: "
                      "use a writable --workdir (eval/predict/sample read one with --output_dir)") from None
    raise UserError(f"{path}: cannot be opened as the workdir's lock file ({e.strerror}); remove it if no run "
                    "is using the workdir (it holds the pid of the run that owns it)") from None
  return hold_lock(lock, lambda owner: UserError(
      f"--workdir: {workdir} is in use by another training run (pid {owner}); wait for it to finish or stop it, or "
      "use another --workdir"))


def first_missing(path: Path) -> Path | None:
  """The outermost directory of `path` (itself or a parent) that does not exist yet: what a mkdir would create."""
  missing, path = None, Path(os.path.abspath(path))  # "a/../b" is b: never a directory that existed
  while not path.exists() and path != path.parent:
    missing, path = path, path.parent
  return missing


def drop_new_workdir(workdir: Path, lock, created: Path) -> None:
  """A launch refused after it created `workdir` (and the parents up to `created`, first_missing) and took its lock:
  the lock file (unlinked while still held: no other launch takes it in between), then the directories if empty."""
  (workdir / ".train.lock").unlink(missing_ok=True)
  lock.close()
  workdir = Path(os.path.abspath(workdir))  # as first_missing named `created`
  with contextlib.suppress(OSError):
    for directory in (workdir, *workdir.parents):
      directory.rmdir()
      if directory == created:
        break


def hold_lock(lock, refuse, take: bool = True):
  """`lock`, an open file, flocked for this process with its pid written in it (the OS drops an flock when the
  process dies, even by SIGKILL) -> lock. Held by another process: raises refuse(that process's pid). take=False
  only asks (None: free), and leaves the file as it was: `lock` may be open for reading only; it is closed."""
  try:
    fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
  except OSError:
    lock.seek(0)
    raise refuse(lock.read().strip() or "?") from None
  if not take:
    return lock.close()
  lock.truncate(0)
  lock.write(str(os.getpid()))
  lock.flush()
  return lock


def use_run_config(workdir: Path, given, overridden: list[str], mode: str):
  """The config --mode=eval/predict/sample runs: the workdir's config.json, so a run's training overrides need not
  be repeated. Fields that change how it is used, not what it computed (sample.*, predict.*, evals.*,
  data.eval_batch_size, mesh.*: config.RUNTIME_FIELDS) come from `given` (the --config file, or the config.json with
  the command line's fields applied); a command-line field that would change what the run computed is refused."""
  import ml_collections
  saved = saved_config(workdir)
  if saved is None:
    if given is None:
      raise UserError(f"--workdir: no config.json in {workdir}; fix the path, or pass --config")
    return given  # a workdir without a record (written by hand): --config describes it
  if given is None:
    return ml_collections.ConfigDict(run_config.as_config_values(saved))
  before = config_lib.flatten(saved)
  after = config_lib.flatten(json.loads(given.to_json_best_effort()))
  differs = lambda key: before.get(key, "<absent>") != after.get(key, "<absent>")
  for field in overridden:
    changed = [k for k in after if (k == field or k.startswith(field + ".")) and differs(k)]
    guarded = changed and changed[0] == "data.path" and path_is_guarded(workdir)
    if changed and not config_lib.is_runtime_field(changed[0]) and not guarded:
      key = changed[0]
      raise UserError(f"--config.{field}: --mode={mode} uses the run as it was trained ({key}="
                      f"{before.get(key, '<absent>')!r} in {workdir / 'config.json'}); here only fields that do "
                      "not change what it computed can be set (sample.*, predict.*, evals.*, data.eval_batch_size, "
                      "mesh.*, model.attention, ...); to train another variant, use --mode=train with a new --workdir")
  given_here = lambda k: any(k == f or k.startswith(f + ".") for f in overridden)
  # a runtime field of another model's (a GPT config's model.attention given for an LSTM run): not this run's
  foreign = lambda k: k.startswith("model.") and k not in before and not given_here(k)
  movable = lambda k: (config_lib.is_runtime_field(k) and not foreign(k)) or (k == "data.path" and
                                                                              path_is_guarded(workdir))
  ignored = sorted(k for k in set(before) | set(after) if differs(k) and not movable(k))
  if ignored:
    logging.warning("--config differs from %s in %d field(s) (%s%s); --mode=%s uses the run's own values",
                    workdir / "config.json", len(ignored), ", ".join(ignored[:3]), ", ..." if len(ignored) > 3 else "",
                    mode)
  merged = json.loads(json.dumps(saved))
  for key, value in after.items():
    if movable(key):
      *parents, leaf = key.split(".")
      section = merged
      for part in parents:
        section = section.setdefault(part, {})
      section[leaf] = value
  return ml_collections.ConfigDict(run_config.as_config_values(merged))  # JSON's lists as the config's tuples


OUTPUTS_RECORD = "outputs_of.json"  # in an --output_dir: the run whose eval/predict/sample outputs it holds


def claim_output_dir(run, mode: str) -> None:
  """An --output_dir holds one run's eval/predict/sample outputs: its eval_step<N>.json are replaced by a later eval
  of the same step and its metrics.jsonl appended to, so a second run's would mix with them without a word. Called
  by every process just before the mode's first output (its checks passed): process 0 records the run
  (OUTPUTS_RECORD) on first use and refuses, for all processes, another run's directory or one with outputs and no
  record, in one line. export/ and quantized/ have their own records (errors.made_by)."""
  import jax
  from bigmodel_jax import distributed, errors, runinfo
  target, workdir = run.output_dir, run.workdir
  if target is None or errors.same_directory(str(target.resolve()), workdir):  # the run's own outputs
    return
  refused = ""
  if jax.process_index() == 0:
    record, metrics = target / OUTPUTS_RECORD, target / "metrics.jsonl"  # metrics: opened at build, empty till used
    writer = errors.recorded_workdir(record)
    outputs = any((target / name).exists() for name in ("samples", "tensorboard")) or any(
        target.glob("eval_step*.json")) or any(target.glob("predict_step*")) or (
        metrics.exists() and (not metrics.is_file() or metrics.stat().st_size > 0))
    if found := errors.workdir_record(target):  # a run's (or a sweep's) outputs or not, e.g. a converted run's
      refused = f"--output_dir: {target} is another run's workdir ({found[1].rstrip('/')} of {found[0]}); " \
                f"--mode={mode}'s outputs would mix with its own: pass another --output_dir"
    elif not writer and not outputs:  # none yet, or a damaged one with nothing beside it
      try:
        runinfo.write_text_atomic(record, json.dumps({"workdir": str(workdir.resolve())}) + "\n")
      except OSError as e:  # said on every process, not only this one's
        refused = f"--output_dir: cannot write {record} ({e.strerror}); pass a writable --output_dir"
    elif not errors.same_directory(writer, workdir):
      whose = (f"another run's outputs ({writer})" if writer else
               f"outputs whose {OUTPUTS_RECORD} does not name this run (another run's, or written before such a "
               f"record was; if they are this run's, write {{\"workdir\": \"{workdir.resolve()}\"}} into {record})")
      refused = f"--output_dir: {target} holds {whose}; --mode={mode}'s would replace or mix with them: pass another " \
                "--output_dir"
  refused = distributed.chief_decides(refused)
  if refused:
    raise UserError(refused)
