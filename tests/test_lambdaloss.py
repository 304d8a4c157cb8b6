"""LambdaLoss: allRank's reference values, hand-computed cases per scheme, padding, truncation, gradients."""

from __future__ import annotations

import math

import pytest
import torch

from grade.model.lambdaloss import WEIGHING_SCHEMES, lambda_loss

LOG2_1P_EXP_M1 = math.log2(1 + math.exp(-1))   # -log2 sigmoid(1)  = 0.45194
LOG2_1P_EXP_P1 = math.log2(1 + math.exp(1))    # -log2 sigmoid(-1) = 1.89461
LOG2_1P_EXP_P2 = math.log2(1 + math.exp(2))    # -log2 sigmoid(-2) = 3.06115
INV_D = [1.0, 1 / math.log2(3), 0.5]           # 1/D_r for ranks 1, 2, 3 (D_r = log2(1 + r))


def reference_batch():
    """allRank 1.4.3's reference batch: seed 0, labels randint(0, 3, (4, 10)) with the tails of rows
    1 and 3 padded (label -1), scores randn(4, 10). The expected values below are allRank's
    ``lambdaLoss(..., reduction="sum")`` on it."""
    torch.manual_seed(0)
    y_true = torch.randint(0, 3, (4, 10)).float()
    y_true[1, 7:] = -1
    y_true[3, 5:] = -1
    y_pred = torch.randn(4, 10)
    return y_pred, y_true


@pytest.mark.parametrize("scheme,k,expected", [
    ("ndcgLoss2PP", None, 44.5023), ("ndcgLoss2PP", 5, 27.5398), ("lambdaRank", None, 6.4084),
    ("ndcgLoss2", None, 3.8094), ("ndcgLoss1", None, 25.1338), ("rankNet", None, 84.9428),
])
def test_reference_values_of_allrank(scheme, k, expected):
    y_pred, y_true = reference_batch()
    # allRank's convention: mask=None, label -1 = padding
    loss = lambda_loss(y_pred, y_true, weighing_scheme=scheme, k=k, reduction="sum")
    assert round(loss.item(), 4) == expected
    # the same with an explicit mask and the padded labels set to anything
    mask = y_true >= 0
    loss_masked = lambda_loss(y_pred, torch.where(mask, y_true, torch.tensor(7.0)), mask,
                              weighing_scheme=scheme, k=k, reduction="sum")
    assert round(loss_masked.item(), 4) == expected


# ------------------------------------------------------------------------------------------------
# Hand-computed small cases
# ------------------------------------------------------------------------------------------------

def test_two_items_every_scheme_by_hand():
    # scores [2, 1] (already in predicted order), labels [1, 0]: ranks 1 and 2, D = [1, log2 3].
    # maxDCG = (2^1 - 1)/1 = 1, so G = [1, 0]. One valid pair (0, 1), s_0 - s_1 = 1,
    # its -log2 sigmoid(1) = log2(1 + e^-1).
    s, y = torch.tensor([[2.0, 1.0]]), torch.tensor([[1.0, 0.0]])
    lam = (INV_D[0] - INV_D[1]) * 1.0            # |1/D_1 - 1/D_2| * |G_0 - G_1|
    expected = {
        "rankNet": LOG2_1P_EXP_M1,
        "lambdaRank": lam * LOG2_1P_EXP_M1,
        "ndcgLoss2": lam * LOG2_1P_EXP_M1,       # delta for |i-j| = 1 is |1/D_1 - 1/D_2| too
        "ndcgLoss2PP": (10.0 * lam + lam) * LOG2_1P_EXP_M1,
        # ndcgLoss1 keeps every real pair, the diagonal included; w_ij = G_i / D_i, so only row 0:
        # pair (0,0): 1 * -log2 sigmoid(0) = 1; pair (0,1): 1 * log2(1 + e^-1)
        "ndcgLoss1": 1.0 + LOG2_1P_EXP_M1,
    }
    for scheme, value in expected.items():
        got = lambda_loss(s, y, weighing_scheme=scheme, reduction="sum").item()
        assert got == pytest.approx(value, rel=1e-6), scheme


