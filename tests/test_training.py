"""The training runtime: checkpoints (safetensors + JSON, keep two, refusals), fingerprint, progress,
publish."""

from __future__ import annotations

import ast
import json
import logging
from pathlib import Path

import pytest
import torch
from torch import nn

from grade.core import store
from grade.core.errors import InputError
from grade.core.progress import Progress
from grade.model import training

REPO = Path(__file__).resolve().parents[1]


def _trained_model_and_optimizer(seed: int = 0) -> tuple[nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 1))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for _ in range(3):
        optimizer.zero_grad()
        model(torch.randn(5, 3)).pow(2).mean().backward()
        optimizer.step()
    return model, optimizer


def _save(out: str, n: int, model: nn.Module, optimizer: torch.optim.Optimizer, fingerprint: dict) -> None:
    training.save_checkpoint(out, "epoch", n, fingerprint=fingerprint,
                             tensors={"model": training.state_tensors(model)}, optimizer=optimizer,
                             state={"epoch": n, "history": [n]}, log_lines=[f'{{"step": {n}}}\n'])


def test_checkpoint_round_trip_restores_model_optimizer_and_rng(tmp_path):
    model, optimizer = _trained_model_and_optimizer()
    fp = {"config": {"lr": 0.01}, "world_size": 1}
    _save(str(tmp_path), 1, model, optimizer, fp)
    expected_rng = torch.get_rng_state()
    torch.rand(10)   # move the RNG on: restore must bring it back

    fresh, fresh_opt = _trained_model_and_optimizer(seed=1)
    ckpt = training.load_checkpoint(str(tmp_path), fp)
    training.restore(ckpt, fresh, fresh_opt)
    assert ckpt.state["epoch"] == 1 and ckpt.state["history"] == [1] and ckpt.log_lines == ['{"step": 1}\n']
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), fresh.state_dict().values(),
                                                  strict=True))
    assert torch.equal(torch.get_rng_state(), expected_rng)
    # the next optimiser step is the same as the original's: its moments and step count came back
    for m, opt in ((model, optimizer), (fresh, fresh_opt)):
        opt.zero_grad()
        m(torch.ones(2, 3)).sum().backward()
        opt.step()
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), fresh.state_dict().values(),
                                                  strict=True))


def test_checkpoint_files_are_safetensors_and_json_only(tmp_path):
    model, optimizer = _trained_model_and_optimizer()
    _save(str(tmp_path), 1, model, optimizer, {"config": {}})
    folder = tmp_path / training.CHECKPOINTS / "epoch-0001"
    assert sorted(p.name for p in folder.iterdir()) == ["model.safetensors", "optimizer.safetensors",
                                                       "rng.safetensors", "state.json", "train_log.jsonl"]
    assert json.loads((folder / "state.json").read_text())["format"] == training.CHECKPOINT_FORMAT


def test_keeps_the_last_two_checkpoints(tmp_path):
    model, optimizer = _trained_model_and_optimizer()
    for n in (1, 2, 3, 4):
        _save(str(tmp_path), n, model, optimizer, {"config": {}})
    names = sorted(p.name for p in (tmp_path / training.CHECKPOINTS).iterdir())
    assert names == ["epoch-0003", "epoch-0004", "latest.json"]
    assert training.load_checkpoint(str(tmp_path)).state["epoch"] == 4
    _save(str(tmp_path), 4, model, optimizer, {"config": {}})   # rewritten (a resumed run): fallback stays
    assert (tmp_path / training.CHECKPOINTS / "epoch-0003").is_dir()


def test_refuses_a_checkpoint_of_another_run(tmp_path, caplog):
    model, optimizer = _trained_model_and_optimizer()
    _save(str(tmp_path), 1, model, optimizer, {"config": {"lr": 0.01}, "world_size": 1})
    with caplog.at_level(logging.WARNING, logger="grade.model.training"):
        assert training.load_checkpoint(str(tmp_path), {"config": {"lr": 0.02}, "world_size": 1}) is None
    assert "another run" in caplog.text


