"""The whole pipeline through KFP's local runner on a small scenario (slow: about a minute a run).

Data and registry on the S3 test server: a first run trains, evaluates against static and promotes;
a second run evaluates its candidate against that incumbent and decides promotion again.
"""

import json

import pytest
import yaml

from grade.core import store

pytestmark = pytest.mark.slow

# A small scenario: enough requests for every split, few epochs, a small group, few resamples, one
# outcome model of two passes; one torch thread per step (the suite runs on parallel workers).
SMALL = {
    "simulator": {"seed": 3, "n_requests": 2000, "n_users": 400, "n_items": 3000, "list_size": 20},
    "features": {"shard_requests": 1024},
    "outcome": {"model": {"epochs": 2, "members": 1}},
    "pretrain": {"epochs": 2, "batch_size": 256, "patience": 1, "threads": 1},
    "finetune": {"epochs": 1, "group_size": 4, "batch_size": 128, "eval_every": 100,
                 "eval_max_requests": 300, "checkpoint_every": 100},
    "evaluate": {"bootstrap_samples": 100, "oracle_candidates": 32, "frontier_steps": 4,
                 "static_search_iterations": 2, "static_search_population": 8,
                 "static_search_max_requests": 500},
}


def small_config(tmp_path, name="small.yaml", **sections):
    data = {**SMALL, **sections}
    p = tmp_path / name
    p.write_text(yaml.safe_dump(data, sort_keys=True))
    return str(p)


# A gate any trained candidate passes: the first run surely leaves a production model behind.
LENIENT_GATE = {"min_lift": -1.0, "guardrails": {"ctr": -1.0, "cvr": -1.0, "gpm": -1.0}}


def test_two_runs_on_s3_promote_then_compare_with_the_incumbent(s3_env, tmp_path):
    from grade.model.registry import Registry
    from pipeline import run_local

    cfg = small_config(tmp_path, promote=LENIENT_GATE)
    store_uri = f"{s3_env}/grade"
    common = {"workdir": tmp_path / "work", "store_uri": store_uri, "snapshot_date": "2026-01-01"}

    first = run_local.run_local(cfg, tmp_path / "out1", **common)
    report, blessing = first["report"], first["blessing"]
    # The simulated logs were written to S3 and the pipeline read them from there.
    logs = first["logs"]
    assert logs.startswith(f"{store_uri}/logs/simulated-") and store.is_published(logs)
    run_tasks = {p.name for p in first["run_dir"].iterdir()}
    assert "simulate" not in run_tasks and "features-2" in run_tasks
    assert first["registry"] == f"{store_uri}/registry"
    assert {"static", "stage1", "grade", "oracle"} <= set(report["policies"])
    assert "incumbent" not in report["policies"], "an empty registry has no incumbent"
    for name in ("report.json", "report.html", "blessing.json"):
        assert (tmp_path / "out1" / name).is_file(), name
    assert json.loads((tmp_path / "out1" / "report.json").read_text()) == report
    assert "<html" in (tmp_path / "out1" / "report.html").read_text().lower()
    assert blessing.baseline == "static" and blessing.verdict == "promoted"
    registry = Registry(first["registry"], "grade-mtf")
    production, _ = registry.production()
    assert production["version"] == blessing.version
    assert registry.lineage(production["version"])["data_uri"] == f"{logs}@2026-01-01"
    # The registry lives on S3, not in the work folder.
    assert not (tmp_path / "work" / "store").exists()

    # A second candidate (another fine-tuning seed) meets the incumbent on the same requests.
    cfg2 = small_config(tmp_path, "second.yaml", promote=LENIENT_GATE,
                        finetune={**SMALL["finetune"], "seed": 1})
    second = run_local.run_local(cfg2, tmp_path / "out2", **common)
    assert second["run_dir"] != first["run_dir"]
    assert second["logs"] == logs, "the same simulator config reuses the logs on S3"
    assert "incumbent" in second["report"]["policies"]
    assert "grade" in second["report"]["lift_vs_incumbent"]
    assert second["report"]["models"]["incumbent"]["version"] == production["version"]
    b2 = second["blessing"]
    assert b2.baseline == "incumbent" and b2.incumbent_version == production["version"]
    assert b2.verdict == "promoted", b2.reasons
    now, _ = registry.production()
    assert now["version"] == b2.version != production["version"]
    assert now["previous_version"] == production["version"]


