"""GRPO training throughput and its distance from the work's floor.

One full training step (rollout of G weight vectors per request, composite reward, advantages,
``update_epochs`` clipped updates with the KL to the reference) on B requests of L items and K
signals, against the forward-only fused ranking of the same batch (einsum + top-E of B x G x L
scores), measured in the same process. Reported: requests/s of training, the step / floor ratio,
and the share of the step spent in the rollout + reward; then the step with each posterior
estimator (``by_estimator``): dm, switch and ips looking their batch's value fields up (theta-hat at
the logged positions, the declared value of the labels and, for dm and switch, the outcome model's
values), as grade.train.finetune does, next to the earlier dcg_ips. The fields of a split of ``--requests``
requests are computed once before (``value_fields_once``: seconds, requests/s, bytes per request,
by :func:`grade.value.value_fields.value_cache_of`); ``dm_fields_per_batch`` is the step when they are
computed per batch instead (over ``finetune.value_cache_max_mb``). Every step with the default guard_mode
(constraint) includes the guardrails' reading (the ranking and estimated amounts of the policy's
served weights, the rollout's mean; static's amounts are value fields computed once);
``dm_guard_prices`` is the step at fixed guardrail prices, without it.

    python -m benchmarks.finetune [--batch 512] [--group 16] [--list-size 50] [--requests 16384]
                                  [--repeat 10]
"""

from __future__ import annotations

import argparse
import dataclasses
import time
from collections.abc import Callable

import torch

from benchmarks._common import emit, peak_rss_mib, timeit
from grade.data.dataset import ROW_FIELD
from grade.data.fusion import fuse, top_e
from grade.model.policy import PolicyConfig, PolicyNet
from grade.train.grpo import FinetuneConfig, Rollout, rollout, train_step
from grade.value import guardrails
from grade.value.business import BusinessConfig
from grade.value.examination import ExaminationEstimate
from grade.value.outcome import OutcomeConfig, OutcomeMixture, OutcomeNet, OutcomeSpec
from grade.value.reward import reward_terms, rewarded_value
from grade.value.value_fields import CACHE_CHUNK, batch_value_fields, cached_value_fields, value_cache_of
from grade.value.value_model import ValueModel, priced_fields

ESTIMATORS = ("dcg_ips", "ips", "switch", "dm")

OBJECTIVES = ["ctr", "cvr", "gmv"]
CAT_SIZES = [5, 5, 5]


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
    """An outcome model of the default width and number of members for the synthetic batch's features."""
    defaults = OutcomeConfig()
    spec = OutcomeSpec(objectives=OBJECTIVES[:k], n_numeric=8, cat_sizes=CAT_SIZES,
                       hidden=list(defaults.hidden), emb_dim=defaults.emb_dim)
    nets = [OutcomeNet(spec).eval() for _ in range(defaults.members)]
    model = nets[0] if len(nets) == 1 else OutcomeMixture(nets).eval()
    return ValueModel(ExaminationEstimate.fixed(1.0, list_size), model, 1.0)


