"""The environment of every child process the project starts: `python`, `dvc` and `git`.

Stage commands in dvc.yaml say `python`, so the directory of this interpreter goes first on
PATH (a `dvc repro` started from the project's virtual environment runs the stages with it,
activated or not). Output is unbuffered so a stage's lines stream into logs as they come, and
git never waits for a password prompt that nobody will answer.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path


def child_environment(**overrides: str) -> dict[str, str]:
    """This process's environment for a child process, with ``overrides`` on top."""
    path = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"
    return {**os.environ, "PATH": path, "PYTHONUNBUFFERED": "1", "GIT_TERMINAL_PROMPT": "0", **overrides}
