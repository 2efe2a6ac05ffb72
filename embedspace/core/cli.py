"""What every command line shares: one-line errors, exit code 2, a quiet console.

Bad input (a flag, a file, a workdir) ends the process with one line `error: ...` on stderr and
exit code 2, never with a traceback. Library INFO logging (orbax, TFDS, grain, JAX's backend
probing) is off unless `--verbosity` (absl's flag) is given: `--verbosity=0` shows INFO,
`--verbosity=1` DEBUG too. Warnings always show. Nothing here imports JAX, so `--help` is fast.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence
from typing import NoReturn

from absl import flags
from absl import logging

BAD_INPUT_EXIT_CODE = 2


def fail(message: str, code: int = BAD_INPUT_EXIT_CODE) -> NoReturn:
  """Prints `error: message` as one line to stderr and exits with `code`."""
  print(f"error: {' '.join(str(message).split())}", file=sys.stderr, flush=True)
  sys.exit(code)


def parse_flags(argv: Sequence[str], *, validate: Callable[[], object] | None = None,
                describe: Callable[[Exception], str] | None = None) -> list[str]:
  """absl's flag parsing, with an unknown, missing or mistyped flag as one line and exit 2.

  Args:
    argv: the command line.
    validate: called after parsing (e.g. to load a config file); what it raises is bad input.
    describe: the one-line message for an error of parsing or `validate` (default: absl's);
      with it, any exception is taken as bad input, without it only absl's flag errors.
  """
  try:
    args = flags.FLAGS(list(argv))
    if validate is not None:
      validate()
  except Exception as e:  # noqa: BLE001 - which ones are bad input is decided below.
    if describe is None and not isinstance(e, flags.Error):
      raise
    fail(describe(e) if describe is not None else f"{e} (see --help)")
  quiet_libraries()
  return args


def quiet_libraries() -> None:
  """Library INFO logging off (absl's level WARNING) unless `--verbosity` was given."""
  if not flags.FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)


def usage_from(doc: str | None, module: str) -> None:
  """`--help` shows `doc` (the command's docstring) and the flags `module` defined also under a
  console script such as `embedspace-search`: absl prints the docstring and the flags of the
  `__main__` module, and pip's generated wrapper has neither. Call it after the flags exist."""
  main = sys.modules.get("__main__")
  if main is not None and not main.__doc__:
    main.__doc__ = doc
  if module != "__main__":
    for flag in flags.FLAGS.flags_by_module_dict().get(module, []):
      flags.FLAGS.register_flag_by_module(sys.argv[0], flag)


def run_app(main: Callable[[list[str]], object], define_flags: Callable[[], None],
            doc: str | None, module: str) -> None:
  """A command's console script and `python -m` form: defines its flags (`define_flags`),
  takes `--help` from `doc`, parses with `parse_flags` and runs `main` under absl."""
  from absl import app  # absl's runner: only where a command starts.

  define_flags()
  usage_from(doc, module)
  app.run(main, flags_parser=parse_flags)
