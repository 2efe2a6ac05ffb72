"""Evaluation primitives: embed a dataset, then score its embedding space by kNN and linear probes.

These are the two monitors of self-supervised papers. The weighted kNN classifier of Wu et al.
(2018), "Unsupervised Feature Learning via Non-Parametric Instance Discrimination", as used by
DINO (Caron et al. 2021), needs no training and is cheap enough to run every few epochs; its
neighbours come from `geometry.top_k`, which scans the training set in blocks, and the queries
are processed in blocks too, so memory stays `O(query_block * key_block)` and no `[N, N]` matrix
is ever formed. The linear probe (multinomial logistic regression on frozen, standardised
features, e.g. SimCLR Sec. B.6) is fitted full-batch with L-BFGS, its L2 strength chosen on a
held-out slice of the training set, as in the linear evaluation of the SimCLR and VICReg papers.

`embed` runs the model's forward pass over an iterable of fixed-size, padded batches with the
same `jax.jit(jax.shard_map(...))` path as training (see `parallel`), and returns numpy arrays
with the padding rows dropped.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.experimental import multihost_utils
from jax.sharding import Mesh, PartitionSpec as P

from embedspace import geometry, parallel

ApplyFn = Callable[[Any, jax.Array], tuple[jax.Array, jax.Array]]


# ----------------------------------------------------------------------------------------------
# Embedding a dataset.


def _to_numpy(x: jax.Array) -> np.ndarray:
  """The whole global array on this host (gathered from the other processes when there are any)."""
  if jax.process_count() == 1:
    return np.asarray(x)
  return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def embed(apply_fn: ApplyFn, variables: Any, batches: Iterable[Mapping[str, np.ndarray]], *,
          mesh: Mesh) -> dict[str, np.ndarray]:
  """Features, embeddings and labels of every real (unmasked) example of `batches`.

  Args:
    apply_fn: `apply_fn(variables, images) -> (features [b, F], embeddings [b, E])` for one
      device's slice of a batch, in inference mode; e.g.
      `functools.partial(model.apply, train=False)` for an `EmbeddingModel`. It may use
      collectives over `parallel.AXIS`, but in inference mode it usually has none.
    variables: the model variables (`{'params': ..., 'batch_stats': ...}`), replicated here.
    batches: iterable of dicts with 'image' `[B, ...]`, 'label' `[B]` and optionally 'mask'
      `[B]` (nonzero for real rows, 0 for padding; default all real). Each is this process's
      slice of a global batch; `B` must be divisible by the number of local devices. Keep `B`
      fixed (pad the last batch): every new `B` compiles the forward again.
    mesh: the data-parallel mesh (`parallel.make_mesh()`).

  Returns:
    dict with 'features' float32 `[N, F]`, 'embeddings' float32 `[N, E]` and 'labels' `[N]`,
    numpy arrays in the order of `batches`, N = number of unmasked rows over all batches (of all
    processes).

  Raises:
    ValueError: if `batches` is empty, a batch lacks 'image' or 'label', its arrays disagree on
      the batch size, or the batch size is not divisible by the device count.
  """
  forward = jax.jit(parallel.sharded(
      apply_fn, mesh, in_specs=(P(), P(parallel.AXIS)), out_specs=P(parallel.AXIS)))
  variables = parallel.replicate(mesh, variables)
  n_local = len(mesh.local_devices)

  outputs = []
  for i, batch in enumerate(batches):
    missing = {"image", "label"} - set(batch)
    if missing:
      raise ValueError(f"batch {i} lacks {sorted(missing)}; got keys {sorted(batch)}.")
    size = np.shape(batch["image"])[0]
    mask = batch.get("mask")
    mask = np.ones((size,), bool) if mask is None else np.asarray(mask).astype(bool)
    if np.shape(batch["label"])[:1] != (size,) or mask.shape != (size,):
      raise ValueError(
          f"batch {i}: 'image', 'label' and 'mask' must share the batch size; got shapes "
          f"{np.shape(batch['image'])}, {np.shape(batch['label'])}, {mask.shape}.")
    if size % n_local:
      raise ValueError(
          f"batch {i} has {size} rows, not divisible by the {n_local} local devices "
          f"({mesh.devices.size} in all); use an evaluation batch size that is a multiple of the "
          f"device count and pad the last batch with mask=0 rows.")
    placed = parallel.shard_batch(
        mesh, {"image": batch["image"], "label": np.asarray(batch["label"]), "mask": mask})
    out = forward(variables, placed["image"])
    if not (isinstance(out, tuple) and len(out) == 2):
      raise ValueError(f"apply_fn must return (features, embeddings); got {type(out).__name__}.")
    outputs.append((out[0], out[1], placed["label"], placed["mask"]))  # dispatched, not waited on

  if not outputs:
    raise ValueError("embed got no batches.")
  features, embeddings, labels, masks = (
      np.concatenate([_to_numpy(o[j]) for o in outputs]) for j in range(4))
  return {"features": features[masks].astype(np.float32),
          "embeddings": embeddings[masks].astype(np.float32),
          "labels": labels[masks]}


# ----------------------------------------------------------------------------------------------
# Weighted k-nearest-neighbour classification.


def _check_split(x: np.ndarray, y: np.ndarray, name: str, num_classes: int) -> None:
  if x.ndim != 2 or y.shape != x.shape[:1]:
    raise ValueError(
        f"{name}_x must be [n, dim] and {name}_y [n]; got shapes {x.shape} and {y.shape}.")
  if not np.issubdtype(y.dtype, np.integer):
    raise ValueError(f"{name}_y must hold integer class ids; got dtype {y.dtype}.")
  if y.size and (y.min() < 0 or y.max() >= num_classes):
    raise ValueError(
        f"{name}_y must lie in [0, num_classes={num_classes}); got range [{y.min()}, {y.max()}].")


@functools.partial(jax.jit, static_argnames=("metric", "k", "weighted", "num_classes", "key_block"))
def _knn_block(queries: jax.Array, keys: jax.Array, key_labels: jax.Array,
               temperature: jax.Array, *, metric: str, k: int, weighted: bool, num_classes: int,
               key_block: int) -> jax.Array:
  """Class votes of one block of queries: [q, d] -> [q, num_classes]."""
  values, indices = geometry.top_k(queries, keys, metric=metric, k=k, block_size=key_block)
  closeness = values if geometry.is_similarity(metric) else -values
  if weighted:
    # Shifting by the closest neighbour's value scales a query's weights by one constant (same
    # vote) and keeps exp() finite for distances of any scale.
    weights = jnp.exp((closeness - closeness[:, :1]) / temperature)
  else:
    weights = jnp.ones_like(closeness)
  onehot = jax.nn.one_hot(key_labels[indices], num_classes, dtype=weights.dtype)
  return jnp.einsum("qk,qkc->qc", weights, onehot)


def knn_predict(train_x: np.ndarray, train_y: np.ndarray, test_x: np.ndarray, *, num_classes: int,
                k: int = 20, metric: str = "cosine", temperature: float = 0.07,
                weighted: bool = True, query_block: int = 1024,
                key_block: int = 4096) -> np.ndarray:
  """Weighted kNN votes: the predicted class of every test point (see `knn_classify`).

  Args and Raises: as `knn_classify` (without the test labels).

  Returns:
    int32 `[M]` predicted classes.
  """
  train_x, train_y, test_x = np.asarray(train_x), np.asarray(train_y), np.asarray(test_x)
  _check_split(train_x, train_y, "train", num_classes)
  if test_x.ndim != 2 or test_x.shape[1] != train_x.shape[1]:
    raise ValueError(
        f"test_x must be [m, {train_x.shape[1]}] like train_x; got shape {test_x.shape}.")
  if not 1 <= k <= len(train_x):
    raise ValueError(f"k must be in [1, number of training points = {len(train_x)}]; got {k}.")
  if weighted and not temperature > 0:
    raise ValueError(f"temperature must be > 0; got {temperature}.")
  if query_block < 1 or key_block < 1:
    raise ValueError(f"query_block and key_block must be >= 1; got {query_block}, {key_block}.")
  geometry.is_similarity(metric)  # raises on an unknown metric

  keys = jnp.asarray(train_x, jnp.float32)
  key_labels = jnp.asarray(train_y, jnp.int32)
  block = min(query_block, len(test_x))
  preds = []
  for start in range(0, len(test_x), block):
    q = test_x[start:start + block]
    n = len(q)
    if n < block:  # pad the last block so that every block reuses one compiled program
      q = np.concatenate([q, np.zeros((block - n, q.shape[1]), q.dtype)])
    votes = _knn_block(
        jnp.asarray(q, jnp.float32), keys, key_labels, jnp.float32(temperature), metric=metric,
        k=k, weighted=weighted, num_classes=num_classes, key_block=key_block)
    preds.append(jnp.argmax(votes[:n], axis=-1))
  if not preds:
    return np.zeros((0,), np.int32)
  return np.concatenate([np.asarray(p) for p in preds]).astype(np.int32)


def knn_classify(train_x: np.ndarray, train_y: np.ndarray, test_x: np.ndarray,
                 test_y: np.ndarray, *, num_classes: int, k: int = 20, metric: str = "cosine",
                 temperature: float = 0.07, weighted: bool = True, query_block: int = 1024,
                 key_block: int = 4096) -> float:
  """Accuracy of the weighted kNN classifier (Wu et al. 2018; DINO's `eval_knn.py`).

  Each test point takes its `k` nearest training points under `metric` (`geometry.top_k`) and
  predicts `argmax_c sum_{j in kNN} w_j [y_j = c]`, where
    w_j = exp(s_j / T)   for similarities s (cosine, negative_arc_length), and
    w_j = exp(-d_j / T)  for distances d (euclidean, sqeuclidean, ...),
  or w_j = 1 with `weighted=False` (majority vote). The defaults k=20, T=0.07 with cosine are
  DINO's. For a distance, T is in the distance's units: on unit-norm features,
  sqeuclidean = 2 - 2 cos, so sqeuclidean with T = 0.14 is exactly cosine with T = 0.07;
  scale T with the typical distance otherwise. Ties of class scores go to the lower class id,
  ties of distances to the lower training index.

  Memory: queries in blocks of `query_block`, keys in blocks of `key_block`; the largest
  intermediate is `[query_block, key_block + k]`.

  Args:
    train_x: `[N, d]` features of the labelled set searched.
    train_y: `[N]` int class ids in `[0, num_classes)`.
    test_x: `[M, d]` query features.
    test_y: `[M]` int class ids.
    num_classes: number of classes C.
    k: neighbours per query, `1 <= k <= N`.
    metric: a name from `geometry.METRICS` other than "mahalanobis".
    temperature: T > 0 (unused when `weighted=False`).
    weighted: weight the votes (True) or count them.
    query_block: test points per step.
    key_block: training points per step of `geometry.top_k`.

  Returns:
    Fraction of test points whose predicted class is `test_y`.

  Raises:
    ValueError: on mismatched shapes, an empty test set, labels outside `[0, num_classes)`,
      k outside [1, N], T <= 0, non-positive block sizes or an unknown metric.
  """
  test_y = np.asarray(test_y)
  _check_split(np.asarray(test_x), test_y, "test", num_classes)
  if not len(test_y):
    raise ValueError("knn_classify got an empty test set.")
  preds = knn_predict(train_x, train_y, test_x, num_classes=num_classes, k=k, metric=metric,
                      temperature=temperature, weighted=weighted, query_block=query_block,
                      key_block=key_block)
  return float(np.mean(preds == test_y)) if len(test_y) else 0.0


# ----------------------------------------------------------------------------------------------
# Linear probe.


@functools.partial(jax.jit, static_argnames=("num_classes", "max_steps"))
def _fit_logistic(x: jax.Array, y: jax.Array, weight: jax.Array, l2: jax.Array, *,
                  num_classes: int, max_steps: int, tol: jax.Array) -> tuple[Any, jax.Array]:
  """L-BFGS fit of weighted, L2-regularised softmax regression on standardised features.

  The mean and standard deviation of the features are those of the rows with weight 1, so the
  held-out rows (weight 0) leak nothing into the fit. Returns ((mean, std, W, b), iterations).
  """
  total = jnp.sum(weight)
  mean = jnp.sum(weight[:, None] * x, axis=0) / total
  var = jnp.sum(weight[:, None] * (x - mean) ** 2, axis=0) / total
  std = jnp.sqrt(var + 1e-8)
  z = (x - mean) / std
  onehot = jax.nn.one_hot(y, num_classes, dtype=x.dtype)

  def loss(params):
    w, b = params
    logits = z @ w + b
    nll = -jnp.sum(onehot * jax.nn.log_softmax(logits), axis=-1)
    return jnp.sum(weight * nll) / total + 0.5 * l2 * jnp.sum(w * w)

  params = (jnp.zeros((x.shape[1], num_classes), x.dtype), jnp.zeros((num_classes,), x.dtype))
  solver = optax.lbfgs()
  value_and_grad = optax.value_and_grad_from_state(loss)

  def step(carry):
    params, state = carry
    value, grad = value_and_grad(params, state=state)
    updates, state = solver.update(grad, state, params, value=value, grad=grad, value_fn=loss)
    return optax.apply_updates(params, updates), state

  def keep_going(carry):
    _, state = carry
    count = optax.tree.get(state, "count")
    grad_norm = optax.tree.norm(optax.tree.get(state, "grad"))
    return (count == 0) | ((count < max_steps) & (grad_norm >= tol))

  params, state = jax.lax.while_loop(keep_going, step, (params, solver.init(params)))
  return (mean, std, *params), optax.tree.get(state, "count")


@jax.jit
def _accuracy(probe: Any, x: jax.Array, y: jax.Array) -> jax.Array:
  mean, std, w, b = probe
  return jnp.mean(jnp.argmax(((x - mean) / std) @ w + b, axis=-1) == y)


def linear_probe(train_x: np.ndarray, train_y: np.ndarray, test_x: np.ndarray,
                 test_y: np.ndarray, *, num_classes: int,
                 l2_grid: Sequence[float] = (1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1, 1.0),
                 val_fraction: float = 0.2, steps: int = 500, tol: float = 1e-5,
                 seed: int = 0) -> dict[str, Any]:
  """Test accuracy of an L2-regularised multinomial logistic regression on frozen features.

  Features are standardised with the training statistics, `z = (x - mean) / std`, and the probe
  minimises, full batch,
    L(W, b) = 1/n sum_i -log softmax(W^T z_i + b)_{y_i} + l2/2 ||W||_F^2
  with L-BFGS (`optax.lbfgs`, zoom line search) until the gradient norm falls below `tol` or
  after `steps` iterations. `l2` is chosen from `l2_grid` by accuracy on a random `val_fraction`
  of the training set (the probe being fitted on the rest; ties go to the stronger
  regularisation); the probe is then refitted on the whole training set and scored on the test
  set. One compiled program serves every fit (held-out rows get weight 0 instead of being cut),
  so the cost is `(len(l2_grid) + 1)` L-BFGS runs of `O(steps * n * d * C)`; 8k x 512 features
  with 10 classes take a few seconds on 2 CPU cores.

  Args:
    train_x: `[N, d]` features (any float dtype; fitted in float32).
    train_y: `[N]` int class ids in `[0, num_classes)`.
    test_x: `[M, d]` features.
    test_y: `[M]` int class ids.
    num_classes: C.
    l2_grid: candidate regularisation strengths (> 0 keeps the problem strongly convex).
    val_fraction: share of the training set held out to choose `l2`, in (0, 1).
    steps: maximum L-BFGS iterations per fit.
    tol: gradient-norm tolerance that ends a fit early.
    seed: of the random validation split.

  Returns:
    dict with 'accuracy' (test, float), 'best_l2', 'val_accuracy' (at best_l2),
    'val_accuracies' ({l2: accuracy}), 'train_accuracy' (of the refitted probe) and
    'iterations' (L-BFGS iterations of the refit; `steps` means it hit the cap).

  Raises:
    ValueError: on mismatched shapes, an empty test set, labels outside `[0, num_classes)`, an
      empty grid, negative l2 or a split that leaves no row on either side.
  """
  train_x, train_y = np.asarray(train_x, np.float32), np.asarray(train_y)
  test_x, test_y = np.asarray(test_x, np.float32), np.asarray(test_y)
  _check_split(train_x, train_y, "train", num_classes)
  _check_split(test_x, test_y, "test", num_classes)
  if test_x.shape[1] != train_x.shape[1]:
    raise ValueError(f"train_x and test_x differ in dim: {train_x.shape} vs {test_x.shape}.")
  if not len(test_x):
    raise ValueError("linear_probe got an empty test set.")
  if not l2_grid or min(l2_grid) < 0:
    raise ValueError(f"l2_grid must be a non-empty sequence of values >= 0; got {l2_grid}.")
  n = len(train_x)
  n_val = int(round(val_fraction * n))
  if not 0 < n_val < n:
    raise ValueError(
        f"val_fraction={val_fraction} of {n} training rows leaves no row for validation or for "
        f"fitting.")

  x, y = jnp.asarray(train_x), jnp.asarray(train_y, jnp.int32)
  val_rows = np.random.default_rng(seed).permutation(n)[:n_val]
  fit_weight = np.ones((n,), np.float32)
  fit_weight[val_rows] = 0.0
  x_val, y_val = x[val_rows], y[val_rows]
  fit = functools.partial(_fit_logistic, num_classes=num_classes, max_steps=steps,
                          tol=jnp.float32(tol))

  val_accuracies = {}
  for l2 in sorted(l2_grid, reverse=True):
    probe, _ = fit(x, y, jnp.asarray(fit_weight), jnp.float32(l2))
    val_accuracies[float(l2)] = float(_accuracy(probe, x_val, y_val))
  best_l2 = max(val_accuracies, key=val_accuracies.get)  # first maximum: the largest l2

  probe, iterations = fit(x, y, jnp.ones((n,), jnp.float32), jnp.float32(best_l2))
  return {
      "accuracy": float(_accuracy(probe, jnp.asarray(test_x), jnp.asarray(test_y, jnp.int32))),
      "best_l2": best_l2,
      "val_accuracy": val_accuracies[best_l2],
      "val_accuracies": val_accuracies,
      "train_accuracy": float(_accuracy(probe, x, y)),
      "iterations": int(iterations),
  }


# ----------------------------------------------------------------------------------------------
# The evaluation of a training run: trained model beside its two baselines.


def _raw_pixels(loader: Iterable[Mapping[str, np.ndarray]]) -> dict[str, np.ndarray]:
  """Flattened normalised pixels and labels of every real row of `loader` (a baseline)."""
  images, labels = [], []
  for batch in loader:
    mask = np.asarray(batch["mask"]).astype(bool)
    images.append(np.asarray(batch["image"])[mask].reshape(int(mask.sum()), -1))
    labels.append(np.asarray(batch["label"])[mask])
  pixels = np.concatenate(images).astype(np.float32)
  return {"features": pixels, "labels": np.concatenate(labels)}


def _subsample(split: dict[str, np.ndarray], limit: int) -> dict[str, np.ndarray]:
  if not limit or len(split["labels"]) <= limit:
    return split
  return {k: v[:limit] for k, v in split.items()}


def _scores(train: dict[str, np.ndarray], test: dict[str, np.ndarray], key: str, *,
            num_classes: int, config: Any, probe: bool = True) -> dict[str, float]:
  knn = knn_classify(train[key], train["labels"], test[key], test["labels"],
                     num_classes=num_classes, k=config.eval.knn_k,
                     temperature=config.eval.knn_temperature, metric="cosine")
  scores = {"knn_accuracy": float(knn)}
  if probe:
    fit = linear_probe(train[key], train["labels"], test[key], test["labels"],
                       num_classes=num_classes)
    scores.update(linear_probe_accuracy=float(fit["accuracy"]),
                  linear_probe_l2=float(fit["best_l2"]))
  return scores


def evaluate_run(config: Any, model: Any, variables: Any, mesh: Mesh, *,
                 init_variables: Any | None = None, knn_only: bool = False) -> dict[str, Any]:
  """kNN (k=`config.eval.knn_k`, cosine, weighted) and linear-probe accuracy on the eval split.

  Embeds `config.data.train_split` (the kNN keys and probe training set, at most
  `config.eval.max_train_examples` of it) and `config.data.eval_split` with the model in
  inference mode, and scores the encoder features and the projector embeddings. With
  `config.eval.baselines`, raw pixels and the model at `init_variables` (the randomly initialised
  encoder) are measured the same way. `knn_only` gives just the trained encoder's kNN accuracy,
  the cheap monitor run every `config.eval_every` steps.

  Returns:
    `{"trained": {"encoder": scores, "projector": {"knn_accuracy"}}, "random_init":
    {"encoder": scores}, "raw_pixels": scores, "num_train": int, "num_eval": int}`, scores being
    `{"knn_accuracy", "linear_probe_accuracy", "linear_probe_l2"}`.
  """
  from embedspace import data as data_lib  # Only the end-of-run evaluation reads datasets.

  splits = {}
  for role, split in (("train", config.data.train_split), ("test", config.data.eval_split)):
    source, info = data_lib.get_source(config.data.name, split=split,
                                       data_dir=config.data.data_dir)
    splits[role] = data_lib.eval_loader(source, batch_size=config.eval.batch_size,
                                        image_size=config.data.image_size)
  num_classes = info.num_classes
  apply_fn = functools.partial(model.clone(bn_axis_name=None).apply, train=False)

  def embedded(variables):
    out = {role: embed(apply_fn, variables, loader, mesh=mesh) for role, loader in splits.items()}
    return _subsample(out["train"], config.eval.max_train_examples), out["test"]

  train, test = embedded(variables)
  if knn_only:
    return {"trained": {"encoder": _scores(train, test, "features", num_classes=num_classes,
                                           config=config, probe=False)}}
  report = {
      "trained": {"encoder": _scores(train, test, "features", num_classes=num_classes,
                                     config=config),
                  # kNN only: a probe on the wide projector output costs more than the
                  # rest of the evaluation together, and the encoder is what transfers.
                  "projector": _scores(train, test, "embeddings", num_classes=num_classes,
                                       config=config, probe=False)},
      "num_train": int(len(train["labels"])), "num_eval": int(len(test["labels"])),
  }
  if config.eval.baselines:
    if init_variables is not None:
      train0, test0 = embedded(init_variables)
      report["random_init"] = {"encoder": _scores(train0, test0, "features",
                                                  num_classes=num_classes, config=config)}
    pix_train = _subsample(_raw_pixels(splits["train"]), config.eval.max_train_examples)
    report["raw_pixels"] = _scores(pix_train, _raw_pixels(splits["test"]), "features",
                                   num_classes=num_classes, config=config)
  return report
