"""Pipeline parameters that override config keys, and the per-step config file each task runs with.

The pipeline takes the whole YAML config as one string parameter (so a user's config file reaches
every step) plus a few named parameters for the keys people tune per run (sizes, hyperparameters,
gate thresholds). Inside a task the named values are merged over the YAML and written to a temp
file that the step reads with ``--config``. Named parameters win over the YAML; ``run_local`` and
``submit`` fill them from the config file, so both always agree unless a user edits one of them
by hand in the KFP UI.

This module imports no KFP: component bodies call it inside the image.
"""

from __future__ import annotations

import dataclasses
import os
import tempfile
from dataclasses import dataclass
from typing import Any

import yaml

from grade.core import config
from grade.core.errors import ConfigError
from grade.value.reward import POSTERIORS, default_posteriors


@dataclass(frozen=True)
class Tunable:
    """A pipeline parameter bound to one config key."""

    name: str
    section: str
    key: str


#: Pipeline parameters that override config keys (name -> section.key). Their defaults in the
#: compiled pipeline are the config dataclasses' defaults.
TUNABLES: tuple[Tunable, ...] = (
    Tunable("n_requests", "simulator", "n_requests"),
    Tunable("seed", "simulator", "seed"),
    Tunable("list_size", "simulator", "list_size"),
    Tunable("pretrain_epochs", "pretrain", "epochs"),
    Tunable("finetune_epochs", "finetune", "epochs"),
    Tunable("group_size", "finetune", "group_size"),
    Tunable("kl_coef", "finetune", "kl_coef"),
    Tunable("min_primary_lift", "promote", "min_lift"),
)


#: The ablations the evaluation can compare with (docs/finetune.md): each sets its preset of the
#: config's ``ablation`` section: the named ones (grade.core.config.ABLATION_PRESETS) and each other
#: posterior of the estimator registry (grade.value.reward.POSTERIORS) the default cannot resolve to.
ABLATIONS: dict[str, dict[str, Any]] = {
    name: {"ablation": {"preset": name}}
    for name in [*config.ABLATION_PRESETS,
                 *(f"grade_{p}" for p in POSTERIORS if p not in default_posteriors())]}


def tunable(name: str) -> Tunable:
    for t in TUNABLES:
        if t.name == name:
            return t
    raise KeyError(name)


def _field_default(section: str, key: str) -> Any:
    for f in dataclasses.fields(config.section_class(section)):
        if f.name == key:
            if f.default is not dataclasses.MISSING:
                return f.default
            return f.default_factory()  # type: ignore[misc]
    raise KeyError(f"config section '{section}' has no key '{key}'")


def defaults() -> dict[str, Any]:
    """Each tunable parameter's default: the config dataclass default of its key."""
    return {t.name: _field_default(t.section, t.key) for t in TUNABLES}


def arguments_from_config(path: str | None) -> dict[str, Any]:
    """Pipeline arguments for a config file: ``config_yaml`` (its text) and every tunable's value."""
    text = ""
    if path:
        config.load_yaml(path)  # a clear error for a missing file or bad YAML
        from grade.core import store

        text = store.read_bytes(str(path)).decode() if store.is_s3(path) else open(path).read()
    args: dict[str, Any] = {"config_yaml": text}
    sections: dict[str, Any] = {}
    for t in TUNABLES:
        if t.section not in sections:
            sections[t.section] = config.load_section(path, t.section)
        value = getattr(sections[t.section], t.key)
        if value is None:
            raise ConfigError(f"{path}: {t.section}.{t.key} is null, which a pipeline parameter cannot "
                              f"carry; give a value")
        args[t.name] = value
    return args


def pipeline_arguments(config_path: str | None, *, logs: str = "", registry: str | None = None,
                       snapshot_date: str = "", ablations: bool = False, pretrain_workers: int = 1,
                       finetune_workers: int = 1) -> dict[str, Any]:
    """A run's parameters: the config (text + tunable values), the data/registry locations and the
    training steps' process counts."""
    for flag, n in (("--pretrain-workers", pretrain_workers), ("--finetune-workers", finetune_workers)):
        if int(n) < 1:
            raise ConfigError(f"{flag}: expected a process count >= 1, got {n}")
    args = arguments_from_config(config_path)
    args.update({"raw_logs_uri": logs, "snapshot_date": snapshot_date, "run_ablations": ablations,
                 "pretrain_workers": int(pretrain_workers), "finetune_workers": int(finetune_workers)})
    if registry:
        args["registry_uri"] = registry
    return args


def deep_merge(base: dict[str, Any], changes: dict[str, Any], where: str) -> dict[str, Any]:
    out = dict(base)
    for key, value in changes.items():
        if isinstance(value, dict):
            current = out.get(key) or {}
            if not isinstance(current, dict):
                raise ConfigError(f"config_yaml: '{where}{key}' must be a mapping, got {current!r}")
            out[key] = deep_merge(current, value, f"{where}{key}.")
        else:
            out[key] = value
    return out


def merge(config_yaml: str, overrides: dict[str, Any], ablation: str = "") -> dict[str, Any]:
    """The config mapping of ``config_yaml`` with ``{tunable name: value}`` (then the named
    ablation's changes, when given) merged over it."""
    data = config.safe_load(config_yaml or "", "config_yaml") or {}
    if not isinstance(data, dict):
        raise ConfigError("config_yaml: expected a mapping of sections at the top level")
    changes: dict[str, Any] = {}
    for name, value in overrides.items():
        t = tunable(name)
        changes = deep_merge(changes, {t.section: {t.key: value}}, "")
    if ablation:
        if ablation not in ABLATIONS:
            raise ConfigError(f"unknown ablation '{ablation}'; expected one of {sorted(ABLATIONS)}")
        changes = deep_merge(changes, ABLATIONS[ablation], "")
    return deep_merge(data, changes, "")


def write_step_config(config_yaml: str, overrides: dict[str, Any] | None = None, ablation: str = "",
                      directory: str | None = None) -> str:
    """Write the merged config to a temp YAML file and return its path (passed as ``--config``)."""
    data = merge(config_yaml, overrides or {}, ablation)
    fd, path = tempfile.mkstemp(prefix="grade-config-", suffix=".yaml", dir=directory)
    with os.fdopen(fd, "w") as f:
        yaml.safe_dump(data, f, sort_keys=True)
    return path
