"""Multimodal training: one per-device step over paired modalities, compiled over every device.

The step is `embedspace.train`'s design for several encoders: each array of the batch
('image-audio/image', 'image-audio/audio2', ...) is embedded by its modality's encoder on this
device's rows, the losses (`losses.clip_loss`, `barlow_twins_loss`, `decur_loss`, unchanged)
combine the devices with collectives named `parallel.AXIS`, batch norm synchronises over the
same axis, the gradients are `pmean`-ed (pmap semantics, see `parallel.sharded`), and
`make_parallel_step` compiles it with `jax.jit(parallel.sharded(...))` over the 1-D mesh. The
loop, checkpoints (orbax via `embedspace.checkpointing`, with the sampler's step as the data
state), metrics, SIGTERM handling and exit paths are those of `embedspace.train`.

Per pair (a, b) the loss is CLIP's for 'clip' (Radford et al. 2021; ImageBind, Girdhar et al.
2023, sums it over its image-anchored pairs), Barlow Twins between the modalities for 'barlow'
(Zbontar et al. 2021), and DeCUR for 'decur' (Wang et al. 2023); the total is their sum.
"""

from __future__ import annotations

import json
import os
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import optax
from absl import logging

from embedspace import losses
from embedspace import metrics as metrics_lib
from embedspace import optim
from embedspace import parallel
from embedspace import train as ssl_train
from embedspace import workdirs
from embedspace.config_checks import ConfigError, check_workdir_config
from embedspace.multimodal import data as data_lib
from embedspace.multimodal import evaluate as mm_evaluate
from embedspace.multimodal import models

METHODS = ("clip", "imagebind", "decur")
LOSSES = ("clip", "barlow", "decur")
TrainState = ssl_train.TrainState


def pairs_of(config: ml_collections.ConfigDict) -> tuple[tuple[str, str], ...]:
  """The trained pairs, e.g. (('image', 'audio'), ('image', 'text'))."""
  return data_lib.parse_pairs(config.pairs)


def modalities_of(config: ml_collections.ConfigDict) -> tuple[str, ...]:
  """Every modality of a trained pair, in the order image, audio, text."""
  used = {m for pair in pairs_of(config) for m in pair}
  return tuple(m for m in data_lib.MODALITIES if m in used)


def num_views(config: ml_collections.ConfigDict) -> int:
  """DeCUR needs two augmented views of each modality; CLIP and Barlow (cross-modal) one."""
  return 2 if config.loss.name == "decur" else 1


def validate(config: ml_collections.ConfigDict) -> None:
  """Raises ConfigError naming the first key whose value cannot work."""
  def require(ok: bool, key: str, should: str) -> None:
    if not ok:
      value = config
      for part in key.split("."):
        value = value[part]
      raise ConfigError(f"config.{key}={value!r}: {should}")

  require(config.method in METHODS, "method", f"must be one of {METHODS}")
  require(config.loss.name in LOSSES, "loss.name", f"must be one of {LOSSES}")
  try:
    pairs = pairs_of(config)
  except ValueError as e:
    raise ConfigError(f"config.pairs={config.pairs!r}: {e}") from None
  for key in ("batch_size", "num_steps", "log_every", "checkpoint_every", "keep_checkpoints",
              "eval.batch_size", "eval.probe_steps"):
    value = config
    for part in key.split("."):
      value = value[part]
    require(isinstance(value, int) and value > 0, key, "must be a positive integer")
  require(config.batch_size >= 2, "batch_size", "must be >= 2 (in-batch negatives, statistics)")
  require(config.optimizer.base_lr > 0, "optimizer.base_lr", "must be > 0")
  require(config.optimizer.name in optim.OPTIMIZERS, "optimizer.name",
          f"must be one of {optim.OPTIMIZERS}")
  require(len(config.model.projector_dims) > 0, "model.projector_dims", "must not be empty")
  if config.loss.name == "decur":
    require(len(pairs) == 1, "pairs", "DeCUR takes exactly one pair of modalities")
    require(0 < config.loss.num_common < config.model.projector_dims[-1], "loss.num_common",
            f"must be in [1, {config.model.projector_dims[-1] - 1}] (some dims unique)")
  require(config.data.source in data_lib.SOURCES, "data.source",
          f"must be one of {data_lib.SOURCES}")
  require(400 <= config.data.audio_samples <= data_lib.MAX_SAMPLES, "data.audio_samples",
          f"must be in [400, {data_lib.MAX_SAMPLES}]")
  require(config.data.text_length == config.model.text.max_length, "data.text_length",
          f"must equal config.model.text.max_length={config.model.text.max_length}")


