"""TensorFlow, imported without its C++ start-up chatter on a CPU machine.

Every module that uses TensorFlow imports it from here: ``from tasks.lib.tf_loader import tf``.

Why: a plain ``import tensorflow`` on a machine without a GPU prints a banner twice (oneDNN,
"could not find cuda drivers", CPU features), and the first op prints an ``E0000 ... failed
call to cuInit`` line and, at the first XLA compile, four ``I0000`` lines: 35 of 84 lines of a
flow run's log. ``TF_CPP_MIN_LOG_LEVEL=2`` silences the XLA lines but not the banner, which
TensorFlow writes before its logging is set up. So, unless the caller chose a level themselves:

* ``TF_CPP_MIN_LOG_LEVEL`` defaults to 2 (warnings and errors of TensorFlow's own logging show);
* the import and the first device set-up run with the process's stderr sent to a scratch file;
  afterwards the lines kept are written back: everything but the C++ info/warning lines
  (``I0000``/``W0000``), absl's note about them, and the cuInit error when no GPU was found.

``TF_CPP_MIN_LOG_LEVEL=0 dvc repro`` shows everything again.
"""

from __future__ import annotations

import contextlib
import os
import re
import sys
import tempfile
from collections.abc import Iterator

# The level this module sets is inherited by child processes, where it must not read as the user's
# choice: the marker says which value was ours.
_MARKER = "MNIST_PIPELINE_TF_LEVEL_SET"
_LEVEL = os.environ.get("TF_CPP_MIN_LOG_LEVEL")
_USER_LEVEL = None if _LEVEL is not None and os.environ.get(_MARKER) == _LEVEL else _LEVEL
_NOISE = re.compile(
    r"^(?:[IW]\d{4} [\d:.]+ +\d+ \S+:\d+\]"  # C++ info and warning lines
    r"|WARNING: All log messages before absl::InitializeLog\(\) is called are written to STDERR"
    r"|To enable the following instructions: .* in other operations, rebuild TensorFlow)"
)
_NO_GPU = re.compile(r"^E\d{4} .*failed call to cuInit")


def keep_line(line: str) -> bool:
    """Whether a line TensorFlow printed while loading is worth showing (see the module docstring)."""
    return not (_NOISE.match(line) or _NO_GPU.match(line))


@contextlib.contextmanager
def _stderr_filtered() -> Iterator[None]:
    """Send file descriptor 2 to a scratch file for the block, then write back the lines worth keeping."""
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as capture:
        os.dup2(capture.fileno(), 2)
        try:
            yield
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            capture.seek(0)
            kept = [line for line in capture.read().decode(errors="replace").splitlines() if keep_line(line)]
            if kept:
                print("\n".join(kept), file=sys.stderr, flush=True)


def _load():  # noqa: ANN202 - the tensorflow module
    if _USER_LEVEL is not None:  # the user asked for a level: theirs, and every line TensorFlow prints
        import tensorflow

        return tensorflow
    os.environ["TF_CPP_MIN_LOG_LEVEL"] = os.environ[_MARKER] = "2"
    with _stderr_filtered():
        import tensorflow

        tensorflow.config.list_logical_devices()  # the device set-up, where the cuInit line comes from
    return tensorflow


tf = _load()
