"""Writes the notebooks of experiments/ from their cells (cells_NN.py), and optionally runs them.

  python experiments/build_notebooks.py                       # write the .ipynb files (no outputs)
  python experiments/build_notebooks.py --execute             # ... and run them, outputs saved
  python experiments/build_notebooks.py --header              # new setup cell, outputs kept
  EMBEDSPACE_NOTEBOOK_SIZE=smoke python experiments/build_notebooks.py --execute 01

The sources live in `cells_common.py` (shared) and `cells_NN.py`, so that a change to a notebook
is a reviewable diff of Python strings; the committed .ipynb files hold the outputs of one
`--execute` run at the size its first lines print. Every notebook starts with the same two
cells: the environment (Colab or a local checkout) and the parameters (papermill's `parameters`
tag, or environment variables).
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import tempfile
import time

import nbformat

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)  # the cells_*.py modules, also when this file is imported

from cells_01 import NB01  # noqa: E402
from cells_02 import NB02  # noqa: E402
from cells_03 import NB03  # noqa: E402
from cells_04 import NB04  # noqa: E402

NOTEBOOKS = {
    "01": ("01_distance_measures.ipynb", NB01),
    "02": ("02_train_vicreg_simclr.ipynb", NB02),
    "03": ("03_multimodal_binding.ipynb", NB03),
    "04": ("04_interfaces.ipynb", NB04),
}


def notebook(cells: list[nbformat.NotebookNode]) -> nbformat.NotebookNode:
  nb = nbformat.v4.new_notebook(cells=cells)
  nb.metadata = {
      "kernelspec": {"display_name": "Python 3", "language": "python", "name": "python3"},
      "language_info": {"name": "python"},
      "accelerator": "TPU",  # Colab: the notebook asks for a TPU runtime (any runtime works).
      "colab": {"provenance": []},
  }
  return nb


_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")


def _as_terminal(text: str) -> str:
  """What a terminal shows of `text`: per line, the part after the last carriage return."""
  lines = (_ANSI.sub("", line).rsplit("\r", 1)[-1] for line in text.split("\n"))
  return "\n".join(line for line in lines if line.strip() or not line)


def clean_outputs(nb: nbformat.NotebookNode) -> None:
  """Progress bars as a terminal leaves them (consecutive stream outputs merged, carriage
  returns and cursor moves resolved), and no execution timing metadata."""
  for cell in nb.cells:
    cell.metadata.pop("execution", None)
    if cell.cell_type != "code":
      continue
    merged = []
    for out in cell.outputs:
      if (out.get("output_type") == "stream" and merged
          and merged[-1].get("output_type") == "stream" and merged[-1]["name"] == out["name"]):
        merged[-1]["text"] += out["text"]
      else:
        merged.append(out)
    for out in merged:
      if out.get("output_type") == "stream":
        out["text"] = re.sub(r"\n{3,}", "\n\n", _as_terminal(out["text"]))
    cell.outputs = merged


def execute(nb: nbformat.NotebookNode, *, cwd: str, timeout: int = 1800,
            env: dict[str, str] | None = None) -> None:
  """Runs every cell of `nb` in one fresh kernel started in `cwd`; raises on the first error."""
  from nbclient import NotebookClient
  saved = dict(os.environ)
  os.environ.update(env or {})
  try:
    NotebookClient(nb, timeout=timeout, kernel_name="python3",
                   resources={"metadata": {"path": cwd}}).execute()
  finally:
    os.environ.clear()
    os.environ.update(saved)


def refresh_markdown(path: str, cells: list[nbformat.NotebookNode]) -> nbformat.NotebookNode:
  """The executed notebook at `path` with its Markdown cells replaced by `cells`' Markdown.

  Raises:
    ValueError: if a code cell differs from `cells` (the outputs would not be its outputs).
  """
  nb = nbformat.read(path, as_version=4)
  kinds = lambda cs: [c.cell_type for c in cs]  # noqa: E731
  if kinds(nb.cells) != kinds(cells) or any(
      a.source != b.source for a, b in zip(nb.cells, cells) if a.cell_type == "code"):
    raise ValueError(f"{path}: code cells changed since it was executed; run --execute")
  for old, new in zip(nb.cells, cells):
    if old.cell_type == "markdown":
      old.source = new.source
  return nb


HEADER_CELLS = 3
"""The title, the setup text and the setup code (`cells_common.header`): every notebook's."""


def refresh_header(path: str, cells: list[nbformat.NotebookNode]) -> nbformat.NotebookNode:
  """The executed notebook at `path` with its shared header cells' sources replaced by `cells`'.

  The setup cell's outputs are kept (its change must not change what it prints in a checkout).

  Raises:
    ValueError: if a cell after the header differs from `cells` (run --execute or --markdown).
  """
  nb = nbformat.read(path, as_version=4)
  if [c.cell_type for c in nb.cells] != [c.cell_type for c in cells] or any(
      a.source != b.source for a, b in zip(nb.cells[HEADER_CELLS:], cells[HEADER_CELLS:])):
    raise ValueError(f"{path}: cells after the header changed since it was executed")
  for old, new in zip(nb.cells[:HEADER_CELLS], cells[:HEADER_CELLS]):
    old.source = new.source
  return nb


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("which", nargs="*", default=sorted(NOTEBOOKS), help="01, 02, 03, 04")
  parser.add_argument("--execute", action="store_true", help="run and save outputs")
  parser.add_argument("--markdown", action="store_true",
                      help="only update the Markdown cells of the executed notebooks")
  parser.add_argument("--header", action="store_true",
                      help="only update the shared header cells (title, setup) of the executed "
                      "notebooks, keeping every output")
  args = parser.parse_args()
  for key in args.which:
    filename, cells = NOTEBOOKS[key]
    nb = notebook(cells)
    path = os.path.join(HERE, filename)
    if args.header:
      nb = refresh_header(path, cells)
    elif args.markdown:
      nb = refresh_markdown(path, cells)
    elif args.execute:
      t0 = time.perf_counter()
      try:
        execute(nb, cwd=HERE)
      except Exception:
        failed = os.path.join(tempfile.gettempdir(), filename.replace(".ipynb", ".failed.ipynb"))
        nbformat.write(nb, failed)
        print(f"{filename} failed; the notebook so far is in {failed}", flush=True)
        raise
      clean_outputs(nb)
      print(f"{filename}: executed in {time.perf_counter() - t0:.0f} s", flush=True)
    nbformat.validate(nb)
    nbformat.write(nb, path)
    print(f"wrote {path} ({os.path.getsize(path) / 1e3:.0f} kB)", flush=True)


if __name__ == "__main__":
  sys.exit(main())
