"""The feature transform: raw log values -> model inputs, the same for training and serving.

One object, built from the feature spec (:meth:`FeatureTransform.from_spec`), holds the train
statistics and vocabularies and applies them:

- item level: the MTL predictions p [..., K] become z = (log max(p, eps) - m_k) / s_k;
- request level: each numeric ``u_*`` value x becomes (clip(x, low, high) - mean) / std, each
  categorical ``c_*`` value its vocabulary id 1..n (0 = out of vocabulary);
- against a policy: the shape check (K, numeric and categorical counts) and the clamp of ids
  the policy's embeddings do not know to the OOV id 0.

It is also the one check of raw model inputs (:func:`checked_numbers`, :func:`checked_categories`):
predictions must be finite numbers > 0, ``u_*`` values finite numbers, ``c_*`` values integer ids
(a whole float is accepted, a fractional one is never truncated); strings, None and NaN are refused
with an InputError naming the file, column and row. :func:`repeated_key` finds a request whose
rows are not contiguous.

Feature extraction writes the shards with it, batch scoring applies it to raw rows, and a
request-level caller (e.g. an online model server) passes plain column -> values mappings to
:meth:`FeatureTransform.request_features`; :meth:`FeatureTransform.inputs` lists the columns the
transform needs, from the spec alone. Everything here is a pure function of its arguments: numpy
in and out, except :func:`clamp_unseen`, which keeps the array type it is given (numpy or torch).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from grade.core.errors import InputError

if TYPE_CHECKING:  # the policy module needs torch; the transform itself does not
    from grade.model.policy import PolicyConfig

#: floor under predictions before the log (the contract's epsilon)
PRED_EPS = 1e-12



def objective_index(objectives: Sequence[str]) -> dict[str, int]:
    """Position of each objective on the last axis of ``z``/``pred`` ('pred_ctr' and 'ctr' alike)."""
    return {str(name).removeprefix("pred_"): i for i, name in enumerate(objectives)}

@dataclasses.dataclass(frozen=True)
class InputColumn:
    """One raw column the transform reads."""

    name: str
    """column name in the logs / the request (``pred_<objective>``, ``u_*``, ``c_*``)"""
    dtype: str
    """numpy dtype name the values are converted to (``float32`` or ``int64``)"""
    level: Literal["item", "request"]
    """item: one value per candidate row; request: one value per request"""


def log_predictions(pred: np.ndarray, dtype: Any = np.float32) -> np.ndarray:
    """log max(p, eps) of predictions ``pred`` [...] (float32), computed in ``dtype``."""
    return np.log(np.maximum(pred, np.float32(PRED_EPS)), dtype=dtype)


# -- checked raw values: the one validation of model inputs (scoring, serving and feature writing) --

def _error(expectation: str, name: str, values: np.ndarray, bad: np.ndarray, where: str | None,
           rows: np.ndarray | None) -> InputError:
    """InputError at the first flagged value: the file (``where``), the column, the row (``rows[i]``
    when the caller's values are a selection of a file's rows, else i) and the value found."""
    i = int(np.flatnonzero(bad)[0])
    got = values[i].item() if isinstance(values[i], np.generic) else values[i]
    return InputError(f"{expectation}, got {got!r}", file=where, column=name,
                      row=int(rows[i]) if rows is not None else i)


def _as_numbers(name: str, values: Any, what: str, where: str | None, rows: np.ndarray | None
                ) -> np.ndarray:
    """``values`` as a numeric array: strings, None and other objects are refused, never parsed."""
    arr = np.asarray(values)
    if arr.dtype.kind in "iuf":
        return arr
    if arr.dtype.kind == "b":
        raise _error(f"expected {what}", name, arr, np.ones(len(arr), bool), where, rows)
    numeric = np.array([isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, bool)
                        for v in arr.reshape(-1)], dtype=bool).reshape(arr.shape)
    if not numeric.all():
        raise _error(f"expected {what}", name, arr, ~numeric, where, rows)
    return arr.astype(np.float64)


def checked_numbers(name: str, values: Any, *, positive: bool = False, where: str | None = None,
                    rows: np.ndarray | None = None) -> np.ndarray:
    """float32 [n] of a numeric input column: finite numbers (and > 0 when ``positive``, as
    predictions are), else InputError naming the column and the first bad row."""
    arr = _as_numbers(name, values, "a number", where, rows)
    bad = ~np.isfinite(arr) | (arr <= 0) if positive else ~np.isfinite(arr)
    if bad.any():
        what = "a finite prediction > 0" if positive else "a finite number"
        raise _error(f"expected {what}", name, arr, bad, where, rows)
    return arr.astype(np.float32)


def checked_categories(name: str, values: Any, *, where: str | None = None,
                       rows: np.ndarray | None = None) -> np.ndarray:
    """int64 [n] of a categorical input column: integers (a whole float such as JSON's 3.0 is the
    id 3; 3.7 or NaN is refused, never truncated), else InputError naming the column and row."""
    arr = _as_numbers(name, values, "an integer category id", where, rows)
    if arr.dtype.kind == "f":
        bad = ~np.isfinite(arr) | (arr != np.round(arr)) | (np.abs(arr) >= 2.0 ** 63)
        if bad.any():
            raise _error("expected an integer category id", name, arr, bad, where, rows)
    return arr.astype(np.int64)


def _finite_columns(columns: Sequence[Any]) -> np.ndarray | None:
    """float32 [n, len(columns)] of numeric columns whose values are all finite in float32, as
    :func:`checked_numbers` would give them, in one vectorised pass (a request has a handful of
    columns of one value each: per-column checks cost more than the transform); None otherwise, for
    the per-column checks to refuse or pass."""
    arrays = [np.asarray(v) for v in columns]
    if not all(a.dtype.kind in "iuf" for a in arrays):
        return None
    x = np.stack(arrays, axis=1, dtype=np.float32)
    return x if np.isfinite(x).all() else None


def _integer_columns(columns: Sequence[Any]) -> np.ndarray | None:
    """int64 [n, len(columns)] of integer columns, as :func:`checked_categories` would give them, in one
    pass; None when any column is not of an integer type (whole floats are read by the checks)."""
    arrays = [np.asarray(v) for v in columns]
    if not all(a.dtype.kind in "iu" for a in arrays):
        return None
    return np.stack(arrays, axis=1, dtype=np.int64, casting="unsafe")


def repeated_key(keys: np.ndarray) -> tuple[int, int] | None:
    """(i, j), i < j, of the earliest j whose key already occurred at i in ``keys`` [n]; None when all
    keys differ. Given the keys of consecutive runs of rows, it finds a request that is not contiguous."""
    order = np.argsort(keys, kind="stable")
    again = np.flatnonzero(keys[order][1:] == keys[order][:-1]) + 1
    if not len(again):
        return None
    second = int(order[again].min())
    first = int(order[np.searchsorted(keys[order], keys[second])])
    return first, second


def encode_categorical(values: np.ndarray, vocab: np.ndarray) -> np.ndarray:
    """ids 1..n for values in the (sorted) vocabulary, 0 for anything else; same shape as ``values``."""
    vocab = np.asarray(vocab, dtype=np.int64)
    if not len(vocab):
        return np.zeros(values.shape, dtype=np.int64)
    idx = np.searchsorted(vocab, values)
    idx_c = np.minimum(idx, len(vocab) - 1)
    return np.where(vocab[idx_c] == values, idx_c + 1, 0).astype(np.int64)


def clamp_unseen(cat, sizes: Sequence[int]):
    """Categorical ids [B, C] a policy's embeddings know (0 <= id < sizes[j]); others become the OOV id 0.

    ``cat`` is a numpy array or a torch tensor (int64); the result has the same type, device and shape.
    Ids from a different feature build (a larger vocabulary) must not index past an embedding table.
    """
    if isinstance(cat, np.ndarray):
        limit = np.asarray(sizes, dtype=cat.dtype)
    else:
        import torch

        limit = torch.tensor(sizes, dtype=cat.dtype, device=cat.device)
    return cat * ((cat >= 0) & (cat < limit))


@dataclasses.dataclass(frozen=True)
class FeatureTransform:
    """The fitted transform of one feature spec (train statistics, vocabularies)."""

    objectives: tuple[str, ...]
    """fused objectives, in the order of the last axis of z (K)"""
    pred_log_mean: np.ndarray
    """m_k [K] float32: train mean of log max(p_k, eps)"""
    pred_log_std: np.ndarray
    """s_k [K] float32: train std of log max(p_k, eps) (1 for a constant signal)"""
    numeric: tuple[str, ...]
    """numeric request feature columns (U), the order of the ``num`` columns"""
    num_mean: np.ndarray
    """[U] float32 train means of the numeric features"""
    num_std: np.ndarray
    """[U] float32 train stds of the numeric features (1 for a constant feature)"""
    categorical: tuple[str, ...]
    """categorical request feature columns (C), the order of the ``cat`` columns"""
    vocabs: tuple[np.ndarray, ...]
    """sorted int64 vocabulary of each categorical feature; value vocab[i] has id i + 1"""
    num_clip: np.ndarray = dataclasses.field(default_factory=lambda: np.zeros((2, 0)))
    """[2, U] float64 (low, high) each numeric value is clipped to first (+-inf: a spec without clip)"""

    @classmethod
    def from_spec(cls, spec: Mapping[str, Any]) -> FeatureTransform:
        """The transform of a feature spec (``feature_spec.json`` or the fitted part of it + objectives)."""
        def f32(values) -> np.ndarray:
            return np.asarray(values, dtype=np.float32).reshape(-1)

        return cls(objectives=tuple(spec["objectives"]),
                   pred_log_mean=f32(spec["pred_log_mean"]), pred_log_std=f32(spec["pred_log_std"]),
                   numeric=tuple(c["name"] for c in spec["numeric"]),
                   num_mean=f32([c["mean"] for c in spec["numeric"]]),
                   num_std=f32([c["std"] or 1.0 for c in spec["numeric"]]),
                   num_clip=np.array([c.get("clip", [-np.inf, np.inf]) for c in spec["numeric"]],
                                     dtype=np.float64).reshape(-1, 2).T,
                   categorical=tuple(c["name"] for c in spec["categorical"]),
                   vocabs=tuple(np.asarray(c["vocab"], dtype=np.int64) for c in spec["categorical"]))

    # -- what goes in ---------------------------------------------------------------------------

    @property
    def pred_columns(self) -> list[str]:
        return [f"pred_{o}" for o in self.objectives]

    @property
    def cat_sizes(self) -> list[int]:
        """Embedding size of each categorical feature: the vocabulary plus the OOV id 0."""
        return [len(v) + 1 for v in self.vocabs]

    def inputs(self) -> list[InputColumn]:
        """Every raw column the transform reads: predictions (item level), then u_* and c_* (request
        level)."""
        return ([InputColumn(c, "float32", "item") for c in self.pred_columns]
                + [InputColumn(c, "float32", "request") for c in self.numeric]
                + [InputColumn(c, "int64", "request") for c in self.categorical])

    def missing(self, names: Sequence[str]) -> list[str]:
        """The input columns absent from ``names``, in :meth:`inputs` order."""
        have = set(names)
        return [c.name for c in self.inputs() if c.name not in have]

    # -- the transform --------------------------------------------------------------------------

    def z(self, pred: np.ndarray) -> np.ndarray:
        """Standardised log-predictions z [..., K] float32 of predictions ``pred`` [..., K] float32."""
        return ((log_predictions(pred) - self.pred_log_mean) / self.pred_log_std).astype(np.float32)

    def stack_predictions(self, values: Mapping[str, Any], *, where: str | None = None,
                          rows: np.ndarray | None = None) -> np.ndarray:
        """Predictions [N, K] float32 from item-level columns ``pred_<objective>`` of N values each.

        Every value must be a finite number > 0 (InputError naming ``where``, the column and the
        row: ``rows[i]`` when given, else i).
        """
        return np.stack([checked_numbers(c, values[c], positive=True, where=where, rows=rows)
                         for c in self.pred_columns], axis=-1)

    def num(self, values: Mapping[str, Any], n: int, *, where: str | None = None,
            rows: np.ndarray | None = None) -> np.ndarray:
        """Standardised numeric features [n, U] float32 from request-level columns ``u_*`` of n finite
        numbers each."""
        if not self.numeric:
            return np.zeros((n, 0), np.float32)
        x = _finite_columns([values[c] for c in self.numeric])
        if x is None:  # the checks of each column find and name the first bad value
            x = np.stack([checked_numbers(c, values[c], where=where, rows=rows) for c in self.numeric],
                         axis=1)
        # clipped to the train bounds, then standardised in float64: x - mean may exceed float32
        x = np.clip(x.astype(np.float64), self.num_clip[0], self.num_clip[1])
        return ((x - self.num_mean) / self.num_std).astype(np.float32)

    def cat(self, values: Mapping[str, Any], n: int, *, where: str | None = None,
            rows: np.ndarray | None = None) -> np.ndarray:
        """Vocabulary ids [n, C] int64 (0 = OOV) from request-level columns ``c_*`` of n integer ids each."""
        if not self.categorical:
            return np.zeros((n, 0), np.int64)
        ids = _integer_columns([values[c] for c in self.categorical])
        if ids is None:  # the checks of each column read whole floats and name the first bad value
            ids = np.stack([checked_categories(c, values[c], where=where, rows=rows)
                            for c in self.categorical], axis=1)
        return np.stack([encode_categorical(ids[:, j], vocab) for j, vocab in enumerate(self.vocabs)], axis=1)

    def request_features(self, values: Mapping[str, Any], n_requests: int | None = None, *,
                         where: str | None = None, rows: np.ndarray | None = None
                         ) -> tuple[np.ndarray, np.ndarray]:
        """(num [B, U] float32, cat [B, C] int64) of B requests from columns ``u_*`` / ``c_*`` of B values.

        ``values`` maps each request-level column of :meth:`inputs` to B values (list or array);
        other keys are ignored. B is ``n_requests``, or the length of the columns when None (needed
        only for a spec without request features). A missing column, a length other than B, a value
        that is not a finite number (``u_*``) or an integer id (``c_*``) raises InputError, naming
        ``where`` (the file), the column and the row (``rows[i]`` for request i when given, else i).
        """
        names = list(self.numeric) + list(self.categorical)
        missing = [c for c in names if c not in values]
        if missing:
            raise InputError(f"missing request feature(s) {missing} required by the feature spec", file=where)
        if n_requests is None:
            if not names:
                raise InputError("n_requests is required: the feature spec has no request features")
            n_requests = len(values[names[0]])
        for c in names:
            if len(values[c]) != n_requests:
                raise InputError(f"request feature '{c}': expected {n_requests} values (one per request), "
                                 f"got {len(values[c])}", file=where)
        return (self.num(values, n_requests, where=where, rows=rows),
                self.cat(values, n_requests, where=where, rows=rows))

    # -- against a policy -----------------------------------------------------------------------

    def check_policy(self, policy_cfg: PolicyConfig, where: str) -> None:
        """InputError unless a policy's shapes (K objectives, U numeric, C categorical) match this spec's."""
        got = (policy_cfg.n_objectives, policy_cfg.n_numeric, len(policy_cfg.cat_sizes))
        k, u, c = len(self.objectives), len(self.numeric), len(self.categorical)
        if got != (k, u, c):
            raise InputError(f"{where}: the policy expects K={got[0]}, {got[1]} numeric and {got[2]} "
                             f"categorical features; the features have K={k}, {u} numeric and {c} "
                             f"categorical")
