"""Self-supervised training: one per-device step, compiled over every device of every process.

`train_step` is written once for one device's slice of the global batch; the losses combine the
devices with collectives named by `parallel.AXIS` (negatives gathered, batch statistics summed),
batch norm synchronises its statistics over the same axis, and `make_parallel_step` compiles it
with `jax.jit(jax.shard_map(...))` over a 1-D mesh. The step averages the gradients of the global
loss over the devices with an explicit `pmean`, as under `jax.pmap` (see `parallel.sharded`), so
the same function also runs under `jax.pmap`; a test checks that both equal one device.

Layout follows flax/examples/imagenet: `create_train_state`, `train_step`, `make_parallel_step`,
and the single entry point `train_and_evaluate(config, workdir)`.
"""

from __future__ import annotations

import functools
import json
import os
import signal
import time
from collections.abc import Callable, Iterator
from typing import Any

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import logging
from jax.experimental import multihost_utils
from jax.sharding import PartitionSpec as P

from embedspace import checkpointing
from embedspace import data as data_lib
from embedspace import evaluate
from embedspace import losses
from embedspace import metrics as metrics_lib
from embedspace import models
from embedspace import optim
from embedspace import parallel
from embedspace.config_checks import ConfigError, check_data, check_workdir_config, validate_config

PREEMPTED_EXIT_CODE = 75  # EX_TEMPFAIL: saved a checkpoint on SIGTERM; rerun the same command.


class NonFiniteLossError(RuntimeError):
  """The loss or gradient became NaN/inf and the config does not ask to skip such updates."""


class TrainState(flax.struct.PyTreeNode):
  step: jax.Array  # int32 []: steps taken (batches consumed)
  params: Any
  batch_stats: Any
  opt_state: Any
  rng: jax.Array  # folded with the step and the device index inside the step
  skipped: jax.Array  # int32 []: non-finite updates skipped (in stop mode: steps since the first)


def build_model(config: ml_collections.ConfigDict) -> models.EmbeddingModel:
  """The encoder + projector named by `config.model`, batch norm synchronised over the mesh."""
  return models.EmbeddingModel(
      stage_sizes=tuple(config.model.stage_sizes), width=config.model.width,
      projector_dims=tuple(config.model.projector_dims), dtype=jnp.dtype(config.model.dtype),
      bn_axis_name=parallel.AXIS)


def create_train_state(config: ml_collections.ConfigDict, model: models.EmbeddingModel,
                       tx: optax.GradientTransformation, image_shape: tuple[int, ...]) -> TrainState:
  """Initial state on the host (replicate it with `parallel.replicate`)."""
  rng = jax.random.PRNGKey(config.seed)
  init_rng, state_rng = jax.random.split(rng)
  dummy = jnp.zeros((2, *image_shape), jnp.float32)
  # Initialise outside any mesh: batch norm's collective needs no axis for a plain apply.
  variables = jax.jit(functools.partial(model.clone(bn_axis_name=None).init, train=False))(
      init_rng, dummy)
  params = variables["params"]
  return TrainState(
      step=jnp.zeros((), jnp.int32), params=params, batch_stats=variables["batch_stats"],
      opt_state=tx.init(params), rng=state_rng, skipped=jnp.zeros((), jnp.int32))


def ssl_loss(config: ml_collections.ConfigDict, z1: jax.Array, z2: jax.Array, *,
             axis_name: str | None) -> tuple[jax.Array, dict[str, jax.Array]]:
  """The global-batch loss of `config.method` and its terms."""
  lc = config.loss
  if config.method == "vicreg":
    return losses.vicreg_loss(
        z1, z2, invariance_weight=lc.invariance_weight, variance_weight=lc.variance_weight,
        covariance_weight=lc.covariance_weight, axis_name=axis_name)
  if config.method == "simclr":
    loss = losses.info_nce(z1, z2, temperature=lc.temperature, similarity=lc.similarity,
                           axis_name=axis_name)
    return loss, {}
  if config.method == "barlow":
    return losses.barlow_twins_loss(
        z1, z2, off_diagonal_weight=lc.off_diagonal_weight, axis_name=axis_name)
  raise ValueError(f"config.method={config.method!r} is not one of vicreg, simclr, barlow")


