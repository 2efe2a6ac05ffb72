"""BYOL and DINO as trained by the core: the full step on 8 devices equals one device with the
global batch, the EMA teacher and DINO's centre against NumPy, the first step's loss against the
losses called by hand, config errors, and each method end to end (evaluation, kNN monitor,
checkpoints with teacher and centre, resume after SIGTERM, `embedspace.load`).

Also the ViT as the encoder of a two-view method (`--config.model.name=vit`).
"""

from __future__ import annotations

import math
import os
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from configs import byol as byol_config
from configs import dino as dino_config
from configs import simclr as simclr_config
from embedspace import losses, methods, models, parallel
from embedspace.core import checkpointing, loop
from embedspace.core import metrics as metrics_lib
from embedspace.core import train as core_train
from embedspace.core.config_checks import ConfigError
from embedspace.ssl import byol
from tests import train_steps

CONFIGS = {"byol": byol_config, "dino": dino_config}

needs_8_devices = pytest.mark.skipif(
    jax.device_count() != 8, reason="needs the 8 CPU devices set up by conftest.py")


def _smoke(method, **overrides):
  return train_steps.smoke_config(CONFIGS[method], **overrides)


def _batches(config, n_steps, seed=0):
  """Random host batches of the method's input (two views, or global and local crops)."""
  rng = np.random.default_rng(seed)
  b, s = config.batch_size, config.data.image_size
  normal = lambda *shape: rng.normal(size=shape).astype(np.float32)  # noqa: E731
  if config.method == "dino":
    local = config.data.local_image_size
    return [{"globals": normal(b, 2, s, s, 1),
             "locals": normal(b, config.data.num_local_crops, local, local, 1)}
            for _ in range(n_steps)]
  return [{"view1": normal(b, s, s, 1), "view2": normal(b, s, s, 1)} for _ in range(n_steps)]


def _max_diff(a, b):
  return max(float(np.max(np.abs(np.asarray(x) - np.asarray(y))))
             for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


# ----------------------------------------------------------------------------------------------
# 8 devices = one device with the global batch.


@needs_8_devices
@pytest.mark.parametrize("method", ["byol", "dino"])
def test_eight_devices_match_one_device(method):
  # LARS, as in test_train: Adam would turn rounding noise in near-zero gradients into
  # full-size steps; LARS keeps rounding differences at rounding size (lr 0.3 per 256, a usual
  # LARS value, so that the three steps move the model).
  config = _smoke(method, log_every=1, **{"optimizer.name": "lars", "optimizer.base_lr": 0.3})
  batches = _batches(config, 3)
  loss1, states1 = train_steps.run_steps(config, jax.devices()[:1], batches)
  loss8, states8 = train_steps.run_steps(config, jax.devices()[:8], batches)
  # atol 1e-5 on losses of scale 1 (BYOL's is a mean cosine near 0 here, so a relative
  # tolerance alone would be arbitrary); the CPU kernels block 4 rows differently from 32.
  np.testing.assert_allclose(loss8, loss1, rtol=5e-5, atol=1e-5)
  assert loss1[0] != loss1[2]
  # The float32 noise floor: the same global batch in another row order on one device is the
  # same computation mathematically; 8 devices must be as close to one device as that. (BYOL's
  # floor is high: LARS steps batch-norm biases by lr x gradient, and some of those gradients
  # are rounding noise around 0.) A per-device centre or batch norm is off by far more.
  perm = np.random.default_rng(1).permutation(config.batch_size)
  _, states_perm = train_steps.run_steps(config, jax.devices()[:1],
                              [{k: v[perm] for k, v in b.items()} for b in batches])
  for part in ("params", "ema", "batch_stats"):
    one, eight, permuted = (getattr(s[-1], part) for s in (states1, states8, states_perm))
    assert _max_diff(eight, one) <= 4 * max(_max_diff(permuted, one), 1e-7), part
  assert _max_diff(states1[-1].params, states1[0].params) > 1e-3  # the steps moved the model
  if method == "dino":  # the centre moved, identically
    assert float(np.abs(states8[-1].batch_stats["center"]).max()) > 0


# ----------------------------------------------------------------------------------------------
# The teacher and the centre against NumPy.


def _np_momentum(step, base, total):
  return 1 - (1 - base) * (math.cos(math.pi * min(step, total) / total) + 1) / 2


@needs_8_devices
@pytest.mark.parametrize("method", ["byol", "dino"])
def test_ema_teacher_and_dino_center_after_k_steps_equal_numpy(method):
  config = _smoke(method, log_every=1)
  k = 4
  batches = _batches(config, k, seed=2)
  _, states = train_steps.run_steps(config, jax.devices()[:8], batches)
  task = methods.task(config.method)
  select = task.ema(config).select
  base = config.loss.momentum_base

  # target <- tau_t target + (1 - tau_t) params_t, params_t the parameters before step t.
  target = jax.tree.map(lambda a: np.asarray(a, np.float64), select(states[0].params))
  for t in range(k):
    tau = _np_momentum(t, base, config.num_steps)
    online = select(states[t].params)
    target = jax.tree.map(lambda a, p: tau * a + (1 - tau) * np.asarray(p, np.float64), target,
                          online)
  final = states[-1]
  jax.tree.map(lambda got, want: np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-7),
               final.ema, target)
  assert _max_diff(final.ema, select(final.params)) > 1e-5  # it lags the student
  if method == "byol":
    assert set(final.ema) == {"encoder", "projector"}  # no predictor in the target
    return

  # c <- m c + (1 - m) mean of the teacher's logits over both global crops of the GLOBAL batch,
  # the teacher being the EMA the step used (stored in state.ema).
  model = task.build(config, bn_axis_name=None)
  m = config.loss.center_momentum
  center = np.zeros(config.model.head.out_dim)
  for t, batch in enumerate(batches):
    crops = np.swapaxes(batch["globals"], 0, 1).reshape(-1, *batch["globals"].shape[2:])
    (_, logits), _ = model.apply({"params": states[t + 1].ema, "batch_stats": {}}, crops,
                                 train=True, mutable=["batch_stats"])
    logits = np.asarray(logits, np.float64)
    center = m * center + (1 - m) * logits.mean(axis=0)
    if t == 0:  # each device's own mean differs from the global one: the check is not vacuous
      per_device = logits.reshape(2, 8, -1, logits.shape[-1])[:, 0].reshape(-1, logits.shape[-1])
      assert np.abs(per_device.mean(0) - logits.mean(0)).max() > 1e-4
  np.testing.assert_allclose(final.batch_stats["center"], center, rtol=1e-4, atol=1e-6)


