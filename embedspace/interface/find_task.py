"""The FIND-style interface as a task (`configs/find.py`): frozen encoders, prompts, scenes.

The frozen encoders are those of a multimodal run (`config.encoders_workdir`, an ImageBind
workdir: image, audio and text encoders in one joint space). Captions and clips are embedded
once, on the host, into prompt banks; the image encoder runs inside the step on each batch of
scenes (`find.make_loss_fn`, reading `state.frozen`), whose only trained parameters are the
interface's. Step, loop, checkpoints (with the scene sampler's step as the data state) and
metrics are the core's; the end of the run is `find_eval.evaluate_run`.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging

from embedspace import data as image_data
from embedspace.core import checkpointing
from embedspace.core import config_checks
from embedspace.core import console
from embedspace.core import workdirs
from embedspace.core.config_checks import ConfigError, require
from embedspace.core.task import Setup
from embedspace.interface import find
from embedspace.interface import find_eval
from embedspace.interface import scenes
from embedspace.models import resnet
from embedspace.multimodal import data as mm_data
from embedspace.multimodal import evaluate as mm_evaluate
from embedspace.multimodal import space as mm_space

TRAIN_ENCODERS = ("train one with `python -m embedspace.main --config=configs/imagebind.py "
                  "--workdir=workdirs/imagebind` (or `configs/imagebind.py:smoke` for a quick "
                  "one) and pass --config.encoders_workdir=DIR")


def validate(config: ml_collections.ConfigDict) -> None:
  """Raises ConfigError naming the first key whose value cannot work (before any work)."""
  require(config, config.method == "find", "method", "must be 'find'")
  require(config, bool(config.encoders_workdir), "encoders_workdir",
          f"must name a trained ImageBind workdir; {TRAIN_ENCODERS}")
  config_checks.require_common(config)
  config_checks.require_positive_ints(
      config, ("model.width", "model.depth", "model.heads", "model.mask_size",
               "model.memory_size", "eval.num_scenes", "eval.batch_size", "eval.window_stride"))
  require(config, config.model.width % 4 == 0 and config.model.width % config.model.heads == 0,
          "model.width",
          f"must be divisible by 4 (position features) and model.heads={config.model.heads}")
  s = config.scenes
  require(config, s.canvas_size >= 56, "scenes.canvas_size", "must be >= 56")
  require(config, 1 <= s.min_items <= s.max_items <= 4, "scenes.max_items",
          f"must be in [scenes.min_items={s.min_items}, 4]")
  require(config, s.canvas_size % config.model.mask_size == 0, "model.mask_size",
          f"must divide scenes.canvas_size={s.canvas_size}")
  require(config, len(config.prompts) > 0 and set(config.prompts) <= {"text", "audio"},
          "prompts", "must be a non-empty tuple of 'text', 'audio'")
  require(config, config.loss.temperature > 0, "loss.temperature", "must be > 0")


def load_encoders(config: ml_collections.ConfigDict) -> tuple[Any, Any, Any]:
  """`(encoders_config, multimodal_model, variables)` of `config.encoders_workdir`.

  Raises:
    ConfigError: unset, missing, not a multimodal run, or without an image encoder or a
      prompt modality of `config.prompts`; the message names the command that trains one.
  """
  workdir = config.encoders_workdir
  try:
    enc_config, model, variables, _ = mm_space.load_workdir(workdir)
  except (FileNotFoundError, checkpointing.NoIntactCheckpointError,
          workdirs.IncompatibleWorkdirError) as e:
    raise ConfigError(f"config.encoders_workdir={workdir!r} holds no trained multimodal run "
                      f"({' '.join(str(e).split())}); {TRAIN_ENCODERS}") from None
  missing = {"image", *config.prompts} - set(model.modalities)
  if missing:
    raise ConfigError(f"config.encoders_workdir={workdir!r} has no {sorted(missing)} encoder "
                      f"(it has {tuple(model.modalities)}); {TRAIN_ENCODERS}")
  return enc_config, model, variables


def prompt_bank(mm_model: Any, variables: Any, splits: dict[str, Any], modalities: Sequence[str],
                *, batch_size: int) -> dict[str, dict[str, tuple[np.ndarray, np.ndarray]]]:
  """Frozen joint-space embeddings of every caption and clip: `{split: {modality: (emb, labels)}}`.

  Train prompts are the training captions and FSDD train clips; eval prompts the held-out
  captions and FSDD's test clips.
  """
  embed_fn = mm_evaluate.make_embed_fn(mm_model, variables)
  out = {}
  for name in ("train", "eval"):
    emb = mm_evaluate.embed_split(embed_fn, splits[name], modalities=tuple(modalities),
                                  batch_size=batch_size)
    out[name] = {m: (emb[m], getattr(splits[name], f"{m}_label")) for m in modalities}
  return out


def build_model(config: ml_collections.ConfigDict, enc_config: Any) -> find.FindModel:
  """The interface of `config.model` over the encoder `enc_config.model.image` describes."""
  mc = config.model
  return find.FindModel(
      interface=find.FindInterface(num_queries=config.scenes.max_items,
                              embed_dim=int(enc_config.model.projector_dims[-1]), width=mc.width,
                              depth=mc.depth, heads=mc.heads, mask_size=mc.mask_size,
                              memory_size=mc.memory_size),
      encoder=resnet.ResNet(stage_sizes=tuple(enc_config.model.image.stage_sizes),
                            width=enc_config.model.image.width))


def init_params(model: find.FindModel, frozen: Any, rng: jax.Array, *, canvas_size: int) -> Any:
  """The interface's initial parameters, for the stage shapes of the frozen image encoder."""
  stages = jax.eval_shape(lambda: find.spatial_features(model.encoder, frozen["encoder"],
                                                        jnp.zeros((2, canvas_size,
                                                                   canvas_size, 1))))
  prompt = jnp.zeros((2, model.interface.embed_dim))
  return jax.jit(model.interface.init)(
      rng, [jnp.zeros(x.shape, x.dtype) for x in stages], prompt)["params"]


