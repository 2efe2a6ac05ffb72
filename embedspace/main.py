"""Command line: train and evaluate an embedding model from an ml_collections config.

  python -m embedspace.main --config=configs/vicreg.py [--workdir=DIR] [--config.KEY=VALUE ...]

Several processes (TPU hosts, GPU nodes, or localhost) start with the arguments of
`jax.distributed.initialize`: --coordinator_address=HOST:PORT --num_processes=N --process_id=I.
Without them, a TPU pod slice or a SLURM job is detected by JAX; elsewhere the run is one process.
Exit codes: 0 done, 2 bad input (one line `error: ...` names it and the fix; nothing is written),
3 non-finite loss (the last good checkpoint is kept), 69 another process of a multi-process run
failed (restart all of them with the same command to resume from the last checkpoint), 75
preempted (SIGTERM; a checkpoint of the step in progress was written: rerun the same command to
resume).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence
from typing import NoReturn

from absl import app
from absl import flags
from ml_collections import config_flags

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


def fail(message: str, code: int = BAD_INPUT_EXIT_CODE) -> NoReturn:
  """Prints `error: message` as one line to stderr and exits with `code`."""
  print(f"error: {' '.join(message.split())}", file=sys.stderr, flush=True)
  sys.exit(code)


def parse_flags(argv: Sequence[str]) -> list[str]:
  """absl's flag parsing, with any mistake in a flag or the config file as one line and exit 2."""
  try:
    args = FLAGS(list(argv))
    FLAGS.config.keys()  # A file that failed to load raises on first use: make that here.
  except Exception as e:  # Any error here comes from what the user typed.
    from embedspace.core.config_checks import describe_flag_error  # After parsing: --help fast.
    fail(describe_flag_error(e, argv))
  return args


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    fail(f"unexpected arguments {argv[1:]}; flags take the form --name=value")
  import jax  # After flag parsing, so --help is fast.

  from embedspace import methods, parallel
  from embedspace.core import checkpointing, loop
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
  except (ConfigError, checkpointing.NoIntactCheckpointError) as e:
    fail(str(e))
  except loop.NonFiniteLossError as e:
    fail(str(e), NONFINITE_EXIT_CODE)
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
  flags.mark_flags_as_required(["config"])
  app.run(main, flags_parser=parse_flags)


if __name__ == "__main__":
  run()
