"""Reading feature tensors (the output of ``components.features``) as torch tensors.

A features folder (local or ``s3://``) holds ``feature_spec.json`` and per split a list of
safetensors shards (docs/features.md). S3 folders are fetched once into a local cache
(``$GRADE_CACHE_DIR``, default ``<tmp>/grade-cache``) through :func:`grade.core.store.open_published`,
which checks every file against the manifest.

:func:`iter_batches` streams one shard at a time, so memory stays at about one shard whatever the
split's size. With ``world_size > 1`` the split's requests (in the epoch's order) are dealt round
robin: rank r gets positions p with p % world_size == r; the last ``n % world_size`` requests are
left out so that every rank sees the same number of requests (and of batches: no rank waits for
another in a collective).
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from grade.core import store
from grade.core.errors import InputError

SPEC_FILE = "feature_spec.json"
SPLITS = ("train", "valid", "test")
ROW_FIELD = "row"
"""the batch key of ``iter_batches(..., rows=True)``: each request's row in :func:`load_split` order"""
_FETCHED: dict[tuple[str, str], Path] = {}


def _local_root(uri: str) -> Path:
    """A local folder holding the published features (an S3 folder is downloaded once per content)."""
    uri = str(uri)
    try:
        manifest = store.read_manifest(uri)
    except store.NotPublished as e:
        raise InputError(str(e)) from None
    key = (uri, store.content_hash(manifest))  # verified once per process and content (local ones in place)
    if key not in _FETCHED:
        base = Path(os.environ.get("GRADE_CACHE_DIR") or Path(tempfile.gettempdir(), "grade-cache"))
        cache = base / hashlib.sha256("\t".join(key).encode()).hexdigest()[:16]
        try:
            _FETCHED[key] = store.open_published(uri, cache_dir=cache)
        except PermissionError as e:  # a setting to correct, not an outage to retry
            raise InputError(f"GRADE_CACHE_DIR {base}: cannot write the downloaded features there "
                             f"({e.strerror}); point it at a writable folder") from None
    return _FETCHED[key]


def load_spec(uri: str) -> dict[str, Any]:
    """The feature spec (objectives, statistics, vocabularies, list size, splits)."""
    try:
        store.read_manifest(str(uri))
        return store.read_json(store.join(str(uri), SPEC_FILE))
    except (store.NotPublished, store.NotFound) as e:
        raise InputError(f"{uri}: not a published features folder ({e})") from None


def _shards(spec: dict[str, Any], split: str, uri: str) -> tuple[list[str], list[int]]:
    if split not in spec["splits"]:
        raise InputError(f"{uri}: unknown split '{split}'; expected one of {sorted(spec['splits'])}")
    s = spec["splits"][split]
    return list(s["shards"]), [int(n) for n in s["shard_requests"]]


def _empty(spec: dict[str, Any], name: str) -> torch.Tensor:
    L, K = int(spec["list_size"]), len(spec["objectives"])
    U, C = len(spec["numeric"]), len(spec["categorical"])
    shapes = {"z": ((0, L, K), torch.float32), "pred": ((0, L, K), torch.float32),
              "mask": ((0, L), torch.bool), "position": ((0, L), torch.int64),
              "num": ((0, U), torch.float32), "cat": ((0, C), torch.int64),
              "event_time": ((0,), torch.int64), "request_id": ((0,), torch.int64),
              "segment": ((0,), torch.int64), "served_w": ((0, K), torch.float32),
              "served_log_propensity": ((0,), torch.float32), "model_version": ((0,), torch.int64)}
    shape, dtype = shapes.get(name, ((0, L), torch.float32))
    return torch.zeros(shape, dtype=dtype)


def _read_shard(path: Path, fields: list[str] | None, where: str) -> dict[str, np.ndarray]:
    from safetensors import safe_open

    with safe_open(str(path), framework="numpy") as f:
        names = list(f.keys())
        wanted = names if fields is None else fields
        missing = [n for n in wanted if n not in names]
        if missing:
            raise InputError(f"{where}: field(s) {missing} not in this split; available: {sorted(names)}")
        return {n: f.get_tensor(n) for n in wanted}


