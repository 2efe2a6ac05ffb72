"""Writes the notebooks of experiments/ from the cell sources below, and optionally runs them.

  python experiments/build_notebooks.py                       # write the .ipynb files (no outputs)
  python experiments/build_notebooks.py --execute             # ... and run them, outputs saved
  EMBEDSPACE_NOTEBOOK_SIZE=smoke python experiments/build_notebooks.py --execute 01

The sources live here so that a change to a notebook is a reviewable diff of Python strings; the
committed .ipynb files hold the outputs of one `--execute` run at the size its first lines print.
Every notebook starts with the same two cells: the environment (Colab or a local checkout) and the
parameters (papermill's `parameters` tag, or environment variables).
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import tempfile
import time

import nbformat

HERE = os.path.dirname(os.path.abspath(__file__))

# ------------------------------------------------------------------------------------------------
# Shared cells.

SETUP = r'''# Environment: on Colab, clone and install embedspace; in a local checkout, use it as it is.
import importlib.util, os, shutil, subprocess, sys

REPO = "https://github.com/embedspace/embedspace"  # PLACEHOLDER: the URL of this repository
IN_COLAB = "google.colab" in sys.modules


def accelerator() -> str:
  """'tpu', 'gpu' or 'cpu', found without importing JAX (its install depends on it)."""
  if os.path.exists("/dev/accel0") or os.environ.get("COLAB_TPU_ADDR") or os.environ.get("TPU_ACCELERATOR_TYPE"):
    return "tpu"
  if shutil.which("nvidia-smi") and subprocess.run(["nvidia-smi", "-L"], capture_output=True).returncode == 0:
    return "gpu"
  return "cpu"


def find_root() -> str | None:
  """The checkout above the working directory: it holds configs/ (`from configs import vicreg`)."""
  path = os.getcwd()
  while not os.path.exists(os.path.join(path, "configs", "vicreg.py")):
    if os.path.dirname(path) == path:
      return None
    path = os.path.dirname(path)
  return path


def importable(name: str) -> bool:
  """True for an installed or path-importable package (not a same-named folder, e.g. a clone)."""
  spec = importlib.util.find_spec(name)
  return spec is not None and spec.origin is not None


ACCELERATOR = accelerator()
INSTALL = not importable("embedspace")
ROOT = find_root()
if ROOT is None and IN_COLAB:
  ROOT = "/content/embedspace"
  if not os.path.exists(ROOT):
    subprocess.run(["git", "clone", "--depth=1", REPO, ROOT], check=True)
if ROOT is None:
  raise RuntimeError("Start this notebook inside a checkout of embedspace (or on Colab).")
if INSTALL:  # embedspace is not importable: install the checkout (and its dependencies)
  jax_extra = {"tpu": ["jax[tpu]"], "gpu": ["jax[cuda12]"]}.get(ACCELERATOR, [])
  subprocess.run([sys.executable, "-m", "pip", "install", "-q", "-e", ROOT, *jax_extra], check=True)
sys.path.insert(0, ROOT)  # `configs` lives in the repository root, as for `python -m embedspace.main`

import jax
from embedspace import parallel

print(f"accelerator: {ACCELERATOR}; jax {jax.__version__}; devices: {jax.devices()}")
# Training and evaluation shard every batch over a 1-D mesh of all devices (8 TPU cores on a
# v2-8), with the same per-device step; nothing here needs to change for that.
print(parallel.describe(parallel.make_mesh()))'''

PARAMETERS_HEAD = r'''# Parameters (papermill: `-p SIZE full`; or set the environment variables before starting Jupyter).
import os

# "smoke": seconds, for CI; "small": a few minutes on a laptop CPU; "full": the configs' defaults.
SIZE = os.environ.get("EMBEDSPACE_NOTEBOOK_SIZE", "small")
# Where this notebook's training runs go ("": ROOT/workdirs/notebooks/SIZE). A rerun resumes them.
RUNS = os.environ.get("EMBEDSPACE_NOTEBOOK_RUNS", "")'''

SIZES_CHECK = r'''assert SIZE in ("smoke", "small", "full"), SIZE
RUNS = RUNS or os.path.join(ROOT, "workdirs", "notebooks", SIZE)
os.makedirs(RUNS, exist_ok=True)
print(f"SIZE={SIZE}; runs in {RUNS}")'''

PLOTTING = r'''import json
import time

import matplotlib.pyplot as plt
import numpy as np

plt.rcParams.update({"figure.dpi": 72, "savefig.dpi": 72, "font.size": 9})'''

SSL_SIZES = r'''def ssl_config(module):
  """`module.get_config()` at SIZE: the file's own `:smoke`, a `small` run of a few minutes, or
  the defaults (`full`, ~19 min on 2 CPU cores)."""
  if SIZE == "smoke":
    c = module.get_config("smoke")
    c.eval.baselines = False  # seconds matter in CI
    c.eval_every = 0
    return c
  c = module.get_config()
  if SIZE == "small":
    c.model.stage_sizes = (1, 1, 1)  # 64-d features instead of 128
    c.model.projector_dims = tuple(min(d, 512) for d in c.model.projector_dims)
    c.batch_size = 128
    c.num_steps = 150
    c.optimizer.warmup_steps = 15
    c.log_every = 10
    c.checkpoint_every = 200
    c.eval.full = False  # kNN + probe + baselines; the full report is notebook 01's subject
  return c'''


def md(text: str) -> nbformat.NotebookNode:
  return nbformat.v4.new_markdown_cell(text.strip("\n"))


def code(text: str, **metadata) -> nbformat.NotebookNode:
  return nbformat.v4.new_code_cell(text.strip("\n"), metadata=metadata)


COLAB = "https://colab.research.google.com/github/embedspace/embedspace/blob/main/experiments/"
"""Colab's address of the notebooks; like `REPO` in the setup cell, a placeholder for the
repository's real GitHub owner/name."""


def header(title: str, extra_parameters: str, filename: str) -> list[nbformat.NotebookNode]:
  return [
      md(title.strip("\n") + f"\n\n[Open in Colab]({COLAB}{filename}) (the address is a placeholder until the "
         "repository is public; any runtime works, a TPU one uses all 8 cores)."),
      md("**Setup.** On Colab this clones the repository (set `REPO` to its URL), installs it with "
         "the JAX build for the runtime's accelerator and prints the devices. In a local "
         "checkout it installs nothing when `embedspace` is importable."),
      code(SETUP),
      code(PARAMETERS_HEAD + "\n" + extra_parameters.strip("\n"), tags=["parameters"]),
      code(SIZES_CHECK + "\n\n" + PLOTTING),
  ]


