"""The evaluation report rendered in headless Chromium: loads without errors, plots visible."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest

from grade.evaluate.evaluation import run_evaluation
from tests.test_evaluate import make_features, make_model, small_config

CHROMIUM = shutil.which("chromium") or ("/usr/bin/chromium" if Path("/usr/bin/chromium").exists() else None)

pytestmark = [
    pytest.mark.browser,
    pytest.mark.skipif(CHROMIUM is None,
                       reason="chromium binary not installed (apt-get install chromium; .ci/run does)"),
]

FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--disable-extensions", "--hide-scrollbars"]


def chromium(args: list[str], tmp: Path) -> subprocess.CompletedProcess:
    # Chromium's singleton socket path must stay short (a unix socket name is <= 107 bytes), so the
    # profile and its temp folder live in a short folder under /tmp rather than in pytest's tmp_path.
    short = Path(tempfile.mkdtemp(prefix="gr-chromium-", dir="/tmp"))
    try:
        env = {**os.environ, "TMPDIR": str(short)}
        return subprocess.run([CHROMIUM, *FLAGS, f"--user-data-dir={short / 'profile'}", *args],
                              capture_output=True, text=True, timeout=120, cwd=tmp, env=env)
    finally:
        shutil.rmtree(short, ignore_errors=True)


@pytest.fixture(scope="module")
def report_html(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("browser")
    features = make_features(root / "features", n_train=400, n_test=600)
    model = make_model(root / "model", steps=20)
    run_evaluation(features, {"grade": model}, str(root / "out"), small_config(bootstrap_samples=100))
    return root / "out" / "report.html"


def console_errors(stderr: str) -> list[str]:
    """Page errors: console messages and failed loads that Chromium logs on stderr."""
    return [line for line in stderr.splitlines() if "CONSOLE" in line or "Uncaught" in line
            or "ERR_FILE_NOT_FOUND" in line or "Failed to load resource" in line]


def load(page: Path, tmp: Path) -> subprocess.CompletedProcess:
    return chromium(["--enable-logging=stderr", "--v=0", "--virtual-time-budget=5000", "--dump-dom",
                     page.as_uri()], tmp)


def test_the_error_check_catches_a_broken_page(tmp_path):
    page = tmp_path / "broken.html"
    page.write_text("<html><body><h1>x</h1><script>undefined_function()</script></body></html>")
    res = load(page, tmp_path)
    assert any("undefined_function" in line for line in console_errors(res.stderr)), res.stderr[-2000:]


def test_report_loads_without_console_errors_and_shows_every_section(report_html, tmp_path):
    res = load(report_html, tmp_path)
    assert res.returncode == 0, res.stderr[-2000:]
    dom = res.stdout
    assert not console_errors(res.stderr), console_errors(res.stderr)
    assert "<h1>GRADE-MTF offline evaluation</h1>" in dom
    for heading in ("Summary", "Metrics", "Lifts vs static", "Trade-off frontier",
                    "Learned weights per segment", "Training curves"):
        assert f"<h2>{heading}</h2>" in dom, heading
    images = re.findall(r'<img [^>]*src="data:image/png;base64,', dom)
    assert len(images) >= 4
    assert "http://" not in dom and "https://" not in dom


def test_screenshot_is_not_blank_and_plots_have_colour(report_html, tmp_path):
    import matplotlib.image as mpimg

    shot = tmp_path / "shot.png"
    res = chromium([f"--screenshot={shot}", "--window-size=1280,3200", "--virtual-time-budget=5000",
                    report_html.as_uri()], tmp_path)
    assert res.returncode == 0 and shot.exists(), res.stderr[-2000:]
    img = mpimg.imread(str(shot))[..., :3]  # floats in [0, 1]
    assert img.shape[0] >= 3000 and img.shape[1] >= 1200
    assert img.std() > 0.05  # a blank (all white) page has std 0
    # Plots are drawn in colour (bars, boxes): a good share of saturated pixels, not only text.
    saturation = img.max(-1) - img.min(-1)
    assert (saturation > 0.3).mean() > 0.005
    # Content reaches far down the page: the lower half is not empty either.
    assert img[img.shape[0] // 2:].std() > 0.03
