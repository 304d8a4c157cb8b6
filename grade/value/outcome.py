"""The outcome model: what an examined item is worth to this user, learned from the logs.

For every candidate item of a request the model predicts, from the item's MTL predictions and the
request's user/context features,

- ``ctr``: P(click | examined) — fitted with the position-based likelihood
  P(click | logged position p) = theta_p * ctr, theta the examination curve (estimated from the logs);
- ``cvr``: P(order | click) — fitted on the clicked items;
- ``value``: E[order value | order] — fitted on the ordered items (log-normal).

Each head is a *correction of the MTL model*: its logit starts from the MTL prediction's own logit
(log for the order value) and an MLP over [z, z minus the request's mean z, user features, category
embeddings] adds what the global MTL model misses — above all each user's own price sensitivity,
which shows up as an interaction between the user features and the item's price signal within the
request. Starting from the MTL logit keeps the model at least as good as the predictions it corrects
(measured on the demo's valid split: the order-probability correlation with the truth rises from
0.80 to 0.82-0.87, the click probability's stays at 0.93).

The direct-method estimator (:mod:`grade.value.estimators`) turns the per-item value
v_click ctr + v_order ctr cvr + v_gmv ctr cvr value / unit into the value of any ranking.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
from pathlib import Path
from typing import Any

import torch
from torch import nn

from grade.core.config import SEED_RANGE, ranged
from grade.core.progress import Progress
from grade.data.transform import objective_index
from grade.value.examination import ExaminationEstimate

log = logging.getLogger(__name__)

HEADS = ("ctr", "cvr", "value")
_FIELDS = ("z", "pred", "mask", "num", "cat", "click", "order", "gmv")
_OFFSET_EPS = 1e-6


@dataclasses.dataclass
class OutcomeConfig:
    hidden: list[int] = ranged([64, 64], "[1, 8192]")
    """hidden layer widths of the correction MLP"""
    emb_dim: int = ranged(8, "[1, 1024]")
    """embedding width per categorical feature"""
    epochs: int = ranged(24, "[1, 10000]")
    """most passes over the train split (early stopping on the valid likelihood usually ends sooner)"""
    patience: int = ranged(3, "[1, 10000]")
    """stop after this many passes without a lower valid loss, and keep the best pass's weights"""
    batch_size: int = ranged(256, "[1, 1e7]")
    """requests per step"""
    lr: float = ranged(1e-3, "> 0")
    """Adam learning rate: 1e-3 with patience 3 reaches a lower valid loss than 3e-3 with patience 2 and
    GRADE gains 0.8 points of headroom on average over six market/seed pairs (docs/estimators.md)"""
    value_loss_weight: float = ranged(0.1, ">= 0")
    """weight of the order-value (log-normal) loss next to the click and order likelihoods"""
    seed: int = ranged(0, SEED_RANGE, derived="seed:outcome")
    """seed of the initialisation and the data order (member i of a mixture: seed + i)"""
    members: int = ranged(3, "[1, 100]")
    """outcome models fitted with seeds seed, seed + 1, ... and averaged (:class:`OutcomeMixture`): one
    model's own seed moved GRADE's share of the headroom by up to 4 points; the average of three reached
    +0.9 points over one model on average (docs/estimators.md)"""


@dataclasses.dataclass
class OutcomeSpec:
    """What builds an :class:`OutcomeNet` (saved as outcome.json next to the weights)."""

    objectives: list[str]
    """the K MTL objectives, in the order of the features' last axis"""
    n_numeric: int
    """number of numeric user/context features"""
    cat_sizes: list[int]
    """vocabulary size (incl. the OOV id 0) of each categorical feature"""
    hidden: list[int]
    """hidden layer widths"""
    emb_dim: int
    """embedding width per categorical feature"""


