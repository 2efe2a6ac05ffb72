"""The training step on 1 vs 8 devices and under pmap; the loop end to end; resume and preemption."""

from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest

from configs import barlow, simclr, vicreg
from embedspace import losses, methods, parallel
from embedspace.core import loop
from embedspace.core import metrics as metrics_lib
from embedspace.core import step as step_lib
from embedspace.core.config_checks import ConfigError
from tests import train_steps

CONFIGS = {"vicreg": vicreg, "simclr": simclr, "barlow": barlow}


def _smoke(method="vicreg", **overrides):
  return train_steps.smoke_config(CONFIGS[method], **overrides)


def _batches(n_steps, batch, shape=(28, 28, 1), seed=0):
  rng = np.random.default_rng(seed)
  return [{"view1": rng.normal(size=(batch, *shape)).astype(np.float32),
           "view2": rng.normal(size=(batch, *shape)).astype(np.float32)} for _ in range(n_steps)]


def _final_state(config, devices, batches):
  """The losses of the steps and the host state after the last one."""
  losses_, states = train_steps.run_steps(config, devices, batches)
  return losses_, states[-1]


def _max_diff(a, b):
  return max(float(np.max(np.abs(x - y))) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


# Barlow Twins differs from VICReg only in its loss, whose 8-vs-1 equality test_losses_parallel
# checks; its 1024-d projector made this test the slowest of the three (53 s).
@pytest.mark.parametrize("method", ["vicreg", "simclr"])
def test_eight_devices_match_one_device(method):
  # LARS, not the default AdamW: Adam divides each gradient entry by its own running RMS, so an
  # entry that is mathematically zero (rounding noise only) still moves its parameter by a full
  # learning rate, in a direction set by the noise; parameters would then differ by ~lr whatever
  # the device count. LARS scales whole layers and keeps rounding differences at rounding size.
  config = _smoke(method, log_every=1, **{"optimizer.name": "lars"})
  batches = _batches(3, config.batch_size)
  loss1, state1 = _final_state(config, jax.devices()[:1], batches)
  loss8, state8 = _final_state(config, jax.devices()[:8], batches)
  # rtol 5e-5: on a 2-core Sapphire Rapids Xeon the very first forward (identical parameters)
  # already differs by 5e-6 relative, because the CPU kernels block a 4-image batch differently
  # from a 32-image one; a wrong collective moves the loss by percents.
  np.testing.assert_allclose(loss8, loss1, rtol=5e-5)
  assert loss1[0] != loss1[2]  # The steps did change the model.
  # The float32 noise floor: the same global batch in another row order on one device is the
  # same loss mathematically; 8 devices must be as close to 1 device as that (LARS amplifies
  # rounding differences over steps, so an absolute tolerance would be arbitrary).
  perm = np.random.default_rng(1).permutation(config.batch_size)
  _, state_perm = _final_state(config, jax.devices()[:1],
                             [{k: v[perm] for k, v in b.items()} for b in batches])
  floor = max(_max_diff(state_perm.params, state1.params), 1e-7)
  assert _max_diff(state8.params, state1.params) <= 4 * floor
  assert _max_diff(state8.batch_stats, state1.batch_stats) <= 4 * max(
      _max_diff(state_perm.batch_stats, state1.batch_stats), 1e-7)


def test_pmap_runs_the_same_per_device_step():
  config = _smoke("vicreg", log_every=1)
  batches = _batches(2, config.batch_size)
  loss_ref, state_ref = _final_state(config, jax.devices()[:8], batches)
  run = train_steps.prepare(config, parallel.make_mesh(jax.devices()[:8]))
  n = 8
  state = jax.tree.map(lambda x: jnp.broadcast_to(x, (n, *x.shape)), run.state)
  step = jax.pmap(lambda s, b: run.train_step(s, b, axis_name=parallel.AXIS),
                  axis_name=parallel.AXIS)
  losses = []
  for b in batches:
    b = jax.tree.map(lambda x: x.reshape(n, -1, *x.shape[1:]), b)
    state, m = step(state, b)
    losses.append(float(m["loss"][0]))
  np.testing.assert_allclose(losses, loss_ref, rtol=2e-5, atol=1e-5)
  # The same per-device program and collectives as the shard_map step: equal to rounding.
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a[0], b, rtol=1e-5, atol=1e-6),
               jax.device_get(state.params), state_ref.params)


