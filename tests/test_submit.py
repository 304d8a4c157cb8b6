"""pipeline.submit against a recording stand-in for kfp.Client (no KFP server runs here)."""

import hashlib
import json
from types import SimpleNamespace

import kfp
import pytest
import yaml

from grade.core.errors import InputError
from pipeline import params, submit


class FakeClient:
    """Records every call; knows pipelines by name and versions by display name."""

    instances: list["FakeClient"] = []

    def __init__(self, host=None, namespace="kubeflow", existing_token=None, **kwargs):
        self.host, self.namespace, self.token = host, namespace, existing_token
        self.calls: list[tuple[str, dict]] = []
        self.pipelines: dict[str, str] = {}
        self.versions: dict[str, list[tuple[str, str]]] = {}  # pipeline id -> [(name, id)]
        FakeClient.instances.append(self)

    def get_pipeline_id(self, name):
        self.calls.append(("get_pipeline_id", {"name": name}))
        return self.pipelines.get(name)

    def upload_pipeline(self, pipeline_package_path, pipeline_name=None, description=None, namespace=None):
        self.calls.append(("upload_pipeline", {"path": pipeline_package_path, "name": pipeline_name}))
        pid = f"p{len(self.pipelines) + 1}"
        self.pipelines[pipeline_name] = pid
        self.versions[pid] = [(pipeline_name, f"{pid}-v1")]
        return SimpleNamespace(pipeline_id=pid)

    def list_pipeline_versions(self, pipeline_id, page_token="", page_size=10, sort_by="", filter=None):
        self.calls.append(("list_pipeline_versions", {"pipeline_id": pipeline_id, "filter": filter,
                                                      "sort_by": sort_by}))
        versions = list(self.versions.get(pipeline_id, []))
        if filter:
            wanted = json.loads(filter)["predicates"][0]["string_value"]
            versions = [v for v in versions if v[0] == wanted]
        if sort_by == "created_at desc":
            versions = versions[::-1]
        return SimpleNamespace(pipeline_versions=[SimpleNamespace(display_name=n, pipeline_version_id=i)
                                                  for n, i in versions[:page_size]])

    def upload_pipeline_version(self, pipeline_package_path, pipeline_version_name, pipeline_id=None,
                                pipeline_name=None, description=None):
        self.calls.append(("upload_pipeline_version", {"path": pipeline_package_path,
                                                       "name": pipeline_version_name,
                                                       "pipeline_id": pipeline_id}))
        vid = f"{pipeline_id}-v{len(self.versions[pipeline_id]) + 1}"
        self.versions[pipeline_id].append((pipeline_version_name, vid))
        return SimpleNamespace(pipeline_version_id=vid)

    def create_experiment(self, name, description=None, namespace=None):
        self.calls.append(("create_experiment", {"name": name, "namespace": namespace}))
        return SimpleNamespace(experiment_id=f"e-{name}")

    def run_pipeline(self, **kwargs):
        self.calls.append(("run_pipeline", kwargs))
        return SimpleNamespace(run_id="r1")

    def create_recurring_run(self, **kwargs):
        self.calls.append(("create_recurring_run", kwargs))
        return SimpleNamespace(recurring_run_id="rr1")

    def called(self, name):
        return [kw for n, kw in self.calls if n == name]


@pytest.fixture
def fake_kfp(monkeypatch):
    FakeClient.instances = []
    monkeypatch.setattr(kfp, "Client", FakeClient)
    return FakeClient


@pytest.fixture
def package(tmp_path):
    p = tmp_path / "spec.yaml"
    p.write_text("pipelineInfo:\n  name: grade-mtf\n")
    return p


@pytest.fixture
def config_file(tmp_path):
    p = tmp_path / "config.yaml"
    p.write_text("simulator:\n  n_requests: 1234\n  seed: 7\nfinetune:\n  group_size: 4\n  kl_coef: 0.5\n")
    return p


# ---------------------------------------------------------------------------------------------
# cron
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("cron", ["0 0 3 * * *", "*/30 15 2 1-15 JAN-MAR MON,FRI", "0 0 0 ? * SUN",
                                  "0 5,35 */6 * * 1-5", "59 59 23 31 12 6"])
def test_valid_cron_expressions_pass(cron):
    assert submit.validate_cron(cron) == cron


@pytest.mark.parametrize("cron, words", [
    ("0 3 * * *", ["6 fields", "got 5", "prepend '0 '"]),
    ("0 0 3 * * * *", ["6 fields", "got 7"]),
    ("60 0 3 * * *", ["seconds", "60 is outside 0-59"]),
    ("0 0 24 * * *", ["hours", "24 is outside 0-23"]),
    ("0 0 0 0 * *", ["day of month", "0 is outside 1-31"]),
    ("0 0 5-1 * * *", ["hours", "low to high"]),
    ("0 0 */0 * * *", ["hours", "positive integer"]),
    ("0 0 x * * *", ["hours", "expected a number"]),
    ("0 0 0 * FOO *", ["month", "JAN/FEB"]),
    ("0 0 0 * * 7", ["day of week", "7 is outside 0-6"]),
    ("0 ? 0 * * *", ["minutes", "expected a number"]),
])
def test_invalid_cron_expressions_name_the_field(cron, words):
    with pytest.raises(InputError) as e:
        submit.validate_cron(cron)
    for w in words:
        assert w in str(e.value)


