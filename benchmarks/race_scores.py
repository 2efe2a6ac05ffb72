"""How `benchmarks.race` scores its encoders and sums its runs up: the same code for both sides.

`score` embeds the train and test images with a run's encoder (`features`, each side in its own
framework) and scores both feature sets with `measure.probes` (kNN, linear probe); `summarize`
turns the per-seed curves into result rows, with the time-to-accuracy ratio (`time_to_accuracy`).
"""

from __future__ import annotations

import dataclasses
import statistics
from collections.abc import Sequence
from typing import Any

import numpy as np

from benchmarks import common
from benchmarks.race_common import EMBEDSPACE, REFERENCE, Data, timed
from embedspace.measure import probes

PROBE_TRAIN = 10_000
"""Train images the linear probe is fitted on (the first of the kNN database)."""


@dataclasses.dataclass
class EvalSets:
  """Normalised images and labels both encoders are scored on."""
  train_x: np.ndarray
  train_y: np.ndarray
  test_x: np.ndarray
  test_y: np.ndarray
  num_classes: int

  @classmethod
  def build(cls, data: Data, *, train_limit: int = 0, test_limit: int = 0) -> EvalSets:
    n_train = train_limit or len(data.train_labels)
    n_test = test_limit or len(data.test_labels)
    return cls(data.normalized(data.train_images[:n_train]), data.train_labels[:n_train],
               data.normalized(data.test_images[:n_test]), data.test_labels[:n_test],
               data.num_classes)


def score(run: Any, sets: EvalSets, config: Any, *, probe_train: int = PROBE_TRAIN
          ) -> dict[str, float]:
  """kNN and linear-probe accuracy of `run`'s encoder, and the time each part took.

  The kNN database is every train image of `sets`; the probe is fitted on the first
  `probe_train` of them (0: all; its L-BFGS fits cost ~140 s on 60,000 x 128 features on a
  shared 2-core CPU, ~25 s on 10,000).
  """
  (train_f, test_f), t_embed = timed(lambda: (run.features(sets.train_x),
                                              run.features(sets.test_x)))
  knn, t_knn = timed(lambda: probes.knn_classify(
      train_f, sets.train_y, test_f, sets.test_y, num_classes=sets.num_classes,
      k=config.eval.knn_k, temperature=config.eval.knn_temperature, metric="cosine",
      weighted=True))
  n = probe_train or len(train_f)
  probe, t_probe = timed(lambda: probes.linear_probe(
      train_f[:n], sets.train_y[:n], test_f, sets.test_y,
      num_classes=sets.num_classes)["accuracy"])
  return {"knn": float(knn), "probe": float(probe), "embed_s": t_embed["s"],
          "knn_s": t_knn["s"], "probe_s": t_probe["s"]}


def time_to_accuracy(curve: Sequence[tuple[float, float]], target: float
                     ) -> tuple[float | None, str]:
  """Wall time at which a curve of (wall_s, accuracy) first reaches `target`.

  Linear between points; before the first point the curve is unknown, so reaching the target
  there returns the first point's time (an upper bound, flagged "<=").
  """
  for i, (t, acc) in enumerate(curve):
    if acc >= target:
      if i == 0:
        return t, "<="
      t0, a0 = curve[i - 1]
      return t0 + (target - a0) / (acc - a0) * (t - t0), ""
  return None, ">"


