"""Feature extraction: validation (exit 2, nothing published), split, standardisation, tensors, S3."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from safetensors.numpy import load_file

import grade.core.cli
from components import features as features_cli
from grade.core import store
from grade.core.errors import InputError
from grade.data.features import FeaturesConfig, extract_features
from grade.data.raw_logs import hash_strings, objective_order
from grade.data.shard_writer import split_boundaries
from grade.data.transform import encode_categorical

T0 = pd.Timestamp("2026-03-01")


def make_logs(n_requests: int = 40, lengths=None, seed: int = 0, string_ids: bool = False) -> pd.DataFrame:
    """A small valid log table: request r at time T0 + r minutes, ``lengths[r]`` candidates."""
    rng = np.random.default_rng(seed)
    lengths = np.full(n_requests, 4) if lengths is None else np.asarray(lengths)
    n_requests = len(lengths)
    n = int(lengths.sum())
    req = np.repeat(np.arange(n_requests), lengths)
    pos = np.concatenate([np.arange(m) for m in lengths])
    click = (rng.random(n) < 0.4).astype(np.int8)
    order = (click * (rng.random(n) < 0.5)).astype(np.int8)
    ids = np.array([f"q-{r:04d}" for r in req]) if string_ids else req.astype(np.int64) + 1000
    return pd.DataFrame({
        "request_id": ids,
        "user_id": (req % 7).astype(np.int64),
        "event_time": T0 + pd.to_timedelta(req, unit="min"),
        "u_power": (req * 0.5).astype(np.float32),
        "c_device": (req % 3).astype(np.int32),
        "item_id": (req * 100 + pos).astype(np.int64),
        "position": pos.astype(np.int16),
        "pred_ctr": rng.uniform(0.01, 0.3, n).astype(np.float32),
        "pred_cvr": rng.uniform(0.01, 0.2, n).astype(np.float32),
        "pred_gmv": rng.uniform(1, 100, n).astype(np.float32),
        "click": click,
        "order": order,
        "gmv": np.where(order == 1, 20.0, 0.0).astype(np.float32),
    })


def write_logs(folder: Path, df: pd.DataFrame, parts: int = 1) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    # whole requests per file: a request split across files is an error
    for i, ids in enumerate(np.array_split(df.request_id.unique(), parts)):
        part = df[df.request_id.isin(ids)]
        pq.write_table(pa.Table.from_pandas(part, preserve_index=False), folder / f"part-{i:05d}.parquet")
    return folder


def run_cli(argv: list[str], capsys) -> tuple[int, str]:
    rc = grade.core.cli.run(features_cli.main, argv)
    return rc, capsys.readouterr().err


def shards(out: Path, split: str) -> dict[str, np.ndarray]:
    files = sorted((out / split).glob("part-*.safetensors"))
    parts = [load_file(str(f)) for f in files]
    return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]} if parts else {}


# --------------------------------------------------------------------------------------------
# Happy path
# --------------------------------------------------------------------------------------------

def test_tensors_match_the_contract(tmp_path, capsys):
    df = make_logs(40)
    df["true_ctr"] = df["pred_ctr"] * 0.5
    df["true_cvr"] = df["pred_cvr"]
    df["price"] = df["pred_gmv"]
    df["true_segment"] = (df["user_id"] % 4).astype(np.int8)
    logs = write_logs(tmp_path / "logs", df, parts=2)
    out = tmp_path / "out"
    rc, err = run_cli(["--logs", str(logs), "--out", str(out), "--shard-requests", "7"], capsys)
    assert rc == 0, err
    assert store.is_published(str(out))
    spec = json.loads((out / "feature_spec.json").read_text())
    assert spec["objectives"] == ["ctr", "cvr", "gmv"]
    assert spec["list_size"] == 4
    assert spec["ground_truth"] == ["true_ctr", "true_cvr", "price", "segment"]
    # 40 requests: round(6) test, round(6) valid, 28 train
    assert [spec["splits"][s]["n_requests"] for s in ("train", "valid", "test")] == [28, 6, 6]
    assert spec["splits"]["train"]["shard_requests"] == [7, 7, 7, 7]
    assert spec["splits"]["train"]["shards"][0] == "train/part-00000.safetensors"
    train, test = shards(out, "train"), shards(out, "test")
    assert "true_ctr" not in train and "segment" not in train
    assert set(test) >= {"true_ctr", "true_cvr", "price", "segment"}
    assert train["z"].shape == (28, 4, 3) and train["z"].dtype == np.float32
    assert train["mask"].dtype == np.bool_ and train["mask"].all()
    assert train["cat"].dtype == np.int64 and train["position"].dtype == np.int64
    assert train["num"].shape == (28, 1) and train["num"].dtype == np.float32
    # request 0 is the first train request; its rows in order
    r0 = df[df.request_id == 1000]
    np.testing.assert_array_equal(train["request_id"][:3], [1000, 1001, 1002])
    np.testing.assert_allclose(train["pred"][0, :, 0], r0["pred_ctr"].to_numpy())
    np.testing.assert_array_equal(train["click"][0], r0["click"].to_numpy())
    np.testing.assert_array_equal(train["position"][0], [0, 1, 2, 3])
    assert train["event_time"][0] == T0.value
    np.testing.assert_allclose(test["true_ctr"][0], df[df.request_id == 1034]["true_ctr"].to_numpy())
    assert test["segment"][0] == (34 % 7) % 4 and test["segment"].dtype == np.int64


def test_padding_of_ragged_lists(tmp_path):
    df = make_logs(lengths=[2, 5, 3, 1, 4, 2, 2, 3, 5, 1])
    out = tmp_path / "out"
    extract_features(str(write_logs(tmp_path / "logs", df)), str(out),
                     FeaturesConfig(valid_fraction=0.2, test_fraction=0.2))
    tr = shards(out, "train")
    assert tr["mask"].shape == (6, 5)
    np.testing.assert_array_equal(tr["mask"].sum(1), [2, 5, 3, 1, 4, 2])
    assert (tr["position"][~tr["mask"]] == -1).all()
    assert (tr["z"][~tr["mask"]] == 0).all() and (tr["pred"][~tr["mask"]] == 0).all()
    assert (tr["click"][~tr["mask"]] == 0).all() and (tr["gmv"][~tr["mask"]] == 0).all()
    np.testing.assert_array_equal(tr["position"][0], [0, 1, -1, -1, -1])


def test_standardisation_and_vocabulary_fitted_on_train_only(tmp_path):
    df = make_logs(20)
    # the last 6 requests (valid + test) get wild values: the statistics must not move
    late = df.request_id >= 1014
    df.loc[late, "pred_ctr"] = np.float32(0.9)
    df.loc[late, "u_power"] = np.float32(1e6)
    df.loc[df.request_id == 1019, "c_device"] = 77  # seen only in test -> OOV
    out = tmp_path / "out"
    spec = extract_features(str(write_logs(tmp_path / "logs", df)), str(out), FeaturesConfig())
    train_rows = df[df.request_id < 1014]
    assert spec["splits"]["train"]["n_requests"] == 14
    logp = np.log(train_rows[["pred_ctr", "pred_cvr", "pred_gmv"]].to_numpy(np.float64))
    np.testing.assert_allclose(spec["pred_log_mean"], logp.mean(0), rtol=1e-9)
    np.testing.assert_allclose(spec["pred_log_std"], logp.std(0), rtol=1e-6)
    power = np.arange(14) * 0.5  # one value per train request
    # clip bounds: the train values 0.5 and 6.0 (second from each end), widened by their distance 5.5
    assert spec["numeric"] == [{"name": "u_power", "mean": pytest.approx(power.mean()),
                                "std": pytest.approx(power.std()), "clip": [-5.0, 11.5]}]
    assert spec["numeric_clipped"] == {"u_power": {"train": 0, "valid": 3, "test": 3}}
    assert spec["categorical"] == [{"name": "c_device", "vocab": [0, 1, 2], "size": 4}]
    tr, te = shards(out, "train"), shards(out, "test")
    np.testing.assert_allclose(tr["z"].reshape(-1, 3).mean(0), 0, atol=1e-5)
    np.testing.assert_allclose(tr["z"].reshape(-1, 3).std(0), 1, atol=1e-5)
    np.testing.assert_array_equal(tr["cat"][:4, 0], [1, 2, 3, 1])  # value v -> id v + 1
    assert te["cat"][-1, 0] == 0
    expected_z = (np.log(0.9) - spec["pred_log_mean"][0]) / spec["pred_log_std"][0]
    np.testing.assert_allclose(te["z"][:, :, 0], expected_z, rtol=1e-5)


def test_time_split_keeps_requests_whole_and_train_in_the_past(tmp_path):
    # 60 requests at 12 distinct times (ties), shuffled in the file, in 3 files
    df = make_logs(60, seed=3)
    r = df.request_id - 1000
    df["event_time"] = T0 + pd.to_timedelta((r * 7919) % 12, unit="h")
    logs = write_logs(tmp_path / "logs", df, parts=3)
    out = tmp_path / "out"
    spec = extract_features(str(logs), str(out), FeaturesConfig(shard_requests=8))
    parts = {s: shards(out, s) for s in ("train", "valid", "test")}
    ids = {s: set(p["request_id"].tolist()) for s, p in parts.items()}
    assert not (ids["train"] & ids["valid"]) and not (ids["train"] & ids["test"])
    assert not (ids["valid"] & ids["test"])
    assert ids["train"] | ids["valid"] | ids["test"] == set(df.request_id.unique().tolist())
    t = {s: p["event_time"] for s, p in parts.items()}
    assert t["train"].max() < t["valid"].min() <= t["valid"].max() < t["test"].min()
    b = spec["split_boundaries"]
    assert t["train"].max() < b["valid_start"] == t["valid"].min()
    assert b["test_start"] == t["test"].min()
    for s in ("train", "valid", "test"):
        assert spec["splits"][s]["time_min"] == t[s].min() and spec["splits"][s]["n_rows"] == 4 * len(ids[s])


def test_split_boundaries_by_hand():
    times = np.array([5, 1, 3, 2, 4, 6, 7, 8, 9, 10])
    assert split_boundaries(times, 0.2, 0.3) == (6, 8)  # train 1..5, valid 6..7, test 8..10
    assert split_boundaries(times, 0.0, 0.0) == (np.iinfo(np.int64).max,) * 2


def test_same_output_whatever_the_batch_size(tmp_path):
    df = make_logs(lengths=np.random.default_rng(1).integers(1, 9, 50), seed=1)
    logs = str(write_logs(tmp_path / "logs", df, parts=2))
    a = extract_features(logs, str(tmp_path / "a"), FeaturesConfig(batch_rows=7, shard_requests=9))
    b = extract_features(logs, str(tmp_path / "b"), FeaturesConfig(batch_rows=100_000, shard_requests=9))
    a.pop("config"), b.pop("config")
    assert a == b
    for s in ("train", "valid", "test"):
        for rel in a["splits"][s]["shards"]:
            assert (tmp_path / "a" / rel).read_bytes() == (tmp_path / "b" / rel).read_bytes()


def test_string_request_ids_hash_stably(tmp_path):
    df = make_logs(20, string_ids=True)
    out = tmp_path / "out"
    spec = extract_features(str(write_logs(tmp_path / "logs", df)), str(out), FeaturesConfig())
    assert spec["request_id"] == {"source_type": "string", "hashed": True}
    ids = np.concatenate([shards(out, s)["request_id"] for s in ("train", "valid", "test")])
    expected = hash_strings(pa.array([f"q-{r:04d}" for r in range(20)]))
    np.testing.assert_array_equal(ids, expected)
    assert (ids >= 0).all() and len(set(ids.tolist())) == 20


def _reference_hash(s: str) -> int:
    """The documented formula, one string at a time in plain Python."""
    m = (1 << 64) - 1
    b = s.encode()
    h = 0
    for byte in b:
        h = (h * 0x100000001B3 + byte + 1) & m
    h ^= (len(b) * 0x9E3779B97F4A7C15) & m
    h ^= h >> 30
    h = (h * 0xBF58476D1CE4E5B9) & m
    h ^= h >> 27
    h = (h * 0x94D049BB133111EB) & m
    h ^= h >> 31
    return h & ((1 << 63) - 1)


def test_hash_strings_matches_the_formula_on_sliced_and_empty_strings():
    arr = pa.array(["", "a", "abc", "ünïcode", "x" * 100, "a"]).slice(1)
    got = hash_strings(arr)
    assert got.tolist() == [_reference_hash(s) for s in ["a", "abc", "ünïcode", "x" * 100, "a"]]
    assert hash_strings(pa.array([""])).tolist() == [_reference_hash("")]
    assert hash_strings(pa.chunked_array([["ab"], ["cd"]])).tolist() == [_reference_hash("ab"),
                                                                         _reference_hash("cd")]


def test_objective_order_and_oov_encoding():
    assert objective_order(["gmv", "zz", "ctr", "rel", "aa"]) == ["ctr", "gmv", "rel", "aa", "zz"]
    np.testing.assert_array_equal(encode_categorical(np.array([5, 7, 9, 1, 20]), np.array([1, 5, 9])),
                                  [2, 0, 3, 1, 0])


def test_manifest_decides_which_files_are_read(tmp_path):
    df = make_logs(30)
    logs = write_logs(tmp_path / "logs", df, parts=3)
    manifest = store.build_manifest(logs)
    del manifest["files"]["part-00002.parquet"]
    store.write_json(str(logs / store.MANIFEST), manifest)
    spec = extract_features(str(logs), str(tmp_path / "out"), FeaturesConfig())
    assert spec["input"]["files"] == 2
    assert sum(spec["splits"][s]["n_requests"] for s in spec["splits"]) == 20


def test_max_vocab_keeps_the_most_frequent(tmp_path):
    df = make_logs(30)
    df["c_device"] = np.where(df.request_id < 1010, 5, np.where(df.request_id < 1016, 3, 9)).astype(np.int32)
    spec = extract_features(str(write_logs(tmp_path / "logs", df)), str(tmp_path / "out"),
                            FeaturesConfig(max_vocab=2, valid_fraction=0.1, test_fraction=0.1))
    # train = first 24 requests: 5 x10, 3 x6, 9 x8 -> keep 5 and 9
    assert spec["categorical"][0]["vocab"] == [5, 9]


# --------------------------------------------------------------------------------------------
# Validation: exit 2, the message names file, column and row; nothing published
# --------------------------------------------------------------------------------------------

def _set(col, row, value):
    def f(df):
        df.loc[row, col] = value
        return df
    return f


def _cast(col, dtype):
    def f(df):
        df[col] = df[col].astype(dtype)
        return df
    return f


def _drop(col):
    return lambda df: df.drop(columns=[col])


def _dup_item(df):
    df.loc[6, "item_id"] = df.loc[5, "item_id"]
    return df


def _not_contiguous(df):
    # the rows of request 1001 (4..7) and 1002 (8..11) interleave: 1001 reappears at row 8
    df = df.copy()
    idx = list(range(4)) + [4, 5, 8, 9, 6, 7, 10, 11] + list(range(12, len(df)))
    return df.iloc[idx].reset_index(drop=True)


def _nan(col, row):
    """A real NaN (pandas would turn it into a null on the way to Arrow)."""
    def f(df):
        t = pa.Table.from_pandas(df, preserve_index=False)
        values = df[col].to_numpy(np.float32).copy()
        values[row] = np.nan
        return t.set_column(t.schema.get_field_index(col), col, pa.array(values))
    return f


def _null(col, row):
    def f(df):
        df[col] = df[col].astype("float32")
        df.loc[row, col] = np.nan
        t = pa.Table.from_pandas(df, preserve_index=False)
        i = t.schema.get_field_index(col)
        arr = t.column(col).to_numpy(zero_copy_only=False)
        return t.set_column(i, col, pa.array(arr, pa.float32(), from_pandas=True))
    return f


def _far_time(df):
    """event_time in seconds, one of them in the year ~33,700: beyond the int64 ns range."""
    t = pa.Table.from_pandas(df, preserve_index=False)
    seconds = (t.column("event_time").cast(pa.int64()).to_numpy() // 10**9).copy()
    seconds[3] = 10**12
    return t.set_column(t.schema.get_field_index("event_time"), "event_time",
                        pa.array(seconds, pa.timestamp("s")))


BAD = [
    ("missing column", _drop("click"), "click", None, "missing column"),
    ("no predictions", lambda df: df.drop(columns=["pred_ctr", "pred_cvr", "pred_gmv"]), "pred_ctr", None,
     "features.objectives declares 'ctr'"),
    ("mistyped prediction", _cast("pred_ctr", str), "pred_ctr", None, "wrong type"),
    ("mistyped position", _cast("position", "float64"), "position", None, "wrong type"),
    ("mistyped event_time", _cast("event_time", "int64"), "event_time", None, "timestamp"),
    ("NaN prediction", _nan("pred_cvr", 9), "pred_cvr", 9, "finite"),
    ("inf prediction", _set("pred_gmv", 10, np.inf), "pred_gmv", 10, "finite"),
    ("zero prediction", _set("pred_ctr", 11, 0.0), "pred_ctr", 11, "> 0"),
    ("negative prediction", _set("pred_ctr", 3, -0.1), "pred_ctr", 3, "> 0"),
    ("click not 0/1", _set("click", 13, 2), "click", 13, "0 or 1"),
    ("order not 0/1", lambda df: _set("click", 14, 1)(_set("order", 14, 3)(df)), "order", 14, "0 or 1"),
    ("order without click", lambda df: _set("gmv", 15, 0.0)(_set("order", 15, 1)(_set("click", 15, 0)(df))),
     "order", 15, "without a click"),
    ("gmv without order", lambda df: _set("gmv", 16, 5.0)(_set("order", 16, 0)(df)), "gmv", 16,
     "without an order"),
    ("negative gmv", _set("gmv", 17, -1.0), "gmv", 17, ">= 0"),
    ("duplicate item", _dup_item, "item_id", 6, "once"),
    ("not contiguous", _not_contiguous, "request_id", 8, "contiguous"),
    ("null prediction", _null("pred_ctr", 12), "pred_ctr", 12, "null"),
    ("event_time out of range", _far_time, "event_time", 3, "between 1677 and 2262"),
    ("NaN ground truth", lambda df: _nan("true_ctr", 9)(df.assign(true_ctr=df.pred_ctr)), "true_ctr", 9,
     "finite number >= 0"),
    ("negative segment", lambda df: _set("true_segment", 2, -1)(df.assign(true_segment=df.user_id)),
     "true_segment", 2, "segment >= 0"),
]


@pytest.mark.parametrize("name,mutate,column,row,words", BAD, ids=[b[0] for b in BAD])
def test_bad_input_exits_2_and_publishes_nothing(tmp_path, capsys, name, mutate, column, row, words):
    df = make_logs(10)
    bad = mutate(df.copy())
    logs = tmp_path / "logs"
    logs.mkdir()
    table = bad if isinstance(bad, pa.Table) else pa.Table.from_pandas(bad, preserve_index=False)
    pq.write_table(table, logs / "part-00000.parquet")
    out = tmp_path / "out"
    rc, err = run_cli(["--logs", str(logs), "--out", str(out)], capsys)
    assert rc == 2, err
    assert "part-00000.parquet" in err
    assert f"column '{column}'" in err
    if row is not None:
        assert f"row {row}" in err
    assert words in err
    assert not out.exists()


def test_request_reappearing_in_another_file_is_not_contiguous(tmp_path):
    df = make_logs(10)
    logs = tmp_path / "logs"
    logs.mkdir()
    pq.write_table(pa.Table.from_pandas(df.iloc[:22], preserve_index=False), logs / "part-00000.parquet")
    pq.write_table(pa.Table.from_pandas(df.iloc[22:], preserve_index=False), logs / "part-00001.parquet")
    with pytest.raises(InputError, match=r"part-00001.parquet, column 'request_id', row 0: .*contiguous"):
        extract_features(str(logs), str(tmp_path / "out"))
    assert not (tmp_path / "out").exists()


def test_empty_inputs(tmp_path, capsys):
    (tmp_path / "none").mkdir()
    rc, err = run_cli(["--logs", str(tmp_path / "none"), "--out", str(tmp_path / "o1")], capsys)
    assert rc == 2 and "empty input" in err
    logs = tmp_path / "zero"
    logs.mkdir()
    pq.write_table(pa.Table.from_pandas(make_logs(3).iloc[:0], preserve_index=False), logs / "p.parquet")
    rc, err = run_cli(["--logs", str(logs), "--out", str(tmp_path / "o2")], capsys)
    assert rc == 2 and "empty input" in err
    assert not (tmp_path / "o1").exists() and not (tmp_path / "o2").exists()


def test_too_few_requests_to_split(tmp_path, capsys):
    logs = write_logs(tmp_path / "logs", make_logs(2))
    rc, err = run_cli(["--logs", str(logs), "--out", str(tmp_path / "o")], capsys)
    assert rc == 2 and "would be empty" in err and "column 'event_time'" in err


def test_bad_config_exits_2(tmp_path, capsys):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("features:\n  valid_fractoin: 0.2\n")
    rc, err = run_cli(["--logs", str(tmp_path), "--out", str(tmp_path / "o"), "--config", str(cfg)], capsys)
    assert rc == 2 and "valid_fractoin" in err
    rc, err = run_cli(["--logs", str(tmp_path), "--out", str(tmp_path / "o"), "--valid-fraction", "0.6",
                       "--test-fraction", "0.5"], capsys)
    assert rc == 2 and "must be < 1" in err


def test_skip_mode_quarantines_whole_requests(tmp_path, capsys, caplog):
    df = make_logs(20)
    df.loc[5, "click"] = 7          # request 1001
    df.loc[[21, 22], "pred_ctr"] = -1.0  # request 1005 (two bad rows, counted once)
    df = _not_contiguous(df)        # requests 1001 and 1002 interleave
    logs = write_logs(tmp_path / "logs", df)
    out = tmp_path / "out"
    rc, err = run_cli(["--logs", str(logs), "--out", str(out), "--on-bad-rows", "skip"], capsys)
    assert rc == 0, err
    assert "quarantined 3 request(s) (12 rows)" in caplog.text
    spec = json.loads((out / "feature_spec.json").read_text())
    q = spec["quarantine"]
    assert q["n_requests"] == 3 and q["n_rows"] == 12 and q["file"] == "quarantine.parquet"
    assert sum(q["reasons"].values()) == 3
    quarantined = pq.read_table(out / "quarantine.parquet").to_pandas()
    assert sorted(quarantined.request_id.unique()) == [1001, 1002, 1005]
    assert len(quarantined) == 12
    r5 = quarantined[quarantined.request_id == 1005]
    assert (r5.reason == "column 'pred_ctr': expected a finite prediction > 0").all()
    assert (quarantined[quarantined.request_id == 1002].reason.str.contains("contiguous")).all()
    assert set(quarantined.source_row[quarantined.request_id == 1005]) == {20, 21, 22, 23}
    kept = np.concatenate([shards(out, s)["request_id"] for s in ("train", "valid", "test")])
    assert sorted(kept.tolist()) == [r for r in range(1000, 1020) if r not in (1001, 1002, 1005)]
    assert "quarantine.parquet" in store.read_manifest(str(out))["files"]


def test_s3_input_and_output(tmp_path, s3_env):
    df = make_logs(20)
    local = write_logs(tmp_path / "logs", df, parts=2)
    logs_uri = f"{s3_env}/logs"
    store.publish_dir(local, logs_uri)
    out_uri = f"{s3_env}/features"
    spec = extract_features(logs_uri, out_uri, FeaturesConfig(shard_requests=5))
    assert store.is_published(out_uri)
    local_out = tmp_path / "again"
    extract_features(str(local), str(local_out), FeaturesConfig(shard_requests=5))
    for s in ("train", "valid", "test"):
        for rel in spec["splits"][s]["shards"]:
            assert store.read_bytes(store.join(out_uri, rel)) == (local_out / rel).read_bytes()


# --------------------------------------------------------------------------------------------
# Declared objectives, robust standardisation, list truncation, request consistency (issue 14)
# --------------------------------------------------------------------------------------------

def test_logs_without_a_declared_prediction_column_are_refused(tmp_path, capsys):
    logs = write_logs(tmp_path / "logs", make_logs(10).drop(columns=["pred_ctr"]))
    out = tmp_path / "out"
    rc, err = run_cli(["--logs", str(logs), "--out", str(out)], capsys)
    assert rc == 2, err
    assert "part-00000.parquet" in err and "column 'pred_ctr'" in err and "features.objectives" in err
    assert not out.exists()


def test_a_run_with_other_signals_declares_them(tmp_path, capsys):
    df = make_logs(20).drop(columns=["pred_gmv"]).rename(columns={"pred_cvr": "pred_ltv"})
    df["pred_rel"] = np.float32(0.5)
    logs = write_logs(tmp_path / "logs", df)
    out = tmp_path / "out"
    rc, err = run_cli(["--logs", str(logs), "--out", str(out), "--set", "features.objectives=[ltv, ctr]"],
                      capsys)
    assert rc == 0, err
    spec = json.loads((out / "feature_spec.json").read_text())
    # the declared objectives, in the canonical order; pred_rel was not declared and is not used
    assert spec["objectives"] == ["ctr", "ltv"] and spec["pred_columns"] == ["pred_ctr", "pred_ltv"]
    assert shards(out, "train")["z"].shape[-1] == 2


def test_one_huge_value_does_not_wipe_a_numeric_feature(tmp_path):
    df = make_logs(40)
    df.loc[df.request_id == 1003, "u_power"] = np.float32(1e30)   # one train request
    out = tmp_path / "out"
    spec = extract_features(str(write_logs(tmp_path / "logs", df)), str(out), FeaturesConfig())
    num = shards(out, "train")["num"][:, 0]
    clean = np.delete(num, 3)
    # the other train requests keep distinct, standardised values (0.5 apart in the raw data)
    assert len(np.unique(clean)) == len(clean) and 0.5 < clean.std() < 2
    assert np.isfinite(num).all() and clean.max() < num[3] < 10
    (entry,) = spec["numeric"]
    lo, hi = entry["clip"]
    assert lo <= 0 and 13.5 <= hi < 1e3
    assert spec["numeric_clipped"] == {"u_power": {"train": 1, "valid": 0, "test": 0}}
    # the transform the spec defines applies the same clip at serving time
    from grade.data.transform import FeatureTransform
    served, _ = FeatureTransform.from_spec(spec).request_features({"u_power": [1e30, 2.0],
                                                                   "c_device": [0, 0]})
    assert served[0, 0] == pytest.approx(num[3]) and served[1, 0] == pytest.approx(clean[3])


def test_clean_numeric_features_are_not_clipped(tmp_path):
    df = make_logs(40)
    spec = extract_features(str(write_logs(tmp_path / "logs", df)), str(tmp_path / "out"), FeaturesConfig())
    power = np.arange(28) * 0.5
    assert spec["numeric"][0]["mean"] == pytest.approx(power.mean())
    assert spec["numeric"][0]["std"] == pytest.approx(power.std())
    assert spec["numeric_clipped"] == {}


def test_long_lists_are_truncated_by_logged_position(tmp_path, caplog):
    lengths = np.full(20, 5)
    lengths[2] = 10_000
    df = make_logs(lengths=lengths)
    # the long request's rows are logged in reverse position order: the kept ones are positions 0..7
    long_rows = df.index[df.request_id == 1002]
    df.loc[long_rows, "position"] = (np.arange(10_000)[::-1]).astype(np.int16)
    out = tmp_path / "out"
    spec = extract_features(str(write_logs(tmp_path / "logs", df)), str(out),
                            FeaturesConfig(max_list_size=8, shard_requests=4))
    assert spec["list_size"] == 8
    assert spec["truncated"] == {"n_requests": 1, "n_rows": 9_992, "max_list_size": 8}
    assert "truncated 1 request(s)" in caplog.text
    train = shards(out, "train")
    assert train["mask"].shape == (14, 8)
    r2 = int(np.flatnonzero(train["request_id"] == 1002)[0])
    assert train["mask"][r2].all()
    np.testing.assert_array_equal(train["position"][r2], np.arange(8)[::-1])
    expected = df.loc[long_rows, "pred_ctr"].to_numpy()[-8:]
    np.testing.assert_allclose(train["pred"][r2, :, 0], expected)
    size = sum(f.stat().st_size for f in out.rglob("*.safetensors"))
    assert size < 200_000  # bounded by requests x max_list_size, not by the longest list


def _dup_position(df):
    df.loc[6, "position"] = df.loc[5, "position"]
    return df


def _time_varies(df):
    df.loc[6, "event_time"] = df.loc[5, "event_time"] + pd.Timedelta(seconds=1)
    return df


@pytest.mark.parametrize("mutate,column,row,words", [
    (_dup_position, "position", 6, "(request_id, position) once"),
    (_time_varies, "event_time", 6, "one event_time per request"),
], ids=["duplicate position", "event_time varies in a request"])
def test_inconsistent_requests_are_refused(tmp_path, capsys, mutate, column, row, words):
    logs = write_logs(tmp_path / "logs", mutate(make_logs(10)))
    rc, err = run_cli(["--logs", str(logs), "--out", str(tmp_path / "out")], capsys)
    assert rc == 2, err
    assert f"column '{column}'" in err and f"row {row}" in err and words in err


def _null_request_id(df: pd.DataFrame, rows) -> pa.Table:
    t = pa.Table.from_pandas(df, preserve_index=False)
    ids = t.column("request_id").to_pylist()
    for r in rows:
        ids[r] = None
    return t.set_column(0, "request_id", pa.array(ids, t.schema.field("request_id").type))


@pytest.mark.parametrize("string_ids", [False, True], ids=["int ids", "string ids"])
def test_skip_mode_null_request_id_quarantines_only_its_row(tmp_path, capsys, string_ids):
    df = make_logs(20, string_ids=string_ids)
    if not string_ids:
        df.loc[df.request_id == 1007, "request_id"] = 0  # a real request whose id is 0
    logs = tmp_path / "logs"
    logs.mkdir()
    pq.write_table(_null_request_id(df, [5, 40]), logs / "part-00000.parquet")  # mid request 1, 10
    out = tmp_path / "out"
    rc, err = run_cli(["--logs", str(logs), "--out", str(out), "--on-bad-rows", "skip"], capsys)
    assert rc == 0, err
    spec = json.loads((out / "feature_spec.json").read_text())
    assert spec["quarantine"]["n_rows"] == 2
    quarantined = pq.read_table(out / "quarantine.parquet").to_pandas()
    assert quarantined.source_row.tolist() == [5, 40]
    assert quarantined.request_id.isna().all()
    assert (quarantined.reason == "column 'request_id': expected a value, got null").all()
    kept = {s: shards(out, s) for s in ("train", "valid", "test")}
    assert sum(len(p["request_id"]) for p in kept.values()) == 20
    lengths = np.concatenate([p["mask"].sum(1) for p in kept.values()])
    assert sorted(lengths.tolist()) == [3, 3] + [4] * 18


def test_null_request_id_in_fail_mode_names_the_row(tmp_path, capsys):
    logs = tmp_path / "logs"
    logs.mkdir()
    pq.write_table(_null_request_id(make_logs(10), [5]), logs / "part-00000.parquet")
    rc, err = run_cli(["--logs", str(logs), "--out", str(tmp_path / "out")], capsys)
    assert rc == 2 and "column 'request_id', row 5" in err and "null" in err


def test_skip_mode_files_differing_in_an_ignored_column(tmp_path, capsys):
    df = make_logs(20)
    df.loc[5, "click"] = 7          # request 1001, file 0
    df.loc[61, "pred_ctr"] = -1.0   # request 1015, file 1
    logs = tmp_path / "logs"
    logs.mkdir()
    first, second = df[df.request_id < 1010].copy(), df[df.request_id >= 1010].copy()
    first["propensity"] = np.float32(0.5)
    second["propensity"] = "n/a"     # another type in an ignored column
    second["position"] = second["position"].astype(np.int64)  # and a wider integer type
    for i, part in enumerate((first, second)):
        pq.write_table(pa.Table.from_pandas(part, preserve_index=False), logs / f"part-{i:05d}.parquet")
    out = tmp_path / "out"
    rc, err = run_cli(["--logs", str(logs), "--out", str(out), "--on-bad-rows", "skip"], capsys)
    assert rc == 0, err
    quarantined = pq.read_table(out / "quarantine.parquet").to_pandas()
    assert sorted(quarantined.request_id.unique()) == [1001, 1015]
    assert set(quarantined.source_file.map(lambda f: Path(f).name)) == {"part-00000.parquet",
                                                                         "part-00001.parquet"}


def _registry_with_production(root: Path, spec: dict) -> Path:
    """A registry whose production model (the default model name) has feature spec ``spec``."""
    from grade.model.registry import Registry

    local = root.parent / "model-files"
    local.mkdir()
    (local / "feature_spec.json").write_text(json.dumps(spec))
    store.publish_dir(local, str(root.parent / "model"))
    reg = Registry(str(root))
    version, _ = reg.register(str(root.parent / "model"))
    reg.set_production(version, "test", expected_etag=None)
    return root


def test_logs_are_checked_against_the_production_models_feature_spec(tmp_path, capsys):
    df = make_logs(20)
    logs = write_logs(tmp_path / "logs", df)
    spec = extract_features(str(logs), str(tmp_path / "first"), FeaturesConfig())
    registry = _registry_with_production(tmp_path / "registry", spec)
    rc, err = run_cli(["--logs", str(logs), "--out", str(tmp_path / "same"), "--production-registry",
                       str(registry)], capsys)
    assert rc == 0, err
    # the same logs with another u_ feature: the production model could not score them
    other = write_logs(tmp_path / "other", df.rename(columns={"u_power": "u_activity"}))
    rc, err = run_cli(["--logs", str(other), "--out", str(tmp_path / "differs"), "--production-registry",
                       str(registry)], capsys)
    assert rc == 2, err
    assert "column 'u_activity'" in err and "v0001" in err and "u_power" in err
    assert not (tmp_path / "differs").exists()
