"""Scale on paper: what a training step costs as the device count and the global batch grow.

  python benchmarks/scale_on_paper.py                # ~3 min on 2 CPU cores; prints Markdown
  python benchmarks/scale_on_paper.py --json=scale.json

Nothing is run: each program is compiled for 1, 2, 4 and 8 (virtual CPU) devices from abstract
inputs (`jax.ShapeDtypeStruct`, so no batch is allocated), and two things are read from it:

- XLA's cost analysis of the compiled program, `jax.jit(...).lower(...).compile()
  .cost_analysis()`: FLOPs and bytes accessed *per device* (the SPMD program one device runs).
- The collectives in the compiled HLO (`all-gather`, `all-reduce`, `reduce-scatter`, ...): the
  size of the whole buffer each one combines, and the bytes each device sends under the ring
  algorithm, `(n-1)/n` of the buffer for an all-gather or a reduce-scatter and `2(n-1)/n` for an
  all-reduce. These are the bytes an interconnect must move, whatever its speed.

Programs: the real training step (`core.step.make_parallel_step` of the step `core.train`
builds from the SSL task's loss) of the default configs
`configs/vicreg.py` and `configs/simclr.py` (the same encoder; SimCLR's projector ends at 128-d
and its loss is InfoNCE over gathered negatives), and the two contrastive losses alone (`losses.info_nce`, `losses.clip_loss`, value and gradient) at global
batches up to 65,536. The step's embedding-health metrics, computed only every `log_every` steps
inside a `lax.cond`, are left out (replaced by zeros here): the numbers are an ordinary step's.

The last table extrapolates to a pod with the formulas of `pod_table` from these measured
numbers; its hardware figures (`--chip_tflops`, `--chip_gbps`) are assumptions, stated with it.
"""

from __future__ import annotations

import os

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                           + " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import argparse  # noqa: E402
import dataclasses  # noqa: E402
import functools  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import re  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from typing import Any  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from jax.sharding import NamedSharding, PartitionSpec as P  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from configs import simclr, vicreg  # noqa: E402
from embedspace import losses, methods, parallel  # noqa: E402
from embedspace.core import optim  # noqa: E402
from embedspace.core import step as step_lib  # noqa: E402
from embedspace.core import train as core_train  # noqa: E402
from embedspace.ssl import task as ssl_task  # noqa: E402

DEVICE_COUNTS = (1, 2, 4, 8)
COLLECTIVES = ("all-gather", "all-reduce", "reduce-scatter", "all-to-all", "collective-permute")
_BYTES = {"pred": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "f16": 2, "bf16": 2, "s32": 4,
          "u32": 4, "f32": 4, "s64": 8, "u64": 8, "f64": 8, "c64": 8, "c128": 16}
_SHAPE = re.compile(r"\b(" + "|".join(_BYTES) + r")\[([\d,]*)\]")
_OP = re.compile(r"^\s*(?:ROOT\s+)?%?[\w.\-]+ = (.+?) (" + "|".join(COLLECTIVES)
                 + r")(?:-start)?\((.*)$")


# ----------------------------------------------------------------------------------------------
# Reading a compiled program.


@dataclasses.dataclass(frozen=True)
class Collective:
  """One collective of a compiled program."""
  kind: str  # 'all-gather', 'all-reduce', ...
  buffer_bytes: int  # the whole buffer combined (gathered result, reduced value, scattered input)
  group: int  # devices taking part

  @property
  def ring_bytes(self) -> float:
    """Bytes each device sends with the ring algorithm."""
    share = (self.group - 1) / self.group
    return (2 if self.kind == "all-reduce" else 1) * share * self.buffer_bytes


def _array_bytes(text: str) -> list[int]:
  """Bytes of each array of an HLO shape, e.g. 'f32[64,32]{1,0}' or '(f32[], f32[8])'."""
  return [_BYTES[t] * math.prod(int(d) for d in dims.split(",") if d)
          for t, dims in _SHAPE.findall(text)]


def _group_size(attributes: str, default: int) -> int:
  explicit = re.search(r"replica_groups=\{\{([\d,]*)\}", attributes)
  if explicit:
    return len(explicit.group(1).split(","))
  iota = re.search(r"replica_groups=\[(\d+),(\d+)\]", attributes)  # '[groups,size]<=[n]'
  return int(iota.group(2)) if iota else default


