"""Exploration's compiled loops (numba): the served Dirichlet's draws and log-densities.

Array operations on a batch of 64 rows cost their call overhead, not their arithmetic; these loops
draw a batch in microseconds. Imported by the first draw or density (grade.model.exploration), so a
step that never explores does not pay numba's import. The splitmix64 finaliser and the served alpha
are the same Python functions numpy runs on arrays (grade.data.raw_logs.mix64,
grade.model.explore_stream.alpha_values), compiled here for one value.
"""

from __future__ import annotations

import math

import numba
import numpy as np

from grade.data import raw_logs
from grade.model import explore_stream as stream

_mix64 = numba.njit(cache=True, nogil=True)(raw_logs.mix64)
_alpha = numba.njit(cache=True, nogil=True)(stream.alpha_values)
ATTEMPTS, MIN_WEIGHT = stream.ATTEMPTS, stream.MIN_WEIGHT
_GOLDEN, _STRIDE, _ONE, _S11 = stream._GOLDEN, stream._STRIDE, stream._ONE, stream._S11
_UNIT, _HALF_UNIT = stream._UNIT, stream._HALF_UNIT


@numba.njit(cache=True, nogil=True)
def _log_dirichlet(a: np.ndarray, w: np.ndarray) -> float:
    """log Dir(w; a) of one row: lgamma(sum a) - sum lgamma(a) + sum (a - 1) log w."""
    total, out = 0.0, 0.0
    for j in range(a.shape[0]):
        total += a[j]
        out += (a[j] - 1.0) * math.log(np.float64(w[j])) - math.lgamma(a[j])
    return out + math.lgamma(total)


@numba.njit(cache=True, nogil=True)
def log_densities(a: np.ndarray, w: np.ndarray) -> np.ndarray:
    out = np.empty(a.shape[0])
    for i in range(a.shape[0]):
        out[i] = _log_dirichlet(a[i], w[i])
    return out


@numba.njit(cache=True, nogil=True)
def _uniform(key: np.uint64, counter: np.uint64) -> float:
    """The generator's uniform in (0, 1) at ``key`` and ``counter``: mix64(key + (counter + 1) * golden)."""
    return float(_mix64(key + (counter + _ONE) * _GOLDEN) >> _S11) * _UNIT + _HALF_UNIT


@numba.njit(cache=True, nogil=True)
def _log_gamma_draw(key: np.uint64, k: int, alpha: float) -> float:
    """log of a Gamma(alpha, 1) draw for objective ``k`` of the request with ``key``.

    Marsaglia and Tsang's method for Gamma(alpha + 1) (alpha + 1 >= 1: acceptance above 95%), boosted to
    Gamma(alpha) by U^(1/alpha), kept in logs so that a small alpha's tiny draws do not underflow.
    Attempts come in blocks of ``ATTEMPTS``: attempt t of the block starting at counter s reads the
    counters s + t (normal), s + T + t (normal's angle) and s + 2T + t (acceptance); the boost reads 1.
    """
    base = np.uint64(k) * _STRIDE
    d = alpha + (1.0 - 1.0 / 3.0)
    c = 1.0 / math.sqrt(9.0 * d)
    start = np.uint64(2)
    while True:
        for t in range(ATTEMPTS):
            u1 = _uniform(key, base + start + np.uint64(t))
            u2 = _uniform(key, base + start + np.uint64(ATTEMPTS + t))
            u3 = _uniform(key, base + start + np.uint64(2 * ATTEMPTS + t))
            x = math.sqrt(-2.0 * math.log(u1)) * math.cos(2.0 * math.pi * u2)
            v = c * x + 1.0
            v = v * v * v
            log_v = math.log(max(v, 1e-300))
            if v > 0 and math.log(u3) < x * x * 0.5 + d * (1.0 - v + log_v):
                return math.log(d) + log_v + math.log(_uniform(key, base + _ONE)) / alpha
        start += np.uint64(3 * ATTEMPTS)


@numba.njit(cache=True, nogil=True)
def explore(ids: np.ndarray, salt: np.uint64, mu: np.ndarray, kappa: np.ndarray, alpha_floor: float,
             kappa_cap: float, share: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """:func:`grade.model.exploration.explore`'s (weights float32 [B, K], log-propensities float64 [B],
    explored bool [B]) for request ids viewed as uint64 [B], the seed's ``salt``, mu float32 [B, K] and
    kappa [B].

    A request's key is mix64(id ^ salt); its top 53 bits are the explore decision's uniform. An explored
    row draws log Gamma(alpha_k) per objective, normalises in logs (a small alpha's tiny draws do not
    underflow), keeps every weight >= MIN_WEIGHT and logs the float32 weights' own log-density."""
    b_rows, k_cols = mu.shape
    weights = np.empty((b_rows, k_cols), np.float32)
    log_p = np.full(b_rows, np.nan)
    explored = np.zeros(b_rows, np.bool_)
    a, w = np.empty(k_cols), np.empty(k_cols)
    for b in range(b_rows):
        key = _mix64(ids[b] ^ salt)
        if float(key >> _S11) * _UNIT + _HALF_UNIT >= share:
            weights[b] = mu[b]
            continue
        explored[b] = True
        top = -np.inf
        for k in range(k_cols):
            a[k] = _alpha(kappa[b], np.float64(mu[b, k]), alpha_floor, kappa_cap)
            w[k] = _log_gamma_draw(key, k, a[k])
            top = max(top, w[k])
        total = 0.0
        for k in range(k_cols):
            w[k] = math.exp(w[k] - top)
            total += w[k]
        clipped = 0.0
        for k in range(k_cols):
            w[k] = max(w[k] / total, MIN_WEIGHT)
            clipped += w[k]
        for k in range(k_cols):
            weights[b, k] = w[k] / clipped
        log_p[b] = _log_dirichlet(a, weights[b])
    return weights, log_p, explored
