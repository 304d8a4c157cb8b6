"""Data-parallel training: rank layout, gradient normalisation, and 2 processes vs 1 under torchrun."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from grade.core import distributed
from grade.data import dataset
from grade.train.pretrain import PretrainConfig, multi_objective_loss, valid_pair_counts

REPO = Path(__file__).resolve().parents[1]
TORCHRUN = Path(sys.executable).with_name("torchrun")
#: documented in docs/distributed.md: 2 processes vs 1, max |weight difference| (measured ~1e-5 / ~1e-6)
WEIGHT_TOLERANCE = 1e-4


# ------------------------------------------------------------------------------------------------
# Rank layout and helpers in one process
# ------------------------------------------------------------------------------------------------

def test_from_env_reads_torchrun_variables():
    ctx = distributed.from_env({"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1", "MASTER_ADDR": "h"})
    assert (ctx.rank, ctx.world_size, ctx.local_rank, ctx.distributed, ctx.is_main) == (3, 4, 1, True, False)
    single = distributed.from_env({})
    assert (single.rank, single.world_size, single.distributed, single.is_main) == (0, 1, False, True)


@pytest.mark.parametrize("env", [{"RANK": "2", "WORLD_SIZE": "2"}, {"RANK": "x", "WORLD_SIZE": "2"},
                                 {"RANK": "0", "WORLD_SIZE": "0"}])
def test_from_env_rejects_inconsistent_layouts(env):
    with pytest.raises(ValueError, match="RANK"):
        distributed.from_env(env)


def test_single_process_helpers_are_identities():
    t = torch.arange(6.0).reshape(3, 2)
    assert not distributed.active()
    assert distributed.gather_rows(t) is t
    assert distributed.all_sum(t) is t
    assert distributed.local_rows(5).tolist() == [0, 1, 2, 3, 4]
    model = torch.nn.Linear(2, 1)
    model(t).sum().backward()
    before = model.weight.grad.clone()
    distributed.GradientAverager()(model)
    assert torch.equal(model.weight.grad, before)


def test_gradient_averager_counts_a_missing_gradient_as_zero_in_one_collective(monkeypatch):
    """The one averager of both stages: the other rank's gradients arrive through a stand-in all-reduce."""
    model = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Linear(2, 1))
    model[0](torch.ones(1, 2)).sum().backward()   # the second layer gets no gradient on this rank
    mine = [p.grad.clone() if p.grad is not None else torch.zeros_like(p) for p in model.parameters()]
    other = [torch.full_like(p, 3.0) for p in model.parameters()]
    calls = []

    def fake_all_reduce(flat, op=None):
        calls.append(flat.numel())
        flat += torch.cat([o.reshape(-1) for o in other])

    monkeypatch.setattr(distributed, "active", lambda: True)
    monkeypatch.setattr(distributed.dist, "all_reduce", fake_all_reduce)
    distributed.GradientAverager(world=2)(model)
    assert calls == [sum(p.numel() for p in model.parameters())]
    for p, m, o in zip(model.parameters(), mine, other, strict=True):
        assert torch.equal(p.grad, (m + o) / 2)


def test_local_rows_interleave_like_the_round_robin_deal():
    # a global batch of 7 over 3 ranks: rank r holds rows r, r+3, ...
    assert distributed.local_rows(7, 0, 3).tolist() == [0, 3, 6]
    assert distributed.local_rows(7, 2, 3).tolist() == [2, 5]


# ------------------------------------------------------------------------------------------------
# Pretraining's loss normalisation: per-rank pair sums / global pair count = the global batch's loss
# ------------------------------------------------------------------------------------------------

def _batch() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    n, length = 8, 5
    mask = torch.ones(n, length, dtype=torch.bool)
    mask[1, 3:] = False
    click = (torch.rand(n, length, generator=g) < 0.4).float() * mask
    order = click * (torch.rand(n, length, generator=g) < 0.5).float()
    return {"z": torch.randn(n, length, 3, generator=g) * mask[..., None], "mask": mask,
            "num": torch.randn(n, 2, generator=g), "cat": torch.zeros(n, 1, dtype=torch.long),
            "click": click, "order": order, "gmv": order * 40.0}


