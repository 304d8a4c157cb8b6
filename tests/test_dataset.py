"""Reading feature tensors: whole splits, streaming batches, rank sharding, determinism, S3."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from grade.core import store
from grade.core.errors import InputError
from grade.data import dataset
from grade.data.features import FeaturesConfig, extract_features
from tests.test_features import make_logs, write_logs


@pytest.fixture
def features(tmp_path):
    df = make_logs(lengths=np.random.default_rng(2).integers(1, 7, 103), seed=2)
    df["true_ctr"] = df["pred_ctr"]
    df["true_cvr"] = df["pred_cvr"]
    df["price"] = df["pred_gmv"]
    df["true_segment"] = (df["user_id"] % 4).astype(np.int8)
    out = tmp_path / "features"
    # 103 requests: train 73 (shards of 16, 16, 16, 16, 9), valid 15, test 15
    extract_features(str(write_logs(tmp_path / "logs", df, parts=2)), str(out),
                     FeaturesConfig(shard_requests=16))
    return str(out)


def test_load_split_concatenates_all_shards(features):
    spec = dataset.load_spec(features)
    assert spec["splits"]["train"]["shard_requests"] == [16, 16, 16, 16, 9]
    train = dataset.load_split(features, "train")
    assert train["z"].shape == (73, spec["list_size"], 3) and train["z"].dtype == torch.float32
    assert train["mask"].dtype == torch.bool and train["request_id"].dtype == torch.int64
    np.testing.assert_array_equal(train["request_id"].numpy(), np.arange(1000, 1073))
    assert "true_ctr" not in train
    test = dataset.load_split(features, "test", fields=["request_id", "segment", "true_ctr"])
    assert set(test) == {"request_id", "segment", "true_ctr"}
    np.testing.assert_array_equal(test["request_id"].numpy(), np.arange(1088, 1103))


def test_missing_field_and_unknown_split_are_input_errors(features, tmp_path):
    with pytest.raises(InputError, match="true_ctr"):
        dataset.load_split(features, "train", fields=["true_ctr"])
    with pytest.raises(InputError, match="unknown split"):
        dataset.load_split(features, "holdout")
    with pytest.raises(InputError, match="not a published features folder"):
        dataset.load_spec(str(tmp_path / "nothing"))


def test_empty_split_has_the_right_shapes(tmp_path):
    out = tmp_path / "f"
    extract_features(str(write_logs(tmp_path / "logs", make_logs(10))), str(out),
                     FeaturesConfig(valid_fraction=0.0, test_fraction=0.2))
    valid = dataset.load_split(str(out), "valid", fields=["z", "mask", "num"])
    assert valid["z"].shape == (0, 4, 3) and valid["mask"].shape == (0, 4) and valid["num"].shape == (0, 1)
    assert list(dataset.iter_batches(str(out), "valid", 4)) == []


def test_iter_batches_in_order_equals_load_split(features):
    whole = dataset.load_split(features, "train")
    batches = list(dataset.iter_batches(features, "train", 10))
    assert [len(b["request_id"]) for b in batches] == [10] * 7 + [3]
    for name in whole:
        assert torch.equal(torch.cat([b[name] for b in batches]), whole[name])
    batches = dataset.iter_batches(features, "train", 10, drop_last=True)
    assert [len(b["request_id"]) for b in batches] == [10] * 7


@pytest.mark.parametrize("shuffle", [False, True])
@pytest.mark.parametrize("world_size", [1, 2, 3, 4])
def test_ranks_are_disjoint_cover_the_split_and_get_equal_batches(features, shuffle, world_size):
    seen, counts = [], []
    for rank in range(world_size):
        batches = list(dataset.iter_batches(features, "train", 5, shuffle=shuffle, seed=3, epoch=1,
                                            rank=rank, world_size=world_size, fields=["request_id"]))
        ids = torch.cat([b["request_id"] for b in batches]).tolist()
        seen.append(ids)
        counts.append(len(batches))
        assert len(ids) == dataset.count_requests(features, "train", world_size) == 73 // world_size
    flat = [i for ids in seen for i in ids]
    assert len(flat) == len(set(flat))                     # disjoint
    assert len(flat) == 73 - 73 % world_size               # covering all but n % world_size
    assert set(flat) <= set(range(1000, 1073))
    assert len(set(counts)) == 1                            # same number of steps on every rank


def test_shuffle_is_deterministic_per_seed_and_epoch(features):
    def order(**kw):
        return torch.cat([b["request_id"] for b in dataset.iter_batches(features, "train", 8, shuffle=True,
                                                                          fields=["request_id"], **kw)])

    a, b = order(seed=1, epoch=0), order(seed=1, epoch=0)
    assert torch.equal(a, b)
    assert not torch.equal(a, order(seed=1, epoch=1))
    assert not torch.equal(a, order(seed=2, epoch=0))
    assert sorted(a.tolist()) == list(range(1000, 1073))
    assert not torch.equal(a, torch.arange(1000, 1073))


def test_batches_keep_rows_with_their_request(features):
    whole = dataset.load_split(features, "train")
    by_id = {int(r): i for i, r in enumerate(whole["request_id"])}
    for b in dataset.iter_batches(features, "train", 7, shuffle=True, seed=5, rank=1, world_size=2):
        idx = torch.tensor([by_id[int(r)] for r in b["request_id"]])
        for name in ("z", "mask", "num", "cat", "click", "event_time"):
            assert torch.equal(b[name], whole[name][idx])


@pytest.mark.parametrize("world_size", [1, 2])
def test_row_index_points_each_batch_request_at_its_row_of_the_split(features, world_size):
    """``rows=True`` adds each request's row in ``load_split`` order and leaves the batches as they were."""
    whole = dataset.load_split(features, "train")
    kw = {"shuffle": True, "seed": 4, "epoch": 2, "world_size": world_size, "rank": world_size - 1}
    plain = list(dataset.iter_batches(features, "train", 6, **kw))
    indexed = list(dataset.iter_batches(features, "train", 6, rows=True, **kw))
    assert len(plain) == len(indexed) > 0
    for a, b in zip(plain, indexed, strict=True):
        assert set(b) == set(a) | {dataset.ROW_FIELD}
        assert b[dataset.ROW_FIELD].dtype == torch.int64
        for name in a:
            assert torch.equal(a[name], b[name])
            assert torch.equal(b[name], whole[name][b[dataset.ROW_FIELD]])


