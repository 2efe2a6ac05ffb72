"""Non-finite embeddings above `geometry` (issue 23, item 3): every measure, search and
evaluation either masks NaN/inf rows and reports their count, or refuses them naming it.

Masked: the kNN vote (`probes.knn_predict`: such keys are never neighbours, such queries get
no class), `space.search.top_k` and `class_similarity`, the search command line. Refused
(`geometry.NonFiniteError`, a ValueError): the linear probe, retrieval and its measure table,
the OOD detectors, the geometry report, a Mahalanobis fit, a faiss index, and the evaluations
of image and multimodal runs. Each test failed before the change (noted where it did not raise).
"""

from __future__ import annotations

import logging
import types

import numpy as np
import pytest

from embedspace import geometry
from embedspace import queries
from embedspace.measure import ood
from embedspace.measure import probes
from embedspace.measure import report
from embedspace.measure import retrieval
from embedspace.space import search
from embedspace.space import store


def _clusters(n: int = 60, d: int = 4, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
  """Three well separated clusters: `[n, d]` points, labels 0..2."""
  rng = np.random.default_rng(seed)
  y = np.arange(n) % 3
  x = (np.eye(d)[y] * 10 + rng.normal(size=(n, d)) * 0.1).astype(np.float32)
  return x, y


def test_knn_never_votes_for_a_missing_neighbour_and_gives_no_class_to_a_nan_query(caplog):
  x, y = _clusters()
  keys, key_labels = x[:6].copy(), np.array([1, 1, 2, 2, 0, 0])
  keys[[4, 5]] = np.nan  # the class-0 keys: 6 slots, 4 finite keys
  queries = x[6:12].copy()
  queries[2, 0] = np.inf
  with caplog.at_level(logging.WARNING):
    pred = probes.knn_predict(keys, key_labels, queries, num_classes=3, k=6, metric="euclidean",
                              weighted=False)
  # Was: both empty slots (index -1) voted for the last key's class 0, which then won the tie
  # with 1 and 2, and the inf query (all slots empty) was class 0 as well.
  np.testing.assert_array_equal(pred, [1, 1, -1, 1, 1, 1])
  assert "2 of 6 training points are not finite" in caplog.text
  assert "1 of 6 test points are not finite" in caplog.text
  keys, queries = x[:30].copy(), x[30:36].copy()
  keys[[0, 4]] = np.nan
  queries[1] = np.nan
  acc = probes.knn_classify(keys, y[:30], queries, y[30:36], num_classes=3, k=20)
  assert acc == pytest.approx(5 / 6)  # The NaN query counts as wrong; was NaN votes.


@pytest.mark.parametrize("where", ["train", "test"])
def test_linear_probe_refuses(where):
  x, y = _clusters()
  train, test = x[:40].copy(), x[40:].copy()
  (train if where == "train" else test)[3, 1] = np.nan
  with pytest.raises(geometry.NonFiniteError, match=f"1 of .* rows of {where}_x .*row 3"):
    probes.linear_probe(train, y[:40], test, y[40:], num_classes=3)


def test_retrieval_and_the_measure_table_refuse():
  x, y = _clusters()
  q = x[:10].copy()
  q[0] = np.nan  # Was: the NaN query ranked the keys in storage order and scored an AP.
  with pytest.raises(geometry.NonFiniteError, match="rows of queries"):
    retrieval.retrieval(q, y[:10], x[10:], y[10:], metric="cosine")
  with pytest.raises(geometry.NonFiniteError, match="rows of keys"):
    retrieval.retrieval(x[10:], y[10:], q, y[:10], metric="euclidean")
  with pytest.raises(geometry.NonFiniteError, match="rows of train_x"):  # Was: a NaN centre.
    retrieval.prepare("hamming_16", q, y[:10], x[10:], num_classes=3)
  with pytest.raises(geometry.NonFiniteError, match="rows of test_x"):
    retrieval.measure_table(x[10:], y[10:], q, y[:10], num_classes=3, k=3, code_lengths=(16,))


def test_ood_refuses():
  x, y = _clusters()
  bad = x.copy()
  bad[5] = -np.inf
  with pytest.raises(geometry.NonFiniteError, match="rows of train_x"):
    ood.fit_detectors(bad, y, num_classes=3, k=3)
  detectors = ood.fit_detectors(x, y, num_classes=3, k=3)
  with pytest.raises(geometry.NonFiniteError, match="rows of x"):  # Was: NaN scores.
    ood.ood_scores(detectors, bad)


def test_geometry_report_refuses():
  x, y = _clusters()
  x[7] = np.nan
  with pytest.raises(geometry.NonFiniteError, match="rows of x"):
    report.hypersphere_report(x, y, num_classes=3, measures=("cosine",))
  with pytest.raises(geometry.NonFiniteError, match="rows of view2"):
    report.hypersphere_report(x[8:], y[8:], num_classes=3, view1=x[8:], view2=x[:8],
                              measures=("cosine",))


def test_search_measures_fit_on_finite_keys_only():
  x, y = _clusters()
  bad = x.copy()
  bad[[0, 9]] = np.nan
  finite = geometry.finite_rows(bad)
  hamming = search.fit_measure(bad, measure="hamming")  # Was: an all-NaN centre.
  np.testing.assert_allclose(hamming.center, x[np.asarray(finite)].mean(0), rtol=1e-6)
  with pytest.raises(geometry.NonFiniteError, match="2 of 60 rows of the keys"):
    search.fit_measure(bad, measure="mahalanobis")
  for measure in search.MEASURES:
    fitted = search.fit_measure(bad[np.asarray(finite)], measure=measure)
    values, indices = search.top_k(x[:4], bad, measure=fitted, k=60)
    assert not np.isin(indices, [0, 9]).any(), measure
    np.testing.assert_array_equal(indices[:, -2:], -1)  # 58 finite keys for 60 slots
  # The class map leaves NaN rows out like unlabelled ones. Was: all NaN.
  matrix, used = search.class_similarity(bad, y, measure="cosine")
  clean, clean_used = search.class_similarity(x[np.asarray(finite)], y[np.asarray(finite)],
                                              measure="cosine")
  assert used == clean_used == 58
  np.testing.assert_allclose(matrix, clean, rtol=1e-6)


def test_faiss_index_refuses():
  pytest.importorskip("faiss")
  from embedspace.space import faiss_index
  x, _ = _clusters()
  x[3] = np.nan
  with pytest.raises(geometry.NonFiniteError, match="rows of the keys"):
    faiss_index.build(x, measure="cosine")


def test_search_command_masks_nan_rows_and_reports_them(tmp_path, capsys):
  x, y = _clusters(n=12)
  x[[2, 5]] = np.nan
  path = store.save_embeddings(str(tmp_path / "e.npz"), x, labels=y)
  emb = store.load_embeddings(path)
  got = queries.run_query(emb, "0", k=50, measure="euclidean")
  out = capsys.readouterr()
  assert "2 of 12 embeddings" in out.err and "are not finite" in out.err
  assert "--k=50 is more than the 9 other rows" in out.err
  # Was: NaN rows at distance 0 first, and -1 slots printed as the last row.
  assert sorted(got["rows"]) == [1, 3, 4, 6, 7, 8, 9, 10, 11]
  assert got["values"] == sorted(got["values"]) and np.all(np.isfinite(got["values"]))
  with pytest.raises(ValueError, match="query row 2 .* is not finite"):
    queries.run_query(emb, "2", k=3, measure="cosine")
  record = queries.run_class_map(emb, str(tmp_path / "map.png"), measure="cosine")
  assert record["points"] == 10
  assert all(v is not None for row in record["matrix"] for v in row)


def test_evaluations_refuse_a_model_with_nan_embeddings(monkeypatch):
  from configs import imagebind, vicreg
  from embedspace.multimodal import evaluate as mm_evaluate
  from embedspace.ssl import evaluate as ssl_evaluate

  def nan_embed(apply_fn, variables, loader, *, mesh):
    del apply_fn, variables, loader, mesh
    features = np.ones((4, 3), np.float32)
    features[1] = np.nan
    return {"features": features, "embeddings": np.ones((4, 2), np.float32),
            "labels": np.arange(4)}
  monkeypatch.setattr(ssl_evaluate, "embed", nan_embed)
  model = types.SimpleNamespace(clone=lambda **kw: types.SimpleNamespace(apply=print))
  with pytest.raises(geometry.NonFiniteError, match="1 of 4 rows of the trained model's "
                     "features of the train split .*evaluate an earlier checkpoint"):
    ssl_evaluate.evaluate_run(vicreg.get_config("smoke"), model, {}, mesh=None)

  def nan_split(apply_fn, split, *, modalities, batch_size):
    del apply_fn, split, batch_size
    return {m: np.full((3, 2), np.inf if m == "audio" else 0.5, np.float32) for m in modalities}
  monkeypatch.setattr(mm_evaluate, "make_embed_fn", lambda model, variables: None)
  monkeypatch.setattr(mm_evaluate, "embed_split", nan_split)
  config = imagebind.get_config("smoke")
  mm_model = types.SimpleNamespace(modalities=("image", "audio", "text"))
  with pytest.raises(geometry.NonFiniteError, match="3 of 3 rows of the audio embeddings of "
                     "the train split"):
    mm_evaluate.evaluate_run(config, mm_model, {}, {"train": None, "eval": None})
