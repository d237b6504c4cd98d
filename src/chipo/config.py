"""Typed run configuration: dataclasses with help text and validation, read from YAML plus ``key=value`` overrides.

``load_config(PreferenceConfig, "run.yaml", ["loss=chipo", "beta=0.05"])`` reads the YAML file, applies the
overrides (values parsed as YAML scalars: ``beta=0.05`` is a float, ``lora=true`` a bool, ``r_max=null`` None),
coerces every value to the field's declared type and runs the dataclass's ``__post_init__`` validation. Any problem
is a ``ConfigError`` with one clear line (unknown key with the closest valid name, wrong type, invalid value).
On the command line ``cli_overrides`` also reads ``--key value`` / ``--key=value`` and ``--flag`` / ``--no-flag``
(the style of ``HfArgumentParser`` and TRL's scripts), so every command takes all three.

Trainer configs are ``transformers.TrainingArguments`` subclasses (as TRL's ``DPOConfig`` is), so every
TrainingArguments option is a config key. Values are coerced against the dataclass type hints here rather than
through ``HfArgumentParser``'s argparse, because YAML already gives typed values (None, dicts such as
``lr_scheduler_kwargs``, lists) that argparse would have to re-parse from strings; validation is the dataclass's
own ``__post_init__`` either way. Floats must be finite (``learning_rate=nan`` would silently train nothing).

YAML files are read strictly: UTF-8 (a BOM is fine), a mapping at the top, no duplicate keys (the last one would
silently win) and no anchors/aliases (a 267-byte alias bomb expands to hundreds of MB).
"""

from __future__ import annotations

import dataclasses
import difflib
import enum
import math
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

import yaml

MAX_CONFIG_BYTES = 1 << 20  # a config file is a few KB; refuse to parse anything absurd

TRUE_WORDS = ("true", "yes", "on", "1")  # what a bool key reads as true/false (YAML 1.1's words, and 1/0)
FALSE_WORDS = ("false", "no", "off", "0")


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
        enums = [a for a in args if isinstance(a, type) and issubclass(a, enum.Enum)]
        if enums and isinstance(value, str):  # e.g. optim: OptimizerNames | str -- only the enum's values are valid
            return _coerce(value, enums[0], key).value
        errors = []
        for arg in (a for a in args if a is not type(None)):
            try:
                return _coerce(value, arg, key)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if errors else f"{key}: invalid value {value!r}")
    if isinstance(annotation, type) and issubclass(annotation, enum.Enum):
        try:
            return annotation(value)
        except ValueError:
            valid = ", ".join(str(m.value) for m in annotation)
            raise ConfigError(f"{key}: invalid value {value!r}; valid: {valid}") from None
    if origin is list:
        (inner,) = typing.get_args(annotation)
        items = value if isinstance(value, list) else [v for v in str(value).split(",") if v]
        return [_coerce(v, inner, key) for v in items]
    if annotation is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in TRUE_WORDS + FALSE_WORDS:
            return value.lower() in TRUE_WORDS
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
            number = float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{key}: expected a number, got {value!r}") from None
        if not math.isfinite(number):
            raise ConfigError(f"{key}: expected a finite number, got {value!r}")
        return number
    if annotation is dict or origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        return value
    if annotation is str:
        if isinstance(value, bool):  # YAML 1.1 reads an unquoted no/yes/off/on as a boolean
            return "no" if value is False else "yes"
        if value is None or isinstance(value, (dict, list)):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return str(value)
    return value


class _StrictLoader(yaml.SafeLoader):
    """SafeLoader that rejects duplicate keys and anchors/aliases (see the module docstring)."""

    def compose_node(self, parent, index):  # noqa: D102 -- called for every node
        if self.check_event(yaml.AliasEvent):
            raise ConfigError("YAML aliases (*name) are not supported in chipo configs")
        event = self.peek_event()
        if getattr(event, "anchor", None):
            raise ConfigError("YAML anchors (&name) are not supported in chipo configs")
        return super().compose_node(parent, index)

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise ConfigError(f"duplicate key {key!r} (line {key_node.start_mark.line + 1})")
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def parse_yaml(text: str) -> Any:
    """Strict YAML (module docstring); ``ConfigError`` on any problem."""
    try:
        return yaml.load(text, Loader=_StrictLoader)  # noqa: S506 -- a SafeLoader subclass
    except yaml.YAMLError as e:
        raise ConfigError(f"invalid YAML ({str(e).splitlines()[0]})") from None


