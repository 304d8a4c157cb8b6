"""Every benchmark runs at its tiny size and prints one JSON document with the keys it documents.

The numbers are not asserted (tiny sizes measure nothing); this catches a benchmark that no longer
runs against the code it measures. Each runs in its own process, as ``make bench`` runs it.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from benchmarks import run_all

REPO = Path(__file__).resolve().parent.parent

#: the keys each benchmark's document carries (benchmarks/README.md describes what they measure)
KEYS: dict[str, set[str]] = {
    "store": {"object_mib", "upload_mib_s", "download_mib_s", "open_published_s"},
    "simulate": {"small", "large", "peak_rss_ratio_large_vs_small"},
    "features": {"rows", "features", "bare_scan", "ratio_features_to_scan_time"},
    "lambdaloss": {"forward_backward_ms", "forward_only_ms", "allrank_forward_backward_ms",
                   "ratio_vs_allrank", "ratio_vs_forward_only", "forward_backward_ms_by_scheme"},
    "pretrain": {"train_requests_per_s_median", "forward_only_requests_per_s", "ratio_train_vs_forward_only",
                 "valid_ndcg_order"},
    "finetune": {"train_step", "floor_forward_fused_ranking", "step_over_floor_median", "by_estimator",
                 "value_fields_once", "dm_fields_per_batch"},
    "outcome": {"fit_s", "floor_s", "train_over_floor", "forward_pass", "value_fields_per_finetune_batch"},
    "distributed": {"pretrain", "finetune", "layouts"},
    "auction": {"bootstrap", "policy_sums", "rank_only_reference", "policy_sums_vs_rank_only"},
    "inference": {"batch_1", "batch_1024"},
    "serve": {"batch_1", "batch_64", "failed_total", "alias_moves"},
}


def test_every_benchmark_has_a_smoke_test_and_a_tiny_size():
    assert set(KEYS) == set(run_all.BENCHMARKS) == set(run_all.TINY)


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(run_all.BENCHMARKS))
def test_the_benchmark_runs_at_its_tiny_size_and_prints_its_keys(name, tmp_path):
    # its own S3 test server (store) and its own temporary files; no session settings leak in
    env = {k: v for k, v in os.environ.items() if not k.startswith(("S3_", "AWS_"))}
    env.update({"GRADE_LOG_LEVEL": "WARNING", "TMPDIR": str(tmp_path),
                "PYTHONPATH": os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH", "")) if p)})
    module, args = run_all.arguments(name, "tiny")
    doc = run_all.run_one(module, args, env=env, timeout=600)
    assert "error" not in doc, json.dumps(doc, indent=1)[-3000:]
    assert doc["benchmark"] == name
    missing = KEYS[name] - set(doc)
    assert not missing, f"{name}: no {sorted(missing)} in {sorted(doc)}"
