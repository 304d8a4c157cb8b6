"""Which dataclass fields are keys; derived and retired fields; old names and their one warning."""

from __future__ import annotations

import copy
import dataclasses
import logging
import typing
from typing import Any

from grade.core.config.fields import SECTIONS, _check_bounds, _coerce, keys, section_class, show
from grade.core.config.shared import DERIVED, _alias_targets
from grade.core.errors import ConfigError

#: old section names -> (new name, renamed nested keys)
SECTION_RENAMES: dict[str, tuple[str, dict[str, str]]] = {"outcome": ("value_model", {"model": "outcome"})}

_WARNED: set[str] = set()
_log = logging.getLogger(__name__)


def _deprecated(old: str, instead: str) -> None:
    """One warning per old name per process."""
    if old not in _WARNED:
        _WARNED.add(old)
        _log.warning("config: %s is an old name, accepted for one release: %s", old, instead)


def _path_fields(dotted: str) -> list[tuple[dataclasses.Field | None, Any]]:
    """(field, type) of each part of ``section.key[.key...]``; a part inside a mapping value has field
    None and the mapping's value type; raises KeyError for an unknown part."""
    section, *parts = dotted.split(".")
    tp: Any = section_class(section)
    out = []
    for part in parts:
        if dataclasses.is_dataclass(tp):
            field = {f.name: f for f in dataclasses.fields(tp)}[part]
            tp = typing.get_type_hints(tp)[part]
            out.append((field, tp))
        elif typing.get_origin(tp) is dict:
            tp = typing.get_args(tp)[1]
            out.append((None, tp))
        else:
            raise KeyError(part)
    return out


def _default(dotted: str) -> Any:
    """The default value of a key (its field's default)."""
    *parent, last = dotted.split(".")
    cls = section_class(parent[0])
    for part in parent[1:]:
        cls = typing.get_type_hints(cls)[part]
    f = {f.name: f for f in dataclasses.fields(cls)}[last]
    return f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]


def _rename_section(parts: list[str]) -> list[str]:
    if parts and parts[0] in SECTION_RENAMES:
        new, nested = SECTION_RENAMES[parts[0]]
        return [new, *([nested.get(parts[1], parts[1])] if len(parts) > 1 else []), *parts[2:]]
    return parts


def _assignments(dotted: str, value: Any) -> list[tuple[str, Any]]:
    """The keys ``dotted`` = ``value`` sets: itself, or (an old name, with a warning) its new keys."""
    parts = dotted.split(".")
    if len(parts) < 2 or not all(parts):
        raise ConfigError(f"{dotted}: expected section.key[.key...]")
    if parts[0] not in SECTIONS and parts[0] not in SECTION_RENAMES:
        raise ConfigError(f"unknown config section '{parts[0]}'; expected one of {sorted(SECTIONS)}")
    new = ".".join(_rename_section(parts))
    try:
        chain = _path_fields(new)
    except KeyError:
        raise _unknown_key(new, dotted) from None
    derived = next((f.metadata["derived"] for f, _ in chain if f is not None and "derived" in f.metadata),
                   None)
    if derived is not None:
        targets = _alias_targets(derived, value)
        names = [f"{k}: {v}" if k.endswith("eta_mode") else k for k, v in targets]
        _deprecated(dotted, f"use {' and '.join(names)}")
        return targets
    if any(f is not None and f.metadata.get("retired") for f, _ in chain):
        _deprecated(dotted, "no longer a key (its default is the only setting the documented tables use); "
                            "the value given still applies in this release")
    elif new != dotted:
        _deprecated(dotted, f"use {new}")
    return [(new, value)]


def _unknown_key(new: str, given: str) -> ConfigError:
    parts = new.split(".")
    for i in range(len(parts) - 1, 0, -1):
        try:
            chain = _path_fields(".".join(parts[:i]))
        except KeyError:
            continue
        tp = chain[-1][1] if chain else section_class(parts[0])
        if dataclasses.is_dataclass(tp):
            where = ".".join(given.split(".")[:i])
            return ConfigError(f"{where}: unknown key(s) ['{parts[i]}']; known keys: {keys(tp)}")
        return ConfigError(f"{'.'.join(given.split('.')[:i])}: expected a mapping of keys, got a value "
                           f"(so {given} is no key)")
    return ConfigError(f"{given}: unknown key")


