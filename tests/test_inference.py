"""Using a trained model: load, embed, the embeddings file, exact search, class map, faiss, CLIs."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

from embedspace import queries as query_lib
from embedspace.space import inputs
from embedspace.space import search
from embedspace.space import store

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _blobs(n, *, dim=12, classes=4, seed=0):
  rng = np.random.default_rng(seed)
  y = rng.integers(0, classes, n)
  means = np.random.default_rng(99).normal(size=(classes, dim)) * 1.5
  return (means[y] + rng.normal(size=(n, dim))).astype(np.float32), y


def _numpy_measure(q, keys, measure):
  """Independent float64 brute force: `[n, N]` values of `measure` (search.py's conventions)."""
  q, keys = np.asarray(q, np.float64), np.asarray(keys, np.float64)
  diff = q[:, None, :] - keys[None, :, :]
  if measure == "hamming":
    center = keys.mean(0)
    return ((q - center > 0)[:, None, :] != (keys - center > 0)[None, :, :]).sum(-1)
  if measure == "manhattan":
    return np.abs(diff).sum(-1)
  if measure == "euclidean":
    return np.sqrt((diff ** 2).sum(-1))
  if measure == "mahalanobis":
    d = keys.shape[1]
    cov = np.cov(keys.T, bias=True)
    cov = 0.99 * cov + (0.01 * np.trace(cov) / d + 1e-6) * np.eye(d)
    return np.sqrt(np.einsum("nmi,ij,nmj->nm", diff, np.linalg.inv(cov), diff))
  cos = (q / np.linalg.norm(q, axis=1, keepdims=True)) @ (
      keys / np.linalg.norm(keys, axis=1, keepdims=True)).T
  return cos if measure == "cosine" else 1 - np.arccos(np.clip(cos, -1, 1)) / np.pi


def _reference_top_k(q, keys, measure, k):
  values = _numpy_measure(q, keys, measure)
  closeness = values if measure in ("cosine", "negative_arc_length") else -values
  order = np.argsort(-closeness, axis=1, kind="stable")  # ties: the lower index first
  return np.take_along_axis(values, order, 1), order, np.take_along_axis(closeness, order, 1)


@pytest.mark.parametrize("measure", search.MEASURES)
def test_top_k_matches_numpy_brute_force(measure):
  keys, _ = _blobs(700)
  queries, _ = _blobs(90, seed=1)
  k = 15
  values, indices = search.top_k(queries, keys, measure=measure, k=k, query_block=32,
                                 key_block=128)
  ref_values, ref_order, closeness = _reference_top_k(queries, keys, measure, k)
  np.testing.assert_allclose(values, ref_values[:, :k], rtol=2e-5, atol=2e-5)
  if measure == "hamming":  # integer distances, many exact ties: the order must match exactly
    np.testing.assert_array_equal(indices, ref_order[:, :k])
    return
  # Real values: float32 may swap neighbours whose values differ by rounding only.
  gaps = -np.diff(closeness[:, :k + 1], axis=1)
  clear = gaps.min(axis=1) > 1e-5 * np.maximum(1, np.abs(closeness[:, :1]).ravel())
  assert clear.mean() > 0.8
  np.testing.assert_array_equal(indices[clear], ref_order[clear, :k])


@pytest.mark.parametrize("measure", search.MEASURES)
def test_exact_ties_go_to_the_lower_index(measure):
  base, _ = _blobs(350, seed=2)
  keys = np.concatenate([base, base])  # every key twice: rows i and i + 350 (700 x 12, as above)
  _, indices = search.top_k(base[:10] + 0.01, keys, measure=measure, k=10, key_block=128)
  pairs = 0
  for row in indices:
    for j in set(row.tolist()) & set(range(350)):
      if j + 350 in row:  # both copies taken: the lower index first
        assert np.flatnonzero(row == j)[0] < np.flatnonzero(row == j + 350)[0]
        pairs += 1
  assert pairs >= 20


def test_top_k_bad_input():
  keys, _ = _blobs(20)
  with pytest.raises(ValueError, match="unknown measure 'cosin'.*valid measures are hamming"):
    search.top_k(keys, keys, measure="cosin", k=3)
  with pytest.raises(ValueError, match="k must be"):
    search.top_k(keys, keys, measure="cosine", k=21)
  with pytest.raises(ValueError, match=r"queries must be \[n, 12\]"):
    search.top_k(keys[:, :5], keys, measure="cosine", k=3)


def test_class_similarity_against_brute_force():
  from embedspace.measure import report

  x, y = _blobs(300, classes=5, seed=3)
  y[:20] = -1  # unlabelled rows are left out
  cos, used = search.class_similarity(x, y, measure="cosine", num_classes=6, max_points=10_000)
  assert used == 280
  np.testing.assert_allclose(cos, report.class_similarity(x[y >= 0], y[y >= 0], num_classes=6),
                             atol=1e-5, equal_nan=True)
  dist, _ = search.class_similarity(x, y, measure="manhattan", num_classes=5)
  ref = np.abs(x[:, None] - x[None]).sum(-1)
  for a, b in [(0, 0), (1, 3)]:
    block = ref[np.ix_(y == a, y == b)]
    want = (block.sum() - np.trace(block)) / (block.size - len(block)) if a == b else block.mean()
    assert dist[a, b] == pytest.approx(want, rel=1e-4)
  nearest = search.nearest_classes(dist, measure="manhattan", top=2)
  assert all(len(n) == 2 and i not in n for i, n in enumerate(nearest))
  assert nearest[1][0] == int(np.argsort(np.where(np.eye(5, dtype=bool), np.inf, dist)[1])[0])
  with pytest.raises(ValueError, match="no labels"):
    search.class_similarity(x, np.full(300, -1), measure="cosine")


@pytest.mark.parametrize("measure", search.MEASURES)
def test_faiss_agrees_with_exact_search(measure, tmp_path):
  pytest.importorskip("faiss")
  from embedspace.space import faiss_index

  keys, _ = _blobs(700)  # the shape of the tests above: Mahalanobis' fit compiles once
  queries, _ = _blobs(40, seed=4)
  exact_values, exact_indices = search.top_k(queries, keys, measure=measure, k=10)
  index = faiss_index.build(keys, measure=measure)
  path = index.save(str(tmp_path / "index.faiss"))
  for idx in (index, faiss_index.read(path)):
    values, indices = idx.top_k(queries, k=10)
    np.testing.assert_allclose(values, exact_values, rtol=1e-4, atol=1e-4)
    same = np.mean(indices == exact_indices)
    assert same > (0.6 if measure == "hamming" else 0.97), same  # hamming: ties in any order


def test_embeddings_file_round_trip(tmp_path):
  x, y = _blobs(50)
  ids = np.asarray([f"img/{i}.png" for i in range(50)])
  path = store.save_embeddings(str(tmp_path / "e.npz"), x, ids=ids, labels=y,
                               meta={"class_names": list("abcd")})
  with np.load(path) as f:  # plain numpy reads it
    np.testing.assert_array_equal(f["embeddings"], x)
    np.testing.assert_array_equal(f["ids"], ids)
    np.testing.assert_array_equal(f["labels"], y)
  loaded = store.load_embeddings(path)
  assert loaded.meta["shape"] == [50, 12] and loaded.class_names == ("a", "b", "c", "d")
  writer = store.EmbeddingsWriter(str(tmp_path / "short.npz"), num=3, dim=2, ids=np.arange(3))
  writer.write(np.zeros((2, 2)))
  with pytest.raises(ValueError, match="2 of 3 rows"):
    writer.close()
  assert sorted(os.listdir(tmp_path)) == ["e.json", "e.npz"]
  with pytest.raises(ValueError, match="not an embeddings file"):
    np.save(tmp_path / "x.npy", x)
    store.load_embeddings(str(tmp_path / "x.npy"))


# ----------------------------------------------------------------------------------------------
# With a trained (smoke) model.


@pytest.fixture(scope="module")
def smoke_model(smoke_workdir):
  import embedspace
  return embedspace.load(smoke_workdir, batch_size=64)


def test_embed_is_the_evaluation_forward_and_never_recompiles(smoke_model):
  import functools

  from embedspace import data
  from embedspace.ssl import evaluate

  model = smoke_model
  assert model.step == 6 and model.channels == 1 and model.image_size == 28
  source, _ = data.get_source("embedded_fashion_mnist", split="test")
  images = np.stack([source[i]["image"] for i in range(200)])  # uint8 [200, 28, 28, 1]
  z = model.embed(images[..., 0])  # [n, H, W] works too
  loader = data.eval_loader(source, batch_size=256, image_size=28)
  ref = evaluate.embed(functools.partial(model.model.apply, train=False), model.variables,
                       loader, mesh=model.mesh)
  np.testing.assert_allclose(z, ref["features"][:200], rtol=1e-5, atol=1e-5)
  for n in (1, 5, 63, 130):  # ragged lengths: padded batches of one shape
    np.testing.assert_allclose(model.embed(images[:n]), z[:n], rtol=1e-5, atol=1e-5)
  assert model._forward._cache_size() == 1
  assert model.embed(images[:3], output="projector").shape == (3, model.dim("projector")) == (
      3, 64)


def test_embedded_eval_images_retrieve_their_own_class(smoke_model, tmp_path):
  from embedspace import embed

  paths = {}
  # Slices of the standard splits (60,000 / 10,000): the test needs thousands, not all.
  for split in ("train[:8000]", "test[:2000]"):
    items = inputs.open_items(f"embedded_fashion_mnist:{split}", channels=1)
    split = split.split("[")[0]
    paths[split] = str(tmp_path / f"{split}.npz")
    meta = embed.embed_items(smoke_model, items, paths[split], progress=False)
  assert meta["shape"] == [2000, 8] and meta["model"]["step"] == 6
  train, test = store.load_embeddings(paths["train"]), store.load_embeddings(paths["test"])
  assert len(train.ids) == 8000 and set(np.unique(test.labels)) == set(range(10))
  np.testing.assert_array_equal(test.ids, np.arange(2000))
  _, hits = search.top_k(test.embeddings[:500], train.embeddings, measure="cosine", k=10)
  precision = np.mean(train.labels[hits] == test.labels[:500, None])
  print(f"smoke model, cosine: own-class precision@10 {precision:.3f} (chance 0.1)")
  assert precision > 0.3
  result = query_lib.run_query(test, "17", k=5, measure="euclidean")
  assert 17 not in result["rows"] and os.path.getsize(result["png"]) > 5_000
  record = query_lib.run_class_map(test, str(tmp_path / "classes.png"), measure="cosine")
  assert set(record["nearest"]) == set(test.class_names)
  assert os.path.getsize(tmp_path / "classes.png") > 10_000


def test_bad_images_and_workdirs_are_one_clear_error(smoke_model, smoke_workdir, tmp_path):
  from embedspace import methods
  from embedspace.core.workdirs import IncompatibleWorkdirError

  model = smoke_model
  with pytest.raises(ValueError, match="28x28.*resize=True"):
    model.embed(np.zeros((2, 32, 32), np.uint8))
  assert model.embed(np.zeros((2, 32, 32), np.uint8), resize=True).shape == (2, 8)
  with pytest.raises(ValueError, match="3 channel.*takes 1"):
    model.embed(np.zeros((2, 28, 28, 3), np.uint8))
  with pytest.raises(ValueError, match="uint8"):
    model.embed(np.zeros((2, 28, 28), np.float32))
  with pytest.raises(ValueError, match=r"\[n, H, W\]"):
    model.embed(np.zeros((2, 784), np.uint8))
  with pytest.raises(ValueError, match="unknown output"):
    model.embed(np.zeros((2, 28, 28), np.uint8), output="head")
  (tmp_path / "empty").mkdir()
  with pytest.raises(ValueError, match="no image files"):
    inputs.open_items(str(tmp_path / "empty"), channels=1)
  (tmp_path / "fresh" / "checkpoints").mkdir(parents=True)
  shutil.copy(os.path.join(smoke_workdir, "config.json"), tmp_path / "fresh")
  with pytest.raises(FileNotFoundError, match="no checkpoint"):
    methods.load(str(tmp_path / "fresh"))
  other = tmp_path / "other"
  shutil.copytree(smoke_workdir, other)
  config = json.loads((other / "config.json").read_text())
  config["model"]["width"] = 16
  (other / "config.json").write_text(json.dumps(config))
  with pytest.raises(IncompatibleWorkdirError, match="another version.*encoder"):
    methods.load(str(other))


def _cli(module, *args):
  env = dict(os.environ, PYTHONPATH=ROOT, XLA_FLAGS=("--xla_force_host_platform_device_count=2"
                        " --xla_backend_optimization_level=0"))
  return subprocess.run([sys.executable, "-m", module, *args], capture_output=True, text=True,
                        env=env, cwd=ROOT, timeout=300)


def test_cli_folder_embed_image_query_and_bad_input(smoke_workdir, tmp_path):
  from PIL import Image

  from embedspace import data

  source, _ = data.get_source("embedded_fashion_mnist", split="test")
  for i in range(12):  # ImageFolder layout: the subfolder is the class
    folder = tmp_path / "photos" / ("shoes" if i % 2 else "shirts")
    folder.mkdir(parents=True, exist_ok=True)
    Image.fromarray(source[i]["image"][..., 0]).convert("RGB").save(folder / f"{i}.png")
  out = tmp_path / "photos.npz"
  r = _cli("embedspace.embed", f"--workdir={smoke_workdir}", f"--data={tmp_path / 'photos'}",
           f"--out={out}", "--noprogress")
  assert r.returncode == 0, r.stderr[-2000:]
  assert "wrote 12 embeddings (8-d, encoder" in r.stdout
  f = np.load(out)
  assert f["ids"][0] == os.path.join("shirts", "0.png") and list(f["labels"][:2]) == [0, 0]
  r = _cli("embedspace.search", f"--embeddings={out}", f"--query={tmp_path / 'photos/shoes/1.png'}",
           "--k=3", "--measure=euclidean")
  assert r.returncode == 0, r.stderr[-2000:]
  assert "3 nearest of 12" in r.stdout and "shoes" in r.stdout and "picture:" in r.stdout
  for module, args, message in [
      ("embedspace.search", [f"--embeddings={out}", "--query=0", "--measure=cosin"],
       "--measure=cosin: valid measures are hamming"),
      ("embedspace.embed", [f"--workdir={tmp_path}", "--data=embedded_fashion_mnist"],
       "has no config.json"),
  ]:
    r = _cli(module, *args)
    assert r.returncode == 2, r.stderr[-2000:]
    assert r.stderr.startswith("error: ") and message in r.stderr, r.stderr
    assert "Traceback" not in r.stderr and r.stderr.count("\n") == 1
