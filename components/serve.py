"""Serve the registry's production policy online: per-request fusion weights over HTTP (KServe).

    python -m components.serve --registry URI [--model-name NAME] [--port N] [--watch-seconds S]
                               [--unknown-categories reject|oov] [--version VERSION] [--threads N]

A KServe ModelServer (Open Inference Protocol v2 and v1) with one model, NAME (default grade-mtf):
the TorchScript policy the registry's `production` alias names, loaded only when its files match the
registry's content hash. The alias is checked every --watch-seconds; a newly promoted version is
loaded, verified and given its first (slow) TorchScript calls beside the served one and then swapped
in, so no request fails, waits for it or mixes versions.

  POST /v2/models/NAME/infer   inputs: the user/context features (one value per request), optionally
                               pred_<objective> [N, L] for L candidates; outputs: weights [N, K]
                               (rows on the simplex), with candidates scores [N, L] and ranking [N, L]
                               (best first); model_version names the version that answered
  GET  /v2/models/NAME         every input and output with its datatype and shape
  POST /v1/models/NAME:predict {"instances": [{feature: value, ...}, ...]}
  GET  /v2/health/live, /v2/health/ready, /v2/models/NAME/ready; GET /metrics (Prometheus)

Plain v2 JSON infer calls ({"id"?, "inputs": [{name, shape, datatype, data}]} with numeric data) are
answered by a gate in front of KServe's REST stack: the same model call, encoding and error handlers,
without the route's pydantic round trips. Everything else (the binary tensor extension, parameters,
requested outputs, v1, metadata) goes through KServe's handlers. The server runs on uvloop and logs
no line per request unless --access-log.

Bad requests (missing/extra/unknown inputs, wrong shapes, NaN, unknown categories, empty or too large
batches, bodies that are not JSON or over the size limit) get a 4xx naming the field.
Needs the `serve` extra (pip install 'grade-mtf[serve]'). S3 settings come from the environment.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import json
import logging
import sys
from typing import Any

import numpy as np

from grade import cli, serving
from grade.errors import InputError

#: Largest request body accepted (bytes): about 4,000 requests with 100 candidates as JSON.
MAX_BODY_BYTES = 8 * 1024 * 1024


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m components.serve", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--registry", required=True, metavar="URI", help="registry root (folder or s3:// prefix)")
    p.add_argument("--model-name", default="grade-mtf", metavar="NAME",
                   help="registry model name (and URL name)")
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
    p.add_argument("--access-log", action="store_true",
                   help="log every request (off by default: a log line per call costs latency; "
                        "/metrics counts them)")
    p.add_argument("--wait-seconds", type=float, default=60.0, metavar="S",
                   help="how long to wait for a verified production model at start (default 60)")
    return p


#: Numeric Open Inference Protocol datatypes whose JSON data numpy reads as numbers (not BYTES, nor FP16,
#: which KServe refuses in JSON).
JSON_NUMERIC_DATATYPES = frozenset({"BOOL", "UINT8", "UINT16", "UINT32", "UINT64", "INT8", "INT16", "INT32",
                                    "INT64", "FP32", "FP64"})
_INPUT_KEYS = {"name", "shape", "datatype", "data"}


@functools.cache
def _answers_counter():
    """On the server's /metrics beside KServe's latency histograms: answers per version and outcome
    (one per process: Prometheus refuses a second metric of the same name)."""
    from prometheus_client import Counter

    return Counter("grade_serve_requests", "infer calls by served version and outcome",
                   ["version", "outcome"])


def make_model(holder: serving.PolicyHolder, name: str, strict_categories: bool = True):
    """The KServe model over ``holder`` (imports kserve: the `serve` extra)."""
    import kserve
    from kserve.errors import InvalidInput
    from kserve.protocol.infer_type import InferOutput, InferRequest, InferResponse

    answers = _answers_counter()

    class GradeModel(kserve.Model):
        def load(self) -> bool:
            self.ready = holder.current is not None
            return self.ready

        def get_input_types(self) -> list[dict[str, Any]]:
            return [{k: v for k, v in i.items() if k != "optional"}
                    for i in serving.input_metadata(holder.current.spec)]

        def get_output_types(self) -> list[dict[str, Any]]:
            return [{k: v for k, v in o.items() if k != "optional"}
                    for o in serving.output_metadata(holder.current.spec)]

        async def predict(self, payload: Any, headers: dict[str, str] | None = None, response_headers=None):
            policy = holder.current  # one version serves the whole request
            v2 = isinstance(payload, InferRequest)
            try:
                result = serving.predict(policy, _v2_inputs(payload) if v2 else _v1_inputs(payload),
                                         strict_categories)
            except serving.BadRequest as e:
                answers.labels(policy.version, "bad_request").inc()
                raise InvalidInput(str(e)) from None
            answers.labels(policy.version, "ok").inc()
            names = [n for n in ("weights", "scores", "ranking") if n in result]
            if v2:
                return InferResponse(response_id=payload.id or "", model_name=self.name,
                                     model_version=policy.version,
                                     infer_outputs=[_output(n, result[n]) for n in names],
                                     parameters={"model_version": policy.version})
            rows = [{n: result[n][i].tolist() for n in names} for i in range(len(result["weights"]))]
            return {"predictions": rows, "model_version": policy.version}

    def _output(name: str, array) -> InferOutput:
        # the array itself, encoded once: by the gate (encode_v2_response) or KServe's to_rest
        datatype = "INT64" if array.dtype.kind == "i" else "FP32"
        return InferOutput(name=name, shape=list(array.shape), datatype=datatype, data=array)

    def _v2_inputs(request: InferRequest) -> dict[str, Any]:
        inputs: dict[str, Any] = {}
        for i in request.inputs:
            if i.name in inputs:
                raise serving.BadRequest(f"input '{i.name}' given twice")
            try:
                inputs[i.name] = i.as_numpy()
            except Exception as e:  # data that does not fit its declared datatype/shape
                raise serving.BadRequest(f"input '{i.name}': {e}") from None
        return inputs

    def _v1_inputs(payload: Any) -> dict[str, Any]:
        instances = payload.get("instances") if isinstance(payload, dict) else None
        if not isinstance(instances, list) or not all(isinstance(r, dict) for r in instances):
            raise serving.BadRequest("'instances': expected a list of {feature: value} objects")
        names = sorted({k for r in instances for k in r})
        for j, r in enumerate(instances):
            if set(r) != set(names):
                raise serving.BadRequest(f"'instances', row {j}: expected the inputs {names}, "
                                         f"got {sorted(r)}")
        return {n: [r[n] for r in instances] for n in names}

    return GradeModel(name)


def plain_v2_request(doc: Any, model_name: str):
    """The KServe ``InferRequest`` of a v2 JSON body in its plain form, ``{"id"?: str, "inputs":
    [{"name", "shape", "datatype", "data"}, ...]}`` with numeric datatypes, built as KServe's decoder
    builds it; None for any other body (parameters, requested outputs, BYTES or FP16 data, fields of
    other types), which KServe's own handler decodes and answers as before."""
    from kserve.protocol.infer_type import InferInput, InferRequest

    if not (isinstance(doc, dict) and doc.keys() <= {"id", "inputs"} and isinstance(doc.get("inputs"), list)):
        return None
    request_id = doc.get("id")
    if request_id is not None and not isinstance(request_id, str):
        return None
    inputs = []
    for i in doc["inputs"]:
        if not (isinstance(i, dict) and i.keys() == _INPUT_KEYS and isinstance(i["name"], str)
                and i["datatype"] in JSON_NUMERIC_DATATYPES and isinstance(i["data"], list)
                and isinstance(i["shape"], list) and all(type(d) is int for d in i["shape"])):
            return None
        inputs.append(InferInput(i["name"], i["shape"], i["datatype"], data=i["data"]))
    return InferRequest(model_name, inputs, request_id=request_id)


