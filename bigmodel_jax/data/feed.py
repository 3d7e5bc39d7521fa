"""How the train loop feeds its steps: `feed(state, step, n) -> (state, metrics)` runs the n train steps from `step`
on the training stream's batches; get_state / set_state are the data position a checkpoint keeps.

HostFeed (the default): each batch drawn on the host (pipeline.train_dataset, a grain iterator) and sent to the
devices with the call.

DeviceFeed (config.data.on_device): the training split is kept on the devices, replicated, and no batch crosses per
step. The host draws each step's example indices (a token stream: window starts) with the very function the host
pipeline uses (pipeline.batch_function), a table of them for the next TABLE_STEPS steps at a time, sent once; the
step reads its own row of the table by its step counter and gathers its batch from the split. The split is
preprocessed once by the host pipeline's numpy function, so the gathered values are the host's bit for bit: the
same batches, the same numbers, the same checkpointed position ({'next_index': step}) and exact resume either way,
at the cost of the split's bytes on every device (logged when it is placed; refused, in one line, where a device
reports its memory and the split would take more than half of it).
"""

import abc
from concurrent import futures

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from bigmodel_jax.data import Dataset, pipeline
from bigmodel_jax.errors import UserError


def make_feed(run, on_device: bool | None = None, num_steps: int | None = None):
  """The feed config.data.on_device asks for (or `on_device`), over the run's steps (or `num_steps`)."""
  on_device = run.config.data.on_device if on_device is None else on_device
  return (DeviceFeed if on_device else HostFeed)(run, num_steps or run.total_steps)


class Feed(abc.ABC):
  """`feed(state, step, n) -> (state, metrics)`: the n train steps from `step`; get_state / set_state: the data
  position a checkpoint keeps ({'next_index': step})."""

  @abc.abstractmethod
  def __call__(self, state, step: int, n: int = 1):
    """Runs the n train steps from `step` on the stream's batches."""

  @abc.abstractmethod
  def function(self, n: int):
    """The compiled function of a call of n steps."""

  @abc.abstractmethod
  def example(self, n: int):
    """The second argument of such a call (its arrays' shapes and shardings are what count)."""

  @abc.abstractmethod
  def get_state(self) -> dict:
    """The data position after the last call."""

  @abc.abstractmethod
  def set_state(self, saved: dict) -> None:
    """Continues from a checkpoint's data position."""

  def compile(self, state, sizes) -> None:
    """Compiles the train functions for calls of these sizes (steps per call: 1 and config.train.steps_per_call),
    concurrently, before the first step, so that the loop never stops to compile one mid-run."""
    calls = [(self.function(n), self.example(n)) for n in sizes]  # here: the threads below only compile
    if not calls:
      return
    with futures.ThreadPoolExecutor(len(calls)) as pool:
      for done in [pool.submit(lambda f, x: f.lower(state, x).compile(), f, x) for f, x in calls]:
        done.result()


class HostFeed(Feed):
  def __init__(self, run, num_steps: int):
    self.run, self.steps, self.layout = run, run.steps, run.steps.layout
    self.batches = iter(pipeline.train_dataset(run.dataset, run.config.data, seed=run.config.seed, num_steps=num_steps,
                                               process_index=jax.process_index(), process_count=jax.process_count()))

  def __call__(self, state, step: int, n: int = 1):
    if n == 1:
      return self.function(1)(state, self.layout.train_batch(next(self.batches)))
    return self.function(n)(state, self.layout.train_batches([next(self.batches) for _ in range(n)]))

  def function(self, n: int):
    return self.steps.train_step if n == 1 else self.steps.train_steps

  def example(self, n: int):
    batch = next(iter(pipeline.train_dataset(self.run.dataset, self.run.config.data, seed=0, num_steps=1,
                                             process_index=jax.process_index(), process_count=jax.process_count())))
    return self.layout.train_batch(batch) if n == 1 else self.layout.train_batches([batch] * n)

  def get_state(self):
    return self.batches.get_state()

  def set_state(self, saved):
    self.batches.set_state(saved)


