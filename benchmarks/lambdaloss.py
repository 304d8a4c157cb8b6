"""LambdaLoss forward+backward time on a [512, 50] batch (ndcgLoss2PP by default), median.

References in the same process: the forward pass alone, and allRank's algorithm (sort, gather,
[B, L, L] pair weights, clamped log2 sigmoid) written out here as it is in allRank 1.4.3
(benchmarks/README.md records both times on the development machine).

    python -m benchmarks.lambdaloss [--batch 512] [--list 50] [--repeat 30]
"""

from __future__ import annotations

import argparse

import torch

from benchmarks._common import emit, peak_rss_mib, timeit
from grade.model.lambdaloss import WEIGHING_SCHEMES, lambda_loss


def allrank_lambda_loss(y_pred, y_true, eps=1e-10, mu=10.0, sigma=1.0):
    """allRank's lambdaLoss with ndcgLoss2PP (padding = label -1), reduction sum, binary log."""
    y_pred, y_true = y_pred.clone(), y_true.clone()
    padded = y_true == -1
    y_pred[padded] = float("-inf")
    y_true[padded] = float("-inf")
    y_pred_sorted, indices = y_pred.sort(descending=True, dim=-1)
    y_true_sorted, _ = y_true.sort(descending=True, dim=-1)
    true_by_pred = torch.gather(y_true, 1, indices)
    true_diffs = true_by_pred[:, :, None] - true_by_pred[:, None, :]
    pairs = torch.isfinite(true_diffs) & (true_diffs > 0)
    true_by_pred.clamp_(min=0.0)
    y_true_sorted.clamp_(min=0.0)
    n = y_pred.shape[1]
    d = torch.log2(1.0 + torch.arange(1, n + 1).float())[None, :]
    max_dcg = ((torch.pow(2, y_true_sorted) - 1) / d).sum(-1).clamp(min=eps)
    g = (torch.pow(2, true_by_pred) - 1) / max_dcg[:, None]
    pos = torch.arange(1, n + 1)
    delta_idx = (pos[:, None] - pos[None, :]).abs()
    deltas = (d[0, delta_idx - 1].pow(-1) - d[0, delta_idx].pow(-1)).abs()
    deltas.diagonal().zero_()
    gap = (g[:, :, None] - g[:, None, :]).abs()
    lam = (d[:, :, None].pow(-1) - d[:, None, :].pow(-1)).abs() * gap
    weights = mu * deltas[None] * gap + lam
    diffs = (y_pred_sorted[:, :, None] - y_pred_sorted[:, None, :]).clamp(min=-1e8, max=1e8)
    diffs = diffs.masked_fill(torch.isnan(diffs), 0.0)
    probas = (torch.sigmoid(sigma * diffs).clamp(min=eps) ** weights).clamp(min=eps)
    return -torch.log2(probas)[pairs].sum()


def run(batch: int = 512, length: int = 50, repeat: int = 30) -> dict:
    torch.manual_seed(0)
    scores = torch.randn(batch, length, requires_grad=True)
    labels = torch.randint(0, 3, (batch, length)).float()
    lengths = torch.randint(length // 2, length + 1, (batch,))
    mask = torch.arange(length)[None, :] < lengths[:, None]
    padded_labels = torch.where(mask, labels, torch.tensor(-1.0))

    def fwd_bwd(scheme="ndcgLoss2PP"):
        scores.grad = None
        lambda_loss(scores, labels, mask, scheme, reduction="mean").backward()

    def forward_only():
        with torch.no_grad():
            lambda_loss(scores, labels, mask, "ndcgLoss2PP", reduction="mean")

    def allrank_fwd_bwd():
        scores.grad = None
        allrank_lambda_loss(scores, padded_labels).backward()

    ours = timeit(fwd_bwd, repeat=repeat, warmup=3)
    fwd = timeit(forward_only, repeat=repeat, warmup=3)
    ref = timeit(allrank_fwd_bwd, repeat=repeat, warmup=3)
    per_scheme = {s: timeit(lambda s=s: fwd_bwd(s), repeat=max(5, repeat // 3), warmup=1)["median_s"] * 1e3
                  for s in WEIGHING_SCHEMES}
    return {
        "shape": [batch, length], "scheme": "ndcgLoss2PP",
        "forward_backward_ms": {"median": ours["median_s"] * 1e3, "p90": ours["p90_s"] * 1e3},
        "forward_only_ms": fwd["median_s"] * 1e3,
        "allrank_forward_backward_ms": ref["median_s"] * 1e3,
        "ratio_vs_allrank": ours["median_s"] / ref["median_s"],
        "ratio_vs_forward_only": ours["median_s"] / fwd["median_s"],
        "lists_per_s": batch / ours["median_s"],
        "forward_backward_ms_by_scheme": per_scheme,
        "peak_rss_mib": peak_rss_mib(),
    }


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="python -m benchmarks.lambdaloss", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=512, help="lists per batch")
    p.add_argument("--list", type=int, default=50, dest="length", help="items per list")
    p.add_argument("--repeat", type=int, default=30, help="timed repetitions (median reported)")
    args = p.parse_args(argv)
    emit("lambdaloss", run(args.batch, args.length, args.repeat))


if __name__ == "__main__":
    main()
