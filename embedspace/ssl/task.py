"""Self-supervised image methods as tasks: their shared part, and VICReg, SimCLR, Barlow Twins.

`ImageSslTask` is what every image method shares: the config checks, the input (two augmented
views of every image, `data.ssl_loader`), the embedding model (`models.EmbeddingModel`: a ResNet
or a ViT encoder, `config.model.name`, and a projector, batch norm synchronised over the mesh),
the step's metrics (the loss terms and the embedding's health), the kNN monitor, the evaluation
(`ssl.evaluate.evaluate_run`: kNN and linear probe beside raw pixels and the random encoder,
retrieval under every measure, OOD against MNIST, hypersphere geometry) and `load`. A method
writes its loss (`make_loss`) and, where it has them, its other trained parts (`init`,
`model_variables`: BYOL's predictor, DINO's centre), its target network (`ema`) and its input
(`train_loader`: DINO's multi-crop); the step, loop and checkpoints are the core's.

`SslTask` is the two-view joint-embedding method: the same model on both views and a loss of
`embedspace.losses` between the two projections over the GLOBAL batch, with collectives named by
`parallel.AXIS`. What differs between these methods is only the objective and its config keys:

  VICReg        Bardes et al. 2022   invariance + variance + covariance
  SimCLR        Chen et al. 2020     InfoNCE (NT-Xent) over 2N-2 in-batch negatives
  Barlow Twins  Zbontar et al. 2021  cross-correlation to identity

The distillation family (a momentum teacher) is in `ssl.byol` and `ssl.dino`.
"""

from __future__ import annotations

import abc
import dataclasses
import functools
from collections.abc import Callable, Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from embedspace import data as data_lib
from embedspace import losses
from embedspace import models
from embedspace import parallel
from embedspace.core import config_checks
from embedspace.core.config_checks import ConfigError, get, require
from embedspace.core.step import Ema, LossFn
from embedspace.core.task import Setup
from embedspace.core.workdirs import IncompatibleWorkdirError, restore_newest
from embedspace.space import image as image_space
from embedspace.ssl import evaluate as ssl_evaluate

Objective = Callable[..., tuple[jax.Array, dict[str, jax.Array]]]
"""`(loss config, z1, z2, *, axis_name) -> (global-batch loss, its terms)`."""

ENCODERS = ("resnet", "vit")
"""`config.model.name`: the ResNet of `model.stage_sizes`/`model.width`, or the ViT of `model.vit`."""


def build_encoder(config: ml_collections.ConfigDict) -> nn.Module | None:
  """The encoder `config.model.name` names: None for the ResNet (`EmbeddingModel` builds it from
  `model.stage_sizes` and `model.width`), else the `models.ViT` of `config.model.vit`."""
  mc = config.model
  if mc.get("name", "resnet") == "resnet":  # Workdirs from before model.name trained a ResNet.
    return None
  v = mc.vit
  return models.ViT(patch_size=v.patch_size, width=v.width, depth=v.depth,
                    num_heads=v.num_heads, mlp_dim=v.mlp_dim, posemb=v.posemb,
                    posemb_grid=config.data.image_size // v.patch_size,
                    dtype=jnp.dtype(mc.dtype))


def build_model(config: ml_collections.ConfigDict, *, bn_axis_name: str | None = parallel.AXIS,
                projector: nn.Module | None = None) -> models.EmbeddingModel:
  """The encoder + projector of `config.model` (the MLP of `model.projector_dims`, or
  `projector`), batch norm synchronised over `bn_axis_name`."""
  mc = config.model
  return models.EmbeddingModel(
      stage_sizes=tuple(mc.stage_sizes), width=mc.width,
      projector_dims=tuple(mc.get("projector_dims", ())), dtype=jnp.dtype(mc.dtype),
      bn_axis_name=bn_axis_name, encoder=build_encoder(config), projector=projector,
      kernel_init=kernel_init(config))


