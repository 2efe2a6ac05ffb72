"""Training and evaluating the PaLM-E-style model on frozen ImageBind embeddings.

The image and audio encoders of a trained multimodal run (`config.encoders_workdir`, loaded with
`multimodal.space.load_workdir`) stay frozen, as PaLM-E's ViT may (Driess et al. 2023 Sec. 4),
so every train and eval item is embedded once per run (a few seconds) and the step sees vectors.
What is injected is `config.model.source`: 'embeddings', the joint ImageBind space (the default:
image and audio vectors of a digit are already aligned there, which is the interface this
project studies; one 64-d vector per item), or 'features', each encoder's output before its
head (PaLM-E's choice for its ViT, 64-d image / 128-d audio here).

Step, loop, checkpoints (with the sampler's step as the data state) and metrics are the core's;
this task gives the loss on the answer tokens. The evaluation decodes every answer greedily
with the KV cache (`palme.generate`) and reports exact-match accuracy per task against chance.
"""

from __future__ import annotations

import os
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from etils import epath

from embedspace import parallel
from embedspace.core import checkpointing
from embedspace.core import config_checks
from embedspace.core import console
from embedspace.core import workdirs
from embedspace.core.config_checks import ConfigError, require
from embedspace.core.task import Setup
from embedspace.interface import palme
from embedspace.interface import palme_data
from embedspace.multimodal import data as mm_data
from embedspace.multimodal import models as mm_models
from embedspace.multimodal import space as mm_space

SOURCES = ("embeddings", "features")
TRAIN_ENCODERS = ("python -m embedspace.main --config=configs/imagebind.py "
                  "--workdir=/tmp/imagebind")


def validate(config: ml_collections.ConfigDict) -> None:
  """Raises ConfigError naming the first key whose value cannot work."""
  require(config, config.method == "palme", "method", "must be 'palme'")
  config_checks.require_common(config)
  config_checks.require_positive_ints(
      config, ("model.width", "model.depth", "model.heads", "model.tokens_per_item",
               "eval.batch_size", "eval.examples_per_task"))
  require(config, config.model.width % config.model.heads == 0, "model.width",
          f"must be divisible by config.model.heads={config.model.heads}")
  config_checks.require_one_of(config, "model.source", SOURCES)


def load_encoders(config: ml_collections.ConfigDict) -> tuple[ml_collections.ConfigDict, Any, Any]:
  """`(encoder config, model, variables)` of `config.encoders_workdir`.

  Raises:
    ConfigError: the workdir is unset, not a trained multimodal run, or lacks an image or an
      audio encoder (the message says how to train one).
  """
  workdir = config.encoders_workdir
  if not workdir:
    raise ConfigError("config.encoders_workdir is not set: the PaLM-E-style model reads frozen "
                      "image and audio encoders from a trained ImageBind run. Train one with "
                      f"`{TRAIN_ENCODERS}` and pass --config.encoders_workdir=/tmp/imagebind")
  try:
    enc_config, model, variables, _ = mm_space.load_workdir(workdir)
  except (FileNotFoundError, checkpointing.NoIntactCheckpointError,
          workdirs.IncompatibleWorkdirError) as e:
    raise ConfigError(f"config.encoders_workdir={workdir!r} cannot be used ({e}); train an "
                      f"ImageBind run with `{TRAIN_ENCODERS}`") from None
  modalities = mm_models.modalities_of(enc_config)
  if not {"image", "audio"} <= set(modalities):
    raise ConfigError(f"config.encoders_workdir={workdir!r} has encoders for {modalities}, not "
                      f"both image and audio; train an ImageBind run with `{TRAIN_ENCODERS}`")
  return enc_config, model, variables


