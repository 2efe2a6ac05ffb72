"""Measuring the FIND-style interface against matching prompts to crops, on held-out scenes.

Eval scenes are built from the multimodal eval split only (`scenes.make_scenes`, seed
`config.eval.seed`); prompts are the held-out captions and FSDD's test clips, which neither the
encoders nor the interface saw. Per prompt modality:

- grounding: every item of every scene is prompted once (a random held-out caption or test clip
  of its digit); accuracy is the share of predicted boxes with IoU >= 0.5 with the true box,
  and the mask's IoU. Two ways: FIND's matching (`find.select_query`: the live query closest to
  the prompt; its mask and that mask's tight box) and the prompt token's regressed box and mask
  (also reported: the tight box of that mask);
- retrieval: every eval prompt ranks every scene; a scene is relevant when it holds the digit;
  recall@k (a relevant scene in the top k) and mAP, with their chance levels;
- segmentation (prompt-free): the queries' masks (objectness > 0.5) matched one-to-one to the
  items by maximal total IoU; mean IoU over items, how often the count of objects is right,
  and the ceiling that the masks' resolution sets (`resolution_ceiling`).

Baseline, no interface: each scene is cut into 28x28 windows every `eval.window_stride` pixels
(a sliding window, no knowledge of positions), each embedded by the frozen image encoder; a
prompt picks the window of highest cosine, whose thresholded pixels give the box and mask;
a scene's retrieval score is its best window. "Oracle crops" is the same with the true item
crops (it knows where the items are; its boxes and masks are the true ones of the chosen item),
so it measures recognition alone.
"""

from __future__ import annotations

import itertools
import os
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from etils import epath

from embedspace.measure import plots
from embedspace.interface import find
from embedspace.interface import scenes as scenes_lib
from embedspace.multimodal import data as mm_data
from embedspace.multimodal import evaluate as mm_evaluate

KS = (1, 5)


def retrieval_metrics(scores: np.ndarray, relevant: np.ndarray) -> dict[str, float]:
  """Recall@k (any relevant scene in the top k) and mAP of `scores` [P, N], `relevant` [P, N]."""
  order = np.argsort(-scores, axis=1, kind="stable")
  hits = np.take_along_axis(relevant, order, axis=1)
  out = {f"recall@{k}": float(np.mean(hits[:, :k].any(axis=1))) for k in KS}
  precision = np.cumsum(hits, axis=1) / np.arange(1, hits.shape[1] + 1)
  ap = np.sum(precision * hits, axis=1) / np.maximum(hits.sum(axis=1), 1)
  out["map"] = float(np.mean(ap))
  n, r = relevant.shape[1], relevant.sum(axis=1)
  out.update({f"chance_recall@{k}": mm_evaluate.chance_recall(n, r, k) for k in KS})
  out["chance_map"] = float(np.mean(r / n))
  return out


def matched_iou(pred: np.ndarray, true: np.ndarray, valid: np.ndarray) -> np.ndarray:
  """Per-item IoU `[I]` under the one-to-one assignment of predicted masks `[Q, S, S]` to true
  masks `[I, S, S]` that maximises the total IoU of the valid items (enumerated; Q >= I)."""
  iou = scenes_lib.mask_iou(pred[:, None], true[None])  # [Q, I]
  items = np.flatnonzero(valid)
  best, best_total = None, -1.0
  for perm in itertools.permutations(range(pred.shape[0]), len(items)):
    total = iou[list(perm), items].sum()
    if total > best_total:
      best, best_total = perm, total
  return iou[list(best), items]


def upsample(masks: np.ndarray, size: int) -> np.ndarray:
  """Masks `[..., m, m]` at `size` x `size` by nearest-neighbour repetition (`size % m == 0`)."""
  f = size // masks.shape[-1]
  return masks.repeat(f, axis=-2).repeat(f, axis=-1)


def _batched(fn, n: int, batch_size: int, *arrays: np.ndarray) -> dict[str, np.ndarray]:
  """`fn` over rows of `arrays` in padded batches (one compile), outputs concatenated."""
  parts = []
  for start in range(0, n, batch_size):
    chunk = [a[start:start + batch_size] for a in arrays]
    pad = batch_size - len(chunk[0])
    chunk = [np.concatenate([c, np.zeros((pad, *c.shape[1:]), c.dtype)]) for c in chunk]
    out = jax.device_get(fn(*map(jnp.asarray, chunk)))
    parts.append({k: v[:batch_size - pad] for k, v in out.items()})
  return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}


