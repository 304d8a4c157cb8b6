"""Typed config fields: declared ranges (:func:`ranged`, :func:`setting`), type coercion and building a
section's dataclass from a mapping (:func:`build`)."""

from __future__ import annotations

import copy
import dataclasses
import importlib
import math
import re
import types
import typing
from typing import Any, TypeVar

from grade.core.errors import ConfigError

T = TypeVar("T")

#: The registry's model name unless a config names another (grade.model.registry's default too).
DEFAULT_MODEL = "grade-mtf"

#: section name -> "module:Class" of its dataclass (imported lazily: sections stay independent).
SECTIONS: dict[str, str] = {
    "shared": "grade.core.config:SharedConfig",
    "simulator": "grade.data.simulator:SimulatorConfig",
    "features": "grade.data.features:FeaturesConfig",
    "value_model": "grade.value.value_model:ValueModelConfig",
    "pretrain": "grade.train.pretrain:PretrainConfig",
    "finetune": "grade.train.grpo:FinetuneConfig",
    "evaluate": "grade.evaluate.evaluation:EvaluateConfig",
    "promote": "grade.release.promotion:PromoteConfig",
    "serve": "grade.release.serving:ServeConfig",
    "business": "grade.value.business:BusinessConfig",
    "ablation": "grade.core.config:AblationConfig",
}



@dataclasses.dataclass(frozen=True)
class Bounds:
    """An interval of accepted numbers; ``text`` is how it was declared (and how errors show it)."""

    low: float
    high: float
    low_open: bool
    high_open: bool
    text: str

    def contains(self, value: float) -> bool:
        if isinstance(value, float) and math.isnan(value):
            return False
        above = value > self.low if self.low_open else value >= self.low
        below = value < self.high if self.high_open else value <= self.high
        return above and below


_INTERVAL = re.compile(r"^([\[(])\s*([^,\s]+)\s*,\s*([^,\s]+)\s*([\])])$")
_COMPARISON = re.compile(r"^(>=|>|<=|<)\s*(\S+)$")


def parse_bounds(text: str) -> Bounds:
    """``"> 0"``, ``">= 1"``, ``"<= 1"`` or an interval ``"[0, 1)"`` (``inf`` allowed) -> Bounds."""
    m = _INTERVAL.match(text.strip())
    if m:
        return Bounds(float(m[2]), float(m[3]), m[1] == "(", m[4] == ")", f"in {text.strip()}")
    m = _COMPARISON.match(text.strip())
    if not m:
        raise ValueError(f"bounds {text!r}: expected '> 0', '>= 1', '<= 1' or an interval like '[0, 1)'")
    op, number = m[1], float(m[2])
    if op.startswith(">"):
        return Bounds(number, math.inf, op == ">", True, f"{op} {m[2]}")
    return Bounds(-math.inf, number, True, op == "<", f"{op} {m[2]}")


def ranged(default: Any, bounds: str, *, derived: str | None = None, retired: bool = False) -> Any:
    """A dataclass field whose numbers (the value, or each element of a list / value of a mapping)
    must lie in ``bounds``; a list or dict default is copied per instance. ``derived``: the field is
    not a key but takes the value of the key (or ``DERIVED`` source) named; ``retired``: not a key,
    a constant (see the module docstring)."""
    return setting(default, derived=derived, retired=retired, bounds=parse_bounds(bounds))


