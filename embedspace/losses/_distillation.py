"""Self-distillation: BYOL's and DINO's losses, DINO's centre, and the teacher's EMA schedules.

In BYOL (Grill et al. 2020) and DINO (Caron et al. 2021) a student (online) network is trained to
predict the output of a teacher (target) network whose parameters are an exponential moving
average (EMA) of the student's. The teacher's outputs are targets: every loss here applies
`stop_gradient` to them, so no gradient reaches the teacher, whose parameters change only
through `ema_update`. The per-example terms are averaged over the GLOBAL batch (per-device sums,
`psum`-ed, divided by the global row count), so a loss under `shard_map` over `axis_name` equals
the loss of one device holding every row; DINO's centre is likewise the global-batch mean, as the
authors' `dist.all_reduce` makes it.

State that these functions do not hold (the trainer's): the teacher's parameters (a pytree like
the student's, updated after each optimizer step with `ema_update(teacher, student,
ema_momentum(step, ...))`) and DINO's `[K]` centre (updated with `dino_center_update` from the
same teacher logits the loss used, after the loss). Both are replicated and receive no gradient.
The schedules are built on optax's (`cosine_decay_schedule`, `linear_schedule`) and the EMA is
`optax.incremental_update`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import optax

from embedspace import geometry
from embedspace import parallel
from embedspace.losses import _common

Logits = jax.Array | Sequence[jax.Array]
"""Crops of one batch: a sequence of `[batch, K]` arrays, or one stacked `[crops, batch, K]`."""


def negative_cosine_similarity(
    p: jax.Array,
    z: jax.Array,
    *,
    eps: float = 1e-8,
    axis_name: str | None = None,
) -> jax.Array:
  """Mean negative cosine similarity of paired rows over the global batch.

    loss = -1/N sum_i <p_i, z_i> / (max(|p_i|, eps) max(|z_i|, eps))

  lightly's `NegativeCosineSimilarity` (SimSiam's D, Chen & He 2021, eq. 1). Gradients flow into
  both arguments; `byol_loss` stops the target's.

  Args:
    p: `[batch, dim]` predictions.
    z: `[batch, dim]` targets; row i pairs with row i of `p`.
    eps: smallest norm divided by (see `geometry.l2_normalize`).
    axis_name: mesh/pmap axis of the data-parallel devices, or None on one device.

  Returns:
    Scalar in [-1, 1], the same on every device.

  Raises:
    ValueError: if `p`/`z` are not `[batch, dim]` floating arrays of the same shape.
  """
  _common.check_pair("p", p, "z", z)
  p, z = _common.to_float(p), _common.to_float(z)
  cos = jnp.sum(geometry.l2_normalize(p, eps=eps) * geometry.l2_normalize(z, eps=eps), axis=-1)
  return -jnp.sum(_common.global_sum(cos, axis_name)) / _common.global_batch_size(p, axis_name)


def byol_loss(
    p1: jax.Array,
    z2: jax.Array,
    p2: jax.Array,
    z1: jax.Array,
    *,
    eps: float = 1e-8,
    axis_name: str | None = None,
) -> jax.Array:
  """BYOL's symmetric loss: each view's online prediction regresses the other view's target.

  With p_v the online network's prediction q(g(f(view v))) and z_v the target network's
  projection of view v, cos the cosine similarity and N the global batch:

    loss = 1/2 (-1/N sum_i cos(p1_i, sg(z2_i)) - 1/N sum_i cos(p2_i, sg(z1_i)))

  in [-1, 1] (sg: stop_gradient; no gradient reaches `z1`, `z2`). This is lightly's BYOL
  convention, `0.5 * (NegativeCosineSimilarity(p0, z1) + NegativeCosineSimilarity(p1, z0))`.
  Grill et al. 2020, "Bootstrap Your Own Latent" (eq. 2 and the symmetrised L^BYOL after it),
  write the loss of one direction as ||p_bar - z_bar||^2 = 2 - 2 cos(p, z) and add the two
  directions, so per batch

    L_paper = (2 - 2 mean cos(p1, z2)) + (2 - 2 mean cos(p2, z1)) = 4 + 4 * loss,

  an affine transform: the same minimiser and gradients 4x these (under SGD the paper's form
  takes 4x larger steps at the same learning rate; Adam is invariant to the factor up to its
  epsilon).

  Args:
    p1: `[batch, dim]` online predictions of view 1.
    z2: `[batch, dim]` target projections of view 2 (row i is the same image as `p1`'s).
    p2: `[batch, dim]` online predictions of view 2.
    z1: `[batch, dim]` target projections of view 1.
    eps: smallest norm divided by in the cosine.
    axis_name: mesh/pmap axis of the data-parallel devices, or None on one device.

  Returns:
    Scalar loss in [-1, 1], the same on every device.

  Raises:
    ValueError: if the four inputs are not `[batch, dim]` floating arrays of one shape.
  """
  _common.check_pair("p1", p1, "z2", z2)
  _common.check_pair("p2", p2, "z1", z1)
  _common.check_pair("p1", p1, "p2", p2)
  sg = jax.lax.stop_gradient
  return (negative_cosine_similarity(p1, sg(z2), eps=eps, axis_name=axis_name)
          + negative_cosine_similarity(p2, sg(z1), eps=eps, axis_name=axis_name)) / 2


def _stack_crops(name: str, logits: Logits) -> jax.Array:
  """`[crops, batch, K]` float32 from a sequence of `[batch, K]` (or an already stacked array)."""
  if hasattr(logits, "ndim"):
    stacked = logits
    if stacked.ndim != 3:
      raise ValueError(f"`{name}` must be a sequence of [batch, K] arrays or one "
                       f"[crops, batch, K] array, got shape {stacked.shape}.")
  else:
    crops = list(logits)
    if not crops:
      raise ValueError(f"`{name}` must hold at least one crop, got none.")
    for i, crop in enumerate(crops):
      _common.check_embeddings(f"{name}[{i}]", crop)
    shapes = {tuple(c.shape) for c in crops}
    if len(shapes) != 1:
      raise ValueError(f"every crop of `{name}` must have the same [batch, K] shape, got "
                       f"{[tuple(c.shape) for c in crops]}.")
    stacked = jnp.stack(crops)
  if not jnp.issubdtype(stacked.dtype, jnp.floating) or min(stacked.shape) < 1:
    raise ValueError(f"`{name}` must be non-empty floating logits, got {stacked.dtype} "
                     f"{stacked.shape}.")
  return _common.to_float(stacked)


def dino_loss(
    student_logits: Logits,
    teacher_logits: Logits,
    center: jax.Array,
    *,
    student_temperature: float | jax.Array = 0.1,
    teacher_temperature: float | jax.Array,
    axis_name: str | None = None,
) -> jax.Array:
  """DINO's cross-entropy from the centred, sharpened teacher to the student, over crop pairs.

  With S student crops s_v (`[batch, K]` head outputs; the first T are the global crops the
  teacher also saw, in the same order), T teacher crops t_u, the centre c and N the global batch:

    P_t(u)_i = softmax((t_u,i - c) / teacher_temperature)            (stop_gradient)
    log P_s(v)_i = log_softmax(s_v,i / student_temperature)
    H(u, v) = -1/N sum_i sum_k P_t(u)_ik log P_s(v)_ik
    loss = sum_{u < T, v < S, v != u} H(u, v) / (T S - min(T, S))

  i.e. the mean over every (teacher crop, student crop) pair that is not the same view, each
  term a mean over the global batch (Caron et al. 2021, "Emerging Properties in
  Self-Supervised Vision Transformers", Algorithm 1 and eq. 3). This is exactly the averaging of
  the authors' `DINOLoss` (facebookresearch/dino `main_dino.py`: total / n_loss_terms, each term
  a batch mean) and of lightly's `DINOLoss`, whose `teacher_out`/`student_out` lists are this
  function's `teacher_logits`/`student_logits`. The paper's defaults: student temperature 0.1,
  teacher temperature warmed up linearly from 0.04 to 0.04-0.07 (`teacher_temperature_schedule`).

  Neither `teacher_logits` nor `center` receives a gradient. Update the centre afterwards with
  `dino_center_update` on the same `teacher_logits` (the loss uses the centre from before).

  Args:
    student_logits: S crops of `[batch, K]` student head outputs (global crops first), or one
      `[S, batch, K]` array.
    teacher_logits: T crops of `[batch, K]` teacher head outputs of the global crops, or one
      `[T, batch, K]` array.
    center: `[K]` running centre of the teacher's outputs.
    student_temperature: tau_s > 0.
    teacher_temperature: tau_t > 0 (a scheduled value may be a traced scalar).
    axis_name: mesh/pmap axis of the data-parallel devices, or None on one device.

  Returns:
    Scalar loss, the same on every device.

  Raises:
    ValueError: if the crops are not floating `[batch, K]` arrays of one shape, `center` is not
      `[K]`, no (teacher, student) pair of different views exists, or a temperature is a
      number <= 0.
  """
  student = _stack_crops("student_logits", student_logits)
  teacher = _stack_crops("teacher_logits", teacher_logits)
  if student.shape[1:] != teacher.shape[1:]:
    raise ValueError(f"student and teacher crops must have the same [batch, K] shape, got "
                     f"{student.shape[1:]} and {teacher.shape[1:]}.")
  k = student.shape[-1]
  if getattr(center, "shape", None) != (k,):
    raise ValueError(
        f"`center` must have shape [K] = ({k},), got {getattr(center, 'shape', None)}.")
  _common.check_positive("student_temperature", student_temperature)
  _common.check_positive("teacher_temperature", teacher_temperature)
  num_teacher, num_student = teacher.shape[0], student.shape[0]
  num_terms = num_teacher * num_student - min(num_teacher, num_student)
  if num_terms == 0:
    raise ValueError(
        f"dino_loss needs a pair of different views, got {num_teacher} teacher and "
        f"{num_student} student crop(s) (crop u of both is the same view and is skipped).")

  sg = jax.lax.stop_gradient
  center = sg(_common.to_float(jnp.asarray(center)))
  teacher_probs = jax.nn.softmax((sg(teacher) - center) / teacher_temperature, axis=-1)
  student_log_probs = jax.nn.log_softmax(student / student_temperature, axis=-1)
  # [T, S]: minus the cross-entropy of each pair, summed over this device's rows.
  pair_sums = jnp.einsum("ubk,vbk->uv", teacher_probs, student_log_probs,
                         precision=jax.lax.Precision.HIGHEST)
  same_view = jnp.eye(num_teacher, num_student, dtype=bool)
  local = -jnp.sum(jnp.where(same_view, 0.0, pair_sums))
  n = _common.global_batch_size(student[0], axis_name)
  return parallel.psum(local, axis_name) / (n * num_terms)


def dino_center_update(
    center: jax.Array,
    teacher_logits: Logits,
    *,
    momentum: float | jax.Array = 0.9,
    axis_name: str | None = None,
) -> jax.Array:
  """DINO's EMA of the teacher's mean output over the global batch and all teacher crops.

    c <- momentum * c + (1 - momentum) * 1/(T N) sum_u sum_i t_u,i

  (Caron et al. 2021, eq. 4; m = 0.9 in the paper.) The batch mean is over the GLOBAL batch,
  like the authors' `dist.all_reduce(batch_center) / world_size` and lightly's `center_mean`.
  Computed on the raw teacher logits (before centring), without gradient.

  Args:
    center: `[K]` current centre.
    teacher_logits: T crops of `[batch, K]` teacher outputs, or one `[T, batch, K]` array.
    momentum: m in [0, 1].
    axis_name: mesh/pmap axis of the data-parallel devices, or None on one device.

  Returns:
    The new `[K]` centre, float32 (float64 for float64 inputs), the same on every device.

  Raises:
    ValueError: if the crops are not floating `[batch, K]` arrays of one shape, `center` is not
      `[K]`, or `momentum` is a number outside [0, 1].
  """
  teacher = _stack_crops("teacher_logits", teacher_logits)
  k = teacher.shape[-1]
  if getattr(center, "shape", None) != (k,):
    raise ValueError(
        f"`center` must have shape [K] = ({k},), got {getattr(center, 'shape', None)}.")
  if _common.is_number(momentum) and not 0 <= momentum <= 1:
    raise ValueError(f"`momentum` must be in [0, 1], got {momentum}.")
  batch_center = _common.global_mean(jax.lax.stop_gradient(teacher).reshape(-1, k), axis_name)
  center = _common.to_float(jnp.asarray(center))
  return optax.incremental_update(batch_center, center, 1.0 - momentum)


def teacher_temperature_schedule(
    step: int | jax.Array,
    *,
    start: float = 0.04,
    end: float = 0.07,
    warmup_steps: int,
) -> jax.Array:
  """DINO's teacher temperature: linear from `start` to `end` over `warmup_steps`, then `end`.

    tau_t(k) = start + (end - start) * min(k, W) / W

  (Caron et al. 2021, Sec. 4.2 / Appendix: 0.04 -> 0.07 over the first 30 epochs; `end=0.04`
  disables the warm-up). This is `optax.linear_schedule(start, end, W)`. The authors' table,
  `np.linspace(start, end, E)` per epoch, reaches `end` at epoch E - 1, i.e. it is this schedule
  with `warmup_steps = E - 1` evaluated at the epoch.

  Args:
    step: optimizer step k >= 0 (a Python int or a traced integer).
    start: temperature at step 0.
    end: temperature from `warmup_steps` on.
    warmup_steps: W >= 0; W = 0 gives `end` from the start.

  Returns:
    Scalar float32 temperature.

  Raises:
    ValueError: if `warmup_steps` < 0 or a temperature <= 0.
  """
  if warmup_steps < 0:
    raise ValueError(f"`warmup_steps` must be >= 0, got {warmup_steps}.")
  _common.check_positive("start", start)
  _common.check_positive("end", end)
  if warmup_steps == 0:
    return jnp.asarray(end, jnp.float32)
  return jnp.asarray(optax.linear_schedule(start, end, warmup_steps)(step), jnp.float32)


def ema_momentum(
    step: int | jax.Array,
    *,
    base: float = 0.996,
    total_steps: int,
) -> jax.Array:
  """BYOL's (and DINO's) teacher momentum: cosine from `base` at step 0 to 1 at `total_steps`.

    tau(k) = 1 - (1 - base) * (cos(pi * min(k, K) / K) + 1) / 2

  (Grill et al. 2020, Sec. 3.2, tau_base = 0.996; DINO uses the same schedule.) This is
  `1 - optax.cosine_decay_schedule(1 - base, K)(k)`. lightly's `cosine_schedule(k, M, base, 1)`
  divides by M - 1 instead of K, so it equals this with `total_steps = M - 1`.

  Args:
    step: optimizer step k >= 0 (a Python int or a traced integer).
    base: tau_base in [0, 1].
    total_steps: K >= 1, the training length in steps.

  Returns:
    Scalar float32 momentum in [base, 1].

  Raises:
    ValueError: if `total_steps` < 1 or `base` is outside [0, 1].
  """
  if total_steps < 1:
    raise ValueError(f"`total_steps` must be >= 1, got {total_steps}.")
  if not 0 <= base <= 1:
    raise ValueError(f"`base` must be in [0, 1], got {base}.")
  return jnp.asarray(1.0 - optax.cosine_decay_schedule(1.0 - base, total_steps)(step),
                     jnp.float32)


def ema_update(target: Any, online: Any, momentum: float | jax.Array) -> Any:
  """One EMA step of the teacher (target) towards the student (online), leaf by leaf.

    target <- momentum * target + (1 - momentum) * online

  (BYOL's xi <- tau xi + (1 - tau) theta; DINO's theta_t <- lambda theta_t + (1 - lambda)
  theta_s.) A thin wrapper of `optax.incremental_update(online, target, 1 - momentum)`, named
  the way the papers write it. Call it after the optimizer step, on replicated pytrees, with the
  momentum of that step (`ema_momentum`); no gradient flows through it into either tree.

  Args:
    target: the teacher's pytree (e.g. its `params`).
    online: the student's pytree of the same structure.
    momentum: tau in [0, 1]; 1 keeps the target, 0 copies the online tree.

  Returns:
    The new target pytree (same structure and dtypes as `target`).
  """
  return optax.incremental_update(
      jax.lax.stop_gradient(online), jax.lax.stop_gradient(target), 1.0 - momentum)
