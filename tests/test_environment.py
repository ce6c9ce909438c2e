"""tasks/environment.py: child processes run this interpreter's `python` and `dvc`."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from tasks.environment import child_environment


def test_a_child_python_is_this_interpreter_unbuffered_and_git_never_prompts() -> None:
    environment = child_environment(EXTRA="1")
    assert environment["PATH"].split(":")[0] == str(Path(sys.executable).parent)
    assert environment["PYTHONUNBUFFERED"] == "1" and environment["GIT_TERMINAL_PROMPT"] == "0"
    found = subprocess.run(["python", "-c", "import sys, os; print(sys.executable, os.environ['EXTRA'])"],
                           env=environment, capture_output=True, text=True, check=True).stdout.split()
    assert Path(found[0]).parent == Path(sys.executable).parent and found[1] == "1"