def parse_overrides(overrides: list[str]) -> dict[str, Any]:
    """``["a=1", "b=x"]`` -> ``{"a": 1, "b": "x"}`` with YAML scalar parsing of each value."""
    out: dict[str, Any] = {}
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"override {item!r} is not of the form key=value")
        key = key.strip()  # a key given twice on the command line: the last one wins, as in a shell override
        try:
            out[key] = parse_yaml(raw) if raw != "" else ""
        except ConfigError:
            out[key] = raw
    return out


def cli_overrides(argv: list[str], cls: type, passthrough: tuple[str, ...] = ("config",)) -> list[str]:
    """Command-line tokens in any of the usual styles -> ``key=value`` tokens for ``cls``'s keys.

    Accepted: ``key=value`` (chipo's style), ``--key value`` and ``--key=value`` (argparse's, HfArgumentParser's and
    TRL's), ``-`` or ``_`` in names; for a bool key ``--key`` (true), ``--no-key`` / ``--no_key`` (false) and
    ``--key true|false|yes|no|on|off|1|0``. A bool key followed by any other token is the bare flag, so
    ``--lora --beta 0.1`` sets lora and beta. ``--NAME`` / ``--NAME=...`` for a name in ``passthrough`` (options
    the command itself declares, e.g. ``--config``), ``-h`` and ``--help`` are returned unchanged; a dotted
    ``--section.key value`` becomes ``section.key=value`` (a command's nested sections check their own keys). An
    unknown ``--key`` is a ``ConfigError`` naming the closest valid key.
    """
    hints = typing.get_type_hints(cls)
    names = {f.name for f in config_fields(cls)}
    renamed = dict(getattr(cls, "RENAMED_KEYS", {}))
    bools = {n for n in names if hints[n] is bool or set(typing.get_args(hints[n])) == {bool, type(None)}}
    bools |= {old for old, new in renamed.items() if new in bools}
    out: list[str] = []
    i = 0
    while i < len(argv):
        token, following = argv[i], argv[i + 1] if i + 1 < len(argv) else None
        i += 1
        if not token.startswith("--") or token == "--":
            out.append(token)
            continue
        name, sep, value = token[2:].partition("=")
        key = name.replace("-", "_")
        if name == "help" or key in passthrough:
            out.append(token)
            if key in passthrough and not sep and following is not None:  # its value travels with it
                out.append(following)
                i += 1
        elif sep:
            out.append(f"{key}={value}")
        elif key in bools:
            if following is not None and following.lower() in TRUE_WORDS + FALSE_WORDS:
                out.append(f"{key}={str(following.lower() in TRUE_WORDS).lower()}")  # YAML reads a bare 1 as int
                i += 1
            else:
                out.append(f"{key}=true")
        elif key.startswith("no_") and key[3:] in bools:
            out.append(f"{key[3:]}=false")
        elif key in names or key in renamed or "." in key:  # section.key: a nested section's own key
            if following is None:
                raise ConfigError(f"--{name} needs a value (--{name} VALUE, --{name}=VALUE or {key}=VALUE)")
            out.append(f"{key}={following}")
            i += 1
        else:
            raise ConfigError(unknown_key_message(key, sorted(names | set(renamed))))
    return out


