"""One YAML config, a section per step; every key has a default, unknown keys are errors.

Each step defines its section as a dataclass in its own module (one line of doc per field);
this module maps section names to those classes, loads YAML, applies command-line overrides and
builds typed, validated configs: the one place where configuration is checked. Numeric fields
declare their range with :func:`ranged`; :func:`build` checks every key's type and range (nested
dataclasses included) and then calls the class's ``validate()`` hook, if any, for checks that need
more than one field. Keys that several steps must agree on (``SHARED``) are defined once in the
``shared`` section; the old per-section names stay accepted as aliases (docs/pipeline.md).
"""

from __future__ import annotations

import argparse
import ast
import copy
import dataclasses
import importlib
import inspect
import json
import math
import re
import textwrap
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

import yaml

from grade.core import cli
from grade.core.errors import ConfigError

T = TypeVar("T")

#: The registry's model name unless a config names another (grade.model.registry's default too).
DEFAULT_MODEL = "grade-mtf"

#: section name -> "module:Class" of its dataclass (imported lazily: sections stay independent).
SECTIONS: dict[str, str] = {
    "shared": "grade.core.config:SharedConfig",
    "simulator": "grade.data.simulator:SimulatorConfig",
    "features": "grade.data.features:FeaturesConfig",
    "pretrain": "grade.train.pretrain:PretrainConfig",
    "finetune": "grade.train.grpo:FinetuneConfig",
    "evaluate": "grade.evaluate.evaluation:EvaluateConfig",
    "promote": "grade.release.promotion:PromoteConfig",
    "outcome": "grade.value.value_model:ValueModelConfig",
    "business": "grade.value.business:BusinessConfig",
}


# ------------------------------------------------------------------------------------------------
# Declared ranges of numeric fields
# ------------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Bounds:
    """An interval of accepted numbers; ``text`` is how it was declared (and how errors show it)."""

    low: float
    high: float
    low_open: bool
    high_open: bool
    text: str

    def contains(self, value: float) -> bool:
        if math.isnan(value):
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


def ranged(default: Any, bounds: str) -> Any:
    """A dataclass field whose numbers (the value, or each element of a list / value of a mapping)
    must lie in ``bounds``; a list or dict default is copied per instance."""
    meta = {"bounds": parse_bounds(bounds)}
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
        raise ConfigError(f"{where}: expected a value {bounds.text}, got {value!r}")


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


# ------------------------------------------------------------------------------------------------
# Keys shared by several sections
# ------------------------------------------------------------------------------------------------

@dataclasses.dataclass
class SharedConfig:
    exposure_depth: int = ranged(10, ">= 1")
    """E: items exposed per request, for every step (training reward and validation, evaluation, the
    simulator's headroom report)"""
    model_name: str = DEFAULT_MODEL
    """registry model name: the one promotion gates and whose production model is the incumbent"""

    def validate(self) -> None:
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.\-]*", self.model_name):
            raise ConfigError(f"shared.model_name: expected letters, digits, '.', '_' or '-', "
                              f"got {self.model_name!r}")


#: shared.<key> -> the per-section keys that are accepted aliases of it (they all get its value).
SHARED: dict[str, tuple[str, ...]] = {
    "exposure_depth": ("simulator.exposure_depth", "pretrain.exposure_depth", "finetune.exposure_depth",
                       "evaluate.exposure_depth"),
    "model_name": ("promote.model_name", "evaluate.registry_model_name"),
}


def _shared_names(dotted: str) -> tuple[str, ...] | None:
    """Every name of the shared key ``dotted`` is one of (shared.<key> first), or None."""
    for key, aliases in SHARED.items():
        names = (f"shared.{key}", *aliases)
        if dotted in names:
            return names
    return None


