"""The data path: deterministic, resumable, per-process train streams; padded eval batches; idx files; fetching."""

import gzip
import hashlib
import io
import tarfile

import numpy as np
import pytest

from bigmodel_jax.config import base_config
from bigmodel_jax.data import fetch, images, load_dataset, pipeline
from bigmodel_jax.errors import UserError

NUM_STEPS = 60  # digits has 1,438 training images: 44 batches of 32 per epoch, so 60 steps cross an epoch


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
  data = base_config().data
  data.data_dir = str(tmp_path_factory.mktemp("data"))
  return load_dataset(data)


def data_config(batch_size=32, crop=0, flip=False, **fields):
  c = base_config().data
  c.batch_size = batch_size
  c.augment.random_crop_padding, c.augment.horizontal_flip = crop, flip
  c.update(fields)
  return c


def stream(dataset, config, *, seed=0, num_steps=NUM_STEPS, **processes):
  return iter(pipeline.train_dataset(dataset, config, seed=seed, num_steps=num_steps, **processes))


def take(iterator, n):
  return [next(iterator) for _ in range(n)]


def assert_same_batches(a, b):
  assert len(a) == len(b)
  for x, y in zip(a, b):
    assert x.keys() == y.keys() == {"inputs", "targets", "mask"}
    for key in x:
      np.testing.assert_array_equal(x[key], y[key], err_msg=key)


def test_same_seed_same_stream_other_seed_other_stream(digits):
  config = data_config()
  first = list(stream(digits, config, seed=0))
  assert len(first) == NUM_STEPS
  assert first[0]["inputs"].shape == (32, 8, 8, 1) and first[0]["inputs"].dtype == np.float32
  assert first[0]["targets"].shape == (32,) and np.all(first[0]["mask"] == 1.0)
  assert 0.0 <= first[0]["inputs"].min() and first[0]["inputs"].max() <= 1.0  # normalize = "unit"
  assert_same_batches(first, list(stream(digits, config, seed=0)))
  other = take(stream(digits, config, seed=1), 3)
  for a, b in zip(first, other):
    assert not np.array_equal(a["targets"], b["targets"])
  # an epoch later the order changes too: step 44 is not step 0 again
  assert not np.array_equal(first[0]["targets"], first[44]["targets"])


@pytest.mark.parametrize("augmented", [False, True])
def test_restored_iterator_continues_exactly(digits, augmented):
  config = data_config(crop=2 if augmented else 0, flip=augmented)
  uninterrupted = list(stream(digits, config))
  k = 40
  it = stream(digits, config)
  assert_same_batches(take(it, k), uninterrupted[:k])
  state = it.get_state()
  restored = stream(digits, config)
  restored.set_state(state)
  assert_same_batches(list(restored), uninterrupted[k:])  # across the epoch boundary at step 44


def test_each_epoch_is_a_permutation():
  n, batch = 1438, 32
  indexer = pipeline.EpochIndexer(n, batch, seed=3, shuffle=True, drop_remainder=False)
  assert indexer.steps_per_epoch == 45  # 44 full batches and one of 30
  orders = []
  for epoch in range(2):
    seen = []
    for step in range(epoch * 45, (epoch + 1) * 45):
      idx, mask = indexer(step)
      assert idx.shape == mask.shape == (batch,)
      assert mask.sum() == (batch if step % 45 < 44 else n - 44 * batch)
      assert np.all(mask[:int(mask.sum())] == 1.0)  # real rows first, padding after
      seen.append(idx[mask > 0])
    order = np.concatenate(seen)
    np.testing.assert_array_equal(np.sort(order), np.arange(n))  # every index exactly once
    orders.append(order)
  assert not np.array_equal(orders[0], orders[1])  # a new shuffle each epoch
  assert not np.array_equal(orders[0], np.arange(n))
  unshuffled = pipeline.EpochIndexer(n, batch, seed=3, shuffle=False, drop_remainder=True)
  assert unshuffled.steps_per_epoch == 44
  np.testing.assert_array_equal(unshuffled(1)[0], np.arange(32, 64))


