"""Loading: bounded YAML, the file's and the command line's values resolved into every section."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import yaml

from grade.core.config.fields import MAX_DIGITS, SECTIONS, LongNumber, build, section_class
from grade.core.config.keys import (
    SECTION_RENAMES,
    _coerced,
    _default,
    _derived_values,
    _leaves,
    _merge,
    _nest,
    _resolve,
)
from grade.core.config.shared import preset_keys
from grade.core.errors import ConfigError

#: a config file larger than this is refused before it is parsed
MAX_CONFIG_BYTES = 1 << 20


class _Loader(yaml.SafeLoader):
    """YAML without anchors/aliases (a few lines of aliases expand to gigabytes) and without
    integers too long to convert."""

    def compose_node(self, parent: Any, index: Any) -> Any:
        if self.check_event(yaml.events.AliasEvent) or getattr(self.peek_event(), "anchor", None):
            mark = self.peek_event().start_mark
            raise ConfigError(f"line {mark.line + 1}: YAML anchors and aliases (&name, *name) are not "
                              f"accepted in a config; write the value out")
        return super().compose_node(parent, index)

    def construct_yaml_int(self, node: Any) -> Any:  # type: ignore[override]
        digits = str(node.value).replace("_", "")
        if len(digits.lstrip("+-")) > MAX_DIGITS:
            return LongNumber(digits)
        return super().construct_yaml_int(node)


_Loader.add_constructor("tag:yaml.org,2002:int", _Loader.construct_yaml_int)


def safe_load(text: str, where: str) -> Any:
    """Parse config YAML: bounded in size, no aliases, no over-long integers; errors name ``where``."""
    if len(text) > MAX_CONFIG_BYTES:
        raise ConfigError(f"{where}: {len(text)} bytes; a config holds at most {MAX_CONFIG_BYTES}")
    try:
        return yaml.load(text, Loader=_Loader)  # noqa: S506 - a SafeLoader subclass
    except ConfigError as e:
        raise ConfigError(f"{where}: {e}") from None
    except (yaml.YAMLError, ValueError) as e:
        raise ConfigError(f"{where}: not valid YAML: {e}") from None


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
        if p.stat().st_size > MAX_CONFIG_BYTES:
            raise ConfigError(f"{path}: {p.stat().st_size} bytes; a config holds at most {MAX_CONFIG_BYTES}")
        text = p.read_text()
    data = safe_load(text, path)
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of sections at the top level, "
                          f"got {type(data).__name__}")
    for name in data:
        if name not in SECTIONS and name not in SECTION_RENAMES:
            raise ConfigError(f"{path}: unknown config section '{name}'; expected one of {sorted(SECTIONS)}")
    return data


def load(path: str | Path | None, overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    """Every section, built and validated: the YAML file, then ``overrides`` (dotted key -> value,
    applied in order; None values are skipped), with the ablation preset's keys over the file's (not over
    the overrides), then the derived fields. Old names are accepted with a warning. Returns section name
    -> config dataclass."""
    given, overridden = _resolve(_leaves(load_yaml(path), f"{path}: " if path else ""),
                                 [(k, v) for k, v in (overrides or {}).items() if v is not None])
    preset = given.get("ablation.preset", "")
    for dotted, value in preset_keys(preset).items():
        if dotted not in overridden:
            given[dotted] = _coerced(dotted, value, f"ablation.preset {preset}")

    data = _nest(given)

    def get(dotted: str) -> Any:
        node: Any = data
        for part in dotted.split("."):
            if not isinstance(node, dict) or part not in node:
                return _default(dotted)
            node = node[part]
        default = _default(dotted)
        return {**default, **node} if isinstance(default, dict) else node

    out = {}
    for name in SECTIONS:
        cls = section_class(name)
        out[name] = build(cls, _merge(data.get(name) or {}, _derived_values(cls, get)), name)
    return out


def load_section(path: str | Path | None, name: str, overrides: dict[str, Any] | None = None):
    """Load and validate one section of the config file (all sections are validated);
    ``overrides``: key of that section -> value (None = not given)."""
    return load(path, {f"{name}.{k}": v for k, v in (overrides or {}).items()})[name]


def to_dict(cfg: Any) -> dict[str, Any]:
    """A JSON-ready dict of a config dataclass (logged next to every output)."""
    return json.loads(json.dumps(dataclasses.asdict(cfg), default=str))
