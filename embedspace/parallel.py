"""The processes and the device mesh, the sharded step wrapper and the collectives the losses use.

embedspace runs one code path on 1 CPU, 8 devices or a pod slice: a per-device function that
names its collectives by `AXIS`, compiled with `jax.jit(jax.shard_map(...))` over a 1-D mesh of
every device of every process (this is what `jax.pmap` lowers to in current JAX). Sharding is
declared here once; the rest of the code only sees `AXIS`.

Several processes (TPU hosts, GPU nodes, or several processes on one machine) join through
`jax.distributed` (`initialize_distributed`); each then feeds only its own devices, and the mesh
orders devices process by process, so process `p` holds rows `[p*B/P, (p+1)*B/P)` of every
global batch, the slice the input pipeline gives it.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

AXIS = "batch"
"""Name of the data-parallel mesh axis; every collective in a loss is named by it."""

_NO_CLUSTER = "coordinator_address should be defined"
"""What `jax.distributed.initialize()` raises (jax 0.10) where it detects no cluster."""


def initialize_distributed(coordinator_address: str | None = None,
                           num_processes: int | None = None, process_id: int | None = None, *,
                           initialization_timeout: int = 300,
                           heartbeat_timeout_seconds: int = 100) -> bool:
  """Joins the other processes of the run through `jax.distributed`, or runs as one process.

  With any argument given (or `JAX_COORDINATOR_ADDRESS` set), they go to
  `jax.distributed.initialize`, which fills in the missing ones where it detects a cluster.
  With none, it is called without them and JAX's own detection decides: a Cloud TPU pod slice,
  SLURM, Open MPI (or Kubernetes with `jax[k8s]`) joins the processes of the job; elsewhere
  (a laptop, one machine) JAX raises before it contacts anything, and this returns False: one
  process, every local device. Processes on CPU exchange data through gloo (XLA's CPU client has
  no cross-process collectives otherwise).

  When a process dies, the others usually fail at their next collective (a `JaxRuntimeError`,
  which `embedspace.main` reports in one line, exit code 69). Any still running once the dead
  process has missed its heartbeats for `heartbeat_timeout_seconds` are ended by JAX ("Terminating
  process because the JAX distributed service detected fatal errors ... another task died");
  when the coordinator (process 0) dies, they end at once. `initialization_timeout` bounds the
  wait for all processes to connect at start-up.

  Must run before anything starts the JAX backend (`jax.devices()`, any computation).

  Returns:
    True when this process joined a multi-process run (or a detected cluster of one process).

  Raises:
    ValueError: arguments that are incomplete (e.g. `num_processes` without a coordinator and
      no cluster to take it from) or inconsistent (`process_id >= num_processes`).
    RuntimeError: the JAX backend has already started.
  """
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  explicit = (coordinator_address, num_processes, process_id) != (None, None, None)
  try:
    jax.distributed.initialize(coordinator_address, num_processes=num_processes,
                               process_id=process_id,
                               initialization_timeout=initialization_timeout,
                               heartbeat_timeout_seconds=heartbeat_timeout_seconds)
  except ValueError as e:
    if explicit or "JAX_COORDINATOR_ADDRESS" in os.environ or _NO_CLUSTER not in str(e):
      raise
    logging.info("no cluster detected (jax.distributed: %s); running as one process", e)
    return False
  return True


def make_mesh(devices: list[jax.Device] | None = None) -> Mesh:
  """A 1-D data-parallel mesh over `devices` (default: all devices of all processes).

  The default orders the devices by process, then by id, so that each process's devices hold
  one contiguous block of the batch axis, in process order (what `shard_batch` and the input
  pipeline's per-process slices assume).
  """
  if devices is None:
    devices = sorted(jax.devices(), key=lambda d: (d.process_index, d.id))
  return Mesh(np.asarray(list(devices)), (AXIS,))


def describe(mesh: Mesh) -> str:
  """One line on this process and the mesh: index, local devices, global mesh."""
  local = ", ".join(f"{d.platform}:{d.id}" for d in mesh.local_devices)
  return (f"process {jax.process_index()} of {jax.process_count()}: local devices [{local}]; "
          f"global mesh {dict(mesh.shape)} over {mesh.devices.size} devices")


def replicated(mesh: Mesh) -> NamedSharding:
  """Sharding of values every device holds whole (parameters, optimizer state)."""
  return NamedSharding(mesh, P())


def batch_sharded(mesh: Mesh) -> NamedSharding:
  """Sharding of values split along their leading (batch) axis over the mesh."""
  return NamedSharding(mesh, P(AXIS))


def shard_batch(mesh: Mesh, local_batch: Any) -> Any:
  """Assembles the global batch from this process's slice of it.

  Each process passes the rows it loaded (`[global_batch / process_count, ...]`); the result is a
  global `jax.Array` sharded along axis 0 over all devices. On one process this is a device_put.

  Raises:
    ValueError: if the local batch does not split evenly over this process's devices.
  """
  n_local = len(mesh.local_devices)

  def put(x):
    x = np.asarray(x)
    if x.ndim == 0 or x.shape[0] % n_local:
      raise ValueError(
          f"local batch of shape {x.shape} does not split over {n_local} local devices; "
          f"use a batch size divisible by the device count ({mesh.devices.size} in all).")
    return jax.make_array_from_process_local_data(batch_sharded(mesh), x)

  return jax.tree.map(put, local_batch)


def process_allgather_batch(local_batch: Any) -> Any:
  """The global batch as numpy on every process, from each process's slice of it.

  `local_batch` is a pytree of arrays `[b, ...]`, this process's rows of a global batch (what
  `data.ssl_loader` / `data.eval_loader` yield); the result holds `[P*b, ...]`, the processes'
  slices in process order, i.e. the global batch in the order one process would have loaded it.
  A collective: every process must call it, with the same shapes. One process: the batch itself.
  """
  if jax.process_count() == 1:
    return jax.tree.map(np.asarray, local_batch)
  return jax.tree.map(np.asarray, multihost_utils.process_allgather(local_batch, tiled=True))


def replicate(mesh: Mesh, tree: Any) -> Any:
  """Places a pytree on every device of `mesh` (same value everywhere)."""
  return jax.device_put(tree, replicated(mesh))


def sharded(fn: Callable[..., Any], mesh: Mesh, *, in_specs: Any, out_specs: Any) -> Callable[..., Any]:
  """Wraps a per-device function as a global one with `jax.shard_map` over `mesh`.

  `fn` sees its per-device slice and may use collectives over `AXIS`. Use `P()` for replicated
  arguments and results, `P(AXIS)` for batch-sharded ones.

  The map runs with `check_vma=False`, i.e. with `jax.pmap`'s semantics for differentiation
  inside `fn`: the gradient of a device-invariant loss with respect to replicated parameters is
  each device's own term, and the step combines them explicitly with `pmean(grads, AXIS)`. (With
  the default `check_vma=True`, JAX would insert that sum itself, and the same function would
  give different gradients under `jax.pmap`.) One per-device step therefore runs unchanged
  under this wrapper and under `jax.pmap(fn, axis_name=AXIS)`; tests check both.
  """
  return jax.shard_map(fn, mesh=mesh, in_specs=in_specs, out_specs=out_specs, check_vma=False)


# ----------------------------------------------------------------------------------------------
# Collectives. Each takes `axis_name=None` meaning "no devices to combine": the identity on one
# device, so a loss is written once and runs both inside and outside a sharded step.


def all_gather(x: jax.Array, axis_name: str | None) -> jax.Array:
  """Concatenates `x` along axis 0 over the devices of `axis_name`, in device order.

  The gradient is exact: the transpose of `all_gather` is a reduce-scatter, so a device receives
  the cotangents that every device's loss sent to its rows.
  """
  if axis_name is None:
    return x
  return jax.lax.all_gather(x, axis_name, axis=0, tiled=True)


def psum(x: Any, axis_name: str | None) -> Any:
  """Sum over devices (identity without an axis)."""
  return x if axis_name is None else jax.lax.psum(x, axis_name)


def pmean(x: Any, axis_name: str | None) -> Any:
  """Mean over devices (identity without an axis)."""
  return x if axis_name is None else jax.lax.pmean(x, axis_name)


def axis_size(axis_name: str | None) -> int:
  """Number of devices along `axis_name` (1 without an axis)."""
  return 1 if axis_name is None else jax.lax.axis_size(axis_name)


def axis_index(axis_name: str | None) -> jax.Array:
  """This device's position along `axis_name` (0 without an axis)."""
  return jnp.zeros((), jnp.int32) if axis_name is None else jax.lax.axis_index(axis_name)


def batch_mean(x: jax.Array, axis_name: str | None) -> jax.Array:
  """Mean over the global batch (axis 0 of every device's slice; slices have equal size)."""
  return pmean(jnp.mean(x, axis=0), axis_name)
