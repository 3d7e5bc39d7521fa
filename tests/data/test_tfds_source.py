"""tfds:<name> reads a prepared TFDS dataset with no TensorFlow and no network, and fails fast otherwise."""

import time

import ml_collections
import numpy as np
import pytest
import tensorflow_datasets as tfds

from bigmodel_jax.data import TextCorpus, load_dataset, tfds_source
from bigmodel_jax.errors import UserError


def examples(n, seed):
  rng = np.random.default_rng(seed)
  return [(i, {"image": rng.integers(0, 255, (4, 4, 1), dtype=np.uint8), "label": i % 3}) for i in range(n)]


class TinyImages(tfds.core.GeneratorBasedBuilder):
  """A real TFDS builder (Tensor + ClassLabel features build without TensorFlow)."""
  VERSION = tfds.core.Version("1.0.0")

  def _info(self):
    return tfds.core.DatasetInfo(builder=self, supervised_keys=("image", "label"), features=tfds.features.FeaturesDict({
        "image": tfds.features.Tensor(shape=(4, 4, 1), dtype=np.uint8),
        "label": tfds.features.ClassLabel(names=["a", "b", "c"])}))

  def _split_generators(self, dl_manager):
    return {"train": self._generate_examples(30, 0), "test": self._generate_examples(12, 1)}

  def _generate_examples(self, n, seed):
    yield from examples(n, seed)


def test_prepared_tfds_dataset_loads_by_name(tmp_path):
  TinyImages(data_dir=tmp_path / "tfds", file_format="array_record").download_and_prepare()
  ds = load_dataset(ml_collections.ConfigDict({"name": "tfds:tiny_images", "data_dir": str(tmp_path)}))
  assert ds.kind == "image" and ds.num_classes == 3 and ds.class_names == ("a", "b", "c")
  assert ds.train["inputs"].shape == (30, 4, 4, 1) and ds.test["inputs"].shape == (12, 4, 4, 1)
  # the same records as generated (TFDS stores them in key-hash order)
  expected = {e["image"].tobytes(): e["label"] for _, e in examples(30, 0)}
  got = {x.tobytes(): int(y) for x, y in zip(ds.train["inputs"], ds.train["targets"])}
  assert got == expected


def reviews(n, seed):
  return [(i, {"text": f"review {seed}.{i}: très {'bien' if i % 2 else 'mal'} ✓", "label": i % 2}) for i in range(n)]


class TinyReviews(tfds.core.GeneratorBasedBuilder):
  """Text + ClassLabel, like imdb_reviews (TFDS's Text feature builds and reads without TensorFlow)."""
  VERSION = tfds.core.Version("1.0.0")

  def _text_feature(self):
    return tfds.features.Text()

  def _info(self):
    return tfds.core.DatasetInfo(builder=self, supervised_keys=("text", "label"), features=tfds.features.FeaturesDict({
        "text": self._text_feature(), "label": tfds.features.ClassLabel(names=["neg", "pos"])}))

  def _split_generators(self, dl_manager):
    return {"train": self._generate_examples(20, 0), "test": self._generate_examples(8, 1)}

  def _generate_examples(self, n, seed):
    yield from reviews(n, seed)


class TinyStringReviews(TinyReviews):
  """The same with a scalar string Tensor as the text feature."""

  def _text_feature(self):
    return tfds.features.Tensor(shape=(), dtype=np.str_)


@pytest.mark.parametrize("builder", [TinyReviews, TinyStringReviews])
def test_prepared_tfds_text_dataset_is_a_text_corpus(tmp_path, builder):
  builder(data_dir=tmp_path / "tfds", file_format="array_record").download_and_prepare()
  corpus = tfds_source.load(builder.name, tmp_path)
  assert isinstance(corpus, TextCorpus) and corpus.name == f"tfds:{builder.name}"
  assert corpus.class_names == ("neg", "pos") and corpus.train_labels.dtype == np.int32
  for texts, labels, n, seed in [(corpus.train, corpus.train_labels, 20, 0), (corpus.test, corpus.test_labels, 8, 1)]:
    assert len(texts) == len(labels) == n and all(isinstance(t, str) for t in texts)
    # the same (text, label) pairs as generated, decoded from UTF-8 (TFDS stores them in key-hash order)
    assert dict(zip(texts, labels.tolist())) == {e["text"]: e["label"] for _, e in reviews(n, seed)}


class TinySentences(tfds.core.GeneratorBasedBuilder):
  """Text only, supervised keys ('text', 'text'), like lm1b: a language-modelling corpus."""
  VERSION = tfds.core.Version("1.0.0")

  def _info(self):
    return tfds.core.DatasetInfo(builder=self, supervised_keys=("text", "text"),
                                 features=tfds.features.FeaturesDict({"text": tfds.features.Text()}))

  def _split_generators(self, dl_manager):
    return {"train": self._generate_examples(10, "train"), "test": self._generate_examples(4, "test")}

  def _generate_examples(self, n, split):
    for i in range(n):
      yield i, {"text": f"{split} sentence number {i}."}


def test_prepared_tfds_lm_text_is_an_unlabelled_corpus(tmp_path):
  TinySentences(data_dir=tmp_path / "tfds", file_format="array_record").download_and_prepare()
  corpus = tfds_source.load("tiny_sentences", tmp_path)
  assert isinstance(corpus, TextCorpus) and corpus.train_labels is None
  assert sorted(corpus.train) == sorted(f"train sentence number {i}." for i in range(10))
  assert sorted(corpus.test) == sorted(f"test sentence number {i}." for i in range(4))


def test_unprepared_tfds_dataset_fails_fast_offline(tmp_path):
  start = time.time()
  with pytest.raises(UserError, match="tfds:mnist"):
    load_dataset(ml_collections.ConfigDict({"name": "tfds:mnist", "data_dir": str(tmp_path)}))
  assert time.time() - start < 30


@pytest.mark.parametrize("name", ["tfds:", "tfds:Bad Name", "tfds:mnist:99.0.0"])
def test_malformed_tfds_name_is_a_user_error(tmp_path, name):
  with pytest.raises(UserError, match="not a valid TFDS name"):
    load_dataset(ml_collections.ConfigDict({"name": name, "data_dir": str(tmp_path)}))
