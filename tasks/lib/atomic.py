"""Atomic writes: a reader sees the old file or directory, or the new one, never half of one.

Every stage writes through these two helpers. Both stage the new content beside the target (same
filesystem, so the final rename is atomic) and leave nothing behind when they fail. A temporary
file is named ``.<name>.*.tmp`` so that one left by a killed process is recognisable and can be
swept away (``tasks.lib.registry.production.remove_stale_temporaries``).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path


def write_bytes_atomic(path: Path, data: bytes) -> None:
    """Write to a temporary file beside ``path``, fsync it, and rename it over ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    descriptor, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(descriptor, "wb") as stream:
            stream.write(data)
            stream.flush()
            os.fsync(stream.fileno())
        os.chmod(temporary, 0o644)  # mkstemp makes files private; outputs are ordinary files
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


@contextlib.contextmanager
def staged_directory(target: Path) -> Iterator[Path]:
    """An empty directory beside ``target`` to build the new content in. If the block succeeds, the
    directory replaces ``target`` whole; if it raises, it is removed and ``target`` is untouched."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.partial-"))
    staging.chmod(0o755)  # mkdtemp makes it private; the published directory is not
    try:
        yield staging
        previous = target.with_name(f".{target.name}.previous")
        shutil.rmtree(previous, ignore_errors=True)
        if target.exists():
            target.rename(previous)  # a reader now finds no directory, never a partial one
        staging.rename(target)
        shutil.rmtree(previous, ignore_errors=True)
    finally:
        shutil.rmtree(staging, ignore_errors=True)  # already gone when it was published
