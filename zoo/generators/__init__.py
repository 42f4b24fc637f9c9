"""Generator families; importing this package registers them."""

from zoo.generators.dit import DiT, DiTConfig

__all__ = ["DiT", "DiTConfig"]
