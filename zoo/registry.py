"""Names -> builders for generators, tokenizers, objectives and datasets (timm-style).

A registry entry ties a name (``"dit-s/2"``) to a builder (usually a class), the typed config
dataclass the builder takes, and the defaults that make this name what it is (depth, width, ...).
``create_model("dit-s/2", depth=2)`` validates the override against the config's fields and builds.

Modules that define components register them with the decorators below; :func:`_load_builtins`
imports them on first use so that ``import zoo.registry`` stays light.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import importlib
from collections.abc import Callable
from typing import Any

from zoo.config import ConfigError, build_config, suggest

KINDS = ("generator", "tokenizer", "objective", "dataset")

# Modules whose import registers the built-in components.
_BUILTIN_MODULES = (
    "zoo.generators",
    "zoo.tokenizers",
    "zoo.diffusion",
    "zoo.data",
)


@dataclasses.dataclass(frozen=True)
class Entry:
    """One registered component."""

    kind: str
    name: str
    builder: Callable[..., Any]
    config_cls: type
    defaults: dict[str, Any]
    description: str = ""

    def make_config(self, overrides: dict[str, Any] | None = None, where: str = ""):
        """The config of this entry: its defaults with ``overrides`` applied and type-checked."""
        return build_config(self.config_cls, {**self.defaults, **(overrides or {})}, where=where)

    def build(self, config=None, **extra):
        """Build the component from a config made by :meth:`make_config`."""
        return self.builder(config if config is not None else self.make_config(), **extra)


_REGISTRY: dict[str, dict[str, Entry]] = {kind: {} for kind in KINDS}
_loaded = False


def _load_builtins() -> None:
    global _loaded
    if not _loaded:
        _loaded = True
        for module in _BUILTIN_MODULES:
            importlib.import_module(module)


def register(kind: str, name: str, *, config: type, defaults: dict[str, Any] | None = None,
             description: str = "") -> Callable:
    """Decorator: register ``builder(config, **extra)`` under ``kind``/``name``."""
    if kind not in KINDS:
        raise ValueError(f"unknown registry kind {kind!r}; choose one of {KINDS}")

    def decorator(builder):
        known = {f.name for f in dataclasses.fields(config)}
        bad = set(defaults or {}) - known
        if bad:
            raise ValueError(f"{kind} {name!r}: defaults {sorted(bad)} are not fields of {config.__name__}")
        if name in _REGISTRY[kind] and _REGISTRY[kind][name].builder is not builder:
            raise ValueError(f"{kind} {name!r} is registered twice")
        _REGISTRY[kind][name] = Entry(kind, name, builder, config, dict(defaults or {}), description)
        return builder

    return decorator


def register_generator(name, *, config, defaults=None, description=""):
    return register("generator", name, config=config, defaults=defaults, description=description)


def register_tokenizer(name, *, config, defaults=None, description=""):
    return register("tokenizer", name, config=config, defaults=defaults, description=description)


def register_objective(name, *, config, defaults=None, description=""):
    return register("objective", name, config=config, defaults=defaults, description=description)


def register_dataset(name, *, config, defaults=None, description=""):
    return register("dataset", name, config=config, defaults=defaults, description=description)


def get_entry(kind: str, name: str, where: str = "") -> Entry:
    """The entry registered as ``name``; a :class:`ConfigError` suggesting the closest name otherwise."""
    _load_builtins()
    entries = _REGISTRY[kind]
    if name not in entries:
        prefix = f"{where}: " if where else ""
        raise ConfigError(f"{prefix}{name!r} is not a registered {kind}{suggest(name, entries)} "
                          f"(see `zoo-train --list-models`)")
    return entries[name]


def list_entries(kind: str, pattern: str = "*") -> list[str]:
    _load_builtins()
    return sorted(n for n in _REGISTRY[kind] if fnmatch.fnmatch(n, pattern))


def list_models(pattern: str = "*") -> list[str]:
    """Registered generator names matching a shell-style ``pattern`` (``"dit*"``)."""
    return list_entries("generator", pattern)


def create_model(name: str, **overrides):
    """Build generator ``name`` with its registered defaults and ``overrides`` for config fields.

    ``objective=`` may pass an objective object for families that use one.
    """
    extra = {k: overrides.pop(k) for k in ("objective",) if k in overrides}
    entry = get_entry("generator", name)
    return entry.build(entry.make_config(overrides, where=name), **extra)


def create_tokenizer(name: str, **overrides):
    entry = get_entry("tokenizer", name)
    return entry.build(entry.make_config(overrides, where=name))


def create_objective(name: str, **overrides):
    entry = get_entry("objective", name)
    return entry.build(entry.make_config(overrides, where=name))


def create_dataset(name: str, **overrides):
    entry = get_entry("dataset", name)
    return entry.build(entry.make_config(overrides, where=name))