def collectives(hlo_text: str, num_devices: int) -> list[Collective]:
  """The collectives of a compiled HLO module (async `-start` ops counted once).

  The buffer of an all-gather is its result (the largest array of an async start's tuple); of
  an all-reduce, its result (all arrays of a combined tuple); of a reduce-scatter, its result
  (one device's share) times the group.
  """
  found = []
  for line in hlo_text.splitlines():
    match = _OP.match(line)
    if not match:
      continue
    shape, kind, attributes = match.groups()
    group = _group_size(attributes, num_devices)
    arrays = _array_bytes(shape)
    size = max(arrays) if kind == "all-gather" else sum(arrays)
    if kind == "reduce-scatter":
      size *= group
    found.append(Collective(kind, size, group))
  return found


@dataclasses.dataclass
class Cost:
  """Per-device cost of one compiled program."""
  gflops: float
  gbytes_accessed: float
  collectives: dict[str, dict[str, float]]  # kind -> {"count", "buffer_mb", "ring_mb"}

  @property
  def ring_mb(self) -> float:
    return sum(c["ring_mb"] for c in self.collectives.values())


def cost_of(compiled: Any, num_devices: int) -> Cost:
  analysis = compiled.cost_analysis()
  analysis = analysis[0] if isinstance(analysis, (list, tuple)) else analysis
  summary: dict[str, dict[str, float]] = {}
  for c in collectives(compiled.as_text(), num_devices):
    s = summary.setdefault(c.kind, {"count": 0, "buffer_mb": 0.0, "ring_mb": 0.0})
    s["count"] += 1
    s["buffer_mb"] += c.buffer_bytes / 1e6
    s["ring_mb"] += c.ring_bytes / 1e6
  return Cost(gflops=analysis.get("flops", 0.0) / 1e9,
              gbytes_accessed=analysis.get("bytes accessed", 0.0) / 1e9, collectives=summary)


# ----------------------------------------------------------------------------------------------
# The programs.


def _no_health(z1: jax.Array, z2: jax.Array, *, axis_name: str | None) -> dict[str, jax.Array]:
  """Stand-in for `ssl.task.embedding_health` (a log-step cost, not a per-step one)."""
  del z2, axis_name
  return {k: jnp.zeros((), z1.dtype) for k in (
      "health/embedding_std", "health/effective_rank", "health/alignment", "health/uniformity",
      "health/geodesic_positive", "health/geodesic_negative")}


def train_step_cost(method: str, num_devices: int, global_batch: int) -> tuple[Cost, int]:
  """Cost of the default config's training step; also returns the parameter count."""
  config = {"vicreg": vicreg, "simclr": simclr}[method].get_config()
  config.batch_size = global_batch
  mesh = parallel.make_mesh(jax.devices()[:num_devices])
  # What `core.train.prepare` builds, with the state abstract: nothing is initialised or run.
  task = methods.task(config.method)
  task.validate(config)
  setup = task.setup(config, mesh)
  tx = optim.make_optimizer(config)
  state = jax.eval_shape(lambda: core_train.initial_state(config, setup, tx))
  size = config.data.image_size
  state = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype,
                                                      sharding=parallel.replicated(mesh)), state)
  view = jax.ShapeDtypeStruct((global_batch, size, size, 1), jnp.float32,
                              sharding=parallel.batch_sharded(mesh))
  real_health, ssl_task.embedding_health = ssl_task.embedding_health, _no_health
  try:
    train_step = step_lib.make_train_step(setup.loss_fn, tx=tx,
                                          skip_nonfinite=config.skip_nonfinite,
                                          metrics_fn=setup.metrics_fn, ema=setup.ema)
    step = step_lib.make_parallel_step(mesh, train_step)
    compiled = step.lower(state, {"view1": view, "view2": view}).compile()
  finally:
    ssl_task.embedding_health = real_health
  return cost_of(compiled, num_devices), sum(x.size for x in jax.tree.leaves(state.params))


def loss_cost(name: str, num_devices: int, global_batch: int, dim: int) -> Cost:
  """Cost of a contrastive loss's value and gradient w.r.t. both embeddings, per device."""
  fn = {"info_nce": functools.partial(losses.info_nce, temperature=0.1),
        "clip": functools.partial(losses.clip_loss, logit_scale=jnp.log(10.0))}[name]

  def per_device(a, b):
    return jax.value_and_grad(lambda a, b: fn(a, b, axis_name=parallel.AXIS), argnums=(0, 1))(
        a, b)

  mesh = parallel.make_mesh(jax.devices()[:num_devices])
  spec = P(parallel.AXIS)
  program = jax.jit(parallel.sharded(per_device, mesh, in_specs=(spec, spec),
                                     out_specs=(P(), (spec, spec))))
  z = jax.ShapeDtypeStruct((global_batch, dim), jnp.float32, sharding=NamedSharding(mesh, spec))
  return cost_of(program.lower(z, z).compile(), num_devices)


# ----------------------------------------------------------------------------------------------
# Tables.


