"""Baselines: static = product of predictions, logged order, best_static search, the oracle wrapper."""

from __future__ import annotations

import pytest
import torch

from grade.data.fusion import fuse, simplex_grid, top_e
from grade.value import baselines


def test_static_weights_rank_by_the_product_of_predictions():
    spec = {"pred_log_mean": [-3.0, -4.0, 3.5], "pred_log_std": [0.5, 1.5, 1.0]}
    w = baselines.static_weights(spec)
    assert w.tolist() == pytest.approx([0.5 / 3, 1.5 / 3, 1.0 / 3])
    g = torch.Generator().manual_seed(0)
    pred = torch.rand(64, 20, 3, generator=g) + 1e-3
    m, s = torch.tensor(spec["pred_log_mean"]), torch.tensor(spec["pred_log_std"])
    z = (pred.log() - m) / s
    by_static = top_e(fuse(z, w.expand(64, -1)), 20)
    by_product = torch.argsort(pred.prod(-1), dim=-1, descending=True, stable=True)
    assert torch.equal(by_static, by_product)


def test_logged_scores_reproduce_positions_and_put_padding_last():
    data = {"position": torch.tensor([[2, 0, 1, -1]]), "mask": torch.tensor([[True, True, True, False]])}
    assert top_e(baselines.logged_scores(data), 4).tolist() == [[1, 2, 0, 3]]


def _train(n: int = 800, seed: int = 0) -> dict[str, torch.Tensor]:
    """Orders follow signal 1 much more than signal 0: the best global weights lean on signal 1."""
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(n, 10, 2, generator=g)
    utility = 0.3 * z[..., 0] + 1.5 * z[..., 1] + 0.5 * torch.randn(n, 10, generator=g)
    order = (utility == utility.max(-1, keepdim=True).values).float() * (torch.rand(n, 1, generator=g) < 0.5)
    mask = torch.ones(n, 10, dtype=torch.bool)
    return {"z": z, "mask": mask, "order": order, "click": order, "gmv": order * 10}


def test_best_static_beats_static_on_its_train_objective_and_is_deterministic():
    spec = {"pred_log_std": [1.0, 1.0]}
    train = _train()
    search = {"depth": 5, "objective": "ndcg_order", "iterations": 5, "population": 16, "seed": 3}
    res = baselines.best_static(train, spec, **search)
    again = baselines.best_static(train, spec, **search)
    assert torch.equal(res.weights, again.weights)
    assert res.objective >= res.static_objective
    assert res.objective > res.static_objective + 0.01  # (0.5, 0.5) is clearly improvable here
    assert res.weights[1] > res.weights[0]
    assert res.weights.sum().item() == pytest.approx(1.0, abs=1e-6)
    # Only the requests with an order are scored; the reported objective matches a recomputation.
    with_order = (train["order"] > 0).any(-1)
    assert res.n_requests == int(with_order.sum())
    direct = baselines.replay_objective(train["z"][with_order], train["mask"][with_order],
                                        train["order"][with_order], res.weights.unsqueeze(0), 5)
    assert direct.item() == pytest.approx(res.objective)
    assert [h["iteration"] for h in res.history] == list(range(5))


def test_best_static_with_no_iterations_is_static_and_bad_objective_is_refused():
    spec = {"pred_log_std": [1.0, 3.0]}
    res = baselines.best_static(_train(200), spec, depth=5, objective="ndcg_order", iterations=0)
    assert res.weights.tolist() == pytest.approx([0.25, 0.75])
    with pytest.raises(ValueError):
        baselines.best_static(_train(50), spec, objective="revenue")
    from grade.core.errors import InputError
    from grade.value.reward import RewardConfig

    with pytest.raises(InputError, match="post_click, post_order or post_gmv"):
        baselines.best_static(_train(50), spec,
                              reward=RewardConfig(post_estimator="dcg_ips", post_click=0.0, post_order=0.0,
                                                  post_gmv=0.0))
    no_positive = {**_train(50), "order": torch.zeros(50, 10), "click": torch.zeros(50, 10),
                   "gmv": torch.zeros(50, 10), "position": torch.zeros(50, 10, dtype=torch.long)}
    res = baselines.best_static(no_positive, {**spec, "objectives": ["ctr", "cvr"]}, depth=5, iterations=2)
    assert res.weights.tolist() == pytest.approx([0.25, 0.75])
    assert res.n_requests == 0 and res.objective == 0.0


