"""Notebook 01: the distance measures of the founding note on a trained model."""

from __future__ import annotations

from cells_common import SSL_SIZES, code, header, md

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
`embedspace.methods.train_and_evaluate`, the function behind `python -m embedspace.main`.
'''),
    code(SSL_SIZES + r'''


import embedspace
from configs import vicreg
from embedspace import methods

if not WORKDIR:
  WORKDIR = os.path.join(RUNS, "vicreg")
  t0 = time.perf_counter()
  methods.train_and_evaluate(ssl_config(vicreg), WORKDIR)
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
    code(r'''from embedspace.measure import retrieval

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
    code(r'''from embedspace.measure import ood

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
