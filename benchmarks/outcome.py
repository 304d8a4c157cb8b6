"""Outcome-model training throughput and its distance from the forward pass.

One pass of :func:`grade.value.outcome.fit_outcome` over N synthetic requests of L items (the position-based
likelihood, Adam, minibatches of the default size), against the forward pass alone over the same
requests (the outcome model's logits, no gradient) measured in the same process; and the direct
method's per-step overhead in Stage 2: the value fields of one finetune batch
(:func:`grade.value.value_model.value_fields`, the outcome forward included).

    python -m benchmarks.outcome [--requests 8192] [--list-size 50] [--repeat 5]
"""

from __future__ import annotations

import argparse
import dataclasses

import torch

from benchmarks._common import emit, peak_rss_mib, timeit
from benchmarks.finetune import OBJECTIVES, synthetic_batch, synthetic_value_model
from grade.value.outcome import OutcomeConfig, fit_outcome
from grade.value.value_model import value_fields


def run(requests: int = 8192, list_size: int = 50, k: int = 3, repeat: int = 5, finetune_batch: int = 512
        ) -> dict:
    gen = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    data = synthetic_batch(requests, list_size, k, gen)
    value = synthetic_value_model(list_size, k)
    spec = {"objectives": OBJECTIVES[:k], "categorical": [{"size": 5}] * 3}
    cfg = dataclasses.replace(OutcomeConfig(), epochs=1)
    net = value.outcome

    def train_pass() -> None:
        fit_outcome(data, spec, value.examination, cfg)

    @torch.no_grad()
    def forward() -> None:
        for start in range(0, requests, cfg.batch_size):
            sl = slice(start, start + cfg.batch_size)
            net(data["z"][sl], data["pred"][sl], data["mask"][sl], data["num"][sl], data["cat"][sl])

    step_batch = {key: v[:finetune_batch] for key, v in data.items()}
    fields_t = timeit(lambda: value_fields(step_batch, value), repeat=repeat * 4, warmup=2)
    forward_t = timeit(forward, repeat=repeat, warmup=1)
    train_t = timeit(train_pass, repeat=repeat, warmup=1)
    return {
        "config": {"requests": requests, "list_size": list_size, "objectives": k,
                   "batch_size": cfg.batch_size, "hidden": cfg.hidden, "finetune_batch": finetune_batch},
        "train_pass": train_t,
        "forward_pass": forward_t,
        "train_requests_per_s": requests / train_t["median_s"],
        "forward_requests_per_s": requests / forward_t["median_s"],
        "train_over_forward_median": train_t["median_s"] / forward_t["median_s"],
        "value_fields_per_finetune_batch": fields_t,
        "peak_rss_mib": peak_rss_mib(),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--requests", type=int, default=8192, help="requests per pass (N)")
    p.add_argument("--list-size", type=int, default=50, help="items per request (L)")
    p.add_argument("--repeat", type=int, default=5, help="timed repetitions (medians reported)")
    args = p.parse_args()
    emit("outcome", run(args.requests, args.list_size, repeat=args.repeat))


if __name__ == "__main__":
    main()
