"""Evaluate any finished run again: `python -m embedspace.evaluate --workdir=DIR`.

  python -m embedspace.evaluate --workdir=workdirs/vicreg                  # report in DIR/eval
  python -m embedspace.evaluate --workdir=workdirs/vicreg --ood_dataset='' --notsne
  python -m embedspace.evaluate --workdir=workdirs/imagebind --out_dir=/tmp/imagebind_eval
  python -m embedspace.evaluate --workdir=workdirs/find

The workdir's method (its `config.json`) names the task (`embedspace.methods`), whose evaluation
runs on the newest intact checkpoint exactly as at the end of training
(`core.train.evaluate_workdir`): for an image method kNN, linear probe, retrieval under every
measure, OOD and geometry beside raw pixels and the random encoder (`ssl.evaluate`); for
CLIP/ImageBind/DeCUR zero-shot, retrieval and emergent alignment; for the interfaces their
accuracy against baselines. The flags below the first two set the image evaluation's options.
Exit codes: 0 done, 2 bad input (one line `error: ...`).
"""

from __future__ import annotations

import json
import os
import sys

from absl import flags

from embedspace.core.cli import fail

SUMMARY_KEYS = ("trained", "random_init", "raw_pixels", "zero_shot", "retrieval", "probe",
                "accuracy", "interface", "baseline_windows")


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    fail(f"unexpected arguments {argv[1:]}; flags take the form --name=value")
  from embedspace import methods  # After flag parsing: --help stays fast.
  from embedspace.core import train as core_train
  from embedspace.core import workdirs
  from embedspace.core.config_checks import ConfigError
  from embedspace.space import image as image_space

  f = flags.FLAGS
  try:
    task = methods.task(methods.method_of(f.workdir))
    config = workdirs.read_config(f.workdir)
    if "knn_k" in config.get("eval", {}):  # An image space: the evaluation's options apply.
      with config.unlocked():
        config.eval.full = True  # every measure, OOD, geometry and pictures, whatever trained
        config.eval.command = "python -m embedspace.evaluate " + " ".join(sys.argv[1:])
        for key in ("ood_dataset", "tsne", "max_pair_points", "code_lengths"):
          if f[key].present or key not in config.eval:
            value = f[key].value
            config.eval[key] = tuple(int(b) for b in value) if key == "code_lengths" else value
    report = core_train.evaluate_workdir(task, f.workdir, config=config, out_dir=f.out_dir)
  except (*image_space.LOAD_ERRORS, ConfigError) as e:
    fail(str(e))
  out_dir = f.out_dir or os.path.join(f.workdir, "eval")
  summary = {k: report[k] for k in SUMMARY_KEYS if k in report}
  print(f"evaluation of {f.workdir} (report in {out_dir}): {json.dumps(summary)}", flush=True)


def _define_flags() -> None:
  flags.DEFINE_string("workdir", None, "A training workdir (config.json + checkpoints/).")
  flags.DEFINE_string("out_dir", None, "Where the report goes (default WORKDIR/eval).")
  flags.DEFINE_string("ood_dataset", "embedded_mnist",
                      "Image methods: out-of-distribution dataset ('' skips OOD).")
  flags.DEFINE_bool("tsne", True, "Image methods: also draw t-SNE maps (scikit-learn).")
  flags.DEFINE_integer("max_pair_points", 1024, "Image methods: points of the pair statistics.")
  flags.DEFINE_list("code_lengths", ["16", "64", "256", "1024"],
                    "Image methods: bits of the Hamming (SimHash) codes.")
  flags.mark_flag_as_required("workdir")


def run() -> None:
  """The console script `embedspace-evaluate` (the same as `python -m embedspace.evaluate`)."""
  from absl import app

  from embedspace.core.cli import parse_flags
  _define_flags()
  app.run(main, flags_parser=parse_flags)


if __name__ == "__main__":
  run()
