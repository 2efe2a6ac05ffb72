"""What the small command lines (`embed`, `search`) share: one-line errors and exit code 2.

Bad input (a flag, a file, a workdir) ends the process with one line `error: ...` on stderr and
exit code 2, as `python -m embedspace.main` does, never with a traceback.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from typing import NoReturn

BAD_INPUT_EXIT_CODE = 2


def fail(message: str, code: int = BAD_INPUT_EXIT_CODE) -> NoReturn:
  """Prints `error: message` as one line to stderr and exits with `code`."""
  print(f"error: {' '.join(str(message).split())}", file=sys.stderr, flush=True)
  sys.exit(code)


def parse_flags(argv: Sequence[str]) -> list[str]:
  """absl's flag parsing, with an unknown, missing or mistyped flag as one line and exit 2."""
  from absl import flags

  try:
    args = flags.FLAGS(list(argv))
  except flags.Error as e:
    fail(f"{e} (see --help)")
  if not flags.FLAGS["verbosity"].present:  # Library INFO lines (TPU probing, TFDS) are noise here.
    from absl import logging
    logging.set_verbosity(logging.WARNING)
  return args