def test_two_processes_feed_the_single_process_batch(digits):
  config = data_config()
  whole = take(stream(digits, config), 5)
  halves = [take(stream(digits, config, process_index=i, process_count=2), 5) for i in (0, 1)]
  for step in range(5):
    assert halves[0][step]["inputs"].shape == (16, 8, 8, 1)
    for key in whole[step]:
      joined = np.concatenate([halves[0][step][key], halves[1][step][key]])
      np.testing.assert_array_equal(joined, whole[step][key], err_msg=f"step {step} {key}")


def test_two_processes_feed_the_single_process_batch_with_augmentation(digits):
  config = data_config(crop=2, flip=True)
  whole = take(stream(digits, config), 3)
  halves = [take(stream(digits, config, process_index=i, process_count=2), 3) for i in (0, 1)]
  for step in range(3):
    joined = np.concatenate([halves[0][step]["inputs"], halves[1][step]["inputs"]])
    np.testing.assert_array_equal(joined, whole[step]["inputs"])


def test_eval_batches_cover_the_test_split_once(digits):
  config = data_config(eval_batch_size=100)
  test = digits.test
  assert len(test["targets"]) == 359
  batches = list(pipeline.eval_batches(digits, "test", config))
  assert len(batches) == 4
  for b in batches:
    assert b["inputs"].shape == (100, 8, 8, 1) and b["mask"].shape == (100,)
  masks = np.concatenate([b["mask"] for b in batches])
  assert masks.sum() == 359 and np.all(masks[:359] == 1) and np.all(masks[359:] == 0)
  real = lambda key: np.concatenate([b[key][b["mask"] > 0] for b in batches])
  np.testing.assert_array_equal(real("targets"), test["targets"])  # every example once, in order
  np.testing.assert_allclose(real("inputs"), test["inputs"].astype(np.float32) / 16.0)
  # two processes: the same padded global batches, split between them
  halves = [list(pipeline.eval_batches(digits, "test", config, process_index=i, process_count=2)) for i in (0, 1)]
  for whole, a, b in zip(batches, *halves):
    for key in whole:
      np.testing.assert_array_equal(np.concatenate([a[key], b[key]]), whole[key])


def crops_and_flips(image, padding):
  """Every image augment() can make from `image` (H, W, C): each shift of the zero-padded image, flipped or not."""
  h, w, _ = image.shape
  padded = np.pad(image, ((padding, padding), (padding, padding), (0, 0)))
  for dy in range(2 * padding + 1):
    for dx in range(2 * padding + 1):
      crop = padded[dy:dy + h, dx:dx + w]
      yield crop
      yield crop[:, ::-1]


def test_augmentation_keeps_shapes_and_is_deterministic_per_seed(digits):
  plain = take(stream(digits, data_config()), 2)
  config = data_config(crop=2, flip=True)
  augmented = take(stream(digits, config), 2)
  assert_same_batches(augmented, take(stream(digits, config), 2))  # same seed, same augmentation
  assert not np.array_equal(take(stream(digits, config, seed=1), 1)[0]["inputs"], augmented[0]["inputs"])
  changed = 0
  for p, a in zip(plain, augmented):
    assert a["inputs"].shape == p["inputs"].shape and a["inputs"].dtype == p["inputs"].dtype
    np.testing.assert_array_equal(a["targets"], p["targets"])  # augmentation never moves examples
    for original, image in zip(p["inputs"], a["inputs"]):
      assert any(np.array_equal(image, c) for c in crops_and_flips(original, 2))
      changed += not np.array_equal(image, original)
  assert changed > 32  # most of the 64 images were actually shifted or flipped


def write_idx(path, array):
  header = bytes([0, 0, 0x08, array.ndim]) + b"".join(d.to_bytes(4, "big") for d in array.shape)
  path.write_bytes(header + array.astype(np.uint8).tobytes())


