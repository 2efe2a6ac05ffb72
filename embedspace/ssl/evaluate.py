"""The evaluation of a self-supervised image space (`python -m embedspace.evaluate --workdir=DIR`).

The orchestrator of the evaluation, run at the end of every training run (`evaluate_run`) and on
any training workdir from the command line. It embeds the train and eval splits once with the
jitted encoder over every device (`space.image.embed`: the same `jax.jit(jax.shard_map(...))`
path as training, fixed-size padded batches, padding rows dropped), then measures the space with
the modules that own each concern:

- `probes`: the weighted kNN monitor (Wu et al. 2018; DINO) and the linear probe;
- `retrieval`: kNN accuracy and retrieval (mAP, recall@k) under every measure of the founding
  note (Hamming on SimHash codes, Manhattan, Euclidean, cosine, negative arc length, Mahalanobis);
- `ood`: out-of-distribution detection against MNIST digits (Lee et al. 2018; Sun et al. 2022);
- `report`: hypersphere geometry (Wang & Isola 2020), collapse checks, PNGs and `report.md`.

Everything pairwise is blockwise (queries in blocks against key blocks), so memory grows with
`block * N`, never `N * N`. Each space is measured beside the same baselines: raw pixels and the
randomly initialised encoder, because a number means little without them.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import time
from collections.abc import Iterable, Mapping
from typing import Any

import jax
import numpy as np
from absl import logging
from etils import epath
from jax.sharding import Mesh

from embedspace import data as data_lib
from embedspace import geometry
from embedspace import parallel
from embedspace.core import console
from embedspace.core import metrics as metrics_lib
from embedspace.measure import NONFINITE_FIX
from embedspace.measure import ood
from embedspace.measure import plots
from embedspace.measure import report as report_lib
from embedspace.measure import retrieval
from embedspace.measure.probes import knn_classify, knn_predict, linear_probe
from embedspace.space.image import embed

__all__ = ["embed", "evaluate_run", "knn_classify", "knn_predict", "linear_probe", "options"]


# ----------------------------------------------------------------------------------------------
# The evaluation of a training run: trained model beside its two baselines.

OOD_DATASET = "embedded_mnist"
OOD_SPLIT = "train+test"
"""All 10,000 MNIST test digits: the shipped `embedded_mnist` divides them 8,000 / 2,000 for the
multimodal runs; the OOD set of the standard protocol is the whole MNIST test split."""
"""Out-of-distribution data of the default run: the MNIST test digits shipped in the package."""

_MAP_POINTS = 2000
"""Eval points drawn in the 2-D maps (t-SNE costs ~10 s per space for 2k points on 2 cores)."""


def _raw_pixels(loader: Iterable[Mapping[str, np.ndarray]]) -> dict[str, np.ndarray]:
  """Flattened normalised pixels and labels of every real row of `loader` (a baseline)."""
  images, labels = [], []
  for batch in map(parallel.process_allgather_batch, loader):
    mask = np.asarray(batch["mask"]).astype(bool)
    images.append(np.asarray(batch["image"])[mask].reshape(int(mask.sum()), -1))
    labels.append(np.asarray(batch["label"])[mask])
  pixels = np.concatenate(images).astype(np.float32)
  return {"features": pixels, "labels": np.concatenate(labels)}


class _Head:
  """The first `limit` records of `source` (all when `limit` is 0), read by index as `source`.

  The evaluation's `max_train_examples` / `max_eval_examples` cut a split before it is embedded,
  so a `:smoke` run does not embed 70,000 images to score 512 of them.
  """

  def __init__(self, source: Any, limit: int):
    self.source, self.info = source, source.info
    self.size = len(source) if not limit else min(limit, len(source))

  def __len__(self) -> int:
    return self.size

  def __getitem__(self, index: int) -> dict[str, Any]:
    if not 0 <= index < self.size:
      raise IndexError(index)
    return self.source[index]


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


class _Renormalized:
  """`source` read as it is, but with another dataset's normalisation in its `.info`.

  Out-of-distribution images must go through the in-distribution pipeline: normalising MNIST
  with its own mean and std would move it towards Fashion-MNIST before the model sees it.
  """

  def __init__(self, source: Any, like: Any):
    self.source = source
    self.info = dataclasses.replace(source.info, mean=like.mean, std=like.std)

  def __len__(self) -> int:
    return len(self.source)

  def __getitem__(self, index: int) -> dict[str, Any]:
    return self.source[index]


def _two_views(config: Any, source: Any, apply_fn: Any, variables: Any, mesh: Mesh, *,
               max_points: int) -> dict[str, np.ndarray] | None:
  """Two augmented views (the training augmentation) of up to `max_points` eval images.

  Returns `{"features1", "features2", "embeddings1", "embeddings2", "pixels1", "pixels2"}`
  (row i of each pair shows the same image), or None when
  the split is smaller than one batch per device.
  """
  n_dev = mesh.devices.size
  batch = min(config.eval.batch_size, len(source) // n_dev * n_dev)
  if batch < n_dev:
    return None
  loader = data_lib.ssl_loader(source, global_batch_size=batch, seed=config.seed,
                               image_size=config.data.image_size,
                               augment=config.data.augment.to_dict(), num_epochs=1,
                               shuffle=False)
  views = {"view1": [], "view2": []}
  for i, b in enumerate(loader):
    if i * batch >= max_points:
      break
    for v in views:
      views[v].append({"image": b[v], "label": b["label"]})
  out = {}
  for i, (v, batches) in enumerate(views.items(), start=1):
    embedded = embed(apply_fn, variables, batches, mesh=mesh)
    out[f"features{i}"] = embedded["features"]
    out[f"embeddings{i}"] = embedded["embeddings"]
    out[f"pixels{i}"] = np.concatenate(
        [np.reshape(b["image"], (len(b["image"]), -1))
         for b in map(parallel.process_allgather_batch, batches)]).astype(np.float32)
  return out


def evaluate_run(config: Any, model: Any, variables: Any, mesh: Mesh, *,
                 init_variables: Any | None = None, monitor: bool = False,
                 full: bool = True, out_dir: str | None = None,
                 ood_dataset: str | None = OOD_DATASET,
                 code_lengths: tuple[int, ...] = retrieval.DEFAULT_CODE_LENGTHS,
                 ood_k: int = 50, max_pair_points: int = 1024, tsne: bool = True,
                 step: int | None = None, command: str = "") -> dict[str, Any]:
  """The whole evaluation of an embedding model on `config.data`'s train and eval splits.

  Embeds `config.data.train_split` (the kNN database, probe training set and OOD fit set; at
  most `config.eval.max_train_examples` of it) and `config.data.eval_split` (at most
  `config.eval.max_eval_examples`; 0: all) with the model in
  inference mode, then measures the encoder features and the projector embeddings:

  - "trained"/"random_init"/"raw_pixels": weighted cosine kNN (k=`config.eval.knn_k`) and the
    linear probe; the baselines (raw pixels, the encoder at `init_variables`) when
    `config.eval.baselines`.
  - "measures": `{space: retrieval.measure_table(...)}`, kNN accuracy (majority vote) and
    retrieval mAP / recall@1,5,10 under every measure, for encoder, projector and raw pixels.
  - "ood": AUROC and FPR95 of every `ood.SCORES` score, eval split against `ood_dataset`'s test
    split (read through the in-distribution normalisation), on encoder, projector and raw pixels.
  - "geometry": `report.hypersphere_report` of the eval split per space (alignment of two
    augmented views, uniformity, effective rank, dimension usage, geodesic distances,
    class-similarity matrix, same- vs different-class separation per measure).

  `monitor` gives just the trained encoder's kNN and linear-probe accuracy, the learning curve
  measured every `config.eval_every` steps (on at most `config.eval.monitor_examples` train and
  eval images each); `full=False` stops after the kNN and probe scores and their
  baselines (the evaluation before "measures" existed, ~3x cheaper). With `out_dir`, process 0
  also writes `report.json`, `report.md` and the PNGs there.

  Args:
    config: the training config (`config.data`, `config.eval`, `config.seed`).
    model: the `EmbeddingModel` (its batch-norm axis is dropped for inference).
    variables: `{"params", "batch_stats"}` of the trained model.
    mesh: the data-parallel mesh.
    init_variables: variables of the randomly initialised model (baseline), or None.
    monitor: only the trained encoder's cosine kNN and probe accuracy (the curve).
    full: also "measures", "ood" and "geometry" (and the pictures with `out_dir`).
    out_dir: where to write the report and pictures (None: numbers only).
    ood_dataset: the OOD dataset name for `data.get_source`, or None/"" to skip OOD.
    code_lengths: bits of the Hamming (SimHash) codes.
    ood_k: the neighbour of the kNN OOD score.
    max_pair_points: points (and view pairs) used by the pair statistics of the geometry report.
    tsne: draw t-SNE maps too (needs scikit-learn; ~10 s per space for 2k points).
    step: the training step of `variables`, recorded in the report.
    command: the command line, quoted in `report.md`.

  Returns:
    JSON-ready dict: "trained", "random_init", "raw_pixels", "num_train", "num_eval",
    "measures", "ood", "geometry", "notes", "seconds" (and "step" when given).

  Raises:
    FileNotFoundError / ValueError: from `data.get_source` for a missing or unknown dataset.
    geometry.NonFiniteError: the trained model gives NaN or inf features or embeddings.
  """
  names = [] if monitor else (
      ["embedding", "kNN/probe"] + ["baselines"] * bool(config.eval.baselines)
      + (["measures"] + ["OOD"] * bool(ood_dataset) + ["geometry"]
         + ["plots"] * bool(out_dir and jax.process_index() == 0) if full else []))
  with console.Phases("evaluate", names) as phase:  # Nothing shown for the kNN monitor.
    return _evaluate_run(config, model, variables, mesh, phase=phase,
                         init_variables=init_variables, monitor=monitor, full=full,
                         out_dir=out_dir, ood_dataset=ood_dataset, code_lengths=code_lengths,
                         ood_k=ood_k, max_pair_points=max_pair_points, tsne=tsne, step=step,
                         command=command)


def _evaluate_run(config: Any, model: Any, variables: Any, mesh: Mesh, *,
                  phase: console.Phases, init_variables: Any | None, monitor: bool,
                  full: bool, out_dir: str | None, ood_dataset: str | None,
                  code_lengths: tuple[int, ...], ood_k: int, max_pair_points: int, tsne: bool,
                  step: int | None, command: str) -> dict[str, Any]:
  """`evaluate_run`, reporting each phase to `phase`."""
  started = time.perf_counter()
  splits, sources = {}, {}
  for role, split in (("train", config.data.train_split), ("test", config.data.eval_split)):
    source, info = data_lib.get_source(config.data.name, split=split,
                                       data_dir=config.data.data_dir)
    limit = config.eval.get("max_train_examples" if role == "train" else "max_eval_examples", 0)
    source = _Head(source, limit)
    sources[role] = source
    splits[role] = data_lib.eval_loader(source, batch_size=config.eval.batch_size,
                                        image_size=config.data.image_size)
  num_classes = info.num_classes
  apply_fn = functools.partial(model.clone(bn_axis_name=None).apply, train=False)

  def embedded(variables):
    out = {role: embed(apply_fn, variables, loader, mesh=mesh) for role, loader in splits.items()}
    return out["train"], out["test"]

  phase("embedding")
  train, test = embedded(variables)
  if monitor:  # The kNN vote masks non-finite rows and counts them (`probes.knn_predict`).
    return {"trained": {"encoder": _scores(train, test, "features", num_classes=num_classes,
                                           config=config)}}
  for role, split in (("train", train), ("eval", test)):  # Every measure below refuses NaN.
    for key in ("features", "embeddings"):
      geometry.require_finite(split[key], f"the trained model's {key} of the {role} split",
                              fix=NONFINITE_FIX)
  phase("kNN/probe")
  result: dict[str, Any] = {
      "trained": {"encoder": _scores(train, test, "features", num_classes=num_classes,
                                     config=config),
                  # kNN only: a probe on the wide projector output costs more than the
                  # rest of the evaluation together, and the encoder is what transfers.
                  "projector": _scores(train, test, "embeddings", num_classes=num_classes,
                                       config=config, probe=False)},
      "num_train": int(len(train["labels"])), "num_eval": int(len(test["labels"])),
      "knn_k": int(config.eval.knn_k),
  }
  if step is not None:
    result["step"] = int(step)
  notes: list[str] = []
  pixels = None
  if config.eval.baselines:
    phase("baselines")
    if init_variables is not None:
      train0, test0 = embedded(init_variables)
      result["random_init"] = {"encoder": _scores(train0, test0, "features",
                                                  num_classes=num_classes, config=config)}
    pixels = (_raw_pixels(splits["train"]),
              _raw_pixels(splits["test"]))
    result["raw_pixels"] = _scores(*pixels, "features", num_classes=num_classes, config=config)

  if not full:
    return result
  spaces = {"encoder": (train["features"], test["features"]),
            "projector": (train["embeddings"], test["embeddings"])}
  if pixels is not None:
    spaces["raw_pixels"] = (pixels[0]["features"], pixels[1]["features"])

  # Every measure: kNN and retrieval, on the first `eval.measures_examples` train (database) and
  # test (queries) rows: ranking every key for every query under 11 measures costs
  # O(queries x keys x (dim + log keys)) each, and on the whole 60k / 10k splits with the 1024-d
  # projector the table alone took over 8 minutes of a 13-minute run (2-core AMD EPYC).
  phase("measures")
  n = config.eval.get("measures_examples", 0) or None
  result["measures"] = {
      space: retrieval.measure_table(tr[:n], train["labels"][:n], te[:n], test["labels"][:n],
                                     num_classes=num_classes, k=config.eval.knn_k,
                                     code_lengths=code_lengths, seed=config.seed)
      for space, (tr, te) in spaces.items()}
  result["measures_examples"] = {"train": int(len(train["labels"][:n])),
                                 "eval": int(len(test["labels"][:n]))}

  # Out-of-distribution detection.
  ood_scores = {}
  if ood_dataset:
    phase("OOD")
    ood_split = OOD_SPLIT if ood_dataset == OOD_DATASET else "test"
    out_source, out_info = data_lib.get_source(ood_dataset, split=ood_split,
                                               data_dir=config.data.data_dir)
    if out_info.channels != info.channels:
      notes.append(f"OOD skipped: {ood_dataset} has {out_info.channels} channels, "
                   f"{config.data.name} {info.channels}.")
    else:
      out_loader = data_lib.eval_loader(_Renormalized(out_source, info),
                                        batch_size=config.eval.batch_size,
                                        image_size=config.data.image_size)
      outside = embed(apply_fn, variables, out_loader, mesh=mesh)
      out_spaces = {"encoder": outside["features"], "projector": outside["embeddings"]}
      if pixels is not None:
        out_spaces["raw_pixels"] = _raw_pixels(out_loader)["features"]
      metrics = {}
      for space, out_x in out_spaces.items():
        tr, te = spaces[space]
        metrics[space], ood_scores[space] = ood.evaluate_ood(
            tr, train["labels"], te, out_x, num_classes=num_classes, k=ood_k)
      result["ood"] = {"in_distribution": f"{config.data.name}:{config.data.eval_split}",
                       "out_of_distribution": f"{ood_dataset}:{ood_split}",
                       "num_out": int(len(outside["labels"])), "k": ood_k, "metrics": metrics}
      logging.info("evaluate: OOD: encoder %s", ood.summarize(metrics["encoder"]))

  # Hypersphere geometry of the eval split.
  phase("geometry")
  views = _two_views(config, sources["test"], apply_fn, variables, mesh,
                     max_points=max_pair_points)
  geometry_numbers, geometry_arrays = {}, {}
  for space, key in (("encoder", "features"), ("projector", "embeddings"),
                     ("raw_pixels", "pixels")):
    if space not in spaces:
      continue
    geometry_numbers[space], geometry_arrays[space] = report_lib.hypersphere_report(
        spaces[space][1], test["labels"], num_classes=num_classes,
        view1=None if views is None else views[f"{key}1"],
        view2=None if views is None else views[f"{key}2"],
        max_points=max_pair_points, seed=config.seed)
  if views is None:
    notes.append("alignment skipped: the eval split is smaller than one batch per device.")
  result["geometry"] = geometry_numbers
  result["notes"] = notes
  result["seconds"] = time.perf_counter() - started

  if out_dir and jax.process_index() == 0:
    phase("plots")
    _write_report(result, out_dir, test=test, spaces=spaces, ood_scores=ood_scores,
                  geometry_arrays=geometry_arrays, class_names=info.class_names, tsne=tsne,
                  seed=config.seed, command=command,
                  monitor_examples=int(config.eval.get("monitor_examples", 0)))
    result["seconds"] = time.perf_counter() - started
  return result


def _write_report(result: dict[str, Any], out_dir: str, *, test: dict[str, np.ndarray],
                  spaces: dict[str, tuple[np.ndarray, np.ndarray]],
                  ood_scores: dict[str, Any], geometry_arrays: dict[str, Any],
                  class_names: tuple[str, ...], tsne: bool, seed: int,
                  command: str, monitor_examples: int) -> None:
  """PNGs, `report.json` and `report.md` in `out_dir` (`monitor_examples`: the learning
  curve's subset sizes, for its labels)."""
  epath.Path(out_dir).mkdir(parents=True, exist_ok=True)
  path = lambda name: os.fspath(epath.Path(out_dir) / name)  # noqa: E731
  images = {}
  images["Which classes sit close: mean cosine similarity between classes"] = (
      plots.plot_class_similarity(
          {s: a["class_similarity"] for s, a in geometry_arrays.items()}, class_names,
          path("class_similarity.png")))
  for space, arrays in geometry_arrays.items():
    images[f"Same- vs different-class pairs under every measure ({space})"] = (
        plots.plot_pair_histograms(
            arrays["pairs"], result["geometry"][space]["same_vs_different_class_auroc"],
            f"{space}: pair values on the eval split", path(f"measures_{space}.png")))
  images["Geodesic distances on the hypersphere"] = plots.plot_geodesic(
      {s: a["geodesic"] for s, a in geometry_arrays.items()}, path("geodesic.png"))
  images["Dimension usage (collapse check)"] = plots.plot_dimensions(
      {s: a["dimensions"] for s, a in geometry_arrays.items()}, path("dimensions.png"))
  if ood_scores:
    images["OOD scores and ROC curves"] = plots.plot_ood(
        ood_scores, result["ood"]["metrics"], path("ood.png"))
  idx = np.sort(np.random.default_rng(seed).permutation(len(test["labels"]))[:_MAP_POINTS])
  maps = {}
  for space, (_, te) in spaces.items():
    maps[f"{space} PCA"] = report_lib.pca_2d(te[idx])
  if tsne:
    for space, (_, te) in spaces.items():
      xy = report_lib.tsne_2d(te[idx], seed=seed)
      if xy is None:
        result["notes"].append("t-SNE skipped: scikit-learn is not installed "
                               "(pip install scikit-learn).")
        break
      maps[f"{space} t-SNE"] = xy
  images["2-D maps of the eval split"] = plots.plot_maps(
      maps, test["labels"][idx], class_names, path("maps.png"))
  curve = read_curve(os.path.join(os.path.dirname(os.path.abspath(out_dir)), "metrics.jsonl"))
  if curve["step"]:
    result["curve"] = curve
    raw = result.get("raw_pixels", {})
    baselines = {f"raw pixels {s.removesuffix('_accuracy')}": raw[s]
                 for s in ("knn_accuracy", "linear_probe_accuracy") if s in raw}
    limit = monitor_examples
    images["Learning curve: kNN and linear probe against steps (monitor subset); stars and "
           "baselines on the evaluation's splits"] = plots.plot_curve(
               curve, baselines, path("curve.png"), finals=result["trained"]["encoder"],
               curve_label=f" ({limit:,} / {limit:,} images)" if limit else "")
  epath.Path(path("report.json")).write_text(json.dumps(result, indent=1), encoding="utf-8")
  report_lib.write_markdown(result, images, path("report.md"), command=command,
                            class_names=class_names)


# ----------------------------------------------------------------------------------------------
# A training workdir.


def monitor_config(config: Any) -> Any:
  """`config` with the learning curve's subsets as the evaluation's: at most
  `config.eval.monitor_examples` train and eval images (default 10,000; 0: the whole splits)."""
  limit = int(config.eval.get("monitor_examples", 10_000))
  curve = config.copy_and_resolve_references()
  with curve.unlocked():
    for key in ("max_train_examples", "max_eval_examples"):
      current = int(curve.eval.get(key, 0))
      curve.eval[key] = min(current, limit) if current and limit else (current or limit)
  return curve


def read_curve(path: str) -> dict[str, list[float]]:
  """The learning curve the monitor wrote to `metrics.jsonl` at `path` (empty lists if none);
  a step logged twice (a resumed run) keeps its last record."""
  by_step = {}
  if os.path.exists(path):
    for record in metrics_lib.read_jsonl(path):
      if "curve/knn_accuracy" in record:
        by_step[int(record["step"])] = record
  steps = sorted(by_step)
  return {"step": steps,
          "knn_accuracy": [by_step[s]["curve/knn_accuracy"] for s in steps],
          "linear_probe_accuracy": [by_step[s]["curve/linear_probe_accuracy"] for s in steps]}


def options(eval_config: Any) -> dict[str, Any]:
  """`evaluate_run`'s optional settings from `config.eval` (absent keys: the defaults).

  `python -m embedspace.evaluate --config.eval.KEY=VALUE` sets them for a re-evaluation:
  `ood_dataset` ('' skips OOD), `tsne`, `max_pair_points`, `code_lengths`; `command` (the
  command line quoted in report.md).
  """
  out = {}
  for key in ("ood_dataset", "tsne", "max_pair_points", "code_lengths", "command"):
    if key in eval_config:
      value = eval_config[key]
      out[key] = tuple(value) if key == "code_lengths" else value
  if "ood_dataset" in out:
    out["ood_dataset"] = out["ood_dataset"] or None
  return out
