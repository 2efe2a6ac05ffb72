"""Tests of embedspace.data: idx files, shipped datasets, get_source and the grain pipelines."""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import pickle
import shutil

import numpy as np
import pytest
import tensorflow_datasets as tfds
from absl import flags

from embedspace import data
from embedspace.data import augment, idx, shipped

flags.FLAGS.mark_as_parsed()  # grain reads absl flags (worker processes need them parsed).

ASSETS = shipped.ASSETS_DIR
APT_FASHION_MNIST = "/usr/share/datasets/fashion-mnist"  # apt-get install dataset-fashion-mnist
# MD5 of the decompressed idx files (as in assets/fashion_mnist/ATTRIBUTION.md).
FASHION_MNIST_MD5 = {"train-images-idx3-ubyte": "f4a8712d7a061bf5bd6d2ca38dc4d50a",
                     "train-labels-idx1-ubyte": "9018921c3c673c538a1fc5bad174d6f9",
                     "t10k-images-idx3-ubyte": "8181f5470baa50b63fa0f6fddb340f0a",
                     "t10k-labels-idx1-ubyte": "15d484375f8d13e6eb1aabb0c3f46965"}
# SHA-256 (first 16 hex digits) of embedded_mnist's sorted train indices: pins its split.
MNIST_SPLIT_FINGERPRINT = "409fc9624dfd51c6"


def _decompressed(path: str) -> bytes:
  with gzip.open(path, "rb") as f:
    return f.read()


def _toy(n: int = 64, size: int = 28, channels: int = 1, seed: int = 0) -> data.ImageSource:
  """n random images whose label is their index (so batches tell which records they hold)."""
  rng = np.random.default_rng(seed)
  images = rng.integers(0, 256, (n, size, size, channels), dtype=np.uint8)
  return data.ImageSource.from_arrays(images, np.arange(n), mean=(0.5,) * channels,
                                      std=(0.25,) * channels)


def _batches(loader, k: int) -> list[dict]:
  it = iter(loader)
  return [next(it) for _ in range(k)]


def _assert_batches_equal(a: list[dict], b: list[dict]) -> None:
  assert len(a) == len(b)
  for x, y in zip(a, b):
    assert x.keys() == y.keys()
    for key in x:
      np.testing.assert_array_equal(x[key], y[key], err_msg=key)


# ---------------------------------------------------------------------------------------------
# idx files


def test_idx_roundtrip(tmp_path):
  images = np.random.default_rng(0).integers(0, 256, (5, 28, 28), dtype=np.uint8)
  labels = np.array([0, 3, 9, 1, 2], np.uint8)
  idx.write_idx(tmp_path / "i.gz", images)
  idx.write_idx(tmp_path / "l", labels)
  got_images, got_labels = idx.read_idx_pair(tmp_path / "i.gz", tmp_path / "l", num_classes=10)
  np.testing.assert_array_equal(got_images, images)
  np.testing.assert_array_equal(got_labels, labels)