def unknown_key_message(key: str, names: list[str]) -> str:
    close = difflib.get_close_matches(key, names, n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    return f"unknown config key {key!r}{hint}; the command's --help lists them"


def config_fields(cls: type) -> list[dataclasses.Field]:
    """The user-settable fields of a config dataclass (init fields, not private)."""
    return [f for f in dataclasses.fields(cls) if f.init and not f.name.startswith("_")]


def build_config(cls: type[T], values: dict[str, Any]) -> T:
    """Instantiate dataclass ``cls`` from a dict, with coercion and one-line errors."""
    hints = typing.get_type_hints(cls)
    names = [f.name for f in config_fields(cls)]
    values = dict(values)
    for old, new in getattr(cls, "RENAMED_KEYS", {}).items():  # a field's earlier name still sets it
        if old in values:
            if new in values:
                raise ConfigError(f"{old} and {new} are the same key; give one")
            values[new] = values.pop(old)
    kwargs = {}
    for key, value in values.items():
        if key not in names:
            raise ConfigError(unknown_key_message(key, names))
        kwargs[key] = _coerce(value, hints[key], key)
    missing = [f.name for f in config_fields(cls) if f.name not in kwargs
               and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
    if missing:
        raise ConfigError(f"missing required config key(s): {', '.join(missing)}")
    try:
        return cls(**kwargs)
    except ConfigError:
        raise
    except (ValueError, TypeError, ImportError) as e:
        raise ConfigError(" ".join(str(e).split())) from None


def read_yaml_mapping(path: str | Path | None) -> dict[str, Any]:
    """A YAML config file as a dict ({} for None); one-line ``ConfigError`` when missing or malformed."""
    if path is None:
        return {}
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file not found: {p}")
    raw = p.read_bytes()
    if len(raw) > MAX_CONFIG_BYTES:
        raise ConfigError(f"{p}: {len(raw)} bytes is too large for a config file")
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise ConfigError(f"{p}: not UTF-8 text (byte {e.start}); a config file is YAML text") from None
    if "\x00" in text:
        raise ConfigError(f"{p}: binary file; a config file is YAML text")
    try:
        loaded = parse_yaml(text) or {}
    except ConfigError as e:
        raise ConfigError(f"{p}: {e}") from None
    if not isinstance(loaded, dict):
        raise ConfigError(f"{p}: expected a mapping of key: value")
    return loaded


def load_config(cls: type[T], path: str | Path | None = None, overrides: list[str] | None = None) -> T:
    """Read ``path`` (YAML mapping, optional), apply ``key=value`` overrides, build and validate ``cls``."""
    values = read_yaml_mapping(path)
    values.update(parse_overrides(overrides or []))
    return build_config(cls, values)


def _type_name(annotation: Any) -> str:
    args = typing.get_args(annotation)
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        names = []
        for arg in args:
            name = "str" if isinstance(arg, type) and issubclass(arg, enum.Enum) else _type_name(arg)
            if name not in names:
                names.append(name)
        return " | ".join(names)
    if annotation is type(None):
        return "null"
    if args:
        return str(annotation).replace("typing.", "")
    if isinstance(annotation, type) and issubclass(annotation, enum.Enum):
        return "str"
    return getattr(annotation, "__name__", str(annotation))


def _default_text(f: dataclasses.Field) -> str:
    if f.default is not dataclasses.MISSING:
        value = f.default.value if isinstance(f.default, enum.Enum) else f.default
        return f"default: {value!r}"
    if f.default_factory is not dataclasses.MISSING:
        return f"default: {f.default_factory()!r}"
    return "required"


def config_help(cls: type, groups: dict[str, type] | None = None) -> str:
    """One block per field: name, type, default and help text (for ``--help``).

    ``groups`` (title -> class) lists the fields declared by each class under its title, in order, and the rest
    (for a TrainingArguments subclass: every TrainingArguments option) last, under "other options".
    """
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in config_fields(cls)}
    listed = cls.help_keys() if hasattr(cls, "help_keys") else None  # a config may refuse keys: those are not listed
    if listed is not None:
        fields = {name: f for name, f in fields.items() if name in listed}

    def block(names: list[str]) -> list[str]:
        out = []
        for name in names:
            f = fields[name]
            help_text = " ".join(str(f.metadata.get("help", "")).split())
            out.append(f"  {name} ({_type_name(hints[name])}, {_default_text(f)})\n      {help_text}")
        return out

    if not groups:
        return "\n".join(block(list(fields)))
    lines, done = [], set()
    for title, owner in groups.items():
        names = [n for n in getattr(owner, "__annotations__", {}) if n in fields and n not in done]
        if names:
            lines += [f"{title}:", *block(names)]
            done.update(names)
    rest = [n for n in fields if n not in done]
    if rest:
        title = ("other options (transformers.TrainingArguments keys this command reads; others are refused):"
                 if listed is not None else "other options (transformers.TrainingArguments; all work as keys here):")
        lines += [title, *block(rest)]
    return "\n".join(lines)


def to_dict(config: Any) -> dict[str, Any]:
    """A plain dict of the config (``TrainingArguments.to_dict`` where present: enums as values, tokens redacted)."""
    if hasattr(config, "to_dict"):
        return config.to_dict()
    return dataclasses.asdict(config)


def dump_yaml(config: Any) -> str:
    return yaml.safe_dump(to_dict(config), sort_keys=False)