# ------------------------------------------------------------------------------------------------
# 01: the distance measures of the founding note on a trained model.

NB01 = header(r'''
# 01 · Distance measures on a trained embedding space

The founding note lists six ways to say how close two embeddings are: **Hamming**, **Manhattan**,
**Euclidean**, **Mahalanobis**, **cosine** and **negative arc length**
(Koishekenov et al. 2023). This notebook takes the encoder of a VICReg model trained on the
Fashion-MNIST images shipped with embedspace and asks where the six disagree, and what the
disagreement does to kNN classification and to out-of-distribution (OOD) detection.
''', r'''
# A trained VICReg workdir to measure ("": train one here at SIZE, see below).
WORKDIR = os.environ.get("EMBEDSPACE_VICREG_WORKDIR", "")''', "01_distance_measures.ipynb") + [
    md(r'''
## A trained model

`embedspace.load(workdir)` restores a training run (its `config.json` and newest intact
checkpoint). Without `WORKDIR`, the notebook first trains `configs/vicreg.py` at `SIZE` with
`embedspace.train.train_and_evaluate`, the function behind `python -m embedspace.main`.
'''),
    code(SSL_SIZES + r'''


import embedspace
from configs import vicreg
from embedspace import train

if not WORKDIR:
  WORKDIR = os.path.join(RUNS, "vicreg")
  t0 = time.perf_counter()
  train.train_and_evaluate(ssl_config(vicreg), WORKDIR)
  print(f"trained in {time.perf_counter() - t0:.0f} s")
model = embedspace.load(WORKDIR)
print(f"workdir {model.workdir}: {model.config.method}, step {model.step} of "
      f"{model.config.num_steps}, batch {model.config.batch_size}; encoder {model.dim()}-d, "
      f"projector {model.dim('projector')}-d")'''),
    md(r'''
## Embeddings of the train and eval splits

The shipped Fashion-MNIST test split is divided 8,000 train / 2,000 eval (fixed, stratified).
`model.embed` takes raw uint8 images and applies the evaluation's preprocessing. The raw pixels,
normalised the same way, are the baseline every number needs.
'''),
    code(r'''from embedspace import data


def read_split(name, split, limit):
  source, info = data.get_source(name, split=split)
  rows = range(min(len(source), limit))
  images = np.stack([source[i]["image"] for i in rows])
  return images, np.array([source[i]["label"] for i in rows]), info


limit = {"smoke": 1000, "small": 8000, "full": 8000}[SIZE]
train_images, train_y, info = read_split("embedded_fashion_mnist", "train", limit)
eval_images, eval_y, _ = read_split("embedded_fashion_mnist", "test", limit // 4)
CLASSES = info.class_names
t0 = time.perf_counter()
features = {"encoder": (model.embed(train_images), model.embed(eval_images)),
            "raw pixels": (model.preprocess(train_images).reshape(len(train_images), -1),
                           model.preprocess(eval_images).reshape(len(eval_images), -1))}
print(f"embedded {len(train_images)} train + {len(eval_images)} eval images in "
      f"{time.perf_counter() - t0:.1f} s")
for space, (tr, te) in features.items():
  print(f"{space}: train {tr.shape}, eval {te.shape}")'''),
    md(r'''
## One pair, six numbers

Every measure is a pure function in `embedspace.geometry`, pairwise over `[n, d]` x `[m, d]`.
Mahalanobis is a distance from a point to a *distribution*: here the tied-covariance class
Gaussians of the training features (Lee et al. 2018). Hamming needs binary codes: the sign bits
of the features centred on the training mean (ReLU features are all positive, so uncentred bits
would all be 1).
'''),
    code(r'''import jax.numpy as jnp
from embedspace import geometry

z_train, z_eval = features["encoder"]
a, b = z_eval[:1], z_eval[1:2]  # two eval images
center = z_train.mean(0)
gauss = geometry.fit_gaussian(geometry.gaussian_stats(
    jnp.asarray(z_train), jnp.asarray(train_y), num_classes=10), shrinkage=0.01)
pair = {
    "hamming (bits)": geometry.hamming_distance(geometry.binarize(a - center), geometry.binarize(b - center)),
    "manhattan": geometry.manhattan_distance(a, b),
    "euclidean": geometry.euclidean_distance(a, b),
    "mahalanobis, a to nearest class": geometry.mahalanobis_distance(a, gauss)[:, None],
    "cosine": geometry.cosine_similarity(a, b),
    "negative arc length": geometry.negative_arc_length(a, b),
}
print(f"a: {CLASSES[eval_y[0]]}, b: {CLASSES[eval_y[1]]}")
for name, value in pair.items():
  print(f"  {name:34s} {float(np.asarray(value)[0, 0]):10.4f}")'''),
    md(r'''
### Why Mahalanobis: a toy picture

The note's figure, in numbers: points from a strongly correlated 2-D Gaussian and one point off
the correlation axis. By Euclidean distance from the mean it looks like an ordinary point; by
Mahalanobis distance it is far outside.
'''),
    code(r'''rng = np.random.default_rng(0)
cov = np.array([[1.0, 0.95], [0.95, 1.0]])
cloud = rng.multivariate_normal([0, 0], cov, size=500).astype(np.float32)
odd = np.array([[1.2, -1.2]], np.float32)
g2 = geometry.fit_gaussian(geometry.gaussian_stats(jnp.asarray(cloud)))
eu = lambda x: np.linalg.norm(x - cloud.mean(0), axis=1)
ma = lambda x: np.asarray(geometry.mahalanobis_distance(jnp.asarray(x), g2))
print(f"odd point: Euclidean {eu(odd)[0]:.2f} (cloud 95th pct {np.percentile(eu(cloud), 95):.2f}); "
      f"Mahalanobis {ma(odd)[0]:.2f} (cloud 95th pct {np.percentile(ma(cloud), 95):.2f})")
fig, ax = plt.subplots(1, 2, figsize=(8, 3.6))
for axis, (name, fn) in zip(ax, (("Euclidean", eu), ("Mahalanobis", ma))):
  s = axis.scatter(cloud[:, 0], cloud[:, 1], c=fn(cloud), s=6, cmap="viridis")
  axis.scatter(odd[:, 0], odd[:, 1], c="red", marker="x", s=60)
  axis.set(title=f"{name} distance to the cloud", aspect="equal")
  fig.colorbar(s, ax=axis, fraction=0.046)
plt.tight_layout(); plt.show()'''),
    md(r'''
## kNN under every measure

`retrieval.measure_table` is what the end-of-run evaluation reports: the unweighted majority of
the k=20 nearest training points (no temperature, so measures in different units compare
fairly), and retrieval mAP with same-class relevance. Hamming uses SimHash codes (sign bits of a
seeded random projection) of 16 to 1,024 bits; Mahalanobis whitens with the tied within-class
covariance and then takes the Euclidean distance.
'''),
    code(r'''from embedspace import retrieval

t0 = time.perf_counter()
tables = {space: retrieval.measure_table(tr, train_y, te, eval_y, num_classes=10, k=20)
          for space, (tr, te) in features.items()}
print(f"({time.perf_counter() - t0:.0f} s)\n")
print(f"{'measure':22s} " + "  ".join(f"{s + ' kNN':>16s}  {'mAP':>6s}" for s in tables))
for name in tables["encoder"]:
  print(f"{name:22s} " + "  ".join(f"{t[name]['knn_accuracy']:16.4f}  {t[name]['map']:6.3f}"
                                   for t in tables.values()))'''),
    code(r'''names = list(tables["encoder"])
fig, ax = plt.subplots(figsize=(9, 3))
for i, (space, t) in enumerate(tables.items()):
  ax.bar(np.arange(len(names)) + 0.4 * i - 0.2, [t[n]["knn_accuracy"] for n in names], 0.4, label=space)
ax.set_xticks(range(len(names)), names, rotation=30, ha="right")
lo = min(t[n]["knn_accuracy"] for t in tables.values() for n in names)
ax.set(ylabel="kNN accuracy (k=20)", ylim=(max(0, lo - 0.05), 1)); ax.legend()
plt.tight_layout(); plt.show()'''),
    md(r'''
## Where the measures disagree

Six measures, six neighbour lists for each query. Below: how much the 20-nearest-neighbour sets
of two measures overlap (Jaccard, averaged over eval queries), and how often their kNN votes
differ. Each measure is applied as the evaluation does it (`retrieval.prepare`), then
`geometry.top_k` finds the exact neighbours blockwise.
'''),
    code(r'''MEASURES = ["hamming_256", "manhattan", "euclidean", "mahalanobis", "cosine", "negative_arc_length"]
n_query = min(500, len(z_eval))
neighbours, votes = {}, {}
for name in MEASURES:
  tr, te, metric = retrieval.prepare(name, z_train, train_y, z_eval[:n_query], num_classes=10)
  _, idx = geometry.top_k(jnp.asarray(te), jnp.asarray(tr), metric=metric, k=20)
  neighbours[name] = np.asarray(idx)
  counts = np.stack([(train_y[neighbours[name]] == c).sum(1) for c in range(10)], 1)
  votes[name] = counts.argmax(1)

jac = np.zeros((len(MEASURES), len(MEASURES)))
differ = np.zeros_like(jac)
for i, m1 in enumerate(MEASURES):
  for j, m2 in enumerate(MEASURES):
    inter = [len(np.intersect1d(p, q)) for p, q in zip(neighbours[m1], neighbours[m2])]
    jac[i, j] = np.mean([k / (40 - k) for k in inter])
    differ[i, j] = np.mean(votes[m1] != votes[m2])
fig, ax = plt.subplots(1, 2, figsize=(10, 4))
for axis, mat, title in ((ax[0], jac, "neighbour overlap (Jaccard of top-20)"),
                         (ax[1], differ, "kNN votes that differ")):
  im = axis.imshow(mat, cmap="viridis")
  axis.set_xticks(range(len(MEASURES)), MEASURES, rotation=40, ha="right")
  axis.set_yticks(range(len(MEASURES)), MEASURES); axis.set_title(title)
  for (i, j), v in np.ndenumerate(mat):
    axis.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=7, color="w" if v < mat.max() / 2 else "k")
plt.tight_layout(); plt.show()
for name in MEASURES:
  print(f"{name:20s} kNN accuracy on these {n_query} queries: {np.mean(votes[name] == eval_y[:n_query]):.3f}")'''),
    md(r'''
Cosine and negative arc length give the same neighbours (one is a monotone function of the
other, `1 - arccos(cos)/pi`), so they always agree. The interesting disagreements are between
the angle, the plain distances and the whitened (Mahalanobis) one. Here are the queries the
measures disagree on, and one of them with its 8 nearest training images under each measure
(red: another class).
'''),
    code(r'''m_right = (votes["mahalanobis"] == eval_y[:n_query]) & (votes["cosine"] != eval_y[:n_query])
c_right = (votes["cosine"] == eval_y[:n_query]) & (votes["mahalanobis"] != eval_y[:n_query])
print(f"of {n_query} queries: Mahalanobis right and cosine wrong {m_right.sum()}, "
      f"cosine right and Mahalanobis wrong {c_right.sum()}")
spread = np.array([len(set(votes[m][q] for m in MEASURES)) for q in range(n_query)])
q = int(np.flatnonzero(m_right)[0]) if m_right.any() else int(np.argmax(spread))
fig, ax = plt.subplots(len(MEASURES), 9, figsize=(9, 1.15 * len(MEASURES)))
for r, name in enumerate(MEASURES):
  ax[r, 0].imshow(eval_images[q, ..., 0], cmap="gray")
  ax[r, 0].set_ylabel(name, rotation=0, ha="right", va="center", fontsize=8)
  for c, j in enumerate(neighbours[name][q, :8]):
    ax[r, c + 1].imshow(train_images[j, ..., 0], cmap="gray")
    if train_y[j] != eval_y[q]:
      for s in ax[r, c + 1].spines.values():
        s.set(color="red", linewidth=2)
  for a_ in ax[r]:
    a_.set_xticks([]); a_.set_yticks([])
ax[0, 0].set_title(f"query: {CLASSES[eval_y[q]]}", fontsize=8)
plt.tight_layout(); plt.show()
print("kNN votes for this query:", {m: CLASSES[votes[m][q]] for m in MEASURES})'''),
    md(r'''
Why Euclidean and cosine part ways: the encoder's features are not normalised. Their norms vary,
so two images at the same angle can be far apart in Euclidean distance. Each dot is a random
pair of eval images.
'''),
    code(r'''rng = np.random.default_rng(0)
i, j = rng.integers(0, len(z_eval), (2, 3000))
cos = np.sum(geometry.l2_normalize(jnp.asarray(z_eval[i])) * geometry.l2_normalize(jnp.asarray(z_eval[j])), -1)
euc = np.linalg.norm(z_eval[i] - z_eval[j], axis=1)
same = eval_y[i] == eval_y[j]
fig, ax = plt.subplots(1, 2, figsize=(9, 3.4))
ax[0].scatter(np.asarray(cos)[~same], euc[~same], s=3, alpha=0.4, label="different class")
ax[0].scatter(np.asarray(cos)[same], euc[same], s=3, alpha=0.6, label="same class")
ax[0].set(xlabel="cosine similarity", ylabel="Euclidean distance"); ax[0].legend(markerscale=3)
ax[1].hist(np.linalg.norm(z_eval, axis=1), bins=50)
ax[1].set(xlabel="feature norm |z|", ylabel="eval images")
plt.tight_layout(); plt.show()'''),
    md(r'''
## Out-of-distribution detection: Fashion-MNIST in, MNIST digits out

The shipped MNIST digits, fed through the same preprocessing, play the part of images the model
was never meant to see. `ood.evaluate_ood` fits each score on the labelled training features:
Mahalanobis to the nearest class (tied covariance), Euclidean distance to the nearest class mean,
cosine to the nearest class prototype, and the distance to the 50th nearest normalised training
feature (Sun et al. 2022). AUROC 1 separates in from out perfectly; FPR95 is the fraction of
MNIST digits accepted when 95% of Fashion-MNIST images are.
'''),
    code(r'''from embedspace import ood

mnist_images, _, _ = read_split("embedded_mnist", "test", limit // 4)
outside = {"encoder": model.embed(mnist_images),
           "raw pixels": model.preprocess(mnist_images).reshape(len(mnist_images), -1)}
ood_metrics, ood_scores = {}, {}
for space, (tr, te) in features.items():
  ood_metrics[space], ood_scores[space] = ood.evaluate_ood(tr, train_y, te, outside[space], num_classes=10)
print(f"{'score':20s} " + "  ".join(f"{s + ' AUROC / FPR95':>26s}" for s in ood_metrics))
for name in ood.SCORES:
  print(f"{name:20s} " + "  ".join(f"{m[name]['auroc']:17.3f} / {m[name]['fpr95']:.3f}" for m in ood_metrics.values()))'''),
    code(r'''fig, ax = plt.subplots(1, 4, figsize=(12, 2.8))
for axis, name in zip(ax, ood.SCORES):
  s = ood_scores["encoder"][name]
  bins = np.linspace(min(s["in"].min(), s["out"].min()), np.percentile(np.r_[s["in"], s["out"]], 99.5), 50)
  axis.hist(s["in"], bins, alpha=0.6, density=True, label="Fashion-MNIST (in)")
  axis.hist(s["out"], bins, alpha=0.6, density=True, label="MNIST (out)")
  axis.set(title=f"{name}: AUROC {ood_metrics['encoder'][name]['auroc']:.3f}", yticks=[])
ax[0].legend(fontsize=7)
plt.suptitle("encoder: OOD scores (larger = further from the training set)", y=1.02)
plt.tight_layout(); plt.show()'''),
    md(r'''
## What it shows

In the committed run (the default VICReg model, `/tmp/final/vicreg`: 800 steps, 128-d encoder;
8,000 train / 2,000 eval images):

- The measure is a modelling choice, not a detail: on the same encoder features, kNN accuracy
  ranges from 0.686 (Hamming, 16-bit codes) to 0.8415 (Mahalanobis); cosine gives 0.8355. On raw
  pixels Mahalanobis is the *worst* measure (0.494): whitening blows up near-constant border
  pixels.
- The neighbour lists differ far more than the votes: Mahalanobis has only about half of its 20
  neighbours in common with any other measure (Jaccard 0.31-0.38), yet its kNN vote differs
  from cosine's on 8% of queries. Cosine
  and negative arc length rank identically (a monotone function of each other); they differ in
  range, which matters inside a loss (the temperature), not for ranking.
- For OOD detection the measure matters most: on the encoder, Mahalanobis separates MNIST from
  Fashion-MNIST with AUROC 0.971 (FPR95 0.19), the distance to the nearest class mean 0.836 and
  the cosine to the class prototype 0.657. Raw pixels are a strong baseline here (kNN distance
  0.965): MNIST digits look unlike clothes even pixel by pixel.
- The same numbers for any run come from `python -m embedspace.evaluate --workdir=DIR`
  (`DIR/eval/report.md`).
'''),
]

