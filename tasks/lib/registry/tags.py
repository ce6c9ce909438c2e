"""The model registry as the team sees it: GTO's git tags, which DVC reads (`dvc artifacts get`).

Version N of ``models/production/`` (TF Serving's integer versions) is registered as the tag
``mnist-mlp@vN.0.0`` (GTO accepts only semantic versions, so ``@vN`` alone would be invisible
to ``gto show``, ``dvc artifacts get`` and DVC Studio) at the commit that published it; the
served one carries stage ``prod`` (tag ``mnist-mlp#prod#K``). ``dvc artifacts get <git-url>
mnist-mlp --stage prod`` fetches ``models/production/`` as of the commit of the newest ``prod``
assignment. A run's promotion registers its version at the run's own commit (where `dvc status`
is clean) and assigns it prod; so does a rollback (``tasks/lib/registry/rollback.py``: the files
of an earlier version re-published under a new number), so prod is always the highest version of
``models/production/``, the one TF Serving serves. Queries and tags go through ``gto.api``; the
only git done here by hand is fetching and pushing the tags, and keeping assignments in order
(below).
"""

from __future__ import annotations

import time
from pathlib import Path

from tasks.lib.repository import TeamError, git, toplevel

ARTIFACT = "mnist-mlp"  # the model's name in DVC's model registry (dvc.yaml `artifacts:`)
STAGE = "prod"


def gto_version(version: int) -> str:
    """TF Serving version N as the semantic version GTO requires."""
    return f"v{version}.0.0"


def version_tag(version: int) -> str:
    """Version N's git tag in DVC's model registry."""
    return f"{ARTIFACT}@{gto_version(version)}"


def _serving_version(semantic: str | None) -> int | None:
    """N of ``vN.0.0``; None for anything else (a version this project did not register)."""
    if not semantic or not semantic.startswith("v") or not semantic.endswith(".0.0"):
        return None
    number = semantic[1:-4]
    return int(number) if number.isdigit() else None


def registered_versions(repo: Path) -> list[int]:
    """TF Serving versions registered in the tags of the git repository holding the directory
    ``repo``, ascending (none outside git)."""
    root = toplevel(repo)
    if root is None:
        return []
    from gto.api import show  # a second to import: only where there is a git repository to ask
    from gto.exceptions import ArtifactNotFound

    try:
        shown = show(str(root), ARTIFACT, registered_only=True)
    except ArtifactNotFound:  # nothing registered yet
        return []
    found = (_serving_version(entry["version"]) for entry in shown)
    return sorted(version for version in found if version is not None)


def prod_version(repo: Path) -> int | None:
    """The version in stage prod, as `dvc artifacts get --stage prod` finds it: the newest assignment."""
    from gto.api import show

    root = toplevel(repo)
    if root is None:
        return None
    return _serving_version(show(str(root)).get(ARTIFACT, {}).get("stage", {}).get(STAGE))


def _tags(repo: Path) -> set[str]:
    return set(git(repo, "tag", "--list", f"{ARTIFACT}[@#]*").splitlines())


def _after_last_assignment(repo: Path) -> None:
    """GTO and DVC order stage assignments by tag time, in whole seconds: the new one must come later."""
    times = git(repo, "for-each-ref", "--format=%(taggerdate:unix)", f"refs/tags/{ARTIFACT}#{STAGE}#*").split()
    wait = max((int(value) for value in times if value.isdigit()), default=0) + 1 - time.time()
    if wait > 5:
        raise TeamError(f"the newest {STAGE} assignment is {wait:.0f} s in this machine's future; a new one "
                        "would sort before it. Check this machine's clock; nothing was tagged")
    time.sleep(max(wait, 0))


def _assign(repo: Path, version: int) -> None:
    from gto.api import assign

    _after_last_assignment(repo)
    assign(str(repo), ARTIFACT, STAGE, version=gto_version(version), force=True,
           message=f"Assign {ARTIFACT} version {version} to {STAGE}")


def register_promotion(repo: Path, version: int, commit: str = "HEAD") -> list[str]:
    """Register version N at ``commit`` (the run's own, where `dvc status` is clean) and assign it
    stage prod; return the new local tags."""
    from gto.api import register
    from gto.exceptions import GTOException

    before = _tags(repo)
    try:
        register(str(repo), ARTIFACT, commit, version=gto_version(version),
                 message=f"Register {ARTIFACT} version {version} (models/production/{version})")
        _assign(repo, version)
    except GTOException as error:
        raise TeamError(f"cannot register {ARTIFACT} version {version}: {error}; nothing was pushed to git") from None
    return sorted(_tags(repo) - before)
