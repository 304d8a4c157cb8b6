"""The local runner's quiet terminal: step lines on the terminal, everything else in the log file."""

import io
import logging
import sys

import pytest

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


# a step under KFP's executor, and grade.core.cli's format
STEP_LOG_FORMATS = ["    [KFP Executor %(asctime)s %(levelname)s]: %(message)s",
                    "%(asctime)s %(levelname)s %(name)s: %(message)s"]


@pytest.mark.parametrize("log_format", STEP_LOG_FORMATS)
def test_a_running_steps_progress_lines_reach_the_terminal_at_most_every_ten_seconds(log_format, tmp_path,
                                                                                     monkeypatch):
    """The lines a step logs with grade.core.progress (rate, ETA), in the formats a step's log has."""
    from grade.core.progress import Progress
    from pipeline import progress as progress_module

    clock = {"now": 1000.0}
    monkeypatch.setattr(progress_module.time, "monotonic", lambda: clock["now"])
    terminal = io.StringIO()
    monkeypatch.setattr(sys, "stdout", terminal)
    step_log = logging.getLogger("grade.test.step")
    with quiet_runner_output(tmp_path / "run.log"):
        handler = logging.StreamHandler(sys.stdout)  # the step's stderr, as the runner prints it
        handler.setFormatter(logging.Formatter(log_format))
        step_log.addHandler(handler)
        step_log.setLevel(logging.INFO)
        try:
            print(f"12:00:00.001 - INFO - Executing task {CYAN}'finetune'{RESET}")
            work = Progress("finetune", 400, "steps", rate_unit="requests", every_s=0.0, logger=step_log)
            for _ in range(25):  # a line a second from the step; 25 s in all
                clock["now"] += 1.0
                work.add(16, amount=128)
            step_log.info("finetune: the value fields of 400 requests")  # no rate: log file only
            print(f"12:00:25.001 - INFO - Task {CYAN}'finetune'{RESET} finished with status "
                  f"{GREEN}SUCCESS{RESET}")
        finally:
            step_log.removeHandler(handler)
    shown = terminal.getvalue().splitlines()
    assert shown[0] == "  step finetune ..." and shown[-1] == "  step finetune: success (25.0 s)"
    middle = shown[1:-1]
    assert len(middle) == 2, shown  # at 10 s and 20 s
    first, second = middle
    assert first.startswith("  step finetune: finetune: 160/400 steps (") and "requests/s, ETA" in first
    assert first.endswith("[10 s in]") and second.startswith("  step finetune: finetune: 320/400 steps")
    log = (tmp_path / "run.log").read_text()
    assert log.count("finetune: ") >= 26 and "value fields" in log  # every line in the log file


def test_progress_lines_outside_a_running_step_stay_in_the_log(tmp_path, monkeypatch):
    terminal = io.StringIO()
    monkeypatch.setattr(sys, "stdout", terminal)
    with quiet_runner_output(tmp_path / "run.log"):
        print("2026-01-01 12:00:00,001 INFO grade.core.progress: simulate: 4/4 chunks (100 rows/s, ETA 0s)")
    assert terminal.getvalue() == ""
