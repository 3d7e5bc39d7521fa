"""Reproductions of published results, run as ordinary training runs and judged in a report card.

    python -m bigmodel_jax.reproduce --list
    python -m bigmodel_jax.reproduce linear_regression digits_mlp --workdir=runs/reproduce
    python -m bigmodel_jax.reproduce shakespeare_char_gpt_cpu --workdir=runs/reproduce --override=data.path=/data/in.txt
    python -m bigmodel_jax.reproduce --readme runs/reproduce/report.json     # the README's results table

Each reproduction is declared once, in experiments/reproductions.py: a config (and variant), overrides, the
metrics of final_metrics.json it is judged on with the published target and its source, what it needs (cpu,
gpu, network) and its seeds. Each seed is one `python -m bigmodel_jax.main` process in WORKDIR/<name>/seed_<k>,
so relaunching resumes unfinished runs and skips finished ones. WORKDIR/report.json and report.md hold the
card: target against the mean over seeds (± std, n, each seed's value) and PASS, FAIL (target missed),
SKIPPED (no GPU, or data to fetch with its host unreachable) or ERROR (a run failed: its error line), merged
with the earlier results of other reproductions in that workdir (a skip keeps an earlier result).
Exit status: 0 when every reproduction run passed or was skipped, 1 when one failed or errored, 2 bad input;
after Ctrl-C or SIGTERM the running seed saves a checkpoint (the same command resumes it) and the tool exits 130/143."""

import argparse
import functools
import json
import os
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

from bigmodel_jax import errors
from bigmodel_jax.errors import UserError, refuse_other_workdir, writable_directory
from bigmodel_jax.reproduction import (REGISTRY, ROOT, BadInput, Reproduction, as_launched, callers_path,
                                       flag_value, invalid_overrides, load_config, load_registry, lock_workdir,
                                       metric_value, missing_field, same_flags, skip_reason, wrong_type)
from bigmodel_jax.report_card import markdown_table, read_report, write_report

# --- what a reproduction needs (skip_reason: reproduction.py) ------------------------------------------------


def accelerator() -> str:
  """jax's default backend, asked in a subprocess (so this process holds no device memory the runs need)."""
  try:
    proc = subprocess.run([sys.executable, "-c", "import jax; print(jax.default_backend())"],
                          capture_output=True, text=True, timeout=300, env=run_env())
  except subprocess.TimeoutExpired:
    return "not known: `import jax; jax.default_backend()` did not finish in 300 s"
  if proc.returncode == 0 and proc.stdout.strip():
    return proc.stdout.strip().splitlines()[-1]
  why = proc.stderr.strip().splitlines()[-1:] or [f"exit {proc.returncode}"]
  return f"not known: `import jax; jax.default_backend()` failed ({why[0][:200]})"


# --- running ------------------------------------------------------------------------------------------------


def run_env() -> dict:
  """The environment of every run: this checkout's package first on the path, so the runs are this code."""
  path = os.environ.get("PYTHONPATH", "")
  return {**os.environ, "PYTHONPATH": str(ROOT) + (os.pathsep + path if path else ""), "PYTHONUNBUFFERED": "1"}


def seed_command(r: Reproduction, seed: int, workdir: Path, overrides: dict) -> list[str]:
  fields = {**r.overrides, **overrides, "seed": seed}
  return [sys.executable, "-m", "bigmodel_jax.main", f"--config={r.config}", f"--workdir={workdir}",
          *(f"--config.{k}={flag_value(v)}" for k, v in fields.items())]


def shell(argv: list[str]) -> str:
  return " ".join(["python", *argv[1:]])


def error_line(log: Path, offset: int) -> str:
  """The run's 'error: ...' line in its log since `offset` (else its last line)."""
  with open(log, errors="replace") as f:
    f.seek(offset)
    lines = [line.strip() for line in f.read().splitlines() if line.strip()]
  errors = [line for line in lines if line.startswith("error:")]
  return (errors or lines or ["(no output)"])[-1][:300]


