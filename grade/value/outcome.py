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
(docs/estimators.md measures how much better).

The direct-method estimator (:mod:`grade.value.estimators`) turns the per-item value
v_click ctr + v_order ctr cvr + v_gmv ctr cvr value / unit (priced by
:meth:`grade.value.business.BusinessConfig.prices`) into the value of any ranking.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from grade.core.config import SEED_RANGE, ranged
from grade.core.progress import Progress
from grade.data.transform import objective_index
from grade.value.examination import ExaminationEstimate

log = logging.getLogger(__name__)

HEADS = ("ctr", "cvr", "value")
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
    """Adam learning rate (chosen with patience on the valid splits of several markets, docs/estimators.md)"""
    value_loss_weight: float = ranged(0.1, ">= 0")
    """weight of the order-value (log-normal) loss next to the click and order likelihoods"""
    seed: int = ranged(0, SEED_RANGE, derived="seed:outcome")
    """seed of the initialisation and the data order (member i of a mixture: seed + i)"""
    members: int = ranged(2, "[1, 100]")
    """outcome models fitted with seeds seed, seed + 1, ... and averaged (:class:`OutcomeMixture`): the
    average is less at the mercy of one model's seed; two hold GRADE's share as three did, at two thirds
    of the fit (docs/estimators.md)"""
    precision: Literal["auto", "bfloat16", "float32"] = "float32"
    """the matrix products of the training steps: float32 (the same result on every machine), bfloat16
    (float32 weights, losses and valid loss; the saved model computes in float32; faster where the CPU
    has native bfloat16 products, docs/estimators.md) or auto (bfloat16 where the CPU has them)"""


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



def mtl_offsets(pred: torch.Tensor, offset_index: list[int]) -> torch.Tensor:
    """The MTL model's own logits of ctr and cvr and log of the order value [..., 3] from its predictions
    [..., K] (``offset_index``: the objective of each head, -1 where missing: 0)."""
    parts = []
    for head, i in zip(HEADS, offset_index, strict=True):
        if i < 0:
            parts.append(torch.zeros_like(pred[..., 0]))
        elif head == "value":
            parts.append(pred[..., i].clamp_min(_OFFSET_EPS).log())
        else:
            parts.append(torch.logit(pred[..., i].clamp(_OFFSET_EPS, 1 - _OFFSET_EPS)))
    return torch.stack(parts, dim=-1)


