"""Training throughput: embedspace's jitted VICReg step against a PyTorch + lightly loop.

  python -m benchmarks.train_step [--quick] [--no_compile]   # prints a Markdown table
  python -m benchmarks.run_all [--quick]                      # all benchmarks

What is timed is one full optimisation step on a batch of image pairs already in memory (no
input pipeline): encoder and projector on both views, the VICReg loss, the backward pass and
the AdamW update.

- embedspace: the step `core.train.prepare` builds for `configs/vicreg.py`, compiled by
  `Prepared.parallel_step` (its ResNet `small`, its 1024-1024-1024 projector, batch 256 pairs,
  AdamW with weight decay on kernels only) on the 1-device mesh of JAX's default backend: the
  compiled program `python -m embedspace.main` runs.
- reference: the same network written in PyTorch (CIFAR stem, BasicBlocks with zero-initialised
  last BN and 1x1 projection shortcuts, Linear-BN-ReLU projector without biases, BN momentum 0.1
  = flax's 0.9, eps 1e-5), lightly's `VICRegLoss` (25, 25, 1), `torch.optim.AdamW` with the same
  decay groups, float32, NCHW, eager; and the same under `torch.compile` when it compiles here.

Images/s counts both views (2 x batch per step), as the trainer's log does. The FLOP/s of the
JAX step is XLA's cost analysis of the compiled step (`flops`) over its median time, reported
as a fraction of a large float32 matmul's FLOP/s measured in the same run.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np

if __package__ in (None, ""):
  sys.path.insert(0, __import__("os").path.dirname(__import__("os").path.dirname(
      __import__("os").path.abspath(__file__))))

from benchmarks import common
from configs import vicreg as vicreg_config
from embedspace import methods
from embedspace import parallel
from embedspace.core import train as core_train


def jax_step(config, batch_np: dict[str, np.ndarray]):
  """embedspace's compiled step (a blocking closure over its state) and its XLA cost."""
  mesh = parallel.make_mesh(jax.devices()[:1])
  run = core_train.prepare(methods.task(config.method), config, mesh)
  state = parallel.replicate(mesh, run.state)
  batch = parallel.shard_batch(mesh, batch_np)
  p_step = run.parallel_step(mesh)
  flops_bytes = common.cost(p_step.lower(state, batch).compile())
  holder = {"state": state}

  def step():
    holder["state"], metrics = p_step(holder["state"], batch)
    return jax.block_until_ready(metrics["loss"])

  return step, flops_bytes


def torch_model(config):
  """The PyTorch twin of `ssl.task.build_model(config)` (encoder + projector)."""
  from torch import nn

  class Block(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int):
      super().__init__()
      self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
      self.bn1 = nn.BatchNorm2d(cout)
      self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
      self.bn2 = nn.BatchNorm2d(cout)
      nn.init.zeros_(self.bn2.weight)
      self.proj = None
      if stride != 1 or cin != cout:
        self.proj = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False),
                                  nn.BatchNorm2d(cout))

    def forward(self, x):
      y = torch.relu(self.bn1(self.conv1(x)))
      y = self.bn2(self.conv2(y))
      return torch.relu((x if self.proj is None else self.proj(x)) + y)

  import torch
  w, stages = config.model.width, tuple(config.model.stage_sizes)
  layers: list[nn.Module] = [nn.Conv2d(1, w, 3, 1, 1, bias=False), nn.BatchNorm2d(w), nn.ReLU()]
  cin = w
  for i, blocks in enumerate(stages):
    for j in range(blocks):
      layers.append(Block(cin, w * 2 ** i, 2 if i > 0 and j == 0 else 1))
      cin = w * 2 ** i
  layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), *torch_mlp(cin, config.model.projector_dims)]
  return nn.Sequential(*layers)


def torch_mlp(cin: int, dims: Sequence[int]) -> Any:
  """The PyTorch twin of `models.MLP(dims)` on `cin` inputs: `Linear-BN-ReLU` per hidden width
  (no Linear bias; BN momentum 0.1 = flax's 0.9, eps 1e-5, torch's defaults), a final Linear
  without bias."""
  from torch import nn
  layers: list[nn.Module] = []
  for dim in tuple(dims)[:-1]:
    layers += [nn.Linear(cin, dim, bias=False), nn.BatchNorm1d(dim), nn.ReLU()]
    cin = dim
  layers.append(nn.Linear(cin, dims[-1], bias=False))
  return nn.Sequential(*layers)


