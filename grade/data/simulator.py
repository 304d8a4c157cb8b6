"""Marketplace search simulator: realistic logs with ground truth, so every claim is measurable.

Generative model (documented for users in docs/simulator.md):

* **Users** belong to one of four latent segments that differ in true behaviour:

  ============== ====== ======== ============ ========
  segment        intent purchase price sens.  quality
  ============== ====== ======== ============ ========
  browser        low    very low mild (0.4)   some
  buyer          high   high     medium (1.0) some
  bargain hunter medium medium   strong (3.0) little
  premium        medium medium   likes (-1.2) strong
  ============== ====== ======== ============ ========

  Observed features are noisy functions of the segment, so they identify it only partly:
  ``u_purchase_power``, ``u_price_affinity``, ``u_activity`` (user level, fixed per user),
  ``u_session_depth`` (per request), ``c_device``, ``c_region`` (user level) and
  ``c_query_category`` (per request).
* **Items** have a category, a log-normal price around a category mean, a quality and an appeal.
  A request draws ``list_size`` candidates: most from the query category (a contiguous block of a
  shuffled category list, so never twice the same item), the rest from one other category.
* **Truth**: with r = log(price) - (category mean log-price),
  ``logit ctr = a_s + 0.8 [in query category] + appeal + 0.3 q_s quality - 0.25 b_s r`` and
  ``logit cvr = c_s + 0.5 q_s quality - b_s r``, where a_s, c_s, b_s, q_s are the segment's intent,
  purchase propensity, price sensitivity and quality taste. ``true_ctr`` is the click probability
  of an examined item; ``true_cvr`` the order probability given a click.
* **The MTL model** is global: its predictions are the truth plus noise plus *systematic,
  user-dependent error*. It learned the population-average price sensitivity, so for each segment
  it misses ``(1 - mtl_price_awareness)`` of the gap between the segment's price sensitivity and the
  average; and pCVR is biased upward on items pricier than their category (``mtl_cvr_price_bias``).
  This is why one global fusion cannot be right for everybody (personalisation has real headroom)
  and why rewards built only from predictions can be hacked (they over-rate expensive items).
  ``pred_gmv`` is the predicted order value (the price with a little noise).
* **Logging policy**: production fusion (uniform weights on log-predictions = rank by the product
  of predictions) with per-request Dirichlet noise on the weights, or a served model's ranking (a
  :data:`grade.data.served.Ranker`). Users examine the list under the world's click model
  (:meth:`SimulatorConfig.world`: position-based ``theta_j = 1 / (1 + j)^eta`` or a DBN-style cascade,
  with an optional page end); click ~ Bernoulli(true_ctr) on an examined item; order ~
  Bernoulli(true_cvr) after a click; ``gmv`` = price on an order.

Ground truth (``true_ctr``, ``true_cvr``, ``price``, ``true_segment``) is written next to the logs for
evaluation only. The static logging policy's per-request weights are logged as a served model's are
(``served_w_<objective>``, on the log-predictions; ``served_log_propensity``, their Dirichlet
log-density; ``model_version`` ``static``): the weight-level estimator reads them. A row's examination
propensity is theta at its logged ``position``. Rows are generated and written in
chunks of requests, each chunk from its own seeded generator: memory does not grow with
``n_requests`` and the same config + seed always gives the same tables.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import logging
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch

from grade.core import config, store
from grade.core.config import SEED_RANGE, ranged
from grade.core.errors import ConfigError
from grade.core.progress import Progress
from grade.data.fusion import CLICK_MODELS, ClickModel, fuse, gather_items, simplex_grid, top_e
from grade.data.served import STATIC_VERSION, Ranker, Served, sample_clicks

log = logging.getLogger("grade.data.simulator")

SEGMENTS = ("browser", "buyer", "bargain_hunter", "premium")
#: the predicted signals (pred_<name> columns) the simulator can write; labels are click, order, gmv
SIGNALS = ("ctr", "cvr", "gmv", "rel")
#: segment parameters: click intent a, purchase propensity c, price sensitivity b, quality taste q
SEGMENT_PARAMS = {
    "browser": dict(a=-2.3, c=-3.4, b=0.4, q=0.3),
    "buyer": dict(a=-1.7, c=-1.5, b=1.0, q=0.4),
    "bargain_hunter": dict(a=-2.0, c=-2.0, b=3.0, q=0.1),
    "premium": dict(a=-2.0, c=-2.3, b=-1.2, q=1.3),
}
#: observable signatures per segment: purchase power, price affinity, activity, device probabilities
SEGMENT_SIGNATURES = {
    "browser": dict(power=-0.3, affinity=0.0, activity=1.0, device=(0.2, 0.7, 0.1)),
    "buyer": dict(power=0.3, affinity=0.0, activity=0.2, device=(0.5, 0.3, 0.2)),
    "bargain_hunter": dict(power=-0.8, affinity=-1.0, activity=0.4, device=(0.25, 0.6, 0.15)),
    "premium": dict(power=1.2, affinity=1.0, activity=-0.3, device=(0.6, 0.2, 0.2)),
}
VALUE_PRESETS = {"clicks": (1.0, 0.0, 0.0), "orders": (0.0, 1.0, 0.0), "gmv": (0.0, 0.0, 1.0)}
_EPOCH = dt.datetime(1970, 1, 1, tzinfo=dt.timezone.utc)


@dataclasses.dataclass
class SimulatorConfig:
    seed: int = ranged(0, SEED_RANGE)
    """seed of the simulated world (catalogue, users, market) and its logs: the same config and seed always
    give the same logs; like position_bias a property of the data, so apart from shared.seed (the seed of
    every step run on the data)"""
    n_requests: int = ranged(20000, "[1, 1e8]")
    """number of search requests"""
    n_users: int = ranged(5000, "[1, 1e8]")
    """number of distinct users"""
    list_size: int = ranged(50, "[1, 10000]")
    """candidates per request (L)"""
    objectives: list[str] = dataclasses.field(default_factory=lambda: ["ctr", "cvr", "gmv"])
    """MTL predictions written as pred_<objective>; from ctr, cvr, gmv, rel"""
    n_items: int = ranged(20000, "[1, 1e8]")
    """catalogue size"""
    n_categories: int = ranged(20, "[2, 100000]")
    """number of item categories"""
    price_sigma: float = ranged(0.35, ">= 0", retired=True)
    """std of an item's log-price around its category's mean"""
    category_price_sigma: float = ranged(0.3, ">= 0", retired=True)
    """std of the categories' mean log-prices"""
    appeal_sigma: float = ranged(0.6, ">= 0", retired=True)
    """std of the items' click appeal (logit)"""
    in_category_share: float = ranged(0.7, "[0, 1]", retired=True)
    """share of a request's candidates from its query category"""
    n_days: int = ranged(14, "[1, 3660]")
    """days the requests are spread over (one Parquet partition per day)"""
    start_date: str = "2026-01-01"
    """first day of the logs (UTC)"""
    segment_mix: list[float] = ranged([0.35, 0.25, 0.25, 0.15], ">= 0")
    """share of users per segment: browser, buyer, bargain_hunter, premium"""
    feature_noise: float = ranged(0.7, ">= 0")
    """std of the noise on the numeric user features (higher = segments harder to identify)"""
    mtl_noise_ctr: float = ranged(0.25, ">= 0", retired=True)
    """std of the MTL pCTR logit noise"""
    mtl_noise_cvr: float = ranged(0.3, ">= 0", retired=True)
    """std of the MTL pCVR logit noise"""
    mtl_price_awareness: float = ranged(0.1, "[0, 1]")
    """share of each segment's deviation from the average price sensitivity the MTL model captures"""
    mtl_cvr_price_bias: float = ranged(0.4, "(-inf, inf)")
    """upward pCVR logit bias per unit of log-price above the category mean"""
    mtl_gmv_noise: float = ranged(0.1, ">= 0", retired=True)
    """std of the log-noise of pred_gmv around the price"""
    logging_concentration: float = ranged(30.0, "> 0")
    """Dirichlet concentration of the logging policy's per-request weight noise"""
    position_bias: float = ranged(1.0, "[0, 10]")
    """eta of the simulated world's examination theta_j = 1 / (1 + j)^eta under click_model pbm (how its
    clicks are generated; what the estimators assume is shared.eta; the truth is always the world's)"""
    click_model: str = "pbm"
    """how users examine a list: pbm (position-based: position j examined with theta_j, whatever is above)
    or cascade (DBN-style: the user scans from the top, continuing after each slot with
    cascade_continue_click if she clicked it, cascade_continue_skip if not)"""
    cascade_continue_click: float = ranged(0.5, "[0, 1]")
    """cascade: probability of going on after a click; half the users who clicked are satisfied and stop,
    the order of magnitude DBN fits on search logs report for satisfaction after a click"""
    cascade_continue_skip: float = ranged(0.9, "[0, 1]")
    """cascade: probability of going on after a skip; 0.9 makes a list nobody clicks examined 0.9^j deep
    (0.39 at position 10, 0.12 at 20): a patient but finite scan, as DBN fits of web search find"""
    page_size: int | None = ranged(0, "[0, 10000]")
    """positions at or past it are never examined, under either click model (0 or null = no page end)"""
    logging: str = "static"
    """who ranks the logged lists: static (the production fusion with Dirichlet noise on its weights) or a
    model folder or registry version URI (the market served by that model: its mean weights, logged as
    served_w_<objective>, served_log_propensity and model_version)"""
    stream: int = ranged(0, "[0, 1000000]")
    """index of the stream of requests drawn from the same world (catalogue, users, click model): 0 the
    original logs, 1, 2, ... the next days of the same market (pipeline.loop's rounds)"""
    exposure_depth: int = ranged(10, "[1, 1000]", derived="shared.exposure_depth")
    """E: positions that count as exposed in the headroom report and the oracle"""
    chunk_requests: int = ranged(10000, "[1, 1e7]", retired=True)
    """requests generated and written per chunk (bounds memory)"""

    def validate(self) -> None:
        bad = [o for o in self.objectives if o not in SIGNALS]
        if bad or not self.objectives:
            raise ConfigError(f"simulator.objectives: expected a non-empty list from {list(SIGNALS)}, "
                              f"got {self.objectives}")
        if len(set(self.objectives)) != len(self.objectives):
            raise ConfigError(f"simulator.objectives: duplicates in {self.objectives}")
        if len(self.segment_mix) != len(SEGMENTS) or sum(self.segment_mix) <= 0:
            raise ConfigError(f"simulator.segment_mix: expected {len(SEGMENTS)} non-negative shares, "
                              f"got {self.segment_mix}")
        per_cat = self.n_items // self.n_categories
        if self.list_size > per_cat:
            raise ConfigError(f"simulator: list_size {self.list_size} needs at least that many items per "
                              f"category (n_items / n_categories = {per_cat})")
        try:
            dt.date.fromisoformat(self.start_date)
        except ValueError:
            raise ConfigError(f"simulator.start_date: expected YYYY-MM-DD, got {self.start_date!r}") from None
        if self.click_model not in CLICK_MODELS:
            raise ConfigError(f"simulator.click_model: expected one of {list(CLICK_MODELS)}, "
                              f"got {self.click_model!r}")
        if not self.logging:
            raise ConfigError("simulator.logging: expected static or a model folder / registry version URI, "
                              "got ''")

    def world(self) -> ClickModel:
        """The simulated world's click model: its clicks are drawn from it, its truth computed under it."""
        return ClickModel(self.click_model, self.position_bias, self.cascade_continue_click,
                          self.cascade_continue_skip, self.page_size or None)