def item_inputs(z: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The item part of the correction's input [..., L, 2K]: z and z minus the mean z of the request's
    items (padding excluded)."""
    m = mask.unsqueeze(-1).to(z.dtype)
    centre = (z * m).sum(-2, keepdim=True) / m.sum(-2, keepdim=True).clamp_min(1.0)
    return torch.cat([z, z - centre], dim=-1)


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
        return mtl_offsets(pred, self.offset_index)

    def forward(self, z: torch.Tensor, pred: torch.Tensor, mask: torch.Tensor, num: torch.Tensor,
                cat: torch.Tensor) -> torch.Tensor:
        items = item_inputs(z, mask)
        user = torch.cat([num] + [emb(cat[:, i]) for i, emb in enumerate(self.embeddings)], dim=-1)
        x = torch.cat([items, user.unsqueeze(1).expand(-1, z.shape[1], -1)], dim=-1)
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

    logits [..., B, L, 3] from :class:`OutcomeNet` (any leading dimensions, e.g. the members of a
    mixture); batch: mask, click, order, gmv [B, L] (or with the same leading dimensions);
    theta_logged [B, L]: the examination probability of each item's logged position.
    Returns {"click", "order", "value", "total"} [...] (means over the items each term is defined on).
    """
    return loss_means(loss_sums(logits, loss_labels(batch, theta_logged)), value_weight)


def loss_labels(batch: dict[str, torch.Tensor], theta_logged: torch.Tensor) -> torch.Tensor:
    """What the likelihood reads of a batch, packed [..., B, L, 6]: theta at the logged position, and as
    0/1: the item (not padding), its click, its order, whether it was clicked, whether it has an order
    value; then the log order value (0 where there is none)."""
    mask = batch["mask"]
    clicked = mask & (batch["click"] > 0)
    valued = mask & (batch["order"] > 0) & (batch["gmv"] > 0)
    log_gmv = torch.where(valued, batch["gmv"].clamp_min(1e-30).log(), torch.zeros_like(batch["gmv"]))
    cols = [theta_logged, mask, batch["click"], batch["order"], clicked, valued]
    return torch.stack([c.to(torch.float32) for c in cols] + [log_gmv.to(torch.float32)], dim=-1)


_LABEL_COLUMNS = 7


def loss_sums(logits: torch.Tensor, labels: torch.Tensor) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Each likelihood term's sum and item count over the last two dimensions (requests, items):
    {"click", "order", "value"} -> (sum [...], count [...]). ``labels`` from :func:`loss_labels`.

    Click ~ Bernoulli(theta * ctr) on every item; order ~ Bernoulli(cvr) on clicked items; log order
    value ~ Normal(logit, 1) on items with an order value. Terms are masked by multiplication, not
    selected, so that the shapes stay fixed and a batch of several members is one computation.
    """
    theta, mask, click, order, clicked, valued, log_gmv = labels.unbind(-1)
    p_click = (theta * torch.sigmoid(logits[..., 0])).clamp(1e-7, 1 - 1e-7)
    nll_click = -(click * p_click.log() + (1 - click) * (1 - p_click).log())
    nll_order = nn.functional.binary_cross_entropy_with_logits(logits[..., 1], order, reduction="none")
    nll_value = (logits[..., 2] - log_gmv) ** 2
    dims = (-2, -1)
    return {"click": ((nll_click * mask).sum(dims), mask.sum(dims)),
            "order": ((nll_order * clicked).sum(dims), clicked.sum(dims)),
            "value": ((nll_value * valued).sum(dims), valued.sum(dims))}


def loss_means(sums: dict[str, tuple[torch.Tensor, torch.Tensor]], value_weight: float
               ) -> dict[str, torch.Tensor]:
    """{"click", "order", "value", "total"} from :func:`loss_sums` (a term without items is 0)."""
    out = {k: s / n.clamp_min(1.0) for k, (s, n) in sums.items()}
    out["total"] = out["click"] + out["order"] + value_weight * out["value"]
    return out


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


class MemberStack:
    """Several :class:`OutcomeNet` of one spec as one computation: every weight stacked along a leading
    member dimension, the layers as batched matrix products, so that members train together.

    The same function as each member's :class:`OutcomeNet` (same weights, sums in another order): the
    first layer is split into its item part (z, z minus the request's mean z) and its user part (numeric
    features and embeddings), which is computed once per request instead of once per item.
    """

    def __init__(self, spec: OutcomeSpec, params: list[torch.Tensor]):
        self.spec = spec
        self.params = params
        self.offset_index = OutcomeNet(spec).offset_index if params else []

    @classmethod
    def of(cls, nets: list[OutcomeNet]) -> MemberStack:
        members = [_member_params(n) for n in nets]
        return cls(nets[0].spec, [torch.stack(ps).requires_grad_() for ps in zip(*members, strict=True)])

    def __len__(self) -> int:
        return self.params[0].shape[0]

    def member(self, i: int) -> list[torch.Tensor]:
        """Member ``i``'s weights (copies, in :func:`_member_params`' layout)."""
        return [p.detach()[i].clone() for p in self.params]

    def net(self, i: int) -> OutcomeNet:
        return _net_of(self.spec, self.member(i))

    def correction(self, items: torch.Tensor, num: torch.Tensor, cat: torch.Tensor) -> torch.Tensor:
        """The MLP's output [M, B, L, 3] from item inputs [M, B, L, 2K], num [M, B, U] and cat [M, B, C]
        (member m's requests in row m)."""
        n_cat = len(self.spec.cat_sizes)
        emb, (w_item, w_user, b_first), layers = (self.params[:n_cat], self.params[n_cat:n_cat + 3],
                                                  self.params[n_cat + 3:])
        members, b, length, _ = items.shape
        which = torch.arange(members).unsqueeze(1)
        user = torch.cat([num] + [table[which, cat[..., i]] for i, table in enumerate(emb)], dim=-1)
        h = (torch.bmm(items.reshape(members, b * length, -1), w_item).view(members, b, length, -1)
             + torch.baddbmm(b_first.unsqueeze(1), user, w_user).unsqueeze(2))
        h = h.view(members, b * length, -1)
        for w, bias in zip(layers[0::2], layers[1::2], strict=True):
            h = torch.baddbmm(bias.unsqueeze(1), nn.functional.silu(h), w)
        return h.view(members, b, length, -1)


def _member_params(net: OutcomeNet) -> list[torch.Tensor]:
    """[embedding tables..., first layer's item weights [2K, H], its user weights [U', H], its bias,
    then weight [in, out] and bias of every further layer]."""
    linears = [m for m in net.mlp if isinstance(m, nn.Linear)]
    first = linears[0].weight.detach().t()
    k2 = 2 * len(net.spec.objectives)
    out = [e.weight.detach() for e in net.embeddings] + [first[:k2], first[k2:], linears[0].bias.detach()]
    for lin in linears[1:]:
        out += [lin.weight.detach().t(), lin.bias.detach()]
    return [t.clone() for t in out]


def _net_of(spec: OutcomeSpec, params: list[torch.Tensor]) -> OutcomeNet:
    """The :class:`OutcomeNet` of one member's weights (the inverse of :func:`_member_params`)."""
    net = OutcomeNet(spec)
    n_cat = len(spec.cat_sizes)
    state = {f"embeddings.{i}.weight": params[i] for i in range(n_cat)}
    rest = [torch.cat(params[n_cat:n_cat + 2], dim=0), params[n_cat + 2]] + params[n_cat + 3:]
    indices = [i for i, m in enumerate(net.mlp) if isinstance(m, nn.Linear)]
    for j, i in enumerate(indices):
        state[f"mlp.{i}.weight"] = rest[2 * j].t().contiguous()
        state[f"mlp.{i}.bias"] = rest[2 * j + 1]
    net.load_state_dict(state)
    return net.eval()


@dataclasses.dataclass
class _Rows:
    """A split packed for the fit: what the parameters never change, computed once."""

    items: torch.Tensor
    """[N, L, 2K + 3 + 7]: item inputs, the MTL offsets, :func:`loss_labels`"""
    num: torch.Tensor
    cat: torch.Tensor

    @classmethod
    def of(cls, data: dict[str, torch.Tensor], examination: ExaminationEstimate, offset_index: list[int]
           ) -> _Rows:
        """Each request's items at its ``len(examination.theta)`` highest logged positions (the depth of
        the examination curve, ``value_model.examination.depth``); their item inputs are computed over the
        whole list, as the model reads them."""
        items = torch.cat([item_inputs(data["z"], data["mask"]), mtl_offsets(data["pred"], offset_index),
                           loss_labels(data, examination.theta_at(data["position"]))], dim=-1)
        top = top_logged(data["position"], data["mask"], len(examination.theta))
        if top is not None:
            items = items.gather(1, top.unsqueeze(-1).expand(-1, -1, items.shape[-1]))
        return cls(items.contiguous(), data["num"].to(torch.float32), data["cat"])

    def __len__(self) -> int:
        return self.items.shape[0]

    def sums(self, stack: MemberStack, rows: torch.Tensor) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """:func:`loss_sums` per member [M] of member m's requests ``rows[m]`` (rows [M, B])."""
        members, b = rows.shape
        flat = rows.reshape(-1)
        items = self.items.index_select(0, flat).view(members, b, *self.items.shape[1:])
        k2 = items.shape[-1] - 3 - _LABEL_COLUMNS
        logits = items[..., k2:k2 + 3] + stack.correction(
            items[..., :k2], self.num.index_select(0, flat).view(members, b, -1),
            self.cat.index_select(0, flat).view(members, b, -1))
        return loss_sums(logits, items[..., k2 + 3:])


def top_logged(position: torch.Tensor, mask: torch.Tensor, depth: int) -> torch.Tensor | None:
    """The indices [N, depth] of each request's items at its ``depth`` highest logged positions (padding
    and unlogged items last), or None when the lists are no longer than ``depth``.

    Why the outcome fit reads only these: an item logged at position j tells the click likelihood
    about theta_j of an examination, so the deep items, most of every list, carry little of it while
    they cost as much as the top ones (docs/estimators.md measures what is kept and what it costs)."""
    if position.shape[1] <= depth:
        return None
    logged = mask.bool() & (position >= 0)
    key = torch.where(logged, position.to(torch.int64), torch.iinfo(torch.int64).max)
    return torch.sort(key, dim=1, stable=True).indices[:, :depth]


def fit_outcome(train: dict[str, torch.Tensor], spec: dict[str, Any], examination: ExaminationEstimate,
                cfg: OutcomeConfig, valid: dict[str, torch.Tensor] | None = None
                ) -> tuple[OutcomeNet, list[dict[str, float]]]:
    """Fit one outcome model (seed ``cfg.seed``) on the logged requests ``train`` (tensors as
    grade.data.dataset.load_split gives): :func:`fit_outcomes` with one member.

    Minibatches of ``cfg.batch_size`` requests in a seeded order, Adam, at most ``cfg.epochs`` passes.
    With ``valid`` requests, after each pass the same likelihood is measured on them; training stops
    after ``cfg.patience`` passes without a lower valid loss and the best pass's weights are kept
    (the correction overfits the few orders per user: on the demo data the direct method's picks are
    worth 82% of the oracle's headroom after 3 passes, 86% after 8 and 84% after 15).
    Returns the model (eval mode) and one log row per pass (mean losses; ``valid/*`` with ``valid``).
    """
    nets, history = _fit_members(train, spec, examination, dataclasses.replace(cfg, members=1), valid)
    return nets[0], [{k: v for k, v in row.items() if k != "member"} for row in history]


def fit_outcomes(train: dict[str, torch.Tensor], spec: dict[str, Any], examination: ExaminationEstimate,
                 cfg: OutcomeConfig, valid: dict[str, torch.Tensor] | None = None
                 ) -> tuple[OutcomeNet | OutcomeMixture, list[dict[str, float]]]:
    """``cfg.members`` outcome models with seeds cfg.seed, cfg.seed + 1, ..., fitted together
    (:class:`MemberStack`): one model, or their :class:`OutcomeMixture`; the passes of every member in one
    history (``member`` 0, 1, ...). Member i is the model :func:`fit_outcome` fits with seed cfg.seed + i
    (its own initialisation, data order and early stopping)."""
    nets, history = _fit_members(train, spec, examination, cfg, valid)
    return (nets[0] if len(nets) == 1 else OutcomeMixture(nets)), history


def _fit_members(train: dict[str, torch.Tensor], spec: dict[str, Any], examination: ExaminationEstimate,
                 cfg: OutcomeConfig, valid: dict[str, torch.Tensor] | None
                 ) -> tuple[list[OutcomeNet], list[dict[str, float]]]:
    """The fit of :func:`fit_outcomes`: the members' nets (eval mode) and history."""
    net_spec = OutcomeSpec(objectives=list(spec["objectives"]), n_numeric=train["num"].shape[1],
                           cat_sizes=[int(c["size"]) for c in spec["categorical"]],
                           hidden=list(cfg.hidden), emb_dim=cfg.emb_dim)
    seeds = [cfg.seed + i for i in range(cfg.members)]
    nets = []
    for seed in seeds:
        torch.manual_seed(seed)
        nets.append(OutcomeNet(net_spec))
    fit = _MemberFit(MemberStack.of(nets), cfg, seeds)
    rows = _Rows.of(train, examination, fit.stack.offset_index)
    held = _Rows.of(valid, examination, fit.stack.offset_index) if valid is not None else None
    steps = math.ceil(len(rows) / cfg.batch_size)
    progress = Progress("outcome", len(seeds) * cfg.epochs * steps, "steps", rate_unit="requests")
    for epoch in range(1, cfg.epochs + 1):
        losses = fit.train_pass(rows, progress)
        checked = _member_losses(fit.stack, held, cfg) if held is not None else None
        stopped = fit.record(epoch, losses, checked)
        progress.retire(len(stopped) * (cfg.epochs - epoch) * steps)
        if not fit.active:
            break
    progress.finish()
    return fit.result(net_spec), sorted(fit.history, key=lambda r: (r["member"], r["epoch"]))


class _MemberFit:
    """The state of a fit of several members: the stack of the members still training, their Adam state,
    data orders, histories and best weights. A member that stops leaves the stack (and its work ends)."""

    def __init__(self, stack: MemberStack, cfg: OutcomeConfig, seeds: list[int]):
        self.stack, self.cfg = stack, cfg
        self.optimizer = torch.optim.Adam(stack.params, lr=cfg.lr)
        self.active = list(range(len(seeds)))
        self.generators = [torch.Generator().manual_seed(s) for s in seeds]
        self.low_precision = low_precision(cfg.precision)
        self.history: list[dict[str, float]] = []
        self.best: dict[int, tuple[float, int, list[torch.Tensor]]] = {}
        self.final: dict[int, list[torch.Tensor]] = {}

    def train_pass(self, rows: _Rows, progress: Progress) -> torch.Tensor:
        """One pass of every active member over ``rows`` in its own seeded order: the mean losses
        [members, 4] (click, order, value, total)."""
        n, size = len(rows), self.cfg.batch_size
        order = torch.stack([torch.randperm(n, generator=self.generators[m]) for m in self.active])
        totals = torch.zeros(len(self.active), 4)
        for start in range(0, n, size):
            batch = order[:, start:start + size]
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=self.low_precision):
                losses = loss_means(rows.sums(self.stack, batch), self.cfg.value_loss_weight)
            self.optimizer.zero_grad(set_to_none=True)
            losses["total"].sum().backward()
            self.optimizer.step()
            totals += torch.stack([losses[k].detach() for k in _LOSSES], dim=-1) * (batch.shape[1] / n)
            progress.add(len(self.active), amount=batch.numel())
        return totals

    def record(self, epoch: int, losses: torch.Tensor, checked: torch.Tensor | None) -> list[int]:
        """Log the pass of every active member; keep the best weights; the members that stop now."""
        stopped = []
        for row, m in enumerate(self.active):
            entry = {"member": m, "epoch": epoch, **_named("loss/", losses[row])}
            if checked is not None:
                entry.update(_named("valid/", checked[row]))
            self.history.append(entry)
            log.info("outcome: member %d epoch %d/%d loss %.5f%s", m, epoch, self.cfg.epochs,
                     entry["loss/total"], "" if checked is None else f", valid {entry['valid/total']:.5f}")
            if checked is None:
                continue
            if m not in self.best or entry["valid/total"] < self.best[m][0]:
                self.best[m] = (entry["valid/total"], epoch, self.stack.member(row))
            elif epoch - self.best[m][1] >= self.cfg.patience:
                stopped.append(m)
        if stopped:
            self._leave(stopped)
        return stopped

    def _leave(self, stopped: list[int]) -> None:
        """Take the stopped members out of the stack and of Adam's state."""
        keep = [row for row, m in enumerate(self.active) if m not in stopped]
        self.active = [self.active[row] for row in keep]
        if not keep:
            return
        index = torch.tensor(keep)
        params = [p.detach().index_select(0, index).requires_grad_() for p in self.stack.params]
        optimizer = torch.optim.Adam(params, lr=self.cfg.lr)
        for old, new in zip(self.stack.params, params, strict=True):
            state = self.optimizer.state[old]
            optimizer.state[new] = {k: v if k == "step" else v.index_select(0, index)
                                    for k, v in state.items()}
        self.stack.params, self.optimizer = params, optimizer

    def result(self, spec: OutcomeSpec) -> list[OutcomeNet]:
        """Every member's net: its best pass's weights (with a valid split) or its last pass's."""
        for row, m in enumerate(self.active):
            self.final[m] = self.stack.member(row)
        nets = []
        for m in range(len(self.generators)):
            if m in self.best:
                log.info("outcome: member %d kept epoch %d (lowest valid loss %.5f)", m, self.best[m][1],
                         self.best[m][0])
            nets.append(_net_of(spec, self.best[m][2] if m in self.best else self.final[m]))
        return nets


