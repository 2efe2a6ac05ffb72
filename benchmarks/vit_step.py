"""ViT training throughput: embedspace's flax ViT against the same ViT written in PyTorch.

  python -m benchmarks.vit_step [--quick] [--no_compile]   # prints a Markdown table

What is timed is one full optimisation step on a batch already in memory: the ViT encoder
(`embedspace.models.ViT`), a linear classifier on its class-token features, softmax
cross-entropy on fixed random labels, the backward pass and an AdamW update (lr 1e-3, weight
decay 0.05 on every parameter, eps 1e-8, in both).

- embedspace: `jax.jit` of the step with donated parameters and optimizer state, on one device
  of JAX's default backend (the ViT is not yet wired into the trainer, so this is a plain step,
  not `train.make_parallel_step`).
- reference: `TorchViT`, the same network in PyTorch (NCHW strided-conv patch embedding, the
  same parameters and initial values copied from the flax model, pre-LN blocks with one fused
  qkv Linear and `F.scaled_dot_product_attention`, exact GELU, LayerNorm eps 1e-6), float32,
  `torch.optim.AdamW` (its default foreach implementation); eager, and the model under
  `torch.compile` when it compiles here (not with `--quick`, a fast smoke check: compiling even
  the 2-block quick ViT takes ~50 s on 2 cores). torch uses one thread per core
  (`common.torch_device`) and passive OpenMP waiting (`common`).

`tests/test_vit.py` checks that `TorchViT` with the copied weights computes the flax ViT's
features. The JAX step's FLOP/s is XLA's cost analysis of the compiled step over its median
time, reported as a fraction of a float32 matmul's FLOP/s measured in the same run.

Measured once (2 cores of an "Intel(R) Xeon(R) Processor" with AVX-512 and AMX, shared with other
jobs: load average 1.5-3.5 during the run, so read the ratios, not the absolute times; jax 0.10.2,
torch 2.14.1): full size, torch eager 384 ms/step (166 img/s), torch.compile 394 ms (162 img/s, 21
s to compile), JAX 723 ms (88 img/s; 36.5 GFLOP/step, 50 GFLOP/s = 33% of JAX's 151 GFLOP/s float32
2048^3 matmul; torch's matmul 176 GFLOP/s): JAX 0.53x torch. At `--quick` size JAX was 1.4x faster
than torch eager (per-op overhead dominates torch there). Both start from the same weights and
agree on the first step's loss (2.8653).
"""

from __future__ import annotations

import argparse
import collections
import functools
import glob
import gzip
import json
import os
import re
import sys
import tempfile
import time
from typing import Any

import flax.linen as nn
import jax
import numpy as np
import optax

if __package__ in (None, ""):
  sys.path.insert(0, __import__("os").path.dirname(__import__("os").path.dirname(
      __import__("os").path.abspath(__file__))))

from benchmarks import common
from embedspace.models import vit

LEARNING_RATE = 1e-3
WEIGHT_DECAY = 0.05
NUM_CLASSES = 10

SIZES = {
    # ViT-Ti's widths (192, 3 heads, MLP 768) with patch 4 on 28x28x1 (50 tokens), 4 blocks
    # instead of 12: every block costs the same, so the ratio is ViT-Ti's, and torch.compile's
    # compilation stays near a minute on 2 cores (it grows with depth; 48 s at depth 2).
    "full": dict(batch=64, image_size=28, channels=1,
                 vit=dict(patch_size=4, width=192, depth=4, num_heads=3, mlp_dim=768)),
    "quick": dict(batch=16, image_size=28, channels=1,
                  vit=dict(patch_size=4, width=64, depth=2, num_heads=2, mlp_dim=128)),
}


class Classifier(nn.Module):
  """`vit.ViT` features followed by a Dense classifier (the benchmark's objective)."""
  vit_kwargs: dict[str, Any]
  num_classes: int = NUM_CLASSES

  @nn.compact
  def __call__(self, images: jax.Array) -> jax.Array:
    """[B, H, W, C] -> [B, num_classes] logits."""
    features = vit.ViT(**self.vit_kwargs, name="encoder")(images, train=True)
    return nn.Dense(self.num_classes, name="head")(features)


