"""What ranks the simulator's lists and how users click them: the ranking hook and the click sampling.

A :data:`Ranker` ranks a chunk of simulated requests (the static logging policy is the simulator's own;
a served model's is :class:`grade.release.served_market.ServedMarket`, kept out of the data layer); its
:class:`Served` answer adds the served market's optional log columns. :func:`sample_clicks` draws the
clicks of the ranked lists under a :class:`grade.data.fusion.ClickModel`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import numpy as np
import pyarrow as pa

from grade.data.fusion import ClickModel, examination


def sample_clicks(world: ClickModel, rng: np.random.Generator, order_idx: np.ndarray, position: np.ndarray,
                  true_ctr: np.ndarray, u_click: np.ndarray) -> np.ndarray:
    """Clicks [n, L] of ranked lists under the click model ``world``: ``order_idx`` [n, L] the item at each
    position, ``position`` [n, L] each item's, ``true_ctr`` the click probability of an examined item,
    ``u_click`` a uniform per item (the cascade draws its continuation uniforms from ``rng``)."""
    n, L = position.shape
    if world.kind == "pbm":
        theta = examination(L, world.eta).double().numpy()
        if world.page_size is not None:
            theta = theta * (np.arange(L) < world.page_size)
        return u_click < theta[position] * true_ctr
    # the cascade, sequentially down the ranking (a loop over positions, vectorised over requests)
    u_continue = rng.random((n, L))
    click = np.zeros((n, L), dtype=bool)
    examined = np.ones(n, dtype=bool)
    rows = np.arange(n)
    for j in range(min(L, world.page_size or L)):
        item = order_idx[:, j]
        clicked = examined & (u_click[rows, item] < true_ctr[rows, item])
        click[rows, item] = clicked
        go_on = np.where(clicked, world.continue_click, world.continue_skip)
        examined &= u_continue[:, j] < go_on
    return click


#: the model_version of requests ranked by the static fusion: their served weights are on the
#: log-predictions (rank by sum_k w_k log p_k), not on a model's standardised z
STATIC_VERSION = "static"


@dataclasses.dataclass
class Served:
    """What ranked a chunk's lists: per-row scores (higher first) and, for a served model, what it logs."""

    scores: np.ndarray
    """[n, L] or [n * L] scores in the rows' order"""
    weights: np.ndarray | None = None
    """[n, K] the served weights per signal (simulator.objectives order), or None (nothing logged)"""
    log_propensity: np.ndarray | None = None
    """[n] log-density of the served weights under the serving policy (NaN for a request served the mean);
    None when it ranks every request by its mean"""
    model_version: str | None = None
    """version of the serving model"""

    def columns(self, objectives: list[str], list_size: int) -> dict[str, pa.Array]:
        """The optional log columns of a served market: served_w_<objective>, served_log_propensity,
        model_version (nothing without served weights)."""
        if self.weights is None:
            return {}
        out = {f"served_w_{o}": pa.array(np.repeat(self.weights[:, k], list_size).astype(np.float32))
               for k, o in enumerate(objectives)}
        rows = self.weights.shape[0] * list_size
        out["served_log_propensity"] = (
            pa.nulls(rows, pa.float32()) if self.log_propensity is None
            # NaN (a request served the mean) is written as null
            else pa.array(np.repeat(self.log_propensity, list_size).astype(np.float32), from_pandas=True))
        out["model_version"] = pa.array([self.model_version or ""] * rows, type=pa.string())
        return out


#: ranks a chunk: the chunk's requests in log format (features, item_id, pred_* columns; the rows of a
#: request contiguous, list_size rows each) -> :class:`Served`
Ranker = Callable[[pa.Table], Served]
