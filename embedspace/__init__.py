"""embedspace: learning and measuring embedding spaces in JAX/Flax.

`embedspace.load(workdir)` returns the space of any finished run, whatever method made it
(`embedspace.methods.load`): a trained image encoder ready to embed raw images, or a multimodal
space with `embed(modality, items)`; `embedspace.load("pretrained:vicreg-fashion-mnist")` loads a
space shipped in the package (`embedspace.list_pretrained()`). Both are imported on first use, so
`import embedspace` stays cheap.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
  from embedspace.methods import load
  from embedspace.space.pretrained import list_pretrained

__version__ = "0.1.0"
__all__ = ["list_pretrained", "load"]


def __getattr__(name: str) -> Any:
  if name == "load":
    from embedspace.methods import load as load_fn  # jax, flax, orbax: seconds to import.
    return load_fn
  if name == "list_pretrained":
    from embedspace.space.pretrained import list_pretrained  # orbax: seconds to import.
    return list_pretrained
  raise AttributeError(f"module 'embedspace' has no attribute {name!r}")