# ------------------------------------------------------------------------------------------------
# 02: training VICReg and SimCLR, watching the loss terms and the embedding's health.

NB02 = header(r'''
# 02 · Training VICReg and SimCLR, and watching the embedding's health

Two self-supervised objectives on the same encoder and data: **VICReg** (Bardes et al. 2022:
invariance, variance and covariance terms) and **SimCLR** (Chen et al. 2020: InfoNCE over the
other views of the batch). Each run is one call of `embedspace.train.train_and_evaluate(config,
workdir)`, the function behind `python -m embedspace.main`; its workdir holds `metrics.jsonl`
and TensorBoard events, which this notebook reads back to watch the loss terms and the collapse
diagnostics while training, then compares the evaluations.
''', "", "02_train_vicreg_simclr.ipynb") + [
    md(r'''
## Configs

Configs are plain `ml_collections` files in `configs/` (`from configs import vicreg`). At `SIZE`
"small" the model and run are shrunk to a few minutes on a CPU; "full" is the file's defaults.
'''),
    code(SSL_SIZES + r'''


from configs import simclr, vicreg

configs = {"vicreg": ssl_config(vicreg), "simclr": ssl_config(simclr)}
for name, c in configs.items():
  print(f"{name}: loss {c.loss.to_dict()}, model {c.model.stage_sizes} x width {c.model.width}, "
        f"projector {c.model.projector_dims}, {c.num_steps} steps of {c.batch_size} pairs, "
        f"{c.optimizer.name} lr {c.optimizer.base_lr} per 256")'''),
    md(r'''
## Train

The step is compiled once with `jax.jit` over a mesh of all devices (`parallel.describe` above):
on a TPU runtime the same call trains on all 8 cores. A rerun of this cell resumes each run from
its newest checkpoint (a finished run only re-evaluates).
'''),
    code(r'''from embedspace import train

reports, seconds = {}, {}
for name, c in configs.items():
  t0 = time.perf_counter()
  reports[name] = train.train_and_evaluate(c, os.path.join(RUNS, name))
  seconds[name] = time.perf_counter() - t0
  print(f"{name}: {c.num_steps} steps + evaluation in {seconds[name]:.0f} s -> {os.path.join(RUNS, name)}")'''),
    md(r'''
## The loss terms

`metrics.jsonl` has one record per logged step (after a resume, re-run steps appear twice: keep
the last record of each step). VICReg's total is `25 invariance + 25 variance + 1 covariance`:
the invariance term pulls the two views together, the variance hinge keeps every dimension's
standard deviation near 1 and the covariance term decorrelates dimensions. SimCLR's InfoNCE has
a single term whose floor is set by the batch size.
'''),
    code(r'''from embedspace import metrics as metrics_lib


def history(name):
  records = {r["step"]: r for r in metrics_lib.read_jsonl(os.path.join(RUNS, name, "metrics.jsonl"))}
  steps = sorted(s for s in records if "loss" in records[s])
  return {k: (np.array(steps), np.array([records[s].get(k, np.nan) for s in steps]))
          for k in records[steps[-1]]}


hist = {name: history(name) for name in configs}
print("logged keys:", sorted(k for k in hist["vicreg"] if not k.startswith("eval/")))
fig, ax = plt.subplots(1, 3, figsize=(12, 3))
w = configs["vicreg"].loss
for term, weight in (("invariance", w.invariance_weight), ("variance", w.variance_weight),
                     ("covariance", w.covariance_weight)):
  ax[0].plot(*hist["vicreg"][f"loss/{term}"] * np.array([[1], [weight]]), label=f"{weight:g} x {term}")
ax[0].plot(*hist["vicreg"]["loss"], "k--", label="total"); ax[0].set(title="VICReg loss", xlabel="step", yscale="log"); ax[0].legend(fontsize=7)
ax[1].plot(*hist["simclr"]["loss"], color="C3"); ax[1].set(title="SimCLR InfoNCE", xlabel="step")
for name in configs:
  ax[2].plot(*hist[name]["learning_rate"], label=name)
ax[2].set(title="learning rate", xlabel="step"); ax[2].legend()
plt.tight_layout(); plt.show()'''),
    md(r'''
## Embedding health

Logged every `log_every` steps on the projector outputs of the global batch: the mean
per-dimension standard deviation of the unit vectors (collapse drives it to 0; a uniform spread
on the sphere has `1/sqrt(d)`), the effective rank (exp of the entropy of the normalised singular
values; how many dimensions are in use), alignment and uniformity (Wang & Isola 2020) and the
mean geodesic distance of positive (two views of one image) and negative pairs.
'''),
    code(r'''keys = ["health/embedding_std", "health/effective_rank", "health/alignment",
        "health/uniformity", "health/geodesic_positive", "health/geodesic_negative"]
fig, ax = plt.subplots(1, len(keys), figsize=(15, 2.8))
for axis, key in zip(ax, keys):
  for name in configs:
    axis.plot(*hist[name][key], label=name)
  axis.set(title=key.split("/")[1], xlabel="step")
ax[0].legend()
plt.tight_layout(); plt.show()
for name, c in configs.items():
  h = hist[name]
  print(f"{name}: projector {c.model.projector_dims[-1]}-d, last logged effective rank "
        f"{h['health/effective_rank'][1][-1]:.1f}, uniform-sphere std would be "
        f"{1 / np.sqrt(c.model.projector_dims[-1]):.3f}, got {h['health/embedding_std'][1][-1]:.3f}")'''),
    md(r'''
TensorBoard reads the same scalars from each workdir's `tb/`: in Colab or Jupyter run
`%load_ext tensorboard` and `%tensorboard --logdir {RUNS}`.

## Evaluate

The report `train_and_evaluate` returns (also `WORKDIR/eval.json`): a weighted cosine kNN
(k=20) and an L2-regularised linear probe on the encoder, the kNN on the projector, and the same
on the baselines: raw pixels and the randomly initialised encoder.
'''),
    code(r'''rows = []
for name, r in reports.items():
  rows.append((f"{name} encoder", r["trained"]["encoder"]["knn_accuracy"], r["trained"]["encoder"].get("linear_probe_accuracy")))
  rows.append((f"{name} projector", r["trained"]["projector"]["knn_accuracy"], None))
  if "random_init" in r:
    rows.append((f"{name}: random-init encoder", r["random_init"]["encoder"]["knn_accuracy"], r["random_init"]["encoder"].get("linear_probe_accuracy")))
pixels = next(iter(reports.values())).get("raw_pixels")  # the same baseline in every run
if pixels:
  rows.append(("raw pixels", pixels["knn_accuracy"], pixels["linear_probe_accuracy"]))
print(f"{'space':32s} {'kNN':>7s} {'probe':>7s}")
for space, knn, probe in rows:
  print(f"{space:32s} {knn:7.4f} {'' if probe is None else f'{probe:7.4f}':>7s}")'''),
    md(r'''
## The eval split in two dimensions

The encoder features of the eval images of each run, projected on their first two principal
components (`report.pca_2d`), coloured by class. Classes the methods confuse (shirts, pullovers
and coats) overlap here too.
'''),
    code(r'''import embedspace
from embedspace import data, report

source, info = data.get_source("embedded_fashion_mnist", split="test")
n = min(len(source), 2000 if SIZE != "smoke" else 500)
images = np.stack([source[i]["image"] for i in range(n)])
labels = np.array([source[i]["label"] for i in range(n)])
fig, ax = plt.subplots(1, len(configs), figsize=(5 * len(configs), 4))
for axis, name in zip(ax, configs):
  xy = report.pca_2d(embedspace.load(os.path.join(RUNS, name)).embed(images))
  s = axis.scatter(xy[:, 0], xy[:, 1], c=labels, cmap="tab10", s=3)
  axis.set(title=f"{name}: encoder, PCA", xticks=[], yticks=[])
handles = [plt.Line2D([], [], ls="", marker="o", color=plt.cm.tab10(c / 9)) for c in range(10)]
ax[-1].legend(handles, info.class_names, fontsize=7, loc="center left", bbox_to_anchor=(1, 0.5))
plt.tight_layout(); plt.show()'''),
    md(r'''
## What it shows

In the committed run (`SIZE = "small"`: 150 steps of 128 pairs, a 64-d encoder):

- VICReg's three weighted terms move differently: the covariance term drops within the first
  20 steps (the random projector's dimensions start correlated), the invariance term falls
  steadily, and the variance hinge becomes the largest term: it rises as invariance pulls the
  two views together, and after 150 steps most dimensions' std is still below VICReg's target
  of 1.
- The health curves tell the two objectives apart. SimCLR spreads its unit vectors over the
  sphere: per-dimension std at the uniform value `1/sqrt(d)`, negatives near orthogonal
  (geodesic ~pi/2), the lowest uniformity. VICReg keeps negatives closer (~1.1 rad) and its
  effective rank falls during training. Neither collapses (that would show as a per-dimension
  std heading to 0 and an effective rank heading to 1).
- Both encoders beat the random encoder (kNN 0.70 against 0.57) but not yet raw pixels (0.82)
  after 150 steps; the README's default VICReg run (800 steps of 256 pairs, 128-d) reaches
  0.839 (`SIZE = "full"`).
'''),
]