def three_items():
    # scores [3, 2, 1] (predicted order = index order), labels [0, 2, 1]
    # ideal order of labels [2, 1, 0]: maxDCG M = 3/1 + 1/log2(3); G = [0, 3, 1] / M
    # valid pairs (y_i > y_j): (1,0) diff -1; (1,2) diff +1; (2,0) diff -2
    return torch.tensor([[3.0, 2.0, 1.0]]), torch.tensor([[0.0, 2.0, 1.0]])


def test_three_items_lambdarank_and_ndcgloss2_by_hand():
    s, y = three_items()
    m = 3.0 + INV_D[1]
    lambda_rank = ((INV_D[0] - INV_D[1]) * 3 / m * LOG2_1P_EXP_P1      # pair (1,0): ranks 2 vs 1
                   + (INV_D[1] - INV_D[2]) * 2 / m * LOG2_1P_EXP_M1    # pair (1,2): ranks 2 vs 3
                   + (INV_D[0] - INV_D[2]) * 1 / m * LOG2_1P_EXP_P2)   # pair (2,0): ranks 3 vs 1
    delta1, delta2 = INV_D[0] - INV_D[1], INV_D[1] - INV_D[2]            # delta for |i-j| = 1, 2
    ndcg2 = (delta1 * 3 / m * LOG2_1P_EXP_P1 + delta1 * 2 / m * LOG2_1P_EXP_M1
             + delta2 * 1 / m * LOG2_1P_EXP_P2)
    assert lambda_loss(s, y, weighing_scheme="lambdaRank", reduction="sum").item() == pytest.approx(
        lambda_rank, rel=1e-6)
    assert lambda_loss(s, y, weighing_scheme="ndcgLoss2", reduction="sum").item() == pytest.approx(
        ndcg2, rel=1e-6)
    assert lambda_loss(s, y, weighing_scheme="ndcgLoss2PP", mu=3.0, reduction="sum").item() == pytest.approx(
        3.0 * ndcg2 + lambda_rank, rel=1e-6)
    rank_net = LOG2_1P_EXP_P1 + LOG2_1P_EXP_M1 + LOG2_1P_EXP_P2
    assert lambda_loss(s, y, weighing_scheme="rankNet", reduction="sum").item() == pytest.approx(
        rank_net, rel=1e-6)
    # mean over the 3 valid pairs
    assert lambda_loss(s, y, weighing_scheme="rankNet", reduction="mean").item() == pytest.approx(
        rank_net / 3, rel=1e-6)


def test_three_items_ndcgloss1_by_hand():
    s, y = three_items()
    m = 3.0 + INV_D[1]
    # all 9 real pairs, w_ij = G_i / D_i (rows: item 1 has G = 3/M at rank 2, item 2 has G = 1/M at rank 3)
    # row 1: pairs with items 0, 1, 2: diffs -1, 0, +1
    row1 = 3 / m * INV_D[1] * (LOG2_1P_EXP_P1 + 1.0 + LOG2_1P_EXP_M1)
    # row 2: diffs -2, -1, 0
    row2 = 1 / m * INV_D[2] * (LOG2_1P_EXP_P2 + LOG2_1P_EXP_P1 + 1.0)
    got = lambda_loss(s, y, weighing_scheme="ndcgLoss1", reduction="sum").item()
    assert got == pytest.approx(row1 + row2, rel=1e-6)


def test_sigma_scales_the_score_differences():
    # rankNet with sigma = 2 on the two-item case: -log2 sigmoid(2 * 1)
    s, y = torch.tensor([[2.0, 1.0]]), torch.tensor([[1.0, 0.0]])
    got = lambda_loss(s, y, weighing_scheme="rankNet", sigma=2.0, reduction="sum").item()
    assert got == pytest.approx(math.log2(1 + math.exp(-2)), rel=1e-6)


