"""Examination estimation: recovers the simulator's position bias; the result's shape and helpers."""

from __future__ import annotations

import math

import pytest
import torch

from grade.core.errors import InputError
from grade.data.simulator import SimulatorConfig
from grade.value.examination import ExaminationConfig, ExaminationEstimate, estimate_examination
from tests.sim_tensors import simulated_batch


@pytest.mark.parametrize("eta", [0.6, 1.0, 1.4])
def test_power_law_eta_is_recovered_from_simulated_logs(eta):
    batch = simulated_batch(SimulatorConfig(seed=3, n_requests=1500, n_users=400, position_bias=eta))
    est = estimate_examination(batch, ExaminationConfig(depth=8))
    assert abs(est.eta - eta) <= 0.1, est.to_json()
    assert est.converged["power"] and est.n_clicks == int(batch["click"].sum())
    # the free curve follows the same law: theta_3 = 4^-eta within the noise of ~1500 requests
    assert abs(est.theta_free[3] - 4.0 ** -eta) < 0.1, est.theta_free
    assert est.theta[0] == 1.0 and est.theta == est.theta_power


def test_free_method_reports_the_free_curve_and_is_deterministic():
    batch = simulated_batch(SimulatorConfig(seed=1, n_requests=300, n_users=100, position_bias=1.0))
    cfg = ExaminationConfig(method="free", depth=5, max_rows=10_000, seed=4)
    a, b = estimate_examination(batch, cfg), estimate_examination(batch, cfg)
    assert a.to_json() == b.to_json()
    assert a.theta == a.theta_free and len(a.theta) == 5 and a.n_rows == 10_000
    assert all(0 < t <= 1 for t in a.theta) and math.isfinite(a.log_likelihood["free"])


def test_theta_at_uses_the_free_table_inside_the_depth_and_the_power_law_beyond():
    est = ExaminationEstimate("free", 1.0, [1.0, 0.4], [1.0, 0.5], [1.0, 0.4], 0, 0, {}, {})
    got = est.theta_at(torch.tensor([[0, 1, 3, -1]]))
    torch.testing.assert_close(got, torch.tensor([[1.0, 0.4, 0.25, 0.0]]))
    fixed = ExaminationEstimate.fixed(2.0, 3)
    assert fixed.theta == [1.0, 0.25, 1.0 / 9.0] and fixed.method == "fixed"
    torch.testing.assert_close(fixed.theta_at(torch.tensor([1, 4])), torch.tensor([0.25, 0.04]))


def test_logs_without_clicks_are_refused():
    batch = simulated_batch(SimulatorConfig(seed=0, n_requests=20, n_users=10))
    batch["click"] = torch.zeros_like(batch["click"])
    with pytest.raises(InputError, match="need clicks"):
        estimate_examination(batch)


def test_clicks_at_one_position_only_are_refused_naming_it_and_the_way_out():
    """Every click at the top: theta below it would be fitted to ~0 (eta in the tens), not estimated."""
    batch = simulated_batch(SimulatorConfig(seed=0, n_requests=300, n_users=100))
    batch["click"] = torch.where(batch["position"] == 0, batch["click"], torch.zeros_like(batch["click"]))
    assert int(batch["click"].sum()) > 0
    with pytest.raises(InputError, match="every logged click is at position 0.*eta_mode: fixed"):
        estimate_examination(batch)


def test_bad_config_is_refused():
    with pytest.raises(InputError, match="examination.method"):
        ExaminationConfig(method="cascade").validate()
