"""The Stage 2 run: GRPO fine-tuning of a Stage 1 policy over the train split, with a validation curve.

Stage 1's model folder initialises the policy and, frozen, is the KL reference. Each step is one
:func:`grade.grpo.train_step` on a batch of train requests; the validation curve measures the policy
mean (the serving weights) on the valid split every ``eval_every`` steps: true CTR/CVR/OPM/GPM when the
features carry the simulator's ground truth, the prior (MTL-estimated) metrics and replay NDCG.

Resume: every ``checkpoint_every`` steps (and at each epoch end) ``<out>/_checkpoints/step-NNNNNN/``
(model and optimiser state through ``torch.save`` / ``torch.load(weights_only=True)``, run state and
the train log as JSON) is written, then ``_checkpoints/latest.json`` (the commit point). A re-run
with the same config, init model and data continues from there and ends with the same weights as an
uninterrupted run: each step's samples depend only on (seed, step) and the data order on (seed, epoch).

Data parallelism plugs in through ``rank``/``world_size`` (the data iterator deals each rank its
share) and :func:`grade.grpo.sync_gradients`; only rank 0 writes checkpoints and outputs.
"""

from __future__ import annotations

import dataclasses
import io
import json
import logging
import math
import time
from collections.abc import Callable
from typing import Any

import torch

from grade import auction, config, dataset, store
from grade.config import to_dict
from grade.errors import InputError
from grade.grpo import FinetuneConfig, train_step
from grade.policy import PolicyConfig, PolicyNet, load_policy, save_policy
from grade.reward import gmv_unit_of, reward_terms, weight_entropy
from grade.transform import FeatureTransform, clamp_unseen

log = logging.getLogger(__name__)

CHECKPOINTS = "_checkpoints"
LATEST = "latest.json"
TRAIN_FIELDS = ["z", "pred", "mask", "num", "cat", "click", "order", "gmv", "position"]
TRUTH_FIELDS = ["true_ctr", "true_cvr", "price"]


# ------------------------------------------------------------------------------------------------
# Policies: the trainable copy and the frozen reference
# ------------------------------------------------------------------------------------------------

def build_policies(init_uri: str, cfg: FinetuneConfig, spec: dict[str, Any]) -> tuple[PolicyNet, PolicyNet]:
    """(trainable policy, frozen reference), both Stage 1's weights; fixed kappa applied to both when asked."""
    stage1 = load_policy(init_uri)
    pcfg = stage1.cfg
    FeatureTransform.from_spec(spec).check_policy(pcfg, f"{init_uri} (Stage 1)")
    if not cfg.adaptive_kappa:
        pcfg = dataclasses.replace(pcfg, fixed_kappa=float(cfg.fixed_kappa))
    state = stage1.state_dict()
    policy, reference = PolicyNet(PolicyConfig(**dataclasses.asdict(pcfg))), PolicyNet(pcfg)
    policy.load_state_dict(state)
    reference.load_state_dict(state)
    reference.eval()
    for p in reference.parameters():
        p.requires_grad_(False)
    return policy, reference


# ------------------------------------------------------------------------------------------------
# Validation curve
# ------------------------------------------------------------------------------------------------

@torch.no_grad()
def validation_metrics(policy: PolicyNet, data: dict[str, torch.Tensor], objectives: list[str],
                       cfg: FinetuneConfig, gmv_unit: float = 1.0, chunk: int = 8192) -> dict[str, float]:
    """Metrics of the policy mean on held-out requests, keyed ``true/opm``, ``prior/gpm``, ``replay/ndcg_order``...

    Also ``reward/*`` (the training reward of the mean weights) and ``policy/weight_entropy``.
    """
    policy.eval()
    cat = clamp_unseen(data["cat"], policy.cfg.cat_sizes)
    w = torch.cat([policy.mean_weights(data["num"][s:s + chunk], cat[s:s + chunk])
                   for s in range(0, cat.shape[0], chunk)])
    return weights_metrics(w, data, objectives, cfg, gmv_unit, chunk)


