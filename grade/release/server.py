"""The online server (run by components/serve.py): KServe's ModelServer with one model behind a request
gate, on uvloop, each response in one write.

- :func:`make_model` is the KServe model over a :class:`serving.PolicyHolder`; its ``answer_many`` is
  the one model call of both routes, KServe's and the gate's.
- :class:`RequestGate` answers plain v2 JSON infer calls itself (the same model call, response
  document and error handlers as KServe's route, without its protocol objects and pydantic round
  trips) and hands everything else on to KServe; it bounds request bodies (size, JSON nesting).
- :func:`serve` runs the server: N worker processes on one socket (grade/core/http_server.py), or
  this process alone.

What is served (loading, checks, validation, the transform, weights and ranking) is decided in
grade/release/serving.py; how processes and sockets run, in grade/core/http_server.py.
"""

from __future__ import annotations

import asyncio
import functools
import gc
import json
import logging
import os
import socket
import time
from dataclasses import dataclass
from typing import Any

import numpy as np

from grade.core import http_server
from grade.core.errors import InputError
from grade.core.store import paths
from grade.model.exploration import ExploreConfig
from grade.release import serving

log = logging.getLogger("grade.release.server")

#: Largest request body accepted (bytes): about 4,000 requests with 100 candidates as JSON.
MAX_BODY_BYTES = 8 * 1024 * 1024
#: Most request rows of the concurrent calls answered by one policy call (benchmarks/README.md)
DEFAULT_BATCH_ROWS = 256

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


#: the outputs of a predict result, in answer order
OUTPUT_NAMES = ("weights", "scores", "ranking", "log_propensity")


def v2_outputs(result: dict[str, Any]) -> list[dict[str, Any]]:
    """The v2 outputs (name, shape, datatype, data: the array) of a :func:`serving.predict` result."""
    return [{"name": n, "shape": list(result[n].shape), "datatype": "INT64" if result[n].dtype.kind == "i"
             else "FP32", "data": result[n]} for n in OUTPUT_NAMES if n in result]


def named_arrays(decoders) -> dict[str, np.ndarray]:
    """{name: array} of the (name, decode) pairs of a request's inputs; a name given twice or data that
    does not fit its declared datatype and shape is a :class:`serving.BadRequest` naming the input."""
    inputs: dict[str, np.ndarray] = {}
    for name, decode in decoders:
        if name in inputs:
            raise serving.BadRequest(f"input '{name}' given twice")
        try:
            inputs[name] = decode()
        except Exception as e:  # data that does not fit its declared datatype/shape
            raise serving.BadRequest(f"input '{name}': {e}") from None
    return inputs


def make_model(holder: serving.PolicyHolder, name: str, strict_categories: bool = True,
               exploring: ExploreConfig | None = None):
    """The KServe model over ``holder`` (imports kserve: the `serve` extra), exploring as ``exploring``
    says (None: serve the mean)."""
    import kserve
    from kserve.errors import InvalidInput
    from kserve.protocol.infer_type import InferOutput, InferRequest, InferResponse

    counter = _answers_counter()

    @functools.cache
    def answers(version: str, outcome: str):  # the counter's child, found once per version, not per call
        return counter.labels(version, outcome)

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

        def metadata(self) -> dict[str, Any]:
            """KServe's v2 model metadata, with the served version and the versions refused (with
            their reasons) since the start."""
            return {"name": self.name, "versions": [holder.current.version], "platform": "",
                    "inputs": self.get_input_types(), "outputs": self.get_output_types(),
                    "rejected_versions": holder.rejections()}

        def answer(self, decode_inputs) -> tuple[str, dict[str, Any]]:
            """(the version that answered, :func:`serving.predict`'s result) for the inputs
            ``decode_inputs()`` returns (:class:`serving.BadRequest` for a bad call)."""
            answer = self.answer_many([decode_inputs])[0]
            if isinstance(answer, serving.BadRequest):
                raise answer
            return answer

        def answer_many(self, decoders: list) -> list[tuple[str, dict[str, Any]] | serving.BadRequest]:
            """:meth:`answer` for each of several calls, with one policy call for all
            (:func:`serving.predict_many`), counted by version and outcome. The one model call of
            both routes: KServe's (:meth:`predict`) and the gate's (:class:`RequestGate`)."""
            policy = holder.current  # one version serves the whole group
            out: list[Any] = [None] * len(decoders)
            decoded = []
            for i, decode in enumerate(decoders):
                try:
                    decoded.append((i, decode()))
                except serving.BadRequest as e:
                    out[i] = e
            results = serving.predict_many(policy, [inputs for _, inputs in decoded], strict_categories,
                                           exploring)
            for (i, _), result in zip(decoded, results, strict=True):
                out[i] = result
            for i, result in enumerate(out):
                bad = isinstance(result, serving.BadRequest)
                answers(policy.version, "bad_request" if bad else "ok").inc()
                out[i] = result if bad else (policy.version, result)
            return out

        async def predict(self, payload: Any, headers: dict[str, str] | None = None, response_headers=None):
            v2 = isinstance(payload, InferRequest)

            def decode() -> dict[str, Any]:
                if v2:
                    return named_arrays((i.name, functools.partial(input_array, i)) for i in payload.inputs)
                return _v1_inputs(payload)

            try:
                version, result = self.answer(decode)
            except serving.BadRequest as e:
                raise InvalidInput(str(e)) from None
            if v2:
                outputs = [InferOutput(**o) for o in v2_outputs(result)]
                return InferResponse(response_id=payload.id or "", model_name=self.name,
                                     model_version=version, infer_outputs=outputs,
                                     parameters={"model_version": version})
            names = [n for n in OUTPUT_NAMES if n in result]
            rows = [{n: _plain(result[n][i]) for n in names} for i in range(len(result["weights"]))]
            return {"predictions": rows, "model_version": version}

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


