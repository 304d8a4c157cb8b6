"""Online serving of the production policy: verified loading, request validation, weights and ranking.

The server framework (grade/release/server.py, KServe) only moves tensors in and out; everything it
serves is decided here, in plain functions:

- :func:`load_verified` loads a registry version's TorchScript policy after checking every file
  against the version's manifest and the model folder's content hash against the alias record
  (a model that does not match is never loaded);
- :class:`PolicyHolder` holds the served version and swaps it atomically: a request takes one
  reference and is served by that version from start to end, so a promotion never fails a request;
- :func:`input_metadata` lists every input (name, datatype, shape) from the model's feature spec;
- :func:`predict` validates a batch of raw user/context features (and optional candidates), turns
  them into model inputs with the batch-scoring transform (the same code as training) and returns
  ``weights`` [N, K] (rows on the simplex) and, with candidates, fused ``scores`` and ``ranking``;
  :func:`predict_many` answers several such calls with one transform and one policy call;
- with exploration on (config ``serve.explore``, :class:`ServeConfig`), a share of the requests that
  carry a ``request_id`` are served weights drawn from the policy's Dirichlet
  (grade.model.exploration), and the answer carries their ``log_propensity``.

Bad requests raise :class:`BadRequest`, whose message names the field.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from grade.core import store
from grade.core.errors import InputError
from grade.core.store import paths
from grade.core.store.backend import sha256_file
from grade.data.transform import FeatureTransform
from grade.model.exploration import ExploreConfig, explore
from grade.model.registry import Registry

log = logging.getLogger("grade.release.serving")

#: Most requests (rows) in one call; a bigger batch is a bad request, not a memory problem.
MAX_BATCH = 4096
#: Most candidates per request in one call.
MAX_CANDIDATES = 1000
#: the optional input naming each request (int64): exploration's draws are seeded by it
REQUEST_ID = "request_id"


@dataclass
class ServeConfig:
    explore: ExploreConfig = dataclasses.field(default_factory=ExploreConfig)
    """exploration in serving and batch scoring: the share of requests served a draw of the policy's
    Dirichlet, its concentration cap and seed (docs/serving.md)"""


class BadRequest(ValueError):
    """A request the model cannot answer; the message names the field and what was expected."""


class IntegrityError(RuntimeError):
    """A registry version whose files do not match its manifest or the alias's content hash."""


@dataclass(frozen=True)
class ServedPolicy:
    """One loaded, verified version."""

    version: str
    """the registry version id"""
    content_hash: str
    """the model folder's content hash, as recorded by the alias"""
    fn: Any
    """the TorchScript policy: (num [N, U], cat [N, C]) -> weights [N, K]"""
    spec: dict[str, Any]
    """the model's feature spec (numeric/categorical features, objectives, standardisation)"""
    transform: FeatureTransform = field(init=False)
    """the spec's feature transform, built once per version rather than per request"""
    alpha_floor: float | None = field(init=False)
    """the policy's Dirichlet floor; None for an export without ``dirichlet`` (served the mean only)"""

    def __post_init__(self) -> None:
        object.__setattr__(self, "transform", FeatureTransform.from_spec(self.spec))
        floor = float(self.fn.alpha_floor()) if hasattr(self.fn, "dirichlet") else None
        object.__setattr__(self, "alpha_floor", floor)


def _verify_files(folder: Path, manifest: dict[str, Any], where: str) -> None:
    for rel, meta in manifest["files"].items():
        if sha256_file(folder / rel) != meta["sha256"]:
            raise IntegrityError(f"{where}/{rel}: sha256 differs from the manifest")


def load_verified(registry: Registry, record: dict[str, Any]) -> ServedPolicy:
    """Load the version an alias ``record`` names, after verifying its content and checking the loaded
    policy's answers (:class:`IntegrityError` naming what is wrong: nothing of it is served). An S3
    version is downloaded to a temporary folder, removed when the policy is loaded or refused."""
    uri = registry.version_uri(record["version"])
    try:
        with store.fetched(uri, verify=True) as local:     # downloads from S3 and checks sha256 there
            return _load_checked(local, uri, record)
    except (store.NotFound, store.NotPublished, store.IntegrityError) as e:  # files missing or changed
        raise IntegrityError(str(e)) from None


