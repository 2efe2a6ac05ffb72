"""embedspace: learning and measuring embedding spaces in JAX/Flax."""

__version__ = "0.1.0"
