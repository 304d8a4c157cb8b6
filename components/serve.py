"""Serve the registry's production policy online: per-request fusion weights over HTTP (KServe).

    python -m components.serve --registry URI [--model-name NAME] [--port N] [--watch-seconds S]
                               [--unknown-categories reject|oov] [--version VERSION] [--threads N]
                               [--workers N] [--batch-rows N]

A KServe ModelServer (Open Inference Protocol v2 and v1) with one model, NAME (default grade-mtf):
the TorchScript policy the registry's `production` alias names, loaded only when its files match the
registry's content hash. The alias is checked every --watch-seconds; a newly promoted version is
loaded, verified and given its first (slow) TorchScript calls beside the served one and then swapped
in, so no request fails, waits for it or mixes versions.

  POST /v2/models/NAME/infer   inputs: the user/context features (one value per request), optionally
                               pred_<objective> [N, L] for L candidates; outputs: weights [N, K]
                               (rows on the simplex), with candidates scores [N, L] and ranking [N, L]
                               (best first); model_version names the version that answered.
                               With exploration on (config serve.explore.share > 0), a request_id
                               input [N] (int64) seeds each request's draw of the policy's Dirichlet
                               and the answer carries log_propensity [N] (null: served the mean)
  GET  /v2/models/NAME         every input and output with its datatype and shape
  POST /v1/models/NAME:predict {"instances": [{feature: value, ...}, ...]}
  GET  /v2/health/live, /v2/health/ready, /v2/models/NAME/ready; GET /metrics (Prometheus)

The server is grade/release/server.py: plain v2 JSON infer calls are answered by a gate in front of
KServe's REST stack (everything else goes through KServe's handlers), on uvloop, each response in one
write, no log line per request unless --access-log. Plain calls that reach a worker together are
answered by one policy call of at most --batch-rows request rows; a call alone is answered at once.

--workers N runs N such server processes on the port (default: one per core the container may use;
grade/core/http_server.py), each with its own policy and alias watch: each swaps on its own when the
alias moves, so for up to --watch-seconds plus a load after a promotion the processes may answer
different versions, and each response names the version that answered it. /metrics sums them all.

Bad requests (missing/extra/unknown inputs, wrong shapes, NaN, unknown categories, empty or too large
batches, bodies that are not JSON or over the size limit) get a 4xx naming the field.
Needs the `serve` extra (pip install 'grade-mtf[serve]'). S3 settings come from the environment.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys

from grade.core import cli, config
from grade.release import server
from grade.release.server import DEFAULT_BATCH_ROWS


def _rows(text: str) -> int:
    """An argparse type: a whole number of request rows, 0 or more."""
    if not text.isdigit():
        raise argparse.ArgumentTypeError(f"expected a whole number >= 0, got {text!r}")
    return int(text)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m components.serve", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--registry", required=True, metavar="URI", help="registry root (folder or s3:// prefix)")
    p.add_argument("--model-name", metavar="NAME",
                   help="registry model name and URL name (default: the config's shared.model_name)")
    config.add_arguments(p, config_help="YAML config; its shared.model_name is the default --model-name, "
                                        "its serve.explore the exploration (share 0.2 by default)")
    p.add_argument("--port", type=int, default=8080, metavar="N", help="HTTP port (default 8080)")
    p.add_argument("--watch-seconds", type=float, default=2.0, metavar="S",
                   help="how often the production alias is checked (default 2)")
    p.add_argument("--unknown-categories", choices=["reject", "oov"], default="reject",
                   help="reject: a category id the model never saw is a bad request (default); oov: "
                        "serve it as training does with rare ids (the out-of-vocabulary bucket)")
    p.add_argument("--version", metavar="VERSION",
                   help="serve this registered version instead of following the production alias (a canary "
                        "of a newly blessed version; see containers/inferenceservice.yaml)")
    p.add_argument("--threads", type=int, default=1, metavar="N",
                   help="torch intra-op threads (default 1: a small policy per call gains nothing from more, "
                        "and idle worker threads add wake-up latency; scale with replicas instead)")
    p.add_argument("--workers", type=int, default=0, metavar="N",
                   help="server processes on the port (default 0: one per core this process may use, i.e. "
                        "the container's CPU limit; each has its own model and alias watch, and a "
                        "response names the version of the process that answered)")
    p.add_argument("--batch-rows", type=_rows, default=DEFAULT_BATCH_ROWS, metavar="N",
                   help=f"calls that reach a worker together are answered by one policy call of at most N "
                        f"request rows (default {DEFAULT_BATCH_ROWS}; a call alone is never held back; "
                        f"0: one policy call per call)")
    p.add_argument("--listen-fd", type=int, help=argparse.SUPPRESS)  # a worker's inherited socket
    p.add_argument("--ready-fd", type=int, help=argparse.SUPPRESS)  # the first worker tells it is ready
    p.add_argument("--access-log", action="store_true",
                   help="log every request (off by default: a log line per call costs latency; "
                        "/metrics counts them)")
    p.add_argument("--wait-seconds", type=float, default=60.0, metavar="S",
                   help="how long to wait for a verified production model at start (default 60)")
    return p


def settings_of(args: argparse.Namespace) -> server.ServerSettings:
    """The server's settings from the parsed flags."""
    return server.ServerSettings(
        registry=args.registry, model_name=args.model_name, port=args.port, watch_seconds=args.watch_seconds,
        strict_categories=args.unknown_categories == "reject", version=args.version, threads=args.threads,
        workers=args.workers, batch_rows=args.batch_rows, listen_fd=args.listen_fd, ready_fd=args.ready_fd,
        access_log=args.access_log, wait_seconds=args.wait_seconds)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser().parse_args(argv)
    cfg = config.from_args(args)
    args.model_name = args.model_name or cfg["shared"].model_name
    worker = [sys.executable, "-m", "components.serve", *argv, "--workers", "1"]
    settings = dataclasses.replace(settings_of(args), explore=cfg["serve"].explore)
    return server.serve(settings, worker)


if __name__ == "__main__":
    sys.exit(cli.run(main))
