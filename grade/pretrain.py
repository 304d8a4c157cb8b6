"""Stage 1: learning-to-rank pretraining of the policy mean mu with a multi-objective LambdaLoss.

For each request the policy gives weights mu(x) on the simplex; the fused scores S = fuse(z, mu)
rank the logged candidates; the loss is sum_o weight_o * LambdaLoss(S, label_o) over the objectives
click, order and gmv (gmv as a graded label). AdamW; validation NDCG@E per objective for the policy
and for the static weights after every epoch; early stopping on one objective's NDCG@E, the best
epoch's weights are the output.

Fault tolerance: after every epoch a checkpoint (model, best model, optimizer state as safetensors;
epoch, history and RNG state as JSON) is written to ``<out>/_checkpoints/``. Re-running on the same
``--out`` with the same config and data continues after the last completed epoch and ends with the
same weights as an uninterrupted run.

Distributed training (one process per rank) plugs in through ``rank``/``world_size`` (the data
iterator deals each rank its share) and the ``all_reduce`` hook of :func:`train_step`; only rank 0
writes checkpoints and outputs.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import logging
import math
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from grade import dataset, store
from grade.baselines import static_weights
from grade.config import check, ranged, to_dict
from grade.errors import ConfigError, InputError
from grade.fusion import fuse, ndcg_at
from grade.lambdaloss import lambda_loss
from grade.policy import PolicyConfig, PolicyNet, save_policy

log = logging.getLogger(__name__)

OBJECTIVES = ("click", "order", "gmv")
#: NDCG gain per label, as in the offline evaluation's replay metrics (gmv is a value, not a grade).
VALID_GAINS = {"click": "exp2", "order": "exp2", "gmv": "linear"}
CHECKPOINTS = "_checkpoints"
LATEST = "latest.json"
_TRAIN_FIELDS = ["z", "mask", "num", "cat", "click", "order", "gmv"]


@dataclasses.dataclass
class PretrainConfig:
    epochs: int = ranged(8, ">= 1")
    """maximum number of passes over the train split"""
    batch_size: int = ranged(512, ">= 1")
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
    """gmv relevance label: graded = decimal digits of gmv (1..gmv_max_grade, 0 without order); log1p = log1p(gmv)"""
    gmv_max_grade: int = ranged(4, ">= 1")
    """highest gmv grade (gmv >= 10^(max-1) gets it)"""
    weighing_scheme: Literal["ndcgLoss1", "ndcgLoss2", "ndcgLoss2PP", "lambdaRank", "rankNet"] = "ndcgLoss2PP"
    """LambdaLoss weighing scheme"""
    k: int | None = ranged(None, ">= 1")
    """LambdaLoss truncation: only pairs within the predicted top-k count (None = whole list)"""
    sigma: float = ranged(1.0, "> 0")
    """LambdaLoss logistic scale of score differences"""
    mu: float = ranged(10.0, ">= 0")
    """weight of the ndcgLoss2 term in ndcgLoss2PP"""
    score_scale: float = ranged(0.0, ">= 0")
    """initial scale of the fused scores seen by the loss (0 = fitted on train for the initial weights)"""
    learn_score_scale: bool = True
    """learn the score scale jointly with the policy (it never changes a ranking)"""
    exposure_depth: int = ranged(10, ">= 1")
    """E of the validation NDCG@E"""
    stopping_objective: Literal["click", "order", "gmv"] = "order"
    """early stopping and best-epoch selection watch this objective's validation NDCG@E"""
    patience: int = ranged(3, ">= 1")
    """stop after this many epochs without an improvement of the watched NDCG@E"""
    min_delta: float = ranged(0.0, ">= 0")
    """smallest increase of the watched NDCG@E that counts as an improvement"""
    max_valid_requests: int = ranged(0, ">= 0")
    """validate on the first N valid requests only (0 = all)"""
    hidden: list[int] = ranged([64, 64], ">= 1")
    """hidden layer widths of the policy MLP"""
    emb_dim: int = ranged(8, ">= 1")
    """embedding width per categorical feature"""
    kappa_min: float = ranged(10.0, "> 0")
    """lower bound of the Dirichlet concentration (used by Stage 2)"""
    kappa_max: float = ranged(400.0, "> 0")
    """upper bound of the Dirichlet concentration (used by Stage 2)"""
    kappa_init: float = ranged(50.0, "> 0")
    """initial concentration (used by Stage 2)"""
    seed: int = ranged(0, ">= 0")
    """seed of the initialisation and the data order"""
    threads: int = ranged(2, ">= 1")
    """torch intra-op threads (results depend on it: keep it fixed for reproducibility)"""
    log_every_s: float = ranged(10.0, "> 0")
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
            raise ConfigError(f"pretrain.kappa_min, kappa_init, kappa_max: expected kappa_min <= "
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
                         pair_counts: dict[str, float] | None = None) -> tuple[torch.Tensor, dict[str, float]]:
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

    With an ``all_reduce`` that also sums tensors over ranks (``grade.distributed.GradientAverager``),
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
        values = all_reduce.sum(torch.tensor([float(loss.detach()), *parts.values()], dtype=torch.float64)) / world
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
# Checkpoints (safetensors + JSON, never pickle)
# ------------------------------------------------------------------------------------------------

