"""Every child process the project starts goes through here: `python -m ...`, `dvc`, `git`, `pip`,
`npm` and `prefect server`.

Why one place: the children need the same environment, whoever starts them. Stage commands in
dvc.yaml say `python`, so the directory of this interpreter goes first on PATH (a `dvc repro`
started from the project's virtual environment runs the stages with it, activated or not).
Output is unbuffered, so a stage's lines stream into logs as they come; git never waits for a
password prompt that nobody will answer. (TensorFlow's C++ start-up chatter is kept out by the
child itself, ``tasks.lib.tf_loader``: setting ``TF_CPP_MIN_LOG_LEVEL`` here would read there as
the user's own choice.)
"""

from __future__ import annotations

import ctypes
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import IO

# Linux prctl(2): deliver a signal to this process when the thread that started it ends.
_PR_SET_PDEATHSIG = 1
# Set by `stream` for its children; a stage that finds it (tasks/lib/stage.py) asks for the same, so
# `dvc repro` and the stage it runs both end with the flow run that started them, even a SIGKILLed one.
END_WITH_PARENT = "MNIST_PIPELINE_END_WITH_PARENT"
STOP_GRACE_SECONDS = 10.0


class CommandTimedOut(RuntimeError):
    """A streamed command ran past its time-out; it and every process it started were stopped."""


def child_environment(**overrides: str) -> dict[str, str]:
    """This process's environment for a child process, with ``overrides`` on top."""
    path = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"
    return {**os.environ, "PATH": path, "PYTHONUNBUFFERED": "1", "GIT_TERMINAL_PROMPT": "0", **overrides}


def python_module(module: str, *arguments: str) -> list[str]:
    """The command line of ``python -m module arguments`` with this interpreter."""
    return [sys.executable, "-m", module, *arguments]


def run(command: Sequence[str], cwd: Path | str | None = None, *, timeout: float | None = None,
        capture: bool = True, environment: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """Run ``command`` to the end; with ``capture`` its output comes back as text, otherwise it goes
    to this process's terminal. ``environment`` defaults to :func:`child_environment`."""
    return subprocess.run(list(command), cwd=cwd, env=environment or child_environment(), text=True,
                          capture_output=capture, timeout=timeout)


def _libc() -> ctypes.CDLL | None:
    try:
        return ctypes.CDLL(None, use_errno=True)
    except OSError:
        return None


def _end_with(parent: int, libc: ctypes.CDLL | None) -> Callable[[], None]:
    """In the child, before exec: its own session (a time-out or a stop reaches `dvc` and the stage
    it runs as one process group), and SIGTERM when ``parent`` dies, however it dies."""
    def prepare() -> None:
        os.setsid()
        if libc is not None and hasattr(libc, "prctl"):
            libc.prctl(_PR_SET_PDEATHSIG, int(signal.SIGTERM), 0, 0, 0)
        if os.getppid() != parent:  # the parent died before the request: end now
            os._exit(1)
    return prepare


def end_with_parent() -> None:
    """In a stage started under a flow run (``stream`` sets END_WITH_PARENT for `dvc repro`, whose
    child the stage is): SIGTERM to this process when `dvc` dies, however it dies, so no stage
    outlives the flow run that started it. Elsewhere (`dvc repro` by hand) nothing."""
    libc = _libc()
    if os.environ.get(END_WITH_PARENT) != "1" or libc is None or not hasattr(libc, "prctl"):
        return
    libc.prctl(_PR_SET_PDEATHSIG, int(signal.SIGTERM), 0, 0, 0)
    if os.getppid() == 1:  # dvc died before the request reached the kernel
        sys.exit(1)


def stop_group(process: subprocess.Popen, grace: float = STOP_GRACE_SECONDS) -> None:
    """SIGTERM to the process group ``process`` leads, SIGKILL after ``grace`` seconds; reaped."""
    for sent in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(process.pid, sent)
        except ProcessLookupError:
            break
        try:
            process.wait(timeout=grace)
            break
        except subprocess.TimeoutExpired:
            continue
    process.wait()


def stream(command: Sequence[str], cwd: Path | str, timeout: float,
           on_line: Callable[[str], object]) -> tuple[int, list[str]]:
    """Run ``command``, handing each output line (stdout and stderr together) to ``on_line`` as it
    comes; return (exit code, lines). After ``timeout`` seconds the command and every process it
    started (its own process group: `dvc` and the stage it runs) get SIGTERM, and
    ``CommandTimedOut`` is raised. The same group is stopped when this call is interrupted (Ctrl-C,
    Prefect's cancellation or SIGTERM), and the kernel sends the child SIGTERM if this process dies
    outright (PR_SET_PDEATHSIG; a SIGKILLed worker), so no stage outlives its flow run."""
    process = subprocess.Popen(list(command), cwd=cwd, env=child_environment(**{END_WITH_PARENT: "1"}),
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1,
                               preexec_fn=_end_with(os.getpid(), _libc()))  # noqa: PLW1509 - no lock is taken
    timed_out = threading.Event()

    def stop() -> None:
        timed_out.set()
        os.killpg(process.pid, signal.SIGTERM)

    watchdog = threading.Timer(timeout, stop)
    watchdog.start()
    lines: list[str] = []
    try:
        for line in process.stdout:  # type: ignore[union-attr]
            lines.append(line.rstrip())
            on_line(lines[-1])
        process.wait()
    except BaseException:  # interrupted: the children must not outlive this call
        stop_group(process)
        raise
    finally:
        watchdog.cancel()
    if timed_out.is_set():
        raise CommandTimedOut(f"`{' '.join(command)}` timed out after {timeout:.0f} s")
    return process.returncode, lines


def start_with_parent(command: Sequence[str], environment: dict[str, str]) -> subprocess.Popen:
    """Start a helper that lives no longer than this process (a flow's temporary Prefect server),
    output to this process's own: its own session, so a Ctrl-C in the terminal reaches only this
    process, which stops the helper in its own time; SIGTERM when this process dies outright."""
    return subprocess.Popen(list(command), env=environment,
                            preexec_fn=_end_with(os.getpid(), _libc()))  # noqa: PLW1509 - no lock is taken


def start(command: Sequence[str], environment: dict[str, str], log: IO[bytes]) -> subprocess.Popen:
    """Start a long-lived service (a Prefect server) in its own process session, output to ``log``."""
    return subprocess.Popen(list(command), env=environment, stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)