def torch_steps(config, batch_np: dict[str, np.ndarray], device: str, *, compile_: bool):
  """Blocking PyTorch + lightly train steps: {'eager': fn} and, if it works, {'compile': fn}."""
  import torch
  from lightly.loss import VICRegLoss
  torch.manual_seed(0)
  loss_fn = VICRegLoss(lambda_param=config.loss.invariance_weight,
                       mu_param=config.loss.variance_weight,
                       nu_param=config.loss.covariance_weight)
  v1 = torch.tensor(batch_np["view1"].transpose(0, 3, 1, 2).copy(), device=device)
  v2 = torch.tensor(batch_np["view2"].transpose(0, 3, 1, 2).copy(), device=device)
  lr = config.optimizer.base_lr * config.batch_size / 256

  def make(model, module):
    params = list(module.parameters())
    opt = torch.optim.AdamW(
        [{"params": [p for p in params if p.ndim > 1],
          "weight_decay": config.optimizer.weight_decay},
         {"params": [p for p in params if p.ndim <= 1], "weight_decay": 0.0}], lr=lr)

    def step():
      opt.zero_grad(set_to_none=True)
      loss = loss_fn(model(v1), model(v2))
      loss.backward()
      opt.step()
      common.torch_sync(device)
      return loss.item()
    return step

  return common.torch_eager_and_compiled(lambda: torch_model(config).to(device).train(), make,
                                         compile_=compile_)


def run(quick: bool, *, compile_: bool = True) -> list[dict[str, Any]]:
  """Images/s of both training loops and the JAX step's FLOP/s; returns result rows."""
  config = vicreg_config.get_config("smoke" if quick else None)
  device = common.torch_device()
  b = config.batch_size
  rng = np.random.default_rng(0)
  shape = (b, config.data.image_size, config.data.image_size, 1)
  batch = {"view1": rng.random(shape, dtype=np.float32),
           "view2": rng.random(shape, dtype=np.float32)}
  t0 = time.perf_counter()
  j_step, (flops, bytes_accessed) = jax_step(config, batch)
  j_step()
  compile_s = time.perf_counter() - t0
  t_steps, notes = torch_steps(config, batch, device, compile_=compile_ and not quick)
  fns = {"jax": j_step, **{f"torch_{k}": v for k, v in t_steps.items()}}
  stats = common.compare(fns, repeats=3 if quick else 10, warmup=1 if quick else 2,
                         budget_s=5.0 if quick else 150.0)
  n = 512 if quick else 4096
  mm_stats = common.matmul_peak(n, repeats=3 if quick else 5, device=device)
  peak = 2 * n ** 3 / mm_stats["jax"]["median_s"]
  achieved = flops / stats["jax"]["median_s"]
  case = (f"VICReg step, {b} pairs of {shape[1]}x{shape[2]}x1, stages "
          f"{tuple(config.model.stage_sizes)} width {config.model.width}, projector "
          f"{tuple(config.model.projector_dims)}, AdamW")
  ref = stats["torch_eager"]
  ips = lambda s: f"{2 * b / s['median_s']:.0f} img/s"
  rows = [common.row("train_step", case, "PyTorch + lightly (eager)", ref, throughput=ips(ref))]
  if "torch_compile" in stats:
    rows.append(common.row("train_step", case, "PyTorch + lightly (torch.compile)",
                           stats["torch_compile"], reference=ref,
                           throughput=ips(stats["torch_compile"])))
  rows.append(common.row(
      "train_step", case, "embedspace (jax)", stats["jax"], reference=ref,
      throughput=ips(stats["jax"]), step_gflop=flops / 1e9, gflops_per_s=achieved / 1e9,
      step_gbytes=bytes_accessed / 1e9, compile_s=compile_s,
      check=f"{flops / 1e9:.1f} GFLOP/step (XLA), {achieved / 1e9:.0f} GFLOP/s = "
            f"{100 * achieved / peak:.0f}% of matmul peak"))
  rows += common.matmul_peak_rows("train_step", n, mm_stats)
  rows += common.note_rows("train_step", notes)
  rows.append({"benchmark": "train_step", "case": "summary", "impl": "", "summary": True,
               "note": f"JAX step: {flops / 1e9:.1f} GFLOP per step by XLA's cost analysis, "
                       f"{achieved / 1e9:.0f} GFLOP/s, {100 * achieved / peak:.0f}% of the "
                       f"{peak / 1e9:.0f} GFLOP/s float32 matmul measured in the same run; "
                       f"{bytes_accessed / 1e9:.2f} GB accessed per step (XLA), an arithmetic "
                       f"intensity of {flops / bytes_accessed:.0f} FLOP/byte; compilation + "
                       f"first step {compile_s:.0f} s."})
  return rows


def main(argv: list[str] | None = None) -> None:
  """Runs the training-step benchmark alone and prints its table."""
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--quick", action="store_true", help="the smoke config, < 1 minute")
  parser.add_argument("--no_compile", action="store_true", help="skip torch.compile")
  args = parser.parse_args(argv)
  common.print_rows(run(args.quick, compile_=not args.no_compile))


if __name__ == "__main__":
  main()
