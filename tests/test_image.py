"""The project image (``make image``), checked by CI's container stage (.ci/containers).

Run with GRADE_TEST_IMAGE=<tag> and a Docker daemon: ``pytest -m image tests/test_image.py``.
Skipped otherwise, so the unit test run never needs Docker.
"""

import os
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
IMAGE = os.environ.get("GRADE_TEST_IMAGE", "")
COMPONENTS = sorted(p.stem for p in (ROOT / "components").glob("*.py") if p.stem != "__init__")

pytestmark = [pytest.mark.image,
              pytest.mark.skipif(not IMAGE, reason="GRADE_TEST_IMAGE names no image (CI's container stage)")]


def in_image(*command: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(["docker", "run", "--rm", IMAGE, *command], capture_output=True, text=True,
                          timeout=timeout, check=False)


def test_the_image_runs_as_a_non_root_user():
    result = in_image("id", "-u")
    assert result.returncode == 0, result.stderr
    assert int(result.stdout.strip()) != 0


def test_every_component_imports_and_answers_help_in_the_image():
    # One container for all: a container start costs about a second.
    script = ("import subprocess, sys\n"
              f"for name in {COMPONENTS!r}:\n"
              "    r = subprocess.run([sys.executable, '-m', f'components.{name}', '--help'],\n"
              "                       capture_output=True)\n"
              "    print(name, r.returncode, flush=True)\n")
    result = in_image("python", "-c", script, timeout=300)
    assert result.returncode == 0, result.stderr
    status = dict(line.split() for line in result.stdout.splitlines())
    assert status == {name: "0" for name in COMPONENTS}


def test_a_small_pipeline_runs_in_containers(tmp_path):
    from pipeline import run_local
    from tests.test_pipeline_local import LENIENT_GATE, small_config

    cfg = small_config(tmp_path, promote=LENIENT_GATE)
    result = run_local.run_local(cfg, tmp_path / "out", runner="docker", image=IMAGE, verbose=False,
                                 snapshot_date="2026-01-01")
    assert {"static", "stage1", "grade"} <= set(result["report"]["policies"])
    assert result["blessing"].verdict == "promoted"
    for name in ("report.json", "report.html", "blessing.json"):
        assert (tmp_path / "out" / name).is_file(), name
    assert "Found image" in result["runner_log"].read_text()  # the steps ran in the image
