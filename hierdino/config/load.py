"""Where a config comes from: dataclass defaults <- a packaged preset or a YAML file (with an
optional ``inherit:`` chain) <- ``--set a.b=c`` overrides, then ``validate``."""

from __future__ import annotations

import dataclasses
import difflib
import os
import typing
from pathlib import Path
from typing import Any

import yaml

from hierdino import packaged
from hierdino.config.convert import _build, _unknown_key
from hierdino.config.schema import Config, ConfigError
from hierdino.config.validate import validate

PRESETS = "hierdino.presets"  # the package that holds the presets


def _set_dotted(raw: dict, dotted: str, value: str) -> None:
    parts = dotted.split(".")
    cls = Config
    node = raw
    for i, part in enumerate(parts):
        fields = {f.name: f for f in dataclasses.fields(cls)}
        prefix = ".".join(parts[:i]) + ("." if i else "")
        if part not in fields:
            raise _unknown_key(prefix, part, list(fields))
        tp = typing.get_type_hints(cls)[part]
        if i == len(parts) - 1:
            if dataclasses.is_dataclass(tp):
                raise ConfigError(f"{dotted}: is a section; set one of its keys, e.g. {dotted}.{dataclasses.fields(tp)[0].name}=...")
            node[part] = value
            return
        if not dataclasses.is_dataclass(tp):
            raise ConfigError(f"{'.'.join(parts[: i + 1])}: is a value, not a section (in override {dotted!r})")
        if not isinstance(node.get(part), dict):
            node[part] = {}
        node = node[part]
        cls = tp


def parse_override(text: str) -> tuple[str, str]:
    if "=" not in text:
        raise ConfigError(f"override {text!r} must look like key.sub=value")
    key, value = text.split("=", 1)
    return key.strip(), value.strip()


def override_text(value: Any) -> str:
    """A value as ``key=value`` override text that loading converts back (``null``, ``[a,b]``, scalars)."""
    if value is None:
        return "null"
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(override_text(v) for v in value) + "]"
    return str(value)


def preset_overrides(preset_or_path: str | Path) -> list[str]:
    """A (partial) preset or YAML file as ``key.sub=value`` overrides, to lay over another config."""
    data, _ = _resolve(preset_or_path)
    out: list[str] = []

    def walk(prefix: str, node: dict) -> None:
        for key, value in node.items():
            if isinstance(value, dict):
                walk(f"{prefix}{key}.", value)
            else:
                out.append(f"{prefix}{key}={override_text(value)}")

    walk("", data)
    return out


def flat_keys(d: dict, prefix: str = "") -> dict:
    """A config dict's leaves as ``{"section.key": value}``."""
    out = {}
    for k, v in d.items():
        out.update(flat_keys(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
    return out


def config_diff(base: Config, cfg: Config) -> list[str]:
    """``key: base -> cfg`` for every leaf key whose value differs (the start block's "changed" list)."""
    a, b = flat_keys(base.to_dict()), flat_keys(cfg.to_dict())
    return [f"{k}: {override_text(a[k])} -> {override_text(b[k])}" for k in b if a.get(k) != b[k]]


def list_presets() -> list[str]:
    return packaged.names(PRESETS)


def _read_source(preset_or_path: str | Path) -> tuple[dict, str]:
    try:
        text, path = packaged.read_text(preset_or_path, PRESETS)
    except FileNotFoundError:
        raise ConfigError(f"config file {preset_or_path} does not exist") from None
    except packaged.NotPackaged:
        close = difflib.get_close_matches(str(preset_or_path), list_presets(), n=3)
        hint = f"; did you mean {', '.join(close)}?" if close else ""
        raise ConfigError(f"unknown preset {preset_or_path!r}{hint} (presets: {', '.join(list_presets())}; "
                          "or give a .yaml path)") from None
    source = path or f"preset {preset_or_path}"
    try:
        data = yaml.safe_load(text) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{source}: not valid YAML: {e}") from e
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: expected a mapping at the top level")
    return data, source


def _merge(base: dict, top: dict) -> dict:
    out = dict(base)
    for k, v in top.items():
        if v is None and isinstance(out.get(k), dict):
            continue  # an empty section (``train:`` with its keys commented out) changes nothing it inherits
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def _identity(preset_or_path) -> str:
    """What a cycle check compares: a file's real path (``a/../a/x.yaml`` is ``a/x.yaml``), a preset's name."""
    p = Path(str(preset_or_path))
    return os.path.realpath(p) if p.is_file() else f"preset:{preset_or_path}"


def _resolve(preset_or_path: str | Path, seen: tuple = ()) -> tuple[dict, str]:
    """Read a preset or file, following an optional ``inherit: <preset or path>`` key."""
    data, source = _read_source(preset_or_path)
    path = source if not source.startswith("preset ") else None
    parent = data.pop("inherit", None)
    if parent is not None:
        if path is not None and not Path(str(parent)).is_absolute():
            beside = Path(path).parent / str(parent)  # a relative parent is read beside the file naming it
            parent = str(beside) if beside.is_file() else parent
        here = _identity(preset_or_path)
        if _identity(parent) in seen + (here,):
            raise ConfigError(f"{source}: 'inherit' cycle through {parent!r}")
        base, _ = _resolve(parent, seen + (here,))
        data = _merge(base, data)
    return data, source


def load_config(preset_or_path: str | Path = "tiny-cpu", overrides: list[str] | dict | None = None) -> Config:
    """Defaults <- preset or YAML file <- overrides (``["a.b=c", ...]`` or ``{"a.b": value}``), validated."""
    raw, _ = _resolve(preset_or_path)
    items = overrides.items() if isinstance(overrides, dict) else [parse_override(o) for o in overrides or []]
    for key, value in items:
        _set_dotted(raw, key, value)
    cfg = _build(Config, raw)
    validate(cfg)
    return cfg


def config_from_dict(data: dict) -> Config:
    cfg = _build(Config, data)
    validate(cfg)
    return cfg
