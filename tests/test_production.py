"""tasks/lib/registry/production.py: crash-safe publish, prune and reconcile of models/production and the registry.

The production module moves directories and rewrites a JSON file; it never loads a model, so these
tests use model-shaped directories (the files a SavedModel has) and need no TensorFlow. The kill
harness at the end SIGKILLs real publishing processes at random instants and checks the invariant
after every kill: every version a reader can see is complete and recorded.
"""

from __future__ import annotations

import json
import random
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest
import yaml

from tasks.lib.registry.production import (
    RegistryError,
    is_complete,
    locked,
    next_version,
    publish,
    read_registry,
    reconcile,
    recorded_versions,
    versions,
)

from .conftest import REPO_ROOT, tool_environment, tree_digest


def make_model(directory: Path, seed: int, size: int = 1 << 20) -> Path:
    """A directory with a SavedModel's files, filled with seeded random bytes."""
    content = random.Random(seed).randbytes(size)
    (directory / "variables").mkdir(parents=True)
    (directory / "saved_model.pb").write_bytes(content[:4096])
    (directory / "fingerprint.pb").write_bytes(content[4096:4160])
    (directory / "variables" / "variables.data-00000-of-00001").write_bytes(content)
    (directory / "variables" / "variables.index").write_bytes(content[:512])
    return directory



@pytest.fixture
def store(tmp_path: Path) -> dict[str, Path]:
    return {"production": tmp_path / "production", "registry": tmp_path / "registry.json",
            "a": make_model(tmp_path / "a", 1), "b": make_model(tmp_path / "b", 2)}


def _publish(store: dict[str, Path], model: str = "a", keep: int = 5) -> int:
    with locked(store["production"]):
        reconcile(store["production"], store["registry"])
        return publish(store[model], store["production"], store["registry"], {"action": "test"}, keep)


def test_publish_records_before_it_shows_and_numbers_from_one(store: dict[str, Path]) -> None:
    assert _publish(store) == 1 and _publish(store, "b") == 2
    assert versions(store["production"]) == [1, 2]
    assert tree_digest(store["production"] / "2") == tree_digest(store["b"])
    assert [entry["version"] for entry in read_registry(store["registry"])] == [1, 2]
    assert sorted(path.name for path in store["production"].iterdir()) == ["1", "2"]


def test_versions_continue_after_the_highest_recorded(store: dict[str, Path]) -> None:
    """A fresh clone with the registry but no production directory never restarts at 1."""
    store["registry"].write_text(json.dumps([{"action": "promote", "version": 7}]))
    assert _publish(store) == 8