# ------------------------------------------------------------------------------------------------
# World: catalogue and users (fixed by the seed)
# ------------------------------------------------------------------------------------------------

@dataclasses.dataclass
class World:
    item_category: np.ndarray      # [n_items] int
    item_log_price: np.ndarray     # [n_items]
    item_rel_price: np.ndarray     # [n_items] log-price minus the category mean
    item_quality: np.ndarray       # [n_items]
    item_appeal: np.ndarray        # [n_items]
    category_items: np.ndarray     # [n_categories, per_cat] item ids, shuffled within the category
    user_segment: np.ndarray       # [n_users] int
    user_num: np.ndarray           # [n_users, 3] purchase power, price affinity, activity
    user_device: np.ndarray        # [n_users]
    user_region: np.ndarray        # [n_users]
    user_categories: np.ndarray    # [n_users, 3] favourite categories


def make_world(cfg: SimulatorConfig) -> World:
    rng = np.random.default_rng([cfg.seed, 0])
    per_cat = cfg.n_items // cfg.n_categories
    n_items = per_cat * cfg.n_categories
    category = np.repeat(np.arange(cfg.n_categories), per_cat)
    cat_mean = rng.normal(3.5, cfg.category_price_sigma, cfg.n_categories)  # log-price level per category
    rel_price = rng.normal(0.0, cfg.price_sigma, n_items)
    log_price = cat_mean[category] + rel_price
    quality = rng.normal(0.0, 1.0, n_items) + 0.3 * rel_price        # pricier items are a bit better
    appeal = rng.normal(0.0, cfg.appeal_sigma, n_items)
    category_items = np.stack([rng.permutation(np.arange(c * per_cat, (c + 1) * per_cat))
                               for c in range(cfg.n_categories)])

    mix = np.asarray(cfg.segment_mix, dtype=float)
    seg = rng.choice(len(SEGMENTS), size=cfg.n_users, p=mix / mix.sum())
    sig = [SEGMENT_SIGNATURES[s] for s in SEGMENTS]
    centre = np.array([[s["power"], s["affinity"], s["activity"]] for s in sig])
    user_num = centre[seg] + rng.normal(0.0, cfg.feature_noise, (cfg.n_users, 3))
    device_p = np.array([s["device"] for s in sig])
    u = rng.random(cfg.n_users)
    device = (u[:, None] > np.cumsum(device_p[seg], axis=1)).sum(1)
    region = rng.integers(0, 8, cfg.n_users)
    fav = rng.integers(0, cfg.n_categories, (cfg.n_users, 3))
    return World(category, log_price, rel_price, quality, appeal, category_items, seg, user_num, device,
                 region, fav)


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-x))


