"""The train state and the one training step of every method, compiled over every device.

A method gives a per-device loss function; `make_train_step` turns it into the step: the RNG
folded with the step and the device index, `jax.value_and_grad`, the gradients averaged over the
mesh with an explicit `pmean` (pmap semantics: the loss functions compute the GLOBAL-batch loss
with collectives named by `parallel.AXIS`, so every device holds the same loss and its gradient
is its share; see `parallel.sharded`), the optax update, the exponential moving average of a
target network (BYOL, DINO) and the non-finite guard. `make_parallel_step` compiles it once with
`jax.jit(jax.shard_map(...))` over the 1-D mesh; the same function runs under `jax.pmap`.

Layout follows flax/examples/imagenet (`train_step` a top-level function tests can call) and
big_vision (the loss is the method's, the step is the trainer's).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple, Protocol

import flax
import jax
import jax.numpy as jnp
import optax
from jax.sharding import PartitionSpec as P

from embedspace import parallel


class TrainState(flax.struct.PyTreeNode):
  """Everything a run checkpoints; identical (replicated) on every device.

  Attributes:
    step: int32 `[]`, steps taken (batches consumed).
    params: the trained parameters.
    batch_stats: state the forward pass updates without gradients (batch-norm statistics, a
      running center); `{}` when the model has none.
    opt_state: the optax state.
    rng: folded with the step and the device index inside the step.
    skipped: int32 `[]`, non-finite updates skipped (in stop mode: steps since the first).
    frozen: inputs that never change (the frozen encoders of the interfaces); None if none.
    ema: the exponential moving average of part of `params` (BYOL's target network, DINO's
      teacher); None if the method has none.
  """
  step: jax.Array
  params: Any
  batch_stats: Any
  opt_state: Any
  rng: jax.Array
  skipped: jax.Array
  frozen: Any = None
  ema: Any = None


class Ema(NamedTuple):
  """A target network kept as an exponential moving average of part of the parameters.

  Attributes:
    select: `params -> subtree` that the average follows (e.g. encoder and projector).
    momentum: `step -> tau`, e.g. BYOL's cosine schedule from 0.99 to 1.
  """
  select: Callable[[Any], Any]
  momentum: Callable[[jax.Array], jax.Array]


class LossFn(Protocol):
  """A method's per-device loss: `(params, state, batch, rng, *, axis_name) -> (value, aux)`.

  `value` is the scalar to differentiate (the global-batch loss, collectives over `axis_name`);
  `aux = (outputs, batch_stats)`: whatever the metrics need, and the new `batch_stats`.
  """

  def __call__(self, params: Any, state: TrainState, batch: Mapping[str, jax.Array],
               rng: jax.Array, *, axis_name: str | None) -> tuple[jax.Array, tuple[Any, Any]]:
    ...


MetricsFn = Callable[..., dict[str, jax.Array]]
"""`(state, batch, value, outputs, *, axis_name) -> metrics`, with the global loss as "loss"."""


def create_train_state(variables: Mapping[str, Any], tx: optax.GradientTransformation,
                       rng: jax.Array, *, frozen: Any = None, ema: Ema | None = None
                       ) -> TrainState:
  """The state at step 0 from initialised `variables` ({"params", "batch_stats"?})."""
  params = variables["params"]
  return TrainState(
      step=jnp.zeros((), jnp.int32), params=params, batch_stats=variables.get("batch_stats", {}),
      opt_state=tx.init(params), rng=rng, skipped=jnp.zeros((), jnp.int32), frozen=frozen,
      ema=None if ema is None else jax.tree.map(jnp.array, ema.select(params)))


def default_metrics(state: TrainState, batch: Any, value: jax.Array, outputs: Any, *,
                    axis_name: str | None) -> dict[str, jax.Array]:
  """The loss and, when `outputs` is a dict of scalars, those as `loss/<name>`."""
  del state, batch, axis_name
  return {"loss": value, **{f"loss/{k}": v for k, v in (outputs or {}).items()}}


def apply_gradients(state: TrainState, loss: jax.Array, grads: Any, batch_stats: Any, *,
                    tx: optax.GradientTransformation, skip_nonfinite: bool,
                    axis_name: str | None, ema: Any = None) -> tuple[TrainState, Any]:
  """The optimiser update: `pmean` of `grads` over `axis_name`, then `tx`.

  Keeps the old state where the loss or a gradient is non-finite (counted in `skipped`); unless
  `skip_nonfinite`, every step after the first such one is a no-op too, so the host can stop
  with the last good state intact. No NaN reaches the parameters or the optimizer state.

  Returns:
    `(new_state, averaged_grads)`.
  """
  grads = parallel.pmean(grads, axis_name)
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  finite = jnp.isfinite(loss) & jnp.all(jnp.array(
      [jnp.all(jnp.isfinite(g)) for g in jax.tree.leaves(grads)]))
  ok = finite if skip_nonfinite else finite & (state.skipped == 0)
  keep = lambda new, old: jax.tree.map(lambda a, b: jnp.where(ok, a, b), new, old)  # noqa: E731
  new_state = state.replace(
      step=state.step + 1, params=keep(params, state.params),
      batch_stats=keep(batch_stats, state.batch_stats), opt_state=keep(opt_state, state.opt_state),
      skipped=state.skipped + (~ok).astype(jnp.int32),
      ema=state.ema if ema is None else keep(ema, state.ema))
  return new_state, grads


def make_train_step(loss_fn: LossFn, *, tx: optax.GradientTransformation, skip_nonfinite: bool,
                    metrics_fn: MetricsFn | None = None, ema: Ema | None = None
                    ) -> Callable[..., tuple[TrainState, dict[str, jax.Array]]]:
  """The per-device step `(state, batch, *, axis_name) -> (state, metrics)` of `loss_fn`.

  With `ema`, the target is moved towards the current parameters before the forward pass
  (`target <- tau * target + (1 - tau) * params`, tau = `ema.momentum(step)`), as lightly's
  BYOL and DINO examples do, and the loss sees the updated target in `state.ema`.

  The metrics are `metrics_fn`'s (default: the loss and its terms), plus `grad_norm` (of the
  averaged gradient), `param_norm` (before the update) and `skipped`; all device-invariant.
  """
  metrics_fn = metrics_fn or default_metrics

  def train_step(state: TrainState, batch: Mapping[str, jax.Array], *,
                 axis_name: str | None = parallel.AXIS) -> tuple[TrainState, dict[str, Any]]:
    rng = jax.random.fold_in(jax.random.fold_in(state.rng, state.step),
                             parallel.axis_index(axis_name))
    new_ema, seen = None, state
    if ema is not None:
      tau = ema.momentum(state.step)
      new_ema = optax.incremental_update(ema.select(state.params), state.ema, 1.0 - tau)
      seen = state.replace(ema=new_ema)  # What the loss sees; a skipped step keeps the old one.
    (value, (outputs, batch_stats)), grads = jax.value_and_grad(
        functools.partial(loss_fn, state=seen, batch=batch, rng=rng, axis_name=axis_name),
        has_aux=True)(state.params)
    metrics = metrics_fn(seen, batch, value, outputs, axis_name=axis_name)
    new_state, grads = apply_gradients(state, metrics["loss"], grads, batch_stats, tx=tx,
                                       skip_nonfinite=skip_nonfinite, axis_name=axis_name,
                                       ema=new_ema)
    metrics.update(grad_norm=optax.tree.norm(grads), param_norm=optax.tree.norm(state.params),
                   skipped=new_state.skipped)
    if ema is not None:
      metrics["ema_momentum"] = tau
    return new_state, metrics

  return train_step


def make_parallel_step(mesh: jax.sharding.Mesh, step_fn: Callable[..., Any]
                       ) -> Callable[..., Any]:
  """`step_fn` over `mesh`: state replicated, every batch array split along axis 0, state donated."""
  step = functools.partial(step_fn, axis_name=parallel.AXIS)
  return jax.jit(parallel.sharded(step, mesh, in_specs=(P(), P(parallel.AXIS)),
                                  out_specs=(P(), P())), donate_argnums=0)
