"""FIND-style interface: scenes, box/mask metrics, matching, the sharded step, the run."""

from __future__ import annotations

import itertools
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest

from configs import find as find_config
from embedspace import methods, parallel
from embedspace.core import loop
from embedspace.core import step as step_lib
from embedspace.core import train as core_train
from embedspace.core.config_checks import ConfigError
from embedspace.core.workdirs import IncompatibleWorkdirError
from embedspace.interface import find, find_eval, find_task, scenes
from embedspace.multimodal import data as mm_data
from tests import train_steps


def _raster(box, size=24):
  m = np.zeros((size, size), bool)
  x0, y0, x1, y1 = (int(v) for v in box)
  m[y0:y1, x0:x1] = True
  return m


def _random_boxes(rng, n, size=24):
  lo = rng.integers(0, size - 1, (n, 2))
  hi = lo + rng.integers(0, size // 2, (n, 2))
  return np.concatenate([lo, np.minimum(hi, size)], axis=1).astype(np.float32)


def test_box_and_mask_iou_and_giou_match_brute_force():
  rng = np.random.default_rng(0)
  a, b = _random_boxes(rng, 200), _random_boxes(rng, 200)
  ma, mb = np.stack([_raster(x) for x in a]), np.stack([_raster(x) for x in b])
  inter = np.array([np.sum(x & y) for x, y in zip(ma, mb)])
  union = np.array([np.sum(x | y) for x, y in zip(ma, mb)])
  brute = np.where(union > 0, inter / np.maximum(union, 1), 0.0)
  np.testing.assert_allclose(scenes.box_iou(a, b), brute, atol=1e-12)
  np.testing.assert_allclose(scenes.mask_iou(ma, mb), np.where(union > 0, brute, 1.0))
  for box, mask in zip(a, ma):  # the tight box of a rectangle's mask is the rectangle
    np.testing.assert_array_equal(scenes.mask_box(mask), box if mask.any() else np.zeros(4))
  # GIoU: IoU minus the enclosing box's share not covered by the union.
  ok = union > 0
  enclose = np.stack([np.minimum(a[:, :2], b[:, :2]), np.maximum(a[:, 2:], b[:, 2:])], 1)
  c = np.prod(enclose[:, 1] - enclose[:, 0], axis=1)
  want = brute - (c - union) / np.maximum(c, 1e-9)
  got = np.asarray(find.generalized_iou(jnp.asarray(a), jnp.asarray(b)))
  np.testing.assert_allclose(got[ok], want[ok], atol=1e-5)
  assert np.all(got <= 1 + 1e-6) and np.all(got >= -1 - 1e-6)


def test_resolution_ceiling_is_one_for_blocky_masks_and_zero_for_single_pixels():
  masks = np.zeros((1, 2, 8, 8), bool)
  masks[0, 0, 2:6, 4:8] = True  # 2x2 blocks at mask size 4: kept exactly
  masks[0, 1, 1, 1] = True  # a quarter of a block: lost
  sc = scenes.Scenes(canvas=np.zeros((1, 8, 8, 1), np.uint8), masks=masks,
                     boxes=np.zeros((1, 2, 4), np.float32), labels=np.array([[0, 1]]),
                     valid=np.array([[True, True]]), items=np.zeros((1, 2), np.int32),
                     positions=np.zeros((1, 2, 2), np.int32))
  assert find_eval.resolution_ceiling(sc, 4) == pytest.approx(0.5)  # mean of 1 and 0
  assert find_eval.resolution_ceiling(sc, 8) == pytest.approx(1.0)


def test_enumerated_matching_is_the_minimum_cost_assignment():
  rng = np.random.default_rng(1)
  cost = rng.normal(size=(20, 4, 4)).astype(np.float32)
  valid = (rng.random((20, 4)) < 0.7).astype(np.float32)
  got = np.asarray(find.match_queries(jnp.asarray(cost), jnp.asarray(valid)))
  for b in range(20):
    assert len(set(got[b].tolist())) == 4  # one-to-one
    best = min(sum(cost[b, p[i], i] * valid[b, i] for i in range(4))
               for p in itertools.permutations(range(4)))
    assert sum(cost[b, got[b, i], i] * valid[b, i] for i in range(4)) == pytest.approx(best)
  true = rng.random((4, 8, 8)) < 0.5
  pred = true[[2, 0, 3, 1]]  # the same masks, permuted
  np.testing.assert_allclose(find_eval.matched_iou(pred, true, np.array([1, 1, 0, 1], bool)), 1)


def test_scenes_are_deterministic_consistent_and_built_from_their_split():
  split = mm_data.load_splits(num_samples=2000, text_length=10)["eval"]
  kw = {"canvas_size": 64, "min_items": 2, "max_items": 4, "threshold": 128}
  sc = scenes.make_scenes(split.image_raw, split.image_label, num_scenes=30, seed=5, **kw)
  again = scenes.make_scenes(split.image_raw, split.image_label, num_scenes=1, seed=5, first=7,
                             **kw)
  np.testing.assert_array_equal(again.canvas[0], sc.canvas[7])
  np.testing.assert_array_equal(again.masks[0], sc.masks[7])
  for n in range(30):
    v = sc.valid[n]
    assert 2 <= v.sum() <= 4 and not v[v.sum():].any()
    assert len(set(sc.labels[n, v].tolist())) == v.sum()  # distinct digits: a prompt names one
    assert sc.masks[n].sum(0).max() <= 1  # items never overlap
    for k in np.flatnonzero(v):
      r, c = sc.positions[n, k]
      np.testing.assert_array_equal(sc.canvas[n, r:r + 28, c:c + 28], split.image_raw[
          sc.items[n, k]])
      assert sc.labels[n, k] == split.image_label[sc.items[n, k]]
      np.testing.assert_array_equal(sc.boxes[n, k], scenes.mask_box(sc.masks[n, k]))
  with pytest.raises(ValueError, match="canvas_size"):
    scenes.make_scenes(split.image_raw, split.image_label, num_scenes=1, seed=0,
                       **{**kw, "canvas_size": 40})


def test_config_errors_name_the_key_and_the_missing_encoders_command(tmp_path):
  config = find_config.get_config("smoke")
  config.encoders_workdir = str(tmp_path / "nothing")
  with pytest.raises(ConfigError, match=r"encoders_workdir.*configs/imagebind\.py"):
    methods.train_and_evaluate(config, str(tmp_path / "run"))
  assert not os.path.exists(tmp_path / "run")
  config.encoders_workdir = ""
  with pytest.raises(ConfigError, match=r"encoders_workdir.*configs/imagebind\.py"):
    find_task.validate(config)
  config = find_config.get_config("smoke")
  config.model.mask_size = 9
  with pytest.raises(ConfigError, match="mask_size"):
    find_task.validate(config)
  config = find_config.get_config("smoke")
  config.model.width = 18
  with pytest.raises(ConfigError, match="model.width.*divisible by 4"):
    find_task.validate(config)
  with pytest.raises(ValueError, match="unknown config variant"):
    find_config.get_config("smokey")


def test_position_features_match_numpy_and_tell_every_pixel_apart():
  h, w, d = 6, 10, 16
  got = np.asarray(find.sincos_2d(h, w, d))
  rows = []
  for y in range(h):
    for x in range(w):
      fy = 2 * np.pi * (y / h) * np.geomspace(0.5, max(h / 4, 1), d // 4)
      fx = 2 * np.pi * (x / w) * np.geomspace(0.5, max(w / 4, 1), d // 4)
      rows.append(np.concatenate([np.sin(fy), np.cos(fy), np.sin(fx), np.cos(fx)]))
  np.testing.assert_allclose(got.reshape(h * w, d), np.stack(rows), atol=1e-5)
  flat = got.reshape(h * w, d)
  dist = np.linalg.norm(flat[:, None] - flat[None], axis=-1) + np.eye(h * w)
  assert dist.min() > 0.1  # distinct pixels, distinct features
  with pytest.raises(ValueError, match="divisible by 4"):
    find.sincos_2d(4, 4, 6)


def test_select_query_picks_the_closest_live_query():
  rng = np.random.default_rng(3)
  embed = rng.normal(size=(50, 4, 8)).astype(np.float32)
  embed /= np.linalg.norm(embed, axis=-1, keepdims=True)
  objectness = rng.normal(size=(50, 4)).astype(np.float32)
  objectness[:5] = -1.0  # no live query: every query competes
  prompt = rng.normal(size=(50, 8)).astype(np.float32) * 3
  got = np.asarray(find.select_query({"query_embed": jnp.asarray(embed),
                                      "objectness": jnp.asarray(objectness)}, jnp.asarray(prompt)))
  for b in range(50):
    sims = embed[b] @ (prompt[b] / np.linalg.norm(prompt[b]))
    live = objectness[b] > 0 if (objectness[b] > 0).any() else np.ones(4, bool)
    assert got[b] == np.flatnonzero(live)[np.argmax(sims[live])]


@pytest.fixture(scope="module")
def smoke_run(imagebind_smoke_workdir):
  """The `:smoke` run as the core builds it: (config, its `Prepared`, `find_task.environment`)."""
  config = find_config.get_config("smoke")
  config.encoders_workdir = imagebind_smoke_workdir
  run = core_train.prepare(methods.task(config.method), config, parallel.make_mesh())
  return config, run, run.setup.context["env"]


@pytest.fixture(scope="module")
def smoke_env(smoke_run):
  config, _, env = smoke_run
  return config, env


def _stepper(run, devices):
  """(initial host state, the run's step compiled on `devices`, mesh)."""
  mesh = parallel.make_mesh(devices)
  return jax.device_get(run.state), run.parallel_step(mesh), mesh


def _batches(env, n):
  sampler = env["sampler"]
  return [sampler.batch(s) for s in range(n)]


@pytest.fixture(scope="module")
def eight_devices(smoke_run):
  _, run, _ = smoke_run
  return _stepper(run, jax.devices()[:8])


def test_find_step_on_eight_devices_matches_one_device(smoke_run, eight_devices):
  config, run, env = smoke_run
  batches = _batches(env, 2)
  one = _stepper(run, jax.devices()[:1])
  loss1, state1 = train_steps.run_compiled(one, batches)
  loss8, state8 = train_steps.run_compiled(eight_devices, batches)
  np.testing.assert_allclose(loss8, loss1, rtol=1e-5)
  assert loss1[0] != loss1[1]
  # The float32 floor: the same global batch with its rows permuted, on one device; 8 devices
  # must be as close. Attention key biases are left out: softmax ignores them, so their gradient
  # is rounding noise, which AdamW scales up to steps of any sign.
  perm = np.random.default_rng(1).permutation(config.batch_size)
  _, state_perm = train_steps.run_compiled(one, [{k: v[perm] for k, v in b.items()} for b in batches])

  def diff(x, y):
    leaves = jax.tree_util.tree_leaves_with_path(x)
    return max(float(np.max(np.abs(a - b))) for (path, a), b in zip(leaves, jax.tree.leaves(y))
               if not {"key", "bias"} <= set(jax.tree_util.keystr(path).split("'")))
  assert diff(state8.params, state1.params) <= 4 * max(diff(state_perm.params, state1.params),
                                                        1e-6)
  jax.tree.map(np.testing.assert_array_equal, state8.frozen, state1.frozen)  # never trained


def test_smoke_run_trains_resumes_and_reports_on_eval_scenes_only(smoke_env, eight_devices,
                                                                  tmp_path, monkeypatch):
  config, env = smoke_env
  config = config.copy_and_resolve_references()
  config.eval.plots = True
  workdir = str(tmp_path / "find")
  split = mm_data.load_splits(num_samples=2000, text_length=10)
  used = []
  real_make = scenes.make_scenes
  monkeypatch.setattr(scenes, "make_scenes", lambda images, *a, **k: (
      used.append(images), real_make(images, *a, **k))[1])
  with monkeypatch.context() as mp:
    mp.setattr(step_lib, "make_parallel_step", train_steps.sigterm_during_step(3))
    with pytest.raises(loop.Preempted) as exc:
      methods.train_and_evaluate(config, workdir)
  assert exc.value.step == 3
  report = methods.train_and_evaluate(config, workdir)
  assert sorted(int(s) for s in os.listdir(os.path.join(workdir, "checkpoints"))) == [3, 4]
  for path in ("eval.json", "metrics.jsonl", "config.json", "eval/report.md",
               "eval/examples.png"):
    assert os.path.exists(os.path.join(workdir, path)), path
  with open(os.path.join(workdir, "eval.json"), encoding="utf-8") as f:
    assert json.load(f) == json.loads(json.dumps(report))
  for method in ("interface", "interface_query_match", "baseline_windows",
                 "baseline_oracle_crops"):
    for modality in ("text", "audio"):
      row = report[method][modality]
      assert 0 <= row["grounding"]["accuracy@iou0.5"] <= 1 and 0 <= row["retrieval"]["map"] <= 1
  assert 0 <= report["segmentation"]["mean_iou"] <= 1
  assert 0 < report["segmentation"]["resolution_ceiling_iou"] < 1  # 14x14 masks of 56x56 scenes
  # Training scenes come from the train split, evaluation scenes from the eval split only.
  assert all(x is env["splits"]["train"].image_raw for x in used[:-1])
  assert used[-1] is env["splits"]["eval"].image_raw
  train_bytes = {x.tobytes() for x in split["train"].image_raw}
  assert not any(x.tobytes() in train_bytes for x in split["eval"].image_raw)
  # The preempted and resumed run ends where the same steps without a stop end.
  _, state = train_steps.run_compiled(eight_devices, _batches(env, config.num_steps))
  restored = ocp.StandardCheckpointer().restore(
      os.path.join(workdir, "checkpoints", str(config.num_steps), "state"))
  jax.tree.map(np.testing.assert_array_equal, restored["params"], state.params)
  loaded_config, loaded_env, params, step = find_task.load_workdir(workdir)  # the user's loader
  assert step == config.num_steps and loaded_config.model == config.model
  assert loaded_env["model"] == env["model"]
  jax.tree.map(np.testing.assert_array_equal, params, state.params)
  with pytest.raises(IncompatibleWorkdirError, match="not a FIND-style"):
    find_task.load_workdir(config.encoders_workdir)
  depth = config.model.depth
  config.model.depth = depth + 1  # checkpoints of another model are refused, not moved aside
  with pytest.raises(ConfigError, match=rf"config\.model\.depth={depth} \(now {depth + 1}\)"):
    methods.train_and_evaluate(config, workdir)
  assert sorted(int(s) for s in os.listdir(os.path.join(workdir, "checkpoints"))) == [3, 4]
