"""The feature transform: hand-computed values, OOV and clamp, and training == serving on the same
requests."""

from __future__ import annotations

import math

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds
import pyarrow.parquet as pq
import pytest
import torch

from grade.core.errors import InputError
from grade.data import dataset
from grade.data.features import FeaturesConfig, extract_features
from grade.data.fusion import fuse
from grade.data.simulator import SimulatorConfig, write_logs
from grade.data.transform import PRED_EPS, FeatureTransform, InputColumn, clamp_unseen, encode_categorical
from grade.model.policy import PolicyConfig
from grade.release.scoring import score_requests
from tests.sim_tensors import publish_random_policy

SPEC = {"objectives": ["ctr", "gmv"], "pred_log_mean": [math.log(0.1), 2.0], "pred_log_std": [2.0, 0.5],
        "numeric": [{"name": "u_a", "mean": 1.0, "std": 2.0}, {"name": "u_b", "mean": -1.0, "std": 0.0}],
        "categorical": [{"name": "c_x", "vocab": [3, 7, 11], "size": 4},
                        {"name": "c_y", "vocab": [], "size": 1}]}


def test_z_scores_by_hand():
    t = FeatureTransform.from_spec(SPEC)
    pred = np.array([[[0.1, math.exp(2.5)], [0.1 * math.exp(-2.0), math.exp(1.0)], [0.0, math.exp(2.0)]]],
                    dtype=np.float32)                                        # [1, 3, 2]
    z = t.z(pred)
    assert z.shape == (1, 3, 2) and z.dtype == np.float32
    expected = [[[0.0, 1.0], [-1.0, -2.0], [(math.log(PRED_EPS) - math.log(0.1)) / 2.0, 0.0]]]
    np.testing.assert_allclose(z, expected, rtol=1e-5, atol=1e-5)


def test_request_features_by_hand_with_oov():
    t = FeatureTransform.from_spec(SPEC)
    num, cat = t.request_features({"u_a": [5.0, 1.0, -3.0], "u_b": [-1.0, 0.5, 2.0],
                                   "c_x": [7, 5, 11], "c_y": [3, 0, 1], "ignored": [1]})
    assert num.dtype == np.float32 and cat.dtype == np.int64
    # u_b has std 0 in the spec: treated as 1 (a constant feature stays centred)
    np.testing.assert_array_equal(num, [[2.0, 0.0], [0.0, 1.5], [-2.0, 3.0]])
    np.testing.assert_array_equal(cat, [[2, 0], [0, 0], [3, 0]])           # 5 and every c_y value are OOV


def test_request_features_checks_columns_and_lengths():
    t = FeatureTransform.from_spec(SPEC)
    with pytest.raises(InputError, match=r"missing request feature\(s\) \['c_y'\]"):
        t.request_features({"u_a": [1.0], "u_b": [1.0], "c_x": [3]})
    with pytest.raises(InputError, match="request feature 'c_x': expected 2 values"):
        t.request_features({"u_a": [1.0, 2.0], "u_b": [1.0, 2.0], "c_x": [3], "c_y": [1, 2]})
    bare = FeatureTransform.from_spec({**SPEC, "numeric": [], "categorical": []})
    with pytest.raises(InputError, match="n_requests is required"):
        bare.request_features({})
    num, cat = bare.request_features({}, n_requests=4)
    assert num.shape == (4, 0) and cat.shape == (4, 0)


def test_inputs_listed_from_the_spec_alone():
    t = FeatureTransform.from_spec(SPEC)
    assert t.inputs() == [InputColumn("pred_ctr", "float32", "item"),
                          InputColumn("pred_gmv", "float32", "item"),
                          InputColumn("u_a", "float32", "request"), InputColumn("u_b", "float32", "request"),
                          InputColumn("c_x", "int64", "request"), InputColumn("c_y", "int64", "request")]
    assert t.missing(["pred_ctr", "u_a", "c_x", "c_y"]) == ["pred_gmv", "u_b"]
    assert t.cat_sizes == [4, 1]


def test_clamp_unseen_numpy_and_torch():
    cat = np.array([[2, 1], [3, 0], [-1, 2], [0, 1]], dtype=np.int64)     # sizes [3, 2]: ids 0..2 and 0..1
    expected = [[2, 1], [0, 0], [0, 0], [0, 1]]
    np.testing.assert_array_equal(clamp_unseen(cat, [3, 2]), expected)
    got = clamp_unseen(torch.from_numpy(cat), [3, 2])
    assert isinstance(got, torch.Tensor) and got.dtype == torch.int64
    assert torch.equal(got, torch.tensor(expected))