def _mean_sd(values: Sequence[float]) -> tuple[float, float]:
  return statistics.mean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def summarize(method: str, results: dict[int, dict[str, dict[str, Any]]], *, steps: int,
              batch_size: int) -> list[dict[str, Any]]:
  """Rows of one method: one per side and seed, one mean row per side (with the ratio)."""
  rows = []
  budget = f"{steps} x {batch_size}"
  cpu = common._lscpu_model()  # pylint: disable=protected-access
  curves = {}
  for impl in (REFERENCE, EMBEDSPACE):
    per_seed = []
    for seed, res in results.items():
      r = res[impl]
      curve = r["curve"]
      train_s = sum(s["s"] for s in r["segments"])
      loads = [s["load"] for s in r["segments"]]
      others = [s["other_cores"] for s in r["segments"]]
      per_seed.append({"curve": curve, "train_s": train_s, "setup_s": r["setup_s"]})
      rows.append({
          "method": method, "impl": impl, "seed": str(seed), "steps x batch": budget,
          "kNN curve": " ".join(f"{c['step']}:{c['knn']:.3f}" for c in curve),
          "probe curve": " ".join(f"{c['step']}:{c['probe']:.3f}" for c in curve),
          "final kNN": curve[-1]["knn"], "final probe": curve[-1]["probe"],
          "loss": curve[-1]["loss"], "setup s": r["setup_s"], "train s": train_s,
          "wall s": r["setup_s"] + train_s, "img/s": 2 * batch_size * steps / train_s,
          "eval s": sum(c["embed_s"] + c["knn_s"] + c["probe_s"] for c in curve),
          "time-to-acc": "", "load 1 min": f"{min(loads):.1f}-{max(loads):.1f}",
          "others (cores)": f"{statistics.mean(others):.2f}"})
    n_points = len(per_seed[0]["curve"])
    mean_curve = [{
        "step": per_seed[0]["curve"][i]["step"],
        "knn": statistics.mean(p["curve"][i]["knn"] for p in per_seed),
        "probe": statistics.mean(p["curve"][i]["probe"] for p in per_seed),
        "wall_s": statistics.mean(p["curve"][i]["wall_s"] for p in per_seed)}
        for i in range(n_points)]
    curves[impl] = mean_curve
    knn_m, knn_sd = _mean_sd([p["curve"][-1]["knn"] for p in per_seed])
    probe_m, probe_sd = _mean_sd([p["curve"][-1]["probe"] for p in per_seed])
    train_m = statistics.mean(p["train_s"] for p in per_seed)
    rows.append({
        "method": method, "impl": impl, "seed": f"mean of {len(per_seed)}",
        "steps x batch": budget,
        "kNN curve": " ".join(f"{c['step']}:{c['knn']:.3f}" for c in mean_curve),
        "probe curve": " ".join(f"{c['step']}:{c['probe']:.3f}" for c in mean_curve),
        "final kNN": f"{knn_m:.4f} +- {knn_sd:.4f}", "final probe": f"{probe_m:.4f} +- "
        f"{probe_sd:.4f}", "loss": "", "setup s": statistics.mean(p["setup_s"]
                                                                   for p in per_seed),
        "train s": train_m, "wall s": mean_curve[-1]["wall_s"],
        "img/s": 2 * batch_size * steps / train_m, "eval s": "", "time-to-acc": "",
        "load 1 min": "", "others (cores)": ""})
  target = curves[REFERENCE][-1]["knn"]
  ref_wall = curves[REFERENCE][-1]["wall_s"]
  t, flag = time_to_accuracy([(c["wall_s"], c["knn"]) for c in curves[EMBEDSPACE]], target)
  if t is None:
    ratio = f"> {curves[EMBEDSPACE][-1]['wall_s'] / ref_wall:.2f}x (not reached)"
  else:
    ratio = f"{flag}{t / ref_wall:.2f}x"
  rows[-1]["time-to-acc"] = ratio
  gap = curves[EMBEDSPACE][-1]["knn"] - target
  rows.append({"benchmark": "race", "case": method, "impl": "", "summary": True,
               "ratio": ratio, "knn_gap_points": 100 * gap, "note": (
      f"{method} ({cpu}): final kNN embedspace {curves[EMBEDSPACE][-1]['knn']:.4f} vs reference "
      f"{target:.4f} ({100 * gap:+.2f} points, mean of {len(results)} seeds); time to the "
      f"reference's final kNN {ratio} of the reference's {ref_wall:.0f} s "
      f"(embedspace's whole run {curves[EMBEDSPACE][-1]['wall_s'] / ref_wall:.2f}x)")})
  return rows
