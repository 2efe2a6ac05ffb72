"""TFDS builders for the data embedspace ships or finds on the machine, written as array_record.

Three datasets, all 28x28x1 uint8 with 10 classes:

- `embedded_fashion_mnist` and `embedded_mnist`: built from the **test** splits vendored in
  `embedspace/data/assets/` (10,000 images each), re-split into a fixed 8,000 train / 2,000 test
  split, stratified by class (`stratified_split`). The package's default run needs no network.
- `fashion_mnist_full`: the full Fashion-MNIST (60,000 train / 10,000 test, the original split)
  from the Debian package `dataset-fashion-mnist` (`/usr/share/datasets/fashion-mnist/`).

Images are stored as raw `tfds.features.Tensor(uint8)` rather than `tfds.features.Image`: the
latter PNG-encodes with TensorFlow, which embedspace does not depend on. Files are array_record so
that `tfds.data_source` gives random access for grain. Example order inside a split is the order
of `source_index` (TFDS shuffling is disabled); the input pipeline shuffles.

Builders are not entered in TFDS's global registry (`skip_registration=True`); `prepare` picks one
by name with a plain if/else and builds it on first use into `data_dir`, under a file lock so that
several processes on one machine can call it at once.
"""

from __future__ import annotations

import fcntl
import hashlib
import inspect
import os

import numpy as np
import tensorflow_datasets as tfds
from etils import epath

from embedspace.data import idx

ASSETS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "assets")
"""The vendored idx files: `assets/fashion_mnist/`, `assets/mnist/`."""
APT_FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
"""Where `apt-get install dataset-fashion-mnist` puts the full Fashion-MNIST."""
APT_INSTALL = "apt-get update && apt-get install -y dataset-fashion-mnist"
SPLIT_SALT = "embedspace-split-v1"
"""Salt of the hash that orders examples for the fixed train/test split."""
NUM_TRAIN = 8000
"""Train examples in the embedded datasets (the other 2,000 of the 10,000 are test)."""
LOCAL_NAMES = ("embedded_fashion_mnist", "embedded_mnist", "fashion_mnist_full")

FASHION_MNIST_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal",
                         "Shirt", "Sneaker", "Bag", "Ankle boot")
MNIST_CLASSES = tuple(str(d) for d in range(10))

_FASHION_CITATION = """@article{xiao2017fashion,
  title={Fashion-MNIST: a Novel Image Dataset for Benchmarking Machine Learning Algorithms},
  author={Xiao, Han and Rasul, Kashif and Vollgraf, Roland},
  journal={arXiv preprint arXiv:1708.07747},
  year={2017}
}"""
_MNIST_CITATION = """@article{lecun1998gradient,
  title={Gradient-based learning applied to document recognition},
  author={LeCun, Yann and Bottou, L{\\'e}on and Bengio, Yoshua and Haffner, Patrick},
  journal={Proceedings of the IEEE},
  volume={86}, number={11}, pages={2278--2324},
  year={1998}
}"""
_SPLIT_DOC = (
    "Train/test: a fixed 8,000/2,000 split of the 10,000 images of the original test split, "
    "stratified by class. Examples are ordered by the SHA-256 of f'{SPLIT_SALT}:{i}' (i the index "
    "in the idx file, SPLIT_SALT='embedspace-split-v1'); in that order the first round(0.8 * n_c) "
    "of each class c (largest-remainder rounding, so the total is exactly 8,000) are train, the "
    "rest test. `source_index` is i.")


def stratified_split(labels: np.ndarray, *, num_train: int,
                     salt: str = SPLIT_SALT) -> tuple[np.ndarray, np.ndarray]:
  """A fixed, class-stratified train/test split of `len(labels)` examples.

  Examples are ranked by `sha256(f"{salt}:{i}")` (a permutation that does not depend on any RNG
  implementation or library version). Class `c` with `n_c` members gets
  `q_c ~= num_train * n_c / n` train examples (floor, then the leftover to the largest
  remainders, ties to the smaller class id), taken as its first `q_c` members in rank order.

  Args:
    labels: int `[n]`.
    num_train: train examples in all, `0 <= num_train <= n`.
    salt: changes the permutation.

  Returns:
    `(train, test)`: sorted int64 indices into `labels`, disjoint, together `arange(n)`.

  Raises:
    ValueError: if `num_train` is out of range.
  """
  labels = np.asarray(labels)
  n = len(labels)
  if not 0 <= num_train <= n:
    raise ValueError(f"num_train={num_train} is out of range for {n} examples")
  keys = np.array([int.from_bytes(hashlib.sha256(f"{salt}:{i}".encode()).digest()[:8], "big")
                   for i in range(n)], dtype=np.uint64)
  order = np.argsort(keys, kind="stable")
  classes, counts = np.unique(labels, return_counts=True)
  exact = counts * num_train / n
  quota = np.floor(exact).astype(np.int64)
  leftover = num_train - int(quota.sum())
  quota[np.argsort(-(exact - quota), kind="stable")[:leftover]] += 1
  ranked = labels[order]
  train = np.concatenate([order[ranked == c][:q] for c, q in zip(classes, quota)])
  train = np.sort(train).astype(np.int64)
  test = np.setdiff1d(np.arange(n, dtype=np.int64), train)
  return train, test


