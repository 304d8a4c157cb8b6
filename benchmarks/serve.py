"""Online serving latency and throughput over HTTP (loopback), next to the in-process policy and two floors.

``python -m components.serve`` answers v2 infer requests of batch 1 and batch 64 from 16 concurrent
keep-alive connections for a bounded time per run, repeated; the medians over the runs are reported
with every run beside them. The production alias is moved twice during each run, and every failed
request is counted. The load client runs in its own process (asyncio, raw HTTP/1.1) so that it takes
little of the cores it shares with the server; its CPU share and the server's are reported, with the
server's CPU time per request (the figure a busy machine disturbs least).

References, measured the same way:

- in process: the TorchScript call alone and the whole ``serving.predict`` on the same batch (the
  ratio of the HTTP p50 to the TorchScript call is the serving overhead);
- exploration (``serve.explore``): the server with every request exploring (share 1, the most a
  share can cost) against the same server serving the mean, at batch 64 (``explore`` in the output:
  requests/s ratio, target >= 0.9), and in process the whole ``serving.predict`` with exploration at
  shares 0.1 and 1 against it without, alternated over rounds (medians of the per-round ratios);
- floors: the same server stack (KServe's ModelServer behind ``RequestGate``, uvloop, no log line per
  request) with a model that answers constant weights without reading its inputs, and a bare uvicorn
  app that answers a constant body: what a Python server on this stack can reach on this machine.
  The batch-1 p99 is reported as a ratio to the KServe floor's (``p99_vs_kserve_floor``, target
  <= 1.5), measured in the same run with the same settings and load client; ``targets`` says whether
  that and >= 2,000 requests/s at batch 64 are met. The floor sees no alias moves; the server does.

The server and the floors run with ``--workers`` processes (default: the server's own default, one
per core); the server's CPU time counts every process of it.

    python -m benchmarks.serve [--seconds 5] [--repeats 3] [--clients 16] [--no-floors] [--workers N]
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import os
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import numpy as np
import torch

from benchmarks._common import emit, timeit

MODEL = "grade-mtf"
#: objectives of the floors' constant answer (the demo policy's K)
FLOOR_K = 3
#: recorded after this much load (connections open, first calls paid)
WARMUP_S = 0.5
#: the batch-1 p99 the server should reach, as a multiple of KServe's constant-answer floor's in the same run
P99_VS_FLOOR_TARGET = 1.5
#: the batch-64 requests/s the server should sustain
BATCH_64_TARGET = 2000
#: the share of requests the exploring server draws weights for (all: the most exploration can cost)
EXPLORE_SHARE = 1.0
#: the exploring server's batch-64 requests/s should stay at least this share of the same server's without
EXPLORE_TARGET = 0.9


def demo_registry(root: Path, n_versions: int = 3, n_requests: int = 200) -> dict[str, Any]:
    """Simulated logs, their features and a registry with ``n_versions`` registered policies (random,
    personalised weights), the first in production. Returns the paths, the spec and the model folders."""
    from grade.data.features import FeaturesConfig, extract_features
    from grade.data.simulator import SimulatorConfig, write_logs
    from grade.model.registry import Registry
    from tests.sim_tensors import publish_random_policy

    logs, feats = str(root / "logs"), str(root / "feats")
    write_logs(SimulatorConfig(n_requests=n_requests, n_users=80, n_items=1500, n_days=2, list_size=20), logs)
    spec = extract_features(logs, feats, FeaturesConfig())
    models = [str(root / f"model-{seed}") for seed in range(1, n_versions + 1)]
    for seed, uri in enumerate(models, start=1):
        publish_random_policy(feats, uri, seed=seed)
    registry = Registry(str(root / "registry"), MODEL)
    first = promote(registry, models[0])
    return {"logs": logs, "spec": spec, "registry": registry, "models": models, "first": first}


def promote(registry, model_uri: str) -> str:
    """Register ``model_uri`` (or find its version) and move the production alias to it; returns the
    version."""
    version, _ = registry.register(model_uri)
    current = registry.production()
    registry.set_production(version, "serving benchmark", expected_etag=current[1] if current else None)
    return version


def start_server(registry_root: str | None, port: int, log_file: Path, watch_seconds: float = 0.2,
                 timeout_s: float = 90, floor: str | None = None, workers: int = 0,
                 batch_rows: int | None = None, extra: tuple[str, ...] = ()) -> subprocess.Popen:
    """``python -m components.serve`` with ``workers`` processes (0: its default) and ``--batch-rows``
    (None: its default) on loopback ``port`` (or the ``floor`` server of this module: "kserve" or
    "bare"), its output in ``log_file`` (a pipe nobody reads would stall it); returned once its model
    answers ready."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    if floor:
        command = ["-m", "benchmarks.serve", "--floor-server", floor, "--port", str(port),
                   "--workers", str(workers)]
    else:
        command = ["-m", "components.serve", "--registry", registry_root, "--port", str(port),
                   "--watch-seconds", str(watch_seconds), "--workers", str(workers)]
        if batch_rows is not None:
            command += ["--batch-rows", str(batch_rows)]
        command += list(extra)
    with open(log_file, "w") as log:
        proc = subprocess.Popen([sys.executable, *command], env=env, stdout=log, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/v2/models/{MODEL}/ready", timeout=2):
                return proc
        except (urllib.error.URLError, OSError):  # refused, or waiting in the backlog of a starting worker
            if proc.poll() is not None or time.monotonic() > deadline:
                stop_server(proc)
                raise RuntimeError(f"the server did not start:\n{Path(log_file).read_text()}") from None
            time.sleep(0.3)


def stop_server(proc: subprocess.Popen) -> None:
    """SIGTERM (the server drains its connections), then SIGKILL after 30 s."""
    proc.terminate()
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def v2_body(spec: dict[str, Any], batch: int, seed: int = 0, with_ids: bool = False) -> bytes:
    """A v2 infer request of ``batch`` requests with known feature values (and request ids 0..batch-1
    ``with_ids``: what seeds exploration's draws)."""
    from grade.release.serving import REQUEST_ID, input_metadata

    rng = np.random.default_rng(seed)
    vocab = {c["name"]: c["vocab"] for c in spec["categorical"]}
    inputs = []
    for i in input_metadata(spec):
        if i["name"].startswith("pred_") or (i["name"] == REQUEST_ID and not with_ids):
            continue
        data = (rng.choice(vocab[i["name"]], batch).tolist() if i["name"] in vocab
                else list(range(batch)) if i["name"] == REQUEST_ID
                else rng.normal(size=batch).round(4).tolist())
        inputs.append({"name": i["name"], "datatype": i["datatype"], "shape": [batch], "data": data})
    return json.dumps({"inputs": inputs}).encode()


# ------------------------------------------------------------------------------------------------
# The load client (its own process)
# ------------------------------------------------------------------------------------------------

def cpu_seconds(pid: int) -> float | None:
    """User + system CPU seconds so far of process ``pid`` and its running descendants (the server's
    worker processes; Linux /proc; None elsewhere)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        children = [int(c) for t in Path(f"/proc/{pid}/task").iterdir()
                    for c in (t / "children").read_text().split()]
    except OSError:
        return None
    own = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return own + sum(cpu_seconds(c) or 0.0 for c in children)


async def _connection(port: int, request: bytes, window: list[float], latencies: list, failures: list):
    """One keep-alive connection sending ``request`` until ``window[1]``; latencies after ``window[0]``."""
    while time.monotonic() < window[1]:
        try:
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
        except OSError as e:
            failures.append(repr(e))
            await asyncio.sleep(0.01)
            continue
        try:
            while time.monotonic() < window[1]:
                t0 = time.perf_counter()
                writer.write(request)
                head = await reader.readuntil(b"\r\n\r\n")
                length = next((int(line[15:]) for line in head.split(b"\r\n")
                               if line[:15].lower() == b"content-length:"), 0)
                payload = await reader.readexactly(length)
                if time.monotonic() >= window[0]:
                    latencies.append(time.perf_counter() - t0)
                    if head[9:12] != b"200":
                        failures.append((head[:12] + payload[:200]).decode(errors="replace"))
        except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError) as e:
            failures.append(repr(e))
        finally:
            writer.close()


async def _load(port: int, body: bytes, path: str, seconds: float, clients: int,
                server_pid: int | None) -> dict[str, Any]:
    request = (f"POST {path} HTTP/1.1\r\nhost: 127.0.0.1\r\ncontent-type: application/json\r\n"
               f"content-length: {len(body)}\r\n\r\n").encode() + body
    start = time.monotonic() + WARMUP_S
    window = [start, start + seconds]
    latencies: list[float] = []
    failures: list[str] = []
    tasks = [asyncio.ensure_future(_connection(port, request, window, latencies, failures))
             for _ in range(clients)]
    await asyncio.sleep(max(0.0, start - time.monotonic()))
    print("go", flush=True)  # the parent times the alias moves from here
    cpu0, server0 = os.times(), cpu_seconds(server_pid) if server_pid else None
    await asyncio.gather(*tasks)
    elapsed = time.monotonic() - start
    cpu1, server1 = os.times(), cpu_seconds(server_pid) if server_pid else None
    lat = np.asarray(latencies) * 1e3
    client_cpu = (cpu1.user - cpu0.user) + (cpu1.system - cpu0.system)
    server_cpu = server1 - server0 if server0 is not None and server1 is not None else None
    cores = os.cpu_count() or 1
    return {"requests": len(lat), "failed": len(failures), "failures_sample": failures[:3],
            "p50_ms": float(np.median(lat)) if len(lat) else None,
            "p99_ms": float(np.quantile(lat, 0.99)) if len(lat) else None,
            "requests_per_s": len(lat) / elapsed,
            "client_cpu_share": client_cpu / elapsed / cores,
            "server_cpu_share": server_cpu / elapsed / cores if server_cpu is not None else None,
            "server_cpu_us_per_request": (server_cpu / max(1, len(lat)) * 1e6
                                          if server_cpu is not None else None)}


def client_main(args: argparse.Namespace) -> None:
    """The load client's process: one JSON line of results on stdout after the line 'go'."""
    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass
    body = Path(args.body).read_bytes()
    result = asyncio.run(_load(args.port, body, args.path, args.seconds, args.clients, args.server_pid))
    print(json.dumps(result), flush=True)


def load_run(port: int, body: bytes, clients: int, seconds: float, server_pid: int, moves: list,
             tmp: Path) -> dict[str, Any]:
    """One run of the load client on ``port`` for ``seconds``; the callables in ``moves`` run at evenly
    spaced times while it measures."""
    body_file = tmp / "body.json"
    body_file.write_bytes(body)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    proc = subprocess.Popen([sys.executable, "-m", "benchmarks.serve", "--client", "--port", str(port),
                             "--body", str(body_file), "--path", f"/v2/models/{MODEL}/infer",
                             "--seconds", str(seconds), "--clients", str(clients),
                             "--server-pid", str(server_pid)], env=env, stdout=subprocess.PIPE, text=True)
    if proc.stdout.readline().strip() != "go":
        proc.wait()
        raise RuntimeError(f"the load client failed (exit {proc.returncode})")
    t0 = time.monotonic()
    for i, move in enumerate(moves):
        time.sleep(max(0.0, t0 + seconds * (i + 1) / (len(moves) + 1) - time.monotonic()))
        move()
    result = json.loads(proc.stdout.read())
    proc.wait()
    return result


# ------------------------------------------------------------------------------------------------
# The floors (servers of this module)
# ------------------------------------------------------------------------------------------------

def floor_server(kind: str, port: int, workers: int = 0, listen_fd: int | None = None) -> int:
    """Serve a constant answer on ``port`` with ``workers`` processes (0: one per core, as the server):
    "kserve" through grade.release.server's stack with a model that does not read its inputs, "bare" from
    a plain uvicorn ASGI app (uvloop, httptools)."""
    import socket

    from grade.core import http_server

    workers = workers or http_server.available_cpus()
    if workers > 1 and listen_fd is None:
        command = [sys.executable, "-m", "benchmarks.serve", "--floor-server", kind, "--port", str(port),
                   "--workers", "1"]
        return http_server.supervise(command, workers, port)
    sockets = None if listen_fd is None else [socket.socket(fileno=listen_fd)]
    if kind == "kserve":
        from grade.release.server import start_model_server

        model = _constant_model()
        model.load()
        start_model_server(model, port, sockets=sockets)
        return 0
    import uvicorn

    weights = {"name": "weights", "shape": [1, FLOOR_K], "datatype": "FP32", "data": [1 / FLOOR_K] * FLOOR_K}
    answer = json.dumps({"model_name": MODEL, "outputs": [weights]})

    async def app(scope, receive, send):
        if scope["type"] != "http":
            return
        more = True
        while more:
            more = (await receive()).get("more_body", False)
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-type", b"application/json"),
                                (b"content-length", str(len(answer)).encode())]})
        await send({"type": "http.response.body", "body": answer.encode()})

    config = uvicorn.Config(app, host="127.0.0.1", port=port, loop="uvloop", http="httptools",
                            log_level="warning", access_log=False)
    uvicorn.Server(config).run(sockets=sockets)
    return 0


