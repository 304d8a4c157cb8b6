"""GRPO training throughput and its distance from the work's floor.

One full training step (rollout of G weight vectors per request, composite reward, advantages,
``update_epochs`` clipped updates with the KL to the reference) on B requests of L items and K
signals, against the forward-only fused ranking of the same batch (einsum + top-E of B x G x L
scores), measured in the same process. Reported: requests/s of training, the step / floor ratio,
and the share of the step spent in the rollout + reward.

    python -m benchmarks.finetune [--batch 512] [--group 16] [--list-size 50] [--repeat 10]
"""

from __future__ import annotations

import argparse
import time

import torch

from benchmarks._common import emit, peak_rss_mib, timeit
from grade.fusion import fuse, top_e
from grade.grpo import FinetuneConfig, rollout, train_step
from grade.policy import PolicyConfig, PolicyNet
from grade.reward import reward_terms

OBJECTIVES = ["ctr", "cvr", "gmv"]


def synthetic_batch(b: int, length: int, k: int, gen: torch.Generator) -> dict[str, torch.Tensor]:
    mask = torch.ones(b, length, dtype=torch.bool)
    return {"z": torch.randn(b, length, k, generator=gen), "mask": mask,
            "pred": torch.rand(b, length, k, generator=gen) * torch.tensor([0.2, 0.1, 80.0])[:k] + 1e-3,
            "num": torch.randn(b, 8, generator=gen), "cat": torch.randint(0, 5, (b, 3), generator=gen),
            "click": (torch.rand(b, length, generator=gen) < 0.05).float(),
            "order": (torch.rand(b, length, generator=gen) < 0.01).float(),
            "gmv": torch.zeros(b, length)}


def run(batch: int = 512, group: int = 16, list_size: int = 50, k: int = 3, repeat: int = 10) -> dict:
    gen = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    data = synthetic_batch(batch, list_size, k, gen)
    pcfg = PolicyConfig(n_numeric=8, cat_sizes=[5, 5, 5], n_objectives=k)
    policy, reference = PolicyNet(pcfg), PolicyNet(pcfg)
    reference.load_state_dict(policy.state_dict())
    cfg = FinetuneConfig(group_size=group, batch_size=batch)
    optimizer = torch.optim.Adam(policy.parameters(), lr=cfg.lr)
    w = torch.distributions.Dirichlet(torch.ones(k)).sample((batch, group))

    def floor() -> None:
        top_e(fuse(data["z"], w, data["mask"]), cfg.exposure_depth)

    counter = iter(range(10**9))

    def step() -> None:
        train_step(policy, reference, optimizer, data, OBJECTIVES, cfg, seed=next(counter))

    def rollout_and_reward() -> None:
        with torch.no_grad():
            roll = rollout(policy, data["num"], data["cat"], cfg, seed=0)
            reward_terms(roll.weights, data, OBJECTIVES, cfg.reward, cfg.exposure_depth)

    floor_t = timeit(floor, repeat=max(repeat * 5, 20), warmup=3)
    step_t = timeit(step, repeat=repeat, warmup=2)
    reward_t = timeit(rollout_and_reward, repeat=repeat, warmup=1)
    t0 = time.perf_counter()
    n_steps = max(3, repeat)
    for _ in range(n_steps):
        step()
    wall = time.perf_counter() - t0
    return {
        "config": {"batch": batch, "group_size": group, "list_size": list_size, "objectives": k,
                   "update_epochs": cfg.update_epochs, "exposure_depth": cfg.exposure_depth},
        "floor_forward_fused_ranking": floor_t,
        "train_step": step_t,
        "rollout_and_reward": reward_t,
        "train_requests_per_s": batch / step_t["median_s"],
        "train_requests_per_s_sustained": batch * n_steps / wall,
        "floor_requests_per_s": batch / floor_t["median_s"],
        "step_over_floor_median": step_t["median_s"] / floor_t["median_s"],
        "rollout_and_reward_share_of_step": reward_t["median_s"] / step_t["median_s"],
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