def embedding_health(z1: jax.Array, z2: jax.Array, *, axis_name: str | None) -> dict[str, jax.Array]:
  """Collapse and hypersphere diagnostics of the projector outputs over the global batch."""
  pos, neg = losses.positive_negative_geodesic(z1, z2, axis_name=axis_name)
  return {
      "health/embedding_std": losses.embedding_std(z1, axis_name=axis_name),
      "health/effective_rank": losses.effective_rank(z1, axis_name=axis_name),
      "health/alignment": losses.alignment(z1, z2, axis_name=axis_name),
      "health/uniformity": losses.uniformity(z1, axis_name=axis_name),
      "health/geodesic_positive": pos,
      "health/geodesic_negative": neg,
  }


def apply_gradients(state: Any, loss: jax.Array, grads: Any, batch_stats: Any, *,
                    tx: optax.GradientTransformation, skip_nonfinite: bool,
                    axis_name: str | None) -> tuple[Any, Any]:
  """The optimiser update of any train state with `step/params/batch_stats/opt_state/skipped`.

  Averages `grads` over `axis_name` (pmap semantics: see `parallel.sharded`), applies `tx`, and
  keeps the old state where the loss or a gradient is non-finite (counted in `skipped`); unless
  `skip_nonfinite`, every step after the first such one is a no-op too, so the host can stop
  with the last good state intact.

  Returns:
    `(new_state, averaged_grads)`.
  """
  grads = parallel.pmean(grads, axis_name)
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  finite = jnp.isfinite(loss) & jnp.all(jnp.array(
      [jnp.all(jnp.isfinite(g)) for g in jax.tree.leaves(grads)]))
  ok = finite if skip_nonfinite else finite & (state.skipped == 0)
  keep = lambda new, old: jax.tree.map(lambda a, b: jnp.where(ok, a, b), new, old)
  new_state = state.replace(
      step=state.step + 1, params=keep(params, state.params),
      batch_stats=keep(batch_stats, state.batch_stats), opt_state=keep(opt_state, state.opt_state),
      skipped=state.skipped + (~ok).astype(jnp.int32))
  return new_state, grads


def train_step(state: TrainState, batch: dict[str, jax.Array], *, model: models.EmbeddingModel,
               tx: optax.GradientTransformation, config: ml_collections.ConfigDict,
               axis_name: str | None = parallel.AXIS) -> tuple[TrainState, dict[str, jax.Array]]:
  """One optimisation step on this device's slice `batch` = {'view1', 'view2'}: [B, H, W, C].

  Returns the new state and device-invariant metrics. A non-finite loss or gradient leaves the
  state unchanged (and counts in `skipped`); unless `config.skip_nonfinite`, every later step is
  a no-op too, so the host stops with the last good state intact.
  """
  rng = jax.random.fold_in(jax.random.fold_in(state.rng, state.step),
                           parallel.axis_index(axis_name))

  def loss_fn(params):
    out1, upd = model.apply({"params": params, "batch_stats": state.batch_stats}, batch["view1"],
                            train=True, mutable=["batch_stats"], rngs={"dropout": rng})
    out2, upd = model.apply({"params": params, "batch_stats": upd["batch_stats"]}, batch["view2"],
                            train=True, mutable=["batch_stats"],
                            rngs={"dropout": jax.random.fold_in(rng, 1)})
    z1, z2 = out1[1], out2[1]
    loss, terms = ssl_loss(config, z1, z2, axis_name=axis_name)
    return loss, (terms, upd["batch_stats"], z1, z2)

  (loss, (terms, batch_stats, z1, z2)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
      state.params)
  new_state, grads = apply_gradients(state, loss, grads, batch_stats, tx=tx,
                                     skip_nonfinite=config.skip_nonfinite, axis_name=axis_name)

  health_keys = embedding_health(z1, z2, axis_name=None).keys()
  health = jax.lax.cond(
      (state.step % config.log_every == 0) | (state.step == config.num_steps - 1),
      lambda: embedding_health(z1, z2, axis_name=axis_name),
      lambda: {k: jnp.zeros((), jnp.float32) for k in health_keys})
  metrics = {
      "loss": loss, **{f"loss/{k}": v for k, v in terms.items()},
      "grad_norm": optax.tree.norm(grads), "param_norm": optax.tree.norm(state.params),
      "skipped": new_state.skipped, **health,
  }
  return new_state, metrics