def build_model(config: ml_collections.ConfigDict, *,
                bn_axis_name: str | None = parallel.AXIS) -> models.MultimodalModel:
  """The encoders and heads of every modality of `config.pairs`, one logit scale per pair."""
  return models.MultimodalModel(
      modalities=modalities_of(config), pair_names=tuple("-".join(p) for p in pairs_of(config)),
      image=config.model.image.to_dict(), audio=config.model.audio.to_dict(),
      text=config.model.text.to_dict(), projector_dims=tuple(config.model.projector_dims),
      logit_scale_init=float(config.loss.logit_scale_init), bn_axis_name=bn_axis_name)


def load_workdir(workdir: str) -> tuple[ml_collections.ConfigDict, models.MultimodalModel,
                                        dict[str, Any], int]:
  """`(config, model, variables, step)` of a multimodal run's newest intact checkpoint.

  The model is built without the batch-norm axis (for use on one device or under plain `jit`);
  `model.apply(variables, modality, x, train=False, method="embed")` gives `(features,
  embeddings)`. Used by the interfaces over frozen encoders (`configs/palme.py`, `find.py`).

  Raises:
    FileNotFoundError, checkpointing.NoIntactCheckpointError: see `workdirs.restore_newest`.
    workdirs.IncompatibleWorkdirError: the run is not multimodal or does not fit this version.
  """
  config, variables, step = workdirs.restore_run(
      workdir, ("clip", "imagebind", "decur"), kind="multimodal",
      config_file="configs/imagebind.py")
  model = build_model(config, bn_axis_name=None)
  expected = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), dummy_inputs(config),
                                               train=False))["params"]
  workdirs.check_params_fit(workdir, expected, variables["params"])
  return config, model, variables, step


def dummy_inputs(config: ml_collections.ConfigDict) -> dict[str, jax.Array]:
  """Two zero examples of each modality (shapes only), for `init`."""
  shapes = {"image": ((2, 28, 28, 1), jnp.float32),
            "audio": ((2, config.data.audio_samples), jnp.float32),
            "text": ((2, config.model.text.max_length), jnp.int32)}
  return {m: jnp.zeros(*shapes[m]) for m in modalities_of(config)}


def create_train_state(config: ml_collections.ConfigDict, model: models.MultimodalModel,
                       tx: optax.GradientTransformation) -> TrainState:
  """Initial state on the host (replicate it with `parallel.replicate`).

  `init` runs eagerly, not under `jit`: compiling the forward of three encoders for one call
  costs 7-10 s of CPU per run, while eager ops compile once per process and shape (measured on
  the `:smoke` models: 10.7 s jitted; eager 16 s for the first model of a process, then 0.1-0.5
  s), which matters for tests and evaluation that build several models in one process.
  """
  init_rng, state_rng = jax.random.split(jax.random.PRNGKey(config.seed))
  variables = model.clone(bn_axis_name=None).init(init_rng, dummy_inputs(config), train=False)
  params = variables["params"]
  return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                    batch_stats=variables.get("batch_stats", {}), opt_state=tx.init(params),
                    rng=state_rng, skipped=jnp.zeros((), jnp.int32))


def pair_loss(config: ml_collections.ConfigDict, z: dict[str, jax.Array], pair: tuple[str, str],
              logit_scale: jax.Array, *, axis_name: str | None
              ) -> tuple[jax.Array, dict[str, jax.Array]]:
  """The loss of one pair from its embeddings `z` ('a-b/a', 'a-b/b2', ... -> [B, D])."""
  a, b = pair
  name = f"{a}-{b}"
  za, zb = z[f"{name}/{a}"], z[f"{name}/{b}"]
  lc = config.loss
  if lc.name == "clip":
    scale = logit_scale if lc.learn_logit_scale else float(lc.logit_scale_init)
    return losses.clip_loss(za, zb, logit_scale=scale, axis_name=axis_name), {}
  if lc.name == "barlow":
    return losses.barlow_twins_loss(za, zb, off_diagonal_weight=lc.off_diagonal_weight,
                                    axis_name=axis_name)
  return losses.decur_loss(za, z[f"{name}/{a}2"], zb, z[f"{name}/{b}2"],
                           num_common=lc.num_common, off_diagonal_weight=lc.off_diagonal_weight,
                           axis_name=axis_name)


