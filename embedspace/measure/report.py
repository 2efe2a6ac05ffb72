"""A look inside an embedding space: hypersphere geometry, collapse checks and pictures.

Numbers follow Wang & Isola (2020), "Understanding Contrastive Representation Learning through
Alignment and Uniformity on the Hypersphere" (alignment of positive pairs, uniformity of the
whole set), the effective rank of Roy & Vetterli (2007) as used by RankMe (Garrido et al. 2023),
and the per-dimension spread that VICReg's variance term guards (a dimension whose standard
deviation is ~0 carries nothing: dimensional collapse, Jing et al. 2022). Pair statistics
(distance histograms, same- vs different-class separation) are computed on a seeded random
subset of at most `max_points` points, so their cost is bounded whatever the split's size;
class-similarity means are exact in closed form, `mean_{i in a, j in b} cos(x_i, x_j) =
s_a . s_b / (n_a n_b)` with `s_a` the sum of the unit vectors of class `a`.

The pictures are drawn by `embedspace.plots` (matplotlib PNGs, Agg backend, no display
needed); `write_markdown` assembles `report.md` from the numbers and the PNGs. The 2-D maps use
PCA (numpy SVD) and t-SNE from scikit-learn when it is installed (`pip install scikit-learn`);
without it the t-SNE panel is skipped and the report says so.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from etils import epath

from embedspace import geometry, losses
from embedspace.measure import ood
from embedspace.measure import retrieval

HISTOGRAM_MEASURES = ("hamming_64", "manhattan", "euclidean", "cosine", "negative_arc_length",
                      "mahalanobis")
"""Measures whose same-/different-class pair distributions are drawn."""


# ----------------------------------------------------------------------------------------------
# Numbers.


def unit(x: np.ndarray) -> np.ndarray:
  """Rows scaled to unit L2 norm (zero rows stay zero): `[n, d]` float64."""
  x = np.asarray(x, np.float64)
  return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def class_similarity(x: np.ndarray, labels: np.ndarray, *, num_classes: int) -> np.ndarray:
  """Mean cosine similarity between the members of every pair of classes: `[C, C]`.

  `S_ab = mean_{i in a, j in b} cos(x_i, x_j)` in closed form from the class sums of unit
  vectors; on the diagonal the `n_a` self-pairs are left out, `S_aa = (|s_a|^2 - n_a) /
  (n_a (n_a - 1))`. A class with fewer than 2 members gets NaN on its diagonal (0 members: NaN
  row and column).

  Args:
    x: `[n, d]` features.
    labels: `[n]` ints in `[0, num_classes)`.
    num_classes: C.

  Returns:
    float64 `[C, C]`, symmetric.
  """
  u = unit(x)
  onehot = np.eye(num_classes)[np.asarray(labels)]
  sums = onehot.T @ u  # [C, d]
  counts = onehot.sum(0)
  gram = sums @ sums.T
  with np.errstate(invalid="ignore", divide="ignore"):
    sim = gram / np.outer(counts, counts)
    diag = (np.diag(gram) - counts) / (counts * (counts - 1))
  sim[np.diag_indices(num_classes)] = diag
  return sim


def dimension_usage(x: np.ndarray, *,
                    dead_fraction: float = 1e-2) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
  """How many dimensions carry variance (the collapse check).

  Per-dimension standard deviations `s_k`, the PCA spectrum (eigenvalues of the covariance,
  descending) and its cumulative explained variance, and the effective rank
  (`losses.effective_rank`).

  Args:
    x: `[n, d]` features.
    dead_fraction: a dimension with `s_k < dead_fraction * max_k s_k` counts as unused.

  Returns:
    `(numbers, curves)`: numbers "dim", "dims_used", "components_90" / "components_99"
    (principal components for 90% / 99% of the variance), "effective_rank", "mean_norm"; curves
    "std_sorted" (descending) and "pca_variance_ratio", `[d]` each, for `plot_dimensions`.
  """
  x = np.asarray(x, np.float64)
  std = x.std(axis=0)
  cov = np.cov(x, rowvar=False).reshape(x.shape[1], x.shape[1])
  # XLA's eigensolver: numpy's (OpenBLAS) was 50x slower on a busy 2-core machine.
  eig = np.clip(np.asarray(jnp.linalg.eigvalsh(jnp.asarray(cov, jnp.float32)), np.float64),
                0.0, None)[::-1]
  ratio = eig / max(eig.sum(), 1e-30)
  cum = np.cumsum(ratio)
  numbers = {
      "dim": int(x.shape[1]),
      "dims_used": int(np.sum(std > dead_fraction * max(std.max(), 1e-30))),
      "components_90": int(min(np.searchsorted(cum, 0.9) + 1, x.shape[1])),
      "components_99": int(min(np.searchsorted(cum, 0.99) + 1, x.shape[1])),
      "effective_rank": float(losses.effective_rank(jnp.asarray(x, jnp.float32))),
      "mean_norm": float(np.linalg.norm(x, axis=1).mean()),
  }
  return numbers, {"std_sorted": np.sort(std)[::-1], "pca_variance_ratio": ratio}


def _subset(n: int, max_points: int, seed: int) -> np.ndarray:
  if n <= max_points:
    return np.arange(n)
  return np.sort(np.random.default_rng(seed).choice(n, max_points, replace=False))


def _summary(values: np.ndarray) -> dict[str, float]:
  return {"mean": float(np.mean(values)), "median": float(np.median(values)),
          "std": float(np.std(values))} if len(values) else {}


_pairwise = jax.jit(geometry.pairwise, static_argnames=("metric",))
"""Jitted, so that Manhattan's `[n, n, d]` difference is fused into its sum, never stored."""


