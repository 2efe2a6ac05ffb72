"""The evaluation's pictures: matplotlib PNGs (Agg backend) of a report's numbers.

Each `plot_*` takes arrays computed by `report` (class similarity, pair distributions, geodesic
distances, dimension usage, OOD scores, 2-D maps), writes one PNG and returns its path;
`ssl.evaluate.evaluate_run` and `embedspace.search --class_map` call them, and `write_markdown` in
`report` links them from `report.md`.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from etils import epath

from embedspace.measure import ood


def pyplot():
  """matplotlib.pyplot on the Agg backend (files only, no display needed)."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  return plt


def save(fig: Any, path: str | os.PathLike[str], *, dpi: int) -> str:
  """Writes `fig` as a PNG to `path` (a local or any `etils.epath` path), closes it; `path`."""
  with epath.Path(path).open("wb") as f:
    fig.savefig(f, format="png", dpi=dpi)
  pyplot().close(fig)
  return os.fspath(path)


def plot_class_similarity(sims: Mapping[str, np.ndarray], class_names: Sequence[str],
                          path: str, *, measure: str = "cosine") -> str:
  """Heatmaps of class-by-class mean `measure` matrices side by side (one per space).

  Returns `path`.
  """
  plt = pyplot()
  fig, axes = plt.subplots(1, len(sims), figsize=(5.5 * len(sims), 5), squeeze=False)
  for ax, (title, sim) in zip(axes[0], sims.items()):
    im = ax.imshow(sim, cmap="viridis")
    ax.set_xticks(range(len(class_names)), class_names, rotation=60, ha="right", fontsize=7)
    ax.set_yticks(range(len(class_names)), class_names, fontsize=7)
    for (i, j), v in np.ndenumerate(sim):
      if np.isfinite(v):
        ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=5,
                color="white" if v < np.nanmean(sim) else "black")
    ax.set_title(f"{title}: mean {measure} between classes")
    fig.colorbar(im, ax=ax, fraction=0.046)
  fig.tight_layout()
  return save(fig, path, dpi=110)


def plot_pair_histograms(pairs: Mapping[str, Mapping[str, Any]],
                         separation: Mapping[str, float], title: str, path: str) -> str:
  """Same- vs different-class distributions of every measure, one panel each; returns `path`."""
  plt = pyplot()
  names = list(pairs)
  cols = 3
  rows = -(-len(names) // cols)
  fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.2 * rows), squeeze=False)
  for ax, name in zip(axes.ravel(), names):
    p = pairs[name]
    lo = min(p["same"].min(), p["different"].min())
    hi = max(p["same"].max(), p["different"].max())
    if all(np.array_equal(v, np.round(v)) for v in (p["same"], p["different"])):
      step = max(1, int(np.ceil((hi - lo + 1) / 60)))  # integer counts (Hamming): whole bins
      bins = np.arange(lo - 0.5, hi + step + 0.5, step)
    else:
      bins = np.linspace(lo, hi if hi > lo else lo + 1, 60)
    ax.hist(p["different"], bins=bins, density=True, alpha=0.55, label="different class")
    ax.hist(p["same"], bins=bins, density=True, alpha=0.55, label="same class")
    kind = "similarity" if p["is_similarity"] else "distance"
    ax.set_title(f"{name} ({kind}); AUROC {separation.get(name, float('nan')):.3f}", fontsize=9)
    ax.legend(fontsize=7)
  for ax in axes.ravel()[len(names):]:
    ax.axis("off")
  fig.suptitle(title)
  fig.tight_layout()
  return save(fig, path, dpi=100)


def plot_geodesic(geodesic: Mapping[str, Mapping[str, np.ndarray]], path: str) -> str:
  """Geodesic-distance histograms (positives, negatives, same, different class) per space."""
  plt = pyplot()
  fig, axes = plt.subplots(1, len(geodesic), figsize=(5.5 * len(geodesic), 3.8), squeeze=False)
  bins = np.linspace(0, np.pi, 73)
  for ax, (title, groups) in zip(axes[0], geodesic.items()):
    for name, values in groups.items():
      ax.hist(values, bins=bins, density=True, histtype="step", linewidth=1.5, label=name)
    ax.axvline(np.pi / 2, color="grey", linestyle=":", linewidth=1)
    ax.set_xlabel("geodesic distance arccos(u.v) [rad]")
    ax.set_title(title)
    ax.legend(fontsize=8)
  fig.tight_layout()
  return save(fig, path, dpi=100)


def plot_dimensions(usage: Mapping[str, Mapping[str, Any]], path: str) -> str:
  """Sorted per-dimension std and the PCA spectrum per space (log scale): the collapse check."""
  plt = pyplot()
  fig, axes = plt.subplots(1, 2, figsize=(11, 3.8))
  for title, u in usage.items():
    std = np.asarray(u["std_sorted"])
    axes[0].semilogy(np.arange(1, len(std) + 1), np.maximum(std, 1e-12), label=title)
    ratio = np.asarray(u["pca_variance_ratio"])
    axes[1].semilogy(np.arange(1, len(ratio) + 1), np.maximum(ratio, 1e-12),
                     label=f"{title} (erank {u['effective_rank']:.1f})")
  axes[0].set(title="per-dimension std, sorted", xlabel="dimension (sorted)")
  axes[1].set(title="PCA explained-variance ratio", xlabel="component")
  for ax in axes:
    ax.legend(fontsize=8)
  fig.tight_layout()
  return save(fig, path, dpi=100)


