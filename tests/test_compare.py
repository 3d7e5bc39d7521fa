"""python -m bigmodel_jax.compare on real runs: config and metric diffs, bit-identity, the curves PNG, bad input."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from bigmodel_jax import compare, train
from conftest import CLOSED_STDOUT, ROOT, load_config, with_stdout_closed


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  """Three 20-step digits runs: A and C with the same config, B with another seed."""
  tmp = tmp_path_factory.mktemp("compare")
  paths = []
  for name, seed in (("a", 0), ("b", 1), ("c", 0)):
    config = load_config("digits_mlp")
    config.train.num_steps, config.train.log_every, config.seed = 20, 5, seed
    train.train_and_evaluate(config, tmp / name)
    paths.append(tmp / name)
  return tmp, paths


def run_compare(*args, cwd):
  env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(ROOT)}
  return subprocess.run([sys.executable, "-m", "bigmodel_jax.compare", *map(str, args)], cwd=cwd, env=env,
                        capture_output=True, text=True, timeout=120)


def test_two_runs_that_differ_in_seed(runs, tmp_path, capsys):
  _, (a, b, _) = runs
  assert compare.main([str(a), str(b), f"--out={tmp_path}"]) == 0
  out = capsys.readouterr().out
  assert "config: 1 field differs" in out and "  seed: 0 -> 1" in out
  acc_a, acc_b = (json.loads((p / "final_metrics.json").read_text())["test"]["accuracy"] for p in (a, b))
  row = next(line.split() for line in out.splitlines() if line.split()[:1] == ["test/accuracy"])
  assert [float(x) for x in row[1:]] == pytest.approx([acc_a, acc_b, acc_b - acc_a], abs=1e-4)
  assert any(line.split()[:1] == ["best/value"] for line in out.splitlines())
  assert "parameters: all different" in out
  png = tmp_path / "compare.png"
  assert f"curves: {png}" in out and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_best_values_selected_on_different_metrics_get_no_difference(runs, tmp_path):
  _, (a, b, _) = runs
  other = Path(shutil.copytree(b, tmp_path / "b"))
  final = json.loads((other / "final_metrics.json").read_text())
  final["best"].update(metric="loss", mode="min", value=0.3)  # as a run selecting on validation loss records it
  (other / "final_metrics.json").write_text(json.dumps(final))
  lines = compare.compare([str(a), str(other)], str(tmp_path / "x.png"))
  best = next(line.split() for line in lines if line.split()[:1] == ["best/value"])
  test = next(line.split() for line in lines if line.split()[:1] == ["test/accuracy"])
  assert len(best) == 3 and len(test) == 4  # name, A, B (no B-A: accuracy against a loss); name, A, B, B-A


def test_same_config_twice_is_bit_identical(runs, tmp_path):
  _, (a, _, c) = runs
  lines = compare.compare([str(a), str(c)], str(tmp_path / "x.png"))
  assert "config: identical" in lines
  assert any(line.startswith("parameters: bit-identical") for line in lines)
  assert (tmp_path / "x.png").stat().st_size > 10_000


def test_three_runs_table_and_an_unfinished_run(runs, tmp_path):
  _, (a, b, c) = runs
  unfinished = tmp_path / "unfinished"
  unfinished.mkdir()
  for name in ("config.json", "metrics.jsonl"):
    (unfinished / name).write_text((b / name).read_text())
  lines = compare.compare([str(a), str(b), str(c), str(unfinished)], str(tmp_path / "out"))
  header = next(i for i, line in enumerate(lines) if line.split()[:2] == ["field", "A"])
  assert lines[header].split() == ["field", "A", "B", "C", "D"]
  assert lines[header + 1].split() == ["seed", "0", "1", "0", "1"]
  assert any("D: no final_metrics.json yet: training has not finished (metrics.jsonl ends at step 20)" in line
             for line in lines)
  assert any(line.startswith("parameters: differ: A = C (") for line in lines)
  assert "parameters of D: unknown (no params_sha256: training has not finished)" in lines
  assert (tmp_path / "out" / "compare.png").stat().st_size > 10_000  # --out without a suffix: a directory


def test_bad_input_is_one_line_and_exit_2(runs, tmp_path, capsys):
  tmp, (a, _, _) = runs
  result = run_compare(a, tmp, cwd=tmp_path)  # a directory of runs, not a run
  assert result.returncode == 2
  assert result.stderr.strip().splitlines() == [
      f"error: RUN: {tmp} is not a run directory (no config.json); pass the --workdir of a bigmodel_jax.main run; "
      "it holds runs: a, b, c"]
  assert not (tmp_path / "compare.png").exists()
  for argv, message in (([str(a)], "error: compare needs at least two runs, got 1; usage: "),
                        ([str(a), str(tmp / "nope")], f"error: RUN: {tmp / 'nope'} does not exist"),
                        ([str(a), str(a), "--bogus"], "error: unrecognized arguments: --bogus; usage: "),
                        ([str(a), str(a), f"--out={tmp_path / 'curves.txt'}"], "error: --out="),
                        ([str(a), str(a), "--out=/proc/nope/curves.png"], "error: --out: cannot write"),
                        ([str(a), str(a), "--out="], "error: --out: empty")):  # was ./compare.png
    assert compare.main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith(message) and err.count("\n") == 1
  damaged = tmp_path / "damaged"
  shutil.copytree(a, damaged)
  (damaged / "final_metrics.json").write_text("[]")
  assert compare.main([str(a), str(damaged), f"--out={tmp_path / 'c.png'}"]) == 2
  err = capsys.readouterr().err
  assert err.startswith(f"error: RUN: {damaged / 'final_metrics.json'} is not a JSON object") and err.count("\n") == 1
  (damaged / "final_metrics.json").write_text(json.dumps({**json.loads((a / "final_metrics.json").read_text()),
                                                          "params_sha256": 5}))  # a hand edit: no digest
  lines = compare.compare([str(a), str(damaged)], str(tmp_path / "c.png"))
  assert "parameters of B: unknown (final_metrics.json's params_sha256 is not a digest)" in lines
  (damaged / "metrics.jsonl").unlink()
  (damaged / "metrics.jsonl").mkdir()
  assert compare.main([str(a), str(damaged), f"--out={tmp_path / 'c.png'}"]) == 2
  err = capsys.readouterr().err
  assert err.startswith(f"error: RUN: {damaged / 'metrics.jsonl'} cannot be read") and err.count("\n") == 1


def test_runs_of_different_tasks_get_no_metric_difference(runs, tmp_path):
  """A classifier's cross-entropy and a regression's squared error are both 'loss': their difference means nothing."""
  _, (a, _, _) = runs
  config = load_config("linear_regression", "smoke")
  config.data.batch_size = 80  # divides into the 8 CPU devices tests see
  train.train_and_evaluate(config, tmp_path / "regression")
  lines = compare.compare([str(a), str(tmp_path / "regression")], str(tmp_path / "x.png"))
  rows = {line.split()[0]: line.split() for line in lines if line.startswith("  ") and len(line.split()) > 1}
  assert len(rows["test/loss"]) == 3 and len(rows["validation/loss"]) == 3  # name, A, B: no B-A
  assert len(rows["step"]) == 4 and len(rows["num_params"]) == 4  # counts are compared
  assert "B: task regression, not A's classification: its metrics get no difference" in lines


def test_stdout_closed_by_its_reader_is_one_line(runs, tmp_path):
  """compare A B | head -1 was a BrokenPipeError traceback, exit 1; the picture is written before the text."""
  _, (a, b, _) = runs
  status, err = with_stdout_closed("bigmodel_jax.compare", a, b, f"--out={tmp_path}")
  assert status == 141 and err.strip().splitlines() == [CLOSED_STDOUT], err[-3000:]
  assert (tmp_path / "compare.png").stat().st_size > 0
