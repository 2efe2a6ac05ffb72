"""Command line: train and evaluate an embedding model from an ml_collections config.

  python -m embedspace.main --config=configs/vicreg.py [--workdir=DIR] [--config.KEY=VALUE ...]

Several processes (TPU hosts, GPU nodes, or localhost) start with the arguments of
`jax.distributed.initialize`: --coordinator_address=HOST:PORT --num_processes=N --process_id=I.
Without them, a TPU pod slice or a SLURM job is detected by JAX; elsewhere the run is one process.
Exit codes: 0 done, 2 bad input (one line `error: ...` names it and the fix; nothing is written;
also a workdir in use by another run), 3 non-finite loss (the last good checkpoint is kept) or
embeddings (the evaluation refuses them), 69 another process of a multi-process run failed
(restart all of them with the same command to resume from the last checkpoint), 75 preempted
(SIGTERM; a checkpoint of the step in progress was written: rerun the same command to resume),
130 interrupted (Ctrl-C; as 75, or says that no checkpoint was written).
"""

from __future__ import annotations

import errno
import os
import sys
from collections.abc import Sequence

from absl import app
from absl import flags
from ml_collections import config_flags

from embedspace.core import cli
from embedspace.core.cli import fail

config_flags.DEFINE_config_file("config", None, "Path to a config file, e.g. configs/vicreg.py.",
                                lock_config=True)
flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and reports. "
                    "Default: workdirs/<config name>[_<variant>].")
flags.DEFINE_string("coordinator_address", None, "jax.distributed coordinator HOST:PORT.")
flags.DEFINE_integer("num_processes", None, "Number of processes (jax.distributed).")
flags.DEFINE_integer("process_id", None, "This process's index (jax.distributed).")
flags.DEFINE_integer("heartbeat_timeout_seconds", 100, "jax.distributed: a process silent this "
                     "long counts as dead, and the others stop.", lower_bound=1)
flags.DEFINE_integer("initialization_timeout", 300, "jax.distributed: seconds to wait for all "
                     "processes to connect at start-up.", lower_bound=1)
FLAGS = flags.FLAGS

BAD_INPUT_EXIT_CODE = 2
NONFINITE_EXIT_CODE = 3
LOST_PROCESS_EXIT_CODE = 69  # EX_UNAVAILABLE


def default_workdir() -> str:
  """workdirs/<config file stem>[_<variant>], so rerunning a command resumes its run."""
  spec = FLAGS["config"].config_filename  # e.g. 'configs/vicreg.py:smoke'
  path, _, variant = spec.partition(":")
  name = os.path.splitext(os.path.basename(path))[0]
  return os.path.join("workdirs", f"{name}_{variant}" if variant else name)


def parse_flags(argv: Sequence[str]) -> list[str]:
  """`core.cli.parse_flags`, with any mistake in a flag or the config file as one line."""

  def describe(error: Exception) -> str:
    from embedspace.core.config_checks import describe_flag_error  # After parsing: --help fast.
    return describe_flag_error(error, argv)

  # A config file that failed to load raises on first use: make that happen here.
  return cli.parse_flags(argv, validate=lambda: FLAGS.config.keys(), describe=describe)


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    fail(f"unexpected arguments {argv[1:]}; flags take the form --name=value")
  import jax  # After flag parsing, so --help is fast.

  from embedspace import geometry, methods, parallel
  from embedspace.core import checkpointing, lock, loop
  from embedspace.core.config_checks import ConfigError

  try:
    parallel.initialize_distributed(
        FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id,
        initialization_timeout=FLAGS.initialization_timeout,
        heartbeat_timeout_seconds=FLAGS.heartbeat_timeout_seconds)
  except ValueError as e:
    fail(f"jax.distributed.initialize: {e} Pass --coordinator_address=HOST:PORT "
         "--num_processes=N --process_id=I (0 <= I < N) to every process, or none of them "
         "where JAX detects the cluster (TPU pod slice, SLURM).")
  workdir = FLAGS.workdir or default_workdir()
  if not FLAGS.workdir:
    print(f"--workdir not given; using {workdir}", flush=True)
  try:
    report = methods.train_and_evaluate(FLAGS.config, workdir)
  except (ConfigError, checkpointing.NoIntactCheckpointError, checkpointing.CheckpointWriteError,
          lock.LockError) as e:
    fail(str(e))
  except (loop.NonFiniteLossError, geometry.NonFiniteError) as e:
    fail(str(e), NONFINITE_EXIT_CODE)
  except OSError as e:
    if e.errno not in (errno.ENOSPC, errno.EFBIG, errno.EDQUOT, errno.EROFS):
      raise
    fail(f"cannot write {e.filename or workdir} ({e.strerror}): free disk space (or raise the "
         "file size limit) and rerun the same command to resume from the last checkpoint")
  except KeyboardInterrupt:  # Ctrl-C outside a training step (or a second one while saving).
    print(f"error: interrupted (Ctrl-C) outside a training step: nothing was saved now; rerun "
          f"the same command to resume {workdir} from its last checkpoint", file=sys.stderr,
          flush=True)
    if jax.process_count() > 1:
      os._exit(loop.INTERRUPTED_EXIT_CODE)  # Not into jax.distributed's shutdown barrier.
    sys.exit(loop.INTERRUPTED_EXIT_CODE)
  except jax.errors.JaxRuntimeError as e:
    if jax.process_count() == 1:
      raise
    # A collective failed: another process died or is unreachable. Exit now; the normal exit
    # would wait in jax.distributed's shutdown barrier for the dead process.
    print(f"error: process {jax.process_index()}: a collective with the other processes failed "
          f"({str(e).splitlines()[0][:300]}); another process of the run has probably died. "
          f"Restart all {jax.process_count()} processes with the same command to resume from "
          "the last checkpoint.", file=sys.stderr, flush=True)
    os._exit(LOST_PROCESS_EXIT_CODE)
  summary = {name: report[name] for name in
             ("trained", "random_init", "raw_pixels", "zero_shot", "retrieval", "probe",
              "accuracy", "interface", "baseline_windows")
             if name in report}
  if jax.process_index() == 0:
    print(f"evaluation ({workdir}/eval.json): {summary}", flush=True)


def run() -> None:
  """The console script `embedspace-train` (the same as `python -m embedspace.main`)."""
  cli.usage_from(__doc__, __name__)
  flags.mark_flags_as_required(["config"])
  app.run(main, flags_parser=parse_flags)


if __name__ == "__main__":
  run()
