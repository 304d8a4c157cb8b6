"""containers/inferenceservice.yaml: the server of the project image, credentials from the Secret,
health probes on the server's endpoints, a documented canary (checked as text: no cluster here)."""

from pathlib import Path

import yaml

from components import serve

ROOT = Path(__file__).resolve().parent.parent


def test_the_inferenceservice_runs_the_server_with_valid_flags_and_the_secret():
    text = (ROOT / "containers" / "inferenceservice.yaml").read_text()
    isvc = yaml.safe_load(text)
    assert isvc["kind"] == "InferenceService" and isvc["apiVersion"].startswith("serving.kserve.io/")
    container = isvc["spec"]["predictor"]["containers"][0]
    assert container["command"] == ["python", "-m", "components.serve"]
    args = serve.build_parser().parse_args(container["args"])  # the flags exist and parse
    assert args.registry.startswith("s3://") and args.port == container["ports"][0]["containerPort"]
    # one server process per core the replica may use
    assert args.workers == int(container["resources"]["limits"]["cpu"]) == int(
        container["resources"]["requests"]["cpu"])
    assert {"secretRef": {"name": "grade-s3"}} in container["envFrom"]
    assert "AWS_SECRET_ACCESS_KEY" not in yaml.safe_dump(container.get("env", []))
    assert container["readinessProbe"]["httpGet"]["path"] == "/v2/health/ready"
    assert container["livenessProbe"]["httpGet"]["path"] == "/v2/health/live"
    assert container["securityContext"]["runAsUser"] != 0
    # the canary is documented, and the commented-out pin is a valid flag of the server
    assert "canaryTrafficPercent: 10" in text
    pinned = serve.build_parser().parse_args(["--registry", "s3://r", "--version", "v0007-1a2b3c4d"])
    assert pinned.version == "v0007-1a2b3c4d" and "# --version, v0007-1a2b3c4d" in text