def pair_values(x: np.ndarray, labels: np.ndarray, *, measure: str, num_classes: int,
                seed: int = 0) -> tuple[np.ndarray, np.ndarray, bool]:
  """Values of `measure` over all pairs `i < j` of `x`, split into same- and different-class.

  The measure is prepared as in `retrieval.prepare` (fitted on `x` itself). Quadratic in `n`
  (one `[n, n]` matrix): pass a subset.

  Returns:
    `(same [P_s], different [P_d], is_similarity)`.
  """
  feats, _, metric = retrieval.prepare(measure, x, labels, x[:1], num_classes=num_classes,
                                       seed=seed)
  values = np.asarray(_pairwise(jnp.asarray(feats), jnp.asarray(feats), metric=metric))
  iu = np.triu_indices(len(x), k=1)
  same = labels[iu[0]] == labels[iu[1]]
  pairs = values[iu]
  return pairs[same], pairs[~same], geometry.is_similarity(metric)


def hypersphere_report(x: np.ndarray, labels: np.ndarray, *, num_classes: int,
                       view1: np.ndarray | None = None, view2: np.ndarray | None = None,
                       measures: Sequence[str] = HISTOGRAM_MEASURES, max_points: int = 1024,
                       seed: int = 0) -> tuple[dict[str, Any], dict[str, Any]]:
  """The geometry of one embedding space (e.g. the encoder features of the eval split).

  Alignment `E |u(a) - u(b)|^2` over positive pairs (two augmented views, `view1[i]` with
  `view2[i]`); uniformity `log E_{i != j} exp(-2 |u_i - u_j|^2)` (`losses.uniformity`); geodesic
  distances `arccos(u_i . u_j)` of positives, negatives (`view1[i]`, `view2[j]`, `i != j`),
  same-class and different-class pairs; the class-similarity matrix; dimension usage; and, per
  measure, how well it separates same- from different-class pairs (the AUROC of the pair values,
  `ood.auroc`; 0.5 = no better than chance). `u` is the L2-normalised vector.

  Args:
    x: `[n, d]` features; labels: `[n]` ints.
    num_classes: C.
    view1, view2: optional `[m, d]` features of two augmented views of the same images.
    measures: measure names (`retrieval.measure_names`) for the pair histograms.
    max_points: pair statistics use at most this many points (and view pairs).
    seed: of the subset.

  Returns:
    `(numbers, arrays)`: JSON-ready numbers, and the arrays the plots need ("geodesic",
    "pairs", "class_similarity", "dimensions").

  Raises:
    geometry.NonFiniteError: on rows of `x`, `view1` or `view2` that are not finite.
  """
  x, labels = np.asarray(x, np.float32), np.asarray(labels)
  for name, v in (("x", x), ("view1", view1), ("view2", view2)):
    if v is not None:
      geometry.require_finite(v, name)
  idx = _subset(len(x), max_points, seed)
  xs, ys = x[idx], labels[idx]
  us = unit(xs)
  geo = np.arccos(np.clip(us @ us.T, -1.0, 1.0))
  iu = np.triu_indices(len(xs), k=1)
  same = ys[iu[0]] == ys[iu[1]]
  geodesic = {"same_class": geo[iu][same], "different_class": geo[iu][~same]}
  dimensions, curves = dimension_usage(x)
  numbers: dict[str, Any] = {
      "num_points": int(len(x)), "num_pair_points": int(len(xs)),
      "uniformity": float(losses.uniformity(jnp.asarray(xs))),
      "dimensions": dimensions,
  }
  if view1 is not None and view2 is not None:
    vi = _subset(len(view1), max_points, seed)
    a, b = unit(np.asarray(view1)[vi]), unit(np.asarray(view2)[vi])
    numbers["alignment"] = float(np.mean(np.sum((a - b) ** 2, axis=1)))
    cross = np.arccos(np.clip(a @ b.T, -1.0, 1.0))
    geodesic["positive"] = np.diag(cross).copy()
    geodesic["negative"] = cross[~np.eye(len(a), dtype=bool)]
  numbers["geodesic"] = {k: _summary(v) for k, v in geodesic.items()}
  sim = class_similarity(x, labels, num_classes=num_classes)
  numbers["class_similarity"] = np.where(np.isfinite(sim), sim, 0.0).tolist()
  off = [(sim[a, b], a, b) for a in range(num_classes) for b in range(a + 1, num_classes)
         if np.isfinite(sim[a, b])]
  numbers["closest_class_pairs"] = [[int(a), int(b), float(s)]
                                    for s, a, b in sorted(off, reverse=True)[:5]]
  pairs, separation = {}, {}
  for m in measures:
    s, d, is_sim = pair_values(xs, ys, measure=m, num_classes=num_classes, seed=seed)
    pairs[m] = {"same": s, "different": d, "is_similarity": is_sim}
    if len(s) and len(d):  # the different-class pairs play OOD: further out should be larger
      sign = -1.0 if is_sim else 1.0
      separation[m] = ood.auroc(sign * s, sign * d)
  numbers["same_vs_different_class_auroc"] = separation
  return numbers, {"geodesic": geodesic, "pairs": pairs, "class_similarity": sim,
                   "dimensions": {**dimensions, **curves}}


