"""Online serving: weights equal batch scoring's, a promotion mid-stream swaps versions without a failed
request, every bad request gets a 4xx naming the field, and a model that fails its hash is never served.

The server runs as a real process (``python -m components.serve``) on a loopback port.
"""

from __future__ import annotations

import json
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pyarrow.dataset as ds
import pytest

from benchmarks.serve import MODEL, demo_registry, promote, start_server, stop_server
from components import score as score_cli
from grade import cli, serving
from tests.conftest import free_port

pytest.importorskip("kserve", reason="the `serve` extra (kserve) is not installed")


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return demo_registry(tmp_path_factory.mktemp("serve"), n_versions=3)


@pytest.fixture(scope="module")
def server(world, tmp_path_factory):
    port = free_port()
    proc = start_server(world["registry"].root, port, tmp_path_factory.mktemp("server") / "server.log")
    yield f"http://127.0.0.1:{port}"
    stop_server(proc)


def call(url: str, path: str, body: bytes | dict | None = None, headers: dict | None = None):
    """(status, parsed JSON body) of a GET (no body) or POST."""
    data = body if isinstance(body, bytes) or body is None else json.dumps(body).encode()
    req = urllib.request.Request(url + path, data=data, headers={"content-type": "application/json",
                                                                 **(headers or {})})
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.status, json.loads(r.read() or b"null")
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"null")


def oversized_post(url: str, path: str, size: int):
    """(status, JSON) of a POST declaring a ``size``-byte body; the server answers from the headers, so
    only the start of the body is sent (sending all of it would fail once the server closes)."""
    import http.client
    from urllib.parse import urlparse

    u = urlparse(url)
    conn = http.client.HTTPConnection(u.hostname, u.port, timeout=30)
    conn.putrequest("POST", path)
    conn.putheader("content-type", "application/json")
    conn.putheader("content-length", str(size))
    conn.endheaders(b"[" + b"1," * 1000)
    response = conn.getresponse()
    status, body = response.status, json.loads(response.read())
    conn.close()
    return status, body


def log_requests(logs: str, spec: dict, n: int) -> dict[str, np.ndarray]:
    """The first ``n`` requests of the logs: raw feature columns [n] and pred_* [n, L]."""
    t = ds.dataset(logs, format="parquet").to_table()
    t = t.sort_by([("request_id", "ascending"), ("item_id", "ascending")])
    rid = t["request_id"].to_numpy()
    firsts = np.flatnonzero(np.r_[True, rid[1:] != rid[:-1]])[:n]
    out = {c["name"]: t[c["name"]].to_numpy()[firsts].tolist() for c in spec["numeric"] + spec["categorical"]}
    length = int(np.diff(np.r_[firsts, len(rid)])[0])
    for o in spec["objectives"]:
        col = t[f"pred_{o}"].to_numpy()
        out[f"pred_{o}"] = [col[s:s + length].tolist() for s in firsts]
    out["request_id"] = rid[firsts]
    return out


def v2_body(columns: dict, spec: dict, with_candidates: bool = False) -> dict:
    inputs = []
    for i in serving.input_metadata(spec):
        if i["name"].startswith("pred_") and not with_candidates:
            continue
        value = np.asarray(columns[i["name"]])
        inputs.append({"name": i["name"], "datatype": i["datatype"], "shape": list(value.shape),
                       "data": value.ravel().tolist()})
    return {"inputs": inputs}


def test_metadata_lists_every_input_and_the_weights_output(server, world):
    status, meta = call(server, f"/v2/models/{MODEL}")
    assert status == 200
    spec = world["spec"]
    names = {i["name"]: (i["datatype"], i["shape"]) for i in meta["inputs"]}
    for c in spec["numeric"]:
        assert names[c["name"]] == ("FP32", [-1])
    for c in spec["categorical"]:
        assert names[c["name"]] == ("INT64", [-1])
    assert {o["name"] for o in meta["outputs"]} >= {"weights"}
    assert call(server, "/v2/health/live")[0] == 200 and call(server, "/v2/health/ready")[0] == 200
    one = v2_body(log_requests(world["logs"], spec, 1), spec)
    assert call(server, f"/v2/models/{MODEL}/infer", one)[0] == 200
    with urllib.request.urlopen(f"{server}/metrics", timeout=10) as r:
        metrics = r.read().decode()
    assert f'grade_serve_requests_total{{outcome="ok",version="{world["first"]}"}}' in metrics


