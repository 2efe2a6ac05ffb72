"""PaLM-E-style model: KV-cache decoding, the answer-only loss, the sharded step, the held-out
split, and the `:smoke` run end to end (preempted and resumed) on frozen ImageBind encoders."""

from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest

from configs import palme as palme_config
from embedspace import methods, parallel
from embedspace.core import loop, optim
from embedspace.core import step as step_lib
from embedspace.core import train as core_train
from embedspace.core.config_checks import ConfigError
from embedspace.core.task import Setup
from embedspace.core.workdirs import IncompatibleWorkdirError
from embedspace.interface import palme, palme_data, palme_task
from tests import train_steps


def _config(workdir=None, variant="smoke"):
  config = palme_config.get_config(variant)
  config.encoders_workdir = workdir
  return config


def _setup(config, dims=(12, 20)):
  """The task's model, initialisation, loss and metrics over `dims`-d (image, audio) vectors,
  without its frozen encoders (what `palme_task.TASK.setup` builds from their vectors)."""
  model = palme_task.build_model(config)

  def init(rng):
    return {"params": palme_task.init_params(config, model, rng, image_dim=dims[0],
                                             audio_dim=dims[1])}
  return Setup(model=model, init=init, loss_fn=palme_task.make_loss_fn(model),
               metrics_fn=palme_task.step_metrics, batches=iter(()), data_state=None,
               items_per_step=config.batch_size)


def _random_vectors(seed=0, n_image=400, n_audio=200):
  rng = np.random.default_rng(seed)
  return {"image": rng.normal(size=(n_image, 12)).astype(np.float32),
          "image_label": np.arange(n_image, dtype=np.int32) % 10,
          "audio": rng.normal(size=(n_audio, 20)).astype(np.float32),
          "audio_label": np.arange(n_audio, dtype=np.int32) % 10}


@pytest.mark.parametrize("use_items", [True, False])
def test_kv_cache_decoding_equals_decoding_without_cache(use_items):
  config = _config()
  config.model.use_items, config.model.depth = use_items, 2
  setup = _setup(config)
  model = setup.model
  params = core_train.initial_state(config, setup, optim.make_optimizer(config)).params
  # Random, larger weights than at init, so that greedy choices differ between rows and steps.
  rng = np.random.default_rng(1)
  params = jax.tree.map(lambda x: x + 0.5 * rng.normal(size=x.shape).astype(np.float32), params)
  v = _random_vectors()
  # The `plus` prompt with its words replaced by random ones, so that rows differ without items.
  prompt = np.asarray([palme_data.prompt_ids("plus", tokens_per_item=2)] * 6, np.int32)
  words = ~np.isin(prompt, [model.image_token, model.audio_token])
  prompt[words] = np.random.default_rng(0).integers(5, model.vocab_size, words.sum())
  prompt = jnp.asarray(prompt)
  image, audio = jnp.asarray(v["image"][:6]), jnp.asarray(v["audio"][:6])
  steps = model.max_length - prompt.shape[1]
  cached = np.asarray(palme.generate(model, params, prompt, image, audio, steps=steps))
  plain = np.asarray(palme.generate_uncached(model, params, prompt, image, audio, steps=steps))
  np.testing.assert_array_equal(cached, plain)
  assert len(np.unique(cached)) > 2  # the decoded tokens are not all the same
  # The logits too: the prefill and one cached step equal one uncached pass.
  full = jnp.concatenate([prompt, jnp.asarray(cached[:, :1])], axis=1)

  @jax.jit
  def logits(params, image, audio):
    expected, _ = model.apply({"params": params}, full, image, audio)
    cache = model.init_cache(6, full.shape[1])
    first, cache = model.apply({"params": params}, prompt, image, audio, cache=cache)
    second, _ = model.apply({"params": params}, full[:, -1:], image, audio,
                            index=prompt.shape[1], cache=cache)
    other, _ = model.apply({"params": params}, full, image[::-1], audio)
    return expected, jnp.concatenate([first, second], 1), other

  expected, stepwise, other = logits(params, image, audio)
  np.testing.assert_allclose(stepwise, expected, atol=1e-4)
  # The items matter exactly when they are used.
  assert (np.abs(other - expected).max() > 1e-3) == use_items


