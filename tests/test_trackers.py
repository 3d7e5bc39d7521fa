"""Experiment trackers: what MLflow's own client and W&B's offline run files hold after real training runs,
resumed runs continuing the same tracker runs, and the one-line errors."""

import json
import logging
import shutil
import struct
import sys

import pytest

from bigmodel_jax import train, trackers
from bigmodel_jax.errors import UserError
from bigmodel_jax.writers import MetricsWriter
from conftest import load_config

pytest.importorskip("mlflow")
pytest.importorskip("wandb")
from mlflow.tracking import MlflowClient  # noqa: E402


def tracked_config(store, trackers_="tensorboard,mlflow,wandb", experiment="digits_trackers"):
  config = load_config("digits_mlp")
  config.train.num_steps, config.train.log_every, config.train.checkpoint_every = 30, 10, 10
  config.train.trackers = trackers_
  config.train.tracking.experiment = experiment
  config.train.tracking.mlflow_tracking_uri = f"sqlite:///{store / 'mlflow.db'}"
  return config


@pytest.fixture(scope="module")
def tracked(tmp_path_factory, monkeypatch_module):
  """A 30-step run with TensorBoard, MLflow and W&B, relaunched with only its step-10 checkpoint left (as a kill
  before the later checkpoints were written leaves it): the relaunch redoes steps 11-30, which the trackers have."""
  monkeypatch_module.delenv("WANDB_MODE", raising=False)
  monkeypatch_module.delenv("MLFLOW_TRACKING_URI", raising=False)
  tmp = tmp_path_factory.mktemp("tracked")
  config, workdir = tracked_config(tmp / "store"), tmp / "run"
  train.train_and_evaluate(config, workdir)
  first_state = json.loads((workdir / trackers.STATE_FILE).read_text())
  for step in ("20", "30"):
    shutil.rmtree(workdir / "checkpoints" / step)
  final = train.train_and_evaluate(config, workdir)
  return config, workdir, final, first_state, tmp / "store"


@pytest.fixture(scope="module")
def monkeypatch_module():
  with pytest.MonkeyPatch.context() as mp:
    yield mp


def mlflow_run(config):
  client = MlflowClient(tracking_uri=config.train.tracking.mlflow_tracking_uri)
  experiment = client.get_experiment_by_name(config.train.tracking.experiment)
  runs = client.search_runs([experiment.experiment_id])
  return client, runs


def test_mlflow_holds_params_metrics_and_artifacts(tracked):
  config, workdir, final, first_state, _ = tracked
  client, runs = mlflow_run(config)
  assert len(runs) == 1  # the relaunch continued the same MLflow run
  run = runs[0]
  assert run.info.run_id == first_state["mlflow"]["run_id"] and run.info.status == "FINISHED"
  assert run.data.params["train.num_steps"] == "30" and run.data.params["model.hidden_sizes"] == "[128, 128]"
  assert run.data.tags["workdir"] == str(workdir)
  history = client.get_metric_history(run.info.run_id, "train/loss")
  assert sorted(m.step for m in history) == [10, 20, 30]  # redone steps are not logged twice
  jsonl = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
  train_lines = {r["step"]: r["loss"] for r in jsonl if r["split"] == "train"}
  assert {m.step: m.value for m in history} == pytest.approx(train_lines)
  assert run.data.metrics["test/accuracy"] == pytest.approx(final["test"]["accuracy"])
  assert run.data.metrics["final/test/accuracy"] == pytest.approx(final["test"]["accuracy"])
  assert run.data.metrics["final/best/value"] == pytest.approx(final["best"]["value"])
  assert run.data.tags["final/params_sha256"] == final["params_sha256"]
  assert len(client.get_metric_history(run.info.run_id, "startup/seconds_to_first_step")) == 2  # one per launch
  artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
  assert {"config.json", "metrics.jsonl", "final_metrics.json", "run_info.jsonl"} <= artifacts
  assert "checkpoints" not in artifacts


def wandb_records(path):
  """The protobuf records of an offline W&B run file (LevelDB log framing: 32 KiB blocks of chunks, each with a
  7-byte header: crc32, length, type FULL=1/FIRST=2/MIDDLE=3/LAST=4), after the file's 7-byte ':W&B' header."""
  from wandb.proto import wandb_internal_pb2
  data, block, pos, chunk, out = path.read_bytes(), 32768, 7, b"", []
  assert data[:4] == b":W&B"
  while pos + 7 <= len(data):
    if block - pos % block < 7:  # too little room left for a header: the block is padding
      pos += block - pos % block
      continue
    _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
    chunk += data[pos + 7:pos + 7 + length]
    pos += 7 + length
    if kind in (1, 4):
      out.append(wandb_internal_pb2.Record.FromString(chunk))
      chunk = b""
  return out