# ---------------------------------------------------------------------------------------------
# upload
# ---------------------------------------------------------------------------------------------

def test_first_upload_creates_the_pipeline_and_uses_its_version(package):
    client = FakeClient()
    pid, vid = submit.upload(client, package, "grade-mtf")
    assert (pid, vid) == ("p1", "p1-v1")
    assert [c["name"] for c in client.called("upload_pipeline")] == ["grade-mtf"]
    assert client.called("upload_pipeline_version") == []


def test_existing_pipeline_gets_a_content_named_version_once(package, tmp_path):
    client = FakeClient()
    submit.upload(client, package, "grade-mtf")
    pid, vid = submit.upload(client, package, "grade-mtf")
    digest = hashlib.sha256(package.read_bytes()).hexdigest()[:12]
    assert pid == "p1" and vid == "p1-v2"
    assert client.called("upload_pipeline_version")[0]["name"] == f"grade-mtf-{digest}"
    # The same spec again: the version exists, nothing is uploaded.
    assert submit.upload(client, package, "grade-mtf") == ("p1", "p1-v2")
    assert len(client.called("upload_pipeline_version")) == 1
    # A changed spec: a new version.
    package.write_text(package.read_text() + "# changed\n")
    assert submit.upload(client, package, "grade-mtf") == ("p1", "p1-v3")
    assert len(client.called("upload_pipeline")) == 1


# ---------------------------------------------------------------------------------------------
# the command line
# ---------------------------------------------------------------------------------------------

def test_upload_only_starts_nothing(fake_kfp, package, capsys):
    assert submit.main(["--host", "http://kfp:8080", "--package", str(package)]) == 0
    (client,) = fake_kfp.instances
    assert client.host == "http://kfp:8080"
    assert client.called("create_experiment") == [] and client.called("run_pipeline") == []
    assert "pipeline_id: p1" in capsys.readouterr().out


def test_run_passes_the_config_and_its_tunable_values(fake_kfp, package, config_file, monkeypatch):
    monkeypatch.setenv("KFP_TOKEN", "token-value")
    argv = ["--host", "http://kfp:8080", "--package", str(package), "--run", "--config", str(config_file),
            "--experiment", "nightly", "--logs", "s3://grade/logs/2026-01-01", "--registry",
            "s3://grade/reg", "--snapshot-date", "2026-01-01", "--run-name", "try-1"]
    assert submit.main(argv) == 0
    (client,) = fake_kfp.instances
    assert client.token == "token-value"
    assert client.called("create_experiment") == [{"name": "nightly", "namespace": None}]
    (run,) = client.called("run_pipeline")
    assert run["experiment_id"] == "e-nightly" and run["job_name"] == "try-1"
    assert (run["pipeline_id"], run["version_id"]) == ("p1", "p1-v1")
    assert run["enable_caching"] is True
    p = run["params"]
    assert yaml.safe_load(p["config_yaml"]) == yaml.safe_load(config_file.read_text())
    assert (p["n_requests"], p["seed"], p["group_size"], p["kl_coef"]) == (1234, 7, 4, 0.5)
    # Keys the file does not set carry the config defaults.
    assert p["list_size"] == params.defaults()["list_size"]
    assert p["raw_logs_uri"] == "s3://grade/logs/2026-01-01" and p["registry_uri"] == "s3://grade/reg"
    assert p["snapshot_date"] == "2026-01-01" and p["run_ablations"] is False
    # Every pipeline parameter given is one the pipeline declares.
    from pipeline.grade_pipeline import build_pipeline

    declared = set(build_pipeline().component_spec.inputs)
    assert set(p) <= declared


def test_schedule_creates_a_recurring_run_without_overlap_or_catchup(fake_kfp, package):
    argv = ["--host", "http://kfp:8080", "--package", str(package), "--schedule", "0 0 3 * * *"]
    assert submit.main(argv) == 0
    (client,) = fake_kfp.instances
    (rr,) = client.called("create_recurring_run")
    assert rr["cron_expression"] == "0 0 3 * * *"
    assert rr["max_concurrency"] == 1 and rr["no_catchup"] is True and rr["enabled"] is True
    assert rr["enable_caching"] is False
    assert (rr["pipeline_id"], rr["version_id"], rr["experiment_id"]) == ("p1", "p1-v1", "e-grade-mtf")
    assert client.called("run_pipeline") == []