def test_loss_is_on_answer_tokens_only():
  v = _random_vectors()
  ex = palme_data.PromptBatches(
      image_vectors=v["image"], image_label=v["image_label"], audio_vectors=v["audio"],
      audio_label=v["audio_label"], global_batch_size=8, seed=0, tokens_per_item=2).examples(0)
  length = palme_data.sequence_length(tokens_per_item=2)
  arrays = palme_data.encode(ex, image_vectors=v["image"], audio_vectors=v["audio"],
                             tokens_per_item=2, length=length)
  tokens, mask = arrays["tokens"], arrays["answer_mask"]
  eos, words = palme_data.token_id(palme_data.EOS), palme_data.vocabulary()
  for row in range(len(tokens)):  # the mask covers the answer word and its <eos>, nothing else
    assert [words[t] for t in tokens[row][mask[row] == 1]] == [ex.answer[row], palme_data.EOS]
  assert set(ex.task) == set(palme_data.TRAIN_TASKS) and np.all(np.sum(tokens == eos, 1) == 1)

  logits = jax.random.normal(jax.random.PRNGKey(0), (*tokens.shape, len(words)))
  loss = lambda t: palme.answer_loss(logits, jnp.asarray(t), jnp.asarray(mask))  # noqa: E731
  base, count = loss(tokens)
  assert float(count) == 2 * len(tokens)
  changed = tokens.copy()
  changed[mask == 0] = (changed[mask == 0] + 5) % len(words)  # every prompt and padding target
  assert float(loss(changed)[0]) == float(base)
  changed = tokens.copy()
  changed[mask == 1] = (changed[mask == 1] + 5) % len(words)
  assert float(loss(changed)[0]) != float(base)
  # Through the model: the prompt's own next-token targets do not enter the step's loss.
  config = _config()
  setup = _setup(config)
  model = setup.model
  params = core_train.initial_state(config, setup, optim.make_optimizer(config)).params
  step_loss = jax.jit(lambda t: palme.answer_loss(  # noqa: E731
      model.apply({"params": params}, t[:, :-1], arrays["image"], arrays["audio"])[0],
      t[:, 1:], jnp.asarray(mask[:, 1:]))[0])
  padded = tokens.copy()
  padded[np.cumsum(tokens == eos, axis=1) - (tokens == eos) > 0] = palme_data.token_id("q:")
  assert float(step_loss(padded)) == pytest.approx(float(step_loss(tokens)), abs=1e-6)


def _stepper(config, devices, dims=(12, 20), tx=None):
  """(initial host state, compiled step, mesh), built as the core builds a run's."""
  mesh = parallel.make_mesh(devices)
  setup = _setup(config, dims)
  tx = tx or optim.make_optimizer(config)
  init = jax.device_get(core_train.initial_state(config, setup, tx))
  step = step_lib.make_train_step(setup.loss_fn, tx=tx, skip_nonfinite=config.skip_nonfinite,
                                  metrics_fn=setup.metrics_fn)
  return init, step_lib.make_parallel_step(mesh, step), mesh


def _run(stepper, batches):
  init, step, mesh = stepper
  state, losses = parallel.replicate(mesh, init), []
  for b in batches:
    state, m = step(state, parallel.shard_batch(mesh, b))
    losses.append(float(m["loss"]))
  return losses, jax.device_get(state)


def test_step_on_eight_devices_matches_one_device():
  config = _config()
  v = _random_vectors()
  sampler = palme_data.PromptBatches(
      image_vectors=v["image"], image_label=v["image_label"], audio_vectors=v["audio"],
      audio_label=v["audio_label"], global_batch_size=config.batch_size, seed=0,
      tokens_per_item=config.model.tokens_per_item)
  batches = [next(sampler) for _ in range(3)]
  # Plain SGD with rate 1: the parameters move by exactly the averaged gradient (AdamW's
  # normalised update would turn rounding noise in near-zero gradients into steps of its rate).
  one = _stepper(config, jax.devices()[:1], tx=optax.sgd(1.0))
  loss1, state1 = _run(one, batches)
  loss8, state8 = _run(_stepper(config, jax.devices()[:8], tx=optax.sgd(1.0)), batches)
  np.testing.assert_allclose(loss8, loss1, rtol=1e-5)
  assert loss1[0] != loss1[2]
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-5),
               state8.params, state1.params)
  moved = max(float(np.max(np.abs(a - b)))
              for a, b in zip(jax.tree.leaves(state1.params), jax.tree.leaves(one[0].params)))
  assert moved > 1e-2  # the steps did change the parameters


@pytest.fixture(scope="module")
def vectors(imagebind_smoke_workdir):
  return palme_task.frozen_vectors(_config(imagebind_smoke_workdir))


