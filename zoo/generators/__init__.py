"""Generator families; importing this package registers them."""

from zoo.generators.dit import DiT, DiTConfig
from zoo.generators.mfdit import MFDiT, MFDiTConfig

__all__ = ["DiT", "DiTConfig", "MFDiT", "MFDiTConfig"]
