"""The device mesh, the sharded step wrapper and the collectives the losses use.

embedspace runs one code path on 1 CPU, 8 devices or a pod slice: a per-device function that
names its collectives by `AXIS`, compiled with `jax.jit(jax.shard_map(...))` over a 1-D mesh of
every device of every process (this is what `jax.pmap` lowers to in current JAX). Sharding is
declared here once; the rest of the code only sees `AXIS`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

AXIS = "batch"
"""Name of the data-parallel mesh axis; every collective in a loss is named by it."""


def make_mesh(devices: list[jax.Device] | None = None) -> Mesh:
  """A 1-D data-parallel mesh over `devices` (default: all devices of all processes)."""
  devices = jax.devices() if devices is None else list(devices)
  return Mesh(np.asarray(devices), (AXIS,))


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