def test_posterior_search_maximises_stage2_posterior_reward():
    """The default objective: Stage 2's posterior (here orders only), over every request with a positive."""
    from grade.value.reward import RewardConfig

    spec = {"pred_log_std": [1.0, 1.0], "objectives": ["ctr", "cvr"]}
    train = _train()
    train["position"] = torch.arange(10).expand(800, 10).clone()
    reward = RewardConfig(post_estimator="dcg_ips", post_click=0.0, post_gmv=0.0)
    res = baselines.best_static(train, spec, depth=5, iterations=5, population=16, seed=3, reward=reward)
    assert res.objective > res.static_objective + 0.01 and res.weights[1] > res.weights[0]
    with_order = (train["order"] > 0).any(-1)
    assert res.n_requests == int(with_order.sum())
    subset = {k: v[with_order] for k, v in train.items()}
    direct = baselines.posterior_objective(subset, spec["objectives"], res.weights.unsqueeze(0), reward, 5)
    assert direct.item() == pytest.approx(res.objective)


def test_posterior_objective_by_hand():
    """Two requests, one order each at logged positions 0 and 3 (weights 1 and 4), top-1 exposure.

    Weights (1, 0) put the shallow order on top in request 0 only; (0, 1) the deep one in request 1 only.
    The normaliser is the mean ideal DCG (1 + 4) / 2 = 2.5: the values are (1 / 2.5) / 2 and (4 / 2.5) / 2.
    """
    from grade.value.reward import RewardConfig

    z = torch.tensor([[[1.0, 0.0], [0.0, 1.0]], [[1.0, 0.0], [0.0, 1.0]]])
    data = {"z": z, "mask": torch.ones(2, 2, dtype=torch.bool),
            "order": torch.tensor([[1.0, 0.0], [0.0, 1.0]]), "click": torch.zeros(2, 2),
            "gmv": torch.zeros(2, 2), "position": torch.tensor([[0, 1], [1, 3]])}
    reward = RewardConfig(post_estimator="dcg_ips", post_click=0.0, post_gmv=0.0)
    vals = baselines.posterior_objective(data, ["ctr", "cvr"], torch.tensor([[1.0, 0.0], [0.0, 1.0]]),
                                         reward, 1)
    assert vals.tolist() == pytest.approx([0.2, 0.8])


def test_replay_objective_by_hand():
    # One request, 3 items, order on item 2. Weights (1, 0) rank by z0: 0, 1, 2 -> NDCG@3 = 1/log2(4) = 0.5
    z = torch.tensor([[[3.0, 1.0], [2.0, 2.0], [1.0, 3.0]]])
    mask = torch.ones(1, 3, dtype=torch.bool)
    order = torch.tensor([[0.0, 0.0, 1.0]])
    vals = baselines.replay_objective(z, mask, order, torch.tensor([[1.0, 0.0], [0.0, 1.0]]), depth=3)
    assert vals.tolist() == pytest.approx([0.5, 1.0])


def test_oracle_wrapper_passes_the_truth_in_chunks_with_distinct_seeds(monkeypatch):
    calls = []

    def fake_oracle(signals, true_ctr, true_cvr, price, mask, depth, eta, value, n_candidates, seed):
        calls.append((signals.shape[0], depth, eta, value, n_candidates, seed))
        return torch.full((signals.shape[0], signals.shape[-1]), float(seed)), torch.zeros(signals.shape[0])

    monkeypatch.setattr(baselines, "simulator_oracle", fake_oracle)
    n = 10
    data = {"z": torch.zeros(n, 4, 3), "true_ctr": torch.zeros(n, 4), "true_cvr": torch.zeros(n, 4),
            "price": torch.zeros(n, 4), "mask": torch.ones(n, 4, dtype=torch.bool)}
    w = baselines.oracle_weights(data, depth=3, eta=0.5, value="gmv", n_candidates=7, seed=100, chunk=4)
    assert [c[0] for c in calls] == [4, 4, 2]
    assert {c[1:5] for c in calls} == {(3, 0.5, "gmv", 7)}
    assert w[:, 0].tolist() == [100.0] * 4 + [101.0] * 4 + [102.0] * 2