# ------------------------------------------------------------------------------------------------
# 03: multimodal binding.

NB03 = header(r'''
# 03 · Binding modalities: CLIP, ImageBind, DeCUR

One embedding space for handwritten digits (MNIST), spoken digits (the Free Spoken Digit
Dataset) and captions ("the number 7"), all shipped with embedspace and paired by digit.
**CLIP** aligns images with text; **ImageBind** binds audio and text to images only, and the
question is whether audio and text, never paired in training, align anyway (emergent zero-shot
retrieval); **DeCUR** splits the embedding into dimensions common to two modalities and
dimensions unique to each.
''', r'''
# Trained workdirs to load instead of training here ("": train at SIZE).
CLIP_WORKDIR = os.environ.get("EMBEDSPACE_CLIP_WORKDIR", "")
IMAGEBIND_WORKDIR = os.environ.get("EMBEDSPACE_IMAGEBIND_WORKDIR", "")
DIRECT_WORKDIR = os.environ.get("EMBEDSPACE_IMAGEBIND_DIRECT_WORKDIR", "")  # configs/imagebind.py:direct
DECUR_WORKDIR = os.environ.get("EMBEDSPACE_DECUR_WORKDIR", "")''', "03_multimodal_binding.ipynb") + [
    md(r'''
## Runs

`get_run` loads a trained workdir with `embedspace.multimodal.train.load_workdir`, or trains the
config at `SIZE` with `embedspace.multimodal.train.train_and_evaluate` (the function behind
`python -m embedspace.main --config=configs/imagebind.py`). Either way it returns the config,
the model and its variables, and the notebook measures everything itself from embeddings of the
held-out items.
'''),
    code(r'''from configs import clip, decur, imagebind
from embedspace.multimodal import data as mm_data
from embedspace.multimodal import evaluate as mm_eval
from embedspace.multimodal import train as mm_train


def mm_config(module, variant=""):
  if SIZE == "smoke":
    return module.get_config(",".join(filter(None, [variant, "smoke"])))
  c = module.get_config(variant or None)
  if SIZE == "small":
    c.num_steps = 100 if c.loss.name == "decur" else 200
    c.batch_size = 64 if c.loss.name == "decur" else c.batch_size
    c.log_every, c.checkpoint_every = 10, c.num_steps
    c.optimizer.warmup_steps = 20
    c.eval.probe_steps = 150
    c.eval.plots = False
  return c


def get_run(name, module, variant="", workdir=""):
  if not workdir:
    workdir = os.path.join(RUNS, name)
    t0 = time.perf_counter()
    mm_train.train_and_evaluate(mm_config(module, variant), workdir)
    print(f"{name}: trained in {time.perf_counter() - t0:.0f} s")
  config, model, variables, step = mm_train.load_workdir(workdir)
  splits = mm_data.load_splits(num_samples=config.data.audio_samples, text_length=config.data.text_length)
  embed = mm_eval.make_embed_fn(model, variables)
  emb = mm_eval.embed_split(embed, splits["eval"], modalities=tuple(model.modalities), batch_size=250)
  print(f"{name}: {workdir}, step {step} of {config.num_steps}, {config.batch_size} pairs per "
        f"pair type, pairs {config.pairs}, loss {config.loss.name}")
  return {"config": config, "workdir": workdir, "embed": embed, "emb": emb, "split": splits["eval"],
          "train": splits["train"]}


def labels_of(run, modality):
  s = run["split"]
  return {"image": s.image_label, "audio": s.audio_label, "text": s.text_label}[modality]'''),
    md(r'''
## The data

Eval items only from here on: 2,000 MNIST images, the 300 FSDD test clips (recordings 0-4 of
each speaker and digit) and 40 captions from four templates that training never uses.
'''),
    code(r'''splits = mm_data.load_splits(num_samples=6000, text_length=10)
ev = splits["eval"]
print(f"train: {len(splits['train'].image)} images, {len(splits['train'].audio)} clips, "
      f"{len(splits['train'].captions)} captions; eval: {len(ev.image)} images, {len(ev.audio)} clips, "
      f"{len(ev.captions)} captions")
print("held-out captions of 7:", [c for c, y in zip(ev.captions, ev.text_label) if y == 7])
from embedspace.multimodal import audio as mm_audio
fig, ax = plt.subplots(1, 4, figsize=(11, 2.2), gridspec_kw={"width_ratios": [1, 3, 3, 3]})
ax[0].imshow(ev.image_raw[np.flatnonzero(ev.image_label == 7)[0], ..., 0], cmap="gray"); ax[0].set_title("image: 7")
sevens = np.flatnonzero(ev.audio_label == 7)
first_per_speaker = sevens[np.unique(ev.audio_speaker[sevens], return_index=True)[1]]
for axis, i in zip(ax[1:], first_per_speaker):  # one clip of "seven" from each of 3 speakers
  mel = np.asarray(mm_audio.log_mel(ev.audio[i:i + 1]))[0]  # [frames, mels]
  axis.imshow(mel.T, origin="lower", aspect="auto")
  axis.set_title(f"'seven' by {mm_data.SPEAKERS[ev.audio_speaker[i]]} (log-mel)")
for axis in ax:
  axis.set_xticks([]); axis.set_yticks([])
plt.tight_layout(); plt.show()'''),
    md(r'''
## CLIP: images and text

Zero-shot classification (Radford et al. 2021): each digit's prototype is the normalised mean of
the embeddings of its held-out captions; an image takes the digit of the closest prototype. The
learned logit scale (init 1/0.07) is the inverse temperature of the contrastive softmax.
'''),
    code(r'''runs = {"clip": get_run("clip", clip, workdir=CLIP_WORKDIR)}
r = runs["clip"]
protos = mm_eval.prototypes(r["emb"]["text"], labels_of(r, "text"))
acc = mm_eval.zero_shot_accuracy(r["emb"]["image"], labels_of(r, "image"), protos)
row = mm_eval.retrieval_row(r["emb"]["image"], labels_of(r, "image"), r["emb"]["text"], labels_of(r, "text"))
print(f"zero-shot accuracy on {len(labels_of(r, 'image'))} eval images: {acc:.4f} (chance 0.10)")
print(f"image->text R@1 {row['recall@1']:.3f} (chance {row['chance_recall@1']:.3f}), mAP {row['map']:.3f}")
hist = {x["step"]: x for x in map(json.loads, open(os.path.join(r["workdir"], "metrics.jsonl")))}
steps = sorted(s for s in hist if "loss" in hist[s])
fig, ax = plt.subplots(1, 3, figsize=(11, 2.8))
ax[0].plot(steps, [hist[s]["loss"] for s in steps]); ax[0].set(title="CLIP loss", xlabel="step")
scale_key = next(k for k in hist[steps[-1]] if k.endswith("logit_scale/image-text"))  # older runs: "loss/logit_scale/..."
ax[1].plot(steps, [hist[s][scale_key] for s in steps]); ax[1].set(title="exp(logit scale), capped at 100", xlabel="step")
sims = mm_eval.unit(r["emb"]["image"][:8]) @ protos.T
ax[2].imshow(sims, cmap="viridis"); ax[2].set(title="8 eval images vs digit prototypes", xlabel="digit",
                                             ylabel="image (true digit)", xticks=range(10),
                                             yticks=range(8), yticklabels=labels_of(r, "image")[:8])
plt.tight_layout(); plt.show()'''),
    md(r'''
## ImageBind: emergent audio <-> text

`configs/imagebind.py` trains image-audio and image-text pairs, each with its own batch, never
audio with text. `configs/imagebind.py:direct` trains the same encoders on audio-text pairs: the
upper bound. The question of Girdhar et al. (2023, Sec. 5.2): does audio-text retrieval
*emerge* through the shared image anchor?
'''),
    code(r'''runs["imagebind"] = get_run("imagebind", imagebind, workdir=IMAGEBIND_WORKDIR)
runs["direct"] = get_run("imagebind_direct", imagebind, "direct", workdir=DIRECT_WORKDIR)
table = {}
for name in ("imagebind", "direct"):
  r = runs[name]
  protos = mm_eval.prototypes(r["emb"]["text"], labels_of(r, "text"))
  table[name] = {"audio zero-shot": mm_eval.zero_shot_accuracy(r["emb"]["audio"], labels_of(r, "audio"), protos)}
  for a, b in (("audio", "text"), ("text", "audio")):
    row = mm_eval.retrieval_row(r["emb"][a], labels_of(r, a), r["emb"][b], labels_of(r, b))
    table[name].update({f"{a}->{b} R@1": row["recall@1"], f"{a}->{b} R@5": row["recall@5"], f"{a}->{b} mAP": row["map"]})
    table.setdefault("chance", {}).update({f"{a}->{b} R@1": row["chance_recall@1"], f"{a}->{b} R@5": row["chance_recall@5"],
                                           f"{a}->{b} mAP": row["chance_map"], "audio zero-shot": 0.1})
print(f"{'':18s} {'chance':>8s} {'ImageBind (emergent)':>22s} {'direct (trained on audio-text)':>32s}")
for key in table["imagebind"]:
  print(f"{key:18s} {table['chance'][key]:8.3f} {table['imagebind'][key]:22.3f} {table['direct'][key]:32.3f}")'''),
    code(r'''fig, ax = plt.subplots(1, 3, figsize=(12, 3.4))
for axis, name in zip(ax, ("imagebind", "direct")):
  r = runs[name]
  sim = mm_eval.class_similarity(r["emb"]["audio"], labels_of(r, "audio"), r["emb"]["text"], labels_of(r, "text"))
  im = axis.imshow(sim, cmap="viridis")
  axis.set(title=f"{name}: mean cosine, audio vs text", xlabel="text digit", ylabel="audio digit", xticks=range(10), yticks=range(10))
  fig.colorbar(im, ax=axis, fraction=0.046)
h = {x["step"]: x for x in map(json.loads, open(os.path.join(runs["imagebind"]["workdir"], "metrics.jsonl")))}
steps = sorted(s for s in h if "loss" in h[s])
for pair in ("image-audio", "image-text"):
  ax[2].plot(steps, [h[s][f"loss/{pair}"] for s in steps], label=pair)
ax[2].set(title="ImageBind: the two trained losses", xlabel="step"); ax[2].legend()
plt.tight_layout(); plt.show()'''),
    md(r'''
A held-out caption as a query against the 300 test clips, in the ImageBind space: no loss ever
compared a caption with a clip.
'''),
    code(r'''r = runs["imagebind"]
ev = r["split"]
a_unit, t_unit = mm_eval.unit(r["emb"]["audio"]), mm_eval.unit(r["emb"]["text"])
for q in (i for i, c in enumerate(ev.captions) if c in ("a recording of the digit seven", "the number 3")):
  top = np.argsort(-(a_unit @ t_unit[q]))[:5]
  print(f"{ev.captions[q]!r} -> clips of digits {ev.audio_label[top].tolist()} "
        f"(speakers {[mm_data.SPEAKERS[s] for s in ev.audio_speaker[top]]})")'''),
    md(r'''
## DeCUR: common and unique dimensions

DeCUR (Wang et al. 2023) trains two augmented views of an image and of a clip of the same digit:
within each modality a Barlow Twins loss on all dimensions, across modalities the first
`num_common` dimensions are pulled to identity cross-correlation and the rest (unique) to zero.
Below, the cross-modal correlation of the eval embeddings (image vs clip of the same digit) and
linear probes of the digit and of the speaker on each part.
'''),
    code(r'''runs["decur"] = get_run("decur", decur, workdir=DECUR_WORKDIR)
r = runs["decur"]
k = r["config"].loss.num_common
rng = np.random.default_rng(0)
img_y, aud_y = labels_of(r, "image"), labels_of(r, "audio")
i = rng.integers(0, len(img_y), 2000)
j = np.array([rng.choice(np.flatnonzero(aud_y == y)) for y in img_y[i]])  # a clip of the same digit
za, zb = r["emb"]["image"][i], r["emb"]["audio"][j]
std = lambda z: (z - z.mean(0)) / (z.std(0) + 1e-6)
corr = std(za).T @ std(zb) / len(i)
d = np.diag(corr)
print(f"{k} common + {corr.shape[0] - k} unique dims; mean cross-modal diagonal correlation: "
      f"common {d[:k].mean():.3f}, unique {d[k:].mean():.3f}")
fig, ax = plt.subplots(1, 2, figsize=(9, 3.4))
im = ax[0].imshow(corr, cmap="RdBu_r", vmin=-1, vmax=1); ax[0].axvline(k - 0.5, c="k", lw=0.5); ax[0].axhline(k - 0.5, c="k", lw=0.5)
ax[0].set(title="image x audio cross-correlation", xlabel="audio dim", ylabel="image dim"); fig.colorbar(im, ax=ax[0], fraction=0.046)
ax[1].plot(d, ".", ms=3); ax[1].axvline(k - 0.5, c="k", lw=0.5); ax[1].set(title="its diagonal", xlabel="dim", ylim=(-1, 1))
plt.tight_layout(); plt.show()'''),
    code(r'''from embedspace import probes

tr = r["train"]
steps = r["config"].eval.probe_steps
train_emb = mm_eval.embed_split(r["embed"], tr, modalities=("image", "audio"), batch_size=250)
sub = np.random.default_rng(0).permutation(len(tr.image_label))[:{"smoke": 400}.get(SIZE, 4000)]
parts = {"common": slice(0, k), "unique": slice(k, None), "all": slice(None)}
tasks = [("image", "digit", train_emb["image"][sub], tr.image_label[sub], r["emb"]["image"], img_y, 10),
         ("audio", "digit", train_emb["audio"], tr.audio_label, r["emb"]["audio"], aud_y, 10),
         ("audio", "speaker", train_emb["audio"], tr.audio_speaker, r["emb"]["audio"], r["split"].audio_speaker, len(mm_data.SPEAKERS))]
print(f"{'probe':16s} " + " ".join(f"{p:>8s}" for p in parts) + "   chance")
for m, task, xtr, ytr, xte, yte, c in tasks:
  accs = [probes.linear_probe(xtr[:, p], ytr, xte[:, p], yte, num_classes=c, steps=steps)["accuracy"] for p in parts.values()]
  print(f"{m + ' ' + task:16s} " + " ".join(f"{float(a):8.3f}" for a in accs) + f"   {1 / c:.3f}")'''),
    md(r'''
## What it shows

In the committed run, CLIP, ImageBind and ImageBind `:direct` are the default runs (600 steps
of 128 pairs per trained pair, loaded from `/tmp/mm`); DeCUR was trained here at
`SIZE = "small"` (100 steps of 64 pairs).

- CLIP's image-text space classifies 94.95% of the held-out images zero-shot from captions it
  never saw (chance 10%).
- ImageBind's audio and text, never paired, retrieve each other as well as the model trained on
  audio-text pairs directly (audio->text R@1 0.990 against 0.987; audio zero-shot 0.987 against
  0.983). On this data that is also the least one should expect: pairs are made by digit, so
  any two modalities bound to the same image classes are aligned; the benchmark cannot separate
  emergence from class supervision.
- DeCUR's split is forming after 100 steps: the common dimensions correlate across modalities
  (mean diagonal 0.20) and the unique ones do not (~0). The run is short: the image side is weak
  (digit probe 0.50), and speaker identity is still decodable from the common dims as well as
  from the unique ones, so the unique dims do not yet isolate what only the audio carries.
'''),
]

