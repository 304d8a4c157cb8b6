"""pipeline.stress: each run's config, the truncated logs, the table, the command line."""

import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from pipeline import stress


def test_a_run_is_the_base_with_its_condition_its_seed_and_a_truth_free_gate():
    base = {"simulator": {"n_requests": 6000, "seed": 9}, "promote": {"min_lift": 0.0}}
    cfg = stress.run_config(base, "cascade_page20", 2)
    assert cfg["simulator"] == {"n_requests": 6000, "seed": 2, "click_model": "cascade", "page_size": 20}
    assert cfg["shared"] == {"seed": 2}
    assert cfg["promote"] == {"min_lift": 0.0, "primary_flavour": "estimated"}
    assert stress.run_config(base, "small_5000", 0)["simulator"]["n_requests"] == 5000
    assert base["simulator"]["seed"] == 9, "the base config is not changed"


def test_truncated_logs_keep_the_top_positions_only(tmp_path):
    from grade.data import simulator
    from grade.data.raw_logs import list_log_files

    logs, top = str(tmp_path / "logs"), str(tmp_path / "top")
    simulator.write_logs(simulator.SimulatorConfig(n_requests=200, n_users=100, list_size=20, n_days=2), logs)
    stress.truncate(logs, top, keep=10)
    tables = [pq.read_table(f, partitioning=None) for f in list_log_files(top)]
    assert sum(t.num_rows for t in tables) == 200 * 10
    assert all(pc.max(t["position"]).as_py() == 9 for t in tables)
    assert stress.truncate(logs, top, keep=10) == top, "a re-run keeps the published logs"


def _cells(lift, low):
    return {m: {"lift": lift, "ci_low": low, "ci_high": lift + 0.1} for m in ("opm", "gpm", "ctr")}


def test_the_table_names_each_run_and_marks_a_harmful_promotion():
    rows = [{"condition": "own_ranking", "seed": 1, "verdict": "promoted", "truth_gate": "not blessed",
             "reasons": ["every check passed"], "estimated_lift": _cells(0.3, 0.1),
             "true_lift": _cells(-0.02, -0.05), "harmful": True}]
    text = stress.table(rows)
    assert "| own_ranking | 1 | promoted | not blessed |" in text and "| YES |" in text


@pytest.mark.parametrize("argv, message", [
    (["--conditions", "sunny_day"], "--conditions"),
    (["--seeds", "one"], "--seeds"),
])
def test_bad_arguments_exit_2_naming_them(tmp_path, capsys, argv, message):
    from grade.core import cli

    assert cli.run(stress.main, [*argv, "--out", str(tmp_path / "out")]) == 2
    assert message in capsys.readouterr().err


def test_harm_is_an_opm_interval_reaching_zero_or_a_guardrail_below_one_percent():
    assert not stress.is_harmful(_cells(0.2, 0.05))
    assert stress.is_harmful(_cells(0.2, 0.0))
    worse_gmv = _cells(0.2, 0.05)
    worse_gmv["gpm"] = {"lift": -0.011, "ci_low": -0.03, "ci_high": 0.01}
    assert stress.is_harmful(worse_gmv)
    worse_gmv["gpm"]["lift"] = -0.009
    assert not stress.is_harmful(worse_gmv)