def test_check_policy_shapes():
    t = FeatureTransform.from_spec(SPEC)
    t.check_policy(PolicyConfig(n_numeric=2, cat_sizes=[4, 1], n_objectives=2), "m")
    with pytest.raises(InputError, match="m: the policy expects K=3, 2 numeric and 2 categorical features; "
                                         "the features have K=2, 2 numeric and 2 categorical"):
        t.check_policy(PolicyConfig(n_numeric=2, cat_sizes=[4, 1], n_objectives=3), "m")
    with pytest.raises(InputError, match="1 categorical"):
        t.check_policy(PolicyConfig(n_numeric=2, cat_sizes=[4], n_objectives=2), "m")


def test_training_and_serving_give_identical_tensors(tmp_path):
    """The test split's shards fed to the policy (training path) and the same requests' raw rows
    scored (serving path) give the same inputs, weights and fused scores, bit for bit."""
    logs, feats, model = str(tmp_path / "logs"), str(tmp_path / "feats"), str(tmp_path / "model")
    write_logs(SimulatorConfig(n_requests=400, n_users=80, n_items=3000, n_days=2, seed=5), logs)
    # small vocab: OOV ids
    spec = extract_features(logs, feats, FeaturesConfig(max_vocab=3, shard_requests=64))
    transform = FeatureTransform.from_spec(spec)
    net = publish_random_policy(feats, model, seed=11)

    # training path: shards -> (clamped) policy inputs -> weights -> fused scores
    test = dataset.load_split(feats, "test")
    cat_train = clamp_unseen(test["cat"], net.cfg.cat_sizes)
    w_train = net.mean_weights(test["num"], cat_train)
    scores_train = fuse(test["z"], w_train, test["mask"])[test["mask"]]

    # serving path: the raw rows of the same requests, in one batch, through the scoring step
    raw = ds.dataset(logs, format="parquet").to_table()
    raw = raw.filter(pc.is_in(raw["request_id"], value_set=pa.array(test["request_id"].numpy())))
    raw = raw.take(pa.array(np.argsort(raw["request_id"].to_numpy(), kind="stable")))
    assert raw["request_id"].to_numpy()[::spec["list_size"]].tolist() == test["request_id"].tolist()
    (tmp_path / "requests").mkdir()
    pq.write_table(raw, tmp_path / "requests" / "part-0.parquet")
    score_requests(model, str(tmp_path / "requests"), str(tmp_path / "scores"), batch_rows=raw.num_rows)
    scored = pq.read_table(tmp_path / "scores" / "part-00000.parquet")

    starts = np.arange(0, raw.num_rows, spec["list_size"])
    num_serve, cat_serve = transform.request_features({c: raw[c].to_numpy()[starts]
                                                       for c in transform.numeric + transform.categorical})
    z_serve = transform.z(transform.stack_predictions({c: raw[c].to_numpy() for c in transform.pred_columns}))
    w_serve = np.stack([scored[f"w_{o}"].to_numpy()[starts] for o in spec["objectives"]], axis=-1)
    assert (cat_serve == 0).any() and (cat_serve > 0).any()                 # OOV and known ids both occur
    assert torch.equal(torch.from_numpy(num_serve), test["num"])
    assert torch.equal(torch.from_numpy(cat_serve), test["cat"])
    assert torch.equal(torch.from_numpy(z_serve), test["z"][test["mask"]])
    assert torch.equal(torch.from_numpy(w_serve), w_train)
    assert torch.equal(torch.from_numpy(scored["score"].to_numpy()), scores_train)
    assert w_train.std(0).max() > 1e-3                                      # personalised: weights differ


