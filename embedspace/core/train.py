"""`train_and_evaluate(task, config, workdir)`: the one copy of a run, for every method.

validate -> mesh -> the task's set-up -> workdir check -> train state -> restore the newest
intact checkpoint -> the loop -> the task's evaluation -> `eval.json`. The method is `task`
(`embedspace.methods.task(config.method)`); nothing here knows which one it is. Layout follows
flax/examples/imagenet's `train_and_evaluate(config, workdir)`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import logging
from etils import epath
from jax.experimental import multihost_utils

from embedspace import parallel
from embedspace.core import config_checks
from embedspace.core import console
from embedspace.core import lock as lock_lib
from embedspace.core import loop
from embedspace.core import metrics as metrics_lib
from embedspace.core import optim
from embedspace.core import step as step_lib
from embedspace.core import workdirs
from embedspace.core.task import Setup, Task

EVAL_FILE = "eval.json"


def initial_state(config: ml_collections.ConfigDict, setup: Setup,
                  tx: optax.GradientTransformation) -> step_lib.TrainState:
  """The step-0 state on the host: `setup.init` from `config.seed`, the optimizer's state."""
  init_rng, state_rng = jax.random.split(jax.random.PRNGKey(config.seed))
  return step_lib.create_train_state(setup.init(init_rng), tx, state_rng, frozen=setup.frozen,
                                     ema=setup.ema)


@dataclasses.dataclass
class Prepared:
  """A run built and ready for its loop (what tests and notebooks step by hand).

  Attributes:
    setup: the task's `Setup`.
    tx: the optimizer (`optim.make_optimizer(config)`).
    state: the step-0 state on the host.
    train_step: the per-device step `(state, batch, *, axis_name) -> (state, metrics)`; runs
      on one device with `axis_name=None`, under `jax.pmap`, or compiled by `parallel_step`.
  """
  setup: Setup
  tx: optax.GradientTransformation
  state: step_lib.TrainState
  train_step: Callable[..., Any]

  def parallel_step(self, mesh: jax.sharding.Mesh) -> Callable[..., Any]:
    """`train_step` compiled over `mesh` (state replicated and donated, batch split)."""
    return step_lib.make_parallel_step(mesh, self.train_step)


def prepare(task: Task, config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh) -> Prepared:
  """Validates `config` and builds the task's run: set-up, optimizer, state, step."""
  task.validate(config)
  config_checks.check_batch_divisible(config, mesh)
  setup = task.setup(config, mesh)  # Reads data and encoders; a bad one fails before any write.
  tx = optim.make_optimizer(config)
  train_step = step_lib.make_train_step(setup.loss_fn, tx=tx,
                                        skip_nonfinite=config.skip_nonfinite,
                                        metrics_fn=setup.metrics_fn, ema=setup.ema)
  return Prepared(setup=setup, tx=tx, state=initial_state(config, setup, tx),
                  train_step=train_step)


def train_and_evaluate(task: Task, config: ml_collections.ConfigDict,
                       workdir: str | os.PathLike[str]) -> dict[str, Any]:
  """Trains `config` in `workdir` (resuming from its newest intact checkpoint), then evaluates.

  Returns the evaluation report, also written to `workdir/eval.json` (and the task's report
  files to `workdir/eval/`); `{}` when `config.eval.at_end` is False. A run already at
  `config.num_steps` whose `eval.json` is up to date (that step, the same `config.eval`) is not
  evaluated again unless `config.eval.rerun`: its report is read back.

  Raises:
    config_checks.ConfigError: bad config values, data, workdir or frozen encoders (the message
      names the key and the fix).
    checkpointing.NoIntactCheckpointError: the workdir has checkpoints and none can be restored.
    loop.NonFiniteLossError: the loss became non-finite and `config.skip_nonfinite` is False.
    loop.Preempted: SIGTERM or SIGINT arrived; a checkpoint of the current step was written.
    lock.LockError: another run holds the workdir (`core.lock`; nothing is written).
  """
  mesh = parallel.make_mesh()
  run = prepare(task, config, mesh)
  workdir = os.fspath(workdirs.absolute(workdir))
  config_checks.make_workdir(workdir)
  with lock_lib.hold(workdir):
    return _train_locked(task, config, workdir, mesh, run)


