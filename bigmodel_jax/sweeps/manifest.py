"""The sweep manifest (manifest.json in the sweep workdir): which sweep this is and every trial's status.

A workdir belongs to one sweep: one base config with one set of fixed overrides. The sweep file may change
(trials added run next time; removed ones stay, marked as not in the current sweep); another base is refused.
"""

import dataclasses
import json
import time
from pathlib import Path

from bigmodel_jax.errors import UserError, refuse_other_workdir
from bigmodel_jax.sweeps import trials as trials_lib
from bigmodel_jax.sweeps.spec import Sweep, Trial
from bigmodel_jax.workdir import hold_lock

MANIFEST, LOCK = "manifest.json", ".sweep.lock"
# trial statuses: pending (never ended a launch), running, done, failed, interrupted (resumable), pruned (stopped by
# a scheduler such as ASHA: kept as it is, not resumed)
RUN_AGAIN = ("pending", "running", "failed", "interrupted")
RESUMED = ("pending", "running", "interrupted")  # a search's: the study holds them running


def _jsonable(value):
  return json.loads(json.dumps(value))


def identity(sweep: Sweep) -> dict:
  """What may not change within one workdir."""
  return {"kind": sweep.kind, "base": sweep.base, "overrides": _jsonable(sweep.overrides)}


def other_config(sweep: Sweep, directory: Path, overrides: dict) -> list[str]:
  """How the config a trial's directory ran with (its config.json) differs from the one `sweep` gives it now
  (runtime fields aside); [] where it cannot tell (no readable config.json)."""
  from bigmodel_jax import run_config
  from bigmodel_jax.sweeps.spec import trial_config
  try:
    saved = run_config.load(Path(directory) / "config.json", "")
  except UserError:
    return []
  config, _ = trial_config(sweep, overrides)
  return run_config.config_differences(saved, json.loads(config.to_json_best_effort()), run_config.RESULT_FIELDS)


def _checked(data: dict, path: Path, for_report: bool) -> dict:
  """A manifest's contents, if they have the shape this version writes (a hand edit is one line, not a traceback);
  `for_report`: also the metric and mode a report ranks by (a launch records them from the sweep file)."""
  trials = data.get("trials")
  problem = None
  labels = data.get("labels", {})
  if not isinstance(trials, dict) or not all(isinstance(e, dict) and isinstance(e.get("status"), str)
                                             and isinstance(e.get("overrides"), dict) for e in trials.values()):
    problem = "its trials are not objects with a status and overrides"
  elif not isinstance(data.get("identity", {}), dict):
    problem = "its identity is not an object"
  elif not (isinstance(labels, dict) and all(isinstance(v, str) for v in labels.values())):
    problem = "its labels are not names"
  elif for_report and not (isinstance(data.get("metric"), str) and data.get("mode") in ("max", "min")):
    problem = "no metric and mode"
  if problem:
    raise UserError(f"{path}: not a sweep manifest this version reads ({problem}); restore it, or move it away and "
                    "launch the sweep file again (finished trials are found in their directories)")
  return data


