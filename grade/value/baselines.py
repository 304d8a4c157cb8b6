"""Baseline policies of the offline auction: static, best_static, logged, oracle.

- ``static``: the production default, ranking by the product of the MTL predictions. In the
  standardised space log p_k = s_k z_k + m_k, so the product order is w_k proportional to s_k.
- ``best_static``: one global weight vector, searched on the TRAIN split by the cross-entropy method
  (CEM) over softmax logits. Train has no ground truth, so the objective is estimated from the logs: by
  default the value Stage 2's reward maximises (the declared business value plus the reward's small
  guardrail weights, grade.value.reward.rewarded_value) by a counterfactual estimator (``estimated``: the
  direct method of the value model's outcome model, as Stage 2's reward, or IPS); or Stage 2's
  posterior reward (the same click/order/GMV mix, 1/theta-weighted and normalised over all search
  requests at once); either way best_static is the best *global* answer to the question GRADE answers
  per request. Or the per-request NDCG@E of one logged label (biased towards the logging policy, see
  docs/finetune.md). The search always evaluates the static weights too and returns the best vector
  seen, so its objective value on train is never below static's.
- ``logged``: the order the logging policy displayed (rank by -position).
- ``segment_best``: per true segment, the global weights with the best TRUE declared value on the
  valid split (simulated data only; a ceiling for a policy that knew each user's segment).
- ``oracle``: per request, the weights that maximise the TRUE business value (simulated data only),
  from ``grade.data.simulator.oracle_weights``.
"""

from __future__ import annotations

import dataclasses
import logging

import torch

from grade.core.errors import InputError
from grade.data.fusion import ClickModel, fuse, ndcg_at, simplex_grid, top_e
from grade.data.simulator import oracle_weights as simulator_oracle
from grade.value.auction import EstimatorInputs, sweep_global_weights
from grade.value.estimators import cascade_kwargs, ranking_value
from grade.value.reward import RewardConfig, reward_terms

log = logging.getLogger(__name__)

SEARCH_OBJECTIVES = ("estimated", "posterior", "ndcg_order", "ndcg_click", "ndcg_gmv")


def static_weights(spec: dict) -> torch.Tensor:
    """The production weights [K]: w_k proportional to pred_log_std s_k (ranks by prod_k p_k)."""
    s = torch.tensor([float(v) for v in spec["pred_log_std"]], dtype=torch.float32)
    return s / s.sum()


def logged_scores(data: dict[str, torch.Tensor]) -> torch.Tensor:
    """Scores [N, L] reproducing the logged display order (position 0 first; padding last)."""
    scores = -data["position"].to(torch.float32)
    return scores.masked_fill(~data["mask"], float("-inf"))


@dataclasses.dataclass
class SearchResult:
    weights: torch.Tensor
    """the best global weight vector found [K]"""
    objective: float
    """its objective value on the search requests"""
    static_objective: float
    """the static weights' objective value on the same requests"""
    history: list[dict]
    """per iteration: best objective so far, population mean, sampling spread"""
    n_requests: int
    """requests the objective was measured on"""


