"""Losses side by side: forward + backward of embedspace's jitted losses against lightly's.

  python -m benchmarks.losses [--quick]          # prints a Markdown table
  python -m benchmarks.run_all [--quick]         # all benchmarks, writes RESULTS.md/results.json

For every loss and every `(batch, dim)` of the grid, one call computes the loss of two `[batch,
dim]` views and the gradients with respect to both, as a training step does:

- embedspace: `jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))` of `losses.info_nce`,
  `vicreg_loss`, `barlow_twins_loss` and `clip_loss` (on JAX's default backend);
- reference: lightly's `NTXentLoss`, `VICRegLoss`, `BarlowTwinsLoss` and a plain PyTorch CLIP
  loss (CUDA when torch sees a GPU, else the CPU with one thread per core), `loss.backward()`.

Hyperparameters are matched: NT-Xent temperature 0.1 on both sides (lightly's default is 0.5);
VICReg (25, 25, 1, eps 1e-4) and Barlow Twins (lambda 5e-3, eps 1e-5 of `F.batch_norm`) are the
defaults of both; CLIP's logit scale is 1/0.07 on both. Before any timing the loss values and
the gradients are checked to agree (`allclose`, rtol 1e-4 on the value, gradients within 1e-3
of their largest entry), and the result goes into the `check` column.
"""

from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

if __package__ in (None, ""):
  sys.path.insert(0, __import__("os").path.dirname(__import__("os").path.dirname(
      __import__("os").path.abspath(__file__))))

from benchmarks import common
from embedspace import losses

TEMPERATURE = 0.1
LOGIT_SCALE = math.log(1 / 0.07)

FULL_GRID = [(b, d) for b in (256, 1024, 4096) for d in (128, 2048, 8192)]
QUICK_GRID = [(64, 32), (128, 256)]

MAX_GFLOP = 260.0
"""Cases whose forward + backward needs more (estimated) GFLOP are skipped on a CPU."""

NAMES = ("info_nce", "vicreg", "barlow_twins", "clip")


def gflop(name: str, b: int, d: int) -> float:
  """Matrix-product GFLOP of forward + backward (3 products of the forward's size)."""
  if name == "info_nce":
    return 3 * 2 * (2 * b) ** 2 * d / 1e9  # [2b, d] x [d, 2b]
  if name == "clip":
    return 3 * 2 * 2 * b * b * d / 1e9  # two [b, d] x [d, b] on embedspace's side
  return 3 * 2 * 2 * b * d * d / 1e9  # two [d, b] x [b, d] covariances / one correlation


def jax_loss(name: str) -> Callable[[jax.Array, jax.Array], jax.Array]:
  """The scalar embedspace loss of two views."""
  if name == "info_nce":
    return lambda z1, z2: losses.info_nce(z1, z2, temperature=TEMPERATURE)
  if name == "vicreg":
    return lambda z1, z2: losses.vicreg_loss(z1, z2)[0]
  if name == "barlow_twins":
    return lambda z1, z2: losses.barlow_twins_loss(z1, z2, off_diagonal_weight=5e-3)[0]
  if name == "clip":
    return lambda a, b: losses.clip_loss(a, b, logit_scale=LOGIT_SCALE)
  raise ValueError(f"unknown loss {name!r}; valid: {', '.join(NAMES)}")


