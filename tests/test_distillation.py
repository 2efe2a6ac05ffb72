"""Tests of the self-distillation losses (BYOL, DINO), DINO's centre and the teacher's EMA.

Values and gradients are checked against float64 NumPy written from the papers (loops over crop
pairs and rows, gradients derived by hand), the 8-device results against one device holding the
global batch, and, when the `bench` extra is installed, against lightly's `DINOLoss`,
`NegativeCosineSimilarity`, `cosine_schedule` and `update_momentum`.
"""

from __future__ import annotations

import functools
import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P
from jax.test_util import check_grads

from embedspace import losses
from embedspace import parallel

NUM_DEVICES = 8
RTOL, ATOL = 2e-5, 2e-6

needs_8_devices = pytest.mark.skipif(
    jax.device_count() != NUM_DEVICES, reason="needs the 8 CPU devices set up by conftest.py")

# ----------------------------------------------------------------------------------------------
# NumPy references (float64).


def _cos(u, v):
  return float(np.dot(u, v) / (np.linalg.norm(u) * np.linalg.norm(v)))


def np_byol(p1, z2, p2, z1):
  n = len(p1)
  return 0.5 * (-sum(_cos(p1[i], z2[i]) for i in range(n)) / n
                - sum(_cos(p2[i], z1[i]) for i in range(n)) / n)


def np_byol_paper(p1, z2, p2, z1):
  """Grill et al.: sum over the two directions of the batch mean of |p/|p| - z/|z||^2."""
  def direction(p, z):
    return np.mean([np.sum((a / np.linalg.norm(a) - b / np.linalg.norm(b)) ** 2)
                    for a, b in zip(p, z)])
  return direction(p1, z2) + direction(p2, z1)


def np_neg_cos_grad(p, z):
  """d/dp of -1/N sum_i cos(p_i, z_i): -(z/(|p||z|) - cos p/|p|^2) / N per row."""
  n = len(p)
  out = np.zeros_like(p)
  for i in range(n):
    pn, zn = np.linalg.norm(p[i]), np.linalg.norm(z[i])
    c = np.dot(p[i], z[i]) / (pn * zn)
    out[i] = -(z[i] / (pn * zn) - c * p[i] / pn ** 2) / n
  return out


def _softmax(x):
  e = np.exp(x - x.max())
  return e / e.sum()


def np_dino(student, teacher, center, ts, tt):
  """The authors' loop: every (teacher crop u, student crop v != u), batch mean, / #terms."""
  total, terms = 0.0, 0
  for u, t in enumerate(teacher):
    for v, s in enumerate(student):
      if u == v:
        continue
      ce = [-np.sum(_softmax((t[i] - center) / tt) * np.log(_softmax(s[i] / ts)))
            for i in range(len(t))]
      total += np.mean(ce)
      terms += 1
  return total / terms


def np_dino_student_grad(student, teacher, center, ts, tt):
  """d loss / d s_v,i = sum_{u != v} (softmax(s_v,i / ts) - P_t(u)_i) / ts / (N #terms)."""
  n = len(student[0])
  terms = len(teacher) * len(student) - min(len(teacher), len(student))
  grads = []
  for v, s in enumerate(student):
    g = np.zeros_like(s)
    for i in range(n):
      for u, t in enumerate(teacher):
        if u != v:
          g[i] += (_softmax(s[i] / ts) - _softmax((t[i] - center) / tt)) / ts
    grads.append(g / (n * terms))
  return grads


def np_center(center, teacher, momentum):
  rows = np.concatenate(teacher, axis=0)
  return momentum * center + (1 - momentum) * rows.mean(axis=0)


def np_ema_momentum(k, base, total):
  return 1 - (1 - base) * (math.cos(math.pi * min(k, total) / total) + 1) / 2


# ----------------------------------------------------------------------------------------------
# Helpers.


def _randn(seed, *shape, scale=1.0):
  return scale * np.random.RandomState(seed).randn(*shape)


