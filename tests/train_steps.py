"""Helpers of the training tests: a method's `:smoke` config with overrides, a few steps of the
core's compiled step on some devices, and a step that preempts its run with SIGTERM."""

from __future__ import annotations

import os
import signal
from collections.abc import Callable
from types import ModuleType
from typing import Any

import jax
import ml_collections

from embedspace import methods, parallel
from embedspace.core import step as step_lib
from embedspace.core import train as core_train


def smoke_config(config_module: ModuleType, **overrides: Any) -> ml_collections.ConfigDict:
  """`config_module.get_config("smoke")` with dotted-key overrides (`{"optimizer.name": "lars"}`)."""
  config = config_module.get_config("smoke")
  for key, value in overrides.items():
    target = config
    *parents, leaf = key.split(".")
    for p in parents:
      target = target[p]
    target[leaf] = value
  return config


def prepare(config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh) -> core_train.Prepared:
  """What `embedspace.main` builds for `config` on `mesh`."""
  return core_train.prepare(methods.task(config.method), config, mesh)


def run_steps(config: ml_collections.ConfigDict, devices: list[Any], batches: list[dict]
              ) -> tuple[list[float], list[Any]]:
  """The loss of each step on `devices`, and the host state before step 0 and after each step."""
  mesh = parallel.make_mesh(devices)
  run = prepare(config, mesh)
  states: list[Any] = []
  losses, _ = run_compiled((run.state, run.parallel_step(mesh), mesh), batches, states=states)
  return losses, states


def run_compiled(stepper: tuple[Any, Callable[..., Any], jax.sharding.Mesh], batches: list[dict],
                 *, states: list[Any] | None = None) -> tuple[list[float], Any]:
  """Steps of a compiled step from an initial state: `stepper` is `(state, step, mesh)` (one
  compilation serves many runs; the state is replicated anew, so steps that donate it leave the
  caller's copy alone). Returns the losses and the final host state; with `states`, the host
  state before step 0 and after each step is appended to it."""
  init, step, mesh = stepper
  state, losses = parallel.replicate(mesh, init), []
  if states is not None:
    states.append(jax.device_get(state))
  for b in batches:
    state, m = step(state, parallel.shard_batch(mesh, b))
    losses.append(float(m["loss"]))
    if states is not None:
      states.append(jax.device_get(state))
  return losses, jax.device_get(state)


def sigterm_during_step(n: int) -> Callable[..., Any]:
  """A stand-in for `core.step.make_parallel_step` (set it with monkeypatch) whose compiled steps
  send this process SIGTERM during the n-th step they run, counted over every step it makes."""
  real = step_lib.make_parallel_step
  calls = {"n": 0}

  def make(*args, **kwargs):
    step = real(*args, **kwargs)

    def wrapped(state, batch):
      calls["n"] += 1
      if calls["n"] == n:
        os.kill(os.getpid(), signal.SIGTERM)
      return step(state, batch)
    return wrapped
  return make
