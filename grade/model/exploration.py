"""Exploration in serving: served weights drawn from the policy's Dirichlet, seeded by the request id.

A share of the traffic (``serve.explore.share``) is served weights drawn from the served Dirichlet
Dir(alpha), alpha = min(kappa, kappa_cap) * mu + alpha_floor (the policy's own distribution, its
concentration capped so that the served weights keep some spread around a confident mean); the
rest is served the mean mu, as without exploration. Which requests explore and what they draw are
functions of (request id, seed) only: a counter-based generator (splitmix64 of the id, the seed, the
objective and a counter) gives each request its own uniforms, so the same request always gets the same
weights, whatever batch it arrives in, and a batch is drawn with a few vectorised array operations.

What is logged per request (the log contract's ``served_w_<objective>``, ``served_log_propensity``):

- explored: the weights and their log-density under the served Dirichlet, log Dir(w; alpha). That is
  the density *given* that the request explores; the decision to explore is a hash of the id alone,
  independent of the request's features, so the explored requests are a uniform sample of the traffic
  and an estimator over weight vectors reweights them by pi_new(w) / Dir(w; alpha) among themselves.
- served the mean: the mean and a null (NaN) log-propensity: a point mass has no density, and a
  continuous target policy gives that single point probability 0, so those requests carry no weight in
  importance sampling (grade.value.weight_ips uses the explored ones only).
"""

from __future__ import annotations

import dataclasses
import functools
import math

import numpy as np

from grade.core.config import MAX_SEED, ranged
from grade.data.raw_logs import mix64

#: attempts of the gamma sampler drawn at once per (request, objective); all miss with p < 1e-7
ATTEMPTS = 6
#: served weights are kept at least this far from 0 (a float32 weight of 0 has no log-density)
MIN_WEIGHT = 1e-12
_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
#: counters of one objective's uniforms lie in [k * _STRIDE, (k + 1) * _STRIDE): counter 1 boosts its
#: gamma draw, the others feed attempts (the request key's own bits decide whether it explores)
_STRIDE = 1 << 32
_LGAMMA = np.frompyfunc(math.lgamma, 1, 1)


@dataclasses.dataclass
class ExploreConfig:
    share: float = ranged(0.0, "[0, 1]")
    """share of requests served weights drawn from the policy's Dirichlet (0: every request is served the
    mean, as before exploration; the rest of the traffic is served the mean)"""
    kappa_cap: float = ranged(200.0, "(0, 1e6]")
    """the served Dirichlet's concentration is min(kappa, kappa_cap): a lower cap explores more widely"""
    seed: int = ranged(0, f"[0, {MAX_SEED}]", derived="shared.seed")
    """seed of the draws, with the request id: the same request and seed always get the same weights
    (the run's one seed, shared.seed)"""


@dataclasses.dataclass
class Served:
    """What serving answers for a batch of B requests and what the logs record of it."""

    weights: np.ndarray
    """float32 [B, K]: the served weights, rows on the simplex"""
    log_propensity: np.ndarray
    """float32 [B]: log Dir(weights; alpha) for an explored request, NaN for one served the mean"""
    explored: np.ndarray
    """bool [B]"""
    model_version: str


def served_alpha(mu: np.ndarray, kappa: np.ndarray, alpha_floor: float, kappa_cap: float) -> np.ndarray:
    """The served Dirichlet's parameters [B, K] (float64) from the policy's mean mu [B, K] and
    concentration kappa [B]."""
    return np.minimum(np.asarray(kappa, np.float64), kappa_cap)[:, None] * mu + alpha_floor


