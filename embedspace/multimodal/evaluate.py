"""Measuring a joint embedding space: zero-shot, cross-modal and emergent retrieval, probes.

Every number is on held-out items: MNIST's 2,000 eval images, FSDD's official test clips
(recordings 0-4 of each speaker and digit) and captions from `text.HELD_OUT_TEMPLATES`, which
training never uses. Relevance is the digit (items are paired by class, as in AV-MNIST), and each
retrieval number comes with its chance level for the same gallery.

- Zero-shot classification (CLIP, Radford et al. 2021 Sec. 3.1): the class prototype is the
  normalised mean of the normalised embeddings of the held-out prompts of a digit; an image or a
  clip is assigned the closest prototype (cosine).
- Retrieval for every ordered pair of modalities (`retrieval.retrieval`, cosine): recall@1/5 and
  mAP. A pair that no loss trained (audio<->text in ImageBind) is "emergent" (Girdhar et al.
  2023, Sec. 5.2).
- Linear probes (`probes.linear_probe`) of the digit on each modality's embeddings and of the
  speaker on the audio's; with DeCUR, separately on the common and the unique dims (Wang et al.
  2023 Sec. 4.4 analyse the two parts the same way).
- Embedding arithmetic: a clip's embedding minus its digit's prototype plus another digit's
  prototype, searched among the test clips: does the result have the new digit and the same
  speaker? Baselines: the target prototype alone and the clip alone.
- A class-by-class cross-modal cosine heatmap (`similarity.png`) and `report.md`.
"""

from __future__ import annotations

import itertools
import math
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from etils import epath

from embedspace import geometry
from embedspace.measure import NONFINITE_FIX
from embedspace.core import console
from embedspace.measure import probes
from embedspace.measure import plots as plots_lib
from embedspace.measure import retrieval
from embedspace.multimodal import data as data_lib
from embedspace.multimodal import models

KS = (1, 5)


def unit(x: np.ndarray) -> np.ndarray:
  """Rows scaled to unit L2 norm, `[n, d]`."""
  return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def embed_split(apply_fn: Any, split: data_lib.Split, *, modalities: tuple[str, ...],
                batch_size: int) -> dict[str, np.ndarray]:
  """Joint-space embeddings `{modality: float32 [n, D]}` of every item of `split`.

  `apply_fn(modality, x)` embeds one batch (see `make_embed_fn`); every batch is padded to
  `batch_size` rows, so each modality compiles once.
  """
  inputs = {"image": split.image, "audio": split.audio, "text": split.text}
  return {m: embed_array(apply_fn, m, inputs[m], batch_size=batch_size) for m in modalities}


def embed_array(apply_fn: Any, modality: str, x: np.ndarray, *, batch_size: int) -> np.ndarray:
  """`apply_fn(modality, batch)` over the rows of the encoder input `x` (at least one), in
  batches padded to `batch_size` rows (one compile); float32 `[n, D]`."""
  parts = []
  for start in range(0, len(x), batch_size):
    chunk = x[start:start + batch_size]
    pad = np.zeros((batch_size - len(chunk), *chunk.shape[1:]), chunk.dtype)
    parts.append(np.asarray(apply_fn(modality, jnp.asarray(np.concatenate([chunk, pad]))))[
        :len(chunk)])
  return np.concatenate(parts).astype(np.float32)


def make_embed_fn(model: models.MultimodalModel, variables: Any):
  """`(modality, x [B, ...]) -> embeddings [B, D]` in eval mode, jitted per modality."""
  apply = jax.jit(lambda v, m, x: model.apply(v, m, x, train=False, method="embed")[1],
                  static_argnums=1)
  return lambda modality, x: apply(variables, modality, x)


def prototypes(text_embeddings: np.ndarray, labels: np.ndarray, *,
               num_classes: int = 10) -> np.ndarray:
  """Prompt-ensembled class embeddings, `[C, D]`: unit(mean_{prompts of c} unit(t))."""
  t = unit(text_embeddings)
  return unit(np.stack([t[labels == c].mean(0) for c in range(num_classes)]))


