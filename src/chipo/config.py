"""Typed run configuration: dataclasses with help text and validation, read from YAML plus ``key=value`` overrides.

``load_config(TrainConfig, "run.yaml", ["loss=chipo", "beta=0.05"])`` reads the YAML file, applies the overrides
(values parsed as YAML scalars: ``beta=0.05`` is a float, ``lora=true`` a bool, ``r_max=null`` None), coerces every
value to the field's declared type and runs the dataclass's ``__post_init__`` validation. Any problem is a
``ConfigError`` with one clear line (unknown key with the closest valid name, wrong type, invalid value).
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

import yaml


class ConfigError(ValueError):
    """A configuration problem, reported as one line."""


T = TypeVar("T")


def _field(default: Any, help: str, **kwargs: Any) -> Any:
    return dataclasses.field(default=default, metadata={"help": help}, **kwargs)


def _coerce(value: Any, annotation: Any, key: str) -> Any:
    """Coerce a YAML-parsed value to ``annotation`` (str, int, float, bool, Optional/union of those, list[str])."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(annotation)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in (a for a in args if a is not type(None)):
            try:
                return _coerce(value, arg, key)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if errors else f"{key}: invalid value {value!r}")
    if origin is list:
        (inner,) = typing.get_args(annotation)
        items = value if isinstance(value, list) else [v for v in str(value).split(",") if v]
        return [_coerce(v, inner, key) for v in items]
    if annotation is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "yes", "no", "1", "0"):
            return value.lower() in ("true", "yes", "1")
        raise ConfigError(f"{key}: expected true/false, got {value!r}")
    if annotation is int:
        if isinstance(value, bool) or not isinstance(value, (int, str, float)):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        try:
            as_float = float(value)
        except ValueError:
            raise ConfigError(f"{key}: expected an integer, got {value!r}") from None
        if not as_float.is_integer():
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        return int(as_float)
    if annotation is float:
        if isinstance(value, bool):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        try:
            return float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{key}: expected a number, got {value!r}") from None
    if annotation is str:
        if isinstance(value, bool):  # YAML 1.1 reads an unquoted no/yes/off/on as a boolean
            return "no" if value is False else "yes"
        if value is None or isinstance(value, (dict, list)):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return str(value)
    return value


def parse_overrides(overrides: list[str]) -> dict[str, Any]:
    """``["a=1", "b=x"]`` -> ``{"a": 1, "b": "x"}`` with YAML scalar parsing of each value."""
    out: dict[str, Any] = {}
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"override {item!r} is not of the form key=value")
        try:
            out[key.strip()] = yaml.safe_load(raw) if raw != "" else ""
        except yaml.YAMLError:
            out[key.strip()] = raw
    return out


def build_config(cls: type[T], values: dict[str, Any]) -> T:
    """Instantiate dataclass ``cls`` from a dict, with coercion and one-line errors."""
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in values.items():
        if key not in names:
            close = difflib.get_close_matches(key, names, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ConfigError(f"unknown config key {key!r}{hint}; the command's --help lists them")
        kwargs[key] = _coerce(value, hints[key], key)
    missing = [f.name for f in dataclasses.fields(cls) if f.name not in kwargs
               and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
    if missing:
        raise ConfigError(f"missing required config key(s): {', '.join(missing)}")
    try:
        return cls(**kwargs)
    except ConfigError:
        raise
    except (ValueError, TypeError) as e:
        raise ConfigError(str(e)) from None


def read_yaml_mapping(path: str | Path | None) -> dict[str, Any]:
    """A YAML config file as a dict ({} for None); one-line ``ConfigError`` when missing or malformed."""
    if path is None:
        return {}
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file not found: {p}")
    try:
        loaded = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{p}: invalid YAML ({str(e).splitlines()[0]})") from None
    if not isinstance(loaded, dict):
        raise ConfigError(f"{p}: expected a mapping of key: value")
    return loaded


def load_config(cls: type[T], path: str | Path | None = None, overrides: list[str] | None = None) -> T:
    """Read ``path`` (YAML mapping, optional), apply ``key=value`` overrides, build and validate ``cls``."""
    values = read_yaml_mapping(path)
    values.update(parse_overrides(overrides or []))
    return build_config(cls, values)


def config_help(cls: type) -> str:
    """One block per field: name, type, default and help text (for ``--help``)."""
    hints = typing.get_type_hints(cls)
    lines = []
    for f in dataclasses.fields(cls):
        type_name = getattr(hints[f.name], "__name__", None) or str(hints[f.name]).replace("typing.", "")
        optional = type(None) in typing.get_args(hints[f.name])
        required = f.default is dataclasses.MISSING or (f.default is None and not optional)
        default = "required" if required else f"default: {f.default!r}"
        lines.append(f"  {f.name} ({type_name}, {default})\n      {f.metadata.get('help', '')}")
    return "\n".join(lines)


def to_dict(config: Any) -> dict[str, Any]:
    return dataclasses.asdict(config)


def dump_yaml(config: Any) -> str:
    return yaml.safe_dump(to_dict(config), sort_keys=False)
