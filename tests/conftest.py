"""Shared fixtures: tiny synthetic MNIST-shaped datasets and params that point at them.

Nothing here touches the network: the synthetic IDX files carry their own checksums and class
counts, and `make_params` derives a valid params document from the repository's params.yaml.
"""

from __future__ import annotations

import os

# One TensorFlow thread per process, here and in every stage the tests start (they inherit the
# environment): the models are tiny, and `pytest -n` runs several processes on a few cores, where
# TensorFlow's default (a spinning thread per core in each) burns the cores the others need.
# Set before TensorFlow loads; a variable the caller set wins. Tests of bit-for-bit results
# across processes run their children with TensorFlow's defaults again (with_default_threads);
# MNIST_TESTS_SET_THREADS names what this file set; `pytest -n` workers inherit it with the rest.
os.environ.setdefault("MNIST_TESTS_SET_THREADS", ",".join(
    name for name in ("TF_NUM_INTRAOP_THREADS", "TF_NUM_INTEROP_THREADS") if name not in os.environ))
os.environ.setdefault("TF_NUM_INTRAOP_THREADS", "1")
os.environ.setdefault("TF_NUM_INTEROP_THREADS", "1")

# Prefect configures logging with dictConfig when first imported, which closes every existing
# handler; absl's handler (created when TensorFlow loads) then closes the stream it holds, which
# under pytest is the capture file, and the session dies with "I/O operation on closed file".
# Importing Prefect first, before any test module loads TensorFlow, keeps the order harmless.
from prefect import flow  # noqa: F401  isort: skip  (loads prefect.flows, which sets up logging)

import ast
import copy
import hashlib
import shutil
import signal
import subprocess
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml

from tasks.lib import mnist
from tasks.lib.params import IDX_FILE_NAMES, Params, Paths, parse_params
from tasks.lib.processes import child_environment

REPO_ROOT = Path(__file__).resolve().parents[1]
TRAIN_SIZE, TEST_SIZE = 600, 200


def synthetic_arrays(seed: int = 0) -> dict[str, np.ndarray]:
    """Digits drawn as noisy class-specific blobs: learnable, yet tiny and deterministic."""
    rng = np.random.default_rng(seed)
    # Classes share most of their pixels, so the task is learnable but not trivially perfect.
    common = rng.uniform(0, 255, size=(28, 28))
    prototypes = np.clip(common + rng.normal(0, 45, size=(10, 28, 28)), 0, 255)
    arrays = {}
    for prefix, size in (("train", TRAIN_SIZE), ("t10k", TEST_SIZE)):
        labels = np.arange(size) % 10
        rng.shuffle(labels)
        noise = rng.normal(0, 80, size=(size, 28, 28))
        images = np.clip(prototypes[labels] + noise, 0, 255).astype(np.uint8)
        arrays[f"{prefix}-images-idx3-ubyte"] = images
        arrays[f"{prefix}-labels-idx1-ubyte"] = labels.astype(np.uint8)
    return arrays


def raw_data_at(directory: Path) -> Paths:
    """The stages' paths with the raw data in ``directory`` (the others beside it)."""
    return replace(Paths.under(directory.parent), raw_data=directory)


def write_synthetic(directory: Path, seed: int = 0) -> dict[str, str]:
    """Write the four IDX files; return their SHA-256 by name."""
    directory.mkdir(parents=True, exist_ok=True)
    checksums = {}
    for name, array in synthetic_arrays(seed).items():
        content = mnist.encode_idx(array)
        (directory / name).write_bytes(content)
        checksums[name] = hashlib.sha256(content).hexdigest()
    return checksums


def class_counts(seed: int = 0) -> dict[str, list[int]]:
    arrays = synthetic_arrays(seed)
    return {
        "train": np.bincount(arrays["train-labels-idx1-ubyte"], minlength=10).tolist(),
        "test": np.bincount(arrays["t10k-labels-idx1-ubyte"], minlength=10).tolist(),
    }


def base_params_document() -> dict[str, Any]:
    return yaml.safe_load((REPO_ROOT / "params.yaml").read_text())


def make_params_document(source_dir: Path, **section_overrides: dict[str, Any]) -> dict[str, Any]:
    """The repository's params with data pointing at a synthetic source and a short training run."""
    document = copy.deepcopy(base_params_document())
    checksums = {name: hashlib.sha256((source_dir / name).read_bytes()).hexdigest()
                 for name in IDX_FILE_NAMES}
    document["data"].update(sources=[str(source_dir)], sha256=checksums, gzip_sha256={},
                            class_counts=class_counts(), validation_size=100, retries=0)
    document["train"].update(steps=60, batch_size=50, learning_rate=0.1, eval_every=20, checkpoint_every=20,
                             steps_per_call=20)
    document["model"].update(hidden_units=32)
    document["evaluate"].update(batch_size=100, misclassified_shown=9)
    document["promote"].update(min_accuracy=0.5)
    for section, values in section_overrides.items():
        document[section].update(values)
    return document


@pytest.fixture
def synthetic_source(tmp_path: Path) -> Path:
    source = tmp_path / "source"
    write_synthetic(source)
    return source


@pytest.fixture
def params(synthetic_source: Path) -> Params:
    return parse_params(make_params_document(synthetic_source))


def tool_environment() -> dict[str, str]:
    """The project's child environment (`python` and `dvc` are this interpreter's, as in `make run`),
    without pytest's own variables."""
    environment = child_environment(PYTHONPATH="")
    environment.pop("PYTEST_CURRENT_TEST", None)
    return environment


