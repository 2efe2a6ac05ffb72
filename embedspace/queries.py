"""What `python -m embedspace.search` does with an embeddings file, as functions.

`run_query` prints (and draws) the nearest rows to a query given as a row, an id, an image or a
recording file, or a caption (embedded by the model the file's sidecar names, through
`embedspace.methods.load` or `multimodal.space`); `run_class_map` draws the class similarity map.
The search itself is `embedspace.space.search` (exact `top_k` under every measure). The command
line (`embedspace/search.py`) parses its flags without importing any of this, so `--help` is
fast.
"""

from __future__ import annotations

import json
import os
import sys
import time
from typing import Any

import jax.numpy as jnp
import numpy as np

from embedspace import geometry
from embedspace import methods
from embedspace.measure import plots
from embedspace.multimodal import space as space_lib
from embedspace.space import inputs
from embedspace.space.search import class_similarity, fit_measure, nearest_classes, top_k


MAX_PICTURED = 32
"""Neighbours drawn in a query's picture (all `k` are printed); thousands would take minutes."""

def _resolve_query(emb: Any, query: str | None, *, workdir: str | None, resize: bool,
                   text: str | None = None
                   ) -> tuple[int | None, np.ndarray, np.ndarray | None, str]:
  """`(row or None, vector [d], image or None, description)` of a `--query` or `--query_text`."""
  model_dir = workdir or emb.meta.get("model", {}).get("workdir")
  if text is not None or (query is not None and os.path.isfile(query)
                          and space_lib.is_multimodal_workdir(model_dir)):
    if not space_lib.is_multimodal_workdir(model_dir):
      raise ValueError(f"--query_text needs a multimodal model (CLIP, ImageBind, DeCUR): "
                       f"{emb.path} was made by {model_dir or 'no named model'}; pass "
                       "--workdir=DIR of one.")
    space = space_lib.load(model_dir, batch_size=1)
    vector, description = space_lib.embed_query(space, text=text, path=query)
    if vector.shape != emb.embeddings.shape[1:]:
      raise ValueError(f"{model_dir} gives {vector.shape[0]}-d vectors, the file holds "
                       f"{emb.embeddings.shape[1]}-d ones; pass the --workdir that made it.")
    image = None
    if text is None and not query.lower().endswith(".wav"):
      image = inputs.read_image(query, channels=1)
    return None, vector, image, description
  rows = {str(i): r for r, i in enumerate(emb.ids)} if emb.ids.dtype.kind in "US" else {}
  if query.isdigit() or query in rows:
    row = int(query) if query.isdigit() else rows[query]
    if not 0 <= row < len(emb.embeddings):
      raise ValueError(f"--query={query}: the file has rows 0 to {len(emb.embeddings) - 1}.")
    return row, emb.embeddings[row], None, f"row {row} (id {emb.ids[row]})"
  if not os.path.isfile(query):
    raise ValueError(f"--query={query} is neither a row number, an id of the file, nor an "
                     "image file.")
  workdir = workdir or emb.meta.get("model", {}).get("workdir")
  if not workdir:
    raise ValueError(f"{emb.path} names no model to embed {query} with; pass --workdir=DIR.")
  model = methods.load(workdir, batch_size=1)
  image = inputs.read_image(query, channels=model.channels)
  output = emb.meta.get("output", "encoder")
  vector = model.embed([image], output=output, resize=resize)[0]
  if vector.shape != emb.embeddings.shape[1:]:
    raise ValueError(f"the model's {output} gives {vector.shape[0]}-d vectors, the file holds "
                     f"{emb.embeddings.shape[1]}-d ones; pass the --workdir that made it.")
  return None, vector, image, os.path.basename(query)


