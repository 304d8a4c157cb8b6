"""The local runner's quiet terminal: step lines on the terminal, everything else in the log file."""

import io
import logging
import sys

from pipeline.progress import quiet_runner_output, tail

CYAN, GREEN, RESET = "\x1b[96m", "\x1b[92m", "\x1b[0m"


def test_the_terminal_gets_one_line_per_step_start_and_end_and_the_log_gets_everything(tmp_path, monkeypatch):
    terminal = io.StringIO()
    monkeypatch.setattr(sys, "stdout", terminal)
    log = tmp_path / "logs" / "run.log"
    with quiet_runner_output(log) as progress:
        print(f"12:00:00.001 - INFO - Executing task {CYAN}'features'{RESET}")
        print("    features: 2000 requests, 40000 rows")
        sys.stdout.write("12:00:01.000 - INFO - Task ")  # a line written in pieces
        sys.stdout.write(f"{CYAN}'features'{RESET} finished with status {GREEN}SUCCESS{RESET}\n")
        print(f"12:00:01.001 - INFO - Task {CYAN}'features'{RESET} outputs:")
        print("    features: Dataset( name='f' )")
    shown = terminal.getvalue().splitlines()
    assert shown[0] == "  step features ..."
    assert shown[1].startswith("  step features: success (") and len(shown) == 2
    assert progress.finished == [("features", "SUCCESS")]
    text = log.read_text()
    assert "2000 requests" in text and "Dataset( name='f' )" in text
    assert "\x1b[" not in tail(log) and "Dataset" in tail(log, 1)
    assert sys.stdout is terminal  # restored


def test_the_runners_log_records_go_to_the_log_file_not_the_terminal(tmp_path, monkeypatch):
    import kfp.local.pipeline_orchestrator as kfp_module

    stderr = io.StringIO()
    handler = logging.StreamHandler(stderr)
    root = logging.getLogger()
    root.addHandler(handler)
    monkeypatch.setattr(sys, "stdout", io.StringIO())
    try:
        with quiet_runner_output(tmp_path / "run.log"):
            record = logging.LogRecord("root", logging.INFO, kfp_module.__file__, 1, "Skipping task x",
                                       None, None)
            root.handle(record)
            logging.getLogger("grade.test").warning("a project message")
    finally:
        root.removeHandler(handler)
    assert "Skipping task x" not in stderr.getvalue() and "a project message" in stderr.getvalue()
    assert "Skipping task x" in (tmp_path / "run.log").read_text()