def parse_json(body: bytes) -> Any:
    """The JSON document of a request body (ValueError when it is not JSON). orjson first; Python's
    parser for what only it reads (NaN and Infinity literals), so that such a value gets the 400
    naming its input, as it did before."""
    import orjson

    try:
        return orjson.loads(body or b"null")
    except orjson.JSONDecodeError:
        return json.loads(body or b"null")


class RequestGate:
    """ASGI middleware in front of KServe's REST stack.

    Every POST body is read once: 413 over ``max_bytes`` (from the declared length, or while reading)
    and 400 naming the body for one that is not JSON, instead of the framework's 500s.

    A plain Open Inference Protocol v2 JSON infer call for ``model`` (:func:`plain_v2_request`) is
    answered here: the same KServe model call (``Model.__call__``: pre/post-processing and KServe's
    latency histograms), the same ``InferResponse`` encoding and KServe's own error handlers, without
    the framework route's pydantic validation and response re-validation, which cost several times
    the policy itself on a small batch (benchmarks/README.md). Every other request (v1, metadata, the
    binary tensor extension, requests with parameters or requested outputs, other models) is handed
    on to KServe with its body unchanged.
    """

    def __init__(self, app, model=None, max_bytes: int = MAX_BODY_BYTES):
        self.app = app
        self.model = model
        self.max_bytes = max_bytes
        self.infer_path = f"/v2/models/{model.name}/infer" if model is not None else None

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["method"] != "POST":
            return await self.app(scope, receive, send)
        headers = dict(scope["headers"])
        declared = headers.get(b"content-length", b"")
        if declared.isdigit() and int(declared) > self.max_bytes:
            return await _error(413, f"body: {int(declared)} bytes, at most {self.max_bytes}", scope, send)
        chunks, size, more = [], 0, True
        while more:
            message = await receive()
            if message["type"] != "http.request":
                return await self.app(scope, receive, send)  # the client went away
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            more = message.get("more_body", False)
            if size > self.max_bytes:
                return await _error(413, f"body: over {self.max_bytes} bytes", scope, send)
        body = b"".join(chunks)
        try:
            doc = parse_json(body)
        except ValueError as e:
            return await _error(400, f"body: not JSON ({e})", scope, send)
        if (scope["path"] == self.infer_path and self.model.ready
                and b"inference-header-content-length" not in headers):
            request = plain_v2_request(doc, self.model.name)
            if request is not None:
                return await self._infer(request, scope, send)
        await self.app(scope, _replay(body, receive), send)

    async def _infer(self, request, scope, send) -> None:
        """Answer ``request`` as KServe's v2 infer handler does."""
        from kserve.errors import InvalidInput, generic_exception_handler, invalid_input_handler

        headers = {k.decode("latin-1"): v.decode("latin-1") for k, v in scope["headers"]}
        try:
            response, _ = await self.model(request, headers=headers)
            body = encode_v2_response(response)
        except InvalidInput as e:
            return await (await invalid_input_handler(None, e))(scope, _no_body, send)
        except Exception as e:  # as KServe's handler for anything else: a 500 naming the error
            return await (await generic_exception_handler(None, e))(scope, _no_body, send)
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-type", b"application/json"),
                                (b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body})


