"""The guardrails' controller and amounts (grade.value.guardrails), hand-computed."""

from __future__ import annotations

import pytest
import torch

from grade.value import guardrails
from grade.value.business import BusinessConfig
from grade.value.reward import RewardConfig


def _amounts(policy: list[float], static: list[float]) -> torch.Tensor:
    """[2, 3]: (clicks, orders, gmv) of the policy mean and of static."""
    return torch.tensor([policy, static], dtype=torch.float64)


def test_controller_raises_a_short_guardrail_and_frees_a_held_one():
    """Clicks 10% short of static, GMV 5% above: lambda_clicks = I + kp * 0.1, GMV's stays at 0."""
    state = guardrails.guard_controller((0.3, 0.0), _amounts([9.0, 2.0, 4.2], [10.0, 2.0, 4.0]),
                                        BusinessConfig(), margin=0.0, kp=2.0, lr=0.5)
    assert state.ratios == pytest.approx((0.9, 1.05))
    assert state.multipliers == pytest.approx((0.3 + 2.0 * 0.1, 0.0))
    assert state.integral == pytest.approx((0.3 + 0.5 * 0.1, 0.0))   # GMV's integral clipped at 0
    # price = lambda * V_static / A_static: declared orders, V_static = 2 orders -> 0.5 * 2 / 10 per click
    assert state.prices == pytest.approx((0.5 * 2.0 / 10.0, 0.0))
    rewarded = guardrails.guarded_value(BusinessConfig(), state)
    assert rewarded == BusinessConfig(clicks=pytest.approx(0.1), orders=1.0, gmv=0.0)


def test_controller_margin_moves_the_floor_and_a_held_guardrail_unwinds():
    """With a 10% margin, clicks at exactly static's are 10% short; a guardrail above its floor brings
    the integral back down, never below 0."""
    held = guardrails.guard_controller((0.0, 0.2), _amounts([10.0, 2.0, 4.8], [10.0, 2.0, 4.0]),
                                       BusinessConfig(), margin=0.1, kp=3.0, lr=1.0)
    assert held.multipliers == pytest.approx((0.3, 0.0))         # clicks: 0 + 3 * 0.1; GMV: 0.2 - 0.3 < 0
    assert held.integral == pytest.approx((0.1, 0.1))            # GMV: 0.2 + 1.0 * (1.1 - 1.2)
    assert guardrails.diagnostics(held)["guard/gmv_ratio"] == pytest.approx(1.2)


def _two_requests():
    """Two requests of three items, depth 2, theta (1, 0.5): weights (1, 0) rank item 0 then 1,
    weights (0, 1) item 2 then 1."""
    z = torch.tensor([[[3.0, 0.0], [2.0, 1.0], [0.0, 3.0]]] * 2)
    batch = {"z": z, "mask": torch.ones(2, 3, dtype=torch.bool)}
    model = torch.tensor([[[0.1, 0.01, 0.02], [0.2, 0.02, 0.01], [0.3, 0.03, 0.09]]] * 2)
    fields = {"logged_theta": torch.ones(2, 3), "label_kinds": torch.zeros(2, 3, 3), "model_kinds": model}
    return batch, fields, model, torch.tensor([1.0, 0.5, 0.25])


def test_request_amounts_are_the_direct_method_per_kind():
    batch, fields, model, theta = _two_requests()
    weights = torch.tensor([[[1.0, 0.0], [0.0, 1.0]]] * 2)
    amounts = guardrails.request_amounts(weights, batch, fields, theta, RewardConfig(), depth=2)
    expected = torch.stack([model[0, 0] + 0.5 * model[0, 1], model[0, 2] + 0.5 * model[0, 1]])
    assert amounts.shape == (2, 2, 3)
    assert torch.allclose(amounts, expected.expand(2, 2, 3), atol=1e-7)


def test_request_amounts_under_the_cascade_are_its_direct_method_per_kind():
    """With a cascade posterior the amounts are cascade_dm's: the second slot is examined with
    probability a c_click + (1 - a) c_skip of the item above it, whatever theta says."""
    batch, fields, model, theta = _two_requests()
    a = torch.tensor([[0.6, 0.3, 0.2]] * 2)
    fields = {**fields, "attraction": a, "continuation": torch.tensor([[0.5, 0.9]] * 2)}
    weights = torch.tensor([[[1.0, 0.0], [0.0, 1.0]]] * 2)
    reward = RewardConfig(post_estimator="cascade_dm")
    amounts = guardrails.request_amounts(weights, batch, fields, theta, reward, depth=2)
    below_0, below_2 = 0.6 * 0.5 + 0.4 * 0.9, 0.2 * 0.5 + 0.8 * 0.9
    expected = torch.stack([model[0, 0] + below_0 * model[0, 1], model[0, 2] + below_2 * model[0, 1]])
    assert torch.allclose(amounts, expected.expand(2, 2, 3), atol=1e-6)
    cached = guardrails.static_fields(torch.tensor([0.0, 1.0]), batch, fields, theta, reward, depth=2)
    assert torch.allclose(cached["static_kinds"], expected[1].expand(2, 3), atol=1e-6)


def test_static_amounts_read_from_the_fields_as_from_the_batch():
    """The static weights' amounts computed once as a value field give the reading computed per batch;
    snips, whose value of a request depends on its batch, gets no such field."""
    batch, fields, model, theta = _two_requests()
    mean = torch.tensor([[1.0, 0.0], [0.6, 0.4]])
    static = torch.tensor([0.0, 1.0])
    cached = guardrails.static_fields(static, batch, fields, theta, RewardConfig(), depth=2)
    assert torch.allclose(cached["static_kinds"], (model[0, 2] + 0.5 * model[0, 1]).expand(2, 3), atol=1e-7)
    args = (batch, fields, theta, BusinessConfig(), RewardConfig(), 2, (0.0, 0.0))
    per_batch = guardrails.read_guardrails(mean, static, *args)
    from_fields = guardrails.read_guardrails(mean, static, batch, {**fields, **cached}, *args[2:])
    assert from_fields.ratios == pytest.approx(per_batch.ratios, rel=1e-6)
    assert from_fields.multipliers == pytest.approx(per_batch.multipliers, rel=1e-6)
    # both means rank item 0 then 1: clicks 0.1 + 0.5 * 0.2, GMV 0.02 + 0.5 * 0.01; static's item 2 then 1
    assert per_batch.ratios == pytest.approx((0.2 / 0.4, 0.025 / 0.095), rel=1e-6)
    snips = RewardConfig(post_estimator="snips")
    assert guardrails.static_fields(static, batch, fields, theta, snips, depth=2) == {}
