"""Upload the grade-mtf pipeline to a Kubeflow Pipelines endpoint; start a run or schedule retraining.

    python -m pipeline.submit --host URL [--run | --schedule CRON] [--config YAML]
                              [--experiment NAME] [--pipeline-name grade-mtf]
    python -m pipeline.submit --dry-run [--run | --schedule CRON] ...

--dry-run prints what would be uploaded and started (pipeline name, version, the run or recurring
run with its cron, every parameter) and contacts no host. A host that cannot be reached is one line
on stderr and exit status 1.

The pipeline is uploaded under --pipeline-name, or as a new version of it when it exists; a version
is named after the package's content hash, so submitting the same spec twice reuses the version.
Without --run or --schedule only the upload happens. --schedule takes KFP's 6-field cron (seconds
first, e.g. '0 0 3 * * *' = 03:00 every day); a recurring run never overlaps itself
(max_concurrency=1) and does not backfill missed intervals (no_catchup).

Pipeline arguments come from the config file (its text and the values of the tunable keys), plus
--logs, --registry and --snapshot-date. An authentication token, when the endpoint needs one, is
read from the KFP_TOKEN environment variable (never from the command line).
"""

import argparse
import datetime as dt
import hashlib
import json
import os
import re
import sys
import tempfile
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import grade.core.cli
from grade.core.errors import InputError
from pipeline import params

DEFAULT_EXPERIMENT = "grade-mtf"

# (name, smallest, largest, names usable instead of numbers) of the 6 cron fields, seconds first.
_CRON_FIELDS = (
    ("seconds", 0, 59, ()),
    ("minutes", 0, 59, ()),
    ("hours", 0, 23, ()),
    ("day of month", 1, 31, ()),
    ("month", 1, 12, ("JAN", "FEB", "MAR", "APR", "MAY", "JUN", "JUL", "AUG", "SEP", "OCT", "NOV", "DEC")),
    ("day of week", 0, 6, ("SUN", "MON", "TUE", "WED", "THU", "FRI", "SAT")),
)


def validate_cron(expression: str) -> str:
    """Return the expression when it is a valid 6-field cron (seconds first); else InputError."""
    fields = expression.split()
    if len(fields) != 6:
        hint = " (a 5-field cron? KFP's has seconds first: prepend '0 ')" if len(fields) == 5 else ""
        raise InputError(f"--schedule {expression!r}: expected 6 fields 'sec min hour day-of-month month "
                         f"day-of-week', got {len(fields)}{hint}")
    for text, (name, lo, hi, names) in zip(fields, _CRON_FIELDS, strict=True):
        for part in text.split(","):
            _check_cron_part(expression, part, name, lo, hi, names)
    return expression


def _check_cron_part(expression: str, part: str, name: str, lo: int, hi: int, names: tuple[str, ...]) -> None:
    def bad(why: str) -> InputError:
        return InputError(f"--schedule {expression!r}: {name} field '{part}': {why}")

    def number(token: str) -> int:
        if token.upper() in names:
            return names.index(token.upper()) + lo
        if not token.isdigit():
            raise bad(f"expected a number in {lo}-{hi}" + (f" or one of {'/'.join(names)}" if names else ""))
        value = int(token)
        if not lo <= value <= hi:
            raise bad(f"{value} is outside {lo}-{hi}")
        return value

    base, slash, step = part.partition("/")
    if slash and (not step.isdigit() or int(step) < 1):
        raise bad("the step after '/' must be a positive integer")
    if base == "*" or (base == "?" and name.startswith("day of")):
        return
    if not base:
        raise bad("empty")
    start, dash, end = base.partition("-")
    first = number(start)
    if dash and number(end) < first:
        raise bad("a range must go from low to high")


def package_version_name(pipeline_name: str, package: Path) -> str:
    """A version name that identifies the package's content (same spec -> same version)."""
    return f"{pipeline_name}-{hashlib.sha256(package.read_bytes()).hexdigest()[:12]}"


