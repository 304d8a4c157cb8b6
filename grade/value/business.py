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
from grade.value.estimators import business_value

#: the report's metric for a declaration of one kind of value
_SINGLE_METRIC = {"clicks": "ctr", "orders": "opm", "gmv": "gpm"}


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

    def weights(self) -> tuple[float, float, float]:
        """(v_click, v_order, v_gmv per unit order value)."""
        return float(self.clicks), float(self.orders), float(self.gmv)

    @property
    def primary_metric(self) -> str:
        """The report metric that measures this value: ctr, opm or gpm for one kind, vpm for a mix."""
        kinds = [k for k in ("clicks", "orders", "gmv") if getattr(self, k) > 0]
        return _SINGLE_METRIC[kinds[0]] if len(kinds) == 1 else "vpm"

    def item_value(self, clicks: torch.Tensor, orders: torch.Tensor, gmv: torch.Tensor,
                   order_value_unit: float) -> torch.Tensor:
        """Value of expected (or estimated) clicks, orders and GMV, elementwise: any shape, same shape out."""
        v_c, v_o, v_g = self.weights()
        return business_value(clicks, orders, gmv, v_click=v_c, v_order=v_o, v_gmv=v_g,
                              mean_order_value=order_value_unit)
