"""BYOL (Grill et al. 2020, "Bootstrap Your Own Latent") as an image task.

An online network (encoder, projector and a predictor) learns to predict, from one view of an
image, the target network's projection of the other view; the target network is an exponential
moving average of the online encoder and projector, so no negatives and no variance term are
needed. What this file adds to `ssl.task.ImageSslTask` (data, model, metrics, monitor, evaluation
and `load` are shared):

- the predictor, `models.MLP(config.model.predictor_dims)` (`Linear-BN-ReLU` then `Linear`, as
  the paper's 4096-256 one; the last Linear has no bias, like the projector here), a third
  trained part of the parameters beside `encoder` and `projector`;
- the target (`state.ema`), kept by the core (`core.step.Ema`): before each step's forward pass
  it moves towards the online encoder and projector with momentum
  `losses.ema_momentum(step, base=config.loss.momentum_base, total_steps=config.num_steps)`,
  the paper's cosine schedule from tau_base to 1 (lightly's convention: update, then forward);
- the loss, `losses.byol_loss`: symmetric negative cosine between each view's prediction and the
  other view's target projection, with the target's gradient stopped (it also gets none: the
  target is not a parameter). lightly's scale: in [-1, 1], the paper's 4 + 4x that.

Batch norm of the projector and the predictor is synchronised over the mesh (`bn_axis_name`), as
in the paper's implementation, so the loss on 8 devices is the loss of the global batch. The
target runs in training mode (batch statistics, as the paper's); its running averages are
unused and not kept. Evaluation and `load` see the online encoder and projector.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections

from embedspace import losses
from embedspace import models
from embedspace import parallel
from embedspace.core.config_checks import ConfigError, require
from embedspace.core.step import Ema, LossFn
from embedspace.ssl import task as ssl_task

PREDICTOR = "predictor"
"""The predictor's key in `params` and `batch_stats`."""


def _network(tree: Mapping[str, Any]) -> dict[str, Any]:
  """The embedding model's part (encoder and projector) of a params or batch_stats tree."""
  return {k: v for k, v in tree.items() if k != PREDICTOR}


def build_predictor(config: ml_collections.ConfigDict, *,
                    bn_axis_name: str | None = parallel.AXIS) -> models.MLP:
  """The predictor MLP of `config.model.predictor_dims`."""
  return models.MLP(dims=tuple(config.model.predictor_dims),
                    dtype=jnp.dtype(config.model.dtype), bn_axis_name=bn_axis_name,
                    kernel_init=ssl_task.kernel_init(config))


class ByolTask(ssl_task.ImageSslTask):
  """BYOL: `config.loss.momentum_base` (tau_base), `config.model.predictor_dims`."""
  name = "byol"
  loss_keys = frozenset({"momentum_base"})

  def check(self, config: ml_collections.ConfigDict) -> None:
    """tau_base in [0, 1), a predictor ending in the projector's size."""
    base = config.loss.momentum_base
    require(config, isinstance(base, float) and 0 <= base < 1, "loss.momentum_base",
            "must be a float in [0, 1) (BYOL: 0.99 or 0.996)")
    for key in ("projector_dims", "predictor_dims"):
      if key not in config.model:
        raise ConfigError(f"config.model.{key} is missing: a BYOL config needs model.{key}")
    ssl_task.validate_positive_int_tuple(config, "model.predictor_dims")
    out = self.build(config).embed_dim
    require(config, config.model.predictor_dims[-1] == out, "model.predictor_dims",
            f"must end in the projector's output size {out} (the prediction regresses it)")

  def init(self, config: ml_collections.ConfigDict, model: models.EmbeddingModel,
           rng: jax.Array, images: jax.Array) -> Mapping[str, Any]:
    """The embedding model's variables, and the predictor's under `PREDICTOR`."""
    variables = super().init(config, model, rng, images)
    predictor = build_predictor(config, bn_axis_name=None)
    pred = jax.jit(functools.partial(predictor.init, train=False))(
        jax.random.fold_in(rng, 1), jnp.zeros((2, model.embed_dim), jnp.float32))
    return {"params": {**variables["params"], PREDICTOR: pred["params"]},
            "batch_stats": {**variables.get("batch_stats", {}),
                            PREDICTOR: pred["batch_stats"]}}

  def model_variables(self, variables: Mapping[str, Any]) -> dict[str, Any]:
    """Without the predictor."""
    return {"params": _network(variables["params"]),
            "batch_stats": _network(variables["batch_stats"])}

  def ema(self, config: ml_collections.ConfigDict) -> Ema:
    """The target: encoder and projector, momentum by BYOL's cosine schedule."""
    return Ema(select=_network,
               momentum=functools.partial(losses.ema_momentum, base=config.loss.momentum_base,
                                          total_steps=config.num_steps))

  def make_loss(self, config: ml_collections.ConfigDict, model: models.EmbeddingModel
                ) -> LossFn:
    """BYOL's loss of the online predictions against the target projections of the other view."""
    predictor = build_predictor(config)
    apply = ssl_task.apply_model

    def predict(params, stats, z):
      p, upd = predictor.apply({"params": params, "batch_stats": stats}, z, train=True,
                               mutable=["batch_stats"])
      return p, upd["batch_stats"]

    def loss_fn(params, state, batch, rng, *, axis_name):
      del rng  # No dropout.
      online, stats = _network(params), _network(state.batch_stats)
      (_, z1), stats = apply(model, online, stats, batch["view1"])
      (_, z2), stats = apply(model, online, stats, batch["view2"])
      p1, pred_stats = predict(params[PREDICTOR], state.batch_stats[PREDICTOR], z1)
      p2, pred_stats = predict(params[PREDICTOR], pred_stats, z2)
      # The target in training mode (batch statistics); its statistics updates are dropped.
      (_, t1), _ = apply(model, state.ema, stats, batch["view1"])
      (_, t2), _ = apply(model, state.ema, stats, batch["view2"])
      loss = losses.byol_loss(p1, t2, p2, t1, axis_name=axis_name)
      return loss, (({}, z1, z2), {**stats, PREDICTOR: pred_stats})

    return loss_fn


BYOL = ByolTask()
