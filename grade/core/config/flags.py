"""The command line (--config, --set and flags derived from the fields) and the documented defaults."""

from __future__ import annotations

import argparse
import ast
import dataclasses
import inspect
import textwrap
import typing
from typing import Any

import yaml

from grade.core import cli
from grade.core.config.fields import SECTIONS, is_key, section_class
from grade.core.config.keys import _WARNED
from grade.core.config.loading import load, safe_load
from grade.core.errors import ConfigError


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
        return safe_load(text, "--set")
    except ConfigError:
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


# The full default configuration, documented (python -m components.config)

def defaults_yaml(width: int = 100) -> str:
    """Every key with its default, in section order, each under its doc line as a YAML comment."""
    lines = ["# Every key of the GRADE-MTF configuration with its default (python -m components.config).",
             "# An empty file means these values; a file gives only the keys it changes."]
    for name in SECTIONS:
        lines += ["", f"{name}:"]
        lines += _documented(section_class(name), "  ", width)
    return "\n".join(lines) + "\n"


def _documented(cls: type, indent: str, width: int) -> list[str]:
    docs, hints, lines = field_docs(cls), typing.get_type_hints(cls), []
    defaults = cls()
    for f in dataclasses.fields(cls):
        if not is_key(f):
            continue
        doc = textwrap.wrap(docs.get(f.name, ""), width - len(indent) - 2)
        lines += [indent + "# " + line for line in doc]
        if dataclasses.is_dataclass(hints[f.name]):
            lines += [f"{indent}{f.name}:", *_documented(hints[f.name], indent + "  ", width)]
        else:
            value = yaml.safe_dump(getattr(defaults, f.name), default_flow_style=True, width=10_000)
            lines.append(f"{indent}{f.name}: {value.removesuffix(chr(10)).removesuffix('...').strip()}")
    return lines


def old_names_used() -> list[str]:
    """The old names this process has accepted (each warned about once)."""
    return sorted(_WARNED)
