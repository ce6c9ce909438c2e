"""tasks/lib/processes.py: child processes run this interpreter's `python` and `dvc`, streamed output,
time-outs that stop a whole process group."""

from __future__ import annotations

import os
import signal
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


# A caller of `stream` whose child starts a grandchild the way `dvc repro` starts a stage: the
# grandchild is `python -m`-like code that asks to end with its parent (tasks/lib/stage.py).
CALLER = """
import sys
from tasks.lib.processes import stream
child = '''
import os, subprocess, sys, time
grandchild = subprocess.Popen([sys.executable, "-c", "from tasks.lib.stage import end_with_parent; import os, time; "
                               "end_with_parent(); print('grandchild', os.getpid(), flush=True); time.sleep(600)"])
print('child', os.getpid(), flush=True)
time.sleep(600)
'''
stream([sys.executable, "-c", child], ".", 600, lambda line: print(line, flush=True))
"""


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def _start_caller() -> tuple[subprocess.Popen, list[int]]:
    caller = subprocess.Popen([sys.executable, "-c", CALLER], cwd=Path(__file__).parent.parent,
                              stdout=subprocess.PIPE, text=True, env=child_environment())
    pids = {}
    while len(pids) < 2:
        name, pid = caller.stdout.readline().split()  # type: ignore[union-attr]
        pids[name] = int(pid)
    return caller, [pids["child"], pids["grandchild"]]


def _gone(pids: list[int], timeout: float = 15) -> bool:
    deadline = time.monotonic() + timeout
    while any(_alive(pid) for pid in pids) and time.monotonic() < deadline:
        time.sleep(0.1)
    return not any(_alive(pid) for pid in pids)


@pytest.mark.parametrize("sent", [signal.SIGKILL, signal.SIGINT, signal.SIGTERM])
def test_the_children_of_stream_end_with_their_caller(sent: signal.Signals) -> None:
    caller, pids = _start_caller()
    try:
        caller.send_signal(sent)  # SIGKILL: a killed worker; SIGINT: Ctrl-C; SIGTERM: `kill`
        caller.wait(timeout=30)
        assert _gone(pids), f"still running after the caller got {sent.name}: {[p for p in pids if _alive(p)]}"
    finally:
        for pid in pids:
            if _alive(pid):
                os.kill(pid, signal.SIGKILL)
