"""grade/ in layer folders that read as the pipeline: every import points down (or stays within its layer).

The folder a module sits in is its layer (docs/architecture.md, "Layers"), lowest first:

- core: errors, config, command line, progress, the store and its backends, distributed helpers, the
  HTTP server's processes;
- data: simulator, features (raw_logs, log_checks, shard_writer: its stages), the rolling data window,
  the feature transform, the tensor dataset and the ranking rule (fusion), with which the simulator
  ranks its logs;
- model: the policy, its loss, the training runtime (it publishes a policy folder with the data's
  feature spec) and the registry of published policies (the evaluation reads the incumbent from it);
- value: what a ranking is worth (examination, estimators, outcome and value model, the value fields of
  training requests, declared business value, auction metrics, reward and its guardrails, baselines);
- train, evaluate, release: three peers on top that never import one another.

Imports inside ``if TYPE_CHECKING:`` are annotations only and are not counted. Import cycles are
tested in tests/test_store.py.
"""

from __future__ import annotations

import ast
from pathlib import Path

import grade

#: Layers in order; the last three share one level.
LEVEL = {"core": 0, "data": 1, "model": 2, "value": 3, "train": 4, "evaluate": 4, "release": 4}
PACKAGE = Path(grade.__file__).parent


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def module_name(path: Path) -> str:
    """``grade/value/reward.py`` -> ``grade.value.reward``; a package's ``__init__`` is the package."""
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    """Every module of grade/ by dotted name."""
    return {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def grade_imports(tree: ast.AST, known: set[str]) -> set[str]:
    """Dotted names of the grade modules a module's code imports (top level or lazily), not under
    TYPE_CHECKING. ``from grade.core import store`` names the module ``grade.core.store``."""
    found: set[str] = set()

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and _is_type_checking(node):
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("grade"):
            for alias in node.names:
                sub = f"{node.module}.{alias.name}"
                found.add(sub if sub in known else node.module)
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("grade."))
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(tree)
    return found


def layer_of(module: str) -> str | None:
    """The layer folder of a dotted module name (None for the package itself)."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else None


def violations(imports: dict[str, set[str]]) -> list[str]:
    """``a (layer) -> b (layer)`` for every import of a module from a higher level or a peer layer."""
    out = []
    for module, deps in sorted(imports.items()):
        a = layer_of(module)
        for dep in sorted(deps):
            b = layer_of(dep)
            if a is None or b is None:
                continue
            if LEVEL[b] > LEVEL[a] or (LEVEL[b] == LEVEL[a] and a != b):
                out.append(f"{module} ({a}) -> {dep} ({b})")
    return out


def test_grade_is_layer_folders_only():
    top = sorted(p.name for p in PACKAGE.iterdir() if p.name != "__pycache__")
    assert top == sorted(["__init__.py", *LEVEL]), "every module lives in one layer folder"
    assert all((PACKAGE / layer / "__init__.py").is_file() for layer in LEVEL)


def test_every_import_points_down_the_layers():
    mods = modules()
    imports = {m: grade_imports(ast.parse(p.read_text()), set(mods)) for m, p in mods.items()}
    assert violations(imports) == []


def test_the_check_sees_upward_lazy_and_peer_imports_and_skips_type_only_ones():
    known = {"grade.core.store", "grade.train.finetune", "grade.release.promotion", "grade.evaluate.report"}
    tree = ast.parse("from grade.core import store\n"
                     "def f():\n    from grade.train.finetune import finetune\n"
                     "import grade.release.promotion\n"
                     "from typing import TYPE_CHECKING\n"
                     "if TYPE_CHECKING:\n    from grade.evaluate.report import render\n")
    assert grade_imports(tree, known) == {"grade.core.store", "grade.train.finetune",
                                          "grade.release.promotion"}
    assert violations({"grade.evaluate.evaluation": grade_imports(tree, known)}) == [
        "grade.evaluate.evaluation (evaluate) -> grade.release.promotion (release)",
        "grade.evaluate.evaluation (evaluate) -> grade.train.finetune (train)"]
    assert violations({"grade.data.dataset": {"grade.model.policy", "grade.core.store"}}) == [
        "grade.data.dataset (data) -> grade.model.policy (model)"]


#: the most lines a module of grade/ may hold: past it a module does more than one stage's work
MAX_MODULE_LINES = 600


def long_modules(paths: dict[str, Path], limit: int = MAX_MODULE_LINES) -> list[str]:
    """``name (N lines)`` for every module over ``limit`` lines."""
    counts = {name: len(p.read_text().splitlines()) for name, p in paths.items()}
    return [f"{name} ({n} lines)" for name, n in sorted(counts.items()) if n > limit]


def test_no_module_of_grade_is_over_600_lines():
    assert long_modules(modules()) == []


def test_the_length_check_names_a_long_module(tmp_path):
    short, long = tmp_path / "short.py", tmp_path / "long.py"
    short.write_text("x = 1\n" * MAX_MODULE_LINES)
    long.write_text("x = 1\n" * (MAX_MODULE_LINES + 1))
    assert long_modules({"grade.short": short, "grade.long": long}) == [
        f"grade.long ({MAX_MODULE_LINES + 1} lines)"]
