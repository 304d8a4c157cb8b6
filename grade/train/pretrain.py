"""Stage 1: learning-to-rank pretraining of the policy mean mu with a multi-objective LambdaLoss.

For each request the policy gives weights mu(x) on the simplex; the fused scores S = fuse(z, mu)
rank the logged candidates; the loss is sum_o weight_o * LambdaLoss(S, label_o) over the objectives
click, order and gmv (gmv as a graded label). AdamW; validation NDCG@E per objective for the policy
and for the static weights after every epoch; early stopping on one objective's NDCG@E, the best
epoch's weights are the output.

Fault tolerance: after every epoch a checkpoint (model, best model, optimizer and RNG state as
safetensors; epoch, history and train log as JSON) is written to ``<out>/_checkpoints/`` by
:mod:`grade.model.training`. Re-running on the same ``--out`` with the same config and data continues
after the last completed epoch and ends with the same weights as an uninterrupted run.

Distributed training (one process per rank) plugs in through ``rank``/``world_size`` (the data
iterator deals each rank its share) and the ``all_reduce`` hook of :func:`train_step` (a
:class:`grade.core.distributed.GradientAverager`); only rank 0 writes checkpoints and outputs.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import logging
import math
from collections.abc import Callable
from typing import Any, Literal

import torch
from torch import nn

from grade.core import store
from grade.core.config import SEED_RANGE, check, ranged, setting, to_dict
from grade.core.errors import ConfigError, InputError
from grade.data import dataset
from grade.data.fusion import fuse, ndcg_at
from grade.model import training
from grade.model.lambdaloss import lambda_loss
from grade.model.policy import PolicyConfig, PolicyNet
from grade.value.baselines import static_weights

log = logging.getLogger(__name__)

OBJECTIVES = ("click", "order", "gmv")
#: NDCG gain per label, as in the offline evaluation's replay metrics (gmv is a value, not a grade).
VALID_GAINS = {"click": "exp2", "order": "exp2", "gmv": "linear"}
_TRAIN_FIELDS = ["z", "mask", "num", "cat", "click", "order", "gmv"]


@dataclasses.dataclass
class PretrainConfig:
    epochs: int = ranged(8, "[1, 10000]")
    """maximum number of passes over the train split"""
    batch_size: int = ranged(512, "[1, 1e7]")
    """requests per gradient step (the global batch: each of W processes takes batch_size / W)"""
    lr: float = ranged(3e-3, "> 0")
    """AdamW learning rate"""
    weight_decay: float = ranged(1e-4, ">= 0")
    """AdamW decoupled weight decay"""
    grad_clip: float = ranged(1.0, ">= 0")
    """clip the global gradient norm to this value (0 = no clipping)"""
    objective_weights: dict[str, float] = ranged({"click": 1.0, "order": 2.0, "gmv": 1.0}, ">= 0")
    """weight of each objective's LambdaLoss term (keys: click, order, gmv; 0 switches a term off)"""
    gmv_label: Literal["graded", "log1p"] = "graded"
    """gmv relevance label: graded = decimal digits of gmv (1..gmv_max_grade, 0 without order);
    log1p = log1p(gmv)"""
    gmv_max_grade: int = ranged(4, "[1, 30]", retired=True)
    """highest gmv grade (gmv >= 10^(max-1) gets it)"""
    weighing_scheme: Literal["ndcgLoss1", "ndcgLoss2", "ndcgLoss2PP", "lambdaRank", "rankNet"] = "ndcgLoss2PP"
    """LambdaLoss weighing scheme"""
    k: int | None = ranged(None, "[1, 10000]")
    """LambdaLoss truncation: only pairs within the predicted top-k count (None = whole list)"""
    sigma: float = ranged(1.0, "> 0", retired=True)
    """LambdaLoss logistic scale of score differences"""
    mu: float = ranged(10.0, ">= 0", retired=True)
    """weight of the ndcgLoss2 term in ndcgLoss2PP"""
    score_scale: float = ranged(0.0, ">= 0", retired=True)
    """initial scale of the fused scores seen by the loss (0 = fitted on train for the initial weights)"""
    learn_score_scale: bool = setting(True, retired=True)
    """learn the score scale jointly with the policy (it never changes a ranking)"""
    exposure_depth: int = ranged(10, "[1, 1000]", derived="shared.exposure_depth")
    """E of the validation NDCG@E"""
    stopping_objective: Literal["click", "order", "gmv"] = "order"
    """early stopping and best-epoch selection watch this objective's validation NDCG@E"""
    patience: int = ranged(3, "[1, 10000]")
    """stop after this many epochs without an improvement of the watched NDCG@E"""
    min_delta: float = ranged(0.0, ">= 0", retired=True)
    """smallest increase of the watched NDCG@E that counts as an improvement"""
    max_valid_requests: int = ranged(0, "[0, 1e8]")
    """validate on the first N valid requests only (0 = all)"""
    hidden: list[int] = ranged([64, 64], "[1, 8192]")
    """hidden layer widths of the policy MLP"""
    emb_dim: int = ranged(8, "[1, 1024]")
    """embedding width per categorical feature"""
    kappa_min: float = ranged(10.0, "> 0", derived="finetune.kappa_min")
    """lower bound of the Dirichlet concentration (the policy's kappa head is built here, used by Stage 2)"""
    kappa_max: float = ranged(400.0, "> 0", derived="finetune.kappa_max")
    """upper bound of the Dirichlet concentration"""
    kappa_init: float = ranged(50.0, "> 0", derived="finetune.kappa_init")
    """initial concentration"""
    seed: int = ranged(0, SEED_RANGE, derived="seed:pretrain")
    """seed of the initialisation and the data order"""
    threads: int = ranged(2, "[1, 1024]")
    """torch intra-op threads (results depend on it: keep it fixed for reproducibility)"""
    log_every_s: float = ranged(10.0, "> 0", retired=True)
    """seconds between progress lines within an epoch"""

    def validate(self) -> None:
        unknown = sorted(set(self.objective_weights) - set(OBJECTIVES))
        if unknown:
            raise ConfigError(f"pretrain.objective_weights: unknown objective(s) {unknown}; "
                              f"expected {list(OBJECTIVES)}")
        if not any(self.objective_weights.values()):
            raise ConfigError(f"pretrain.objective_weights: expected at least one weight > 0, "
                              f"got {self.objective_weights}")
        if not self.kappa_min <= self.kappa_init <= self.kappa_max or self.kappa_min == self.kappa_max:
            raise ConfigError(f"finetune.kappa_min, kappa_init, kappa_max: expected kappa_min <= "
                              f"kappa_init <= kappa_max and kappa_min < kappa_max, got {self.kappa_min}, "
                              f"{self.kappa_init}, {self.kappa_max}")


