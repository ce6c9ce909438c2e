"""The served models and their history: ``models/production/<N>/`` and ``models/registry.json``.

``models/production/`` has TF Serving's layout (one directory per integer version; a server
watching it serves the highest). ``models/registry.json`` is the append-only history of every
decision. This module is the only code that writes either, and it keeps one invariant at
every instant, whatever moment the process is killed at:

    every version directory a reader can see is complete, and recorded in the registry.

How each write keeps it:

* **publish** copies the model into ``production/.publishing-v<N>-*/`` (fsynced), then appends
  the registry entry (the whole file is rewritten to a temporary file and renamed: that rename
  is the commit point), then renames the copy to ``production/<N>``. Killed before the commit
  point, only a staging directory is left, and the next run removes it; killed after it, the
  version is recorded and its staged copy complete, and the next run finishes the rename.
* **prune** renames ``production/<N>`` to ``production/.pruning-<N>-*`` before deleting it, so
  no reader sees half a version.
* Every write holds an exclusive lock on the production directory (two promotes, or a promote
  and a rollback, never interleave), and starts with :func:`reconcile`, which finishes or removes
  what a killed run left, and records (complete) or quarantines (incomplete) any version
  directory the registry does not know, saying so.

Version numbers never restart: the next one follows the highest ever seen here, in the
registry, or in the model registry's git tags (``mnist-mlp@v<N>.0.0``, tasks/lib/registry/tags.py).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

from tasks.lib.atomic import write_bytes_atomic
from tasks.lib.digests import tree_sha256  # noqa: F401 - the model digest every registry record carries
from tasks.lib.registry.tags import registered_versions

_STAGING = re.compile(r"^\.publishing-v(\d+)-")
_SET_ASIDE = re.compile(r"^\.(?:publishing-v|quarantine-)(\d+)-")  # numbers never to reuse
# What a complete SavedModel directory holds (TF writes the variables index last).
_REQUIRED_FILES = ("saved_model.pb", "variables/variables.index")


class RegistryError(RuntimeError):
    """The registry or the production directory cannot be used as they are; nothing was changed."""


def now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def versions(production: Path) -> list[int]:
    """Published versions, oldest first; staging, pruning and foreign entries are ignored."""
    if not production.is_dir():
        return []
    return sorted(int(entry.name) for entry in production.iterdir() if entry.is_dir() and entry.name.isdigit())


def is_complete(model_dir: Path) -> bool:
    """A cheap structural check of an exported model (no TensorFlow needed)."""
    return all((model_dir / name).is_file() for name in _REQUIRED_FILES)


def read_registry(registry: Path) -> list[dict]:
    """The history so far; a damaged file is an error, never silently replaced."""
    try:
        history = json.loads(registry.read_text(encoding="utf-8")) if registry.exists() else []
    except (ValueError, UnicodeDecodeError) as error:
        raise RegistryError(f"{registry} is not valid JSON ({error}); refusing to overwrite it") from None
    if not isinstance(history, list) or not all(isinstance(entry, dict) for entry in history):
        raise RegistryError(f"{registry} is not a JSON list of records; refusing to overwrite it")
    return history


def append_registry(registry: Path, entry: dict) -> None:
    """Append one entry: the file is rewritten whole to a temporary file and renamed."""
    history = read_registry(registry)
    history.append(entry)
    write_bytes_atomic(registry, (json.dumps(history, indent=2) + "\n").encode())


def recorded_versions(history: list[dict]) -> set[int]:
    return {entry["version"] for entry in history if isinstance(entry.get("version"), int)}


def next_version(production: Path, history: list[dict]) -> int:
    """One past the highest version ever published here, recorded, or tagged in git."""
    # The tags of the repository that holds production/, whatever the working directory.
    holder = next(directory for directory in (production, *production.absolute().parents) if directory.is_dir())
    seen = set(versions(production)) | recorded_versions(history) | set(registered_versions(holder))
    seen |= {int(match.group(1)) for entry in _dot_entries(production) if (match := _SET_ASIDE.match(entry.name))}
    return max(seen, default=0) + 1


def _dot_entries(production: Path) -> list[Path]:
    return [entry for entry in production.iterdir() if entry.name.startswith(".")] if production.is_dir() else []


def _fsync_directory(directory: Path) -> None:
    descriptor = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def _fsync_tree(directory: Path) -> None:
    for path in sorted(directory.rglob("*"), reverse=True):
        if path.is_file():
            with open(path, "rb") as stream:
                os.fsync(stream.fileno())
    _fsync_directory(directory)


@contextlib.contextmanager
def locked(production: Path) -> Iterator[None]:
    """Hold an exclusive lock on the production directory (a lock on the directory itself, so
    nothing is left on disk); a second writer waits for the first."""
    production.mkdir(parents=True, exist_ok=True)
    descriptor = os.open(production, os.O_RDONLY)
    try:
        fcntl.flock(descriptor, fcntl.LOCK_EX)
        yield
    finally:
        os.close(descriptor)  # closing releases the lock


def remove_stale_temporaries(path: Path) -> None:
    """Temporary files that a killed :func:`write_bytes_atomic` of ``path`` left beside it."""
    for stale in path.parent.glob(f".{path.name}.*.tmp"):
        stale.unlink(missing_ok=True)


def _finish_publication(staging: Path, production: Path, version: int) -> None:
    (staging / "model").rename(production / str(version))
    _fsync_directory(production)
    shutil.rmtree(staging, ignore_errors=True)


def _reconcile_leftovers(production: Path, recorded: set[int]) -> list[str]:
    """Finish the renames a killed publish owes; remove its other leftovers."""
    notes = []
    for entry in _dot_entries(production):
        if entry.name.startswith(".pruning-"):
            shutil.rmtree(entry, ignore_errors=True)
        elif match := _STAGING.match(entry.name):
            version = int(match.group(1))
            if version in recorded and not (production / str(version)).exists() and is_complete(entry / "model"):
                _finish_publication(entry, production, version)
                notes.append(f"finished publishing version {version} (recorded, but its run was interrupted)")
            else:
                shutil.rmtree(entry, ignore_errors=True)
    return notes


def _reconcile_unrecorded(production: Path, registry: Path, recorded: set[int]) -> list[str]:
    """Record complete version directories the registry does not know; quarantine incomplete ones."""
    notes = []
    for version in versions(production):
        if version in recorded:
            continue
        directory = production / str(version)
        if is_complete(directory):
            append_registry(registry, {"action": "reconcile", "time": now(), "version": version,
                                       "reason": f"found in {production} without a record; recorded now"})
            notes.append(f"version {version} was served without a record; recorded it now")
        else:
            quarantine = production / f".quarantine-{version}-{datetime.now(UTC):%Y%m%dT%H%M%S}"
            directory.rename(quarantine)
            notes.append(f"version {version} is incomplete and unrecorded; moved it to {quarantine}")
    return notes


def reconcile(production: Path, registry: Path) -> list[str]:
    """Bring production and the registry back to the invariant after a killed run; say what was done.

    The caller holds :func:`locked`."""
    remove_stale_temporaries(registry)
    notes = _reconcile_leftovers(production, recorded_versions(read_registry(registry)))
    notes += _reconcile_unrecorded(production, registry, recorded_versions(read_registry(registry)))
    return notes


def prune(production: Path, keep_versions: int) -> None:
    """Delete all but the newest ``keep_versions`` versions, each renamed away before it is deleted."""
    for old in versions(production)[:-keep_versions]:
        doomed = production / f".pruning-{old}"
        shutil.rmtree(doomed, ignore_errors=True)
        (production / str(old)).rename(doomed)
        shutil.rmtree(doomed)


def publish(model_dir: Path, production: Path, registry: Path, entry: dict, keep_versions: int) -> int:
    """Publish ``model_dir`` as the next version, recording ``entry`` (plus the version) first.

    The caller holds :func:`locked` and has run :func:`reconcile`. Returns the version."""
    version = next_version(production, read_registry(registry))
    staging = Path(tempfile.mkdtemp(dir=production, prefix=f".publishing-v{version}-"))
    try:
        shutil.copytree(model_dir, staging / "model")
        _fsync_tree(staging / "model")
        append_registry(registry, {**entry, "version": version})  # the commit point
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    _finish_publication(staging, production, version)
    prune(production, keep_versions)
    return version