_LOSSES = ("click", "order", "value", "total")


def low_precision(precision: str) -> bool:
    """Whether the training steps' products run in bfloat16 (``precision`` of :class:`OutcomeConfig`)."""
    if precision == "auto":
        return bool(torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported())
    return precision == "bfloat16"


def _named(prefix: str, losses: torch.Tensor) -> dict[str, float]:
    return {f"{prefix}{k}": float(v) for k, v in zip(_LOSSES, losses.tolist(), strict=True)}


@torch.no_grad()
def _member_losses(stack: MemberStack, data: _Rows, cfg: OutcomeConfig) -> torch.Tensor:
    """The training likelihood of every member of ``stack`` on all of ``data`` [members, 4] (click, order,
    value, total: each a mean over the items it is defined on), in chunks of 4 minibatches."""
    members, n, chunk = len(stack), len(data), 4 * cfg.batch_size
    sums: dict[str, list[torch.Tensor]] = {}
    for start in range(0, n, chunk):
        rows = torch.arange(start, min(start + chunk, n)).expand(members, -1)
        for k, (s, c) in data.sums(stack, rows).items():
            acc = sums.setdefault(k, [torch.zeros(members), torch.zeros(members)])
            acc[0] += s
            acc[1] += c
    means = loss_means({k: (s, c) for k, (s, c) in sums.items()}, cfg.value_loss_weight)
    return torch.stack([means[k] for k in _LOSSES], dim=-1)


def evaluate_loss(model: OutcomeNet, data: dict[str, torch.Tensor], examination: ExaminationEstimate,
                  cfg: OutcomeConfig) -> dict[str, float]:
    """The training likelihood on held-out requests: {"click", "order", "value", "total"} (each a mean
    over the items it is defined on), computed as during the fit."""
    stack = MemberStack.of([model])
    losses = _member_losses(stack, _Rows.of(data, examination, stack.offset_index), cfg)[0]
    return {k.removeprefix("/"): v for k, v in _named("/", losses).items()}
