"""The outcome model, the value model folder and the declared business value."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest
import torch

from grade.core import config
from grade.core.errors import ConfigError
from grade.data.simulator import SimulatorConfig
from grade.value.business import BusinessConfig
from grade.value.examination import ExaminationEstimate
from grade.value.outcome import (
    OutcomeConfig,
    OutcomeNet,
    OutcomeSpec,
    calibration,
    evaluate_loss,
    fit_outcome,
    mean_order_value,
    outcome_loss,
)
from tests.sim_tensors import simulated_batch


def _tiny_batch(b: int = 2, length: int = 3) -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    pred = torch.stack([torch.rand(b, length) * 0.5 + 0.1, torch.rand(b, length) * 0.3 + 0.05,
                        torch.rand(b, length) * 50 + 10], -1)
    return {"z": torch.randn(b, length, 3), "pred": pred, "mask": torch.ones(b, length, dtype=torch.bool),
            "num": torch.randn(b, 2), "cat": torch.zeros(b, 1, dtype=torch.long)}


def _net() -> OutcomeNet:
    return OutcomeNet(OutcomeSpec(objectives=["ctr", "cvr", "gmv"], n_numeric=2, cat_sizes=[3],
                                  hidden=[8], emb_dim=2))


def test_a_fresh_model_predicts_exactly_the_mtl_predictions():
    batch = _tiny_batch()
    out = _net().item_outcomes(batch)
    assert torch.allclose(out["ctr"], batch["pred"][..., 0], atol=1e-6)
    assert torch.allclose(out["cvr"], batch["pred"][..., 1], atol=1e-6)
    assert torch.allclose(out["value"], batch["pred"][..., 2], rtol=1e-5)


def test_a_missing_objective_starts_from_even_odds():
    net = OutcomeNet(OutcomeSpec(objectives=["ctr", "rel"], n_numeric=2, cat_sizes=[3], hidden=[8],
                                 emb_dim=2))
    batch = _tiny_batch()
    batch["pred"], batch["z"] = batch["pred"][..., :2], batch["z"][..., :2]
    out = net.item_outcomes(batch)
    assert torch.allclose(out["cvr"], torch.full_like(out["cvr"], 0.5))


def test_loss_is_the_position_based_likelihood_by_hand():
    # one request, two items: logits 0 -> ctr 0.5; theta at logged positions 1 and 0.5
    logits = torch.zeros(1, 2, 3)
    batch = {"mask": torch.tensor([[True, True]]), "click": torch.tensor([[1.0, 0.0]]),
             "order": torch.tensor([[1.0, 0.0]]), "gmv": torch.tensor([[math.e, 0.0]])}
    theta = torch.tensor([[1.0, 0.5]])
    loss = outcome_loss(logits, batch, theta, value_weight=0.5)
    # click: -(log 0.5 + log(1 - 0.25)) / 2; order: BCE(0 logit, 1) on the one click; value: (0 - 1)^2
    assert float(loss["click"]) == pytest.approx(-(math.log(0.5) + math.log(0.75)) / 2, rel=1e-5)
    assert float(loss["order"]) == pytest.approx(math.log(2), rel=1e-5)
    assert float(loss["value"]) == pytest.approx(1.0, rel=1e-5)
    assert float(loss["total"]) == pytest.approx(float(loss["click"] + loss["order"]) + 0.5, rel=1e-5)


def test_calibration_by_hand():
    probs = torch.tensor([0.1, 0.1, 0.9, 0.9])
    labels = torch.tensor([0.0, 0.0, 1.0, 0.0])
    c = calibration(probs, labels, bins=2)
    assert c["bins"] == [{"predicted": pytest.approx(0.1), "observed": 0.0, "n": 2},
                         {"predicted": pytest.approx(0.9), "observed": 0.5, "n": 2}]
    assert c["ece"] == pytest.approx(0.5 * 0.1 + 0.5 * 0.4)
    expected = -(2 * math.log(0.9) + math.log(0.9) + math.log(0.1)) / 4
    assert c["logloss"] == pytest.approx(expected)


def test_mean_order_value_counts_only_orders():
    gmv = torch.tensor([[10.0, 0.0, 30.0]])
    order = torch.tensor([[1.0, 0.0, 1.0]])
    assert mean_order_value(gmv, order, torch.ones(1, 3, dtype=torch.bool)) == 20.0
    assert mean_order_value(gmv, torch.zeros(1, 3), torch.ones(1, 3, dtype=torch.bool)) == 1.0


def test_fitted_model_learns_what_the_mtl_model_misses():
    """On simulated logs the MTL model misses each segment's price sensitivity; the fitted order
    probability tracks the truth better than the MTL product pctr * pcvr (held-out requests)."""
    data = simulated_batch(SimulatorConfig(seed=3, n_requests=8000, n_users=2000))
    data["cat"] = torch.zeros(data["mask"].shape[0], 1, dtype=torch.long)
    spec = {"objectives": ["ctr", "cvr", "gmv"], "categorical": [{"size": 1}]}
    train = {k: v[:6400] for k, v in data.items()}
    held = {k: v[6400:] for k, v in data.items()}
    # three passes at a fixed budget (no valid split, so no early stopping): the rate these were measured at
    model, history = fit_outcome(train, spec, ExaminationEstimate.fixed(1.0, 20),
                                 OutcomeConfig(epochs=3, lr=3e-3, seed=0))
    assert history[-1]["loss/total"] < history[0]["loss/total"]
    with torch.no_grad():
        o = model.item_outcomes(held)
    truth = (held["true_ctr"] * held["true_cvr"]).flatten()
    ours = (o["ctr"] * o["cvr"]).flatten()
    mtl = (held["pred"][..., 0] * held["pred"][..., 1]).flatten()
    corr = lambda a, b: float(torch.corrcoef(torch.stack([a, b]))[0, 1])  # noqa: E731
    assert corr(ours, truth) > corr(mtl, truth) + 0.02   # measured: 0.837 vs 0.794


def test_early_stopping_keeps_the_pass_with_the_lowest_valid_loss():
    """A small train split overfits within a few passes: training stops ``patience`` passes after the
    best valid loss, and the returned weights are that pass's (their valid loss is the minimum)."""
    data = simulated_batch(SimulatorConfig(seed=4, n_requests=1200, n_users=300))
    data["cat"] = torch.zeros(data["mask"].shape[0], 1, dtype=torch.long)
    spec = {"objectives": ["ctr", "cvr", "gmv"], "categorical": [{"size": 1}]}
    train, valid = {k: v[:400] for k, v in data.items()}, {k: v[400:] for k, v in data.items()}
    exam = ExaminationEstimate.fixed(1.0, 20)
    cfg = OutcomeConfig(epochs=40, patience=2, lr=3e-2, hidden=[64, 64], batch_size=32, seed=0)
    model, history = fit_outcome(train, spec, exam, cfg, valid)
    losses = [row["valid/total"] for row in history]
    best = losses.index(min(losses))
    assert len(history) < cfg.epochs                      # it stopped early
    assert len(history) == best + 1 + cfg.patience        # exactly patience passes after the best
    assert evaluate_loss(model, valid, exam, cfg)["total"] == pytest.approx(min(losses), rel=1e-6)
    assert history[-1]["valid/total"] > min(losses)


