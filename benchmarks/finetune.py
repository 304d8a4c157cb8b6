"""GRPO training throughput and its distance from the work's floor.

One full training step (rollout of G weight vectors per request, composite reward, advantages,
``update_epochs`` clipped updates with the KL to the reference) on B requests of L items and K
signals, against the forward-only fused ranking of the same batch (einsum + top-E of B x G x L
scores), measured in the same process. Reported: requests/s of training, the step / floor ratio,
and the share of the step spent in the rollout + reward; then the step with each posterior
estimator (``by_estimator``): dm, switch and ips with the value fields a step computes first
(theta-hat at the logged positions, the declared value of the labels and, for dm and switch, the
outcome model's forward pass), next to the earlier dcg_ips.

    python -m benchmarks.finetune [--batch 512] [--group 16] [--list-size 50] [--repeat 10]
"""

from __future__ import annotations

import argparse
import dataclasses
import time
from collections.abc import Callable

import torch

from benchmarks._common import emit, peak_rss_mib, timeit
from grade.business import BusinessConfig
from grade.examination import ExaminationEstimate
from grade.fusion import fuse, top_e
from grade.grpo import FinetuneConfig, rollout, train_step
from grade.outcome import OutcomeConfig, OutcomeNet, OutcomeSpec
from grade.policy import PolicyConfig, PolicyNet
from grade.reward import reward_terms
from grade.value_model import ValueModel, value_fields

ESTIMATORS = ("dcg_ips", "ips", "switch", "dm")

OBJECTIVES = ["ctr", "cvr", "gmv"]


def synthetic_batch(b: int, length: int, k: int, gen: torch.Generator) -> dict[str, torch.Tensor]:
    mask = torch.ones(b, length, dtype=torch.bool)
    return {"z": torch.randn(b, length, k, generator=gen), "mask": mask,
            "pred": torch.rand(b, length, k, generator=gen) * torch.tensor([0.2, 0.1, 80.0])[:k] + 1e-3,
            "num": torch.randn(b, 8, generator=gen), "cat": torch.randint(0, 5, (b, 3), generator=gen),
            "click": (torch.rand(b, length, generator=gen) < 0.05).float(),
            "order": (torch.rand(b, length, generator=gen) < 0.01).float(),
            "gmv": torch.zeros(b, length),
            "position": torch.argsort(torch.rand(b, length, generator=gen), dim=-1)}


def synthetic_value_model(list_size: int, k: int) -> ValueModel:
    """An outcome model of the default width for the synthetic batch's features."""
    spec = OutcomeSpec(objectives=OBJECTIVES[:k], n_numeric=8, cat_sizes=[5, 5, 5],
                       hidden=list(OutcomeConfig().hidden), emb_dim=OutcomeConfig().emb_dim)
    return ValueModel(ExaminationEstimate.fixed(1.0, list_size), OutcomeNet(spec).eval(), 1.0)


def step_fn(data: dict[str, torch.Tensor], policy: PolicyNet, reference: PolicyNet, cfg: FinetuneConfig,
            value: ValueModel, estimator: str) -> Callable[[], None]:
    """One finetune step with ``estimator`` as the posterior: the value fields first (theta-hat at the
    logged positions, the labels' declared value and, for dm and switch, the outcome model's forward
    pass), then the GRPO update, as grade.finetune does per batch."""
    ecfg = dataclasses.replace(cfg, reward=dataclasses.replace(cfg.reward, post_estimator=estimator))
    optimizer = torch.optim.Adam(policy.parameters(), lr=cfg.lr)
    theta = value.theta(cfg.exposure_depth)
    counter = iter(range(10**9))

    def step() -> None:
        batch = data if estimator == "dcg_ips" else {
            **data, **value_fields(data, value, BusinessConfig(), with_model=estimator in ("dm", "switch"))}
        train_step(policy, reference, optimizer, batch, OBJECTIVES, ecfg, seed=next(counter),
                   theta=None if estimator == "dcg_ips" else theta)

    return step


def run(batch: int = 512, group: int = 16, list_size: int = 50, k: int = 3, repeat: int = 10) -> dict:
    gen = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    data = synthetic_batch(batch, list_size, k, gen)
    pcfg = PolicyConfig(n_numeric=8, cat_sizes=[5, 5, 5], n_objectives=k)
    policy, reference = PolicyNet(pcfg), PolicyNet(pcfg)
    reference.load_state_dict(policy.state_dict())
    cfg = FinetuneConfig(group_size=group, batch_size=batch)
    value = synthetic_value_model(list_size, k)
    w = torch.distributions.Dirichlet(torch.ones(k)).sample((batch, group))

    def floor() -> None:
        top_e(fuse(data["z"], w, data["mask"]), cfg.exposure_depth)

    step = step_fn(data, policy, reference, cfg, value, cfg.reward.post_estimator)

    def rollout_and_reward() -> None:
        with torch.no_grad():
            batch_ = {**data, **value_fields(data, value, BusinessConfig())}
            roll = rollout(policy, data["num"], data["cat"], cfg, seed=0)
            reward_terms(roll.weights, batch_, OBJECTIVES, cfg.reward, cfg.exposure_depth,
                         theta=value.theta(cfg.exposure_depth))

    floor_t = timeit(floor, repeat=max(repeat * 5, 20), warmup=3)
    step_t = timeit(step, repeat=repeat, warmup=2)
    reward_t = timeit(rollout_and_reward, repeat=repeat, warmup=1)
    by_estimator = {name: timeit(step_fn(data, policy, reference, cfg, value, name), repeat=repeat, warmup=2)
                    for name in ESTIMATORS}
    t0 = time.perf_counter()
    n_steps = max(3, repeat)
    for _ in range(n_steps):
        step()
    wall = time.perf_counter() - t0
    return {
        "config": {"batch": batch, "group_size": group, "list_size": list_size, "objectives": k,
                   "update_epochs": cfg.update_epochs, "exposure_depth": cfg.exposure_depth,
                   "post_estimator": cfg.reward.post_estimator},
        "floor_forward_fused_ranking": floor_t,
        "train_step": step_t,
        "rollout_and_reward": reward_t,
        "train_requests_per_s": batch / step_t["median_s"],
        "train_requests_per_s_sustained": batch * n_steps / wall,
        "floor_requests_per_s": batch / floor_t["median_s"],
        "step_over_floor_median": step_t["median_s"] / floor_t["median_s"],
        "rollout_and_reward_share_of_step": reward_t["median_s"] / step_t["median_s"],
        "by_estimator": {name: {**t, "step_over_floor_median": t["median_s"] / floor_t["median_s"]}
                         for name, t in by_estimator.items()},
        "peak_rss_mib": peak_rss_mib(),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=512, help="requests per step (B)")
    p.add_argument("--group", type=int, default=16, help="weight vectors per request (G)")
    p.add_argument("--list-size", type=int, default=50, help="items per request (L)")
    p.add_argument("--repeat", type=int, default=10, help="timed repetitions (medians reported)")
    args = p.parse_args()
    emit("finetune", run(args.batch, args.group, args.list_size, repeat=args.repeat))


if __name__ == "__main__":
    main()