def weights_metrics(w: torch.Tensor, data: dict[str, torch.Tensor], objectives: list[str], cfg: FinetuneConfig,
                    gmv_unit: float = 1.0, chunk: int = 8192) -> dict[str, float]:
    """The validation metrics of given weights ([K] global or [N, K] per request)."""
    n = data["mask"].shape[0]
    if w.dim() == 1:
        w = w.unsqueeze(0).expand(n, -1)
    sums = auction.policy_sums(data, objectives, weights=w, depth=cfg.exposure_depth, eta=cfg.position_bias)
    sums.update(auction.shared_sums(data, cfg.exposure_depth, cfg.position_bias))
    out: dict[str, float] = {}
    for flavour, metrics in auction.METRICS.items():
        for metric, (num, den, scale) in metrics.items():
            if num in sums and den in sums:
                d = float(sums[den].sum())
                out[f"{flavour}/{metric}"] = scale * float(sums[num].sum()) / d if d > 0 else float("nan")
    parts = {"post": 0.0, "prior": 0.0, "format": 0.0, "total": 0.0}
    for s in range(0, n, chunk):
        sl = slice(s, min(s + chunk, n))
        batch = {k: v[sl] for k, v in data.items()}
        terms = reward_terms(w[sl].unsqueeze(1), batch, objectives, cfg.reward, cfg.exposure_depth, gmv_unit)
        for k in parts:
            parts[k] += float(terms[k].sum())
    out.update({f"reward/{k}": v / max(n, 1) for k, v in parts.items()})
    ent = weight_entropy(w)
    out["policy/weight_entropy"] = float(ent.mean())
    out["policy/weight_entropy_min"] = float(ent.min()) if n else float("nan")
    for k in range(w.shape[-1]):
        out[f"policy/w{k}_mean"] = float(w[:, k].mean())
    return out


# ------------------------------------------------------------------------------------------------
# Checkpoints
# ------------------------------------------------------------------------------------------------

def save_checkpoint(out_uri: str, step: int, policy: PolicyNet, optimizer: torch.optim.Optimizer,
                    state: dict[str, Any], log_lines: list[str]) -> None:
    """Write ``_checkpoints/step-NNNNNN/`` then ``_checkpoints/latest.json`` (the commit point)."""
    folder = store.join(out_uri, CHECKPOINTS, f"step-{step:06d}")
    buf = io.BytesIO()
    torch.save({"policy": policy.state_dict(), "optimizer": optimizer.state_dict()}, buf)
    store.write_bytes(store.join(folder, "state.pt"), buf.getvalue())
    store.write_bytes(store.join(folder, "train_log.jsonl"), "".join(log_lines).encode())
    store.write_json(store.join(folder, "state.json"), state)
    latest = store.join(out_uri, CHECKPOINTS, LATEST)
    previous = store.read_json(latest)["folder"] if store.exists(latest) else None
    store.write_json(latest, {"step": step, "folder": f"step-{step:06d}"})
    if previous and previous != f"step-{step:06d}":
        store.delete_prefix(store.join(out_uri, CHECKPOINTS, previous))


def load_checkpoint(out_uri: str) -> dict[str, Any] | None:
    """The last committed checkpoint under ``out_uri`` (None when there is none)."""
    latest = store.join(out_uri, CHECKPOINTS, LATEST)
    if not store.exists(latest):
        return None
    folder = store.join(out_uri, CHECKPOINTS, store.read_json(latest)["folder"])
    tensors = torch.load(io.BytesIO(store.read_bytes(store.join(folder, "state.pt"))), weights_only=True)
    return {"state": store.read_json(store.join(folder, "state.json")), **tensors,
            "log_lines": store.read_bytes(store.join(folder, "train_log.jsonl")).decode().splitlines(True)}


# ------------------------------------------------------------------------------------------------
# The run
# ------------------------------------------------------------------------------------------------

def step_seed(seed: int, step: int) -> int:
    """The sampling seed of one step: depends only on the run's seed and the step number."""
    return (int(seed) * 1_000_003 + int(step) * 7_919 + 17) % (2**63 - 1)


class _Progress:
    """Periodic log lines with requests/s and ETA."""

    def __init__(self, total_steps: int, every_s: float = 10.0):
        self.total, self.every_s = total_steps, every_s
        self.start = self.last = time.monotonic()
        self.requests = 0
        self.steps = 0

    def add(self, step: int, n: int, diag: dict[str, float]) -> None:
        self.requests += n
        self.steps += 1
        now = time.monotonic()
        if now - self.last >= self.every_s or step == self.total:
            self.last = now
            el = max(now - self.start, 1e-9)
            eta = (self.total - step) * el / self.steps
            log.info("finetune step %d/%d: %.0f requests/s, ETA %.0fs; reward %.4f (post %.4f, prior %.4f, "
                     "format %.4f), kl %.4f, kappa %.1f, clip %.3f", step, self.total, self.requests / el, eta,
                     diag["reward/total"], diag["reward/post"], diag["reward/prior"], diag["reward/format"],
                     diag["loss/kl"], diag["policy/kappa_mean"], diag["grpo/clip_frac"])

    def rate(self) -> float:
        return self.requests / max(time.monotonic() - self.start, 1e-9)