class _IdxBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """Base of the builders: 28x28x1 uint8 images with a class label, read from idx files.

  Args (constructor):
    source_dir: folder holding the idx `.gz` files (default: the class's `DEFAULT_SOURCE_DIR`).
    data_dir: TFDS data dir to build into (default: TFDS's, `~/tensorflow_datasets` or
      `$TFDS_DATA_DIR`).
    **kwargs: passed to `tfds.core.GeneratorBasedBuilder`; `file_format` defaults to
      `"array_record"`.
  """

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "First release."}
  DEFAULT_SOURCE_DIR: str
  CLASS_NAMES: tuple[str, ...]
  DESCRIPTION: str
  CITATION: str
  HOMEPAGE: str
  MEAN: tuple[float, ...]
  """Mean of pixel/255 over the train split (the normalisation the pipeline uses)."""
  STD: tuple[float, ...]
  """Standard deviation of pixel/255 over the train split."""

  def __init__(self, *, source_dir: str | None = None, **kwargs):
    self.source_dir = os.fspath(source_dir) if source_dir is not None else self.DEFAULT_SOURCE_DIR
    kwargs.setdefault("file_format", "array_record")
    super().__init__(**kwargs)

  @tfds.core.utils.classproperty
  @classmethod
  def code_path(cls) -> epath.Path:
    # TFDS 4.9.10 resolves this via `importlib_resources`, which it installs only on Python < 3.9,
    # so building a builder that lives in a package fails with ModuleNotFoundError. The value it
    # would compute is the module's file.
    return epath.Path(inspect.getfile(cls))

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
        builder=self,
        description=self.DESCRIPTION,
        features=tfds.features.FeaturesDict({
            "image": tfds.features.Tensor(shape=(28, 28, 1), dtype=np.uint8),
            "label": tfds.features.ClassLabel(names=list(self.CLASS_NAMES)),
            "source_index": tfds.features.Tensor(shape=(), dtype=np.int32),
        }),
        supervised_keys=("image", "label"),
        homepage=self.HOMEPAGE,
        citation=self.CITATION,
        disable_shuffling=True,
    )

  def _read(self, prefix: str) -> tuple[np.ndarray, np.ndarray]:
    """Images `[n, 28, 28]` and labels `[n]` of `{prefix}-images-idx3-ubyte.gz` etc."""
    images, labels = idx.read_idx_pair(
        os.path.join(self.source_dir, f"{prefix}-images-idx3-ubyte.gz"),
        os.path.join(self.source_dir, f"{prefix}-labels-idx1-ubyte.gz"),
        num_classes=len(self.CLASS_NAMES))
    if images.shape[1:] != (28, 28):
      raise idx.IdxFormatError(f"{self.source_dir}/{prefix}-images-idx3-ubyte.gz: images are "
                               f"{images.shape[1]}x{images.shape[2]}, expected 28x28")
    return images, labels

  def _generate_examples(self, images: np.ndarray, labels: np.ndarray, indices: np.ndarray):
    for i in indices:
      yield int(i), {"image": images[i][:, :, None], "label": int(labels[i]),
                     "source_index": np.int32(i)}


class _EmbeddedBuilder(_IdxBuilder, skip_registration=True):
  """A fixed 8,000/2,000 stratified split of a vendored 10,000-image test split."""

  def _split_generators(self, dl_manager):
    del dl_manager  # Nothing to download: the files ship with the package.
    images, labels = self._read("t10k")
    train, test = stratified_split(labels, num_train=NUM_TRAIN)
    return {"train": self._generate_examples(images, labels, train),
            "test": self._generate_examples(images, labels, test)}


class EmbeddedFashionMnist(_EmbeddedBuilder, skip_registration=True):
  """Fashion-MNIST test split (shipped), re-split 8,000 train / 2,000 test."""

  name = "embedded_fashion_mnist"
  DEFAULT_SOURCE_DIR = os.path.join(ASSETS_DIR, "fashion_mnist")
  CLASS_NAMES = FASHION_MNIST_CLASSES
  HOMEPAGE = "https://github.com/zalandoresearch/fashion-mnist"
  CITATION = _FASHION_CITATION
  DESCRIPTION = ("Fashion-MNIST (Xiao et al. 2017; MIT licence, (c) 2017 Zalando SE): 28x28 "
                 "grayscale images of Zalando articles in 10 classes. " + _SPLIT_DOC)
  MEAN = (0.2872,)
  STD = (0.3524,)