def _load_checked(local: Path, uri: str, record: dict[str, Any]) -> ServedPolicy:
    """:func:`load_verified` of the version's files in the local folder ``local``."""
    from grade.model.policy import TORCHSCRIPT_FILE, load_torchscript

    _verify_files(local, store.read_manifest(uri), uri)        # and checks them here for local folders too
    model_manifest = store.read_json(str(local / "model" / store.MANIFEST))
    found = store.content_hash(model_manifest)
    if found != record.get("content_hash"):
        raise IntegrityError(f"{uri}: the model's content hash {found[:12]} is not the alias's "
                             f"{str(record.get('content_hash'))[:12]}")
    if not (local / TORCHSCRIPT_FILE).is_file():
        raise IntegrityError(f"{uri}: no {TORCHSCRIPT_FILE} to serve")
    spec = store.read_json(str(local / "model" / "feature_spec.json"))
    try:
        fn = load_torchscript(local / TORCHSCRIPT_FILE)
        check_answers(fn, local, len(spec["objectives"]))
        warm_up(fn, len(spec["numeric"]), len(spec["categorical"]))
    except IntegrityError as e:
        raise IntegrityError(f"{uri}: {e}") from None
    except Exception as e:  # a module that does not load or fails on well-formed inputs
        raise IntegrityError(f"{uri}: the TorchScript policy fails: {type(e).__name__}: {e}") from None
    return ServedPolicy(record["version"], found, fn, spec)


#: how far a loaded policy's weights on the probe batch may lie from the recorded ones (float32 rounding)
PROBE_ATOL = 1e-5


@torch.inference_mode()
def check_answers(fn: Any, folder: Path, k: int) -> None:
    """:class:`IntegrityError` unless the loaded TorchScript ``fn`` answers the probe batch recorded at
    publishing (grade.model.policy.PROBE_FILE) with finite weights [N, K] on the simplex, equal to the
    weights the evaluated policy gave it. A version published before probes were recorded is probed
    with the same fixed batch, its expected weights from its own policy folder."""
    from safetensors.torch import load_file

    from grade.model.policy import PROBE_FILE, load_policy, probe_inputs

    if (folder / PROBE_FILE).is_file():
        probe = load_file(str(folder / PROBE_FILE))
        num, cat, expected = probe["num"], probe["cat"], probe["weights"]
    else:
        policy = load_policy(folder / "model")
        num, cat = probe_inputs(policy.cfg)
        expected = policy.mean_weights(num, cat)
    out = fn(num, cat)
    w = (out[0] if isinstance(out, tuple) else out).float()
    problem = None
    if tuple(w.shape) != (len(num), k):
        problem = f"shape {list(w.shape)}, expected [{len(num)}, {k}]"
    elif not torch.isfinite(w).all():
        problem = "weights that are not finite"
    elif (w < 0).any() or not torch.allclose(w.sum(-1), torch.ones(len(w)), atol=PROBE_ATOL):
        problem = f"weights off the simplex (row sums {w.sum(-1)[:3].tolist()})"
    elif not torch.allclose(w, expected, atol=PROBE_ATOL, rtol=0):
        problem = (f"weights {(w - expected).abs().max().item():.2g} away from the evaluated "
                   f"policy's (at most {PROBE_ATOL:g})")
    elif hasattr(fn, "dirichlet"):  # what exploration draws from must be the same policy
        mu, kappa = fn.dirichlet(num, cat)
        if not (torch.equal(mu, out if not isinstance(out, tuple) else out[0])
                and torch.isfinite(kappa).all() and (kappa > 0).all()):
            problem = "a Dirichlet (dirichlet()) whose mean is not its weights or whose kappa is not > 0"
    if problem:
        raise IntegrityError(f"the TorchScript policy answers the probe batch with {problem}")


#: batch sizes of the warm-up calls: two shapes TorchScript specialises for, then one it generalises to
WARM_UP_BATCHES = (1, 2, 3) * 3


