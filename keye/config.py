"""Typed configs that resolve as defaults <- file <- command-line overrides.

A config is a (nested) dataclass. ``load_config`` starts from its defaults, merges a YAML file (which may say
``extends: other.yaml``: that file's settings, with this file's merged over them), then ``key.sub=value``
overrides, and validates strictly: an unknown key or a value of the wrong type is a
``ConfigError`` naming the dotted key and where it came from. ``save_config`` writes the resolved config
into a run folder so a run can always be reproduced from its own folder (the lingua convention).
"""

from __future__ import annotations

import dataclasses
import os
import types
import typing
from pathlib import Path
from typing import Any, Literal, TypeVar, Union, get_args, get_origin, get_type_hints

import yaml

from keye.errors import ConfigError
from keye.fileio import atomic_write_text

T = TypeVar("T")


def load_config(cls: type[T], path: str | os.PathLike | None = None, overrides: list[str] | None = None) -> T:
    """Build ``cls`` from its defaults, then the YAML file at ``path``, then ``overrides`` (``a.b=value``)."""
    source = str(path) if path is not None else "overrides"
    return from_dict(cls, read_config_data(path, overrides), source=source)


def read_config_data(path: str | os.PathLike | None = None, overrides: list[str] | None = None) -> dict[str, Any]:
    """The YAML file at ``path`` (empty without one) as a mapping, with ``overrides`` (``a.b=value``) set
    in it; nothing validated yet (``from_dict`` does that)."""
    return apply_overrides(_read_yaml(Path(path)) if path is not None else {}, overrides)


def apply_overrides(data: dict[str, Any], overrides: list[str] | None) -> dict[str, Any]:
    """Set each ``a.b=value`` override in ``data`` (values parsed as YAML); returns ``data``."""
    for item in overrides or []:
        key, raw = split_override(item)
        _set_dotted(data, key, yaml.safe_load(raw) if raw.strip() else None)
    return data


def split_override(item: str) -> tuple[str, str]:
    """``"a.b=value"`` -> ``("a.b", "value")``; anything else is a ``ConfigError``."""
    key, sep, raw = item.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"override {item!r}: expected KEY=VALUE, e.g. optim.lr=3e-4")
    return key.strip(), raw


def has_key(cls: type, dotted: str) -> bool:
    """Whether config class ``cls`` takes the dotted key (any key below a mapping-typed field counts; a
    list of sections takes its entries' keys, with or without an index)."""
    tp: Any = cls
    for part in dotted.split("."):
        tp = _optional_inner(tp)
        if get_origin(tp) is list and get_args(tp) and dataclasses.is_dataclass(get_args(tp)[0]):
            tp = get_args(tp)[0]
            if part.isdigit():
                continue
        if get_origin(tp) is dict or tp is Any:
            return True
        if not dataclasses.is_dataclass(tp) or part not in {f.name for f in dataclasses.fields(tp) if f.init}:
            return False
        tp = get_type_hints(tp)[part]
    return True


def _optional_inner(tp: Any) -> Any:
    if get_origin(tp) in (Union, types.UnionType):
        args = [a for a in get_args(tp) if a is not type(None)]
        return args[0] if len(args) == 1 else tp
    return tp


def from_dict(cls: type[T], data: dict[str, Any], source: str = "config", prefix: str = "") -> T:
    """Validate ``data`` against dataclass ``cls`` (unknown keys and wrong types are errors)."""
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: '{prefix.rstrip('.') or '<root>'}' must be a mapping, got {type(data).__name__}")
    hints = get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        known = ", ".join(sorted(fields))
        raise ConfigError(f"{source}: unknown key '{prefix}{unknown[0]}' (known keys here: {known})")
    kwargs = {name: _coerce(hints[name], value, source, f"{prefix}{name}") for name, value in data.items()}
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as err:
        if isinstance(err, ConfigError):
            raise
        raise ConfigError(f"{source}: {prefix or cls.__name__}: {err}") from None


def to_dict(config: Any) -> dict[str, Any]:
    return dataclasses.asdict(config)


def save_config(config: Any, run_dir: str | os.PathLike, name: str = "config.yaml") -> Path:
    """Write the resolved config into ``run_dir`` atomically; returns the file's path."""
    return atomic_write_text(Path(run_dir) / name, yaml.safe_dump(to_dict(config), sort_keys=False))


EXTENDS = "extends"  # a config file's key naming the file whose settings it starts from


