"""Serve the registry's production policy online: per-request fusion weights over HTTP (KServe).

    python -m components.serve --registry URI [--model-name NAME] [--port N] [--watch-seconds S]
                               [--unknown-categories reject|oov] [--version VERSION] [--threads N]

A KServe ModelServer (Open Inference Protocol v2 and v1) with one model, NAME (default grade-mtf):
the TorchScript policy the registry's `production` alias names, loaded only when its files match the
registry's content hash. The alias is checked every --watch-seconds; a newly promoted version is
loaded and verified beside the served one and then swapped in, so no request fails or mixes versions.

  POST /v2/models/NAME/infer   inputs: the user/context features (one value per request), optionally
                               pred_<objective> [N, L] for L candidates; outputs: weights [N, K]
                               (rows on the simplex), with candidates scores [N, L] and ranking [N, L]
                               (best first); model_version names the version that answered
  GET  /v2/models/NAME         every input and output with its datatype and shape
  POST /v1/models/NAME:predict {"instances": [{feature: value, ...}, ...]}
  GET  /v2/health/live, /v2/health/ready, /v2/models/NAME/ready; GET /metrics (Prometheus)

Bad requests (missing/extra/unknown inputs, wrong shapes, NaN, unknown categories, empty or too large
batches, bodies that are not JSON or over the size limit) get a 4xx naming the field.
Needs the `serve` extra (pip install 'grade-mtf[serve]'). S3 settings come from the environment.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from typing import Any

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


def make_model(holder: serving.PolicyHolder, name: str, strict_categories: bool = True):
    """The KServe model over ``holder`` (imports kserve: the `serve` extra)."""
    import kserve
    from kserve.errors import InvalidInput
    from kserve.protocol.infer_type import InferOutput, InferRequest, InferResponse
    from prometheus_client import Counter

    # On the server's /metrics beside KServe's latency histograms: answers per version and outcome.
    answers = Counter("grade_serve_requests", "infer calls by served version and outcome",
                      ["version", "outcome"])

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
        datatype = "INT64" if array.dtype.kind == "i" else "FP32"
        out = InferOutput(name=name, shape=list(array.shape), datatype=datatype)
        out.set_data_from_numpy(array, binary_data=False)
        return out

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


class BodyLimit:
    """ASGI middleware: 413 for request bodies over ``max_bytes`` (from the declared length, or while
    reading), and 400 naming the body for one that is not JSON, instead of the framework's 500s. The
    body is read once and handed on unchanged."""

    def __init__(self, app, max_bytes: int = MAX_BODY_BYTES):
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["method"] != "POST":
            return await self.app(scope, receive, send)
        declared = dict(scope["headers"]).get(b"content-length", b"")
        if declared.isdigit() and int(declared) > self.max_bytes:
            return await self._error(413, f"body: {int(declared)} bytes, at most {self.max_bytes}", scope,
                                     receive, send)
        chunks, size, more = [], 0, True
        while more:
            message = await receive()
            if message["type"] != "http.request":
                return await self.app(scope, receive, send)  # the client went away
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            more = message.get("more_body", False)
            if size > self.max_bytes:
                return await self._error(413, f"body: over {self.max_bytes} bytes", scope, receive, send)
        body = b"".join(chunks)
        try:
            json.loads(body or b"null")
        except ValueError as e:
            return await self._error(400, f"body: not JSON ({e})", scope, receive, send)
        replayed = False

        async def replay():
            nonlocal replayed
            if replayed:
                return await receive()
            replayed = True
            return {"type": "http.request", "body": body, "more_body": False}

        await self.app(scope, replay, send)

    @staticmethod
    async def _error(status: int, message: str, scope, receive, send):
        from starlette.responses import JSONResponse

        await JSONResponse({"error": message}, status_code=status)(scope, receive, send)


def serve(args: argparse.Namespace) -> None:
    import kserve
    import torch
    from kserve import model_server

    torch.set_num_threads(max(1, args.threads))
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
    model_server.app.add_middleware(BodyLimit)
    server = kserve.ModelServer(http_port=args.port, enable_grpc=False, workers=1,
                                enable_latency_logging=args.access_log)
    if not args.access_log:
        logging.getLogger("uvicorn.access").setLevel(logging.WARNING)
    server.start([model])


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    serve(args)
    return 0


if __name__ == "__main__":
    sys.exit(cli.run(main))