def test_a_scheduled_window_of_partitions_runs_with_the_cache(fake_kfp, package):
    argv = ["--host", "http://kfp:8080", "--package", str(package), "--schedule", "0 0 3 * * *",
            "--logs", "s3://grade/logs/dt={date}", "--window-days", "14"]
    assert submit.main(argv) == 0
    (rr,) = fake_kfp.instances[0].called("create_recurring_run")
    assert rr["enable_caching"] is True
    assert rr["params"]["raw_logs_uri"] == "s3://grade/logs/dt={date}" and rr["params"]["window_days"] == 14


def test_bad_cron_exits_2_before_contacting_the_server(fake_kfp, package, capsys):
    import grade.core.cli

    rc = grade.core.cli.run(submit.main, ["--host", "http://kfp:8080", "--package", str(package),
                                     "--schedule", "0 3 * * *"])
    assert rc == 2
    assert "6 fields" in capsys.readouterr().err
    assert fake_kfp.instances == []


def test_unknown_config_key_exits_2(fake_kfp, package, tmp_path, capsys):
    import grade.core.cli

    bad = tmp_path / "bad.yaml"
    bad.write_text("finetune:\n  group_sise: 4\n")
    rc = grade.core.cli.run(submit.main,
                            ["--host", "h", "--package", str(package), "--run", "--config", str(bad)])
    assert rc == 2 and "group_sise" in capsys.readouterr().err
    assert fake_kfp.instances == []


def test_run_and_schedule_are_exclusive(package):
    with pytest.raises(SystemExit) as e:
        submit.build_parser().parse_args(["--host", "h", "--run", "--schedule", "0 0 3 * * *"])
    assert e.value.code == 2


def test_without_a_package_the_pipeline_is_compiled_with_the_options(fake_kfp):
    assert submit.main(["--host", "h", "--image", "registry.example.com/grade:1", "--gpu"]) == 0
    (client,) = fake_kfp.instances
    (up,) = client.called("upload_pipeline")
    # The temp package is gone after upload; what reached the client was a compiled spec.
    assert up["path"].endswith("pipeline.yaml") and up["name"] == "grade-mtf"


def test_compiled_package_carries_image_and_gpu(tmp_path):
    from pipeline.compile import compile_pipeline

    spec, _platform = yaml.safe_load_all(compile_pipeline(tmp_path / "p.yaml", gpu=True,
                                                          image="registry.example.com/grade:1").read_text())
    executors = spec["deploymentSpec"]["executors"]
    assert {e["container"]["image"] for e in executors.values()} == {"registry.example.com/grade:1"}
    gpus = {name for name, e in executors.items()
            if e["container"].get("resources", {}).get("accelerator", {}).get("resourceCount") == "1"}
    assert gpus and all(name.startswith(("exec-pretrain", "exec-finetune")) for name in gpus)


def test_dry_run_prints_what_would_be_scheduled_without_a_host(fake_kfp, package, config_file, capsys):
    argv = ["--dry-run", "--package", str(package), "--schedule", "0 0 3 * * *", "--config", str(config_file),
            "--logs", "s3://grade/logs/dt={date}", "--window-days", "14", "--run-name", "nightly"]
    assert submit.main(argv) == 0
    out = capsys.readouterr().out
    assert fake_kfp.instances == [], "no client made, no host contacted"
    version = submit.package_version_name("grade-mtf", package)
    assert "pipeline: grade-mtf" in out and f"version: {version}" in out
    assert "action: recurring run" in out and "name: nightly" in out
    assert "cron: 0 0 3 * * * (max_concurrency 1, no catch-up)" in out and "caching: True" in out
    assert 'raw_logs_uri: "s3://grade/logs/dt={date}"' in out and "window_days: 14" in out
    assert "n_requests: 1234" in out  # the config text travels as a parameter


def test_dry_run_checks_its_input_like_a_submission(fake_kfp, package, capsys):
    import grade.core.cli

    rc = grade.core.cli.run(submit.main, ["--dry-run", "--package", str(package), "--schedule", "0 3 * * *"])
    assert rc == 2 and "6 fields" in capsys.readouterr().err


def test_without_host_or_dry_run_exits_2(fake_kfp, package, capsys):
    import grade.core.cli

    assert grade.core.cli.run(submit.main, ["--package", str(package), "--run"]) == 2
    assert "--host URL is required" in capsys.readouterr().err
    assert fake_kfp.instances == []


def test_an_unreachable_host_is_one_line_and_exit_1(package, capsys):
    """A real kfp.Client against a closed port: before, a ~90-line traceback."""
    import socket

    import grade.core.cli

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again: nothing listens there
    host = f"http://user:pw-secret@127.0.0.1:{port}"
    rc = grade.core.cli.run(submit.main, ["--host", host, "--package", str(package), "--run"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 1 and len(err) == 1, err
    assert err[0].startswith(f"error: --host http://127.0.0.1:{port}: the KFP endpoint did not answer")
    assert "pw-secret" not in err[0]