def test_wandb_offline_run_holds_history_and_summary(tracked):
  config, workdir, final, first_state, _ = tracked
  run_id = first_state["wandb"]["run_id"]
  files = sorted((workdir / "wandb").glob(f"offline-run-*-{run_id}/run-{run_id}.wandb"))
  assert len(files) == 2  # one offline segment per launch, same run id: `wandb sync` appends them in order
  history, summary = {}, {}
  for path in files:
    for record in wandb_records(path):
      if record.HasField("run"):
        assert (record.run.project, record.run.run_group) == ("bigmodel_jax", "digits_trackers")
        cfg = {u.key: json.loads(u.value_json) for u in record.run.config.update}
        assert cfg["train"]["num_steps"] == 30 and cfg["seed"] == 0
      for item in record.history.item:
        history.setdefault(item.key or "/".join(item.nested_key), []).append(json.loads(item.value_json))
      for item in record.summary.update:
        summary[item.key or "/".join(item.nested_key)] = json.loads(item.value_json)
  assert history["_step"].count(30) == 1 and len(history["train/loss"]) == 3
  assert summary["final/test/accuracy"] == pytest.approx(final["test"]["accuracy"])
  assert summary["final/params_sha256"] == final["params_sha256"]
  assert json.loads((workdir / trackers.STATE_FILE).read_text())["wandb"]["run_id"] == run_id


def records(*steps):
  return [(step, "train", {"loss": 1.0 / step}) for step in steps]


def test_a_tracker_added_later_gets_the_earlier_records(tracked, tmp_path):
  """A run trained without MLflow, continued with it: the MLflow run receives metrics.jsonl's records too."""
  config = tracked_config(tracked[-1], "tensorboard", experiment="added_later")
  writer = MetricsWriter(tmp_path, True, config)
  writer.drop_after(0)
  for step, split, metrics in records(10, 20):
    writer.write(step, split, metrics)
  writer.close()
  config.train.trackers = "mlflow"
  writer = MetricsWriter(tmp_path, True, config)
  writer.drop_after(20)
  writer.write(30, "train", {"loss": 0.1})
  writer.close()
  client, runs = mlflow_run(config)
  assert [m.step for m in client.get_metric_history(runs[0].info.run_id, "train/loss")] == [10, 20, 30]


def test_an_eval_of_an_earlier_step_is_sent_and_tensorboard_hides_a_killed_launchs_redone_steps(tracked, tmp_path):
  """--mode=eval of step 10 after step 20's: its line reaches MLflow on the next training launch (it was skipped, as
  older than the last eval sent). A relaunch after step 20 marks TensorBoard's events past it as purged (they were
  shown twice beside the redone ones)."""
  from tensorboardX.proto import event_pb2
  config = tracked_config(tracked[-1], "tensorboard,mlflow", experiment="evals_any_order")
  def eval_line(step, accuracy):  # what --mode=eval --checkpoint_step=<step> appends (it starts no tracker)
    with open(tmp_path / "metrics.jsonl", "a") as f:
      f.write(json.dumps({"step": step, "split": "eval", "time": 1.0, "eval": "test", "accuracy": accuracy}) + "\n")

  writer = MetricsWriter(tmp_path, True, config)
  writer.drop_after(0)
  for step, split, metrics in records(10, 20, 30):
    writer.write(step, split, metrics)
  writer.close()
  eval_line(20, 0.9)
  writer = MetricsWriter(tmp_path, True, config)
  writer.drop_after(30)  # a relaunch of the finished run: sends eval@20
  writer.close()
  eval_line(10, 0.8)
  writer = MetricsWriter(tmp_path, True, config)
  writer.drop_after(20)  # a relaunch resuming from step 20: step 30 is redone
  writer.write(30, "train", {"loss": 0.5})
  writer.close()
  client, runs = mlflow_run(config)
  history = client.get_metric_history(runs[0].info.run_id, "eval/test/accuracy")
  assert sorted((m.step, m.value) for m in history) == [(10, 0.8), (20, 0.9)]
  newest = max((tmp_path / "tensorboard").glob("events.out.tfevents.*"), key=lambda p: p.stat().st_mtime_ns)
  data, pos, purges = newest.read_bytes(), 0, []
  while pos < len(data):
    (length,) = struct.unpack("<Q", data[pos:pos + 8])
    event = event_pb2.Event.FromString(data[pos + 12:pos + 12 + length])
    pos += 16 + length
    if event.HasField("session_log") and event.session_log.status == event_pb2.SessionLog.START:
      purges.append(event.step)
  assert purges == [21]


