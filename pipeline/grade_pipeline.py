"""The ``grade-mtf`` pipeline: [simulate] -> features -> outcome -> pretrain -> finetune -> evaluate
-> promote.

The outcome step fits the value model (examination curve, outcome model) once per features; the
fine-tunings' reward and every evaluation read that one model (``--outcome``), so they agree on
what a ranking is worth.

When ``raw_logs_uri`` is empty the logs are simulated, otherwise read from that URI (a folder or
``s3://`` prefix of Parquet). Both branches run the same sub-pipeline ``train-evaluate-promote``
on their features (KFP's local runner cannot join artifacts of two branches with ``dsl.OneOf``).

Cluster settings, ignored by the local runner: CPU/memory per step, an optional GPU for the two
training steps (compile option), retries on the I/O-bound steps, caching except where the result
depends on the registry's state, and S3 credentials from a Kubernetes Secret (never in the spec).
"""


from dataclasses import dataclass

from kfp import dsl, kubernetes
from kfp.dsl import Dataset, Input

from pipeline import components as c
from pipeline import params

PIPELINE_NAME = "grade-mtf"
PIPELINE_DESCRIPTION = ("GRADE personalised multi-task fusion: LambdaLoss pretraining, GRPO with adaptive "
                        "Dirichlet exploration, offline auction evaluation and gated promotion")

#: The Kubernetes Secret with the object store's endpoint and credentials (same namespace as the run).
S3_SECRET = "grade-s3"
#: secret key -> environment variable read by grade.core.store.
S3_SECRET_KEYS = {"S3_ENDPOINT_URL": "S3_ENDPOINT_URL", "AWS_ACCESS_KEY_ID": "AWS_ACCESS_KEY_ID",
                  "AWS_SECRET_ACCESS_KEY": "AWS_SECRET_ACCESS_KEY"}
#: The registry root the compiled pipeline uses unless a run says otherwise.
DEFAULT_REGISTRY = "s3://grade/registry"


@dataclass(frozen=True)
class Resources:
    cpu: str
    memory: str
    cpu_limit: str
    memory_limit: str


#: Requests and limits per step (training dominates; evaluation holds the test split in memory).
RESOURCES = {
    "simulate": Resources("1", "2Gi", "2", "4Gi"),
    "features": Resources("1", "4Gi", "2", "8Gi"),
    "outcome": Resources("1", "4Gi", "2", "8Gi"),
    "pretrain": Resources("2", "4Gi", "4", "8Gi"),
    "finetune": Resources("2", "4Gi", "4", "8Gi"),
    "evaluate": Resources("2", "4Gi", "4", "8Gi"),
    "promote": Resources("500m", "1Gi", "1", "2Gi"),
    "window": Resources("100m", "256Mi", "500m", "512Mi"),
}
#: Steps that mostly move data: a transient store or network error is retried.
RETRIED = {"simulate", "features", "evaluate", "promote", "window"}
#: Steps whose result depends on the registry's current production model, or on the time and on which
#: partitions have landed (the window): never served from cache.
NOT_CACHED = {"evaluate", "promote", "window"}
TRAINING = {"pretrain", "finetune"}


