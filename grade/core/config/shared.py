"""The shared section (keys several steps must agree on) and the ablation section with its presets."""

from __future__ import annotations

import dataclasses
import re
import typing
from typing import Any

from grade.core.config.fields import DEFAULT_MODEL, _number, ranged
from grade.core.errors import ConfigError
from grade.core.store import paths

#: the largest seed (numpy and torch both take it)
MAX_SEED = 2**63 - 1
#: the declared range of every seed
SEED_RANGE = f"[0, {MAX_SEED}]"


@dataclasses.dataclass
class SharedConfig:
    seed: int = ranged(0, f"[0, {MAX_SEED}]")
    """random seed of every step run on the data (every fit, data order, sample and resample): the same
    data, config and seed give the same outputs; ablation.seeds sets one step's apart (the simulated
    world's own seed is simulator.seed)"""
    exposure_depth: int = ranged(10, "[1, 1000]")
    """E: items exposed per request, for every step (training reward and validation, evaluation, the
    simulator's headroom report)"""
    eta: float = ranged(1.0, "[0, 10]")
    """eta of the examination law theta_j = 1/(1+j)^eta that the metrics assume (true and prior
    flavours of fine-tuning's validation and of the evaluation, the oracle) and that the value model
    assumes when eta_mode is fixed; the simulated world's own eta is simulator.position_bias"""
    eta_mode: typing.Literal["estimated", "fixed"] = "estimated"
    """how the value model gets theta: estimated from the logged clicks (value_model.examination), or
    fixed, the power law with shared.eta"""
    model_name: str = DEFAULT_MODEL
    """registry model name: the one promotion gates and whose production model is the incumbent"""

    def validate(self) -> None:
        paths.safe_model_name(self.model_name, "shared.model_name", ConfigError)


#: The named ablations of the documented tables (docs/finetune.md, docs/evaluation.md): preset ->
#: the keys it sets over the file's (a command-line override wins). ``pipeline.params.ABLATIONS`` runs them.
ABLATION_PRESETS: dict[str, dict[str, Any]] = {
    "grade_gaussian": {"ablation.exploration": "gaussian"},
    "grade_fixed_kappa": {"ablation.adaptive_kappa": False},
    "grade_posterior_only": {"finetune.reward.post": 1.0, "finetune.reward.prior": 0.0,
                             "finetune.reward.format": 0.0},
    "grade_prior_only": {"finetune.reward.post": 0.0, "finetune.reward.prior": 1.0,
                         "finetune.reward.format": 0.0},
    # the guardrails at fixed prices instead of held as constraints
    "grade_guard_prices": {"ablation.guard_mode": "price"},
}
#: ``grade_<estimator>``: that estimator of the declared value as the posterior. The names are the value
#: layer's registry (grade.value.reward.POSTERIORS), which checks them; this layer only reads the pattern.
ESTIMATOR_PRESET = re.compile(r"grade_([a-z][a-z0-9_]*)")


def preset_keys(preset: str) -> dict[str, Any]:
    """The keys an ablation preset sets (empty for '' or an unknown name)."""
    if preset in ABLATION_PRESETS:
        return ABLATION_PRESETS[preset]
    match = ESTIMATOR_PRESET.fullmatch(preset)
    return {"finetune.reward.post_estimator": match.group(1)} if match else {}

#: the steps whose seed ablation.seeds can set apart from shared.seed
SEED_STEPS = ("examination", "outcome", "pretrain", "finetune", "evaluate")


@dataclasses.dataclass
class AblationConfig:
    preset: str = ""
    """one row of the documented ablation tables ('' = none): grade_gaussian, grade_fixed_kappa,
    grade_posterior_only, grade_prior_only, grade_guard_prices (the keys grade.core.config.ABLATION_PRESETS
    lists), or grade_<estimator> (finetune.reward.post_estimator, e.g. grade_ips): set over the file's
    values (a --set of such a key still wins)"""
    seeds: dict[str, int] = ranged({}, f"[0, {MAX_SEED}]")
    """step -> its own seed instead of shared.seed (seed studies: examination, outcome, pretrain, finetune,
    evaluate)"""
    exploration: typing.Literal["dirichlet", "gaussian"] = "dirichlet"
    """Stage 2 exploration: dirichlet (GRADE) or gaussian (logistic-normal: softmax(logits + 0.3 eps))"""
    adaptive_kappa: bool = True
    """learn the Dirichlet concentration per request; false = kappa 150 (the target) for every request"""
    guard_mode: typing.Literal["price", "constraint"] = "constraint"
    """how Stage 2's posterior keeps the guardrails CTR and GPM (grade.value.guardrails): constraint
    prices each guardrail by a multiplier a controller raises while the served weights' estimated CTR
    (GPM) is below static's times (1 + finetune.reward.guard_margin) (the default, docs/finetune.md);
    price adds the fixed guard_prices"""
    guard_prices: dict[str, float] = ranged({"clicks": 0.05, "gmv": 0.2}, "[0, 100]")
    """guard_mode price: value of a click and of one train mean order value of GMV added to the
    declared value in the posterior (chosen on the valid splits of three simulated markets)"""

    def validate(self) -> None:
        if self.preset and not preset_keys(self.preset):
            raise ConfigError(f"ablation.preset: expected '', one of {sorted(ABLATION_PRESETS)} or "
                              f"grade_<estimator>, got {self.preset!r}")
        bad = sorted(set(self.seeds) - set(SEED_STEPS))
        if bad:
            raise ConfigError(f"ablation.seeds: unknown step(s) {bad}; expected some of {list(SEED_STEPS)}")
        bad = sorted(set(self.guard_prices) ^ {"clicks", "gmv"})
        if bad:
            raise ConfigError(f"ablation.guard_prices: expected the keys clicks and gmv, got "
                              f"{sorted(self.guard_prices)}")


def _step_seed(step: str) -> Any:
    return lambda get: get("ablation.seeds").get(step, get("shared.seed"))


def _guard_price(kind: str) -> Any:
    return lambda get: get("ablation.guard_prices")[kind]


def _fixed_eta(get: Any) -> float:
    return get("shared.eta") if get("shared.eta_mode") == "fixed" else 0.0


#: derived-field sources that are not one key: name -> function of a getter of resolved keys
DERIVED: dict[str, Any] = {
    **{f"seed:{step}": _step_seed(step) for step in SEED_STEPS},
    "eta:fixed": _fixed_eta,
    "guard_price:clicks": _guard_price("clicks"),
    "guard_price:gmv": _guard_price("gmv"),
}


def _alias_targets(source: str, value: Any) -> list[tuple[str, Any]]:
    """The keys an old name of a field derived from ``source`` sets, given its ``value``."""
    if source.startswith("seed:"):
        return [(f"ablation.seeds.{source[5:]}", value)]
    if source == "eta:fixed":
        try:
            fixed = _number(value, "") > 0
        except ConfigError:
            return [("shared.eta", value)]   # refused there, naming the old name
        return [("shared.eta", value), ("shared.eta_mode", "fixed")] if fixed else \
            [("shared.eta_mode", "estimated")]
    if source.startswith("guard_price:"):
        return [(f"ablation.guard_prices.{source[12:]}", value)]
    return [(source, value)]