def zero_shot_accuracy(x: np.ndarray, labels: np.ndarray, protos: np.ndarray) -> float:
  """Fraction of rows of `x` [n, D] whose closest prototype (cosine) is their label."""
  return float(np.mean(np.argmax(unit(x) @ protos.T, axis=1) == labels))


def chance_recall(num_keys: int, num_relevant: np.ndarray, k: int) -> float:
  """Expected recall@k of a random ranking: mean of 1 - C(N - r, k) / C(N, k) over queries."""
  return float(np.mean([1 - math.comb(num_keys - int(r), k) / math.comb(num_keys, k)
                        for r in num_relevant]))


def retrieval_row(queries: np.ndarray, query_labels: np.ndarray, keys: np.ndarray,
                  key_labels: np.ndarray) -> dict[str, float]:
  """mAP, recall@1/5 (same digit = relevant) and their chance levels for one direction."""
  r = retrieval.retrieval(unit(queries), query_labels, unit(keys), key_labels, metric="cosine",
                          ks=KS)
  relevant = np.array([np.sum(key_labels == y) for y in query_labels])
  row = {"map": r["map"], **{f"recall@{k}": r[f"recall@{k}"] for k in KS},
         "chance_map": float(np.mean(relevant / len(keys)))}
  row.update({f"chance_recall@{k}": chance_recall(len(keys), relevant, k) for k in KS})
  return row


def arithmetic(audio: np.ndarray, digits: np.ndarray, speakers: np.ndarray,
               protos: np.ndarray) -> dict[str, dict[str, float]]:
  """Clip - prototype(its digit) + prototype(other digit), nearest other test clip.

  For every test clip and each of the 9 other digits, the nearest clip (cosine, the query clip
  excluded) to q = unit(a) - p_c + p_c'. Reports how often it has digit c' and the query's
  speaker, for the arithmetic and for two baselines (p_c' alone; the clip alone).
  """
  a = unit(audio)
  results = {}
  for name in ("arithmetic", "target_prompt_only", "clip_only"):
    digit_hits, speaker_hits = [], []
    for i in range(len(a)):
      for target in range(protos.shape[0]):
        if target == digits[i]:
          continue
        q = {"arithmetic": a[i] - protos[digits[i]] + protos[target],
             "target_prompt_only": protos[target], "clip_only": a[i]}[name]
        sims = a @ q
        sims[i] = -np.inf
        j = int(np.argmax(sims))
        digit_hits.append(digits[j] == target)
        speaker_hits.append(speakers[j] == speakers[i])
    results[name] = {"digit_accuracy": float(np.mean(digit_hits)),
                     "same_speaker": float(np.mean(speaker_hits))}
  results["chance"] = {"digit_accuracy": 0.1,
                       "same_speaker": float(np.mean([np.mean(speakers == s) for s in speakers]))}
  return results


def _probe(train_x, train_y, test_x, test_y, *, num_classes, steps) -> float:
  return float(probes.linear_probe(train_x, train_y, test_x, test_y, num_classes=num_classes,
                                   steps=steps)["accuracy"])


def _subsample(n: int, limit: int) -> np.ndarray:
  return np.arange(n) if not limit or n <= limit else np.sort(
      np.random.default_rng(0).choice(n, limit, replace=False))


