"""Self-supervised joint-embedding methods as tasks: VICReg, SimCLR, Barlow Twins.

Each method is an `SslTask`: an encoder + projector (`models.EmbeddingModel`, batch norm
synchronised over the mesh) sees two augmented views of every image (`data.ssl_loader`), and a
loss of `embedspace.losses` compares the two projections over the GLOBAL batch with collectives
named by `parallel.AXIS`. What differs between the methods is the objective and its config keys
(`config.loss`); everything else (step, loop, checkpoints) is the core's. The evaluation is
`ssl.evaluate.evaluate_run`: kNN and linear probe beside raw pixels and the random encoder,
retrieval under every measure, OOD against MNIST, hypersphere geometry.

  VICReg        Bardes et al. 2022   invariance + variance + covariance
  SimCLR        Chen et al. 2020     InfoNCE (NT-Xent) over 2N-2 in-batch negatives
  Barlow Twins  Zbontar et al. 2021  cross-correlation to identity
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections

from embedspace import data as data_lib
from embedspace import losses
from embedspace import models
from embedspace import parallel
from embedspace.core import config_checks
from embedspace.core.config_checks import ConfigError, get, require
from embedspace.core.task import Setup
from embedspace.core.workdirs import IncompatibleWorkdirError, restore_newest
from embedspace.space import image as image_space
from embedspace.ssl import evaluate as ssl_evaluate

Objective = Callable[..., tuple[jax.Array, dict[str, jax.Array]]]
"""`(loss config, z1, z2, *, axis_name) -> (global-batch loss, its terms)`."""


def build_model(config: ml_collections.ConfigDict, *,
                bn_axis_name: str | None = parallel.AXIS) -> models.EmbeddingModel:
  """The encoder + projector named by `config.model`, batch norm synchronised over the mesh."""
  return models.EmbeddingModel(
      stage_sizes=tuple(config.model.stage_sizes), width=config.model.width,
      projector_dims=tuple(config.model.projector_dims), dtype=jnp.dtype(config.model.dtype),
      bn_axis_name=bn_axis_name)


def embedding_health(z1: jax.Array, z2: jax.Array, *, axis_name: str | None
                     ) -> dict[str, jax.Array]:
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


def validate_common(config: ml_collections.ConfigDict) -> None:
  """The keys every image SSL config has: the run, the model, the data, the evaluation."""
  config_checks.require_common(config)
  config_checks.require_positive_ints(config, ("data.image_size", "model.width",
                                               "eval.batch_size", "eval.knn_k"))
  require(config, isinstance(config.eval_every, int) and config.eval_every >= 0, "eval_every",
          "must be an integer >= 0 (0: evaluate only at the end)")
  config_checks.require_one_of(config, "model.dtype", ("float32", "bfloat16"))
  for key in ("model.stage_sizes", "model.projector_dims"):
    v = tuple(get(config, key))
    require(config, len(v) > 0 and all(isinstance(n, int) and n > 0 for n in v), key,
            "must be a non-empty tuple of positive integers")
  lo, hi = config.data.augment.crop_scale
  require(config, 0 < lo <= hi <= 1, "data.augment.crop_scale", "must satisfy 0 < lo <= hi <= 1")


def check_data(config: ml_collections.ConfigDict) -> None:
  """Opens the train and eval splits of `config.data`, so a missing dataset fails at the start.

  Raises:
    ConfigError: the dataset is unknown, not prepared in `config.data.data_dir`, or unreadable.
  """
  for key in ("train_split", "eval_split"):
    try:
      data_lib.get_source(config.data.name, split=config.data[key], data_dir=config.data.data_dir)
    except (ValueError, FileNotFoundError) as e:  # get_source's documented bad-input errors.
      raise ConfigError(f"config.data.name={config.data.name!r} "
                        f"(config.data.{key}={config.data[key]!r}): {e}") from None


@dataclasses.dataclass(frozen=True)
class SslTask:
  """A two-view joint-embedding method: its objective and the loss keys it takes.

  Attributes:
    name: `config.method`.
    objective: the loss (see `Objective`).
    loss_keys: exactly the keys of `config.loss`.
    check_loss: extra checks of `config.loss` values, or None.
  """
  name: str
  objective: Objective
  loss_keys: frozenset[str]
  check_loss: Callable[[ml_collections.ConfigDict], None] | None = None

  def validate(self, config: ml_collections.ConfigDict) -> None:
    """Raises ConfigError naming the first key whose value cannot work."""
    require(config, config.method == self.name, "method", f"must be {self.name!r}")
    validate_common(config)
    keys = set(config.loss.keys())
    if keys != self.loss_keys:
      raise ConfigError(f"config.loss={sorted(keys)}: method {self.name!r} takes exactly the "
                        f"loss keys {sorted(self.loss_keys)}")
    if self.check_loss is not None:
      self.check_loss(config)
    check_data(config)

  def setup(self, config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh) -> Setup:
    """The two-view input of the train split, the model and the loss of the two projections."""
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

    def init(rng: jax.Array) -> Mapping[str, Any]:
      # Outside any mesh: batch norm's collective needs no axis for a plain apply.
      dummy = jnp.zeros((2, *image_shape), jnp.float32)
      return jax.jit(functools.partial(model.clone(bn_axis_name=None).init, train=False))(
          rng, dummy)

    def loss_fn(params, state, batch, rng, *, axis_name):
      out1, upd = model.apply({"params": params, "batch_stats": state.batch_stats},
                              batch["view1"], train=True, mutable=["batch_stats"],
                              rngs={"dropout": rng})
      out2, upd = model.apply({"params": params, "batch_stats": upd["batch_stats"]},
                              batch["view2"], train=True, mutable=["batch_stats"],
                              rngs={"dropout": jax.random.fold_in(rng, 1)})
      z1, z2 = out1[1], out2[1]
      loss, terms = self.objective(config.loss, z1, z2, axis_name=axis_name)
      return loss, ((terms, z1, z2), upd["batch_stats"])

    def metrics_fn(state, batch, loss, outputs, *, axis_name):
      del batch
      terms, z1, z2 = outputs
      health_keys = embedding_health(z1, z2, axis_name=None).keys()
      health = jax.lax.cond(
          (state.step % config.log_every == 0) | (state.step == config.num_steps - 1),
          lambda: embedding_health(z1, z2, axis_name=axis_name),
          lambda: {k: jnp.zeros((), jnp.float32) for k in health_keys})
      return {"loss": loss, **{f"loss/{k}": v for k, v in terms.items()}, **health}

    def monitor(step: int, state: Any) -> tuple[dict[str, float], str]:
      knn = ssl_evaluate.evaluate_run(
          config, model, {"params": state.params, "batch_stats": state.batch_stats}, mesh,
          knn_only=True)["trained"]["encoder"]["knn_accuracy"]
      return {"eval/trained/encoder/knn_accuracy": knn}, f"kNN accuracy {knn:.4f}"

    views = ({"view1": b["view1"], "view2": b["view2"]} for b in data_iter)
    return Setup(model=model, init=init, loss_fn=loss_fn, metrics_fn=metrics_fn, batches=views,
                 data_state=data_iter, items_per_step=2 * config.batch_size,
                 rate_name="images_per_sec", shown=("images_per_sec",), monitor=monitor,
                 context={"mesh": mesh})

  def evaluate(self, config: ml_collections.ConfigDict, setup: Setup, state: Any, *,
               initial: Mapping[str, Any], out_dir: str | None) -> dict[str, Any]:
    """`ssl.evaluate.evaluate_run` of the trained encoder beside its baselines."""
    ev = config.eval
    return ssl_evaluate.evaluate_run(
        config, setup.model, {"params": state.params, "batch_stats": state.batch_stats},
        setup.context["mesh"], init_variables=initial if ev.baselines else None,
        full=ev.full, out_dir=out_dir if ev.full else None, step=int(jax.device_get(state.step)),
        **ssl_evaluate.options(ev))

  def load(self, workdir: str, **kwargs: Any) -> image_space.TrainedModel:
    """The trained encoder of `workdir`, ready to embed raw images (see `space.image`)."""
    config, variables, step = restore_newest(workdir)
    try:
      model = build_model(config, bn_axis_name=None)
    except (KeyError, AttributeError, TypeError, ValueError) as e:
      raise IncompatibleWorkdirError(
          f"{workdir} was written by another version of embedspace or for another model "
          f"(config.json lacks {e}); load it with the version that trained it") from None
    return image_space.trained_model(workdir, config, model, variables, step, **kwargs)


def _vicreg(lc: ml_collections.ConfigDict, z1: jax.Array, z2: jax.Array, *,
            axis_name: str | None) -> tuple[jax.Array, dict[str, jax.Array]]:
  return losses.vicreg_loss(
      z1, z2, invariance_weight=lc.invariance_weight, variance_weight=lc.variance_weight,
      covariance_weight=lc.covariance_weight, axis_name=axis_name)


def _simclr(lc: ml_collections.ConfigDict, z1: jax.Array, z2: jax.Array, *,
            axis_name: str | None) -> tuple[jax.Array, dict[str, jax.Array]]:
  return losses.info_nce(z1, z2, temperature=lc.temperature, similarity=lc.similarity,
                         axis_name=axis_name), {}


def _check_simclr(config: ml_collections.ConfigDict) -> None:
  require(config, config.loss.temperature > 0, "loss.temperature", "must be > 0")
  config_checks.require_one_of(config, "loss.similarity", ("cosine", "arc_length"))


def _barlow(lc: ml_collections.ConfigDict, z1: jax.Array, z2: jax.Array, *,
            axis_name: str | None) -> tuple[jax.Array, dict[str, jax.Array]]:
  return losses.barlow_twins_loss(z1, z2, off_diagonal_weight=lc.off_diagonal_weight,
                                  axis_name=axis_name)


VICREG = SslTask("vicreg", _vicreg,
                 frozenset({"invariance_weight", "variance_weight", "covariance_weight"}))
SIMCLR = SslTask("simclr", _simclr, frozenset({"temperature", "similarity"}), _check_simclr)
BARLOW = SslTask("barlow", _barlow, frozenset({"off_diagonal_weight"}))