# ------------------------------------------------------------------------------------------------
# Requests
# ------------------------------------------------------------------------------------------------

def _chunk(cfg: SimulatorConfig, world: World, index: int, start: int, n: int,
           ranker: Ranker | None = None) -> pa.Table:
    """Requests [start, start + n) as a long-format table (rows of a request contiguous), ranked by the
    static logging policy or by ``ranker``."""
    # stream 0 keeps the original draws; a later stream is new requests of the same world
    rng = np.random.default_rng([cfg.seed, 1, index] + ([cfg.stream] if cfg.stream else []))
    L = cfg.list_size
    per_cat = world.category_items.shape[1]

    # request time: evenly spread over the days, jittered, increasing with the request index
    span_us = cfg.n_days * 86_400 * 1_000_000
    base = dt.datetime.fromisoformat(cfg.start_date).replace(tzinfo=dt.timezone.utc)
    pos = (np.arange(start, start + n) + rng.random(n)) / cfg.n_requests
    t_us = (base - _EPOCH).total_seconds() * 1e6 + np.floor(pos * span_us)
    t_us = np.maximum.accumulate(t_us.astype(np.int64))

    user = rng.integers(0, cfg.n_users, n)
    seg = world.user_segment[user]
    query_cat = np.where(rng.random(n) < 0.8, world.user_categories[user, rng.integers(0, 3, n)],
                         rng.integers(0, cfg.n_categories, n))
    other_cat = (query_cat + rng.integers(1, cfg.n_categories, n)) % cfg.n_categories
    n_in = int(round(cfg.in_category_share * L))
    slot = np.arange(L)
    in_query = slot < n_in
    cat = np.where(in_query[None, :], query_cat[:, None], other_cat[:, None])            # [n, L]
    offset = rng.integers(0, per_cat, (n, 1))
    # contiguous blocks of a shuffled category list: distinct items within a request
    col = (offset + np.where(in_query, slot, slot - n_in)[None, :]) % per_cat
    items = world.category_items[cat, col]

    # truth
    params = np.array([[SEGMENT_PARAMS[s][k] for k in "acbq"] for s in SEGMENTS])
    a, c, b, q = (params[seg, i][:, None] for i in range(4))
    rel = world.item_rel_price[items]
    quality = world.item_quality[items]
    ctr_logit = a + 0.8 * in_query[None, :] + world.item_appeal[items] + 0.3 * q * quality - 0.25 * b * rel
    cvr_logit = c + 0.5 * q * quality - b * rel
    true_ctr = _sigmoid(ctr_logit)
    true_cvr = _sigmoid(cvr_logit)
    price = np.exp(world.item_log_price[items])

    # the global MTL model: average price sensitivity, upward pCVR bias on expensive items, noise
    mix = np.asarray(cfg.segment_mix) / np.sum(cfg.segment_mix)
    b_avg = float(np.dot(mix, params[:, 2]))
    b_mtl = b_avg + cfg.mtl_price_awareness * (b - b_avg)
    pred_ctr = _sigmoid(ctr_logit + 0.25 * (b - b_mtl) * rel + rng.normal(0, cfg.mtl_noise_ctr, (n, L)))
    pred_cvr = _sigmoid(cvr_logit + (b - b_mtl) * rel + cfg.mtl_cvr_price_bias * np.maximum(rel, 0.0)
                        + rng.normal(0, cfg.mtl_noise_cvr, (n, L)))
    pred_gmv = price * np.exp(rng.normal(0, cfg.mtl_gmv_noise, (n, L)))
    pred_rel = _sigmoid(1.5 * in_query[None, :] - 0.75 + rng.normal(0, 0.5, (n, L)))
    preds = {"ctr": pred_ctr, "cvr": pred_cvr, "gmv": pred_gmv, "rel": pred_rel}

    # logging policy: product of predictions with per-request Dirichlet noise on the weights. Every random
    # draw happens before the ranking, in a fixed order, so a served market sees the same users, lists
    # and uniforms as the static one
    k = len(cfg.objectives)
    logged_w = rng.dirichlet(np.full(k, cfg.logging_concentration / k), n)
    u_click, u_order = rng.random((n, L)), rng.random((n, L))
    session_depth = world.user_num[user, 2][:, None] * 0.5 + rng.normal(0, 1.0, (n, 1))
    rows = n * L
    rep = lambda x: np.repeat(x, L)  # noqa: E731 - request-level value on every row of the request
    cols: dict[str, Any] = {
        "request_id": pa.array(rep(np.arange(start, start + n, dtype=np.int64))),
        "user_id": pa.array(rep(user.astype(np.int64))),
        "event_time": pa.array(rep(t_us), type=pa.timestamp("us", tz="UTC")),
        "u_purchase_power": pa.array(rep(world.user_num[user, 0]).astype(np.float32)),
        "u_price_affinity": pa.array(rep(world.user_num[user, 1]).astype(np.float32)),
        "u_activity": pa.array(rep(world.user_num[user, 2]).astype(np.float32)),
        "u_session_depth": pa.array(np.repeat(session_depth[:, 0], L).astype(np.float32)),
        "c_device": pa.array(rep(world.user_device[user]).astype(np.int32)),
        "c_region": pa.array(rep(world.user_region[user]).astype(np.int32)),
        "c_query_category": pa.array(rep(query_cat).astype(np.int32)),
        "item_id": pa.array(items.reshape(rows).astype(np.int64)),
    }
    pred_cols = {f"pred_{o}": pa.array(np.maximum(preds[o], 1e-7).reshape(rows).astype(np.float32))
                 for o in cfg.objectives}
    if ranker is None:
        logp = np.stack([np.log(np.maximum(preds[o], 1e-12)) for o in cfg.objectives], axis=-1)
        served = static_served(np.einsum("nlk,nk->nl", logp, logged_w), logged_w, cfg.logging_concentration)
    else:
        served = ranker(pa.table({**cols, **pred_cols}))
    order_idx = np.argsort(-served.scores.reshape(n, L), axis=1, kind="stable")
    position = np.empty((n, L), dtype=np.int16)
    np.put_along_axis(position, order_idx, np.broadcast_to(slot.astype(np.int16), (n, L)), axis=1)

    click = sample_clicks(cfg.world(), rng, order_idx, position, true_ctr, u_click)
    order = click & (u_order < true_cvr)
    gmv = np.where(order, price, 0.0)

    cols["position"] = pa.array(position.reshape(rows))
    cols.update(pred_cols)
    cols.update({
        "click": pa.array(click.reshape(rows).astype(np.int8)),
        "order": pa.array(order.reshape(rows).astype(np.int8)),
        "gmv": pa.array(gmv.reshape(rows).astype(np.float32)),
    })
    cols.update(served.columns(cfg.objectives, L))
    cols.update({
        "true_ctr": pa.array(true_ctr.reshape(rows).astype(np.float32)),
        "true_cvr": pa.array(true_cvr.reshape(rows).astype(np.float32)),
        "price": pa.array(price.reshape(rows).astype(np.float32)),
        "true_segment": pa.array(rep(seg).astype(np.int8)),
    })
    return pa.table(cols)