def evaluate_run(config: ml_collections.ConfigDict, model: models.MultimodalModel,
                 variables: Any, splits: dict[str, data_lib.Split], *,
                 out_dir: str | None = None) -> dict[str, Any]:
  """Every measurement of the module docstring for the trained `variables` of `model`.

  Args:
    config: the run's config (pairs, loss, eval settings).
    model: the multimodal model (batch norm without a mesh axis).
    variables: `{"params", "batch_stats"}` on the host.
    splits: `data.load_splits(...)`.
    out_dir: where to write `report.md` and `similarity.png` (None: nothing written).

  Returns:
    A JSON-able dict: "zero_shot", "retrieval", "probe", "arithmetic", "logit_scale".

  Raises:
    geometry.NonFiniteError: the model gives NaN or inf embeddings (count and first row named).
  """
  modalities = tuple(model.modalities)
  trained = {frozenset(p) for p in data_lib.parse_pairs(config.pairs)}
  bs = config.eval.batch_size
  phase = console.Phases("evaluate", ["embedding", "zero-shot/retrieval", "probes"]
                         + ["report"] * (out_dir is not None))
  phase("embedding")
  embed_fn = make_embed_fn(model, variables)
  emb = {name: embed_split(embed_fn, splits[name], modalities=modalities, batch_size=bs)
         for name in ("train", "eval")}
  for name, by_modality in emb.items():  # Every measure below would be meaningless on NaN.
    for m, x in by_modality.items():
      geometry.require_finite(x, f"the {m} embeddings of the {name} split", fix=NONFINITE_FIX)
  test = splits["eval"]
  labels = {"image": test.image_label, "audio": test.audio_label, "text": test.text_label}
  report: dict[str, Any] = {"logit_scale": {
      k.removeprefix("logit_scale_"): float(np.minimum(np.exp(v), 100.0))
      for k, v in variables["params"].items() if k.startswith("logit_scale_")}}

  phase("zero-shot/retrieval")
  if "text" in modalities:
    protos = prototypes(emb["eval"]["text"], test.text_label)
    report["zero_shot"] = {m: zero_shot_accuracy(emb["eval"][m], labels[m], protos)
                           for m in modalities if m != "text"}
    report["zero_shot"]["chance"] = 0.1
  report["retrieval"] = {}
  for a, b in itertools.permutations(modalities, 2):
    row = retrieval_row(emb["eval"][a], labels[a], emb["eval"][b], labels[b])
    row["trained"] = frozenset((a, b)) in trained
    report["retrieval"][f"{a}->{b}"] = row

  k = config.loss.num_common if config.loss.name == "decur" else 0
  d = emb["eval"][modalities[0]].shape[1]
  # Dims left out are zeroed, not cut: the probe standardises a constant column to 0, so its
  # weights stay 0 and the fit equals the fit on the kept dims, with one compiled program.
  parts = {"all": np.ones(d, np.float32)}
  if k:
    parts.update({"common": (np.arange(d) < k).astype(np.float32),
                  "unique": (np.arange(d) >= k).astype(np.float32)})
    for a, b in itertools.permutations(modalities, 2):
      row = retrieval_row(emb["eval"][a][:, :k], labels[a], emb["eval"][b][:, :k], labels[b])
      row["trained"] = frozenset((a, b)) in trained
      report["retrieval"][f"{a}->{b} (common dims)"] = row
  phase("probes")
  train = splits["train"]
  train_labels = {"image": train.image_label, "audio": train.audio_label}
  steps, limit = config.eval.probe_steps, config.eval.max_train_examples
  report["probe"] = {}
  for m in (m for m in modalities if m != "text"):
    sub = _subsample(len(train_labels[m]), limit)
    tasks = {"digit": (train_labels[m][sub], labels[m], 10)}
    if m == "audio":
      tasks["speaker"] = (train.audio_speaker[sub], test.audio_speaker,
                          len(data_lib.SPEAKERS))
    report["probe"][m] = {
        task: {part: _probe(emb["train"][m][sub] * mask, ytr, emb["eval"][m] * mask, yte,
                            num_classes=c, steps=steps) for part, mask in parts.items()}
        for task, (ytr, yte, c) in tasks.items()}
  if {"audio", "text"} <= set(modalities):
    report["arithmetic"] = arithmetic(emb["eval"]["audio"], test.audio_label,
                                      test.audio_speaker, protos)
  if out_dir is not None:
    phase("report")
    write_report(report, emb["eval"], labels, out_dir, plots=config.eval.plots)
  phase.close()
  return report


