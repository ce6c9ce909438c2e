"""tasks/lib/tf_loader.py: TensorFlow loads without its C++ start-up chatter, unless the user asks for
it, and a real error line still shows."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest

from tasks.lib.tf_loader import keep_line

from .conftest import REPO_ROOT, tool_environment

NOISE = re.compile(r"^[IW]\d{4} |cuInit|absl::InitializeLog", re.MULTILINE)
# The import, the first op and the first XLA compile: every place TensorFlow prints at start-up.
SCRIPT = ("from tasks.lib.tf_loader import tf\n"
          "print(tf.function(lambda x: x * 2, jit_compile=True)(tf.constant([1.0])).numpy())\n")


def _run(**environment: str) -> subprocess.CompletedProcess:
    set_by_loaders = ("TF_CPP_MIN_LOG_LEVEL", "MNIST_PIPELINE_TF_LEVEL_SET")  # this process's, if it loaded TensorFlow
    base = {name: value for name, value in tool_environment().items() if name not in set_by_loaders}
    return subprocess.run([sys.executable, "-c", SCRIPT], cwd=REPO_ROOT, env=base | environment,
                          capture_output=True, text=True, check=True)


@pytest.mark.slow
@pytest.mark.parametrize("inherited", [{}, {"TF_CPP_MIN_LOG_LEVEL": "2", "MNIST_PIPELINE_TF_LEVEL_SET": "2"}],
                         ids=["fresh", "child of a process that loaded TensorFlow quietly"])
def test_a_stage_process_prints_no_tensorflow_start_up_lines(inherited: dict[str, str]) -> None:
    result = _run(**inherited)
    assert result.stdout.strip() == "[2.]"
    assert not NOISE.search(result.stderr), result.stderr


@pytest.mark.slow
def test_the_users_own_level_wins() -> None:
    """TF_CPP_MIN_LOG_LEVEL=0 is a user asking for everything: the banner shows again."""
    assert NOISE.search(_run(TF_CPP_MIN_LOG_LEVEL="0").stderr)


@pytest.mark.parametrize("line, kept", [
    ("I0000 00:00:1795975752.329745    2427 port.cc:153] oneDNN custom operations are on.", False),
    ("I0000 00:00:1795975752.330736    2427 cudart_stub.cc:31] Could not find cuda drivers on your machine", False),
    ("W0000 00:00:1795975752.330736    2427 some.cc:1] a warning TensorFlow logs before its logging is set up", False),
    ("WARNING: All log messages before absl::InitializeLog() is called are written to STDERR", False),
    ("E0000 00:00:1795975759.489505    2451 cuda_platform.cc:52] failed call to cuInit: INTERNAL: CUDA error", False),
    ("E0000 00:00:1795975759.489505    2451 op_kernel.cc:9] OUT_OF_RANGE: a real error", True),
    ("Traceback (most recent call last):", True),
    ("UserWarning: something a user should read", True),
])
def test_only_start_up_chatter_is_dropped(line: str, kept: bool) -> None:
    assert keep_line(line) is kept
