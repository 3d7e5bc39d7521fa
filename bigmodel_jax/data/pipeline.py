"""Deterministic, per-process sharded, checkpointable batch iterators over an in-memory `Dataset`.

Element `step` of the train stream is global batch `step`: epoch = step // steps_per_epoch, examples
taken from a permutation seeded by (seed, epoch). Each process materialises only its slice of the
global batch, so N processes together feed exactly the batch one process would. grain supplies the
iterator (prefetch threads, get_state/set_state for checkpoints, per-element seeded randomness for
augmentation); the indexing is ours because grain batches record by record, ~40x slower here than
one numpy gather per batch.
"""

import functools
import math
from typing import Callable, Iterator

import grain
import numpy as np

from bigmodel_jax.data import Dataset
from bigmodel_jax.errors import UserError

Batch = dict[str, np.ndarray]


def make_preprocess(dataset: Dataset, data_config) -> Callable[[np.ndarray], np.ndarray]:
  """Raw inputs -> float32 model inputs, by config.data.normalize: none | unit | standardize (token ids stay ids).
  The constants are the run's model card's (model_card.preprocessing), which export and serving apply too."""
  from bigmodel_jax import model_card
  pre = model_card.preprocessing(dataset, data_config)
  return lambda x: model_card.apply(pre, x, np)


@functools.cache
def train_statistics(dataset: Dataset) -> tuple[np.ndarray, np.ndarray]:
  """Per-channel (images) or per-feature (tabular) mean and std of the training split, in [0, 1] units."""
  train = dataset.train["inputs"].astype(np.float32) / np.float32(dataset.input_scale)
  axes = tuple(range(train.ndim - 1))
  return train.mean(axis=axes), train.std(axis=axes) + 1e-6


def augment(batch: Batch, rng: np.random.Generator, crop_padding: int, horizontal_flip: bool,
            offset: int = 0, global_size: int | None = None) -> Batch:
  """Random crop after zero padding and random horizontal flip, per example (images N,H,W,C).

  The draws are made for the whole global batch (`global_size` rows) and this process keeps rows
  [offset, offset + N), so N processes augment exactly as one process would.
  """
  x = batch["inputs"]
  n = len(x)
  size = global_size or n
  if crop_padding:
    _, h, w, _ = x.shape
    p = crop_padding
    padded = np.pad(x, ((0, 0), (p, p), (p, p), (0, 0)))
    dy, dx = rng.integers(0, 2 * p + 1, size=(2, size))[:, offset:offset + n]
    rows = dy[:, None] + np.arange(h)[None, :]
    cols = dx[:, None] + np.arange(w)[None, :]
    x = padded[np.arange(n)[:, None, None], rows[:, :, None], cols[:, None, :]]
  if horizontal_flip:
    flip = (rng.random(size) < 0.5)[offset:offset + n]
    x = np.where(flip[:, None, None, None], x[:, :, ::-1], x)
  return {**batch, "inputs": x}


class EpochIndexer:
  """Maps a global step to the example indices (and mask) of this process's slice of that batch."""

  def __init__(self, num_examples: int, global_batch_size: int, *, seed: int, shuffle: bool,
               drop_remainder: bool, process_index: int = 0, process_count: int = 1):
    self.n, self.batch_size = num_examples, global_batch_size
    self.seed, self.shuffle = seed, shuffle
    self.local = global_batch_size // process_count
    self.offset = process_index * self.local
    self.steps_per_epoch = (num_examples // global_batch_size if drop_remainder
                            else math.ceil(num_examples / global_batch_size))

  @functools.lru_cache(maxsize=2)
  def order(self, epoch: int) -> np.ndarray:
    if not self.shuffle:
      return np.arange(self.n)
    return np.random.default_rng([self.seed, epoch]).permutation(self.n)

  def __call__(self, step: int) -> tuple[np.ndarray, np.ndarray]:
    epoch, i = divmod(int(step), self.steps_per_epoch)
    start = i * self.batch_size + self.offset
    idx = self.order(epoch)[start:start + self.local]
    mask = np.zeros(self.local, np.float32)
    mask[:len(idx)] = 1.0
    return np.pad(idx, (0, self.local - len(idx))), mask  # padding rows repeat example 0, masked out


def random_windows(tokens: np.ndarray, seq_len: int, global_batch_size: int, *, seed: int, process_index: int = 0,
                   process_count: int = 1, starts_only: bool = False) -> Callable[[int], Batch]:
  """Language-model batches as nanoGPT draws them: `global_batch_size` windows of seq_len + 1 tokens at
  random offsets of the stream, drawn from a generator seeded by (seed, step), so any step is reproducible
  on its own (resume needs no iterator state beyond the step) and each process keeps its rows.
  `starts_only`: each window's first position as "index" instead (config.data.on_device gathers the windows)."""
  local = global_batch_size // process_count
  offset = process_index * local
  span = np.arange(seq_len + 1)

  def gather(step):
    starts = np.random.default_rng([seed, step]).integers(0, len(tokens) - seq_len, size=global_batch_size)
    if starts_only:
      return {"index": starts[offset:offset + local].astype(np.int32), "mask": np.ones(local, np.float32)}
    w = tokens[starts[offset:offset + local, None] + span]
    return {"inputs": w[:, :-1], "targets": w[:, 1:], "mask": np.ones(local, np.float32)}
  return gather


