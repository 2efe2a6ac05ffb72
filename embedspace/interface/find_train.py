"""Training the FIND-style interface (`configs/find.py`): frozen encoders, prompts, the loop.

The frozen encoders are those of a multimodal run (`config.encoders_workdir`, an ImageBind
workdir: image, audio and text encoders in one joint space). Captions and clips are embedded
once, on the host, into prompt banks; the image encoder runs inside the step on each batch of
scenes (`find.train_step`), whose only trained parameters are the interface's. The loop,
checkpoints (orbax via `embedspace.checkpointing`, with the scene sampler's step as the data
state), metrics, SIGTERM handling and exit paths are those of `embedspace.train`; the end of the
run is `find_eval.evaluate_run`.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import logging

from embedspace import checkpointing
from embedspace import data as image_data
from embedspace import metrics as metrics_lib
from embedspace import optim
from embedspace import parallel
from embedspace import train as ssl_train
from embedspace import workdirs
from embedspace.config_checks import ConfigError, check_workdir_config
from embedspace.interface import find
from embedspace.interface import find_eval
from embedspace.interface import scenes
from embedspace.models import resnet
from embedspace.multimodal import data as mm_data
from embedspace.multimodal import evaluate as mm_evaluate
from embedspace.multimodal import train as mm_train

TRAIN_ENCODERS = ("train one with `python -m embedspace.main --config=configs/imagebind.py "
                  "--workdir=workdirs/imagebind` (or `configs/imagebind.py:smoke` for a quick "
                  "one) and pass --config.encoders_workdir=DIR")


def validate(config: ml_collections.ConfigDict) -> None:
  """Raises ConfigError naming the first key whose value cannot work (before any work)."""
  def require(ok: bool, key: str, value: Any, should: str) -> None:
    if not ok:
      raise ConfigError(f"config.{key}={value!r}: {should}")

  require(config.method == "find", "method", config.method, "must be 'find'")
  require(bool(config.encoders_workdir), "encoders_workdir", config.encoders_workdir,
          f"must name a trained ImageBind workdir; {TRAIN_ENCODERS}")
  for key in ("batch_size", "num_steps", "log_every", "checkpoint_every", "keep_checkpoints",
              "model.width", "model.depth", "model.heads", "model.mask_size",
              "model.memory_size", "eval.num_scenes", "eval.batch_size", "eval.window_stride"):
    value = config
    for part in key.split("."):
      value = value[part]
    require(isinstance(value, int) and value > 0, key, value, "must be a positive integer")
  require(config.model.width % 4 == 0 and config.model.width % config.model.heads == 0,
          "model.width", config.model.width,
          f"must be divisible by 4 (position features) and model.heads={config.model.heads}")
  s = config.scenes
  require(s.canvas_size >= 56, "scenes.canvas_size", s.canvas_size, "must be >= 56")
  require(1 <= s.min_items <= s.max_items <= 4, "scenes.max_items", s.max_items,
          f"must be in [scenes.min_items={s.min_items}, 4]")
  require(s.canvas_size % config.model.mask_size == 0, "model.mask_size", config.model.mask_size,
          f"must divide scenes.canvas_size={s.canvas_size}")
  require(len(config.prompts) > 0 and set(config.prompts) <= {"text", "audio"}, "prompts",
          config.prompts, "must be a non-empty tuple of 'text', 'audio'")
  require(config.optimizer.name in optim.OPTIMIZERS, "optimizer.name", config.optimizer.name,
          f"must be one of {optim.OPTIMIZERS}")
  require(config.loss.temperature > 0, "loss.temperature", config.loss.temperature, "must be > 0")


def load_encoders(config: ml_collections.ConfigDict) -> tuple[Any, Any, Any]:
  """`(encoders_config, multimodal_model, variables)` of `config.encoders_workdir`.

  Raises:
    ConfigError: unset, missing, not a multimodal run, or without an image encoder or a
      prompt modality of `config.prompts`; the message names the command that trains one.
  """
  workdir = config.encoders_workdir
  try:
    enc_config, model, variables, _ = mm_train.load_workdir(workdir)
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


def create_train_state(config: ml_collections.ConfigDict, model: find.FindModel,
                       tx: optax.GradientTransformation, frozen: Any) -> find.FindState:
  """Initial state on the host (replicate it with `parallel.replicate`)."""
  init_rng, state_rng = jax.random.split(jax.random.PRNGKey(config.seed))
  s = config.scenes.canvas_size
  stages = jax.eval_shape(lambda: find.spatial_features(model.encoder, frozen["encoder"],
                                                   jnp.zeros((2, s, s, 1))))
  prompt = jnp.zeros((2, model.interface.embed_dim))
  params = jax.jit(model.interface.init)(
      init_rng, [jnp.zeros(x.shape, x.dtype) for x in stages], prompt)["params"]
  return find.FindState(step=jnp.zeros((), jnp.int32), params=params, batch_stats={},
                   opt_state=tx.init(params), rng=state_rng, skipped=jnp.zeros((), jnp.int32),
                   frozen=frozen)


def make_parallel_step(mesh: jax.sharding.Mesh, *, model: find.FindModel,
                       tx: optax.GradientTransformation, config: ml_collections.ConfigDict):
  """`train_step` over `mesh`, compiled as every trainer's step (`train.make_parallel_step`)."""
  return ssl_train.make_parallel_step(mesh, model=model, tx=tx, config=config,
                                      step_fn=find.train_step)