class Interrupted(Exception):
  """The tool was stopped (Ctrl-C, SIGTERM) while a run was going; the run saved its checkpoint."""


def seed_dirs(r: Reproduction, workdir: Path, num_seeds: int | None) -> list[tuple[int, Path]]:
  """(seed, its run's workdir) of the seeds that run (--seeds=N: the first N)."""
  return [(seed, workdir / r.name / f"seed_{seed}") for seed in (r.seeds[:num_seeds] if num_seeds else r.seeds)]


def run_flags(argv: list[str]) -> list[str]:
  """A seed's command-line flags as its record keeps them (its workdir aside)."""
  return [a for a in argv[3:] if not a.startswith("--workdir=")]


def finished(workdir: Path) -> dict | None:
  """The run's final_metrics.json, or None while it has none that reads as one (cut short, damaged: a relaunch of
  the finished run evaluates it again and rewrites it)."""
  from bigmodel_jax.sweeps.trials import read_json
  return read_json(workdir / "final_metrics.json")


def other_settings(argv: list[str], workdir: Path) -> str:
  """The flags a finished run in `workdir` was made with, where they are not `argv`'s in any order ("" otherwise)."""
  record_path = workdir / "reproduce.json"
  if not finished(workdir) or not record_path.is_file():
    return ""
  try:
    made = json.loads(record_path.read_text()).get("flags")
  except (OSError, ValueError, AttributeError):
    return ""  # run_seed reads it again and says what is wrong
  return " ".join(made) if isinstance(made, list) and not same_flags(made, run_flags(argv)) else ""


def other_config(r: Reproduction, seed: int, workdir: Path, overrides: dict) -> str:
  """How the config.json of a finished run in `workdir` differs from the config r.config gives now, in the fields
  its flags do not set (other_settings compares those): an edited config file ("" if none, or no config.json). A
  run without the tool's record (reproduce.json: trained by hand) has no flags on record: every field counts."""
  from bigmodel_jax import cli, run_config
  if not finished(workdir):
    return ""
  try:
    saved = run_config.load(workdir / "config.json", "")
  except UserError:
    return ""
  given = [*r.overrides, *overrides, "seed"]
  config = load_config(r.config)
  if (workdir / "reproduce.json").is_file():
    cli.resolve_overrides(config, given)  # as main resolves the same flags
  else:
    config, given = as_launched(config, {**r.overrides, **overrides, "seed": seed})[0], []
  diffs = run_config.config_differences(saved, json.loads(config.to_json_best_effort()), run_config.RESULT_FIELDS)
  return "; ".join(d for d in diffs if d.partition(":")[0] not in given)


def other_resume(r: Reproduction, seed: int, workdir: Path, overrides: dict) -> str:
  """Why main would refuse to resume the unfinished run in `workdir` with the config of this seed's flags: the run
  holds another config (a relaunch with another --override) ("" if it would resume it, or there is none)."""
  from bigmodel_jax.workdir import adopt_legacy_config, check_workdir
  if not workdir.is_dir() or finished(workdir):
    return ""
  config, _ = as_launched(load_config(r.config), {**r.overrides, **overrides, "seed": seed})
  try:
    adopt_legacy_config(workdir, config)  # as main does before its check
    check_workdir(workdir, config)
  except UserError as e:
    return str(e).replace("--config.", "--override=")
  return ""


