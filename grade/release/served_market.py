"""The simulated market served by a model: the simulator's ranking hook backed by a trained policy.

``simulator.logging: <model folder or registry version URI>`` logs the market as production would once
that model serves it: every request is ranked by the model's weights on its own features, exactly as
``components.score`` ranks it (the same :func:`grade.release.scoring.score_batch`, with serving's
exploration ``serve.explore``), and the logs carry the served weights per signal, the model version
and the served weights' log-propensity (null for a request served the mean, which is deterministic).
The data layer only sees a :data:`grade.data.simulator.Ranker`; the model lives here.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa

from grade.core import store
from grade.core.errors import InputError
from grade.data.served import Served
from grade.model.exploration import ExploreConfig
from grade.release.scoring import ServingModel, score_batch


class ServedMarket:
    """A :data:`grade.data.simulator.Ranker`: the model at ``uri`` ranks each chunk of simulated requests.

    Only a published model folder or registry version is read (a missing or unpublished one exits 2
    naming ``uri``); its objectives must be the simulator's, in the same order.
    """

    def __init__(self, uri: str, objectives: list[str], exploring: ExploreConfig | None = None):
        self.uri = uri
        self.model = ServingModel(uri, exploring)
        ranked = list(self.model.transform.objectives)
        if ranked != list(objectives):
            raise InputError(f"simulator.logging: model {uri} ranks objectives {ranked}, the simulator "
                             f"writes {list(objectives)}")
        # a registry version by its name (as the alias record and the report name the incumbent), a plain
        # model folder by its content hash (as the report names an evaluated model)
        self.version = str(store.read_manifest(uri).get("version") or store.content_hash(uri))

    def __call__(self, table: pa.Table) -> Served:
        keys = table["request_id"].to_numpy()
        scored = score_batch(self.model, table, keys, self.uri)
        starts = np.flatnonzero(np.r_[True, keys[1:] != keys[:-1]])
        weights = np.stack([scored[f"w_{o}"].to_numpy()[starts] for o in self.model.transform.objectives],
                           axis=-1)
        log_p = None
        if "served_log_propensity" in scored.column_names:       # exploring: NaN where served the mean
            log_p = scored["served_log_propensity"].to_numpy(zero_copy_only=False).astype(np.float64)[starts]
        return Served(scored["score"].to_numpy(), weights, log_p, self.version)