def _resolve_shared(data: dict[str, Any]) -> None:
    """Give every alias of each shared key one value; names given in ``data`` must agree."""
    hints = typing.get_type_hints(SharedConfig)
    for key, aliases in SHARED.items():
        names = [n for n in (f"shared.{key}", *aliases) if n.split(".")[0] in SECTIONS]
        given: list[tuple[str, Any]] = []
        for name in names:
            section, field = name.split(".")
            values = data.get(section)
            if isinstance(values, dict) and field in values:
                given.append((name, _coerce(hints[key], values[field], name)))
        for name, value in given[1:]:
            if value != given[0][1]:
                first, first_value = given[0]
                raise ConfigError(f"{name}: {value!r} disagrees with {first}: {first_value!r} "
                                  f"(one shared value, shared.{key}; give it once)")
        if not given:
            continue
        for name in names:
            section, field = name.split(".")
            values = data.get(section) or {}
            if isinstance(values, dict):  # a non-mapping section is reported when it is built
                data[section] = {**values, field: given[0][1]}


# ------------------------------------------------------------------------------------------------
# Loading and building
# ------------------------------------------------------------------------------------------------

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


def load_yaml(path: str | Path | None) -> dict[str, Any]:
    """Read a config file (local path or s3:// URI); None or an empty file give {}."""
    if path is None:
        return {}
    path = str(path)
    if path.startswith("s3://"):
        from grade.core import store

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
        raise ConfigError(f"{path}: expected a mapping of sections at the top level, "
                          f"got {type(data).__name__}")
    for name in data:
        if name not in SECTIONS:
            raise ConfigError(f"{path}: unknown config section '{name}'; expected one of {sorted(SECTIONS)}")
    return data


