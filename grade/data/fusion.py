"""Score fusion: S_i(w) = sum_k w_k z_ik for batches of requests and groups of weight vectors.

Shapes (B requests, L list positions, K objectives, G weight vectors per request, E exposure depth):

- z: [B, L, K] standardised per-objective signals (log-predictions), mask: [B, L] True = real item
- w: [B, K] (one weight vector per request) or [B, G, K] (a group per request)
- scores: [B, L] or [B, G, L]; padded positions are -inf so they always rank last

All functions are vectorised over requests and groups; nothing loops over items.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch


def fuse(z: torch.Tensor, w: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Fused scores for weights ``w`` [B, K] -> [B, L] or a group ``w`` [B, G, K] -> [B, G, L]."""
    if w.dim() == 2:
        scores = torch.einsum("blk,bk->bl", z, w)
        if mask is not None:
            scores = scores.masked_fill(~mask, float("-inf"))
    elif w.dim() == 3:
        scores = torch.einsum("blk,bgk->bgl", z, w)
        if mask is not None:
            scores = scores.masked_fill(~mask.unsqueeze(1), float("-inf"))
    else:
        raise ValueError(f"weights must be [B, K] or [B, G, K], got shape {tuple(w.shape)}")
    return scores


def top_e(scores: torch.Tensor, e: int) -> torch.Tensor:
    """Indices of the ``e`` best items along the last axis, best first: [..., L] -> [..., min(e, L)].

    Ties are broken by the lower item index, so the result is deterministic across runs.
    """
    e = min(e, scores.shape[-1])
    # A stable descending sort keeps equal scores in index order (topk gives no such guarantee).
    return torch.sort(scores, dim=-1, descending=True, stable=True).indices[..., :e]