def test_command_line_simulates_runs_ablations_and_prints_the_summary(tmp_path, capsys, monkeypatch):
    from pipeline import params, run_local

    monkeypatch.delenv("S3_ENDPOINT_URL", raising=False)  # a local store
    cfg = small_config(tmp_path)
    rc = run_local.main(["--config", cfg, "--out", str(tmp_path / "out"), "--snapshot-date", "2026-01-02",
                         "--ablations"])
    assert rc == 0
    out = capsys.readouterr().out
    tail = out[out.rindex("requests, "):]  # the summary after the tasks' own output
    assert "lift vs static" in tail and "grade" in tail
    assert "promotion: " in tail
    assert f"report.html: {(tmp_path / 'out' / 'report.html').absolute()}" in tail
    # Simulated inside the pipeline: the run folder holds the simulate task's logs.
    run_dirs = list((tmp_path / "out" / "_work" / "pipeline-root").iterdir())
    assert len(run_dirs) == 1 and (run_dirs[0] / "simulate" / "logs").is_dir()
    assert (tmp_path / "out" / "_work" / "store" / "registry").is_dir()
    # The ablations were fine-tuned with their own configs and evaluated in a separate report.
    ablations = json.loads((tmp_path / "out" / "ablations" / "report.json").read_text())
    assert set(params.ABLATIONS) | {"grade", "stage1"} <= set(ablations["policies"])
    main_report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert not set(params.ABLATIONS) & set(main_report["policies"])
    hashes = {ablations["models"][name]["content_hash"] for name in [*params.ABLATIONS, "grade"]}
    assert len(hashes) == len(params.ABLATIONS) + 1, "each ablation trains a different model"


def test_outcome_step_publishes_the_value_model_through_the_local_runner(tmp_path):
    """The outcome task alone, fed a features folder through an importer: its artifact is a value model
    that loads, its metadata names theta's estimate and its metrics reach KFP."""
    import warnings

    from kfp import dsl, local
    from kfp.dsl import Dataset

    from grade.data.features import FeaturesConfig, extract_features
    from grade.data.simulator import SimulatorConfig, write_logs
    from grade.value.value_model import load_value_model
    from pipeline import components as c

    write_logs(SimulatorConfig(seed=1, n_requests=1500, n_users=400, list_size=20), str(tmp_path / "logs"))
    extract_features(str(tmp_path / "logs"), str(tmp_path / "features"), FeaturesConfig())
    local.init(runner=local.SubprocessRunner(use_venv=False), pipeline_root=str(tmp_path / "root"),
               raise_on_error=True)

    @dsl.pipeline(name="outcome-only")
    def outcome_only(features_uri: str, config_yaml: str):
        feats = dsl.importer(artifact_uri=features_uri, artifact_class=Dataset, reimport=False)
        c.outcome(features=feats.output, config_yaml=config_yaml)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        outcome_only(features_uri=str(tmp_path / "features"),
                     config_yaml="outcome:\n  model:\n    epochs: 1\n")
    (run,) = (tmp_path / "root").iterdir()
    vm = load_value_model(str(run / "outcome" / "value_model"))
    executor_output = json.loads((run / "outcome" / "executor_output.json").read_text())
    artifacts = executor_output["artifacts"]
    meta = artifacts["value_model"]["artifacts"][0]["metadata"]
    assert meta["examination"] == "power" and meta["eta"] == pytest.approx(vm.examination.eta, abs=1e-6)
    assert len(meta["content_hash"]) == 64
    assert artifacts["metrics"]["artifacts"][0]["metadata"]["examination-eta"] == meta["eta"]