def test_valid_pair_counts_by_hand():
    batch = {"mask": torch.tensor([[True, True, True], [True, True, False]]),
             "click": torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]]),
             "order": torch.tensor([[1.0, 0.0, 1.0], [0.0, 0.0, 0.0]]),
             "gmv": torch.zeros(2, 3)}
    cfg = PretrainConfig(objective_weights={"click": 1.0, "order": 1.0})
    scores = torch.tensor([[0.3, 0.2, 0.1], [0.0, 1.0, 5.0]])
    # click: request 0 has 1 positive over 2 negatives = 2 pairs; request 1: 1 over 1 real negative = 1
    # order: request 0 has 2 positives over 1 negative = 2 pairs; request 1: none
    assert valid_pair_counts(scores, batch, cfg) == {"click": 3.0, "order": 2.0}
    # truncation at k=2 keeps the predicted top 2 only: request 0 items 0,1 (1 pair), request 1 items 1,0 (1)
    assert valid_pair_counts(scores, batch,
                             PretrainConfig(objective_weights={"click": 1.0}, k=2)) == {"click": 2.0}
    # ndcgLoss1 counts every pair of real items (with itself): 3^2 + 2^2
    one = PretrainConfig(objective_weights={"click": 1.0}, weighing_scheme="ndcgLoss1")
    assert valid_pair_counts(scores, batch, one) == {"click": 13.0}


def test_two_halves_with_global_pair_counts_give_the_global_gradient():
    from grade.model.policy import PolicyConfig, PolicyNet
    from grade.train.pretrain import RankingModel

    torch.manual_seed(0)
    cfg = PretrainConfig()
    model = RankingModel(PolicyNet(PolicyConfig(n_numeric=2, cat_sizes=[2], n_objectives=3, hidden=[8])), 2.0)
    batch = _batch()

    def grads(loss):
        model.zero_grad(set_to_none=True)
        loss.backward()
        return torch.cat([p.grad.reshape(-1) for p in model.parameters() if p.grad is not None])

    full = grads(multi_objective_loss(model, batch, cfg)[0])
    halves = [{k: v[r::2] for k, v in batch.items()} for r in (0, 1)]   # the round-robin deal, w=2
    with torch.no_grad():
        counts = [valid_pair_counts(model.scores(h), h, cfg) for h in halves]
    per_rank = {name: (counts[0][name] + counts[1][name]) / 2 for name in counts[0]}
    averaged = sum(grads(multi_objective_loss(model, h, cfg, per_rank)[0]) for h in halves) / 2
    torch.testing.assert_close(averaged, full, rtol=1e-5, atol=1e-7)
    # a plain average of per-rank means is a different gradient here (rank pair counts differ)
    assert counts[0] != counts[1]
    naive = sum(grads(multi_objective_loss(model, h, cfg)[0]) for h in halves) / 2
    assert (naive - full).abs().max() > 1e-4


# ------------------------------------------------------------------------------------------------
# torchrun with 2 processes on the CPU vs one process
# ------------------------------------------------------------------------------------------------

def _env() -> dict[str, str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "GRADE_LOG_LEVEL": "INFO",
           "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(name, None)
    return env


def _run(args: list[str], nproc: int) -> subprocess.CompletedProcess:
    launcher = ([str(TORCHRUN), "--standalone", "--nproc-per-node", str(nproc)] if nproc > 1
                else [sys.executable])
    proc = subprocess.run([*launcher, "-m", *args], cwd=REPO, env=_env(), capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def _max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k].double() - b[k].double()).abs().max()) for k in a)


@pytest.fixture(scope="module")
def features(tmp_path_factory) -> Path:
    from grade.data.features import FeaturesConfig, extract_features
    from grade.data.simulator import SimulatorConfig, write_logs

    root = tmp_path_factory.mktemp("dist")
    write_logs(SimulatorConfig(n_requests=400, seed=0), str(root / "logs"))
    extract_features(str(root / "logs"), str(root / "features"), FeaturesConfig())
    # the equality holds when every train request is dealt to a rank (n % world_size == 0)
    assert dataset.count_requests(str(root / "features"), "train") % 2 == 0
    return root / "features"


PRETRAIN = ["--epochs", "2", "--batch-size", "64", "--threads", "1"]