def pca_2d(x: np.ndarray) -> np.ndarray:
  """The first two principal components of `x`: `[n, 2]`."""
  x = np.asarray(x, np.float64)
  centred = x - x.mean(0)
  _, _, vt = np.linalg.svd(centred, full_matrices=False)
  return centred @ vt[:2].T


def tsne_2d(x: np.ndarray, *, seed: int = 0) -> np.ndarray | None:
  """t-SNE of `x` (scikit-learn, PCA initialisation, perplexity 30), or None without sklearn."""
  try:
    from sklearn.manifold import TSNE
    from threadpoolctl import threadpool_limits
  except ImportError:
    return None
  x = np.asarray(x, np.float32)
  # One thread: OpenMP workers spinning on a busy machine made it 3-5x slower (8 s for 2k points
  # on one core vs 25-40 s on two shared ones).
  with threadpool_limits(1):
    return TSNE(n_components=2, perplexity=min(30.0, (len(x) - 1) / 3), init="pca",
                random_state=seed, n_jobs=1).fit_transform(x)


# ----------------------------------------------------------------------------------------------
# report.md


def _fmt(v: Any) -> str:
  return f"{v:.4f}" if isinstance(v, float) else str(v)


def _table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
  lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
  lines += ["| " + " | ".join(_fmt(v) for v in row) + " |" for row in rows]
  return "\n".join(lines)


def measures_markdown(measures: Mapping[str, Mapping[str, Mapping[str, Any]]]) -> str:
  """Two tables, one row per measure: kNN accuracy per space; retrieval per space."""
  spaces = list(measures)
  names = list(next(iter(measures.values())))
  knn = _table(["measure"] + [f"kNN {s}" for s in spaces],
               [[n] + [measures[s][n]["knn_accuracy"] for s in spaces] for n in names])
  with_map = [s for s in spaces if "map" in measures[s][names[0]]]
  if not with_map:
    return knn
  cell = lambda m: " / ".join(f"{m[k]:.3f}" for k in ("map", "recall@1", "recall@5", "recall@10")
                              if k in m)
  ret = _table(["measure"] + [f"{s}: mAP / R@1 / R@5 / R@10" for s in with_map],
               [[n] + [cell(measures[s][n]) for s in with_map] for n in names])
  return knn + "\n\n" + ret