def test_read_idx_round_trip_and_truncation(tmp_path):
  array = np.random.default_rng(0).integers(0, 256, size=(3, 4, 5), dtype=np.uint8)
  write_idx(tmp_path / "images", array)
  got = images.read_idx(tmp_path / "images")
  assert got.dtype == np.uint8
  np.testing.assert_array_equal(got, array)
  labels = np.arange(7, dtype=np.uint8)
  write_idx(tmp_path / "labels", labels)
  np.testing.assert_array_equal(images.read_idx(tmp_path / "labels"), labels)

  (tmp_path / "short").write_bytes((tmp_path / "images").read_bytes()[:-1])
  with pytest.raises(UserError, match="truncated") as e:
    images.read_idx(tmp_path / "short")
  assert str(tmp_path / "short") in str(e.value)
  (tmp_path / "float").write_bytes(bytes([0, 0, 0x0D, 1, 0, 0, 0, 1]) + b"\0\0\0\0")
  with pytest.raises(UserError, match="not a uint8 idx file"):
    images.read_idx(tmp_path / "float")


FILES = {"a.bin": b"first file", "b.bin": bytes(range(256)) * 3}
CHECKSUMS = {name: hashlib.sha256(blob).hexdigest() for name, blob in FILES.items()}


def source(name, result):
  """A fetch source: returns `result`, or raises it if it is an exception; records its calls."""
  def get():
    get.calls += 1
    if isinstance(result, Exception):
      raise result
    return dict(result)
  get.__name__, get.calls = name, 0
  return get


def test_ensure_files_falls_through_to_a_working_source(tmp_path):
  directory = tmp_path / "ds"
  offline = source("mirror", OSError("network unreachable"))
  works = source("registry", FILES)
  never = source("never", AssertionError("not reached"))
  assert fetch.ensure_files("ds", directory, CHECKSUMS, [offline, works, never], "hint") == directory
  assert (offline.calls, works.calls, never.calls) == (1, 1, 0)
  # no .partial files left; the verified record beside them (sizes, mtimes, sha256s) spares hashing them again
  assert sorted(p.name for p in directory.iterdir()) == [fetch.VERIFIED_FILE, "a.bin", "b.bin"]
  for name, blob in FILES.items():
    assert (directory / name).read_bytes() == blob
    assert fetch.sha256_of(directory / name) == CHECKSUMS[name]
  # present files are not fetched again
  fetch.ensure_files("ds", directory, CHECKSUMS, [never], "hint")
  assert never.calls == 0


def test_ensure_files_with_only_failing_sources_names_the_directory(tmp_path):
  directory = tmp_path / "ds"
  sources = [source("mirror", OSError("timed out")), source("npm", OSError("npm is not installed"))]
  with pytest.raises(UserError) as e:
    fetch.ensure_files("ds", directory, CHECKSUMS, sources, "put the files there by hand")
  message = str(e.value)
  assert str(directory) in message and "2 sources tried" in message and "put the files there by hand" in message
  assert not directory.exists()


def test_ensure_files_skips_a_source_with_a_wrong_checksum(tmp_path):
  directory = tmp_path / "ds"
  corrupt = source("corrupt", {**FILES, "b.bin": b"tampered"})
  incomplete = source("incomplete", {"a.bin": FILES["a.bin"]})  # a missing file (KeyError) falls through too
  good = source("good", FILES)
  fetch.ensure_files("ds", directory, CHECKSUMS, [corrupt, incomplete, good], "hint")
  assert (corrupt.calls, incomplete.calls, good.calls) == (1, 1, 1)
  assert (directory / "b.bin").read_bytes() == FILES["b.bin"]
  with pytest.raises(UserError):
    fetch.ensure_files("ds", tmp_path / "other", CHECKSUMS, [source("corrupt", {**FILES, "b.bin": b"x"})], "hint")
  assert not (tmp_path / "other").exists()  # nothing unverified is written


def ar_member(name: str, blob: bytes) -> bytes:
  header = (f"{name:<16}" f"{0:<12}" f"{0:<6}" f"{0:<6}" f"{100644:<8}" f"{len(blob):<10}").encode() + b"`\n"
  assert len(header) == 60
  return header + blob + (b"\n" if len(blob) % 2 else b"")