@torch.inference_mode()
def warm_up(fn: Any, n_numeric: int, n_categorical: int) -> None:
    """Call a freshly loaded TorchScript policy on out-of-vocabulary requests (zeros [B, U], ids 0 [B, C])
    of a few batch sizes. Its profiling executor records and optimises the graph during the first
    calls of each module (50-200 ms on 2 cores); done here, before the swap, the requests that follow a
    promotion do not wait for it (with the GIL held, nor does every other request in flight)."""
    methods = [fn, fn.dirichlet] if hasattr(fn, "dirichlet") else [fn]  # each method is optimised on its own
    for method in methods:
        for batch in WARM_UP_BATCHES:
            method(torch.zeros(batch, n_numeric), torch.zeros(batch, n_categorical, dtype=torch.int64))
    if hasattr(fn, "dirichlet"):  # exploration's compiled draw: loaded (or compiled) once, here
        mu, kappa = fn.dirichlet(torch.zeros(1, n_numeric), torch.zeros(1, n_categorical, dtype=torch.int64))
        explore(mu.numpy(), kappa.numpy(), float(fn.alpha_floor()), np.zeros(1, np.int64),
                ExploreConfig(share=1.0), "warm-up")


class PolicyHolder:
    """The served version, swapped atomically when the registry's alias moves.

    ``current`` is replaced by one assignment; readers take it once per request. :meth:`refresh`
    loads a newly promoted version completely (and verifies it) before swapping; a version that
    fails verification is logged and skipped, and the previous one keeps serving.
    """

    def __init__(self, registry_uri: str, model_name: str, pinned: str | None = None):
        paths.safe_model_name(model_name, "--model-name")
        self.registry = Registry(registry_uri, model_name)
        self.pinned = pinned
        """a version to serve instead of the alias's (a canary), verified against its lineage's hash"""
        self.current: ServedPolicy | None = None
        self.swaps = 0
        self.rejected: dict[tuple[str, str], str] = {}
        """(version, content hash) -> why it is not served; never loaded again"""
        self._stop = threading.Event()

    def refresh(self) -> bool:
        """Load the alias's version if it is not the served one; True when a swap happened. A version
        that fails its checks is rejected once, with its reason logged and kept (:attr:`rejected`);
        with no version served yet, that is an :class:`IntegrityError` (nothing to serve)."""
        if self.pinned:
            if self.pinned not in self.registry.versions():
                raise IntegrityError(f"{self.registry.model_name}: no published version {self.pinned}")
            record = {"version": self.pinned,
                      "content_hash": self.registry.lineage(self.pinned).get("content_hash")}
        else:
            alias = self.registry.production()
            if alias is None:
                return False
            record = alias[0]
        key = (record["version"], str(record.get("content_hash")))
        if self.current is not None and (self.current.version, self.current.content_hash) == key:
            return False
        if key in self.rejected:
            return False
        try:
            loaded = load_verified(self.registry, record)
        except IntegrityError as e:
            self.rejected[key] = str(e)
            if self.current is None:
                raise
            log.error("serve: version %s rejected, still serving %s: %s", record["version"],
                      self.current.version, e)
            return False
        previous = self.current.version if self.current else None
        self.current = loaded
        self.swaps += 1
        log.info("serve: now serving %s/%s (was %s)", self.registry.model_name, loaded.version, previous)
        return True

    def rejections(self) -> list[dict[str, str]]:
        """The versions refused so far, with their reasons (the server's metadata lists them)."""
        return [{"version": v, "reason": why} for (v, _), why in self.rejected.items()]

    def watch(self, every_s: float = 2.0) -> threading.Thread:
        """Poll the alias every ``every_s`` seconds in a daemon thread (until :meth:`stop`)."""
        def loop() -> None:
            while not self._stop.wait(every_s):
                try:
                    self.refresh()
                except Exception as e:  # the store may be briefly unreachable: keep serving, retry later
                    log.warning("serve: alias check failed (%s); still serving %s", e,
                                self.current.version if self.current else None)

        thread = threading.Thread(target=loop, name="grade-alias-watch", daemon=True)
        thread.start()
        return thread

    def stop(self) -> None:
        self._stop.set()


# ------------------------------------------------------------------------------------------------
# Inputs, validation and the transform
# ------------------------------------------------------------------------------------------------

def input_metadata(spec: dict[str, Any]) -> list[dict[str, Any]]:
    """Every input a request may carry, as (name, datatype, shape) with -1 for the batch and list sizes.

    The features are required, one value per request; the candidates' ``pred_<objective>`` (one row
    of L predictions per request) are optional and come all together or not at all.
    """
    inputs = [{"name": c["name"], "datatype": "FP32", "shape": [-1]} for c in spec["numeric"]]
    inputs += [{"name": c["name"], "datatype": "INT64", "shape": [-1]} for c in spec["categorical"]]
    inputs += [{"name": f"pred_{o}", "datatype": "FP32", "shape": [-1, -1], "optional": True}
               for o in spec["objectives"]]
    inputs.append({"name": REQUEST_ID, "datatype": "INT64", "shape": [-1], "optional": True})
    return inputs