def _fmt(x: float) -> str:
  return f"{x:,.3g}" if abs(x) < 1000 else f"{x:,.0f}"


def step_table(rows: list[dict[str, Any]]) -> str:
  lines = ["| step | devices | global batch (pairs) | GFLOP / device | GB accessed / device "
           "| all-reduce MB (buffer) | all-gather + reduce-scatter MB (buffer) "
           "| MB sent / device (ring) |",
           "|---|---|---|---|---|---|---|---|"]
  for r in rows:
    c = r["cost"]
    reduce = c.collectives.get("all-reduce", {}).get("buffer_mb", 0.0)
    gather = sum(c.collectives.get(k, {}).get("buffer_mb", 0.0)
                 for k in ("all-gather", "reduce-scatter"))
    moved = [_fmt(x) if r["devices"] > 1 else "-" for x in (reduce, gather, c.ring_mb)]
    lines.append(f"| {r['method']} | {r['devices']} | {r['batch']} | {_fmt(c.gflops)} "
                 f"| {_fmt(c.gbytes_accessed)} | {' | '.join(moved)} |")
  return "\n".join(lines)


def loss_table(rows: list[dict[str, Any]]) -> str:
  lines = ["| loss (value + grad), d | global batch | devices | GFLOP / device "
           "| all-gather + reduce-scatter MB (buffer) | MB sent / device (ring) |",
           "|---|---|---|---|---|---|"]
  for r in rows:
    c = r["cost"]
    gather = sum(c.collectives.get(k, {}).get("buffer_mb", 0.0)
                 for k in ("all-gather", "reduce-scatter"))
    moved = [_fmt(x) if r["devices"] > 1 else "-" for x in (gather, c.ring_mb)]
    lines.append(f"| {r['loss']}, {r['dim']} | {r['batch']:,} | {r['devices']} "
                 f"| {_fmt(c.gflops)} | {' | '.join(moved)} |")
  return "\n".join(lines)


def pod_table(*, model_gflop_per_pair: float, loss_gflop_per_pair_per_pair: float,
              negatives_mb_per_pair: float, gradient_mb: float, per_chip_batch: int,
              chip_tflops: float, chip_gbps: float,
              chips: tuple[int, ...] = (8, 64, 256, 1024, 4096)) -> str:
  """SimCLR on `chips` chips at `per_chip_batch` pairs per chip (global N = b * chips).

  Per chip and step, from the measured coefficients: model compute `b * model_gflop_per_pair`
  (constant), InfoNCE logits `b * N * loss_gflop_per_pair_per_pair` (grows with N), negatives
  sent `(n-1)/n * N * negatives_mb_per_pair` (grows with N), gradient all-reduce `2 (n-1)/n *
  gradient_mb` (constant). Times at `chip_tflops` and `chip_gbps`.
  """
  lines = ["| chips | global batch | model ms | logits ms | negatives MB / chip "
           "| negatives ms | gradient all-reduce ms |", "|---|---|---|---|---|---|---|"]
  for n in chips:
    big_n = per_chip_batch * n
    share = (n - 1) / n
    model_ms = per_chip_batch * model_gflop_per_pair / chip_tflops
    logits_ms = per_chip_batch * big_n * loss_gflop_per_pair_per_pair / chip_tflops
    negatives_mb = share * big_n * negatives_mb_per_pair
    negatives_ms = negatives_mb / chip_gbps
    gradient_ms = 2 * share * gradient_mb / chip_gbps
    lines.append(f"| {n:,} | {big_n:,} | {_fmt(model_ms)} | {_fmt(logits_ms)} "
                 f"| {_fmt(negatives_mb)} | {_fmt(negatives_ms)} | {_fmt(gradient_ms)} |")
  return "\n".join(lines)


