"""Request tensors straight from a simulated table (grade.data.dataset.load_split's layout), for tests."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import torch

from grade.data.simulator import SimulatorConfig, generate

NUMERIC = ("u_purchase_power", "u_price_affinity", "u_activity", "u_session_depth")
ROW_FIELDS = ("position", "click", "order", "gmv", "true_ctr", "true_cvr", "price")


def simulated_batch(cfg: SimulatorConfig) -> dict[str, torch.Tensor]:
    """position, mask, click, order, gmv, pred, z, num and the truth columns of every simulated request.

    z: log predictions standardised with the logs' own mean and std; num: numeric user features
    standardised the same way (as the features step does with train statistics).
    """
    table = pa.concat_tables(list(generate(cfg)))
    n, L = table.num_rows // cfg.list_size, cfg.list_size

    def col(name: str) -> np.ndarray:
        return table[name].to_numpy().reshape(n, L)

    out = {name: torch.from_numpy(col(name).astype(np.float32)) for name in ROW_FIELDS}
    out["position"] = out["position"].long()
    out["mask"] = torch.ones(n, L, dtype=torch.bool)
    pred = np.stack([col(f"pred_{o}") for o in cfg.objectives], -1)
    out["pred"] = torch.from_numpy(pred.astype(np.float32))
    logp = out["pred"].log()
    out["z"] = (logp - logp.mean((0, 1))) / logp.std((0, 1))
    num = torch.from_numpy(np.stack([col(c)[:, 0] for c in NUMERIC], -1).astype(np.float32))
    out["num"] = (num - num.mean(0)) / num.std(0)
    return out