def test_bad_arguments():
    with pytest.raises(ValueError, match="rank"):
        next(dataset.iter_batches("x", "train", 4, rank=2, world_size=2))
    with pytest.raises(ValueError, match="batch_size"):
        next(dataset.iter_batches("x", "train", 0))


def test_reads_from_s3(features, s3_env, tmp_path, monkeypatch):
    monkeypatch.setenv("GRADE_CACHE_DIR", str(tmp_path / "cache"))
    uri = f"{s3_env}/features"
    store.publish_dir(features, uri)
    assert dataset.load_spec(uri)["splits"]["train"]["n_requests"] == 73
    local = dataset.load_split(features, "valid")
    remote = dataset.load_split(uri, "valid")
    for name in local:
        assert torch.equal(local[name], remote[name])
    ids = torch.cat([b["request_id"] for b in dataset.iter_batches(uri, "train", 32, rank=0, world_size=2)])
    assert len(ids) == 36


def test_an_unwritable_cache_folder_is_an_input_error_naming_it(features, s3_env, tmp_path, monkeypatch):
    import os
    from pathlib import Path

    (tmp_path / "ro").mkdir(mode=0o500)
    if os.geteuid() == 0:
        # root writes through a read-only mode: refuse the folder's creation the way the kernel would
        real_mkdir = Path.mkdir

        def refused(self, *args, **kwargs):
            if str(self).startswith(str(tmp_path / "ro")):
                raise PermissionError(13, "Permission denied", str(self))
            return real_mkdir(self, *args, **kwargs)

        monkeypatch.setattr(Path, "mkdir", refused)
    monkeypatch.setenv("GRADE_CACHE_DIR", str(tmp_path / "ro" / "cache"))
    uri = f"{s3_env}/features-unwritable-cache"
    store.publish_dir(features, uri)
    with pytest.raises(InputError, match="GRADE_CACHE_DIR .*ro/cache.*writable"):
        dataset.load_split(uri, "valid")