def replay_objective(z: torch.Tensor, mask: torch.Tensor, labels: torch.Tensor, weights: torch.Tensor,
                     depth: int, gain: str = "exp2", chunk_elems: int = 8_000_000) -> torch.Tensor:
    """Mean NDCG@depth over requests of each global weight vector ``weights`` [G, K] -> [G]."""
    n, length, _ = z.shape
    g = weights.shape[0]
    chunk = max(1, chunk_elems // max(1, g * length))
    total = torch.zeros(g, dtype=torch.float64)
    for start in range(0, n, chunk):
        sl = slice(start, min(start + chunk, n))
        w = weights.to(z.dtype).unsqueeze(0).expand(z[sl].shape[0], g, -1)
        total += ndcg_at(fuse(z[sl], w, mask[sl]), labels[sl], mask[sl], depth,
                         gain=gain).sum(0, dtype=torch.float64)
    return total / max(n, 1)


def posterior_objective(data: dict[str, torch.Tensor], objectives: list[str], weights: torch.Tensor,
                        reward: RewardConfig, depth: int, chunk_elems: int = 4_000_000) -> torch.Tensor:
    """Stage 2's posterior reward of each global weight vector ``weights`` [G, K], averaged over
    requests -> [G].

    All requests form one batch (the normaliser is their mean ideal DCG); chunks run over the vectors.
    """
    cfg = dataclasses.replace(reward, post=1.0, prior=0.0, format=0.0, post_estimator="dcg_ips")
    n, length = data["mask"].shape
    if n == 0:
        return torch.zeros(weights.shape[0], dtype=torch.float64)
    per_chunk = max(1, chunk_elems // max(1, n * length))
    out = []
    for start in range(0, weights.shape[0], per_chunk):
        w = weights[start:start + per_chunk].to(data["z"].dtype)
        post = reward_terms(w.unsqueeze(0).expand(n, -1, -1), data, objectives, cfg, depth)["post"]
        out.append(post.mean(0, dtype=torch.float64))
    return torch.cat(out)


def estimated_objective(data: dict[str, torch.Tensor], weights: torch.Tensor, est: EstimatorInputs,
                        depth: int, chunk_elems: int = 4_000_000, keys: tuple[str, ...] = ("value",)
                        ) -> torch.Tensor:
    """Mean estimated amount per request of each label of ``keys`` for each global weight vector
    ``weights`` [G, K] -> [G, len(keys)] (by default the declared value: [G, 1]).

    ``est`` holds the estimator, theta-hat and the per-item labels ("value" the declared value; "clicks",
    "orders", "gmv": logged and, for dm/switch/shrunk, the outcome model's) of the same requests as
    ``data`` (z [N, L, K], mask).
    """
    n, length = data["mask"].shape
    g = weights.shape[0]
    e = min(depth, length, est.theta.shape[0])
    chunk = max(1, chunk_elems // max(1, g * length))
    total = torch.zeros(g, len(keys), dtype=torch.float64)
    for start in range(0, n, chunk):
        sl = slice(start, min(start + chunk, n))
        w = weights.to(data["z"].dtype).unsqueeze(0).expand(data["z"][sl].shape[0], g, -1)
        idx = top_e(fuse(data["z"][sl], w, data["mask"][sl]), e)
        for j, key in enumerate(keys):
            m = None if est.models is None else est.models[key][sl]
            value = ranking_value(est.name, idx, est.theta[:e], est.logged_theta[sl], est.labels[key][sl], m,
                                  max_weight=est.max_weight, **cascade_kwargs(est.cascade, sl)).value
            total[:, j] += value.sum(0, dtype=torch.float64)
    return total / max(n, 1)


#: the guardrails of a constrained search (labels of grade.value.auction.EstimatorInputs)
GUARDRAIL_LABELS = ("clicks", "gmv")


def constrained_objective(amounts: torch.Tensor, floors: torch.Tensor, penalty: float) -> torch.Tensor:
    """The search score [G] of amounts [G, 1 + R] (the value, then R guardrails) against the guardrails'
    floors [R]: the value where every guardrail is at or above its floor, else the value minus ``penalty``
    times the summed relative shortfall, so that (with a penalty far above any value difference) every
    feasible vector ranks above every infeasible one, and infeasible ones by how far they fall short."""
    shortfall = torch.relu(floors - amounts[:, 1:]) / floors.clamp_min(1e-12)
    return amounts[:, 0] - penalty * shortfall.sum(-1)


def best_static(train: dict[str, torch.Tensor], spec: dict, depth: int = 10, objective: str = "posterior",
                iterations: int = 10, population: int = 32, elite_fraction: float = 0.25,
                init_spread: float = 1.0, max_requests: int = 20000, seed: int = 0,
                reward: RewardConfig | None = None, estimated: EstimatorInputs | None = None,
                guard_margin: float | None = None) -> SearchResult:
    """Search one global weight vector on the train split with the cross-entropy method.

    Only requests with at least one positive label carry signal, so the search uses those (at most
    ``max_requests``, drawn with ``seed``). ``posterior`` scores with Stage 2's posterior reward
    (``reward``: its label mix and debiasing; train needs ``position`` then), ``ndcg_*`` with the mean
    per-request NDCG@E of one label, ``estimated`` with :func:`estimated_objective` (``estimated``: its
    inputs on every request of ``train``; all requests are kept, since the model's value needs no
    positive label). Logits ~ N(mu, sigma), weights = softmax; mu starts at log(static)
    and moves to the elite mean each iteration.

    ``guard_margin`` (estimated only; None: unconstrained): the search keeps the estimated CTR and GPM at
    or above static's times (1 + guard_margin), as Stage 2's guard_mode constraint does
    (:func:`constrained_objective`).
    """
    if objective not in SEARCH_OBJECTIVES:
        raise ValueError(f"objective must be one of {SEARCH_OBJECTIVES}, got {objective!r}")
    reward = reward or RewardConfig()
    if objective == "estimated":
        if estimated is None:
            raise ValueError("the estimated objective needs the estimator inputs of the train requests")
        positive = train["mask"].clone()
    elif objective == "posterior":
        mix = {"click": reward.post_click, "order": reward.post_order, "gmv": reward.post_gmv}
        if not any(share > 0 for share in mix.values()):
            raise InputError("best_static: the posterior objective needs a positive "
                             "finetune.reward.post_click, post_order or post_gmv "
                             "(or set evaluate.static_search_objective to ndcg_order)")
        positive = torch.zeros_like(train["mask"])
        for name, share in mix.items():
            if share > 0:
                positive |= train[name] > 0
    else:
        positive = train[objective.removeprefix("ndcg_")] > 0
    keep = torch.nonzero((positive & train["mask"]).any(-1)).squeeze(-1)
    gen = torch.Generator().manual_seed(int(seed))
    if keep.numel() > max_requests:
        keep = keep[torch.randperm(keep.numel(), generator=gen)[:max_requests]].sort().values
    data = {k: v[keep] for k, v in train.items()}
    static = static_weights(spec)
    if estimated is not None:
        estimated = dataclasses.replace(
            estimated, logged_theta=estimated.logged_theta[keep],
            labels={k: v[keep] for k, v in estimated.labels.items()},
            models=None if estimated.models is None else {k: v[keep] for k, v in estimated.models.items()})

    constrained = objective == "estimated" and guard_margin is not None
    if constrained:
        keys = ("value", *GUARDRAIL_LABELS)
        at_static = estimated_objective(data, static.unsqueeze(0), estimated, depth, keys=keys)[0]
        floors = at_static[1:] * (1.0 + guard_margin)
        penalty = 1e3 * max(float(at_static[0].abs()), 1e-12)

    def score(w: torch.Tensor) -> torch.Tensor:
        if constrained:
            amounts = estimated_objective(data, w, estimated, depth, keys=keys)
            return constrained_objective(amounts, floors, penalty)
        if objective == "estimated":
            return estimated_objective(data, w, estimated, depth)[:, 0]
        if objective == "posterior":
            return posterior_objective(data, list(spec["objectives"]), w, reward, depth)
        label = objective.removeprefix("ndcg_")
        return replay_objective(data["z"], data["mask"], data[label], w, depth,
                                "linear" if label == "gmv" else "exp2")

    static_value = float(score(static.unsqueeze(0))[0])
    best_w, best_v = static.clone(), static_value
    mu = static.clamp_min(1e-6).log()
    sigma = torch.full_like(mu, float(init_spread))
    n_elite = max(2, int(round(population * elite_fraction)))
    history = []
    for it in range(iterations):
        logits = mu + sigma * torch.randn(population, mu.numel(), generator=gen)
        cand = torch.softmax(logits, dim=-1)
        values = score(cand)
        top = torch.argsort(values, descending=True)[:n_elite]
        if float(values[top[0]]) > best_v:
            best_v, best_w = float(values[top[0]]), cand[top[0]].clone()
        mu = logits[top].mean(0)
        sigma = logits[top].std(0).clamp_min(0.05)
        history.append({"iteration": it, "best": best_v, "population_mean": float(values.mean()),
                        "spread": float(sigma.mean())})
        log.info("best_static CEM %d/%d: best %s %.5f (static %.5f), spread %.3f", it + 1, iterations,
                 objective, best_v, static_value, float(sigma.mean()))
    return SearchResult(weights=best_w, objective=best_v, static_objective=static_value, history=history,
                        n_requests=int(keep.numel()))


def segment_best_weights(data: dict[str, torch.Tensor], objectives: list[str], segment: torch.Tensor,
                         value_weights: tuple[float, float, float], depth: int, eta: ClickModel | float,
                         steps: int) -> dict[int, torch.Tensor]:
    """Per segment id, the simplex-grid vector [K] with the best TRUE declared value on ``data`` under the
    world's click model ``eta`` (an eta = position-based).

    ``data`` needs the ground truth; segment [N] ids; value_weights: the declared value's prices for raw
    GMV (grade.value.business.BusinessConfig.prices). Impressions are the same for every vector of a
    segment, so the best value per impression is the best total value.
    """
    grid = simplex_grid(data["z"].shape[-1], steps)
    v_click, v_order, v_gmv = value_weights
    out = {}
    for sid in torch.unique(segment).tolist():
        rows = segment == sid
        sweep = sweep_global_weights({k: v[rows] for k, v in data.items()}, objectives, grid, depth, eta)
        value = v_click * sweep["ctr"] + (v_order * sweep["opm"] + v_gmv * sweep["gpm"]) / 1000.0
        out[int(sid)] = grid[int(value.argmax())]
    return out


def oracle_weights(data: dict[str, torch.Tensor], depth: int = 10, eta: ClickModel | float = 1.0,
                   value="orders", n_candidates: int = 256, seed: int = 0, chunk: int = 4096) -> torch.Tensor:
    """Per-request weights [N, K] maximising the true value under the world's click model ``eta`` (an
    eta = position-based), from the simulator's oracle.

    Needs the ground truth (true_ctr, true_cvr, price). ``value``: "clicks", "orders", "gmv" or
    the declared value's prices for raw GMV (grade.value.business.BusinessConfig.prices). Processed in
    chunks of requests to bound memory; chunk c uses seed + c so the result is deterministic.
    """
    n = data["mask"].shape[0]
    out = []
    for c, start in enumerate(range(0, n, chunk)):
        sl = slice(start, min(start + chunk, n))
        w, _ = simulator_oracle(data["z"][sl], data["true_ctr"][sl], data["true_cvr"][sl], data["price"][sl],
                                data["mask"][sl], depth=depth, eta=eta, value=value,
                                n_candidates=n_candidates, seed=int(seed) + c)
        out.append(torch.as_tensor(w, dtype=torch.float32))
    return torch.cat(out)
