"""CLIP, ImageBind and DeCUR as one task: encoders per modality, one joint space.

Each array of a batch ('image-audio/image', 'image-audio/audio2', ...) is embedded by its
modality's encoder on this device's rows; the losses (`losses.clip_loss`, `barlow_twins_loss`,
`decur_loss`) combine the devices with collectives named `parallel.AXIS`, and batch norm
synchronises over the same axis. Step, loop, checkpoints (with the sampler's step as the data
state) and metrics are the core's; the evaluation is `multimodal.evaluate.evaluate_run`.

Per pair (a, b) the loss is CLIP's for 'clip' (Radford et al. 2021; ImageBind, Girdhar et al.
2023, sums it over its image-anchored pairs), Barlow Twins between the modalities for 'barlow'
(Zbontar et al. 2021), and DeCUR for 'decur' (Wang et al. 2023); the total is their sum.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import ml_collections

from embedspace import losses
from embedspace.core import config_checks
from embedspace.core.config_checks import ConfigError, require
from embedspace.core.task import Setup
from embedspace.multimodal import data as data_lib
from embedspace.multimodal import evaluate as mm_evaluate
from embedspace.multimodal import models
from embedspace.multimodal import space as mm_space

LOSSES = ("clip", "barlow", "decur")


def num_views(config: ml_collections.ConfigDict) -> int:
  """DeCUR needs two augmented views of each modality; CLIP and Barlow (cross-modal) one."""
  return 2 if config.loss.name == "decur" else 1


def validate(config: ml_collections.ConfigDict) -> None:
  """Raises ConfigError naming the first key whose value cannot work."""
  config_checks.require_one_of(config, "loss.name", LOSSES)
  try:
    pairs = models.pairs_of(config)
  except ValueError as e:
    raise ConfigError(f"config.pairs={config.pairs!r}: {e}") from None
  config_checks.require_common(config)
  config_checks.require_positive_ints(config, ("eval.batch_size", "eval.probe_steps"))
  require(config, config.batch_size >= 2, "batch_size",
          "must be >= 2 (in-batch negatives, statistics)")
  require(config, len(config.model.projector_dims) > 0, "model.projector_dims",
          "must not be empty")
  if config.loss.name == "decur":
    require(config, len(pairs) == 1, "pairs", "DeCUR takes exactly one pair of modalities")
    require(config, 0 < config.loss.num_common < config.model.projector_dims[-1],
            "loss.num_common",
            f"must be in [1, {config.model.projector_dims[-1] - 1}] (some dims unique)")
  config_checks.require_one_of(config, "data.source", data_lib.SOURCES)
  require(config, 400 <= config.data.audio_samples <= data_lib.MAX_SAMPLES, "data.audio_samples",
          f"must be in [400, {data_lib.MAX_SAMPLES}]")
  require(config, config.data.text_length == config.model.text.max_length, "data.text_length",
          f"must equal config.model.text.max_length={config.model.text.max_length}")


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


def _loss_fn(config: ml_collections.ConfigDict, model: models.MultimodalModel):
  """The per-device loss: each array of the batch through its modality's encoder, the sum of
  the pair losses over the global batch (`step.LossFn`)."""
  pairs = models.pairs_of(config)
  keys = data_lib.batch_keys(pairs, views=num_views(config))

  def loss_fn(params, state, batch, rng, *, axis_name):
    del rng
    stats = state.batch_stats
    z = {}
    for key, modality in keys:
      (_, z[key]), upd = model.apply({"params": params, "batch_stats": stats}, modality,
                                     batch[key], train=True, method=model.embed,
                                     mutable=["batch_stats"])
      stats = upd.get("batch_stats", stats)
    total, metrics = 0.0, {}
    scales = {}
    for pair in pairs:
      name = "-".join(pair)
      scale = model.apply({"params": params}, name, method=model.logit_scale)
      loss, parts = pair_loss(config, z, pair, scale, axis_name=axis_name)
      total = total + loss
      metrics[f"loss/{name}"] = loss
      metrics.update({f"loss/{name}/{k}": v for k, v in parts.items()})
      scales[f"logit_scale/{name}"] = jnp.minimum(jnp.exp(scale), losses.CLIP_MAX_LOGIT_SCALE)
    return total, ({**metrics, **scales}, stats)

  return loss_fn


def _metrics(state: Any, batch: Any, loss: jax.Array, outputs: dict[str, jax.Array], *,
             axis_name: str | None) -> dict[str, jax.Array]:
  del state, batch, axis_name
  return {"loss": loss, **outputs}


def make_sampler(config: ml_collections.ConfigDict, split: data_lib.Split
                 ) -> data_lib.PairedBatches:
  """This process's class-paired training batches (see `data.PairedBatches`)."""
  return data_lib.PairedBatches(
      split, pairs=models.pairs_of(config), global_batch_size=config.batch_size,
      seed=config.seed, views=num_views(config), augment=config.data.augment.to_dict(),
      process_index=jax.process_index(), process_count=jax.process_count())


class MultimodalTask:
  """CLIP, ImageBind and DeCUR: encoders per modality bound in one space by `config.pairs`."""

  def validate(self, config: ml_collections.ConfigDict) -> None:
    validate(config)

  def setup(self, config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh) -> Setup:
    """The shipped (or TFDS) paired splits, the class-paired sampler and the model."""
    del mesh
    splits = data_lib.load_splits(num_samples=config.data.audio_samples,
                                  text_length=config.data.text_length,
                                  source=config.data.source, data_dir=config.data.tfds_data_dir)
    sampler = make_sampler(config, splits["train"])
    model = models.build_model(config)

    def init(rng: jax.Array) -> dict[str, Any]:
      # Eagerly, not under `jit`: compiling the forward of three encoders for one call costs
      # 7-10 s of CPU per run, while eager ops compile once per process and shape (measured on
      # the `:smoke` models: 10.7 s jitted; eager 16 s for the first model of a process, then
      # 0.1-0.5 s), which matters for tests and evaluations that build several models.
      return model.clone(bn_axis_name=None).init(rng, models.dummy_inputs(config), train=False)

    pairs_per_step = config.batch_size * len(models.pairs_of(config)) * num_views(config)
    return Setup(model=model, init=init, loss_fn=_loss_fn(config, model), metrics_fn=_metrics,
                 batches=sampler, data_state=sampler, items_per_step=pairs_per_step,
                 rate_name="pairs_per_sec", shown=("pairs_per_sec",), context={"splits": splits})

  def evaluate(self, config: ml_collections.ConfigDict, setup: Setup, state: Any, *,
               initial: Any, out_dir: str | None) -> dict[str, Any]:
    """`multimodal.evaluate.evaluate_run`: zero-shot, retrieval, probes, emergent alignment."""
    del initial
    variables = jax.device_get({"params": state.params, "batch_stats": state.batch_stats})
    return mm_evaluate.evaluate_run(
        config, models.build_model(config, bn_axis_name=None), variables,
        setup.context["splits"], out_dir=out_dir if jax.process_index() == 0 else None)

  def load(self, workdir: str, **kwargs: Any) -> mm_space.MultimodalSpace:
    """The run as one space: `embed(modality, items)` (see `multimodal.space`)."""
    return mm_space.load(workdir, **kwargs)


TASK = MultimodalTask()