def _f32(x):
  return jax.tree.map(lambda a: jnp.asarray(a, jnp.float32), x)


def _close(actual, expected, what="", rtol=RTOL, atol=ATOL):
  chex.assert_trees_all_close(_f32(actual), _f32(expected), rtol=rtol, atol=atol,
                              custom_message=what)


def _byol_inputs(seed, n, d):
  p1, p2 = _randn(seed, n, d), _randn(seed + 1, n, d)
  # Targets correlated with the predictions, so cosines are spread over (-1, 1).
  z1 = p2 + _randn(seed + 2, n, d, scale=0.8)
  z2 = p1 + _randn(seed + 3, n, d, scale=0.8)
  return p1, z2, p2, z1


def _dino_inputs(seed, num_teacher, num_student, n, k):
  teacher = [_randn(seed + u, n, k, scale=0.5) for u in range(num_teacher)]
  # The student's global crops are near the teacher's; local crops are other draws.
  student = [(teacher[v] if v < num_teacher else 0) + _randn(seed + 10 + v, n, k, scale=0.5)
             for v in range(num_student)]
  center = _randn(seed + 20, k, scale=0.1)
  return student, teacher, center


DINO_HP = dict(student_temperature=0.1, teacher_temperature=0.05)

# ----------------------------------------------------------------------------------------------
# BYOL.


@pytest.mark.parametrize("n,d", [(1, 3), (6, 5), (16, 32)])
def test_byol_matches_numpy_and_the_paper_form(n, d):
  inputs = _byol_inputs(0, n, d)
  value = jax.jit(losses.byol_loss)(*_f32(inputs))
  _close(value, np_byol(*inputs), "byol_loss")
  assert -1.0 <= float(value) <= 1.0
  # The docstring's affine relation to Grill et al.'s 2 - 2 cos form, summed over directions.
  np.testing.assert_allclose(4 + 4 * float(value), np_byol_paper(*inputs), rtol=1e-5, atol=1e-5)


def test_byol_gradient_flows_only_into_the_predictions():
  inputs = _byol_inputs(1, 8, 6)
  grads = jax.jit(jax.grad(losses.byol_loss, argnums=(0, 1, 2, 3)))(*_f32(inputs))
  p1, z2, p2, z1 = inputs
  _close(grads[0], 0.5 * np_neg_cos_grad(p1, z2), "d/dp1")
  _close(grads[2], 0.5 * np_neg_cos_grad(p2, z1), "d/dp2")
  for g in (grads[1], grads[3]):  # targets: stop_gradient, exactly zero
    np.testing.assert_array_equal(g, np.zeros_like(g))
  # And against finite differences (float32: a loose tolerance, but independent of the above).
  fixed = lambda p1, p2: losses.byol_loss(p1, _f32(z2), p2, _f32(z1))
  check_grads(fixed, (_f32(p1), _f32(p2)), order=1, modes=("rev",), eps=1e-3, atol=1e-2,
              rtol=1e-2)


def test_negative_cosine_similarity_matches_numpy_and_is_symmetric_in_gradient():
  p, z = _randn(2, 5, 4), _randn(3, 5, 4)
  value, (gp, gz) = jax.value_and_grad(losses.negative_cosine_similarity, argnums=(0, 1))(
      *_f32((p, z)))
  _close(value, -np.mean([_cos(a, b) for a, b in zip(p, z)]))
  _close(gp, np_neg_cos_grad(p, z))
  _close(gz, np_neg_cos_grad(z, p))  # unlike byol_loss, both arguments get a gradient


def test_byol_rejects_mismatched_shapes():
  a = jnp.ones((4, 3))
  with pytest.raises(ValueError, match="same shape"):
    losses.byol_loss(a, a, a, jnp.ones((4, 2)))
  with pytest.raises(ValueError, match=r"\[batch, dim\]"):
    losses.byol_loss(a, a, jnp.ones(4), a)


