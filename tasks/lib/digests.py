"""Digests of what the registry and the score records name: a model directory's files.

Kept apart from ``tasks/lib/scores.py`` so that the registry (``tasks/lib/registry/production.py``)
imports nothing heavy: its kill-and-resume harness starts many processes. The tree is checked
first (``tasks/lib/files.py``): no FIFO or endless file is read.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from tasks.lib.files import check_tree

MAX_MODEL_BYTES = 1 << 30  # the largest network params allow (10000 hidden units) exports ~65 MB


def tree_sha256(model_dir: Path) -> str:
    """SHA-256 of a model directory's file names and bytes: equal exactly when the files are.
    The export is byte-reproducible (tasks/lib/model.py), so it names the model's lineage.
    ``FileProblem`` when the tree holds something that is not a regular file or is too large."""
    check_tree(Path(model_dir), MAX_MODEL_BYTES)
    digest = hashlib.sha256()
    for path in sorted(path for path in Path(model_dir).rglob("*") if path.is_file()):
        digest.update(f"{path.relative_to(model_dir).as_posix()}\0{path.stat().st_size}\0".encode())
        with open(path, "rb") as stream:
            for block in iter(lambda: stream.read(1 << 20), b""):  # noqa: B023 - consumed in this iteration
                digest.update(block)
    return digest.hexdigest()