def test_business_value_and_its_metric():
    b = BusinessConfig()
    assert b.primary_metric == "opm"
    assert BusinessConfig(orders=0, gmv=1).primary_metric == "gpm"
    assert BusinessConfig(clicks=1, orders=0).primary_metric == "ctr"
    assert BusinessConfig(clicks=0.1, orders=1).primary_metric == "vpm"
    v = BusinessConfig(clicks=1, orders=2, gmv=3).item_value(torch.tensor([1.0]), torch.tensor([0.5]),
                                                             torch.tensor([20.0]), order_value_unit=10.0)
    assert float(v) == pytest.approx(1 + 2 * 0.5 + 3 * 2.0)


@pytest.mark.parametrize("values", [{"orders": -1}, {"orders": 0}])
def test_business_refuses_negative_or_empty_values(values):
    with pytest.raises(ConfigError if values.get("orders", 0) < 0 else Exception):
        config.build(BusinessConfig, values, "business")


@pytest.mark.slow
def test_component_publishes_a_value_model_that_loads(tmp_path):
    from grade.data.features import FeaturesConfig, extract_features
    from grade.data.simulator import write_logs
    from grade.value.value_model import load_value_model

    write_logs(SimulatorConfig(seed=1, n_requests=1500, n_users=400, list_size=20), str(tmp_path / "logs"))
    extract_features(str(tmp_path / "logs"), str(tmp_path / "features"), FeaturesConfig())
    cfg = tmp_path / "c.yaml"
    cfg.write_text("outcome:\n  model:\n    epochs: 1\n  examination:\n    max_iter: 30\n")
    out = tmp_path / "value"
    proc = subprocess.run([sys.executable, "-m", "components.outcome",
                           "--features", str(tmp_path / "features"), "--out", str(out), "--config", str(cfg)],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert "examination: power eta" in proc.stdout and f"value model: {out}" in proc.stdout
    for name in ("examination.json", "outcome.safetensors", "outcome.json", "value.json", "calibration.json"):
        assert (out / name).exists()
    vm = load_value_model(str(out))
    assert 0.5 < vm.examination.eta < 1.5
    cal = json.loads((out / "calibration.json").read_text())
    assert set(cal["click"]) == {"outcome", "mtl"}
    from grade.data import dataset
    valid = dataset.load_split(str(out.parent / "features"), "valid")
    v = vm.item_value(valid, BusinessConfig())
    assert v.shape == valid["mask"].shape and bool(torch.isfinite(v).all())
    assert bool((v[~valid["mask"]] == 0).all())
    # the value fields per kind, priced, are the declared value of the labels and of the model
    from grade.value.value_model import priced_fields, value_fields
    business = BusinessConfig(clicks=0.5, orders=1.0, gmv=2.0)
    fields = value_fields(valid, vm)
    priced = priced_fields(fields, business)
    label = business.item_value(valid["click"], valid["order"], valid["gmv"], vm.order_value_unit)
    assert torch.allclose(priced["label_value"], label.masked_fill(~valid["mask"], 0.0), atol=1e-5)
    assert torch.allclose(priced["model_value"], vm.item_value(valid, business), atol=1e-5)
    assert torch.equal(priced["logged_theta"], fields["logged_theta"])


def test_mixture_outcomes_are_the_members_mean_clicks_orders_and_gmv():
    """Hand-computed, one item: members (ctr, cvr, value) = (0.2, 0.5, 10) and (0.6, 0.1, 20):
    clicks 0.4, orders (0.1 + 0.06) / 2 = 0.08, GMV (1 + 1.2) / 2 = 1.1, so cvr 0.2 and value 13.75."""
    from grade.value.outcome import mixture_outcomes

    one = lambda ctr, cvr, value: {k: torch.tensor([[v]]) for k, v in  # noqa: E731
                                   (("ctr", ctr), ("cvr", cvr), ("value", value))}
    mix = mixture_outcomes([one(0.2, 0.5, 10.0), one(0.6, 0.1, 20.0)])
    assert mix["ctr"].item() == pytest.approx(0.4)
    assert mix["cvr"].item() == pytest.approx(0.2)
    assert mix["value"].item() == pytest.approx(13.75)
    padding = mixture_outcomes([one(0.0, 0.0, 0.0), one(0.0, 0.0, 0.0)])
    assert padding["cvr"].item() == 0.0 and padding["value"].item() == 0.0


def test_members_differ_by_seed_and_a_mixture_saves_and_loads_as_fitted(tmp_path):
    """fit_outcomes with members = 2 fits seeds 0 and 1 (different weights, both passes in the history);
    the mixture round-trips through safetensors + JSON; a folder of one model (no ``members`` in its
    outcome.json, as written before mixtures) still loads as one model."""
    from grade.value.outcome import OutcomeMixture, fit_outcomes, load_outcome_from, save_outcome

    data = simulated_batch(SimulatorConfig(seed=5, n_requests=600, n_users=200))
    data["cat"] = torch.zeros(data["mask"].shape[0], 1, dtype=torch.long)
    spec = {"objectives": ["ctr", "cvr", "gmv"], "categorical": [{"size": 1}]}
    exam = ExaminationEstimate.fixed(1.0, 20)
    model, history = fit_outcomes(data, spec, exam, OutcomeConfig(epochs=2, members=2, hidden=[8], seed=0))
    assert isinstance(model, OutcomeMixture) and len(model.members) == 2
    assert sorted({row["member"] for row in history}) == [0, 1] and len(history) == 4
    first, second = (dict(m.named_parameters())["mlp.0.weight"] for m in model.members)
    assert not torch.equal(first, second)
    save_outcome(model, tmp_path)
    loaded = load_outcome_from(tmp_path)
    assert isinstance(loaded, OutcomeMixture)
    with torch.no_grad():
        for key, value in model.item_outcomes(data).items():
            assert torch.equal(loaded.item_outcomes(data)[key], value)
    single, _ = fit_outcomes(data, spec, exam, OutcomeConfig(epochs=1, members=1, hidden=[8]))
    one = tmp_path / "one"
    one.mkdir()
    save_outcome(single, one)
    saved = json.loads((one / "outcome.json").read_text())
    assert saved.pop("members") == 1
    (one / "outcome.json").write_text(json.dumps(saved))
    assert isinstance(load_outcome_from(one), OutcomeNet)


def _small_market(seed: int, n: int) -> tuple[dict[str, torch.Tensor], dict]:
    data = simulated_batch(SimulatorConfig(seed=seed, n_requests=n, n_users=n // 4))
    data["cat"] = (torch.arange(data["mask"].shape[0]) % 3).unsqueeze(1)
    return data, {"objectives": ["ctr", "cvr", "gmv"], "categorical": [{"size": 3}]}


def test_members_fitted_together_are_the_members_fitted_one_by_one():
    """fit_outcomes fits its members as one stacked computation; member i is the model fit_outcome fits
    alone with seed + i: same weights, same passes (its own early stopping) and the same history (float32
    products: in bfloat16 the products of a stack and of one member round differently)."""
    from grade.value.outcome import OutcomeMixture, fit_outcomes

    data, spec = _small_market(4, 1200)
    train, valid = {k: v[:400] for k, v in data.items()}, {k: v[400:] for k, v in data.items()}
    exam = ExaminationEstimate.fixed(1.0, 20)
    cfg = OutcomeConfig(epochs=12, patience=2, lr=1e-2, hidden=[16, 16], batch_size=32, members=3, seed=4,
                        precision="float32")
    mixture, history = fit_outcomes(train, spec, exam, cfg, valid)
    assert isinstance(mixture, OutcomeMixture)
    passes = []
    for i, member in enumerate(mixture.members):
        alone, rows = fit_outcome(train, spec, exam, OutcomeConfig(**{**cfg.__dict__, "seed": cfg.seed + i}),
                                  valid)
        mine = [{k: v for k, v in r.items() if k != "member"} for r in history if r["member"] == i]
        assert len(mine) == len(rows)
        for a, b in zip(mine, rows, strict=True):
            assert a == pytest.approx(b, rel=1e-4, abs=1e-6)
        for (name, p), q in zip(member.state_dict().items(), alone.state_dict().values(), strict=True):
            assert torch.allclose(p, q, atol=1e-5), name
        passes.append(len(rows))
    assert len(set(passes)) > 1     # the members stopped after different numbers of passes


def test_the_stacked_members_compute_each_members_function():
    """MemberStack (the first layer split into item and user parts, batched products) gives each
    member's OutcomeNet output on the same requests."""
    from grade.value.outcome import MemberStack, item_inputs, mtl_offsets

    nets = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        net = _net()
        for p in net.parameters():
            torch.nn.init.normal_(p, std=0.3)   # a fresh head is 0; give every weight a value
        nets.append(net)
    batch = _tiny_batch(b=3, length=4)
    batch["mask"][0, 3] = False
    batch["cat"] = torch.tensor([[0], [2], [1]])
    stack = MemberStack.of(nets)
    items = item_inputs(batch["z"], batch["mask"]).expand(2, -1, -1, -1)
    out = mtl_offsets(batch["pred"], nets[0].offset_index) + stack.correction(
        items, batch["num"].expand(2, -1, -1), batch["cat"].expand(2, -1, -1))
    for i, net in enumerate(nets):
        with torch.no_grad():
            expected = net(batch["z"], batch["pred"], batch["mask"], batch["num"], batch["cat"])
        assert torch.allclose(out[i], expected, atol=1e-5)
        assert all(torch.equal(a, b) for a, b in zip(stack.net(i).state_dict().values(),
                                                      net.state_dict().values(), strict=True))


def test_early_stopping_shrinks_the_progress_total_to_the_work_done(caplog):
    """The progress total starts at members x epochs x steps; each member that stops early takes its
    remaining steps off, so the last line reads done == total (and its ETA is 0)."""
    from grade.value.outcome import fit_outcomes

    data, spec = _small_market(4, 1200)
    train, valid = {k: v[:400] for k, v in data.items()}, {k: v[400:] for k, v in data.items()}
    cfg = OutcomeConfig(epochs=30, patience=2, lr=1e-2, hidden=[16, 16], batch_size=32, members=2, seed=4)
    with caplog.at_level("INFO", logger="grade.core.progress"):
        _, history = fit_outcomes(train, spec, ExaminationEstimate.fixed(1.0, 20), cfg, valid)
    steps = math.ceil(400 / cfg.batch_size)
    done = len(history) * steps
    assert len(history) < cfg.members * cfg.epochs
    last = [r.getMessage() for r in caplog.records if r.getMessage().startswith("outcome: ")][-1]
    assert f"outcome: {done}/{done} steps" in last and "ETA 0s" in last


def test_bfloat16_products_fit_the_same_model_as_float32():
    """The bfloat16 training products (the default where the CPU has them) fit the model the float32
    products fit: same data, seed and passes; the two fits' outcomes on held-out requests differ by a
    small fraction of how far either moved from the MTL predictions (measured: 0.09% against 14%)."""
    data, spec = _small_market(4, 1200)
    train, valid = {k: v[:400] for k, v in data.items()}, {k: v[400:] for k, v in data.items()}
    exam = ExaminationEstimate.fixed(1.0, 20)
    outs = {}
    for precision in ("float32", "bfloat16"):
        cfg = OutcomeConfig(epochs=4, lr=1e-2, hidden=[16, 16], batch_size=32, precision=precision)
        model, _ = fit_outcome(train, spec, exam, cfg)
        with torch.no_grad():
            outs[precision] = torch.stack(list(model.item_outcomes(valid).values()))
    mtl = valid["pred"].permute(2, 0, 1)
    rel = lambda a, b: float(((a - b).abs() / b.abs().clamp_min(1e-6)).mean())  # noqa: E731
    assert rel(outs["bfloat16"], outs["float32"]) < 0.05 * rel(outs["float32"], mtl)


def test_progress_retire_shrinks_the_total_and_the_eta():
    from grade.core.progress import Progress

    p = Progress("x", 100, every_s=1e9)
    p.add(10)
    p.retire(80)
    assert p.total == 20
    p.retire(50)                         # never below what is done
    assert p.total == p.done == 10


def test_top_logged_takes_each_requests_highest_logged_positions():
    from grade.value.outcome import top_logged

    position = torch.tensor([[3, 0, 4, 1, 2], [1, 0, -1, 2, -1]])
    mask = torch.tensor([[True] * 5, [True, True, False, True, False]])
    assert top_logged(position, mask, 3).tolist() == [[1, 3, 4], [1, 0, 3]]
    assert top_logged(position, mask, 4).tolist() == [[1, 3, 4, 0], [1, 0, 3, 2]]  # padding comes last
    assert top_logged(position, mask, 5) is None


def test_the_fit_reads_only_the_items_within_the_examination_depth():
    """Items logged at or below the examination curve's depth leave the outcome fit: changing their
    feedback changes nothing, changing one item's above it changes the model."""
    from grade.value.outcome import fit_outcomes

    data, spec = _small_market(4, 300)
    exam = ExaminationEstimate.fixed(1.0, 8)
    cfg = OutcomeConfig(epochs=2, lr=1e-2, hidden=[8], batch_size=64, members=1, seed=0)

    def fitted(d: dict[str, torch.Tensor]) -> torch.Tensor:
        model, _ = fit_outcomes(d, spec, exam, cfg)
        return torch.cat([p.flatten() for p in model.parameters()])

    deep = data["position"] >= 8
    assert bool(deep.any()) and bool((~deep & data["mask"]).any())
    changed = {**data, "click": torch.where(deep, 1.0 - data["click"], data["click"])}
    changed["order"] = torch.where(deep, torch.zeros_like(data["order"]), data["order"])
    changed["gmv"] = torch.where(deep, torch.zeros_like(data["gmv"]), data["gmv"])
    base = fitted(data)
    assert torch.equal(base, fitted(changed))
    shallow = (data["position"] == 0).nonzero()[0]
    flipped = data["click"].clone()
    flipped[tuple(shallow)] = 1.0 - flipped[tuple(shallow)]
    assert not torch.equal(base, fitted({**data, "click": flipped}))
