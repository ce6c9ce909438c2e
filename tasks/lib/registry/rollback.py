"""Serve an earlier version again, on this machine: re-publish version N of ``models/production/``
as the newest (TF Serving serves the highest), recorded in ``models/registry.json``.

The team's rollback moves GTO's ``prod`` stage instead (``tags.assign_prod``);
`python -m tasks.commands.registry` offers both.
"""

from __future__ import annotations

from pathlib import Path

from tasks.lib.params import Paths
from tasks.lib.registry.production import RegistryError, locked, now, publish, reconcile, versions
from tasks.lib.repository import git_revision


def _rollback_target(production: Path, to_version: int | None) -> tuple[int, int]:
    """(the version to restore, the version served now), after checking the target can serve."""
    from tasks.lib.model import ModelLoadError, load_serving_model  # TensorFlow: only once the target is known

    published = versions(production)
    if len(published) < 2 and to_version is None:
        raise RegistryError(f"nothing to roll back to: {production} holds versions {published}")
    target = published[-2] if to_version is None else to_version
    if target not in published:
        raise RegistryError(f"version {target} is not in {production} (available: {published})")
    try:
        load_serving_model(str(production / str(target)))
    except ModelLoadError as error:
        raise RegistryError(f"version {target} cannot serve, so it is not restored: {error}") from None
    return target, published[-1]


def rollback(paths: Paths, to_version: int | None, keep_versions: int) -> int:
    """Re-publish an earlier version of ``paths.production`` as the newest, recorded in
    ``paths.registry``; return its number. ``to_version`` None: the one before the newest."""
    production = paths.production
    with locked(production):
        for note in reconcile(production, paths.registry):
            print(f"rollback: {note}", flush=True)
        target, replaced = _rollback_target(production, to_version)
        entry = {"action": "rollback", "time": now(), "git_revision": git_revision(Path.cwd()),
                 "restored_version": target, "replaced_version": replaced}
        version = publish(production / str(target), production, paths.registry, entry, keep_versions)
    print(f"rollback: version {target} is now served as version {version}; record it with `dvc commit promote`")
    return version
