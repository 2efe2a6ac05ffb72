"""Embed a data set with a trained model: `python -m embedspace.embed --workdir=DIR --data=...`.

  python -m embedspace.embed --workdir=workdirs/vicreg --data=embedded_fashion_mnist:test
  python -m embedspace.embed --workdir=DIR --data=photos/ --resize --out=photos.npz
  python -m embedspace.embed --workdir=DIR --data=images.npy --labels=labels.npy --output=projector
  python -m embedspace.embed --workdir=workdirs/imagebind --modality=audio --data=shipped:eval

`--data` is a dataset name with an optional split, a folder of image files or a `.npy` of uint8
images (`inputs.open_items`). The images stream through the model batch by batch
(`TrainedModel.embed_stream`) into one `.npz` that numpy reads directly (`store`), with a JSON
sidecar naming the model, output, shape and source. Memory holds one batch of images and its
embeddings, whatever the size of the data set. A multimodal workdir (CLIP, ImageBind, DeCUR)
embeds the `--modality` its flag names into the joint space (`multimodal.space`). Exit codes:
0 done, 2 bad input (one line `error: ...`).
"""

from __future__ import annotations

import os
import re
import sys
import time
from typing import TYPE_CHECKING, Any

from embedspace.core import cli
from embedspace.core.cli import fail
from embedspace.space import store  # numpy only: --help stays fast

PRETRAINED_PREFIX = "pretrained:"  # `space.pretrained.PREFIX` (that module imports orbax)

if TYPE_CHECKING:
  from embedspace.space import inputs


def embed_items(model: Any, items: inputs.Items, path: str, *, output: str = "encoder",
                resize: bool = False, progress: bool = True,
                overwrite: bool = True) -> dict[str, Any]:
  """Embeds every item with `model` into the embeddings file `path` (and its sidecar).

  Args:
    model: a `space.image.TrainedModel` (`embedspace.load(workdir)`).
    items: what to embed (`inputs.open_items`).
    path: the `.npz` to write (its folder is created).
    output: "encoder" or "projector".
    resize: resize images of another size than the model's (see `TrainedModel.preprocess`).
    progress: show a progress bar with items/s on stderr.
    overwrite: replace an existing embeddings file at `path` (see `store.check_output`).

  Returns:
    The sidecar record (also in `store.sidecar_path(path)`), with "seconds" and
    "items_per_second".

  Raises:
    ValueError: on an image the model cannot take (wrong channels, size without `resize`,
      dtype), an unknown output, or an empty `items`; the partial file is removed.
  """
  from tqdm import tqdm

  from embedspace.space.image import ImageError

  if not len(items):
    raise ValueError("there is nothing to embed: the data holds no images.")
  started = time.perf_counter()
  meta = {
      "model": {"workdir": model.workdir, "step": model.step, "method": model.config.method,
                "data": model.config.data.name, "image_size": model.image_size,
                "channels": model.channels},
      "output": output, "source": items.source, "class_names": list(items.class_names),
      "preprocessing": {"resize": resize, "mean": list(model.mean), "std": list(model.std)},
  }
  size = model.batch_size
  labels_of = {}  # start row -> labels of the chunks read but not yet written (at most 2)

  def chunks():
    for start in range(0, len(items), size):
      images, labels_of[start] = items.read(start, start + size)
      yield images

  bar = tqdm(total=len(items), unit="img", unit_scale=True, disable=not progress,
             desc=f"embedding ({output})", file=sys.stderr)
  try:
    with store.EmbeddingsWriter(path, num=len(items), dim=model.dim(output), ids=items.ids,
                                meta=meta, overwrite=overwrite) as writer:
      for start, rows in zip(range(0, len(items), size),
                             model.embed_stream(chunks(), output=output, resize=resize)):
        writer.write(rows, labels_of.pop(start))
        bar.update(len(rows))
      seconds = time.perf_counter() - started
      writer.meta.update(seconds=round(seconds, 3),
                         items_per_second=round(len(items) / max(seconds, 1e-9), 1))
  except ImageError as e:  # Name the item: the chunk that failed is the last one read.
    raise ValueError(f"item {items.ids[max(labels_of) + e.index]} {e.reason}") from None
  finally:
    bar.close()
  return {"format": store.FORMAT, "shape": [len(items), model.dim(output)], **writer.meta}


def default_out(workdir: str, data: str, output: str) -> str:
  """`WORKDIR/embeddings/<data>_<output>.npz`, the data spec made a file name; for a space
  shipped in the package (`pretrained:NAME`), `./embeddings/NAME_<data>_<output>.npz` (never
  inside the installed package)."""
  stem = re.sub(r"[^A-Za-z0-9._-]+", "_", os.path.basename(os.path.normpath(data)))
  stem = stem.removesuffix(".npy").strip("_") or "data"
  if workdir.startswith(PRETRAINED_PREFIX):
    name = workdir[len(PRETRAINED_PREFIX):]
    return os.path.abspath(os.path.join("embeddings", f"{name}_{stem}_{output}.npz"))
  return os.path.join(os.path.abspath(workdir), "embeddings", f"{stem}_{output}.npz")


# ----------------------------------------------------------------------------------------------
# Command line.