# ----------------------------------------------------------------------------------------------
# DINO.

DINO_SHAPES = [
    (2, 2, 6, 7),   # two global crops only
    (2, 6, 5, 9),   # two global + four local crops, DINO's multi-crop
    (1, 3, 4, 5),   # one teacher crop
    (3, 2, 4, 5),   # more teacher than student crops (lightly allows it)
]


@pytest.mark.parametrize("num_teacher,num_student,n,k", DINO_SHAPES)
def test_dino_matches_numpy(num_teacher, num_student, n, k):
  student, teacher, center = _dino_inputs(0, num_teacher, num_student, n, k)
  loss = jax.jit(functools.partial(losses.dino_loss, **DINO_HP))
  value = loss(_f32(student), _f32(teacher), _f32(center))
  _close(value, np_dino(student, teacher, center, 0.1, 0.05), "dino_loss")
  # Stacked [crops, batch, K] arrays are the same as lists of crops.
  stacked = loss(_f32(np.stack(student)), _f32(np.stack(teacher)), _f32(center))
  _close(stacked, value, "stacked crops")


def test_dino_gradient_flows_only_into_the_student():
  student, teacher, center = _dino_inputs(3, 2, 4, 5, 6)
  grad_fn = jax.jit(jax.grad(functools.partial(losses.dino_loss, **DINO_HP), argnums=(0, 1, 2)))
  g_student, g_teacher, g_center = grad_fn(*_f32((student, teacher, center)))
  _close(g_student, np_dino_student_grad(student, teacher, center, 0.1, 0.05), "d/dstudent")
  for g in (*g_teacher, g_center):
    np.testing.assert_array_equal(g, np.zeros_like(g))
  fixed = lambda s0, s3: losses.dino_loss(
      [s0, *_f32(student[1:3]), s3], _f32(teacher), _f32(center), **DINO_HP)
  check_grads(fixed, _f32((student[0], student[3])), order=1, modes=("rev",), eps=1e-3,
              atol=1e-2, rtol=1e-2)


def test_dino_temperature_may_be_traced():
  student, teacher, center = _dino_inputs(4, 2, 2, 3, 4)

  @jax.jit
  def at_step(step):
    tt = losses.teacher_temperature_schedule(step, start=0.04, end=0.07, warmup_steps=10)
    return losses.dino_loss(_f32(student), _f32(teacher), _f32(center), teacher_temperature=tt)

  _close(at_step(5), np_dino(student, teacher, center, 0.1, 0.055))


def test_dino_center_update_matches_numpy():
  _, teacher, center = _dino_inputs(5, 2, 2, 6, 7)
  new = jax.jit(functools.partial(losses.dino_center_update, momentum=0.9))(
      _f32(center), _f32(teacher))
  _close(new, np_center(center, teacher, 0.9))
  assert new.shape == (7,) and new.dtype == jnp.float32
  # momentum 1 keeps the centre; 0 replaces it by the batch mean.
  _close(losses.dino_center_update(_f32(center), _f32(teacher), momentum=1.0), center)
  _close(losses.dino_center_update(_f32(center), _f32(teacher), momentum=0.0),
         np.concatenate(teacher).mean(0))


@pytest.mark.parametrize("call,match", [
    (lambda s, t, c: losses.dino_loss(s[:1], t[:1], c, teacher_temperature=0.04),
     "pair of different views"),
    (lambda s, t, c: losses.dino_loss(s, t, c[:-1], teacher_temperature=0.04), "center"),
    (lambda s, t, c: losses.dino_loss(s, t, c, teacher_temperature=0.0), "teacher_temperature"),
    (lambda s, t, c: losses.dino_loss(s, t, c, student_temperature=-1.0,
                                      teacher_temperature=0.04), "student_temperature"),
    (lambda s, t, c: losses.dino_loss([s[0], s[1][:, :-1]], t, c, teacher_temperature=0.04),
     "same"),
    (lambda s, t, c: losses.dino_loss([], t, c, teacher_temperature=0.04), "at least one"),
    (lambda s, t, c: losses.dino_center_update(c, t, momentum=1.5), "momentum"),
])
def test_dino_rejects_bad_arguments(call, match):
  student, teacher, center = _f32(_dino_inputs(6, 2, 3, 2, 4))
  with pytest.raises(ValueError, match=match):
    call(student, teacher, center)


