"""The one rule for every path that comes from data, and the bounded JSON reader for data files.

Paths read from data (a manifest's entries and object names, ``_retired`` lists, registry version ids
and model names, listed S3 keys) decide where the store reads, writes and deletes. A path is
accepted only when it is relative, already normalised and stays below its folder:

- a non-empty string of '/'-separated parts, none of them empty, ``.`` or ``..``;
- not absolute (no leading '/'), no backslash, no NUL or other control character.

A *name* (a version id, a model name) is such a path of one part. Local files are never reached
through a symbolic link below the folder being read (:func:`check_no_symlink`). Every refusal is an
:class:`InputError` (exit 2) naming where the path came from and the path itself.
"""

from __future__ import annotations

import json
import os
import re
import stat
from pathlib import Path
from typing import Any

from grade.core.errors import InputError

#: deepest nesting of arrays and objects accepted in a JSON file read from data
MAX_JSON_DEPTH = 64


_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


def path_problem(path: Any) -> str | None:
    """Why ``path`` is not a safe relative path (None when it is)."""
    if not isinstance(path, str) or not path:
        return "expected a non-empty relative path"
    if _CONTROL.search(path):
        return "contains a control character"
    if "\\" in path:
        return "contains a backslash (separators are '/')"
    if path.startswith("/"):
        return "is absolute (expected a path relative to its folder)"
    framed = f"/{path}/"
    for part, bad in (("", "//"), (".", "/./"), ("..", "/../")):
        if bad in framed:
            return f"has a '{part or '/'}' part (expected a normalised path that stays inside its folder)"
    return None


def safe_relpath(path: Any, where: str) -> str:
    """``path`` when it is a safe relative path (see the module doc); else InputError naming ``where``."""
    problem = path_problem(path)
    if problem:
        raise InputError(f"{where}: entry {path!r} {problem}; refused")
    return path


def safe_name(name: Any, where: str) -> str:
    """``name`` when it is a safe path of exactly one part (a version id, a model name)."""
    safe_relpath(name, where)
    if "/" in name:
        raise InputError(f"{where}: {name!r} contains '/' (expected a single name); refused")
    return name


#: a registry model name: one plain part that is also the server's URL segment
MODEL_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")


def safe_model_name(name: Any, where: str, error: type[InputError] = InputError) -> str:
    """``name`` when it is a registry model name (:data:`MODEL_NAME`); else ``error`` naming ``where``."""
    if not isinstance(name, str) or not MODEL_NAME.fullmatch(name):
        raise error(f"{where}: expected letters, digits, '.', '_' or '-' (a plain name: no '/', '..' or "
                    f"absolute path), got {name!r}")
    return name


def check_no_symlink(root: Path, rel: str, where: str) -> Path:
    """``root / rel`` after checking that no part of it below ``root`` is a symbolic link.

    A link in a published folder would make a reader (and the registry's copy) take bytes from
    anywhere on the host. A missing part is left to the caller (it reports a missing file).
    """
    path = root
    for part in safe_relpath(rel, where).split("/"):
        path = path / part
        try:
            mode = os.lstat(path).st_mode
        except FileNotFoundError:
            return root / rel
        if stat.S_ISLNK(mode):
            raise InputError(f"{where}: entry {rel!r} is a symbolic link ({path}); refused: published "
                             f"folders hold plain files only")
    return path


def loads(data: bytes | str, where: str, max_depth: int = MAX_JSON_DEPTH) -> Any:
    """Parse JSON read from data: invalid JSON or nesting deeper than ``max_depth`` is InputError."""
    try:
        doc = json.loads(data)
    except RecursionError:
        raise InputError(f"{where}: JSON nested deeper than {max_depth} levels; refused") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise InputError(f"{where}: not valid JSON ({e})") from None
    if json_depth(doc) > max_depth:
        raise InputError(f"{where}: JSON nested deeper than {max_depth} levels; refused")
    return doc


def json_depth(doc: Any) -> int:
    """Nesting depth of arrays and objects in a parsed document (a scalar is 0), without recursion."""
    if not isinstance(doc, (dict, list)):
        return 0
    deepest, stack = 1, [(doc, 1)]
    while stack:
        node, depth = stack.pop()
        deepest = max(deepest, depth)
        children = node.values() if isinstance(node, dict) else node
        stack.extend((child, depth + 1) for child in children if isinstance(child, (dict, list)))
    return deepest