def setup(config: ml_collections.ConfigDict) -> dict[str, Any]:
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

  `env` is `setup(config)` (the frozen encoders of `config.encoders_workdir`, the splits and
  prompt banks, `env["model"]`); `find.forward(env["model"], params, env["frozen"], canvas,
  prompt)` gives the interface's outputs, and `find_eval.evaluate_run(config, env, params)`
  measures it again.

  Raises:
    FileNotFoundError, checkpointing.NoIntactCheckpointError: see `workdirs.restore_newest`.
    workdirs.IncompatibleWorkdirError: not a FIND-style run, or one this version cannot build.
    ConfigError: its `encoders_workdir` is gone.
  """
  config, variables, step = workdirs.restore_run(workdir, ("find",), kind="FIND-style",
                                                  config_file="configs/find.py")
  env = setup(config)
  expected = jax.eval_shape(lambda: create_train_state(
      config, env["model"], optax.identity(), env["frozen"])).params
  workdirs.check_params_fit(workdir, expected, variables["params"])
  return config, env, variables["params"], step


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """Trains the interface of `config` in `workdir` (resuming), then evaluates it and the baseline.

  Returns the report (also `workdir/eval.json`, `workdir/eval/report.md`, `examples.png`).

  Raises:
    ConfigError: bad config values, a missing `encoders_workdir` or an unusable workdir.
    checkpointing.NoIntactCheckpointError: the workdir has checkpoints and none can be restored.
    embedspace.train.NonFiniteLossError: the loss became non-finite (`skip_nonfinite` False).
    embedspace.train.Preempted: SIGTERM arrived; a checkpoint of the current step was written.
  """
  validate(config)
  mesh = parallel.make_mesh()
  ssl_train.check_batch_divisible(config, mesh)
  t0 = time.perf_counter()
  env = setup(config)
  logging.info("frozen encoders and prompt banks ready in %.1f s", time.perf_counter() - t0)
  workdir = os.path.abspath(workdir)
  check_workdir_config(config, workdir)
  logging.info("%s", parallel.describe(mesh))
  model, sampler = env["model"], env["sampler"]
  tx = optim.make_optimizer(config)
  state = parallel.replicate(mesh, create_train_state(config, model, tx, env["frozen"]))
  ckpt, state, start = ssl_train.restore_or_start(config, workdir, state, sampler)
  p_step = make_parallel_step(mesh, model=model, tx=tx, config=config)
  writer = metrics_lib.MetricWriter(workdir)
  state = ssl_train.run_loop(
      config, state, step_fn=p_step, batches=sampler, data_state=sampler, mesh=mesh,
      ckpt=ckpt, writer=writer, workdir=workdir, start=start, items_per_step=config.batch_size,
      rate_name="scenes_per_sec", shown=("scenes_per_sec",))

  params = jax.device_get(state.params)
  report = find_eval.evaluate_run(
      config, env, params, out_dir=os.path.join(workdir, "eval")
      if jax.process_index() == 0 else None)
  writer.write_scalars(config.num_steps, {f"eval/{k}": v for k, v in
                                          ssl_train.flatten_scalars(report).items()})
  writer.close()
  if jax.process_index() == 0:
    with open(os.path.join(workdir, "eval.json"), "w", encoding="utf-8") as f:
      json.dump(report, f, indent=2)
  return report