def pod_coefficients(steps: list[dict[str, Any]], loss_rows: list[dict[str, Any]],
                     simclr_params: int) -> dict[str, float]:
  """`pod_table`'s per-pair coefficients, from the 8-device SimCLR step and InfoNCE rows."""
  simclr8 = next(r for r in steps if r["method"] == "simclr" and r["devices"] == 8)
  largest = [r for r in loss_rows if r["loss"] == "info_nce" and r["devices"] == 8][-1]

  def per_device(row: dict[str, Any]) -> float:
    return row["batch"] / row["devices"]

  # InfoNCE per device ~ c * (N/n) * N: c from the largest batch (where the quadratic term is
  # all there is), and the model is the rest of the step.
  loss_coeff = largest["cost"].gflops / (per_device(largest) * largest["batch"])
  step_loss = loss_coeff * per_device(simclr8) * simclr8["batch"]
  # The step's only batch-sized collectives are InfoNCE's: negatives gathered (forward) and
  # their cotangents reduce-scattered (backward).
  gathered_mb = sum(simclr8["cost"].collectives.get(k, {}).get("buffer_mb", 0.0)
                    for k in ("all-gather", "reduce-scatter"))
  return {"model_gflop_per_pair": (simclr8["cost"].gflops - step_loss) / per_device(simclr8),
          "loss_gflop_per_pair_per_pair": loss_coeff,
          "negatives_mb_per_pair": gathered_mb / simclr8["batch"],
          "gradient_mb": simclr_params * 4 / 1e6}


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--batch", type=int, default=256, help="global batch of the step table")
  parser.add_argument("--loss_batches", default="256,4096,65536")
  parser.add_argument("--dim", type=int, default=simclr.get_config().model.projector_dims[-1],
                      help="embedding width of the loss table (default: SimCLR's projector's)")
  parser.add_argument("--per_chip_batch", type=int, default=128)
  parser.add_argument("--chip_tflops", type=float, default=100.0,
                      help="sustained TFLOP/s per chip assumed by the pod table")
  parser.add_argument("--chip_gbps", type=float, default=100.0,
                      help="all-gather bandwidth per chip, GB/s, assumed by the pod table")
  parser.add_argument("--json", default=None, help="also write every number here")
  args = parser.parse_args()

  started = time.perf_counter()
  steps, params = [], {}
  for method in ("vicreg", "simclr"):
    for n in DEVICE_COUNTS:
      cost, params[method] = train_step_cost(method, n, args.batch)
      steps.append({"method": method, "devices": n, "batch": args.batch, "cost": cost})
      print(f"compiled {method} step on {n} devices ({time.perf_counter() - started:.0f} s)",
            file=sys.stderr, flush=True)
  loss_rows = []
  for name in ("info_nce", "clip"):
    for batch in (int(b) for b in args.loss_batches.split(",")):
      for n in DEVICE_COUNTS:
        loss_rows.append({"loss": name, "dim": args.dim, "batch": batch, "devices": n,
                          "cost": loss_cost(name, n, batch, args.dim)})

  coefficients = pod_coefficients(steps, loss_rows, params["simclr"])
  pod = pod_table(**coefficients, per_chip_batch=args.per_chip_batch,
                  chip_tflops=args.chip_tflops, chip_gbps=args.chip_gbps)
  model_per_pair = coefficients["model_gflop_per_pair"]
  loss_coeff = coefficients["loss_gflop_per_pair_per_pair"]
  negatives_per_pair = coefficients["negatives_mb_per_pair"]
  gradient_mb = coefficients["gradient_mb"]
  crossover = {
      "negatives_exceed_gradient_bytes_at_global_batch": 2 * gradient_mb / negatives_per_pair,
      "logits_exceed_model_flops_at_global_batch": model_per_pair / loss_coeff,
      "negatives_time_exceeds_model_time_at_global_batch": (
          args.per_chip_batch * model_per_pair / args.chip_tflops * args.chip_gbps
          / negatives_per_pair),
  }

  print(f"## Training step, global batch {args.batch} (compiled on virtual CPU devices)\n")
  print(step_table(steps))
  print(f"\nParameters: {params['vicreg']:,} (VICReg), {params['simclr']:,} (SimCLR).\n")
  print("## Contrastive losses alone\n")
  print(loss_table(loss_rows))
  print(f"\n## SimCLR on a pod, {args.per_chip_batch} pairs per chip, assuming "
        f"{args.chip_tflops:g} TFLOP/s and {args.chip_gbps:g} GB/s per chip\n")
  print(f"Measured: model {model_per_pair:.3g} GFLOP per pair; InfoNCE {loss_coeff:.3g} GFLOP "
        f"per (local pair x global pair); negatives {negatives_per_pair * 1e3:.3g} kB per pair "
        f"(all-gather + reduce-scatter buffers); gradient {gradient_mb:.3g} MB.\n")
  print(pod)
  print("\nCrossovers (global batch N): "
        + "; ".join(f"{k} {v:,.0f}" for k, v in crossover.items()))
  print(f"\n({time.perf_counter() - started:.0f} s)")
  if args.json:
    serial = lambda rows: [{**r, "cost": dataclasses.asdict(r["cost"])} for r in rows]  # noqa: E731
    with open(args.json, "w", encoding="utf-8") as f:
      json.dump({"steps": serial(steps), "losses": serial(loss_rows), "params": params,
                 "model_gflop_per_pair": model_per_pair, "infonce_gflop_coeff": loss_coeff,
                 "negatives_mb_per_pair": negatives_per_pair, "gradient_mb": gradient_mb,
                 "crossover": crossover, "assumptions": vars(args)}, f, indent=1)


if __name__ == "__main__":
  main()