def windows(size: int, stride: int) -> np.ndarray:
  """Top-left corners `[W, 2]` of 28x28 windows every `stride` pixels (the last one flush)."""
  starts = sorted(set(range(0, size - scenes_lib.DIGIT_SIZE + 1, stride))
                  | {size - scenes_lib.DIGIT_SIZE})
  return np.array(list(itertools.product(starts, starts)), np.int32)


def _crops(canvas: np.ndarray, corners: np.ndarray) -> np.ndarray:
  """`[N, K, 28, 28, 1]` crops of `canvas` [N, S, S, 1] at per-scene corners `[N, K, 2]`."""
  d = scenes_lib.DIGIT_SIZE
  return np.stack([np.stack([c[r:r + d, q:q + d] for r, q in cs]) for c, cs in
                   zip(canvas, corners)])


def evaluate_run(config: ml_collections.ConfigDict, env: dict[str, Any], params: Any, *,
                 out_dir: str | None = None) -> dict[str, Any]:
  """Every measurement of the module docstring; writes `report.md` and `examples.png` to `out_dir`.

  Args:
    config: the run's config.
    env: `find_task.environment(config)` (model, frozen encoders, splits, prompt banks).
    params: the interface's trained parameters (host).
    out_dir: where to write the report (None: nothing written).

  Returns:
    A JSON-able dict: "interface", "baseline_windows", "baseline_oracle_crops" (each by prompt
    modality: "grounding", "retrieval"), "segmentation", "num_scenes".
  """
  ev, s = config.eval, config.scenes.canvas_size
  split = env["splits"]["eval"]
  sc = scenes_lib.make_scenes(split.image_raw, split.image_label, num_scenes=ev.num_scenes,
                              seed=ev.seed, **scene_kwargs(config))
  canvas = scenes_lib.normalize(sc.canvas, env["mean"], env["std"])
  model, frozen = env["model"], env["frozen"]
  apply = jax.jit(lambda c, p: find.forward(model, params, frozen, c, p))
  embed_image = mm_evaluate.make_embed_fn(env["mm_model"], env["mm_vars"])
  embed = lambda x: {"e": embed_image("image", x)}  # noqa: E731
  thr = config.scenes.threshold

  scene_of, slot_of = np.nonzero(sc.valid)  # every (scene, item) is prompted once
  true_box, true_mask = sc.boxes[scene_of, slot_of], sc.masks[scene_of, slot_of]
  corners = windows(s, ev.window_stride)
  win = _batched(embed, ev.num_scenes * len(corners), ev.batch_size, _crops(
      canvas, np.broadcast_to(corners, (ev.num_scenes, *corners.shape))).reshape(
          -1, scenes_lib.DIGIT_SIZE, scenes_lib.DIGIT_SIZE, 1))["e"]
  win = mm_evaluate.unit(win).reshape(ev.num_scenes, len(corners), -1)
  oracle = mm_evaluate.unit(_batched(embed, ev.num_scenes * sc.valid.shape[1], ev.batch_size,
                                     _crops(canvas, sc.positions).reshape(
                                         -1, scenes_lib.DIGIT_SIZE, scenes_lib.DIGIT_SIZE, 1)
                                     )["e"]).reshape(*sc.valid.shape, -1)

  report: dict[str, Any] = {"num_scenes": ev.num_scenes, "num_items": int(sc.valid.sum()),
                            "mask_size": config.model.mask_size,
                            "interface": {}, "interface_query_match": {},
                            "baseline_windows": {},
                            "baseline_oracle_crops": {}}
  examples = {}
  for mi, modality in enumerate(config.prompts):
    bank, bank_labels = env["prompts"]["eval"][modality]
    by_class = [np.flatnonzero(bank_labels == c) for c in range(10)]
    pick = np.array([by_class[sc.labels[n, k]][np.random.default_rng(
        [ev.seed, n, k, mi]).integers(len(by_class[sc.labels[n, k]]))]
                     for n, k in zip(scene_of, slot_of)])
    prompt = bank[pick]
    out = _batched(apply, len(pick), ev.batch_size, canvas[scene_of], prompt)
    box = out["box"] * s
    mask = upsample(out["prompt_mask"] > 0, s)
    mask_box = np.stack([scenes_lib.mask_box(m) for m in mask])
    report["interface"][modality] = {"grounding": {
        **grounding_metrics(box, mask, true_box, true_mask),
        "accuracy@iou0.5 (box of the mask)": float(np.mean(
            scenes_lib.box_iou(mask_box, true_box) >= 0.5))}}
    # The same outputs, grounded by matching: the query closest to the prompt, its mask's box.
    chosen = np.asarray(find.select_query(out, jnp.asarray(prompt)))
    qmask = upsample(out["query_masks"][np.arange(len(chosen)), chosen] > 0, s)
    qbox = np.stack([scenes_lib.mask_box(m) for m in qmask])
    report["interface_query_match"][modality] = {
        "grounding": grounding_metrics(qbox, qmask, true_box, true_mask)}
    # Baselines: the best window / the best true crop for each prompt.
    best = np.argmax(np.einsum("pwd,pd->pw", win[scene_of], mm_evaluate.unit(prompt)), axis=1)
    wmask = np.zeros_like(true_mask)
    for j, (n, w) in enumerate(zip(scene_of, best)):
      r, c = corners[w]
      wmask[j, r:r + 28, c:c + 28] = sc.canvas[n, r:r + 28, c:c + 28, 0] >= thr
    wbox = np.stack([scenes_lib.mask_box(m) for m in wmask])
    osim = np.where(sc.valid[scene_of], np.einsum("pkd,pd->pk", oracle[scene_of],
                                                  mm_evaluate.unit(prompt)), -np.inf)
    ok = np.argmax(osim, axis=1)
    for name, b, m in (("baseline_windows", wbox, wmask), ("baseline_oracle_crops",
                                                           sc.boxes[scene_of, ok],
                                                           sc.masks[scene_of, ok])):
      report[name][modality] = {"grounding": grounding_metrics(b, m, true_box, true_mask)}
    examples[modality] = (pick, box, qbox, wbox)

    # Retrieval: every eval prompt of the modality against every scene.
    first = np.flatnonzero(np.r_[True, np.diff(scene_of) != 0])  # one row per scene
    q_embed, q_obj = out["query_embed"][first], out["objectness"][first]
    sims = np.einsum("nqd,pd->pnq", q_embed, mm_evaluate.unit(bank))
    live = q_obj > 0
    live = np.where(live.any(axis=1, keepdims=True), live, True)
    relevant = (sc.labels[None] == bank_labels[:, None, None]).any(axis=-1)
    report["interface"][modality]["retrieval"] = retrieval_metrics(
        np.where(live[None], sims, -np.inf).max(-1), relevant)
    report["interface_query_match"][modality]["retrieval"] = report["interface"][modality][
        "retrieval"]  # the same scores: a scene's best live query
    report["baseline_windows"][modality]["retrieval"] = retrieval_metrics(
        np.einsum("nwd,pd->pnw", win, mm_evaluate.unit(bank)).max(-1), relevant)
    report["baseline_oracle_crops"][modality]["retrieval"] = retrieval_metrics(
        np.where(sc.valid[None], np.einsum("nkd,pd->pnk", oracle, mm_evaluate.unit(bank)),
                 -np.inf).max(-1), relevant)
    if mi == 0:
      pred = upsample(out["query_masks"][first] > 0, s) & (q_obj > 0)[..., None, None]
      ious = np.concatenate([matched_iou(p, t, v) for p, t, v in zip(pred, sc.masks, sc.valid)])
      report["segmentation"] = {"mean_iou": float(np.mean(ious)), "count_accuracy": float(
          np.mean((q_obj > 0).sum(axis=1) == sc.valid.sum(axis=1))),
          "resolution_ceiling_iou": resolution_ceiling(sc, config.model.mask_size)}
  if out_dir is not None:
    write_report(report, out_dir)
    if ev.plots:
      plot_examples(sc, examples, env, scene_of, slot_of,
                    os.fspath(epath.Path(out_dir) / "examples.png"))
  return report