def plot_ood(scores: Mapping[str, Mapping[str, Mapping[str, np.ndarray]]],
             metrics: Mapping[str, Mapping[str, Mapping[str, float]]], path: str) -> str:
  """Score histograms (in vs out) and ROC curves of every OOD score, one row per space."""
  plt = pyplot()
  spaces = list(scores)
  names = list(next(iter(scores.values())))
  fig, axes = plt.subplots(len(spaces), len(names) + 1,
                           figsize=(3.6 * (len(names) + 1), 3.1 * len(spaces)), squeeze=False)
  for r, space in enumerate(spaces):
    roc_ax = axes[r, -1]
    for c, name in enumerate(names):
      s = scores[space][name]
      lo, hi = np.percentile(np.concatenate([s["in"], s["out"]]), [0.5, 99.5])
      bins = np.linspace(lo, hi if hi > lo else lo + 1, 60)
      ax = axes[r, c]
      ax.hist(np.clip(s["in"], lo, hi), bins=bins, density=True, alpha=0.55, label="in (eval)")
      ax.hist(np.clip(s["out"], lo, hi), bins=bins, density=True, alpha=0.55, label="OOD")
      m = metrics[space][name]
      ax.set_title(f"{space}: {name}\nAUROC {m['auroc']:.3f}  FPR95 {m['fpr95']:.3f}",
                   fontsize=8)
      ax.legend(fontsize=6)
      fpr, tpr = ood.roc_curve(s["in"], s["out"])
      roc_ax.plot(fpr, tpr, label=f"{name} ({m['auroc']:.3f})")
    roc_ax.plot([0, 1], [0, 1], color="grey", linestyle=":")
    roc_ax.axhline(0.95, color="grey", linewidth=0.7)
    roc_ax.set(title=f"{space}: ROC (in = positive)", xlabel="FPR (OOD accepted)",
               ylabel="TPR (in accepted)")
    roc_ax.legend(fontsize=6)
  fig.tight_layout()
  return save(fig, path, dpi=100)


def plot_maps(maps: Mapping[str, np.ndarray], labels: np.ndarray, class_names: Sequence[str],
              path: str) -> str:
  """2-D scatter plots coloured by class (e.g. PCA and t-SNE of each space); returns `path`."""
  plt = pyplot()
  fig, axes = plt.subplots(1, len(maps), figsize=(4.8 * len(maps), 4.6), squeeze=False)
  cmap = plt.get_cmap("tab10" if len(class_names) <= 10 else "tab20")
  for ax, (title, xy) in zip(axes[0], maps.items()):
    for c, name in enumerate(class_names):
      sel = labels == c
      ax.scatter(xy[sel, 0], xy[sel, 1], s=3, color=cmap(c % cmap.N), label=name)
    ax.set_title(title)
    ax.set_xticks([])
    ax.set_yticks([])
  axes[0, -1].legend(fontsize=7, markerscale=4, loc="center left", bbox_to_anchor=(1, 0.5))
  fig.tight_layout()
  return save(fig, path, dpi=100)


def plot_curve(curve: Mapping[str, Sequence[float]], baselines: Mapping[str, float],
               path: str, *, finals: Mapping[str, float] | None = None,
               curve_label: str = "") -> str:
  """Accuracy against training steps (`curve`: "step" and one list per score, each labelled with
  `curve_label`), each baseline's score as a dashed line and each of `finals` (the same score
  of the last step measured as the baselines are, e.g. on the whole splits) as a star at the
  last step, in its curve's colour. Returns `path`."""
  plt = pyplot()
  fig, ax = plt.subplots(figsize=(5.5, 3.4))
  steps = np.asarray(curve["step"])
  for i, (name, values) in enumerate((n, v) for n, v in curve.items() if n != "step"):
    ax.plot(steps, np.asarray(values) * 100, marker="o", ms=3, color=f"C{i}",
            label=f"{name.replace('_', ' ')}{curve_label}")
    if finals and name in finals:
      ax.plot([steps[-1]], [finals[name] * 100], marker="*", ms=9, ls="none", color=f"C{i}",
              label=f"{name.replace('_', ' ')} at the end")
  for i, (name, value) in enumerate(baselines.items()):
    ax.axhline(value * 100, ls="--", lw=1, color=f"C{i + 3}", label=name.replace("_", " "))
  ax.set_xlabel("training step")
  ax.set_ylabel("accuracy (%)")
  ax.grid(alpha=0.3)
  ax.legend(fontsize=7, loc="best")
  fig.tight_layout()
  return save(fig, path, dpi=130)
