"""Batch scoring: the same ranking as the training-time fusion on the same requests; registry default."""

from __future__ import annotations

import shutil

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds
import pyarrow.parquet as pq
import pytest
import torch

from components import score as score_cli
from grade.core import cli, store
from grade.data import dataset
from grade.data.features import FeaturesConfig, extract_features, list_log_files
from grade.data.fusion import fuse, top_e
from grade.data.simulator import SimulatorConfig, write_logs
from tests.sim_tensors import publish_random_policy


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("score")
    logs, feats, model = str(root / "logs"), str(root / "feats"), str(root / "model")
    write_logs(SimulatorConfig(n_requests=300, n_users=100, n_items=2000, n_days=2), logs)
    extract_features(logs, feats, FeaturesConfig())
    net = publish_random_policy(feats, model, seed=3)
    return logs, feats, model, net


def test_scores_match_training_time_fusion(setup, tmp_path):
    logs, feats, model, net = setup
    out = str(tmp_path / "scores")
    # the policy's mean, as training fuses (exploration, on by default, is tested in test_serve.py)
    assert cli.run(score_cli.main, ["--requests", logs, "--model", model, "--out", out,
                                    "--set", "serve.explore.share=0"]) == 0
    scored = ds.dataset([store.join(out, f)
                         for f in store.read_manifest(out)["files"]]).to_table().to_pandas()
    assert len(scored) == 300 * 50
    test = dataset.load_split(feats, "test")
    w = net.mean_weights(test["num"], test["cat"])
    fused_all = fuse(test["z"], w, test["mask"])
    r = torch.argsort(top_e(fused_all, fused_all.shape[1]), dim=-1)  # each item's 0-based rank
    rid = test["request_id"].numpy()
    by_req = scored.set_index("request_id")
    for i in range(0, len(rid), max(1, len(rid) // 10)):  # a sample of requests, each checked fully
        rows = by_req.loc[rid[i]].sort_values("rank")
        assert np.allclose(rows[[c for c in rows.columns if c.startswith("w_")]].to_numpy()[0], w[i].numpy(),
                           atol=1e-5)
        assert sorted(rows["rank"]) == list(range(50))
        # every candidate's score equals the training-time fused score, and rank 0 holds the best one
        fused = fuse(test["z"][i:i + 1], w[i:i + 1], test["mask"][i:i + 1])[0]
        assert np.allclose(np.sort(rows["score"].to_numpy()), np.sort(fused[test["mask"][i]].numpy()),
                           atol=1e-4)
        assert rows["score"].iloc[0] == pytest.approx(fused.max().item(), abs=1e-4)
    assert r.shape == test["mask"].shape
    # weights differ between requests: the scoring is personalised
    assert scored.groupby("request_id")["w_ctr"].first().std() > 1e-3


def test_registry_default_and_missing_production(setup, tmp_path, capsys):
    logs, feats, model, _ = setup
    assert cli.run(score_cli.main, ["--requests", logs, "--registry", str(tmp_path / "reg"),
                                    "--out", str(tmp_path / "o")]) == 2
    assert "no production model" in capsys.readouterr().err
    from grade.model.registry import Registry

    reg = Registry(str(tmp_path / "reg"))
    version, _ = reg.register(model)
    reg.set_production(version, "test", expected_etag=None)
    out = str(tmp_path / "o2")
    assert cli.run(score_cli.main,
                   ["--requests", logs, "--registry", str(tmp_path / "reg"), "--out", out]) == 0
    assert "torchscript policy" in capsys.readouterr().out
    assert store.is_published(out)


# -- bad requests: exit 2 naming file, column and row; nothing published ------------------------------

def _requests(setup, tmp_path, edit) -> str:
    """A one-file request folder: the first log file's rows after ``edit(table) -> table``."""
    logs = setup[0]
    table = edit(pq.read_table(list_log_files(logs)[0]))
    folder = tmp_path / "requests"
    folder.mkdir()
    pq.write_table(table, folder / "part-0.parquet")
    return str(folder)


def _set(table: pa.Table, name: str, row: int, value, type_=None) -> pa.Table:
    """``table`` with column ``name``'s value at ``row`` replaced (and the column cast to ``type_``)."""
    values = table[name].to_pylist()
    values[row] = value
    i = table.schema.get_field_index(name)
    return table.set_column(i, name, pa.array(values, type_ or table.schema.field(name).type))


def _refused(setup, tmp_path, capsys, requests: str) -> str:
    out = str(tmp_path / "scores")
    assert cli.run(score_cli.main, ["--requests", requests, "--model", setup[2], "--out", out]) == 2
    assert not store.is_published(out)
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    return err


@pytest.mark.parametrize("column, value", [("u_activity", float("nan")), ("u_activity", float("inf")),
                                           ("pred_cvr", float("nan"))])
def test_non_finite_value_is_refused_naming_file_column_row(setup, tmp_path, capsys, column, value):
    """One request's NaN or inf must not become NaN scores and weights written with exit 0; a request
    feature is checked on every row, not only on the request's first one."""
    requests = _requests(setup, tmp_path, lambda t: _set(t, column, 120, value))
    err = _refused(setup, tmp_path, capsys, requests)
    assert f"part-0.parquet, column '{column}', row 120" in err
    assert "expected a finite" in err


def test_non_contiguous_request_is_refused(setup, tmp_path, capsys):
    """Rows of one request split in two runs: refused (not "101 requests", not two rank-0 rows)."""
    def split_first_request(t: pa.Table) -> pa.Table:
        order = np.r_[np.arange(25), np.arange(50, 100), np.arange(25, 50), np.arange(100, t.num_rows)]
        return t.take(pa.array(order))

    err = _refused(setup, tmp_path, capsys, _requests(setup, tmp_path, split_first_request))
    assert "part-0.parquet, column 'request_id', row 75" in err
    assert "contiguous" in err and "row 0" in err


def test_request_split_over_two_files_is_refused(setup, tmp_path, capsys):
    requests = _requests(setup, tmp_path, lambda t: t.slice(0, 100))
    table = pq.read_table(store.join(requests, "part-0.parquet"))
    pq.write_table(table.slice(25, 75), store.join(requests, "part-1.parquet"))
    pq.write_table(table.slice(0, 25), store.join(requests, "part-0.parquet"))
    err = _refused(setup, tmp_path, capsys, requests)
    assert "part-1.parquet, column 'request_id', row 0" in err and "contiguous" in err


def test_fractional_category_and_string_columns_are_refused(setup, tmp_path, capsys):
    requests = _requests(setup, tmp_path, lambda t: _set(t, "c_device", 50, 1.5, pa.float64()))
    err = _refused(setup, tmp_path, capsys, requests)
    assert "column 'c_device', row 50: expected an integer category id, got 1.5" in err
    shutil.rmtree(requests)
    requests = _requests(setup, tmp_path, lambda t: t.set_column(
        t.schema.get_field_index("u_activity"), "u_activity", pc.cast(t["u_activity"], pa.string())))
    err = _refused(setup, tmp_path, capsys, requests)
    assert "column 'u_activity', row 0: expected a number, got '" in err


def test_null_request_id_is_refused(setup, tmp_path, capsys):
    requests = _requests(setup, tmp_path, lambda t: _set(t, "request_id", 7, None))
    err = _refused(setup, tmp_path, capsys, requests)
    assert "column 'request_id', row 7: expected a value, got null" in err


def test_unpublished_model_folder_is_refused(setup, tmp_path, capsys):
    """A model folder without its manifest (a writer that did not finish) is not read."""
    model = tmp_path / "model"
    shutil.copytree(setup[2], model)
    (model / store.MANIFEST).unlink()
    out = str(tmp_path / "scores")
    assert cli.run(score_cli.main, ["--requests", setup[0], "--model", str(model), "--out", out]) == 2
    assert f"{model}: no {store.MANIFEST}" in capsys.readouterr().err


def test_changed_model_file_is_refused(setup, tmp_path, capsys):
    """A published model whose weights changed after publishing fails the manifest's sha256."""
    model = tmp_path / "model"
    shutil.copytree(setup[2], model)
    weights = bytearray((model / "policy.safetensors").read_bytes())
    weights[-1] ^= 1
    (model / "policy.safetensors").write_bytes(bytes(weights))
    out = str(tmp_path / "scores")
    assert cli.run(score_cli.main, ["--requests", setup[0], "--model", str(model), "--out", out]) == 2
    assert "policy.safetensors: content differs from the manifest" in capsys.readouterr().err


def test_requests_cut_by_batch_boundaries_are_counted_once(setup, tmp_path, capsys):
    """Small record batches carry a request over to the next batch: it is still one request, one
    rank 0, and not taken for a non-contiguous one."""
    requests = _requests(setup, tmp_path, lambda t: t)
    out = str(tmp_path / "scores")
    assert cli.run(score_cli.main, ["--requests", requests, "--model", setup[2], "--out", out,
                                    "--batch-rows", "7"]) == 0
    scored = pq.read_table(store.join(out, "part-00000.parquet")).to_pandas()
    n = scored["request_id"].nunique()
    assert f"scored {n:,} requests ({len(scored):,} rows)" in capsys.readouterr().out
    assert (scored.groupby("request_id")["rank"].apply(sorted).map(lambda r: r == list(range(len(r))))).all()