def train_step(state: TrainState, batch: dict[str, jax.Array], *, model: models.MultimodalModel,
               tx: optax.GradientTransformation, config: ml_collections.ConfigDict,
               axis_name: str | None = parallel.AXIS) -> tuple[TrainState, dict[str, jax.Array]]:
  """One step on this device's rows of every array of `batch` ('a-b/m[2]': [B, ...]).

  Returns the new state and device-invariant metrics; a non-finite loss or gradient leaves the
  state unchanged, as in `embedspace.train.train_step`.
  """
  pairs = pairs_of(config)
  keys = data_lib.batch_keys(pairs, views=num_views(config))

  def loss_fn(params):
    stats = state.batch_stats
    z = {}
    for key, modality in keys:
      (_, z[key]), upd = model.apply({"params": params, "batch_stats": stats}, modality,
                                     batch[key], train=True, method=model.embed,
                                     mutable=["batch_stats"])
      stats = upd.get("batch_stats", stats)
    total, terms, scales = 0.0, {}, {}
    for pair in pairs:
      name = "-".join(pair)
      scale = model.apply({"params": params}, name, method=model.logit_scale)
      loss, parts = pair_loss(config, z, pair, scale, axis_name=axis_name)
      total = total + loss
      terms[name] = loss
      terms.update({f"{name}/{k}": v for k, v in parts.items()})
      scales[f"logit_scale/{name}"] = jnp.minimum(jnp.exp(scale), losses.CLIP_MAX_LOGIT_SCALE)
    return total, (terms, scales, stats)

  (loss, (terms, scales, batch_stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
      state.params)
  new_state, grads = ssl_train.apply_gradients(
      state, loss, grads, batch_stats, tx=tx, skip_nonfinite=config.skip_nonfinite,
      axis_name=axis_name)
  metrics = {"loss": loss, **{f"loss/{k}": v for k, v in terms.items()}, **scales,
             "grad_norm": optax.tree.norm(grads), "param_norm": optax.tree.norm(state.params),
             "skipped": new_state.skipped}
  return new_state, metrics


def make_parallel_step(mesh: jax.sharding.Mesh, *, model: models.MultimodalModel,
                       tx: optax.GradientTransformation, config: ml_collections.ConfigDict):
  """`train_step` over `mesh`, compiled as the self-supervised step is.

  See `train.make_parallel_step`.
  """
  return ssl_train.make_parallel_step(mesh, model=model, tx=tx, config=config, step_fn=train_step)


def make_sampler(config: ml_collections.ConfigDict, split: data_lib.Split
                 ) -> data_lib.PairedBatches:
  """This process's class-paired training batches (see `data.PairedBatches`)."""
  return data_lib.PairedBatches(
      split, pairs=pairs_of(config), global_batch_size=config.batch_size, seed=config.seed,
      views=num_views(config), augment=config.data.augment.to_dict(),
      process_index=jax.process_index(), process_count=jax.process_count())


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """Trains `config` in `workdir` (resuming from its newest intact checkpoint), then evaluates.

  Returns the evaluation report (also `workdir/eval.json`, and `workdir/eval/report.md` with
  the cross-modal similarity heatmap `similarity.png`).

  Raises:
    ConfigError: bad config values or workdir (the message names the key and the fix).
    checkpointing.NoIntactCheckpointError: the workdir has checkpoints and none can be restored.
    embedspace.train.NonFiniteLossError: the loss became non-finite (`skip_nonfinite` False).
    embedspace.train.Preempted: SIGTERM arrived; a checkpoint of the current step was written.
  """
  validate(config)
  mesh = parallel.make_mesh()
  ssl_train.check_batch_divisible(config, mesh)
  workdir = os.path.abspath(workdir)
  check_workdir_config(config, workdir)
  logging.info("%s", parallel.describe(mesh))
  splits = data_lib.load_splits(num_samples=config.data.audio_samples,
                                text_length=config.data.text_length,
                                source=config.data.source, data_dir=config.data.tfds_data_dir)
  sampler = make_sampler(config, splits["train"])

  model = build_model(config)
  tx = optim.make_optimizer(config)
  state = parallel.replicate(mesh, create_train_state(config, model, tx))
  ckpt, state, start = ssl_train.restore_or_start(config, workdir, state, sampler)
  p_step = make_parallel_step(mesh, model=model, tx=tx, config=config)
  writer = metrics_lib.MetricWriter(workdir)
  pairs_per_step = config.batch_size * len(pairs_of(config)) * num_views(config)

  state = ssl_train.run_loop(
      config, state, step_fn=p_step, batches=sampler, data_state=sampler, mesh=mesh,
      ckpt=ckpt, writer=writer, workdir=workdir, start=start, items_per_step=pairs_per_step,
      rate_name="pairs_per_sec", shown=("pairs_per_sec",))

  variables = jax.device_get({"params": state.params, "batch_stats": state.batch_stats})
  report = mm_evaluate.evaluate_run(
      config, build_model(config, bn_axis_name=None), variables, splits,
      out_dir=os.path.join(workdir, "eval") if jax.process_index() == 0 else None)
  writer.write_scalars(config.num_steps, {f"eval/{k}": v
                                          for k, v in ssl_train.flatten_scalars(report).items()})
  writer.close()
  if jax.process_index() == 0:
    with open(os.path.join(workdir, "eval.json"), "w", encoding="utf-8") as f:
      json.dump(report, f, indent=2)
  return report
