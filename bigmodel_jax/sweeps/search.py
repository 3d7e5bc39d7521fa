"""An Optuna search instead of a grid (the optional extra bigmodel_jax[search]).

The sweep file's search(trial) returns one trial's overrides from trial.suggest_* calls (define-by-run) and
num_trials says how many to run; the study optimizes the validation metric in the sweep's mode. Its state is an
Optuna journal in the workdir (optuna.journal), so running the command again continues the search: trials a
stopped or killed sweep left running are resumed from their own checkpoints first, then new ones are asked.
"""

import inspect
import logging
import os
import math
from pathlib import Path
from typing import Iterator

from bigmodel_jax.errors import UserError, where
from bigmodel_jax.sweeps import trials as trials_lib
from bigmodel_jax.sweeps.spec import Sweep, Trial, leaf_keys, plain, problems, require, trial_name

JOURNAL = "optuna.journal"
NAME_DIGITS = 4  # significant digits of suggested floats in trial names (the trial number keeps names unique)


class Search:
  def __init__(self, sweep: Sweep, workdir: Path, manifest):
    optuna = require("optuna", "search", f"{sweep.path}: search()")
    optuna.logging.set_verbosity(logging.WARNING)
    self.optuna, self.sweep, self.workdir, self.manifest = optuna, sweep, Path(workdir), manifest
    workdir.mkdir(parents=True, exist_ok=True)
    direction = "maximize" if sweep.mode == "max" else "minimize"
    drop_cut_short_line(workdir / JOURNAL)
    try:
      storage = optuna.storages.JournalStorage(optuna.storages.journal.JournalFileBackend(str(workdir / JOURNAL)))
      self.study = optuna.create_study(storage=storage, study_name=sweep.name, load_if_exists=True,
                                       direction=direction)
    except (ValueError, KeyError) as e:  # a line that is no record (a hand edit): optuna's JSONDecodeError, KeyError
      raise UserError(f"--workdir: {workdir / JOURNAL} is damaged ({type(e).__name__}: {e}); restore it, or move it "
                      "away to start the search afresh (finished trials stay in their directories)") from None
    # its trials were told values of this metric; a study from before it was recorded: the one its manifest names
    held = self.study.user_attrs.get("metric") or manifest.data.get("metric") or sweep.metric
    if held != sweep.metric:  # first: another metric may have another direction (accuracy -> loss)
      raise UserError(f"--workdir: {workdir / JOURNAL} holds a search of validation {held}, but {sweep.path} asks for "
                      f"{sweep.metric} (metric changed since?); its trials' values are {held}: use another --workdir")
    if self.study.direction.name.lower() != direction:  # a study keeps the direction it was created with
      raise UserError(f"--workdir: {workdir / JOURNAL} holds a search that {self.study.direction.name.lower()}s "
                      f"{sweep.metric}, but {sweep.path} asks to {direction} it (mode changed since?); use another "
                      "--workdir")
    self.study.set_user_attr("metric", sweep.metric)
    self.study.sampler = self._sampler(len(self.study.trials))
    self._adopt()

  def _adopt(self) -> None:
    """The study's named trials that the manifest lacks (it was moved away or lost): back in it, as the study ended
    them (the sweep's sync then finds the finished ones done on disk). A trial this sweep did not record (made by
    another tool, or cut short between its name and its overrides) is left out, said in one warning line."""
    states = self.optuna.trial.TrialState
    foreign = []
    for frozen in self.study.get_trials(deepcopy=False):
      trial = recorded(frozen)
      if trial is None:  # an unnamed failed one is this sweep's, refused at ask; trials() ends the running ones
        foreign += [str(frozen.number)] if frozen.state != states.RUNNING and (
            frozen.user_attrs or frozen.state != states.FAIL) else []
      elif trial.name not in self.manifest.trials:
        self.manifest.add(trial)
        self.manifest.trials[trial.name]["status"] = {states.FAIL: "failed", states.PRUNED: "pruned"}.get(
            frozen.state, "interrupted")
    if foreign:
      logging.warning("%s: trial(s) %s of its study hold no name and overrides of this sweep (added by another "
                      "tool?): left out of the manifest and the report", self.workdir / JOURNAL, ", ".join(foreign))

  def _sampler(self, asked: int):
    """A sampler whose draws continue the study: one seeded as at the study's start would ask the trials of the
    first launch again, and the report would count those repeats as more runs of one setting. The default is TPE
    seeded with the number of trials asked before this launch; sampler(asked) gets that number; a sampler() without
    it is reseeded at random when the study goes on."""
    if self.sweep.sampler is None:
      return self.optuna.samplers.TPESampler(seed=asked)
    try:
      inspect.signature(self.sweep.sampler).bind(asked)
      takes_count = True
    except TypeError:
      takes_count = False
    sampler = self.sweep.sampler(asked) if takes_count else self.sweep.sampler()
    if asked and not takes_count:
      sampler.reseed_rng()
    return sampler

  def trials(self) -> Iterator[Trial]:
    """Trials left running by an earlier sweep (resumed), then new ones until the study has num_trials."""
    running = self.optuna.trial.TrialState.RUNNING
    for frozen in self.study.get_trials(deepcopy=False, states=(running,)):
      trial = recorded(frozen)
      if trial is None:  # asked, but the sweep died before naming it (or not asked by this sweep)
        self.study.tell(frozen.number, state=self.optuna.trial.TrialState.FAIL)
        continue
      self.manifest.add(trial)
      if trials_lib.is_done(self.workdir / trial.name):  # it finished just before the sweep stopped
        self.manifest.update(trial.name, status="done")
        self.tell(trial, "done")
        continue
      yield trial
    # trials that were run count: one whose search(trial) failed or was refused (a bug in the sweep file, fixed
    # before the relaunch) or that was never named is asked again, so the study can still reach num_trials
    while sum(recorded(t) is not None for t in self.study.get_trials(deepcopy=False)) < self.sweep.num_trials:
      yield self._ask()

  def _ask(self) -> Trial:
    asked = self.study.ask()
    try:
      overrides = {k: plain(v) for k, v in self.sweep.search(asked).items()}
    except Exception as e:
      self.study.tell(asked, state=self.optuna.trial.TrialState.FAIL)
      raise UserError(f"{self.sweep.path}: search(trial) failed on trial {asked.number} {where(e)}") from e
    bad = problems(self.sweep.config, overrides, leaf_keys(self.sweep.config), self.sweep.base)
    if bad:
      self.study.tell(asked, state=self.optuna.trial.TrialState.FAIL)
      raise UserError(f"{self.sweep.path}: search(trial), trial {asked.number}: {bad[0]}")
    labels = {k: self.sweep.label(k) for k in overrides}
    self.manifest.data.setdefault("labels", {}).update(labels)
    trial = Trial(trial_name(overrides, labels, NAME_DIGITS, prefix=f"{asked.number:03d},"), overrides, asked.number)
    asked.set_user_attr("overrides", {k: list(v) if isinstance(v, tuple) else v for k, v in overrides.items()})
    asked.set_user_attr("name", trial.name)  # last: a named trial has its overrides
    self.manifest.add(trial)
    return trial

  def tell(self, trial: Trial, status: str) -> None:
    """A trial's end -> the study: its validation value, or failed / pruned. Interrupted trials stay running
    in the study (the next sweep resumes them)."""
    states = self.optuna.trial.TrialState
    if status == "done":
      final = trials_lib.read_json(self.workdir / trial.name / trials_lib.FINAL) or {}
      value = trials_lib.selection(final, self.sweep.metric, self.sweep.mode)[0]
      if value is not None and math.isfinite(value):
        self.study.tell(trial.number, value)
      else:
        self.study.tell(trial.number, state=states.FAIL)
    elif status in ("failed", "pruned"):
      self.study.tell(trial.number, state=states.FAIL if status == "failed" else states.PRUNED)


def recorded(frozen) -> Trial | None:
  """The trial this sweep recorded in a study's trial (its name, a directory in the workdir, and its overrides), or
  None where it holds no such pair: asked but never named, or added to the study by another tool."""
  name, overrides = frozen.user_attrs.get("name"), frozen.user_attrs.get("overrides")
  if not isinstance(name, str) or Path(name).name != name or name in ("", ".", "..") or not isinstance(overrides, dict):
    return None
  return Trial(name, {k: plain(v) for k, v in overrides.items()}, frozen.number)


def drop_cut_short_line(journal: Path) -> None:
  """Drops the journal's last line where it is cut short (the sweep killed, or the disk full, mid-write): optuna
  reads past it, but appends the next record to it, and the journal no longer reads. (The sweep's lock is held: no
  other process is writing it.)"""
  if not journal.is_file() or not journal.stat().st_size:
    return
  with open(journal, "rb") as f:
    f.seek(-1, os.SEEK_END)
    if f.read(1) == b"\n":
      return
    f.seek(0)
    keep = f.read().rfind(b"\n") + 1
  os.truncate(journal, keep)
  logging.warning("%s: its last line was cut short (the sweep stopped mid-write); dropped it (an unfinished record)",
                  journal)