def output_metadata(spec: dict[str, Any]) -> list[dict[str, Any]]:
    k = len(spec["objectives"])
    return [{"name": "weights", "datatype": "FP32", "shape": [-1, k]},
            {"name": "scores", "datatype": "FP32", "shape": [-1, -1], "optional": True},
            {"name": "ranking", "datatype": "INT64", "shape": [-1, -1], "optional": True},
            {"name": "log_propensity", "datatype": "FP32", "shape": [-1], "optional": True}]


def _as_array(name: str, value: Any, dtype: type, ndim: int) -> np.ndarray:
    if type(value) is np.ndarray and value.dtype == dtype and value.ndim == ndim and dtype is not np.float32:
        return value  # already what is asked (the gate's decoded integer inputs): nothing to convert or check
    try:
        arr = np.asarray(value)
    except (ValueError, TypeError):
        raise BadRequest(f"input '{name}': not a rectangular array of numbers") from None
    if arr.dtype.kind not in "biuf":
        raise BadRequest(f"input '{name}': expected numbers, got {arr.dtype.kind!r} values")
    if arr.ndim != ndim:
        raise BadRequest(f"input '{name}': expected {ndim} dimension(s), got shape {list(arr.shape)}")
    if arr.dtype.kind == "f" and not np.isfinite(arr).all():
        row = int(np.flatnonzero(~np.isfinite(arr).reshape(len(arr), -1).all(-1))[0])
        raise BadRequest(f"input '{name}', row {row}: expected a finite number (NaN or infinity given)")
    if dtype is np.int64 and arr.dtype.kind == "f" and not (arr == np.round(arr)).all():
        raise BadRequest(f"input '{name}': expected integer category ids")
    return arr.astype(dtype, copy=False)


def _numeric_columns(names: Sequence[str], inputs: dict[str, Any]) -> dict[str, np.ndarray]:
    """The float32 columns [N] of the numeric inputs ``names``, checked together: one finiteness test
    for all of them when each is already a 1-d float32 array (the gate decodes them so), else (or when
    one is not finite) each on its own by :func:`_as_array`, which names the input and row."""
    given = [inputs[n] for n in names]
    if all(type(v) is np.ndarray and v.dtype == np.float32 and v.ndim == 1 for v in given):
        if not given or np.isfinite(np.concatenate(given)).all():
            return dict(zip(names, given, strict=True))
    return {n: _as_array(n, v, np.float32, 1) for n, v in zip(names, given, strict=True)}


def validate(inputs: dict[str, Any], transform: FeatureTransform
             ) -> tuple[dict[str, np.ndarray], np.ndarray | None]:
    """Raw feature columns [N] (with the optional ``request_id`` [N] among them) and optional candidate
    predictions [N, L, K] of a request (:class:`BadRequest` naming the field: missing, extra, shapes,
    NaN, sizes). Unknown categories are found by :func:`reject_unknown_categories` on the encoded ids."""
    numeric, categorical, preds = transform.numeric, transform.categorical, transform.pred_columns
    features = numeric + categorical
    if not inputs.keys() <= {*features, *preds, REQUEST_ID}:
        extra = sorted(set(inputs) - set(features) - set(preds) - {REQUEST_ID})
        raise BadRequest(f"unknown input(s) {extra}; expected {list(features)} and optionally {preds} "
                         f"and '{REQUEST_ID}'")
    missing = [n for n in features if n not in inputs]
    if missing:
        raise BadRequest(f"missing input(s) {missing}")
    columns = _numeric_columns(numeric, inputs)
    columns.update({n: _as_array(n, inputs[n], np.int64, 1) for n in categorical})
    if REQUEST_ID in inputs:
        columns[REQUEST_ID] = _as_array(REQUEST_ID, inputs[REQUEST_ID], np.int64, 1)
    sizes = {n: len(v) for n, v in columns.items()}
    counts = list(sizes.values())
    n = max(counts, key=counts.count)  # the batch size most inputs agree on: the odd one is named below
    if n == 0:
        raise BadRequest(f"input '{next(iter(sizes))}': empty batch (expected at least one request)")
    if n > MAX_BATCH:
        raise BadRequest(f"input '{next(iter(sizes))}': {n} requests, at most {MAX_BATCH} per call")
    for name, size in sizes.items():
        if size != n:
            raise BadRequest(f"input '{name}': {size} value(s), but the batch has {n} request(s)")
    given = [p for p in preds if p in inputs]
    if not given:
        return columns, None
    if len(given) != len(preds):
        raise BadRequest(f"missing input(s) {sorted(set(preds) - set(given))}: "
                         "candidates need every prediction")
    pred = np.stack([_as_array(p, inputs[p], np.float32, 2) for p in preds], axis=-1)    # [N, L, K]
    if pred.shape[0] != n:
        raise BadRequest(f"input '{preds[0]}': {pred.shape[0]} row(s), but the batch has {n} request(s)")
    if not 0 < pred.shape[1] <= MAX_CANDIDATES:
        raise BadRequest(f"input '{preds[0]}': expected 1..{MAX_CANDIDATES} candidates per request")
    if np.any(pred <= 0):
        raise BadRequest(f"input '{preds[int(np.argwhere(pred <= 0)[0][-1])]}': predictions must be > 0")
    return columns, pred