def frozen_vectors(config: ml_collections.ConfigDict, *, batch_size: int = 500
                   ) -> dict[str, dict[str, np.ndarray]]:
  """The frozen vector of every image and recording of both splits (`config.model.source`).

  Returns:
    `{"train" | "eval": {"image": float32 [Ni, F], "image_label": [Ni], "audio": [Na, F'],
    "audio_label": [Na], "audio_id": [Na]}}`.

  Raises:
    ConfigError: see `load_encoders`.
  """
  enc_config, model, variables = load_encoders(config)
  splits = mm_data.load_splits(num_samples=enc_config.data.audio_samples,
                               text_length=enc_config.data.text_length)
  part = SOURCES.index(config.model.source)
  apply = jax.jit(lambda v, m, x: model.apply(v, m, x, train=False, method="embed")[part],
                  static_argnums=1)
  out = {}
  for name, split in splits.items():
    out[name] = {"image_label": split.image_label, "audio_label": split.audio_label,
                 "audio_id": split.audio_id}
    for modality, x in (("image", split.image), ("audio", split.audio)):
      parts = []
      for start in range(0, len(x), batch_size):
        chunk = x[start:start + batch_size]
        padded = np.concatenate([chunk, np.zeros((batch_size - len(chunk), *chunk.shape[1:]),
                                                 chunk.dtype)])
        parts.append(np.asarray(apply(variables, modality, jnp.asarray(padded)))[:len(chunk)])
      out[name][modality] = np.concatenate(parts).astype(np.float32)
  return out


def build_model(config: ml_collections.ConfigDict) -> palme.PalmE:
  """The decoder and (unless `config.model.use_items` is False) the two projectors."""
  m = config.model
  return palme.PalmE(
      vocab_size=len(palme_data.vocabulary()), image_token=palme_data.token_id(palme_data.IMG),
      audio_token=palme_data.token_id(palme_data.AUDIO), width=m.width, depth=m.depth,
      heads=m.heads, max_length=palme_data.sequence_length(tokens_per_item=m.tokens_per_item),
      tokens_per_item=m.tokens_per_item, use_items=bool(m.use_items))


def make_sampler(config: ml_collections.ConfigDict, vectors: dict[str, np.ndarray]
                 ) -> palme_data.PromptBatches:
  """This process's training batches from the train split's frozen `vectors`."""
  return palme_data.PromptBatches(
      image_vectors=vectors["image"], image_label=vectors["image_label"],
      audio_vectors=vectors["audio"], audio_label=vectors["audio_label"],
      global_batch_size=config.batch_size, seed=config.seed,
      tokens_per_item=config.model.tokens_per_item, process_index=jax.process_index(),
      process_count=jax.process_count())


def evaluate(config: ml_collections.ConfigDict, model: palme.PalmE, params: Any,
             vectors: dict[str, np.ndarray]) -> dict[str, Any]:
  """Greedy (KV-cached) answers to the eval prompts of every task: accuracy against chance.

  An answer is correct when the generated tokens are the answer word then `<eos>`. Chance:
  `uniform`, one of the task's possible answers at random; `majority`, always the most frequent
  answer of these eval prompts (what a model that ignores the items can reach at best).

  Returns:
    `{"accuracy": {task: float}, "chance_uniform": {...}, "chance_majority": {...},
    "examples": {task: n}, "shown": {task: [{"prompt", "answer", "generated"}]}}`.
  """
  ec, tpi = config.eval, config.model.tokens_per_item
  eos = palme_data.token_id(palme_data.EOS)
  words = palme_data.vocabulary()
  report = {k: {} for k in ("accuracy", "chance_uniform", "chance_majority", "examples", "shown")}
  for task in palme_data.EVAL_TASKS:
    ex = palme_data.eval_examples(task, ec.examples_per_task, image_label=vectors["image_label"],
                                  audio_label=vectors["audio_label"], seed=config.seed)
    items = {m: palme_data.gather(vectors[m], getattr(ex, f"{m}_index"))
             for m in ("image", "audio")}
    prompt = np.asarray(palme_data.prompt_ids(task, tokens_per_item=tpi), np.int32)
    generated = []
    for start in range(0, len(ex.task), ec.batch_size):
      rows = slice(start, start + ec.batch_size)
      n = len(ex.task[rows])
      pad = lambda x: np.concatenate([x, np.zeros((ec.batch_size - n, *x.shape[1:]),  # noqa
                                                  x.dtype)])
      out = palme.generate(model, params, jnp.asarray(np.tile(prompt, (ec.batch_size, 1))),
                           jnp.asarray(pad(items["image"][rows])),
                           jnp.asarray(pad(items["audio"][rows])),
                           steps=palme_data.ANSWER_STEPS)
      generated.append(np.asarray(out)[:n])
    generated = np.concatenate(generated)
    truth = np.array([palme_data.token_id(a) for a in ex.answer])
    correct = (generated[:, 0] == truth) & (generated[:, 1] == eos)
    possible = 2 if task == "same" else (10 if task.startswith("what") else 19)
    _, counts = np.unique(ex.answer, return_counts=True)
    report["accuracy"][task] = float(np.mean(correct))
    report["chance_uniform"][task] = 1.0 / possible
    report["chance_majority"][task] = float(counts.max() / counts.sum())
    report["examples"][task] = len(ex.task)
    report["shown"][task] = [
        {"prompt": palme_data.TEMPLATES["plus" if task == "plus_new_combos" else task],
         "answer": ex.answer[i],
         "generated": " ".join(words[t] for t in generated[i]),
         "image": int(ex.image_index[i]), "audio": int(ex.audio_index[i])}
        for i in range(min(ec.num_shown, len(ex.task)))]
  return report