def test_the_one_pass_of_clean_columns_gives_the_per_column_result():
    """Columns of finite numbers and integer ids take one vectorised pass; it gives what the checks of
    each column give, for every input type (lists, int32/float64 arrays, float64 beyond float32's range,
    uint64 ids past int64), and a value the pass refuses falls to those checks."""
    from grade.data.transform import checked_categories, checked_numbers

    t = FeatureTransform.from_spec(SPEC)
    cases = [{"u_a": [5.0, 1.0], "u_b": [-1, 2], "c_x": [7, 5], "c_y": [3, 0]},
             {"u_a": np.array([5, 1], np.int32), "u_b": np.array([1e39, -0.5]),
              "c_x": np.array([7, 11], np.int32), "c_y": np.array([2**63 + 5, 1], np.uint64)},
             {"u_a": np.array([0.1, 2.0], np.float64), "u_b": np.array([3.3, 4.4], np.float32),
              "c_x": np.array([3.0, 7.0]), "c_y": np.array([1, 2])}]
    for values in cases:
        x = np.stack([checked_numbers(c, values[c]) for c in t.numeric], axis=1).astype(np.float64)
        x = np.clip(x, t.num_clip[0], t.num_clip[1])
        ids = np.stack([checked_categories(c, values[c]) for c in t.categorical], axis=1)
        num, cat = t.request_features(values)
        np.testing.assert_array_equal(num, ((x - t.num_mean) / t.num_std).astype(np.float32))
        np.testing.assert_array_equal(cat, np.stack([encode_categorical(ids[:, j], v)
                                                     for j, v in enumerate(t.vocabs)], axis=1))


# -- one validation path for model inputs: finite numbers, integer categories, named rows -----------

@pytest.mark.parametrize("bad, message", [
    ([1.0, math.nan], r"column 'u_a', row 1: expected a finite number, got nan"),
    ([math.inf, 1.0], r"column 'u_a', row 0: expected a finite number, got inf"),
    (["1.0", "2.0"], r"column 'u_a', row 0: expected a number, got '1.0'"),
    ([1.0, None], r"column 'u_a', row 1: expected a number, got None"),
])
def test_request_features_refuse_non_finite_and_non_numeric_values(bad, message):
    t = FeatureTransform.from_spec(SPEC)
    with pytest.raises(InputError, match=message):
        t.request_features({"u_a": bad, "u_b": [0.0, 0.0], "c_x": [3, 7], "c_y": [1, 2]})
    with pytest.raises(InputError, match=message):   # the same from numpy arrays (a Parquet column's values)
        t.request_features({"u_a": np.asarray(bad), "u_b": np.zeros(2), "c_x": np.array([3, 7]),
                            "c_y": np.array([1, 2])})


@pytest.mark.parametrize("bad, message", [
    ([3.7, 7.0], r"column 'c_x', row 0: expected an integer category id, got 3.7"),
    ([3.0, math.nan], r"column 'c_x', row 1: expected an integer category id, got nan"),
    (["3", "7"], r"column 'c_x', row 0: expected an integer category id, got '3'"),
])
def test_request_features_refuse_fractional_and_string_categories(bad, message):
    """A float id is never truncated (3.7 is not category 3); whole floats (JSON 3.0) are the id."""
    t = FeatureTransform.from_spec(SPEC)
    with pytest.raises(InputError, match=message):
        t.request_features({"u_a": [1.0, 1.0], "u_b": [0.0, 0.0], "c_x": np.asarray(bad), "c_y": [1, 2]})
    _, cat = t.request_features({"u_a": [1.0, 1.0], "u_b": [0.0, 0.0], "c_x": np.array([3.0, 11.0]),
                                 "c_y": [1, 2]})
    np.testing.assert_array_equal(cat[:, 0], [1, 3])


def test_errors_name_the_file_and_its_row():
    """A caller holding the rows of a file (batch scoring) gets the file and the file's row named."""
    t = FeatureTransform.from_spec(SPEC)
    with pytest.raises(InputError, match=r"^part-3.parquet, column 'u_b', row 250: expected a finite"):
        t.request_features({"u_a": [1.0, 1.0], "u_b": [0.0, math.nan], "c_x": [3, 7], "c_y": [1, 2]},
                           where="part-3.parquet", rows=np.array([200, 250]))
    with pytest.raises(InputError, match=r"^p.parquet, column 'pred_gmv', row 2: expected a finite "
                                         r"prediction > 0, got nan"):
        t.stack_predictions({"pred_ctr": np.full(3, 0.1), "pred_gmv": np.array([1.0, 2.0, math.nan])},
                            where="p.parquet")
    with pytest.raises(InputError, match=r"'pred_ctr', row 1: expected a finite prediction > 0, got 0.0"):
        t.stack_predictions({"pred_ctr": np.array([0.1, 0.0]), "pred_gmv": np.ones(2)})
    with pytest.raises(InputError, match=r"column 'pred_ctr', row 0: expected a number, got 'x'"):
        t.stack_predictions({"pred_ctr": np.array(["x"], dtype=object), "pred_gmv": np.ones(1)})