def upload(client: Any, package: Path, pipeline_name: str, description: str = "") -> tuple[str, str]:
    """Upload the pipeline, or a new version when it exists; returns (pipeline_id, version_id)."""
    pipeline_id = client.get_pipeline_id(pipeline_name)
    if pipeline_id is None:
        pipeline = client.upload_pipeline(str(package), pipeline_name=pipeline_name, description=description)
        pipeline_id = pipeline.pipeline_id
        newest = client.list_pipeline_versions(pipeline_id=pipeline_id, page_size=1,
                                               sort_by="created_at desc")
        version_id = newest.pipeline_versions[0].pipeline_version_id
        grade.core.cli.log.info("uploaded pipeline %s (%s), version %s", pipeline_name, pipeline_id,
                                version_id)
        return pipeline_id, version_id
    version_name = package_version_name(pipeline_name, package)
    same = client.list_pipeline_versions(pipeline_id=pipeline_id, page_size=1, filter=json.dumps(
        {"predicates": [{"key": "display_name", "operation": "EQUALS", "string_value": version_name}]}))
    if same.pipeline_versions:
        version_id = same.pipeline_versions[0].pipeline_version_id
        grade.core.cli.log.info("pipeline %s already has version %s (%s): reusing it", pipeline_name,
                           version_name, version_id)
        return pipeline_id, version_id
    version = client.upload_pipeline_version(str(package), pipeline_version_name=version_name,
                                             pipeline_id=pipeline_id, description=description)
    grade.core.cli.log.info("uploaded version %s (%s) of pipeline %s", version_name,
                       version.pipeline_version_id, pipeline_name)
    return pipeline_id, version.pipeline_version_id


def make_client(host: str, namespace: str | None) -> Any:
    import kfp

    return kfp.Client(host=host, namespace=namespace or "kubeflow",
                      existing_token=os.environ.get("KFP_TOKEN") or None)


def build_parser() -> argparse.ArgumentParser:
    from pipeline.grade_pipeline import DEFAULT_REGISTRY, PIPELINE_NAME

    p = argparse.ArgumentParser(prog="python -m pipeline.submit", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--host", metavar="URL",
                   help="KFP API endpoint, e.g. http://localhost:8080 (a port-forward of ml-pipeline-ui); "
                        "required unless --dry-run")
    p.add_argument("--dry-run", action="store_true",
                   help="print what would be uploaded and scheduled (name, version, cron, parameters); "
                        "no host is contacted")
    what = p.add_mutually_exclusive_group()
    what.add_argument("--run", action="store_true", help="start one run after uploading")
    what.add_argument("--schedule", metavar="CRON",
                      help="create a recurring run with this 6-field cron (seconds first), "
                           "e.g. '0 0 3 * * *'")
    p.add_argument("--config", metavar="YAML",
                   help="config file passed to every step (and its tunable values)")
    p.add_argument("--experiment", default=DEFAULT_EXPERIMENT, metavar="NAME",
                   help=f"experiment the run belongs to; created when missing "
                        f"(default: {DEFAULT_EXPERIMENT})")
    p.add_argument("--pipeline-name", default=PIPELINE_NAME, metavar="NAME",
                   help=f"name of the uploaded pipeline (default: {PIPELINE_NAME})")
    p.add_argument("--package", metavar="FILE",
                   help="compiled pipeline spec to upload "
                        "(default: compile now, with --image/--gpu/--s3-secret)")
    p.add_argument("--image", metavar="IMAGE", help="component image when compiling (see pipeline.compile)")
    p.add_argument("--gpu", action="store_true", help="compile with one GPU per training step")
    p.add_argument("--s3-secret", metavar="NAME",
                   help="Kubernetes Secret with the S3 endpoint and credentials")
    p.add_argument("--namespace", metavar="NS", help="Kubernetes namespace (multi-user deployments)")
    p.add_argument("--logs", default="", metavar="URI",
                   help="raw Parquet logs, e.g. s3://grade/logs/2026-01-01 (default: simulate)")
    p.add_argument("--window-days", type=int, default=7, metavar="N",
                   help="with a --logs pattern containing {date} (e.g. s3://grade/logs/dt={date}): "
                        "train on the N days up to each run's schedule date (default 7)")
    p.add_argument("--registry", metavar="URI", help=f"model registry root (default: {DEFAULT_REGISTRY})")
    p.add_argument("--snapshot-date", metavar="YYYY-MM-DD",
                   help="date of the data, part of every cache key (default for --run: today, UTC)")
    p.add_argument("--pretrain-workers", type=int, default=1, metavar="N",
                   help="data-parallel processes of the pretrain step (torchrun in its pod; default 1)")
    p.add_argument("--finetune-workers", type=int, default=1, metavar="N",
                   help="data-parallel processes of the finetune steps (default 1)")
    p.add_argument("--ablations", action="store_true",
                   help="also fine-tune and evaluate the ablations (a separate report)")
    p.add_argument("--run-name", metavar="NAME", help="name of the run or recurring run")
    p.add_argument("--no-cache", action="store_true", help="run every step even when a cached result exists")
    return p


