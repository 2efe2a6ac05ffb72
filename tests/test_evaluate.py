"""Tests of the evaluation primitives: kNN against a numpy brute force, the linear probe, embed."""

from __future__ import annotations

import functools

import jax
import numpy as np
import pytest

from embedspace import parallel
from embedspace.models import EmbeddingModel
from embedspace.ssl import evaluate


def _blobs(n: int, *, num_classes: int, dim: int, spread: float, seed: int):
  """Gaussian class blobs: x = spread * mean_y + noise."""
  rng = np.random.default_rng(seed)
  means = np.random.default_rng(1234).normal(size=(num_classes, dim))
  y = rng.integers(0, num_classes, n)
  x = spread * means[y] + rng.normal(size=(n, dim))
  return x.astype(np.float32), y.astype(np.int32)


def _numpy_knn(train_x, train_y, test_x, *, k, metric, temperature, weighted, num_classes):
  """Independent float64 brute force: full [M, N] matrix, sort, weighted votes.

  Returns (votes [M, C], boundary_gap [M]): the gap between the k-th and (k+1)-th closeness,
  which tells where float32 rounding may legitimately pick another neighbour set.
  """
  a, b = np.asarray(test_x, np.float64), np.asarray(train_x, np.float64)
  if metric == "cosine":
    closeness = (a / np.linalg.norm(a, axis=1, keepdims=True)) @ (
        b / np.linalg.norm(b, axis=1, keepdims=True)).T
  elif metric == "euclidean":
    closeness = -np.sqrt(((a[:, None, :] - b[None, :, :]) ** 2).sum(-1))
  else:
    raise NotImplementedError(metric)
  order = np.argsort(-closeness, axis=1, kind="stable")
  top = np.take_along_axis(closeness, order[:, :k + 1], axis=1)
  w = np.exp(top[:, :k] / temperature) if weighted else np.ones_like(top[:, :k])
  votes = np.zeros((len(a), num_classes))
  np.add.at(votes, (np.repeat(np.arange(len(a)), k), train_y[order[:, :k]].ravel()), w.ravel())
  return votes, top[:, k - 1] - top[:, k]


@pytest.mark.parametrize("metric,temperature,weighted", [
    ("cosine", 0.07, True),
    ("cosine", 0.07, False),
    ("euclidean", 1.0, True),
])
def test_knn_matches_numpy_brute_force(metric, temperature, weighted):
  c = 5
  train_x, train_y = _blobs(1200, num_classes=c, dim=8, spread=0.7, seed=0)
  test_x, test_y = _blobs(300, num_classes=c, dim=8, spread=0.7, seed=1)
  k = 10
  preds = evaluate.knn_predict(train_x, train_y, test_x, num_classes=c, k=k, metric=metric,
                               temperature=temperature, weighted=weighted)
  votes, gap = _numpy_knn(train_x, train_y, test_x, k=k, metric=metric,
                          temperature=temperature, weighted=weighted, num_classes=c)
  ref = np.argmax(votes, axis=1)
  top2 = np.sort(votes, axis=1)[:, -2:]
  # Rows where float32 vs float64 rounding may legitimately differ: a near-tie at the k-th
  # neighbour, or two classes with near-equal weighted votes.
  ambiguous = (gap < 1e-5) | (weighted & (top2[:, 1] - top2[:, 0] < 1e-4 * top2[:, 1]))
  assert ambiguous.mean() < 0.02
  np.testing.assert_array_equal(preds[~ambiguous], ref[~ambiguous])
  acc = evaluate.knn_classify(train_x, train_y, test_x, test_y, num_classes=c, k=k,
                              metric=metric, temperature=temperature, weighted=weighted)
  assert acc == pytest.approx(np.mean(preds == test_y))
  assert 0.4 < acc < 1.0  # a non-trivial problem: neither chance (0.2) nor solved


def test_knn_blocking_does_not_change_the_answer():
  c = 4
  train_x, train_y = _blobs(1000, num_classes=c, dim=16, spread=0.6, seed=2)
  test_x, _ = _blobs(250, num_classes=c, dim=16, spread=0.6, seed=3)
  whole = evaluate.knn_predict(train_x, train_y, test_x, num_classes=c, k=20,
                               query_block=1024, key_block=4096)
  blocked = evaluate.knn_predict(train_x, train_y, test_x, num_classes=c, k=20,
                                 query_block=64, key_block=96)
  np.testing.assert_array_equal(blocked, whole)
  assert blocked.shape == (250,) and blocked.dtype == np.int32


def test_knn_sqeuclidean_on_unit_vectors_equals_cosine_at_half_temperature():
  c = 3
  train_x, train_y = _blobs(600, num_classes=c, dim=8, spread=0.5, seed=4)
  test_x, _ = _blobs(200, num_classes=c, dim=8, spread=0.5, seed=5)
  unit = lambda x: x / np.linalg.norm(x, axis=1, keepdims=True)
  cos = evaluate.knn_predict(unit(train_x), train_y, unit(test_x), num_classes=c,
                             metric="cosine", temperature=0.07)
  sq = evaluate.knn_predict(unit(train_x), train_y, unit(test_x), num_classes=c,
                            metric="sqeuclidean", temperature=0.14)
  assert np.mean(cos == sq) > 0.99


