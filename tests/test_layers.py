"""grade/ in layers that read as the pipeline: every import points down (or stays within its layer).

The order (docs/architecture.md, "Layers"), lowest first:

- core: errors, config, command line, progress, the store and its backends, distributed helpers, the
  HTTP server's processes;
- fusion: how weights and predictions become a ranking. Below data because the simulator ranks its
  logs with it;
- data: simulator, features, the rolling data window, the feature transform, the tensor dataset;
- model: the policy, its loss, the training runtime (it publishes a policy folder with the data's
  feature spec) and the registry of published policies (the evaluation reads the incumbent from it);
- value: what a ranking is worth (examination, estimators, outcome and value model, declared
  business value, auction metrics, reward and its guardrails, baselines);
- train, evaluate, release: three peers on top that never import one another.

Imports inside ``if TYPE_CHECKING:`` are annotations only and are not counted. Import cycles are
tested in tests/test_store.py.
"""

from __future__ import annotations

import ast
from pathlib import Path

import grade

LAYERS: dict[str, tuple[str, ...]] = {
    "core": ("errors", "config", "cli", "progress", "store", "store_backend", "store_local", "s3",
             "s3_arrow", "distributed", "http_server"),
    "fusion": ("fusion",),
    "data": ("simulator", "features", "window", "transform", "dataset"),
    "model": ("policy", "lambdaloss", "training", "registry"),
    "value": ("examination", "estimators", "outcome", "value_model", "business", "auction", "reward",
              "guardrails", "baselines"),
    "train": ("pretrain", "grpo", "finetune"),
    "evaluate": ("evaluation", "report", "estimator_check"),
    "release": ("blessing", "promotion", "scoring", "serving"),
}
#: Layers in order; the last three share one level.
LEVEL = {"core": 0, "fusion": 1, "data": 2, "model": 3, "value": 4, "train": 5, "evaluate": 5, "release": 5}
LAYER_OF = {module: layer for layer, modules in LAYERS.items() for module in modules}
PACKAGE = Path(grade.__file__).parent


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def grade_imports(tree: ast.AST) -> set[str]:
    """Names of the grade modules a module's code imports (top level or lazily), not under TYPE_CHECKING."""
    found: set[str] = set()

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and _is_type_checking(node):
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, ast.ImportFrom) and node.module == "grade":
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("grade."):
            found.add(node.module.split(".")[1])
        elif isinstance(node, ast.Import):
            found.update(a.name.split(".")[1] for a in node.names if a.name.startswith("grade."))
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(tree)
    return found


def _modules() -> list[str]:
    return sorted(p.stem for p in PACKAGE.glob("*.py") if p.stem != "__init__")


def violations(imports: dict[str, set[str]]) -> list[str]:
    """``a (layer) -> b (layer)`` for every import of a module from a higher level or a peer layer."""
    out = []
    for module, deps in sorted(imports.items()):
        for dep in sorted(deps & set(LAYER_OF)):
            a, b = LAYER_OF[module], LAYER_OF[dep]
            if LEVEL[b] > LEVEL[a] or (LEVEL[b] == LEVEL[a] and a != b):
                out.append(f"{module} ({a}) -> {dep} ({b})")
    return out


def test_every_grade_module_has_a_layer():
    assert [m for m in _modules() if m not in LAYER_OF] == [], "place the new module in LAYERS"


def test_every_import_points_down_the_layers():
    imports = {m: grade_imports(ast.parse((PACKAGE / f"{m}.py").read_text())) for m in _modules()}
    assert violations(imports) == []


def test_the_check_sees_upward_lazy_and_peer_imports_and_skips_type_only_ones():
    tree = ast.parse("from grade import store\n"
                     "def f():\n    from grade.finetune import finetune\n"
                     "import grade.promotion\n"
                     "from typing import TYPE_CHECKING\n"
                     "if TYPE_CHECKING:\n    from grade.report import render\n")
    assert grade_imports(tree) == {"store", "finetune", "promotion"}
    assert violations({"evaluation": grade_imports(tree)}) == [
        "evaluation (evaluate) -> finetune (train)", "evaluation (evaluate) -> promotion (release)"]
    assert violations({"dataset": {"policy", "store", "features"}}) == ["dataset (data) -> policy (model)"]
