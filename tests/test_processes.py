"""tasks/lib/processes.py: child processes run this interpreter's `python` and `dvc`, streamed output,
time-outs that stop a whole process group."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest

from tasks.lib.processes import CommandTimedOut, child_environment, stream


def test_a_child_python_is_this_interpreter_unbuffered_and_git_never_prompts() -> None:
    environment = child_environment(EXTRA="1")
    assert environment["PATH"].split(":")[0] == str(Path(sys.executable).parent)
    assert environment["PYTHONUNBUFFERED"] == "1" and environment["GIT_TERMINAL_PROMPT"] == "0"
    found = subprocess.run(["python", "-c", "import sys, os; print(sys.executable, os.environ['EXTRA'])"],
                           env=environment, capture_output=True, text=True, check=True).stdout.split()
    assert Path(found[0]).parent == Path(sys.executable).parent and found[1] == "1"


def test_stream_hands_over_each_line_and_returns_the_exit_code(tmp_path: Path) -> None:
    lines: list[str] = []
    assert stream(["sh", "-c", "echo one; echo two; exit 3"], tmp_path, 10, lines.append) == (3, ["one", "two"])
    assert lines == ["one", "two"]


def test_stream_kills_the_whole_process_group_on_timeout(tmp_path: Path) -> None:
    marker = tmp_path / "survived"
    started = time.monotonic()
    with pytest.raises(CommandTimedOut, match="timed out after 1 s"):
        stream(["sh", "-c", f"(sleep 3; touch {marker}) & sleep 30"], tmp_path, 1, lambda line: None)
    assert time.monotonic() - started < 10
    time.sleep(3.5)
    assert not marker.exists(), "a child of the stage outlived the time-out"