@pytest.mark.parametrize("kwargs,match", [
    (dict(k=0), "k must be"),
    (dict(k=10_000), "k must be"),
    (dict(metric="nope"), "unknown metric"),
    (dict(temperature=0.0), "temperature"),
])
def test_knn_bad_arguments(kwargs, match):
  x, y = _blobs(50, num_classes=2, dim=4, spread=1.0, seed=0)
  with pytest.raises(ValueError, match=match):
    evaluate.knn_classify(x, y, x, y, num_classes=2, **kwargs)


def test_knn_bad_labels_and_shapes():
  x, y = _blobs(50, num_classes=2, dim=4, spread=1.0, seed=0)
  with pytest.raises(ValueError, match="num_classes"):
    evaluate.knn_classify(x, y + 5, x, y, num_classes=2)
  with pytest.raises(ValueError, match="test_x"):
    evaluate.knn_classify(x, y, x[:, :3], y, num_classes=2)


def test_linear_probe_separable_data():
  c = 10
  train_x, train_y = _blobs(1500, num_classes=c, dim=32, spread=4.0, seed=6)
  test_x, test_y = _blobs(500, num_classes=c, dim=32, spread=4.0, seed=7)
  grid = (1e-5, 1e-3, 1e-1)
  out = evaluate.linear_probe(train_x, train_y, test_x, test_y, num_classes=c, l2_grid=grid)
  assert out["accuracy"] > 0.98
  assert out["train_accuracy"] > 0.98
  assert out["best_l2"] in grid
  assert set(out["val_accuracies"]) == set(grid)
  assert out["val_accuracy"] == max(out["val_accuracies"].values())


def test_linear_probe_random_labels_is_chance():
  c = 4
  rng = np.random.default_rng(8)
  train_x = rng.normal(size=(1000, 64)).astype(np.float32)
  test_x = rng.normal(size=(1000, 64)).astype(np.float32)
  train_y, test_y = rng.integers(0, c, 1000), rng.integers(0, c, 1000)
  out = evaluate.linear_probe(train_x, train_y, test_x, test_y, num_classes=c,
                              l2_grid=(1e-4, 1e-2))
  assert abs(out["accuracy"] - 1 / c) < 0.06
  assert out["train_accuracy"] > 0.3  # it does fit some training labels: d=64, n=1000


def test_linear_probe_bad_arguments():
  x, y = _blobs(50, num_classes=2, dim=4, spread=1.0, seed=0)
  with pytest.raises(ValueError, match="val_fraction"):
    evaluate.linear_probe(x, y, x, y, num_classes=2, val_fraction=0.0)
  with pytest.raises(ValueError, match="l2_grid"):
    evaluate.linear_probe(x, y, x, y, num_classes=2, l2_grid=())
  with pytest.raises(ValueError, match="num_classes"):
    evaluate.linear_probe(x, y, x, y, num_classes=1)


@pytest.fixture(scope="module")
def tiny_model():
  model = EmbeddingModel(stage_sizes=(1,), width=4, projector_dims=(8, 6))
  images = jax.random.normal(jax.random.key(0), (40, 12, 12, 1))
  variables = jax.jit(functools.partial(model.init, train=False))(jax.random.key(1), images[:2])
  # Running averages away from their initial values, so inference mode is really exercised.
  _, updates = jax.jit(functools.partial(model.apply, train=True, mutable=["batch_stats"]))(
      variables, images)
  return model, {**variables, **updates}, np.asarray(images)


def test_embed_on_8_devices_matches_single_device_and_drops_padding(tiny_model):
  model, variables, images = tiny_model
  mesh = parallel.make_mesh()
  assert mesh.devices.size == 8
  labels = np.arange(40, dtype=np.int32)
  batches = [
      {"image": images[0:16], "label": labels[0:16], "mask": np.ones(16, bool)},
      {"image": images[16:32], "label": labels[16:32]},  # no mask: every row is real
      {"image": np.concatenate([images[32:40], np.zeros((8, 12, 12, 1), np.float32)]),
       "label": np.concatenate([labels[32:40], np.full(8, -1, np.int32)]),
       "mask": np.concatenate([np.ones(8), np.zeros(8)]).astype(np.int32)},
  ]
  out = evaluate.embed(functools.partial(model.apply, train=False), variables, iter(batches),
                       mesh=mesh)
  ref_f, ref_e = jax.jit(functools.partial(model.apply, train=False))(variables, images)
  assert out["features"].shape == (40, 4) and out["embeddings"].shape == (40, 6)
  assert out["features"].dtype == out["embeddings"].dtype == np.float32
  assert isinstance(out["features"], np.ndarray)
  np.testing.assert_array_equal(out["labels"], labels)
  np.testing.assert_allclose(out["features"], ref_f, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(out["embeddings"], ref_e, rtol=1e-5, atol=1e-6)


def test_embed_errors(tiny_model):
  model, variables, images = tiny_model
  mesh = parallel.make_mesh()
  apply_fn = functools.partial(model.apply, train=False)
  with pytest.raises(ValueError, match="divisible"):
    evaluate.embed(apply_fn, variables, [{"image": images[:12], "label": np.zeros(12, int)}],
                   mesh=mesh)
  with pytest.raises(ValueError, match="label"):
    evaluate.embed(apply_fn, variables, [{"image": images[:16]}], mesh=mesh)
  with pytest.raises(ValueError, match="no batches"):
    evaluate.embed(apply_fn, variables, [], mesh=mesh)