def tar_gz(members: dict[str, bytes]) -> bytes:
  buf = io.BytesIO()
  with tarfile.open(fileobj=buf, mode="w:gz") as tar:
    for name, blob in members.items():
      info = tarfile.TarInfo(name)
      info.size = len(blob)
      tar.addfile(info, io.BytesIO(blob))
  return buf.getvalue()


def test_deb_archive_unpacking():
  content = b"idx bytes " * 50
  data_tar = tar_gz({"./usr/share/datasets/x/images.gz": gzip.compress(content),
                     "./usr/share/datasets/x/README": b"plain"})
  deb = (b"!<arch>\n" + ar_member("debian-binary", b"2.0\n") + ar_member("control.tar.gz", b"odd-size!")
         + ar_member("data.tar.gz", data_tar))
  assert fetch.read_ar_member(deb, "data.tar") == data_tar  # found after an odd-sized, padded member
  assert fetch.read_ar_member(deb, "control") == b"odd-size!"
  files = fetch._unpack(deb, {"images": "usr/share/datasets/x/images.gz", "readme": "usr/share/datasets/x/README"},
                        deb=True)
  assert files == {"images": content, "readme": b"plain"}  # .gz members are decompressed, others kept
  with pytest.raises(OSError, match="no data.tar"):
    fetch.read_ar_member(b"!<arch>\n" + ar_member("debian-binary", b"2.0\n"), "data.tar")
  with pytest.raises(OSError, match="not an ar archive"):
    fetch.read_ar_member(data_tar, "data.tar")
  with pytest.raises(OSError, match="not in the archive"):
    fetch._unpack(deb, {"missing": "usr/share/datasets/x/nope.gz"}, deb=True)


def test_digits_are_sklearns_load_digits_read_without_importing_it(digits):
  """The digits loader parses sklearn's bundled file itself (importing sklearn.datasets costs 1.4 s per launch):
  its images and labels, split and all, are load_digits' exactly."""
  from sklearn.datasets import load_digits
  d = load_digits()
  splits = [s for s in (digits.train, digits.validation, digits.test) if s is not None]
  both = np.concatenate([s["inputs"] for s in splits])[..., 0]
  labels = np.concatenate([s["targets"] for s in splits])
  order = np.lexsort(np.concatenate([both.reshape(len(both), -1), labels[:, None]], axis=1).T)
  theirs = d.images.astype(np.uint8)
  their_order = np.lexsort(np.concatenate([theirs.reshape(len(theirs), -1), d.target[:, None]], axis=1).T)
  assert len(both) == len(theirs) == 1797 and both.dtype == np.uint8
  np.testing.assert_array_equal(both[order], theirs[their_order])
  np.testing.assert_array_equal(labels[order], d.target[their_order])
  assert np.abs(d.images - d.images.astype(np.uint8)).max() == 0  # integer values 0..16: the uint8 cast loses nothing


@pytest.mark.parametrize("name", ["mnist", "spam_assassin"])
def test_a_data_dir_that_is_a_file_names_the_field(tmp_path, monkeypatch, name):
  """config.data.data_dir (or $BIGMODEL_JAX_DATA_DIR) naming a file was 'FILE/mnist: Not a directory', naming
  neither the setting nor the fix; a dataset that never reads the data dir (digits) still loads."""
  (tmp_path / "f").write_text("x")
  with pytest.raises(UserError, match=rf"^config.data.data_dir: {tmp_path / 'f'} is not a directory "
                                      rf"\({tmp_path / 'f'} is a file\); name a directory"):
    load_dataset(data_config(name=name, data_dir=str(tmp_path / "f")))
  monkeypatch.setenv(fetch.DATA_DIR_ENV, str(tmp_path / "f" / "sub"))
  with pytest.raises(UserError, match=rf"^\${fetch.DATA_DIR_ENV}: {tmp_path / 'f' / 'sub'} is not a directory"):
    load_dataset(data_config(name=name, data_dir=""))
  assert load_dataset(data_config(data_dir=str(tmp_path / "f"))).name == "digits"
