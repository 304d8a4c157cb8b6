"""Run the whole grade-mtf pipeline on this machine through KFP's local runner.

    python -m pipeline.run_local [--config YAML] --out DIR [--workdir DIR] [--store URI]
                                 [--logs URI] [--registry URI] [--runner subprocess|docker [--image TAG]]
                                 [--window-days N] [--schedule-time ISO] [--verbose]

Every step runs once as a subprocess in this Python environment (``SubprocessRunner(use_venv=False)``;
no task retries: the object store retries transient errors itself), or with ``--runner docker`` in
the project image (``make image``) through KFP's DockerRunner; artifacts land under
WORKDIR/pipeline-root. The terminal shows a line when a step starts and ends and, in between, the
step's progress (rate, ETA) at most every 10 s; the runner's verbose output (every
task's log and outputs) goes to WORKDIR/logs/run-<time>.log, whose path is printed (--verbose: to
the terminal instead).

--logs may be a daily partition pattern with a {date} field (e.g. s3://grade/logs/dt={date}): the
run then trains on the --window-days days up to --schedule-time (default: now), as a scheduled run
on a cluster does with its schedule time.

Data and registry live under --store: a local folder (WORKDIR/store) by default, or on S3 when
S3_ENDPOINT_URL is set (default s3://grade/run-local; the AWS_* credentials come from the
environment). On a local store the pipeline simulates its logs itself; on S3 the simulated logs are
written to STORE/logs/simulated-<config hash> first (once per simulator config) and the pipeline
reads them from there, like production logs. --logs gives your own logs instead. A second run
evaluates the new candidate against the production model the first one promoted. At the end,
report.json, report.html and blessing.json are copied to DIR and a summary (lifts with CIs,
promotion verdict) is printed with their paths.
"""

import argparse
import datetime as dt
import json
import os
import re
import shutil
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import grade.core.cli
from grade.core import store
from grade.core.errors import InputError
from grade.release.blessing import Blessing
from pipeline import params
from pipeline.grade_pipeline import PIPELINE_NAME

PROJECT_ROOT = Path(__file__).resolve().parent.parent
#: The store when S3_ENDPOINT_URL is set and --store is not given (the compose file creates the bucket).
DEFAULT_S3_STORE = "s3://grade/run-local"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m pipeline.run_local", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", metavar="YAML",
                   help="config file passed to every step (default: all defaults)")
    p.add_argument("--out", required=True, metavar="DIR",
                   help="where report.json, report.html and blessing.json are copied at the end")
    p.add_argument("--workdir", metavar="DIR",
                   help="pipeline root (artifacts of every run) and the local store (default: DIR/_work)")
    p.add_argument("--store", metavar="URI",
                   help="root of the registry (and, on S3, of the simulated logs): a local folder or "
                        "s3://bucket/prefix (needs S3_ENDPOINT_URL, AWS_ACCESS_KEY_ID, "
                        "AWS_SECRET_ACCESS_KEY); "
                        f"default: {DEFAULT_S3_STORE} when S3_ENDPOINT_URL is set, else WORKDIR/store")
    p.add_argument("--registry", metavar="URI", help="model registry root (default: STORE/registry)")
    p.add_argument("--logs", default="", metavar="URI",
                   help="raw Parquet logs (folder or s3:// prefix) to train on instead of simulating")
    p.add_argument("--snapshot-date", metavar="YYYY-MM-DD", help="date of the data (default: today, UTC)")
    p.add_argument("--pretrain-workers", type=int, default=1, metavar="N",
                   help="data-parallel processes of the pretrain step (torchrun; default 1)")
    p.add_argument("--finetune-workers", type=int, default=1, metavar="N",
                   help="data-parallel processes of the finetune steps (default 1)")
    p.add_argument("--ablations", action="store_true",
                   help="also fine-tune and evaluate the ablations (copied to DIR/ablations/)")
    p.add_argument("--runner", choices=RUNNERS, default="subprocess",
                   help="subprocess: every step in this Python environment (default); docker: every step "
                        "in a container of --image (needs a Docker daemon and the Python docker package)")
    p.add_argument("--image", metavar="TAG", help=f"image of --runner docker (default: {default_image()})")
    p.add_argument("--window-days", type=int, default=7, metavar="N",
                   help="with a --logs pattern containing {date}: days up to the schedule date (default 7)")
    p.add_argument("--schedule-time", default="", metavar="ISO",
                   help="the schedule time a --logs {date} pattern's window ends at (default: now, UTC)")
    p.add_argument("--verbose", action="store_true",
                   help="stream the runner's output (task logs, outputs) to the terminal, not to a log file")
    return p