def test_bfloat16_compute_keeps_float32_parameters_and_loss():
  config = _smoke("simclr", log_every=1)
  config.model.dtype = "bfloat16"
  ref_losses, _ = _final_state(_smoke("simclr", log_every=1), jax.devices()[:8],
                             _batches(2, config.batch_size))
  losses, state = _final_state(config, jax.devices()[:8], _batches(2, config.batch_size))
  assert all(leaf.dtype == np.float32 for leaf in jax.tree.leaves(state.params))
  np.testing.assert_allclose(losses, ref_losses, rtol=2e-2)


def test_nonfinite_update_is_skipped_or_freezes_the_state():
  config = _smoke("vicreg", log_every=1)
  batches = _batches(3, config.batch_size)
  batches[1]["view1"][0, 0, 0, 0] = np.nan
  for skip in (True, False):
    config.skip_nonfinite = skip
    mesh = parallel.make_mesh(jax.devices()[:8])
    run = train_steps.prepare(config, mesh)
    state = parallel.replicate(mesh, run.state)
    step = run.parallel_step(mesh)
    state, _ = step(state, parallel.shard_batch(mesh, batches[0]))
    good = jax.device_get(state.params)
    state, m = step(state, parallel.shard_batch(mesh, batches[1]))
    assert int(m["skipped"]) == 1
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(state.params), good)
    state, m = step(state, parallel.shard_batch(mesh, batches[2]))
    leaves_equal = all(np.array_equal(a, b) for a, b in zip(
        jax.tree.leaves(jax.device_get(state.params)), jax.tree.leaves(good)))
    # Skip mode trains on after the bad step; stop mode keeps the last good state.
    assert leaves_equal is (not skip)
    assert int(m["skipped"]) == (1 if skip else 2)


def _final_params(workdir):
  ckpt_dir = os.path.join(workdir, "checkpoints")
  last = max(int(s) for s in os.listdir(ckpt_dir) if s.isdigit())
  restored = ocp.StandardCheckpointer().restore(os.path.join(ckpt_dir, str(last), "state"))
  return last, restored["params"]


