"""The log contract's optional served columns (served_w_<objective>, served_log_propensity,
model_version): validated by the features step (exit 2 naming file, column and row) and carried into
the request shards."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from grade.data.dataset import load_split
from grade.data.raw_logs import hash_strings
from tests.test_features import make_logs, run_cli, shards, write_logs

OBJECTIVES = ("ctr", "cvr", "gmv")


def served_logs(n_requests: int = 40, seed: int = 0) -> pd.DataFrame:
    """make_logs with served weights per request (one value per request), a log-propensity on every
    other request (null on the rest: served the mean) and two model versions."""
    df = make_logs(n_requests, seed=seed)
    rng = np.random.default_rng(seed + 1)
    req = df.request_id.to_numpy() - 1000
    w = rng.dirichlet([2.0, 3.0, 4.0], n_requests).astype(np.float32)
    for k, o in enumerate(OBJECTIVES):
        df[f"served_w_{o}"] = w[req, k]
    logp = rng.normal(1.0, 0.5, n_requests).astype(np.float32)
    df["served_log_propensity"] = pd.array(np.where(req % 2 == 0, logp[req], np.nan), dtype="Float32")
    df.loc[req % 2 == 1, "served_log_propensity"] = pd.NA
    df["model_version"] = np.where(req < n_requests // 2, "v0001", "v0002")
    return df


def test_served_columns_are_carried_into_the_request_shards(tmp_path, capsys):
    df = served_logs(40)
    logs, out = write_logs(tmp_path / "logs", df), tmp_path / "out"
    rc, err = run_cli(["--logs", str(logs), "--out", str(out)], capsys)
    assert rc == 0, err
    firsts = df.drop_duplicates("request_id").set_index("request_id")
    seen = 0
    for split in ("train", "valid", "test"):
        t = shards(out, split)
        rows = firsts.loc[t["request_id"]]
        np.testing.assert_array_equal(t["served_w"], rows[[f"served_w_{o}" for o in OBJECTIVES]].to_numpy())
        expected = rows["served_log_propensity"].to_numpy(dtype=np.float32, na_value=np.nan)
        np.testing.assert_array_equal(np.isnan(t["served_log_propensity"]), np.isnan(expected))
        np.testing.assert_array_equal(t["served_log_propensity"][~np.isnan(expected)],
                                      expected[~np.isnan(expected)])
        names = pa.array(rows["model_version"].tolist())
        np.testing.assert_array_equal(t["model_version"], hash_strings(names))
        loaded = load_split(str(out), split)  # the default fields include the served ones
        assert {"served_w", "served_log_propensity", "model_version"} <= set(loaded)
        seen += len(t["request_id"])
    assert seen == 40
    import json
    spec = json.loads((out / "feature_spec.json").read_text())
    versions = {n for s in spec["splits"].values() for n in s["model_versions"].values()}
    assert versions == {"v0001", "v0002"}
    assert spec["splits"]["train"]["served_fields"] == ["served_w", "served_log_propensity", "model_version"]


def _set(col, row, value):
    def mutate(df):
        df = df.astype({col: "float64"}) if col == "served_log_propensity" else df
        df.loc[row, col] = value
        return df
    return mutate


def _drop(col):
    return lambda df: df.drop(columns=[col])


def _nan_propensity(row):
    """A NaN (not a null: pandas would write a null) log-propensity at ``row``."""
    def mutate(df):
        t = pa.Table.from_pandas(df, preserve_index=False)
        values = t["served_log_propensity"].to_numpy(zero_copy_only=False).astype(np.float32)
        values[row] = np.nan
        i = t.schema.get_field_index("served_log_propensity")
        return t.set_column(i, "served_log_propensity", pa.array(values, pa.float32(), from_pandas=False))
    return mutate


def _propensity_without_weights(df):
    return df.drop(columns=[f"served_w_{o}" for o in OBJECTIVES])


BAD = [
    ("propensity_inf", _set("served_log_propensity", 4, np.inf), "served_log_propensity", 4,
     "finite log-density or null"),
    ("propensity_nan", _nan_propensity(0), "served_log_propensity", 0,
     "finite log-density or null"),
    ("propensity_differs_in_request", _set("served_log_propensity", 1, 3.0), "served_log_propensity", 1,
     "one value per request"),
    ("weight_negative", _set("served_w_ctr", 6, -0.1), "served_w_ctr", 6, "finite weight >= 0"),
    ("weights_off_simplex", _set("served_w_cvr", 9, 0.9), "served_w_ctr", 9, "summing to 1"),
    ("one_weight_missing", _drop("served_w_gmv"), "served_w_gmv", None, "every declared objective"),
    ("propensity_alone", _propensity_without_weights, "served_log_propensity", None, "without the weights"),
    ("version_not_a_string", lambda df: df.assign(model_version=7), "model_version", None, "a string"),
]


@pytest.mark.parametrize("name,mutate,column,row,words", BAD, ids=[b[0] for b in BAD])
def test_bad_served_columns_exit_2_naming_file_column_and_row(tmp_path, capsys, name, mutate, column, row,
                                                              words):
    bad = mutate(served_logs(10))
    logs = tmp_path / "logs"
    logs.mkdir()
    table = bad if isinstance(bad, pa.Table) else pa.Table.from_pandas(bad, preserve_index=False)
    pq.write_table(table, logs / "part-00000.parquet")
    rc, err = run_cli(["--logs", str(logs), "--out", str(tmp_path / "out")], capsys)
    assert rc == 2, err
    assert "part-00000.parquet" in err and f"column '{column}'" in err and words in err, err
    if row is not None:
        assert f"row {row}" in err, err
    assert "Traceback" not in err and not (tmp_path / "out").exists()