def test_refuses_an_old_format_checkpoint_with_a_clear_message(tmp_path, caplog):
    """The finetune checkpoints before the runtime: state.pt (torch.save) and state.json without a format."""
    folder = tmp_path / training.CHECKPOINTS / "step-000004"
    folder.mkdir(parents=True)
    (folder / "state.pt").write_bytes(b"not read")
    (folder / "state.json").write_text(json.dumps({"step": 4, "curve": [], "fingerprint": {}}))
    (tmp_path / training.CHECKPOINTS / "latest.json").write_text(
        json.dumps({"step": 4, "folder": "step-000004"}))
    with caplog.at_level(logging.WARNING, logger="grade.model.training"):
        assert training.load_checkpoint(str(tmp_path), {}) is None
    assert "old format" in caplog.text


def test_fingerprint_hashes_inputs_and_rejects_unpublished_ones(tmp_path):
    uri = str(tmp_path / "features")
    with store.publishing(uri) as staging:
        (staging / "a.txt").write_text("a")
    fp = training.run_fingerprint({"lr": 0.1, "hidden": (4,)}, {"features": uri}, 2)
    assert fp == {"config": {"lr": 0.1, "hidden": [4]}, "features": uri,
                  "features_content_hash": store.content_hash(uri), "world_size": 2}
    with pytest.raises(InputError, match="--init .*not a published folder"):
        training.run_fingerprint({}, {"init": str(tmp_path / "missing")}, 1)


def test_progress_lines_have_rate_eta_and_detail(caplog):
    logger = logging.getLogger("grade.test_progress")
    with caplog.at_level(logging.INFO, logger="grade.test_progress"):
        p = Progress("finetune", 4, "steps", rate_unit="requests", every_s=3600, done=2, logger=logger)
        p.add(1, 100)
        assert caplog.text == ""                      # not yet due
        p.add(1, 100, detail=lambda: "reward 0.5")   # complete: always logged
        p.finish()                                    # just logged: not repeated
    lines = caplog.text.strip().splitlines()
    assert len(lines) == 1 and "finetune: 4/4 steps (" in lines[0]
    assert "requests/s, ETA 0s); reward 0.5" in lines[0]
    assert p.amount == 200 and p.done == 4


def test_publish_writes_the_model_folder(tmp_path):
    from grade.model.policy import PolicyConfig, PolicyNet, load_policy

    policy = PolicyNet(PolicyConfig(n_numeric=1, cat_sizes=[2], n_objectives=3, hidden=[4]))
    fp = {"config": {"seed": 3}, "features": "f", "features_content_hash": "h", "world_size": 1}
    config = training.run_config("pretrain", fp, 3, policy.cfg)
    out = str(tmp_path / "model")
    training.publish_model(out, policy, {"objectives": ["a"]}, config, {"stage": "x"}, ["{}\n"])
    assert set(store.read_manifest(out)["files"]) == {"policy.safetensors", "policy.json",
                                                      "feature_spec.json", "config.json", "metrics.json",
                                                      "train_log.jsonl"}
    written = json.loads(Path(out, "config.json").read_text())
    assert written["pretrain"] == {"seed": 3} and written["features_content_hash"] == "h"
    assert written["policy"]["hidden"] == [4] and written["seed"] == 3
    assert load_policy(out).cfg == policy.cfg


def test_no_pickle_in_the_code():
    """torch.save / torch.load / pickle are not called anywhere (safetensors + JSON only)."""
    calls = []
    for path in sorted(REPO.glob("*/**/*.py")):
        if ".venv" in path.parts or ".tmp" in path.parts:
            continue
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and (
                    (node.value.id == "torch" and node.attr in ("save", "load"))
                    or node.value.id in ("pickle", "cloudpickle", "joblib")):
                calls.append(f"{path.relative_to(REPO)}:{node.lineno}")
    assert calls == []