# ----------------------------------------------------------------------------------------------
# Schedules and the EMA.


def test_teacher_temperature_schedule_is_dinos_linspace():
  warmup = 7
  table = np.linspace(0.04, 0.07, warmup + 1)  # DINO: np.linspace(start, end, epochs)
  schedule = jax.jit(functools.partial(losses.teacher_temperature_schedule, start=0.04,
                                       end=0.07, warmup_steps=warmup))
  for step in range(warmup + 1):
    _close(schedule(step), table[step], f"step {step}")
  _close(schedule(100), 0.07)
  _close(losses.teacher_temperature_schedule(0, warmup_steps=0), 0.07)
  with pytest.raises(ValueError, match="warmup_steps"):
    losses.teacher_temperature_schedule(0, warmup_steps=-1)


def test_ema_momentum_is_byols_cosine_schedule():
  schedule = jax.jit(functools.partial(losses.ema_momentum, base=0.99, total_steps=20))
  for step in (0, 1, 5, 10, 19, 20, 25):
    _close(schedule(step), np_ema_momentum(step, 0.99, 20), f"step {step}")
  _close(schedule(0), 0.99)
  _close(schedule(20), 1.0)
  with pytest.raises(ValueError, match="total_steps"):
    losses.ema_momentum(0, total_steps=0)
  with pytest.raises(ValueError, match="base"):
    losses.ema_momentum(0, base=1.5, total_steps=10)


def test_ema_after_k_steps_equals_numpy():
  """A teacher EMA-ed for k steps towards a moving student, against a NumPy loop."""
  total, base = 12, 0.9
  rng = np.random.RandomState(7)
  students = [{"w": rng.randn(3, 4), "b": rng.randn(4)} for _ in range(total)]
  teacher_np = {"w": rng.randn(3, 4), "b": rng.randn(4)}
  teacher = _f32(teacher_np)
  update = jax.jit(lambda t, s, step: losses.ema_update(
      t, s, losses.ema_momentum(step, base=base, total_steps=total)))
  for step, student in enumerate(students):
    teacher = update(teacher, _f32(student), step)
    tau = np_ema_momentum(step, base, total)
    teacher_np = {k: tau * teacher_np[k] + (1 - tau) * student[k] for k in teacher_np}
  _close(teacher, teacher_np, "EMA after k steps", rtol=1e-5, atol=1e-6)
  assert jax.tree.map(lambda a: a.dtype, teacher) == {"w": jnp.float32, "b": jnp.float32}


def test_ema_update_extremes_and_no_gradient():
  online, target = _f32({"a": np.ones(3)}), _f32({"a": np.zeros(3)})
  _close(losses.ema_update(target, online, 1.0), target)
  _close(losses.ema_update(target, online, 0.0), online)
  grad = jax.grad(lambda o: jnp.sum(losses.ema_update(target, o, 0.5)["a"]))(online)
  np.testing.assert_array_equal(grad["a"], np.zeros(3))


# ----------------------------------------------------------------------------------------------
# 8 devices equal one device with the global batch.

B = 3  # rows per device
K = 6


@pytest.fixture(scope="module")
def mesh():
  return parallel.make_mesh()


def _byol_fn(p1, z2, p2, z1, axis_name):
  return losses.byol_loss(p1, z2, p2, z1, axis_name=axis_name)


def _dino_fn(student, teacher, center, axis_name):
  return losses.dino_loss(student, teacher, center, axis_name=axis_name, **DINO_HP)