def _train_locked(task: Task, config: ml_collections.ConfigDict, workdir: str,
                  mesh: jax.sharding.Mesh, run: Prepared) -> dict[str, Any]:
  """`train_and_evaluate` once the workdir's lock is held."""
  setup = run.setup
  changes = config_checks.check_workdir_config(config, workdir)
  logging.info("%s", parallel.describe(mesh))

  # A host copy of the initialisation: the evaluation's random-encoder baseline.
  initial = jax.device_get({"params": run.state.params, "batch_stats": run.state.batch_stats})
  state = parallel.replicate(mesh, run.state)
  ckpt, state, start = loop.restore_or_start(config, workdir, state, setup.data_state)
  if start > config.num_steps:
    ckpt.close()
    raise config_checks.ConfigError(
        f"--workdir={workdir} holds a run trained to step {start}, past config.num_steps="
        f"{config.num_steps}; pass --config.num_steps={start} (or more) to evaluate or continue "
        "it, or use a new --workdir.")
  config_checks.record_changes(config, workdir, changes)
  steps = (f"steps {start} -> {config.num_steps}" if start < config.num_steps
           else f"trained to step {start}")
  console.say(f"{config.method}: {steps} on {console.where(mesh)}; workdir {workdir}",
              everywhere=True)  # Each process's console says where it runs.
  p_step = run.parallel_step(mesh)
  writer = metrics_lib.MetricWriter(workdir, purge_step=start + 1 if start else None)

  def monitor(done: int, state: step_lib.TrainState, progress: Any) -> None:
    every = config.get("eval_every", 0)
    if setup.monitor is not None and every and (done % every == 0 or done == config.num_steps):
      progress.sync()  # The steps queued before the monitor are training time.
      scalars, message = setup.monitor(done, state)
      writer.write_scalars(done, scalars)
      progress.write(f"step {done}/{config.num_steps}: {message}")

  state = loop.run_loop(config, state, step_fn=p_step, batches=setup.batches,
                        data_state=setup.data_state, mesh=mesh, ckpt=ckpt, writer=writer,
                        workdir=workdir, start=start, items_per_step=setup.items_per_step,
                        rate_name=setup.rate_name, shown=setup.shown, after_step=monitor)

  if not config.get("eval", {}).get("at_end", True):
    writer.close()
    console.say(f"config.eval.at_end=False: not evaluated; evaluate with python -m "
                f"embedspace.evaluate --workdir={workdir}")
    return {}
  evaluated = _evaluated(config)
  if start == config.num_steps and not config.eval.get("rerun", False):
    saved = _up_to_date_report(workdir, evaluated)
    if saved is not None:
      writer.close()
      console.say(f"{EVAL_FILE} is up to date (step {start}, the same config.eval): not "
                  "evaluated again; pass --config.eval.rerun=True to evaluate again")
      return saved
  report = task.evaluate(config, setup, state, initial=initial,
                         out_dir=os.fspath(epath.Path(workdir) / "eval"))
  writer.write_scalars(config.num_steps,
                       {f"eval/{k}": v for k, v in loop.flatten_scalars(report).items()})
  writer.close()
  report["evaluated"] = evaluated
  if jax.process_index() == 0:
    (epath.Path(workdir) / EVAL_FILE).write_text(json.dumps(report, indent=2), encoding="utf-8")
  return report


def _evaluated(config: ml_collections.ConfigDict) -> dict[str, Any]:
  """What an evaluation depends on besides the run: the step and `config.eval` (not `rerun`)."""
  settings = json.loads(config.eval.to_json())
  settings.pop("rerun", None)
  return {"step": int(config.num_steps), "eval": settings}


def _up_to_date_report(workdir: str, evaluated: dict[str, Any]) -> dict[str, Any] | None:
  """The report in `workdir/eval.json` if it was made from `evaluated` (process 0 decides)."""
  saved = None
  if jax.process_index() == 0:
    try:
      saved = json.loads((epath.Path(workdir) / EVAL_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
      saved = None
  fresh = isinstance(saved, dict) and saved.get("evaluated") == evaluated
  if jax.process_count() > 1:  # Every process must make the same choice: evaluating is collective.
    fresh = bool(multihost_utils.broadcast_one_to_all(np.int32(fresh)))
  if not fresh:
    return None
  return saved if saved is not None else {}


def evaluate_workdir(task: Task, workdir: str | os.PathLike[str], *,
                     config: ml_collections.ConfigDict | None = None,
                     out_dir: str | os.PathLike[str] | None = None) -> dict[str, Any]:
  """The task's evaluation of the newest intact checkpoint of `workdir`, as at the end of training.

  Nothing in `workdir` is moved or changed except the report files in `out_dir` (default
  `workdir/eval`). `config` (default: the workdir's `config.json`) may differ from it in its
  `eval` settings; the random-initialisation baseline is rebuilt from `config.seed` exactly as
  training built it.

  Raises:
    FileNotFoundError, checkpointing.NoIntactCheckpointError, workdirs.IncompatibleWorkdirError:
      the workdir cannot be read (see `workdirs.restore_newest`).
    config_checks.ConfigError: its config is invalid, or its data or encoders are missing.
    lock.LockError: the report goes into the workdir and a run is training there.
  """
  workdirs.read_config(workdir)  # Not a workdir: that error, not the lock's.
  out_dir = out_dir or os.path.join(os.path.abspath(workdir), "eval")
  inside = os.path.commonpath([os.path.abspath(out_dir), os.path.abspath(workdir)]) == (
      os.path.abspath(workdir))
  # A report written into the workdir must not race a run training there (`core.lock`).
  with lock_lib.hold(workdir, purpose="evaluation") if inside else contextlib.nullcontext():
    return _evaluate(task, workdir, config, out_dir)


def _evaluate(task: Task, workdir: str, config: ml_collections.ConfigDict | None,
              out_dir: str) -> dict[str, Any]:
  """`evaluate_workdir` (with the lock held when it writes into the workdir)."""
  saved, variables, step = workdirs.restore_newest(workdir)
  config = saved if config is None else config
  task.validate(config)
  mesh = parallel.make_mesh()
  setup = task.setup(config, mesh)
  host_state = initial_state(config, setup, optim.make_optimizer(config))
  initial = jax.device_get({"params": host_state.params, "batch_stats": host_state.batch_stats})
  try:
    state = host_state.replace(step=jnp.asarray(step, jnp.int32), params=variables["params"],
                               batch_stats=variables["batch_stats"])
    workdirs.check_params_fit(workdir, host_state.params, state.params)
  except (KeyError, TypeError) as e:
    raise workdirs.IncompatibleWorkdirError(
        f"the checkpoint in {workdir} does not fit the model its config.json builds ({e})"
        ) from None
  state = parallel.replicate(mesh, state)
  out_dir = os.fspath(out_dir or workdirs.absolute(workdir) / "eval")
  console.say(f"{config.method}: evaluating step {step} of {workdir} on {console.where(mesh)}; "
              f"report in {out_dir}")
  return task.evaluate(config, setup, state, initial=initial, out_dir=out_dir)