def precompute(split: dict[str, torch.Tensor], value: ValueModel, cfg: FinetuneConfig,
               static: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """The value fields of every request of ``split`` [N, L], once, as grade.value.value_fields.value_cache
    does
    (with the ``static`` weights' amounts when given, as a run holding its guardrails does)."""
    n = int(split["mask"].shape[0])
    starts = range(0, n, CACHE_CHUNK)
    chunks = ({**{key: v[s:s + CACHE_CHUNK] for key, v in split.items()},
               ROW_FIELD: torch.arange(s, min(s + CACHE_CHUNK, n))} for s in starts)
    return value_cache_of(chunks, n, value, cfg.reward, cfg.exposure_depth, CAT_SIZES, cfg.value_cache_max_mb,
                          static)


def step_fn(split: dict[str, torch.Tensor], rows: torch.Tensor, policy: PolicyNet, reference: PolicyNet,
            cfg: FinetuneConfig, value: ValueModel, estimator: str, per_batch: bool = False
            ) -> Callable[[], None]:
    """One finetune step with ``estimator`` as the posterior on the requests at ``rows`` of ``split``:
    the batch's value fields looked up in those computed once for the split (``per_batch``: computed
    for the batch), then the GRPO update, as grade.train.finetune does per batch."""
    ecfg = dataclasses.replace(cfg, reward=dataclasses.replace(cfg.reward, post_estimator=estimator))
    optimizer = torch.optim.Adam(policy.parameters(), lr=cfg.lr)
    theta = value.theta(cfg.exposure_depth)
    data = {key: v[rows] for key, v in split.items()}
    static = torch.full((data["z"].shape[-1],), 1.0 / data["z"].shape[-1])
    cache = None if estimator == "dcg_ips" or per_batch else precompute(split, value, ecfg, static)
    counter = iter(range(10**9))
    integral = [(0.0,) * len(guardrails.GUARDED)]

    def fields(roll: Rollout) -> dict[str, torch.Tensor]:
        if estimator == "dcg_ips":
            return {}
        kinds = (batch_value_fields(data, value, ecfg.reward, ecfg.exposure_depth, static) if per_batch
                 else cached_value_fields(cache, rows))
        if ecfg.reward.guard_mode == "price":
            return priced_fields(kinds, rewarded_value(BusinessConfig(), ecfg.reward))
        # the guardrails' reading at the rollout's served weights, as grade.train.finetune does
        guard = guardrails.read_guardrails(roll.mean, static, data, kinds, theta, BusinessConfig(),
                                           ecfg.reward, ecfg.exposure_depth, integral[0])
        integral[0] = guard.integral
        return priced_fields(kinds, guardrails.guarded_value(BusinessConfig(), guard))

    def step() -> None:
        seed = next(counter)
        roll = rollout(policy, data["num"], data["cat"], ecfg, seed)
        train_step(policy, reference, optimizer, {**data, **fields(roll)}, OBJECTIVES, ecfg, seed=seed,
                   theta=None if estimator == "dcg_ips" else theta, roll=roll)

    return step


def value_fields_once(split: dict[str, torch.Tensor], value: ValueModel, cfg: FinetuneConfig, estimator: str,
                      repeat: int) -> dict[str, float]:
    """The one-time computation of the split's value fields with ``estimator``: time, rate, memory."""
    ecfg = dataclasses.replace(cfg, reward=dataclasses.replace(cfg.reward, post_estimator=estimator))
    n = int(split["mask"].shape[0])
    t = timeit(lambda: precompute(split, value, ecfg), repeat=repeat, warmup=1)
    cache = precompute(split, value, ecfg)
    return {**t, "requests": n, "requests_per_s": n / t["median_s"],
            "bytes_per_request": sum(v[0].numel() * v.element_size() for v in cache.values())}


def run(batch: int = 512, group: int = 16, list_size: int = 50, k: int = 3, repeat: int = 10,
        requests: int = 16384) -> dict:
    gen = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    split = synthetic_batch(max(requests, batch), list_size, k, gen)
    rows = torch.randperm(split["mask"].shape[0], generator=gen)[:batch]   # a shuffled batch of the split
    data = {key: v[rows] for key, v in split.items()}
    pcfg = PolicyConfig(n_numeric=8, cat_sizes=CAT_SIZES, n_objectives=k)
    policy, reference = PolicyNet(pcfg), PolicyNet(pcfg)
    reference.load_state_dict(policy.state_dict())
    cfg = FinetuneConfig(group_size=group, batch_size=batch)
    value = synthetic_value_model(list_size, k)
    w = torch.distributions.Dirichlet(torch.ones(k)).sample((batch, group))

    def floor() -> None:
        top_e(fuse(data["z"], w, data["mask"]), cfg.exposure_depth)

    step = step_fn(split, rows, policy, reference, cfg, value, cfg.reward.post_estimator)
    cache = precompute(split, value, cfg)

    def rollout_and_reward() -> None:
        with torch.no_grad():
            batch_ = {**data, **priced_fields(cached_value_fields(cache, rows),
                                              rewarded_value(BusinessConfig(), cfg.reward))}
            roll = rollout(policy, data["num"], data["cat"], cfg, seed=0)
            reward_terms(roll.weights, batch_, OBJECTIVES, cfg.reward, cfg.exposure_depth,
                         theta=value.theta(cfg.exposure_depth))

    floor_t = timeit(floor, repeat=max(repeat * 5, 20), warmup=3)
    step_t = timeit(step, repeat=repeat, warmup=2)
    reward_t = timeit(rollout_and_reward, repeat=repeat, warmup=1)
    by_estimator = {name: timeit(step_fn(split, rows, policy, reference, cfg, value, name), repeat=repeat,
                                 warmup=2) for name in ESTIMATORS}
    per_batch_t = timeit(step_fn(split, rows, policy, reference, cfg, value, "dm", per_batch=True),
                         repeat=repeat, warmup=2)
    priced_cfg = dataclasses.replace(cfg, reward=dataclasses.replace(cfg.reward, guard_mode="price"))
    guard_prices_t = timeit(step_fn(split, rows, policy, reference, priced_cfg, value, "dm"), repeat=repeat,
                            warmup=2)
    once = {name: value_fields_once(split, value, cfg, name, max(3, repeat // 3)) for name in ESTIMATORS[1:]}
    t0 = time.perf_counter()
    n_steps = max(3, repeat)
    for _ in range(n_steps):
        step()
    wall = time.perf_counter() - t0
    return {
        "config": {"batch": batch, "group_size": group, "list_size": list_size, "objectives": k,
                   "update_epochs": cfg.update_epochs, "exposure_depth": cfg.exposure_depth,
                   "post_estimator": cfg.reward.post_estimator, "guard_mode": cfg.reward.guard_mode,
                   "split_requests": int(split["mask"].shape[0])},
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
        "dm_guard_prices": {
            **guard_prices_t, "step_over_floor_median": guard_prices_t["median_s"] / floor_t["median_s"],
            "constraint_step_over_price_step": step_t["median_s"] / guard_prices_t["median_s"]},
        "dm_fields_per_batch": {**per_batch_t,
                                "step_over_floor_median": per_batch_t["median_s"] / floor_t["median_s"]},
        "value_fields_once": once,
        "peak_rss_mib": peak_rss_mib(),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=512, help="requests per step (B)")
    p.add_argument("--group", type=int, default=16, help="weight vectors per request (G)")
    p.add_argument("--list-size", type=int, default=50, help="items per request (L)")
    p.add_argument("--requests", type=int, default=16384,
                   help="requests of the split whose value fields are computed once")
    p.add_argument("--repeat", type=int, default=10, help="timed repetitions (medians reported)")
    args = p.parse_args()
    emit("finetune", run(args.batch, args.group, args.list_size, repeat=args.repeat, requests=args.requests))


if __name__ == "__main__":
    main()