def _two_segment_market(n: int = 400, seed: int = 0) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Segment 0 orders what signal 0 predicts, segment 1 what signal 1 predicts (price 1)."""
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(n, 8, 2, generator=g)
    segment = torch.arange(n) % 2
    driver = torch.where(segment.unsqueeze(1) == 0, z[..., 0], z[..., 1])
    data = {"z": z, "mask": torch.ones(n, 8, dtype=torch.bool), "true_ctr": torch.sigmoid(2 * driver),
            "true_cvr": torch.full((n, 8), 0.5), "price": torch.ones(n, 8)}
    return data, segment


def test_segment_best_weights_follow_each_segment_with_the_truth():
    data, segment = _two_segment_market()
    best = baselines.segment_best_weights(data, ["ctr", "cvr"], segment, (0.0, 1.0, 0.0), depth=3, eta=1.0,
                                          steps=4)
    assert best[0].tolist() == [1.0, 0.0] and best[1].tolist() == [0.0, 1.0]


def test_constrained_objective_ranks_every_feasible_vector_above_every_infeasible_one():
    """Hand-computed: value, then guardrails with floors (2, 10); penalty 100 per unit of relative
    shortfall."""
    amounts = torch.tensor([[5.0, 2.0, 10.0],    # feasible (on both floors)
                            [9.0, 1.0, 12.0],    # clicks 50% short: 9 - 100 * 0.5
                            [1.0, 3.0, 11.0],    # feasible, low value
                            [9.0, 1.9, 9.0]],    # 5% and 10% short: 9 - 100 * 0.15
                           dtype=torch.float64)
    score = baselines.constrained_objective(amounts, torch.tensor([2.0, 10.0], dtype=torch.float64), 100.0)
    assert torch.allclose(score, torch.tensor([5.0, -41.0, 1.0, -6.0], dtype=torch.float64))
    assert torch.argsort(score, descending=True).tolist() == [0, 2, 3, 1]


def test_constrained_search_keeps_the_guardrails_that_the_free_search_trades_away():
    """One segment orders what signal 0 predicts; GMV comes with signal 1. The free search puts the weight
    on signal 0 and loses GMV against static; the constrained one keeps GMV at static's, pays in orders."""
    from grade.value import auction

    data, segment = _two_segment_market()
    data = {k: v[segment == 0] for k, v in data.items()}
    n = data["mask"].shape[0]
    theta = 1.0 / (1.0 + torch.arange(3, dtype=torch.float64))
    orders = (data["true_ctr"] * data["true_cvr"]).double()
    gmv = orders * torch.exp(2 * data["z"][..., 1]).double()
    zeros = torch.zeros(n, 8, dtype=torch.float64)
    est = auction.EstimatorInputs("dm", theta, torch.ones(n, 8, dtype=torch.float64),
                                  {"value": zeros, "clicks": zeros, "gmv": zeros},
                                  {"value": orders, "clicks": data["true_ctr"].double(), "gmv": gmv})
    train = {**data, "click": torch.zeros(n, 8), "order": torch.zeros(n, 8), "gmv": torch.zeros(n, 8)}
    spec = {"objectives": ["ctr", "cvr"], "pred_log_std": [1.0, 1.0]}
    search = dict(depth=3, objective="estimated", iterations=5, population=24, estimated=est, seed=0)
    free = baselines.best_static(train, spec, **search)
    held = baselines.best_static(train, spec, guard_margin=0.0, **search)
    keys = ("value", "clicks", "gmv")
    candidates = torch.stack([torch.tensor([0.5, 0.5]), free.weights, held.weights])
    at = baselines.estimated_objective(data, candidates, est, depth=3, keys=keys)
    static, free_at, held_at = at
    assert free_at[2] < static[2]                       # the free search trades GMV away
    assert held_at[1] >= static[1] and held_at[2] >= static[2]   # the constrained one does not
    assert static[0] <= held_at[0] < free_at[0]         # and pays for it in orders, never below static
    assert held.objective == pytest.approx(float(held_at[0]), rel=1e-9)


def test_estimated_objective_with_exact_outcomes_is_the_true_value_and_the_search_finds_it():
    """DM with the true expected order per examined item: the objective equals the true value per request."""
    from grade.value import auction

    data, segment = _two_segment_market()
    data = {k: v[segment == 0] for k, v in data.items()}  # one segment: the best global vector is (1, 0)
    n = data["mask"].shape[0]
    theta = 1.0 / (1.0 + torch.arange(3, dtype=torch.float64))
    m = (data["true_ctr"] * data["true_cvr"]).double()
    est = auction.EstimatorInputs("dm", theta, torch.ones(n, 8, dtype=torch.float64),
                                  {"value": torch.zeros(n, 8, dtype=torch.float64)}, {"value": m})
    grid = simplex_grid(2, 4)
    value = baselines.estimated_objective(data, grid, est, depth=3)[:, 0]
    true_opm = auction.sweep_global_weights(data, ["ctr", "cvr"], grid, depth=3, eta=1.0)["opm"]
    impressions_per_request = float(theta.sum())
    assert torch.allclose(value, true_opm / 1000 * impressions_per_request, rtol=1e-5)
    train = {**data, "click": torch.zeros(n, 8), "order": torch.zeros(n, 8), "gmv": torch.zeros(n, 8)}
    spec = {"objectives": ["ctr", "cvr"], "pred_log_std": [1.0, 1.0]}
    found = baselines.best_static(train, spec, depth=3, objective="estimated", iterations=4, population=16,
                                  estimated=est, seed=0)
    assert found.objective >= float(value.max()) - 1e-3 and found.weights[0] > 0.8