def with_default_threads(environment: dict[str, str]) -> dict[str, str]:
    """``environment`` without the one-thread setting above: a child runs TensorFlow with its
    default thread pools, as `dvc repro` does, for tests whose point is bit-for-bit results."""
    set_here = {"MNIST_TESTS_SET_THREADS", *os.environ["MNIST_TESTS_SET_THREADS"].split(",")}
    return {name: value for name, value in environment.items() if name not in set_here}


def run_command(command: list[str], cwd: Path, check: bool = True,
                environment: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    result = subprocess.run(command, cwd=cwd, env=environment or tool_environment(), capture_output=True, text=True)
    if check and result.returncode != 0:
        raise AssertionError(f"{' '.join(command)} failed ({result.returncode}):\n{result.stdout}\n{result.stderr}")
    return result


def run_in_session(command: list[str], cwd: Path, environment: dict[str, str],
                   timeout: float) -> subprocess.CompletedProcess:
    """``subprocess.run`` with the command in a session of its own: on a time-out (or pytest's) the
    whole session is killed, the command and what it started (`dvc exp run --run-all`, a flow run),
    not the command alone, which would leave its children running after the test."""
    process = subprocess.Popen(command, cwd=cwd, env=environment, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        stdout, stderr = process.communicate(timeout=timeout)
    except BaseException:
        os.killpg(process.pid, signal.SIGKILL)
        process.communicate()
        raise
    return subprocess.CompletedProcess(command, process.returncode, stdout, stderr)


def make_project(root: Path, document: dict[str, Any]) -> Path:
    """A fresh git + DVC repository holding this project's code, dvc.yaml and the given params."""
    root.mkdir(parents=True, exist_ok=True)
    for item in ("tasks", "flows", "grids"):
        shutil.copytree(REPO_ROOT / item, root / item, ignore=shutil.ignore_patterns("__pycache__"))
    for item in ("dvc.yaml", ".gitignore", ".dvcignore"):
        shutil.copy(REPO_ROOT / item, root / item)
    (root / "params.yaml").write_text(yaml.safe_dump(document, sort_keys=False))
    run_command(["git", "init", "-q", "-b", "main"], root)
    run_command(["git", "config", "user.email", "test@example.invalid"], root)
    run_command(["git", "config", "user.name", "test"], root)
    run_command([sys.executable, "-m", "dvc", "init", "-q"], root)
    run_command([sys.executable, "-m", "dvc", "config", "core.analytics", "false"], root)
    run_command(["git", "add", "-A"], root)
    run_command(["git", "commit", "-q", "-m", "initial"], root)
    return root


def dvc(root: Path, *arguments: str, check: bool = True) -> subprocess.CompletedProcess:
    return run_command([sys.executable, "-m", "dvc", *arguments], root, check=check)


def tree_digest(directory: Path, *, files_only: bool = False) -> str:
    """Names and bytes of everything below ``directory`` (with ``files_only``, of its files alone:
    DVC does not track empty directories)."""
    digest = hashlib.sha256()
    for path in sorted(p for p in directory.rglob("*") if p.is_file() or not files_only):
        digest.update(str(path.relative_to(directory)).encode())
        if path.is_file():
            digest.update(path.read_bytes())
    return digest.hexdigest()


def project_imports(module: str) -> set[str]:
    """Project modules ``module`` (dotted) imports anywhere in its code, lazy imports inside functions too."""
    path = REPO_ROOT / (module.replace(".", "/") + ".py")
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found |= {f"{node.module}.{alias.name}" for alias in node.names}
    return {name for name in found if (REPO_ROOT / (name.replace(".", "/") + ".py")).is_file()}


def prefect_api(server: Any, query: Any) -> Any:
    """Run ``query(client)`` against a running Prefect server from this (test) process."""
    import asyncio

    from prefect import get_client
    from prefect.settings import PREFECT_API_URL, temporary_settings

    async def run() -> Any:
        async with get_client() as client:
            return await query(client)

    with temporary_settings(updates={PREFECT_API_URL: server.api_url}):
        return asyncio.run(run())


def pytest_configure(config: pytest.Config) -> None:
    """A suite started as a background job of a script (`make test &`, `nohup`) inherits SIGINT
    ignored, and so would every process it starts: the tests that press Ctrl-C (send SIGINT) would
    wait for processes that never hear it. Python's own handler, as under a terminal, so the
    children start with SIGINT at its default. (Runs in every `pytest -n` worker too.)"""
    if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)


# --- the suite on several processes (`pytest -n N`, as `make test` runs it) ------------------------

# Modules whose tests build on one module fixture, in file order (a team's remote, a Prefect
# server): under `pytest -n` each runs whole on one worker.
SHARED_STATE_MODULES = {"tests/test_team.py", "tests/test_flows.py", "tests/test_team_faults.py",
                        "tests/test_team_crash.py", "tests/test_grid_pool.py", "tests/test_grid_pool_postgresql.py"}


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_make_scheduler(config: pytest.Config, log: Any) -> Any:
    """Schedule the modules of SHARED_STATE_MODULES whole and every other test alone, so the long
    end-to-end tests of one module run side by side. (pytest-xdist's ``xdist_group`` marks would
    say the same, but under pytest 9 they take no effect: xdist renames the test ids through an
    attribute pytest 9 no longer reads.) The biggest units go first: the whole modules."""
    from xdist.scheduler import LoadScopeScheduling

    class SharedModulesWhole(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            module = nodeid.split("::", 1)[0]
            return module if module in SHARED_STATE_MODULES else nodeid

    return SharedModulesWhole(config, log)