def note_nonfinite(emb: Any) -> np.ndarray:
  """Which rows of `emb` are finite; the count of the others goes to stderr (they are never
  returned or measured).

  Raises:
    ValueError: no row is finite.
  """
  finite = np.all(np.isfinite(emb.embeddings), axis=1)
  bad = len(finite) - int(finite.sum())
  if bad == len(finite):
    raise ValueError(f"none of the {len(finite)} embeddings in {emb.path} is finite (NaN or "
                     "inf): the model that made them diverged; embed again with a good one.")
  if bad:
    print(f"note: {bad} of {len(finite)} embeddings in {emb.path} are not finite (NaN or inf; "
          f"first: row {int(np.flatnonzero(~finite)[0])}); they are left out.", file=sys.stderr)
  return finite


def plot_neighbours(query: np.ndarray | None, query_caption: str, images: list[np.ndarray],
                    captions: list[str], title: str, path: str) -> str:
  """The query image and its neighbours in a row (uint8 `[H, W, C]` each); returns `path`."""
  plt = plots.pyplot()

  panels = [(query, query_caption)] + list(zip(images, captions))
  fig, axes = plt.subplots(1, len(panels), figsize=(1.3 * len(panels), 1.9), squeeze=False)
  for ax, (image, caption) in zip(axes[0], panels):
    if image is not None:
      gray = image.shape[-1] == 1
      ax.imshow(image[..., 0] if gray else image, cmap="gray" if gray else None)
    ax.set_title(caption, fontsize=6)
    ax.axis("off")
  axes[0][0].set_title(query_caption, fontsize=6, color="tab:red")
  fig.suptitle(title, fontsize=7)
  fig.tight_layout()
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  fig.savefig(path, dpi=150)
  plt.close(fig)
  return path


def run_query(emb: Any, query: str | None, *, k: int, measure: str, png: str | None = None,
              workdir: str | None = None, resize: bool = False, text: str | None = None,
              normalize: bool = False) -> dict[str, Any]:
  """Prints the `k` nearest rows of `emb` to `query` and draws them (see the module docstring).

  `query` is a row number, an id of the file or a file (an image; for a file made by a
  multimodal model also a `.wav` recording); `text` (with `query=None`) is a caption, embedded by
  the multimodal model's text encoder: a search across modalities. `normalize` scales the query
  and every key to unit length first: across modalities, whose embeddings have different norms,
  it makes the distances usable (README, "Searching across modalities").

  Returns:
    `{"rows", "ids", "labels", "values", "png"}` of the neighbours (the query row itself is left
    out); "png" is None when the source images cannot be read (a note says why).

  Raises:
    ValueError: an unknown measure, a query that is neither a row, an id nor an image file, or
      an image the model cannot take; as `embedspace.load` for an image query.
  """

  row, vector, image, description = _resolve_query(emb, query, workdir=workdir, resize=resize,
                                                   text=text)
  if not np.all(np.isfinite(vector)):
    raise ValueError(f"the embedding of the query {description} is not finite (NaN or inf): it "
                     "has no neighbours under any measure.")
  keys = emb.embeddings
  finite = note_nonfinite(emb)
  if normalize:
    keys = np.asarray(geometry.l2_normalize(jnp.asarray(keys)))
    vector = np.asarray(geometry.l2_normalize(jnp.asarray(vector)))
  others = int(finite.sum()) - (row is not None)
  if k > others:
    print(f"note: --k={k} is more than the {others} other rows with finite embeddings; showing "
          "all of them.", file=sys.stderr)
  started = time.perf_counter()
  fitted = fit_measure(keys[finite], measure=measure)  # Non-finite keys never shape the fit.
  values, indices = top_k(vector[None], keys, measure=fitted,
                          k=min(k + (row is not None), len(keys)))
  seconds = time.perf_counter() - started
  # -1: a slot without a finite key (never a row: index -1 would be the last one).
  hits = [(int(j), float(v)) for j, v in zip(indices[0], values[0]) if j >= 0 and j != row][:k]
  names = emb.class_names
  label = lambda r: names[emb.labels[r]] if 0 <= emb.labels[r] < len(names) else "-"
  print(f"{len(hits)} nearest of {len(keys)} to {description} under {measure} "
        f"({seconds:.2f} s, exact):")
  print(f"{'rank':>4}  {'row':>7}  {'value':>9}  label  id")
  for rank, (r, v) in enumerate(hits, start=1):
    print(f"{rank:>4}  {r:>7}  {v:>9.4f}  {label(r)}  {emb.ids[r]}")
  result = {"rows": [r for r, _ in hits], "ids": [emb.ids[r].item() for r, _ in hits],
            "labels": [int(emb.labels[r]) for r, _ in hits], "values": [v for _, v in hits],
            "png": None}
  if emb.meta.get("model", {}).get("modality", "image") != "image":
    return result  # recordings and captions: the printed ids say what they are
  try:
    channels = emb.meta.get("model", {}).get("channels", 3)
    items = inputs.reopen(emb.meta.get("source", {}), channels=channels)
    pictures = [np.asarray(items.read(r, r + 1)[0][0]) for r, _ in hits[:MAX_PICTURED]]
    if row is not None:
      image = np.asarray(items.read(row, row + 1)[0][0])
  except (FileNotFoundError, ValueError, KeyError, ImportError) as e:
    print(f"note: no picture: the images of {emb.path} cannot be read ({e}).", file=sys.stderr)
    return result
  picture = lambda x: None if x is None else x[..., None] if x.ndim == 2 else x  # noqa: E731
  caption = f"query\n{label(row)}" if row is not None else f"query\n{description}"
  name = "text" if query is None else os.path.basename(query)
  png = png or f"{os.path.splitext(emb.path)[0]}_query_{name}.png"
  model = emb.meta.get("model", {})
  title = (f"{measure} neighbours, {model.get('method', '?')} {emb.meta.get('output', '?')} "
           f"({os.path.basename(model.get('workdir', '?'))}, step {model.get('step', '?')})")
  result["png"] = plot_neighbours(
      picture(image), caption, [picture(p) for p in pictures],
      [f"{label(r)}\n{v:.4g}" for r, v in hits[:MAX_PICTURED]], title,
      os.path.splitext(png)[0] + ".png")
  print(f"picture: {result['png']}")
  return result