def _parallel_cases():
  n = NUM_DEVICES * B
  student, teacher, center = _dino_inputs(11, 2, 4, n, K)
  return {
      "byol": (_byol_fn, _f32(_byol_inputs(10, n, K)), (P(parallel.AXIS),) * 4),
      "dino": (_dino_fn, _f32((student, teacher, center)),
               (P(parallel.AXIS), P(parallel.AXIS), P())),
  }


@needs_8_devices
@pytest.mark.parametrize("name", ["byol", "dino"])
def test_shard_map_equals_global_batch(name, mesh):
  """Value and gradient w.r.t. every input (taken outside shard_map) match one device."""
  fn, args, in_specs = _parallel_cases()[name]
  argnums = tuple(range(len(args)))
  single = jax.jit(jax.value_and_grad(functools.partial(fn, axis_name=None), argnums))(*args)
  per_device = jax.shard_map(functools.partial(fn, axis_name=parallel.AXIS), mesh=mesh,
                             in_specs=in_specs, out_specs=P())
  placed = tuple(
      jax.device_put(a, parallel.batch_sharded(mesh) if spec == P(parallel.AXIS)
                     else parallel.replicated(mesh))
      for a, spec in zip(args, in_specs))
  sharded = jax.jit(jax.value_and_grad(per_device, argnums))(*placed)
  _close(sharded[0], single[0], f"{name}: value")
  _close(sharded[1], single[1], f"{name}: gradient")


@needs_8_devices
@pytest.mark.parametrize("name", ["byol", "dino"])
def test_train_step_pattern_pmean_of_grads_equals_global_batch(name, mesh):
  """parallel.sharded (check_vma=False) + pmean of the gradient w.r.t. replicated params.

  A linear student W and a linear teacher W_t (no gradient) embed each device's rows; the
  pmean over devices of the per-device gradient is the single-device gradient of the global
  batch, as for the other losses (tests/test_losses_parallel.py).
  """
  rng = np.random.RandomState(12)
  d_in, n = 4, NUM_DEVICES * B
  views = _f32([rng.randn(n, d_in) + rng.randn(d_in) for _ in range(4 if name == "dino" else 2)])
  params = _f32({"w": rng.randn(d_in, K), "w_teacher": rng.randn(d_in, K)})
  center = _f32(_randn(13, K, scale=0.1))

  def loss(p, views, center, axis_name):
    student = [v @ p["w"] for v in views]
    teacher = [v @ p["w_teacher"] for v in views[:2]]
    if name == "byol":
      return losses.byol_loss(student[0], teacher[1], student[1], teacher[0],
                              axis_name=axis_name)
    return losses.dino_loss(student, teacher, center, axis_name=axis_name, **DINO_HP)

  expected = jax.jit(jax.grad(functools.partial(loss, axis_name=None)))(params, views, center)
  assert float(jnp.abs(expected["w"]).max()) > 1e-4  # not vacuous
  np.testing.assert_array_equal(expected["w_teacher"], np.zeros((d_in, K)))
  grad_fn = jax.grad(functools.partial(loss, axis_name=parallel.AXIS))

  def step(p, views, center):
    return jax.lax.pmean(grad_fn(p, views, center), parallel.AXIS)

  got = jax.jit(parallel.sharded(step, mesh, in_specs=(P(), P(parallel.AXIS), P()),
                                 out_specs=P()))(
      parallel.replicate(mesh, params), jax.device_put(views, parallel.batch_sharded(mesh)),
      parallel.replicate(mesh, center))
  _close(got, expected, f"{name}: pmean of per-device gradients")


