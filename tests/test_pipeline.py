"""The compiled pipeline: byte-identical to pipeline.yaml, a valid PipelineSpec, and wired as designed.
Also the helpers tasks run inside the image (config merging, KFP metrics, summaries)."""

import json
from pathlib import Path

import pytest
import yaml
from google.protobuf import json_format
from kfp.pipeline_spec import pipeline_spec_pb2

from grade.core import config, store
from grade.core.errors import ConfigError
from pipeline import params, step_io

ROOT = Path(__file__).resolve().parent.parent
COMMITTED = ROOT / "pipeline.yaml"


@pytest.fixture(scope="module")
def compiled(tmp_path_factory):
    from pipeline.compile import compile_pipeline

    out = tmp_path_factory.mktemp("compile") / "pipeline.yaml"
    compile_pipeline(out)
    return out


@pytest.fixture(scope="module")
def docs(compiled):
    pipeline_doc, platform_doc = yaml.safe_load_all(compiled.read_text())
    return pipeline_doc, platform_doc


# ---------------------------------------------------------------------------------------------
# compile
# ---------------------------------------------------------------------------------------------

def test_compiled_spec_is_byte_identical_to_the_committed_one(compiled):
    assert compiled.read_bytes() == COMMITTED.read_bytes(), \
        "pipeline.yaml is stale: run `python -m pipeline.compile` and commit it"


def test_compiled_spec_parses_as_pipeline_and_platform_spec(docs):
    pipeline_doc, platform_doc = docs
    spec = json_format.ParseDict(pipeline_doc, pipeline_spec_pb2.PipelineSpec())
    assert spec.pipeline_info.name == "grade-mtf"
    platform = json_format.ParseDict(platform_doc, pipeline_spec_pb2.PlatformSpec())
    assert "kubernetes" in platform.platforms


def test_compiling_twice_gives_the_same_bytes(compiled, tmp_path):
    from pipeline.compile import main

    assert main(["--out", str(tmp_path / "again.yaml")]) == 0
    assert (tmp_path / "again.yaml").read_bytes() == compiled.read_bytes()


# ---------------------------------------------------------------------------------------------
# structure
# ---------------------------------------------------------------------------------------------

def _tasks(pipeline_doc):
    """(component name, task spec) of every task in every DAG."""
    out = [("root", t) for t in pipeline_doc["root"]["dag"]["tasks"].values()]
    for name, comp in pipeline_doc["components"].items():
        for t in comp.get("dag", {}).get("tasks", {}).values():
            out.append((name, t))
    return out


def test_parameters_cover_data_registry_sizes_hyperparameters_and_gate(docs):
    pipeline_doc, _ = docs
    inputs = pipeline_doc["root"]["inputDefinitions"]["parameters"]
    for name in ("raw_logs_uri", "registry_uri", "snapshot_date", "config_yaml", "run_ablations",
                 *(t.name for t in params.TUNABLES)):
        assert name in inputs, name
    defaults = params.defaults()
    for t in params.TUNABLES:
        assert inputs[t.name]["defaultValue"] == defaults[t.name], t.name
    assert inputs["raw_logs_uri"]["defaultValue"] == ""
    assert inputs["run_ablations"]["defaultValue"] is False
    assert inputs["pretrain_workers"]["defaultValue"] == inputs["finetune_workers"]["defaultValue"] == 1


def test_worker_counts_reach_the_training_tasks_and_only_them(docs):
    pipeline_doc, _ = docs
    fed = {}
    for _, task in _tasks(pipeline_doc):
        workers = task.get("inputs", {}).get("parameters", {}).get("workers")
        if workers is not None:
            fed[task["taskInfo"]["name"]] = workers["componentInputParameter"].removeprefix(
                "pipelinechannel--")
    assert fed and set(fed) == {"pretrain", "finetune"} | {f"finetune {n}" for n in params.ABLATIONS}
    assert fed["pretrain"] == "pretrain_workers"
    assert {v for k, v in fed.items() if k != "pretrain"} == {"finetune_workers"}


def test_simulate_only_runs_when_no_logs_are_given(docs):
    pipeline_doc, _ = docs
    conditions = {}
    for _, task in _tasks(pipeline_doc):
        cond = task.get("triggerPolicy", {}).get("condition")
        if cond:
            conditions[task["taskInfo"]["name"]] = cond
    assert conditions["simulated-logs"] == "inputs.parameter_values['pipelinechannel--raw_logs_uri'] == ''"
    assert conditions["given-logs"] == "!(inputs.parameter_values['pipelinechannel--raw_logs_uri'] == '')"
    assert "ablations" in conditions