def _read_yaml(path: Path, seen: tuple[Path, ...] = ()) -> dict[str, Any]:
    """The mapping in ``path``; with ``extends: other.yaml`` (relative to ``path``'s folder), ``other``'s
    mapping with this one merged over it (``merge_over``), so a file can restate only what it changes."""
    if not path.is_file():
        raise ConfigError(f"config file {path}: not found")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"config file {path}: not valid YAML ({err})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path}: top level must be a mapping, got {type(data).__name__}")
    if EXTENDS not in data:
        return data
    parent = data.pop(EXTENDS)
    if not isinstance(parent, str) or not parent.strip():
        raise ConfigError(f"config file {path}: '{EXTENDS}' must name a config file, got {parent!r}")
    parent_path = path.parent / parent
    chain = (*seen, path.resolve())
    if parent_path.resolve() in chain:
        raise ConfigError(f"config file {path}: '{EXTENDS}: {parent}' leads back to itself "
                          f"({' -> '.join(p.name for p in (*chain, parent_path))})")
    if not parent_path.is_file():
        raise ConfigError(f"config file {path}: '{EXTENDS}: {parent}' not found (looked for {parent_path})")
    return merge_over(_read_yaml(parent_path, chain), data)


def merge_over(base: dict[str, Any], top: dict[str, Any]) -> dict[str, Any]:
    """``base`` with ``top`` merged over it: mappings key by key, any other value (lists too) replaced whole."""
    out = dict(base)
    for key, value in top.items():
        out[key] = merge_over(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def _set_dotted(data: dict[str, Any], key: str, value: Any) -> None:
    """Set ``a.b.c`` in nested mappings. Through a list, a number picks one item (``eval.1.limit``) and
    a name reaches every item (``eval.limit``: the limit of each entry)."""
    _set_parts(data, key.split("."), value, key)


def _set_parts(node: Any, parts: list[str], value: Any, key: str) -> None:
    part, rest = parts[0], parts[1:]
    if isinstance(node, list):
        if part.isdigit():
            if int(part) >= len(node):
                raise ConfigError(f"override {key}: index {part} is past the list's {len(node)} entries")
            targets, rest = [node[int(part)]], rest
        else:
            targets, rest = node, parts
        if not rest:
            raise ConfigError(f"override {key}: give a key inside the list's entries")
        for item in targets:
            _set_parts(item, rest, value, key)
        return
    if not isinstance(node, dict):
        raise ConfigError(f"override {key}: '{part}' is not inside a section")
    if not rest:
        node[part] = value
        return
    _set_parts(node.setdefault(part, {}), rest, value, key)


def _coerce(tp: Any, value: Any, source: str, key: str) -> Any:
    """Check ``value`` against type ``tp``; nested dataclasses recurse; ints widen to floats."""
    origin = get_origin(tp)
    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        args = get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(arg, value, source, key)
            except ConfigError as err:
                errors.append(str(err))
        raise ConfigError(errors[0] if len(errors) == 1 else f"{source}: '{key}': {value!r} matches none of {tp}")
    if origin is Literal:
        if value not in get_args(tp):
            raise ConfigError(f"{source}: '{key}' must be one of {list(get_args(tp))}, got {value!r}")
        return value
    if dataclasses.is_dataclass(tp):
        if dataclasses.is_dataclass(value):
            return value
        return from_dict(tp, value, source=source, prefix=f"{key}.")
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{source}: '{key}' must be a list, got {value!r}")
        args = get_args(tp)
        item_tp = args[0] if args else Any
        items = [_coerce(item_tp, v, source, f"{key}[{i}]") for i, v in enumerate(value)]
        return items if origin is list else tuple(items)
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{source}: '{key}' must be a mapping, got {value!r}")
        key_tp, val_tp = get_args(tp) or (Any, Any)
        return {k: _coerce(val_tp, v, source, f"{key}.{k}") for k, v in value.items()}
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp is float and isinstance(value, str):
        try:  # YAML reads "3e-4" (no dot) as a string
            return float(value)
        except ValueError:
            pass
    if isinstance(tp, type):
        if tp is not bool and isinstance(value, bool) and tp in (int, float):
            raise ConfigError(f"{source}: '{key}' must be {tp.__name__}, got {value!r}")
        if not isinstance(value, tp):
            raise ConfigError(f"{source}: '{key}' must be {tp.__name__}, got {value!r} ({type(value).__name__})")
        return value
    if isinstance(tp, typing.TypeVar):
        return value
    raise ConfigError(f"{source}: '{key}': unsupported config type {tp!r}")