def encode_v2_response(response) -> bytes:
    """The v2 JSON of a KServe ``InferResponse``, the document ``response.to_rest()`` gives, with its
    numpy outputs written by orjson: KServe's encoder converts them one element at a time (0.8 ms
    for a [64, 3] output, more than the policy). FP32 values are written as the doubles KServe's
    lists hold, so both routes answer the same numbers; any other output goes through ``to_rest``."""
    import orjson
    from kserve.protocol.infer_type import to_http_parameters

    outputs = []
    for o in response.outputs:
        if not isinstance(o.data, np.ndarray) or o.parameters or o.datatype not in ("FP32", "INT64"):
            return orjson.dumps(response.to_rest()[0])
        data = o.data.astype(np.float64) if o.datatype == "FP32" else o.data
        outputs.append({"name": o.name, "shape": o.shape, "datatype": o.datatype, "data": data.ravel()})
    doc = {"id": response.id, "model_name": response.model_name, "model_version": response.model_version,
           "outputs": outputs}
    if response.parameters:
        doc["parameters"] = to_http_parameters(response.parameters)
    return orjson.dumps(doc, option=orjson.OPT_SERIALIZE_NUMPY)


def _replay(body: bytes, receive):
    """An ASGI ``receive`` that yields the already read ``body`` once, then defers to ``receive``."""
    replayed = False

    async def replay():
        nonlocal replayed
        if replayed:
            return await receive()
        replayed = True
        return {"type": "http.request", "body": body, "more_body": False}

    return replay


