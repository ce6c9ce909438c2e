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


def _naming(path: Path, error: OSError) -> OSError:
    """``error`` as raised for ``path`` (not for the temporary file the user never heard of)."""
    return OSError(error.errno, error.strerror, str(path))


class PreparedWrite:
    """A file's new content, written and fsynced beside it, not yet in place: ``commit()`` renames
    it over the file (a rename needs no space, so it cannot run out of it), ``discard()`` drops it.
    A stage prepares what it must write after its commit point before it gets there."""

    def __init__(self, path: Path, data: bytes) -> None:
        self.path = Path(path)
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            descriptor, self.temporary = tempfile.mkstemp(dir=self.path.parent, prefix=f".{self.path.name}.",
                                                          suffix=".tmp")
        except OSError as error:
            raise _naming(self.path, error) from None
        try:
            with os.fdopen(descriptor, "wb") as stream:
                stream.write(data)
                stream.flush()
                os.fsync(stream.fileno())
            os.chmod(self.temporary, 0o644)  # mkstemp makes files private; outputs are ordinary files
        except OSError as error:
            self.discard()
            raise _naming(self.path, error) from None
        except BaseException:
            self.discard()
            raise

    def commit(self) -> None:
        try:
            os.replace(self.temporary, self.path)
        except OSError as error:
            self.discard()
            raise _naming(self.path, error) from None

    def discard(self) -> None:
        Path(self.temporary).unlink(missing_ok=True)


def write_bytes_atomic(path: Path, data: bytes) -> None:
    """Write to a temporary file beside ``path``, fsync it, and rename it over ``path``. An
    OSError (full disk, read-only, size limit) names ``path``; ``path`` is then unchanged."""
    prepared = PreparedWrite(path, data)
    try:
        prepared.commit()
    except BaseException:
        prepared.discard()
        raise


def sweep_leftovers(target: Path) -> list[Path]:
    """Remove the staging directories (``.<name>.partial-*``) a killed :func:`staged_directory` of
    ``target`` left; return them. Only one writer builds a target at a time (DVC's lock), so any
    such directory is a leftover."""
    target = Path(target)
    removed = [path for path in target.parent.glob(f".{target.name}.partial-*")
               if path.is_dir() and not path.is_symlink()]
    for path in removed:
        shutil.rmtree(path, ignore_errors=True)
    return removed


@contextlib.contextmanager
def staged_directory(target: Path) -> Iterator[Path]:
    """An empty directory beside ``target`` to build the new content in. If the block succeeds, the
    directory replaces ``target`` whole; if it raises, it is removed and ``target`` is untouched."""
    target = Path(target)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        sweep_leftovers(target)
        staging = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.partial-"))
    except OSError as error:
        raise _naming(target, error) from None
    staging.chmod(0o755)  # mkdtemp makes it private; the published directory is not
    try:
        try:
            yield staging
        except OSError as error:  # a full disk or a size limit while building: name the target
            if error.filename is None or str(staging) in str(error.filename):
                raise _naming(target, error) from None
            raise
        previous = target.with_name(f".{target.name}.previous")
        shutil.rmtree(previous, ignore_errors=True)
        if target.exists():
            target.rename(previous)  # a reader now finds no directory, never a partial one
        staging.rename(target)
        shutil.rmtree(previous, ignore_errors=True)
    finally:
        shutil.rmtree(staging, ignore_errors=True)  # already gone when it was published