def test_smoke_run_end_to_end_and_resume_after_preemption(tmp_path, monkeypatch):
  config = _smoke("vicreg")
  full = str(tmp_path / "full")
  report = methods.train_and_evaluate(config, full)
  for name in ("eval.json", "metrics.jsonl", "config.json"):
    assert os.path.exists(os.path.join(full, name)), name
  assert os.listdir(os.path.join(full, "tb"))
  records = [r for r in metrics_lib.read_jsonl(os.path.join(full, "metrics.jsonl")) if "loss" in r]
  assert records[-1]["step"] == config.num_steps and np.isfinite(records[-1]["loss"])
  assert {"health/effective_rank", "loss/variance"} <= set(records[0])
  # The rate leaves out the first step of a start, which compiles the program.
  assert "images_per_sec" not in records[0] and all("images_per_sec" in r for r in records[1:])
  curve = [r for r in metrics_lib.read_jsonl(os.path.join(full, "metrics.jsonl"))
           if "curve/knn_accuracy" in r]
  assert [r["step"] for r in curve] == [config.eval_every, config.num_steps]
  assert all(0.0 <= r["curve/linear_probe_accuracy"] <= 1.0 for r in curve)
  assert 0.0 <= report["trained"]["encoder"]["knn_accuracy"] <= 1.0

  # The same command again: eval.json is up to date (same step, same config.eval), so it is
  # read back, not computed again, unless config.eval.rerun asks for it.
  task_type = type(methods.task(config.method))
  evaluate = task_type.evaluate
  monkeypatch.setattr(task_type, "evaluate", lambda *a, **k: pytest.fail("evaluated again"))
  assert methods.train_and_evaluate(config, full) == json.loads(json.dumps(report))
  rerun = config.copy_and_resolve_references()
  rerun.eval.rerun = True
  monkeypatch.setattr(task_type, "evaluate", lambda *a, **k: {"again": 1.0})
  assert methods.train_and_evaluate(rerun, full)["again"] == 1.0
  monkeypatch.setattr(task_type, "evaluate", evaluate)

  # Same command, preempted by SIGTERM after 4 steps, then rerun: bit-identical parameters.
  resumed = str(tmp_path / "resumed")
  real = step_lib.make_parallel_step
  monkeypatch.setattr(step_lib, "make_parallel_step", train_steps.sigterm_during_step(4))
  with pytest.raises(loop.Preempted) as exc:
    methods.train_and_evaluate(config, resumed)
  assert exc.value.code == loop.PREEMPTED_EXIT_CODE and exc.value.step == 4
  monkeypatch.setattr(step_lib, "make_parallel_step", real)
  methods.train_and_evaluate(config, resumed)
  step_full, params_full = _final_params(full)
  step_res, params_res = _final_params(resumed)
  assert step_full == step_res == config.num_steps
  jax.tree.map(np.testing.assert_array_equal, params_res, params_full)

  # The finished run goes on for more steps (the change recorded in its workdir), but never with
  # another learning rate: that is refused before anything is written.
  longer = config.copy_and_resolve_references()
  longer.num_steps, longer.eval.at_end = config.num_steps + 2, False
  other = longer.copy_and_resolve_references()
  other.optimizer.base_lr *= 2
  with pytest.raises(ConfigError, match=r"config\.optimizer\.base_lr="):
    methods.train_and_evaluate(other, resumed)
  assert _final_params(resumed)[0] == config.num_steps
  assert not os.path.exists(os.path.join(resumed, "config_history.jsonl"))
  assert methods.train_and_evaluate(longer, resumed) == {}
  assert _final_params(resumed)[0] == longer.num_steps
  with open(os.path.join(resumed, "config.json"), encoding="utf-8") as f:
    assert json.load(f)["num_steps"] == longer.num_steps
  with open(os.path.join(resumed, "config_history.jsonl"), encoding="utf-8") as f:
    history = [json.loads(line) for line in f]
  assert [h["changes"] for h in history] == [{
      "eval.at_end": {"old": True, "new": False},
      "num_steps": {"old": config.num_steps, "new": longer.num_steps}}]


@pytest.mark.parametrize("method", ["vicreg", "simclr", "barlow"])
def test_ssl_loss_is_the_configured_loss_with_its_hyperparameters(method):
  # The task table's dispatch (the one place a config picks a loss), against the loss called
  # directly with the config's values; the full step runs in the 8-vs-1 and end-to-end tests.
  config = {"vicreg": vicreg, "simclr": simclr, "barlow": barlow}[method].get_config("smoke")
  z1, z2 = jax.random.normal(jax.random.PRNGKey(0), (2, 16, 32))
  loss, _ = methods.task(config.method).objective(config.loss, z1, z2, axis_name=None)
  lc = config.loss
  expected = {
      "vicreg": lambda: losses.vicreg_loss(
          z1, z2, invariance_weight=lc.invariance_weight, variance_weight=lc.variance_weight,
          covariance_weight=lc.covariance_weight)[0],
      "simclr": lambda: losses.info_nce(z1, z2, temperature=lc.temperature,
                                        similarity=lc.similarity),
      "barlow": lambda: losses.barlow_twins_loss(
          z1, z2, off_diagonal_weight=lc.off_diagonal_weight)[0],
  }[method]()
  np.testing.assert_allclose(loss, expected, rtol=1e-6)
  with pytest.raises(ConfigError, match="config.method='swav': must be one of"):
    config.method = "swav"
    methods.task(config.method).objective(config.loss, z1, z2, axis_name=None)
