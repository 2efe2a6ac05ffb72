"""DINO (Caron et al. 2021, "Emerging Properties in Self-Supervised Vision Transformers") as a task.

Self-distillation with no labels: a student network (encoder + DINO head) is trained to match,
on every crop of an image, the output distribution a teacher network gives on the image's OTHER
global crops; the teacher is an exponential moving average of the student. What this file adds
to `ssl.task.ImageSslTask` (model, metrics, monitor, evaluation and `load` are shared):

- multi-crop input (`data.multicrop_loader`): 2 global crops at `config.data.image_size` and
  `config.data.num_local_crops` local crops of smaller regions at `config.data.local_image_size`
  (the ViT resizes its position table to their grid, `models.ViT.posemb_grid`). Crops of one
  size go through the network in one forward, as DINO's `MultiCropWrapper` does;
- the DINO head (`models.DINOHead`: MLP, L2-normalised bottleneck, weight-normalised output
  layer) as the model's projector, so the parameters are `encoder` and `projector`, and the
  evaluation's "projector" space is the head's `out_dim` logits;
- the teacher (`state.ema`, every parameter), moved by the core before each forward pass with
  the cosine momentum `losses.ema_momentum(step, base=config.loss.momentum_base, ...)`;
- the loss, `losses.dino_loss`: cross-entropy from the teacher's centred, sharpened softmax
  of each global crop to the student's softmax (temperature 0.1) of every other crop; the
  teacher temperature warms up linearly (`losses.teacher_temperature_schedule`);
- the running centre of the teacher's outputs, `batch_stats["center"]` (`[out_dim]`, no
  gradient, checkpointed with the state), updated after the loss from the GLOBAL batch mean of
  the teacher's logits (`losses.dino_center_update`, a `pmean` over the mesh).

The encoder is `config.model.name` ('vit' by default in `configs/dino.py`, as in the paper; a
ResNet works too, its batch norm synchronised). The teacher runs in training mode like the
paper's (batch statistics for a ResNet; its statistics updates are dropped).

Left out of the paper's recipe: freezing the last layer during the first epoch, the weight
decay schedule (0.04 -> 0.4) and the per-layer learning-rate rules; evaluation uses the
student's encoder, where the paper reports the teacher's (`state.ema` is in every checkpoint).
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections

from embedspace import data as data_lib
from embedspace import losses
from embedspace import models
from embedspace import parallel
from embedspace.core import config_checks
from embedspace.core.config_checks import ConfigError, require
from embedspace.core.step import Ema, LossFn
from embedspace.ssl import task as ssl_task

CENTER = "center"
"""The running centre's key in `batch_stats`."""


def _network(stats: Mapping[str, Any]) -> dict[str, Any]:
  """The model's batch statistics (a ResNet's), without the centre."""
  return {k: v for k, v in stats.items() if k != CENTER}


def build_head(config: ml_collections.ConfigDict) -> models.DINOHead:
  """The DINO head of `config.model.head`."""
  h = config.model.head
  return models.DINOHead(out_dim=h.out_dim, hidden_dim=h.hidden_dim,
                         bottleneck_dim=h.bottleneck_dim, num_layers=h.num_layers,
                         norm_last_layer=h.norm_last_layer, dtype=jnp.dtype(config.model.dtype))