def test_every_step_has_image_resources_and_the_s3_secret(docs):
    from pipeline.components import DEFAULT_IMAGE
    from pipeline.grade_pipeline import S3_SECRET, S3_SECRET_KEYS

    pipeline_doc, platform_doc = docs
    executors = pipeline_doc["deploymentSpec"]["executors"]
    secrets = platform_doc["platforms"]["kubernetes"]["deploymentSpec"]["executors"]
    assert set(secrets) == set(executors)
    for name, ex in executors.items():
        c = ex["container"]
        assert c["image"] == DEFAULT_IMAGE
        assert "pip install" not in json.dumps(c), "the image holds kfp: no install at task start"
        r = c["resources"]
        assert r["cpuRequest"] > 0 and r["memoryRequest"] > 0 and r["cpuLimit"] >= r["cpuRequest"]
        assert "accelerator" not in r, "no GPU unless compiled with --gpu"
        (secret,) = secrets[name]["secretAsEnv"]
        assert secret["secretName"] == S3_SECRET
        assert {k["secretKey"]: k["envVar"] for k in secret["keyToEnv"]} == S3_SECRET_KEYS


def test_no_credentials_in_the_spec(compiled, monkeypatch, tmp_path):
    from pipeline.compile import compile_pipeline

    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIA-must-not-leak")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "secret-must-not-leak")
    text = compile_pipeline(tmp_path / "p.yaml").read_text()
    assert "must-not-leak" not in text
    assert text == compiled.read_text(), "the environment must not change the spec"


def test_retries_caching_and_step_components(docs):
    pipeline_doc, _ = docs
    seen = {}
    for _, task in _tasks(pipeline_doc):
        comp = task["componentRef"]["name"].removeprefix("comp-")
        step = comp.rsplit("-", 1)[0] if comp[-1].isdigit() else comp
        seen.setdefault(step, []).append(task)
    for step in ("simulate", "features", "outcome", "pretrain", "finetune", "evaluate", "promote"):
        assert step in seen, step
        for task in seen[step]:
            retried = "retryPolicy" in task
            assert retried == (step in {"simulate", "features", "evaluate", "promote"}), step
            cached = task.get("cachingOptions", {}).get("enableCache", False)
            assert cached == (step not in {"evaluate", "promote"}), step
    # One fine-tuning for GRADE and one per ablation; evaluation of the ablations is its own task.
    finetunes = {t["taskInfo"]["name"] for t in seen["finetune"]}
    assert finetunes == {"finetune", *(f"finetune {a}" for a in params.ABLATIONS)}
    assert {t["taskInfo"]["name"] for t in seen["evaluate"]} == {"evaluate", "evaluate ablations"}
    assert len(seen["train-evaluate-promote"]) == 2


def test_every_finetune_and_evaluate_reads_the_one_value_model(docs):
    pipeline_doc, _ = docs
    readers = {}
    for _, task in _tasks(pipeline_doc):
        comp = task["componentRef"]["name"].removeprefix("comp-")
        if comp.rstrip("-0123456789") == "outcome":
            assert task["inputs"]["artifacts"]["features"]["componentInputArtifact"] == "features"
        if comp.rstrip("-0123456789") in {"finetune", "evaluate"}:
            source = task["inputs"]["artifacts"]["outcome"]
            readers[task["taskInfo"]["name"]] = (
                source["taskOutputArtifact"] if "taskOutputArtifact" in source
                else source["componentInputArtifact"])
    # Directly from the outcome task, or (inside the ablations' condition) its output passed down.
    via_task = {"producerTask": "outcome", "outputArtifactKey": "value_model"}
    assert set(readers) == {"finetune", "evaluate", "evaluate ablations",
                            *(f"finetune {a}" for a in params.ABLATIONS)}
    assert all(r in (via_task, "pipelinechannel--outcome-value_model") for r in readers.values()), readers
    assert readers["finetune"] == readers["evaluate"] == via_task


def test_evaluate_and_promote_outputs_are_typed(docs):
    pipeline_doc, _ = docs
    comps = pipeline_doc["components"]

    def outputs(comp):
        return {k: v["artifactType"]["schemaTitle"]
                for k, v in comps[comp]["outputDefinitions"]["artifacts"].items()}

    assert outputs("comp-simulate") == {"logs": "system.Dataset"}
    assert outputs("comp-features") == {"features": "system.Dataset"}
    assert outputs("comp-outcome") == {"value_model": "system.Model", "metrics": "system.Metrics"}
    assert outputs("comp-pretrain") == {"model": "system.Model", "metrics": "system.Metrics"}
    assert outputs("comp-finetune") == {"model": "system.Model", "metrics": "system.Metrics"}
    assert outputs("comp-evaluate") == {"report": "system.Artifact", "report_html": "system.HTML",
                                        "metrics": "system.Metrics", "summary": "system.Markdown"}
    assert outputs("comp-promote") == {"blessing": "system.Artifact", "summary": "system.Markdown"}