def test_held_out_items_and_combinations_are_never_in_training_batches(vectors):
  train, held = vectors["train"], vectors["eval"]
  assert not set(train["audio_id"].tolist()) & set(held["audio_id"].tolist())
  config = _config()
  config.batch_size = 64
  sampler = palme_task.make_sampler(config, train)
  rows = lambda x: {r.tobytes() for r in x}  # noqa: E731
  train_images, eval_images = rows(train["image"]), rows(held["image"])
  train_audio, eval_audio = rows(train["audio"]), rows(held["audio"])
  seen_images, seen_audio, combos = set(), set(), set()
  for step in range(40):
    batch, ex = sampler.batch(step), sampler.examples(step)
    has_image, has_audio = ex.image_index >= 0, ex.audio_index >= 0
    seen_images |= rows(batch["image"][has_image])
    seen_audio |= rows(batch["audio"][has_audio])
    assert not np.any(batch["image"][~has_image]) and not np.any(batch["audio"][~has_audio])
    combos |= {(int(train["image_label"][i]), int(train["audio_label"][a]))
               for t, i, a in zip(ex.task, ex.image_index, ex.audio_index) if t == "plus"}
  assert seen_images <= train_images and not seen_images & eval_images
  assert seen_audio <= train_audio and not seen_audio & eval_audio
  assert len(seen_images) > 500 and len(seen_audio) > 500
  assert not combos & palme_data.HELD_OUT_PLUS and len(combos) >= 85  # of the 90 allowed
  new = palme_data.eval_examples("plus_new_combos", 200, image_label=held["image_label"],
                                 audio_label=held["audio_label"], seed=0)
  assert {(int(held["image_label"][i]), int(held["audio_label"][a]))
          for i, a in zip(new.image_index, new.audio_index)} == set(palme_data.HELD_OUT_PLUS)
  same = palme_data.eval_examples("same", 1000, image_label=held["image_label"],
                                  audio_label=held["audio_label"], seed=0)
  assert 0.45 < same.answer.count("yes") / 1000 < 0.55


def test_missing_or_wrong_encoders_workdir_and_bad_values_fail_clearly(tmp_path):
  workdir = tmp_path / "run"
  with pytest.raises(ConfigError, match=r"encoders_workdir is not set.*configs/imagebind.py"):
    methods.train_and_evaluate(_config(None), str(workdir))
  with pytest.raises(ConfigError, match=r"encoders_workdir=.*configs/imagebind.py"):
    methods.train_and_evaluate(_config(str(tmp_path / "nowhere")), str(workdir))
  assert not workdir.exists()  # nothing written
  config = _config("x")
  config.model.source = "pixels"
  with pytest.raises(ConfigError, match="model.source"):
    palme_task.validate(config)
  with pytest.raises(ValueError, match="unknown config variant"):
    palme_config.get_config("text")


def test_smoke_run_trains_resumes_and_reports(imagebind_smoke_workdir, vectors, tmp_path):
  config = _config(imagebind_smoke_workdir)
  workdir = str(tmp_path / "palme")
  with pytest.MonkeyPatch.context() as mp:  # SIGTERM during step 3, then the same call again
    mp.setattr(step_lib, "make_parallel_step", train_steps.sigterm_during_step(3))
    with pytest.raises(loop.Preempted) as exc:
      methods.train_and_evaluate(config, workdir)
  assert exc.value.step == 3
  report = methods.train_and_evaluate(config, workdir)
  assert sorted(int(s) for s in os.listdir(os.path.join(workdir, "checkpoints"))) == [3, 4]
  assert set(report["accuracy"]) == set(palme_data.EVAL_TASKS)
  assert all(0 <= a <= 1 for a in report["accuracy"].values())
  assert report["chance_uniform"]["same"] == 0.5 and report["examples"]["what_image"] == 64
  with open(os.path.join(workdir, "eval.json"), encoding="utf-8") as f:
    assert json.load(f) == json.loads(json.dumps(report))
  with open(os.path.join(workdir, "eval", "report.md"), encoding="utf-8") as f:
    text = f.read()
  assert "| plus_new_combos | 64 |" in text and "q: what is <img> plus <audio> ? a:" in text
  # The preempted and resumed run ends where the same 4 steps without a stop end.
  sampler = palme_task.make_sampler(config, vectors["train"])
  dims = (vectors["train"]["image"].shape[1], vectors["train"]["audio"].shape[1])
  _, state = _run(_stepper(config, jax.devices(), dims),
                  [next(sampler) for _ in range(config.num_steps)])
  restored = ocp.StandardCheckpointer().restore(
      os.path.join(workdir, "checkpoints", str(config.num_steps), "state"))
  jax.tree.map(np.testing.assert_array_equal, restored["params"], state.params)
  loaded_config, model, params, step = palme_task.load_workdir(workdir)  # the user's loader
  assert step == config.num_steps and loaded_config.model == config.model
  assert model == palme_task.build_model(config)
  jax.tree.map(np.testing.assert_array_equal, params, state.params)
  with pytest.raises(IncompatibleWorkdirError, match="not a PaLM-E-style"):
    palme_task.load_workdir(imagebind_smoke_workdir)
  config.model.tokens_per_item = 3  # checkpoints of another model are refused, not moved aside
  with pytest.raises(ConfigError, match="model.tokens_per_item=2"):
    methods.train_and_evaluate(config, workdir)
