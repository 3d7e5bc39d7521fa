"""Nothing silently wrong: a checkpoint whose bytes changed on disk, or whose data position was edited, is found
before anything is evaluated, trained on or deleted; a resume falls back to the newest intact step."""

import json
import shutil
from pathlib import Path

import jax.numpy as jnp
import pytest

from conftest import error_lines
from test_errors import SMOKE, assert_one_error, checkpoint_files, step_dirs

from bigmodel_jax import integrity
from bigmodel_jax.checkpoint import Checkpointer

ARGS = [SMOKE, "--config.train.checkpoint_every=20"]  # 80 steps: 40, 60 and 80 kept (keep_checkpoints=3)


@pytest.fixture(scope="module")
def trained(cli, tmp_path_factory) -> tuple[Path, dict]:
  """One uninterrupted run, shared (tests copy it): its workdir and final metrics."""
  workdir = tmp_path_factory.mktemp("integrity") / "work"
  proc = cli(*ARGS, f"--workdir={workdir}")
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert step_dirs(workdir) == {40, 60, 80}
  return workdir, json.loads((workdir / "final_metrics.json").read_text())


def copy(trained, tmp_path) -> Path:
  return Path(shutil.copytree(trained[0], tmp_path / "work"))


def damage(workdir: Path, step: int, nbytes: int = 64, bit: bool = False) -> Path:
  """Flips `nbytes` bytes (or one bit) in the middle of the step's largest state file (its parameter data)."""
  path = max((p for p in (workdir / "checkpoints" / str(step) / "state").rglob("*") if p.is_file()),
             key=lambda p: p.stat().st_size)
  blob = bytearray(path.read_bytes())
  middle = len(blob) // 2
  if bit:
    blob[middle] ^= 0x01
  else:
    blob[middle:middle + nbytes] = bytes(b ^ 0xFF for b in blob[middle:middle + nbytes])
  path.write_bytes(bytes(blob))
  return path


def warnings_about(stderr: str, word: str) -> list[str]:
  return [l for l in stderr.splitlines() if word in l]


def test_eval_refuses_a_damaged_latest_step_and_evaluates_an_intact_one(cli, trained, tmp_path):
  workdir = copy(trained, tmp_path)
  damage(workdir, 80)
  files = checkpoint_files(workdir)
  proc = cli(SMOKE, "--mode=eval", f"--workdir={workdir}")
  assert_one_error(proc, str(workdir / "checkpoints" / "80"), "is damaged", "differs from its digest.json",
                   "intact steps: 40, 60", "--checkpoint_step=60")
  explicit = cli(SMOKE, "--mode=eval", "--checkpoint_step=80", f"--workdir={workdir}")  # named, still damaged
  assert_one_error(explicit, "checkpoints/80 is damaged", "--checkpoint_step=60")
  assert checkpoint_files(workdir) == files  # eval moves nothing

  init = cli(SMOKE, f"--workdir={tmp_path / 'new'}", f"--config.init.workdir={workdir}")  # the latest, damaged
  assert_one_error(init, "config.init.step: ", "checkpoints/80 is damaged", "pass --config.init.step=60 to use one")
  assert checkpoint_files(workdir) == files

  older = cli(SMOKE, "--mode=eval", "--checkpoint_step=60", f"--workdir={workdir}")
  assert older.returncode == 0, error_lines(older.stderr)
  result = json.loads(older.stdout)
  assert result["step"] == 60 and 0 < result["test"]["loss"] < 10


def test_a_one_bit_flip_is_found(cli, trained, tmp_path):
  workdir = copy(trained, tmp_path)
  damage(workdir, 80, bit=True)
  assert_one_error(cli(SMOKE, "--mode=predict", f"--workdir={workdir}"), "checkpoints/80 is damaged")


def test_resume_falls_back_to_the_newest_intact_step_and_ends_as_an_uninterrupted_run(cli, trained, tmp_path):
  workdir = copy(trained, tmp_path)
  (workdir / "final_metrics.json").unlink()
  damaged = damage(workdir, 80)
  blob = damaged.read_bytes()
  # keep 2: the intact step 60 and the redone 80 are the latest two; the damaged 80 takes no place among them
  proc = cli(*ARGS, "--config.train.keep_checkpoints=2", f"--workdir={workdir}")
  assert proc.returncode == 0, error_lines(proc.stderr)
  lines = warnings_about(proc.stderr, "damaged")
  assert len(lines) == 1 and lines[0].startswith("W"), lines
  assert "step 80" in lines[0] and "resuming from step 60" in lines[0] and "differs from its digest.json" in lines[0]
  assert "resumed from checkpoint at step 60" in proc.stderr
  final = json.loads((workdir / "final_metrics.json").read_text())
  assert final["params_sha256"] == trained[1]["params_sha256"]
  assert final["test"] == trained[1]["test"]
  assert step_dirs(workdir) == {60, 80}
  set_aside = workdir / "checkpoints" / "damaged" / "80"
  assert (set_aside / damaged.relative_to(workdir / "checkpoints" / "80")).read_bytes() == blob  # kept as it was
  # the redone step 80 is intact and evaluates; the damaged copy stays out of the way
  again = cli(SMOKE, "--mode=eval", f"--workdir={workdir}")
  assert again.returncode == 0 and json.loads(again.stdout)["step"] == 80


