"""Tests of embedspace.data: idx parsing, the TFDS builders, get_source and the grain pipelines."""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import shutil

import numpy as np
import pytest
import tensorflow_datasets as tfds
from absl import flags

from embedspace import data
from embedspace.data import augment, builders, idx

flags.FLAGS.mark_as_parsed()  # grain reads absl flags (worker processes need them parsed).

ASSETS = builders.ASSETS_DIR
# SHA-256 (first 16 hex digits) of the sorted train indices: pins the split across versions.
SPLIT_FINGERPRINT = {"embedded_fashion_mnist": "1a69da84b2a6153b",
                     "embedded_mnist": "409fc9624dfd51c6"}
ASSET_DIR = {"embedded_fashion_mnist": "fashion_mnist", "embedded_mnist": "mnist"}


def _raw(name: str) -> tuple[np.ndarray, np.ndarray]:
  d = os.path.join(ASSETS, ASSET_DIR[name])
  return idx.read_idx_pair(os.path.join(d, "t10k-images-idx3-ubyte.gz"),
                           os.path.join(d, "t10k-labels-idx1-ubyte.gz"), num_classes=10)


def _records(source: data.ImageSource) -> list[dict]:
  return source.records.__getitems__(list(range(len(source))))


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> str:
  return str(tmp_path_factory.mktemp("tfds"))


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
# Builders and get_source


@pytest.mark.parametrize("name", ["embedded_fashion_mnist", "embedded_mnist"])
def test_embedded_builder_matches_idx_with_a_fixed_stratified_split(data_dir, name):
  raw_images, raw_labels = _raw(name)
  train, info = data.get_source(name, split="train", data_dir=data_dir)
  test, test_info = data.get_source(name, split="test", data_dir=data_dir)
  assert (len(train), len(test)) == (8000, 2000)
  assert (info.num_examples, test_info.num_examples) == (8000, 2000)
  assert info.num_classes == 10 and len(info.class_names) == 10
  assert info.image_shape == (28, 28, 1)
  assert os.path.isdir(os.path.join(data_dir, name, "1.0.0"))

  indices = {}
  for split, source in (("train", train), ("test", test)):
    records = _records(source)
    index = np.array([r["source_index"] for r in records])
    images = np.stack([r["image"] for r in records])
    labels = np.array([r["label"] for r in records])
    assert images.dtype == np.uint8 and images.shape[1:] == (28, 28, 1)
    assert np.all(np.diff(index) > 0)  # stored in idx order (TFDS shuffling disabled)
    np.testing.assert_array_equal(images[..., 0], raw_images[index])
    np.testing.assert_array_equal(labels, raw_labels[index])
    item = source[0]  # through the wrapper the pipeline uses
    np.testing.assert_array_equal(item["image"], images[0])
    assert item["label"] == labels[0]
    indices[split] = index
  assert not set(indices["train"]) & set(indices["test"])
  assert sorted(np.concatenate([indices["train"], indices["test"]])) == list(range(10000))
  # Stratified: every class has 80% (to the nearest example) of its members in train.
  counts = np.bincount(raw_labels, minlength=10)
  train_counts = np.bincount(raw_labels[indices["train"]], minlength=10)
  assert np.all(np.abs(train_counts - 0.8 * counts) < 1)
  # Fixed: the split is pinned (changing salt, rule or rounding changes this).
  train_sorted = np.sort(indices["train"]).astype("<i8")
  assert hashlib.sha256(train_sorted.tobytes()).hexdigest()[:16] == SPLIT_FINGERPRINT[name]


def test_stratified_split_exact_total_and_balance():
  labels = np.repeat(np.arange(3), [5, 7, 9])
  train, test = builders.stratified_split(labels, num_train=10)
  assert len(train) == 10 and len(test) == 11
  assert sorted(np.concatenate([train, test])) == list(range(21))
  np.testing.assert_array_equal(np.bincount(labels[train]), [3, 3, 4])  # 2.38, 3.33, 4.29
  again, _ = builders.stratified_split(labels, num_train=10)
  np.testing.assert_array_equal(train, again)
  other, _ = builders.stratified_split(labels, num_train=10, salt="other")
  assert not np.array_equal(train, other)


def test_second_call_reuses_the_built_dataset(data_dir, monkeypatch):
  data.get_source("embedded_mnist", split="train", data_dir=data_dir)
  files = os.path.join(data_dir, "embedded_mnist", "1.0.0")
  mtimes = {f: os.path.getmtime(os.path.join(files, f)) for f in os.listdir(files)}

  def fail(*args, **kwargs):
    raise AssertionError("rebuilt a dataset that was already prepared")

  monkeypatch.setattr(builders.EmbeddedMnist, "_split_generators", fail)
  source, _ = data.get_source("embedded_mnist", split="test", data_dir=data_dir)
  assert len(source) == 2000
  assert mtimes == {f: os.path.getmtime(os.path.join(files, f)) for f in os.listdir(files)}


def test_corrupted_asset_is_a_clear_error(tmp_path):
  source_dir = tmp_path / "src"
  shutil.copytree(os.path.join(ASSETS, "fashion_mnist"), source_dir)
  images = source_dir / "t10k-images-idx3-ubyte.gz"
  images.write_bytes(images.read_bytes()[:100_000])
  with pytest.raises(idx.IdxFormatError, match="t10k-images-idx3-ubyte.gz"):
    data.prepare("embedded_fashion_mnist", data_dir=str(tmp_path / "tfds"),
                 source_dir=str(source_dir))
  assert not os.path.exists(tmp_path / "tfds" / "embedded_fashion_mnist" / "1.0.0")


def test_full_fashion_mnist_missing_says_how_to_install(tmp_path):
  (tmp_path / "empty").mkdir()
  with pytest.raises(FileNotFoundError) as e:
    data.prepare("fashion_mnist_full", data_dir=str(tmp_path / "tfds"),
                 source_dir=str(tmp_path / "empty"))
  assert "apt-get update && apt-get install -y dataset-fashion-mnist" in str(e.value)
  assert str(tmp_path / "empty") in str(e.value)


def test_full_fashion_mnist_builds_from_idx_files(tmp_path):
  rng = np.random.default_rng(1)
  src = tmp_path / "apt"
  src.mkdir()
  raw = {}
  for prefix, n in (("train", 30), ("t10k", 12)):
    raw[prefix] = (rng.integers(0, 256, (n, 28, 28), dtype=np.uint8),
                   rng.integers(0, 10, n, dtype=np.uint8))
    idx.write_idx(src / f"{prefix}-images-idx3-ubyte.gz", raw[prefix][0])
    idx.write_idx(src / f"{prefix}-labels-idx1-ubyte.gz", raw[prefix][1])
  builder = data.prepare("fashion_mnist_full", data_dir=str(tmp_path / "tfds"),
                         source_dir=str(src))
  for split, prefix in (("train", "train"), ("test", "t10k")):
    records = builder.as_data_source(split=split)
    assert len(records) == len(raw[prefix][1])
    for i in range(len(records)):
      np.testing.assert_array_equal(records[i]["image"][..., 0], raw[prefix][0][i])
      assert records[i]["label"] == raw[prefix][1][i]
  assert builder.info.features["label"].names[9] == "Ankle boot"


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
