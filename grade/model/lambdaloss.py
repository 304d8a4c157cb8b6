"""LambdaLoss (Wang et al., CIKM 2018) as a pure, batched function, numerically safe with padding.

Follows the reference implementation of allRank (``allrank.models.losses.lambdaLoss``): the ranks
come from the current predicted order, gains G_i = (2^y_i - 1) / maxDCG@k, discounts
D_r = log2(1 + r), and the loss is -sum_ij w_ij * log2 sigmoid(sigma * (s_i - s_j)) over the valid
pairs (both items real and y_i > y_j; ``ndcgLoss1`` keeps every pair of real items), truncated to
pairs whose predicted ranks are both <= k. With ``reduction="sum"`` the value equals allRank's
``lambdaLoss(..., reduction="sum", reduction_log="binary")``.

Where it deliberately differs from allRank:

- ``reduction="mean"`` with no valid pair returns 0 (allRank: NaN); integer labels are accepted.
- Padded pairs are removed with finite fill values *before* the log-sigmoid, so padded positions
  get exactly zero gradient (a -inf or NaN in a masked pair would leak NaN through torch.where).
- log sigma(x) is computed with ``logsigmoid``, not ``log(clamp(sigmoid(x), 1e-10))``: allRank's
  clamps cap a pair's loss at ~33 bits and zero the gradient of badly misordered pairs; here the
  gradient of such pairs stays ~w_ij. The values agree wherever the clamps are inactive
  (|sigma * (s_i - s_j)| < ~23 and w_ij * |log2 sigma| < ~33), i.e. on any sane input.

Memory: the pair tensors are [B, L, L] (a handful of them), so B=512, L=200 is ~80 MB per tensor
in float32; fine for search/recommendation slates (L <= 200). Longer lists want chunking over B.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

WEIGHING_SCHEMES = ("ndcgLoss1", "ndcgLoss2", "ndcgLoss2PP", "lambdaRank", "rankNet")
PADDED_LABEL = -1.0
_EPS = 1e-10  # allRank's floor for maxDCG of lists without a positive label


def lambda_loss(scores: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor | None = None,
                weighing_scheme: str = "ndcgLoss2PP", k: int | None = None, sigma: float = 1.0,
                mu: float = 10.0, reduction: str = "mean") -> torch.Tensor:
    """LambdaLoss of ``scores`` against graded ``labels``.

    Args:
        scores: float [B, L] predicted scores (values at padded positions are ignored, even +-inf/NaN).
        labels: [B, L] relevance grades >= 0 (float or integer). When ``mask`` is None, label -1
            marks padding (allRank's convention).
        mask: bool [B, L], True where a real item stands; None = every position with label != -1.
        weighing_scheme: one of ``ndcgLoss1``, ``ndcgLoss2``, ``ndcgLoss2PP``, ``lambdaRank``, ``rankNet``.
        k: truncation: only pairs whose predicted ranks are both <= k count; maxDCG is taken @k.
        sigma: the logistic scale of score differences.
        mu: weight of the ndcgLoss2 term in ndcgLoss2PP (mu * ndcgLoss2 + lambdaRank).
        reduction: "sum" (allRank's value) or "mean" over the valid pairs of the whole batch
            (0 when there is none).

    Returns:
        a scalar tensor (differentiable with respect to ``scores``).
    """
    if weighing_scheme not in WEIGHING_SCHEMES:
        raise ValueError(f"weighing_scheme must be one of {WEIGHING_SCHEMES}, got {weighing_scheme!r}")
    if reduction not in ("sum", "mean"):
        raise ValueError(f"reduction must be 'sum' or 'mean', got {reduction!r}")
    if scores.dim() != 2 or labels.shape != scores.shape:
        raise ValueError(f"scores and labels must both be [B, L], got {tuple(scores.shape)} "
                         f"and {tuple(labels.shape)}")
    dtype = scores.dtype if scores.is_floating_point() else torch.float32
    labels = labels.to(dtype)
    if mask is None:
        mask = labels != PADDED_LABEL
    elif mask.shape != scores.shape:
        raise ValueError(f"mask must be [B, L] like scores, got {tuple(mask.shape)}")
    mask = mask.bool()
    n_items = scores.shape[1]
    if n_items == 0:
        return scores.sum() * 0.0
    k = n_items if k is None else max(0, min(int(k), n_items))

    # Predicted order: real items by score (stable for ties), padding last. Sorting a detached copy
    # keeps the fill values out of the graph.
    sort_key = torch.where(mask, scores.detach(), torch.full_like(scores.detach(), -math.inf))
    sort_key = torch.nan_to_num(sort_key, nan=-math.inf)
    order = torch.sort(sort_key, dim=1, descending=True, stable=True).indices
    real = torch.gather(mask, 1, order)                                                 # [B, L]
    s = torch.gather(torch.where(mask, scores, torch.zeros_like(scores)), 1, order)      # finite at padding
    y = torch.gather(torch.where(mask, labels, torch.zeros_like(labels)), 1, order).clamp_min(0.0)

    # Gains and discounts (constants for the gradient, as in allRank).
    positions = torch.arange(1, n_items + 1, device=scores.device, dtype=dtype)
    discount = torch.log2(1.0 + positions)                                              # D_r, [L]
    ideal = torch.sort(torch.where(mask, labels, torch.zeros_like(labels)).clamp_min(0.0),
                       dim=1, descending=True).values
    max_dcg = ((torch.pow(2.0, ideal) - 1.0) / discount)[:, :k].sum(1).clamp_min(_EPS)
    gain = (torch.pow(2.0, y) - 1.0) / max_dcg[:, None]                                  # G_i, [B, L]

    # Valid pairs (i, j) in predicted-rank coordinates.
    pair_real = real[:, :, None] & real[:, None, :]
    valid = pair_real if weighing_scheme == "ndcgLoss1" else pair_real & (y[:, :, None] > y[:, None, :])
    top_k = positions <= k
    valid = valid & (top_k[:, None] & top_k[None, :])

    weights = _pair_weights(weighing_scheme, gain, discount, mu)
    diffs = torch.where(valid, s[:, :, None] - s[:, None, :],
                        torch.zeros((), dtype=dtype, device=scores.device))
    log2_p = F.logsigmoid(sigma * diffs) / math.log(2.0)
    losses = torch.where(valid, -weights * log2_p, torch.zeros((), dtype=dtype, device=scores.device))
    total = losses.sum()
    if reduction == "sum":
        return total
    return total / valid.sum().clamp_min(1).to(dtype)


def _pair_weights(scheme: str, gain: torch.Tensor, discount: torch.Tensor, mu: float) -> torch.Tensor:
    """w_ij [B, L, L] (or broadcastable) of a weighing scheme, in predicted-rank coordinates."""
    if scheme == "rankNet":
        return torch.ones((), dtype=gain.dtype, device=gain.device)
    if scheme == "ndcgLoss1":
        return (gain / discount)[:, :, None]
    gain_gap = (gain[:, :, None] - gain[:, None, :]).abs()
    if scheme == "lambdaRank":
        return _lambda_rank_delta(discount)[None] * gain_gap
    ndcg2 = _ndcg2_delta(discount)[None] * gain_gap
    if scheme == "ndcgLoss2":
        return ndcg2
    return mu * ndcg2 + _lambda_rank_delta(discount)[None] * gain_gap  # ndcgLoss2PP


def _lambda_rank_delta(discount: torch.Tensor) -> torch.Tensor:
    """|1/D_i - 1/D_j| [L, L]."""
    inv = 1.0 / discount
    return (inv[:, None] - inv[None, :]).abs()


def _ndcg2_delta(discount: torch.Tensor) -> torch.Tensor:
    """delta_ij = |1/D_|i-j| - 1/D_(|i-j|+1)| [L, L], 0 on the diagonal."""
    n = discount.shape[0]
    idx = torch.arange(n, device=discount.device)
    gap = (idx[:, None] - idx[None, :]).abs()                     # |i - j| in 0..L-1
    # D extended by one position so that D_(|i-j|+1) exists for |i-j| = L-1.
    # D_1..D_(L+1)
    d_ext = torch.log2(2.0 + torch.arange(n + 1, device=discount.device, dtype=discount.dtype))
    inv = 1.0 / d_ext
    near = inv[(gap - 1).clamp_min(0)]                            # 1/D_|i-j|
    far = inv[gap]                                                # 1/D_(|i-j|+1)
    return torch.where(gap > 0, (near - far).abs(), torch.zeros_like(near))
