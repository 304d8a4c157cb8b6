"""The value fields of training requests: what the reward's posterior and the guardrails read per item.

:func:`grade.value.value_model.value_fields` gives them for one batch (theta-hat at the logged position,
the labels and the outcome model's expectations per kind of value); :func:`batch_value_fields` adds
what the reward's settings ask for (the outcome model's terms only for estimators that read them, the
cascade's attraction and continuation for cascade estimators, the static weights' amounts when the
guardrails are held as constraints). They depend on the request alone
(the value model is fixed during Stage 2), so :func:`value_cache` computes them once per train request
and a step looks its batch up by row (:func:`cached_value_fields`) instead of running the outcome model
again every epoch.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable

import torch

from grade.data import dataset
from grade.data.transform import clamp_unseen
from grade.model import training
from grade.value import click_model, estimators, guardrails
from grade.value.business import KINDS, BusinessConfig
from grade.value.reward import RewardConfig
from grade.value.value_model import ValueModel, priced_fields, value_fields

#: the value fields of the cascade estimators, carried beside the priced ones
CASCADE_FIELDS = ("attraction", "continuation")

log = logging.getLogger(__name__)

CACHE_CHUNK = 1024
"""train requests per outcome-model pass while the cache is filled: larger chunks raise the transient
memory of the pass more than they save time (docs/finetune.md)"""


def batch_value_fields(batch: dict[str, torch.Tensor], value: ValueModel, reward: RewardConfig, depth: int,
                       static: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """:func:`value_fields` of a batch: the outcome model's terms only where ``reward``'s estimator reads
    them; with the ``static`` weights [K] and guardrails held as constraints, also the static weights'
    amounts per request (:func:`grade.value.guardrails.static_fields`), the guardrails' fixed reference.
    ``depth``: the exposure depth E."""
    fields = value_fields(batch, value, with_model=estimators.needs_model(reward.estimator))
    if estimators.needs_cascade(reward.estimator):
        fields.update(cascade_fields(batch, value, fields["model_kinds"]))
    if static is not None and reward.guard_mode == "constraint":
        fields.update(guardrails.static_fields(static, batch, fields, value.theta(depth), reward, depth))
    return fields


def cascade_fields(batch: dict[str, torch.Tensor], value: ValueModel, model_kinds: torch.Tensor
                   ) -> dict[str, torch.Tensor]:
    """What a cascade estimator reads per item (grade.value.click_model.cascade_inputs): ``model_kinds``
    [B, L, 3] with the outcome model's click probability replaced by the cascade's attraction a(x),
    ``attraction`` [B, L] and ``continuation`` [B, 2] (continue_click, continue_skip: the same on every
    row, so that the fields stay per request). InputError when the value model holds no cascade fit."""
    models = dict(zip(KINDS, model_kinds.unbind(-1), strict=True))
    attraction, scaled, pair = click_model.cascade_inputs(value.examination, batch, models)
    b = model_kinds.shape[0]
    return {"model_kinds": torch.stack([scaled[k] for k in KINDS], dim=-1).to(model_kinds.dtype),
            "attraction": attraction.to(model_kinds.dtype),
            "continuation": torch.tensor(pair, dtype=model_kinds.dtype).repeat(b, 1)}


def priced(fields: dict[str, torch.Tensor], business: BusinessConfig) -> dict[str, torch.Tensor]:
    """The reward's fields for one value: :func:`grade.value.value_model.priced_fields` and, for a cascade
    estimator, the cascade's fields as they are."""
    return {**priced_fields(fields, business), **{k: fields[k] for k in CASCADE_FIELDS if k in fields}}


def value_cache(features_uri: str, value: ValueModel, reward: RewardConfig, depth: int, cat_sizes: list[int],
                max_mb: float, fields: list[str], static: torch.Tensor | None = None
                ) -> dict[str, torch.Tensor] | None:
    """The value fields of every train request, computed once: {name: [N, ...] float32} by row of the
    split (``fields``: the tensors a batch is read with; ``static``: as :func:`batch_value_fields`).

    Computed in chunks of ``CACHE_CHUNK`` requests on the categories the policy sees (``clamp_unseen``,
    ``cat_sizes``), as a step would; the outcome model works request by request, so the numbers are those
    of a per-batch computation. With several ranks each holds the whole split (a rank's share changes
    from epoch to epoch). None, with a warning, when they would take more than ``max_mb`` (and when it
    is 0): the steps then compute them per batch.
    """
    if max_mb == 0:
        return None
    n = dataset.count_requests(features_uri, "train")
    chunks = dataset.iter_batches(features_uri, "train", CACHE_CHUNK, fields=fields, rows=True)
    return value_cache_of(chunks, n, value, reward, depth, cat_sizes, max_mb, static)


def value_cache_of(chunks: Iterable[dict[str, torch.Tensor]], n: int, value: ValueModel, reward: RewardConfig,
                   depth: int, cat_sizes: list[int], max_mb: float, static: torch.Tensor | None = None
                   ) -> dict[str, torch.Tensor] | None:
    """:func:`value_cache` over ``chunks`` of a split of ``n`` requests, each chunk with its
    ``dataset.ROW_FIELD`` [C]; {name: [n, ...]} or None over ``max_mb``."""
    cache: dict[str, torch.Tensor] | None = None
    progress = training.Progress("finetune value fields", n, "requests", logger=log)
    for chunk in chunks:
        chunk = {**chunk, "cat": clamp_unseen(chunk["cat"], cat_sizes)}
        rows = chunk.pop(dataset.ROW_FIELD)
        fields = batch_value_fields(chunk, value, reward, depth, static)
        if cache is None:
            mb = n * sum(v[0].numel() * v.element_size() for v in fields.values()) / 2**20
            if mb > max_mb:
                log.warning("finetune: the value fields of the %d train requests would take %.1f MB, over "
                            "finetune.value_cache_max_mb = %g: computing them per batch instead", n, mb,
                            max_mb)
                return None
            cache = {k: torch.empty((n, *v.shape[1:]), dtype=v.dtype) for k, v in fields.items()}
        for k, v in fields.items():
            cache[k][rows] = v
        progress.add(len(rows))
    seconds = progress.finish()
    if cache is not None:
        mb = sum(v.numel() * v.element_size() for v in cache.values()) / 2**20
        log.info("finetune: value fields of %d train requests computed once in %.1f s (%s; %.1f MB held)",
                 n, seconds, ", ".join(cache), mb)
    return cache


def cached_value_fields(cache: dict[str, torch.Tensor], rows: torch.Tensor) -> dict[str, torch.Tensor]:
    """The value fields {name: [B, L, ...]} of the batch whose requests sit at ``rows`` [B] of the split."""
    return {name: fields[rows] for name, fields in cache.items()}
