"""What a pipeline task does around its step: run the CLI, log KFP metrics, write Markdown summaries.

Component bodies (pipeline/components.py) call these inside the image. No KFP import: artifacts
arrive as objects with ``.path`` / ``.metadata`` / ``.log_metric``.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from grade.release.blessing import Blessing

#: The most metrics one task logs (the KFP UI lists them all; keep it readable).
MAX_METRICS = 100


class StepFailed(RuntimeError):
    """A step's CLI exited with a non-zero status: the task fails (and KFP may retry it)."""


def run_step(name: str, main: Callable[[list[str] | None], int | None], argv: list[str]) -> None:
    """Run a component's ``main(argv)`` as its CLI would (logging, exit status 2 on bad input)."""
    import grade.core.cli

    rc = grade.core.cli.run(main, argv)
    if rc != 0:
        raise StepFailed(f"components.{name} {' '.join(argv)} exited with status {rc}")


def run_training_step(name: str, main: Callable[[list[str] | None], int | None], argv: list[str],
                      workers: int = 1) -> None:
    """Run a training step in this process (``workers`` <= 1) or data-parallel on ``workers`` local
    processes through torchrun (``python -m torch.distributed.run --standalone``, gloo on CPU, nccl on
    GPU; one intra-op thread per process unless OMP_NUM_THREADS is set). Rank 0 writes the outputs."""
    import os
    import subprocess
    import sys

    if workers <= 1:
        run_step(name, main, argv)
        return
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
           "--nproc-per-node", str(int(workers)), "-m", f"components.{name}", *argv]
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    rc = subprocess.run(cmd, env=env, check=False).returncode
    if rc != 0:
        raise StepFailed(f"torchrun --nproc-per-node {workers} components.{name} {' '.join(argv)} "
                         f"exited with status {rc}")


def metric_name(name: str) -> str:
    """A KFP-safe metric name: letters, digits, '-' and '_' only, at most 63 characters."""
    return re.sub(r"[^A-Za-z0-9_-]", "-", name)[:63]


def scalar_metrics(data: Any) -> dict[str, float]:
    """Finite numbers of a metrics.json document, flattened to ``{name: value}``.

    KFP's own shape (``{"metrics": [{"name", "numberValue"}]}``) is taken as is; otherwise nested
    keys are joined with '-', and for a list of per-epoch records only the last record is kept
    (as ``<key>-last-...``): the final state is what a run is compared on.
    """
    out: dict[str, float] = {}
    if isinstance(data, dict) and isinstance(data.get("metrics"), list) and all(
            isinstance(m, dict) and "name" in m for m in data["metrics"]):
        for m in data["metrics"]:
            value = m.get("numberValue")
            if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
                out[metric_name(str(m["name"]))] = float(value)
        return out

    def walk(prefix: str, value: Any) -> None:
        if isinstance(value, bool):
            return
        if isinstance(value, (int, float)):
            if math.isfinite(value):
                out[metric_name(prefix)] = float(value)
        elif isinstance(value, dict):
            for k in sorted(value):
                walk(f"{prefix}-{k}" if prefix else str(k), value[k])
        elif isinstance(value, list) and value:
            walk(f"{prefix}-last" if prefix else "last", value[-1])

    walk("", data)
    return out


def log_metrics_file(metrics: Any, path: str | Path) -> dict[str, float]:
    """Log the numbers of a metrics.json to a KFP ``Output[Metrics]``; a missing file logs nothing."""
    p = Path(path)
    if not p.is_file():
        return {}
    values = dict(list(scalar_metrics(json.loads(p.read_text())).items())[:MAX_METRICS])
    for name, value in values.items():
        metrics.log_metric(name, value)
    return values


def _pct(x: float | None) -> str:
    return "n/a" if x is None or not math.isfinite(x) else f"{100 * x:+.2f}%"


def report_markdown(report: dict[str, Any]) -> str:
    """The evaluation in a few lines: each policy's lift vs static (primary flavour) with its CI."""
    flavour = report.get("primary_flavour", "true")
    primary = report.get("primary_metric", "opm")
    metrics = [m for m in ("opm", "gpm", "ctr", "cvr")]
    lines = [f"### Offline auction: {report.get('n_requests', '?')} held-out requests, {flavour} metrics",
             "", "| policy | " + " | ".join(f"{m.upper()} lift [CI]" for m in metrics) + " |",
             "|---|" + "---|" * len(metrics)]
    for policy, flavours in report.get("lift_vs_static", {}).items():
        cells = []
        for m in metrics:
            lift = flavours.get(flavour, {}).get(m)
            cells.append("n/a" if not lift else
                         f"{_pct(lift['lift'])} [{_pct(lift['ci_low'])}, {_pct(lift['ci_high'])}]")
        lines.append(f"| {policy} | " + " | ".join(cells) + " |")
    lines += ["", f"Primary metric: {flavour} {primary.upper()}; lifts are relative to `static`."]
    return "\n".join(lines) + "\n"


def blessing_markdown(blessing: Blessing) -> str:
    """The promotion decision: verdict, candidate vs baseline, every check and the reasons."""
    lines = [f"### Promotion: **{blessing.verdict}**", ""]
    for key in ("candidate", "baseline", "model_name", "version"):
        if getattr(blessing, key) is not None:
            lines.append(f"- {key}: `{getattr(blessing, key)}`")
    if blessing.checks:
        lines += ["", "| check | value | threshold | passed |", "|---|---|---|---|"]
        for c in blessing.checks:
            shown = "missing" if c.value is None else f"{c.value:+.4f}"
            lines.append(f"| {c.name} | {shown} | {c.threshold} | {'yes' if c.passed else 'no'} |")
    if blessing.reasons:
        lines += ["", "Reasons:", *[f"- {r}" for r in blessing.reasons]]
    return "\n".join(lines) + "\n"
