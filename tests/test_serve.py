"""Online serving: weights equal batch scoring's, a promotion mid-stream swaps versions without a failed
request, every bad request gets a 4xx naming the field, and a model that fails its hash is never served.

The server runs as a real process (``python -m components.serve``) on a loopback port.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pyarrow.dataset as ds
import pytest

from benchmarks.serve import MODEL, demo_registry, promote, start_server, stop_server
from components import score as score_cli
from components import serve as serve_cli
from grade.core import cli
from grade.core.errors import InputError
from grade.release import server as server_lib
from grade.release import serving
from tests.conftest import free_port

pytest.importorskip("kserve", reason="the `serve` extra (kserve) is not installed")


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return demo_registry(tmp_path_factory.mktemp("serve"), n_versions=4)


@pytest.fixture(scope="module")
def server_log(tmp_path_factory):
    return tmp_path_factory.mktemp("server") / "server.log"


@pytest.fixture(scope="module")
def server(world, server_log):
    """The server as a pod runs it on two cores: two worker processes on one port."""
    port = free_port()
    proc = start_server(world["registry"].root, port, server_log, workers=2)
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
                        | {"request_id": int(columns["request_id"][i])} for i in range(n)]}
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


def test_plain_and_extended_v2_requests_get_the_same_answer(server, world):
    """A plain v2 JSON request and the same request with parameters (decoded by KServe's own handler)
    answer the same weights, scores, ranking, id and version, and the same 4xx when bad."""
    spec = world["spec"]
    plain = {"id": "req-7", **v2_body(log_requests(world["logs"], spec, 3), spec, with_candidates=True)}
    extended = {**plain, "parameters": {"note": "any request parameter"}}
    (status_a, a), (status_b, b) = (call(server, f"/v2/models/{MODEL}/infer", r) for r in (plain, extended))
    assert status_a == status_b == 200, (a, b)
    assert [a[k] for k in ("id", "model_name", "model_version")] == [b[k] for k in ("id", "model_name",
                                                                                    "model_version")]
    assert a["id"] == "req-7"
    outputs = [{o["name"]: (o["datatype"], o["shape"], o["data"]) for o in r["outputs"]} for r in (a, b)]
    # the server explores by default (serve.explore.share): requests with ids get their log-propensity
    assert outputs[0] == outputs[1] and set(outputs[0]) == {"weights", "scores", "ranking", "log_propensity"}
    num = spec["numeric"][0]["name"]
    for body in (plain, extended):
        body["inputs"] = [{**i, "data": [float("nan")] + i["data"][1:]} if i["name"] == num else i
                          for i in body["inputs"]]
    (status_a, a), (status_b, b) = (call(server, f"/v2/models/{MODEL}/infer", r) for r in (plain, extended))
    assert status_a == status_b == 400 and a == b and num in a["error"]


def test_the_server_writes_no_log_line_per_request(server, world, server_log):
    body = v2_body(log_requests(world["logs"], world["spec"], 1), world["spec"])
    before = server_log.read_text().count("\n")
    for _ in range(20):
        assert call(server, f"/v2/models/{MODEL}/infer", body)[0] == 200
    time.sleep(0.5)
    assert server_log.read_text().count("\n") - before < 20, server_log.read_text()[-2000:]


def asgi_post(app, path: str, body: bytes, headers: tuple = ()) -> tuple[int, bytes]:
    """(status, body) of one POST through the ASGI ``app``, in-process."""
    return asyncio.run(_asgi_post(app, path, body, headers))


async def asgi_posts(app, path: str, bodies: list[bytes]) -> list[tuple[int, bytes]]:
    """(status, body) of POSTs sent at once through the ASGI ``app``, in one event loop."""
    return list(await asyncio.gather(*[_asgi_post(app, path, body) for body in bodies]))


async def _asgi_post(app, path: str, body: bytes, headers: tuple = ()) -> tuple[int, bytes]:
    messages = [{"type": "http.request", "body": body, "more_body": False}]
    sent: list[dict] = []

    async def receive():
        return messages.pop(0) if messages else {"type": "http.disconnect"}

    async def send(message):
        sent.append(message)

    scope = {"type": "http", "method": "POST", "path": path, "query_string": b"",
             "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                         *headers]}
    await app(scope, receive, send)
    return sent[0]["status"], b"".join(m.get("body", b"") for m in sent[1:])


def test_the_gate_answers_plain_v2_json_itself_and_hands_everything_else_on(world):
    holder = serving.PolicyHolder(world["registry"].root, MODEL)
    assert holder.refresh()
    model = server_lib.make_model(holder, MODEL)
    model.load()
    handed: list[tuple[str, bytes]] = []

    async def framework(scope, receive, send):  # stands in for KServe's REST stack
        handed.append((scope["path"], (await receive())["body"]))
        await send({"type": "http.response.start", "status": 299, "headers": []})
        await send({"type": "http.response.body", "body": b"{}"})

    gate = server_lib.RequestGate(framework, model=model)
    spec, infer = world["spec"], f"/v2/models/{MODEL}/infer"
    plain = v2_body(log_requests(world["logs"], spec, 2), spec)
    status, answer = asgi_post(gate, infer, json.dumps(plain).encode())
    assert status == 200 and not handed
    weights = json.loads(answer)["outputs"][0]
    assert weights["name"] == "weights" and weights["shape"] == [2, len(spec["objectives"])]
    status, answer = asgi_post(gate, infer, json.dumps({**plain, "inputs": plain["inputs"][1:]}).encode())
    assert status == 400 and plain["inputs"][0]["name"] in json.loads(answer)["error"] and not handed
    assert asgi_post(gate, infer, b"{not json")[0] == 400 and not handed
    others = [(infer, json.dumps({**plain, "parameters": {"binary_data_output": True}}).encode(), ()),
              (infer, json.dumps(plain).encode(), ((b"inference-header-content-length", b"10"),)),
              (infer, json.dumps({**plain, "outputs": [{"name": "weights"}]}).encode(), ()),
              (f"/v1/models/{MODEL}:predict", b'{"instances": []}', ()),
              ("/v2/models/another/infer", json.dumps(plain).encode(), ())]
    for path, body, headers in others:
        assert asgi_post(gate, path, body, headers)[0] == 299
        assert handed[-1] == (path, body)  # the body, read once, is handed on unchanged
    assert len(handed) == len(others)


def test_the_gate_stands_in_front_of_the_middleware_the_framework_adds_when_it_starts(world):
    """KServe adds a timing middleware (two getrusage calls per request) when the server starts, after
    the gate is installed: a plain infer call must not pass through it; everything else must."""
    from fastapi import FastAPI

    holder = serving.PolicyHolder(world["registry"].root, MODEL)
    assert holder.refresh()
    model = server_lib.make_model(holder, MODEL)
    model.load()
    app = FastAPI()
    server_lib.install_gate(app, model)
    seen: list[str] = []

    class Timing:  # what the framework adds at start
        def __init__(self, inner):
            self.inner = inner

        async def __call__(self, scope, receive, send):
            seen.append(scope["path"])
            await self.inner(scope, receive, send)

    app.add_middleware(Timing)
    spec = world["spec"]
    plain = json.dumps(v2_body(log_requests(world["logs"], spec, 1), spec)).encode()
    assert asgi_post(app, f"/v2/models/{MODEL}/infer", plain)[0] == 200 and seen == []
    asgi_post(app, "/v1/models/other:predict", b"{}")
    assert seen == ["/v1/models/other:predict"]


def test_the_gate_encodes_an_answer_as_kserve_does():
    # the same document as KServe's; how fast is a benchmark's question, not a test's
    from kserve.protocol.infer_type import InferOutput, InferResponse

    rng = np.random.default_rng(0)
    result = {"weights": rng.dirichlet(np.ones(3), 4096).astype(np.float32),
              "ranking": np.argsort(rng.random((4096, 5)), axis=1).astype(np.int64)}
    outputs = server_lib.v2_outputs(result)
    ours = server_lib.encode_v2_answer("r1", MODEL, "v0001", outputs)
    theirs = InferResponse(response_id="r1", model_name=MODEL, model_version="v0001",
                           parameters={"model_version": "v0001"},
                           infer_outputs=[InferOutput(**o) for o in outputs]).to_rest()[0]
    assert json.loads(ours) == json.loads(json.dumps(theirs))  # the same document, value for value


def stream_through_a_promotion(url: str, world, to_model: str, clients: int = 4) -> tuple[list, list, str]:
    """(statuses, versions) of the answers ``clients`` threads got, in order, while the alias moved to
    ``to_model`` (until its version had answered for a while), and that version."""
    spec = world["spec"]
    body = v2_body(log_requests(world["logs"], spec, 2), spec)
    statuses, versions = [], []
    stop = threading.Event()

    def client():
        while not stop.is_set():
            status, answer = call(url, f"/v2/models/{MODEL}/infer", body)
            statuses.append(status)
            versions.append(answer.get("model_version"))

    with ThreadPoolExecutor(clients) as pool:
        for _ in range(clients):
            pool.submit(client)
        time.sleep(0.5)
        before = versions[-1]
        second = promote(world["registry"], to_model)
        deadline = time.monotonic() + 30
        # until the new version has answered 200 calls and every process has swapped (the last 100
        # answers are all its): on a busy machine one worker may finish its load seconds after the other
        while not (versions.count(second) >= 200 and set(versions[-100:]) == {second}) \
                and time.monotonic() < deadline:
            time.sleep(0.1)
        stop.set()
    assert versions[0] == before
    return statuses, versions, second


def test_a_promotion_during_a_stream_of_requests_swaps_versions_without_errors(world, tmp_path):
    port = free_port()
    proc = start_server(world["registry"].root, port, tmp_path / "server.log", workers=1)
    try:
        statuses, versions, second = stream_through_a_promotion(f"http://127.0.0.1:{port}", world,
                                                                world["models"][1])
    finally:
        stop_server(proc)
    assert set(statuses) == {200}, sorted(set(statuses))
    assert versions[-1] == second
    # a version, once replaced, never answers again
    switch = versions.index(second)
    assert all(v == second for v in versions[switch + 50:])


def test_every_worker_swaps_on_a_promotion_without_errors_and_metrics_count_them_all(server, world):
    """Two worker processes each follow the alias: no request fails while they swap, both end on the
    new version, and /metrics (whichever worker answers it) counts the answers of both."""
    statuses, versions, second = stream_through_a_promotion(server, world, world["models"][3])
    assert set(statuses) == {200}, sorted(set(statuses))
    assert all(v == second for v in versions[-100:])  # both workers answer the new version
    counted = 0.0
    for line in urllib.request.urlopen(f"{server}/metrics", timeout=10).read().decode().splitlines():
        if line.startswith(f'grade_serve_requests_total{{outcome="ok",version="{second}"}}'):
            counted = float(line.split()[-1])
    # each call is a new connection, which either worker takes: one worker's count alone falls short
    assert counted >= versions.count(second), (counted, versions.count(second))


def test_a_transform_that_refuses_an_input_makes_a_bad_request_not_a_server_error(world, monkeypatch):
    """The training transform's own checks of model inputs (InputError) answer 4xx like the server's."""
    from grade.core.errors import InputError
    from grade.data.transform import FeatureTransform

    policy = serving.load_verified(world["registry"], world["registry"].production()[0])
    spec = world["spec"]
    inputs = {i["name"]: i["data"] for i in v2_body(log_requests(world["logs"], spec, 2), spec)["inputs"]}
    assert serving.predict(policy, inputs)["weights"].shape == (2, len(spec["objectives"]))

    def refuse(self, values, n_requests=None):
        raise InputError("request feature 'u_activity', row 1: expected a finite number")

    monkeypatch.setattr(FeatureTransform, "request_features", refuse)
    with pytest.raises(serving.BadRequest, match="u_activity', row 1"):
        serving.predict(policy, inputs)


def test_calls_answered_together_get_the_answers_they_get_alone(world):
    """predict_many: one transform and one policy call for several calls; a bad call gets its own error
    (naming its own row) and changes nobody else's answer."""
    policy = serving.load_verified(world["registry"], world["registry"].production()[0])
    spec = world["spec"]

    def inputs_of(body: dict) -> dict:
        return {i["name"]: np.asarray(i["data"]).reshape(i["shape"]) for i in body["inputs"]}

    columns = log_requests(world["logs"], spec, 7)
    part = [{k: v[a:b] for k, v in columns.items()} for a, b in ((0, 1), (1, 4), (4, 7))]
    good = [inputs_of(v2_body(part[0], spec)), inputs_of(v2_body(part[1], spec, with_candidates=True)),
            inputs_of(v2_body(part[2], spec))]
    name = spec["categorical"][0]["name"]
    unknown = {**good[1], name: [*good[1][name][:2], max(spec["categorical"][0]["vocab"]) + 1]}  # row 2
    missing = {k: v for k, v in good[0].items() if k != spec["numeric"][0]["name"]}
    calls = [good[0], unknown, good[1], missing, good[2]]
    together = serving.predict_many(policy, calls)
    for call, answer in zip(calls, together, strict=True):
        try:
            alone = serving.predict(policy, call)
        except serving.BadRequest as e:
            assert isinstance(answer, serving.BadRequest) and str(answer) == str(e)
            continue
        assert set(answer) == set(alone)
        for key in ("weights", "scores", "ranking"):
            if key in alone:
                np.testing.assert_allclose(answer[key], alone[key], rtol=1e-5, atol=1e-6)
    assert [isinstance(a, serving.BadRequest) for a in together] == [False, True, False, True, False]
    assert f"'{name}', row 2" in str(together[1])  # its own row, not the row of the group
    assert "scores" in together[2] and "scores" not in together[0]


def test_a_value_only_the_transform_refuses_fails_only_its_own_call_naming_its_own_row(world, monkeypatch):
    from grade.core.errors import InputError
    from grade.data.transform import FeatureTransform

    policy = serving.load_verified(world["registry"], world["registry"].production()[0])
    spec = world["spec"]
    columns = log_requests(world["logs"], spec, 5)
    calls = [{i["name"]: i["data"] for i in v2_body({k: v[a:b] for k, v in columns.items()}, spec)["inputs"]}
             for a, b in ((0, 2), (2, 4), (4, 5))]
    poison = 12345.0
    calls[1]["u_activity"] = [calls[1]["u_activity"][0], poison]
    request_features = FeatureTransform.request_features

    def refuse_poison(self, values, n_requests=None, **kwargs):
        rows = np.flatnonzero(np.asarray(values["u_activity"]) == poison)
        if len(rows):
            raise InputError(f"request feature 'u_activity', row {rows[0]}: out of range")
        return request_features(self, values, n_requests, **kwargs)

    monkeypatch.setattr(FeatureTransform, "request_features", refuse_poison)
    together = serving.predict_many(policy, calls)
    assert isinstance(together[1], serving.BadRequest) and "'u_activity', row 1" in str(together[1])
    for call, answer in zip((calls[0], calls[2]), (together[0], together[2]), strict=True):
        np.testing.assert_allclose(answer["weights"], serving.predict(policy, call)["weights"], rtol=1e-5)


def test_calls_that_arrive_together_share_one_answer_call_and_a_lone_call_waits_for_nobody():
    from grade.core.http_server import Coalescer

    groups: list[list] = []

    def answer_all(items):
        groups.append(list(items))
        return [ValueError(f"bad {i}") if i < 0 else i * 10 for i in items]

    together = Coalescer(answer_all, max_size=5, size_of=abs)

    async def burst():
        return await asyncio.gather(*[together.submit(i) for i in (1, 2, -1, 3, 4)], return_exceptions=True)

    answers = asyncio.run(burst())
    assert answers[:2] == [10, 20] and answers[3:] == [30, 40]
    assert isinstance(answers[2], ValueError) and str(answers[2]) == "bad -1"
    assert groups == [[1, 2, -1], [3], [4]]  # at most 5 units (|item|) a group, in arrival order

    async def alone():
        return await asyncio.wait_for(together.submit(7), timeout=1)

    groups.clear()
    assert asyncio.run(alone()) == 70 and groups == [[7]]


def test_a_failing_answer_call_fails_every_caller_of_its_group_and_a_caller_that_left_is_skipped():
    from grade.core.http_server import Coalescer

    def broken(items):
        raise RuntimeError("policy call failed")

    async def run():
        together = Coalescer(broken, max_size=10)
        left = asyncio.ensure_future(together.submit(1))
        stays = asyncio.ensure_future(together.submit(2))
        await asyncio.sleep(0)
        left.cancel()  # its caller went away before the group was answered
        return await asyncio.wait_for(asyncio.gather(stays, return_exceptions=True), timeout=5)

    (error,) = asyncio.run(run())
    assert isinstance(error, RuntimeError) and "policy call failed" in str(error)


def test_the_gate_answers_concurrent_calls_together_as_it_answers_them_one_by_one(world, monkeypatch):
    holder = serving.PolicyHolder(world["registry"].root, MODEL)
    assert holder.refresh()
    model = server_lib.make_model(holder, MODEL)
    model.load()
    spec, infer = world["spec"], f"/v2/models/{MODEL}/infer"
    columns = log_requests(world["logs"], spec, 4)
    bodies = [json.dumps(v2_body({k: v[i:i + 1] for k, v in columns.items()}, spec)).encode()
              for i in range(4)]
    bodies.insert(2, b'{"inputs": []}')  # a bad call among them
    one_by_one = [asgi_post(server_lib.RequestGate(None, model=model), infer, body) for body in bodies]
    group_sizes = []
    predict_many = serving.predict_many

    def counted(policy, requests, *args):
        group_sizes.append(len(requests))
        return predict_many(policy, requests, *args)

    monkeypatch.setattr(serving, "predict_many", counted)
    gate = server_lib.RequestGate(None, model=model, batch_rows=64)
    together = asyncio.run(asgi_posts(gate, infer, bodies))
    assert [s for s, _ in together] == [s for s, _ in one_by_one] == [200, 200, 400, 200, 200]
    for (_, got), (_, alone) in zip(together, one_by_one, strict=True):
        got, alone = json.loads(got), json.loads(alone)
        if "outputs" not in alone:
            assert got == alone  # the same error
            continue
        assert got["model_version"] == alone["model_version"]
        # the same numbers up to the float rounding of a larger matrix product
        np.testing.assert_allclose(got["outputs"][0]["data"], alone["outputs"][0]["data"],
                                   rtol=1e-5, atol=1e-6)
    assert group_sizes == [5]  # one model call for the five calls; the bad one refused by its own checks


def test_a_loaded_version_has_had_its_first_calls_before_it_serves(world):
    """TorchScript profiles and optimises a module's graph on its first calls (tens of ms): a loaded
    version has had them, so the requests right after a swap do not wait for them."""
    import torch

    from grade.model.policy import TORCHSCRIPT_FILE, load_torchscript

    record = world["registry"].production()[0]
    u, c = len(world["spec"]["numeric"]), len(world["spec"]["categorical"])

    def first_calls_ms(fn) -> float:
        t0 = time.perf_counter()
        with torch.inference_mode():
            for _ in range(3):  # batch 1: no intra-op threads to wake (their latency is not the point here)
                fn(torch.zeros(1, u), torch.zeros(1, c, dtype=torch.int64))
        return (time.perf_counter() - t0) * 1e3

    path = world["registry"].version_uri(record["version"]) + "/" + TORCHSCRIPT_FILE
    first_calls_ms(load_torchscript(path))  # the process's one-time costs: not what a swap pays
    cold = first_calls_ms(load_torchscript(path))
    warm = first_calls_ms(serving.load_verified(world["registry"], record).fn)
    assert warm < cold / 3, (warm, cold)


def test_a_version_whose_files_do_not_match_its_hash_is_never_loaded(world, tmp_path):
    # a registry of its own: the module's server must never see this test's damaged production version
    registry, _ = fresh_registry(world, tmp_path / "registry")
    holder = serving.PolicyHolder(registry.root, MODEL)
    assert holder.refresh() and holder.current is not None
    served = holder.current.version
    # a new version whose TorchScript file is altered after registration
    third = promote(registry, world["models"][2])
    from grade.model.policy import TORCHSCRIPT_FILE

    path = registry.version_uri(third) + "/" + TORCHSCRIPT_FILE
    data = bytearray(open(path, "rb").read())
    data[len(data) // 2] ^= 0xFF  # same size, other content
    open(path, "wb").write(bytes(data))
    assert not holder.refresh()
    assert holder.current.version == served
    with pytest.raises(serving.IntegrityError):
        serving.load_verified(registry, registry.production()[0])


def test_a_response_head_is_sent_with_its_body_in_one_write():
    from grade.core.http_server import OneWriteTransport

    class Recorder:
        def __init__(self):
            self.writes, self.closed = [], False

        def write(self, data):
            self.writes.append(bytes(data))

        def close(self):
            self.closed = True

        def get_extra_info(self, name):
            return name

    raw = Recorder()
    t = OneWriteTransport(raw)
    head = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\n"
    t.write(head)
    assert raw.writes == []
    t.write(b"{}")
    assert raw.writes == [head + b"{}"]
    t.write(b"HTTP/1.1 100 Continue\r\n\r\n")  # an interim answer the client waits for: at once
    assert raw.writes[-1] == b"HTTP/1.1 100 Continue\r\n\r\n"
    t.write(b"HTTP/1.1 500 Internal Server Error\r\nconnection: close\r\n\r\n")
    t.close()  # a held head goes out before the connection closes
    assert raw.writes[-1].startswith(b"HTTP/1.1 500") and raw.closed
    assert t.get_extra_info("peername") == "peername"


def test_a_response_without_a_body_is_sent_when_it_completes(server):
    """A HEAD answer has a head and no body: the held head goes out when the response completes, not
    when the kept-alive connection next writes or closes (uvicorn's keep-alive timeout is 5 s)."""
    import http.client
    from urllib.parse import urlparse

    u = urlparse(server)
    conn = http.client.HTTPConnection(u.hostname, u.port, timeout=2)
    try:
        for _ in range(2):   # twice on the same kept-alive connection
            conn.request("HEAD", "/v2/health/live")
            response = conn.getresponse()
            response.read()
            assert response.status in (200, 405)
        conn.request("GET", "/v2/health/live")
        response = conn.getresponse()
        assert response.status == 200 and json.loads(response.read())["live"] is True
    finally:
        conn.close()


def test_the_default_worker_count_is_the_containers_cpu_limit(tmp_path):
    from grade.core.http_server import available_cpus

    cores = len(__import__("os").sched_getaffinity(0))
    (tmp_path / "cpu.max").write_text("150000 100000\n")
    assert available_cpus(str(tmp_path)) == min(cores, 2)
    (tmp_path / "cpu.max").write_text("max 100000\n")
    assert available_cpus(str(tmp_path)) == cores
    assert available_cpus(str(tmp_path / "none")) == cores


def test_a_worker_that_exits_stops_the_server_with_its_status(tmp_path):
    import sys

    from grade.core.http_server import supervise

    # the first worker to start exits 3 once the other is running; that one runs for a minute unless stopped
    script = f"""
import os, pathlib, signal, sys, time
try:
    os.close(os.open(r"{tmp_path / 'first'}", os.O_CREAT | os.O_EXCL))
    while not pathlib.Path(r"{tmp_path / 'running'}").exists():
        time.sleep(0.05)
    sys.exit(3)
except FileExistsError:
    pass
signal.signal(signal.SIGTERM, lambda *_: (pathlib.Path(r"{tmp_path / 'stopped'}").touch(), sys.exit(0)))
pathlib.Path(r"{tmp_path / 'running'}").touch()
time.sleep(60)
"""
    t0 = time.monotonic()
    status = supervise([sys.executable, "-c", script], 2, free_port())
    assert status == 3 and (tmp_path / "stopped").exists() and time.monotonic() - t0 < 30


def test_a_server_whose_workers_find_no_model_exits_2_naming_it(tmp_path):
    """Bad input stays bad input with worker processes: each worker's exit 2 ends the server with 2."""
    import subprocess
    import sys

    from grade.model.registry import Registry

    Registry(str(tmp_path / "registry"), MODEL)  # an empty registry: no production alias
    done = subprocess.run([sys.executable, "-m", "components.serve", "--registry", str(tmp_path / "registry"),
                           "--port", str(free_port()), "--wait-seconds", "0", "--workers", "2"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2, done.stderr[-2000:]
    assert "no verified model to serve" in done.stderr


def test_a_negative_batch_rows_is_refused_with_exit_2_naming_the_flag(capsys):
    with pytest.raises(SystemExit) as e:
        serve_cli.build_parser().parse_args(["--registry", "r", "--batch-rows", "-3"])
    assert e.value.code == 2 and "--batch-rows" in capsys.readouterr().err
    assert serve_cli.build_parser().parse_args(["--registry", "r", "--batch-rows", "0"]).batch_rows == 0


# ------------------------------------------------------------------------------------------------
# A version is served only after its answers are checked; bad inputs and bad starts are refused
# ------------------------------------------------------------------------------------------------

def fresh_registry(world, root) -> tuple:
    """A registry of its own under ``root`` with world's first model in production: (registry, version)."""
    from grade.model.registry import Registry

    registry = Registry(str(root), MODEL)
    return registry, promote(registry, world["models"][0])


class _Answers:
    """Builds TorchScript modules that answer the probe batch wrongly."""

    @staticmethod
    def script(kind: str, world):
        import torch

        k = len(world["spec"]["objectives"])

        class Bad(torch.nn.Module):
            def __init__(self, kind: str, k: int):
                super().__init__()
                self.kind, self.k = kind, k

            def forward(self, num: torch.Tensor, cat: torch.Tensor) -> torch.Tensor:
                n = num.shape[0]
                if self.kind == "nan":
                    return torch.full([n, self.k], float("nan"))
                if self.kind == "two_columns":
                    return torch.full([n, 2], 0.5)
                return torch.full([n, self.k], 5.0)

        return torch.jit.script(Bad(kind, k))


def publish_version_with_torchscript(registry, model_uri: str, module) -> str:
    """Register ``model_uri`` as a new version, then replace its TorchScript file by ``module`` and
    republish the version's manifest: the files agree with the manifest, the answers are wrong."""
    import shutil

    import torch

    from grade.core import store
    from grade.model.policy import TORCHSCRIPT_FILE

    version, _ = registry.register(model_uri)
    uri = registry.version_uri(version)
    staging = Path(uri).parent / "staging"
    shutil.copytree(uri, staging)
    (staging / store.MANIFEST).unlink()  # the version's own; the model folder's stays a file of it
    torch.jit.save(module, str(staging / TORCHSCRIPT_FILE))
    store.publish_dir(staging, uri, extra={"version": version})
    shutil.rmtree(staging)
    return version


def _another_dirichlet(world):
    """A module whose weights are the version's own but whose Dirichlet is another policy's."""
    import torch

    from grade.model.policy import ServingPolicy, load_policy

    class Mixed(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.own = ServingPolicy(load_policy(world["models"][1]))
            self.other = load_policy(world["models"][2])

        def forward(self, num: torch.Tensor, cat: torch.Tensor) -> torch.Tensor:
            return self.own(num, cat)

        @torch.jit.export
        def dirichlet(self, num: torch.Tensor, cat: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            return self.other(num, cat)

        @torch.jit.export
        def alpha_floor(self) -> float:
            return 0.2

    return torch.jit.script(Mixed().eval())


@pytest.mark.parametrize("kind", ["nan", "two_columns", "five", "another_policy", "another_dirichlet"])
def test_a_version_that_answers_the_probe_batch_wrongly_is_rejected_once_and_the_previous_keeps_serving(
        world, tmp_path, kind, monkeypatch):
    import torch

    from grade.model.policy import PROBE_FILE, ServingPolicy, load_policy

    registry, first = fresh_registry(world, tmp_path / "registry")
    assert (Path(registry.version_uri(first)) / PROBE_FILE).is_file()  # recorded at registration
    holder = serving.PolicyHolder(registry.root, MODEL)
    assert holder.refresh() and holder.current.version == first
    module = (torch.jit.script(ServingPolicy(load_policy(world["models"][2])).eval())
              if kind == "another_policy" else _another_dirichlet(world) if kind == "another_dirichlet"
              else _Answers.script(kind, world))
    bad = publish_version_with_torchscript(registry, world["models"][1], module)
    registry.set_production(bad, "test", expected_etag=registry.production()[1])
    loads = []
    load_verified = serving.load_verified
    monkeypatch.setattr(serving, "load_verified", lambda *a: loads.append(a) or load_verified(*a))
    assert not holder.refresh() and not holder.refresh()  # two watch intervals: one load attempt
    assert holder.current.version == first and len(loads) == 1
    [rejected] = holder.rejections()
    expected = {"nan": "not finite", "two_columns": "shape [8, 2]", "five": "off the simplex",
                "another_policy": "away from the evaluated policy",
                "another_dirichlet": "a Dirichlet"}[kind]
    assert rejected["version"] == bad and expected in rejected["reason"], rejected
    # the server's metadata names it, with its reason
    model = server_lib.make_model(holder, MODEL)
    model.load()
    status, body = asyncio.run(_asgi_get(server_lib.RequestGate(None, model=model), f"/v2/models/{MODEL}"))
    meta = json.loads(body)
    assert status == 200 and meta["versions"] == [first] and meta["rejected_versions"] == [rejected]
    assert {i["name"] for i in meta["inputs"]} >= {c["name"] for c in world["spec"]["numeric"]}


async def _asgi_get(app, path: str) -> tuple[int, bytes]:
    sent: list[dict] = []

    async def receive():
        return {"type": "http.disconnect"}

    async def send(message):
        sent.append(message)

    scope = {"type": "http", "method": "GET", "path": path, "query_string": b"", "headers": []}
    await app(scope, receive, send)
    return sent[0]["status"], b"".join(m.get("body", b"") for m in sent[1:])


def run_server_cli(*args: str, timeout: float = 120, env: dict | None = None):
    """``python -m components.serve ARGS`` run to its end: the completed process (text output)."""
    import os
    import subprocess
    import sys

    return subprocess.run([sys.executable, "-m", "components.serve", *args], capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, **(env or {})})


def one_error_line(stderr: str) -> str:
    """The one line a refused start writes (no traceback, nothing else)."""
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), stderr[-3000:]
    return lines[0]


@pytest.mark.parametrize("workers", ["1", "2"])
def test_a_start_with_a_production_version_that_fails_its_check_exits_2_in_one_line(world, tmp_path, workers):
    registry, _ = fresh_registry(world, tmp_path / "registry")
    bad = publish_version_with_torchscript(registry, world["models"][1], _Answers.script("nan", world))
    registry.set_production(bad, "test", expected_etag=registry.production()[1])
    done = run_server_cli("--registry", registry.root, "--port", str(free_port()), "--workers", workers)
    assert done.returncode == 2
    line = one_error_line(done.stderr)
    assert bad in line and "not finite" in line


@pytest.mark.parametrize("workers", ["1", "2"])
def test_a_port_in_use_exits_2_naming_it_in_one_line(world, tmp_path, workers):
    import socket

    with socket.create_server(("0.0.0.0", 0)) as taken:
        port = str(taken.getsockname()[1])
        done = run_server_cli("--registry", world["registry"].root, "--port", port, "--workers", workers)
    assert done.returncode == 2 and f"--port {port}" in one_error_line(done.stderr)


def test_a_model_name_that_is_not_a_plain_name_is_refused(world, tmp_path):
    """``--model-name ../x`` would serve the registry ``x`` beside the one --registry names."""
    from grade.model.registry import Registry

    outside = Registry(str(tmp_path / "registry"), "x")  # <root>/registry/../x is <root>/x
    promote(outside, world["models"][0])
    for name in ("../x", "x/../../x", str(tmp_path / "x"), ".."):
        done = run_server_cli("--registry", str(tmp_path / "registry" / "inner"), "--model-name", name,
                              "--port", str(free_port()), "--workers", "1", timeout=60)
        assert done.returncode == 2 and "--model-name" in one_error_line(done.stderr), name
    with pytest.raises(InputError):
        serving.PolicyHolder(str(tmp_path / "registry"), "../x")


def test_a_fractional_value_of_an_integer_input_is_refused_on_both_routes(server, world):
    """3.7 is not category 3: integer inputs must be integral (batch scoring refuses 1.5 too)."""
    spec = world["spec"]
    plain = v2_body(log_requests(world["logs"], spec, 2), spec)
    name = spec["categorical"][0]["name"]
    known = next(i["data"][0] for i in plain["inputs"] if i["name"] == name)
    for i in plain["inputs"]:
        if i["name"] == name:
            i["data"] = [known + 0.7, i["data"][1]]  # truncated, a known category
    extended = {**plain, "parameters": {"note": "decoded by KServe's handler"}}
    for body in (plain, extended):
        status, answer = call(server, f"/v2/models/{MODEL}/infer", body)
        assert status == 400 and name in answer["error"] and "whole numbers" in answer["error"], answer
    for i in plain["inputs"]:
        if i["name"] == name:
            i["data"] = [float(known), i["data"][1]]  # 12.0 is a whole number
    assert call(server, f"/v2/models/{MODEL}/infer", plain)[0] == 200


def test_a_body_nested_too_deep_gets_a_400_naming_it(world, tmp_path):
    registry, _ = fresh_registry(world, tmp_path / "registry")
    holder = serving.PolicyHolder(registry.root, MODEL)
    assert holder.refresh()
    model = server_lib.make_model(holder, MODEL)
    model.load()
    gate = server_lib.RequestGate(None, model=model)
    for body in (b"[" * 100_000, b'{"a": ' * 5_000 + b"NaN" + b"}" * 5_000):
        status, answer = asgi_post(gate, f"/v2/models/{MODEL}/infer", body)
        assert status == 400 and "nested" in json.loads(answer)["error"], answer[:200]


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def test_workers_exit_when_their_supervisor_is_killed(world, tmp_path):
    import os
    import signal

    registry, _ = fresh_registry(world, tmp_path / "registry")
    port = free_port()
    proc = start_server(registry.root, port, tmp_path / "server.log", workers=2)
    workers = [int(c) for t in Path(f"/proc/{proc.pid}/task").iterdir()
               for c in (t / "children").read_text().split()]
    assert len(workers) == 2
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    deadline = time.monotonic() + 30
    while any(_alive(w) for w in workers) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not any(_alive(w) for w in workers)
    with pytest.raises(OSError):
        urllib.request.urlopen(f"http://127.0.0.1:{port}/v2/health/live", timeout=2)


def test_a_version_loaded_from_s3_leaves_no_temp_folder_on_success_or_refusal(world, s3_env):
    import tempfile

    registry, first = fresh_registry(world, s3_env + "/registry")
    record = registry.production()[0]
    scratch = Path(tempfile.gettempdir())
    before = set(scratch.glob("grade-fetch-*"))
    assert serving.load_verified(registry, record).version == first
    with pytest.raises(serving.IntegrityError):
        serving.load_verified(registry, {**record, "content_hash": "0" * 64})
    assert set(scratch.glob("grade-fetch-*")) == before


def test_exploring_serves_seeded_draws_with_their_log_density_and_scoring_draws_the_same(world, tmp_path):
    import torch

    from grade.model.exploration import ExploreConfig
    from grade.release.scoring import score_requests

    policy = serving.load_verified(world["registry"], world["registry"].production()[0])
    spec = world["spec"]
    columns = log_requests(world["logs"], spec, 16)
    inputs = {i["name"]: np.asarray(i["data"]).reshape(i["shape"])
              for i in v2_body(columns, spec, with_candidates=True)["inputs"]}
    off = serving.predict(policy, inputs)
    zero = serving.predict(policy, inputs, exploring=ExploreConfig(share=0.0))
    assert set(zero) == set(off) and "log_propensity" not in off
    for key in ("weights", "scores", "ranking"):
        np.testing.assert_array_equal(zero[key], off[key])
    cfg = ExploreConfig(share=0.5, kappa_cap=50.0, seed=2)
    on = serving.predict(policy, inputs, exploring=cfg)
    again = serving.predict(policy, {k: v[::-1] for k, v in inputs.items()}, exploring=cfg)  # reversed batch
    np.testing.assert_array_equal(again["weights"][::-1], on["weights"])
    explored = np.isfinite(on["log_propensity"])
    assert 0 < explored.sum() < len(explored) and on["model_version"] == policy.version
    np.testing.assert_array_equal(on["weights"][~explored], off["weights"][~explored])
    assert not np.allclose(on["weights"][explored], off["weights"][explored], atol=1e-3)
    num, cat = serving.model_inputs({k: v for k, v in inputs.items() if k in policy.transform.numeric
                                     or k in policy.transform.categorical}, policy.transform)
    with torch.inference_mode():
        mu, kappa = policy.fn.dirichlet(torch.from_numpy(num), torch.from_numpy(cat))
    alpha = (kappa.clamp(max=50.0)[:, None] * mu + policy.alpha_floor).double()[explored]
    served = torch.from_numpy(on["weights"][explored]).double()
    expected = torch.distributions.Dirichlet(alpha).log_prob(served)
    np.testing.assert_allclose(on["log_propensity"][explored], expected.numpy(), rtol=1e-5, atol=1e-4)
    # a call without ids is served the mean: nothing seeds a draw
    anonymous = serving.predict(policy, {k: v for k, v in inputs.items() if k != "request_id"}, exploring=cfg)
    np.testing.assert_array_equal(anonymous["weights"], off["weights"])
    assert np.isnan(anonymous["log_propensity"]).all()
    # the gate's JSON answer: the log-propensity, null where the request was served the mean
    holder = serving.PolicyHolder(world["registry"].root, MODEL)
    assert holder.refresh()
    model = server_lib.make_model(holder, MODEL, exploring=cfg)
    model.load()
    status, answer = asgi_post(server_lib.RequestGate(None, model=model), f"/v2/models/{MODEL}/infer",
                               json.dumps(v2_body(columns, spec)).encode())
    outputs = {o["name"]: o for o in json.loads(answer)["outputs"]}
    assert status == 200 and [v is None for v in outputs["log_propensity"]["data"]] == list(~explored)
    # batch scoring draws the same weights for the same request ids
    score_requests(world["registry"].version_uri(policy.version), world["logs"], str(tmp_path / "s"),
                   exploring=cfg)
    scored = ds.dataset(str(tmp_path / "s"), format="parquet").to_table().to_pandas()
    scored = scored.drop_duplicates("request_id").set_index("request_id")
    w = scored.loc[columns["request_id"], [f"w_{o}" for o in spec["objectives"]]].to_numpy()
    np.testing.assert_allclose(w, on["weights"], atol=1e-6)
    logged = scored.loc[columns["request_id"], "served_log_propensity"].to_numpy()
    np.testing.assert_allclose(logged[explored], on["log_propensity"][explored], rtol=1e-5)
    assert np.isnan(logged[~explored]).all() and (scored["model_version"] == policy.version).all()