def load_workdir(workdir: str) -> tuple[ml_collections.ConfigDict, palme.PalmE, Any, int]:
  """`(config, model, params, step)` of a PaLM-E-style run's newest intact checkpoint.

  Answer prompts with `palme.generate(model, params, ...)` on the items' vectors from
  `frozen_vectors(config)` (the run's `config.encoders_workdir`).

  Raises:
    FileNotFoundError, checkpointing.NoIntactCheckpointError: see `workdirs.restore_newest`.
    workdirs.IncompatibleWorkdirError: not a PaLM-E-style run, or one this version cannot build.
  """
  config, variables, step = workdirs.restore_run(
      workdir, lambda c: c.get("method") == "palme", kind="PaLM-E-style",
      config_file="configs/palme.py")
  model = build_model(config)
  params = variables["params"]
  dims = {m: params[f"{m}_projector1"]["kernel"].shape[0] if f"{m}_projector1" in params else 1
          for m in ("image", "audio")}
  expected = jax.eval_shape(lambda: init_params(
      config, model, jax.random.PRNGKey(0), image_dim=dims["image"], audio_dim=dims["audio"]))
  workdirs.check_params_fit(workdir, expected, params)
  return config, model, params, step


def write_report(report: dict[str, Any], config: ml_collections.ConfigDict, out_dir: str) -> str:
  """Writes `out_dir/report.md`: the accuracy table and a few prompts with their answers."""
  kind = ("text only: placeholders instead of items" if not config.model.use_items else
          f"{config.model.source} of {config.encoders_workdir}, "
          f"{config.model.tokens_per_item} soft tokens per item")
  lines = ["# PaLM-E-style multimodal sentences", "",
           f"Model: {kind}. Greedy decoding (KV cache); exact match of answer + `<eos>`. Items "
           "are the eval split's (never in a training prompt); `plus_new_combos` uses digit "
           "combinations no training `plus` prompt has.", "",
           "| task | prompts | accuracy | chance (uniform) | chance (majority answer) |",
           "|---|---|---|---|---|"]
  for task, acc in report["accuracy"].items():
    lines.append(f"| {task} | {report['examples'][task]} | {acc:.4f} | "
                 f"{report['chance_uniform'][task]:.4f} | {report['chance_majority'][task]:.4f} |")
  lines += ["", "## Examples (eval items: MNIST eval index / FSDD test index, -1 none)", "",
            "| task | prompt | truth | generated | image | audio |", "|---|---|---|---|---|---|"]
  for task, shown in report["shown"].items():
    for s in shown:
      lines.append(f"| {task} | `{s['prompt']}` | {s['answer']} | {s['generated']} | "
                   f"{s['image']} | {s['audio']} |")
  epath.Path(out_dir).mkdir(parents=True, exist_ok=True)
  path = epath.Path(out_dir) / "report.md"
  path.write_text("\n".join(lines) + "\n", encoding="utf-8")
  return os.fspath(path)