def static_served(scores: np.ndarray, logged_w: np.ndarray, concentration: float) -> Served:
    """The static logging policy's answer: its scores, the logged weights (on the log-predictions, as
    logged: float32 renormalised) and their log-density under its Dirichlet Dir(concentration / K), so
    that its logs carry propensities as a served model's do (model_version ``static``: weights on the
    log-predictions, grade.value.weight_ips)."""
    w = logged_w.astype(np.float32).astype(np.float64)
    w = w / w.sum(axis=1, keepdims=True)
    alpha = torch.full((w.shape[1],), concentration / w.shape[1], dtype=torch.float64)
    log_p = torch.distributions.Dirichlet(alpha).log_prob(torch.from_numpy(w)).numpy()
    return Served(scores, w, log_p, STATIC_VERSION)


def generate(cfg: SimulatorConfig, ranker: Ranker | None = None) -> Iterator[pa.Table]:
    """The logs as a sequence of tables, one per chunk of ``cfg.chunk_requests`` requests, in time order,
    ranked by the static logging policy or by ``ranker`` (the served market)."""
    config.check(cfg)
    world = make_world(cfg)
    for index, start in enumerate(range(0, cfg.n_requests, cfg.chunk_requests)):
        yield _chunk(cfg, world, index, start, min(cfg.chunk_requests, cfg.n_requests - start), ranker)