def test_k_truncation_by_hand():
    s, y = three_items()
    m = 3.0 + INV_D[1]          # maxDCG@2 is the same: the ideal top 2 are labels 2 and 1
    # k=2: only pairs whose predicted ranks are both <= 2: (1,0)
    got = lambda_loss(s, y, weighing_scheme="lambdaRank", k=2, reduction="sum").item()
    assert got == pytest.approx((INV_D[0] - INV_D[1]) * 3 / m * LOG2_1P_EXP_P1, rel=1e-6)
    # k=1: no pair left; the sum and the mean are 0
    assert lambda_loss(s, y, weighing_scheme="lambdaRank", k=1, reduction="sum").item() == 0.0
    assert lambda_loss(s, y, weighing_scheme="lambdaRank", k=1, reduction="mean").item() == 0.0
    # k >= L is no truncation
    assert lambda_loss(s, y, k=50, reduction="sum").item() == pytest.approx(
        lambda_loss(s, y, reduction="sum").item())


def test_truncation_uses_the_predicted_ranks_not_the_positions():
    # same lists as three_items but shuffled: predicted ranks are what counts for k
    s, y = three_items()
    perm = torch.tensor([2, 0, 1])
    for scheme in WEIGHING_SCHEMES:
        for k in (None, 1, 2):
            a = lambda_loss(s, y, weighing_scheme=scheme, k=k, reduction="sum")
            b = lambda_loss(s[:, perm], y[:, perm], weighing_scheme=scheme, k=k, reduction="sum")
            assert a.item() == pytest.approx(b.item(), rel=1e-6), (scheme, k)


# ------------------------------------------------------------------------------------------------
# Padding, batching, reductions
# ------------------------------------------------------------------------------------------------

def random_lists(seed=1, b=6, length=12):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, length, generator=g), torch.randint(0, 4, (b, length), generator=g).float()


@pytest.mark.parametrize("scheme", WEIGHING_SCHEMES)
@pytest.mark.parametrize("k", [None, 4])
def test_padding_gives_the_unpadded_loss(scheme, k):
    s, y = random_lists()
    base_sum = lambda_loss(s, y, torch.ones_like(s, dtype=torch.bool), scheme, k=k, reduction="sum")
    base_mean = lambda_loss(s, y, None, scheme, k=k, reduction="mean")
    # padding interleaved with the real items, with huge / inf / nan scores and positive labels
    g = torch.Generator().manual_seed(5)
    n_pad = 7
    pad_s = torch.tensor([1e6, float("inf"), float("nan"), -float("inf"), 3.0, 0.0, -2.0])
    order = torch.randperm(s.shape[1] + n_pad, generator=g)
    ps = torch.cat([s, pad_s.expand(s.shape[0], n_pad)], 1)[:, order]
    py = torch.cat([y, torch.full((s.shape[0], n_pad), 3.0)], 1)[:, order]
    pm = torch.cat([torch.ones_like(s, dtype=torch.bool),
                    torch.zeros(s.shape[0], n_pad, dtype=torch.bool)], 1)[:, order]
    assert lambda_loss(ps, py, pm, scheme, k=k, reduction="sum").item() == pytest.approx(
        base_sum.item(), rel=1e-5)
    assert lambda_loss(ps, py, pm, scheme, k=k, reduction="mean").item() == pytest.approx(
        base_mean.item(), rel=1e-5)
    # allRank's way: mask=None, label -1 at padding
    ay = torch.where(pm, py, torch.tensor(-1.0))
    assert lambda_loss(ps, ay, None, scheme, k=k, reduction="sum").item() == pytest.approx(
        base_sum.item(), rel=1e-5)


def test_padding_gets_exactly_zero_gradient_and_real_items_finite():
    s, y = random_lists(b=4, length=10)
    mask = torch.ones_like(s, dtype=torch.bool)
    mask[1, 6:] = False
    mask[3, :3] = False
    # fuse() puts -inf at padding; a NaN there must not leak either
    s = s.masked_fill(~mask, float("-inf"))
    s[3, 0] = float("nan")
    s.requires_grad_(True)
    for scheme in WEIGHING_SCHEMES:
        for reduction in ("sum", "mean"):
            s.grad = None
            lambda_loss(s, y, mask, scheme, k=5, reduction=reduction).backward()
            assert torch.isfinite(s.grad).all(), (scheme, reduction)
            assert (s.grad[~mask] == 0).all(), (scheme, reduction)
            assert s.grad[mask].abs().sum() > 0, (scheme, reduction)