def _flatten_optimizer(state: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    tensors, scalars = {}, {}
    for idx, per_param in state["state"].items():
        for name, value in per_param.items():
            if torch.is_tensor(value):
                tensors[f"state.{idx}.{name}"] = value.detach().contiguous().clone()
            else:
                scalars[f"{idx}.{name}"] = value
    return tensors, {"param_groups": state["param_groups"], "scalars": scalars}


def _unflatten_optimizer(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> dict[str, Any]:
    state: dict[int, dict[str, Any]] = {}
    for key, value in tensors.items():
        _, idx, name = key.split(".", 2)
        state.setdefault(int(idx), {})[name] = value
    for key, value in meta["scalars"].items():
        idx, name = key.split(".", 1)
        state.setdefault(int(idx), {})[name] = value
    return {"state": state, "param_groups": meta["param_groups"]}


def _state_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().contiguous().clone() for k, v in model.state_dict().items()}


def save_checkpoint(out_uri: str, epoch: int, model: RankingModel, best_state: dict[str, torch.Tensor],
                    optimizer: torch.optim.Optimizer, state: dict[str, Any], log_lines: list[str]) -> None:
    """Write ``_checkpoints/epoch-NNNN/`` then ``_checkpoints/latest.json`` (the commit point)."""
    from safetensors.torch import save_file

    opt_tensors, opt_meta = _flatten_optimizer(optimizer.state_dict())
    folder = store.join(out_uri, CHECKPOINTS, f"epoch-{epoch:04d}")
    with tempfile.TemporaryDirectory(prefix="grade-ckpt-") as tmp:
        save_file(_state_tensors(model), str(Path(tmp, "model.safetensors")))
        save_file(best_state, str(Path(tmp, "best.safetensors")))
        save_file(opt_tensors or {"_empty": torch.zeros(0)}, str(Path(tmp, "optimizer.safetensors")))
        rng = {"torch_rng": torch.get_rng_state()}
        save_file(rng, str(Path(tmp, "rng.safetensors")))
        Path(tmp, "state.json").write_text(json.dumps({**state, "optimizer": opt_meta}, indent=1))
        Path(tmp, "train_log.jsonl").write_text("".join(log_lines))
        for name in sorted(p.name for p in Path(tmp).iterdir()):
            store.upload_file(Path(tmp, name), store.join(folder, name))
    store.write_json(store.join(out_uri, CHECKPOINTS, LATEST), {"epoch": epoch, "folder": f"epoch-{epoch:04d}"})
    if epoch >= 3:  # keep the last two: the previous one is a fallback while the next is written
        store.delete_prefix(store.join(out_uri, CHECKPOINTS, f"epoch-{epoch - 2:04d}"))


def load_checkpoint(out_uri: str) -> dict[str, Any] | None:
    """The last completed checkpoint under ``out_uri`` (None when there is none)."""
    from safetensors.torch import load as load_safetensors

    latest_uri = store.join(out_uri, CHECKPOINTS, LATEST)
    if not store.exists(latest_uri):
        return None
    folder = store.join(out_uri, CHECKPOINTS, store.read_json(latest_uri)["folder"])

    def tensors(name: str) -> dict[str, torch.Tensor]:
        return load_safetensors(store.read_bytes(store.join(folder, name)))

    state = store.read_json(store.join(folder, "state.json"))
    opt = tensors("optimizer.safetensors")
    opt.pop("_empty", None)
    return {"state": state, "model": tensors("model.safetensors"), "best": tensors("best.safetensors"),
            "optimizer": _unflatten_optimizer(opt, state["optimizer"]),
            "rng": tensors("rng.safetensors")["torch_rng"],
            "log_lines": store.read_bytes(store.join(folder, "train_log.jsonl")).decode().splitlines(True)}


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
def fit_score_scale(policy: PolicyNet, features_uri: str, cfg: PretrainConfig, max_requests: int = 1024) -> float:
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


class _Rate:
    """Periodic progress lines with requests/s and the ETA of the epoch."""

    def __init__(self, epoch: int, epochs: int, total: int, every_s: float):
        self.epoch, self.epochs, self.total, self.every_s = epoch, epochs, total, every_s
        self.start = self.last = time.monotonic()
        self.done = 0

    def add(self, n: int) -> None:
        self.done += n
        now = time.monotonic()
        if now - self.last >= self.every_s:
            self.last = now
            rate = self.done / max(now - self.start, 1e-9)
            log.info("pretrain epoch %d/%d: %d/%d requests (%.0f requests/s, ETA %.0fs)", self.epoch,
                     self.epochs, self.done, self.total, rate, (self.total - self.done) / max(rate, 1e-9))

    def seconds(self) -> float:
        return time.monotonic() - self.start


def pretrain(features_uri: str, out_uri: str, cfg: PretrainConfig, *, rank: int = 0, world_size: int = 1,
             all_reduce: Callable[[RankingModel], None] | None = None,
             on_epoch_end: Callable[[int], None] | None = None) -> dict[str, Any]:
    """Train the policy mean on ``features_uri`` and publish the model folder at ``out_uri``.

    Resumes from ``<out>/_checkpoints/`` when a checkpoint of the same config and data exists.
    ``on_epoch_end(epoch)`` is called after each epoch's checkpoint is written. Returns metrics.json.
    """
    features_uri, out_uri = str(features_uri), str(out_uri)
    spec = dataset.load_spec(features_uri)
    _check(cfg, spec, features_uri, world_size)
    torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    fingerprint = {"config": to_dict(cfg), "features": features_uri,
                   "features_content_hash": store.content_hash(features_uri), "world_size": world_size}

    ckpt = load_checkpoint(out_uri)
    if ckpt is not None and ckpt["state"]["fingerprint"] != json.loads(json.dumps(fingerprint)):
        log.warning("%s: checkpoint from a different config or data set; starting afresh", out_uri)
        ckpt = None

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
    static = static_weights(spec)
    valid = dataset.load_split(features_uri, "valid", fields=_TRAIN_FIELDS)
    if cfg.max_valid_requests > 0:
        valid = {k: v[: cfg.max_valid_requests] for k, v in valid.items()}
    n_valid = int(valid["mask"].shape[0])
    static_ndcg = validation_ndcg(static, valid, cfg.exposure_depth)
    n_train = dataset.count_requests(features_uri, "train", world_size)

    start_epoch, log_lines, history = 1, [], []
    best = {"epoch": 0, "score": -math.inf}
    bad_epochs, stopped = 0, False
    if ckpt is not None:
        st = ckpt["state"]
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        torch.set_rng_state(ckpt["rng"])
        best_state = ckpt["best"]
        start_epoch, history, best = st["epoch"] + 1, st["history"], st["best"]
        bad_epochs, stopped, log_lines = st["bad_epochs"], st["stopped"], ckpt["log_lines"]
        log.info("pretrain: resuming after epoch %d from %s", st["epoch"], store.join(out_uri, CHECKPOINTS))
    else:
        # Epoch 0 is the initial policy (= the static weights): pretraining must beat it to be kept.
        best_state = _state_tensors(model)
        ndcg0 = validation_ndcg(policy, valid, cfg.exposure_depth)
        history.append({"epoch": 0, "train_loss": None, "train_loss_by_objective": None,
                        "valid_ndcg": {"policy": ndcg0, "static": static_ndcg}, "requests_per_s": None,
                        "score_scale": scale})
        best = {"epoch": 0, "score": ndcg0[cfg.stopping_objective]}

    step = sum(1 for _ in log_lines)
    for epoch in range(start_epoch, cfg.epochs + 1):
        if stopped:
            break
        rate = _Rate(epoch, cfg.epochs, n_train * world_size, cfg.log_every_s)
        loss_sum, parts_sum, n_steps = 0.0, dict.fromkeys(training_labels_names(cfg), 0.0), 0
        # batch_size is the global batch: each rank takes its 1/world_size share of it
        for batch in dataset.iter_batches(features_uri, "train", cfg.batch_size // world_size, shuffle=True,
                                          seed=cfg.seed, epoch=epoch, rank=rank, world_size=world_size,
                                          fields=_TRAIN_FIELDS):
            n_batch = int(batch["mask"].shape[0])
            loss, parts = train_step(model, optimizer, with_signal(batch, cfg), cfg, all_reduce)
            step += 1
            n_steps += 1
            loss_sum += loss
            for name, v in parts.items():
                parts_sum[name] += v
            log_lines.append(json.dumps({"epoch": epoch, "step": step, "pretrain.loss": loss,
                                         **{f"pretrain.loss.{k}": v for k, v in parts.items()},
                                         "pretrain.requests": n_batch}, sort_keys=True) + "\n")
            rate.add(n_batch * world_size)   # the job's rate: every rank takes the same share
        seconds = rate.seconds()
        ndcg = validation_ndcg(policy, valid, cfg.exposure_depth)
        score = ndcg[cfg.stopping_objective]
        if score > best["score"] + cfg.min_delta:
            best = {"epoch": epoch, "score": score}
            best_state = _state_tensors(model)
            bad_epochs = 0
        else:
            bad_epochs += 1
        stopped = bad_epochs >= cfg.patience
        history.append({
            "epoch": epoch, "train_loss": loss_sum / max(n_steps, 1),
            "train_loss_by_objective": {k: v / max(n_steps, 1) for k, v in parts_sum.items()},
            "valid_ndcg": {"policy": ndcg, "static": static_ndcg},
            "requests_per_s": rate.done / max(seconds, 1e-9), "seconds": seconds,
            "score_scale": float(model.log_scale.detach().exp())})
        log.info("pretrain epoch %d/%d: loss %.4f, valid NDCG@%d %s policy %.4f vs static %.4f (best epoch %d); "
                 "%.0f requests/s, ETA %.0fs%s", epoch, cfg.epochs, history[-1]["train_loss"], cfg.exposure_depth,
                 cfg.stopping_objective, score, static_ndcg[cfg.stopping_objective], best["epoch"],
                 history[-1]["requests_per_s"], 0.0 if stopped else seconds * (cfg.epochs - epoch),
                 ", early stop" if stopped else "")
        if rank == 0:
            save_checkpoint(out_uri, epoch, model, best_state, optimizer,
                            {"epoch": epoch, "history": history, "best": best, "bad_epochs": bad_epochs,
                             "stopped": stopped, "fingerprint": fingerprint}, log_lines)
        if on_epoch_end is not None:
            on_epoch_end(epoch)

    model.load_state_dict(best_state)
    best_entry = next(h for h in history if h["epoch"] == best["epoch"])
    trained = [h for h in history if h["epoch"] > 0]
    metrics = {
        "stage": "pretrain", "exposure_depth": cfg.exposure_depth, "stopping_objective": cfg.stopping_objective,
        "best_epoch": best["epoch"], "epochs_run": len(trained), "early_stopped": stopped,
        "best": best_entry["valid_ndcg"], "epochs": history, "score_scale": float(model.log_scale.detach().exp()),
        "n_train_requests": n_train, "n_valid_requests": n_valid,
        "requests_per_s": (sum(h["requests_per_s"] for h in trained) / len(trained)) if trained else None,
    }
    if rank == 0:
        _publish(out_uri, policy, spec, cfg, fingerprint, metrics, log_lines)
    return metrics


def training_labels_names(cfg: PretrainConfig) -> list[str]:
    return [name for name, w in cfg.objective_weights.items() if w != 0]


def _publish(out_uri: str, model: PolicyNet, spec: dict[str, Any], cfg: PretrainConfig,
             fingerprint: dict[str, Any], metrics: dict[str, Any], log_lines: list[str]) -> None:
    with store.publishing(out_uri) as staging:
        save_policy(model, staging)
        (staging / dataset.SPEC_FILE).write_text(json.dumps(spec, indent=2, sort_keys=True) + "\n")
        (staging / "config.json").write_text(json.dumps(
            {"pretrain": to_dict(cfg), "features": fingerprint["features"],
             "features_content_hash": fingerprint["features_content_hash"], "seed": cfg.seed,
             "world_size": fingerprint["world_size"], "policy": dataclasses.asdict(copy.deepcopy(model.cfg))},
            indent=2, sort_keys=True) + "\n")
        (staging / "metrics.json").write_text(json.dumps(metrics, indent=2, sort_keys=True) + "\n")
        (staging / "train_log.jsonl").write_text("".join(log_lines))
    log.info("pretrain: published %s (best epoch %d)", out_uri, metrics["best_epoch"])