def make_parallel_step(mesh: jax.sharding.Mesh, *, model: Any,
                       tx: optax.GradientTransformation, config: ml_collections.ConfigDict,
                       step_fn: Any = None):
  """`step_fn` (default `train_step`) over `mesh`: state replicated, every batch array split
  along axis 0, state donated. The multimodal trainer passes its own per-device step."""
  step = functools.partial(step_fn or train_step, model=model, tx=tx, config=config,
                           axis_name=parallel.AXIS)
  return jax.jit(parallel.sharded(step, mesh, in_specs=(P(), P(parallel.AXIS)),
                                  out_specs=(P(), P())), donate_argnums=0)


class Preemption:
  """SIGTERM, seen between steps: `reached(step)` says when to save and exit PREEMPTED_EXIT_CODE.

  One process: a Python handler turns SIGTERM into a flag. Several processes must all stop
  after the same step, whichever of them got the signal: there JAX's preemption service decides
  (`jax.distributed.initialize` installs its SIGTERM handler on every process and shares the
  notice through the coordination service; `multihost_utils.reached_preemption_sync_point(step)`
  is then True on every process at the same step). Its handler is kept, so with several
  processes SIGTERM outside the training loop (start-up, final evaluation) is noted, not fatal.
  """

  def __init__(self):
    self.requested = False
    self._previous = None
    self._multi_process = jax.process_count() > 1

  def __enter__(self):
    if self._multi_process:
      return self

    def handler(signum, frame):
      del signum, frame
      self.requested = True
    try:
      self._previous = signal.signal(signal.SIGTERM, handler)
    except ValueError:  # Not the main thread (e.g. a notebook worker): no preemption handling.
      self._previous = None
    return self

  def __exit__(self, *exc):
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)

  def reached(self, step: int) -> bool:
    """Whether to stop after `step` (call once per step, on every process, same step)."""
    if not self._multi_process:
      return self.requested
    try:
      return multihost_utils.reached_preemption_sync_point(step)
    except RuntimeError:  # jax_enable_preemption_service=False: SIGTERM keeps its default.
      return False


class Preempted(SystemExit):
  """Raised after the checkpoint on SIGTERM is written; exits with PREEMPTED_EXIT_CODE."""

  def __init__(self, step: int):
    super().__init__(PREEMPTED_EXIT_CODE)
    self.step = step


