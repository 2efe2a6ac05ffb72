"""The cells every notebook shares: environment, parameters, plotting; `md`, `code`, `header`.

Each notebook's own cells live in `cells_NN.py`; `build_notebooks.py` writes and runs them.
"""

from __future__ import annotations

import nbformat

# ------------------------------------------------------------------------------------------------
# Shared cells.

SETUP = r'''# Environment: on Colab, clone and install embedspace; in a local checkout, use it as it is.
import importlib.util, os, shutil, subprocess, sys

# ---- PARAMETER (Colab only) ------------------------------------------------------------------
# REPO: the git URL of the embedspace repository to clone,
#   e.g. "https://github.com/OWNER/embedspace" (your fork or the copy you were given; a private
#   one needs a token in the URL, or a path on a mounted Drive). Set it here or in the
#   EMBEDSPACE_REPO environment variable. A local checkout does not use it.
REPO = os.environ.get("EMBEDSPACE_REPO", "")
# ------------------------------------------------------------------------------------------------
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
    if not REPO:
      raise RuntimeError("Set REPO at the top of this cell to the git URL of the embedspace "
                         "repository (e.g. https://github.com/OWNER/embedspace), then run it "
                         "again.")
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


COLAB = "https://colab.research.google.com/github/OWNER/embedspace/blob/main/experiments/"
"""Colab's address of the notebooks once the repository is on GitHub: OWNER is a placeholder for
its owner (the setup cell's `REPO` parameter is what a run needs)."""


def header(title: str, extra_parameters: str, filename: str) -> list[nbformat.NotebookNode]:
  return [
      md(title.strip("\n") + f"\n\n[Open in Colab]({COLAB}{filename}) (replace OWNER in the "
         "link with the repository's GitHub owner, or upload the notebook to Colab; any runtime "
         "works, a TPU one uses all 8 cores)."),
      md("**Setup.** On Colab, first set the parameter `REPO` at the top of the next cell to the "
         "git URL of the embedspace repository (e.g. `https://github.com/OWNER/embedspace`; or "
         "set `EMBEDSPACE_REPO`): the cell clones it, installs it with the JAX build for the "
         "runtime's accelerator and prints the devices. In a local checkout `REPO` is not used "
         "and nothing is installed when `embedspace` is importable."),
      code(SETUP),
      code(PARAMETERS_HEAD + "\n" + extra_parameters.strip("\n"), tags=["parameters"]),
      code(SIZES_CHECK + "\n\n" + PLOTTING),
  ]