def kernel_init(config: ml_collections.ConfigDict) -> nn.initializers.Initializer:
  """The initialiser `config.model.kernel_init` names (`models.KERNEL_INITS`; configs from before
  the key existed trained with flax's "lecun_normal")."""
  return models.KERNEL_INITS[config.model.get("kernel_init", "lecun_normal")]


def embedding_health(z1: jax.Array, z2: jax.Array, *, axis_name: str | None
                     ) -> dict[str, jax.Array]:
  """Collapse and hypersphere diagnostics of paired embeddings over the global batch."""
  pos, neg = losses.positive_negative_geodesic(z1, z2, axis_name=axis_name)
  return {
      "health/embedding_std": losses.embedding_std(z1, axis_name=axis_name),
      "health/effective_rank": losses.effective_rank(z1, axis_name=axis_name),
      "health/alignment": losses.alignment(z1, z2, axis_name=axis_name),
      "health/uniformity": losses.uniformity(z1, axis_name=axis_name),
      "health/geodesic_positive": pos,
      "health/geodesic_negative": neg,
  }


def validate_positive_int_tuple(config: ml_collections.ConfigDict, key: str) -> None:
  """Raises ConfigError unless `config.<key>` is a non-empty tuple of positive integers."""
  v = tuple(get(config, key))
  require(config, len(v) > 0 and all(isinstance(n, int) and n > 0 for n in v), key,
          "must be a non-empty tuple of positive integers")


def validate_model(config: ml_collections.ConfigDict) -> None:
  """`config.model`: the encoder it names and the projector's sizes."""
  config_checks.require_one_of(config, "model.name", ENCODERS)
  config_checks.require_one_of(config, "model.dtype", ("float32", "bfloat16"))
  if "kernel_init" in config.model:
    config_checks.require_one_of(config, "model.kernel_init", tuple(models.KERNEL_INITS))
  config_checks.require_positive_ints(config, ("model.width",))
  validate_positive_int_tuple(config, "model.stage_sizes")
  if "projector_dims" in config.model:
    validate_positive_int_tuple(config, "model.projector_dims")
  if config.model.name != "vit":
    return
  config_checks.require_positive_ints(config, tuple(
      f"model.vit.{k}" for k in ("patch_size", "width", "depth", "num_heads", "mlp_dim")))
  v = config.model.vit
  require(config, v.width % v.num_heads == 0, "model.vit.num_heads",
          f"must divide config.model.vit.width={v.width}")
  config_checks.require_one_of(config, "model.vit.posemb", ("learn", "sincos2d"))
  if v.posemb == "sincos2d":
    require(config, v.width % 4 == 0 and v.width >= 8, "model.vit.width",
            "must be a multiple of 4 and >= 8 for sincos2d position embeddings")
  require(config, config.data.image_size % v.patch_size == 0, "data.image_size",
          f"must be a multiple of config.model.vit.patch_size={v.patch_size}")


def validate_common(config: ml_collections.ConfigDict) -> None:
  """The keys every image SSL config has: the run, the model, the data, the evaluation."""
  config_checks.require_common(config)
  require(config, config.batch_size >= 2, "batch_size",
          "must be >= 2 (every loss here needs the batch's statistics or its negatives)")
  config_checks.require_positive_ints(config, ("data.image_size", "eval.batch_size",
                                               "eval.knn_k"))
  require(config, isinstance(config.eval_every, int) and config.eval_every >= 0, "eval_every",
          "must be an integer >= 0 (0: evaluate only at the end)")
  validate_model(config)
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


def apply_model(model: models.EmbeddingModel, params: Any, batch_stats: Any, images: jax.Array
                ) -> tuple[tuple[jax.Array, jax.Array], Any]:
  """`((features, embeddings), new batch_stats)` of `model` in training mode on `images`."""
  out, updates = model.apply({"params": params, "batch_stats": batch_stats}, images, train=True,
                             mutable=["batch_stats"])
  return out, updates.get("batch_stats", {})