@needs_8_devices
def test_center_update_uses_the_global_batch(mesh):
  _, teacher, center = _dino_inputs(14, 2, 2, NUM_DEVICES * B, K)
  teacher, center = _f32(teacher), _f32(center)
  update = lambda c, t, axis_name: losses.dino_center_update(c, t, momentum=0.8,
                                                             axis_name=axis_name)
  expected = update(center, teacher, None)
  _close(expected, np_center(np.asarray(center), [np.asarray(t) for t in teacher], 0.8))
  got = jax.jit(jax.shard_map(functools.partial(update, axis_name=parallel.AXIS), mesh=mesh,
                              in_specs=(P(), P(parallel.AXIS)), out_specs=P()))(
      parallel.replicate(mesh, center), jax.device_put(teacher, parallel.batch_sharded(mesh)))
  _close(got, expected, "centre: 8 devices vs the global batch")
  # Each device's own mean differs from the global one, so the check is not vacuous.
  local = np.concatenate([np.asarray(t)[:B] for t in teacher]).mean(0)
  assert not np.allclose(local, np.concatenate([np.asarray(t) for t in teacher]).mean(0))


# ----------------------------------------------------------------------------------------------
# Against lightly (the `bench` extra).


@pytest.fixture(scope="module")
def lightly_torch():
  from benchmarks import common  # noqa: F401  Sets OMP_WAIT_POLICY before torch is imported.
  torch = pytest.importorskip("torch")
  pytest.importorskip("lightly")
  torch.set_num_threads(1)
  return torch


@pytest.mark.parametrize("num_teacher,num_student,n,k", DINO_SHAPES[:2])
def test_dino_loss_and_center_match_lightly(lightly_torch, num_teacher, num_student, n, k):
  torch = lightly_torch
  from lightly.loss import DINOLoss
  student, teacher, center = _f32(_dino_inputs(15, num_teacher, num_student, n, k))
  ref = DINOLoss(output_dim=k, warmup_teacher_temp=0.05, teacher_temp=0.05, student_temp=0.1,
                 center_momentum=0.9)
  ref.center.data = torch.tensor(np.asarray(center)).reshape(1, 1, k)
  as_torch = lambda xs: [torch.tensor(np.asarray(x)) for x in xs]
  value = ref(as_torch(teacher), as_torch(student), teacher_temp=0.05)
  _close(losses.dino_loss(student, teacher, center, **DINO_HP), value.item(), "vs DINOLoss")
  _close(losses.dino_center_update(center, teacher, momentum=0.9),
         ref.center.reshape(-1).numpy(), "vs DINOLoss.update_center")


def test_byol_loss_matches_lightly(lightly_torch):
  torch = lightly_torch
  from lightly.loss import NegativeCosineSimilarity
  p1, z2, p2, z1 = _f32(_byol_inputs(16, 10, 8))
  criterion = NegativeCosineSimilarity()
  t = lambda x: torch.tensor(np.asarray(x))
  # lightly's BYOL example: loss = 0.5 * (criterion(p0, z1) + criterion(p1, z0)).
  ref = 0.5 * (criterion(t(p1), t(z2)) + criterion(t(p2), t(z1)))
  _close(losses.byol_loss(p1, z2, p2, z1), ref.item(), "vs NegativeCosineSimilarity")


def test_ema_matches_lightly(lightly_torch):
  torch = lightly_torch
  from lightly.models.utils import update_momentum
  from lightly.utils.scheduler import cosine_schedule
  total = 30
  for step in (0, 3, 15, 29, 30):  # lightly divides by max_steps - 1: max_steps = total + 1
    _close(losses.ema_momentum(step, base=0.996, total_steps=total),
           cosine_schedule(step, total + 1, 0.996, 1.0), f"step {step}")
  online, target = torch.nn.Linear(3, 2), torch.nn.Linear(3, 2)
  mine = losses.ema_update(
      {"w": target.weight.detach().numpy().copy(), "b": target.bias.detach().numpy().copy()},
      {"w": online.weight.detach().numpy(), "b": online.bias.detach().numpy()}, 0.9)
  update_momentum(online, target, m=0.9)
  _close(mine, {"w": target.weight.detach().numpy(), "b": target.bias.detach().numpy()})