def log_density(alpha: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """log Dir(weights; alpha) [B] (float64) of weights [B, K] on the simplex under alpha [B, K]
    (torch.distributions.Dirichlet.log_prob's formula)."""
    a, w = np.asarray(alpha, np.float64), np.asarray(weights, np.float64)
    lg = _LGAMMA(np.concatenate([a, a.sum(-1, keepdims=True)], axis=-1)).astype(np.float64)
    return lg[..., -1] - lg[..., :-1].sum(-1) + ((a - 1.0) * np.log(w)).sum(-1)


def uniforms(keys: np.ndarray, offsets: np.ndarray) -> np.ndarray:
    """Uniforms in (0, 1), float64, of the generator at uint64 ``keys`` and counter ``offsets``
    (:func:`counter_offsets`; broadcast; uint64 arrays wrap mod 2**64 without a warning)."""
    bits = mix64(keys + offsets)
    return (bits >> np.uint64(11)) * 2.0 ** -53 + 2.0 ** -54


def counter_offsets(counters: np.ndarray) -> np.ndarray:
    """The generator's uint64 offsets (counter + 1) * golden of integer ``counters``."""
    return (np.asarray(counters).astype(np.uint64) + np.uint64(1)) * _GOLDEN


@functools.lru_cache(maxsize=64)
def _salt(seed: int) -> np.uint64:
    return mix64(np.array([seed], dtype=np.uint64) * _GOLDEN + _GOLDEN)[0]


@functools.lru_cache(maxsize=16)
def _draw_offsets(k: int, start: int) -> np.ndarray:
    """[K, 1 + 3 * ATTEMPTS] offsets: an objective's boost counter, then its attempts' from ``start`` on
    (the attempts' first uniforms, then their second, then their third)."""
    own = np.r_[1, start + np.arange(3 * ATTEMPTS)]
    return counter_offsets(np.arange(k)[:, None] * _STRIDE + own[None, :])


def request_keys(request_ids: np.ndarray, seed: int) -> np.ndarray:
    """uint64 [B]: the generator's key of each request id (int64 [B]) under ``seed``."""
    return mix64(np.asarray(request_ids, np.int64).view(np.uint64) ^ _salt(seed))


def decisions(keys: np.ndarray) -> np.ndarray:
    """The explore decision's uniform [B] of each request key [B] (the key's own bits: a mix64 output)."""
    return (keys >> np.uint64(11)) * 2.0 ** -53 + 2.0 ** -54


def log_gamma_draws(alpha: np.ndarray, keys: np.ndarray) -> np.ndarray:
    """log of Gamma(alpha, 1) draws [B, K] for alpha [B, K] (float64) and request keys [B].

    Marsaglia and Tsang's method for Gamma(alpha + 1) (alpha + 1 >= 1: acceptance above 95%), boosted to
    Gamma(alpha) by U^(1/alpha), kept in logs so that a small alpha's tiny draws do not underflow.
    ``ATTEMPTS`` attempts are drawn at once; a draw that misses all of them continues with the next ones.
    """
    d = alpha + (1.0 - 1.0 / 3.0)
    c = 1.0 / np.sqrt(9.0 * d)
    u = uniforms(keys[:, None, None], _draw_offsets(alpha.shape[1], 2))                # [B, K, 1 + 3T]
    log_g = _accepted(u[..., 1:], d, c)
    start = 2 + 3 * ATTEMPTS
    while np.isnan(log_g).any():  # rare: continue the missed draws with their next counters
        miss = np.isnan(log_g)
        more = uniforms(keys[:, None, None], _draw_offsets(alpha.shape[1], start))[..., 1:]
        log_g[miss] = _accepted(more, d, c)[miss]
        start += 3 * ATTEMPTS
    return log_g + np.log(u[..., 0]) / alpha


def _accepted(u: np.ndarray, d: np.ndarray, c: np.ndarray) -> np.ndarray:
    """log of the first accepted Marsaglia-Tsang draw [B, K] from uniforms [B, K, 3T] (NaN: none)."""
    t = ATTEMPTS
    x = np.sqrt(-2.0 * np.log(u[..., :t])) * np.cos(2.0 * np.pi * u[..., t:2 * t])
    v = c[..., None] * x + 1.0
    v = v * v * v
    log_v = np.log(np.maximum(v, 1e-300))
    ok = (v > 0) & (np.log(u[..., 2 * t:]) < x * x * 0.5 + d[..., None] * (1.0 - v + log_v))
    first = ok.argmax(axis=-1).ravel()                         # the first accepted attempt (0 if none)
    rows = np.arange(first.size)
    hit = ok.reshape(-1, t)[rows, first].reshape(d.shape)
    return np.where(hit, np.log(d) + log_v.reshape(-1, t)[rows, first].reshape(d.shape), np.nan)


def explore(mu: np.ndarray, kappa: np.ndarray, alpha_floor: float, request_ids: np.ndarray | None,
            cfg: ExploreConfig, model_version: str) -> Served:
    """The served weights of a batch: the policy's mean mu [B, K] and concentration kappa [B], request
    ids int64 [B] (None: no id to seed with, every request is served the mean).

    share 0 (or no ids): the mean, exactly, with NaN log-propensities. Otherwise each request whose
    decision uniform falls below ``cfg.share`` is served a draw of the served Dirichlet
    (:func:`served_alpha`) with its log-density; the others the mean.
    """
    mean = np.asarray(mu, np.float32)
    log_p = np.full(len(mean), np.nan, dtype=np.float32)
    if cfg.share <= 0 or request_ids is None or not len(mean):
        return Served(mean, log_p, np.zeros(len(mean), dtype=bool), model_version)
    keys = request_keys(request_ids, cfg.seed)
    explored = decisions(keys) < cfg.share
    if not explored.any():
        return Served(mean, log_p, explored, model_version)
    alpha = served_alpha(mean[explored].astype(np.float64), kappa[explored], alpha_floor, cfg.kappa_cap)
    log_g = log_gamma_draws(alpha, keys[explored])
    w = np.exp(log_g - log_g.max(axis=1, keepdims=True))
    w = np.maximum(w / w.sum(axis=1, keepdims=True), MIN_WEIGHT)
    w32 = (w / w.sum(axis=1, keepdims=True)).astype(np.float32)    # the logged weights, and their density
    weights = mean.copy()
    weights[explored] = w32
    log_p[explored] = log_density(alpha, w32)
    return Served(weights, log_p, explored, model_version)