def run_class_map(emb: Any, path: str, *, measure: str, max_points: int = 4000,
                  top: int = 3) -> dict[str, Any]:
  """Writes the class similarity heatmap to `path` and `<path>.json`, prints the nearest classes.

  Raises:
    ValueError: on an unknown measure or a file without labels.
  """

  names = emb.class_names
  num_classes = max(len(names), int(emb.labels.max(initial=-1)) + 1)
  names = tuple(names) + tuple(str(c) for c in range(len(names), num_classes))
  note_nonfinite(emb)  # class_similarity leaves them out
  matrix, used = class_similarity(emb.embeddings, emb.labels, measure=measure,
                                  num_classes=num_classes, max_points=max_points)
  nearest = nearest_classes(matrix, measure=measure, top=top)
  path = os.path.splitext(os.path.abspath(path))[0] + ".png"
  os.makedirs(os.path.dirname(path), exist_ok=True)
  plots.plot_class_similarity({emb.meta.get("output", "embeddings"): matrix}, names, path,
                               measure=measure)
  record = {"measure": measure, "points": used, "class_names": list(names),
            "matrix": [[None if not np.isfinite(v) else float(v) for v in r] for r in matrix],
            "nearest": {names[i]: [names[j] for j in js] for i, js in enumerate(nearest)}}
  with open(os.path.splitext(path)[0] + ".json", "w", encoding="utf-8") as f:
    json.dump(record, f, indent=1)
  print(f"mean {measure} between classes ({used} points); nearest classes:")
  print(f"| class | within | nearest {top} |\n|---|---|---|")
  for i, js in enumerate(nearest):
    near = ", ".join(f"{names[j]} ({matrix[i, j]:.3f})" for j in js)
    print(f"| {names[i]} | {matrix[i, i]:.3f} | {near} |")
  print(f"picture: {path}, numbers: {os.path.splitext(path)[0]}.json")
  return record