# ---------------------------------------------------------------------------------------------
# config merging
# ---------------------------------------------------------------------------------------------

def test_named_parameters_override_the_yaml_and_keep_other_keys():
    text = "finetune:\n  group_size: 8\n  lr: 0.01\n  reward:\n    post: 2.0\nsimulator:\n  n_users: 50\n"
    merged = params.merge(text, {"group_size": 4, "n_requests": 900})
    assert merged["finetune"] == {"group_size": 4, "lr": 0.01, "reward": {"post": 2.0}}
    assert merged["simulator"] == {"n_users": 50, "n_requests": 900}


def test_ablation_changes_merge_into_nested_sections(tmp_path):
    merged = params.merge("finetune:\n  reward:\n    prior: 0.5\n", {}, ablation="grade_prior_only")
    assert merged == {"finetune": {"reward": {"prior": 0.5}}, "ablation": {"preset": "grade_prior_only"}}
    path = params.write_step_config("finetune:\n  reward:\n    prior: 0.5\n    v_gmv: 2\n", {},
                                    ablation="grade_prior_only", directory=str(tmp_path))
    reward = config.load_section(path, "finetune").reward   # the preset's keys win over the file's
    assert (reward.post, reward.prior, reward.format, reward.v_gmv) == (0.0, 1.0, 0.0, 2.0)
    with pytest.raises(ConfigError, match="unknown ablation"):
        params.merge("", {}, ablation="grade_typo")


def test_bad_yaml_shapes_are_config_errors():
    with pytest.raises(ConfigError, match="mapping of sections"):
        params.merge("- a\n- b\n", {})
    with pytest.raises(ConfigError, match="'finetune' must be a mapping"):
        params.merge("finetune: 3\n", {"group_size": 4})


def test_step_config_file_is_what_the_step_loads(tmp_path):
    path = params.write_step_config("finetune:\n  lr: 0.01\n", {"group_size": 5, "kl_coef": 0.3},
                                    ablation="grade_fixed_kappa", directory=str(tmp_path))
    cfg = config.load_section(path, "finetune")
    assert (cfg.group_size, cfg.kl_coef, cfg.lr, cfg.adaptive_kappa) == (5, 0.3, 0.01, False)


def test_every_ablation_is_a_valid_finetune_config(tmp_path):
    for name in params.ABLATIONS:
        config.load_section(params.write_step_config("", {}, ablation=name, directory=str(tmp_path)),
                            "finetune")


def test_tunable_defaults_are_the_config_defaults():
    defaults = params.defaults()
    for t in params.TUNABLES:
        assert defaults[t.name] == getattr(config.build(config.section_class(t.section), {}), t.key)