# ------------------------------------------------------------------------------------------------
# Labels, loss, one gradient step
# ------------------------------------------------------------------------------------------------

def gmv_grades(gmv: torch.Tensor, cfg: PretrainConfig) -> torch.Tensor:
    """The gmv relevance label [B, L] used by the loss."""
    if cfg.gmv_label == "log1p":
        return torch.log1p(gmv.clamp_min(0.0))
    digits = torch.floor(torch.log10(gmv.clamp_min(1e-12))) + 1.0   # 5 -> 1, 50 -> 2, 500 -> 3
    return torch.where(gmv > 0, digits.clamp(1.0, float(cfg.gmv_max_grade)), torch.zeros_like(gmv))


def training_labels(batch: dict[str, torch.Tensor], cfg: PretrainConfig) -> dict[str, torch.Tensor]:
    """Per objective with a non-zero weight, the LambdaLoss label [B, L]."""
    out = {}
    for name, weight in cfg.objective_weights.items():
        if weight == 0:
            continue
        out[name] = gmv_grades(batch["gmv"], cfg) if name == "gmv" else batch[name]
    return out


class RankingModel(nn.Module):
    """The policy plus a scalar score scale: the loss sees exp(log_scale) * fuse(z, mu(x)).

    Weights on the simplex cannot scale the fused scores, so without it LambdaLoss (whose pairwise
    logistic wants large margins) prefers whichever signal has the widest spread within a request
    over the one that ranks best; on simulated logs that pushed mu onto pCTR alone and the
    validation NDCG below the static weights'. The scale is a temperature: no ranking depends on it.
    """

    def __init__(self, policy: PolicyNet, scale: float = 1.0, learn_scale: bool = True):
        super().__init__()
        self.policy = policy
        self.log_scale = nn.Parameter(torch.tensor(math.log(scale)), requires_grad=learn_scale)

    def scores(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        mu, _ = self.policy(batch["num"], batch["cat"])
        fused = fuse(batch["z"], mu, batch["mask"])
        # fuse puts -inf at padding; 0 there keeps the scale's gradient finite (0 * inf = NaN) and
        # changes nothing else: the loss ignores padded positions
        fused = torch.where(batch["mask"], fused, torch.zeros_like(fused))
        return self.log_scale.exp() * fused


def multi_objective_loss(model: PolicyNet | RankingModel, batch: dict[str, torch.Tensor], cfg: PretrainConfig,
                         pair_counts: dict[str, float] | None = None
                         ) -> tuple[torch.Tensor, dict[str, float]]:
    """sum_o weight_o * LambdaLoss(scale * fuse(z, mu(x)), label_o) and the per-objective values.

    Each term is a mean over the valid pairs of ``batch``; ``pair_counts`` (objective -> count)
    replaces that count (data-parallel ranks divide their pair sums by the global batch's count).
    """
    if isinstance(model, PolicyNet):
        model = RankingModel(model, 1.0, learn_scale=False)
    scores = model.scores(batch)
    total = scores.new_zeros(())
    parts = {}
    for name, labels in training_labels(batch, cfg).items():
        term = lambda_loss(scores, labels, batch["mask"], weighing_scheme=cfg.weighing_scheme, k=cfg.k,
                           sigma=cfg.sigma, mu=cfg.mu, reduction="mean" if pair_counts is None else "sum")
        if pair_counts is not None:
            term = term / max(pair_counts[name], 1.0)
        total = total + cfg.objective_weights[name] * term
        parts[name] = float(term.detach())
    return total, parts


def valid_pair_counts(scores: torch.Tensor, batch: dict[str, torch.Tensor], cfg: PretrainConfig
                      ) -> dict[str, float]:
    """Per objective, the number of pairs LambdaLoss averages over in ``batch`` (given the scores' order).

    RankNet with sigma = 0 costs exactly 1 per valid pair (y_i > y_j, both in the predicted top k),
    so its sum is the count; ndcgLoss1 counts every pair of real items in the top k instead.
    """
    out = {}
    for name, labels in training_labels(batch, cfg).items():
        if cfg.weighing_scheme == "ndcgLoss1":
            n_real = batch["mask"].sum(-1)
            top = n_real if cfg.k is None else n_real.clamp_max(cfg.k)
            out[name] = float((top.double() ** 2).sum())
        else:
            out[name] = float(lambda_loss(scores.double(), labels, batch["mask"], weighing_scheme="rankNet",
                                          k=cfg.k, sigma=0.0, reduction="sum"))
    return out


def with_signal(batch: dict[str, torch.Tensor], cfg: PretrainConfig) -> dict[str, torch.Tensor]:
    """The requests of ``batch`` with at least one positive label (the others have no valid pair)."""
    keep = torch.zeros(batch["mask"].shape[0], dtype=torch.bool)
    for labels in training_labels(batch, cfg).values():
        keep |= ((labels > 0) & batch["mask"]).any(-1)
    return {k: v[keep] for k, v in batch.items()}


def train_step(model: RankingModel, optimizer: torch.optim.Optimizer, batch: dict[str, torch.Tensor],
               cfg: PretrainConfig, all_reduce: Callable[[RankingModel], None] | None = None
               ) -> tuple[float, dict[str, float]]:
    """One gradient step on ``batch``; ``all_reduce`` averages gradients across ranks when given.

    With an ``all_reduce`` that also sums tensors over ranks (``grade.core.distributed.GradientAverager``),
    each rank divides its pair-loss sums by the global batch's pair count / world size: the averaged
    gradient is then the single-process gradient of the whole global batch (rank batches differ in
    their numbers of valid pairs, so a plain average of per-rank means would not be).
    """
    model.train()
    optimizer.zero_grad(set_to_none=True)
    pair_counts = None
    world = getattr(all_reduce, "world_size", 1)
    if world > 1 and hasattr(all_reduce, "sum"):
        names = training_labels_names(cfg)
        with torch.no_grad():
            local = valid_pair_counts(model.scores(batch), batch, cfg)
        totals = all_reduce.sum(torch.tensor([local[n] for n in names], dtype=torch.float64))
        pair_counts = {n: float(t) / world for n, t in zip(names, totals.tolist(), strict=True)}
    loss, parts = multi_objective_loss(model, batch, cfg, pair_counts)
    loss.backward()
    if all_reduce is not None:
        all_reduce(model)
    if cfg.grad_clip > 0:
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
    optimizer.step()
    if pair_counts is not None:  # the global batch's loss: the mean of the ranks' normalised parts
        local_sums = torch.tensor([float(loss.detach()), *parts.values()], dtype=torch.float64)
        values = all_reduce.sum(local_sums) / world
        return float(values[0]), dict(zip(parts, values[1:].tolist(), strict=True))
    return float(loss.detach()), parts


# ------------------------------------------------------------------------------------------------
# Validation
# ------------------------------------------------------------------------------------------------

@torch.no_grad()
def validation_ndcg(weights: torch.Tensor | PolicyNet, data: dict[str, torch.Tensor], depth: int,
                    chunk: int = 4096) -> dict[str, float]:
    """Mean NDCG@depth per objective over the requests with a positive label for it.

    ``weights``: a policy (per-request weights mu(x)) or one global weight vector [K].
    """
    n = data["mask"].shape[0]
    sums = dict.fromkeys(OBJECTIVES, 0.0)
    counts = dict.fromkeys(OBJECTIVES, 0)
    for start in range(0, n, chunk):
        sl = slice(start, min(start + chunk, n))
        z, mask = data["z"][sl], data["mask"][sl]
        if isinstance(weights, PolicyNet):
            weights.eval()
            w = weights(data["num"][sl], data["cat"][sl])[0]
        else:
            w = weights.to(z.dtype).expand(z.shape[0], -1)
        scores = fuse(z, w, mask)
        for name in OBJECTIVES:
            labels = data[name][sl]
            has = ((labels > 0) & mask).any(-1)
            ndcg = ndcg_at(scores, labels, mask, depth, gain=VALID_GAINS[name])
            sums[name] += float(ndcg[has].sum(dtype=torch.float64))
            counts[name] += int(has.sum())
    return {name: sums[name] / counts[name] if counts[name] else 0.0 for name in OBJECTIVES}


# ------------------------------------------------------------------------------------------------
# The whole run
# ------------------------------------------------------------------------------------------------

def policy_config(spec: dict[str, Any], cfg: PretrainConfig) -> PolicyConfig:
    """The policy's shape from the feature spec, started at the static weights."""
    # the architecture keys of the pretrain section are PolicyConfig's fields of the same name
    shared = {f.name: copy.deepcopy(getattr(cfg, f.name)) for f in dataclasses.fields(PolicyConfig)
              if f.name in {g.name for g in dataclasses.fields(cfg)}}
    return PolicyConfig(
        n_numeric=len(spec["numeric"]), cat_sizes=[int(c["size"]) for c in spec["categorical"]],
        n_objectives=len(spec["objectives"]), init_mean=[float(v) for v in static_weights(spec)], **shared)


#: candidate score scales of the initial fit: 2^(e/2) for e in -4..12, i.e. 1/4 .. 64
SCALE_GRID = tuple(2.0 ** (e / 2) for e in range(-4, 13))


@torch.no_grad()
def fit_score_scale(policy: PolicyNet, features_uri: str, cfg: PretrainConfig,
                    max_requests: int = 1024) -> float:
    """The score scale of :data:`SCALE_GRID` with the lowest loss for ``policy`` on train.

    Measured on the first ``max_requests`` train requests (in file order: deterministic); a
    starting point only, the scale is then learned (``learn_score_scale``).
    """
    batch = next(dataset.iter_batches(features_uri, "train", max_requests, fields=_TRAIN_FIELDS))
    batch = with_signal(batch, cfg)
    losses = [multi_objective_loss(RankingModel(policy, s, learn_scale=False), batch, cfg)[0].item()
              for s in SCALE_GRID]
    return SCALE_GRID[min(range(len(SCALE_GRID)), key=losses.__getitem__)]


def _check(cfg: PretrainConfig, spec: dict[str, Any], features_uri: str, world_size: int = 1) -> None:
    check(cfg, "pretrain")
    if spec["splits"].get("train", {}).get("n_requests", 0) < 1:
        raise InputError(f"{features_uri}: the train split has no request")
    if cfg.batch_size % world_size:
        raise InputError(f"pretrain.batch_size: {cfg.batch_size} requests per step cannot be split evenly "
                         f"over {world_size} processes; use a multiple of {world_size}")


def _check_labels(features_uri: str, cfg: PretrainConfig, batch_size: int = 4096) -> None:
    """Refuse train data without any positive label; warn about objectives in use without one.

    LambdaLoss learns from pairs (a positive above a lower label): with no click, order or gmv > 0
    the loss is 0 at every step and the run would publish its initial (static) policy as "best
    epoch 0". An objective in use (weight > 0) without positives only adds nothing, so it is a
    warning. The scan stops as soon as every objective has a positive (usually the first batch).
    """
    names = training_labels_names(cfg)
    missing = set(names)
    fields = ["mask", "click", "order", "gmv"]
    for batch in dataset.iter_batches(features_uri, "train", batch_size, fields=fields):
        missing -= {name for name, labels in training_labels(batch, cfg).items()
                    if bool(((labels > 0) & batch["mask"]).any())}
        if not missing:
            return
    absent = [n for n in names if n in missing]
    either = " or ".join(filter(None, [", ".join(absent[:-1]), absent[-1]]))
    if len(absent) == len(names):
        raise InputError(f"{features_uri}: no train request has a {either} > 0 (the objectives in use): "
                         "nothing to learn a ranking from")
    log.warning("pretrain: no train request has %s > 0: the LambdaLoss term(s) add nothing; set their "
                "pretrain.objective_weights to 0 to silence this", either)


@dataclasses.dataclass
class _Run:
    """What a pretraining run works with, fixed once it has started."""

    features_uri: str
    cfg: PretrainConfig
    spec: dict[str, Any]
    fingerprint: dict[str, Any]
    model: RankingModel
    optimizer: torch.optim.Optimizer
    valid: dict[str, torch.Tensor]
    static_ndcg: dict[str, float]
    n_train: int
    initial_scale: float
    """the score scale the run started from (fitted or configured)"""
    rank: int
    world_size: int
    all_reduce: Callable[[RankingModel], None] | None


@dataclasses.dataclass
class _Progress:
    """What a checkpoint saves after an epoch and a resume restores."""

    epoch: int
    history: list[dict[str, Any]]
    best: dict[str, Any]
    best_state: dict[str, torch.Tensor]
    bad_epochs: int = 0
    stopped: bool = False
    log_lines: list[str] = dataclasses.field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "history": self.history, "best": self.best,
                "bad_epochs": self.bad_epochs, "stopped": self.stopped}