def to_host(tree: Any) -> Any:
  """Every leaf of `tree` as a NumPy array on the host."""
  return jax.tree.map(lambda x: np.asarray(jax.device_get(x)), tree)


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """Trains `config` in `workdir` (resuming from its newest intact checkpoint), then evaluates.

  Returns the evaluation report (also written to `workdir/eval.json`).

  Raises:
    ConfigError: bad config values, dataset or workdir (the message names the key and the fix).
    checkpointing.NoIntactCheckpointError: the workdir has checkpoints and none can be restored.
    NonFiniteLossError: the loss became non-finite and `config.skip_nonfinite` is False.
    Preempted: SIGTERM arrived; a checkpoint of the current step was written.
  """
  validate_config(config)
  mesh = parallel.make_mesh()
  check_batch_divisible(config, mesh)
  check_data(config)
  workdir = os.path.abspath(workdir)
  check_workdir_config(config, workdir)
  logging.info("%s", parallel.describe(mesh))

  source, info = data_lib.get_source(config.data.name, split=config.data.train_split,
                                     data_dir=config.data.data_dir)
  loader = data_lib.ssl_loader(
      source, global_batch_size=config.batch_size, seed=config.seed,
      image_size=config.data.image_size, augment=config.data.augment.to_dict(),
      process_index=jax.process_index(), process_count=jax.process_count(),
      worker_count=config.data.worker_count)
  data_iter = iter(loader)
  image_shape = (config.data.image_size, config.data.image_size, info.image_shape[-1])

  model = build_model(config)
  tx = optim.make_optimizer(config)
  init_state = create_train_state(config, model, tx, image_shape)
  # A host copy of the random initialisation: the evaluation's baseline encoder.
  init_variables = jax.device_get({"params": init_state.params,
                                   "batch_stats": init_state.batch_stats})
  state = parallel.replicate(mesh, init_state)
  ckpt, state, start = restore_or_start(config, workdir, state, data_iter)
  p_step = make_parallel_step(mesh, model=model, tx=tx, config=config)
  writer = metrics_lib.MetricWriter(workdir)

  def monitor_knn(done: int, state: TrainState, progress: Any) -> None:
    if config.eval_every and done % config.eval_every == 0 and done != config.num_steps:
      knn = evaluate.evaluate_run(
          config, model, {"params": state.params, "batch_stats": state.batch_stats}, mesh,
          knn_only=True)["trained"]["encoder"]["knn_accuracy"]
      writer.write_scalars(done, {"eval/trained/encoder/knn_accuracy": knn})
      progress.write(f"step {done}: kNN accuracy {knn:.4f}")

  views = ({"view1": b["view1"], "view2": b["view2"]} for b in data_iter)
  state = run_loop(config, state, step_fn=p_step, batches=views, data_state=data_iter, mesh=mesh,
                   ckpt=ckpt, writer=writer, workdir=workdir, start=start,
                   items_per_step=2 * config.batch_size, rate_name="images_per_sec",
                   shown=("images_per_sec",), after_step=monitor_knn)

  if not config.eval.get("at_end", True):
    writer.close()
    logging.info("config.eval.at_end=False: no evaluation; run python -m embedspace.evaluate "
                 "--workdir=%s", workdir)
    return {}
  report = evaluate.evaluate_run(
      config, model, {"params": state.params, "batch_stats": state.batch_stats}, mesh,
      init_variables=init_variables if config.eval.baselines else None, full=config.eval.full,
      out_dir=os.path.join(workdir, "eval") if config.eval.full else None,
      step=config.num_steps)
  writer.write_scalars(config.num_steps,
                       {f"eval/{k}": v for k, v in flatten_scalars(report).items()})
  writer.close()
  if jax.process_index() == 0:
    with open(os.path.join(workdir, "eval.json"), "w", encoding="utf-8") as f:
      json.dump(report, f, indent=2)
  return report


def check_batch_divisible(config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh) -> None:
  """Raises ConfigError unless `config.batch_size` splits evenly over devices and processes."""
  n_dev, n_proc = mesh.devices.size, jax.process_count()
  if config.batch_size % n_dev or config.batch_size % n_proc:
    raise ConfigError(
        f"config.batch_size={config.batch_size} is not divisible by the {n_dev} devices; pass "
        f"--config.batch_size={max(n_dev, config.batch_size // n_dev * n_dev)}")


def restore_or_start(config: ml_collections.ConfigDict, workdir: str, state: Any,
                     data_state: Any) -> tuple[checkpointing.Checkpointer, Any, int]:
  """The run's checkpointer, and the newest intact checkpoint's `(state, step)` or `(state, 0)`.

  `data_state` (the sampler or data iterator) is restored in place with the state.
  """
  ckpt = checkpointing.Checkpointer(os.path.join(workdir, "checkpoints"),
                                    every=config.checkpoint_every, keep=config.keep_checkpoints)
  restored = ckpt.restore_latest(checkpointing.abstract_like(state), data_state)
  if restored is not None:
    state, start = restored
    logging.info("resumed from step %d in %s", start, workdir)
    return ckpt, state, start
  if os.path.exists(os.path.join(workdir, "metrics.jsonl")):
    logging.warning("%s holds metrics of an earlier start but no checkpoint: training starts "
                    "from step 0", workdir)
  return ckpt, state, 0


