"""The truth-free gate under logs that break its assumptions, scored against the simulator's truth.

    python -m pipeline.stress --out DIR [--config YAML] [--conditions NAME,...] [--seeds 0,1,2]
                              [--requests N] [--set SECTION.KEY=VALUE ...]

For every condition and seed: simulate a market, run the whole pipeline on its logs with a fresh
registry, let the gate judge GRADE against static **without** ground truth (``promote.primary_flavour:
estimated``), and score that decision with the truth the simulator kept (the report's true flavour,
and the gate's verdict had it judged on the truth). Conditions (:data:`CONDITIONS`):

- ``as_assumed``: the config's market (position-based clicks, randomised static logging);
- ``deterministic_logging``: the logging policy never randomises (Dirichlet concentration 1e7);
- ``cascade_page20``: DBN-style cascade clicks and a page end at position 20;
- ``truncated_top10``: only the first 10 logged positions are kept (lists no longer than the exposure);
- ``small_5000``: 5,000 requests;
- ``own_ranking``: the logs of the market served by a model trained on its static-logged days
  (deterministic, no exploration) — what the next scheduled retraining sees.

Writes DIR/stress.json (one row per run) and DIR/stress.md (the table docs/promotion.md quotes). A
run is **harmful** when the gate promoted a model whose true OPM lift CI reaches 0 or below, or whose
true GPM or CTR lift is below -1%.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pyarrow.compute as pc
import pyarrow.parquet as pq

import grade.core.cli
from grade.core import config, store
from grade.core.errors import InputError
from pipeline.loop import base_config, lift_text, write_yaml
from pipeline.params import deep_merge

#: condition -> config changes over the base config
CONDITIONS: dict[str, dict[str, Any]] = {
    "as_assumed": {},
    "deterministic_logging": {"simulator": {"logging_concentration": 1e7}},
    "cascade_page20": {"simulator": {"click_model": "cascade", "page_size": 20}},
    "truncated_top10": {},
    "small_5000": {"simulator": {"n_requests": 5000}},
    "own_ranking": {},
}
#: kept logged positions of truncated_top10
TRUNCATE_AT = 10
#: a promoted model is harmful below these true lifts (the issue's acceptance)
HARM_FLOOR = {"gpm": -0.01, "ctr": -0.01}
METRICS = ("opm", "gpm", "ctr")


def run_config(base: dict[str, Any], condition: str, seed: int) -> dict[str, Any]:
    """The config of one run: the base, the condition, the seed, and a gate that judges without truth."""
    run = {"simulator": {"seed": seed}, "shared": {"seed": seed}, "promote": {"primary_flavour": "estimated"}}
    return deep_merge(base, deep_merge(CONDITIONS[condition], run, ""), "")


def simulate(cfg_path: str, out_uri: str) -> str:
    if not store.is_published(out_uri):
        subprocess.run([sys.executable, "-m", "components.simulate", "--config", cfg_path, "--out", out_uri],
                       check=True)
    return out_uri


def truncate(logs_uri: str, out_uri: str, keep: int = TRUNCATE_AT) -> str:
    """The logs with only the rows logged at positions < ``keep`` (what a log of shown items holds)."""
    if store.is_published(out_uri):
        return out_uri
    with store.fetched(logs_uri) as src, store.publishing(out_uri, extra={"producer": "pipeline.stress",
                                                                          "truncated_at": keep}) as staging:
        for path in sorted(Path(src).rglob("*.parquet")):
            table = pq.read_table(path, partitioning=None)
            target = Path(staging) / path.relative_to(src)
            target.parent.mkdir(parents=True, exist_ok=True)
            pq.write_table(table.filter(pc.less(table["position"], keep)), target, compression="zstd")
    return out_uri


def truth_verdict(report: dict[str, Any], candidate_uri: str, work: Path) -> str:
    """What the gate would have said on the true flavour (a fresh registry: GRADE against static)."""
    from grade.model.registry import Registry
    from grade.release.promotion import decide

    cfg = config.load_section(None, "promote")
    cfg.primary_flavour = "true"
    (work / "truth-registry").mkdir(parents=True, exist_ok=True)
    return decide(report, candidate_uri, Registry(str(work / "truth-registry"), cfg.model_name), cfg).verdict


def logs_for(condition: str, cfg: dict[str, Any], run_dir: Path, store_root: str) -> str:
    """Simulate (and transform) the logs of one run; ``own_ranking`` first trains a model on the
    static-logged days and then simulates new days served by it."""
    cfg_path = str(write_yaml(cfg, run_dir / "config.yaml"))
    logs = simulate(cfg_path, store.join(store_root, "logs", run_dir.name))
    if condition == "truncated_top10":
        return truncate(logs, store.join(store_root, "logs", run_dir.name + "-top10"))
    if condition == "own_ranking":
        from pipeline.run_local import run_local

        first = run_local(cfg_path, run_dir / "logger", workdir=run_dir / "_work", store_uri=store_root,
                          registry=store.join(store_root, "registry", run_dir.name + "-logger"),
                          logs=logs, verbose=False)
        model = first["report"]["models"]["grade"]["uri"]
        # the mean ranking: what a model served without exploration logs
        mean_ranked = {"simulator": {"logging": model, "stream": 1}, "serve": {"explore": {"share": 0.0}}}
        served = deep_merge(cfg, mean_ranked, "")
        return simulate(str(write_yaml(served, run_dir / "served.yaml")),
                        store.join(store_root, "logs", run_dir.name + "-served"))
    return logs


def _lifts(report: dict[str, Any], flavour: str) -> dict[str, Any]:
    cells = report["lift_vs_static"]["grade"].get(flavour, {})
    return {m: cells[m] for m in METRICS if m in cells}


def run_one(condition: str, seed: int, base: dict[str, Any], out: Path, store_root: str) -> dict[str, Any]:
    from pipeline.run_local import run_local

    t0 = time.monotonic()
    run_dir = out / f"{condition}-s{seed}"
    cfg = run_config(base, condition, seed)
    logs = logs_for(condition, cfg, run_dir, store_root)
    result = run_local(str(write_yaml(cfg, run_dir / "config.yaml")), run_dir, workdir=run_dir / "_work",
                       store_uri=store_root, registry=store.join(store_root, "registry", run_dir.name),
                       logs=logs, verbose=False)
    report, blessing = result["report"], result["blessing"]
    true, estimated = _lifts(report, "true"), _lifts(report, "estimated")
    promoted = bool(blessing and blessing.blessed)
    harmful = promoted and is_harmful(true)
    return {"condition": condition, "seed": seed, "verdict": blessing.verdict if blessing else "no gate",
            "reasons": list(blessing.reasons) if blessing else [], "promoted": promoted, "harmful": harmful,
            "truth_gate": truth_verdict(report, report["models"]["grade"]["uri"], run_dir),
            "true_lift": true, "estimated_lift": estimated,
            "covered": {m: estimated[m]["ci_low"] <= true[m]["lift"] <= estimated[m]["ci_high"]
                        for m in METRICS if m in estimated},
            "capture": report.get("headroom_captured", {}).get("grade"),
            "diagnostics": [c for c in report.get("diagnostics", {}).get("checks", [])
                            if c["status"] != "pass"],
            "seconds": round(time.monotonic() - t0, 1)}


def is_harmful(true: dict[str, Any]) -> bool:
    """Whether promoting a model of these true lifts vs static harms: its OPM lift CI reaches 0, or its
    GPM or CTR lift is below the floor."""
    return true["opm"]["ci_low"] <= 0 or any(true[m]["lift"] < floor for m, floor in HARM_FLOOR.items())


def table(rows: list[dict[str, Any]]) -> str:
    """The markdown table of every run: verdicts, the reason, estimated vs true lifts."""
    head = ("| condition | seed | verdict (truth-free) | truth gate | reason | est. OPM | true OPM | "
            "est. GPM | true GPM | true CTR | harmful |\n|---|---|---|---|---|---|---|---|---|---|---|\n")
    lines = []
    for r in rows:
        reason = "; ".join(r["reasons"])[:140].replace("|", "/")
        est, true = r["estimated_lift"], r["true_lift"]
        lines.append(f"| {r['condition']} | {r['seed']} | {r['verdict']} | {r['truth_gate']} | {reason} | "
                     f"{lift_text(est['opm'])} | {lift_text(true['opm'])} | {lift_text(est['gpm'])} | "
                     f"{lift_text(true['gpm'])} | {lift_text(true['ctr'])} | "
                     f"{'YES' if r['harmful'] else 'no'} |")
    return head + "\n".join(lines) + "\n"


def write_results(out: Path, rows: list[dict[str, Any]]) -> None:
    for name, text in (("stress.json", json.dumps({"runs": rows}, indent=2, sort_keys=True)),
                       ("stress.md", table(rows))):
        tmp = out / f".{name}.tmp"
        tmp.write_text(text)
        tmp.replace(out / name)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m pipeline.stress", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, metavar="DIR", help="where stress.json, stress.md and the runs go")
    p.add_argument("--conditions", default=",".join(CONDITIONS), metavar="NAME,...",
                   help=f"conditions to run (default: all of {', '.join(CONDITIONS)})")
    p.add_argument("--seeds", default="0,1,2", metavar="S,...", help="seeds of the markets (default 0,1,2)")
    p.add_argument("--requests", type=int, default=6000, metavar="N",
                   help="requests per market (default 6000; small_5000 sets its own)")
    config.add_arguments(p, config_help="YAML config every run starts from (default: all defaults)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    names = [c for c in args.conditions.split(",") if c]
    unknown = sorted(set(names) - set(CONDITIONS))
    if unknown:
        raise InputError(f"--conditions: unknown {unknown}; expected from {list(CONDITIONS)}")
    try:
        seeds = [int(s) for s in args.seeds.split(",") if s]
    except ValueError:
        raise InputError(f"--seeds {args.seeds!r}: expected integers separated by commas") from None
    base = deep_merge(base_config(args), {"simulator": {"n_requests": args.requests}}, "")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    store_root = str((out / "_store").absolute())
    rows = []
    for condition in names:
        for seed in seeds:
            rows.append(run_one(condition, seed, base, out, store_root))
            write_results(out, rows)
            r = rows[-1]
            print(f"stress: {condition} seed {seed}: {r['verdict']} (truth gate: {r['truth_gate']}); "
                  f"est. OPM {lift_text(r['estimated_lift']['opm'])} vs true "
                  f"{lift_text(r['true_lift']['opm'])}"
                  f"{'; HARMFUL' if r['harmful'] else ''} ({r['seconds']:.0f} s)", flush=True)
    print(f"stress.md: {(out / 'stress.md').absolute()}")
    return 0


if __name__ == "__main__":
    sys.exit(grade.core.cli.run(main))
