"""Batch scoring: the same ranking as the training-time fusion on the same requests; registry default."""

from __future__ import annotations

import numpy as np
import pyarrow.dataset as ds
import pytest
import torch

from components import score as score_cli
from grade import cli, dataset, store
from grade.features import FeaturesConfig, extract_features
from grade.fusion import fuse, top_e
from grade.policy import PolicyConfig, PolicyNet, save_policy
from grade.simulator import SimulatorConfig, write_logs


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("score")
    logs, feats, model = str(root / "logs"), str(root / "feats"), str(root / "model")
    write_logs(SimulatorConfig(n_requests=300, n_users=100, n_items=2000, n_days=2), logs)
    spec = extract_features(logs, feats, FeaturesConfig())
    torch.manual_seed(3)
    net = PolicyNet(PolicyConfig(n_numeric=len(spec["numeric"]),
                                 cat_sizes=[c["size"] for c in spec["categorical"]],
                                 n_objectives=len(spec["objectives"])))
    with torch.no_grad():
        for p in net.parameters():
            p.add_(torch.randn_like(p) * 0.5)  # personalised weights, not the initial constant
    with store.publishing(model) as staging:
        save_policy(net, staging)
        (staging / "feature_spec.json").write_bytes(store.read_bytes(store.join(feats, "feature_spec.json")))
    return logs, feats, model, net


def test_scores_match_training_time_fusion(setup, tmp_path):
    logs, feats, model, net = setup
    out = str(tmp_path / "scores")
    assert cli.run(score_cli.main, ["--requests", logs, "--model", model, "--out", out]) == 0
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
    from grade.registry import Registry

    reg = Registry(str(tmp_path / "reg"))
    version, _ = reg.register(model)
    reg.set_production(version, "test", expected_etag=None)
    out = str(tmp_path / "o2")
    assert cli.run(score_cli.main,
                   ["--requests", logs, "--registry", str(tmp_path / "reg"), "--out", out]) == 0
    assert "torchscript policy" in capsys.readouterr().out
    assert store.is_published(out)