def torch_loss(name: str) -> Callable[[Any, Any], Any]:
  """lightly's loss (or a plain PyTorch CLIP loss) with embedspace's hyperparameters."""
  import torch
  import torch.nn.functional as F
  from lightly import loss as lightly_loss
  if name == "info_nce":
    return lightly_loss.NTXentLoss(temperature=TEMPERATURE)
  if name == "vicreg":
    return lightly_loss.VICRegLoss(lambda_param=25.0, mu_param=25.0, nu_param=1.0, eps=1e-4)
  if name == "barlow_twins":
    return lightly_loss.BarlowTwinsLoss(lambda_param=5e-3)
  if name == "clip":
    scale = min(math.exp(LOGIT_SCALE), 100.0)

    def clip(a, b):
      a, b = F.normalize(a, dim=1), F.normalize(b, dim=1)
      logits = scale * a @ b.T
      labels = torch.arange(a.shape[0], device=a.device)
      return (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2
    return clip
  raise ValueError(f"unknown loss {name!r}; valid: {', '.join(NAMES)}")


def make_pair(name: str, z1: np.ndarray, z2: np.ndarray, device: str):
  """Blocking zero-argument callables `(jax_fn, torch_fn)` returning (loss, grad1, grad2)."""
  import torch
  step = jax.jit(jax.value_and_grad(jax_loss(name), argnums=(0, 1)))
  j1, j2 = jnp.asarray(z1), jnp.asarray(z2)
  t_loss = torch_loss(name)
  t1 = torch.tensor(z1, device=device, requires_grad=True)
  t2 = torch.tensor(z2, device=device, requires_grad=True)

  def run_jax():
    return jax.block_until_ready(step(j1, j2))

  def run_torch():
    t1.grad = t2.grad = None
    value = t_loss(t1, t2)
    value.backward()
    common.torch_sync(device)
    return value, t1.grad, t2.grad

  return run_jax, run_torch


def check(jax_out: Any, torch_out: Any) -> tuple[bool, str]:
  """Loss values allclose (rtol 1e-4) and gradients within 1e-3 of their largest entry."""
  value, (g1, g2) = jax_out
  t_value, t_g1, t_g2 = (x.detach().cpu().numpy() for x in torch_out)
  value = float(value)
  ok_value = bool(np.allclose(value, t_value, rtol=1e-4, atol=1e-6))
  rel = 0.0
  for g, tg in ((g1, t_g1), (g2, t_g2)):
    g = np.asarray(g)
    rel = max(rel, float(np.max(np.abs(g - tg)) / max(np.max(np.abs(tg)), 1e-30)))
  ok = ok_value and rel < 1e-3
  text = (f"{'ok' if ok else 'MISMATCH'}: loss {value:.6g} vs {float(t_value):.6g}, "
          f"grad max rel diff {rel:.1e}")
  return ok, text


def bench_case(name: str, b: int, d: int, device: str, *, quick: bool,
               repeats: int | None = None) -> list[dict[str, Any]]:
  """Checks values, then times both implementations of one loss at one size.

  Args:
    name: one of `NAMES`.
    b: batch (rows of each view).
    d: embedding dim.
    device: torch device, 'cpu' or 'cuda'.
    quick: tiny budget, no size limit.
    repeats: timed rounds (default 3 quick, 7 otherwise).

  Returns:
    Two rows, the reference's and embedspace's (with its speedup), or two skipped rows.
  """
  case = f"{name} b={b} d={d}"
  ref = "lightly (torch)" if name != "clip" else "plain PyTorch"
  est = gflop(name, b, d)
  if not quick and est > MAX_GFLOP and jax.default_backend() == "cpu" and device == "cpu":
    skip = {"benchmark": "losses", "case": case, "skipped": True,
            "check": f"skipped: ~{est:.0f} GFLOP per call, too slow for this CPU"}
    return [dict(skip, impl=ref), dict(skip, impl="embedspace (jax)")]
  rng = np.random.default_rng(b * 7919 + d)
  z1 = rng.standard_normal((b, d), dtype=np.float32)
  z2 = (z1 + 0.5 * rng.standard_normal((b, d), dtype=np.float32)).astype(np.float32)
  run_jax, run_torch = make_pair(name, z1, z2, device)
  ok, text = check(run_jax(), run_torch())
  stats = common.compare({"jax": run_jax, "torch": run_torch},
                         repeats=repeats or (3 if quick else 7), warmup=1,
                         budget_s=2.0 if quick else 12.0)
  return [
      common.row("losses", case, ref, stats["torch"], check=text, gflop=round(est, 2),
                 values_agree=ok),
      common.row("losses", case, "embedspace (jax)", stats["jax"], reference=stats["torch"],
                 check=text, gflop=round(est, 2), values_agree=ok),
  ]


def run(quick: bool) -> list[dict[str, Any]]:
  """Every loss over the grid; returns result rows (see `benchmarks.common.row`)."""
  device = common.torch_device()
  grid = QUICK_GRID if quick else FULL_GRID
  rows = []
  for name in NAMES:
    for b, d in grid:
      rows += bench_case(name, b, d, device, quick=quick)
      r = rows[-1]
      print(f"losses {r['case']}: "
            + (f"speedup {r['speedup']:.2f}x, {r['check']}" if "speedup" in r else r["check"]),
            file=sys.stderr, flush=True)
  slower = [r for r in rows if r.get("speedup", 1.0) < 1.0]
  if slower:
    rows.append({"benchmark": "losses", "case": "summary", "impl": "", "summary": True,
                 "note": "embedspace is slower than the reference at: " + ", ".join(
                     f"{r['case']} ({r['speedup']:.2f}x)" for r in slower)})
  return rows


def main(argv: list[str] | None = None) -> None:
  """Runs the losses benchmark alone and prints its table."""
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--quick", action="store_true", help="tiny sizes, < 1 minute")
  args = parser.parse_args(argv)
  rows = run(args.quick)
  print(common.markdown_table([r for r in rows if not r.get("summary")]))


if __name__ == "__main__":
  main()