def _split_fields(spec: dict[str, Any], split: str, fields: list[str] | None) -> list[str]:
    base = ["z", "pred", "mask", "num", "cat", "click", "order", "gmv", "position", "event_time",
            "request_id"]
    truth = [] if split == "train" else list(spec.get("ground_truth", []))
    served = list(spec["splits"].get(split, {}).get("served_fields", []))  # logs served by a model
    return base + truth + served if fields is None else list(fields)


def load_split(uri: str, split: str, fields: list[str] | None = None) -> dict[str, torch.Tensor]:
    """Every request of ``split`` (all shards concatenated), as CPU tensors; ``fields`` picks tensors."""
    uri = str(uri)
    spec = load_spec(uri)
    shards, _ = _shards(spec, split, uri)
    names = _split_fields(spec, split, fields)
    if not shards:
        return {n: _empty(spec, n) for n in names}
    root = _local_root(uri)
    parts = [_read_shard(root / rel, names, f"{uri}/{rel}") for rel in shards]
    return {n: torch.from_numpy(np.concatenate([p[n] for p in parts])) for n in names}


def iter_batches(uri: str, split: str, batch_size: int, *, shuffle: bool = False, seed: int = 0,
                 epoch: int = 0, rank: int = 0, world_size: int = 1, fields: list[str] | None = None,
                 drop_last: bool = False, rows: bool = False) -> Iterator[dict[str, torch.Tensor]]:
    """Batches of ``batch_size`` requests of ``split``, streamed shard by shard.

    shuffle: the shard order and the order inside each shard are permuted by (seed, epoch), so the
    same arguments always give the same batches. rank/world_size: a disjoint share per rank (all
    ranks together cover the split except its last ``n % world_size`` requests). rows: each batch
    also holds ``ROW_FIELD`` [B] int64, the row of each request in :func:`load_split`'s order (to look
    up what was computed once per request); the batches are otherwise the same.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if not 0 <= rank < world_size:
        raise ValueError(f"rank must be in [0, world_size), got rank={rank}, world_size={world_size}")
    uri = str(uri)
    spec = load_spec(uri)
    shards, sizes = _shards(spec, split, uri)
    names = _split_fields(spec, split, fields)
    n_total = sum(sizes)
    n_used = n_total - n_total % world_size
    first_row = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)   # each shard's row in load_split
    rng = np.random.default_rng([seed, epoch])
    shard_order = rng.permutation(len(shards)) if shuffle else np.arange(len(shards))
    root = _local_root(uri) if shards else None
    pending: list[dict[str, np.ndarray]] = []
    n_pending = 0
    offset = 0  # position of the shard's first request in the epoch order
    for s in shard_order:
        n = sizes[s]
        local = rng.permutation(n) if shuffle else np.arange(n)
        pos = offset + np.arange(n)
        take = local[(pos % world_size == rank) & (pos < n_used)]
        offset += n
        if not len(take):
            continue
        data = _read_shard(root / shards[s], names, f"{uri}/{shards[s]}")
        if rows:
            data[ROW_FIELD] = first_row[s] + np.arange(n, dtype=np.int64)
        pending.append({k: v[take] for k, v in data.items()})
        n_pending += len(take)
        del data
        while n_pending >= batch_size:
            batch, pending, n_pending = _cut(pending, batch_size)
            yield batch
    if n_pending and not drop_last:
        batch, _, _ = _cut(pending, n_pending)
        yield batch


def _cut(pending: list[dict[str, np.ndarray]], size: int):
    """The first ``size`` requests of the pending pieces as tensors, and what is left."""
    out: dict[str, list[np.ndarray]] = {k: [] for k in pending[0]}
    need, rest = size, []
    for piece in pending:
        m = len(next(iter(piece.values())))
        if need <= 0:
            rest.append(piece)
            continue
        k = min(need, m)
        for name, v in piece.items():
            out[name].append(v[:k])
        if k < m:
            rest.append({name: v[k:] for name, v in piece.items()})
        need -= k
    batch = {k: torch.from_numpy(np.ascontiguousarray(np.concatenate(v))) for k, v in out.items()}
    return batch, rest, sum(len(next(iter(p.values()))) for p in rest)


def count_requests(uri: str, split: str, world_size: int = 1) -> int:
    """Requests one rank sees per epoch in ``iter_batches`` (the split's size when world_size is 1)."""
    spec = load_spec(str(uri))
    n = sum(_shards(spec, split, str(uri))[1])
    return n // world_size