def test_gradients_stay_finite_for_extreme_scores():
    s = torch.tensor([[1e4, -1e4, 0.0, 3e4]], requires_grad=True)
    y = torch.tensor([[0.0, 2.0, 1.0, 0.0]])
    loss = lambda_loss(s, y, reduction="sum")
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(s.grad).all()
    # the badly misordered item (label 2, lowest score) is pushed up, the top item with label 0 down
    assert s.grad[0, 1] < 0 and s.grad[0, 3] > 0


def test_gradient_matches_finite_differences():
    s, y = random_lists(seed=3, b=2, length=6)
    s = s.double().requires_grad_(True)
    mask = torch.ones_like(y, dtype=torch.bool)
    mask[0, 4:] = False
    for scheme in WEIGHING_SCHEMES:
        assert torch.autograd.gradcheck(lambda x, sc=scheme: lambda_loss(x, y.double(), mask, sc, k=4), (s,))


def test_mean_without_valid_pair_is_zero_not_nan():
    s = torch.randn(3, 5, requires_grad=True)
    cases = [torch.zeros(3, 5), torch.full((3, 5), 2.0)]   # no label difference anywhere
    for y in cases:
        for scheme in ("ndcgLoss2PP", "lambdaRank", "ndcgLoss2", "rankNet"):
            loss = lambda_loss(s, y, reduction="mean", weighing_scheme=scheme)
            assert loss.item() == 0.0
            loss.backward()
            assert torch.isfinite(s.grad).all() and (s.grad == 0).all()
            s.grad = None
    # a batch that is all padding, and an empty batch
    assert lambda_loss(s, torch.ones(3, 5), torch.zeros(3, 5, dtype=torch.bool)).item() == 0.0
    assert lambda_loss(torch.zeros(0, 5), torch.zeros(0, 5)).item() == 0.0


def test_mean_is_over_the_valid_pairs_of_the_whole_batch():
    s, y = random_lists(seed=7, b=3, length=8)
    n_pairs = int((y[:, :, None] > y[:, None, :]).sum())
    total = lambda_loss(s, y, reduction="sum")
    assert lambda_loss(s, y, reduction="mean").item() == pytest.approx(total.item() / n_pairs, rel=1e-6)


def test_batch_sum_equals_the_sum_over_lists():
    s, y = random_lists(seed=11, b=5, length=9)
    for scheme in WEIGHING_SCHEMES:
        per_list = sum(lambda_loss(s[i:i + 1], y[i:i + 1], weighing_scheme=scheme, reduction="sum")
                       for i in range(5))
        assert lambda_loss(s, y, weighing_scheme=scheme, reduction="sum").item() == pytest.approx(
            per_list.item(), rel=1e-5)


def test_integer_labels_are_accepted():
    s, y = random_lists(seed=2)
    for scheme in WEIGHING_SCHEMES:
        a = lambda_loss(s, y.long(), weighing_scheme=scheme)
        b = lambda_loss(s, y, weighing_scheme=scheme)
        assert a.item() == pytest.approx(b.item(), rel=1e-6)
    assert lambda_loss(s, y.to(torch.int8), reduction="sum").item() == pytest.approx(
        lambda_loss(s, y, reduction="sum").item(), rel=1e-6)


def test_better_ranking_has_lower_loss():
    y = torch.tensor([[3.0, 2.0, 1.0, 0.0]])
    good, bad = torch.tensor([[4.0, 3.0, 2.0, 1.0]]), torch.tensor([[1.0, 2.0, 3.0, 4.0]])
    for scheme in WEIGHING_SCHEMES:
        assert (lambda_loss(good, y, weighing_scheme=scheme)
                < lambda_loss(bad, y, weighing_scheme=scheme)), scheme


def test_bad_arguments_raise():
    s, y = random_lists()
    with pytest.raises(ValueError, match="weighing_scheme"):
        lambda_loss(s, y, weighing_scheme="ndcg")
    with pytest.raises(ValueError, match="reduction"):
        lambda_loss(s, y, reduction="none")
    with pytest.raises(ValueError, match=r"\[B, L\]"):
        lambda_loss(s[0], y[0])
