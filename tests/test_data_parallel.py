"""The same run on 8 (simulated CPU) devices: the global batch is split over the 'data' axis, same numbers."""

import json

EIGHT = {"XLA_FLAGS": "--xla_force_host_platform_device_count=8"}
ARGS = ["--config=configs/digits_mlp.py:smoke", "--config.model.dropout_rate=0.0", "--config.train.log_every=4"]


def train_records(workdir):
  lines = [json.loads(l) for l in (workdir / "metrics.jsonl").read_text().splitlines()]
  return [r for r in lines if r["split"] == "train"]


def test_eight_devices_match_one(cli, tmp_path):
  one = cli(*ARGS, f"--workdir={tmp_path / 'one'}")
  eight = cli(*ARGS, f"--workdir={tmp_path / 'eight'}", env=EIGHT)
  assert one.returncode == 0 and eight.returncode == 0, eight.stderr[-2000:]
  info = json.loads((tmp_path / "eight" / "run_info.jsonl").read_text().splitlines()[0])
  assert len(info["devices"]) == 8
  a, b = train_records(tmp_path / "one"), train_records(tmp_path / "eight")
  assert [r["step"] for r in a] == [r["step"] for r in b]
  for x, y in zip(a, b):  # same data, same init: only the reduction order differs
    assert abs(x["loss"] - y["loss"]) <= 1e-5 * max(1.0, abs(x["loss"]))
  fa, fb = (json.loads((tmp_path / d / "final_metrics.json").read_text()) for d in ("one", "eight"))
  assert abs(fa["loss"] - fb["loss"]) < 1e-4 and abs(fa["accuracy"] - fb["accuracy"]) <= 1 / 359


def test_batch_not_divisible_by_device_count(cli, tmp_path):
  proc = cli(*ARGS, "--config.data.batch_size=30", f"--workdir={tmp_path}", env=EIGHT)
  assert proc.returncode == 2
  assert "error: config.data.batch_size: 30 is not divisible by the 8 devices" in proc.stderr
  assert "Traceback" not in proc.stderr
