"""Closed-loop retraining on a simulated market: serve, log, retrain on a schedule, judge, promote.

    python -m pipeline.loop --rounds N --config YAML --out DIR [--days-per-round D] [--window-days W]
                            [--set SECTION.KEY=VALUE ...]

Round 0 simulates a market logged by the static weights (the simulator's randomised logging policy)
and runs the pipeline once, as ``make demo`` does. Every next round simulates D new days of the same
market (same catalogue and users, new requests) ranked by the registry's ``production`` model, with
serving's exploration (``serve.explore``) and its logged propensities, publishes them as one
partition per day, and runs the same pipeline on the rolling window of the last W days up to the
round's last day: features, value model, both training stages, the evaluation against static and the
incumbent, and the gate. The gate judges without ground truth (``promote.primary_flavour:
estimated``), as it must in production; the ground truth the simulator keeps is only read to score
the loop afterwards.

Writes DIR/loop.json (``{"rounds": [{"round", "verdict", "production_version", "production_true",
"candidate_true_lift", "estimated_lift", "capture", ...}]}``) and DIR/loop.html (production's true
OPM by round), and each round's report, report.html and blessing under DIR/round-<i>/. The steps are
the pipeline's (:func:`pipeline.run_local.run_local`), not a second implementation.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import yaml

import grade.core.cli
from grade.core import config, store
from grade.core.errors import InputError
from pipeline.params import deep_merge

LOOP_FILE = "loop.json"
PAGE_FILE = "loop.html"
#: the metrics the loop records, truth and estimate alike
METRICS = ("opm", "gpm", "ctr")


@dataclasses.dataclass(frozen=True)
class LoopPlan:
    """What one invocation runs: the base config and the calendar of the rounds."""

    rounds: int
    """rounds to run (round 0 is the static-logged market)"""
    days_per_round: int
    """new days simulated per round (the schedule's period)"""
    window_days: int
    """days of logs each round trains on, up to its last day"""
    start: dt.date
    """first day of round 0"""
    base: dict[str, Any]
    """the config mapping every round starts from"""

    def round_days(self, index: int) -> tuple[dt.date, dt.date]:
        """First and last day of round ``index``'s logs."""
        first = self.start + dt.timedelta(days=index * self.days_per_round)
        return first, first + dt.timedelta(days=self.days_per_round - 1)


def round_config(plan: LoopPlan, index: int, production_uri: str | None) -> dict[str, Any]:
    """The config mapping of round ``index``: new days of the same market (a new request stream of the
    same world), logged by ``production_uri`` (None: the static weights), judged without truth."""
    first, _ = plan.round_days(index)
    sim: dict[str, Any] = {"start_date": first.isoformat(), "n_days": plan.days_per_round}
    if index:
        sim["stream"] = index
    if production_uri:
        sim["logging"] = production_uri
    return deep_merge(plan.base, {"simulator": sim, "promote": {"primary_flavour": "estimated"}}, "")


def write_yaml(mapping: dict[str, Any], path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(mapping, sort_keys=True))
    return path


def base_config(args: argparse.Namespace) -> dict[str, Any]:
    """The config mapping of ``--config`` with every ``--set`` merged over it (both checked first: a bad
    file or value is exit 2 before anything runs)."""
    config.from_args(args)
    base = config.load_yaml(args.config) if args.config else {}
    for dotted, value in args.config_settings:
        *sections, key = dotted.split(".")
        change: dict[str, Any] = {key: value}
        for name in reversed(sections):
            change = {name: change}
        base = deep_merge(base, change, "")
    return base


def simulate_round(config_path: Path, round_uri: str, days_pattern: str) -> list[str]:
    """Simulate the round's logs with the simulate step, then publish each day as its own partition of
    ``days_pattern`` (``.../day={date}``), as production logs land; returns the days written.

    A day already published (a re-run of the loop) is left as it is: the simulator is deterministic."""
    if not store.is_published(round_uri):
        subprocess.run([sys.executable, "-m", "components.simulate", "--config", str(config_path),
                        "--out", round_uri], check=True)
    days = []
    with store.fetched(round_uri) as local:
        for folder in sorted(p for p in Path(local).iterdir() if p.is_dir() and p.name.startswith("day=")):
            day = folder.name.split("=", 1)[1]
            target = days_pattern.replace("{date}", day)
            if not store.is_published(target):
                with store.publishing(target, extra={"producer": "pipeline.loop", "round_logs": round_uri}) \
                        as staging:
                    for part in sorted(folder.glob("*.parquet")):
                        (Path(staging) / part.name).write_bytes(part.read_bytes())
            days.append(day)
    return days


def _lift(report: dict[str, Any], policy: str, flavour: str) -> dict[str, Any]:
    """{metric: {lift, ci_low, ci_high}} of ``policy`` vs static in ``flavour`` (empty when absent)."""
    cells = report.get("lift_vs_static", {}).get(policy, {}).get(flavour, {})
    return {m: cells[m] for m in METRICS if m in cells}


def round_record(index: int, report: dict[str, Any], blessing: dict[str, Any] | None,
                 production_version: str | None, days: tuple[dt.date, dt.date]) -> dict[str, Any]:
    """One row of loop.json from the round's report and blessing: what the gate decided, and the truth
    the simulator kept about the candidate and about the model that serves after the round."""
    blessed = bool(blessing and blessing.get("blessed"))
    serving = "grade" if blessed else ("incumbent" if "incumbent" in report["policies"] else "static")
    true_of = lambda name: {m: report["policies"][name]["true"][m] for m in METRICS}  # noqa: E731
    return {
        "round": index,
        "days": [days[0].isoformat(), days[1].isoformat()],
        "n_requests": report.get("n_requests"),
        "verdict": blessing.get("verdict") if blessing else "no gate",
        "reasons": blessing.get("reasons", []) if blessing else [],
        "production_version": production_version,
        "production_policy": serving,
        "production_true": true_of(serving),
        "production_true_lift": _lift(report, serving, "true") if serving != "static" else {},
        "static_true": true_of("static"),
        "candidate_true": true_of("grade"),
        "candidate_true_lift": _lift(report, "grade", "true"),
        "estimated_lift": _lift(report, "grade", "estimated"),
        "capture": report.get("headroom_captured", {}).get("grade"),
        # the logged rankings are the served model's with exploration, the incumbent's its mean: on the
        # same held-out requests, the true lift of one over the other is what exploring cost
        "exploration_cost": _logged_vs_incumbent(report),
    }


def _logged_vs_incumbent(report: dict[str, Any]) -> dict[str, Any]:
    """True {metric: lift with CI} of the logged rankings over the incumbent's mean ({} before round 1)."""
    cells = report.get("lift_vs_incumbent", {}).get("logged", {}).get("true", {})
    return {m: cells[m] for m in METRICS if m in cells}


def render_page(rounds: list[dict[str, Any]]) -> str:
    """loop.html: production's, the candidate's and static's true OPM by round, and the verdicts."""
    from grade.evaluate.report import _img, _mpl, _png

    plt = _mpl()
    fig, ax = plt.subplots(figsize=(6.4, 3.6))
    x = [r["round"] for r in rounds]
    for key, label, style in (("production_true", "production (after the round)", "o-"),
                              ("candidate_true", "candidate", "s--"), ("static_true", "static", "x:")):
        ax.plot(x, [r[key]["opm"] for r in rounds], style, label=label)
    ax.set_xlabel("round")
    ax.set_ylabel("true OPM")
    ax.set_xticks(x)
    ax.legend()
    fig.tight_layout()
    figure = _img(_png(fig), "true OPM of production by round")
    rows = "".join(
        f"<tr><td>{r['round']}</td><td>{r['verdict']}</td><td>{r['production_version'] or 'static'}</td>"
        f"<td>{r['production_true']['opm']:.3f}</td>"
        f"<td>{lift_text(r['candidate_true_lift'].get('opm'))}</td><td>{lift_text(r['estimated_lift'].get('opm'))}</td>"
        f"<td>{lift_text(r['candidate_true_lift'].get('gpm'))}</td><td>{lift_text(r['estimated_lift'].get('gpm'))}</td>"
        f"<td>{lift_text(r['exploration_cost'].get('opm'))}</td></tr>" for r in rounds)
    return ("<!doctype html><html><head><meta charset='utf-8'><title>grade-mtf loop</title></head><body>"
            "<h1>Closed-loop retraining</h1>" + figure +
            "<table border='1' cellpadding='4'><tr><th>round</th><th>verdict</th><th>production</th>"
            "<th>production true OPM</th><th>candidate true OPM lift</th><th>estimated OPM lift</th>"
            "<th>candidate true GPM lift</th><th>estimated GPM lift</th>"
            "<th>exploration's true OPM cost</th></tr>" + rows +
            "</table></body></html>")


def lift_text(cell: dict[str, float] | None) -> str:
    if not cell:
        return "-"
    return f"{100 * cell['lift']:+.1f}% [{100 * cell['ci_low']:+.1f}, {100 * cell['ci_high']:+.1f}]"


def production_uri(registry: str, model_name: str) -> tuple[str | None, str | None]:
    """(URI, version) of the registry's production model, or (None, None) before the first promotion."""
    from grade.model.registry import Registry

    current = Registry(registry, model_name).production()
    if current is None:
        return None, None
    version = current[0]["version"]
    return Registry(registry, model_name).version_uri(version), version


def run_loop(plan: LoopPlan, out: Path, *, verbose: bool = False) -> dict[str, Any]:
    """Run the rounds; write loop.json and loop.html after each one (a stopped loop keeps what it did)."""
    from pipeline.run_local import run_local

    work = out / "_work"
    store_root = str((work / "store").absolute())
    registry = store.join(store_root, "registry")
    Path(registry).mkdir(parents=True, exist_ok=True)
    days_pattern = store.join(store_root, "days", "day={date}")
    model_name = plan.base.get("shared", {}).get("model_name", "grade-mtf")
    rounds: list[dict[str, Any]] = []
    for index in range(plan.rounds):
        t0 = time.monotonic()
        serving_uri, serving_version = production_uri(registry, model_name)
        cfg_path = write_yaml(round_config(plan, index, serving_uri), out / f"round-{index}" / "config.yaml")
        print(f"loop: round {index}: simulating {plan.days_per_round} days logged by "
              f"{serving_version or 'static weights'}", flush=True)
        simulate_round(cfg_path, store.join(store_root, "rounds", f"round-{index}"), days_pattern)
        first, last = plan.round_days(index)
        result = run_local(str(cfg_path), out / f"round-{index}", workdir=work, store_uri=store_root,
                           registry=registry, logs=days_pattern, window_days=plan.window_days,
                           schedule_time=f"{last.isoformat()}T23:59:59Z", verbose=verbose)
        blessing = json.loads((out / f"round-{index}" / "blessing.json").read_text()) \
            if result["blessing"] is not None else None
        _, version = production_uri(registry, model_name)
        rounds.append(round_record(index, result["report"], blessing, version, (first, last)))
        rounds[-1]["seconds"] = round(time.monotonic() - t0, 1)
        publish_results(out, plan, rounds)
        r = rounds[-1]
        print(f"loop: round {index}: {r['verdict']}; production {version or 'static'} true OPM "
              f"{r['production_true']['opm']:.3f} (candidate true OPM lift "
              f"{lift_text(r['candidate_true_lift'].get('opm'))}, estimated "
              f"{lift_text(r['estimated_lift'].get('opm'))}) in {r['seconds']:.0f} s", flush=True)
    return {"rounds": rounds}


def publish_results(out: Path, plan: LoopPlan, rounds: list[dict[str, Any]]) -> None:
    """loop.json and loop.html, each written whole (a reader never sees half a file)."""
    doc = {"rounds": rounds, "plan": {"rounds": plan.rounds, "days_per_round": plan.days_per_round,
                                      "window_days": plan.window_days, "start": plan.start.isoformat()},
           "config": plan.base}
    texts = ((LOOP_FILE, json.dumps(doc, indent=2, sort_keys=True)), (PAGE_FILE, render_page(rounds)))
    for name, text in texts:
        tmp = out / f".{name}.tmp"
        tmp.write_text(text)
        tmp.replace(out / name)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m pipeline.loop", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, required=True, metavar="N", help="rounds to run (>= 1)")
    p.add_argument("--out", required=True, metavar="DIR", help="where loop.json, loop.html and the rounds go")
    p.add_argument("--days-per-round", type=int, default=0, metavar="D",
                   help="new days simulated per round (default: simulator.n_days)")
    p.add_argument("--window-days", type=int, default=0, metavar="W",
                   help="days each round trains on, up to its last day (default: --days-per-round)")
    p.add_argument("--verbose", action="store_true", help="stream every step's output to the terminal")
    config.add_arguments(p, config_help="YAML config every round starts from (its simulator section "
                                        "describes the market)")
    return p


def plan_from_args(args: argparse.Namespace) -> LoopPlan:
    if args.rounds < 1:
        raise InputError(f"--rounds: expected at least 1, got {args.rounds}")
    base = base_config(args)
    sim = config.from_args(args)["simulator"]
    days = args.days_per_round or sim.n_days
    window = args.window_days or days
    if days < 1 or window < 1:
        raise InputError(f"--days-per-round {days} / --window-days {window}: expected days >= 1")
    return LoopPlan(args.rounds, days, window, dt.date.fromisoformat(sim.start_date), base)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    plan = plan_from_args(args)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    run_loop(plan, out, verbose=args.verbose)
    print(f"loop.json: {(out / LOOP_FILE).absolute()}")
    print(f"loop.html: {(out / PAGE_FILE).absolute()}")
    return 0


if __name__ == "__main__":
    sys.exit(grade.core.cli.run(main))
