"""Team mode under faults, against real parts (issue 21): a `prefect server`, a `prefect worker`
on the `process` pool running prefect.yaml's deployment, a bare git remote, a local DVC remote,
tiny synthetic data. The team fixture is test_team.py's (its own instance for this module).

* a teammate's params push during a run: the version tag stays on the run's own commit (where
  `dvc status` is clean), a merge commit joins the two, and the next run trains their change;
* one rollback (`python -m tasks.commands.registry rollback --to N --push`) moves GTO's prod, what
  `dvc artifacts get --stage prod` fetches, what TF Serving serves from models/production/ and the
  next champion together; the rolled-back-from lineage is not promoted again.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import yaml

from tasks.lib.registry import tags
from tasks.lib.registry.production import tree_sha256, versions

from . import test_team
from .conftest import dvc, run_command
from .test_team import Team, _completed, logged, run_once, teammate_change, trigger, wait, wait_for_task

team = test_team.team  # the same fixture: its own server, worker and remotes for this module

pytestmark = [pytest.mark.server, pytest.mark.slow]


def _fresh_at(team: Team, directory: Path, revision: str) -> Path:
    clone = team.clone(directory)
    run_command(["git", "fetch", "-q", "--tags"], clone)
    run_command(["git", "checkout", "-q", revision], clone)
    dvc(clone, "pull")  # no --allow-missing: every output of the commit is in the DVC remote
    return clone


def _registered(team: Team) -> list[int]:
    """Versions tagged on the remote (GTO reads a work tree; the remote is bare)."""
    found = team.git("tag", "--list", "mnist-mlp@v*").split()
    return sorted(int(tag.split("@v")[1].split(".")[0]) for tag in found)


def _prod(team: Team, directory: Path) -> int | None:
    """GTO's prod on the remote, as a fresh clone with every tag sees it."""
    clone = team.clone(directory)
    run_command(["git", "fetch", "-q", "--tags"], clone)
    return tags.prod_version(clone)


def _params(team: Team, revision: str) -> dict:
    return yaml.safe_load(team.git("show", f"{revision}:params.yaml"))


def test_teammates_params_push_during_a_run_is_merged_and_every_tag_is_consistent(
        team: Team, tmp_path: Path) -> None:
    teammate_change(team, tmp_path / "first", "Train 80 steps", "train", steps=80)
    (run,) = trigger(team)
    wait_for_task(team, run, "git-sync")  # the run trains 80 steps from here on
    theirs = teammate_change(team, tmp_path / "second", "Train 90 steps", "train", steps=90)
    (run,) = wait(team, [run])
    _completed(team, run)
    head = team.head()
    ours, merged = team.git("rev-list", "--parents", "-n1", head).split()[1:]
    assert merged == theirs  # a merge commit joins the run's commit and the teammate's
    assert _params(team, ours)["train"]["steps"] == 80 and _params(team, head)["train"]["steps"] == 90
    version = max(_registered(team))
    assert team.git("rev-parse", f"{tags.version_tag(version)}^{{commit}}") == ours  # the tag: the run's commit
    logged(team, run.id, f"merged with {theirs[:12]}")

    _completed(team, rerun := run_once(team))  # the next run trains the teammate's change
    assert f"promoted as mnist-mlp version {version + 1}" in team.git("log", "-1", "--format=%s")
    assert "train" in logged(team, rerun.id, "train: ran in")
    for number in _registered(team):  # every tagged commit is consistent
        clone = _fresh_at(team, tmp_path / f"at-v{number}", tags.version_tag(number))
        assert "Data and pipelines are up to date" in dvc(clone, "status").stdout, number


def _decision(team: Team) -> dict:
    record = json.loads(team.git("show", "HEAD:reports/promotion.json"))
    return record


def test_one_rollback_moves_gto_prod_serving_and_the_champion_and_holds(team: Team, tmp_path: Path) -> None:
    if len(_registered(team)) < 2:  # run alone (-k): promote a second version first
        teammate_change(team, tmp_path / "teammate", "Train 70 steps", "train", steps=70)
        _completed(team, run_once(team))
    operator = _fresh_at(team, tmp_path / "operator", "main")
    run_command(["git", "checkout", "-q", "main"], operator)
    newest = versions(operator / "models" / "production")[-1]
    restored, withdrawn = newest - 1, newest
    restored_sha = tree_sha256(operator / "models" / "production" / str(restored))
    withdrawn_sha = tree_sha256(operator / "models" / "production" / str(withdrawn))
    result = run_command([sys.executable, "-m", "tasks.commands.registry", "rollback", "--to", str(restored),
                          "--push"], operator)
    served = newest + 1
    assert f"version {restored} is now served as version {served}" in result.stdout

    # GTO's prod, `dvc artifacts get --stage prod`, TF Serving's directory: the same bytes
    assert _prod(team, tmp_path / "gto-1") == served
    dvc(tmp_path, "artifacts", "get", str(team.remote), "mnist-mlp", "--stage", "prod", "-o", "prod")
    assert versions(tmp_path / "prod")[-1] == served
    assert tree_sha256(tmp_path / "prod" / str(served)) == restored_sha
    fresh = _fresh_at(team, tmp_path / "fresh", "main")
    assert versions(fresh / "models" / "production")[-1] == served
    assert tree_sha256(fresh / "models" / "production" / str(served)) == restored_sha
    dvc(fresh, "checkout", "--force")  # recorded in dvc.lock: a checkout keeps the rollback
    assert versions(fresh / "models" / "production")[-1] == served
    assert "Data and pipelines are up to date" in dvc(fresh, "status").stdout

    # the rolled-back-from lineage comes back (promote re-runs on the same candidate): not promoted
    teammate_change(team, tmp_path / "again", "Promote above 0.49", "promote", min_accuracy=0.49)
    _completed(team, run_once(team))
    decision = _decision(team)
    assert decision["model_sha256"] == withdrawn_sha and not decision["promoted"]
    assert decision["champion_version"] == served  # the champion is the served version
    assert f"the candidate is the model of version {withdrawn}" in decision["reason"]
    assert "rolled back from" in decision["reason"]
    assert _prod(team, tmp_path / "gto-2") == served

    # a different candidate is promoted under a new number and becomes prod
    teammate_change(team, tmp_path / "different", "Train 110 steps", "train", steps=110)
    _completed(team, run_once(team))
    decision = _decision(team)
    assert decision["promoted"] and decision["version"] == served + 1
    assert decision["champion_version"] == served
    assert _prod(team, tmp_path / "gto-3") == served + 1