def finetune(features_uri: str, init_uri: str, out_uri: str, cfg: FinetuneConfig, *, rank: int = 0,
             world_size: int = 1, on_step: Callable[[int], None] | None = None) -> dict[str, Any]:
    """Fine-tune the Stage 1 policy at ``init_uri`` with GRPO and publish the model folder at ``out_uri``.

    Resumes from ``<out>/_checkpoints/`` when a checkpoint of the same config, init model and data
    exists. ``on_step(step)`` is called after every step (tests use it to interrupt a run).
    Returns metrics.json.
    """
    features_uri, init_uri, out_uri = str(features_uri), str(init_uri), str(out_uri)
    spec = dataset.load_spec(features_uri)
    objectives = list(spec["objectives"])
    gmv_unit = gmv_unit_of(spec)
    config.check(cfg).validate(len(objectives))
    if spec["splits"].get("train", {}).get("n_requests", 0) < 1:
        raise InputError(f"{features_uri}: the train split has no request")
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    policy, reference = build_policies(init_uri, cfg, spec)
    try:
        init_hash = store.content_hash(init_uri)
    except store.NotPublished as e:
        raise InputError(f"--init {init_uri}: not a published Stage 1 model folder ({e})") from None
    fingerprint = json.loads(json.dumps({
        "config": to_dict(cfg), "features": features_uri, "features_content_hash": store.content_hash(features_uri),
        "init": init_uri, "init_content_hash": init_hash, "world_size": world_size}))

    optimizer = torch.optim.Adam(policy.parameters(), lr=cfg.lr)

    if cfg.batch_size % world_size:
        raise InputError(f"finetune.batch_size: {cfg.batch_size} requests per step cannot be split evenly over "
                         f"{world_size} processes; use a multiple of {world_size}")
    rank_batch = cfg.batch_size // world_size   # batch_size is the global batch
    valid = _load_valid(features_uri, spec, cfg) if rank == 0 else None   # the curve is rank 0's
    n_train = dataset.count_requests(features_uri, "train", world_size)
    # A short last batch would get as large a step as a full one (advantages are scaled to unit std)
    # from a noisier estimate: drop it unless the split holds less than one batch.
    drop_last = n_train >= rank_batch
    steps_per_epoch = n_train // rank_batch if drop_last else 1
    total_steps = steps_per_epoch * cfg.epochs
    if cfg.max_steps:
        total_steps = min(total_steps, cfg.max_steps)

    step, log_lines, curve = 0, [], []
    ckpt = load_checkpoint(out_uri)
    if ckpt is not None and ckpt["state"]["fingerprint"] != fingerprint:
        log.warning("%s: checkpoint from a different config, init model or data set; starting afresh", out_uri)
        ckpt = None
    if ckpt is not None:
        policy.load_state_dict(ckpt["policy"])
        optimizer.load_state_dict(ckpt["optimizer"])
        step, curve, log_lines = ckpt["state"]["step"], ckpt["state"]["curve"], ckpt["log_lines"]
        log.info("finetune: resuming after step %d/%d from %s", step, total_steps, store.join(out_uri, CHECKPOINTS))
    stage1_metrics = validation_metrics(reference, valid, objectives, cfg, gmv_unit) if valid is not None else None
    if valid is not None and not curve:
        curve.append({"step": 0, "epoch": 0, **stage1_metrics})

    progress = _Progress(total_steps)
    start_time = time.monotonic()
    n_requests_run = 0
    for epoch in range(step // steps_per_epoch, cfg.epochs):
        if step >= total_steps:
            break
        skip = step - epoch * steps_per_epoch  # batches of this epoch done before a resume
        batches = dataset.iter_batches(features_uri, "train", rank_batch, shuffle=True, seed=cfg.seed,
                                       epoch=epoch, rank=rank, world_size=world_size, fields=TRAIN_FIELDS,
                                       drop_last=drop_last)
        for i, batch in enumerate(batches):
            if i < skip:
                continue
            if step >= total_steps:
                break
            batch["cat"] = clamp_unseen(batch["cat"], policy.cfg.cat_sizes)
            if cfg.anneal_lr:   # a function of the step alone, so a resumed run gets the same rates
                for group in optimizer.param_groups:
                    group["lr"] = cfg.lr * (1.0 - step / total_steps)
            diag = train_step(policy, reference, optimizer, batch, objectives, cfg, step_seed(cfg.seed, step),
                              gmv_unit)
            step += 1
            n_batch = int(batch["mask"].shape[0])
            n_requests_run += n_batch * world_size   # every rank's batch has the same size
            log_lines.append(json.dumps({"step": step, "epoch": epoch + 1, "requests": n_batch, **diag},
                                        sort_keys=True) + "\n")
            progress.add(step, n_batch * world_size, diag)
            at_epoch_end = i + 1 == steps_per_epoch or step == total_steps
            if valid is not None and (step % cfg.eval_every == 0 or step == total_steps):
                curve.append({"step": step, "epoch": epoch + 1, **validation_metrics(policy, valid, objectives, cfg, gmv_unit)})
                _log_curve(curve[-1], curve[0])
            if rank == 0 and (step % cfg.checkpoint_every == 0 or at_epoch_end):
                save_checkpoint(out_uri, step, policy, optimizer,
                                {"step": step, "curve": curve, "fingerprint": fingerprint}, log_lines)
            if on_step is not None:
                on_step(step)

    seconds = time.monotonic() - start_time
    final = validation_metrics(policy, valid, objectives, cfg, gmv_unit) if valid is not None else None
    metrics = {
        "stage": "finetune", "steps": step, "total_steps": total_steps, "steps_per_epoch": steps_per_epoch,
        "exposure_depth": cfg.exposure_depth, "position_bias": cfg.position_bias,
        "n_train_requests": n_train, "n_valid_requests": 0 if valid is None else int(valid["mask"].shape[0]),
        "stage1": stage1_metrics, "final": final, "curve": curve,
        "lift_vs_stage1": _lifts(final, stage1_metrics),
        "seconds": seconds, "requests_per_s": n_requests_run / seconds if seconds > 0 and n_requests_run else None,
        "entropy_floor": cfg.reward.entropy_floor,
    }
    if rank == 0:
        _publish(out_uri, policy, spec, cfg, fingerprint, metrics, log_lines)
    return metrics


def _load_valid(features_uri: str, spec: dict[str, Any], cfg: FinetuneConfig) -> dict[str, torch.Tensor] | None:
    if spec["splits"].get("valid", {}).get("n_requests", 0) < 1:
        log.warning("%s: no valid split; the run has no validation curve", features_uri)
        return None
    truth = [f for f in TRUTH_FIELDS if f in spec.get("ground_truth", [])]
    data = dataset.load_split(features_uri, "valid", fields=TRAIN_FIELDS + truth)
    if cfg.eval_max_requests and data["mask"].shape[0] > cfg.eval_max_requests:
        data = {k: v[: cfg.eval_max_requests] for k, v in data.items()}
    return data


def _lifts(final: dict[str, float] | None, base: dict[str, float] | None) -> dict[str, float]:
    if not final or not base:
        return {}
    return {k: final[k] / base[k] - 1 for k in final
            if k.split("/")[0] in ("true", "prior", "replay") and base.get(k) and math.isfinite(base[k])}


def _log_curve(point: dict[str, float], first: dict[str, float]) -> None:
    keys = [k for k in ("true/opm", "true/gpm", "true/ctr", "prior/gpm", "replay/ndcg_order") if k in point]
    text = ", ".join(f"{k} {point[k]:.4g} ({point[k] / first[k] - 1:+.2%})" for k in keys if first.get(k))
    log.info("finetune valid @ step %d: %s; weight entropy %.3f", point["step"], text, point["policy/weight_entropy"])


def _publish(out_uri: str, policy: PolicyNet, spec: dict[str, Any], cfg: FinetuneConfig,
             fingerprint: dict[str, Any], metrics: dict[str, Any], log_lines: list[str]) -> None:
    with store.publishing(out_uri) as staging:
        save_policy(policy, staging)
        (staging / dataset.SPEC_FILE).write_text(json.dumps(spec, indent=2, sort_keys=True) + "\n")
        (staging / "config.json").write_text(json.dumps(
            {"finetune": to_dict(cfg), "features": fingerprint["features"],
             "features_content_hash": fingerprint["features_content_hash"], "init": fingerprint["init"],
             "init_content_hash": fingerprint["init_content_hash"], "seed": cfg.seed,
             "world_size": fingerprint["world_size"], "policy": dataclasses.asdict(policy.cfg)},
            indent=2, sort_keys=True) + "\n")
        (staging / "metrics.json").write_text(json.dumps(metrics, indent=2, sort_keys=True) + "\n")
        (staging / "train_log.jsonl").write_text("".join(log_lines))
    log.info("finetune: published %s after %d steps", out_uri, metrics["steps"])
