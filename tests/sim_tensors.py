"""Request tensors straight from a simulated table (grade.data.dataset.load_split's layout), for tests."""

from __future__ import annotations

import json

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


def publish_random_policy(features_uri: str, model_uri: str, seed: int = 3):
    """Publish at ``model_uri`` a policy on the features at ``features_uri`` whose parameters are moved
    at random (seeded), so its weights are personalised rather than the initial constant; returns it."""
    from grade.core import store
    from grade.model.policy import PolicyConfig, PolicyNet, save_policy

    spec_bytes = store.read_bytes(store.join(features_uri, "feature_spec.json"))
    spec = json.loads(spec_bytes)
    torch.manual_seed(seed)
    net = PolicyNet(PolicyConfig(n_numeric=len(spec["numeric"]),
                                 cat_sizes=[c["size"] for c in spec["categorical"]],
                                 n_objectives=len(spec["objectives"])))
    with torch.no_grad():
        for p in net.parameters():
            p.add_(torch.randn_like(p) * 0.5)
    with store.publishing(model_uri) as staging:
        save_policy(net, staging)
        (staging / "feature_spec.json").write_bytes(spec_bytes)
    return net