RUNNERS = ("subprocess", "docker")


def default_image() -> str:
    """The image ``make image`` builds: GRADE_IMAGE, else the project name and version."""
    from grade import __version__

    return os.environ.get("GRADE_IMAGE") or f"grade-mtf:{__version__}"


def _check_s3(uri: str, flag: str) -> None:
    if store.is_s3(uri) and not os.environ.get("S3_ENDPOINT_URL"):
        raise InputError(f"{flag} {uri}: an s3:// URI needs S3_ENDPOINT_URL (and AWS_ACCESS_KEY_ID, "
                         "AWS_SECRET_ACCESS_KEY) in the environment")


def simulated_logs(store_uri: str, config_path: str | None) -> str:
    """Simulated logs under ``store_uri``, written once per simulator config (the simulator is
    deterministic, so the config's hash names the data); returns their URI."""
    import hashlib

    from grade.core import config
    from grade.data import simulator

    cfg = config.load_section(config_path, "simulator")
    digest = hashlib.sha256(json.dumps(config.to_dict(cfg), sort_keys=True).encode()).hexdigest()[:12]
    uri = store.join(store_uri, "logs", f"simulated-{digest}")
    if store.is_published(uri):
        grade.core.cli.log.info("run_local: simulated logs already in %s", uri)
    else:
        simulator.write_logs(cfg, uri)
    return uri


#: Environment variables a container step gets from this process: the object store's endpoint and
#: credentials (never in argv or in the pipeline spec).
S3_ENV = ("S3_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_REGION")


def docker_runner(image: str, shared: list[Path], pipeline_root: Path):
    """KFP's DockerRunner for ``image``: the local folders in ``shared`` (the store, the logs) mounted at
    their own paths (the runner mounts ``pipeline_root`` itself), the host's network (an S3 endpoint
    on loopback), the S3 settings from this environment, and this user's uid unless it is root (then
    the image's non-root user, and the folders it writes to are opened to it)."""
    import docker
    from docker.types import Mount
    from kfp import local

    try:
        docker.from_env().images.get(image)
    except docker.errors.ImageNotFound:
        raise InputError(f"--image {image}: no such image here (build it with `make image`)") from None
    except docker.errors.DockerException as e:
        raise InputError(f"--runner docker: no Docker daemon answers ({e})") from None
    args: dict[str, Any] = {"network_mode": "host",
                            "environment": {k: os.environ[k] for k in S3_ENV if k in os.environ},
                            "mounts": [Mount(target=str(p), source=str(p), type="bind") for p in shared]}
    if os.getuid() != 0:
        args["user"] = f"{os.getuid()}:{os.getgid()}"
    else:
        for folder in (pipeline_root, *shared):
            folder.chmod(0o777)
    return local.DockerRunner(**args)


def run_pipeline(arguments: dict[str, Any], pipeline_root: Path, *, runner: str = "subprocess",
                 image: str | None = None, shared: list[Path] | None = None,
                 log_path: Path | None = None) -> Path:
    """Run the pipeline with ``arguments`` under ``pipeline_root``; returns the run's folder.

    ``runner``: "subprocess" or "docker" (in ``image``, with the local folders ``shared`` mounted);
    ``log_path``: where the runner's verbose output goes (None: the terminal)."""
    import contextlib

    from kfp import local

    from pipeline.grade_pipeline import build_pipeline
    from pipeline.progress import quiet_runner_output

    pipeline_root.mkdir(parents=True, exist_ok=True)
    if runner == "docker":
        image = image or default_image()
        kfp_runner = docker_runner(image, shared or [], pipeline_root)
    else:
        # Task subprocesses import this project from its source tree, installed or not.
        path = os.environ.get("PYTHONPATH", "")
        if str(PROJECT_ROOT) not in path.split(os.pathsep):
            os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (str(PROJECT_ROOT), path) if p)
        kfp_runner = local.SubprocessRunner(use_venv=False)
    before = {p.name for p in pipeline_root.iterdir()}
    local.init(runner=kfp_runner, pipeline_root=str(pipeline_root), raise_on_error=True)
    output = quiet_runner_output(log_path) if log_path else contextlib.nullcontext()
    with warnings.catch_warnings(), output:
        # The local runner ignores the image, Kubernetes settings and resources; it says so per task.
        warnings.simplefilter("ignore", RuntimeWarning)
        warnings.simplefilter("ignore", UserWarning)
        build_pipeline(retries=False, image=image if runner == "docker" else None,
                       backend_schedule_time=False)(**arguments)
    runs = sorted(p for p in pipeline_root.iterdir()
                  if p.name not in before and p.name.startswith(PIPELINE_NAME))
    if len(runs) != 1:
        raise RuntimeError(f"{pipeline_root}: expected one new run folder, found {[p.name for p in runs]}")
    return runs[0]