def _plain(value: np.ndarray) -> Any:
    """A value of a v1 answer row: its list, or None for a NaN (a mean-served request's log-propensity)."""
    out = value.tolist()
    return None if isinstance(out, float) and out != out else out


def plain_v2_inputs(doc: Any) -> list[dict[str, Any]] | None:
    """The inputs of a v2 JSON body in its plain form, ``{"id"?: str, "inputs": [{"name", "shape",
    "datatype", "data"}, ...]}`` with numeric datatypes and list data; None for any other body
    (parameters, requested outputs, BYTES or FP16 data, fields of other types), which KServe's own
    handler decodes and answers as before."""
    if not (isinstance(doc, dict) and doc.keys() <= {"id", "inputs"} and isinstance(doc.get("inputs"), list)):
        return None
    request_id = doc.get("id")
    if request_id is not None and not isinstance(request_id, str):
        return None
    for i in doc["inputs"]:
        if not (isinstance(i, dict) and i.keys() == _INPUT_KEYS and isinstance(i["name"], str)
                and i["datatype"] in JSON_NUMERIC_DATATYPES and isinstance(i["data"], list)
                and isinstance(i["shape"], list) and all(type(d) is int for d in i["shape"])):
            return None
    return doc["inputs"]


def plain_decoder(inputs: list[dict[str, Any]]):
    """The decode function (:func:`named_arrays` of their arrays) of the inputs of a plain v2 call."""
    return lambda: named_arrays((i["name"], functools.partial(json_array, i)) for i in inputs)


def plain_rows(inputs: list[dict[str, Any]]) -> int:
    """The requests (rows) a plain v2 call declares: its first input's first dimension (1 if none)."""
    shape = inputs[0]["shape"] if inputs else []
    return max(1, shape[0]) if shape else 1


def json_array(given: dict[str, Any]) -> np.ndarray:
    """The array of a plain v2 JSON input, decoded as KServe's ``InferInput.as_numpy`` decodes it, except
    that integer data must be integral: numpy would turn 3.7 into category 3 (ValueError)."""
    dtype = _numpy_dtypes()[given["datatype"]]
    if dtype.kind not in "iu":
        return np.array(given["data"], dtype=dtype).reshape(given["shape"])
    values = np.array(given["data"])
    if values.dtype.kind == "f" and not (values == np.round(values)).all():
        bad = values.ravel()[np.flatnonzero(values.ravel() != np.round(values.ravel()))[0]]
        raise ValueError(f"{given['datatype']} data must be whole numbers, got {bad.item()!r}")
    if values.dtype.kind not in "biuf":
        raise ValueError(f"{given['datatype']} data must be whole numbers")
    return values.astype(dtype).reshape(given["shape"])