def run_seed(argv: list[str], workdir: Path) -> dict:
  """Runs (or resumes) one seed; finished runs are not relaunched. -> its record (workdir/reproduce.json), with
  "error" when the run failed or was made with other flags."""
  from bigmodel_jax.sweeps.trials import read_json, wait_for_lock, wrappers
  record_path = workdir / "reproduce.json"
  record = read_json(record_path) or {"wall_s": 0.0, "launches": 0}  # none yet, or one cut short: counted afresh
  command, flags = shell(argv), run_flags(argv)
  if finished(workdir):
    other = other_settings(argv, workdir)  # main() refuses these up front; a record changed since lands here
    if other:
      return {**record, "error": f"it was run with {other}, not {' '.join(flags)}; use another --workdir for other "
                                 "settings"}
    return record
  workdir.mkdir(parents=True, exist_ok=True)
  wait_for_lock(workdir)  # the run of a launch that was killed outright: it got SIGTERM (below) and may be saving
  log = workdir / "reproduce.log"  # this launch's part of it starts after what that run wrote while saving
  offset = log.stat().st_size if log.is_file() else 0
  start = time.time()
  with open(log, "a") as out:  # the run gets SIGTERM if this process dies (SIGKILL, OOM): it saves and stops
    proc = subprocess.Popen(wrappers() + argv, cwd=ROOT, env=run_env(), stdout=out, stderr=subprocess.STDOUT)
    try:
      proc.wait()
    except Interrupted:
      proc.send_signal(signal.SIGTERM)  # main saves a checkpoint and exits 143: a relaunch resumes
      proc.wait()
      raise
    except KeyboardInterrupt:  # the terminal's Ctrl-C reached the run too: it saves and exits 130
      proc.wait()
      raise Interrupted(130) from None
    finally:
      record = {"command": command, "flags": flags, "wall_s": record.get("wall_s", 0.0) + time.time() - start,
                "launches": record.get("launches", 0) + 1, "returncode": proc.returncode}
      from bigmodel_jax.runinfo import write_text_atomic
      write_text_atomic(record_path, json.dumps(record, indent=2) + "\n")
  return {**record, "error": f"exit {proc.returncode}: {error_line(log, offset)}"} if proc.returncode else record