def test_every_step_damaged_is_one_line_and_nothing_changes(cli, trained, tmp_path):
  workdir = copy(trained, tmp_path)
  for step in (40, 60, 80):
    damage(workdir, step)
  files = checkpoint_files(workdir)
  proc = cli(*ARGS, f"--workdir={workdir}")
  assert_one_error(proc, "every checkpoint in", "is damaged", "step 40:", "step 60:", "step 80:", "nothing was changed")
  assert checkpoint_files(workdir) == files
  assert_one_error(cli(SMOKE, "--mode=eval", f"--workdir={workdir}"), "checkpoints/80 is damaged", "no step is intact")
  assert checkpoint_files(workdir) == files


@pytest.mark.parametrize("value,digest", [(79, "rewritten"), (40, "none"), ("80", "rewritten"), (True, "none")],
                         ids=["off-by-one", "older-step-no-digest", "string", "bool-no-digest"])
def test_an_edited_data_position_is_one_line_and_nothing_is_deleted(cli, trained, tmp_path, value, digest):
  """The digest would catch the edit; with a digest recomputed after it (or none: a step written before digests)
  the position is still checked against the step."""
  workdir = copy(trained, tmp_path)
  step_dir = workdir / "checkpoints" / "80"
  data_file = step_dir / "data" / "metadata"
  assert json.loads(data_file.read_text()) == {"next_index": 80}
  data_file.write_text(json.dumps({"next_index": value}))
  if digest == "rewritten":
    integrity.write(step_dir)
  else:  # a run written before checkpoints had digests
    for path in (workdir / "checkpoints").glob(f"*/{integrity.FILE}"):
      path.unlink()
  files = checkpoint_files(workdir)
  (workdir / "final_metrics.json").unlink()
  proc = cli(*ARGS, f"--workdir={workdir}")
  assert_one_error(proc, str(data_file), "field next_index", repr(value), '{"next_index": 80}')
  if digest == "none":
    assert len(warnings_about(proc.stderr, "no digest.json")) == 1
  assert checkpoint_files(workdir) == files


def test_a_step_without_a_digest_is_used_with_one_log_line(cli, trained, tmp_path):
  workdir = copy(trained, tmp_path)
  for path in (workdir / "checkpoints").glob(f"*/{integrity.FILE}"):  # as written before checkpoints had digests
    path.unlink()
  proc = cli(SMOKE, "--mode=eval", f"--workdir={workdir}")
  assert proc.returncode == 0, error_lines(proc.stderr)
  lines = warnings_about(proc.stderr, "no digest.json")
  assert len(lines) == 1 and "step 80" in lines[0] and "unverified" in lines[0]


def test_a_deleted_digest_beside_others_counts_as_damage(cli, trained, tmp_path):
  """Deleting digest.json does not turn verification off: the run's other steps show it wrote digests."""
  workdir = copy(trained, tmp_path)
  (workdir / "checkpoints" / "80" / integrity.FILE).unlink()
  assert_one_error(cli(SMOKE, "--mode=eval", f"--workdir={workdir}"), "checkpoints/80 is damaged",
                   "digest.json is missing", "--checkpoint_step=60")


def test_retention_deletes_a_step_only_once_a_newer_one_is_committed_with_its_digest(tmp_path):
  ckpt = Checkpointer(tmp_path, keep=1)
  deleter = ckpt._manager._checkpoint_deleter  # orbax's: it removes the steps retention gave up
  seen = []

  def delete_steps(steps):
    newest = max(ckpt._manager.all_steps())
    seen.append((list(steps), newest, (tmp_path / str(newest) / integrity.FILE).exists()))
    return original(steps)
  original, deleter.delete_steps = deleter.delete_steps, delete_steps
  for step in (1, 2, 3):
    ckpt.save(step, {"w": jnp.full((2,), step, jnp.float32)}, {"next_index": step}, {"step": step})
  ckpt.close()
  assert ckpt.all_steps() == [3]
  assert [(s, n, d) for s, n, d in seen if s] == [([1], 2, True), ([2], 3, True)]
  assert integrity.verify(tmp_path / "3")