def ood_markdown(metrics: Mapping[str, Mapping[str, Mapping[str, float]]]) -> str:
  """The OOD table: one row per score, AUROC and FPR95 per space."""
  spaces = list(metrics)
  names = list(next(iter(metrics.values())))
  header = ["score"] + [f"{col} {s}" for s in spaces for col in ("AUROC", "FPR95")]
  rows = [[n] + [metrics[s][n][k] for s in spaces for k in ("auroc", "fpr95")] for n in names]
  return _table(header, rows)


def write_markdown(report: Mapping[str, Any], images: Mapping[str, str], path: str, *,
                   command: str = "", class_names: Sequence[str] = ()) -> str:
  """Writes `report.md`: the tables, the geometry numbers and the PNGs (relative links)."""
  out = ["# Embedding space report", ""]
  if command:
    out += [f"Made by `{command}`.", ""]
  out += [f"Train (database / fit) points: {report.get('num_train')}, eval (query) points: "
          f"{report.get('num_eval')}.", ""]
  trained = report.get("trained", {})
  rows = []
  for space, name in (("encoder", "trained encoder"), ("projector", "trained projector")):
    if space in trained:
      rows.append([name, trained[space].get("knn_accuracy", ""),
                   trained[space].get("linear_probe_accuracy", "")])
  if "random_init" in report:
    e = report["random_init"]["encoder"]
    rows.append(["random-init encoder", e["knn_accuracy"], e.get("linear_probe_accuracy", "")])
  if "raw_pixels" in report:
    e = report["raw_pixels"]
    rows.append(["raw pixels", e["knn_accuracy"], e.get("linear_probe_accuracy", "")])
  out += [f"## kNN (cosine, weighted, k={report.get('knn_k')}) and linear probe", "",
          _table(["space", "kNN accuracy", "linear probe accuracy"], rows), ""]
  if "measures" in report:
    sizes = report.get("measures_examples", {})
    out += [f"## Every measure: kNN accuracy (majority vote, k={report.get('knn_k')}) and "
            f"retrieval ({sizes.get('eval', 'all')} eval queries, {sizes.get('train', 'all')}-row "
            "train database, same class = relevant)", "", measures_markdown(report["measures"]),
            ""]
  if "ood" in report:
    o = report["ood"]
    out += [f"## Out-of-distribution: {o['in_distribution']} (in) vs {o['out_of_distribution']}"
            " (OOD)", "", ood_markdown(o["metrics"]), ""]
  if "geometry" in report:
    rows = []
    for space, g in report["geometry"].items():
      geo = g["geodesic"]
      rows.append([space, g.get("alignment", ""), g["uniformity"],
                   g["dimensions"]["effective_rank"],
                   f"{g['dimensions']['dims_used']}/{g['dimensions']['dim']}",
                   g["dimensions"]["components_90"],
                   geo.get("positive", {}).get("mean", ""), geo.get("negative", {}).get("mean", ""),
                   geo["same_class"]["mean"], geo["different_class"]["mean"]])
    out += ["## Hypersphere geometry (eval split)", "",
            _table(["space", "alignment", "uniformity", "effective rank", "dims used",
                    "PCs for 90%", "geodesic positive", "negative", "same class",
                    "different class"], rows), ""]
    for space, g in report["geometry"].items():
      pairs = ", ".join(f"{class_names[a] if class_names else a} ~ "
                        f"{class_names[b] if class_names else b} ({s:.2f})"
                        for a, b, s in g["closest_class_pairs"])
      sep = ", ".join(f"{m} {v:.3f}" for m, v in g["same_vs_different_class_auroc"].items())
      out += [f"- {space}: closest classes: {pairs}.", f"  Same- vs different-class pair "
              f"AUROC per measure: {sep}."]
    out.append("")
  if report.get("notes"):
    out += ["## Notes", ""] + [f"- {n}" for n in report["notes"]] + [""]
  out += ["## Pictures", ""]
  for title, image in images.items():
    out += [f"### {title}", "", f"![{title}]({os.path.basename(image)})", ""]
  epath.Path(path).write_text("\n".join(out), encoding="utf-8")
  return path
