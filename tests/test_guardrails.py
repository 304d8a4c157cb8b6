"""The guardrails' controller and amounts (grade.guardrails), hand-computed."""

from __future__ import annotations

import pytest
import torch

from grade import guardrails
from grade.business import BusinessConfig
from grade.reward import RewardConfig


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


def test_batch_amounts_are_the_direct_method_per_kind():
    """Two requests of three items, depth 2, theta (1, 0.5): the policy and static rank differently."""
    z = torch.tensor([[[3.0, 0.0], [2.0, 1.0], [0.0, 3.0]]] * 2)
    batch = {"z": z, "mask": torch.ones(2, 3, dtype=torch.bool)}
    model = torch.tensor([[[0.1, 0.01, 0.02], [0.2, 0.02, 0.01], [0.3, 0.03, 0.09]]] * 2)
    fields = {"logged_theta": torch.ones(2, 3), "label_kinds": torch.zeros(2, 3, 3), "model_kinds": model}
    weights = torch.tensor([[[1.0, 0.0], [0.0, 1.0]]] * 2)   # policy: item 0 then 1; static: item 2 then 1
    theta = torch.tensor([1.0, 0.5, 0.25])
    sums = guardrails.batch_amounts(weights, batch, fields, theta, RewardConfig(), depth=2)
    expected = 2 * torch.stack([model[0, 0] + 0.5 * model[0, 1], model[0, 2] + 0.5 * model[0, 1]])
    assert torch.allclose(sums, expected.double(), atol=1e-7)