class OutcomeNet(nn.Module):
    """(z [B, L, K], pred [B, L, K], mask [B, L], num [B, U], cat [B, C]) -> logits [B, L, 3].

    The three outputs are logit ctr, logit cvr and the log order value; each is the MTL prediction's
    own logit (log) plus a learned correction. Objectives missing from the features start from 0.
    """

    def __init__(self, spec: OutcomeSpec):
        super().__init__()
        self.spec = spec
        k = len(spec.objectives)
        self.embeddings = nn.ModuleList([nn.Embedding(n, spec.emb_dim) for n in spec.cat_sizes])
        width = 2 * k + spec.n_numeric + spec.emb_dim * len(spec.cat_sizes)
        layers: list[nn.Module] = []
        for h in spec.hidden:
            layers += [nn.Linear(width, h), nn.SiLU()]
            width = h
        head = nn.Linear(width, len(HEADS))
        nn.init.zeros_(head.weight)   # start exactly at the MTL predictions
        nn.init.zeros_(head.bias)
        self.mlp = nn.Sequential(*layers, head)
        obj = objective_index(spec.objectives)
        self.offset_index = [obj.get("ctr", -1), obj.get("cvr", -1), obj.get("gmv", -1)]

    def offsets(self, pred: torch.Tensor) -> torch.Tensor:
        """The MTL model's own logits (log for the value) [B, L, 3]; 0 for a missing objective."""
        parts = []
        for head, i in zip(HEADS, self.offset_index, strict=True):
            if i < 0:
                parts.append(torch.zeros_like(pred[..., 0]))
            elif head == "value":
                parts.append(pred[..., i].clamp_min(_OFFSET_EPS).log())
            else:
                parts.append(torch.logit(pred[..., i].clamp(_OFFSET_EPS, 1 - _OFFSET_EPS)))
        return torch.stack(parts, dim=-1)

    def forward(self, z: torch.Tensor, pred: torch.Tensor, mask: torch.Tensor, num: torch.Tensor,
                cat: torch.Tensor) -> torch.Tensor:
        m = mask.unsqueeze(-1).to(z.dtype)
        centre = (z * m).sum(1, keepdim=True) / m.sum(1, keepdim=True).clamp_min(1.0)
        user = torch.cat([num] + [emb(cat[:, i]) for i, emb in enumerate(self.embeddings)], dim=-1)
        x = torch.cat([z, z - centre, user.unsqueeze(1).expand(-1, z.shape[1], -1)], dim=-1)
        return self.offsets(pred) + self.mlp(x)

    def item_outcomes(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """{"ctr", "cvr", "value"} per item [B, L] (0 at padding) for a feature batch."""
        out = self(batch["z"], batch["pred"], batch["mask"], batch["num"], batch["cat"])
        mask = batch["mask"]
        return {
            "ctr": torch.sigmoid(out[..., 0]).masked_fill(~mask, 0.0),
            "cvr": torch.sigmoid(out[..., 1]).masked_fill(~mask, 0.0),
            "value": out[..., 2].exp().masked_fill(~mask, 0.0),
        }


def expected_kinds(outcomes: dict[str, torch.Tensor]) -> torch.Tensor:
    """Item outcomes {"ctr", "cvr", "value"} [B, L] -> the expected clicks, orders and GMV (raw units) of
    an examined item [B, L, 3]: ctr, ctr cvr, ctr cvr value."""
    orders = outcomes["ctr"] * outcomes["cvr"]
    return torch.stack([outcomes["ctr"], orders, orders * outcomes["value"]], dim=-1)


def mixture_outcomes(outcomes: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """The item outcomes of a mixture of models, each {"ctr", "cvr", "value"} [B, L], in the same form.

    The mixture's expected clicks, orders and order value are the members' means of ctr, ctr * cvr and
    ctr * cvr * value (averaging cvr alone would weight a member's conversion rate regardless of how
    often it expects a click); its cvr and value are read back from those (0 where the divisor is 0).
    """
    ctr, orders, gmv = torch.stack([expected_kinds(o) for o in outcomes]).mean(0).unbind(-1)
    return {"ctr": ctr,
            "cvr": torch.where(ctr > 0, orders / ctr.clamp_min(1e-30), torch.zeros_like(ctr)),
            "value": torch.where(orders > 0, gmv / orders.clamp_min(1e-30), torch.zeros_like(orders))}


class OutcomeMixture(nn.Module):
    """Several outcome models fitted with different seeds, read as one: :func:`mixture_outcomes`."""

    def __init__(self, members: list[OutcomeNet]):
        super().__init__()
        self.members = nn.ModuleList(members)
        self.spec = members[0].spec

    def item_outcomes(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """{"ctr", "cvr", "value"} per item [B, L] (0 at padding) of the mixture."""
        return mixture_outcomes([m.item_outcomes(batch) for m in self.members])


def outcome_loss(logits: torch.Tensor, batch: dict[str, torch.Tensor], theta_logged: torch.Tensor,
                 value_weight: float) -> dict[str, torch.Tensor]:
    """Negative log-likelihoods of the logged feedback under the position-based model.

    logits [B, L, 3] from :class:`OutcomeNet`; batch: mask, click, order, gmv [B, L];
    theta_logged [B, L]: the examination probability of each item's logged position.
    Returns {"click", "order", "value", "total"} (means over the items each term is defined on).
    """
    mask = batch["mask"]
    p_click = (theta_logged * torch.sigmoid(logits[..., 0])).clamp(1e-7, 1 - 1e-7)
    click = batch["click"]
    nll_click = -(click * p_click.log() + (1 - click) * (1 - p_click).log())[mask].mean()
    clicked = mask & (click > 0)
    zero = logits.new_zeros(())
    nll_order = nn.functional.binary_cross_entropy_with_logits(
        logits[..., 1][clicked], batch["order"][clicked]) if clicked.any() else zero
    ordered = mask & (batch["order"] > 0) & (batch["gmv"] > 0)
    nll_value = (((logits[..., 2][ordered] - batch["gmv"][ordered].log()) ** 2).mean()
                 if ordered.any() else zero)
    total = nll_click + nll_order + value_weight * nll_value
    return {"click": nll_click, "order": nll_order, "value": nll_value, "total": total}


def calibration(probs: torch.Tensor, labels: torch.Tensor, bins: int = 10) -> dict[str, Any]:
    """Reliability of predicted probabilities [N] against 0/1 labels [N]: log-loss, ECE and the bins.

    Bins are quantiles of the predictions, so each holds about N / bins items.
    """
    probs = probs.double().clamp(1e-7, 1 - 1e-7)
    labels = labels.double()
    logloss = float(-(labels * probs.log() + (1 - labels) * (1 - probs).log()).mean())
    order = torch.argsort(probs)
    rows, ece = [], 0.0
    for part in torch.tensor_split(order, bins):
        if part.numel() == 0:
            continue
        p, y = float(probs[part].mean()), float(labels[part].mean())
        ece += part.numel() / probs.numel() * abs(p - y)
        rows.append({"predicted": p, "observed": y, "n": int(part.numel())})
    return {"logloss": logloss, "ece": ece, "mean_predicted": float(probs.mean()),
            "mean_observed": float(labels.mean()), "bins": rows}


def save_outcome(model: OutcomeNet | OutcomeMixture, folder: str | Path) -> None:
    """outcome.safetensors + outcome.json (never pickle); a mixture's members share the spec and their
    weights sit under ``members.<i>.`` in the one file."""
    from safetensors.torch import save_file

    folder = Path(folder)
    save_file({k: v.detach().contiguous() for k, v in model.state_dict().items()},
              str(folder / "outcome.safetensors"))
    members = len(model.members) if isinstance(model, OutcomeMixture) else 1
    (folder / "outcome.json").write_text(json.dumps({**dataclasses.asdict(model.spec), "members": members},
                                                    indent=1, sort_keys=True))


def load_outcome_from(folder: str | Path) -> OutcomeNet | OutcomeMixture:
    """The model saved by :func:`save_outcome` in a local folder (one model where outcome.json names no
    members, as before mixtures)."""
    from safetensors.torch import load_file

    folder = Path(folder)
    saved = json.loads((folder / "outcome.json").read_text())
    members = int(saved.pop("members", 1))
    spec = OutcomeSpec(**saved)
    model: OutcomeNet | OutcomeMixture = (OutcomeNet(spec) if members == 1
                                          else OutcomeMixture([OutcomeNet(spec) for _ in range(members)]))
    model.load_state_dict(load_file(str(folder / "outcome.safetensors")))
    model.eval()
    return model


def mean_order_value(gmv: torch.Tensor, order: torch.Tensor, mask: torch.Tensor) -> float:
    """The mean logged value of an order (the unit of GMV in the declared business value); 1 without
    orders."""
    ordered = mask & (order > 0)
    if not bool(ordered.any()):
        return 1.0
    v = float(gmv[ordered].double().mean())
    return v if math.isfinite(v) and v > 0 else 1.0


def fit_outcome(train: dict[str, torch.Tensor], spec: dict[str, Any], examination: ExaminationEstimate,
                cfg: OutcomeConfig, valid: dict[str, torch.Tensor] | None = None
                ) -> tuple[OutcomeNet, list[dict[str, float]]]:
    """Fit the outcome model on the logged requests ``train`` (tensors as grade.data.dataset.load_split
    gives).

    Minibatches of ``cfg.batch_size`` requests in a seeded order, Adam, at most ``cfg.epochs`` passes.
    With ``valid`` requests, after each pass the same likelihood is measured on them; training stops
    after ``cfg.patience`` passes without a lower valid loss and the best pass's weights are kept
    (the correction overfits the few orders per user: on the demo data the direct method's picks are
    worth 82% of the oracle's headroom after 3 passes, 86% after 8 and 84% after 15).
    Returns the model (eval mode) and one log row per pass (mean losses; ``valid/*`` with ``valid``).
    """
    torch.manual_seed(cfg.seed)
    model = OutcomeNet(OutcomeSpec(objectives=list(spec["objectives"]), n_numeric=train["num"].shape[1],
                                   cat_sizes=[int(c["size"]) for c in spec["categorical"]],
                                   hidden=list(cfg.hidden), emb_dim=cfg.emb_dim))
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    theta_logged = examination.theta_at(train["position"])
    gen = torch.Generator().manual_seed(cfg.seed)
    progress = Progress("outcome", cfg.epochs * math.ceil(train["mask"].shape[0] / cfg.batch_size), "steps",
                        rate_unit="requests")
    history: list[dict[str, float]] = []
    best: tuple[float, dict[str, torch.Tensor]] | None = None
    for epoch in range(cfg.epochs):
        row = {"epoch": epoch + 1, **_train_pass(model, optimizer, train, theta_logged, cfg, gen, progress)}
        if valid is not None:
            row.update({f"valid/{k}": v for k, v in evaluate_loss(model, valid, examination, cfg).items()})
        history.append(row)
        log.info("outcome: epoch %d/%d loss %.5f%s", epoch + 1, cfg.epochs, row["loss/total"],
                 f", valid {row['valid/total']:.5f}" if valid is not None else "")
        if valid is None:
            continue
        if best is None or row["valid/total"] < best[0]:
            best = (row["valid/total"], {k: v.detach().clone() for k, v in model.state_dict().items()})
        elif epoch + 1 - _best_epoch(history) >= cfg.patience:
            break
    progress.finish()
    if best is not None:
        model.load_state_dict(best[1])
        log.info("outcome: kept epoch %d of %d (lowest valid loss %.5f)", _best_epoch(history), len(history),
                 best[0])
    model.eval()
    return model, history


def fit_outcomes(train: dict[str, torch.Tensor], spec: dict[str, Any], examination: ExaminationEstimate,
                 cfg: OutcomeConfig, valid: dict[str, torch.Tensor] | None = None
                 ) -> tuple[OutcomeNet | OutcomeMixture, list[dict[str, float]]]:
    """:func:`fit_outcome` ``cfg.members`` times, with seeds cfg.seed, cfg.seed + 1, ...: one model, or
    their :class:`OutcomeMixture`; the passes of every member in one history (``member`` 0, 1, ...)."""
    members, history = [], []
    for i in range(cfg.members):
        member_cfg = dataclasses.replace(cfg, seed=cfg.seed + i)
        model, rows = fit_outcome(train, spec, examination, member_cfg, valid)
        members.append(model)
        history += [{"member": i, **row} for row in rows]
    return (members[0] if len(members) == 1 else OutcomeMixture(members)), history


def _best_epoch(history: list[dict[str, float]]) -> int:
    return min(history, key=lambda r: r["valid/total"])["epoch"]


def _train_pass(model: OutcomeNet, optimizer: torch.optim.Optimizer, train: dict[str, torch.Tensor],
                theta_logged: torch.Tensor, cfg: OutcomeConfig, gen: torch.Generator, progress: Progress
                ) -> dict[str, float]:
    """One pass over ``train`` in a seeded order; the mean losses {"loss/click", ...}."""
    n = train["mask"].shape[0]
    order, sums = torch.randperm(n, generator=gen), {}
    model.train()
    for start in range(0, n, cfg.batch_size):
        rows = order[start:start + cfg.batch_size]
        batch = {k: train[k][rows] for k in _FIELDS}
        losses = outcome_loss(model(batch["z"], batch["pred"], batch["mask"], batch["num"], batch["cat"]),
                              batch, theta_logged[rows], cfg.value_loss_weight)
        optimizer.zero_grad()
        losses["total"].backward()
        optimizer.step()
        for k, v in losses.items():
            sums[f"loss/{k}"] = sums.get(f"loss/{k}", 0.0) + float(v.detach()) * len(rows) / n
        progress.add(1, amount=len(rows))
    return sums


@torch.no_grad()
def evaluate_loss(model: OutcomeNet, data: dict[str, torch.Tensor], examination: ExaminationEstimate,
                  cfg: OutcomeConfig) -> dict[str, float]:
    """The training likelihood on held-out requests, in batches: {"click", "order", "value", "total"}
    (each a mean over the items it is defined on, weighted by the batches' item counts)."""
    was_training = model.training
    model.eval()
    theta_logged = examination.theta_at(data["position"])
    n, sums, weight = data["mask"].shape[0], {}, {}
    for start in range(0, n, 4 * cfg.batch_size):
        batch = {k: data[k][start:start + 4 * cfg.batch_size] for k in _FIELDS}
        losses = outcome_loss(model(batch["z"], batch["pred"], batch["mask"], batch["num"], batch["cat"]),
                              batch, theta_logged[start:start + 4 * cfg.batch_size], cfg.value_loss_weight)
        items = float(batch["mask"].sum())
        for k, v in losses.items():
            sums[k] = sums.get(k, 0.0) + float(v) * items
            weight[k] = weight.get(k, 0.0) + items
    model.train(was_training)
    return {k: sums[k] / max(weight[k], 1.0) for k in sums}
