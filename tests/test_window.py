"""Scheduled retraining on a rolling window: schedule time -> the partitions of a {date} pattern, on a
simulated multi-day prefix (the simulator writes day=YYYY-MM-DD partitions)."""

from __future__ import annotations

import datetime as dt
import json
import logging
from pathlib import Path

import pytest
import yaml

from components import window as window_cli
from grade.core import cli, store
from grade.core.errors import InputError
from grade.data import window
from grade.data.features import FeaturesConfig, extract_features, list_log_files
from grade.data.simulator import SimulatorConfig, write_logs

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def days(tmp_path_factory):
    """Four daily partitions, 2026-01-01 .. 2026-01-04, and their {date} pattern."""
    logs = str(tmp_path_factory.mktemp("window") / "logs")
    write_logs(SimulatorConfig(n_requests=400, n_users=100, n_items=1500, n_days=4, start_date="2026-01-01",
                               list_size=20), logs)
    return logs, f"{logs}/day={{date}}"


def at(text: str) -> dt.datetime:
    return dt.datetime.fromisoformat(text).replace(tzinfo=dt.timezone.utc)


def test_an_unresolved_placeholder_means_now_and_says_so(caplog):
    now = at("2026-01-09T05:00:00")
    with caplog.at_level(logging.WARNING, logger="grade.data.window"):
        assert window.schedule_time("{{$.pipeline_job_schedule_time_utc}}", now) == now
    assert "not resolved" in caplog.text
    assert window.schedule_time("", now) == now
    assert window.schedule_time("2026-01-04T23:30:00Z", now) == at("2026-01-04T23:30:00")
    # another zone is converted: 01:30 in UTC+2 is the previous day in UTC
    assert window.schedule_time("2026-01-05T01:30:00+02:00", now).date() == dt.date(2026, 1, 4)
    with pytest.raises(InputError, match="schedule time 'yesterday'"):
        window.schedule_time("yesterday")


def test_the_window_takes_the_days_up_to_the_schedule_date_and_reports_missing_ones(days):
    logs, pattern = days
    w = window.resolve(pattern, at("2026-01-05T02:00:00"), 3)
    assert (w.start, w.end) == (dt.date(2026, 1, 3), dt.date(2026, 1, 5))
    assert w.present == [f"{logs}/day=2026-01-03", f"{logs}/day=2026-01-04"]
    assert w.missing == ["2026-01-05"]
    assert "2 of 3 days" in w.describe() and "missing 2026-01-05" in w.describe()
    whole = window.resolve(pattern, at("2026-01-04T00:00:00"), 4)
    assert len(whole.present) == 4 and not whole.missing


def test_features_read_exactly_the_window(days, tmp_path):
    logs, pattern = days
    w = window.resolve(pattern, at("2026-01-04T12:00:00"), 2)
    spec = extract_features(w.present, str(tmp_path / "feats"), FeaturesConfig())
    assert spec["input"]["files"] == len(list_log_files(w.present))
    window_requests = sum(info["n_requests"] for info in spec["splits"].values())
    everything = extract_features(logs, str(tmp_path / "all"), FeaturesConfig())
    assert 0 < window_requests < sum(info["n_requests"] for info in everything["splits"].values())
    first, last = spec["split_boundaries"]["valid_start_iso"], spec["split_boundaries"]["test_start_iso"]
    assert first >= "2026-01-03" and last < "2026-01-05"


def test_an_empty_window_or_a_bad_window_is_bad_input(days, tmp_path, capsys):
    logs, pattern = days
    rc = cli.run(window_cli.main, ["--logs", pattern, "--window-days", "3", "--schedule-time", "2026-02-01"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "no log files in the 3-day window 2026-01-30..2026-02-01" in err[0]
    assert cli.run(window_cli.main, ["--logs", pattern, "--window-days", "0"]) == 2
    assert cli.run(window_cli.main, ["--logs", logs, "--window-days", "3"]) == 2
    out = tmp_path / "w.json"
    assert cli.run(window_cli.main, ["--logs", pattern, "--window-days", "2", "--schedule-time",
                                     "2026-01-02T10:00:00Z", "--out", str(out)]) == 0
    assert json.loads(out.read_text())["present"] == [f"{logs}/day=2026-01-01", f"{logs}/day=2026-01-02"]


def test_the_compiled_window_step_is_never_cached_and_feeds_the_features_cache_key():
    spec = next(yaml.safe_load_all((ROOT / "pipeline.yaml").read_text()))
    tasks = {name: t for c in spec["components"].values() if "dag" in c
             for name, t in c["dag"]["tasks"].items()}
    assert not tasks["window"].get("cachingOptions", {}).get("enableCache")
    params = tasks["window"]["inputs"]["parameters"]
    placeholder = params["backend_schedule_time"]["runtimeValue"]["constant"]
    assert placeholder == "{{$.pipeline_job_schedule_time_utc}}"
    features = tasks["features-2"]
    assert features["cachingOptions"]["enableCache"]
    produced = features["inputs"]["parameters"]["logs_uris"]["taskOutputParameter"]
    assert produced == {"outputParameterKey": "partitions", "producerTask": "window"}


@pytest.mark.slow
def test_run_local_trains_on_the_window_of_its_schedule_time(days, tmp_path):
    from grade.model.registry import Registry
    from pipeline import run_local
    from tests.test_pipeline_local import LENIENT_GATE, small_config

    logs, pattern = days
    cfg = small_config(tmp_path, promote=LENIENT_GATE)
    result = run_local.run_local(cfg, tmp_path / "out", logs=pattern, window_days=3,
                                 schedule_time="2026-01-05T02:00:00Z", snapshot_date="2026-01-05",
                                 verbose=False)
    assert result["logs"].endswith("[2026-01-03..2026-01-05: 2 of 3 days, missing 2026-01-05]")
    spec = store.read_json(str(next(result["run_dir"].glob("features*/features")) / "feature_spec.json"))
    assert spec["input"]["files"] == len(list_log_files([f"{logs}/day=2026-01-03", f"{logs}/day=2026-01-04"]))
    registry = Registry(result["registry"], "grade-mtf")
    version = registry.production()[0]["version"]
    assert registry.lineage(version)["data_uri"] == f"{result['logs']}@2026-01-05"
    # the terminal log names the window's days
    assert "window" in result["runner_log"].read_text()