def batch_function(dataset: Dataset, data_config, *, seed: int, process_index: int = 0, process_count: int = 1,
                   indices_only: bool = False) -> Callable[[int], Batch]:
  """Global step -> this process's rows of that step's training batch {'inputs','targets','mask'}, as stored
  (before augmentation and preprocessing). `indices_only`: {'index','mask'} instead, each row's example index
  (a token stream: its window's first position), the same draws (config.data.on_device gathers the rows)."""
  split = dataset.train
  if dataset.is_token_stream:
    return random_windows(split["tokens"], dataset.input_shape[0], data_config.batch_size, seed=seed,
                          process_index=process_index, process_count=process_count, starts_only=indices_only)
  indexer = EpochIndexer(dataset.num_examples("train"), data_config.batch_size, seed=seed,
                         shuffle=data_config.shuffle, drop_remainder=data_config.drop_remainder,
                         process_index=process_index, process_count=process_count)

  def gather(step):
    idx, mask = indexer(step)
    if indices_only:
      return {"index": idx.astype(np.int32), "mask": mask}
    return {"inputs": split["inputs"][idx], "targets": split["targets"][idx], "mask": mask}
  return gather


def train_dataset(dataset: Dataset, data_config, *, seed: int, num_steps: int, process_index: int = 0,
                  process_count: int = 1) -> grain.IterDataset:
  """The training stream as a grain dataset of `num_steps` local batches {'inputs','targets','mask'}."""
  preprocess = make_preprocess(dataset, data_config)
  ds = grain.MapDataset.range(num_steps).map(batch_function(dataset, data_config, seed=seed,
                                                            process_index=process_index, process_count=process_count))
  aug = data_config.augment
  if dataset.is_image and (aug.random_crop_padding or aug.horizontal_flip):
    local = data_config.batch_size // process_count
    ds = ds.random_map(lambda b, rng: augment(b, rng, aug.random_crop_padding, aug.horizontal_flip,
                                              process_index * local, data_config.batch_size), seed=seed)
  ds = ds.map(lambda b: {**b, "inputs": preprocess(b["inputs"])})
  return ds.to_iter_dataset(grain.ReadOptions(num_threads=data_config.num_threads,
                                              prefetch_buffer_size=data_config.prefetch))


def check_position(saved, step: int, where) -> None:
  """A checkpoint's data position must be the one `step` training steps leave: {'next_index': step}, as element
  `step` of the train stream is global batch `step` (its epoch and offset follow from the config's batch size and
  steps per epoch). Any other value would silently train on other batches than the run it continues, and run
  out of stream before the last step. `where`: the file it was read from."""
  fix = (f"put back the checkpoint's own value ({{\"next_index\": {step}}}), or move step directory {step} away to "
         "resume from an earlier one")
  if not isinstance(saved, dict) or set(saved) != {"next_index"}:
    fields = ", ".join(sorted(map(str, saved))) if isinstance(saved, dict) else type(saved).__name__
    raise UserError(f"{where}: the data position has fields {fields or 'none'}, not next_index; {fix}")
  value = saved["next_index"]
  if type(value) is not int:  # bool is an int too: not a position
    raise UserError(f"{where}: field next_index is {value!r} ({type(value).__name__}), not an integer; {fix}")
  if value != step:
    raise UserError(f"{where}: field next_index is {value}, but checkpoint step {step} continues with batch {step} of "
                    f"the training stream; {fix}")


def steps_per_epoch(dataset: Dataset, data_config) -> int:
  """Batches per pass over the training split (for a token stream: batches holding as many tokens as it)."""
  if dataset.is_token_stream:
    return max(1, dataset.num_examples("train") // (data_config.batch_size * dataset.input_shape[0]))
  return EpochIndexer(dataset.num_examples("train"), data_config.batch_size, seed=0, shuffle=False,
                      drop_remainder=data_config.drop_remainder).steps_per_epoch


def eval_batches(dataset: Dataset, split: str, data_config, *, process_index: int = 0,
                 process_count: int = 1, multiple_of: int = 1) -> Iterator[Batch]:
  """Every example of a split once, in order, in padded global batches (mask marks real rows) of
  data.eval_batch_size rounded up to `multiple_of` (the batch shards of the mesh)."""
  arrays = dataset.split(split)
  preprocess = make_preprocess(dataset, data_config)
  batch_size = -(-data_config.eval_batch_size // multiple_of) * multiple_of
  indexer = EpochIndexer(len(arrays["targets"]), batch_size, seed=0, shuffle=False,
                         drop_remainder=False, process_index=process_index, process_count=process_count)
  for step in range(indexer.steps_per_epoch):
    idx, mask = indexer(step)
    batch = {k: v[idx] for k, v in arrays.items()}  # inputs, targets (+ token_mask of LM windows)
    # index: each row's example number in the split (fixed per-example randomness in eval, e.g. a GAN's noise)
    yield {**batch, "inputs": preprocess(batch["inputs"]), "mask": mask, "index": idx.astype(np.int32)}
