"""What every stage entry point (`python -m tasks.<stage>`) shares: parse ``--params``, validate
the file, hand the stage's own params to its work function, and turn an expected failure into
one ``error:`` line and exit code 1.

A stage module passes two functions: ``arguments(params)``, which picks what the stage reads of
params.yaml (its keyword arguments), and ``work(**arguments)``, the pure function that does the
job. Keeping the pick apart from the work lets tests/test_dvc_yaml.py derive each stage's
``params:`` in dvc.yaml from the code itself.
"""

from __future__ import annotations

import argparse
import errno
import os
import signal
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tasks.lib.files import FileProblem
from tasks.lib.params import DEFAULT_PARAMS_PATH, Params, ParamsError, load_params
from tasks.lib.processes import end_with_parent

Arguments = Callable[[Params], dict[str, Any]]
# What the machine, not the code, got wrong: said in one line, with what was kept.
ENVIRONMENT_ERRORS = {errno.ENOSPC: "the disk is full", errno.EDQUOT: "the disk quota is used up",
                      errno.EROFS: "the file system is read-only", errno.EACCES: "permission denied",
                      errno.EPERM: "operation not permitted", errno.EFBIG: "the file-size limit was reached"}


def environment_failure(error: OSError) -> str | None:
    """One line for an OSError the environment caused (full disk, read-only, size limit); None otherwise."""
    if error.errno not in ENVIRONMENT_ERRORS:
        return None
    where = error.filename if error.filename is not None else "a file"
    return (f"cannot write {where}: {ENVIRONMENT_ERRORS[error.errno]} ({error.strerror}); "
            "nothing that was published before was changed")


def ignore_file_size_signal() -> None:
    """Past RLIMIT_FSIZE the kernel sends SIGXFSZ, whose default kills the process with a core
    and no message; ignored, the write fails with EFBIG instead, which is reported like a full disk."""
    if hasattr(signal, "SIGXFSZ"):
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)


def run_stage(argv: list[str] | None, description: str, work: Callable[..., object], arguments: Arguments,
              expected_errors: tuple[type[Exception], ...],
              cached_outputs: Callable[[Params], list[str]] = lambda params: []) -> int:
    """The `python -m tasks.<stage>` entry: parse --params, validate, run; errors become one line.

    ``cached_outputs``: the stage's outputs in DVC's cache. `dvc repro` deletes a stage's
    outputs before running it, so when the stage fails under DVC a second line says how to get
    the previous ones back."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--params", type=Path, default=DEFAULT_PARAMS_PATH, help="the params file")
    args = parser.parse_args(argv)
    end_with_parent()
    ignore_file_size_signal()
    params = None
    try:
        params = load_params(args.params)
        work(**arguments(params))
    except (ParamsError, FileNotFoundError, FileProblem, OSError, *expected_errors) as error:
        message = environment_failure(error) if isinstance(error, OSError) else str(error)
        if message is None:
            raise
        print(f"error: {message}", file=sys.stderr)
        outputs = cached_outputs(params) if params is not None else []
        if outputs and os.environ.get("DVC_STAGE"):  # DVC sets it for the commands of its stages
            print(f"note: `dvc repro` deleted {', '.join(outputs)} before running this stage; "
                  f"`dvc checkout {' '.join(outputs)}` brings back the previous version", file=sys.stderr)
        return 1
    return 0
