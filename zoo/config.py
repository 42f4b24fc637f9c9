"""Typed configuration dataclasses: build them from loose values with errors a person can act on.

Every configurable part of zoo (generator, tokenizer, objective, dataset, trainer, sampler) is a
dataclass with typed fields.  Values arrive from YAML, from ``key=value`` overrides on the command
line or from Python keyword arguments; :func:`build_config` checks the keys, coerces each value to
the declared type (PyYAML reads ``1e-4`` as a string) and reports the first problem with the key
path that caused it.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from collections.abc import Mapping
from typing import Any


class ConfigError(ValueError):
    """A configuration value is wrong. The message names where (file, key path) and what is allowed."""


def _where(prefix: str, key: str) -> str:
    return f"{prefix}.{key}" if prefix else key


def suggest(name: str, choices) -> str:
    """Return ``"; did you mean 'x'?"`` for the closest of ``choices``, or an empty string."""
    close = difflib.get_close_matches(str(name), [str(c) for c in choices], n=1, cutoff=0.5)
    return f"; did you mean '{close[0]}'?" if close else ""


def coerce(value: Any, annotation: Any, where: str) -> Any:
    """Coerce ``value`` to ``annotation`` (bool, int, float, str, Optional, tuple/list, Literal)."""
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if annotation is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in (a for a in args if a is not type(None)):
            try:
                return coerce(value, arg, where)
            except ConfigError as err:
                errors.append(str(err))
        raise ConfigError(errors[0] if len(errors) == 1 else f"{where}: {value!r} fits none of {annotation}")
    if origin is typing.Literal:
        if value in args:
            return value
        raise ConfigError(f"{where}: {value!r} is not allowed; choose one of {list(args)}{suggest(value, args)}")
    if origin in (tuple, list):
        if isinstance(value, str):
            value = [v.strip() for v in value.strip("[]()").split(",") if v.strip()]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        item_type = args[0] if args else Any
        items = [coerce(v, item_type, f"{where}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin is dict or annotation is dict:
        if not isinstance(value, Mapping):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        return dict(value)
    if annotation is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "yes", "on", "1", "false", "no", "off", "0"):
            return value.lower() in ("true", "yes", "on", "1")
        if isinstance(value, int) and value in (0, 1):
            return bool(value)
        raise ConfigError(f"{where}: expected true or false, got {value!r}")
    if annotation is int:
        if isinstance(value, bool):
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                number = float(value.replace("_", ""))
            except ValueError:
                number = None
            if number is not None and number.is_integer():
                return int(number)
        raise ConfigError(f"{where}: expected an integer, got {value!r}")
    if annotation is float:
        if isinstance(value, bool):
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        if isinstance(value, (int, float)):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{where}: expected a number, got {value!r}")
    if annotation is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(f"{where}: expected a string, got {value!r}")
    return value


def field_choices(cls) -> dict[str, tuple]:
    """Allowed values declared in a dataclass's ``CHOICES`` class attribute (field -> tuple)."""
    return dict(getattr(cls, "CHOICES", {}))


def build_config(cls, values: Mapping[str, Any] | None = None, where: str = "", base=None):
    """Build dataclass ``cls`` from ``values`` (on top of ``base`` if given), coercing and checking.

    Raises :class:`ConfigError` naming ``where.key`` for an unknown key (with the allowed keys), a
    value of the wrong type, or a value outside the field's declared ``CHOICES``.
    """
    values = dict(values or {})
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = [k for k in values if k not in fields]
    if unknown:
        key = unknown[0]
        raise ConfigError(
            f"{_where(where, key)}: unknown key{suggest(key, fields)} (allowed: {', '.join(sorted(fields))})"
        )
    kwargs = dataclasses.asdict(base) if base is not None else {}
    kwargs = {k: v for k, v in kwargs.items() if k in fields}
    choices = field_choices(cls)
    for key, value in values.items():
        coerced = coerce(value, hints[key], _where(where, key))
        if key in choices and coerced not in choices[key]:
            raise ConfigError(
                f"{_where(where, key)}: {coerced!r} is not allowed; choose one of "
                f"{list(choices[key])}{suggest(coerced, choices[key])}"
            )
        kwargs[key] = coerced
    try:
        config = cls(**kwargs)
    except ConfigError as err:
        raise ConfigError(f"{where}: {err}" if where and not str(err).startswith(where) else str(err)) from None
    return config


def config_to_dict(config) -> dict[str, Any]:
    """A JSON/YAML-friendly dict of a config dataclass (tuples become lists)."""

    def plain(value):
        if isinstance(value, (list, tuple)):
            return [plain(v) for v in value]
        if isinstance(value, dict):
            return {k: plain(v) for k, v in value.items()}
        return value

    return {k: plain(v) for k, v in dataclasses.asdict(config).items()}
