"""Outcome-model training throughput against a plain MLP of the same width (the floor).

:func:`grade.value.outcome.fit_outcomes` with the default members, ``--passes`` passes each (no valid
split, so no early stopping) over N synthetic requests of L items, against the floor measured in the
same process: an MLP of the same widths (input = the outcome model's, hidden layers, 3 outputs)
trained with Adam on as many rows as the fit reads, flattened to [N * D, d] (D = min(L, the default
examination depth): the fit reads each request's items at its D highest logged positions),
minibatches of the same number of items, as many passes as all members make together (members x
passes), regressing fixed targets. Also the
forward pass of the fitted mixture alone and the direct method's per-step overhead in Stage 2 (the
value fields of one finetune batch, :func:`grade.value.value_model.value_fields`).

    python -m benchmarks.outcome [--requests 8192] [--list-size 50] [--passes 2] [--repeat 3]
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics

import torch
from torch import nn

from benchmarks._common import emit, peak_rss_mib, timeit
from benchmarks.finetune import CAT_SIZES, OBJECTIVES, synthetic_batch, synthetic_value_model
from grade.value.examination import ExaminationConfig, ExaminationEstimate
from grade.value.outcome import OutcomeConfig, fit_outcomes
from grade.value.value_model import value_fields


def floor_mlp(rows: torch.Tensor, hidden: list[int], passes: int, rows_per_step: int, seed: int = 0) -> None:
    """A plain MLP of ``hidden`` widths trained for ``passes`` passes over ``rows`` [R, d] (Adam, shuffled
    minibatches of ``rows_per_step``, mean squared error against fixed targets)."""
    torch.manual_seed(seed)
    widths = [rows.shape[1], *hidden]
    layers: list[nn.Module] = []
    for a, b in zip(widths[:-1], widths[1:], strict=True):
        layers += [nn.Linear(a, b), nn.SiLU()]
    net = nn.Sequential(*layers, nn.Linear(widths[-1], 3))
    target = torch.randn(rows.shape[0], 3)
    optimizer = torch.optim.Adam(net.parameters(), lr=1e-3)
    for _ in range(passes):
        order = torch.randperm(rows.shape[0])
        for start in range(0, rows.shape[0], rows_per_step):
            idx = order[start:start + rows_per_step]
            loss = nn.functional.mse_loss(net(rows[idx]), target[idx])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()


def run(requests: int = 8192, list_size: int = 50, k: int = 3, passes: int = 2, repeat: int = 3,
        finetune_batch: int = 512) -> dict:
    gen = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    data = synthetic_batch(requests, list_size, k, gen)
    value = synthetic_value_model(list_size, k)
    spec = {"objectives": OBJECTIVES[:k], "categorical": [{"size": s} for s in CAT_SIZES]}
    cfg = dataclasses.replace(OutcomeConfig(), epochs=passes)
    exam = ExaminationEstimate.fixed(1.0, ExaminationConfig().depth)
    depth = min(list_size, len(exam.theta))
    width = 2 * k + data["num"].shape[1] + cfg.emb_dim * len(CAT_SIZES)
    flat = torch.randn(requests * depth, width, generator=gen)
    fitted = fit_outcomes({key: v[:cfg.batch_size] for key, v in data.items()}, spec, exam,
                          dataclasses.replace(cfg, epochs=1))[0]

    @torch.no_grad()
    def forward() -> None:
        for start in range(0, requests, cfg.batch_size):
            fitted.item_outcomes({key: v[start:start + cfg.batch_size] for key, v in data.items()})

    step_batch = {key: v[:finetune_batch] for key, v in data.items()}
    fields_t = timeit(lambda: value_fields(step_batch, value), repeat=repeat * 4, warmup=2)
    forward_t = timeit(forward, repeat=repeat, warmup=1)
    # the fit and its floor alternate, so that a change of the machine's load reaches both
    fit_s, floor_s = [], []
    for _ in range(repeat):
        fit_s.append(timeit(lambda: fit_outcomes(data, spec, exam, cfg), repeat=1, warmup=0)["median_s"])
        floor_s.append(timeit(lambda: floor_mlp(flat, cfg.hidden, cfg.members * passes,
                                                cfg.batch_size * depth), repeat=1, warmup=0)["median_s"])
    ratios = sorted(a / b for a, b in zip(fit_s, floor_s, strict=True))
    member_passes = cfg.members * passes
    return {
        "config": {"requests": requests, "list_size": list_size, "objectives": k, "passes": passes,
                   "fit_items_per_request": depth,
                   "members": cfg.members, "batch_size": cfg.batch_size, "hidden": cfg.hidden,
                   "input_width": width, "finetune_batch": finetune_batch, "repeat": repeat},
        "fit_s": fit_s,
        "floor_s": floor_s,
        "train_over_floor": statistics.median(ratios),
        "train_over_floor_each": ratios,
        "train_member_requests_per_s": requests * member_passes / statistics.median(fit_s),
        "floor_requests_per_s": requests * member_passes / statistics.median(floor_s),
        "forward_pass": forward_t,
        "forward_requests_per_s": requests / forward_t["median_s"],
        "value_fields_per_finetune_batch": fields_t,
        "peak_rss_mib": peak_rss_mib(),
    }


def main() -> None:
    p = argparse.ArgumentParser(prog="python -m benchmarks.outcome", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--requests", type=int, default=8192, help="requests per pass (N)")
    p.add_argument("--list-size", type=int, default=50, help="items per request (L)")
    p.add_argument("--passes", type=int, default=2, help="passes of each member (no early stopping)")
    p.add_argument("--repeat", type=int, default=3, help="timed repetitions (medians reported)")
    args = p.parse_args()
    emit("outcome", run(args.requests, args.list_size, passes=args.passes, repeat=args.repeat))


if __name__ == "__main__":
    main()
