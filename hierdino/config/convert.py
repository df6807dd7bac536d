"""YAML / override values -> typed config: conversion to each field's type, ranges, unknown keys
(with a "did you mean")."""

from __future__ import annotations

import dataclasses
import difflib
import math
import types
import typing
from typing import Any, Literal

import yaml

from hierdino.config.schema import ConfigError


def _unwrap_optional(tp) -> tuple[Any, bool]:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1 and len(typing.get_args(tp)) == 2:
            return args[0], True
    return tp, False


def _type_name(tp) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _convert(key: str, value: Any, tp) -> Any:
    tp, optional = _unwrap_optional(tp)
    if typing.get_origin(tp) is Literal and value in typing.get_args(tp):  # e.g. kind "none" is a value, not null
        return value
    if value is None or (isinstance(value, str) and value.lower() in ("null", "none", "~") and (optional or tp is not str)):
        if optional:
            return None
        raise ConfigError(f"{key}: value is required, got null")
    origin = typing.get_origin(tp)
    if origin is Literal:
        choices = typing.get_args(tp)
        if value not in choices:
            raise ConfigError(f"{key}: {value!r} is not one of {', '.join(map(str, choices))}")
        return value
    if origin is list:
        (item_tp,) = typing.get_args(tp)
        if isinstance(value, str):
            value = yaml.safe_load(value) if value.strip().startswith("[") else [v for v in value.split(",") if v]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list of {_type_name(item_tp)}, got {value!r}")
        return [_convert(f"{key}[{i}]", v, item_tp) for i, v in enumerate(value)]
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "yes", "1", "false", "no", "0"):
            return value.lower() in ("true", "yes", "1")
        raise ConfigError(f"{key}: expected true or false, got {value!r}")
    if tp is int:
        if isinstance(value, bool):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                return int(value.replace("_", ""))
            except ValueError:
                try:
                    f = float(value)
                except ValueError:
                    f = None
                if f is not None and f.is_integer():
                    return int(f)
        raise ConfigError(f"{key}: expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, bool):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        try:
            out = float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{key}: expected a number, got {value!r}") from None
        if not math.isfinite(out):
            raise ConfigError(f"{key}: expected a finite number, got {value!r}")
        return out
    if tp is str:
        if isinstance(value, (dict, list)):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return str(value)
    raise ConfigError(f"{key}: unsupported type {tp}")  # pragma: no cover - a bug in this module


def _check_range(key: str, value: Any, meta: dict) -> None:
    values = value if isinstance(value, list) else [value]
    for v in values:
        if not isinstance(v, (int, float)) or isinstance(v, bool):
            continue
        if meta.get("min") is not None and v < meta["min"]:
            raise ConfigError(f"{key}: {v!r} is out of range: must be >= {meta['min']}")
        if meta.get("max") is not None and v > meta["max"]:
            raise ConfigError(f"{key}: {v!r} is out of range: must be <= {meta['max']}")
        if meta.get("gt") is not None and v <= meta["gt"]:
            raise ConfigError(f"{key}: {v!r} is out of range: must be > {meta['gt']}")


def _unknown_key(prefix: str, key: str, known: list[str]) -> ConfigError:
    full = f"{prefix}{key}"
    close = difflib.get_close_matches(key, known, n=3, cutoff=0.5)
    hint = f"; did you mean {' or '.join(prefix + c for c in close)}?" if close else ""
    return ConfigError(f"unknown config key {full!r}{hint} (known under {prefix.rstrip('.') or 'top level'}: {', '.join(known)})")


def _build(cls, data: dict, prefix: str = ""):
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'}: expected a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for key in data:
        if key not in fields:
            raise _unknown_key(prefix, str(key), list(fields))
    kwargs = {}
    for name, f in fields.items():
        if name not in data:
            continue
        tp = hints[name]
        key = f"{prefix}{name}"
        if dataclasses.is_dataclass(tp):
            kwargs[name] = _build(tp, data[name] if data[name] is not None else {}, key + ".")
        else:
            kwargs[name] = _convert(key, data[name], tp)
            if kwargs[name] is not None:
                _check_range(key, kwargs[name], f.metadata)
    return cls(**kwargs)