class EmbeddedMnist(_EmbeddedBuilder, skip_registration=True):
  """MNIST test split (shipped), re-split 8,000 train / 2,000 test."""

  name = "embedded_mnist"
  DEFAULT_SOURCE_DIR = os.path.join(ASSETS_DIR, "mnist")
  CLASS_NAMES = MNIST_CLASSES
  HOMEPAGE = "http://yann.lecun.com/exdb/mnist/"
  CITATION = _MNIST_CITATION
  DESCRIPTION = ("MNIST (LeCun & Cortes; CC BY-SA 3.0): 28x28 grayscale handwritten digits. "
                 + _SPLIT_DOC)
  MEAN = (0.1325,)
  STD = (0.3105,)


class FashionMnistFull(_IdxBuilder, skip_registration=True):
  """The full Fashion-MNIST (60,000 train / 10,000 test) from `apt-get install
  dataset-fashion-mnist`.

  Raises (while building):
    FileNotFoundError: if the idx files are not in `source_dir`, with the apt-get command.
  """

  name = "fashion_mnist_full"
  DEFAULT_SOURCE_DIR = APT_FASHION_MNIST_DIR
  CLASS_NAMES = FASHION_MNIST_CLASSES
  HOMEPAGE = "https://github.com/zalandoresearch/fashion-mnist"
  CITATION = _FASHION_CITATION
  DESCRIPTION = ("Fashion-MNIST (Xiao et al. 2017; MIT licence, (c) 2017 Zalando SE), the "
                 "original 60,000/10,000 train/test split, read from the Debian package "
                 "dataset-fashion-mnist. `source_index` is the index in the split's idx file.")
  MEAN = (0.2860,)
  STD = (0.3530,)
  FILES = ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz",
           "t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz")

  def _split_generators(self, dl_manager):
    del dl_manager  # Read from the local apt package, never downloaded.
    missing = [f for f in self.FILES if not os.path.exists(os.path.join(self.source_dir, f))]
    if missing:
      raise FileNotFoundError(
          f"fashion_mnist_full: {', '.join(missing)} not found in {self.source_dir}. Install the "
          f"full Fashion-MNIST with `{APT_INSTALL}` (files land in {APT_FASHION_MNIST_DIR}), "
          "or pass source_dir= a folder that holds these idx files.")
    train_images, train_labels = self._read("train")
    test_images, test_labels = self._read("t10k")
    return {
        "train": self._generate_examples(train_images, train_labels, np.arange(len(train_labels))),
        "test": self._generate_examples(test_images, test_labels, np.arange(len(test_labels))),
    }


def default_data_dir() -> str:
  """TFDS's default data dir: `$TFDS_DATA_DIR`, else `~/tensorflow_datasets`."""
  return os.path.expanduser(os.environ.get("TFDS_DATA_DIR") or "~/tensorflow_datasets")


def builder_class(name: str) -> type[_IdxBuilder]:
  """The builder class of a local dataset (its `CLASS_NAMES`, `MEAN`, `STD`); builds nothing.

  Raises:
    ValueError: if `name` is not a local dataset.
  """
  if name == "embedded_fashion_mnist":
    return EmbeddedFashionMnist
  if name == "embedded_mnist":
    return EmbeddedMnist
  if name == "fashion_mnist_full":
    return FashionMnistFull
  raise ValueError(f"{name!r} is not a local dataset; local datasets are {LOCAL_NAMES}")


def prepare(name: str, *, data_dir: str | None = None,
            source_dir: str | None = None) -> _IdxBuilder:
  """The builder of a local dataset, built into `data_dir` if it is not there yet.

  The first call writes `{data_dir}/{name}/1.0.0/` (array_record shards plus TFDS metadata;
  ~1-2 s for the embedded datasets); later calls find it and reuse it. A lock file
  `{data_dir}/{name}.lock` serialises concurrent builders on one machine.

  Args:
    name: one of `LOCAL_NAMES`.
    data_dir: where to build (default `default_data_dir()`).
    source_dir: folder of the idx files (default: the vendored assets, or
      `/usr/share/datasets/fashion-mnist` for `fashion_mnist_full`).

  Raises:
    ValueError: if `name` is not a local dataset.
    FileNotFoundError: if the source files are missing (for `fashion_mnist_full`, with the
      `apt-get` command that installs them).
    idx.IdxFormatError: if a source file is corrupted.
  """
  cls = builder_class(name)
  data_dir = os.path.expanduser(os.fspath(data_dir)) if data_dir else default_data_dir()
  os.makedirs(data_dir, exist_ok=True)
  with open(os.path.join(data_dir, f"{name}.lock"), "w") as lock:
    fcntl.flock(lock, fcntl.LOCK_EX)
    try:
      # Constructed under the lock, so that it sees data another process may just have built.
      builder = cls(data_dir=data_dir, source_dir=source_dir)
      if not builder.is_prepared():
        builder.download_and_prepare()
    finally:
      fcntl.flock(lock, fcntl.LOCK_UN)
  return builder