def reject_unknown_categories(cat: np.ndarray, columns: dict[str, np.ndarray],
                              transform: FeatureTransform) -> None:
    """:class:`BadRequest` naming the first category id [N, C] the vocabulary does not hold (the
    transform encodes those as the out-of-vocabulary id 0; training saw only the vocabulary's)."""
    unknown = cat == 0
    if unknown.any():
        row, j = (int(i) for i in np.argwhere(unknown)[0])
        name = transform.categorical[j]
        raise BadRequest(f"input '{name}', row {row}: unknown category {int(columns[name][row])}")


def model_inputs(columns: dict[str, np.ndarray],
                 transform: FeatureTransform) -> tuple[np.ndarray, np.ndarray]:
    """Raw request feature columns [N] -> (num [N, U] float32, cat [N, C] int64), by the feature
    transform that built the training tensors (grade.data.transform: the same code, so no skew)."""
    n = len(next(iter(columns.values()))) if columns else 0
    try:
        return transform.request_features(columns, n)
    except InputError as e:  # the transform's own checks of its inputs: the request's fault, a 4xx
        raise BadRequest(str(e)) from None


def predict(policy: ServedPolicy, inputs: dict[str, Any], strict_categories: bool = True,
            exploring: ExploreConfig | None = None) -> dict[str, Any]:
    """The served answer for one batch: ``weights`` [N, K], with candidates ``scores`` [N, L] (fused,
    S = sum_k w_k z_k) and ``ranking`` [N, L] (candidate indices, best first), and the version
    (:class:`BadRequest` naming the field for a bad request); with exploration on (``exploring`` with
    a share > 0), ``log_propensity`` [N] too (:func:`served_weights`)."""
    answer = predict_many(policy, [inputs], strict_categories, exploring)[0]
    if isinstance(answer, BadRequest):
        raise answer
    return answer


@torch.inference_mode()
def predict_many(policy: ServedPolicy, requests: Sequence[dict[str, Any]], strict_categories: bool = True,
                 exploring: ExploreConfig | None = None) -> list[dict[str, Any] | BadRequest]:
    """:func:`predict`'s answer (or its :class:`BadRequest`) for each of several calls, with one
    feature transform and one policy call for all the valid ones: what a call costs beyond its own
    checks is paid once per group, not per call (the server answers concurrent calls together).

    A bad call gets the error it would get alone and never changes another call's answer; the
    transform and the policy treat each row on its own, so a call's weights equal those of the call
    alone (up to the float rounding of a larger matrix product)."""
    answers: list[Any] = [None] * len(requests)
    checked = []  # (index, columns [n], candidates [n, L, K] or None)
    for i, inputs in enumerate(requests):
        try:
            checked.append((i, *validate(inputs, policy.transform)))
        except BadRequest as e:
            answers[i] = e
    if not checked:
        return answers
    sizes = [len(next(iter(columns.values()))) for _, columns, _ in checked]
    ids = request_ids([c for _, c, _ in checked], sizes)
    columns = {n: v for n, v in checked[0][1].items() if n != REQUEST_ID} if len(checked) == 1 else \
        {n: np.concatenate([c[n] for _, c, _ in checked]) for n in checked[0][1] if n != REQUEST_ID}
    try:
        num, cat = model_inputs(columns, policy.transform)
    except BadRequest as e:  # a value only the transform refuses: each call alone, so its row is its own
        if len(checked) == 1:
            answers[checked[0][0]] = e
            return answers
        for i, *_ in checked:
            answers[i] = predict_many(policy, [requests[i]], strict_categories, exploring)[0]
        return answers
    weights, log_p = served_weights(policy, num, cat, ids, exploring)
    bounds = np.cumsum([0, *sizes])
    for (i, own_columns, pred), lo, hi in zip(checked, bounds[:-1], bounds[1:], strict=True):
        try:
            if strict_categories:
                reject_unknown_categories(cat[lo:hi], own_columns, policy.transform)
        except BadRequest as e:
            answers[i] = e
            continue
        answers[i] = answer_of(policy, weights[lo:hi], pred, None if log_p is None else log_p[lo:hi])
    return answers


