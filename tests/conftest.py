"""Test set-up: 8 virtual CPU devices, set before JAX is imported anywhere."""

import os

# LLVM at -O0: the tests' programs are small and compile-bound (an ImageBind smoke run end to
# end: 49 s -> 34 s on 2 cores); convolutions and dots are library calls either way.
os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "")
    + " --xla_force_host_platform_device_count=8 --xla_backend_optimization_level=0").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

# Datasets the tests build go to a fresh directory per test run, never the user's; compiled
# programs go to a persistent compilation cache shared by every process of the run (pytest-xdist
# workers, the subprocesses of the CLI, multi-process and notebook tests inherit the variables
# from the process that set them): many tests compile the same smoke steps in new processes, and
# a cache hit halves a smoke run (15 s -> 8 s on 2 cores). The process that made them removes them.
import atexit  # noqa: E402
import shutil  # noqa: E402
import tempfile  # noqa: E402

for _variable, _prefix in (("TFDS_DATA_DIR", "embedspace_tfds_"),
                           ("JAX_COMPILATION_CACHE_DIR", "embedspace_jax_cache_")):
  if _variable not in os.environ:
    os.environ[_variable] = tempfile.mkdtemp(prefix=_prefix)
    atexit.register(shutil.rmtree, os.environ[_variable], ignore_errors=True)
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.2")

import pytest  # noqa: E402


def _trained_once(tmp_path_factory, name: str, train) -> str:
  """`train(workdir)` run once per test run, shared by every pytest-xdist worker.

  The workdir lives in the run's base temporary directory (the parent of each worker's), and a
  file lock makes the first worker to ask train it while the others wait for it, instead of every
  worker training its own copy on the same 2 cores. Tests only read these workdirs.
  """
  from filelock import FileLock

  root = tmp_path_factory.getbasetemp()
  if os.environ.get("PYTEST_XDIST_WORKER"):
    root = root.parent  # .../pytest-N, shared by the workers of this run only
  workdir, done = root / name, root / f"{name}.done"
  with FileLock(str(root / f"{name}.lock")):
    if not done.exists():
      shutil.rmtree(workdir, ignore_errors=True)  # a half-written one from a crashed worker
      workdir.mkdir()
      train(str(workdir))
      done.touch()
  return str(workdir)


@pytest.fixture(scope="session")
def smoke_workdir(tmp_path_factory):
  """A VICReg `:smoke` training workdir (checkpoints at steps 3 and 6), trained once per run.

  The kNN monitor and the end-of-training evaluation are skipped: the tests that use the workdir
  measure what they need (~20 s instead of ~40 s on 2 cores).
  """
  from configs import vicreg
  from embedspace import methods

  def run(workdir):
    config = vicreg.get_config("smoke")
    config.eval_every = 0
    config.eval.at_end = False
    assert methods.train_and_evaluate(config, workdir) == {}
  return _trained_once(tmp_path_factory, "smoke_run", run)


@pytest.fixture(scope="session")
def imagebind_smoke_workdir(tmp_path_factory):
  """An ImageBind `:smoke` workdir (image, audio and text encoders), trained once per run.

  The frozen encoders of the interfaces over embeddings (PaLM-E-style, FIND-style) load it with
  `embedspace.multimodal.space.load_workdir`.
  """
  from configs import imagebind
  from embedspace import methods

  def run(workdir):
    config = imagebind.get_config("smoke")
    config.eval.plots = False
    methods.train_and_evaluate(config, workdir)
  return _trained_once(tmp_path_factory, "imagebind_smoke", run)


@pytest.fixture
def preempt_at(monkeypatch):
  """`preempt_at(n)`: training runs from now on get SIGTERM during their n-th step (the compiled
  step, `core.step.make_parallel_step`, is wrapped); `preempt_at.disarm()` restores it."""
  from embedspace.core import step as step_lib
  from tests import train_steps

  real = step_lib.make_parallel_step

  def arm(n: int) -> None:
    monkeypatch.setattr(step_lib, "make_parallel_step", train_steps.sigterm_during_step(n))

  arm.disarm = lambda: monkeypatch.setattr(step_lib, "make_parallel_step", real)
  return arm
