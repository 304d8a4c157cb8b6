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