@pytest.mark.parametrize("corruption, match", [
    ("truncated_gzip", "gzip"),
    ("short_payload", "truncated or corrupted"),
    ("bad_magic", "magic number"),
    ("label_range", "out of range"),
    ("count_mismatch", "holds 5 images but"),
])
def test_idx_corruption_is_a_clear_error(tmp_path, corruption, match):
  images = np.zeros((5, 28, 28), np.uint8)
  labels = np.zeros(5, np.uint8)
  idx.write_idx(tmp_path / "i.gz", images)
  idx.write_idx(tmp_path / "l.gz", labels)
  if corruption == "truncated_gzip":
    raw = (tmp_path / "i.gz").read_bytes()
    (tmp_path / "i.gz").write_bytes(raw[:len(raw) // 2])
  elif corruption == "short_payload":
    with gzip.open(tmp_path / "i.gz", "rb") as f:
      raw = f.read()
    with gzip.open(tmp_path / "i.gz", "wb") as f:
      f.write(raw[:-10])
  elif corruption == "bad_magic":
    with gzip.open(tmp_path / "i.gz", "rb") as f:
      raw = f.read()
    with gzip.open(tmp_path / "i.gz", "wb") as f:
      f.write(b"\x00\x00\x08\x01" + raw[4:])
  elif corruption == "label_range":
    idx.write_idx(tmp_path / "l.gz", np.array([0, 1, 2, 3, 10], np.uint8))
  elif corruption == "count_mismatch":
    idx.write_idx(tmp_path / "l.gz", np.zeros(4, np.uint8))
  with pytest.raises(idx.IdxFormatError, match=match) as e:
    idx.read_idx_pair(tmp_path / "i.gz", tmp_path / "l.gz", num_classes=10)
  assert str(tmp_path) in str(e.value)


# ---------------------------------------------------------------------------------------------
# Shipped datasets and get_source


def test_shipped_fashion_mnist_is_the_standard_split(tmp_path):
  folder = os.path.join(ASSETS, "fashion_mnist")
  raw = {}
  for stem, md5 in FASHION_MNIST_MD5.items():
    raw[stem] = _decompressed(os.path.join(folder, stem + ".gz"))
    assert hashlib.md5(raw[stem]).hexdigest() == md5, stem
  for split, prefix, n in (("train", "train", 60000), ("test", "t10k", 10000)):
    source, info = data.get_source("embedded_fashion_mnist", split=split,
                                   data_dir=str(tmp_path / "unused"))
    assert len(source) == info.num_examples == n
    assert info.image_shape == (28, 28, 1) and info.num_classes == 10
    assert info.class_names[0] == "T-shirt/top" and info.class_names[9] == "Ankle boot"
    images, labels = source.records.images, source.records.labels
    assert images.dtype == np.uint8 and images.shape == (n, 28, 28, 1)
    np.testing.assert_array_equal(np.bincount(labels, minlength=10), [n // 10] * 10)
    # In file order, byte for byte: the idx payload after its header.
    assert images.tobytes() == raw[f"{prefix}-images-idx3-ubyte"][16:]
    assert labels.astype(np.uint8).tobytes() == raw[f"{prefix}-labels-idx1-ubyte"][8:]
    item = source[n - 1]  # through the wrapper the pipeline uses
    np.testing.assert_array_equal(item["image"], images[-1])
    assert item["label"] == labels[-1] and isinstance(item["label"], int)
  assert not os.path.exists(tmp_path / "unused")  # shipped data writes nothing to a data dir
  # The normalisation constants are those of the 60,000 training images.
  train, info = data.get_source("embedded_fashion_mnist", split="train")
  counts = np.bincount(train.records.images.ravel(), minlength=256)  # exact, without floats
  values = np.arange(256) / 255
  pixel_mean = counts @ values / counts.sum()
  pixel_std = np.sqrt(counts @ (values - pixel_mean) ** 2 / counts.sum())
  mean, std = data.normalization("embedded_fashion_mnist", channels=1)
  assert (info.mean, info.std) == (mean, std) == ((0.2860,), (0.3530,))
  np.testing.assert_allclose([pixel_mean, pixel_std], [mean[0], std[0]], atol=5e-5)


@pytest.mark.skipif(not os.path.isdir(APT_FASHION_MNIST),
                    reason="needs `apt-get install -y dataset-fashion-mnist`")
def test_shipped_fashion_mnist_matches_the_apt_package():
  for stem in FASHION_MNIST_MD5:
    shipped_bytes = _decompressed(os.path.join(ASSETS, "fashion_mnist", stem + ".gz"))
    assert shipped_bytes == _decompressed(os.path.join(APT_FASHION_MNIST, stem + ".gz")), stem


def test_embedded_mnist_is_a_fixed_stratified_resplit():
  raw_images, raw_labels = idx.read_idx_pair(
      os.path.join(ASSETS, "mnist", "t10k-images-idx3-ubyte.gz"),
      os.path.join(ASSETS, "mnist", "t10k-labels-idx1-ubyte.gz"), num_classes=10)
  splits = {split: shipped.load("embedded_mnist", split=split) for split in ("train", "test")}
  assert (len(splits["train"].labels), len(splits["test"].labels)) == (8000, 2000)
  for split in splits.values():
    assert split.images.dtype == np.uint8 and split.images.shape[1:] == (28, 28, 1)
    assert np.all(np.diff(split.index) > 0)  # in file order
    np.testing.assert_array_equal(split.images[..., 0], raw_images[split.index])
    np.testing.assert_array_equal(split.labels, raw_labels[split.index])
  train, test = splits["train"].index, splits["test"].index
  assert sorted(np.concatenate([train, test])) == list(range(10000))
  # Stratified: every class has 80% (to the nearest example) of its members in train.
  counts = np.bincount(raw_labels, minlength=10)
  assert np.all(np.abs(np.bincount(raw_labels[train], minlength=10) - 0.8 * counts) < 1)
  # Fixed: the split is pinned (changing salt, rule or rounding changes this).
  digest = hashlib.sha256(np.sort(train).astype("<i8").tobytes()).hexdigest()[:16]
  assert digest == MNIST_SPLIT_FINGERPRINT
  source, info = data.get_source("embedded_mnist", split="test")
  assert len(source) == info.num_examples == 2000 and info.mean == (0.1325,)
  np.testing.assert_array_equal(source.records.images, splits["test"].images)


def test_stratified_split_exact_total_and_balance():
  labels = np.repeat(np.arange(3), [5, 7, 9])
  train, test = data.stratified_split(labels, num_train=10)
  assert len(train) == 10 and len(test) == 11
  assert sorted(np.concatenate([train, test])) == list(range(21))
  np.testing.assert_array_equal(np.bincount(labels[train]), [3, 3, 4])  # 2.38, 3.33, 4.29
  again, _ = data.stratified_split(labels, num_train=10)
  np.testing.assert_array_equal(train, again)
  other, _ = data.stratified_split(labels, num_train=10, salt="other")
  assert not np.array_equal(train, other)


@pytest.mark.parametrize("split, parts", [
    ("train[:320]", [("train", 0, 320)]),
    ("test[-100:]", [("test", 9900, 10000)]),
    ("train[10%:20%]", [("train", 6000, 12000)]),
    ("train[:5]+test[:3]", [("train", 0, 5), ("test", 0, 3)]),
])
def test_shipped_split_strings_follow_tfds_syntax(split, parts):
  full = {s: shipped.load("embedded_fashion_mnist", split=s) for s in ("train", "test")}
  got = shipped.load("embedded_fashion_mnist", split=split)
  want = [(full[s].images[a:b], full[s].labels[a:b]) for s, a, b in parts]
  np.testing.assert_array_equal(got.images, np.concatenate([w[0] for w in want]))
  np.testing.assert_array_equal(got.labels, np.concatenate([w[1] for w in want]))
  assert data.get_source("embedded_fashion_mnist", split=split)[1].num_examples == len(got.labels)


@pytest.mark.parametrize("split, match", [
    ("validation", "Unknown split 'validation'"),
    ("train[:70000]", "incompatible with 60000 examples"),
    ("train[", "split 'train\\['"),
])
def test_bad_shipped_split_is_a_clear_error(split, match):
  with pytest.raises(ValueError, match=match) as e:
    data.get_source("embedded_fashion_mnist", split=split)
  assert "train (60000), test (10000)" in str(e.value)


def test_shipped_sources_share_read_only_memory_and_pickle():
  a, _ = data.get_source("embedded_fashion_mnist", split="train")
  b, _ = data.get_source("embedded_fashion_mnist", split="train[:100]")
  assert np.shares_memory(a.records.images, b.records.images)  # the file is decompressed once
  with pytest.raises(ValueError, match="read-only"):
    a.records.images[0, 0, 0, 0] = 1
  again = pickle.loads(pickle.dumps(b))  # as grain hands it to worker processes
  np.testing.assert_array_equal(again[99]["image"], b[99]["image"])
  assert again.info == b.info


def test_corrupted_or_missing_asset_is_a_clear_error(tmp_path):
  source_dir = tmp_path / "src"
  shutil.copytree(os.path.join(ASSETS, "mnist"), source_dir)
  images = source_dir / "t10k-images-idx3-ubyte.gz"
  images.write_bytes(images.read_bytes()[:100_000])
  with pytest.raises(idx.IdxFormatError, match="t10k-images-idx3-ubyte.gz"):
    shipped.load("embedded_mnist", split="train", source_dir=str(source_dir))
  os.remove(source_dir / "t10k-labels-idx1-ubyte.gz")
  with pytest.raises(FileNotFoundError, match="t10k-labels-idx1-ubyte.gz is missing"):
    shipped.load("embedded_mnist", split="train", source_dir=str(source_dir))
  with pytest.raises(ValueError, match="not a shipped dataset"):
    shipped.load("fashion_mnist_full", split="train")


@pytest.mark.parametrize("name, channels", [("mnist", 1), ("cifar10", 3)])
def test_catalog_dataset_through_get_source_and_ssl_loader(tmp_path, name, channels):
  with tfds.testing.mock_data(num_examples=48):
    source, info = data.get_source(name, split="train", data_dir=str(tmp_path))
    assert len(source) == 48 and info.num_classes == 10 and info.channels == channels
    loader = data.ssl_loader(source, global_batch_size=16, seed=0, image_size=24,
                             process_index=0, process_count=1)
    batch = next(iter(loader))
  assert batch["view1"].shape == batch["view2"].shape == (16, 24, 24, channels)
  assert batch["view1"].dtype == np.float32 and batch["label"].dtype == np.int32
  assert np.isfinite(batch["view1"]).all() and np.all((0 <= batch["label"]) & (batch["label"] < 10))
  assert not np.array_equal(batch["view1"], batch["view2"])


def test_missing_catalog_dataset_is_a_clear_error(tmp_path):
  with pytest.raises(FileNotFoundError) as e:
    data.get_source("cifar10", split="train", data_dir=str(tmp_path))
  message = str(e.value)
  assert "cifar10" in message and str(tmp_path) in message and "tfds build cifar10" in message
  with pytest.raises(ValueError, match="unknown dataset 'no_such_dataset'"):
    data.get_source("no_such_dataset", split="train", data_dir=str(tmp_path))


# ---------------------------------------------------------------------------------------------
# Augmentation


def test_augment_geometry_is_exact_without_randomness():
  image = np.random.default_rng(0).integers(0, 256, (28, 28, 1), dtype=np.uint8)
  mean, std = np.float32([0.5]), np.float32([0.25])
  expected = (image / 255 - 0.5) / 0.25
  rng = np.random.default_rng(0)
  for flip in (0.0, 1.0):
    config = data.AugmentConfig(crop_scale=(1, 1), crop_ratio=(1, 1), flip_prob=flip,
                                jitter_prob=0)
    views = augment.random_views(image, rng, config, size=28, mean=mean, std=std)
    want = expected[:, ::-1] if flip else expected
    np.testing.assert_allclose(views[0], want, atol=1e-5)
    np.testing.assert_allclose(views[1], want, atol=1e-5)
  np.testing.assert_allclose(augment.center_view(image, size=28, mean=mean, std=std), expected,
                             atol=1e-5)
  flat = np.full((40, 30, 3), 200, np.uint8)  # resizing keeps a constant image constant
  out = augment.center_view(flat, size=16, mean=np.zeros(3, np.float32),
                            std=np.ones(3, np.float32))
  assert out.shape == (16, 16, 3)
  np.testing.assert_allclose(out, 200 / 255, atol=1e-5)


def test_augment_config_from_mappings_and_validation():
  assert data.AugmentConfig.create({"crop_scale": [0.5, 1.0]}).crop_scale == (0.5, 1.0)
  assert data.AugmentConfig.create(None) == data.AugmentConfig()
  with pytest.raises(ValueError, match="unknown augmentation keys"):
    data.AugmentConfig.create({"crop_scael": (0.5, 1.0)})
  with pytest.raises(ValueError, match="crop_scale"):
    data.AugmentConfig(crop_scale=(0.5, 1.5))
  with pytest.raises(ValueError, match="flip_prob"):
    data.AugmentConfig(flip_prob=2.0)


def test_same_seed_same_batches_other_seed_differs():
  source = _toy()
  heavy = {"blur_prob": 0.5, "noise_prob": 0.5, "erase_prob": 0.5}
  kw = dict(global_batch_size=8, image_size=20, augment=heavy, process_index=0, process_count=1)
  a = _batches(data.ssl_loader(source, seed=3, **kw), 3)
  b = _batches(data.ssl_loader(source, seed=3, **kw), 3)
  c = _batches(data.ssl_loader(source, seed=4, **kw), 3)
  _assert_batches_equal(a, b)
  assert not np.array_equal(a[0]["view1"], c[0]["view1"])
  assert a[0]["view1"].shape == (8, 20, 20, 1) and a[0]["label"].shape == (8,)
  assert a[0]["view1"].dtype == np.float32 and np.isfinite(a[0]["view1"]).all()
  for batch in a:
    assert not np.array_equal(batch["view1"], batch["view2"])
  # Same record, different seed: the views differ, not just the order.
  no_shuffle = dict(kw, augment=None)
  d = _batches(data.ssl_loader(source, seed=3, shuffle=False, **no_shuffle), 1)[0]
  e = _batches(data.ssl_loader(source, seed=4, shuffle=False, **no_shuffle), 1)[0]
  np.testing.assert_array_equal(d["label"], e["label"])
  assert not np.array_equal(d["view1"], e["view1"])


def test_rgb_source_of_any_size_is_resized():
  source = _toy(n=16, size=37, channels=3)
  batch = _batches(data.ssl_loader(source, global_batch_size=8, seed=0, image_size=16,
                                   augment={"grayscale_prob": 0.5}, process_index=0,
                                   process_count=1), 1)[0]
  assert batch["view1"].shape == (8, 16, 16, 3)
  assert np.isfinite(batch["view2"]).all()


def _multicrop(source, p=0, count=1, **kw):
  return data.multicrop_loader(
      source, **{**dict(global_batch_size=8, seed=3, image_size=16, local_image_size=8,
                        num_local=3, augment={"noise_prob": 0.5}, process_index=p,
                        process_count=count), **kw})


def test_multicrop_shapes_views_and_determinism():
  source = _toy()
  a, b = _batches(_multicrop(source), 2), _batches(_multicrop(source), 2)
  _assert_batches_equal(a, b)
  batch = a[0]
  assert set(batch) == {"globals", "locals", "label"}
  assert batch["globals"].shape == (8, 2, 16, 16, 1) and batch["globals"].dtype == np.float32
  assert batch["locals"].shape == (8, 3, 8, 8, 1) and np.isfinite(batch["locals"]).all()
  assert not np.array_equal(batch["globals"][:, 0], batch["globals"][:, 1])
  assert not np.array_equal(batch["locals"][:, 0], batch["locals"][:, 1])
  other = _batches(_multicrop(source, seed=4), 1)[0]
  assert not np.array_equal(other["globals"], batch["globals"])
  # Without local crops there is no "locals"; the global crops of a record are the same draws.
  no_local = _batches(_multicrop(source, num_local=0), 1)[0]
  assert set(no_local) == {"globals", "label"}
  np.testing.assert_array_equal(no_local["globals"], batch["globals"])


def test_multicrop_local_crops_cover_smaller_regions():
  """Local crops take `local_crop_scale` of the area: on a horizontal ramp their pixel range is
  narrower than the global crops'."""
  ramp = np.broadcast_to(np.arange(28, dtype=np.uint8)[None, :, None] * 9, (28, 28, 1))
  source = data.ImageSource.from_arrays(np.stack([ramp] * 16), np.arange(16), mean=(0.5,),
                                        std=(0.25,))
  augment = {"jitter_prob": 0.0, "flip_prob": 0.0, "crop_scale": (0.8, 1.0)}
  batch = _batches(_multicrop(source, augment=augment, local_crop_scale=(0.05, 0.1),
                              image_size=28), 1)[0]
  spread = lambda x: np.ptp(x.reshape(*x.shape[:2], -1), axis=-1)  # noqa: E731
  assert spread(batch["locals"]).max() < spread(batch["globals"]).min()


@pytest.mark.parametrize("process_count", [2, 4])
def test_multicrop_global_batches_do_not_depend_on_the_process_count(process_count):
  source = _toy(n=40)
  loader = lambda p, count: _multicrop(source, p, count)  # noqa: E731
  _assert_batches_equal(_global_batches(loader, process_count, 6), _global_batches(loader, 1, 6))


def test_multicrop_iterator_state_resumes_exactly_and_bad_arguments():
  source = _toy(n=40)
  it = iter(_multicrop(source))
  for _ in range(3):
    next(it)
  state = it.get_state()
  expected = [next(it) for _ in range(3)]
  fresh = iter(_multicrop(source))
  fresh.set_state(state)
  _assert_batches_equal([next(fresh) for _ in range(3)], expected)
  for kw, match in ((dict(num_global=0), "num_global"), (dict(local_crop_scale=(0.5, 0.1)),
                                                          "crop_scale")):
    with pytest.raises(ValueError, match=match):
      _multicrop(source, **kw)


# ---------------------------------------------------------------------------------------------
# Sharding, resumption, evaluation


def test_process_shards_are_disjoint_and_cover_the_data():
  source = _toy(n=65)  # odd: the one remaining record is dropped
  seen = []
  for p in range(2):
    loader = data.ssl_loader(source, global_batch_size=8, seed=0, image_size=12,
                             process_index=p, process_count=2, num_epochs=1)
    labels = np.concatenate([b["label"] for b in loader])
    assert all(len(b["label"]) == 4 for b in loader)
    assert len(labels) == len(set(labels)) == 32
    seen.append(set(labels.tolist()))
  assert not seen[0] & seen[1]
  assert len(seen[0] | seen[1]) == 64
  with pytest.raises(ValueError, match="multiple of the process count"):
    data.ssl_loader(source, global_batch_size=9, seed=0, image_size=12, process_index=0,
                    process_count=2)


def _global_batches(loader_fn, process_count: int, k: int) -> list[dict]:
  """The first k global batches: each process's slices, concatenated in process order (as
  `parallel.shard_batch` / `jax.make_array_from_process_local_data` assemble them)."""
  per_process = [_batches(loader_fn(p, process_count), k) for p in range(process_count)]
  return [{key: np.concatenate([per_process[p][i][key] for p in range(process_count)])
           for key in per_process[0][i]} for i in range(k)]


@pytest.mark.parametrize("process_count", [2, 4])
def test_global_batches_do_not_depend_on_the_process_count(process_count):
  source = _toy(n=40)  # 5 global batches per epoch: the 7 compared cross an epoch boundary
  heavy = {"blur_prob": 0.5, "noise_prob": 0.5, "erase_prob": 0.5}

  def loader(p, count):
    return data.ssl_loader(source, global_batch_size=8, seed=3, image_size=16, augment=heavy,
                           process_index=p, process_count=count)

  one = _global_batches(loader, 1, 7)
  _assert_batches_equal(_global_batches(loader, process_count, 7), one)
  # Each process reads only its slice of each global batch: rows [p*b, (p+1)*b).
  b = 8 // process_count
  last = _batches(loader(process_count - 1, process_count), 1)[0]
  np.testing.assert_array_equal(last["label"], one[0]["label"][-b:])


def test_iterator_state_round_trip_resumes_exactly():
  source = _toy(n=40)
  kw = dict(global_batch_size=8, seed=7, image_size=16, process_index=0, process_count=1)
  it = iter(data.ssl_loader(source, **kw))
  for _ in range(4):
    next(it)
  state = it.get_state()
  json.loads(state)  # JSON bytes, fit for a checkpoint
  expected = [next(it) for _ in range(3)]  # crosses the epoch boundary (5 batches per epoch)
  fresh = iter(data.ssl_loader(source, **kw))
  fresh.set_state(state)
  _assert_batches_equal([next(fresh) for _ in range(3)], expected)
  restarted = iter(data.ssl_loader(source, **kw))
  assert not np.array_equal(next(restarted)["view1"], expected[0]["view1"])


@pytest.mark.parametrize("process_count", [1, 2, 3])
def test_eval_loader_covers_every_example_once_with_a_mask(process_count):
  source = _toy(n=37)
  batch_size = 4 * process_count
  steps = data.eval_batches(37, batch_size=batch_size, process_count=process_count)
  seen = []
  for p in range(process_count):
    loader = data.eval_loader(source, batch_size=batch_size, image_size=28, process_index=p,
                              process_count=process_count)
    batches = list(loader)
    assert len(batches) == steps
    _assert_batches_equal(batches, list(loader))  # deterministic, re-iterable
    for b in batches:
      assert b["image"].shape == (4, 28, 28, 1) and b["mask"].dtype == np.bool_
      np.testing.assert_array_equal(b["index"] >= 0, b["mask"])
      real = b["index"][b["mask"]]
      np.testing.assert_array_equal(b["label"][b["mask"]], real)  # toy label == index
      for row, i in zip(b["image"][b["mask"]], real):
        want = augment.center_view(source[i]["image"], size=28, mean=np.float32([0.5]),
                                   std=np.float32([0.25]))
        np.testing.assert_array_equal(row, want)
      seen.extend(real.tolist())
  assert sorted(seen) == list(range(37))
  # Gathered in process order, the global batches list the examples in source order (so the
  # embeddings of a split come out in the same order on every process count).
  global_index = np.concatenate([b["index"] for b in _global_batches(
      lambda p, count: data.eval_loader(source, batch_size=batch_size, image_size=28,
                                        process_index=p, process_count=count),
      process_count, steps)])
  np.testing.assert_array_equal(global_index[global_index >= 0], np.arange(37))


def test_worker_process_gives_the_same_batches():
  source = _toy(n=32)
  kw = dict(global_batch_size=8, seed=1, image_size=16, process_index=0, process_count=1)
  inline = _batches(data.ssl_loader(source, **kw), 2)
  it = iter(data.ssl_loader(source, worker_count=1, **kw))
  worker = [next(it) for _ in range(2)]
  _assert_batches_equal(worker, inline)
  del it, worker  # release grain's shared memory before the interpreter exits
