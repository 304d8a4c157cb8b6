"""The estimator check's pure functions on hand-made reports and values."""

from __future__ import annotations

import pytest
import torch

from grade.data.fusion import simplex_grid
from grade.evaluate.estimator_check import add_weight_level, grid_values, policy_check, segment_picks
from grade.value import auction


def _lift(v: float, lo: float, hi: float) -> dict:
    return {"lift": v, "ci_low": lo, "ci_high": hi}


def test_policy_check_by_hand():
    policies = {"static": {"true": {"opm": 10.0}, "estimated": {"opm": 11.0}},
                "a": {"true": {"opm": 12.0}, "estimated": {"opm": 12.5}},
                "b": {"true": {"opm": 10.1}, "estimated": {"opm": 10.0}},
                "c": {"true": {"opm": 9.0}, "estimated": {"opm": 13.0}}}
    lifts = {"a": {"true": {"opm": _lift(0.2, 0.2, 0.2)}, "estimated": {"opm": _lift(0.136, 0.1, 0.25)}},
             "b": {"true": {"opm": _lift(0.01, 0, 0)}, "estimated": {"opm": _lift(-0.09, -0.2, 0.0)}},
             "c": {"true": {"opm": _lift(-0.1, 0, 0)}, "estimated": {"opm": _lift(0.18, 0.1, 0.3)}}}
    out = policy_check(policies, lifts, "opm")
    assert out["policies"]["a"]["covered"] and not out["policies"]["b"]["covered"]
    assert not out["policies"]["c"]["covered"]
    assert out["covered_share"] == pytest.approx(1 / 3)
    assert "covered" not in out["policies"]["static"] and out["policies"]["static"]["estimated"] == 11.0
    # pairs whose true OPM differs by > 2%: all but static-b (10 vs 10.1) -> 5; wrong: a-c, b-c, c-static
    order = out["ordering"]
    assert order["pairs"] == 5 and order["agreeing"] == 2 and not order["agrees"]
    assert sorted(map(tuple, order["disagreements"])) == [("a", "c"), ("b", "c"), ("c", "static")]


def test_weight_level_forms_join_the_check_by_hand():
    policies = {"static": {"true": {"opm": 10.0}, "estimated": {"opm": 11.0}},
                "a": {"true": {"opm": 12.0}, "estimated": {"opm": 12.5}},
                "b": {"true": {"opm": 10.1}, "estimated": {"opm": 10.0}}}
    lifts = {"a": {"true": {"opm": _lift(0.2, 0.2, 0.2)}, "estimated": {"opm": _lift(0.25, 0.22, 0.3)}},
             "b": {"true": {"opm": _lift(0.01, 0, 0)}, "estimated": {"opm": _lift(-0.09, -0.2, 0.0)}}}
    check = policy_check(policies, lifts, "opm")
    weight_level = {"lift_vs_static": {
        "weight_dr": {"static": _lift(0.0, 0.0, 0.0), "a": _lift(0.18, 0.1, 0.3),
                      "b": _lift(0.05, 0.02, 0.08)},
        "weight_ips": {"a": _lift(0.5, 0.3, 0.9), "b": {**_lift(0.01, -0.5, 0.5), "unsupported": True}}}}
    add_weight_level(check, weight_level, lifts, "opm")
    rows = check["policies"]
    assert rows["a"]["weight_dr"]["covered"] and not rows["b"]["weight_dr"]["covered"]
    assert check["policies"]["a"]["weight_dr"]["estimated_lift"] == 0.18
    assert "weight_dr" not in check["policies"]["static"]
    assert check["weight_level_covered_share"] == {"weight_dr": 0.5, "weight_ips": 0.0}   # b: unsupported
    assert rows["b"]["weight_ips"] == {"estimated_lift": 0.01, "unsupported": True}
    assert check["covered_share"] == 0.0      # the estimated flavour's own column is unchanged
    empty: dict = {}
    add_weight_level(empty, weight_level, lifts, "opm")
    assert empty == {}


def test_segment_picks_by_hand():
    grid = torch.tensor([[1.0, 0.0], [0.5, 0.5], [0.0, 1.0]])
    values = {"true": torch.tensor([[1.0, 2.0, 4.0], [3.0, 1.0, 0.0]], dtype=torch.float64),
              "ips": torch.tensor([[0.0, 5.0, 1.0], [2.0, 0.0, 0.0]], dtype=torch.float64)}
    out = segment_picks(values, grid, {0: "browser", 1: "buyer"})
    assert out["browser"]["best"] == {"weights": [0.0, 1.0], "true_value": 4.0}
    assert out["browser"]["ips"]["weights"] == [0.5, 0.5]
    assert out["browser"]["ips"]["share"] == pytest.approx(0.5)
    assert out["buyer"]["ips"]["share"] == pytest.approx(1.0)


def test_grid_values_with_exact_outcomes_pick_the_true_best():
    """The direct method with the true expected item value ranks grid vectors exactly as the truth does."""
    gen = torch.Generator().manual_seed(0)
    n, length = 200, 6
    z = torch.randn(n, length, 2, generator=gen)
    mask = torch.ones(n, length, dtype=torch.bool)
    ctr = torch.sigmoid(z[..., 0] - 1)
    cvr = torch.sigmoid(z[..., 1] - 1)
    price = torch.ones(n, length)
    segment = torch.randint(0, 2, (n,), generator=gen)
    data = {"z": z, "mask": mask, "true_ctr": ctr, "true_cvr": cvr, "price": price}
    theta = 1.0 / (1.0 + torch.arange(3, dtype=torch.float64))
    m = (ctr * cvr).double()
    est = auction.EstimatorInputs("dm", theta, torch.ones(n, length, dtype=torch.float64),
                                  {"value": torch.zeros(n, length, dtype=torch.float64)}, {"value": m})
    grid = simplex_grid(2, 4)
    values = grid_values(data, grid, segment, 2, {"dm": est}, (0.0, 1.0, 0.0), depth=3, eta=1.0)
    assert torch.allclose(values["dm"], values["true"])
    picks = segment_picks(values, grid, {0: "s0", 1: "s1"})
    assert all(p["dm"]["share"] == pytest.approx(1.0) for p in picks.values())
