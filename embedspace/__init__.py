"""embedspace: learning and measuring embedding spaces in JAX/Flax.

`embedspace.load(workdir)` returns a trained model ready to embed raw images
(`embedspace.inference.load`); it is imported on first use, so `import embedspace` stays cheap.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
  from embedspace.inference import load

__version__ = "0.1.0"
__all__ = ["load"]


def __getattr__(name: str) -> Any:
  if name == "load":
    from embedspace.inference import load as load_fn  # jax, flax, orbax: seconds to import.
    return load_fn
  raise AttributeError(f"module 'embedspace' has no attribute {name!r}")