def pretrain(features_uri: str, out_uri: str, cfg: PretrainConfig, *, rank: int = 0, world_size: int = 1,
             all_reduce: Callable[[RankingModel], None] | None = None,
             on_epoch_end: Callable[[int], None] | None = None) -> dict[str, Any]:
    """Train the policy mean on ``features_uri`` and publish the model folder at ``out_uri``.

    Resumes from ``<out>/_checkpoints/`` when a checkpoint of the same config and data exists.
    ``all_reduce`` averages gradients over ranks (a :class:`grade.core.distributed.GradientAverager`).
    ``on_epoch_end(epoch)`` is called after each epoch's checkpoint is written. Returns metrics.json.
    """
    out_uri = str(out_uri)
    run, ckpt = _start(str(features_uri), out_uri, cfg, rank, world_size, all_reduce)
    state = _resume(run, ckpt, out_uri) if ckpt is not None else _first_state(run)
    step = len(state.log_lines)
    for epoch in range(state.epoch + 1, cfg.epochs + 1):
        if state.stopped:
            break
        step = _train_epoch(run, state, epoch, step)
        if rank == 0:
            training.save_checkpoint(out_uri, "epoch", epoch, fingerprint=run.fingerprint,
                                     tensors={"model": training.state_tensors(run.model),
                                              "best": state.best_state},
                                     optimizer=run.optimizer, state=state.to_json(),
                                     log_lines=state.log_lines)
        if on_epoch_end is not None:
            on_epoch_end(epoch)
    run.model.load_state_dict(state.best_state)
    metrics = _metrics(run, state)
    if rank == 0:
        config = training.run_config("pretrain", run.fingerprint, cfg.seed, run.model.policy.cfg)
        training.publish_model(out_uri, run.model.policy, run.spec, config, metrics, state.log_lines)
        log.info("pretrain: published %s (best epoch %d)", out_uri, metrics["best_epoch"])
    return metrics