def test_served_weights_equal_batch_scoring_and_rank_the_candidates(server, world, tmp_path):
    spec, n = world["spec"], 8
    columns = log_requests(world["logs"], spec, n)
    status, body = call(server, f"/v2/models/{MODEL}/infer", v2_body(columns, spec, with_candidates=True))
    assert status == 200, body
    assert body["model_version"] == world["first"]
    out = {o["name"]: np.asarray(o["data"]).reshape(o["shape"]) for o in body["outputs"]}
    w = out["weights"]
    assert w.shape == (n, len(spec["objectives"]))
    assert np.allclose(w.sum(1), 1, atol=1e-5) and (w >= 0).all()
    # components.score on the same requests, with the production model
    scored_uri = str(tmp_path / "scores")
    assert cli.run(score_cli.main, ["--requests", world["logs"], "--registry", world["registry"].root,
                                    "--out", scored_uri]) == 0
    scored = ds.dataset(scored_uri, format="parquet").to_table().to_pandas().set_index("request_id")
    for i, rid in enumerate(columns["request_id"]):
        rows = scored.loc[rid]
        expected = rows[[f"w_{o}" for o in spec["objectives"]]].to_numpy()[0]
        assert np.allclose(w[i], expected, atol=1e-6)
        # the ranking orders the candidates by fused score, best first, as batch scoring ranks them
        assert np.allclose(np.sort(out["scores"][i]), np.sort(rows["score"].to_numpy()), atol=1e-4)
        assert (np.diff(out["scores"][i][out["ranking"][i]]) <= 1e-6).all()
    # v1 answers the same weights and names the version too
    v1 = {"instances": [{c["name"]: columns[c["name"]][i] for c in spec["numeric"] + spec["categorical"]}
                        for i in range(n)]}
    status, body1 = call(server, f"/v1/models/{MODEL}:predict", v1)
    assert status == 200 and body1["model_version"] == world["first"]
    assert np.allclose([p["weights"] for p in body1["predictions"]], w, atol=1e-6)


def test_every_bad_request_gets_a_4xx_naming_the_field(server, world):
    spec = world["spec"]
    columns = log_requests(world["logs"], spec, 4)
    good = v2_body(columns, spec)
    num, cat = spec["numeric"][0]["name"], spec["categorical"][0]["name"]

    def with_input(name, **change):
        body = json.loads(json.dumps(good))
        for i in body["inputs"]:
            if i["name"] == name:
                i.update(change)
        return body

    cases = {
        "missing feature": ({"inputs": [i for i in good["inputs"] if i["name"] != num]}, num),
        "extra feature": ({"inputs": good["inputs"] + [{"name": "age", "datatype": "FP32", "shape": [4],
                                                        "data": [1, 2, 3, 4]}]}, "age"),
        "wrong shape": (with_input(num, shape=[2], data=columns[num][:2]), num),
        "NaN": (with_input(num, data=[float("nan")] + columns[num][1:]), num),
        "unknown category": (with_input(cat, data=[10**9] + columns[cat][1:]), cat),
        "empty batch": ({"inputs": [{**i, "shape": [0], "data": []} for i in good["inputs"]]}, "empty"),
        "candidates for some objectives only": (
            {"inputs": good["inputs"] + [{"name": f"pred_{spec['objectives'][0]}", "datatype": "FP32",
                                          "shape": [4, 2], "data": [0.1] * 8}]}, "pred_"),
    }
    for what, (body, field) in cases.items():
        status, answer = call(server, f"/v2/models/{MODEL}/infer", body)
        assert 400 <= status < 500, (what, status, answer)
        assert field in json.dumps(answer), (what, answer)
    status, answer = call(server, f"/v2/models/{MODEL}/infer", b"{not json")
    assert 400 <= status < 500 and "JSON" in answer["error"]
    status, answer = oversized_post(server, f"/v2/models/{MODEL}/infer", 10 * 1024 * 1024)
    assert status == 413 and "body" in answer["error"]
    status, answer = call(server, f"/v1/models/{MODEL}:predict", {"instances": "x"})
    assert 400 <= status < 500 and "instances" in answer["error"]
    # and it keeps serving
    assert call(server, f"/v2/models/{MODEL}/infer", good)[0] == 200


def test_a_promotion_during_a_stream_of_requests_swaps_versions_without_errors(server, world):
    spec = world["spec"]
    body = v2_body(log_requests(world["logs"], spec, 2), spec)
    statuses, versions = [], []
    stop = threading.Event()

    def client():
        while not stop.is_set():
            status, answer = call(server, f"/v2/models/{MODEL}/infer", body)
            statuses.append(status)
            versions.append(answer.get("model_version"))

    with ThreadPoolExecutor(4) as pool:
        for _ in range(4):
            pool.submit(client)
        time.sleep(0.5)
        second = promote(world["registry"], world["models"][1])
        deadline = time.monotonic() + 30
        while second not in versions and time.monotonic() < deadline:
            time.sleep(0.1)
        time.sleep(0.3)
        stop.set()
    assert set(statuses) == {200}, sorted(set(statuses))
    assert versions[0] == world["first"] and versions[-1] == second
    # a version, once replaced, never answers again
    switch = versions.index(second)
    assert all(v == second for v in versions[switch + 50:])


def test_a_version_whose_files_do_not_match_its_hash_is_never_loaded(world):
    holder = serving.PolicyHolder(world["registry"].root, MODEL)
    assert holder.refresh() and holder.current is not None
    served = holder.current.version
    # a new version whose TorchScript file is altered after registration
    third = promote(world["registry"], world["models"][2])
    from grade.policy import TORCHSCRIPT_FILE

    path = world["registry"].version_uri(third) + "/" + TORCHSCRIPT_FILE
    data = bytearray(open(path, "rb").read())
    data[len(data) // 2] ^= 0xFF  # same size, other content
    open(path, "wb").write(bytes(data))
    assert not holder.refresh()
    assert holder.current.version == served
    with pytest.raises(serving.IntegrityError):
        serving.load_verified(world["registry"], world["registry"].production()[0])
