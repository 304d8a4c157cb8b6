"""Stage 1 pretraining: outputs, learning on a personalisable data set, determinism, resume, CLI."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from safetensors.torch import load_file

import grade.core.cli
from components import pretrain as pretrain_cli
from grade.core import store
from grade.data.features import FeaturesConfig, extract_features
from grade.model.policy import load_policy
from grade.model.training import load_checkpoint
from grade.train.pretrain import (
    PretrainConfig,
    gmv_grades,
    multi_objective_loss,
    policy_config,
    pretrain,
    with_signal,
)

REPO = Path(__file__).resolve().parents[1]
MODEL_FILES = {"policy.safetensors", "policy.json", "feature_spec.json", "config.json", "metrics.json",
               "train_log.jsonl"}


def personalised_logs(n_requests: int, list_size: int = 8, seed: int = 0) -> pd.DataFrame:
    """Logs where the best fusion weights differ by a visible user feature (c_segment).

    Segment 0 orders what it is predicted to click and convert on; segment 1 orders expensive items
    (high pred_gmv). One global weight vector cannot serve both; a per-request policy can.
    """
    rng = np.random.default_rng(seed)
    n = n_requests * list_size
    req = np.repeat(np.arange(n_requests), list_size)
    pos = np.tile(np.arange(list_size), n_requests)
    seg = rng.integers(0, 2, n_requests)[req]
    ctr, cvr = rng.uniform(0.02, 0.4, n), rng.uniform(0.02, 0.3, n)
    value = np.exp(rng.uniform(1, 6, n))
    util = np.where(seg == 0, 2 * np.log(ctr) + np.log(cvr), np.log(value) + 0.3 * np.log(ctr))
    util = (util - util.mean()) / util.std()
    p_click = 1 / (1 + np.exp(-(1.5 * util - 0.5)))
    click = (rng.random(n) < p_click).astype(np.int8)
    order = (click * (rng.random(n) < 0.5 * p_click)).astype(np.int8)
    return pd.DataFrame({
        "request_id": req.astype(np.int64) + 1, "user_id": (req % 50).astype(np.int64),
        "event_time": pd.Timestamp("2026-03-01") + pd.to_timedelta(req, unit="min"),
        "u_noise": rng.normal(size=n_requests)[req].astype(np.float32),
        "c_segment": seg.astype(np.int32), "item_id": (req * 100 + pos).astype(np.int64),
        "position": pos.astype(np.int16), "pred_ctr": ctr.astype(np.float32),
        "pred_cvr": cvr.astype(np.float32), "pred_gmv": value.astype(np.float32),
        "click": click, "order": order, "gmv": np.where(order == 1, value, 0).astype(np.float32),
    })


def build_features(root: Path, n_requests: int, seed: int = 0) -> str:
    logs = root / "logs"
    logs.mkdir(parents=True)
    pq.write_table(pa.Table.from_pandas(personalised_logs(n_requests, seed=seed), preserve_index=False),
                   logs / "part-00000.parquet")
    extract_features(str(logs), str(root / "features"), FeaturesConfig(shard_requests=200))
    return str(root / "features")


@pytest.fixture(scope="module")
def features(tmp_path_factory) -> str:
    return build_features(tmp_path_factory.mktemp("pretrain-data"), 1600)


def small_cfg(**kw) -> PretrainConfig:
    base = dict(epochs=3, batch_size=128, lr=1e-2, patience=5, hidden=[16], emb_dim=4, threads=1)
    base.update(kw)
    return PretrainConfig(**base)


def weights_of(uri: str) -> dict[str, torch.Tensor]:
    return load_file(str(Path(uri, "policy.safetensors")))


def same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def without_timings(metrics: dict) -> dict:
    m = json.loads(json.dumps(metrics))
    m.pop("requests_per_s")
    for h in m["epochs"]:
        h.pop("requests_per_s", None)
        h.pop("seconds", None)
    return m


# ------------------------------------------------------------------------------------------------
# Pieces
# ------------------------------------------------------------------------------------------------

def test_gmv_grades_by_hand():
    gmv = torch.tensor([[0.0, 5.0, 9.99, 10.0, 50.0, 500.0, 5e4, 5e6]])
    assert gmv_grades(gmv, PretrainConfig()).tolist() == [[0, 1, 1, 2, 2, 3, 4, 4]]
    assert gmv_grades(gmv, PretrainConfig(gmv_max_grade=2)).tolist() == [[0, 1, 1, 2, 2, 2, 2, 2]]
    assert torch.allclose(gmv_grades(gmv, PretrainConfig(gmv_label="log1p")), torch.log1p(gmv))


def test_policy_starts_at_the_static_weights(features):
    from grade.data.dataset import load_spec, load_split
    from grade.model.policy import PolicyNet

    spec = load_spec(features)
    pcfg = policy_config(spec, small_cfg())
    assert pcfg.n_numeric == 1 and pcfg.cat_sizes == [spec["categorical"][0]["size"]]
    assert pcfg.n_objectives == 3
    s = torch.tensor(spec["pred_log_std"])
    data = load_split(features, "valid", fields=["num", "cat"])
    mu = PolicyNet(pcfg).mean_weights(data["num"], data["cat"])
    assert torch.allclose(mu, (s / s.sum()).expand_as(mu), atol=1e-6)


def test_loss_terms_follow_the_objective_weights(features):
    from grade.data.dataset import load_spec, load_split
    from grade.model.policy import PolicyNet

    batch = load_split(features, "train", fields=["z", "mask", "num", "cat", "click", "order", "gmv"])
    batch = {k: v[:64] for k, v in batch.items()}
    model = PolicyNet(policy_config(load_spec(features), small_cfg()))
    total, parts = multi_objective_loss(model, batch,
                                        small_cfg(objective_weights={"click": 1.0, "order": 2.0, "gmv": 0.5}))
    assert set(parts) == {"click", "order", "gmv"}
    assert total.item() == pytest.approx(parts["click"] + 2 * parts["order"] + 0.5 * parts["gmv"], rel=1e-6)
    _, only_order = multi_objective_loss(model, batch,
                                         small_cfg(objective_weights={"click": 0.0, "order": 1.0}))
    assert set(only_order) == {"order"} and only_order["order"] == pytest.approx(parts["order"], rel=1e-6)
    kept = with_signal(batch, small_cfg())
    has_label = ((batch["click"] > 0) | (batch["order"] > 0) | (batch["gmv"] > 0)).any(-1)
    assert kept["mask"].shape[0] == int(has_label.sum()) < 64


# ------------------------------------------------------------------------------------------------
# A whole run
# ------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def trained(features, tmp_path_factory) -> tuple[str, dict]:
    out = str(tmp_path_factory.mktemp("pretrain-run") / "model")
    metrics = pretrain(features, out, small_cfg(epochs=4))
    return out, metrics


def test_publishes_the_model_folder(trained, features):
    out, metrics = trained
    manifest = store.read_manifest(out)
    assert set(manifest["files"]) == MODEL_FILES            # checkpoints stay outside the manifest
    assert store.exists(store.join(out, "_checkpoints", "latest.json"))
    assert json.loads(Path(out, "metrics.json").read_text()) == json.loads(json.dumps(metrics))
    config = json.loads(Path(out, "config.json").read_text())
    assert config["features"] == features and config["seed"] == 0 and config["pretrain"]["epochs"] == 4
    assert config["features_content_hash"] == store.content_hash(features)
    assert json.loads(Path(out, "feature_spec.json").read_text()) == json.loads(
        Path(features, "feature_spec.json").read_text())
    log_lines = [json.loads(line) for line in Path(out, "train_log.jsonl").read_text().splitlines()]
    n_train = metrics["n_train_requests"]
    assert len(log_lines) == 4 * -(-n_train // 128)
    assert {"epoch", "step", "pretrain.loss", "pretrain.loss.order"} <= set(log_lines[0])
    policy = load_policy(out)
    assert policy.cfg.init_mean is not None


def test_metrics_per_epoch_for_policy_and_static(trained):
    _, metrics = trained
    assert [h["epoch"] for h in metrics["epochs"]] == [0, 1, 2, 3, 4]
    first = metrics["epochs"][0]
    # epoch 0 is the initial policy, which is the static weights
    for obj in ("click", "order", "gmv"):
        assert first["valid_ndcg"]["policy"][obj] == pytest.approx(first["valid_ndcg"]["static"][obj],
                                                                   abs=1e-6)
    for h in metrics["epochs"][1:]:
        assert h["train_loss"] > 0 and set(h["train_loss_by_objective"]) == {"click", "order", "gmv"}
        assert set(h["valid_ndcg"]["policy"]) == set(h["valid_ndcg"]["static"]) == {"click", "order", "gmv"}
        assert all(0 < v <= 1 for v in h["valid_ndcg"]["policy"].values())
        assert h["requests_per_s"] > 0
    best = max(metrics["epochs"], key=lambda h: h["valid_ndcg"]["policy"]["order"])
    assert metrics["best_epoch"] == best["epoch"]
    assert metrics["best"] == best["valid_ndcg"]


def test_policy_beats_static_on_personalisable_data(trained):
    _, metrics = trained
    best = metrics["best"]
    # the segments want opposite weights: the learned per-request weights must rank orders better
    assert best["policy"]["order"] > best["static"]["order"] + 0.01
    assert metrics["best_epoch"] >= 1


def test_learned_weights_differ_by_segment(trained, features):
    from grade.data.dataset import load_split

    data = load_split(features, "valid", fields=["num", "cat"])
    mu = load_policy(trained[0]).mean_weights(data["num"], data["cat"])
    seg1 = data["cat"][:, 0] == 2      # vocabulary id of segment value 1 (ids by frequency; 0 = OOV)
    seg_a, seg_b = mu[seg1].mean(0), mu[~seg1].mean(0)
    # the gmv weight (last objective) is larger for one segment than for the other
    assert abs(float(seg_a[2] - seg_b[2])) > 0.02


def test_same_seed_same_weights_other_seed_differs(features, tmp_path):
    a = pretrain(features, str(tmp_path / "a"), small_cfg(epochs=2))
    b = pretrain(features, str(tmp_path / "b"), small_cfg(epochs=2))
    c = pretrain(features, str(tmp_path / "c"), small_cfg(epochs=2, seed=1))
    assert same_weights(weights_of(str(tmp_path / "a")), weights_of(str(tmp_path / "b")))
    assert without_timings(a) == without_timings(b)
    assert not same_weights(weights_of(str(tmp_path / "a")), weights_of(str(tmp_path / "c")))
    assert without_timings(a) != without_timings(c)


def test_early_stopping_keeps_the_best_epoch(features, tmp_path):
    # min_delta = 1: no NDCG gain counts as an improvement on the initial policy, so training stops after
    # `patience` epochs and the output is the initial (static) policy of epoch 0
    metrics = pretrain(features, str(tmp_path / "m"), small_cfg(epochs=10, min_delta=1.0, patience=2))
    assert metrics["early_stopped"] and metrics["epochs_run"] == 2 and metrics["best_epoch"] == 0
    from grade.data.dataset import load_spec
    from grade.model.policy import PolicyNet

    torch.manual_seed(0)
    initial = PolicyNet(policy_config(load_spec(features), small_cfg()))
    assert same_weights(weights_of(str(tmp_path / "m")), {k: v for k, v in initial.state_dict().items()})


# ------------------------------------------------------------------------------------------------
# Resume
# ------------------------------------------------------------------------------------------------

class Crash(Exception):
    pass


def test_interrupted_run_resumes_and_matches_an_uninterrupted_one(features, tmp_path):
    cfg = small_cfg(epochs=3)
    full = pretrain(features, str(tmp_path / "full"), cfg)

    def crash_after_first(epoch):
        if epoch == 1:
            raise Crash

    out = str(tmp_path / "resumed")
    with pytest.raises(Crash):
        pretrain(features, out, cfg, on_epoch_end=crash_after_first)
    assert not store.is_published(out)
    assert load_checkpoint(out).state["epoch"] == 1

    seen = []
    resumed = pretrain(features, out, cfg, on_epoch_end=seen.append)
    assert seen == [2, 3]                                  # epoch 1 was not trained again
    assert same_weights(weights_of(out), weights_of(str(tmp_path / "full")))
    assert without_timings(resumed) == without_timings(full)
    assert Path(out, "train_log.jsonl").read_text() == Path(tmp_path, "full", "train_log.jsonl").read_text()

    # re-running a finished output trains nothing and republishes the same model
    again = []
    pretrain(features, out, cfg, on_epoch_end=again.append)
    assert again == [] and same_weights(weights_of(out), weights_of(str(tmp_path / "full")))


def test_checkpoint_of_another_config_is_not_resumed(features, tmp_path):
    out = str(tmp_path / "m")
    pretrain(features, out, small_cfg(epochs=1))
    seen = []
    pretrain(features, out, small_cfg(epochs=1, lr=5e-3), on_epoch_end=seen.append)
    assert seen == [1]
    fresh = str(tmp_path / "fresh")
    pretrain(features, fresh, small_cfg(epochs=1, lr=5e-3))
    assert same_weights(weights_of(out), weights_of(fresh))


def test_killed_process_resumes_from_its_checkpoint(features, tmp_path):
    yaml_path = tmp_path / "config.yaml"
    yaml_path.write_text("pretrain:\n  epochs: 3\n  batch_size: 128\n  lr: 0.01\n  hidden: [16]\n"
                         "  emb_dim: 4\n  threads: 1\n  patience: 5\n")
    out = tmp_path / "killed"
    # SIGKILL right after the first epoch's checkpoint: no cleanup, no publish
    script = textwrap.dedent(f"""
        import os, signal
        from grade.core.config import load_section
        from grade.train.pretrain import pretrain
        cfg = load_section({str(yaml_path)!r}, "pretrain")
        def kill(epoch):
            if epoch == 1:
                os.kill(os.getpid(), signal.SIGKILL)
        pretrain({features!r}, {str(out)!r}, cfg, on_epoch_end=kill)
    """)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, "-c", script], env=env, cwd=REPO, capture_output=True, timeout=120)
    assert proc.returncode == -signal.SIGKILL, proc.stderr.decode()[-2000:]
    assert not store.is_published(str(out))
    assert load_checkpoint(str(out)).state["epoch"] == 1

    argv = ["--features", features, "--out", str(out), "--config", str(yaml_path)]
    assert grade.core.cli.run(pretrain_cli.main, argv) == 0
    reference = tmp_path / "reference"
    assert grade.core.cli.run(pretrain_cli.main, ["--features", features, "--out", str(reference),
                                             "--config", str(yaml_path)]) == 0
    assert same_weights(weights_of(str(out)), weights_of(str(reference)))
    metrics = json.loads(Path(out, "metrics.json").read_text())
    assert without_timings(metrics) == without_timings(
        json.loads(Path(reference, "metrics.json").read_text()))


def test_runs_and_resumes_on_s3(features, s3_env):
    out = s3_env + "/models/stage1"
    cfg = small_cfg(epochs=2)

    def crash(epoch):
        raise Crash

    with pytest.raises(Crash):
        pretrain(features, out, cfg, on_epoch_end=crash)
    seen = []
    pretrain(features, out, cfg, on_epoch_end=seen.append)
    assert seen == [2]
    assert set(store.read_manifest(out)["files"]) == MODEL_FILES
    local = load_policy(out)
    assert local.cfg.n_objectives == 3


# ------------------------------------------------------------------------------------------------
# Command line
# ------------------------------------------------------------------------------------------------

def test_cli_help_documents_every_option(capsys):
    with pytest.raises(SystemExit) as e:
        pretrain_cli.main(["--help"])
    assert e.value.code == 0
    text = capsys.readouterr().out
    for flag in ("--features", "--out", "--config", "--epochs", "--seed", "--batch-size", "--threads"):
        assert flag in text


def test_cli_overrides_and_bad_input_exit_2(features, tmp_path, capsys):
    out = tmp_path / "m"
    assert grade.core.cli.run(pretrain_cli.main, ["--features", features, "--out", str(out), "--epochs", "1",
                                             "--seed", "3", "--batch-size", "256"]) == 0
    config = json.loads((out / "config.json").read_text())
    assert config["seed"] == 3 and config["pretrain"]["epochs"] == 1
    assert config["pretrain"]["batch_size"] == 256

    bad_key = tmp_path / "bad.yaml"
    bad_key.write_text("pretrain:\n  epoch: 3\n")
    assert grade.core.cli.run(pretrain_cli.main, ["--features", features, "--out", str(tmp_path / "x"),
                                             "--config", str(bad_key)]) == 2
    assert "epoch" in capsys.readouterr().err

    bad_obj = tmp_path / "obj.yaml"
    bad_obj.write_text("pretrain:\n  objective_weights: {clicks: 1.0}\n")
    assert grade.core.cli.run(pretrain_cli.main, ["--features", features, "--out", str(tmp_path / "y"),
                                             "--config", str(bad_obj)]) == 2
    assert "clicks" in capsys.readouterr().err

    assert grade.core.cli.run(pretrain_cli.main, ["--features", str(tmp_path / "missing"), "--out",
                                             str(tmp_path / "z")]) == 2
    assert "missing" in capsys.readouterr().err
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists() and not (tmp_path / "z").exists()


def test_fitted_score_scale_minimises_the_initial_loss(features):
    from grade.data.dataset import iter_batches, load_spec
    from grade.model.policy import PolicyNet
    from grade.train.pretrain import RankingModel, fit_score_scale

    cfg = small_cfg()
    torch.manual_seed(0)
    policy = PolicyNet(policy_config(load_spec(features), cfg))
    scale = fit_score_scale(policy, features, cfg)
    grid = [2.0 ** (e / 2) for e in range(-4, 13)]
    assert scale in grid
    batch = with_signal(next(iter_batches(features, "train", 1024, fields=[
        "z", "mask", "num", "cat", "click", "order", "gmv"])), cfg)

    def loss(s):
        return multi_objective_loss(RankingModel(policy, s, learn_scale=False), batch, cfg)[0].item()

    assert all(loss(scale) <= loss(s) for s in grid)
    # the scale multiplies the scores: no ranking changes, so no validation metric does
    model = RankingModel(policy, 3.0)
    assert torch.equal(torch.sort(model.scores(batch), dim=-1, stable=True).indices,
                       torch.sort(RankingModel(policy, 1.0).scores(batch), dim=-1, stable=True).indices)


@pytest.mark.slow
def test_beats_static_on_20k_simulated_requests(tmp_path):
    """The acceptance run: simulate -> features -> pretrain with default settings."""
    from components import features as features_cli
    from components import simulate as simulate_cli

    logs, feats, model = tmp_path / "logs", tmp_path / "features", tmp_path / "stage1"
    assert grade.core.cli.run(simulate_cli.main, ["--out", str(logs), "--requests", "20000"]) == 0
    assert grade.core.cli.run(features_cli.main, ["--logs", str(logs), "--out", str(feats)]) == 0
    assert grade.core.cli.run(pretrain_cli.main, ["--features", str(feats), "--out", str(model)]) == 0
    metrics = json.loads((model / "metrics.json").read_text())
    assert metrics["exposure_depth"] == 10 and metrics["best_epoch"] >= 1
    assert metrics["best"]["policy"]["order"] > metrics["best"]["static"]["order"]


def _features_with_labels(root: Path, **labels) -> str:
    """Features of 300 requests whose label columns are replaced (e.g. click=0: no click anywhere)."""
    logs = personalised_logs(300)
    for name, value in labels.items():
        logs[name] = np.zeros(len(logs), dtype=logs[name].dtype) + value
    (root / "logs").mkdir(parents=True)
    pq.write_table(pa.Table.from_pandas(logs, preserve_index=False), root / "logs" / "part-00000.parquet")
    extract_features(str(root / "logs"), str(root / "features"), FeaturesConfig())
    return str(root / "features")


def test_no_positive_label_is_refused_before_training(tmp_path, capsys):
    """With every click (hence order and gmv) zero there is nothing to rank by: pretraining would
    publish the initial policy after epochs of zero loss ("best epoch 0"). Refused, exit 2."""
    features = _features_with_labels(tmp_path, click=0, order=0, gmv=0.0)
    out = str(tmp_path / "model")
    assert grade.core.cli.run(pretrain_cli.main, ["--features", features, "--out", out]) == 2
    err = capsys.readouterr().err.strip()
    assert f"{features}: no train request has a click, order or gmv > 0" in err and len(err.splitlines()) == 1
    assert not store.exists(store.join(out, "_checkpoints")) and not store.is_published(out)


def test_an_objective_without_positive_labels_is_warned_about(tmp_path, caplog):
    features = _features_with_labels(tmp_path, order=0, gmv=0.0)
    with caplog.at_level("WARNING", logger="grade.train.pretrain"):
        pretrain(features, str(tmp_path / "model"), small_cfg(epochs=1))
    warned = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert any("no train request has order or gmv > 0" in m for m in warned), warned
    assert not any("click" in m for m in warned)
