"""The training runtime every trainer shares: checkpoints, run fingerprint and resume, progress, publish.

A trainer (Stage 1 :mod:`grade.train.pretrain`, Stage 2 :mod:`grade.train.finetune`) owns its model, loss and
loop; this module owns the machinery around them, so it exists once:

- checkpoints: ``<out>/_checkpoints/<tag>/`` with the model's tensors and the optimiser state as
  safetensors, run state, RNG and train log as JSON / safetensors (never pickle), then
  ``_checkpoints/latest.json`` as the commit point; the last two checkpoints are kept (the older
  one is the fallback while the next is written);
- the run fingerprint (config, world size and each input's URI and content hash): a checkpoint is
  resumed only by the run that wrote it; another run's (or an older format's) is refused with a
  warning and training starts afresh;
- :class:`grade.core.progress.Progress` (re-exported here): periodic log lines (stderr) with rate and ETA;
- :func:`publish_model`: the model folder (policy.safetensors, policy.json, feature_spec.json,
  config.json, metrics.json, train_log.jsonl), published atomically.

Gradients are averaged over data-parallel ranks by :class:`grade.core.distributed.GradientAverager`.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from torch import nn

from grade.core import store
from grade.core.errors import InputError
from grade.core.progress import Progress
from grade.data import dataset

log = logging.getLogger(__name__)

CHECKPOINTS = "_checkpoints"
LATEST = "latest.json"
#: written into every checkpoint's state.json; a checkpoint without it is of an older format
CHECKPOINT_FORMAT = "grade-checkpoint-v1"
__all__ = ["Checkpoint", "Progress", "load_checkpoint", "publish_model", "restore", "run_config",
           "run_fingerprint", "save_checkpoint", "state_tensors"]
_EMPTY = "_empty"   # safetensors cannot hold zero tensors: a placeholder for an empty optimiser state
#: what reading a checkpoint cut short or missing a file raises (an outage, StoreError, still propagates)
_DAMAGED = (store.NotFound, InputError, KeyError, ValueError, UnicodeDecodeError, SafetensorError)


# ------------------------------------------------------------------------------------------------
# Run fingerprint
# ------------------------------------------------------------------------------------------------

def run_fingerprint(config: Mapping[str, Any], inputs: Mapping[str, str], world_size: int) -> dict[str, Any]:
    """What identifies a run: its config, world size, and each input's URI and content hash.

    ``inputs`` maps a name (``features``, ``init``) to a published folder; the result holds
    ``<name>`` and ``<name>_content_hash`` per input. JSON-normalised, so it compares equal to the
    copy read back from a checkpoint. An unpublished input is bad input (:class:`InputError`).
    """
    out: dict[str, Any] = {"config": dict(config)}
    for name, uri in inputs.items():
        try:
            content = store.content_hash(uri)
        except store.NotPublished as e:
            raise InputError(f"--{name} {uri}: not a published folder ({e})") from None
        out[name], out[f"{name}_content_hash"] = uri, content
    out["world_size"] = world_size
    return json.loads(json.dumps(out))


# ------------------------------------------------------------------------------------------------
# Checkpoints (safetensors + JSON, never pickle)
# ------------------------------------------------------------------------------------------------

@dataclasses.dataclass
class Checkpoint:
    """One committed checkpoint as read back by :func:`load_checkpoint`."""

    state: dict[str, Any]
    """the trainer's run state (JSON), e.g. epoch or step, history, best epoch"""
    tensors: dict[str, dict[str, torch.Tensor]]
    """named tensor sets, e.g. ``model`` and ``best`` (each a state dict)"""
    optimizer: dict[str, Any]
    """the optimiser's state dict, ready for ``load_state_dict``"""
    rng: torch.Tensor
    """torch's global RNG state at the checkpoint"""
    log_lines: list[str]
    """the train log up to the checkpoint, one JSON line each"""


def state_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """A detached, contiguous copy of ``model``'s state dict (what a checkpoint stores)."""
    return {k: v.detach().contiguous().clone() for k, v in model.state_dict().items()}