def init_params(config: ml_collections.ConfigDict, model: palme.PalmE, rng: jax.Array, *,
                image_dim: int, audio_dim: int) -> Any:
  """The initial parameters for items of `image_dim` / `audio_dim` frozen features."""
  tokens = jnp.asarray([palme_data.prompt_ids(
      "same", tokens_per_item=config.model.tokens_per_item)] * 2, jnp.int32)
  # Jitted: one compile (~1 s) instead of eagerly dispatching each op of each layer (~9 s).
  return jax.jit(model.init)(rng, tokens, jnp.zeros((2, image_dim)),
                             jnp.zeros((2, audio_dim)))["params"]


def make_loss_fn(model: palme.PalmE):
  """The per-device loss (`step.LossFn`): mean cross-entropy over every answer token of the
  global batch. Each device differentiates `devices * (its summed loss) / (global answer
  tokens)`, whose mean over devices (the step's `pmean`) is the gradient of that global mean."""

  def loss_fn(params, state, batch, rng, *, axis_name):
    del rng
    targets, weights = batch["tokens"][:, 1:], batch["answer_mask"][:, 1:]
    count = parallel.psum(jnp.sum(weights), axis_name)
    logits, _ = model.apply({"params": params}, batch["tokens"][:, :-1], batch["image"],
                            batch["audio"])
    total, _ = palme.answer_loss(logits, targets, weights)
    return (total * parallel.axis_size(axis_name) / count,
            ((total, logits, count), state.batch_stats))

  return loss_fn


def step_metrics(state: Any, batch: Any, value: jax.Array, outputs: Any, *,
                 axis_name: str | None) -> dict[str, jax.Array]:
  """The global answer loss and the answer tokens predicted right."""
  del state, value
  total, logits, count = outputs
  targets, weights = batch["tokens"][:, 1:], batch["answer_mask"][:, 1:]
  correct = jnp.sum((jnp.argmax(logits, -1) == targets) * weights)
  return {"loss": parallel.psum(total, axis_name) / count,
          "answer_token_accuracy": parallel.psum(correct, axis_name) / count}


class PalmETask:
  """The PaLM-E-style decoder over frozen ImageBind vectors (`configs/palme.py`)."""

  def validate(self, config: ml_collections.ConfigDict) -> None:
    validate(config)

  def setup(self, config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh) -> Setup:
    """The frozen vectors of every item (a bad encoders run fails here), prompts, the model."""
    del mesh
    vectors = frozen_vectors(config)
    sampler = make_sampler(config, vectors["train"])
    model = build_model(config)
    dims = {"image_dim": vectors["train"]["image"].shape[1],
            "audio_dim": vectors["train"]["audio"].shape[1]}
    return Setup(
        model=model, init=lambda rng: {"params": init_params(config, model, rng, **dims)},
        loss_fn=make_loss_fn(model), metrics_fn=step_metrics, batches=sampler,
        data_state=sampler, items_per_step=config.batch_size, rate_name="prompts_per_sec",
        shown=("answer_token_accuracy",), context={"vectors": vectors})

  def evaluate(self, config: ml_collections.ConfigDict, setup: Setup, state: Any, *,
               initial: Any, out_dir: str | None) -> dict[str, Any]:
    """Greedy answers to the eval prompts of every task (`evaluate`), and `report.md`."""
    del initial
    with console.Phases("evaluate", ["greedy answers", "report"]) as phase:
      phase("greedy answers")
      report = evaluate(config, setup.model, jax.device_get(state.params),
                        setup.context["vectors"]["eval"])
      phase("report")
      if out_dir and jax.process_index() == 0:
        write_report(report, config, out_dir)
    return report

  def load(self, workdir: str) -> tuple[ml_collections.ConfigDict, palme.PalmE, Any, int]:
    """`load_workdir(workdir)`: the config, model and parameters of the run."""
    return load_workdir(workdir)


TASK = PalmETask()