def _start(features_uri: str, out_uri: str, cfg: PretrainConfig, rank: int, world_size: int,
           all_reduce: Callable[[RankingModel], None] | None) -> tuple[_Run, training.Checkpoint | None]:
    """Check the inputs, seed, build model and optimiser, load validation data; the checkpoint to resume."""
    spec = dataset.load_spec(features_uri)
    _check(cfg, spec, features_uri, world_size)
    _check_labels(features_uri, cfg)
    torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    fingerprint = training.run_fingerprint(to_dict(cfg), {"features": features_uri}, world_size)
    ckpt = training.load_checkpoint(out_uri, fingerprint)

    policy = PolicyNet(policy_config(spec, cfg))
    if ckpt is not None or cfg.score_scale > 0:
        scale = cfg.score_scale if cfg.score_scale > 0 else 1.0   # a resumed run loads its own
    else:
        scale = fit_score_scale(policy, features_uri, cfg)
    model = RankingModel(policy, scale, cfg.learn_score_scale)
    # no weight decay on the scale: it is a temperature, not a weight to shrink
    optimizer = torch.optim.AdamW([{"params": list(policy.parameters())},
                                   {"params": [model.log_scale], "weight_decay": 0.0}],
                                  lr=cfg.lr, weight_decay=cfg.weight_decay)
    valid = dataset.load_split(features_uri, "valid", fields=_TRAIN_FIELDS)
    if cfg.max_valid_requests > 0:
        valid = {k: v[: cfg.max_valid_requests] for k, v in valid.items()}
    static_ndcg = validation_ndcg(static_weights(spec), valid, cfg.exposure_depth)
    n_train = dataset.count_requests(features_uri, "train", world_size)
    run = _Run(features_uri, cfg, spec, fingerprint, model, optimizer, valid, static_ndcg, n_train, scale,
               rank, world_size, all_reduce)
    return run, ckpt