def reproduce(r: Reproduction, workdir: Path, overrides: dict, num_seeds: int | None, backend,
              dry_run: bool = False) -> dict:
  """Runs `r`'s seeds (or says why not) and judges its targets -> its report entry."""
  entry = {"name": r.name, "config": r.config, "overrides": {**r.overrides, **overrides}, "source": r.source,
           "needs": list(r.needs), "note": r.note, "seeds_declared": len(r.seeds),
           "targets": [{"split": t.split, "metric": t.metric, "label": t.label, "bound": t.bound} for t in r.targets],
           "runs": [], "time": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
  reason, hint = skip_reason(r, overrides, backend)
  if reason:
    print(f"{r.name}: SKIPPED: {reason}; {hint}", flush=True)
    return {**entry, "status": "SKIPPED", "reason": reason, "hint": hint}
  errors = {}  # message -> seeds
  for seed, seed_dir in seed_dirs(r, workdir, num_seeds):
    argv = seed_command(r, seed, seed_dir, overrides)
    if dry_run:
      print(shell(argv), flush=True)
      continue
    done = finished(seed_dir)
    print(f"{r.name} seed {seed}: {'finished earlier' if done else 'running'} ({seed_dir})", flush=True)
    record = run_seed(argv, seed_dir)
    run = {"seed": seed, "workdir": str(seed_dir.relative_to(workdir)), "command": record.get("command"),
           "wall_s": record.get("wall_s"), "launches": record.get("launches"), "values": {}}
    changed = "error" not in record and other_config(r, seed, seed_dir, overrides)
    if changed:  # the config file was edited while the seeds ran: one row holds one config
      record["error"] = f"its config.json is not the config {r.config} gives now ({changed}); move it away"
    if "error" in record:
      run["error"] = record["error"]
    else:
      final = finished(seed_dir) or {}
      run.update(step=final.get("step"), params_sha256=final.get("params_sha256"))
      for t in r.targets:
        try:
          run["values"][t.label] = metric_value(final, t)
        except ValueError as e:
          run["error"] = str(e)
    if "error" in run:
      errors.setdefault(run["error"], []).append(str(seed))
      print(f"{r.name} seed {seed}: {run['error']}", flush=True)
    else:
      print(f"{r.name} seed {seed}: " + ", ".join(f"{k} {v:.4f}" for k, v in run["values"].items()), flush=True)
    entry["runs"].append(run)
  if dry_run:
    return {**entry, "status": "DRY RUN", "reason": ""}
  if errors:
    reason = "; ".join(f"seed{'s' * (len(k) > 1)} {', '.join(k)}: {message}" for message, k in errors.items())
    return {**entry, "status": "ERROR", "reason": f"{reason} (logs: {r.name}/seed_<k>/reproduce.log)"}
  for t, result in zip(r.targets, entry["targets"]):
    values = [run["values"][t.label] for run in entry["runs"]]
    mean = statistics.fmean(values)
    result.update(values=values, n=len(values), mean=mean, std=statistics.stdev(values) if len(values) > 1 else None,
                  met=t.check(mean))
  missed = [t["label"] for t in entry["targets"] if not t["met"]]
  return {**entry, "status": "FAIL" if missed else "PASS", "reason": f"missed {', '.join(missed)}" if missed else ""}


def list_table(entries: list[Reproduction]) -> str:
  rows = [("name", "config", "metric", "target", "needs", "seeds")]
  for r in entries:
    config = r.config + "".join(f" {k}={flag_value(v)}" for k, v in r.overrides.items())
    rows.append((r.name, config, "; ".join(t.label for t in r.targets), "; ".join(t.bound for t in r.targets),
                 ",".join(r.needs), str(len(r.seeds))))
  widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
  return "\n".join("  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in rows)


# --- command line -------------------------------------------------------------------------------------------


class _Parser(argparse.ArgumentParser):
  def error(self, message):
    raise BadInput(f"{message}; see --help")


def parse_args(argv: list[str]) -> argparse.Namespace:
  p = _Parser(prog="python -m bigmodel_jax.reproduce", description=__doc__.split("\n\n")[0])
  p.add_argument("names", nargs="*", help="reproductions to run, or 'all'")
  p.add_argument("--list", action="store_true", help="show the reproductions and exit")
  p.add_argument("--workdir", help="where the runs (WORKDIR/<name>/seed_<k>) and report.json/report.md go")
  p.add_argument("--override", action="append", default=[], metavar="FIELD=VALUE",
                 help="a config override for every run (as --config.FIELD=VALUE of main); repeatable")
  p.add_argument("--seeds", type=int, metavar="N",
                 help="run only the first N of each reproduction's seeds (the card says how many of how many)")
  p.add_argument("--registry", type=Path, default=REGISTRY, help=f"the registry module (default {REGISTRY})")
  p.add_argument("--readme", type=Path, metavar="REPORT_JSON", help="print the markdown results table of a report")
  p.add_argument("--dry_run", action="store_true", help="print each run's command (and skip reasons); run nothing")
  return p.parse_args(argv)


def parse_overrides(items: list[str]) -> dict:
  overrides = {}
  for item in items:
    key, sep, value = item.partition("=")
    key = key.removeprefix("--").removeprefix("config.")
    if not sep or not key:
      raise BadInput(f"--override={item}: write FIELD=VALUE, e.g. --override=data.path=/data/input.txt")
    if key == "seed":
      raise BadInput(f"--override={item}: each run's seed comes from the registry's seeds (--seeds=N runs fewer)")
    overrides[key] = callers_path(key, value)
  return overrides


def main(argv: list[str]) -> int:
  args = parse_args(argv)
  if args.readme:
    print(markdown_table(read_report(args.readme)))
    return 0
  overrides = parse_overrides(args.override)
  if args.seeds is not None and args.seeds < 1:
    raise BadInput(f"--seeds={args.seeds}: must be >= 1")
  entries = load_registry(args.registry)
  by_name = {r.name: r for r in entries}
  if args.list:
    print(list_table(entries))
    return 0
  if not args.names:
    raise BadInput(f"name the reproductions to run (or 'all', or --list); valid: {', '.join(by_name)}")
  unknown = [n for n in args.names if n not in by_name and n != "all"]
  if unknown:
    raise BadInput(f"unknown reproduction {unknown[0]!r}; valid: all, {', '.join(by_name)}")
  if not args.workdir:
    raise BadInput("--workdir is required (where the runs and the report go)")
  selected = entries if "all" in args.names else [by_name[n] for n in dict.fromkeys(args.names)]
  for r in selected:
    config = load_config(r.config)
    missing, hint = missing_field(config, overrides)
    if missing:
      raise BadInput(f"--override={missing}: {r.config} (reproduction {r.name!r}) has no such config field{hint}")
    wrong = wrong_type(config, overrides)
    if wrong:
      raise BadInput(f"--override={wrong} in {r.config} (reproduction {r.name!r}); give a value of that type")
    invalid = overrides and invalid_overrides(config, r.overrides, overrides, r.targets)  # launches would refuse it
    if invalid:
      raise BadInput(f"{invalid} (in {r.config}, reproduction {r.name!r}); fix the override, or name only the "
                     "reproductions it fits (it goes to every one)")
  workdir = Path(args.workdir).expanduser().resolve()
  lock_workdir(workdir, take=False)
  for r in selected:  # before anything runs: a finished seed made with other settings would be an ERROR row
    for seed, seed_dir in seed_dirs(r, workdir, args.seeds):
      other = other_settings(seed_command(r, seed, seed_dir, overrides), seed_dir)
      if other:
        raise BadInput(f"--workdir: {seed_dir} holds a finished run made with {other}; use another --workdir "
                       "for other settings")
      refused = other_resume(r, seed, seed_dir, overrides)  # each launch would fail on it: an ERROR row
      if refused:
        raise BadInput(f"--workdir: {refused}")
      changed = other_config(r, seed, seed_dir, overrides)
      if changed:
        raise BadInput(f"--workdir: {seed_dir} holds a finished run of another config than {r.config} gives now "
                       f"({changed}); use another --workdir, or move {seed_dir} away to run that seed again")
  if not args.dry_run:
    try:
      writable_directory(workdir)
      refuse_other_workdir(workdir, "reproductions")  # a run's workdir, or a sweep's
    except UserError as e:
      raise BadInput(str(e)) from None
    if (workdir / "report.json").is_file():  # merged into at the end: damaged, it would be found after every seed ran
      try:
        read_report(workdir / "report.json")
      except BadInput as e:
        raise BadInput(f"{e}; restore it, or move it away (a launch naming the reproductions it held rewrites their "
                       "rows, finished runs read back without training)") from None
    lock = lock_workdir(workdir)  # noqa: F841 (held until the tool exits)
  backend = functools.cache(accelerator)  # asked once, when a reproduction needs it

  def on_sigterm(signum, frame):
    raise Interrupted(128 + signum)
  signal.signal(signal.SIGTERM, on_sigterm)
  done, code = [], 0
  try:
    for r in selected:
      done.append(reproduce(r, workdir, overrides, args.seeds, backend, args.dry_run))
  except (Interrupted, KeyboardInterrupt) as e:
    code = e.args[0] if isinstance(e, Interrupted) else 130
    print("interrupted: the run saved a checkpoint; the same command resumes it", file=sys.stderr)
  except BrokenPipeError:  # | head gone between seeds: the runs stop as on Ctrl-C, not only the printing
    if args.dry_run:
      raise
    code, stopped = 141, f"while the reproductions ran: stopped after {len(done)} of {len(selected)} (in the report)"
    print(f"error: {errors.closed_stdout(stopped + '; the same command resumes the rest')}", file=sys.stderr)
  if args.dry_run:
    return code
  report = write_report(workdir, done, list(by_name))
  print(markdown_table({"reproductions": {e["name"]: report["reproductions"][e["name"]] for e in done}}))
  print(f"report: {workdir / 'report.md'} and {workdir / 'report.json'}")
  return code or (1 if any(e["status"] in ("FAIL", "ERROR") for e in done) else 0)


def run() -> None:
  try:
    code = main(sys.argv[1:])
    sys.stdout.flush()  # a closed pipe found here, not in Python's flush at exit (a traceback-like line, status 120)
  except BadInput as e:
    errors.fail(str(e))
  except BrokenPipeError:  # | head: what was not printed is in the report's files, or --list / --readme again
    errors.fail(errors.closed_stdout('before all of it was printed'), 141)
  sys.exit(code)


if __name__ == "__main__":
  run()