class Manifest:
  def __init__(self, workdir: Path, data: dict):
    self.workdir, self.data = Path(workdir), data

  @property
  def trials(self) -> dict:
    return self.data["trials"]

  @classmethod
  def load(cls, workdir: Path) -> "Manifest":
    data = trials_lib.read_json(Path(workdir) / MANIFEST)
    if data is None:
      raise UserError(f"--workdir: no sweep in {workdir} (no readable {MANIFEST}); run a sweep file there first")
    return cls(workdir, _checked(data, Path(workdir) / MANIFEST, for_report=True))

  @classmethod
  def open(cls, workdir: Path, sweep: Sweep) -> "Manifest":
    """The workdir's manifest for `sweep` (a new one for a new workdir). Refuses a workdir holding another
    sweep, a single training run or reproductions. Writes nothing."""
    workdir = Path(workdir)
    if workdir.exists() and not workdir.is_dir():
      raise UserError(f"--workdir: {workdir} exists and is not a directory")
    path = workdir / MANIFEST
    if not path.exists():
      refuse_other_workdir(workdir, "a sweep")  # a run's config.json or checkpoints, reproductions' report.json
      return cls(workdir, {"identity": identity(sweep), "trials": {}})
    data = trials_lib.read_json(path)
    if data is None:
      raise UserError(f"--workdir: {path} is not valid JSON; move it away (the trials' directories are intact)")
    held, wanted = _checked(data, path, for_report=False).get("identity", {}), identity(sweep)
    if held != wanted:
      diffs = "; ".join(f"{k}: {held.get(k)!r} here, {wanted[k]!r} in {sweep.path}" for k in wanted
                        if held.get(k) != wanted[k])
      raise UserError(f"--workdir: {workdir} holds a different sweep ({diffs}); use another --workdir")
    manifest = cls(workdir, data)
    manifest.keep_names(sweep)
    return manifest

  def keep_names(self, sweep: Sweep) -> None:
    """A grid's trial that this workdir holds under another name (the same overrides in another key order: the
    sweep's axes reordered, or other labels) keeps that name, so it is found done rather than run again. A trial
    is the same by its overrides, whatever their order; its name is the one it was first given."""
    if sweep.trials is None:
      return
    key = lambda overrides: json.dumps(_jsonable(overrides), sort_keys=True)
    held, names = {key(e["overrides"]): name for name, e in self.trials.items()}, {t.name for t in sweep.trials}
    sweep.trials = [dataclasses.replace(t, name=held[key(t.overrides)])
                    if held.get(key(t.overrides)) not in (None, *names) else t for t in sweep.trials]

  def lock(self):
    """One sweep process per workdir (an flock the OS drops when the process dies)."""
    self.workdir.mkdir(parents=True, exist_ok=True)
    return hold_lock(open(self.workdir / LOCK, "a+"), lambda pid: UserError(
        f"--workdir: {self.workdir} is in use by another sweep (pid {pid}); wait for it or stop it"))

  def sync(self, sweep: Sweep) -> list[Trial]:
    """Records the sweep file and which trials are in it, with their status on disk -> the trials to run
    (a grid's: those not finished; a search asks its own)."""
    self.data.update(sweep_file=str(sweep.path.resolve()), sweep_sha256=sweep.sha256, name=sweep.name,
                     variant=sweep.variant, metric=sweep.metric, mode=sweep.mode,
                     eval=sweep.config.train.best_eval or "validation", labels=sweep.labels,
                     updated=time.strftime("%Y-%m-%dT%H:%M:%S%z"))
    current = {t.name for t in sweep.trials or []}
    for name, entry in self.trials.items():
      entry["in_sweep"] = name in current if sweep.kind == "grid" else True
    for trial in sweep.trials or []:
      self.add(trial)
    for name, entry in self.trials.items():
      if trials_lib.is_done(self.workdir / name):
        entry["status"] = "done"
      elif entry["status"] == "done":  # its directory was removed or replaced: run it again
        entry["status"] = "pending"
    for name, entry in self.trials.items():  # a done trial is skipped: it must be the run this sweep would make
      diffs = other_config(sweep, self.workdir / name, entry.get("overrides") or {}) if (
          entry["status"] == "done" and entry.get("in_sweep")) else []
      # one cut short that is run again (a search's study resumes those left running, never a failed one): main
      # refuses to continue it
      if entry["status"] in (RUN_AGAIN if sweep.kind == "grid" else RESUMED) and entry.get("in_sweep"):
        from bigmodel_jax.sweeps.spec import trial_config
        from bigmodel_jax.workdir import adopt_legacy_config, resume_differences
        config = trial_config(sweep, entry.get("overrides") or {})[0]
        adopt_legacy_config(self.workdir / name, config)  # as main does before its check
        diffs = resume_differences(self.workdir / name, config)
      if diffs:
        more = f"; ... ({len(diffs)} fields)" if len(diffs) > 3 else ""
        done = "finished" if entry["status"] == "done" else "stopped unfinished"
        raise UserError(f"--workdir: trial {name} {done} with another config than {sweep.path} gives it now "
                        f"({'; '.join(diffs[:3])}{more}): the base config or the sweep changed since; use another "
                        f"--workdir, or move {self.workdir / name} away to run it again")
    self.save()
    return [t for t in sweep.trials or [] if self.trials[t.name]["status"] in RUN_AGAIN]

  def add(self, trial: Trial) -> None:
    entry = self.trials.setdefault(trial.name, {"status": "pending", "error": "", "wall_s": 0.0, "launches": 0})
    entry.update(overrides=_jsonable(trial.overrides), in_sweep=True)
    if trial.number is not None:
      entry["number"] = trial.number

  def update(self, name: str, **fields) -> None:
    self.trials[name].update(fields)
    self.save()

  def save(self) -> None:
    from bigmodel_jax.runinfo import write_text_atomic
    self.workdir.mkdir(parents=True, exist_ok=True)
    write_text_atomic(self.workdir / MANIFEST, json.dumps(self.data, indent=2) + "\n")