def flatten_optimizer(state: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """An optimiser state dict as (tensors ``state.<param>.<name>``, JSON: param groups and scalars)."""
    tensors, scalars = {}, {}
    for idx, per_param in state["state"].items():
        for name, value in per_param.items():
            if torch.is_tensor(value):
                tensors[f"state.{idx}.{name}"] = value.detach().contiguous().clone()
            else:
                scalars[f"{idx}.{name}"] = value
    return tensors, {"param_groups": state["param_groups"], "scalars": scalars}


def unflatten_optimizer(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> dict[str, Any]:
    """The inverse of :func:`flatten_optimizer`."""
    state: dict[int, dict[str, Any]] = {}
    for key, value in tensors.items():
        _, idx, name = key.split(".", 2)
        state.setdefault(int(idx), {})[name] = value
    for key, value in meta["scalars"].items():
        idx, name = key.split(".", 1)
        state.setdefault(int(idx), {})[name] = value
    return {"state": state, "param_groups": meta["param_groups"]}


def save_checkpoint(out_uri: str, counter: str, number: int, *, fingerprint: dict[str, Any],
                    tensors: dict[str, dict[str, torch.Tensor]], optimizer: torch.optim.Optimizer,
                    state: dict[str, Any], log_lines: list[str]) -> None:
    """Write ``_checkpoints/<counter>-<number>/`` then ``_checkpoints/latest.json`` (the commit point).

    ``counter`` names what ``number`` counts (``epoch``, ``step``); ``tensors`` are named state
    dicts (one ``<name>.safetensors`` each). Keeps this checkpoint and the one before it.
    """
    from safetensors.torch import save_file

    # the folder names of the layouts in use: epoch-NNNN (Stage 1), step-NNNNNN (Stage 2)
    tag = f"{counter}-{number:04d}" if counter == "epoch" else f"{counter}-{number:06d}"
    opt_tensors, opt_meta = flatten_optimizer(optimizer.state_dict())
    folder = store.join(out_uri, CHECKPOINTS, tag)
    with tempfile.TemporaryDirectory(prefix="grade-ckpt-") as tmp:
        for name, values in tensors.items():
            save_file(values, str(Path(tmp, f"{name}.safetensors")))
        save_file(opt_tensors or {_EMPTY: torch.zeros(0)}, str(Path(tmp, "optimizer.safetensors")))
        save_file({"torch_rng": torch.get_rng_state()}, str(Path(tmp, "rng.safetensors")))
        meta = {**state, "format": CHECKPOINT_FORMAT, "fingerprint": fingerprint, "optimizer": opt_meta,
                "tensors": sorted(tensors), "log_bytes": len("".join(log_lines).encode())}
        Path(tmp, "state.json").write_text(json.dumps(meta, indent=1))
        Path(tmp, "train_log.jsonl").write_text("".join(log_lines))
        for name in sorted(p.name for p in Path(tmp).iterdir()):
            store.upload_file(Path(tmp, name), store.join(folder, name))
    _commit(out_uri, counter, number, tag)


def _commit(out_uri: str, counter: str, number: int, tag: str) -> None:
    """Point ``latest.json`` at ``tag``, then delete the checkpoint two commits back."""
    latest_uri = store.join(out_uri, CHECKPOINTS, LATEST)
    before = store.read_json(latest_uri) if store.exists(latest_uri) else {}
    previous = before.get("folder")
    if previous == tag:   # the same checkpoint written again (a resumed run): the fallback stays
        previous = before.get("previous")
    store.write_json(latest_uri, {counter: number, "folder": tag, "previous": previous})
    stale = before.get("previous") if before.get("folder") != tag else None
    if stale and stale not in (tag, previous):
        store.delete_prefix(store.join(out_uri, CHECKPOINTS, stale))


def load_checkpoint(out_uri: str, fingerprint: dict[str, Any] | None = None) -> Checkpoint | None:
    """The last committed checkpoint under ``out_uri`` that reads back whole, or None to start afresh.

    A committed checkpoint that cannot be read (a file truncated or missing, e.g. by a full disk or
    a copy cut short) is skipped with a warning for the one before it (``latest.json`` keeps both).
    With ``fingerprint`` a checkpoint of another run (config, world size or inputs differ) is
    refused; a checkpoint of an older format (before safetensors-only checkpoints) is refused
    always. Both cases log a warning saying why, and the caller starts afresh.
    """
    latest_uri = store.join(out_uri, CHECKPOINTS, LATEST)
    if not store.exists(latest_uri):
        return None
    try:
        latest = store.read_json(latest_uri)
        tags = [latest["folder"], *([latest["previous"]] if latest.get("previous") else [])]
    except (InputError, KeyError, TypeError) as e:
        log.warning("%s: unreadable (%s); starting afresh", latest_uri, e)
        return None
    for tag in tags:
        try:
            return _read_checkpoint(out_uri, tag, fingerprint)
        except _DAMAGED as e:
            log.warning("%s: checkpoint %s cannot be read back (%s: %s); trying the one before it",
                        out_uri, tag, type(e).__name__, e)
    log.warning("%s: no committed checkpoint reads back whole; starting afresh", out_uri)
    return None


def _read_checkpoint(out_uri: str, tag: str, fingerprint: dict[str, Any] | None) -> Checkpoint | None:
    """One checkpoint folder read back (None: refused, see :func:`load_checkpoint`); ``_DAMAGED`` errors
    when a file is missing or cut short."""
    from safetensors.torch import load as load_safetensors

    folder = store.join(out_uri, CHECKPOINTS, tag)
    state = store.read_json(store.join(folder, "state.json"))
    if state.get("format") != CHECKPOINT_FORMAT:
        log.warning("%s: checkpoint in an old format (expected %s; torch.save checkpoints are no longer "
                    "read); starting afresh", folder, CHECKPOINT_FORMAT)
        return None
    if fingerprint is not None and state["fingerprint"] != fingerprint:
        log.warning("%s: checkpoint of another run (config, world size or input data differ); "
                    "starting afresh", out_uri)
        return None

    def tensors(name: str) -> dict[str, torch.Tensor]:
        return load_safetensors(store.read_bytes(store.join(folder, f"{name}.safetensors")))

    opt = tensors("optimizer")
    opt.pop(_EMPTY, None)
    log_bytes = store.read_bytes(store.join(folder, "train_log.jsonl"))
    # a log cut short would resume with rows missing from train_log.jsonl; older checkpoints lack the size
    if len(log_bytes) != state.get("log_bytes", len(log_bytes)):
        raise ValueError(f"train_log.jsonl holds {len(log_bytes)} bytes, the checkpoint recorded "
                         f"{state['log_bytes']}")
    return Checkpoint(state=state, tensors={name: tensors(name) for name in state["tensors"]},
                      optimizer=unflatten_optimizer(opt, state["optimizer"]), rng=tensors("rng")["torch_rng"],
                      log_lines=log_bytes.decode().splitlines(True))


def restore(ckpt: Checkpoint, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """Load a checkpoint's ``model`` tensors, optimiser state and RNG state into a fresh run."""
    model.load_state_dict(ckpt.tensors["model"])
    optimizer.load_state_dict(ckpt.optimizer)
    torch.set_rng_state(ckpt.rng)


# ------------------------------------------------------------------------------------------------
# Publish
# ------------------------------------------------------------------------------------------------

def run_config(section: str, fingerprint: dict[str, Any], seed: int, model_config: Any) -> dict[str, Any]:
    """config.json of a model folder: the trainer's config under ``section``, inputs, seed, world size,
    model."""
    inputs = {k: v for k, v in fingerprint.items() if k != "config"}
    return {section: fingerprint["config"], **inputs, "seed": seed,
            "policy": dataclasses.asdict(model_config)}


def publish_model(out_uri: str, model: nn.Module, spec: dict[str, Any], config: dict[str, Any],
                  metrics: dict[str, Any], log_lines: list[str],
                  save: Callable[[nn.Module, Path], None] | None = None,
                  extra: dict[str, Any] | None = None) -> None:
    """Publish the model folder at ``out_uri`` atomically (all files or none).

    Files: the model's weights and config (``save``, by default :func:`grade.model.policy.save_policy`:
    policy.safetensors, policy.json), feature_spec.json, config.json, metrics.json, train_log.jsonl,
    and one JSON file per ``extra`` entry (file name -> object).
    """
    from grade.model.policy import save_policy

    with store.publishing(out_uri) as staging:
        (save or save_policy)(model, staging)
        (staging / dataset.SPEC_FILE).write_text(json.dumps(spec, indent=2, sort_keys=True) + "\n")
        (staging / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        (staging / "metrics.json").write_text(json.dumps(metrics, indent=2, sort_keys=True) + "\n")
        (staging / "train_log.jsonl").write_text("".join(log_lines))
        for name, obj in (extra or {}).items():
            (staging / name).write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")