def split_arrays(dataset: Dataset, data_config) -> dict[str, np.ndarray]:
  """The training split as the devices keep it: {'tokens'} (a token stream) or preprocessed {'inputs','targets'}."""
  if dataset.is_token_stream:
    return {"tokens": dataset.train["tokens"]}
  return {"inputs": pipeline.make_preprocess(dataset, data_config)(dataset.train["inputs"]),
          "targets": dataset.train["targets"]}


def gather(data: dict[str, jax.Array], step: jax.Array, seq_len: int, rows=lambda r: r) -> dict[str, jax.Array]:
  """Inside the compiled step: global step `step`'s batch {'inputs','targets','mask','row'} from `data` (the split
  and an index table whose row 0 is step data['first']). `rows`: the layout's choice of this device's rows of the
  global batch (layout.constrain_batch), applied to the indices before anything is gathered."""
  at = step - data["first"]
  mask = data["mask"][at]
  picked = rows({"index": data["index"][at], "mask": mask, "row": jnp.arange(mask.shape[0], dtype=jnp.int32)})
  index, batch = picked["index"], {"mask": picked["mask"], "row": picked["row"]}
  if "tokens" in data:
    windows = jnp.take(data["tokens"], index[:, None] + jnp.arange(seq_len + 1), axis=0)
    return {**batch, "inputs": windows[:, :-1], "targets": windows[:, 1:]}
  return {**batch, "inputs": jnp.take(data["inputs"], index, axis=0),
          "targets": jnp.take(data["targets"], index, axis=0)}


class DeviceFeed(Feed):
  TABLE_STEPS = 1000  # steps of indices sent at a time (MNIST batch 32: 128 KB)

  def __init__(self, run, num_steps: int):
    self.run, self.steps, self.layout = run, run.steps, run.steps.layout
    # the global batch's indices (every process draws all rows; each device gathers only its own)
    self.draw = pipeline.batch_function(run.dataset, run.config.data, seed=run.config.seed, indices_only=True)
    self.split, self.data, self.first, self.last, self.next_index = None, None, 0, 0, 0

  def _place_split(self) -> dict[str, jax.Array]:
    """The split on every device, at the first step (a relaunch that only evaluates never places it)."""
    arrays = split_arrays(self.run.dataset, self.run.config.data)
    size = sum(a.nbytes for a in arrays.values())
    mine = next(d for d in self.layout.mesh.devices.flat if d.process_index == jax.process_index())
    limit = (mine.memory_stats() or {}).get("bytes_limit")  # None on CPU
    if limit and size > limit / 2:
      raise UserError(f"config.data.on_device: the training split takes {size / 2**30:.2f} GiB, more than half of a "
                      f"device's {limit / 2**30:.2f} GiB; set data.on_device=False to feed it from the host")
    logging.info("data.on_device: the training split (%.1f MB) is on every device; each step gathers its batch",
                 size / 2**20)
    return self.layout.place_data(arrays)

  def __call__(self, state, step: int, n: int = 1):
    # the step reads its table row by its own counter, which must be `step`: a call out of turn is refused (the
    # train loop's calls follow each other from the checkpoint's position, which is the state's step)
    if step != self.next_index:
      raise RuntimeError(f"DeviceFeed: called for step {step}, but the stream is at step {self.next_index}")
    self.next_index = step + n
    return self.steps.on_device(n)(state, self._data(step, n))

  def _data(self, step: int, n: int):
    """The split and an index table covering steps [step, step + n)."""
    if self.split is None:
      self.split = self._place_split()
    if self.data is None or not self.first <= step <= step + n <= self.last:
      count = max(n, self.TABLE_STEPS)  # rows past the run's last step are drawn like any other, never read
      rows = [self.draw(s) for s in range(step, step + count)]
      table = {"index": np.stack([r["index"] for r in rows]), "mask": np.stack([r["mask"] for r in rows]),
               "first": np.int32(step)}
      self.data = {**self.split, **self.layout.place_data(table)}  # made here, once per table, not per step
      self.first, self.last = step, step + count
    return self.data

  def function(self, n: int):
    return self.steps.on_device(n)

  def example(self, n: int):
    return self._data(self.next_index, n)

  def get_state(self):
    return {"next_index": self.next_index}

  def set_state(self, saved):
    self.next_index = int(saved["next_index"])