def request_ids(columns: Sequence[dict[str, np.ndarray]], sizes: Sequence[int]
                ) -> tuple[np.ndarray, np.ndarray] | None:
    """(request ids [N], whether each row has one [N]) of a group of calls; None when no call gave ids."""
    if not any(REQUEST_ID in c for c in columns):
        return None
    given = [(c[REQUEST_ID], np.ones(n, bool)) if REQUEST_ID in c
             else (np.zeros(n, np.int64), np.zeros(n, bool)) for c, n in zip(columns, sizes, strict=True)]
    return np.concatenate([g[0] for g in given]), np.concatenate([g[1] for g in given])


def served_weights(policy: ServedPolicy, num: np.ndarray, cat: np.ndarray,
                   ids: tuple[np.ndarray, np.ndarray] | None, exploring: ExploreConfig | None
                   ) -> tuple[np.ndarray, np.ndarray | None]:
    """(weights [N, K] float32, log-propensities [N] or None when exploration is off) of model inputs
    and the request ids of :func:`request_ids`.

    Off (no config, share 0, or an export without ``dirichlet``): the policy's mean, as before. On:
    grade.model.exploration's draws for the rows with a request id (a call without ids is served the
    mean, its log-propensity NaN: nothing to seed the draw with)."""
    tn, tc = torch.from_numpy(num), torch.from_numpy(cat)
    if exploring is None or exploring.share <= 0 or policy.alpha_floor is None:
        out = policy.fn(tn, tc)
        return (out[0] if isinstance(out, tuple) else out).numpy().astype(np.float32), None
    mu, kappa = policy.fn.dirichlet(tn, tc)
    served = explore(mu.numpy(), kappa.numpy(), policy.alpha_floor, None if ids is None else ids[0],
                     exploring, policy.version)
    if ids is not None and not ids[1].all():  # rows of calls without ids: the mean, no propensity
        anonymous = ~ids[1]
        served.weights[anonymous] = mu.numpy()[anonymous]
        served.log_propensity[anonymous] = np.nan
    return served.weights, served.log_propensity


def answer_of(policy: ServedPolicy, weights: np.ndarray, pred: np.ndarray | None,
              log_propensity: np.ndarray | None = None) -> dict[str, Any]:
    """The answer of a call with ``weights`` [N, K], optional candidate predictions [N, L, K] and, with
    exploration on, the log-propensities [N] of the weights (NaN where served the mean)."""
    result: dict[str, Any] = {"weights": weights, "model_version": policy.version}
    if log_propensity is not None:
        result["log_propensity"] = log_propensity
    if pred is not None:
        z = policy.transform.z(pred)
        scores = (z * weights[:, None, :]).sum(-1).astype(np.float32)
        result["scores"] = scores
        result["ranking"] = np.argsort(-scores, axis=1, kind="stable").astype(np.int64)
    return result


def wait_for_version(holder: PolicyHolder, timeout_s: float = 30.0) -> ServedPolicy:
    """The first served version, polling the alias until one verifies (:class:`InputError` after the
    timeout: no model to serve is a missing input)."""
    deadline = time.monotonic() + timeout_s
    while True:
        holder.refresh()
        if holder.current is not None:
            return holder.current
        if time.monotonic() > deadline:
            what = holder.pinned or holder.registry.alias_uri
            raise InputError(f"{what}: no verified model to serve within {timeout_s:.0f} s "
                             "(see the log above)")
        time.sleep(1.0)