def grounding_metrics(box: np.ndarray, mask: np.ndarray, true_box: np.ndarray,
                      true_mask: np.ndarray) -> dict[str, float]:
  """Accuracy at box IoU >= 0.5, mean box IoU and mean mask IoU of predictions `[P, 4]`,
  `[P, S, S]` against the prompted items' true boxes and masks."""
  iou = scenes_lib.box_iou(box, true_box)
  return {"accuracy@iou0.5": float(np.mean(iou >= 0.5)), "mean_box_iou": float(np.mean(iou)),
          "mask_iou": float(np.mean(scenes_lib.mask_iou(mask, true_mask)))}


def resolution_ceiling(sc: scenes_lib.Scenes, mask_size: int) -> float:
  """The mean IoU of the true masks with themselves at the predicted resolution: each
  `mask_size`^2 block in the mask when half its pixels are, upsampled back to the canvas. No
  mask predicted at that size can do better on average (thin strokes lose most)."""
  true = sc.masks[sc.valid]
  blocky = upsample(scenes_lib.downsample_masks(true, mask_size) >= 0.5, true.shape[-1])
  return float(np.mean(scenes_lib.mask_iou(blocky, true)))


def scene_kwargs(config: ml_collections.ConfigDict) -> dict[str, int]:
  """The keyword arguments of `scenes.make_scenes` that `config.scenes` sets."""
  s = config.scenes
  return {"canvas_size": s.canvas_size, "min_items": s.min_items, "max_items": s.max_items,
          "threshold": s.threshold}