def environment(config: ml_collections.ConfigDict) -> dict[str, Any]:
  """Everything a run and its tests need: frozen encoders, splits, prompts, model, sampler."""
  enc_config, mm_model, mm_vars = load_encoders(config)
  splits = mm_data.load_splits(num_samples=enc_config.data.audio_samples,
                               text_length=enc_config.data.text_length)
  modalities = ("text",) + (("audio",) if "audio" in config.prompts else ())  # text: prototypes
  bank = prompt_bank(mm_model, mm_vars, splits, modalities, batch_size=config.eval.batch_size)
  texts = bank["train"]["text"]
  prompts = {name: {m: bank[name][m] for m in config.prompts} for name in bank}
  mean, std = image_data.normalization("embedded_mnist", channels=1)
  train = splits["train"]
  sampler = scenes.SceneBatches(
      train.image_raw, train.image_label, prompts=prompts["train"],
      global_batch_size=config.batch_size, seed=config.seed,
      scene_kwargs=find_eval.scene_kwargs(config), mask_size=config.model.mask_size,
      mean=float(mean[0]), std=float(std[0]), process_index=jax.process_index(),
      process_count=jax.process_count())
  # Host copies: the step donates its state, which must not free the loaded encoders' arrays.
  frozen = jax.tree.map(np.array, {
      "encoder": {"params": mm_vars["params"]["encoders_image"],
                  "batch_stats": mm_vars["batch_stats"]["encoders_image"]},
      "prototypes": mm_evaluate.prototypes(*texts)})
  return {"enc_config": enc_config, "mm_model": mm_model, "mm_vars": mm_vars, "splits": splits,
          "prompts": prompts, "sampler": sampler, "frozen": frozen,
          "model": build_model(config, enc_config), "mean": float(mean[0]), "std": float(std[0])}


def load_workdir(workdir: str) -> tuple[ml_collections.ConfigDict, dict[str, Any], Any, int]:
  """`(config, env, params, step)` of a FIND-style run's newest intact checkpoint.

  `env` is `environment(config)` (the frozen encoders of `config.encoders_workdir`, the splits and
  prompt banks, `env["model"]`); `find.forward(env["model"], params, env["frozen"], canvas,
  prompt)` gives the interface's outputs, and `find_eval.evaluate_run(config, env, params)`
  measures it again.

  Raises:
    FileNotFoundError, checkpointing.NoIntactCheckpointError: see `workdirs.restore_newest`.
    workdirs.IncompatibleWorkdirError: not a FIND-style run, or one this version cannot build.
    ConfigError: its `encoders_workdir` is gone.
  """
  config, variables, step = workdirs.restore_run(
      workdir, lambda c: c.get("method") == "find", kind="FIND-style",
      config_file="configs/find.py")
  env = environment(config)
  expected = jax.eval_shape(lambda: init_params(
      env["model"], env["frozen"], jax.random.PRNGKey(0),
      canvas_size=config.scenes.canvas_size))
  workdirs.check_params_fit(workdir, expected, variables["params"])
  return config, env, variables["params"], step




class FindTask:
  """The FIND-style interface over frozen ImageBind encoders (`configs/find.py`)."""

  def validate(self, config: ml_collections.ConfigDict) -> None:
    validate(config)

  def setup(self, config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh) -> Setup:
    """The frozen encoders and prompt banks (a bad encoders run fails here), scenes, model."""
    del mesh
    t0 = time.perf_counter()
    env = environment(config)
    logging.info("frozen encoders and prompt banks ready in %.1f s", time.perf_counter() - t0)
    model = env["model"]
    return Setup(
        model=model,
        init=lambda rng: {"params": init_params(model, env["frozen"], rng,
                                                canvas_size=config.scenes.canvas_size)},
        loss_fn=find.make_loss_fn(model, config), batches=env["sampler"],
        data_state=env["sampler"], frozen=env["frozen"], items_per_step=config.batch_size,
        rate_name="scenes_per_sec", shown=("scenes_per_sec",), context={"env": env})

  def evaluate(self, config: ml_collections.ConfigDict, setup: Setup, state: Any, *,
               initial: Any, out_dir: str | None) -> dict[str, Any]:
    """`find_eval.evaluate_run`: the interface against the sliding-window baseline."""
    del initial
    with console.Phases("evaluate", ["grounding, retrieval and baselines"]) as phase:
      phase("grounding, retrieval and baselines")
      return find_eval.evaluate_run(config, setup.context["env"], jax.device_get(state.params),
                                    out_dir=out_dir if jax.process_index() == 0 else None)

  def load(self, workdir: str) -> tuple[ml_collections.ConfigDict, dict[str, Any], Any, int]:
    """`load_workdir(workdir)`: the config, environment and parameters of the run."""
    return load_workdir(workdir)


TASK = FindTask()
