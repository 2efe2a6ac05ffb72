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
Exit codes: 0 done, 2 bad input (one line `error: ...`), 3 the model's embeddings are not finite
(NaN or inf; one line naming how many).
"""

from __future__ import annotations

import json
import os
import sys

from absl import flags

from embedspace.core import cli
from embedspace.core.cli import fail

NONFINITE_EXIT_CODE = 3

SUMMARY_KEYS = ("trained", "random_init", "raw_pixels", "zero_shot", "retrieval", "probe",
                "accuracy", "interface", "baseline_windows")


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    fail(f"unexpected arguments {argv[1:]}; flags take the form --name=value")
  from embedspace import data, geometry, methods  # After flag parsing: --help stays fast.
  from embedspace.core import train as core_train
  from embedspace.core import lock, workdirs
  from embedspace.core.config_checks import ConfigError
  from embedspace.space import image as image_space
  from embedspace.space import pretrained

  f = flags.FLAGS
  workdir, out_dir = f.workdir, f.out_dir
  if workdir.startswith(pretrained.PREFIX):  # A shipped space: its report never goes into the
    name = workdir[len(pretrained.PREFIX):]   # installed package, but to ./eval/NAME.
    out_dir = out_dir or os.path.abspath(os.path.join("eval", name))
    try:
      workdir = pretrained.resolve(workdir)
    except FileNotFoundError as e:
      fail(str(e))
  out_dir = os.path.abspath(out_dir or os.path.join(workdir, "eval"))
  code_lengths = _checked_flags(f, out_dir)
  try:
    task = methods.task(methods.method_of(workdir))
    config = workdirs.read_config(workdir)
    if f.ood_dataset:  # Before the evaluation's minutes of work, not after them.
      try:
        data.get_source(f.ood_dataset, split="test", data_dir=config.get("data", {}).get(
            "data_dir"))
      except (ValueError, FileNotFoundError) as e:
        fail(f"--ood_dataset={f.ood_dataset}: {e} (--ood_dataset='' skips OOD)")
    if "knn_k" in config.get("eval", {}):  # An image space: the evaluation's options apply.
      with config.unlocked():
        config.eval.full = True  # every measure, OOD, geometry and pictures, whatever trained
        config.eval.command = "python -m embedspace.evaluate " + " ".join(sys.argv[1:])
        for key in ("ood_dataset", "tsne", "max_pair_points", "code_lengths"):
          if f[key].present or key not in config.eval:
            value = f[key].value
            config.eval[key] = code_lengths if key == "code_lengths" else value
    report = core_train.evaluate_workdir(task, workdir, config=config, out_dir=out_dir)
  except (*image_space.LOAD_ERRORS, ConfigError, lock.LockError) as e:
    fail(str(e))
  except geometry.NonFiniteError as e:
    fail(str(e), NONFINITE_EXIT_CODE)
  summary = {k: report[k] for k in SUMMARY_KEYS if k in report}
  print(f"evaluation of {f.workdir} (report in {out_dir}): {json.dumps(summary)}", flush=True)


def _checked_flags(f: flags.FlagValues, out_dir: str) -> tuple[int, ...]:
  """Fails (one line, exit 2) on a flag value the evaluation would trip over after minutes of
  work (`out_dir`: where the report goes); returns the code lengths as ints."""
  try:
    code_lengths = tuple(int(b) for b in f.code_lengths)
  except ValueError:
    code_lengths = ()
  if not code_lengths or min(code_lengths) < 1:
    fail(f"--code_lengths={','.join(f.code_lengths)}: pass positive integers (bits of the "
         "Hamming codes), e.g. --code_lengths=16,64,256")
  if f.max_pair_points < 2:
    fail(f"--max_pair_points={f.max_pair_points}: must be >= 2 (the pair statistics need pairs)")
  if os.path.exists(out_dir) and not os.path.isdir(out_dir):
    fail(f"--out_dir={out_dir} is a file; pass a directory (it is created if missing)")
  parent = out_dir
  while not os.path.exists(parent):
    parent = os.path.dirname(parent)
  if not os.path.isdir(parent) or not os.access(parent, os.W_OK | os.X_OK):
    fail(f"--out_dir={out_dir}: {parent} is not a writable directory; pass one you can write to")
  return code_lengths


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
  cli.run_app(main, _define_flags, __doc__, __name__)


if __name__ == "__main__":
  run()