def gather_items(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """Per-item values ``x`` [B, L] (or [B, L, K]) at ranked indices ``idx`` [B, E] or [B, G, E].

    Returns [B, E] / [B, G, E] (or with a trailing K axis).
    """
    if idx.dim() == 2:
        if x.dim() == 2:
            return torch.gather(x, 1, idx)
        return torch.gather(x, 1, idx.unsqueeze(-1).expand(-1, -1, x.shape[-1]))
    if idx.dim() == 3:
        b, g, e = idx.shape
        if x.dim() == 2:
            return torch.gather(x.unsqueeze(1).expand(b, g, x.shape[1]), 2, idx)
        k = x.shape[-1]
        xx = x.unsqueeze(1).expand(b, g, x.shape[1], k)
        return torch.gather(xx, 2, idx.unsqueeze(-1).expand(b, g, e, k))
    raise ValueError(f"indices must be [B, E] or [B, G, E], got shape {tuple(idx.shape)}")


def dcg_discounts(e: int, device: torch.device | None = None,
                  dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """DCG discounts d_j = 1 / log2(j + 2) for 0-based positions j < e: [e]."""
    return 1.0 / torch.log2(torch.arange(e, device=device, dtype=dtype) + 2.0)


def examination(e: int, eta: float = 1.0, device: torch.device | None = None,
                dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Position-bias examination probabilities theta_j = 1 / (1 + j)^eta for 0-based j < e: [e]."""
    return (torch.arange(e, device=device, dtype=dtype) + 1.0).pow(-eta)


def cascade_examination(attraction: torch.Tensor, continue_click: float, continue_skip: float,
                        page_size: int | None = None) -> torch.Tensor:
    """Examination probabilities of ranked slots under a DBN-style cascade: [..., E] -> [..., E].

    ``attraction`` [..., E] is the click probability of the item in each slot once examined (0 for an
    empty slot). The user examines slot 0, and after slot j continues with probability
    ``continue_click`` if she clicked it, ``continue_skip`` if not; slots at or past ``page_size`` are
    never examined. Clicks of examined slots are independent given the ranking, so the examination of
    slot j is the product over the slots above it of a_i c_click + (1 - a_i) c_skip, exactly.
    """
    step = attraction * continue_click + (1.0 - attraction) * continue_skip
    above = torch.cumprod(torch.cat([torch.ones_like(step[..., :1]), step[..., :-1]], dim=-1), dim=-1)
    page = page_mask(attraction.shape[-1], page_size, device=attraction.device, dtype=attraction.dtype)
    return above * page


def page_mask(e: int, page_size: int | None, device: torch.device | None = None,
              dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """1 for the slots a user can see (0-based j < page_size), 0 past the page end: [e]."""
    slots = torch.arange(e, device=device)
    limit = e if page_size is None else page_size
    return (slots < limit).to(dtype)


CLICK_MODELS = ("pbm", "cascade")


@dataclasses.dataclass(frozen=True)
class ClickModel:
    """How users of a world examine a ranked list: the one object every true metric is computed under.

    ``pbm``: slot j is examined with theta_j = 1 / (1 + j)^eta, whatever the items. ``cascade``: the
    DBN-style cascade of :func:`cascade_examination` (eta unused). Under both, slots at or past
    ``page_size`` (None = no page end) are never examined.
    """

    kind: str = "pbm"
    eta: float = 1.0
    continue_click: float = 0.5
    continue_skip: float = 0.9
    page_size: int | None = None

    def examine(self, attraction: torch.Tensor, shown: torch.Tensor) -> torch.Tensor:
        """Examination of ranked slots [..., E] from their items' click probability once examined and
        the shown mask (1 = a real item in the slot), in ``attraction``'s dtype."""
        shown = shown.to(attraction.dtype)
        e = attraction.shape[-1]
        if self.kind == "cascade":
            return cascade_examination(attraction * shown, self.continue_click, self.continue_skip,
                                       self.page_size) * shown
        theta = examination(e, self.eta, device=attraction.device, dtype=attraction.dtype)
        if self.page_size is not None:
            theta = theta * page_mask(e, self.page_size, device=attraction.device, dtype=attraction.dtype)
        return shown * theta

    def impressions(self, shown: torch.Tensor) -> torch.Tensor:
        """The policy-independent impressions of ranked slots [..., E] -> [...]: the examination of the shown
        slots when nothing in them attracts (theta_j under pbm, continue_skip^j under the cascade), so
        that a lift of a per-mille metric is the lift of its count per request."""
        return self.examine(torch.zeros_like(shown), shown).sum(-1)

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def of(cls, world: ClickModel | float) -> ClickModel:
        """A click model as is, or the position-based one of an eta (what callers passed before)."""
        return world if isinstance(world, ClickModel) else cls(eta=float(world))

    @classmethod
    def from_json(cls, doc: dict[str, Any]) -> ClickModel:
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(doc) - fields)
        if unknown or doc.get("kind", "pbm") not in CLICK_MODELS:
            raise ValueError(f"click model: expected keys {sorted(fields)} and kind in {list(CLICK_MODELS)}, "
                             f"got {doc}")
        return cls(**doc)


def truth_click_model(spec: dict[str, Any], eta: float) -> ClickModel:
    """The click model the truth of a features folder is computed under: the world's, recorded by the
    features step from the simulated logs' manifest (``spec["click_model"]``); for features without it,
    the position-based model of ``eta``."""
    doc = spec.get("click_model")
    return ClickModel(eta=float(eta)) if doc is None else ClickModel.from_json(doc)


def ndcg_at(scores: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor | None, e: int,
            gain: str = "exp2") -> torch.Tensor:
    """NDCG@e of the ranking by ``scores`` against ``labels`` [B, L].

    ``scores`` is [B, L] or [B, G, L]; returns [B] or [B, G]. Requests whose ideal DCG is 0 (no
    positive label) score 0. ``gain``: "exp2" (2^y - 1) or "linear" (y, for graded values like gmv).
    """
    if mask is not None:
        labels = labels.masked_fill(~mask, 0.0)
    g = torch.pow(2.0, labels) - 1.0 if gain == "exp2" else labels
    idx = top_e(scores, e)
    disc = dcg_discounts(idx.shape[-1], device=scores.device, dtype=g.dtype)
    dcg = (gather_items(g, idx) * disc).sum(-1)
    ideal = torch.sort(g, dim=-1, descending=True).values[..., : idx.shape[-1]]
    idcg = (ideal * disc).sum(-1)
    if dcg.dim() == 2:
        idcg = idcg.unsqueeze(1)
    return torch.where(idcg > 0, dcg / idcg.clamp_min(1e-12), torch.zeros_like(dcg))


def simplex_grid(k: int, steps: int) -> torch.Tensor:
    """All weight vectors on the simplex with coordinates in {0, 1/steps, ..., 1}: [G, K]."""
    def rec(remaining: int, dims: int) -> list[list[int]]:
        if dims == 1:
            return [[remaining]]
        return [[i] + rest for i in range(remaining + 1) for rest in rec(remaining - i, dims - 1)]

    return torch.tensor(rec(steps, k), dtype=torch.float32) / steps