class DinoTask(ssl_task.ImageSslTask):
  """DINO: `config.loss` (temperatures, momenta), `config.model.head`, the crops of `config.data`."""
  name = "dino"
  loss_keys = frozenset({"momentum_base", "student_temperature", "teacher_temperature_start",
                         "teacher_temperature", "teacher_temperature_warmup_steps",
                         "center_momentum"})

  def check(self, config: ml_collections.ConfigDict) -> None:
    """The loss's temperatures and momenta, the head's sizes, the local crops."""
    lc = config.loss
    for key in ("student_temperature", "teacher_temperature_start", "teacher_temperature"):
      value = lc[key]
      require(config, isinstance(value, float) and value > 0, f"loss.{key}", "must be > 0")
    require(config, isinstance(lc.momentum_base, float) and 0 <= lc.momentum_base < 1,
            "loss.momentum_base", "must be a float in [0, 1) (DINO: 0.996)")
    require(config, isinstance(lc.center_momentum, float) and 0 <= lc.center_momentum <= 1,
            "loss.center_momentum", "must be a float in [0, 1] (DINO: 0.9)")
    warmup = lc.teacher_temperature_warmup_steps
    require(config, isinstance(warmup, int) and warmup >= 0,
            "loss.teacher_temperature_warmup_steps", "must be an integer >= 0")
    if "head" not in config.model or "projector_dims" in config.model:
      raise ConfigError("config.model: a DINO config has model.head (the DINO head is its "
                        "projector) and no model.projector_dims")
    config_checks.require_positive_ints(config, tuple(
        f"model.head.{k}" for k in ("out_dim", "hidden_dim", "bottleneck_dim", "num_layers")))
    require(config, isinstance(config.model.head.norm_last_layer, bool),
            "model.head.norm_last_layer", "must be True or False")
    num_local = config.data.num_local_crops
    require(config, isinstance(num_local, int) and num_local >= 0, "data.num_local_crops",
            "must be an integer >= 0")
    config_checks.require_positive_ints(config, ("data.local_image_size",))
    lo, hi = config.data.local_crop_scale
    require(config, 0 < lo <= hi <= 1, "data.local_crop_scale",
            "must satisfy 0 < lo <= hi <= 1")
    if config.model.name == "vit":
      patch = config.model.vit.patch_size
      require(config, config.data.local_image_size % patch == 0, "data.local_image_size",
              f"must be a multiple of config.model.vit.patch_size={patch}")

  def build(self, config: ml_collections.ConfigDict, *,
            bn_axis_name: str | None = parallel.AXIS) -> models.EmbeddingModel:
    """The encoder with the DINO head as its projector."""
    return ssl_task.build_model(config, bn_axis_name=bn_axis_name, projector=build_head(config))

  def views(self, config: ml_collections.ConfigDict) -> int:
    """2 global crops and the local ones."""
    return 2 + config.data.num_local_crops

  def train_loader(self, config: ml_collections.ConfigDict, source: Any) -> Any:
    """DINO's multi-crop."""
    return data_lib.multicrop_loader(
        source, global_batch_size=config.batch_size, seed=config.seed,
        image_size=config.data.image_size, local_image_size=config.data.local_image_size,
        num_local=config.data.num_local_crops, augment=config.data.augment.to_dict(),
        local_crop_scale=tuple(config.data.local_crop_scale),
        process_index=jax.process_index(), process_count=jax.process_count(),
        worker_count=config.data.worker_count)

  def init(self, config: ml_collections.ConfigDict, model: models.EmbeddingModel,
           rng: jax.Array, images: jax.Array) -> Mapping[str, Any]:
    """The model's variables, and the centre (zeros, as in DINO) in `batch_stats`."""
    variables = super().init(config, model, rng, images)
    return {"params": variables["params"],
            "batch_stats": {**variables.get("batch_stats", {}),
                            CENTER: jnp.zeros((config.model.head.out_dim,), jnp.float32)}}

  def model_variables(self, variables: Mapping[str, Any]) -> dict[str, Any]:
    """Without the centre."""
    return {"params": variables["params"], "batch_stats": _network(variables["batch_stats"])}

  def ema(self, config: ml_collections.ConfigDict) -> Ema:
    """The teacher: every parameter, momentum by the cosine schedule from `momentum_base`."""
    return Ema(select=lambda params: params,
               momentum=functools.partial(losses.ema_momentum, base=config.loss.momentum_base,
                                          total_steps=config.num_steps))

  def make_loss(self, config: ml_collections.ConfigDict, model: models.EmbeddingModel
                ) -> LossFn:
    """DINO's loss over every (teacher global crop, other student crop) pair; the new centre."""
    lc = config.loss
    apply = ssl_task.apply_model

    def crop_major(x):  # [B, V, H, W, C] -> [V * B, H, W, C], crop by crop
      return jnp.swapaxes(x, 0, 1).reshape(-1, *x.shape[2:])

    def loss_fn(params, state, batch, rng, *, axis_name):
      del rng  # No dropout.
      b, num_global = batch["globals"].shape[:2]
      stats, center = _network(state.batch_stats), state.batch_stats[CENTER]
      global_crops = crop_major(batch["globals"])
      (features, student), stats = apply(model, params, stats, global_crops)
      student = [student]
      if "locals" in batch:
        (_, local_logits), stats = apply(model, params, stats, crop_major(batch["locals"]))
        student.append(local_logits)
      (_, teacher), _ = apply(model, state.ema, stats, global_crops)
      k = teacher.shape[-1]
      student = jnp.concatenate(student).reshape(-1, b, k)  # [crops, B, K], globals first
      teacher = teacher.reshape(num_global, b, k)
      temperature = losses.teacher_temperature_schedule(
          state.step, start=lc.teacher_temperature_start, end=lc.teacher_temperature,
          warmup_steps=lc.teacher_temperature_warmup_steps)
      loss = losses.dino_loss(student, teacher, center,
                              student_temperature=lc.student_temperature,
                              teacher_temperature=temperature, axis_name=axis_name)
      center = losses.dino_center_update(center, teacher, momentum=lc.center_momentum,
                                         axis_name=axis_name)
      features = features.reshape(num_global, b, -1)
      return loss, (({"teacher_temperature": temperature}, features[0], features[1]),
                    {**stats, CENTER: center})

    return loss_fn


DINO = DinoTask()
