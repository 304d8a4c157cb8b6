"""The simulator: contract columns, realism invariants, determinism, the oracle and the headroom."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.dataset as ds
import pytest
import torch

from components import simulate as simulate_cli
from grade.core import store
from grade.data import simulator
from grade.data.fusion import fuse, top_e
from grade.data.simulator import SimulatorConfig
from tests.sim_tensors import publish_random_policy


def small(**kw) -> SimulatorConfig:
    base = dict(n_requests=1200, n_users=300, n_items=4000, chunk_requests=500, n_days=3)
    base.update(kw)
    return SimulatorConfig(**base)


@pytest.fixture(scope="module")
def table() -> pa.Table:
    return pa.concat_tables(list(simulator.generate(small())))


def read_logs(uri: str) -> pa.Table:
    files = sorted(f for f in store.read_manifest(uri)["files"] if f.endswith(".parquet"))
    return pa.concat_tables([ds.dataset(store.join(uri, f)).to_table() for f in files])


def test_columns_follow_the_log_contract(table):
    schema = table.schema
    assert schema.field("request_id").type == pa.int64()
    assert schema.field("user_id").type == pa.int64()
    assert pa.types.is_timestamp(schema.field("event_time").type)
    assert schema.field("position").type == pa.int16()
    for name in ("click", "order"):
        assert schema.field(name).type == pa.int8()
    for name in ("gmv", "pred_ctr", "pred_cvr", "pred_gmv", "true_ctr", "true_cvr", "price"):
        assert schema.field(name).type == pa.float32()
    assert [n for n in schema.names if n.startswith("u_")] and all(
        schema.field(n).type == pa.float32() for n in schema.names if n.startswith("u_"))
    assert all(schema.field(n).type == pa.int32() for n in schema.names if n.startswith("c_"))
    assert "pred_rel" not in schema.names


def test_behavioural_invariants(table):
    L = 50
    click, order, gmv = (table[c].to_numpy() for c in ("click", "order", "gmv"))
    price = table["price"].to_numpy()
    assert not np.any(order > click), "an order without a click"
    assert np.all((gmv > 0) == (order == 1)), "gmv must be the price exactly on orders"
    assert np.allclose(gmv[order == 1], price[order == 1])
    for name in ("pred_ctr", "pred_cvr", "pred_gmv"):
        assert table[name].to_numpy().min() > 0
    rid = table["request_id"].to_numpy().reshape(-1, L)
    assert np.all(rid == rid[:, :1]), "rows of a request are contiguous"
    pos = np.sort(table["position"].to_numpy().reshape(-1, L), axis=1)
    assert np.all(pos == np.arange(L)), "positions are a permutation of 0..L-1"
    items = np.sort(table["item_id"].to_numpy().reshape(-1, L), axis=1)
    assert np.all(np.diff(items, axis=1) > 0), "no item twice in a request"
    t = table["event_time"].cast(pa.int64()).to_numpy()
    assert np.all(np.diff(t) >= 0), "requests are in time order"
    # position bias: the top positions get far more clicks than the bottom ones
    position = table["position"].to_numpy()
    assert click[position < 5].mean() > 3 * click[position >= 40].mean()


def test_mtl_errors_are_systematic_by_segment(table):
    """pCVR over-rates expensive items for the price-sensitive bargain hunters, not for premium users."""
    seg = table["true_segment"].to_numpy()
    ratio = np.log(table["pred_cvr"].to_numpy()) - np.log(table["true_cvr"].to_numpy())
    price = table["price"].to_numpy()
    expensive = price > np.quantile(price, 0.75)
    bargain = seg == simulator.SEGMENTS.index("bargain_hunter")
    premium = seg == simulator.SEGMENTS.index("premium")
    assert ratio[bargain & expensive].mean() > ratio[bargain & ~expensive].mean() + 0.3
    assert ratio[premium & expensive].mean() < ratio[bargain & expensive].mean()


def test_features_identify_segments_only_partly(table):
    seg = table["true_segment"].to_numpy()[::50]
    x = np.stack([table[c].to_numpy()[::50]
                  for c in ("u_purchase_power", "u_price_affinity", "u_activity")], 1)
    centres = np.stack([x[seg == s].mean(0) for s in range(4)])
    guess = np.argmin(((x[:, None, :] - centres[None]) ** 2).sum(-1), axis=1)
    accuracy = (guess == seg).mean()
    assert 0.45 < accuracy < 0.9, accuracy


def test_rel_objective_adds_a_fourth_prediction():
    t = next(simulator.generate(small(n_requests=100, objectives=["ctr", "cvr", "gmv", "rel"])))
    assert "pred_rel" in t.schema.names and t["pred_rel"].to_numpy().min() > 0


def test_cli_twice_gives_identical_tables(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    for out in (a, b):
        assert simulate_cli.main(["--out", str(out), "--requests", "3000", "--seed", "7"]) == 0
    ta, tb = read_logs(str(a)), read_logs(str(b))
    assert ta.num_rows == 3000 * 50
    assert ta.equals(tb)
    days = sorted({f.split("/")[0] for f in store.read_manifest(str(a))["files"]})
    assert days == [f"day=2026-01-{d:02d}" for d in range(1, 15)]
    c = tmp_path / "c"
    simulate_cli.main(["--out", str(c), "--requests", "3000", "--seed", "8"])
    assert not read_logs(str(c)).equals(ta)


def test_chunking_does_not_change_the_world_and_scales_in_chunks():
    """Chunks have the configured size; users and items keep their attributes whatever the chunking."""
    tables = list(simulator.generate(small(n_requests=900, chunk_requests=300)))
    assert [t.num_rows for t in tables] == [300 * 50] * 3
    one = next(simulator.generate(small(n_requests=900, chunk_requests=900)))
    many = pa.concat_tables(tables)
    assert one.num_rows == many.num_rows
    assert np.array_equal(one["request_id"].to_numpy(), many["request_id"].to_numpy())

    def attributes(t, key, cols):
        k = t[key].to_numpy()
        keys, first = np.unique(k, return_index=True)
        return keys, np.stack([t[c].to_numpy()[first] for c in cols], 1)

    for key, cols in (("item_id", ["price"]), ("user_id", ["true_segment", "u_purchase_power", "c_device"])):
        ka, va = attributes(one, key, cols)
        kb, vb = attributes(many, key, cols)
        common, ia, ib = np.intersect1d(ka, kb, return_indices=True)
        assert len(common) > 100
        assert np.array_equal(va[ia], vb[ib]), key


def test_bad_config_is_exit_2(tmp_path, capsys):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("simulator:\n  objectives: [ctr, clicks]\n")
    from grade.core import cli

    assert cli.run(simulate_cli.main, ["--out", str(tmp_path / "o"), "--config", str(cfg)]) == 2
    assert "simulator.objectives" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_oracle_is_the_per_request_best_candidate():
    torch.manual_seed(0)
    n, L = 64, 12
    signals = torch.randn(n, L, 3)
    ctr, cvr, price = torch.rand(n, L) * 0.3, torch.rand(n, L) * 0.2, torch.rand(n, L) * 50 + 1
    w, v = simulator.oracle_weights(signals, ctr, cvr, price, depth=4, n_candidates=64)
    assert w.shape == (n, 3) and torch.allclose(w.sum(-1), torch.ones(n))
    cand = simulator.simplex_candidates(3, 64)
    assert len(cand) >= 40 and torch.all(cand >= 0) and torch.allclose(cand.sum(-1), torch.ones(len(cand)))
    o = simulator.candidate_outcomes(signals, ctr, cvr, price, None, cand, depth=4)
    assert torch.allclose(v, o["orders"].max(1).values)
    # vertices and the centre are among the candidates: the oracle is at least as good as static
    static = simulator.candidate_outcomes(signals, ctr, cvr, price, None, torch.full((1, 3), 1 / 3), depth=4)
    assert torch.all(v >= static["orders"][:, 0] - 1e-6)
    assert v.mean() > static["orders"].mean()


def test_oracle_value_by_hand():
    """Two items, depth 1: the oracle puts the item with the higher ctr*cvr on top."""
    signals = torch.tensor([[[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]]])
    ctr = torch.tensor([[0.5, 0.2]])
    cvr = torch.tensor([[0.1, 0.5]])      # orders: 0.05 vs 0.10 -> item 1 should lead
    price = torch.tensor([[10.0, 1.0]])   # gmv: 0.5 vs 0.1 -> item 0 leads on gmv
    w, v = simulator.oracle_weights(signals, ctr, cvr, price, depth=1, n_candidates=16)
    assert top_e(fuse(signals, w), 1).item() == 1 and v.item() == pytest.approx(0.10)
    w, v = simulator.oracle_weights(signals, ctr, cvr, price, depth=1, value="gmv", n_candidates=16)
    assert top_e(fuse(signals, w), 1).item() == 0 and v.item() == pytest.approx(0.5)


def test_headroom_on_the_default_model():
    """Oracle >= 5% over static and >= 2% over the best global vector; segments hold real headroom."""
    cfg = SimulatorConfig(n_requests=4000, chunk_requests=4000)
    t = next(simulator.generate(cfg))
    rep = simulator.headroom_report(t, cfg.objectives, list_size=cfg.list_size, n_candidates=256)
    p = rep["policies"]
    assert p["oracle"]["opm"] >= 1.05 * p["static"]["opm"]
    assert p["oracle"]["opm"] >= 1.02 * p["best_global"]["opm"]
    assert p["segment_best"]["opm"] >= 1.02 * p["best_global"]["opm"]
    assert p["segment_best"]["gpm"] > p["static"]["gpm"]
    assert p["oracle"]["opm"] >= p["segment_best"]["opm"] >= p["best_global"]["opm"]


# ------------------------------------------------------------------------------------------------
# Click models: pbm as before, the cascade, the page end
# ------------------------------------------------------------------------------------------------

def table_hash(cfg: SimulatorConfig) -> str:
    """The hash of the columns the logs had before the static market logged its propensities."""
    import hashlib

    h = hashlib.sha256()
    for t in simulator.generate(cfg):
        for name in t.column_names:
            if name.startswith("served_") or name == "model_version":
                continue
            h.update(name.encode())
            h.update(t[name].combine_chunks().to_numpy(zero_copy_only=False).tobytes())
    return h.hexdigest()


def test_pbm_logs_are_those_before_click_models():
    """The default click model writes byte for byte the logs of the simulator before click models existed
    (hash measured on that version)."""
    cfg = small(n_requests=600, chunk_requests=300, seed=5)
    assert cfg.click_model == "pbm" and cfg.page_size == 0
    assert table_hash(cfg) == "6011fd60fe4c8dcb50de9e3359c9239059b3778582a1bb74c5b0e21b9d86827e"


def ranked(t: pa.Table, cfg: SimulatorConfig, name: str) -> torch.Tensor:
    """Column ``name`` of every request in ranked order (position 0 first): [N, L]."""
    n, L = t.num_rows // cfg.list_size, cfg.list_size
    x = torch.from_numpy(t[name].to_numpy().astype(np.float64).reshape(n, L))
    pos = torch.from_numpy(t["position"].to_numpy().astype(np.int64).reshape(n, L))
    return torch.empty_like(x).scatter_(1, pos, x)


@pytest.mark.parametrize("page_size", [0, 12])
def test_cascade_clicks_match_cascade_examination(page_size):
    """Per position, the cascade's clicks over many requests match sum ctr * cascade_examination within
    4 standard errors (each slot's click is Bernoulli with that probability, independent across requests)."""
    from grade.data.fusion import cascade_examination

    cfg = small(n_requests=6000, chunk_requests=2000, click_model="cascade", page_size=page_size, seed=2)
    t = pa.concat_tables(list(simulator.generate(cfg)))
    ctr, click = ranked(t, cfg, "true_ctr"), ranked(t, cfg, "click")
    p = ctr * cascade_examination(ctr, cfg.cascade_continue_click, cfg.cascade_continue_skip,
                                  page_size or None)
    expected, observed = p.sum(0), click.sum(0)
    se = (p * (1 - p)).sum(0).sqrt()
    assert torch.all((observed - expected).abs() <= 4 * se + 1e-9), (observed[:12], expected[:12])
    # the cascade's shape, not the position-based one: the first slot is always examined, deeper ones less
    assert observed[0] == pytest.approx(float(ctr[:, 0].sum()), rel=0.1)
    assert float(p[:, 1:10].sum() / ctr[:, 1:10].sum()) < 0.9


@pytest.mark.parametrize("click_model", ["pbm", "cascade"])
def test_page_size_never_clicks_past_the_page(click_model):
    cfg = small(n_requests=1500, chunk_requests=1500, click_model=click_model, page_size=5, position_bias=0.3)
    t = pa.concat_tables(list(simulator.generate(cfg)))
    pos = t["position"].to_numpy()[t["click"].to_numpy() > 0]
    assert pos.max() == 4 and (pos == 4).sum() > 10
    assert (t["order"].to_numpy()[t["position"].to_numpy() >= 5] == 0).all()


def test_oracle_under_the_cascade_beats_static_and_differs_from_the_pbm_truth():
    cfg = small(n_requests=1500, chunk_requests=1500, click_model="cascade", page_size=8)
    t = pa.concat_tables(list(simulator.generate(cfg)))
    rep = simulator.headroom_report(t, cfg.objectives, list_size=cfg.list_size, eta=cfg.world(),
                                    n_candidates=128)
    p = rep["policies"]
    assert p["oracle"]["opm"] > p["best_global"]["opm"] > p["static"]["opm"]
    assert p["oracle"]["opm"] >= p["segment_best"]["opm"]
    pbm = simulator.headroom_report(t, cfg.objectives, list_size=cfg.list_size, eta=1.0, n_candidates=128)
    assert pbm["policies"]["static"]["opm"] != pytest.approx(p["static"]["opm"], rel=0.05)


def test_the_cascade_truth_of_the_auction_is_a_monte_carlo_of_the_simulator():
    """The auction's true clicks and orders of the logged ranking (under the world's click model) equal the
    simulator's realised clicks and orders in the top E within 4 standard errors (per-request spread)."""
    from grade.value import auction
    from tests.sim_tensors import simulated_batch

    cfg = small(n_requests=6000, chunk_requests=2000, click_model="cascade", page_size=7, seed=4)
    data = simulated_batch(cfg)
    sums = auction.policy_sums(data, cfg.objectives, scores=-data["position"].float(), depth=10,
                               eta=cfg.world())
    top = (data["position"] < 10).float()
    for label, key in (("click", "true.clicks"), ("order", "true.orders")):
        diff = (data[label] * top).sum(-1).double() - sums[key]
        se = diff.std() * len(diff) ** 0.5
        assert abs(float(diff.sum())) <= 4 * float(se), label
    # the policy-independent impressions: the examination of a list nobody clicks, up to the page end
    imp = auction.shared_sums(data, 10, cfg.world())["impressions"]
    assert torch.allclose(imp, torch.full_like(imp, sum(0.9 ** j for j in range(7))))


def test_features_record_the_world_and_the_evaluation_reads_it(tmp_path):
    """The truth's click model comes from the logs, not the config: the world's eta even when shared.eta
    differs, the cascade's parameters; features without the record fall back to the config's eta."""
    from grade.data.features import FeaturesConfig, extract_features
    from grade.data.fusion import ClickModel, truth_click_model

    for name, cfg in (("pbm", small(n_requests=300, position_bias=0.5)),
                      ("cascade", small(n_requests=300, click_model="cascade", cascade_continue_skip=0.8,
                                        page_size=20))):
        logs, feats = str(tmp_path / f"{name}-logs"), str(tmp_path / f"{name}-feats")
        simulator.write_logs(cfg, logs)
        spec = extract_features(logs, feats, FeaturesConfig())
        assert truth_click_model(spec, 1.0) == cfg.world()
    assert cfg.world() == ClickModel("cascade", 1.0, 0.5, 0.8, 20)
    assert truth_click_model({}, 0.7) == ClickModel("pbm", 0.7)


# ------------------------------------------------------------------------------------------------
# The market served by a model
# ------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def served_model(tmp_path_factory):
    """A published policy with personalised weights on the features of small static logs."""
    from grade.data.features import FeaturesConfig, extract_features

    root = tmp_path_factory.mktemp("served")
    logs, feats, model = str(root / "logs"), str(root / "feats"), str(root / "model")
    simulator.write_logs(small(n_requests=300, n_days=2), logs)
    extract_features(logs, feats, FeaturesConfig())
    publish_random_policy(feats, model, seed=3)
    return model


def test_served_market_ranks_as_components_score(served_model, tmp_path):
    """simulator.logging = a model: every logged list is in the order components.score gives the same
    requests, the served weights are the score's (to float32 rounding: the policy runs on other batches),
    the propensity null (the mean), the version the model's."""
    from components import score as score_cli
    from grade.core import cli

    out, scores = str(tmp_path / "served"), str(tmp_path / "scores")
    mean = ["--set", "serve.explore.share=0"]  # the mean ranking (exploration: test_loop.py, test_serve.py)
    args = ["--out", out, "--requests", "400", "--set", f"simulator.logging={served_model}",
            "--set", "simulator.n_days=2", *mean]
    assert cli.run(simulate_cli.main, args) == 0
    logs = read_logs(out)
    assert cli.run(score_cli.main, ["--requests", out, "--model", served_model, "--out", scores, *mean]) == 0
    scored = read_logs(scores)
    assert np.array_equal(scored["request_id"].to_numpy(), logs["request_id"].to_numpy())
    assert np.array_equal(scored["rank"].to_numpy(), logs["position"].to_numpy())
    for o in ("ctr", "cvr", "gmv"):
        assert logs.schema.field(f"served_w_{o}").type == pa.float32()
        served, score_w = logs[f"served_w_{o}"].to_numpy(), scored[f"w_{o}"].to_numpy()
        assert np.allclose(served, score_w, rtol=1e-5, atol=1e-7)
    assert logs["served_log_propensity"].null_count == logs.num_rows
    assert set(logs["model_version"].to_pylist()) == {store.content_hash(served_model)}
    # the same requests as the static market, only ranked otherwise
    static = pa.concat_tables(list(simulator.generate(small(n_requests=400, n_days=2, n_users=5000,
                                                             n_items=20000, chunk_requests=10000))))
    assert np.array_equal(static["item_id"].to_numpy(), logs["item_id"].to_numpy())
    assert not np.array_equal(static["position"].to_numpy(), logs["position"].to_numpy())


def test_served_market_with_a_bad_uri_is_exit_2(tmp_path, capsys):
    from grade.core import cli

    bad = str(tmp_path / "no-such-model")
    args = ["--out", str(tmp_path / "o"), "--requests", "50", "--set", f"simulator.logging={bad}"]
    assert cli.run(simulate_cli.main, args) == 2
    err = capsys.readouterr().err
    assert bad in err and "Traceback" not in err
    assert not (tmp_path / "o").exists()


def test_served_market_explores_and_logs_the_propensities(served_model, tmp_path):
    """With serve.explore.share 1 every logged request carries its drawn weights and their log-density;
    the same config logs the same draws again (seeded by the request id)."""
    from grade.core import cli

    logs = []
    for name in ("a", "b"):
        out = str(tmp_path / name)
        args = ["--out", out, "--requests", "200", "--set", f"simulator.logging={served_model}",
                "--set", "simulator.n_days=2", "--set", "serve.explore.share=1"]
        assert cli.run(simulate_cli.main, args) == 0
        logs.append(read_logs(out))
    lp = logs[0]["served_log_propensity"]
    assert lp.null_count == 0 and np.isfinite(lp.to_numpy()).all()
    assert logs[0].equals(logs[1])
    w = np.stack([logs[0][f"served_w_{o}"].to_numpy() for o in ("ctr", "cvr", "gmv")], -1)
    assert np.allclose(w.sum(-1), 1.0, atol=1e-5) and len(np.unique(w.round(6), axis=0)) > 150


def test_a_later_stream_is_new_requests_of_the_same_world():
    first = pa.concat_tables(list(simulator.generate(small(n_requests=300))))
    again = pa.concat_tables(list(simulator.generate(small(n_requests=300))))
    later = pa.concat_tables(list(simulator.generate(small(n_requests=300, stream=1))))
    assert first.equals(again)
    assert not np.array_equal(first["user_id"].to_numpy(), later["user_id"].to_numpy())
    # the same world: an item's price does not depend on the stream
    price = dict(zip(first["item_id"].to_pylist(), first["price"].to_pylist(), strict=True))
    shared = [(i, p) for i, p in zip(later["item_id"].to_pylist(), later["price"].to_pylist(), strict=True)
              if i in price]
    assert len(shared) > 100 and all(price[i] == p for i, p in shared)


def test_static_logs_carry_their_weights_and_propensities():
    """The static market logs each request's weights (on the log-predictions: they reproduce its ranking)
    and their log-density under Dir(logging_concentration / K), model_version static."""
    cfg = small(n_requests=40, seed=2)
    t = next(simulator.generate(cfg))
    L, k = cfg.list_size, len(cfg.objectives)
    w = np.stack([t[f"served_w_{o}"].to_numpy()[::L] for o in cfg.objectives], axis=1).astype(np.float64)
    assert np.allclose(w.sum(1), 1.0, atol=1e-6)
    alpha = torch.full((k,), cfg.logging_concentration / k, dtype=torch.float64)
    expected = torch.distributions.Dirichlet(alpha).log_prob(torch.from_numpy(w / w.sum(1, keepdims=True)))
    logged = t["served_log_propensity"].to_numpy()[::L]
    np.testing.assert_allclose(logged, expected.numpy(), rtol=1e-5)
    assert set(t["model_version"].to_pylist()) == {"static"}
    logp = np.stack([np.log(t[f"pred_{o}"].to_numpy().reshape(-1, L)) for o in cfg.objectives], axis=-1)
    scores = np.einsum("nlk,nk->nl", logp, w)
    order = np.argsort(-scores, axis=1, kind="stable")
    position = t["position"].to_numpy().reshape(-1, L)
    assert (np.take_along_axis(position, order, axis=1)[:, :10] == np.arange(10)).mean() > 0.99