def test_versions_continue_after_the_highest_git_tag(store: dict[str, Path], tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """Tags count from the repository holding production/, not the working directory's. Only GTO's
    registrations count: annotated tags of the form mnist-mlp@vN.0.0 (GTO ignores lightweight tags)."""
    repository = tmp_path / "repo"
    repository.mkdir()
    annotated = ["-c", "user.name=t", "-c", "user.email=t@t", "tag", "-a", "-m", "registered"]
    tags = [[*annotated, "mnist-mlp@v12.0.0"], [*annotated, "mnist-mlp@v40"], [*annotated, "other@v99.0.0"],
            ["tag", "mnist-mlp@v50.0.0"]]
    for command in (["init", "-q"], ["-c", "user.name=t", "-c", "user.email=t@t", "commit", "-q", "--allow-empty",
                                     "-m", "x"], *tags):
        subprocess.run(["git", *command], cwd=repository, check=True)
    assert next_version(repository / "models" / "production", []) == 13
    monkeypatch.chdir(repository)  # a test run from a clone full of tags must not see them
    assert next_version(store["production"], []) == 1


def test_reconcile_finishes_a_recorded_publication(store: dict[str, Path]) -> None:
    """Killed between the registry record and the rename: the next run completes the rename."""
    production = store["production"]
    staging = production / ".publishing-v1-abc"
    make_model(staging / "model", 1)
    store["registry"].write_text(json.dumps([{"action": "promote", "version": 1}]))
    with locked(production):
        notes = reconcile(production, store["registry"])
    assert notes == ["finished publishing version 1 (recorded, but its run was interrupted)"]
    assert [path.name for path in production.iterdir()] == ["1"] and is_complete(production / "1")


def test_reconcile_removes_unrecorded_staging_and_pruning_leftovers(store: dict[str, Path]) -> None:
    production = store["production"]
    make_model(production / ".publishing-v3-abc" / "model", 1)  # killed before its record
    (production / ".pruning-1" / "variables").mkdir(parents=True)  # killed while deleting
    store["registry"].parent.joinpath(".registry.json.x1y2.tmp").write_text("[")  # killed while writing
    with locked(production):
        assert reconcile(production, store["registry"]) == [
            "version 3 was interrupted before it was recorded; its number is retired"]
    assert list(production.iterdir()) == [] and list(store["registry"].parent.glob("*.tmp")) == []
    assert _publish(store) == 4  # a client may have seen .publishing-v3-*: 3 is never handed out again


def test_a_killed_publish_never_lets_its_number_be_reused(store: dict[str, Path]) -> None:
    """A publish SIGKILLed while copying (before its commit point) leaves .publishing-v<N>-*; the
    next run removes it and publishes N+1, and so does every run after (the number is recorded)."""
    assert _publish(store) == 1
    (store["production"] / ".publishing-v2-killed" / "model").mkdir(parents=True)
    assert _publish(store, "b") == 3
    assert _publish(store) == 4
    history = read_registry(store["registry"])
    assert [entry.get("abandoned_version") for entry in history if entry["action"] == "abandoned"] == [2]


def test_reconcile_records_or_quarantines_unrecorded_versions(store: dict[str, Path]) -> None:
    production = store["production"]
    make_model(production / "4", 1)
    (production / "5").mkdir()  # incomplete: no saved_model.pb
    with locked(production):
        notes = reconcile(production, store["registry"])
    assert "version 4 was served without a record; recorded it now" in notes
    assert any(note.startswith("version 5 is incomplete and unrecorded; moved it to") for note in notes)
    assert versions(production) == [4] and recorded_versions(read_registry(store["registry"])) == {4}
    assert _publish(store) == 6  # the quarantined number is not reused


def test_prune_never_leaves_half_a_version(store: dict[str, Path]) -> None:
    for _ in range(4):
        _publish(store, keep=2)
    assert sorted(path.name for path in store["production"].iterdir()) == ["3", "4"]


def test_a_damaged_registry_stops_everything(store: dict[str, Path]) -> None:
    store["registry"].write_text("[1, 2")
    with pytest.raises(RegistryError, match="not valid JSON"):
        _publish(store)
    assert versions(store["production"]) == [] and store["registry"].read_text() == "[1, 2"


_DRIVER = """
import sys, random
from pathlib import Path
from tasks.lib.registry.production import locked, publish, reconcile
production, registry, a, b = map(Path, sys.argv[1:5])
print("ready", flush=True)
for round in range(10**6):
    with locked(production):
        reconcile(production, registry)
        publish(a if round % 2 else b, production, registry, {"action": "harness"}, 3)
"""


def _start_driver(store: dict[str, Path]) -> subprocess.Popen:
    arguments = [str(store[key]) for key in ("production", "registry", "a", "b")]
    environment = tool_environment() | {"PYTHONPATH": str(REPO_ROOT)}
    process = subprocess.Popen([sys.executable, "-c", _DRIVER, *arguments], env=environment,
                               stdout=subprocess.PIPE, text=True)
    assert process.stdout is not None and process.stdout.readline().strip() == "ready"
    return process


def _leftovers(store: dict[str, Path]) -> list[str]:
    """What a kill left for the next run to repair, by kind ("clean" when nothing)."""
    recorded = recorded_versions(read_registry(store["registry"]))
    found = []
    for path in store["production"].iterdir():
        if path.name.startswith(".publishing-v"):
            version = int(path.name.split("-")[1][1:])
            found.append("staged, recorded (rolled forward)" if version in recorded else "staged, unrecorded (removed)")
        elif path.name.startswith("."):
            found.append(path.name.split("-")[0].lstrip(".") + " (removed)")
    found += ["registry temp file (removed)" for _ in store["registry"].parent.glob(".registry.json.*.tmp")]
    return sorted(found) or ["clean"]


def _check_invariant(store: dict[str, Path], good: set[str]) -> list[str]:
    """What a reader would see wrong right now: versions incomplete, foreign, or unrecorded."""
    recorded = recorded_versions(read_registry(store["registry"]))
    problems = []
    for version in versions(store["production"]):
        if tree_digest(store["production"] / str(version)) not in good:
            problems.append(f"version {version} is incomplete")
        if version not in recorded:
            problems.append(f"version {version} is served without a record")
    return problems


@pytest.mark.slow
def test_kill_harness_no_unrecorded_or_incomplete_version(store: dict[str, Path]) -> None:
    """SIGKILL a process that publishes and prunes in a loop, 60 times at random instants."""
    good = {tree_digest(store["a"]), tree_digest(store["b"])}
    rng, outcomes, problems = random.Random(0), Counter(), []
    for _ in range(60):
        process = _start_driver(store)
        time.sleep(rng.uniform(0.0, 0.4))
        process.send_signal(signal.SIGKILL)
        process.wait()
        outcomes.update(_leftovers(store))
        problems += _check_invariant(store, good)
    with locked(store["production"]):  # the next run repairs whatever the last kill left
        reconcile(store["production"], store["registry"])
    history = read_registry(store["registry"])
    print(f"\nkill harness: 60 kills; state found after each kill: {dict(outcomes)}; "
          f"{len(history)} publications recorded; problems: {problems or 'none'}")
    assert problems == []
    assert _leftovers(store) == ["clean"] and _check_invariant(store, good) == []
    published = [entry["version"] for entry in history if entry["action"] == "harness"]
    assert published == sorted(set(published)), "a version number was used twice"
    assert len(outcomes) >= 3, f"the kills landed in too few places to test anything: {dict(outcomes)}"


@pytest.mark.slow
def test_concurrent_publishers_take_turns(store: dict[str, Path]) -> None:
    """Two processes publishing at once: distinct versions, one complete record each."""
    processes = [_start_driver(store) for _ in range(2)]
    time.sleep(3)
    for process in processes:
        process.send_signal(signal.SIGKILL)
        process.wait()
    with locked(store["production"]):
        reconcile(store["production"], store["registry"])
    published = [entry["version"] for entry in read_registry(store["registry"]) if entry["action"] == "harness"]
    assert len(published) > 4 and published == sorted(set(published))
    assert _check_invariant(store, {tree_digest(store["a"]), tree_digest(store["b"])}) == []


def test_the_shipped_registry_holds_no_version() -> None:
    """A fresh team's first promotion is version 1: the committed registry records no version, and
    dvc.lock no promotion (its outputs would be versions that no remote of the team can deliver)."""
    history = read_registry(REPO_ROOT / "models" / "registry.json")
    assert history == []
    assert "promote" not in yaml.safe_load((REPO_ROOT / "dvc.lock").read_text())["stages"]
    assert next_version(REPO_ROOT / "models" / ".a-production-never-published", history) == 1  # and no tag
