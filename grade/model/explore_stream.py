"""The generator's constants and the served alpha, shared by exploration's array side
(grade.model.exploration) and its compiled loops (grade.model.explore_kernels), so that neither imports
the other at import time and the compiled loops read the very constants the array side documents."""

from __future__ import annotations

import numpy as np

#: attempts of the gamma sampler drawn at once per (request, objective); all miss with p < 1e-7
ATTEMPTS = 6
#: served weights are kept at least this far from 0 (a float32 weight of 0 has no log-density)
MIN_WEIGHT = 1e-12
_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
#: counters of one objective's uniforms lie in [k * _STRIDE, (k + 1) * _STRIDE): counter 1 boosts its
#: gamma draw, the others feed attempts (the request key's own bits decide whether it explores)
_STRIDE = np.uint64(1 << 32)
# uint64 constants of the compiled loops (grade.model.explore_kernels): numba turns a uint64 combined
# with a plain int into a float
_ONE = np.uint64(1)
_S11 = np.uint64(11)
_UNIT, _HALF_UNIT = 2.0 ** -53, 2.0 ** -54


def alpha_values(kappa, mu, alpha_floor: float, kappa_cap: float):
    """min(kappa, kappa_cap) * mu + alpha_floor: of arrays (numpy broadcasting) or, compiled
    (grade.model.explore_kernels), of one value."""
    return np.minimum(kappa, kappa_cap) * mu + alpha_floor