def test_a_copied_workdir_starts_its_own_tracker_run_and_a_moved_one_goes_on_with_its_own(tracked, tmp_path):
  config = tracked_config(tracked[-1], "mlflow", experiment="copied")

  def launch(workdir, after, step):
    workdir.mkdir(exist_ok=True)
    writer = MetricsWriter(workdir, True, config)
    writer.drop_after(after)
    writer.write(step, "train", {"loss": 1.0 / step})
    writer.close()
    return json.loads((workdir / trackers.STATE_FILE).read_text())["mlflow"]["run_id"]

  original = launch(tmp_path / "a", 0, 10)
  shutil.copytree(tmp_path / "a", tmp_path / "b")  # a fork of the run: its metrics are not the original's
  copied = launch(tmp_path / "b", 10, 20)
  assert copied != original
  shutil.move(tmp_path / "b", tmp_path / "c")  # moved: the same run goes on, even once another run uses "b"
  assert launch(tmp_path / "b", 0, 10) not in (original, copied)
  assert launch(tmp_path / "c", 20, 30) == copied
  client, _ = mlflow_run(config)
  assert [m.step for m in client.get_metric_history(original, "train/loss")] == [10]
  assert [m.step for m in client.get_metric_history(copied, "train/loss")] == [10, 20, 30]
  for damaged in ("{", "[]", '{"mlflow": {"last_steps": {"train/loss": "x"}}}'):
    (tmp_path / "c" / trackers.STATE_FILE).write_text(damaged)
    assert trackers.read_state(tmp_path / "c") == {}