def _constant_model():
    import kserve
    from kserve.protocol.infer_type import InferOutput, InferResponse

    class Constant(kserve.Model):
        """Weights 1/K for every request of the batch (the first input's length)."""

        def load(self) -> bool:
            self.ready = True
            return True

        def answer(self, decode_inputs):
            """The gate's model call: the inputs decoded, not read."""
            n = len(next(iter(decode_inputs().values())))
            return "constant", {"weights": np.full((n, FLOOR_K), 1 / FLOOR_K, np.float32)}

        async def predict(self, payload, headers=None, response_headers=None):
            n = payload.inputs[0].shape[0]
            weights = np.full((n, FLOOR_K), 1 / FLOOR_K, np.float32)
            return InferResponse(response_id=payload.id or "", model_name=self.name,
                                 infer_outputs=[InferOutput("weights", [n, FLOOR_K], "FP32", data=weights)])

    return Constant(MODEL)


# ------------------------------------------------------------------------------------------------
# The benchmark
# ------------------------------------------------------------------------------------------------

def in_process(registry, body: bytes, calls: int = 500) -> dict[str, float]:
    """Median latency (ms) of the TorchScript call alone and of the whole predict() on the same batch,
    with one torch thread like the server."""
    from grade.release import serving

    torch.set_num_threads(1)
    policy = serving.load_verified(registry, registry.production()[0])
    inputs = {i["name"]: np.asarray(i["data"]) for i in json.loads(body)["inputs"]}
    num, cat = serving.model_inputs(inputs, policy.transform)
    tn, tc = torch.from_numpy(num), torch.from_numpy(cat)

    def median_ms(fn) -> float:
        return timeit(fn, repeat=calls, warmup=20)["median_s"] * 1e3

    with torch.inference_mode():
        return {"torchscript_ms": median_ms(lambda: policy.fn(tn, tc)),
                "predict_ms": median_ms(lambda: serving.predict(policy, inputs))}


