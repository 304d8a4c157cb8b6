"""Online serving latency and throughput over HTTP (loopback), next to the in-process TorchScript call.

16 concurrent clients (keep-alive connections) send v2 infer requests of batch 1 and batch 64 to
``python -m components.serve`` for a bounded time each; the production alias is moved twice during
each phase, and every failed request is counted. The in-process latency of the same policy on the
same batch is the reference: the ratio is the serving overhead (HTTP, JSON, validation, transform).

    python -m benchmarks.serve [--seconds 10] [--clients 16]
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import numpy as np
import torch

from benchmarks._common import emit

MODEL = "grade-mtf"


def demo_registry(root: Path, n_versions: int = 3, n_requests: int = 200) -> dict[str, Any]:
    """Simulated logs, their features and a registry with ``n_versions`` registered policies (random,
    personalised weights), the first in production. Returns the paths, the spec and the model folders."""
    from grade import store
    from grade.features import FeaturesConfig, extract_features
    from grade.policy import PolicyConfig, PolicyNet, save_policy
    from grade.registry import Registry
    from grade.simulator import SimulatorConfig, write_logs

    logs, feats = str(root / "logs"), str(root / "feats")
    write_logs(SimulatorConfig(n_requests=n_requests, n_users=80, n_items=1500, n_days=2, list_size=20), logs)
    spec = extract_features(logs, feats, FeaturesConfig())
    models = []
    for seed in range(1, n_versions + 1):
        torch.manual_seed(seed)
        net = PolicyNet(PolicyConfig(n_numeric=len(spec["numeric"]),
                                     cat_sizes=[c["size"] for c in spec["categorical"]],
                                     n_objectives=len(spec["objectives"])))
        with torch.no_grad():
            for p in net.parameters():
                p.add_(torch.randn_like(p) * 0.5)
        uri = str(root / f"model-{seed}")
        with store.publishing(uri) as staging:
            save_policy(net, staging)
            spec_file = store.join(feats, "feature_spec.json")
            (staging / "feature_spec.json").write_bytes(store.read_bytes(spec_file))
        models.append(uri)
    registry = Registry(str(root / "registry"), MODEL)
    first = promote(registry, models[0])
    return {"logs": logs, "spec": spec, "registry": registry, "models": models, "first": first}


def promote(registry, model_uri: str) -> str:
    """Register ``model_uri`` and move the production alias to it; returns the version."""
    version, _ = registry.register(model_uri)
    current = registry.production()
    registry.set_production(version, "serving benchmark", expected_etag=current[1] if current else None)
    return version


def start_server(registry_root: str, port: int, log_file: Path, watch_seconds: float = 0.2,
                 timeout_s: float = 90) -> subprocess.Popen:
    """``python -m components.serve`` on loopback ``port`` (its output in ``log_file``: a pipe nobody
    reads would stall it), returned once its model answers ready."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    with open(log_file, "w") as log:
        proc = subprocess.Popen([sys.executable, "-m", "components.serve", "--registry", registry_root,
                                 "--port", str(port), "--watch-seconds", str(watch_seconds)], env=env,
                                stdout=log, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/v2/models/{MODEL}/ready", timeout=2):
                return proc
        except (urllib.error.URLError, ConnectionError):
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


def v2_body(spec: dict[str, Any], batch: int, seed: int = 0) -> bytes:
    """A v2 infer request of ``batch`` requests with known feature values."""
    from grade.serving import input_metadata

    rng = np.random.default_rng(seed)
    vocab = {c["name"]: c["vocab"] for c in spec["categorical"]}
    inputs = []
    for i in input_metadata(spec):
        if i["name"].startswith("pred_"):
            continue
        data = (rng.choice(vocab[i["name"]], batch).tolist() if i["name"] in vocab
                else rng.normal(size=batch).round(4).tolist())
        inputs.append({"name": i["name"], "datatype": i["datatype"], "shape": [batch], "data": data})
    return json.dumps({"inputs": inputs}).encode()


def _client(port: int, body: bytes, until: float, out: list, failures: list) -> None:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    headers = {"content-type": "application/json"}
    while time.monotonic() < until:
        t0 = time.perf_counter()
        try:
            conn.request("POST", f"/v2/models/{MODEL}/infer", body, headers)
            response = conn.getresponse()
            payload = response.read()
            if response.status != 200:
                failures.append(f"{response.status}: {payload[:200]!r}")
        except (OSError, http.client.HTTPException) as e:
            failures.append(repr(e))
            conn.close()
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
            continue
        out.append(time.perf_counter() - t0)
    conn.close()


def load_phase(port: int, body: bytes, clients: int, seconds: float, moves: list) -> dict[str, Any]:
    """``clients`` threads for ``seconds``; the callables in ``moves`` run at evenly spaced times."""
    latencies: list[float] = []
    failures: list[str] = []
    until = time.monotonic() + seconds
    threads = [threading.Thread(target=_client, args=(port, body, until, latencies, failures))
               for _ in range(clients)]
    t0 = time.monotonic()
    for t in threads:
        t.start()
    for i, move in enumerate(moves):
        time.sleep(max(0.0, t0 + seconds * (i + 1) / (len(moves) + 1) - time.monotonic()))
        move()
    for t in threads:
        t.join()
    elapsed = time.monotonic() - t0
    lat = np.asarray(latencies) * 1e3
    return {"requests": len(latencies), "failed": len(failures), "failures_sample": failures[:3],
            "p50_ms": float(np.median(lat)) if len(lat) else None,
            "p99_ms": float(np.quantile(lat, 0.99)) if len(lat) else None,
            "requests_per_s": len(latencies) / elapsed}


def in_process(registry, spec: dict[str, Any], body: bytes, calls: int = 500) -> dict[str, float]:
    """Median latency (ms) of the TorchScript call alone and of the whole predict() on the same batch,
    with one torch thread like the server."""
    from grade import serving

    torch.set_num_threads(1)

    policy = serving.load_verified(registry, registry.production()[0])
    inputs = {i["name"]: i["data"] for i in json.loads(body)["inputs"]}
    num, cat = serving.model_inputs({k: np.asarray(v) for k, v in inputs.items()}, policy.transform)
    tn, tc = torch.from_numpy(num), torch.from_numpy(cat)

    def median_ms(fn) -> float:
        for _ in range(20):
            fn()
        times = []
        for _ in range(calls):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        return float(np.median(times) * 1e3)

    with torch.inference_mode():
        return {"torchscript_ms": median_ms(lambda: policy.fn(tn, tc)),
                "predict_ms": median_ms(lambda: serving.predict(policy, inputs))}


def run(seconds: float = 10.0, clients: int = 16) -> dict[str, Any]:
    from tests.conftest import free_port

    with tempfile.TemporaryDirectory(prefix="grade-bench-serve-") as tmp:
        world = demo_registry(Path(tmp), n_versions=5)
        port = free_port()
        server = start_server(world["registry"].root, port, Path(tmp) / "server.log")
        try:
            results: dict[str, Any] = {}
            pending = list(world["models"][1:])
            for batch in (1, 64):
                body = v2_body(world["spec"], batch)
                reference = in_process(world["registry"], world["spec"], body)
                moves = [lambda: promote(world["registry"], pending.pop(0)) for _ in range(2)]
                phase = load_phase(port, body, clients, seconds, moves)
                phase.update(reference)
                phase["overhead_p50_vs_torchscript"] = phase["p50_ms"] / reference["torchscript_ms"]
                phase["rows_per_s"] = phase["requests_per_s"] * batch
                results[f"batch_{batch}"] = phase
            results["alias_moves"] = 4
            results["versions_served_last"] = world["registry"].production()[0]["version"]
        finally:
            stop_server(server)
    return {"clients": clients, "seconds_per_phase": seconds, **results}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m benchmarks.serve", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seconds", type=float, default=10.0, help="duration of each phase (batch 1, batch 64)")
    p.add_argument("--clients", type=int, default=16, help="concurrent keep-alive clients")
    args = p.parse_args(argv)
    emit("serve", run(args.seconds, args.clients))


if __name__ == "__main__":
    main()
