"""Search an embeddings file: exact top-k under every measure, and the class similarity map.

  python -m embedspace.search --embeddings=FILE.npz --query=17 --k=10 --measure=cosine
  python -m embedspace.search --embeddings=FILE.npz --query=shoe.png --measure=mahalanobis
  python -m embedspace.search --embeddings=FILE.npz --class_map=classes.png --measure=euclidean
  python -m embedspace.search --embeddings=FILE.npz --faiss_index=FILE.faiss --measure=cosine
  python -m embedspace.search --embeddings=IMAGES.npz --query_text="the number seven"  # multimodal

The search itself is `embedspace.space.search` (exact `top_k` under every measure, fitted to
the keys; `class_similarity`); what this command does with it is `embedspace.queries`. A query
given as a row prints its neighbours and draws them from the images the file was made from (the
sidecar's `source`); a query given as an image file is embedded with the model the sidecar
names. Exit codes: 0 done, 2 bad input.
"""

from __future__ import annotations

import os
from typing import Any

from embedspace.core import cli
from embedspace.core.cli import fail
from embedspace.space import store  # numpy only: --help stays fast
from embedspace.space.measures import EXTRA_MEASURES, MEASURES  # no JAX: --help stays fast


def main(argv: list[str]) -> None:
  from absl import flags

  if len(argv) > 1:
    fail(f"unexpected arguments {argv[1:]}; flags take the form --name=value")
  f = flags.FLAGS
  if f.query is None and f.query_text is None and not f.class_map and not f.faiss_index:
    fail("nothing to do: pass --query=ROW_OR_FILE, --query_text=CAPTION, --class_map=OUT.png "
         "or --faiss_index=OUT.faiss")
  if f.query is not None and f.query_text is not None:
    fail("pass --query or --query_text, not both")
  if f.measure not in MEASURES + EXTRA_MEASURES:
    fail(f"--measure={f.measure}: valid measures are {', '.join(MEASURES + EXTRA_MEASURES)}")
  if f.k < 1:
    fail(f"--k={f.k}: must be >= 1")
  if f.max_points < 2:
    fail(f"--max_points={f.max_points}: must be >= 2 (a class map averages pairs of points)")
  _check_outputs(f)
  from embedspace import queries  # After flag parsing: JAX and the models, seconds to import.
  from embedspace.core import console
  from embedspace.space import faiss_index
  from embedspace.space import image as image_space

  try:
    emb = store.load_embeddings(f.embeddings)
    rows, dim = emb.embeddings.shape
    print(f"searching {f.embeddings} ({rows} x {dim}) on {console.where()}", flush=True)
    if f.query is not None or f.query_text is not None:
      queries.run_query(emb, f.query, k=f.k, measure=f.measure, png=f.png, workdir=f.workdir,
                        resize=f.resize, text=f.query_text, normalize=f.normalize)
    if f.class_map:
      queries.run_class_map(emb, f.class_map, measure=f.measure, max_points=f.max_points)
    if f.faiss_index:
      path = faiss_index.build(emb.embeddings, measure=f.measure).save(f.faiss_index)
      print(f"faiss index of {len(emb.embeddings)} vectors ({f.measure}): {path} (+ .json)")
  except (*image_space.LOAD_ERRORS, ValueError, ImportError) as e:
    fail(str(e))


def _check_outputs(f: Any) -> None:
  """Fails (one line) when an output flag names a directory, a device, the embeddings file or
  its sidecar: pictures and indexes may replace earlier ones, never an input."""
  inputs = {os.path.abspath(f.embeddings), store.sidecar_path(os.path.abspath(f.embeddings))}
  stem = lambda p: os.path.splitext(os.path.abspath(p))[0]  # noqa: E731
  written = {"png": lambda p: [stem(p) + ".png"],
             "class_map": lambda p: [stem(p) + ".png", stem(p) + ".json"],
             "faiss_index": lambda p: [os.path.abspath(p), os.path.abspath(p) + ".json"]}
  for flag, paths in written.items():
    value = f[flag].value
    for path in paths(value) if value else []:
      if os.path.isdir(path):
        fail(f"--{flag}={value}: {path} is a directory; pass a file path")
      if os.path.exists(path) and not os.path.isfile(path):
        fail(f"--{flag}={value}: {path} is not a regular file (a device, pipe or socket)")
      if path in inputs:
        fail(f"--{flag}={value} would replace {path}, an input of this command; pass another "
             "path")


def _define_flags() -> None:
  from absl import flags
  flags.DEFINE_string("embeddings", None, "An embeddings file (.npz from embedspace.embed).")
  flags.DEFINE_string("query", None, "A row number, an id of the file, or an image file (or a "
                      ".wav recording, for a file of a multimodal model).")
  flags.DEFINE_string("query_text", None, "A caption as the query (a multimodal model's text "
                      "encoder): search images or recordings by words.")
  flags.DEFINE_integer("k", 10, "Neighbours to show.")
  flags.DEFINE_bool("normalize", False, "Scale the query and the embeddings to unit length "
                    "first (across modalities, whose norms differ).")
  flags.DEFINE_string("measure", "cosine", f"One of {', '.join(MEASURES + EXTRA_MEASURES)}.")
  flags.DEFINE_string("png", None, "Picture of the query and its neighbours (default beside "
                      "the embeddings file).")
  flags.DEFINE_string("workdir", None, "Model for an image query (default: the sidecar's).")
  flags.DEFINE_bool("resize", False, "Resize an image query of another size (central square).")
  flags.DEFINE_string("class_map", None, "Write the class similarity heatmap here (+ .json).")
  flags.DEFINE_integer("max_points", 4000, "Points of the class map (a seeded subset).")
  flags.DEFINE_string("faiss_index", None, "Write the embeddings as a faiss index here.")
  flags.mark_flag_as_required("embeddings")


def run() -> None:
  """The console script `embedspace-search` (the same as `python -m embedspace.search`)."""
  cli.run_app(main, _define_flags, __doc__, __name__)


if __name__ == "__main__":
  run()
