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
  point, only a staging directory is left, and the next run removes it and records its number
  as abandoned (a number once handed out is never handed out again); killed after it, the
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
from tasks.lib.digests import tree_sha256 as files_sha256
from tasks.lib.files import FileProblem, directory_or_absent, environment_error, read_text_file
from tasks.lib.registry.tags import registered_versions

_STAGING = re.compile(r"^\.publishing-v(\d+)-")
_SET_ASIDE = re.compile(r"^\.(?:publishing-v|quarantine-)(\d+)-")  # numbers never to reuse
# What a complete SavedModel directory holds (TF writes the variables index last).
_REQUIRED_FILES = ("saved_model.pb", "variables/variables.index")
MAX_REGISTRY_BYTES = 64 << 20  # ~100000 records; a bigger file is not a registry this code wrote
MAX_VERSION = 2**63 - 1  # TF Serving numbers versions with int64


class RegistryError(RuntimeError):
    """The registry or the production directory cannot be used as they are; nothing was changed."""


def now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def versions(production: Path) -> list[int]:
    """Published versions, oldest first; staging, pruning and foreign entries are ignored.
    Something other than a directory where production belongs is a RegistryError."""
    try:
        if not directory_or_absent(production):
            return []
    except FileProblem as error:
        raise RegistryError(str(error)) from None
    return sorted(int(entry.name) for entry in production.iterdir() if entry.is_dir() and entry.name.isdigit())


def tree_sha256(model_dir: Path) -> str:
    """SHA-256 of a model directory's file names and bytes: equal exactly when the files are.
    The export is byte-reproducible (tasks/lib/model.py), so it names the model's lineage."""
    try:
        return files_sha256(Path(model_dir))  # checks the tree first: no FIFO or endless file is read
    except FileProblem as error:
        raise RegistryError(str(error)) from None


def is_complete(model_dir: Path) -> bool:
    """A cheap structural check of an exported model (no TensorFlow needed)."""
    return all((model_dir / name).is_file() for name in _REQUIRED_FILES)


def read_registry(registry: Path) -> list[dict]:
    """The history so far; a damaged file is an error, never silently replaced."""
    if not os.path.lexists(registry):
        return []
    try:
        history = json.loads(read_text_file(registry, MAX_REGISTRY_BYTES))
    except FileProblem as error:  # a FIFO, a directory, a link to an endless file: never read
        raise RegistryError(f"{error}; refusing to use or overwrite it") from None
    except (ValueError, RecursionError) as error:
        raise RegistryError(f"{registry} is not valid JSON ({error}); refusing to overwrite it") from None
    if not isinstance(history, list) or not all(isinstance(entry, dict) for entry in history):
        raise RegistryError(f"{registry} is not a JSON list of records; refusing to overwrite it")
    return history


def append_registry(registry: Path, entry: dict) -> None:
    """Append one entry: the file is rewritten whole to a temporary file and renamed."""
    history = read_registry(registry)
    history.append(entry)
    write_bytes_atomic(registry, (json.dumps(history, indent=2) + "\n").encode())


def rolled_back_models(history: list[dict]) -> dict[str, dict]:
    """``model_sha256`` of every model a rollback replaced and no later rollback restored, each
    with that rollback's record: the lineages (code, params, data) not to promote again."""
    withdrawn: dict[str, dict] = {}
    for entry in history:
        if entry.get("action") == "rollback":
            if replaced := entry.get("replaced_sha256"):
                withdrawn[replaced] = entry
            withdrawn.pop(entry.get("model_sha256"), None)
    return withdrawn


def recorded_versions(history: list[dict]) -> set[int]:
    """Versions the history published, and numbers it set aside (an abandoned publish's)."""
    numbers = {entry.get(key) for entry in history for key in ("version", "abandoned_version")}
    return {number for number in numbers if isinstance(number, int) and not isinstance(number, bool)}


def next_version(production: Path, history: list[dict]) -> int:
    """One past the highest version ever published here, recorded, or tagged in git."""
    # The tags of the repository that holds production/, whatever the working directory.
    holder = next(directory for directory in (production, *production.absolute().parents) if directory.is_dir())
    seen = set(versions(production)) | recorded_versions(history) | set(registered_versions(holder))
    seen |= {int(match.group(1)) for entry in _dot_entries(production) if (match := _SET_ASIDE.match(entry.name))}
    highest = max(seen, default=0)
    if highest >= MAX_VERSION:
        raise RegistryError(f"version {highest} (recorded in the registry, {production} or a git tag) leaves no "
                            f"next version within TF Serving's int64 limit {MAX_VERSION}")
    return highest + 1


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
    versions(production)  # something other than a directory there is a RegistryError
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


def _reconcile_leftovers(production: Path, registry: Path, recorded: set[int]) -> list[str]:
    """Finish the renames a killed publish owes; remove its other leftovers. The number of a
    publish killed before its commit point is recorded as abandoned first, so it is never
    handed out again (a client may have seen the staging directory's name)."""
    notes = []
    for entry in _dot_entries(production):
        if entry.name.startswith(".pruning-"):
            shutil.rmtree(entry, ignore_errors=True)
        elif match := _STAGING.match(entry.name):
            version = int(match.group(1))
            if version in recorded and not (production / str(version)).exists() and is_complete(entry / "model"):
                _finish_publication(entry, production, version)
                notes.append(f"finished publishing version {version} (recorded, but its run was interrupted)")
                continue
            if version not in recorded:
                append_registry(registry, {"action": "abandoned", "time": now(), "abandoned_version": version,
                                           "reason": "a publish was interrupted before its commit point; "
                                                     "this number is not used again"})
                recorded.add(version)
                notes.append(f"version {version} was interrupted before it was recorded; its number is retired")
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
    notes = _reconcile_leftovers(production, registry, recorded_versions(read_registry(registry)))
    notes += _reconcile_unrecorded(production, registry, recorded_versions(read_registry(registry)))
    return notes


def prune(production: Path, keep_versions: int) -> None:
    """Delete all but the newest ``keep_versions`` versions, each renamed away before it is deleted."""
    for old in versions(production)[:-keep_versions]:
        doomed = production / f".pruning-{old}"
        shutil.rmtree(doomed, ignore_errors=True)
        (production / str(old)).rename(doomed)
        # After the commit point nothing may fail the stage: what cannot be deleted now (a
        # read-only file below it) is swept by the next run's reconcile.
        shutil.rmtree(doomed, ignore_errors=True)


def _copy_model(source: Path, target: Path) -> None:
    """copytree, whose failures (a list of them, in one shutil.Error) become one OSError naming the file."""
    try:
        shutil.copytree(source, target)
    except shutil.Error as error:
        origin, destination, why = error.args[0][0]
        raise environment_error(str(why), Path(destination)) or RegistryError(
            f"cannot copy {origin} to {destination}: {why}") from None


def publish(model_dir: Path, production: Path, registry: Path, entry: dict, keep_versions: int) -> int:
    """Publish ``model_dir`` as the next version, recording ``entry`` (plus the version) first.

    The caller holds :func:`locked` and has run :func:`reconcile`. Returns the version."""
    version = next_version(production, read_registry(registry))
    staging = Path(tempfile.mkdtemp(dir=production, prefix=f".publishing-v{version}-"))
    try:
        _copy_model(model_dir, staging / "model")
        _fsync_tree(staging / "model")
        append_registry(registry, {**entry, "version": version})  # the commit point
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    _finish_publication(staging, production, version)
    prune(production, keep_versions)
    return version