def _first_state(run: _Run) -> _Progress:
    """Epoch 0 is the initial policy (= the static weights): pretraining must beat it to be kept."""
    ndcg0 = validation_ndcg(run.model.policy, run.valid, run.cfg.exposure_depth)
    history = [{"epoch": 0, "train_loss": None, "train_loss_by_objective": None,
                "valid_ndcg": {"policy": ndcg0, "static": run.static_ndcg}, "requests_per_s": None,
                "score_scale": run.initial_scale}]
    return _Progress(epoch=0, history=history, best={"epoch": 0, "score": ndcg0[run.cfg.stopping_objective]},
                     best_state=training.state_tensors(run.model))


def _resume(run: _Run, ckpt: training.Checkpoint, out_uri: str) -> _Progress:
    training.restore(ckpt, run.model, run.optimizer)
    st = ckpt.state
    log.info("pretrain: resuming after epoch %d from %s", st["epoch"],
             store.join(out_uri, training.CHECKPOINTS))
    return _Progress(epoch=st["epoch"], history=st["history"], best=st["best"],
                     best_state=ckpt.tensors["best"], bad_epochs=st["bad_epochs"], stopped=st["stopped"],
                     log_lines=ckpt.log_lines)


def _train_epoch(run: _Run, state: _Progress, epoch: int, step: int) -> int:
    """One pass over the train split, validation, best epoch and early stopping; the last step's number."""
    cfg, world = run.cfg, run.world_size
    progress = training.Progress(f"pretrain epoch {epoch}/{cfg.epochs}", run.n_train * world, "requests",
                                 every_s=cfg.log_every_s, logger=log)
    loss_sum, parts_sum, n_steps = 0.0, dict.fromkeys(training_labels_names(cfg), 0.0), 0
    # batch_size is the global batch: each rank takes its 1/world_size share of it
    for batch in dataset.iter_batches(run.features_uri, "train", cfg.batch_size // world, shuffle=True,
                                      seed=cfg.seed, epoch=epoch, rank=run.rank, world_size=world,
                                      fields=_TRAIN_FIELDS):
        n_batch = int(batch["mask"].shape[0])
        loss, parts = train_step(run.model, run.optimizer, with_signal(batch, cfg), cfg, run.all_reduce)
        step += 1
        n_steps += 1
        loss_sum += loss
        for name, v in parts.items():
            parts_sum[name] += v
        state.log_lines.append(json.dumps({"epoch": epoch, "step": step, "pretrain.loss": loss,
                                           **{f"pretrain.loss.{k}": v for k, v in parts.items()},
                                           "pretrain.requests": n_batch}, sort_keys=True) + "\n")
        progress.add(n_batch * world)   # the job's rate: every rank takes the same share
    seconds = progress.seconds()
    _end_epoch(run, state, epoch, {
        "epoch": epoch, "train_loss": loss_sum / max(n_steps, 1),
        "train_loss_by_objective": {k: v / max(n_steps, 1) for k, v in parts_sum.items()},
        "requests_per_s": progress.done / max(seconds, 1e-9), "seconds": seconds})
    return step