class ImageSslTask(abc.ABC):
  """The shared part of the image methods (see the module docstring); a method subclasses it.

  A subclass sets `name` (`config.method`) and `loss_keys` (exactly the keys of `config.loss`)
  and writes `make_loss`; the other hooks have the two-view defaults.
  """
  name: str
  loss_keys: frozenset[str]

  # ---------------------------------------------------------------------------------------------
  # What a method writes.

  def check(self, config: ml_collections.ConfigDict) -> None:
    """Checks of the method's own keys (`config.loss`, ...); raises ConfigError."""

  def build(self, config: ml_collections.ConfigDict, *,
            bn_axis_name: str | None = parallel.AXIS) -> models.EmbeddingModel:
    """The embedding model that is trained, evaluated and loaded."""
    return build_model(config, bn_axis_name=bn_axis_name)

  def views(self, config: ml_collections.ConfigDict) -> int:
    """Images the model sees per dataset image and step (the rate counts them)."""
    del config
    return 2

  def train_loader(self, config: ml_collections.ConfigDict, source: Any) -> Any:
    """The training input: two augmented views of every image."""
    return data_lib.ssl_loader(
        source, global_batch_size=config.batch_size, seed=config.seed,
        image_size=config.data.image_size, augment=config.data.augment.to_dict(),
        process_index=jax.process_index(), process_count=jax.process_count(),
        worker_count=config.data.worker_count)

  def init(self, config: ml_collections.ConfigDict, model: models.EmbeddingModel,
           rng: jax.Array, images: jax.Array) -> Mapping[str, Any]:
    """The initial variables (`{"params", "batch_stats"?}`) of every trained part."""
    del config
    # Outside any mesh: batch norm's collective needs no axis for a plain apply.
    return jax.jit(functools.partial(model.clone(bn_axis_name=None).init, train=False))(
        rng, images)

  def model_variables(self, variables: Mapping[str, Any]) -> dict[str, Any]:
    """The embedding model's own `{"params", "batch_stats"}` out of all the trained state."""
    return {"params": variables["params"], "batch_stats": variables["batch_stats"]}

  def ema(self, config: ml_collections.ConfigDict) -> Ema | None:
    """The target network the core keeps as a moving average, or None."""
    del config
    return None

  @abc.abstractmethod
  def make_loss(self, config: ml_collections.ConfigDict, model: models.EmbeddingModel
                ) -> LossFn:
    """The per-device loss (`core.step.LossFn`); its outputs are `(terms, z1, z2)`: the scalar
    terms logged as `loss/<name>` and two `[B, D]` embeddings of paired views for the health
    metrics."""

  # ---------------------------------------------------------------------------------------------
  # The Task protocol, the same for every method.

  def validate(self, config: ml_collections.ConfigDict) -> None:
    """Raises ConfigError naming the first key whose value cannot work."""
    require(config, config.method == self.name, "method", f"must be {self.name!r}")
    validate_common(config)
    keys = set(config.loss.keys())
    if keys != self.loss_keys:
      raise ConfigError(f"config.loss={sorted(keys)}: method {self.name!r} takes exactly the "
                        f"loss keys {sorted(self.loss_keys)}")
    self.check(config)
    check_data(config)

  def setup(self, config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh) -> Setup:
    """The input of the train split, the model, its loss, metrics and kNN monitor."""
    source, info = data_lib.get_source(config.data.name, split=config.data.train_split,
                                       data_dir=config.data.data_dir)
    # Resumable at any step on any topology (elastic resume, `data.ResumableBatches`).
    data_iter = data_lib.ResumableBatches(self.train_loader(config, source),
                                          local_batch_size=config.batch_size // jax.process_count())
    image_shape = (config.data.image_size, config.data.image_size, info.image_shape[-1])
    model = self.build(config)

    def init(rng: jax.Array) -> Mapping[str, Any]:
      return self.init(config, model, rng, jnp.zeros((2, *image_shape), jnp.float32))

    def metrics_fn(state, batch, loss, outputs, *, axis_name):
      del batch
      terms, z1, z2 = outputs
      health_keys = embedding_health(z1, z2, axis_name=None).keys()
      health = jax.lax.cond(
          (state.step % config.log_every == 0) | (state.step == config.num_steps - 1),
          lambda: embedding_health(z1, z2, axis_name=axis_name),
          lambda: {k: jnp.zeros((), jnp.float32) for k in health_keys})
      return {"loss": loss, **{f"loss/{k}": v for k, v in terms.items()}, **health}

    curve_config = ssl_evaluate.monitor_config(config)

    def monitor(step: int, state: Any) -> tuple[dict[str, float], str]:
      scores = ssl_evaluate.evaluate_run(
          curve_config, model, self.model_variables(
              {"params": state.params, "batch_stats": state.batch_stats}), mesh,
          monitor=True)["trained"]["encoder"]
      knn, probe = scores["knn_accuracy"], scores["linear_probe_accuracy"]
      return ({"curve/knn_accuracy": knn, "curve/linear_probe_accuracy": probe},
              f"kNN {knn:.4f}, linear probe {probe:.4f} ({curve_config.eval.max_eval_examples} "
              "test images)")

    batches = ({k: v for k, v in b.items() if k != "label"} for b in data_iter)
    return Setup(model=model, init=init, loss_fn=self.make_loss(config, model),
                 metrics_fn=metrics_fn, ema=self.ema(config), batches=batches,
                 data_state=data_iter, items_per_step=self.views(config) * config.batch_size,
                 rate_name="images_per_sec", shown=("images_per_sec",), monitor=monitor,
                 context={"mesh": mesh})

  def evaluate(self, config: ml_collections.ConfigDict, setup: Setup, state: Any, *,
               initial: Mapping[str, Any], out_dir: str | None) -> dict[str, Any]:
    """`ssl.evaluate.evaluate_run` of the trained encoder beside its baselines."""
    ev = config.eval
    return ssl_evaluate.evaluate_run(
        config, setup.model,
        self.model_variables({"params": state.params, "batch_stats": state.batch_stats}),
        setup.context["mesh"],
        init_variables=self.model_variables(initial) if ev.baselines else None,
        full=ev.full, out_dir=out_dir if ev.full else None, step=int(jax.device_get(state.step)),
        **ssl_evaluate.options(ev))

  def load(self, workdir: str, **kwargs: Any) -> image_space.TrainedModel:
    """The trained encoder of `workdir`, ready to embed raw images (see `space.image`)."""
    config, variables, step = restore_newest(workdir)
    try:
      model = self.build(config, bn_axis_name=None)
      variables = self.model_variables(variables)
    except (KeyError, AttributeError, TypeError, ValueError) as e:
      raise IncompatibleWorkdirError(
          f"{workdir} was written by another version of embedspace or for another model "
          f"(config.json or the checkpoint lacks {e}); load it with the version that trained "
          "it") from None
    return image_space.trained_model(workdir, config, model, variables, step, **kwargs)


@dataclasses.dataclass(frozen=True)
class SslTask(ImageSslTask):
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

  def check(self, config: ml_collections.ConfigDict) -> None:
    """`check_loss`, if any."""
    if self.check_loss is not None:
      self.check_loss(config)

  def make_loss(self, config: ml_collections.ConfigDict, model: models.EmbeddingModel
                ) -> LossFn:
    """The objective between the projections of the two views (the same model on both)."""

    def loss_fn(params, state, batch, rng, *, axis_name):
      del rng  # The models have no dropout.
      (_, z1), stats = apply_model(model, params, state.batch_stats, batch["view1"])
      (_, z2), stats = apply_model(model, params, stats, batch["view2"])
      loss, terms = self.objective(config.loss, z1, z2, axis_name=axis_name)
      return loss, ((terms, z1, z2), stats)

    return loss_fn


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
