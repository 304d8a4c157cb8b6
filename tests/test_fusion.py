"""Fusion: fused scores, ranking with deterministic ties, top-E, gathering, discounts and NDCG by hand."""

from __future__ import annotations

import math

import pytest
import torch

from grade.data.fusion import dcg_discounts, examination, fuse, gather_items, ndcg_at, top_e


def test_fuse_by_hand_with_padding():
    z = torch.tensor([[[1.0, 0.0], [0.0, 2.0], [3.0, 3.0]]])      # B=1, L=3, K=2
    w = torch.tensor([[0.25, 0.75]])
    mask = torch.tensor([[True, True, False]])
    s = fuse(z, w, mask)
    assert s[0, :2].tolist() == [0.25, 1.5]
    assert s[0, 2] == float("-inf")
    assert fuse(z, w).tolist() == [[0.25, 1.5, 3.0]]


def test_fuse_groups_match_one_vector_at_a_time():
    g = torch.Generator().manual_seed(0)
    z = torch.randn(4, 6, 3, generator=g)
    w = torch.softmax(torch.randn(4, 5, 3, generator=g), -1)
    mask = torch.rand(4, 6, generator=g) > 0.3
    group = fuse(z, w, mask)
    assert group.shape == (4, 5, 6)
    for j in range(5):
        assert torch.equal(group[:, j], fuse(z, w[:, j], mask))


def test_fuse_rejects_other_weight_shapes():
    with pytest.raises(ValueError, match="weights"):
        fuse(torch.zeros(2, 3, 2), torch.zeros(2))


def test_equal_weights_on_log_predictions_rank_by_the_product():
    # sum_k (1/K) log p_k orders items like prod_k p_k (the production formula)
    g = torch.Generator().manual_seed(1)
    p = torch.rand(3, 10, 3, generator=g) + 0.01
    s = fuse(p.log(), torch.full((3, 3), 1 / 3))
    assert torch.equal(top_e(s, 10), top_e(p.prod(-1), 10))


def test_top_e_ties_by_lower_index_and_padding_last():
    s = torch.tensor([[1.0, 3.0, 3.0, float("-inf"), 2.0, 3.0]])
    assert top_e(s, 4).tolist() == [[1, 2, 5, 4]]
    assert top_e(s, 100).tolist() == [[1, 2, 5, 4, 0, 3]]       # e > L is clipped to L


def test_gather_items_all_shapes():
    x = torch.tensor([[10.0, 11.0, 12.0], [20.0, 21.0, 22.0]])
    idx = torch.tensor([[2, 0], [1, 2]])
    assert gather_items(x, idx).tolist() == [[12.0, 10.0], [21.0, 22.0]]
    xk = torch.stack([x, -x], -1)                                   # [B, L, K]
    assert gather_items(xk, idx)[..., 1].tolist() == [[-12.0, -10.0], [-21.0, -22.0]]
    gidx = torch.tensor([[[0, 1], [2, 1]], [[2, 2], [0, 0]]])      # [B, G, E]
    assert gather_items(x, gidx).tolist() == [[[10.0, 11.0], [12.0, 11.0]], [[22.0, 22.0], [20.0, 20.0]]]
    assert gather_items(xk, gidx)[..., 1].tolist() == [[[-10.0, -11.0], [-12.0, -11.0]],
                                                       [[-22.0, -22.0], [-20.0, -20.0]]]
    with pytest.raises(ValueError):
        gather_items(x, torch.zeros(2, dtype=torch.long))


def test_discounts_and_examination_by_hand():
    assert dcg_discounts(3).tolist() == pytest.approx([1.0, 1 / math.log2(3), 0.5])
    assert examination(3).tolist() == pytest.approx([1.0, 0.5, 1 / 3])
    assert examination(3, eta=0.5).tolist() == pytest.approx([1.0, 2 ** -0.5, 3 ** -0.5])


def test_ndcg_by_hand():
    # ranking [0, 1, 2] by scores, labels [0, 1, 1] (exp2 gain 2^1 - 1 = 1)
    # DCG@3 = 0 + 1/log2(3) + 1/2; ideal = 1 + 1/log2(3)
    s = torch.tensor([[3.0, 2.0, 1.0]])
    y = torch.tensor([[0.0, 1.0, 1.0]])
    expected = (1 / math.log2(3) + 0.5) / (1 + 1 / math.log2(3))
    assert ndcg_at(s, y, None, 3).item() == pytest.approx(expected)
    # @1: the top item has no gain
    assert ndcg_at(s, y, None, 1).item() == 0.0
    # graded labels: exp2 gain 2^2 - 1 = 3 vs linear gain 2
    y2 = torch.tensor([[0.0, 2.0, 1.0]])
    exp2 = (3 / math.log2(3) + 1 / 2) / (3 + 1 / math.log2(3))
    linear = (2 / math.log2(3) + 1 / 2) / (2 + 1 / math.log2(3))
    assert ndcg_at(s, y2, None, 3).item() == pytest.approx(exp2)
    assert ndcg_at(s, y2, None, 3, gain="linear").item() == pytest.approx(linear)


def test_ndcg_ignores_padding_and_is_zero_without_positives():
    s = torch.tensor([[3.0, 2.0, 1.0], [1.0, 2.0, 3.0]])
    y = torch.tensor([[5.0, 0.0, 1.0], [0.0, 0.0, 0.0]])
    mask = torch.tensor([[False, True, True], [True, True, True]])
    s = fuse(torch.stack([s], -1), torch.ones(2, 1), mask)         # -inf at padding
    out = ndcg_at(s, y, mask, 2)
    # row 0: the padded item's label 5 does not count; real ranking [1, 2]: DCG = 0 + 1/log2(3), ideal = 1
    assert out[0].item() == pytest.approx(1 / math.log2(3))
    assert out[1].item() == 0.0


def test_ndcg_of_groups_matches_single_vectors():
    g = torch.Generator().manual_seed(2)
    z = torch.randn(5, 7, 3, generator=g)
    w = torch.softmax(torch.randn(5, 4, 3, generator=g), -1)
    y = torch.randint(0, 3, (5, 7), generator=g).float()
    mask = torch.rand(5, 7, generator=g) > 0.2
    group = ndcg_at(fuse(z, w, mask), y, mask, 3)
    assert group.shape == (5, 4)
    for j in range(4):
        assert torch.allclose(group[:, j], ndcg_at(fuse(z, w[:, j], mask), y, mask, 3))
    assert ((group >= 0) & (group <= 1 + 1e-6)).all()


def test_cascade_examination_hand_computed():
    from grade.data.fusion import cascade_examination
    a = torch.tensor([[0.5, 0.2, 0.1, 0.3]])
    # slot 1: 0.5 * 0.5 + 0.5 * 0.9 = 0.7; slot 2: 0.7 * (0.2 * 0.5 + 0.8 * 0.9) = 0.574
    got = cascade_examination(a, continue_click=0.5, continue_skip=0.9)
    assert torch.allclose(got[0, :3], torch.tensor([1.0, 0.7, 0.574]))
    paged = cascade_examination(a, 0.5, 0.9, page_size=2)
    assert paged[0, 2:].eq(0).all() and torch.allclose(paged[0, :2], got[0, :2])
    # a user who always continues examines every slot: the position-free limit
    assert cascade_examination(a, 1.0, 1.0).eq(1).all()