def build_pipeline(gpu: bool = False, s3_secret: str = S3_SECRET, image: str | None = None,
                   retries: bool = True, backend_schedule_time: bool = True):
    """The pipeline function. ``gpu`` adds one NVIDIA GPU to each training step; ``image`` replaces
    the components' image (default: ``pipeline.components.IMAGE``); ``s3_secret`` names the Secret;
    ``retries=False`` drops the task retries (local runs: the local runner would wait out the
    backoff, and the object store already retries transient errors itself);
    ``backend_schedule_time=False`` leaves out the schedule time placeholder (KFP's local runner
    fails on it; the window step then uses the current time unless ``schedule_time`` is given)."""
    schedule_placeholder = dsl.PIPELINE_JOB_SCHEDULE_TIME_UTC_PLACEHOLDER if backend_schedule_time else ""
    defaults = params.defaults()

    def configure(task, step: str, display_name: str | None = None):
        r = RESOURCES[step]
        task.set_cpu_request(r.cpu).set_cpu_limit(r.cpu_limit)
        task.set_memory_request(r.memory).set_memory_limit(r.memory_limit)
        if retries and step in RETRIED:
            task.set_retry(num_retries=2, backoff_duration="30s", backoff_factor=2.0,
                           backoff_max_duration="300s")
        task.set_caching_options(step not in NOT_CACHED)
        if gpu and step in TRAINING:
            task.set_accelerator_type("nvidia.com/gpu").set_accelerator_limit(1)
        kubernetes.use_secret_as_env(task, secret_name=s3_secret, secret_key_to_env=S3_SECRET_KEYS)
        if image:
            task.set_container_image(image)
        task.set_display_name(display_name or step)
        return task

    @dsl.pipeline(name="train-evaluate-promote",
                  description="Value model, Stage 1, Stage 2, offline auction against the incumbent, "
                              "promotion gate")
    def train_evaluate_promote(features: Input[Dataset], data_uri: str, snapshot_date: str,
                               config_yaml: str, registry_uri: str,
                               pretrain_epochs: int, finetune_epochs: int, group_size: int,
                               kl_coef: float, min_primary_lift: float, run_ablations: bool,
                               pretrain_workers: int, finetune_workers: int):
        value_model = configure(c.outcome(features=features, config_yaml=config_yaml), "outcome")
        outcome = value_model.outputs["value_model"]
        stage1 = configure(c.pretrain(features=features, config_yaml=config_yaml,
                                      pretrain_epochs=pretrain_epochs, workers=pretrain_workers), "pretrain")
        tuning = {"config_yaml": config_yaml, "finetune_epochs": finetune_epochs, "outcome": outcome,
                  "group_size": group_size, "kl_coef": kl_coef, "workers": finetune_workers}
        grade = configure(c.finetune(features=features, init=stage1.outputs["model"], **tuning), "finetune")
        evaluation = configure(c.evaluate(features=features, stage1=stage1.outputs["model"],
                                          grade=grade.outputs["model"], outcome=outcome,
                                          config_yaml=config_yaml, registry_uri=registry_uri), "evaluate")
        configure(c.promote(report=evaluation.outputs["report"], candidate=grade.outputs["model"],
                            registry_uri=registry_uri, config_yaml=config_yaml,
                            min_primary_lift=min_primary_lift, data_uri=data_uri,
                            snapshot_date=snapshot_date), "promote")
        # Ablations get their own report: the promotion decision never waits for them.
        with dsl.If(run_ablations == True, name="ablations"):  # noqa: E712 (a pipeline condition)
            variants = {
                name: configure(c.finetune(features=features, init=stage1.outputs["model"],
                                           ablation=name, **tuning), "finetune", f"finetune {name}")
                for name in params.ABLATIONS
            }
            configure(c.evaluate(features=features, stage1=stage1.outputs["model"],
                                 grade=grade.outputs["model"], outcome=outcome, config_yaml=config_yaml,
                                 registry_uri="",
                                 **{name: t.outputs["model"] for name, t in variants.items()}),
                      "evaluate", "evaluate ablations")

    @dsl.pipeline(name=PIPELINE_NAME, description=PIPELINE_DESCRIPTION)
    def grade_mtf(
        raw_logs_uri: str = "",
        registry_uri: str = DEFAULT_REGISTRY,
        snapshot_date: str = "",
        config_yaml: str = "",
        n_requests: int = int(defaults["n_requests"]),
        seed: int = int(defaults["seed"]),
        list_size: int = int(defaults["list_size"]),
        pretrain_epochs: int = int(defaults["pretrain_epochs"]),
        finetune_epochs: int = int(defaults["finetune_epochs"]),
        group_size: int = int(defaults["group_size"]),
        kl_coef: float = float(defaults["kl_coef"]),
        min_primary_lift: float = float(defaults["min_primary_lift"]),
        run_ablations: bool = False,
        pretrain_workers: int = 1,
        finetune_workers: int = 1,
        window_days: int = 7,
        schedule_time: str = "",
    ):
        """raw_logs_uri: Parquet logs to train on ('' = simulate), or a daily partition pattern with a
        {date} field (e.g. s3://grade/logs/dt={date}): then the window_days days up to the schedule
        time (schedule_time when given, else the run's schedule time from the backend); snapshot_date:
        the data's date (part of every cache key); config_yaml: the whole YAML config; *_workers:
        data-parallel processes of a training step (torchrun in its pod); the rest override the
        config's keys."""
        downstream = {"snapshot_date": snapshot_date, "config_yaml": config_yaml,
                      "registry_uri": registry_uri, "pretrain_epochs": pretrain_epochs,
                      "finetune_epochs": finetune_epochs, "group_size": group_size, "kl_coef": kl_coef,
                      "min_primary_lift": min_primary_lift, "run_ablations": run_ablations,
                      "pretrain_workers": pretrain_workers, "finetune_workers": finetune_workers}
        with dsl.If(raw_logs_uri == "", name="simulated-logs"):
            logs = configure(c.simulate(config_yaml=config_yaml, n_requests=n_requests, seed=seed,
                                        list_size=list_size, snapshot_date=snapshot_date), "simulate")
            feats = configure(c.features(config_yaml=config_yaml, snapshot_date=snapshot_date,
                                         logs=logs.outputs["logs"]), "features")
            train_evaluate_promote(features=feats.outputs["features"], data_uri="simulated", **downstream)
        with dsl.Else(name="given-logs"):
            # The window (never cached) resolves the dates; its partitions are the features' cache key.
            span = configure(c.window(logs_uri=raw_logs_uri, window_days=window_days,
                                      schedule_time=schedule_time,
                                      backend_schedule_time=schedule_placeholder), "window")
            feats = configure(c.features(config_yaml=config_yaml, snapshot_date=snapshot_date,
                                         logs_uris=span.outputs["partitions"],
                                         data_uri=span.outputs["description"]), "features")
            train_evaluate_promote(features=feats.outputs["features"], data_uri=span.outputs["description"],
                                   **downstream)

    return grade_mtf
