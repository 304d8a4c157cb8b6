"""The KFP v2 components of the grade-mtf pipeline: one thin containerised call per step.

Each body imports ``components.<step>`` inside the image and calls its ``main([...])`` with the
task's artifact paths as ``--out`` / inputs; a task's YAML config is the pipeline's ``config_yaml``
with the tunable parameters merged over it (see :mod:`pipeline.params`).

The image is the project image built from ``containers/Dockerfile``; override it with the
``GRADE_IMAGE`` environment variable at compile time (``python -m pipeline.compile --image``).
The image already holds kfp, so ``install_kfp_package=False`` (no pip install when a task starts).
"""

# No `from __future__ import annotations`: KFP reads the artifact annotations as real types.
import os
from typing import NamedTuple

from kfp import dsl
from kfp.dsl import HTML, Artifact, Dataset, Input, Markdown, Metrics, Model, Output

#: The component image when GRADE_IMAGE is not set: build and push it from containers/.
DEFAULT_IMAGE = "ghcr.io/grade-mtf/grade-mtf:0.1.0"
IMAGE = os.environ.get("GRADE_IMAGE", DEFAULT_IMAGE)


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def simulate(config_yaml: str, n_requests: int, seed: int, list_size: int, snapshot_date: str,
             logs: Output[Dataset]):
    """Simulated marketplace search logs (Parquet) with ground truth."""
    from components.simulate import main
    from pipeline.params import write_step_config
    from pipeline.step_io import run_step

    cfg = write_step_config(config_yaml, {"n_requests": n_requests, "seed": seed, "list_size": list_size})
    run_step("simulate", main, ["--out", logs.path, "--config", cfg])
    logs.metadata.update({"snapshot_date": snapshot_date, "n_requests": n_requests, "seed": seed})


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def window(logs_uri: str, window_days: int, schedule_time: str,
           backend_schedule_time: str) -> NamedTuple("Window", [("partitions", str), ("description", str)]):
    """The run's data window: the partitions of a ``{date}`` pattern for the ``window_days`` days up to
    the schedule time (``schedule_time`` when given, else the backend's); a plain URI passes through."""
    import json
    import tempfile

    from components.window import main
    from grade.data import window
    from pipeline.step_io import run_step

    if not window.is_partitioned(logs_uri):
        return json.dumps([logs_uri]), logs_uri
    with tempfile.TemporaryDirectory(prefix="grade-window-") as tmp:
        out = f"{tmp}/window.json"
        run_step("window", main, ["--logs", logs_uri, "--window-days", str(window_days),
                                  "--schedule-time", schedule_time or backend_schedule_time, "--out", out])
        resolved = json.loads(open(out).read())
    return json.dumps(resolved["present"]), resolved["describe"]


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def features(config_yaml: str, snapshot_date: str, features: Output[Dataset],
             logs: Input[Dataset] | None = None, logs_uris: str = "", data_uri: str = ""):
    """Validated, time-split request tensors from the logs artifact or from given URIs (a JSON list:
    a data window's partitions, part of the cache key); ``data_uri`` describes them in the metadata."""
    import json

    from components.features import main
    from grade.core import store
    from pipeline.params import write_step_config
    from pipeline.step_io import run_step

    sources = [logs.path] if logs is not None else json.loads(logs_uris or "[]")
    if not sources:
        raise ValueError("features: neither a logs artifact nor logs URIs were given")
    cfg = write_step_config(config_yaml)
    run_step("features", main, ["--logs", *sources, "--out", features.path, "--config", cfg])
    spec = store.read_json(store.join(features.path, "feature_spec.json"))
    features.metadata.update({
        "snapshot_date": snapshot_date, "logs": data_uri or "simulated",
        "content_hash": store.content_hash(features.path),
        **{f"{split}_requests": info.get("n_requests") for split, info in spec.get("splits", {}).items()},
    })


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def outcome(features: Input[Dataset], config_yaml: str, value_model: Output[Model], metrics: Output[Metrics]):
    """Value model: the examination curve estimated from the logs and the outcome model on train."""
    from components.outcome import main
    from grade.core import store
    from pipeline.params import write_step_config
    from pipeline.step_io import log_metrics_file, run_step

    run_step("outcome", main, ["--features", features.path, "--out", value_model.path,
                               "--config", write_step_config(config_yaml)])
    log_metrics_file(metrics, store.join(value_model.path, "metrics.json"))
    exam = store.read_json(store.join(value_model.path, "examination.json"))
    value_model.metadata.update({"examination": exam.get("method"), "eta": exam.get("eta"),
                                 "content_hash": store.content_hash(value_model.path)})


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def pretrain(features: Input[Dataset], config_yaml: str, pretrain_epochs: int,
             model: Output[Model], metrics: Output[Metrics], workers: int = 1):
    """Stage 1: LambdaLoss pretraining of the policy mean (data-parallel on ``workers`` processes)."""
    from components.pretrain import main
    from grade.core import store
    from pipeline.params import write_step_config
    from pipeline.step_io import log_metrics_file, run_training_step

    cfg = write_step_config(config_yaml, {"pretrain_epochs": pretrain_epochs})
    run_training_step("pretrain", main, ["--features", features.path, "--out", model.path, "--config", cfg],
                      workers)
    log_metrics_file(metrics, store.join(model.path, "metrics.json"))
    model.metadata.update({"stage": "stage1", "content_hash": store.content_hash(model.path)})


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def finetune(features: Input[Dataset], init: Input[Model], outcome: Input[Model], config_yaml: str,
             finetune_epochs: int, group_size: int, kl_coef: float, model: Output[Model],
             metrics: Output[Metrics], ablation: str = "", workers: int = 1):
    """Stage 2: GRPO with adaptive Dirichlet exploration (or one of the ablations), on ``workers``
    processes."""
    from components.finetune import main
    from grade.core import store
    from pipeline.params import write_step_config
    from pipeline.step_io import log_metrics_file, run_training_step

    cfg = write_step_config(config_yaml, {"finetune_epochs": finetune_epochs, "group_size": group_size,
                                          "kl_coef": kl_coef}, ablation=ablation)
    run_training_step("finetune", main, ["--features", features.path, "--init", init.path,
                                         "--outcome", outcome.path, "--out", model.path, "--config", cfg],
                      workers)
    log_metrics_file(metrics, store.join(model.path, "metrics.json"))
    model.metadata.update({"stage": ablation or "grade", "content_hash": store.content_hash(model.path)})


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def evaluate(features: Input[Dataset], stage1: Input[Model], grade: Input[Model], outcome: Input[Model],
             config_yaml: str, registry_uri: str, report: Output[Artifact], report_html: Output[HTML],
             metrics: Output[Metrics], summary: Output[Markdown],
             grade_gaussian: Input[Model] | None = None,
             grade_fixed_kappa: Input[Model] | None = None,
             grade_posterior_only: Input[Model] | None = None,
             grade_prior_only: Input[Model] | None = None,
             grade_ips: Input[Model] | None = None,
             grade_snips: Input[Model] | None = None,
             grade_switch: Input[Model] | None = None,
             grade_shrunk: Input[Model] | None = None,
             grade_dcg_ips: Input[Model] | None = None,
             grade_guard_prices: Input[Model] | None = None):
    """Offline auction of every policy (and the registry's incumbent) on the held-out requests."""
    import shutil

    from components.evaluate import main
    from grade.core import store
    from pipeline.params import write_step_config
    from pipeline.step_io import log_metrics_file, report_markdown, run_step

    models = {"stage1": stage1, "grade": grade, "grade_gaussian": grade_gaussian,
              "grade_fixed_kappa": grade_fixed_kappa, "grade_posterior_only": grade_posterior_only,
              "grade_prior_only": grade_prior_only, "grade_ips": grade_ips, "grade_snips": grade_snips,
              "grade_switch": grade_switch, "grade_shrunk": grade_shrunk, "grade_dcg_ips": grade_dcg_ips,
              "grade_guard_prices": grade_guard_prices}
    argv = ["--features", features.path, "--outcome", outcome.path, "--out", report.path,
            "--config", write_step_config(config_yaml)]
    for name, artifact in models.items():
        if artifact is not None:
            argv += ["--model", f"{name}={artifact.path}"]
    if registry_uri:
        argv += ["--registry", registry_uri]
    run_step("evaluate", main, argv)
    shutil.copyfile(store.join(report.path, "report.html"), report_html.path)
    log_metrics_file(metrics, store.join(report.path, "metrics.json"))
    result = store.read_json(store.join(report.path, "report.json"))
    with open(summary.path, "w") as f:
        f.write(report_markdown(result))
    report.metadata.update({"n_requests": result.get("n_requests"),
                            "primary_metric": result.get("primary_metric")})


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def promote(report: Input[Artifact], candidate: Input[Model], registry_uri: str, config_yaml: str,
            min_primary_lift: float, data_uri: str, snapshot_date: str, blessing: Output[Artifact],
            summary: Output[Markdown]):
    """Gate the candidate against the production model; register it and move the alias when blessed."""
    from components.promote import main
    from grade.core import store
    from grade.release.blessing import Blessing
    from pipeline.params import write_step_config
    from pipeline.step_io import blessing_markdown, run_step

    cfg = write_step_config(config_yaml, {"min_primary_lift": min_primary_lift})
    run_step("promote", main, ["--report", report.path, "--candidate", candidate.path,
                               "--registry", registry_uri, "--candidate-name", "grade",
                               "--blessing", blessing.path, "--config", cfg,
                               "--data", f"{data_uri}@{snapshot_date}" if snapshot_date else data_uri])
    result = Blessing.from_json(store.read_json(blessing.path), blessing.path)
    with open(summary.path, "w") as f:
        f.write(blessing_markdown(result))
    blessing.metadata.update({"verdict": result.verdict})