def _end_epoch(run: _Run, state: _Progress, epoch: int, entry: dict[str, Any]) -> None:
    """Validate, update the best epoch and the early-stopping count, append the epoch to the history."""
    cfg = run.cfg
    ndcg = validation_ndcg(run.model.policy, run.valid, cfg.exposure_depth)
    score = ndcg[cfg.stopping_objective]
    if score > state.best["score"] + cfg.min_delta:
        state.best = {"epoch": epoch, "score": score}
        state.best_state = training.state_tensors(run.model)
        state.bad_epochs = 0
    else:
        state.bad_epochs += 1
    state.stopped = state.bad_epochs >= cfg.patience
    state.epoch = epoch
    seconds = entry.pop("seconds")
    state.history.append({**entry, "valid_ndcg": {"policy": ndcg, "static": run.static_ndcg},
                          "seconds": seconds, "score_scale": float(run.model.log_scale.detach().exp())})
    log.info("pretrain epoch %d/%d: loss %.4f, valid NDCG@%d %s policy %.4f vs static %.4f (best epoch %d); "
             "%.0f requests/s, ETA %.0fs%s", epoch, cfg.epochs, entry["train_loss"], cfg.exposure_depth,
             cfg.stopping_objective, score, run.static_ndcg[cfg.stopping_objective], state.best["epoch"],
             entry["requests_per_s"], 0.0 if state.stopped else seconds * (cfg.epochs - epoch),
             ", early stop" if state.stopped else "")


def _metrics(run: _Run, state: _Progress) -> dict[str, Any]:
    """metrics.json of the run (the model holds the best epoch's weights)."""
    cfg = run.cfg
    best_entry = next(h for h in state.history if h["epoch"] == state.best["epoch"])
    trained = [h for h in state.history if h["epoch"] > 0]
    return {
        "stage": "pretrain", "exposure_depth": cfg.exposure_depth,
        "stopping_objective": cfg.stopping_objective,
        "best_epoch": state.best["epoch"], "epochs_run": len(trained), "early_stopped": state.stopped,
        "best": best_entry["valid_ndcg"], "epochs": state.history,
        "score_scale": float(run.model.log_scale.detach().exp()), "n_train_requests": run.n_train,
        "n_valid_requests": int(run.valid["mask"].shape[0]),
        "requests_per_s": (sum(h["requests_per_s"] for h in trained) / len(trained)) if trained else None,
    }


def training_labels_names(cfg: PretrainConfig) -> list[str]:
    return [name for name, w in cfg.objective_weights.items() if w != 0]
