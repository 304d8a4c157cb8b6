"""The policy network: initial mean, kappa bounds, Dirichlet safety, persistence, TorchScript serving."""

from __future__ import annotations

import json

import pytest
import torch

from grade.core import store
from grade.core.errors import InputError
from grade.model.policy import (
    CONFIG_FILE,
    WEIGHTS_FILE,
    PolicyConfig,
    PolicyNet,
    export_torchscript,
    load_policy,
    load_torchscript,
    save_policy,
)


def inputs(b=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, 3, generator=g), torch.stack(
        [torch.randint(0, 4, (b,), generator=g), torch.randint(0, 6, (b,), generator=g)], 1)


def make(**kw) -> PolicyNet:
    torch.manual_seed(0)
    return PolicyNet(PolicyConfig(n_numeric=3, cat_sizes=[4, 6], n_objectives=3, **kw))


def test_initial_mean_is_the_given_weights_for_every_request():
    model = make(init_mean=[0.2, 0.5, 0.3])
    mu = model.mean_weights(*inputs())
    assert torch.allclose(mu, torch.tensor([0.2, 0.5, 0.3]).expand_as(mu), atol=1e-6)
    uniform = make().mean_weights(*inputs())
    assert torch.allclose(uniform, torch.full_like(uniform, 1 / 3), atol=1e-6)


def test_kappa_bounded_and_starts_near_kappa_init():
    model = make(kappa_min=5.0, kappa_max=50.0, kappa_init=20.0)
    _, kappa = model(*inputs())
    assert torch.allclose(kappa, torch.full_like(kappa, 20.0), atol=0.1)
    # push the kappa head to its extremes: kappa saturates at the bounds
    with torch.no_grad():
        model.kappa_head.bias.fill_(100.0)
    assert torch.allclose(model(*inputs())[1], torch.tensor(50.0))
    with torch.no_grad():
        model.kappa_head.bias.fill_(-100.0)
    assert torch.allclose(model(*inputs())[1], torch.tensor(5.0))


def test_fixed_kappa_is_constant():
    model = make(fixed_kappa=30.0)
    with torch.no_grad():
        model.kappa_head.bias.fill_(5.0)
    assert (model(*inputs())[1] == 30.0).all()


def test_alpha_floor_keeps_dirichlet_safe():
    model = make(kappa_min=10.0, kappa_max=20.0, alpha_floor=0.2)
    with torch.no_grad():                       # a mean almost entirely on one objective
        model.mu_head.bias.copy_(torch.tensor([30.0, 0.0, 0.0]))
    alpha = model.alpha(*inputs())
    assert (alpha >= 0.2).all()
    mu, kappa = model(*inputs())
    assert torch.allclose(alpha, kappa[:, None] * mu + 0.2)
    dist = torch.distributions.Dirichlet(model.alpha(*inputs()))
    torch.manual_seed(1)
    w = dist.sample((64,))
    assert torch.allclose(w.sum(-1), torch.ones(64, 32), atol=1e-5) and (w >= 0).all()
    assert torch.isfinite(dist.log_prob(w.clamp_min(1e-6) / w.clamp_min(1e-6).sum(-1, keepdim=True))).all()


def test_mean_is_on_the_simplex_and_depends_on_features():
    model = make()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.5 * torch.randn_like(p))
    mu = model.mean_weights(*inputs())
    assert torch.allclose(mu.sum(-1), torch.ones(32)) and (mu > 0).all()
    assert mu.std(0).max() > 1e-3
    assert not mu.requires_grad


def test_save_load_roundtrip(tmp_path):
    model = make(hidden=[8, 4], emb_dim=3, init_mean=[0.1, 0.6, 0.3], fixed_kappa=12.0)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    save_policy(model, tmp_path / "m")
    cfg = json.loads((tmp_path / "m" / CONFIG_FILE).read_text())
    assert cfg["hidden"] == [8, 4] and cfg["fixed_kappa"] == 12.0
    loaded = load_policy(tmp_path / "m")
    x = inputs()
    assert torch.equal(loaded(*x)[0], model(*x)[0]) and torch.equal(loaded(*x)[1], model(*x)[1])
    assert not loaded.training


def test_load_from_s3(s3_env, tmp_path):
    model = make()
    save_policy(model, tmp_path / "m")
    for name in (WEIGHTS_FILE, CONFIG_FILE):
        store.upload_file(tmp_path / "m" / name, store.join(s3_env, "p", name))
    x = inputs()
    assert torch.equal(load_policy(store.join(s3_env, "p")).mean_weights(*x), model.mean_weights(*x))


def test_load_errors_are_input_errors(tmp_path):
    with pytest.raises(InputError, match="not a policy folder"):
        load_policy(tmp_path / "nothing")
    save_policy(make(), tmp_path / "m")
    (tmp_path / "m" / CONFIG_FILE).write_text(json.dumps({"n_numeric": 3, "bogus": 1}))
    with pytest.raises(InputError, match="invalid policy config"):
        load_policy(tmp_path / "m")


def test_weights_file_is_plain_safetensors(tmp_path):
    from safetensors.torch import load_file

    model = make()
    save_policy(model, tmp_path / "m")
    state = load_file(str(tmp_path / "m" / WEIGHTS_FILE))
    assert state.keys() == model.state_dict().keys()


def test_torchscript_serving_matches_the_mean(tmp_path):
    model = make(init_mean=[0.3, 0.3, 0.4])
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.2 * torch.randn_like(p))
    export_torchscript(model, tmp_path / "p.pt")
    scripted = load_torchscript(tmp_path / "p.pt")
    for b in (1, 17):
        x = inputs(b, seed=b)
        assert torch.allclose(scripted(*x), model.mean_weights(*x), atol=1e-6)
