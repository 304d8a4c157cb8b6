"""The declared business value: what one impression is worth, the one target everything decides on.

``business: {clicks: 0, orders: 1, gmv: 0}`` (config section ``business``) gives the value of a click,
of an order and of GMV (in units of the train mean order value) per impression. Stage 2's reward,
best_static's search, the oracle, the report's headline metric and the promotion gate's primary
metric all maximise this one value; the other metrics are guardrails.

The default, orders, is the paper's OPM headline with GMV as a guardrail. A user who declares GMV
(``{orders: 0, gmv: 1}``) gets GPM everywhere; a mix gets its own metric ``vpm`` (value per mille
impressions, 1000 V / I).
"""

from __future__ import annotations

import dataclasses

import torch

from grade.core.config import ranged
from grade.core.errors import InputError

#: the kinds of value, in the order of every price triple and of the last axis of amount tensors [..., 3]
KINDS = ("clicks", "orders", "gmv")

#: the report's metric for a declaration of one kind of value
_SINGLE_METRIC = {"clicks": "ctr", "orders": "opm", "gmv": "gpm"}


def per_kind_units(unit: float) -> tuple[float, float, float]:
    """What one counted unit of each kind is in raw amounts: a click, an order and ``unit`` of GMV.

    The one place the GMV unit is applied: :func:`in_value_units` divides amounts by it and
    :meth:`BusinessConfig.prices` divides prices by it, so that GMV in currency and GMV counted in
    order values are priced alike (an order of a typical value is worth v_order + v_gmv).
    """
    if not unit > 0:
        raise ValueError(f"the GMV unit must be > 0, got {unit}")
    return 1.0, 1.0, float(unit)


def in_value_units(amounts: torch.Tensor, unit: float) -> torch.Tensor:
    """Amounts [..., 3] (clicks, orders, GMV in currency) with GMV counted in units of ``unit``."""
    return amounts / torch.tensor(per_kind_units(unit), dtype=amounts.dtype)


@dataclasses.dataclass
class BusinessConfig:
    clicks: float = ranged(0.0, ">= 0")
    """value of a click"""
    orders: float = ranged(1.0, ">= 0")
    """value of an order"""
    gmv: float = ranged(0.0, ">= 0")
    """value of one train mean order value of GMV"""

    def validate(self) -> None:
        if self.clicks + self.orders + self.gmv <= 0:
            raise InputError("business: declare a positive value for clicks, orders or gmv")

    def plus(self, clicks: float = 0.0, gmv: float = 0.0) -> BusinessConfig:
        """This value with ``clicks`` more per click and ``gmv`` more per order value unit of GMV (the
        reward's guardrail prices)."""
        return dataclasses.replace(self, clicks=self.clicks + clicks, gmv=self.gmv + gmv)

    def prices(self, unit: float = 1.0) -> tuple[float, float, float]:
        """The price of a click, an order and one currency unit of GMV when the declared GMV value counts
        GMV in units of ``unit`` (the train mean order value); ``unit`` 1: amounts already in those units.
        Every pricing of the declared value (the reward, best_static, the oracle, the value model, the
        guardrails, the evaluation) goes through here."""
        units = per_kind_units(unit)
        return tuple(float(getattr(self, k)) / u for k, u in zip(KINDS, units, strict=True))  # type: ignore

    @property
    def primary_metric(self) -> str:
        """The report metric that measures this value: ctr, opm or gpm for one kind, vpm for a mix."""
        kinds = [k for k in KINDS if getattr(self, k) > 0]
        return _SINGLE_METRIC[kinds[0]] if len(kinds) == 1 else "vpm"

    def item_value(self, clicks: torch.Tensor, orders: torch.Tensor, gmv: torch.Tensor,
                   order_value_unit: float) -> torch.Tensor:
        """Value of expected (or estimated) clicks, orders and GMV in currency, elementwise: any shape, same
        shape out. Every estimator is linear in the label, so the value's estimate is the estimate of this
        combined label."""
        v_c, v_o, v_g = self.prices(order_value_unit)
        return v_c * clicks + v_o * orders + v_g * gmv