def main(argv: list[str]) -> None:
  from absl import flags

  from embedspace import methods  # After flag parsing: --help stays fast.
  from embedspace.core import console
  from embedspace.multimodal import space as space_lib
  from embedspace.space import image as inference
  from embedspace.space import inputs

  if len(argv) > 1:
    fail(f"unexpected arguments {argv[1:]}; flags take the form --name=value")
  f = flags.FLAGS
  if f.batch_size < 1:
    fail(f"--batch_size={f.batch_size}: must be >= 1")
  if space_lib.is_multimodal_workdir(f.workdir):
    _embed_multimodal(f)
    return
  if f.modality:
    fail(f"--modality={f.modality}: {f.workdir} is not a multimodal run (CLIP, ImageBind, "
         "DeCUR); its model embeds images only")
  if f.output not in inference.OUTPUTS:
    fail(f"--output={f.output}: valid outputs are {', '.join(inference.OUTPUTS)}")
  out = checked_out(f, default_out(f.workdir, f.data, f.output))
  try:
    model = methods.load(f.workdir, batch_size=f.batch_size)
    items = inputs.open_items(f.data, channels=model.channels, data_dir=f.data_dir,
                              labels=f.labels)
    print(f"embedding {f.data} with {model.workdir} ({model.config.method}, step {model.step}, "
          f"{f.output}) on {console.where()} into {out}", flush=True)
    meta = embed_items(model, items, out, output=f.output, resize=f.resize,
                       progress=f.progress, overwrite=f.overwrite)
  except (*inference.LOAD_ERRORS, ValueError, ImportError) as e:
    fail(str(e))
  print(f"wrote {meta['shape'][0]} embeddings ({meta['shape'][1]}-d, {f.output}, step "
        f"{model.step}) to {out} and {store.sidecar_path(out)} in {meta['seconds']:.1f} s "
        f"({meta['items_per_second']:.0f} items/s)", flush=True)


def checked_out(f: Any, default: str) -> str:
  """The `.npz` that `--out` (or `default`) names, if it may be written (`store.check_output`:
  never an input, a directory, a device or a JSON that is not its sidecar; an existing
  embeddings file only with --overwrite); else the one-line error."""
  try:
    return store.check_output(f.out or default, overwrite=f.overwrite,
                              inputs=[p for p in (f.data, f.labels) if p])
  except ValueError as e:
    fail(f"--out: {e}")


def _embed_multimodal(f: Any) -> None:
  """`main` for a CLIP, ImageBind or DeCUR workdir: one modality into the joint space."""
  from embedspace.core import console  # After flag parsing: --help stays fast.
  from embedspace.multimodal import space as space_lib
  from embedspace.space import image as inference

  if f.modality is None:
    fail(f"--modality: {f.workdir} is a multimodal run; pass --modality=image, audio or text")
  out = checked_out(f, default_out(f.workdir, f"{f.data}_{f.modality}",
                                   "joint"))
  try:
    space = space_lib.load(f.workdir, batch_size=f.batch_size)
    if f.modality not in space.modalities:
      fail(f"--modality={f.modality}: {f.workdir} embeds {', '.join(space.modalities)}; pass "
           "one of them")
    data = space_lib.open_data(space, f.modality, f.data, data_dir=f.data_dir)
    print(f"embedding {f.modality} {f.data} with {space.workdir} (step {space.step}) on "
          f"{console.where()} into {out}", flush=True)
    meta = space_lib.embed_to_file(space, f.modality, data, out, overwrite=f.overwrite)
  except (*inference.LOAD_ERRORS, ValueError, ImportError) as e:
    fail(str(e))
  print(f"wrote {meta['shape'][0]} {f.modality} embeddings ({meta['shape'][1]}-d joint space, "
        f"step {space.step}) to {out} and {store.sidecar_path(out)} in {meta['seconds']:.1f} s "
        f"({meta['items_per_second']:.0f} items/s)", flush=True)


def _define_flags() -> None:
  from absl import flags
  flags.DEFINE_string("workdir", None, "A training workdir (config.json + checkpoints/).")
  flags.DEFINE_string("data", None, "NAME[:SPLIT] (a dataset; split default test), a folder of "
                      "image files, or a .npy of uint8 images [n, H, W(, C)].")
  flags.DEFINE_string("out", None, "The .npz to write (default "
                      "WORKDIR/embeddings/<data>_<output>.npz); the sidecar goes beside it.")
  flags.DEFINE_bool("overwrite", False, "Replace an existing embeddings file at --out (never "
                    "an input, a directory or another JSON).")
  flags.DEFINE_string("output", "encoder", "encoder (features) or projector (embeddings).")
  flags.DEFINE_bool("resize", False, "Take the central square of images of another size, "
                    "resized to the model's (as the evaluation does); without it they are an "
                    "error.")
  flags.DEFINE_string("labels", None, "A .npy of int labels for a .npy of images.")
  flags.DEFINE_string("data_dir", None, "TFDS data dir (default $TFDS_DATA_DIR).")
  flags.DEFINE_integer("batch_size", 256, "Images per forward call.")
  flags.DEFINE_bool("progress", True, "Show a progress bar.")
  flags.DEFINE_enum("modality", None, ["image", "audio", "text"], "For a multimodal workdir: "
                    "which encoder (--data=shipped:eval|shipped:train, a .wav folder for audio, "
                    "a .txt of captions for text).")
  flags.mark_flags_as_required(["workdir", "data"])


def run() -> None:
  """The console script `embedspace-embed` (the same as `python -m embedspace.embed`)."""
  cli.run_app(main, _define_flags, __doc__, __name__)


if __name__ == "__main__":
  run()