def find_outputs(run_dir: Path) -> dict[str, Path]:
    """The report folders (main and ablations) and the blessing file of a finished local run."""
    found: dict[str, Path] = {}
    for report_json in sorted(run_dir.glob("evaluate*/report/report.json")):
        policies = json.loads(report_json.read_text()).get("policies", {})
        key = "ablations" if any(name in policies for name in params.ABLATIONS) else "report"
        found[key] = report_json.parent
    blessings = sorted(p for p in run_dir.glob("promote*/blessing") if p.exists())
    if blessings:
        found["blessing"] = blessings[0]
    if "report" not in found:
        raise RuntimeError(f"{run_dir}: the run left no evaluation report")
    return found


def _blessing_file(path: Path) -> Path:
    """The blessing artifact is a JSON file, or a folder holding blessing.json."""
    return path / "blessing.json" if path.is_dir() else path


def summary(report: dict[str, Any], blessing: Blessing | None) -> str:
    """The evaluation table (metrics, lifts vs static with CIs), lifts vs the incumbent, the verdict."""
    from grade.evaluate.summary import format_table

    lines = [format_table(report)]
    vs_incumbent = report.get("lift_vs_incumbent", {}).get("grade", {})
    flavour = report.get("primary_flavour", "true")
    if vs_incumbent.get(flavour):
        cells = [f"{m.upper()} {100 * v['lift']:+.2f}% [{100 * v['ci_low']:+.2f}, {100 * v['ci_high']:+.2f}]"
                 for m, v in vs_incumbent[flavour].items() if isinstance(v, dict) and "lift" in v]
        lines.append("grade vs incumbent: " + ", ".join(cells))
    if blessing is not None:
        lines.append(f"promotion: {blessing.verdict}")
        lines += [f"  - {r}" for r in blessing.reasons]
    return "\n".join(lines)


def check_window(logs: str, window_days: int, schedule_time: str) -> str:
    """With a ``{date}`` pattern as logs: the window's description (bad input, e.g. an empty window,
    exits 2 here, before any task runs); otherwise ''."""
    from grade.data import window

    if not window.is_partitioned(logs):
        return ""
    return window.resolve(logs, window.schedule_time(schedule_time), window_days).describe()


