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

It also loads faster, and the process exits faster (bench/fixed_costs.py; docs/benchmarks.md):

* Keras is not loaded: ``import tensorflow`` imports Keras's optimizers eagerly (so that Keras
  optimizers saved in a SavedModel load), about a quarter of the import's CPU time, and the
  project has no Keras in its models. A later ``import keras`` (bench/train_speed.py) works as usual.
* The cyclic garbage collector is paused during the import, and the objects the import made
  (hundreds of thousands, alive until exit) are then frozen out of its sight (``gc.freeze``): the
  collector no longer walks them at every full collection, nor at exit, where that took 1.5-2 s.
"""

from __future__ import annotations

import contextlib
import gc
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


# What TensorFlow's __init__ imports of Keras "eagerly" (keras 3, or tf_keras with TF_USE_LEGACY_KERAS).
_KERAS_EAGER_IMPORTS = ("keras.src.optimizers", "tf_keras.src.optimizers")


@contextlib.contextmanager
def _lean_import() -> Iterator[None]:
    """Keras's eager import skipped (TensorFlow catches the ImportError a ``None`` entry in
    ``sys.modules`` raises), the garbage collector paused; afterwards what was imported is frozen."""
    blocked = [name for name in _KERAS_EAGER_IMPORTS if name not in sys.modules]
    collecting = gc.isenabled()
    gc.disable()
    sys.modules.update(dict.fromkeys(blocked))
    try:
        yield
    finally:
        for name in blocked:
            if sys.modules.get(name, 0) is None:
                del sys.modules[name]
        gc.freeze()
        if collecting:
            gc.enable()


def _load():  # noqa: ANN202 - the tensorflow module
    if _USER_LEVEL is not None:  # the user asked for a level: theirs, and every line TensorFlow prints
        with _lean_import():
            import tensorflow

        return tensorflow
    os.environ["TF_CPP_MIN_LOG_LEVEL"] = os.environ[_MARKER] = "2"
    with _stderr_filtered(), _lean_import():
        import tensorflow

        tensorflow.config.list_logical_devices()  # the device set-up, where the cuInit line comes from
    return tensorflow


tf = _load()