def input_array(given: Any) -> np.ndarray:
    """The array of an input KServe decoded (``InferInput``): its JSON data as :func:`json_array` reads
    it, binary data (or a datatype the gate does not decode) as KServe's ``as_numpy`` does."""
    if given._raw_data is None and given.datatype in JSON_NUMERIC_DATATYPES:
        return json_array({"datatype": given.datatype, "shape": given.shape, "data": given.data})
    return given.as_numpy()


@functools.cache
def _numpy_dtypes() -> dict[str, Any]:
    """KServe's numpy dtype of each JSON numeric datatype, looked up once (its function takes longer
    than the conversion of a one-value input)."""
    from kserve.utils.numpy_codec import to_np_dtype

    return {datatype: np.dtype(to_np_dtype(datatype)) for datatype in JSON_NUMERIC_DATATYPES}


def parse_json(body: bytes) -> Any:
    """The JSON document of a request body (ValueError when it is not JSON). orjson first; Python's
    parser for what only it reads (NaN and Infinity literals), so that such a value gets the 400
    naming its input, as it did before; a body nested deeper than :data:`MAX_JSON_DEPTH` is a
    ValueError before it reaches that parser (which recurses once per level)."""
    import orjson

    try:
        return orjson.loads(body or b"null")
    except orjson.JSONDecodeError:
        depth = json_depth(body)
        if depth > MAX_JSON_DEPTH:  # Python's parser would recurse once per level (RecursionError)
            raise ValueError(f"nested {depth} levels deep, at most {MAX_JSON_DEPTH}") from None
        return json.loads(body or b"null")


def json_depth(body: bytes) -> int:
    """The deepest nesting of brackets and braces in ``body`` (counting those inside strings too: an
    upper bound of the document's nesting)."""
    chars = np.frombuffer(body, np.uint8)
    step = np.isin(chars, _OPENING).astype(np.int32) - np.isin(chars, _CLOSING)
    return int(np.cumsum(step).max(initial=0))


#: deepest nesting handed to Python's JSON parser (the fallback for NaN and Infinity literals), well
#: inside its recursion limit; orjson refuses a body nested over 1,024 levels itself
MAX_JSON_DEPTH = 512
_OPENING = np.frombuffer(b"[{", np.uint8)
_CLOSING = np.frombuffer(b"]}", np.uint8)


class RequestGate:
    """ASGI middleware in front of KServe's REST stack.

    Every POST body is read once: 413 over ``max_bytes`` (from the declared length, or while reading)
    and 400 naming the body for one that is not JSON or is nested too deep (:func:`parse_json`),
    instead of the framework's 500s.

    A plain Open Inference Protocol v2 JSON infer call for ``model`` (:func:`plain_v2_inputs`) is
    answered here, from the served policy: the model's own call (``model.answer``, which KServe's
    ``predict`` makes too), the same response document and KServe's error handlers, without building
    KServe's ``InferRequest``/``InferResponse`` and without the framework route's pydantic validation
    and response re-validation, which cost several times the policy itself on a small batch
    (benchmarks/README.md). Its latency goes to KServe's predict histogram. ``GET /v2/models/NAME`` is
    answered here for a model with its own ``metadata()`` (the served and the rejected versions).
    Every other request (v1, the binary tensor extension, requests with parameters or requested
    outputs, other models) is handed on to KServe with its body unchanged.

    With worker processes (``PROMETHEUS_MULTIPROC_DIR`` set), ``GET /metrics`` is answered here too:
    the sum over every worker, whichever worker the scrape reaches.
    """

    def __init__(self, app, model=None, max_bytes: int = MAX_BODY_BYTES, batch_rows: int = 0):
        self.app = app
        self.model = model
        self.max_bytes = max_bytes
        self.together = None  # calls that arrive together, answered by one model call
        if model is not None and batch_rows > 0:
            self.together = http_server.Coalescer(
                lambda calls: model.answer_many([plain_decoder(inputs) for inputs in calls]),
                max_size=batch_rows, size_of=plain_rows)
        self.infer_path = f"/v2/models/{model.name}/infer" if model is not None else None
        # a model with its own metadata (the served and the rejected versions) answers it here
        self.metadata_path = f"/v2/models/{model.name}" if hasattr(model, "metadata") else None
        self.all_workers_metrics = bool(os.environ.get(http_server.METRICS_DIR_VAR))
        self.latency = None
        if model is not None:
            from kserve.metrics import PREDICT_HIST_TIME, get_labels

            self.latency = PREDICT_HIST_TIME.labels(**get_labels(model.name))

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["method"] != "POST":
            if scope["type"] == "http" and scope["path"] == "/metrics" and self.all_workers_metrics:
                return await _all_workers_metrics(scope, send)
            if scope["type"] == "http" and scope["path"] == self.metadata_path and self.model.ready:
                return await _json(200, self.model.metadata(), scope, send)
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
            inputs = plain_v2_inputs(doc)
            if inputs is not None:
                return await self._infer(doc.get("id"), inputs, scope, send)
        await self.app(scope, _replay(body, receive), send)

    async def _infer(self, request_id: str | None, inputs: list[dict[str, Any]], scope, send) -> None:
        """Answer a plain v2 infer call as KServe's v2 infer handler does."""
        from kserve.errors import InvalidInput, generic_exception_handler, invalid_input_handler

        start = time.perf_counter()
        try:
            if self.together is not None:
                version, result = await self.together.submit(inputs)
            else:
                version, result = self.model.answer(plain_decoder(inputs))
            body = encode_v2_answer(request_id or "", self.model.name, version, v2_outputs(result))
        except serving.BadRequest as e:
            handler = await invalid_input_handler(None, InvalidInput(str(e)))
            return await handler(scope, _no_body, send)
        except Exception as e:  # as KServe's handler for anything else: a 500 naming the error
            return await (await generic_exception_handler(None, e))(scope, _no_body, send)
        self.latency.observe(time.perf_counter() - start)
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-type", b"application/json"),
                                (b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body})