def write_logs(cfg: SimulatorConfig, out_uri: str, ranker: Ranker | None = None) -> dict[str, Any]:
    """Generate the logs and publish them atomically as ``day=YYYY-MM-DD/part-NNNNN.parquet`` under
    ``out_uri`` (``ranker``: the served market's, for ``cfg.logging`` other than static)."""
    t0 = time.monotonic()
    rows = 0
    files = 0
    # a line per chunk: chunks take seconds each
    progress = Progress("simulate", -(-cfg.n_requests // cfg.chunk_requests), "chunks", rate_unit="rows",
                        every_s=0.0, logger=log)
    with store.publishing(out_uri, extra={"producer": "grade.data.simulator",
                                          "config": dataclasses.asdict(cfg)}) as staging:
        for index, table in enumerate(generate(cfg, ranker)):
            day = pc.strftime(table["event_time"], format="%Y-%m-%d").to_numpy(zero_copy_only=False)
            bounds = np.flatnonzero(np.r_[True, day[1:] != day[:-1], True])
            for lo, hi in zip(bounds[:-1], bounds[1:], strict=True):
                folder = Path(staging, f"day={day[lo]}")
                folder.mkdir(exist_ok=True)
                pq.write_table(table.slice(lo, hi - lo), folder / f"part-{index:05d}.parquet",
                               compression="zstd")
                files += 1
            rows += table.num_rows
            progress.add(1, table.num_rows)
    elapsed = time.monotonic() - t0
    summary = {"out": out_uri, "requests": cfg.n_requests, "rows": rows, "files": files,
               "seconds": round(elapsed, 3), "rows_per_s": round(rows / max(elapsed, 1e-9))}
    log.info("simulate: wrote %d rows of %d requests in %d files to %s (%.1f s)", rows, cfg.n_requests, files,
             out_uri, elapsed)
    return summary


def logged_world(logs_uri: str | list[str]) -> dict[str, Any]:
    """{"click_model": the world's click model as JSON} of simulated logs, read from their manifest (the
    simulator's config); {} for logs this simulator did not write (no manifest, or another producer)."""
    if not isinstance(logs_uri, str):
        return {}
    try:
        manifest = store.read_manifest(logs_uri)
    except store.NotPublished:
        return {}
    if manifest.get("producer") != "grade.data.simulator" or not isinstance(manifest.get("config"), dict):
        return {}
    known = {f.name for f in dataclasses.fields(SimulatorConfig)}
    cfg = SimulatorConfig(**{k: v for k, v in manifest["config"].items() if k in known})
    return {"click_model": cfg.world().to_json()}


# ------------------------------------------------------------------------------------------------
# The oracle and the headroom
# ------------------------------------------------------------------------------------------------

def simplex_candidates(k: int, n_candidates: int = 512, seed: int = 0) -> torch.Tensor:
    """A fixed, deterministic set of weight vectors covering the simplex: [C, K].

    Vertices, the centre, a regular grid as fine as half the budget allows, then Dirichlet(1) draws.
    """
    step = 1
    while True:  # finest grid with at most half the budget
        nxt = simplex_grid(k, step + 1)
        if len(nxt) > max(n_candidates // 2, k + 1):
            break
        step += 1
    grid = simplex_grid(k, step)
    centre = torch.full((1, k), 1.0 / k)
    g = torch.Generator().manual_seed(seed)
    extra = max(n_candidates - len(grid) - 1, 0)
    # Dirichlet(1) draws = normalised exponentials, from a seeded generator for determinism
    e = -torch.log(torch.rand(extra, k, generator=g).clamp_min(1e-12))
    draws = e / e.sum(-1, keepdim=True)
    cand = torch.cat([grid, centre, draws])
    return torch.unique(cand.round(decimals=6), dim=0)


def _value_weights(value) -> tuple[float, float, float]:
    """(v_click, v_order, v_gmv per currency unit) of a preset name or a triple: the evaluation passes
    grade.value.business.BusinessConfig.prices, the simulator's own headroom report a preset."""
    if isinstance(value, str):
        if value not in VALUE_PRESETS:
            raise ValueError(f"value must be one of {sorted(VALUE_PRESETS)} or (v_click, v_order, v_gmv), "
                             f"got {value!r}")
        return VALUE_PRESETS[value]
    v = tuple(float(x) for x in value)
    if len(v) != 3:
        raise ValueError(f"value must be (v_click, v_order, v_gmv), got {value!r}")
    return v


def _priced(outcomes: dict[str, torch.Tensor], value) -> torch.Tensor:
    """The value of expected clicks, orders and GMV ({kind: [N, C]}) at ``value``'s prices: [N, C]."""
    v_click, v_order, v_gmv = _value_weights(value)
    return v_click * outcomes["clicks"] + v_order * outcomes["orders"] + v_gmv * outcomes["gmv"]


def candidate_outcomes(signals: torch.Tensor, true_ctr: torch.Tensor, true_cvr: torch.Tensor,
                       price: torch.Tensor, mask: torch.Tensor | None, candidates: torch.Tensor, *,
                       depth: int = 10, eta: ClickModel | float = 1.0,
                       chunk: int = 256) -> dict[str, torch.Tensor]:
    """Expected clicks, orders and GMV per request for every candidate weight vector: each [N, C].

    signals [N, L, K]; true_* and price [N, L]; candidates [C, K]; ``eta`` the world's click model (an
    eta = position-based). Ranks with every candidate at once (chunks of requests bound the
    [chunk, C, L] score tensor).
    """
    world = ClickModel.of(eta)
    n = signals.shape[0]
    out = {"clicks": [], "orders": [], "gmv": []}
    for s in range(0, n, chunk):
        sl = slice(s, min(s + chunk, n))
        z = signals[sl].float()
        m = None if mask is None else mask[sl]
        w = candidates.unsqueeze(0).expand(z.shape[0], -1, -1)
        idx = top_e(fuse(z, w, m), depth)                                      # [b, C, E]
        ctr = true_ctr[sl].float()
        shown = torch.ones(idx.shape) if m is None else gather_items(m.float(), idx)
        attraction = gather_items(ctr, idx)
        clicks = attraction * world.examine(attraction, shown)
        orders = clicks * gather_items(true_cvr[sl].float(), idx)
        out["clicks"].append(clicks.sum(-1))
        out["orders"].append(orders.sum(-1))
        out["gmv"].append((orders * gather_items(price[sl].float(), idx)).sum(-1))
    return {k: torch.cat(v) for k, v in out.items()}


def oracle_weights(signals: torch.Tensor, true_ctr: torch.Tensor, true_cvr: torch.Tensor, price: torch.Tensor,
                   mask: torch.Tensor | None = None, *, depth: int = 10, eta: ClickModel | float = 1.0,
                   value=(0.0, 1.0, 0.0), n_candidates: int = 512, seed: int = 0,
                   chunk: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    """Per request, the candidate weights maximising the true business value, and that value.

    signals [N, L, K] (log-predictions or standardised z: any per-objective score whose weighted sum
    ranks); true_ctr, true_cvr, price [N, L]; mask bool [N, L]. value = (v_click, v_order, v_gmv) or
    one of "clicks", "orders", "gmv": value of a ranking = sum_j theta_j ctr (v_click + cvr (v_order +
    v_gmv price)) over the top ``depth``, theta the examination under the click model ``eta`` (an eta =
    position-based). Returns weights [N, K] and value [N].
    """
    cand = simplex_candidates(signals.shape[-1], n_candidates, seed)
    o = candidate_outcomes(signals, true_ctr, true_cvr, price, mask, cand, depth=depth, eta=eta, chunk=chunk)
    val = _priced(o, value)
    best = val.argmax(dim=1)
    return cand[best], val.gather(1, best[:, None])[:, 0]


def _metrics(clicks: torch.Tensor, orders: torch.Tensor, gmv: torch.Tensor,
             impressions: float) -> dict[str, float]:
    c, o, g = float(clicks.sum()), float(orders.sum()), float(gmv.sum())
    return {"ctr": c / impressions, "cvr": o / max(c, 1e-12), "opm": 1000 * o / impressions,
            "gpm": 1000 * g / impressions}


def headroom_report(table: pa.Table, objectives: list[str], *, list_size: int, depth: int = 10,
                    eta: ClickModel | float = 1.0, value="orders", n_candidates: int = 512,
                    seed: int = 0) -> dict[str, Any]:
    """True CTR/CVR/OPM/GPM of static, the best global vector, per-segment best vectors and the oracle.

    ``table``: simulated logs (rows of a request contiguous, ``list_size`` rows per request). Signals are
    the log-predictions (static = uniform weights = rank by the product of predictions). The best
    global and per-segment vectors are searched on the same requests (an upper bound of what a global or
    a segment-aware policy could reach). ``eta``: the world's click model (an eta = position-based).
    """
    n = table.num_rows // list_size

    def col(name):
        return torch.from_numpy(table[name].to_numpy().astype(np.float32).reshape(n, list_size))

    signals = torch.stack([col(f"pred_{o}").clamp_min(1e-12).log() for o in objectives], dim=-1)
    ctr, cvr, price = col("true_ctr"), col("true_cvr"), col("price")
    segment = torch.from_numpy(table["true_segment"].to_numpy()[::list_size].astype(np.int64))
    k = len(objectives)
    cand = simplex_candidates(k, n_candidates, seed)
    static = torch.full((1, k), 1.0 / k)
    cand = torch.cat([static, cand])
    o = candidate_outcomes(signals, ctr, cvr, price, None, cand, depth=depth, eta=eta)
    val = _priced(o, value)
    impressions = float(ClickModel.of(eta).impressions(torch.ones(min(depth, list_size)))) * n
    rows = torch.arange(n)

    def pick(choice: torch.Tensor) -> dict[str, float]:
        return _metrics(o["clicks"][rows, choice], o["orders"][rows, choice], o["gmv"][rows, choice],
                        impressions)

    best_global = int(val.mean(0).argmax())
    seg_choice = torch.zeros(n, dtype=torch.long)
    seg_weights = {}
    for s in range(len(SEGMENTS)):  # a handful of segments, not requests
        sel = segment == s
        if sel.any():
            best = int(val[sel].mean(0).argmax())
            seg_choice[sel] = best
            seg_weights[SEGMENTS[s]] = [round(x, 4) for x in cand[best].tolist()]
    policies = {
        "static": pick(torch.zeros(n, dtype=torch.long)),
        "best_global": pick(torch.full((n,), best_global, dtype=torch.long)),
        "segment_best": pick(seg_choice),
        "oracle": pick(val.argmax(1)),
    }
    base = policies["static"]
    lifts = {name: {m: v / base[m] - 1 for m, v in p.items()} for name, p in policies.items()}
    return {"n_requests": n, "objectives": list(objectives), "value": list(_value_weights(value)),
            "policies": policies, "lift_vs_static": lifts,
            "oracle_opm_vs_best_global": policies["oracle"]["opm"] / policies["best_global"]["opm"] - 1,
            "segment_best_opm_vs_best_global":
                policies["segment_best"]["opm"] / policies["best_global"]["opm"] - 1,
            "weights": {"best_global": [round(x, 4) for x in cand[best_global].tolist()],
                        "segment_best": seg_weights}}


def format_headroom(rep: dict[str, Any]) -> str:
    lines = [f"Headroom on {rep['n_requests']} simulated requests (true metrics, top-E exposure):",
             f"{'policy':<14}{'CTR':>9}{'CVR':>9}{'OPM':>9}{'GPM':>10}"
             f"{'OPM lift':>10}{'GPM lift':>10}{'CTR lift':>10}"]
    for name, m in rep["policies"].items():
        lift = rep["lift_vs_static"][name]
        lines.append(f"{name:<14}{m['ctr']:>9.4f}{m['cvr']:>9.4f}{m['opm']:>9.3f}{m['gpm']:>10.1f}"
                     f"{lift['opm']:>+10.2%}{lift['gpm']:>+10.2%}{lift['ctr']:>+10.2%}")
    lines.append(f"oracle vs best global OPM: {rep['oracle_opm_vs_best_global']:+.2%}; "
                 f"segment-best vs best global OPM: {rep['segment_best_opm_vs_best_global']:+.2%}")
    lines.append(f"best global weights {rep['weights']['best_global']}; "
                 f"per segment {rep['weights']['segment_best']}")
    return "\n".join(lines)