def explore_in_process(registry, body: bytes, calls: int = 500, rounds: int = 5) -> dict[str, Any]:
    """``serving.predict`` with exploration at shares 0.1 and 1 against without it on the same batch
    (with its request ids), alternated over ``rounds`` rounds: the median of the per-round ratios."""
    from grade.model.exploration import ExploreConfig
    from grade.release import serving

    torch.set_num_threads(1)
    policy = serving.load_verified(registry, registry.production()[0])
    inputs = {i["name"]: np.asarray(i["data"]) for i in json.loads(body)["inputs"]}
    configs = {"off": None, "share_0.1": ExploreConfig(share=0.1), "share_1": ExploreConfig(share=1.0)}
    per_round: dict[str, list[float]] = {name: [] for name in configs}
    with torch.inference_mode():
        for _ in range(rounds):
            for name, cfg in configs.items():
                t = timeit(lambda cfg=cfg: serving.predict(policy, inputs, exploring=cfg),
                           repeat=max(1, calls // rounds), warmup=5)
                per_round[name].append(t["median_s"] * 1e3)
    off = np.array(per_round["off"])
    out: dict[str, Any] = {f"predict_{name}_ms": float(np.median(v)) for name, v in per_round.items()}
    for name in ("share_0.1", "share_1"):
        out[f"predict_{name}_vs_off"] = float(np.median(np.array(per_round[name]) / off))
    return out


def explore_pairs(registry_root: str, body: bytes, repeats: int, seconds: float, clients: int, tmp: Path,
                  workers: int, batch_rows: int | None) -> dict[str, Any]:
    """Batch-64 load runs alternating between the server exploring every request and the same server
    serving the mean (both on the same body, request ids included), ``repeats`` pairs: the median of
    the per-pair requests/s ratios, so that a machine whose load drifts disturbs both sides alike."""
    from tests.conftest import free_port

    servers = {}
    try:
        for name, extra in (("mean", ()), ("explore", ("--set", f"serve.explore.share={EXPLORE_SHARE}"))):
            port = free_port()
            servers[name] = (port, start_server(registry_root, port, tmp / f"explore-{name}.log",
                                                workers=workers, batch_rows=batch_rows, extra=extra))
        runs: dict[str, list] = {"mean": [], "explore": []}
        for _ in range(repeats):
            for name, (port, proc) in servers.items():
                runs[name].append(load_run(port, body, clients, seconds, proc.pid, [], tmp))
    finally:
        for _, proc in servers.values():
            stop_server(proc)
    ratios = [e["requests_per_s"] / m["requests_per_s"] for m, e in zip(runs["mean"], runs["explore"],
                                                                         strict=True)]
    return {"batch_64_requests_per_s_vs_mean": float(np.median(ratios)), "ratios": ratios,
            "batch_64_mean": medians(runs["mean"]), "batch_64": medians(runs["explore"]), "runs": runs}


def medians(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Median over runs of every numeric figure; failed requests summed."""
    keys = [k for k, v in runs[0].items() if isinstance(v, (int, float)) and k != "failed"]
    out = {k: float(np.median([r[k] for r in runs if r[k] is not None] or [np.nan])) for k in keys}
    out["failed"] = sum(r["failed"] for r in runs)
    return out


def measure(port: int, pid: int, bodies: dict[int, bytes], repeats: int, seconds: float, clients: int,
            tmp: Path, moves_per_run=lambda: []) -> dict[int, dict[str, Any]]:
    """Medians over ``repeats`` load runs per batch size, with the runs."""
    out = {}
    for batch, body in bodies.items():
        runs = [load_run(port, body, clients, seconds, pid, moves_per_run(), tmp) for _ in range(repeats)]
        summary = medians(runs)
        out[batch] = {**summary, "rows_per_s": summary["requests_per_s"] * batch, "runs": runs}
    return out


def floors(bodies: dict[int, bytes], repeats: int, seconds: float, clients: int,
           tmp: Path, workers: int = 0) -> dict[str, dict[int, dict[str, Any]]]:
    from tests.conftest import free_port

    out = {}
    for kind in ("kserve", "bare"):
        port = free_port()
        server = start_server(None, port, tmp / f"floor-{kind}.log", floor=kind, workers=workers)
        try:
            out[kind] = measure(port, server.pid, bodies, repeats, seconds, clients, tmp)
        finally:
            stop_server(server)
    return out


def run(seconds: float = 5.0, clients: int = 16, repeats: int = 3,
        with_floors: bool = True, workers: int = 0, batch_rows: int | None = None) -> dict[str, Any]:
    from tests.conftest import free_port

    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="grade-bench-serve-") as tmp:
        world = demo_registry(Path(tmp), n_versions=5)
        bodies = {batch: v2_body(world["spec"], batch) for batch in (1, 64)}
        reference = {batch: in_process(world["registry"], body) for batch, body in bodies.items()}
        rotation = itertools.cycle(world["models"][1:] + world["models"][:1])
        moves = 0

        def two_moves() -> list:
            def move() -> None:
                nonlocal moves
                promote(world["registry"], next(rotation))
                moves += 1
            return [move, move]

        def serve_and_measure(rows: int | None) -> dict[int, dict[str, Any]]:
            port = free_port()
            server = start_server(world["registry"].root, port, Path(tmp) / "server.log", workers=workers,
                                  batch_rows=rows)
            try:
                return measure(port, server.pid, bodies, repeats, seconds, clients, Path(tmp), two_moves)
            finally:
                stop_server(server)

        served = serve_and_measure(batch_rows)
        one_call_each = serve_and_measure(0)  # the reference: one policy call per call
        exploring = explore_pairs(world["registry"].root, v2_body(world["spec"], 64, with_ids=True), repeats,
                                  seconds, clients, Path(tmp), workers, batch_rows)
        explore_reference = explore_in_process(world["registry"], v2_body(world["spec"], 64, with_ids=True))
        floor = floors(bodies, repeats, seconds, clients, Path(tmp), workers) if with_floors else {}
    results: dict[str, Any] = {}
    for batch in bodies:
        phase = {**served[batch], **reference[batch]}
        phase["overhead_p50_vs_torchscript"] = phase["p50_ms"] / phase["torchscript_ms"]
        reference_run = {k: v for k, v in one_call_each[batch].items() if k != "runs"}
        phase["one_policy_call_per_call"] = reference_run
        phase["requests_per_s_vs_one_call_each"] = phase["requests_per_s"] / reference_run["requests_per_s"]
        for kind, figures in floor.items():
            phase[f"floor_{kind}"] = {k: v for k, v in figures[batch].items() if k != "runs"}
        if "kserve" in floor:
            phase["p99_vs_kserve_floor"] = phase["p99_ms"] / floor["kserve"][batch]["p99_ms"]
            phase["requests_per_s_vs_kserve_floor"] = (phase["requests_per_s"]
                                                       / floor["kserve"][batch]["requests_per_s"])
        results[f"batch_{batch}"] = phase
    from grade.core.http_server import available_cpus
    from grade.release.server import DEFAULT_BATCH_ROWS

    targets = {"batch_1_p99_vs_kserve_floor_at_most": P99_VS_FLOOR_TARGET,
               "batch_64_requests_per_s_at_least": BATCH_64_TARGET}
    if floor:
        targets["batch_1_p99_met"] = results["batch_1"]["p99_vs_kserve_floor"] <= P99_VS_FLOOR_TARGET
    targets["batch_64_met"] = results["batch_64"]["requests_per_s"] >= BATCH_64_TARGET
    explore = {"share": EXPLORE_SHARE, **exploring, **explore_reference}
    targets["explore_batch_64_requests_per_s_vs_mean_at_least"] = EXPLORE_TARGET
    targets["explore_met"] = explore["batch_64_requests_per_s_vs_mean"] >= EXPLORE_TARGET
    return {"targets": targets, "clients": clients, "seconds_per_run": seconds, "repeats": repeats,
            "alias_moves": moves,
            "server_workers": workers or available_cpus(),
            "batch_rows": DEFAULT_BATCH_ROWS if batch_rows is None else batch_rows,
            "failed_total": sum(results[f"batch_{b}"]["failed"] for b in bodies),
            "load_average_before": load_before, "load_average_after": os.getloadavg(), **results,
            "explore": explore}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m benchmarks.serve", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seconds", type=float, default=5.0, help="measured duration of each run")
    p.add_argument("--repeats", type=int, default=3, help="runs per batch size (medians are reported)")
    p.add_argument("--clients", type=int, default=16, help="concurrent keep-alive connections")
    p.add_argument("--no-floors", action="store_true", help="skip the constant-answer servers")
    p.add_argument("--batch-rows", type=int, default=None,
                   help="the server's --batch-rows (default: its default); a server with 0 (one policy "
                        "call per call) is measured beside it as the reference")
    p.add_argument("--workers", type=int, default=0,
                   help="server processes of the server and the floors (default 0: the server's default, "
                        "one per core)")
    # the processes this benchmark starts
    p.add_argument("--floor-server", choices=["kserve", "bare"], help=argparse.SUPPRESS)
    p.add_argument("--client", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--port", type=int, help=argparse.SUPPRESS)
    p.add_argument("--body", help=argparse.SUPPRESS)
    p.add_argument("--path", help=argparse.SUPPRESS)
    p.add_argument("--server-pid", type=int, help=argparse.SUPPRESS)
    p.add_argument("--listen-fd", type=int, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.floor_server:
        sys.exit(floor_server(args.floor_server, args.port, args.workers, args.listen_fd))
    if args.client:
        return client_main(args)
    emit("serve", run(args.seconds, args.clients, args.repeats, not args.no_floors, args.workers,
                      args.batch_rows))


if __name__ == "__main__":
    main()