def write_report(report: dict[str, Any], out_dir: str) -> None:
  """`out_dir/report.md`: one table row per method and prompt modality."""
  epath.Path(out_dir).mkdir(parents=True, exist_ok=True)
  lines = ["# FIND-style interface: evaluation", "",
           f"{report['num_scenes']} eval scenes, {report['num_items']} items, each prompted "
           "once per modality; retrieval ranks every scene for every eval prompt.", "",
           "| method | prompt | grounding acc@IoU0.5 | mean box IoU | mask IoU | R@1 | R@5 | mAP |",
           "|---|---|---|---|---|---|---|---|"]
  names = {"interface": "FIND-style interface: prompt token's box",
           "interface_query_match": "FIND-style interface: query matching the prompt",
           "baseline_windows": "baseline: sliding windows",
           "baseline_oracle_crops": "baseline: oracle crops (true positions)"}
  for key, name in names.items():
    for modality, r in report[key].items():
      g, t = r["grounding"], r["retrieval"]
      lines.append(f"| {name} | {modality} | {g['accuracy@iou0.5']:.3f} | "
                   f"{g['mean_box_iou']:.3f} | {g['mask_iou']:.3f} | {t['recall@1']:.3f} | "
                   f"{t['recall@5']:.3f} | {t['map']:.3f} |")
  any_r = next(iter(report["interface"].values()))["retrieval"]
  lines += ["", f"Chance: R@1 {any_r['chance_recall@1']:.3f}, R@5 {any_r['chance_recall@5']:.3f}, "
            f"mAP {any_r['chance_map']:.3f}.", ""]
  for modality, r in report["interface"].items():
    lines.append(f"Interface, {modality} prompts: box of the predicted mask acc@IoU0.5 "
                 f"{r['grounding']['accuracy@iou0.5 (box of the mask)']:.3f}.")
  seg = report["segmentation"]
  lines += ["", f"Segmentation by the queries (no prompt): mean IoU {seg['mean_iou']:.3f} over "
            f"items (one-to-one matching; the {report['mask_size']}x{report['mask_size']} "
            f"masks' ceiling is {seg['resolution_ceiling_iou']:.3f}); object count right in "
            f"{seg['count_accuracy']:.3f} of scenes.", "",
            "![prompts, answers and boxes](examples.png)"]
  (epath.Path(out_dir) / "report.md").write_text("\n".join(lines) + "\n", encoding="utf-8")


def plot_examples(sc: scenes_lib.Scenes, examples: dict[str, Any], env: dict[str, Any],
                  scene_of: np.ndarray, slot_of: np.ndarray, path: str, *,
                  count: int = 6) -> None:
  """A few prompted items: the scene, the prompt, the true (green), the interface's by query
  matching (red) and by the prompt token (orange, dotted), and the sliding-window baseline's
  (blue, dashed) boxes."""
  plt = plots.pyplot()
  split = env["splits"]["eval"]
  rows = list(examples.items())
  count = min(count, len(scene_of))
  fig, axes = plt.subplots(len(rows), count, figsize=(2.4 * count, 2.7 * len(rows)),
                           squeeze=False)
  picks = np.linspace(0, len(scene_of) - 1, count).astype(int)
  for (modality, (pick, box, qbox, wbox)), ax_row in zip(rows, axes):
    for j, ax in zip(picks, ax_row):
      n, k = scene_of[j], slot_of[j]
      ax.imshow(sc.canvas[n, ..., 0], cmap="gray")
      if modality == "text":
        title = f'"{split.captions[pick[j]]}"'
      else:
        title = (f"audio: {mm_data.SPEAKERS[split.audio_speaker[pick[j]]]} says "
                 f"{split.audio_label[pick[j]]}")
      for b, color, style in ((sc.boxes[n, k], "lime", "-"), (qbox[j], "red", "-"),
                              (box[j], "orange", ":"), (wbox[j], "deepskyblue", "--")):
        ax.add_patch(plt.Rectangle((b[0] - 0.5, b[1] - 0.5), b[2] - b[0], b[3] - b[1],
                                   fill=False, color=color, linestyle=style, linewidth=1.5))
      ax.set_title(title, fontsize=7)
      ax.axis("off")
  fig.suptitle("green: true box, red: interface (query matching the prompt), orange dotted: "
               "interface (prompt token), blue dashed: sliding-window baseline",
               fontsize=9)
  fig.tight_layout()
  plots.save(fig, path, dpi=110)