# ----------------------------------------------------------------------------------------------
# The first step's loss is the loss of the paper, called by hand.


def _first_loss(config):
  """The task's loss at step 0 on one device (its batch norm is synchronised: under shard_map)."""
  mesh = parallel.make_mesh(jax.devices()[:1])
  run = train_steps.prepare(config, mesh)
  batch = _batches(config, 1, seed=3)[0]
  state = run.state  # At step 0 the moved target is still the initial parameters.

  def loss(params, state, batch):
    return run.setup.loss_fn(params, state, batch, jax.random.key(0), axis_name=parallel.AXIS)

  loss = jax.jit(parallel.sharded(loss, mesh, in_specs=(P(), P(), P(parallel.AXIS)),
                                  out_specs=P()))
  value, (outputs, new_stats) = loss(run.state.params, state, batch)
  return run, state, batch, loss, value, outputs, new_stats


def test_byol_step_loss_is_byol_loss_of_the_crossed_views():
  config = _smoke("byol")
  run, state, batch, loss, value, _, new_stats = _first_loss(config)
  task = methods.task("byol")
  model = task.build(config, bn_axis_name=None)
  predictor = byol.build_predictor(config, bn_axis_name=None)
  params, stats = run.state.params, run.state.batch_stats
  net = task.model_variables({"params": params, "batch_stats": stats})

  def online(view):
    (_, z), _ = model.apply(net, view, train=True, mutable=["batch_stats"])
    p, _ = predictor.apply({"params": params["predictor"], "batch_stats": stats["predictor"]},
                           z, train=True, mutable=["batch_stats"])
    return z, p

  (z1, p1), (z2, p2) = online(batch["view1"]), online(batch["view2"])
  # At step 0 the target is the online network: its projections are z1, z2.
  expected = losses.byol_loss(p1, z2, p2, z1)
  np.testing.assert_allclose(value, expected, rtol=1e-5, atol=1e-5)
  # Not vacuous: predicting the same view's projection gives another value.
  assert abs(float(losses.byol_loss(p1, z1, p2, z2)) - float(value)) > 1e-3
  assert set(new_stats) == {"encoder", "projector", "predictor"}
  # No gradient reaches the target (state.ema is not an argument of the gradient).
  grads = jax.grad(lambda p: loss(p, state, batch)[0])(run.state.params)
  assert float(jnp.abs(grads["predictor"]["dense1"]["kernel"]).max()) > 0