NOTEBOOKS = {
    "01": ("01_distance_measures.ipynb", NB01),
    "02": ("02_train_vicreg_simclr.ipynb", NB02),
    "03": ("03_multimodal_binding.ipynb", NB03),
}


def notebook(cells: list[nbformat.NotebookNode]) -> nbformat.NotebookNode:
  nb = nbformat.v4.new_notebook(cells=cells)
  nb.metadata = {
      "kernelspec": {"display_name": "Python 3", "language": "python", "name": "python3"},
      "language_info": {"name": "python"},
      "accelerator": "TPU",  # Colab: the notebook asks for a TPU runtime (any runtime works).
      "colab": {"provenance": []},
  }
  return nb


_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")


def _as_terminal(text: str) -> str:
  """What a terminal shows of `text`: per line, the part after the last carriage return."""
  lines = (_ANSI.sub("", line).rsplit("\r", 1)[-1] for line in text.split("\n"))
  return "\n".join(line for line in lines if line.strip() or not line)


def clean_outputs(nb: nbformat.NotebookNode) -> None:
  """Progress bars as a terminal leaves them (consecutive stream outputs merged, carriage
  returns and cursor moves resolved), and no execution timing metadata."""
  for cell in nb.cells:
    cell.metadata.pop("execution", None)
    if cell.cell_type != "code":
      continue
    merged = []
    for out in cell.outputs:
      if (out.get("output_type") == "stream" and merged
          and merged[-1].get("output_type") == "stream" and merged[-1]["name"] == out["name"]):
        merged[-1]["text"] += out["text"]
      else:
        merged.append(out)
    for out in merged:
      if out.get("output_type") == "stream":
        out["text"] = re.sub(r"\n{3,}", "\n\n", _as_terminal(out["text"]))
    cell.outputs = merged


