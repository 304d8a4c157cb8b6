"""The Stage 2 run: GRPO fine-tuning of a Stage 1 policy over the train split, with a validation curve.

Stage 1's model folder initialises the policy and, frozen, is the KL reference. Each step is one
:func:`grade.train.grpo.train_step` on a batch of train requests; the validation curve measures the policy
mean (the serving weights) on the valid split every ``eval_every`` steps: true CTR/CVR/OPM/GPM when the
features carry the simulator's ground truth, the prior (MTL-estimated) metrics and replay NDCG.

Resume: every ``checkpoint_every`` steps (and at each epoch end) a checkpoint
``<out>/_checkpoints/step-NNNNNN/`` is written by :mod:`grade.model.training` (safetensors + JSON). A re-run
with the same config, init model and data continues from there and ends with the same weights as an
uninterrupted run: each step's samples depend only on (seed, step) and the data order on (seed, epoch).
A checkpoint of the older ``torch.save`` format is not read: the run starts afresh with a warning.

Data parallelism plugs in through ``rank``/``world_size`` (the data iterator deals each rank its
share) and :class:`grade.core.distributed.GradientAverager`; only rank 0 writes checkpoints and outputs.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
from collections.abc import Callable
from typing import Any

import torch

from grade.core import config, distributed, store
from grade.core.config import to_dict
from grade.core.errors import InputError
from grade.data import dataset
from grade.data.fusion import ClickModel, truth_click_model
from grade.data.transform import FeatureTransform, clamp_unseen
from grade.model import training
from grade.model.policy import PolicyConfig, PolicyNet, load_published_policy
from grade.train.grpo import FinetuneConfig, rollout, train_step
from grade.value import auction, guardrails
from grade.value.baselines import static_weights
from grade.value.business import BusinessConfig
from grade.value.reward import gmv_unit_of, resolve_posterior, reward_terms, rewarded_value, weight_entropy
from grade.value.value_fields import batch_value_fields, cached_value_fields, priced, value_cache
from grade.value.value_model import ValueModel, ValueModelConfig, fit_value_model, load_value_model

log = logging.getLogger(__name__)

TRAIN_FIELDS = ["z", "pred", "mask", "num", "cat", "click", "order", "gmv", "position"]
TRUTH_FIELDS = ["true_ctr", "true_cvr", "price"]


# ------------------------------------------------------------------------------------------------
# Policies: the trainable copy and the frozen reference
# ------------------------------------------------------------------------------------------------

def build_policies(init_uri: str, cfg: FinetuneConfig, spec: dict[str, Any]) -> tuple[PolicyNet, PolicyNet]:
    """(trainable policy, frozen reference), both Stage 1's weights; fixed kappa applied to both when
    asked."""
    stage1 = load_published_policy(init_uri)   # every file checked against the manifest
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
                       cfg: FinetuneConfig, gmv_unit: float = 1.0, chunk: int = 8192,
                       theta: torch.Tensor | None = None,
                       world: ClickModel | None = None) -> dict[str, float]:
    """Metrics of the policy mean on held-out requests, keyed ``true/opm``, ``prior/gpm``,
    ``replay/ndcg_order``...

    Also ``reward/*`` (the training reward of the mean weights) and ``policy/weight_entropy``. ``world``:
    the click model of the truth (:func:`grade.data.fusion.truth_click_model`; None = position-based with
    ``cfg.position_bias``).
    """
    policy.eval()
    cat = clamp_unseen(data["cat"], policy.cfg.cat_sizes)
    w = torch.cat([policy.mean_weights(data["num"][s:s + chunk], cat[s:s + chunk])
                   for s in range(0, cat.shape[0], chunk)])
    return weights_metrics(w, data, objectives, cfg, gmv_unit, chunk, theta, world)


def weights_metrics(w: torch.Tensor, data: dict[str, torch.Tensor], objectives: list[str],
                    cfg: FinetuneConfig, gmv_unit: float = 1.0, chunk: int = 8192,
                    theta: torch.Tensor | None = None, world: ClickModel | None = None) -> dict[str, float]:
    """The validation metrics of given weights ([K] global or [N, K] per request)."""
    n = data["mask"].shape[0]
    if w.dim() == 1:
        w = w.unsqueeze(0).expand(n, -1)
    world = world or ClickModel(eta=cfg.position_bias)
    sums = auction.policy_sums(data, objectives, weights=w, depth=cfg.exposure_depth, eta=world)
    sums.update(auction.shared_sums(data, cfg.exposure_depth, world))
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
        terms = reward_terms(w[sl].unsqueeze(1), batch, objectives, cfg.reward, cfg.exposure_depth, gmv_unit,
                             theta=theta)
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
# The run
# ------------------------------------------------------------------------------------------------

def step_seed(seed: int, step: int) -> int:
    """The sampling seed of one step: depends only on the run's seed and the step number."""
    return (int(seed) * 1_000_003 + int(step) * 7_919 + 17) % (2**63 - 1)


@dataclasses.dataclass
class _Run:
    """What a fine-tuning run works with, fixed once it has started."""

    features_uri: str
    cfg: FinetuneConfig
    spec: dict[str, Any]
    objectives: list[str]
    gmv_unit: float
    fingerprint: dict[str, Any]
    policy: PolicyNet
    reference: PolicyNet
    optimizer: torch.optim.Optimizer
    valid: dict[str, torch.Tensor] | None
    """the valid split on rank 0 (the curve is rank 0's), None elsewhere or without a valid split"""
    n_train: int
    rank_batch: int
    """requests per step on this rank (batch_size is the global batch)"""
    drop_last: bool
    steps_per_epoch: int
    total_steps: int
    rank: int
    world_size: int
    averager: distributed.GradientAverager
    business: BusinessConfig
    """the declared value the posterior estimates"""
    value: ValueModel | None
    """theta-hat and the outcome model, when the posterior estimator needs them"""
    value_cache: dict[str, torch.Tensor] | None
    """the value fields of every train request {name: [N, ...]} by row of the split (:func:`value_cache`);
    None: none needed, or too large, and then computed per batch"""
    static: torch.Tensor
    """[K] the static weights, the guardrails' reference (grade.value.guardrails)"""


@dataclasses.dataclass
class _State:
    """What a checkpoint saves and a resume restores."""

    step: int = 0
    curve: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    log_lines: list[str] = dataclasses.field(default_factory=list)
    kappa_integral: float = 0.0
    """the integral part of the kappa target's multiplier (grade.train.grpo.train_step), carried from step
    to step"""
    guard_integral: tuple[float, ...] = (0.0,) * len(guardrails.GUARDED)
    """the integral parts of the guardrails' multipliers (guard_mode constraint), carried from step to step"""
    guard: guardrails.GuardState | None = None
    """the last step's guardrail reading (guard_mode constraint): logged, and its prices value the
    validation curve's reward terms; not saved (the next step reads the guardrails afresh)"""


def finetune(features_uri: str, init_uri: str, out_uri: str, cfg: FinetuneConfig, *, rank: int = 0,
             world_size: int = 1, on_step: Callable[[int], None] | None = None,
             business: BusinessConfig | None = None, outcome_uri: str | None = None,
             outcome_cfg: ValueModelConfig | None = None) -> dict[str, Any]:
    """Fine-tune the Stage 1 policy at ``init_uri`` with GRPO and publish the model folder at ``out_uri``.

    The posterior estimates the declared ``business`` value with the value model published at
    ``outcome_uri`` (components.outcome), or one fitted here with ``outcome_cfg`` when none is given.

    Resumes from ``<out>/_checkpoints/`` when a checkpoint of the same config, init model and data
    exists. Gradients are averaged over the ranks of the current process group (if any).
    ``on_step(step)`` is called after every step (tests use it to interrupt a run). Returns metrics.json.
    """
    out_uri = str(out_uri)
    run = _start(str(features_uri), str(init_uri), cfg, rank, world_size,
                 business or BusinessConfig(), outcome_uri, outcome_cfg or ValueModelConfig())
    state = _State()
    ckpt = training.load_checkpoint(out_uri, run.fingerprint)
    if ckpt is not None:
        training.restore(ckpt, run.policy, run.optimizer)
        state = _State(ckpt.state["step"], ckpt.state["curve"], ckpt.log_lines,
                       float(ckpt.state.get("kappa_integral", 0.0)),
                       tuple(float(v) for v in ckpt.state.get("guard_integral", state.guard_integral)))
        log.info("finetune: resuming after step %d/%d from %s", state.step, run.total_steps,
                 store.join(out_uri, training.CHECKPOINTS))
    stage1 = _validate(run, state, run.reference)
    if stage1 is not None and not state.curve:
        state.curve.append({"step": 0, "epoch": 0, **stage1})

    progress = training.Progress("finetune", run.total_steps, "steps", rate_unit="requests", done=state.step,
                                 logger=log)
    for epoch in range(state.step // run.steps_per_epoch, cfg.epochs):
        if state.step >= run.total_steps:
            break
        _train_epoch(run, state, epoch, progress, out_uri, on_step)

    metrics = _metrics(run, state, stage1, progress)
    if rank == 0:
        config = training.run_config("finetune", run.fingerprint, cfg.seed, run.policy.cfg)
        training.publish_model(out_uri, run.policy, run.spec, config, metrics, state.log_lines)
        log.info("finetune: published %s after %d steps", out_uri, metrics["steps"])
    return metrics


def _start(features_uri: str, init_uri: str, cfg: FinetuneConfig, rank: int, world_size: int,
           business: BusinessConfig, outcome_uri: str | None, outcome_cfg: ValueModelConfig) -> _Run:
    """Check the inputs, build the policies and optimiser, count the steps, load the validation data."""
    spec = dataset.load_spec(features_uri)
    objectives = list(spec["objectives"])
    config.check(cfg).validate(len(objectives))
    if spec["splits"].get("train", {}).get("n_requests", 0) < 1:
        raise InputError(f"{features_uri}: the train split has no request")
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    policy, reference = build_policies(init_uri, cfg, spec)
    config.check(business, "business")
    inputs = {"features": features_uri, "init": init_uri, **({"outcome": outcome_uri} if outcome_uri else {})}
    settings = ({**to_dict(cfg), "business": to_dict(business)} if cfg.reward.needs_value_model
                else to_dict(cfg))
    fingerprint = training.run_fingerprint(settings, inputs, world_size)
    value = _value_model(features_uri, cfg, outcome_uri, outcome_cfg)
    cfg = _resolved(cfg, value)
    optimizer = torch.optim.Adam(policy.parameters(), lr=cfg.lr)
    if cfg.batch_size % world_size:
        raise InputError(f"finetune.batch_size: {cfg.batch_size} requests per step cannot be split "
                         f"evenly over {world_size} processes; use a multiple of {world_size}")
    rank_batch = cfg.batch_size // world_size   # batch_size is the global batch
    valid = _load_valid(features_uri, spec, cfg, value) if rank == 0 else None   # rank 0's curve
    n_train = dataset.count_requests(features_uri, "train", world_size)
    # A short last batch would get as large a step as a full one (advantages are scaled to unit std)
    # from a noisier estimate: drop it unless the split holds less than one batch.
    drop_last = n_train >= rank_batch
    steps_per_epoch = n_train // rank_batch if drop_last else 1
    total_steps = steps_per_epoch * cfg.epochs
    if cfg.max_steps:
        total_steps = min(total_steps, cfg.max_steps)
    static = static_weights(spec)
    cache = None if value is None else value_cache(features_uri, value, cfg.reward, cfg.exposure_depth,
                                                   policy.cfg.cat_sizes, cfg.value_cache_max_mb, TRAIN_FIELDS,
                                                   static)
    return _Run(features_uri, cfg, spec, objectives, gmv_unit_of(spec), fingerprint, policy, reference,
                optimizer, valid, n_train, rank_batch, drop_last, steps_per_epoch, total_steps, rank,
                world_size, distributed.GradientAverager(), business, value, cache, static)


def _value_model(features_uri: str, cfg: FinetuneConfig, outcome_uri: str | None,
                 outcome_cfg: ValueModelConfig) -> ValueModel | None:
    """The value model the posterior needs: the one at ``outcome_uri``, or one fitted on the features."""
    if not cfg.reward.needs_value_model:
        return None
    if outcome_uri:
        return load_value_model(outcome_uri)
    log.info("finetune: no --outcome given: fitting the value model on %s", features_uri)
    return fit_value_model(features_uri, outcome_cfg)[0]


def _resolved(cfg: FinetuneConfig, value: ValueModel | None) -> FinetuneConfig:
    """``cfg`` with the posterior estimator ``auto`` resolved by the value model's click-model comparison
    (grade.value.reward.resolve_posterior); the run's fingerprint keeps the name as configured."""
    compared = None if value is None else value.examination.click_model
    name = resolve_posterior(cfg.reward.post_estimator, compared)
    if name != cfg.reward.post_estimator:
        log.info("finetune: the posterior estimator %s is %s (the valid clicks look %s)",
                 cfg.reward.post_estimator, name, (compared or {}).get("looks_like", "unknown"))
    return dataclasses.replace(cfg, reward=dataclasses.replace(cfg.reward, post_estimator=name))


def _theta(run: _Run) -> torch.Tensor | None:
    return None if run.value is None else run.value.theta(run.cfg.exposure_depth)




def rewarded_now(run: _Run, state: _State) -> BusinessConfig:
    """The value the posterior maximises at this point of the run: the declared value plus the fixed
    guardrail prices, or plus the prices the guardrails' controller set at the last step."""
    if run.cfg.reward.guard_mode == "constraint":
        return run.business if state.guard is None else guardrails.guarded_value(run.business, state.guard)
    return rewarded_value(run.business, run.cfg.reward)








def _train_epoch(run: _Run, state: _State, epoch: int, progress: training.Progress, out_uri: str,
                 on_step: Callable[[int], None] | None) -> None:
    """The steps of one epoch not done before a resume, with validation points and checkpoints."""
    cfg = run.cfg
    skip = state.step - epoch * run.steps_per_epoch  # batches of this epoch done before a resume
    batches = dataset.iter_batches(run.features_uri, "train", run.rank_batch, shuffle=True, seed=cfg.seed,
                                   epoch=epoch, rank=run.rank, world_size=run.world_size, fields=TRAIN_FIELDS,
                                   drop_last=run.drop_last, rows=True)
    for i, batch in enumerate(batches):
        if i < skip:
            continue
        if state.step >= run.total_steps:
            break
        diag = _step(run, state, epoch, batch)
        n_batch = int(batch["mask"].shape[0])
        progress.add(1, n_batch * run.world_size, lambda d=diag: _describe(d))   # equal batches on every rank
        step = state.step
        if run.valid is not None and (step % cfg.eval_every == 0 or step == run.total_steps):
            state.curve.append({"step": step, "epoch": epoch + 1, **_validate(run, state, run.policy)})
            _log_curve(state.curve[-1], state.curve[0])
        if run.rank == 0 and (step % cfg.checkpoint_every == 0 or i + 1 == run.steps_per_epoch
                              or step == run.total_steps):
            training.save_checkpoint(out_uri, "step", step, fingerprint=run.fingerprint,
                                     tensors={"model": training.state_tensors(run.policy)},
                                     optimizer=run.optimizer,
                                     state={"step": step, "curve": state.curve,
                                            "kappa_integral": state.kappa_integral,
                                            "guard_integral": list(state.guard_integral)},
                                     log_lines=state.log_lines)
        if on_step is not None:
            on_step(step)


def _step(run: _Run, state: _State, epoch: int, batch: dict[str, torch.Tensor]) -> dict[str, float]:
    """One GRPO step on this rank's share of a global batch; appends its line to the train log."""
    cfg = run.cfg
    batch["cat"] = clamp_unseen(batch["cat"], run.policy.cfg.cat_sizes)
    if cfg.anneal_lr:   # a function of the step alone, so a resumed run gets the same rates
        for group in run.optimizer.param_groups:
            group["lr"] = cfg.lr * (1.0 - state.step / run.total_steps)
    rows = batch.pop(dataset.ROW_FIELD)
    seed = step_seed(cfg.seed, state.step)
    run.policy.train()   # as train_step samples when it draws the rollout itself
    roll = rollout(run.policy, batch["num"], batch["cat"], cfg, seed)
    guard: dict[str, float] = {}
    if run.value is not None:
        fields = (cached_value_fields(run.value_cache, rows) if run.value_cache is not None
                  else batch_value_fields(batch, run.value, cfg.reward, cfg.exposure_depth, run.static))
        if cfg.reward.guard_mode == "constraint":
            # read at the weights the policy serves before this step's update (the rollout's mean)
            state.guard = guardrails.read_guardrails(roll.mean, run.static, batch, fields, _theta(run),
                                                     run.business, cfg.reward, cfg.exposure_depth,
                                                     state.guard_integral)
            state.guard_integral = state.guard.integral
            guard = guardrails.diagnostics(state.guard)
        batch = {**batch, **priced(fields, rewarded_now(run, state))}
    result = train_step(run.policy, run.reference, run.optimizer, batch, run.objectives, cfg, seed,
                        run.gmv_unit, run.averager, _theta(run), state.kappa_integral, roll=roll)
    state.kappa_integral = result.kappa_integral
    diag = {**result.diagnostics, **guard}
    state.step += 1
    state.log_lines.append(json.dumps({"step": state.step, "epoch": epoch + 1,
                                       "requests": int(batch["mask"].shape[0]), **diag},
                                      sort_keys=True) + "\n")
    return diag


def _describe(diag: dict[str, float]) -> str:
    return (f"reward {diag['reward/total']:.4f} (post {diag['reward/post']:.4f}, "
            f"prior {diag['reward/prior']:.4f}, format {diag['reward/format']:.4f}), "
            f"kl {diag['loss/kl']:.4f}, kappa {diag['policy/kappa_mean']:.1f}, "
            f"clip {diag['grpo/clip_frac']:.3f}"
            + (f", guard lambda clicks {diag['guard/clicks_multiplier']:.3f} "
               f"gmv {diag['guard/gmv_multiplier']:.3f}" if "guard/clicks_multiplier" in diag else ""))


def _validate(run: _Run, state: _State, policy: PolicyNet) -> dict[str, float] | None:
    """The validation metrics of ``policy`` (None without validation data on this rank); the reward
    terms value what the posterior maximises at this point (:func:`rewarded_now`)."""
    if run.valid is None:
        return None
    valid = run.valid
    if run.value is not None:
        valid = {**valid, **priced(valid, rewarded_now(run, state))}
    return validation_metrics(policy, valid, run.objectives, run.cfg, run.gmv_unit, theta=_theta(run),
                              world=truth_click_model(run.spec, run.cfg.position_bias))


def _metrics(run: _Run, state: _State, stage1: dict[str, float] | None, progress: training.Progress
             ) -> dict[str, Any]:
    """metrics.json of the run."""
    cfg = run.cfg
    seconds = progress.seconds()
    final = _validate(run, state, run.policy)
    return {
        "stage": "finetune", "steps": state.step, "total_steps": run.total_steps,
        "steps_per_epoch": run.steps_per_epoch, "exposure_depth": cfg.exposure_depth,
        "position_bias": cfg.position_bias, "n_train_requests": run.n_train,
        "n_valid_requests": 0 if run.valid is None else int(run.valid["mask"].shape[0]),
        "stage1": stage1, "final": final, "curve": state.curve, "lift_vs_stage1": _lifts(final, stage1),
        "seconds": seconds,
        "requests_per_s": progress.amount / seconds if seconds > 0 and progress.amount else None,
        "entropy_floor": cfg.reward.entropy_floor, "post_estimator": cfg.reward.post_estimator,
    }

def _load_valid(features_uri: str, spec: dict[str, Any], cfg: FinetuneConfig, value: ValueModel | None
                ) -> dict[str, torch.Tensor] | None:
    if spec["splits"].get("valid", {}).get("n_requests", 0) < 1:
        log.warning("%s: no valid split; the run has no validation curve", features_uri)
        return None
    truth = [f for f in TRUTH_FIELDS if f in spec.get("ground_truth", [])]
    data = dataset.load_split(features_uri, "valid", fields=TRAIN_FIELDS + truth)
    if cfg.eval_max_requests and data["mask"].shape[0] > cfg.eval_max_requests:
        data = {k: v[: cfg.eval_max_requests] for k, v in data.items()}
    if value is None:
        return data
    return {**data, **batch_value_fields(data, value, cfg.reward, cfg.exposure_depth)}


def _lifts(final: dict[str, float] | None, base: dict[str, float] | None) -> dict[str, float]:
    if not final or not base:
        return {}
    return {k: final[k] / base[k] - 1 for k in final
            if k.split("/")[0] in ("true", "prior", "replay") and base.get(k) and math.isfinite(base[k])}


def _log_curve(point: dict[str, float], first: dict[str, float]) -> None:
    keys = [k for k in ("true/opm", "true/gpm", "true/ctr", "prior/gpm", "replay/ndcg_order") if k in point]
    text = ", ".join(f"{k} {point[k]:.4g} ({point[k] / first[k] - 1:+.2%})" for k in keys if first.get(k))
    log.info("finetune valid @ step %d: %s; weight entropy %.3f", point["step"], text,
             point["policy/weight_entropy"])