def class_similarity(x: np.ndarray, x_labels: np.ndarray, y: np.ndarray, y_labels: np.ndarray,
                     *, num_classes: int = 10) -> np.ndarray:
  """`[C, C]` mean cosine between items of class i in `x` and class j in `y`."""
  mx = np.stack([unit(x)[x_labels == c].mean(0) for c in range(num_classes)])
  my = np.stack([unit(y)[y_labels == c].mean(0) for c in range(num_classes)])
  return mx @ my.T


def write_report(report: dict[str, Any], emb: dict[str, np.ndarray],
                 labels: dict[str, np.ndarray], out_dir: str, *, plots: bool) -> None:
  """`out_dir/report.md` (tables) and, with `plots`, `out_dir/similarity.png` (heatmaps)."""
  epath.Path(out_dir).mkdir(parents=True, exist_ok=True)
  lines = ["# Multimodal evaluation", ""]
  if "zero_shot" in report:
    lines += ["## Zero-shot classification from held-out text prompts", "",
              "| modality | accuracy | chance |", "|---|---|---|"]
    lines += [f"| {m} | {v:.4f} | 0.1 |" for m, v in report["zero_shot"].items() if m != "chance"]
    lines.append("")
  lines += ["## Retrieval (same digit = relevant; eval split / held-out captions)", "",
            "| query -> gallery | trained pair | R@1 | R@5 | mAP | chance R@1 / R@5 / mAP |",
            "|---|---|---|---|---|---|"]
  for name, r in report["retrieval"].items():
    lines.append(f"| {name} | {'yes' if r.get('trained', False) else 'no'} | "
                 f"{r['recall@1']:.4f} | {r['recall@5']:.4f} | {r['map']:.4f} | "
                 f"{r['chance_recall@1']:.3f} / {r['chance_recall@5']:.3f} / "
                 f"{r['chance_map']:.3f} |")
  lines += ["", "## Linear probes on the joint-space embeddings", "",
            "| modality | task | dims | accuracy |", "|---|---|---|---|"]
  for m, tasks in report["probe"].items():
    for task, by_part in tasks.items():
      lines += [f"| {m} | {task} | {part} | {acc:.4f} |" for part, acc in by_part.items()]
  if "arithmetic" in report:
    lines += ["", "## Embedding arithmetic: clip - text(digit) + text(other digit)", "",
              "| query | retrieves the new digit | keeps the speaker |", "|---|---|---|"]
    lines += [f"| {n} | {v['digit_accuracy']:.4f} | {v['same_speaker']:.4f} |"
              for n, v in report["arithmetic"].items()]
  if plots:
    pairs = list(itertools.combinations(labels.keys() & emb.keys(), 2))
    pairs = sorted(pairs, key=lambda p: (data_lib.MODALITIES.index(p[0]),
                                         data_lib.MODALITIES.index(p[1])))
    plt = plots_lib.pyplot()
    fig, axes = plt.subplots(1, max(len(pairs), 1), figsize=(4.2 * max(len(pairs), 1), 3.8),
                             squeeze=False)
    for ax, (a, b) in zip(axes[0], pairs):
      if data_lib.MODALITIES.index(a) > data_lib.MODALITIES.index(b):
        a, b = b, a
      sim = class_similarity(emb[a], labels[a], emb[b], labels[b])
      im = ax.imshow(sim, cmap="viridis")
      ax.set(title=f"{a} vs {b}: mean cosine", xlabel=f"{b} digit", ylabel=f"{a} digit",
             xticks=range(10), yticks=range(10))
      fig.colorbar(im, ax=ax, fraction=0.046)
    fig.tight_layout()
    plots_lib.save(fig, epath.Path(out_dir) / "similarity.png", dpi=100)
    lines += ["", "![cross-modal class similarity](similarity.png)"]
  (epath.Path(out_dir) / "report.md").write_text("\n".join(lines) + "\n", encoding="utf-8")