def execute(nb: nbformat.NotebookNode, *, cwd: str, timeout: int = 1800,
            env: dict[str, str] | None = None) -> None:
  """Runs every cell of `nb` in one fresh kernel started in `cwd`; raises on the first error."""
  from nbclient import NotebookClient
  saved = dict(os.environ)
  os.environ.update(env or {})
  try:
    NotebookClient(nb, timeout=timeout, kernel_name="python3",
                   resources={"metadata": {"path": cwd}}).execute()
  finally:
    os.environ.clear()
    os.environ.update(saved)


def refresh_markdown(path: str, cells: list[nbformat.NotebookNode]) -> nbformat.NotebookNode:
  """The executed notebook at `path` with its Markdown cells replaced by `cells`' Markdown.

  Raises:
    ValueError: if a code cell differs from `cells` (the outputs would not be its outputs).
  """
  nb = nbformat.read(path, as_version=4)
  kinds = lambda cs: [c.cell_type for c in cs]  # noqa: E731
  if kinds(nb.cells) != kinds(cells) or any(
      a.source != b.source for a, b in zip(nb.cells, cells) if a.cell_type == "code"):
    raise ValueError(f"{path}: code cells changed since it was executed; run --execute")
  for old, new in zip(nb.cells, cells):
    if old.cell_type == "markdown":
      old.source = new.source
  return nb


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("which", nargs="*", default=sorted(NOTEBOOKS), help="01, 02, 03")
  parser.add_argument("--execute", action="store_true", help="run and save outputs")
  parser.add_argument("--markdown", action="store_true",
                      help="only update the Markdown cells of the executed notebooks")
  args = parser.parse_args()
  for key in args.which:
    filename, cells = NOTEBOOKS[key]
    nb = notebook(cells)
    path = os.path.join(HERE, filename)
    if args.markdown:
      nb = refresh_markdown(path, cells)
    elif args.execute:
      t0 = time.perf_counter()
      try:
        execute(nb, cwd=HERE)
      except Exception:
        failed = os.path.join(tempfile.gettempdir(), filename.replace(".ipynb", ".failed.ipynb"))
        nbformat.write(nb, failed)
        print(f"{filename} failed; the notebook so far is in {failed}", flush=True)
        raise
      clean_outputs(nb)
      print(f"{filename}: executed in {time.perf_counter() - t0:.0f} s", flush=True)
    nbformat.validate(nb)
    nbformat.write(nb, path)
    print(f"wrote {path} ({os.path.getsize(path) / 1e3:.0f} kB)", flush=True)


if __name__ == "__main__":
  sys.exit(main())