def encode_v2_answer(request_id: str, model_name: str, version: str, outputs: list[dict[str, Any]]) -> bytes:
    """The v2 JSON document KServe's ``InferResponse.to_rest()`` gives for the answer of ``version``
    with ``outputs`` (:func:`v2_outputs`), written from the arrays by orjson: KServe's encoder converts
    them one element at a time (0.8 ms for a [64, 3] output, more than the policy). FP32 values are
    written as the doubles KServe's lists hold, so both routes answer the same numbers."""
    import orjson

    data = [{**o, "data": (o["data"].astype(np.float64) if o["datatype"] == "FP32" else o["data"]).ravel()}
            for o in outputs]
    doc = {"id": request_id, "model_name": model_name, "model_version": version, "outputs": data,
           "parameters": {"model_version": version}}
    return orjson.dumps(doc, option=orjson.OPT_SERIALIZE_NUMPY)


async def _all_workers_metrics(scope, send) -> None:
    """``GET /metrics`` summed over the worker processes (prometheus_client's multi-process collector)."""
    from prometheus_client import CollectorRegistry, exposition
    from prometheus_client.multiprocess import MultiProcessCollector

    registry = CollectorRegistry()
    MultiProcessCollector(registry)
    accept = dict(scope["headers"]).get(b"accept", b"").decode("latin-1")
    encoder, content_type = exposition.choose_encoder(accept)
    body = encoder(registry)
    await send({"type": "http.response.start", "status": 200,
                "headers": [(b"content-type", content_type.encode()),
                            (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})


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
    await _json(status, {"error": message}, scope, send)


async def _json(status: int, doc: Any, scope, send) -> None:
    from starlette.responses import JSONResponse

    await JSONResponse(doc, status_code=status)(scope, _no_body, send)


@dataclass(frozen=True)
class ServerSettings:
    """How :func:`serve` runs (components/serve.py's flags)."""

    registry: str
    model_name: str = "grade-mtf"
    port: int = 8080
    watch_seconds: float = 2.0
    strict_categories: bool = True
    version: str | None = None
    threads: int = 1
    workers: int = 0
    batch_rows: int = DEFAULT_BATCH_ROWS
    listen_fd: int | None = None
    ready_fd: int | None = None
    access_log: bool = False
    wait_seconds: float = 60.0
    explore: ExploreConfig | None = None
    """exploration in serving (config serve.explore); None: serve the mean"""


def serve(settings: ServerSettings, worker_command: list[str]) -> int:
    """Run the server: ``settings.workers`` worker processes on one socket (:func:`http_server.supervise`
    runs ``worker_command``, this server with one worker, adding ``--listen-fd FD`` and, for the first,
    ``--ready-fd FD``), or this process alone."""
    paths.safe_model_name(settings.model_name, "--model-name")
    workers = settings.workers or http_server.available_cpus()
    if workers > 1 and settings.listen_fd is None:
        return http_server.supervise(worker_command, workers, settings.port, ready_flag="--ready-fd")
    import torch

    torch.set_num_threads(max(1, settings.threads))
    torch.set_num_interop_threads(1)  # nothing here runs ops in parallel; idle pools only add wake-ups
    holder = serving.PolicyHolder(settings.registry, settings.model_name, pinned=settings.version)
    # the port is taken before the model loads: one in use fails at once, naming it
    sock = socket.socket(fileno=settings.listen_fd) if settings.listen_fd is not None \
        else http_server.listening_socket(settings.port)
    try:
        policy = serving.wait_for_version(holder, settings.wait_seconds)
    except serving.IntegrityError as e:
        raise InputError(str(e)) from None
    log.info("serving %s/%s from %s on port %d", settings.model_name, policy.version, settings.registry,
             settings.port)
    if not settings.version:
        holder.watch(settings.watch_seconds)
    model = make_model(holder, settings.model_name, settings.strict_categories, settings.explore)
    if settings.explore is not None and settings.explore.share > 0:
        log.info("serve: exploring on a share %.3g of the requests with ids (kappa cap %g, seed %d)",
                 settings.explore.share, settings.explore.kappa_cap, settings.explore.seed)
    model.load()
    http_server.signal_ready(settings.ready_fd)
    start_model_server(model, settings.port, settings.access_log, [sock], batch_rows=settings.batch_rows)
    return 0


def install_gate(app, model, batch_rows: int = 0) -> None:
    """Put :class:`RequestGate` in front of the middleware stack ``app`` builds on its first call,
    rather than inside it (``add_middleware``). KServe adds a timing middleware when it starts the
    server, after this: two getrusage calls per request, which took most of a busy server's time
    (benchmarks/README.md). The calls the gate answers skip it; everything the gate hands on goes
    through the whole stack as before."""
    build = app.build_middleware_stack
    app.build_middleware_stack = lambda: RequestGate(build(), model=model, batch_rows=batch_rows)


def start_model_server(model, port: int, access_log: bool = False, sockets: list | None = None,
                       batch_rows: int = 0) -> None:
    """Serve the loaded KServe ``model`` on ``port`` (or on the listening ``sockets`` a supervisor
    shares) until a signal: KServe's ModelServer (REST only, one process) behind :class:`RequestGate`,
    on uvloop, each response in one write (:class:`http_server.OneWriteTransport`), without a log line
    per request unless ``access_log``."""
    import kserve
    from kserve import model_server

    install_gate(model_server.app, model, batch_rows)
    model_server.RESTServer = _rest_server_class(sockets)
    server = kserve.ModelServer(http_port=port, enable_grpc=False, workers=1,
                                enable_latency_logging=access_log)
    if not access_log:  # KServe's timing middleware logs two lines per request at INFO
        for name in ("uvicorn.access", "kserve.trace"):
            logging.getLogger(name).setLevel(logging.WARNING)
    _use_uvloop()
    # The objects of the start-up (torch, KServe, the model: ~290,000) never become garbage; frozen, a
    # full collection skips them instead of stopping every request for ~0.25 s to scan them.
    gc.freeze()
    server.start([model])


def _rest_server_class(sockets: list | None):
    """KServe's REST server (the class its ModelServer starts) on the one-write HTTP protocol, serving
    on ``sockets`` when given instead of binding the port itself."""
    from kserve.protocol.rest.server import RESTServer

    class OneWriteRESTServer(RESTServer):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.config.http = http_server.one_write_http_protocol()

        async def start(self):
            self.create_application()
            await self._server.serve(sockets=sockets)

    return OneWriteRESTServer


def _use_uvloop() -> None:
    """Run the server on uvloop when it is installed (uvicorn's `standard` extra): KServe starts its
    servers with ``asyncio.run``, which takes the policy's loop, and the standard selector loop costs
    about three times uvloop's CPU per request in socket handling (benchmarks/README.md)."""
    try:
        import uvloop
    except ImportError:
        log.info("uvloop is not installed: serving on the standard asyncio loop")
        return
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    asyncio.set_event_loop(asyncio.new_event_loop())  # KServe configures the current loop before its run


