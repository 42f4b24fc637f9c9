"""zoo's version, recorded in every config.json and model card (a module of its own, below everything)."""

__version__ = "0.1.0"
