"""Serve an earlier version again: the one rollback, for this machine and (``--push``) the team.

``prod`` has one meaning everywhere: the highest version in ``models/production/`` (what a TF
Serving server of that directory serves, and the champion the next promotion is compared with),
which is also GTO's ``prod`` stage once pushed. A rollback to version N therefore re-publishes
N's files as the newest version M (crash-safe, through ``production.publish``), recorded in
``models/registry.json`` with the digests of the restored and the replaced model, and then
recorded in DVC (``dvc commit promote``: dvc.lock names the new ``models/production/`` and
registry, so a later ``dvc checkout`` keeps the rollback instead of undoing it). Re-publishing
rather than deleting the newer versions keeps every number meaning one thing forever (M is a new
registry version, never reused) and keeps the rolled-back-from files for a roll forward.

With ``--push`` (:func:`publish_rollback`) the rollback is a team run in miniature: start from the
branch's newest commit, ``dvc pull``, roll back, ``dvc push``, one commit, the GTO tags of M
(registered at that commit and assigned ``prod``), one atomic push. ``dvc artifacts get <remote>
mnist-mlp --stage prod`` then fetches N's files as version M.

A candidate whose files equal those of a version rolled back from (same ``model_sha256``, hence the
same code, params and data: the export is byte-reproducible) is not promoted again
(``production.rolled_back_models``).
"""

from __future__ import annotations

from pathlib import Path

from tasks.lib import repository
from tasks.lib.params import Paths
from tasks.lib.registry.production import RegistryError, locked, now, publish, reconcile, tree_sha256, versions
from tasks.lib.registry.tags import register_promotion


def _rollback_target(production: Path, to_version: int | None) -> tuple[int, int]:
    """(the version to restore, the version served now), after checking the target can serve."""
    from tasks.lib.model import ModelLoadError, load_serving_model  # TensorFlow: only once the target is known

    published = versions(production)
    if len(published) < 2 and to_version is None:
        raise RegistryError(f"nothing to roll back to: {production} holds versions {published}")
    target = published[-2] if to_version is None else to_version
    if target not in published:
        raise RegistryError(f"version {target} is not in {production} (available: {published})")
    if target == published[-1]:
        raise RegistryError(f"version {target} is already the served version (the highest in {production})")
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
        entry = {"action": "rollback", "time": now(), "git_revision": repository.git_revision(Path.cwd()),
                 "restored_version": target, "replaced_version": replaced,
                 "model_sha256": tree_sha256(production / str(target)),
                 "replaced_sha256": tree_sha256(production / str(replaced))}
        version = publish(production / str(target), production, paths.registry, entry, keep_versions)
    print(f"rollback: version {target} is now served as version {version} (replacing version {replaced})",
          flush=True)
    return version


def record_in_dvc(repo: Path) -> None:
    """``dvc commit promote``: dvc.lock records the rolled-back production and registry."""
    result = repository.dvc(repo, "commit", "--force", "--quiet", "promote")
    if result.returncode != 0:
        raise RegistryError("the rollback is served but dvc.lock does not record it (`dvc commit promote` "
                            f"failed: {(result.stderr or result.stdout).strip()}); run it again by hand")


def publish_rollback(repo: Path, paths: Paths, to_version: int | None, keep_versions: int) -> int:
    """The team's rollback: from the branch's newest commit, roll back, record, push (data first)."""
    start = repository.start_from_branch(repo)
    print(f"rollback: {repository.pull_outputs(repo, required=True).summary()}", flush=True)
    version = rollback(paths, to_version, keep_versions)
    record_in_dvc(repo)
    repository.push_data(repo)
    message = f"Roll back mnist-mlp: serve version {version}\n\n" + \
        f"Version {version} is the files of an earlier version, re-published as the newest (models/registry.json)."
    publication = repository.publish_results(repo, start, message,
                                             lambda commit: register_promotion(repo, version, commit))
    print(f"rollback: pushed {publication.commit} to {publication.branch}; tags: {', '.join(publication.tags)}",
          flush=True)
    return version