def setting(default: Any, *, derived: str | None = None, retired: bool = False,
            bounds: Bounds | None = None) -> Any:
    """A dataclass field that is derived from another key or retired (see :func:`ranged`)."""
    meta: dict[str, Any] = {} if bounds is None else {"bounds": bounds}
    if derived is not None:
        meta["derived"] = derived
    if retired:
        meta["retired"] = True
    if isinstance(default, (list, dict)):
        return dataclasses.field(default_factory=lambda: copy.deepcopy(default), metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


def _check_bounds(bounds: Bounds, value: Any, where: str) -> None:
    if value is None or isinstance(value, bool):
        return
    if isinstance(value, (list, tuple)):
        for i, v in enumerate(value):
            _check_bounds(bounds, v, f"{where}[{i}]")
    elif isinstance(value, dict):
        for k, v in value.items():
            _check_bounds(bounds, v, f"{where}.{k}")
    elif isinstance(value, (int, float)) and not bounds.contains(value):
        raise ConfigError(f"{where}: expected a value {bounds.text}, got {show(value)}")


def check(cfg: Any, where: str | None = None) -> Any:
    """Check the declared range of every field of a built config (nested dataclasses included), then
    its ``validate()`` hook; returns ``cfg``. Library entry points call it on configs made in code."""
    where = where or section_name(type(cfg))
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if dataclasses.is_dataclass(value):
            check(value, f"{where}.{f.name}")
        elif "bounds" in f.metadata:
            _check_bounds(f.metadata["bounds"], value, f"{where}.{f.name}")
    hook = getattr(cfg, "validate", None)
    if callable(hook):
        hook()
    return cfg


def is_key(f: dataclasses.Field) -> bool:
    """Whether a dataclass field is a config key (not derived from another key, not retired)."""
    return "derived" not in f.metadata and not f.metadata.get("retired")


def keys(cls: type) -> list[str]:
    return [f.name for f in dataclasses.fields(cls) if is_key(f)]
#: longest integer read from YAML (a longer one is refused naming its key, never converted)
MAX_DIGITS = 30


class LongNumber(str):
    """An integer literal of more than MAX_DIGITS digits, kept as text so it is never converted."""

    def __repr__(self) -> str:
        return f"a number of {len(self.lstrip('+-'))} digits"


def show(value: Any) -> str:
    """A value for an error message: its repr, shortened."""
    text = repr(value)
    return text if len(text) <= 200 else text[:200] + f"... ({len(text)} characters)"


def section_class(name: str) -> type:
    if name not in SECTIONS:
        raise ConfigError(f"unknown config section '{name}'; expected one of {sorted(SECTIONS)}")
    module, cls = SECTIONS[name].split(":")
    return getattr(importlib.import_module(module), cls)


def section_name(cls: type) -> str:
    """The section name of a section dataclass (its class name for any other dataclass)."""
    for name, target in SECTIONS.items():
        if target == f"{cls.__module__}:{cls.__qualname__}":
            return name
    return cls.__name__


def build(cls: type[T], values: dict[str, Any] | None, where: str = "") -> T:
    """Build dataclass ``cls`` from a mapping: unknown keys, mistyped values and values outside a
    field's declared range are errors naming ``where.key``; then the ``validate()`` hook runs."""
    where = where or section_name(cls)
    values = {} if values is None else values
    if not isinstance(values, dict):
        raise ConfigError(f"{where}: expected a mapping of keys, got {type(values).__name__} {show(values)}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - set(fields))
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {unknown}; known keys: {keys(cls)}")
    hints = typing.get_type_hints(cls)
    kwargs = {key: _coerce(hints[key], value, f"{where}.{key}") for key, value in values.items()}
    return check(cls(**kwargs), where)


def _number(value: Any, where: str) -> float:
    """A float from a number or a number-like string (YAML 1.1 reads ``1e-3`` as a string)."""
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            pass
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigError(f"{where}: expected a number, got {value!r}")
    return float(value)


def _coerce(tp: Any, value: Any, where: str) -> Any:
    if isinstance(value, LongNumber):
        raise ConfigError(f"{where}: expected a number of at most {MAX_DIGITS} digits, got {value!r}")
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
    if tp is bool and not isinstance(value, bool):
        raise ConfigError(f"{where}: expected true/false, got {value!r}")
    if tp is int and (isinstance(value, bool) or not isinstance(value, int)):
        raise ConfigError(f"{where}: expected an integer, got {value!r}")
    if tp is float:
        return _number(value, where)
    if tp is str and not isinstance(value, str):
        raise ConfigError(f"{where}: expected a string, got {value!r}")
    return value