def test_arguments_from_config_reads_values_and_text(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("simulator:\n  n_requests: 777\n")
    args = params.arguments_from_config(str(p))
    assert args["config_yaml"] == p.read_text() and args["n_requests"] == 777
    assert params.arguments_from_config(None)["config_yaml"] == ""


# ---------------------------------------------------------------------------------------------
# metrics and summaries
# ---------------------------------------------------------------------------------------------

class Recorder:
    def __init__(self):
        self.logged = {}

    def log_metric(self, name, value):
        self.logged[name] = value


def test_kfp_shaped_metrics_are_taken_as_they_are(tmp_path):
    p = tmp_path / "metrics.json"
    p.write_text(json.dumps({"metrics": [{"name": "grade-true-opm", "numberValue": 1.5, "format": "RAW"},
                                         {"name": "n/a", "numberValue": float("nan")}]}))
    rec = Recorder()
    assert step_io.log_metrics_file(rec, p) == {"grade-true-opm": 1.5}
    assert rec.logged == {"grade-true-opm": 1.5}


def test_nested_metrics_are_flattened_with_the_last_epoch():
    data = {"best_epoch": 3, "early_stopped": True, "stage": "pretrain",
            "best": {"order": 0.25, "click": 0.5},
            "epochs": [{"epoch": 1, "train_loss": 2.0}, {"epoch": 2, "train_loss": 1.5, "valid ndcg": 0.75}]}
    assert step_io.scalar_metrics(data) == {
        "best-click": 0.5, "best-order": 0.25, "best_epoch": 3.0,
        "epochs-last-epoch": 2.0, "epochs-last-train_loss": 1.5, "epochs-last-valid-ndcg": 0.75}


def test_missing_metrics_file_logs_nothing(tmp_path):
    rec = Recorder()
    assert step_io.log_metrics_file(rec, tmp_path / "none.json") == {} and rec.logged == {}


def test_report_markdown_lists_lifts_with_intervals():
    report = {"n_requests": 300, "primary_flavour": "true", "primary_metric": "opm",
              "lift_vs_static": {"grade": {"true": {"opm": {"lift": 0.021, "ci_low": 0.015,
                                                            "ci_high": 0.027}}}}}
    md = step_io.report_markdown(report)
    assert "300 held-out requests" in md
    assert "| grade | +2.10% [+1.50%, +2.70%] | n/a | n/a | n/a |" in md


def test_step_failure_raises_with_the_status():
    def main(argv):
        return 3

    with pytest.raises(step_io.StepFailed, match="exited with status 3"):
        step_io.run_step("simulate", main, ["--out", "x"])


# ---------------------------------------------------------------------------------------------
# local runner arguments
# ---------------------------------------------------------------------------------------------

def test_s3_store_without_endpoint_is_bad_input(tmp_path, monkeypatch, capsys):
    import grade.core.cli
    from pipeline import run_local

    monkeypatch.delenv("S3_ENDPOINT_URL", raising=False)
    rc = grade.core.cli.run(run_local.main, ["--out", str(tmp_path / "o"), "--store", "s3://bucket/x"])
    assert rc == 2 and "S3_ENDPOINT_URL" in capsys.readouterr().err


def _tiny_report(policies, **extra):
    return {"n_requests": 10, "split": "test", "primary_flavour": "true", "primary_metric": "opm",
            "exposure_depth": 10, "config": {"confidence": 0.95, "bootstrap_samples": 50},
            "headroom_sentence": "", "policies": {p: {"true": {"opm": 1.0}} for p in policies},
            "lift_vs_static": {}, **extra}


def test_find_outputs_tells_the_main_report_from_the_ablations(tmp_path):
    from pipeline.run_local import find_outputs

    run = tmp_path / "grade-mtf-2026"
    for task, policies in (("evaluate", ["static", "grade"]), ("evaluate-2", ["static", "grade_gaussian"])):
        (run / task / "report").mkdir(parents=True)
        (run / task / "report" / "report.json").write_text(
            json.dumps({"policies": dict.fromkeys(policies, {})}))
    (run / "promote").mkdir()
    (run / "promote" / "blessing").write_text("{}")
    found = find_outputs(run)
    assert found == {"report": run / "evaluate" / "report", "ablations": run / "evaluate-2" / "report",
                     "blessing": run / "promote" / "blessing"}
    with pytest.raises(RuntimeError, match="no evaluation report"):
        find_outputs(tmp_path / "empty")


def test_summary_shows_lifts_vs_the_incumbent_and_the_verdict():
    from pipeline.run_local import summary

    report = _tiny_report(["static", "grade", "incumbent"], lift_vs_incumbent={
        "grade": {"true": {"opm": {"lift": 0.004, "ci_low": 0.001, "ci_high": 0.007}}}})
    text = summary(report, _blessing(verdict="not blessed",
                                     reasons=["guardrail true/ctr: lift -0.013 below -0.005"]))
    assert "grade vs incumbent: OPM +0.40% [+0.10, +0.70]" in text
    assert "promotion: not blessed\n  - guardrail true/ctr: lift -0.013 below -0.005" in text


def _blessing(**fields):
    """A blessing as blessing.json holds it (read back through the typed record)."""
    from grade.release.blessing import Blessing

    doc = {"candidate": "grade", "candidate_uri": "/m", "candidate_content_hash": "ab" * 32, "report": "/r",
           "registry": "/reg", "model_name": "grade-mtf", "thresholds": {"min_lift": 0.0, "guardrails": {}},
           "incumbent_version": None, "primary": "true/opm", "baseline": "static", "verdict": "not blessed",
           "blessed": False, "promoted": False, "checks": [], "reasons": [], **fields}
    return Blessing.from_json(doc)


def test_blessing_markdown_lists_checks():
    checks = [{"name": "true/opm lift ci_low", "value": 0.0123, "threshold": "> 0.0", "passed": True},
              {"name": "true/ctr", "value": None, "threshold": ">= -0.005", "passed": False}]
    md = step_io.blessing_markdown(_blessing(verdict="promoted", blessed=True, promoted=True, checks=checks,
                                             reasons=["missing metric true/ctr"]))
    assert md.startswith("### Promotion: **promoted**")
    assert "| true/opm lift ci_low | +0.0123 | > 0.0 | yes |" in md
    assert "| true/ctr | missing | >= -0.005 | no |" in md
    assert "- missing metric true/ctr" in md


def test_missing_local_logs_are_bad_input(tmp_path, capsys):
    import grade.core.cli
    from pipeline import run_local

    rc = grade.core.cli.run(run_local.main,
                            ["--out", str(tmp_path / "o"), "--logs", str(tmp_path / "nothing")])
    assert rc == 2 and "no such file or folder" in capsys.readouterr().err


def test_a_failing_task_fails_the_run_with_its_name(tmp_path, capsys):
    from pipeline import run_local

    (tmp_path / "empty-logs").mkdir()
    rc = run_local.main(["--out", str(tmp_path / "o"), "--logs", str(tmp_path / "empty-logs")])
    captured = capsys.readouterr()
    assert rc == 1
    assert "Inner task failed: 'features" in captured.err and "\x1b[" not in captured.err
    # The terminal shows the steps; the task's own message comes from the end of the runner log.
    assert "step features-2: failure" in captured.out and "Task 'features-2' outputs" not in captured.out
    assert "empty input" in captured.err
    log = next((tmp_path / "o" / "_work" / "logs").glob("run-*.log"))
    assert str(log) in captured.err and "empty input" in log.read_text()
    assert not (tmp_path / "o" / "report.json").exists()


def test_simulated_logs_on_s3_are_written_once_per_simulator_config(s3_env, tmp_path):
    from pipeline.run_local import simulated_logs

    cfg = tmp_path / "c.yaml"
    cfg.write_text("simulator:\n  n_requests: 120\n  n_users: 50\n  n_items: 500\n  list_size: 8\n"
                   "evaluate:\n  seed: 1\n")
    uri = simulated_logs(f"{s3_env}/store", str(cfg))
    assert uri.startswith(f"{s3_env}/store/logs/simulated-") and store.is_published(uri)
    manifest = store.read_manifest(uri)
    assert simulated_logs(f"{s3_env}/store", str(cfg)) == uri
    assert store.read_manifest(uri) == manifest
    # Other sections do not matter; another simulator key does.
    cfg.write_text(cfg.read_text().replace("evaluate:\n  seed: 1", "evaluate:\n  seed: 2"))
    assert simulated_logs(f"{s3_env}/store", str(cfg)) == uri
    cfg.write_text(cfg.read_text().replace("n_requests: 120", "n_requests: 130"))
    assert simulated_logs(f"{s3_env}/store", str(cfg)) != uri


# ---------------------------------------------------------------------------------------------
# the image and the compose file (no Docker engine here: checked as text)
# ---------------------------------------------------------------------------------------------

def test_dockerfile_builds_the_project_on_slim_python_with_cpu_torch_as_non_root():
    import re

    text = (ROOT / "containers" / "Dockerfile").read_text()
    args = dict(re.findall(r"^ARG (\w+)=(\S+)$", text, re.M))
    # Both stages start from the build argument, whose default is slim Python 3.11.
    assert args["BASE_IMAGE"] == "python:3.11-slim"
    assert re.findall(r"^FROM (\S+)", text, re.M) == ["${BASE_IMAGE}", "${BASE_IMAGE}"]
    assert args["TORCH_INDEX"] == "https://download.pytorch.org/whl/cpu"
    # The image's torch satisfies the project's torch range (else pip would fetch another build).
    pyproject = (ROOT / "pyproject.toml").read_text()
    low, high = re.search(r'"torch>=([\d.]+),<([\d.]+)"', pyproject).groups()

    def version(v):
        return tuple(int(x) for x in v.split("."))

    assert version(low) <= version(args["TORCH_VERSION"]) < version(high)
    users = re.findall(r"^USER (\S+)$", text, re.M)
    assert users and users[-1].split(":")[0] not in ("root", "0")
    ignored = (ROOT / ".dockerignore").read_text().splitlines()
    for src in re.findall(r"^COPY (?!--from)(.+) \S+$", text, re.M):
        for name in src.split():
            assert (ROOT / name).exists(), name
            assert f"!{name}" in ignored or f"!{name}/" in ignored, f"{name} is not sent to the build"


def test_compose_starts_minio_and_creates_the_bucket():
    compose = yaml.safe_load((ROOT / "containers" / "compose.yaml").read_text())
    services = compose["services"]
    assert services["minio"]["image"].startswith("minio/minio:")
    assert "9000:9000" in services["minio"]["ports"]
    init = services["create-bucket"]
    assert init["depends_on"]["minio"]["condition"] == "service_healthy"
    assert "mc mb --ignore-existing" in " ".join(init["command"])