def plan(args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    """Everything ``args`` ask for, checked, without contacting a host: the package (compiled into
    ``workdir`` unless given), its content-named version, the pipeline arguments and what to start."""
    if args.schedule:
        validate_cron(args.schedule)
    if args.config and not Path(args.config).is_file():
        raise InputError(f"{args.config}: config file not found")
    today = dt.datetime.now(dt.timezone.utc).date().isoformat()
    snapshot = args.snapshot_date or ("" if args.schedule else today)
    if snapshot and not re.fullmatch(r"\d{4}-\d{2}-\d{2}", snapshot):
        raise InputError(f"--snapshot-date {snapshot!r}: expected YYYY-MM-DD")
    arguments = params.pipeline_arguments(args.config, logs=args.logs, registry=args.registry,
                                          snapshot_date=snapshot, ablations=args.ablations,
                                          pretrain_workers=args.pretrain_workers,
                                          finetune_workers=args.finetune_workers)
    if args.window_days < 1:
        raise InputError(f"--window-days {args.window_days}: expected a number of days >= 1")
    arguments["window_days"] = args.window_days
    package = Path(args.package) if args.package else None
    if package is None:
        from pipeline.compile import compile_pipeline

        package = compile_pipeline(workdir / "pipeline.yaml", gpu=args.gpu, image=args.image,
                                   s3_secret=args.s3_secret)
    elif not package.is_file():
        raise InputError(f"{package}: pipeline package not found")
    from grade.data.window import is_partitioned

    stamp = dt.datetime.now(dt.timezone.utc).strftime("%Y%m%d-%H%M%S")
    action = "run" if args.run else "recurring run" if args.schedule else "upload only"
    job = (args.run_name or f"{args.pipeline_name}-{stamp}" if args.run
           else args.run_name or f"{args.pipeline_name}-retrain" if args.schedule else None)
    # KFP v2 does not expand [[ScheduledTime]] in recurring-run parameters
    # (kubeflow/pipelines#12494): with a fixed prefix the snapshot date cannot key the cache per
    # run, so such retraining runs without the cache. With a {date} pattern the window step
    # resolves the run's schedule time inside the pipeline and its partitions key the cache.
    caching = not args.no_cache and (is_partitioned(args.logs) if args.schedule else True)
    return {"package": package, "pipeline_name": args.pipeline_name,
            "version_name": package_version_name(args.pipeline_name, package), "action": action,
            "job_name": job, "experiment": args.experiment, "cron": args.schedule, "caching": caching,
            "arguments": arguments}


def describe(p: dict[str, Any]) -> str:
    """The dry run's report: what would be uploaded and started."""
    lines = ["dry run: nothing uploaded, no host contacted",
             f"pipeline: {p['pipeline_name']} (package {p['package']})",
             f"version: {p['version_name']} (a new pipeline's first version takes the pipeline's name)",
             f"action: {p['action']}"]
    if p["job_name"]:
        lines += [f"experiment: {p['experiment']}", f"name: {p['job_name']}", f"caching: {p['caching']}"]
    if p["cron"]:
        lines.append(f"cron: {p['cron']} (max_concurrency 1, no catch-up)")
    lines.append("parameters:")
    lines += [f"  {k}: {json.dumps(v)}" for k, v in sorted(p["arguments"].items())]
    return "\n".join(lines)


class HostUnreachable(Exception):
    """The KFP endpoint did not answer (connection refused, DNS, timeout) or answered with an error."""


def _contact_errors() -> tuple[type[BaseException], ...]:
    import urllib3

    errors: list[type[BaseException]] = [urllib3.exceptions.HTTPError, ConnectionError, TimeoutError]
    try:
        from kfp_server_api.exceptions import ApiException

        errors.append(ApiException)
    except ImportError:
        pass
    return tuple(errors)


def _host_name(host: str) -> str:
    """The host as shown in messages: without any user:password@ part."""
    parsed = urlparse(host)
    if parsed.username is None and parsed.password is None:
        return host
    return parsed._replace(netloc=parsed.hostname + (f":{parsed.port}" if parsed.port else "")).geturl()


def submit(args: argparse.Namespace, client: Any | None = None) -> dict[str, Any]:
    """Upload, then run or schedule as ``args`` say; returns the ids that were created or reused."""
    if not args.host and client is None:
        raise InputError("--host URL is required (or --dry-run to see what would be submitted)")
    with tempfile.TemporaryDirectory(prefix="grade-submit-") as tmp:
        p = plan(args, Path(tmp))
        try:
            return _act(args, p, client or make_client(args.host, args.namespace))
        except _contact_errors() as e:
            reason = getattr(e, "reason", None) or getattr(e, "status", None) or type(e).__name__
            raise HostUnreachable(f"--host {_host_name(args.host or '')}: the KFP endpoint did not answer "
                                  f"({str(reason).splitlines()[0][:200]})") from None


def _act(args: argparse.Namespace, p: dict[str, Any], client: Any) -> dict[str, Any]:
    from pipeline.grade_pipeline import PIPELINE_DESCRIPTION

    pipeline_id, version_id = upload(client, p["package"], p["pipeline_name"], PIPELINE_DESCRIPTION)
    result: dict[str, Any] = {"pipeline_id": pipeline_id, "version_id": version_id}
    if p["job_name"] is None:
        return result
    experiment = client.create_experiment(args.experiment, namespace=args.namespace)
    result["experiment_id"] = experiment.experiment_id
    if args.run:
        run = client.run_pipeline(experiment_id=experiment.experiment_id, job_name=p["job_name"],
                                  params=p["arguments"], pipeline_id=pipeline_id, version_id=version_id,
                                  enable_caching=p["caching"])
        result["run_id"] = run.run_id
    else:
        recurring = client.create_recurring_run(
            experiment_id=experiment.experiment_id, job_name=p["job_name"],
            description=f"scheduled retraining: {args.schedule}",
            cron_expression=args.schedule, max_concurrency=1, no_catchup=True, params=p["arguments"],
            pipeline_id=pipeline_id, version_id=version_id, enabled=True, enable_caching=p["caching"])
        result["recurring_run_id"] = recurring.recurring_run_id
    return result


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.dry_run:
        with tempfile.TemporaryDirectory(prefix="grade-submit-") as tmp:
            print(describe(plan(args, Path(tmp))))
        return 0
    try:
        result = submit(args)
    except HostUnreachable as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    for key, value in result.items():
        print(f"{key}: {value}")
    return 0


if __name__ == "__main__":
    sys.exit(grade.core.cli.run(main))
