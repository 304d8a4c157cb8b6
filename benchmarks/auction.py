"""Speed of the offline auction: paired bootstrap and per-request metric sums.

- Bootstrap: ``--resamples`` (1,000) paired resamples of ``--requests`` (100k) requests over the
  columns of ``--policies`` policies (every true/prior/replay sum). Reference in the same process: the
  naive bootstrap (gather the resampled rows, sum them) timed on a few resamples and scaled.
- Intervals: ``compare`` over three baselines with each of ``auction.INTERVALS``; reference: the
  percentile interval in the same process (ratios).
- Metric sums: requests/s of ``policy_sums`` (true + prior + replay flavours) for one policy; reference:
  fused ranking alone (fuse + top-E) on the same requests.

    python -m benchmarks.auction [--requests 100000] [--resamples 1000] [--policies 8]
"""

from __future__ import annotations

import argparse

import torch

from benchmarks._common import emit, peak_rss_mib, timeit
from grade.data.fusion import fuse, top_e
from grade.value import auction


def synthetic_requests(n: int, length: int = 50, k: int = 3, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    mask = torch.ones(n, length, dtype=torch.bool)
    return {
        "z": torch.randn(n, length, k, generator=g), "mask": mask,
        "pred": torch.rand(n, length, k, generator=g) + 0.01,
        "true_ctr": torch.rand(n, length, generator=g) * 0.1,
        "true_cvr": torch.rand(n, length, generator=g) * 0.1,
        "price": torch.rand(n, length, generator=g) * 100,
        "click": (torch.rand(n, length, generator=g) < 0.05).float(),
        "order": (torch.rand(n, length, generator=g) < 0.01).float(),
        "gmv": torch.rand(n, length, generator=g),
        "position": torch.argsort(torch.rand(n, length, generator=g), -1),
    }


def run(requests: int = 100_000, resamples: int = 1000, policies: int = 8, depth: int = 10) -> dict:
    data = synthetic_requests(requests)
    objectives = ["ctr", "cvr", "gmv"]
    g = torch.Generator().manual_seed(1)
    weights = [torch.softmax(torch.randn(3, generator=g), 0) for _ in range(policies)]

    sums_t = timeit(lambda: auction.policy_sums(data, objectives, weights=weights[0], depth=depth), repeat=3)
    rank_t = timeit(lambda: top_e(fuse(data["z"], weights[0].expand(requests, -1), data["mask"]), depth),
                    repeat=3)

    table = auction.SumsTable(auction.shared_sums(data, depth, 1.0))
    for i, w in enumerate(weights):
        table.add_policy(f"p{i}", auction.policy_sums(data, objectives, weights=w, depth=depth))
    matrix = table.matrix()
    boot_t = timeit(lambda: auction.bootstrap_totals(matrix, resamples, seed=0), repeat=3, warmup=1)
    compare_t = timeit(lambda: auction.compare(table, ["p0"], resamples, 0.95, 0), repeat=1, warmup=0)
    # each interval of the lifts over three baselines (static, best_static, stage1 in the evaluation)
    interval_t = {iv: timeit(lambda iv=iv: auction.compare(table, ["p0", "p1", "p2"], resamples, 0.95, 0,
                                                           interval=iv), repeat=3, warmup=0)["median_s"]
                  for iv in auction.INTERVALS}

    naive_resamples = 20
    gen = torch.Generator().manual_seed(0)

    def naive():
        for _ in range(naive_resamples):
            matrix[torch.randint(0, requests, (requests,), generator=gen)].sum(0)

    naive_t = timeit(naive, repeat=3)
    naive_scaled = naive_t["median_s"] * resamples / naive_resamples
    return {
        "requests": requests, "resamples": resamples, "policies": policies, "columns": int(matrix.shape[1]),
        "bootstrap": boot_t,
        "bootstrap_compare_all_lifts_s": compare_t["median_s"],
        "compare_three_baselines_s": interval_t,
        "compare_vs_percentile": {iv: t / interval_t["percentile"] for iv, t in interval_t.items()},
        "naive_bootstrap_scaled_s": naive_scaled,
        "bootstrap_speedup_vs_naive": naive_scaled / boot_t["median_s"],
        "policy_sums": {**sums_t, "requests_per_s": requests / sums_t["median_s"]},
        "rank_only_reference": {**rank_t, "requests_per_s": requests / rank_t["median_s"]},
        "policy_sums_vs_rank_only": sums_t["median_s"] / rank_t["median_s"],
        "peak_rss_mib": peak_rss_mib(),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--requests", type=int, default=100_000, help="held-out requests")
    p.add_argument("--resamples", type=int, default=1000, help="bootstrap resamples")
    p.add_argument("--policies", type=int, default=8, help="policies in the table (columns ~ 11 per policy)")
    args = p.parse_args()
    emit("auction", run(args.requests, args.resamples, args.policies))


if __name__ == "__main__":
    main()
