"""Write simulated marketplace search logs (with ground truth) to a folder or s3:// prefix.

    python -m components.simulate --out URI [--config YAML] [--requests N] [--seed S] [--report]
                                  [--set SECTION.KEY=VALUE ...]

Output: Parquet files ``day=YYYY-MM-DD/part-NNNNN.parquet`` in the log contract's columns plus the
ground truth (true_ctr, true_cvr, price, true_segment), published atomically (``_MANIFEST.json`` last).
``--report`` also prints the true OPM/GPM/CTR headroom: static weights, the best global weight
vector, per-segment best weights and the per-request oracle, under the world's click model.
``simulator.logging``: static, or a model folder / registry version URI whose mean ranks the logged
lists (the served market, grade.release.served_market).
"""

from __future__ import annotations

import argparse
import json
import sys

from grade.core import cli, config


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m components.simulate", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, metavar="URI",
                   help="output folder or s3://bucket/prefix for the logs")
    config.add_arguments(p, ("simulator.n_requests", "simulator.seed"),
                         renamed={"simulator.n_requests": "--requests"},
                         config_help="YAML config; its `simulator` section is used (every key has a default)")
    p.add_argument("--report", action="store_true",
                   help="print the headroom of personalised fusion on the generated requests (true metrics)")
    p.add_argument("--report-requests", type=int, default=20000, metavar="N",
                   help="requests used for --report (the first N; default 20000)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from grade.data import simulator

    sections = config.from_args(args)
    cfg = sections["simulator"]
    cli.check_new_output(args.out)
    cli.log.info("simulator config: %s", json.dumps(config.to_dict(cfg), sort_keys=True))
    ranker = None
    if cfg.logging != "static":
        from grade.release.served_market import ServedMarket

        ranker = ServedMarket(cfg.logging, cfg.objectives, sections["serve"].explore)
    summary = simulator.write_logs(cfg, args.out, ranker)
    print(f"wrote {summary['rows']:,} rows ({summary['requests']:,} requests, {summary['files']} files) "
          f"to {summary['out']} in {summary['seconds']:.1f} s ({summary['rows_per_s']:,} rows/s)")
    if args.report:
        import pyarrow as pa

        tables, n = [], 0
        for t in simulator.generate(cfg):
            tables.append(t)
            n += t.num_rows // cfg.list_size
            if n >= args.report_requests:
                break
        table = pa.concat_tables(tables).slice(0, min(n, args.report_requests) * cfg.list_size)
        rep = simulator.headroom_report(table, cfg.objectives, list_size=cfg.list_size,
                                        depth=cfg.exposure_depth, eta=cfg.world(), seed=cfg.seed)
        print(simulator.format_headroom(rep))
    return 0


if __name__ == "__main__":
    sys.exit(cli.run(main))