async def _no_body():
    return {"type": "http.disconnect"}


async def _error(status: int, message: str, scope, send) -> None:
    from starlette.responses import JSONResponse

    await JSONResponse({"error": message}, status_code=status)(scope, _no_body, send)


def serve(args: argparse.Namespace) -> None:
    import torch

    torch.set_num_threads(max(1, args.threads))
    torch.set_num_interop_threads(1)  # nothing here runs ops in parallel; idle pools only add wake-ups
    holder = serving.PolicyHolder(args.registry, args.model_name, pinned=args.version)
    try:
        policy = serving.wait_for_version(holder, args.wait_seconds)
    except serving.IntegrityError as e:
        raise InputError(str(e)) from None
    cli.log.info("serving %s/%s from %s on port %d", args.model_name, policy.version, args.registry,
                 args.port)
    if not args.version:
        holder.watch(args.watch_seconds)
    model = make_model(holder, args.model_name, args.unknown_categories == "reject")
    model.load()
    start_model_server(model, args.port, args.access_log)


def install_gate(app, model) -> None:
    """Put :class:`RequestGate` in front of the middleware stack ``app`` builds on its first call,
    rather than inside it (``add_middleware``). KServe adds a timing middleware when it starts the
    server, after this: two getrusage calls per request, which took most of a busy server's time
    (benchmarks/README.md). The calls the gate answers skip it; everything the gate hands on goes
    through the whole stack as before."""
    build = app.build_middleware_stack
    app.build_middleware_stack = lambda: RequestGate(build(), model=model)


def start_model_server(model, port: int, access_log: bool = False) -> None:
    """Serve the loaded KServe ``model`` on ``port`` until a signal: KServe's ModelServer (REST only, one
    worker) behind :class:`RequestGate`, on uvloop, without a log line per request unless ``access_log``."""
    import kserve
    from kserve import model_server

    install_gate(model_server.app, model)
    server = kserve.ModelServer(http_port=port, enable_grpc=False, workers=1,
                                enable_latency_logging=access_log)
    if not access_log:  # KServe's timing middleware logs two lines per request at INFO
        for name in ("uvicorn.access", "kserve.trace"):
            logging.getLogger(name).setLevel(logging.WARNING)
    _use_uvloop()
    server.start([model])


def _use_uvloop() -> None:
    """Run the server on uvloop when it is installed (uvicorn's `standard` extra): KServe starts its
    servers with ``asyncio.run``, which takes the policy's loop, and the standard selector loop costs
    about three times uvloop's CPU per request in socket handling (benchmarks/README.md)."""
    try:
        import uvloop
    except ImportError:
        cli.log.info("uvloop is not installed: serving on the standard asyncio loop")
        return
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    asyncio.set_event_loop(asyncio.new_event_loop())  # KServe configures the current loop before its run


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    serve(args)
    return 0


if __name__ == "__main__":
    sys.exit(cli.run(main))