@pytest.mark.slow
def test_torchrun_two_processes_match_one(features, tmp_path):
    one, two = tmp_path / "pre1", tmp_path / "pre2"
    _run(["components.pretrain", "--features", str(features), "--out", str(one), *PRETRAIN], 1)
    proc = _run(["components.pretrain", "--features", str(features), "--out", str(two), *PRETRAIN], 2)
    assert "rank 0 of 2" in proc.stderr

    # the trained weights after the last epoch (the published policy is the best epoch's)
    last1 = load_file(one / "_checkpoints" / "epoch-0002" / "model.safetensors")
    last2 = load_file(two / "_checkpoints" / "epoch-0002" / "model.safetensors")
    first = load_file(one / "_checkpoints" / "epoch-0001" / "best.safetensors")
    assert _max_diff(last1, first) > 100 * WEIGHT_TOLERANCE   # training moved the weights ...
    assert _max_diff(last1, last2) < WEIGHT_TOLERANCE          # ... the same way in both runs
    cfg2 = json.loads((two / "config.json").read_text())
    assert cfg2["world_size"] == 2 and cfg2["pretrain"]["batch_size"] == 64
    m1, m2 = (json.loads((d / "metrics.json").read_text()) for d in (one, two))
    for e1, e2 in zip(m1["epochs"][1:], m2["epochs"][1:], strict=True):
        assert e2["train_loss"] == pytest.approx(e1["train_loss"], rel=1e-4)   # the global batch's loss
    # only rank 0 wrote: one checkpoint set, one published folder, no stray staging folders
    assert sorted(p.name for p in (two / "_checkpoints").iterdir()) == ["epoch-0001", "epoch-0002",
                                                                        "latest.json"]

    # resume in distributed mode: both ranks continue from the epoch-1 checkpoint to the same weights
    resumed = tmp_path / "pre2r"
    (resumed / "_checkpoints").mkdir(parents=True)
    shutil.copytree(two / "_checkpoints" / "epoch-0001", resumed / "_checkpoints" / "epoch-0001")
    (resumed / "_checkpoints" / "latest.json").write_text(json.dumps({"epoch": 1, "folder": "epoch-0001"}))
    proc = _run(["components.pretrain", "--features", str(features), "--out", str(resumed), *PRETRAIN], 2)
    assert "resuming after epoch 1" in proc.stderr
    assert _max_diff(load_file(resumed / "_checkpoints" / "epoch-0002" / "model.safetensors"), last2) == 0.0
    assert (resumed / "policy.safetensors").read_bytes() == (two / "policy.safetensors").read_bytes()

    # Stage 2 from the same Stage 1 model: same samples on 1 and 2 processes, same fine-tuned policy
    f1, f2 = tmp_path / "fine1", tmp_path / "fine2"
    args = ["--features", str(features), "--init", str(one), "--epochs", "2", "--batch-size", "64"]
    _run(["components.finetune", *args, "--out", str(f1)], 1)
    proc = _run(["components.finetune", *args, "--out", str(f2)], 2)
    assert proc.stdout.count('"steps"') == 1   # one summary: rank 0's
    p1, p2 = load_file(f1 / "policy.safetensors"), load_file(f2 / "policy.safetensors")
    stage1 = load_file(one / "policy.safetensors")
    assert _max_diff(p1, stage1) > 100 * WEIGHT_TOLERANCE
    assert _max_diff(p1, p2) < WEIGHT_TOLERANCE
    log1, log2 = ([json.loads(line) for line in (d / "train_log.jsonl").read_text().splitlines()]
                  for d in (f1, f2))
    assert len(log1) == len(log2) == 8   # 2 epochs x floor(280 train requests / 64)
    # the first step's gradient is computed from the same samples on the same weights
    assert log2[0]["grad/norm"] == pytest.approx(log1[0]["grad/norm"], rel=1e-5)
    assert log2[0]["requests"] == log1[0]["requests"] // 2
    m1, m2 = (json.loads((d / "metrics.json").read_text()) for d in (f1, f2))
    assert m2["final"]["replay/ndcg_order"] == pytest.approx(m1["final"]["replay/ndcg_order"], abs=1e-5)


@pytest.mark.slow
def test_pipeline_training_step_runs_in_process_or_on_two_processes(features, tmp_path):
    """The KFP training components call this: workers 1 runs ``main`` here, 2 launches torchrun."""
    from components.pretrain import main
    from grade.core import store
    from pipeline.step_io import StepFailed, run_training_step

    argv = ["--features", str(features), "--epochs", "1", "--batch-size", "64", "--threads", "1"]
    monkey_env = {k: os.environ.pop(k) for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK") if k in os.environ}
    try:
        run_training_step("pretrain", main, [*argv, "--out", str(tmp_path / "one")], workers=1)
        run_training_step("pretrain", main, [*argv, "--out", str(tmp_path / "two")], workers=2)
        with pytest.raises(StepFailed, match="status"):
            run_training_step("pretrain", main, ["--features", str(tmp_path / "none"), "--out",
                                                 str(tmp_path / "bad")], workers=2)
    finally:
        os.environ.update(monkey_env)
    for name in ("one", "two"):
        assert store.is_published(str(tmp_path / name))
    assert json.loads((tmp_path / "two" / "config.json").read_text())["world_size"] == 2
    assert _max_diff(load_file(tmp_path / "one" / "policy.safetensors"),
                     load_file(tmp_path / "two" / "policy.safetensors")) < WEIGHT_TOLERANCE
    assert not (tmp_path / "bad").exists()
