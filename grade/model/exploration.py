"""Exploration in serving: served weights drawn from the policy's Dirichlet, seeded by the request id.

A share of the traffic (``serve.explore.share``) is served weights drawn from the served Dirichlet
Dir(alpha), alpha = min(kappa, kappa_cap) * mu + alpha_floor (the policy's own distribution, its
concentration capped so that the served weights keep some spread around a confident mean); the
rest is served the mean mu, as without exploration. Which requests explore and what they draw are
functions of (request id, seed) only: a counter-based generator (splitmix64 of the id, the seed, the
objective and a counter) gives each request its own uniforms, so the same request always gets the same
weights, whatever batch it arrives in. The draws and densities run in compiled loops (numba): a
batch of 64 in microseconds, where array operations on such small arrays cost their call overhead.

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

import numpy as np

from grade.core.config import MAX_SEED, ranged
from grade.data.raw_logs import mix64
from grade.model.explore_stream import _GOLDEN, alpha_values


@dataclasses.dataclass
class ExploreConfig:
    share: float = ranged(0.2, "[0, 1]")
    """share of requests (with a request id) served weights drawn from the policy's Dirichlet, the rest
    the mean: what lets the next retraining judge a model on its own logs (0 = every request the mean;
    0.2 costs 0.0-0.3% of true OPM on the simulator, docs/loop.md)"""
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
    concentration kappa [B] (:func:`grade.model.explore_stream.alpha_values`)."""
    return alpha_values(np.asarray(kappa, np.float64)[:, None], np.asarray(mu, np.float64), alpha_floor,
                        kappa_cap)


def log_density(alpha: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """log Dir(weights; alpha) [...] (float64) of weights [..., K] on the simplex under alpha [..., K]
    (torch.distributions.Dirichlet.log_prob's formula)."""
    from grade.model import explore_kernels

    a, w = np.broadcast_arrays(np.asarray(alpha, np.float64), np.asarray(weights, np.float64))
    k = a.shape[-1]
    out = explore_kernels.log_densities(np.ascontiguousarray(a.reshape(-1, k)),
                                        np.ascontiguousarray(w.reshape(-1, k)))
    return out.reshape(a.shape[:-1])


@functools.lru_cache(maxsize=64)
def _salt(seed: int) -> np.uint64:
    return mix64(np.array([seed], dtype=np.uint64) * _GOLDEN + _GOLDEN)[0]


def explore(mu: np.ndarray, kappa: np.ndarray, alpha_floor: float, request_ids: np.ndarray | None,
            cfg: ExploreConfig, model_version: str) -> Served:
    """The served weights of a batch: the policy's mean mu [B, K] and concentration kappa [B], request
    ids int64 [B] (None: no id to seed with, every request is served the mean).

    share 0 (or no ids): the mean, exactly, with NaN log-propensities. Otherwise each request whose
    decision uniform falls below ``cfg.share`` is served a draw of the served Dirichlet
    (:func:`served_alpha`) with its log-density; the others the mean.
    """
    mean = np.ascontiguousarray(mu, np.float32)
    if cfg.share <= 0 or request_ids is None or not len(mean):
        return Served(mean, np.full(len(mean), np.nan, dtype=np.float32), np.zeros(len(mean), dtype=bool),
                      model_version)
    from grade.model import explore_kernels  # numba: imported by the first draw, not by every step

    ids = np.ascontiguousarray(request_ids, np.int64).view(np.uint64)
    weights, log_p, explored = explore_kernels.explore(
        ids, _salt(cfg.seed), mean, np.asarray(kappa, np.float64), float(alpha_floor), float(cfg.kappa_cap),
        float(cfg.share))
    return Served(weights, log_p.astype(np.float32), explored, model_version)