def test_a_tracker_that_fails_mid_run_warns_once_and_training_records_go_on(tracked, tmp_path, caplog):
  config = tracked_config(tracked[-1], "tensorboard,mlflow", experiment="fails")
  writer = MetricsWriter(tmp_path, True, config)
  writer.drop_after(0)
  writer.write(10, "train", {"loss": 1.0})
  client, runs = mlflow_run(config)
  client.delete_run(runs[0].info.run_id)  # e.g. from the MLflow UI, while training goes on: MLflow refuses metrics
  with caplog.at_level(logging.WARNING):
    for step, split, metrics in records(20, 30):
      writer.write(step, split, metrics)
  writer.close()
  warnings = [r.getMessage() for r in caplog.records if "tracker mlflow failed" in r.getMessage()]
  assert len(warnings) == 1 and "it is off for the rest of this launch" in warnings[0]
  assert [json.loads(line)["step"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()] == [10, 20, 30]
  # it keeps what it last received, so a relaunch sends it the rest
  assert json.loads((tmp_path / trackers.STATE_FILE).read_text())["mlflow"]["last_steps"] == {"train": 10}


@pytest.mark.parametrize("store", ["sqlite:///{tmp}/a_file/mlflow.db", "http://127.0.0.1:9"])
def test_a_store_that_cannot_be_opened_is_a_user_error_at_start(tmp_path, store):
  (tmp_path / "a_file").write_text("")  # a file where the store's directory would be: unwritable
  config = tracked_config(tmp_path, "mlflow")
  config.train.tracking.mlflow_tracking_uri = store.format(tmp=tmp_path)
  writer = MetricsWriter(tmp_path, True, config)
  with pytest.raises(UserError, match=r"^config\.train\.tracking\.mlflow_tracking_uri: MLflow store .* failed"):
    writer.drop_after(0)  # at once: a server that does not answer is not retried for minutes
  writer.close()


def test_unknown_and_missing_trackers_name_the_field_and_the_fix(tmp_path, monkeypatch):
  config = tracked_config(tmp_path / "store", "tensorboard,mlfow")
  with pytest.raises(UserError, match=r"^config\.train\.trackers: unknown tracker 'mlfow' \(did you mean 'mlflow'\?\); "
                                      r"valid: mlflow, tensorboard, wandb$"):
    trackers.check(config)
  monkeypatch.setitem(sys.modules, "mlflow", None)  # as if not installed
  config.train.trackers = "tensorboard,mlflow"
  message = r"^config\.train\.trackers: 'mlflow' needs the mlflow package, .*pip install 'bigmodel_jax\[mlflow\]'"
  with pytest.raises(UserError, match=message):
    trackers.check(config)
  writer = MetricsWriter(tmp_path, True, config)  # the writer says the same when training starts
  with pytest.raises(UserError, match=message):
    writer.drop_after(0)
  writer.close()


def test_eval_mode_and_other_processes_start_no_tracker_runs(tmp_path):
  config = tracked_config(tmp_path / "store", "tensorboard,mlflow")
  MetricsWriter(tmp_path / "other", False, config).write(1, "train", {"loss": 1.0})  # not the chief
  writer = MetricsWriter(tmp_path, True, config)  # --mode=eval: no drop_after
  writer.write(30, "eval", {"eval": "test", "accuracy": 0.5})
  writer.close()
  assert not (tmp_path / "store").exists() and not (tmp_path / trackers.STATE_FILE).exists()
  # TensorBoard: a run of its own, out of the training run's event files
  assert list((tmp_path / "tensorboard").iterdir()) == [tmp_path / "tensorboard" / "eval_step30"]
  assert len(list((tmp_path / "tensorboard" / "eval_step30").glob("events.out.tfevents.*"))) == 1
  (tmp_path / "predict").mkdir()
  MetricsWriter(tmp_path / "predict", True, config).close()  # --mode=predict/sample: nothing to write
  assert not (tmp_path / "predict" / "tensorboard").exists()


def test_a_resume_tags_the_mlflow_steps_a_killed_launch_sent(tracked, tmp_path):
  """A killed launch sent steps 20 and 30; the resume from step 10 redoes them (metrics.jsonl and TensorBoard drop
  the killed launch's). MLflow cannot delete a metric's values per step: the run's tag `discarded_steps` names the
  steps whose values are the killed launch's (was: nothing said so), once per resume that finds such values."""
  config = tracked_config(tracked[-1], "mlflow", experiment="discarded")
  writer = MetricsWriter(tmp_path, True, config)
  writer.drop_after(0)
  for step, split, metrics in records(10, 20, 30):
    writer.write(step, split, metrics)
  writer.close()  # killed after step 30's record, its last checkpoint step 10
  for resumed in (10, 20, 30):  # the second resume is killed again after step 30; the third finds nothing beyond
    writer = MetricsWriter(tmp_path, True, config)
    writer.drop_after(resumed)
    for step in (20, 30):
      if step > resumed:
        writer.write(step, "train", {"loss": 0.5})
    writer.close()
  client, runs = mlflow_run(config)
  assert len(runs) == 1 and runs[0].data.tags["discarded_steps"] == "11-30; 21-30"
  jsonl = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
  assert [(r["step"], r["loss"]) for r in jsonl] == [(10, 0.1), (20, 0.5), (30, 0.5)]


def test_a_tensorboard_directory_held_by_a_file_is_a_user_error_at_start(tmp_path):
  """Was: a file where tensorboard/ goes failed TensorBoard's writer at the first record, one warning, then a whole
  run with no TensorBoard records (README: a store that cannot be opened is one line before the first step)."""
  (tmp_path / "tensorboard").write_text("my notes\n")
  writer = MetricsWriter(tmp_path, True, tracked_config(tmp_path / "store", "tensorboard"))
  with pytest.raises(UserError) as e:
    writer.drop_after(0)
  writer.close()
  assert str(e.value) == (f"config.train.trackers: tensorboard cannot write its event files in {tmp_path}/tensorboard "
                          "(a file, or not writable); move it away or fix its permissions, or leave tensorboard out")
  assert (tmp_path / "tensorboard").read_text() == "my notes\n"
  writer = MetricsWriter(tmp_path, True, tracked_config(tmp_path / "store", ""))  # without it: trains
  writer.drop_after(0)
  writer.write(10, "train", {"loss": 1.0})
  writer.close()


def test_tensorboard_failing_mid_run_does_not_promise_a_relaunch_sends_what_it_missed(tmp_path, caplog):
  """Was: the warning said a relaunch sends it what it missed; TensorBoard is sent no earlier records (only MLflow
  and W&B are), so those steps stay missing from its event files: it says they are in metrics.jsonl only."""
  writer = MetricsWriter(tmp_path, True, tracked_config(tmp_path / "store", "tensorboard"))
  writer.drop_after(0)
  (tmp_path / "tensorboard").write_text("")  # e.g. a cleanup script, before its writer is made on the first record
  with caplog.at_level(logging.WARNING):
    writer.write(10, "train", {"loss": 1.0})
  writer.close()
  warnings = [r.getMessage() for r in caplog.records if "tracker tensorboard failed" in r.getMessage()]
  assert len(warnings) == 1 and warnings[0].endswith("(metrics.jsonl and the other trackers go on; what it misses is "
                                                     "in metrics.jsonl only)"), warnings