def test_dino_step_loss_is_dino_loss_over_the_crops():
  config = _smoke("dino")
  run, state, batch, _, value, outputs, new_stats = _first_loss(config)
  model = methods.task("dino").build(config, bn_axis_name=None)
  params = {"params": run.state.params}
  head = lambda x: np.asarray(model.apply(params, x, train=True)[1])  # noqa: E731
  b = config.batch_size
  teacher = [head(batch["globals"][:, i]) for i in range(2)]
  student = teacher + [head(batch["locals"][:, i]) for i in range(config.data.num_local_crops)]
  lc = config.loss
  center = np.zeros(config.model.head.out_dim, np.float32)
  expected = losses.dino_loss(student, teacher, center,
                              student_temperature=lc.student_temperature,
                              teacher_temperature=lc.teacher_temperature_start)
  np.testing.assert_allclose(value, expected, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(outputs[0]["teacher_temperature"], lc.teacher_temperature_start,
                             rtol=1e-6)
  np.testing.assert_allclose(
      new_stats["center"],
      losses.dino_center_update(center, teacher, momentum=lc.center_momentum), rtol=1e-5,
      atol=1e-7)
  assert outputs[1].shape == (b, config.model.vit.width)  # the health metrics see the features


# ----------------------------------------------------------------------------------------------
# Config errors: one line naming the key.


@pytest.mark.parametrize("method,key,value", [
    ("byol", "loss.momentum_base", 1.5),
    ("byol", "model.predictor_dims", (64, 32)),
    ("byol", "model.name", "vgg"),
    ("dino", "loss.student_temperature", 0.0),
    ("dino", "loss.teacher_temperature_warmup_steps", -1),
    ("dino", "loss.center_momentum", 1.5),
    ("dino", "model.head.out_dim", 0),
    ("dino", "data.local_image_size", 10),
    ("dino", "data.num_local_crops", -1),
    ("dino", "data.local_crop_scale", (0.5, 0.2)),
    ("dino", "model.vit.num_heads", 3),
])
def test_bad_config_values_are_one_line_errors_naming_the_key(method, key, value):
  config = _smoke(method, **{key: value})
  with pytest.raises(ConfigError, match="^" + re.escape(f"config.{key}=")) as e:
    methods.task(method).validate(config)
  assert "\n" not in str(e.value)


def test_a_byol_or_dino_config_without_its_model_keys_names_them():
  config = _smoke("byol")
  del config.model.predictor_dims
  with pytest.raises(ConfigError, match=r"^config\.model\.predictor_dims is missing"):
    methods.task("byol").validate(config)
  config = _smoke("dino")
  config.model.projector_dims = (8,)
  with pytest.raises(ConfigError, match=r"^config\.model: a DINO config has model\.head") as e:
    methods.task("dino").validate(config)
  assert "\n" not in str(e.value)


# ----------------------------------------------------------------------------------------------
# The ViT under a two-view method.


@pytest.mark.parametrize("method,encoder", [("simclr", "vit"), ("byol", "vit"),
                                            ("dino", "resnet")])
def test_any_ssl_method_takes_either_encoder(method, encoder):
  config = {"simclr": simclr_config, **CONFIGS}[method].get_config("smoke")
  config.model.name, config.log_every = encoder, 1
  losses_, states = train_steps.run_steps(config, jax.devices()[:1], _batches(config, 2))
  encoder_params = states[-1].params["encoder"]
  assert ("patch_embedding" if encoder == "vit" else "conv_stem") in encoder_params
  assert np.isfinite(losses_).all() and _max_diff(states[-1].params, states[0].params) > 0
  if encoder == "vit":
    assert encoder_params["patch_embedding"]["kernel"].shape == (4, 4, 1, 32)
  else:  # DINO's ResNet has batch norm; its running averages are kept beside the centre.
    assert {"encoder", "center"} <= set(states[-1].batch_stats)


def test_resnet_stays_the_default_with_its_parameter_tree():
  config = simclr_config.get_config("smoke")
  assert config.model.name == "resnet"
  resnet = train_steps.prepare(config, parallel.make_mesh(jax.devices()[:1]))
  expected = jax.eval_shape(lambda: models.EmbeddingModel(
      stage_sizes=(1,), width=8, projector_dims=(64, 64)).init(
          jax.random.key(0), jnp.zeros((2, 28, 28, 1)), train=False))
  assert (jax.tree.map(lambda a: a.shape, resnet.state.params)
          == jax.tree.map(lambda a: a.shape, expected["params"]))


# ----------------------------------------------------------------------------------------------
# End to end.


def _final_state(workdir):
  ckpt_dir = os.path.join(workdir, "checkpoints")
  last = max(int(s) for s in os.listdir(ckpt_dir) if s.isdigit())
  return last, checkpointing.restore_state(os.path.join(ckpt_dir, str(last)))


@pytest.mark.parametrize("method", ["byol", "dino"])
def test_smoke_run_end_to_end_resume_and_load(method, tmp_path, preempt_at):
  config = _smoke(method)
  full = str(tmp_path / "full")
  report = methods.train_and_evaluate(config, full)
  for name in ("eval.json", "metrics.jsonl", "config.json"):
    assert os.path.exists(os.path.join(full, name)), name
  records = list(metrics_lib.read_jsonl(os.path.join(full, "metrics.jsonl")))
  steps = [r for r in records if "loss" in r]
  assert steps[-1]["step"] == config.num_steps and np.isfinite(steps[-1]["loss"])
  assert {"ema_momentum", "health/effective_rank"} <= set(steps[0])
  # The rate leaves out the first step of a start, which compiles the program.
  assert all("images_per_sec" in r for r in steps[1:])
  monitor = [r["step"] for r in records if "curve/knn_accuracy" in r]
  assert monitor == [config.eval_every, config.num_steps]
  for space in ("trained", "random_init"):
    assert 0.0 <= report[space]["encoder"]["knn_accuracy"] <= 1.0
  assert 0.0 <= report["raw_pixels"]["linear_probe_accuracy"] <= 1.0

  # The checkpoint holds the teacher (and DINO's centre).
  step, saved = _final_state(full)
  assert step == config.num_steps
  assert set(saved["ema"]) == {"encoder", "projector"}
  if method == "dino":
    assert saved["batch_stats"]["center"].shape == (config.model.head.out_dim,)
    assert float(np.abs(saved["batch_stats"]["center"]).max()) > 0
    steps_temps = [r["loss/teacher_temperature"] for r in steps]
    assert steps_temps[0] < steps_temps[-1] == pytest.approx(config.loss.teacher_temperature)
  else:
    assert "predictor" in saved["params"] and "predictor" not in saved["ema"]

  # Preempted by SIGTERM after 4 steps, then the same command: bit-identical state.
  resumed = str(tmp_path / "resumed")
  quiet = config.copy_and_resolve_references()
  quiet.eval_every, quiet.eval.at_end = 0, False
  preempt_at(4)
  with pytest.raises(loop.Preempted) as exc:
    methods.train_and_evaluate(quiet, resumed)
  assert exc.value.step == 4
  preempt_at.disarm()
  assert methods.train_and_evaluate(quiet, resumed) == {}
  step_res, saved_res = _final_state(resumed)
  assert step_res == config.num_steps
  for part in ("params", "ema", "batch_stats", "opt_state"):
    jax.tree.map(np.testing.assert_array_equal, saved_res[part], saved[part])

  # embedspace.load: the student's encoder, as the evaluation saw it.
  loaded = methods.load(full)
  images = np.random.default_rng(0).integers(0, 256, (5, 28, 28), dtype=np.uint8)
  z = loaded.embed(images)
  assert z.shape == (5, loaded.dim()) and np.isfinite(z).all()
  assert loaded.embed(images, output="projector").shape[1] == loaded.model.embed_dim
  cheaper = config.copy_and_resolve_references()
  cheaper.eval.baselines = False
  again = core_train.evaluate_workdir(methods.task(method), full, config=cheaper,
                                      out_dir=str(tmp_path / "ev"))
  assert again["trained"]["encoder"]["knn_accuracy"] == pytest.approx(
      report["trained"]["encoder"]["knn_accuracy"])