def run_local(config_path: str | None, out: str | Path, *, workdir: str | Path | None = None,
              store_uri: str | None = None, registry: str | None = None, logs: str = "",
              snapshot_date: str | None = None, ablations: bool = False, pretrain_workers: int = 1,
              finetune_workers: int = 1, runner: str = "subprocess", image: str | None = None,
              window_days: int = 7, schedule_time: str = "", verbose: bool = True) -> dict[str, Any]:
    """Run the pipeline locally; copy the report and blessing to ``out``; return what was found.

    ``verbose=False`` sends the runner's output to WORKDIR/logs/run-<time>.log (the "runner_log" key)."""
    out = Path(out)
    workdir = Path(workdir) if workdir else out / "_work"
    if not store_uri:
        store_uri = (DEFAULT_S3_STORE if os.environ.get("S3_ENDPOINT_URL")
                     else str((workdir / "store").absolute()))
    registry = registry or store.join(store_uri, "registry")
    for uri, flag in ((store_uri, "--store"), (registry, "--registry"), (logs, "--logs")):
        _check_s3(uri, flag)
    if not logs and store.is_s3(store_uri):
        logs = simulated_logs(store_uri, config_path)
    snapshot_date = snapshot_date or dt.datetime.now(dt.timezone.utc).date().isoformat()
    if schedule_time:
        from grade.data.window import parse_time

        schedule_time = parse_time(schedule_time, "--schedule-time").isoformat()
    if logs and not store.is_s3(logs):
        if "{date}" not in logs and not Path(logs).exists():
            raise InputError(f"--logs {logs}: no such file or folder")
        logs = str(Path(logs).absolute())
    window = check_window(logs, window_days, schedule_time)
    if not store.is_s3(registry):
        registry = str(Path(registry).absolute())
        Path(registry).mkdir(parents=True, exist_ok=True)
    arguments = params.pipeline_arguments(config_path, logs=logs, registry=registry,
                                          snapshot_date=snapshot_date, ablations=ablations,
                                          pretrain_workers=pretrain_workers,
                                          finetune_workers=finetune_workers)
    arguments.update({"window_days": int(window_days), "schedule_time": schedule_time})
    # A {date} pattern's partitions live in the folder above the pattern's first field.
    logs_root = str(Path(logs.split("{date}")[0]).parent) if "{date}" in logs else logs
    shared = [Path(u) for u in (registry, logs_root) if u and not store.is_s3(u)]
    log_path = None if verbose else (workdir / "logs" /
                                     f"run-{dt.datetime.now().strftime('%Y%m%dT%H%M%S')}.log").absolute()
    if log_path:
        print(f"runner log (task logs and outputs): {log_path}", flush=True)
    start = time.monotonic()
    run_dir = run_pipeline(arguments, (workdir / "pipeline-root").absolute(), runner=runner, image=image,
                           shared=shared, log_path=log_path)
    elapsed = time.monotonic() - start
    found = find_outputs(run_dir)

    out.mkdir(parents=True, exist_ok=True)
    for name in ("report.json", "report.html"):
        shutil.copyfile(found["report"] / name, out / name)
    if "ablations" in found:
        (out / "ablations").mkdir(exist_ok=True)
        for name in ("report.json", "report.html"):
            shutil.copyfile(found["ablations"] / name, out / "ablations" / name)
    blessing = None
    if "blessing" in found:
        shutil.copyfile(_blessing_file(found["blessing"]), out / "blessing.json")
        path = out / "blessing.json"
        blessing = Blessing.from_json(json.loads(path.read_text()), str(path))
    report = json.loads((out / "report.json").read_text())
    return {"run_dir": run_dir, "registry": registry, "logs": window or logs or "simulated in the pipeline",
            "runner_log": log_path,
            "report": report, "blessing": blessing, "elapsed_s": elapsed, "out": out}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.config:
        params.arguments_from_config(args.config)  # a bad config is bad input (exit 2) before any task runs
    workdir = Path(args.workdir) if args.workdir else Path(args.out) / "_work"
    try:
        result = run_local(args.config, args.out, workdir=workdir, store_uri=args.store,
                           registry=args.registry, logs=args.logs, snapshot_date=args.snapshot_date,
                           ablations=args.ablations, pretrain_workers=args.pretrain_workers,
                           finetune_workers=args.finetune_workers, runner=args.runner, image=args.image,
                           window_days=args.window_days, schedule_time=args.schedule_time,
                           verbose=args.verbose)
    except RuntimeError as e:
        message = re.sub(r"\x1b\[[0-9;]*m", "", str(e))  # the local runner colours its messages
        logs = sorted((workdir / "logs").glob("run-*.log")) if not args.verbose else []
        if logs:
            from pipeline.progress import tail

            print(tail(logs[-1]), file=sys.stderr)
            print(f"error: {message} (the end of the runner log is above; all of it: {logs[-1]})",
                  file=sys.stderr)
        else:
            print(f"error: {message} (the failed task's log is above)", file=sys.stderr)
        return 1
    out = result["out"].absolute()
    print()
    print(summary(result["report"], result["blessing"]))
    print(f"pipeline finished in {result['elapsed_s']:.0f} s; artifacts: {result['run_dir']}")
    if result["runner_log"]:
        print(f"runner log: {result['runner_log']}")
    print(f"logs: {result['logs']}")
    print(f"registry: {result['registry']}")
    print(f"report.json: {out / 'report.json'}")
    if result["blessing"] is not None:
        print(f"blessing.json: {out / 'blessing.json'}")
    print(f"report.html: {out / 'report.html'}")
    return 0


if __name__ == "__main__":
    sys.exit(grade.core.cli.run(main))
