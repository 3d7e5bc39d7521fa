"""/v1/predict's batching (bigmodel_jax/serve.py): one worker thread runs the model on the queued requests' examples,
up to max_batch at a time, padded to a bucket (powers of two up to max_batch) so that every shape is compiled at
start-up.
"""

import queue
import threading
import time

import jax
import numpy as np
from absl import logging


def buckets(max_batch: int) -> list[int]:
  """Batch sizes compiled: powers of two below max_batch, and max_batch."""
  return [b for b in (2 ** i for i in range(max_batch.bit_length())) if b < max_batch] + [max_batch]


class _Job:
  def __init__(self, inputs: np.ndarray):
    self.inputs, self.done, self.result, self.error = inputs, threading.Event(), None, None


class Batcher:
  """One worker thread running `call(bucket, inputs)` on the queued requests' examples, max_batch at a time.
  It waits for more only while `coming()` (predict requests whose bodies have arrived, being decoded) is not 0: a
  lone client, or a stalled upload, does not hold a batch for the timeout."""

  def __init__(self, call, max_batch: int, timeout_s: float, coming=lambda: 1):
    self.call, self.max_batch, self.timeout_s, self.coming = call, max_batch, timeout_s, coming
    self.queue, self.carry = queue.Queue(), None
    self.batches = self.examples = 0
    self.thread = threading.Thread(target=self._work, name="serve-batcher", daemon=True)
    self.thread.start()

  def predict(self, inputs: np.ndarray) -> dict:
    job = _Job(inputs)
    self.queue.put(job)
    job.done.wait()
    if job.error is not None:
      raise job.error
    return job.result

  def stop(self) -> None:
    self.queue.put(None)
    self.thread.join()

  def _work(self) -> None:
    while True:
      first = self.carry or self.queue.get()
      self.carry = None
      if first is None:
        return
      jobs, count = [first], len(first.inputs)
      deadline = time.monotonic() + self.timeout_s
      while count < self.max_batch:
        try:
          job = self.queue.get_nowait()
        except queue.Empty:
          left = deadline - time.monotonic()
          if left <= 0 or not self.coming():
            break
          try:
            job = self.queue.get(timeout=min(left, 0.0005))
          except queue.Empty:
            continue
        if job is None or count + len(job.inputs) > self.max_batch:
          self.carry = job  # the next batch starts with it (None: stop after this batch)
          if job is None:
            self.queue.put(None)
          break
        jobs.append(job)
        count += len(job.inputs)
      self._run(jobs, count)

  def _run(self, jobs: list, count: int) -> None:
    try:
      bucket = next(b for b in buckets(self.max_batch) if b >= count)
      inputs = np.concatenate([j.inputs for j in jobs])
      padded = np.concatenate([inputs, np.zeros((bucket - count, *inputs.shape[1:]), inputs.dtype)])
      out = {k: np.asarray(v)[:count] for k, v in jax.device_get(self.call(bucket, padded)).items()}
      self.batches, self.examples = self.batches + 1, self.examples + count
      start = 0
      for job in jobs:
        job.result = {k: v[start:start + len(job.inputs)] for k, v in out.items()}
        start += len(job.inputs)
    except Exception as e:  # every waiting request gets it (a 500), the worker goes on
      logging.exception("serve: the model call failed")
      for job in jobs:
        job.error = e
    for job in jobs:
      job.done.set()
