"""One YAML config, a section per step; every key has a default, unknown keys are errors.

Each step defines its section as a dataclass in its own module (one line of doc per field);
this module maps section names to those classes, loads YAML and builds typed, validated configs.
Nested dataclasses (e.g. ``finetune.reward``) are built recursively.
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

import yaml

from grade.errors import ConfigError

T = TypeVar("T")

#: section name -> "module:Class" of its dataclass (imported lazily: sections stay independent).
SECTIONS: dict[str, str] = {
    "simulator": "grade.simulator:SimulatorConfig",
    "features": "grade.features:FeaturesConfig",
    "pretrain": "grade.pretrain:PretrainConfig",
    "finetune": "grade.grpo:FinetuneConfig",
    "evaluate": "grade.evaluation:EvaluateConfig",
    "promote": "grade.promotion:PromoteConfig",
    "outcome": "grade.value_model:ValueModelConfig",
    "business": "grade.business:BusinessConfig",
}


def section_class(name: str) -> type:
    if name not in SECTIONS:
        raise ConfigError(f"unknown config section '{name}'; expected one of {sorted(SECTIONS)}")
    module, cls = SECTIONS[name].split(":")
    return getattr(importlib.import_module(module), cls)


def load_yaml(path: str | Path | None) -> dict[str, Any]:
    """Read a config file (local path or s3:// URI); None or an empty file give {}."""
    if path is None:
        return {}
    path = str(path)
    if path.startswith("s3://"):
        from grade import store

        text = store.read_bytes(path).decode()
    else:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"{path}: config file not found")
        text = p.read_text()
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of sections at the top level, got {type(data).__name__}")
    for name in data:
        if name not in SECTIONS:
            raise ConfigError(f"{path}: unknown config section '{name}'; expected one of {sorted(SECTIONS)}")
    return data


def build(cls: type[T], values: dict[str, Any] | None, where: str = "") -> T:
    """Build dataclass ``cls`` from a mapping, rejecting unknown keys and mistyped values."""
    values = {} if values is None else values
    if not isinstance(values, dict):
        raise ConfigError(f"{where or cls.__name__}: expected a mapping, got {type(values).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - set(fields))
    if unknown:
        raise ConfigError(f"{where or cls.__name__}: unknown key(s) {unknown}; known keys: {sorted(fields)}")
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for key, value in values.items():
        kwargs[key] = _coerce(hints[key], value, f"{where}.{key}" if where else key)
    return cls(**kwargs)


def _coerce(tp: Any, value: Any, where: str) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if dataclasses.is_dataclass(tp):
        return build(tp, value, where)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(a, value, where)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if errors else f"{where}: invalid value {value!r}")
    if origin is typing.Literal:
        if value not in args:
            raise ConfigError(f"{where}: expected one of {list(args)}, got {value!r}")
        return value
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        inner = args[0] if args else Any
        out = [_coerce(inner, v, f"{where}[{i}]") for i, v in enumerate(value)]
        return tuple(out) if origin is tuple else out
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        vt = args[1] if args else Any
        return {k: _coerce(vt, v, f"{where}.{k}") for k, v in value.items()}
    if tp is Any:
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: expected true/false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where}: expected a string, got {value!r}")
        return value
    return value


def load_section(path: str | Path | None, name: str, overrides: dict[str, Any] | None = None):
    """Load and validate one section of the config file (all sections are validated)."""
    data = load_yaml(path)
    for other, values in data.items():
        build(section_class(other), values, other)
    merged = dict(data.get(name) or {})
    merged.update({k: v for k, v in (overrides or {}).items() if v is not None})
    return build(section_class(name), merged, name)


def to_dict(cfg: Any) -> dict[str, Any]:
    """A JSON-ready dict of a config dataclass (logged next to every output)."""
    return json.loads(json.dumps(dataclasses.asdict(cfg), default=str))