def torch_vit(*, patch_size: int, width: int, depth: int, num_heads: int, mlp_dim: int,
              channels: int, image_size: int, num_classes: int | None = None):
  """`TorchViT`: the PyTorch twin of `vit.ViT` (learned posemb), plus a Linear head if asked.

  Its forward takes NCHW images and returns `[B, width]` features (or `[B, num_classes]`
  logits). Load a flax model's parameters with `load_flax_params`.
  """
  import torch  # Deferred: torch is the optional `bench` extra.
  from torch import nn as tnn
  from torch.nn import functional as F

  class Block(tnn.Module):
    def __init__(self):
      super().__init__()
      self.ln1 = tnn.LayerNorm(width, eps=vit.LAYER_NORM_EPSILON)
      self.qkv = tnn.Linear(width, 3 * width)
      self.out = tnn.Linear(width, width)
      self.ln2 = tnn.LayerNorm(width, eps=vit.LAYER_NORM_EPSILON)
      self.dense1 = tnn.Linear(width, mlp_dim)
      self.dense2 = tnn.Linear(mlp_dim, width)

    def forward(self, x):
      b, length, _ = x.shape
      q, k, v = self.qkv(self.ln1(x)).reshape(
          b, length, 3, num_heads, width // num_heads).permute(2, 0, 3, 1, 4)
      y = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, length, width)
      x = x + self.out(y)
      return x + self.dense2(F.gelu(self.dense1(self.ln2(x))))

  class TorchViT(tnn.Module):
    def __init__(self):
      super().__init__()
      tokens = (image_size // patch_size) ** 2
      self.patch_embedding = tnn.Conv2d(channels, width, patch_size, patch_size)
      self.pos_embedding = tnn.Parameter(torch.zeros(1, tokens, width))
      self.cls = tnn.Parameter(torch.zeros(1, 1, width))
      self.blocks = tnn.ModuleList(Block() for _ in range(depth))
      self.encoder_norm = tnn.LayerNorm(width, eps=vit.LAYER_NORM_EPSILON)
      self.head = tnn.Linear(width, num_classes) if num_classes else None

    def forward(self, images):
      x = self.patch_embedding(images).flatten(2).transpose(1, 2) + self.pos_embedding
      x = torch.cat([self.cls.expand(x.shape[0], -1, -1), x], dim=1)
      for block in self.blocks:
        x = block(x)
      x = self.encoder_norm(x[:, 0])
      return x if self.head is None else self.head(x)

  return TorchViT()


def load_flax_params(model, encoder: dict[str, Any], head: dict[str, Any] | None = None):
  """Copies a flax `vit.ViT`'s params (and a Dense head's) into `torch_vit(...)`; returns it."""
  import torch  # Deferred: torch is the optional `bench` extra.

  def t(x):
    return torch.tensor(np.asarray(x, np.float32))

  def linear(module, p):
    module.weight.data = t(p["kernel"]).reshape(-1, module.weight.shape[0]).T.contiguous()
    module.bias.data = t(p["bias"]).reshape(-1)

  def norm(module, p):
    module.weight.data, module.bias.data = t(p["scale"]), t(p["bias"])

  model.patch_embedding.weight.data = t(encoder["patch_embedding"]["kernel"]).permute(
      3, 2, 0, 1).contiguous()
  model.patch_embedding.bias.data = t(encoder["patch_embedding"]["bias"])
  model.pos_embedding.data = t(encoder["pos_embedding"])
  model.cls.data = t(encoder["cls"])
  norm(model.encoder_norm, encoder["encoder_norm"])
  for i, block in enumerate(model.blocks):
    p = encoder[f"block{i + 1}"]
    attention = p["attention"]
    width = block.qkv.in_features
    block.qkv.weight.data = torch.cat(
        [t(attention[k]["kernel"]).reshape(width, width).T for k in ("query", "key", "value")])
    block.qkv.bias.data = torch.cat(
        [t(attention[k]["bias"]).reshape(-1) for k in ("query", "key", "value")])
    linear(block.out, attention["out"])
    norm(block.ln1, p["ln1"])
    norm(block.ln2, p["ln2"])
    linear(block.dense1, p["mlp"]["dense1"])
    linear(block.dense2, p["mlp"]["dense2"])
  if head is not None:
    linear(model.head, head)
  return model


def jax_step(size: dict[str, Any], images: np.ndarray, labels: np.ndarray):
  """The compiled JAX step (a blocking closure over its state), its XLA cost and init params."""
  model = Classifier(vit_kwargs=size["vit"])
  device = jax.devices()[0]
  x, y = jax.device_put(images, device), jax.device_put(labels, device)
  params = jax.jit(model.init)(jax.random.key(0), x)["params"]
  tx = optax.adamw(LEARNING_RATE, weight_decay=WEIGHT_DECAY)
  initial = jax.tree.map(np.asarray, params)

  @functools.partial(jax.jit, donate_argnums=(0, 1))
  def step(params, opt_state, images, labels):
    def loss_fn(p):
      logits = model.apply({"params": p}, images)
      return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
    loss, grads = jax.value_and_grad(loss_fn)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  opt_state = tx.init(params)
  flops_bytes = common.cost(step.lower(params, opt_state, x, y).compile())
  holder = {"params": params, "opt_state": opt_state}

  def run_step():
    holder["params"], holder["opt_state"], loss = step(holder["params"], holder["opt_state"], x, y)
    return float(loss)

  return run_step, flops_bytes, initial


def torch_steps(size: dict[str, Any], images: np.ndarray, labels: np.ndarray,
                initial: dict[str, Any], device: str, *, compile_: bool):
  """Blocking PyTorch steps from the same initial weights: {'eager': fn, 'compile': fn}."""
  import torch  # Deferred: torch is the optional `bench` extra.
  x = torch.tensor(images.transpose(0, 3, 1, 2).copy(), device=device)
  y = torch.tensor(labels.astype(np.int64), device=device)

  def build():
    model = torch_vit(**size["vit"], channels=size["channels"], image_size=size["image_size"],
                      num_classes=NUM_CLASSES)
    return load_flax_params(model, initial["encoder"], initial["head"]).to(device).train()

  def make(model, module):
    opt = torch.optim.AdamW(module.parameters(), lr=LEARNING_RATE, weight_decay=WEIGHT_DECAY,
                            eps=1e-8)

    def step():
      opt.zero_grad(set_to_none=True)
      loss = torch.nn.functional.cross_entropy(model(x), y)
      loss.backward()
      opt.step()
      common.torch_sync(device)
      return loss.item()
    return step

  return common.torch_eager_and_compiled(build, make, compile_=compile_)


def run(quick: bool, *, compile_: bool = True) -> list[dict[str, Any]]:
  """Images/s of the JAX and PyTorch ViT steps and the JAX step's FLOP/s; returns result rows."""
  size = SIZES["quick" if quick else "full"]
  device = common.torch_device()
  b, s, c = size["batch"], size["image_size"], size["channels"]
  rng = np.random.default_rng(0)
  images = rng.standard_normal((b, s, s, c), dtype=np.float32)
  labels = rng.integers(0, NUM_CLASSES, b).astype(np.int32)
  t0 = time.perf_counter()
  j_step, (flops, bytes_accessed), initial = jax_step(size, images, labels)
  j_first = j_step()
  compile_s = time.perf_counter() - t0
  t_steps, notes = torch_steps(size, images, labels, initial, device,
                               compile_=compile_ and not quick)
  t_first = t_steps["eager"]()
  fns = {"jax": j_step, **{f"torch_{k}": v for k, v in t_steps.items()}}
  stats = common.compare(fns, repeats=3 if quick else 10, warmup=1 if quick else 2,
                         budget_s=5.0 if quick else 90.0)
  n = 512 if quick else 2048
  mm_stats = common.matmul_peak(n, repeats=3 if quick else 5, device=device)
  peak = 2 * n ** 3 / mm_stats["jax"]["median_s"]
  torch_peak = 2 * n ** 3 / mm_stats["torch"]["median_s"]
  achieved = flops / stats["jax"]["median_s"]
  v = size["vit"]
  case = (f"ViT step, batch {b} of {s}x{s}x{c}, patch {v['patch_size']} width {v['width']} "
          f"depth {v['depth']} heads {v['num_heads']} mlp {v['mlp_dim']}, CE + AdamW")
  ref = stats["torch_eager"]
  ips = lambda st: f"{b / st['median_s']:.0f} img/s"
  rows = [common.row("vit_step", case, "PyTorch (eager)", ref, throughput=ips(ref))]
  if "torch_compile" in stats:
    rows.append(common.row("vit_step", case, "PyTorch (torch.compile)", stats["torch_compile"],
                           reference=ref, throughput=ips(stats["torch_compile"])))
  rows.append(common.row(
      "vit_step", case, "embedspace (jax)", stats["jax"], reference=ref,
      throughput=ips(stats["jax"]), step_gflop=flops / 1e9, gflops_per_s=achieved / 1e9,
      step_gbytes=bytes_accessed / 1e9, compile_s=compile_s,
      check=f"{flops / 1e9:.1f} GFLOP/step (XLA), {achieved / 1e9:.0f} GFLOP/s = "
            f"{100 * achieved / peak:.0f}% of matmul peak; first-step loss jax {j_first:.4f} "
            f"torch {t_first:.4f}"))
  rows += common.matmul_peak_rows("vit_step", n, mm_stats)
  rows += common.note_rows("vit_step", notes)
  ratios = ", ".join(f"{k} {stats[k]['median_s'] / stats['jax']['median_s']:.2f}x"
                     for k in stats if k != "jax")
  rows.append({"benchmark": "vit_step", "case": "summary", "impl": "", "summary": True,
               "note": f"JAX ViT step: {flops / 1e9:.1f} GFLOP per step by XLA's cost "
                       f"analysis, {achieved / 1e9:.0f} GFLOP/s, {100 * achieved / peak:.0f}% "
                       f"of the {peak / 1e9:.0f} GFLOP/s float32 matmul (torch's: "
                       f"{torch_peak / 1e9:.0f}) measured in the same run; speed of JAX over "
                       f"the references (their median time / JAX's): {ratios}; compilation + "
                       f"first step {compile_s:.0f} s."})
  return rows


def profile(quick: bool, *, steps: int = 3, out_dir: str | None = None) -> dict[str, float]:
  """Milliseconds per step of the JAX step's XLA operations, summed by kind, from a trace.

  The kinds are the compiled program's thunk names without their numbers: `ynn_fusion` (the
  XNNPACK dots and convolutions), elementwise loop fusions named after their ops
  (`copy_bitcast_fusion`, `select_select_fusion`, ...), `wrapped_broadcast` and so on. Needs
  `XLA_FLAGS=--xla_cpu_enable_xprof_traceme=true` (set before JAX starts) for the per-thunk
  events; the sum can exceed the wall time, as XLA runs independent thunks concurrently.
  """
  size = SIZES["quick" if quick else "full"]
  rng = np.random.default_rng(0)
  b, s, c = size["batch"], size["image_size"], size["channels"]
  images = rng.standard_normal((b, s, s, c), dtype=np.float32)
  labels = rng.integers(0, NUM_CLASSES, b).astype(np.int32)
  run_step, _, _ = jax_step(size, images, labels)
  for _ in range(2):
    run_step()
  out_dir = out_dir or tempfile.mkdtemp(prefix="vit_step_trace_")
  with jax.profiler.trace(out_dir, create_perfetto_trace=True):
    for _ in range(steps):
      run_step()
  (path,) = glob.glob(os.path.join(out_dir, "**", "*perfetto_trace.json.gz"), recursive=True)
  with gzip.open(path, "rt", encoding="utf-8") as f:
    trace = json.load(f)
  events = trace["traceEvents"] if isinstance(trace, dict) else trace
  totals: collections.Counter[str] = collections.Counter()
  for e in events:
    name = e.get("name", "")
    if e.get("ph") == "X" and "dur" in e and not name.startswith(("$", "ThunkExecutor", "np.")):
      totals[re.sub(r"\.\d+$", "", name)] += e["dur"] / 1e3 / steps
  return dict(totals.most_common())


def main(argv: list[str] | None = None) -> None:
  """Runs the ViT training-step benchmark alone and prints its table."""
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--quick", action="store_true", help="a tiny ViT, < 1 minute")
  parser.add_argument("--no_compile", action="store_true", help="skip torch.compile")
  parser.add_argument("--profile", action="store_true",
                      help="only the JAX step's time per kind of XLA operation (see `profile`)")
  args = parser.parse_args(argv)
  if args.profile:
    totals = profile(args.quick)
    whole = sum(totals.values())
    for kind, ms in list(totals.items())[:20]:
      print(f"{ms:9.2f} ms/step {100 * ms / whole:5.1f}%  {kind}")
    return
  common.print_rows(run(args.quick, compile_=not args.no_compile))


if __name__ == "__main__":
  main()