def _leaves(data: dict[str, Any], origin: str) -> list[tuple[str, Any]]:
    """(dotted name as given, value) of every key in a raw config mapping (nested sections walked)."""
    out: list[tuple[str, Any]] = []
    for section, values in data.items():
        if section not in SECTIONS and section not in SECTION_RENAMES:
            raise ConfigError(f"{origin}unknown config section '{section}'; "
                              f"expected one of {sorted(SECTIONS)}")
        out += _walk(section, values)
    return out


def _walk(where: str, values: Any) -> list[tuple[str, Any]]:
    if values is None:
        return []
    if not isinstance(values, dict):
        raise ConfigError(f"{where}: expected a mapping of keys, got {type(values).__name__} {show(values)}")
    out: list[tuple[str, Any]] = []
    for key, value in values.items():
        dotted = f"{where}.{key}"
        try:
            tp = _path_fields(".".join(_rename_section(dotted.split("."))))[-1][1]
        except KeyError:
            raise _unknown_key(".".join(_rename_section(dotted.split("."))), dotted) from None
        out += _walk(dotted, value) if dataclasses.is_dataclass(tp) else [(dotted, value)]
    return out


def _coerced(target: str, value: Any, origin: str) -> Any:
    """``value`` typed for key ``target`` and checked against its declared range; errors name ``origin``."""
    chain = _path_fields(target)
    value = _coerce(chain[-1][1], value, origin)
    field = chain[-1][0] if chain[-1][0] is not None else chain[-2][0] if len(chain) > 1 else None
    if field is not None and "bounds" in field.metadata and not dataclasses.is_dataclass(chain[-1][1]):
        _check_bounds(field.metadata["bounds"], value, origin)
    return value


def _entry_to_mapping(given: dict[str, tuple[Any, str]], target: str, value: Any) -> tuple[str, Any]:
    """A mapping's entry (``ablation.seeds.pretrain``) as the whole mapping with that entry set."""
    if _path_fields(target)[-1][0] is not None:
        return target, value
    parent, key = target.rsplit(".", 1)
    base = given[parent][0] if parent in given else _default(parent)
    return parent, {**base, key: value}


def _resolve(file_leaves: list[tuple[str, Any]],
             overrides: list[tuple[str, Any]]) -> tuple[dict[str, Any], set[str]]:
    """(dotted key -> value, the keys the overrides set): the file's keys (names of one key must agree),
    then the overrides in order."""
    given: dict[str, tuple[Any, str]] = {}
    overridden: set[str] = set()
    seen: dict[str, tuple[Any, str]] = {}
    for dotted, value in file_leaves:
        for target, v in _assignments(dotted, value):
            v = _coerced(target, v, dotted)
            if target in seen and seen[target][0] != v:
                first, origin = seen[target]
                raise ConfigError(f"{dotted}: {show(v)} disagrees with {origin}: {show(first)} "
                                  f"(one value, {target}; give it once)")
            seen[target] = (v, dotted)
            target, v = _entry_to_mapping(given, target, v)
            given[target] = (v, dotted)
    for dotted, value in overrides:
        for target, v in _assignments(dotted, value):
            target, v = _entry_to_mapping(given, target, _coerced(target, v, dotted))
            given.pop(target, None)
            given[target] = (v, dotted)
            overridden.add(target)
    return {target: v for target, (v, _) in given.items()}, overridden


def _nest(flat: dict[str, Any]) -> dict[str, Any]:
    data: dict[str, Any] = {}
    for dotted, value in flat.items():
        node = data
        *path, last = dotted.split(".")
        for part in path:
            node = node.setdefault(part, {})
        if isinstance(value, dict) and isinstance(node.get(last), dict):
            value = {**value, **node[last]}  # one entry given by itself wins over the whole mapping
        node[last] = copy.deepcopy(value)
    return data


def _derived_values(cls: type, get: Any) -> dict[str, Any]:
    """Nested mapping of the derived fields of ``cls`` (and of its nested dataclasses)."""
    out: dict[str, Any] = {}
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if "derived" in f.metadata:
            source = f.metadata["derived"]
            out[f.name] = DERIVED[source](get) if source in DERIVED else get(source)
        elif dataclasses.is_dataclass(hints[f.name]):
            inner = _derived_values(hints[f.name], get)
            if inner:
                out[f.name] = inner
    return out


def _merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in extra.items():
        out[k] = _merge(out.get(k) or {}, v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out