def build(cls: type[T], values: dict[str, Any] | None, where: str = "") -> T:
    """Build dataclass ``cls`` from a mapping: unknown keys, mistyped values and values outside a
    field's declared range are errors naming ``where.key``; then the ``validate()`` hook runs."""
    where = where or section_name(cls)
    values = {} if values is None else values
    if not isinstance(values, dict):
        raise ConfigError(f"{where}: expected a mapping of keys, got {type(values).__name__} {values!r}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - set(fields))
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {unknown}; known keys: {sorted(fields)}")
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


def set_key(data: dict[str, Any], dotted: str, value: Any) -> None:
    """Set ``section.key[.key...]`` in raw config ``data`` (a shared key under every one of its names)."""
    parts = dotted.split(".")
    if len(parts) < 2 or not all(parts):
        raise ConfigError(f"--set {dotted}=...: expected section.key[.key...]=VALUE")
    if parts[0] not in SECTIONS:
        raise ConfigError(f"--set {dotted}=...: unknown config section '{parts[0]}'; expected one of "
                          f"{sorted(SECTIONS)}")
    for name in _shared_names(dotted) or (dotted,):
        if name.split(".")[0] not in SECTIONS:
            continue
        node = data
        *path, last = name.split(".")
        for i, part in enumerate(path):
            child = node.get(part)
            if not isinstance(child, dict):
                if child is not None:
                    raise ConfigError(f"{'.'.join(path[:i + 1])}: expected a mapping of keys, got {child!r}")
                child = {}
            node[part] = child = dict(child)
            node = child
        node[last] = value


def load(path: str | Path | None, overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    """Every section, built and validated: the YAML file, then ``overrides`` (dotted key -> value,
    applied in order; None values are skipped). Returns section name -> config dataclass."""
    data = load_yaml(path)
    file_names = {section: dict(values) for section, values in data.items() if isinstance(values, dict)}
    _resolve_shared({**data, **file_names})  # the file's own aliases must agree
    data = {**data, **file_names}
    for dotted, value in (overrides or {}).items():
        if value is not None:
            set_key(data, dotted, value)
    _resolve_shared(data)
    return {name: build(section_class(name), data.get(name), name) for name in SECTIONS}


def load_section(path: str | Path | None, name: str, overrides: dict[str, Any] | None = None):
    """Load and validate one section of the config file (all sections are validated);
    ``overrides``: key of that section -> value (None = not given)."""
    return load(path, {f"{name}.{k}": v for k, v in (overrides or {}).items()})[name]


def to_dict(cfg: Any) -> dict[str, Any]:
    """A JSON-ready dict of a config dataclass (logged next to every output)."""
    return json.loads(json.dumps(dataclasses.asdict(cfg), default=str))


# ------------------------------------------------------------------------------------------------
# Command line: --config, --set section.key=VALUE and flags derived from the dataclass fields
# ------------------------------------------------------------------------------------------------

def field_docs(cls: type) -> dict[str, str]:
    """Field name -> the one-line doc under it in the class body (attribute docstrings)."""
    tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    body = tree.body[0].body  # type: ignore[attr-defined]
    docs = {}
    for node, following in zip(body, body[1:], strict=False):
        if (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)
                and isinstance(following, ast.Expr) and isinstance(following.value, ast.Constant)):
            docs[node.target.id] = " ".join(str(following.value.value).split())
    return docs


def _field(dotted: str) -> tuple[dataclasses.Field, Any, str]:
    """(field, its type, its doc) of ``section.key[.key...]``."""
    section, *keys = dotted.split(".")
    cls = section_class(section)
    for i, key in enumerate(keys):
        tp = typing.get_type_hints(cls)[key]
        if i < len(keys) - 1:
            cls = tp
    field = {f.name: f for f in dataclasses.fields(cls)}[keys[-1]]
    return field, tp, field_docs(cls).get(keys[-1], "")


def parse_bool(text: str) -> bool:
    if text.lower() in ("true", "1", "yes"):
        return True
    if text.lower() in ("false", "0", "no"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def parse_value(text: str) -> Any:
    """A command-line value read like a YAML value (``3``, ``1e-3``, ``true``, ``[64, 32]``, ``null``)."""
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def parse_setting(text: str) -> tuple[str, Any]:
    """``section.key=VALUE`` -> (dotted key, value)."""
    dotted, sep, value = text.partition("=")
    if not sep or "." not in dotted:
        raise argparse.ArgumentTypeError(f"expected section.key=VALUE, got {text!r}")
    return dotted.strip(), parse_value(value)


def add_arguments(parser: argparse.ArgumentParser, keys: tuple[str, ...] = (),
                  renamed: dict[str, str] | None = None, config_help: str = "") -> None:
    """Add ``--config YAML``, repeatable ``--set section.key=VALUE`` and one flag per dotted key in
    ``keys`` (``--<key with dashes>`` without the section, or the name ``renamed`` gives it), whose
    help, type and choices come from the dataclass field. :func:`from_args` reads them back."""
    parser.add_argument("--config", metavar="YAML", help=config_help or "config file (local path or s3://)")
    parser.add_argument("--set", dest="config_settings", action="append", default=[], type=parse_setting,
                        metavar="SECTION.KEY=VALUE",
                        help="override one config key, e.g. finetune.reward.post=0 (repeatable; read like a "
                             "YAML value, checked like one; applied after the file, before the flags below)")
    flags: dict[str, str] = {}
    for dotted in keys:
        field, tp, doc = _field(dotted)
        default_name = "--" + dotted.split(".", 1)[1].replace(".", "-").replace("_", "-")
        name = (renamed or {}).get(dotted) or default_name
        dest = "config_flag_" + name.lstrip("-").replace("-", "_")
        kwargs: dict[str, Any] = {"dest": dest, "help": f"{doc} ({dotted})", "type": parse_value,
                                  "metavar": cli.metavar(name, tp)}
        if tp is bool:
            kwargs.update(type=parse_bool, metavar="true|false")
        elif tp is str:
            kwargs.update(type=str)
        elif typing.get_origin(tp) is typing.Literal:
            kwargs.update(type=str, choices=list(typing.get_args(tp)))
        parser.add_argument(name, **kwargs)
        flags[dest] = dotted
    parser.set_defaults(config_flags=flags)


def from_args(args: argparse.Namespace) -> dict[str, Any]:
    """Every section from the arguments :func:`add_arguments` added: the YAML file, then each
    ``--set`` in order, then the flags that were given."""
    overrides = dict(args.config_settings)
    for dest, dotted in args.config_flags.items():
        if getattr(args, dest) is not None:
            overrides.pop(dotted, None)
            overrides[dotted] = getattr(args, dest)
    return load(args.config, overrides)