def run_loop(config: ml_collections.ConfigDict, state: Any, *, step_fn: Callable[..., Any],
             batches: Iterator[Any], data_state: Any, mesh: jax.sharding.Mesh,
             ckpt: checkpointing.Checkpointer, writer: metrics_lib.MetricWriter, workdir: str,
             start: int, items_per_step: int, rate_name: str, shown: tuple[str, ...] = (),
             after_step: Callable[[int, Any, Any], None] | None = None) -> Any:
  """Steps `start + 1 .. config.num_steps` of any trainer here; returns the last state, saved.

  Every `config.log_every` steps the metrics go to `writer` (with `rate_name`: items per second
  from `items_per_step`, and the learning rate) after the non-finite check; every
  `config.checkpoint_every` steps and at the end the state and `data_state` (the sampler or data
  iterator, an orbax item) are saved. SIGTERM saves the step and raises `Preempted`.

  Args:
    step_fn: `(state, sharded batch) -> (state, metrics)`, e.g. from `make_parallel_step`.
    batches: host batches of this process's rows (`parallel.shard_batch` places them).
    shown: metric names shown beside the loss on the progress bar.
    after_step: `f(step, state, progress_bar)` after each step (e.g. a kNN monitor).
  """
  schedule = optim.learning_rate_schedule(config)
  progress = progress_bar(start, config.num_steps)
  t_last, step_last, metrics = time.perf_counter(), start, None
  with Preemption() as preemption:
    for step in range(start, config.num_steps):
      state, metrics = step_fn(state, parallel.shard_batch(mesh, next(batches)))
      done = step + 1
      if step % config.log_every == 0 or done == config.num_steps:
        m = to_host(metrics)
        check_finite(m, done, config, ckpt)
        now = time.perf_counter()
        m[rate_name] = items_per_step * (done - step_last) / max(now - t_last, 1e-9)
        m["learning_rate"] = schedule(step)
        t_last, step_last = now, done
        writer.write_scalars(done, m)
        progress.set_postfix({k: f"{m[k]:.4g}" for k in ("loss",) + tuple(shown)})
      progress.update(1)
      if preemption.reached(done):
        check_finite(to_host(metrics), done, config, ckpt)
        ckpt.save(done, state, data_state, force=True)
        ckpt.close()
        writer.close()
        logging.warning("SIGTERM: saved step %d to %s; rerun the same command to resume",
                        done, workdir)
        raise Preempted(done)
      if after_step is not None:
        after_step(done, state, progress)
      if done % config.checkpoint_every == 0 and done != config.num_steps:
        check_finite(to_host(metrics), done, config, ckpt)
        ckpt.save(done, state, data_state)
  progress.close()
  if config.num_steps > start:
    check_finite(to_host(metrics), config.num_steps, config, ckpt)
    ckpt.save(config.num_steps, state, data_state, force=True)
  ckpt.close()
  return state


def check_finite(m: dict[str, Any], step: int, config: ml_collections.ConfigDict,
                ckpt: checkpointing.Checkpointer) -> None:
  """Stops the run (stop mode) once a step was non-finite; its state is the last good one."""
  skipped = int(m["skipped"])
  if skipped and not config.skip_nonfinite:
    ckpt.close()
    first = step - skipped + 1
    good = ckpt.all_steps()
    raise NonFiniteLossError(
        f"non-finite loss or gradient at step {first}; the run stopped. Last good checkpoint: "
        f"{'step ' + str(good[-1]) if good else 'none'}. Lower config.optimizer.base_lr, set "
        "config.optimizer.grad_clip_norm, or set config.skip_nonfinite=True to skip such steps.")


def progress_bar(start: int, total: int):
  """A tqdm bar from `start` to `total` steps, shown by process 0 only."""
  import tqdm  # The bar only on process 0; elsewhere a silent stand-in.
  # `disable` only where it must be, so TQDM_DISABLE=1 still silences process 0's bar.
  hidden = {"disable": True} if jax.process_index() != 0 else {}
  return tqdm.tqdm(initial=start, total=total, desc="train", unit="step", dynamic_ncols=True,
                   **hidden)


def flatten_scalars(tree: dict[str, Any], prefix: str = "") -> dict[str, float]:
  """The numeric leaves of a nested dict, keyed "a/b/c" (for TensorBoard)."""
  out = {}
  for k, v in tree.items():
    if isinstance(v, dict):
      out.update(flatten_scalars(v, f"{prefix}{k}/"))
    elif isinstance(v, (int, float, np.floating, np.integer)):
      out[f"{prefix}{k}"] = float(v)
  return out
