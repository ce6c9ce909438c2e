"""flows/grid.py without a server: which commit a grid runs from, and the arguments it takes.
The grid on real workers is tests/test_grid_pool.py."""

from __future__ import annotations

from pathlib import Path

import pytest

from flows.grid import grid_commit, main
from tasks.lib.repository import TeamError, pushed_commit

from .conftest import run_command


def _commit(repo: Path, files: dict[str, str], message: str) -> str:
    for name, text in files.items():
        (repo / name).parent.mkdir(parents=True, exist_ok=True)
        (repo / name).write_text(text)
    run_command(["git", "add", "-A"], repo)
    run_command(["git", "commit", "-qm", message], repo)
    return run_command(["git", "rev-parse", "HEAD"], repo).stdout.strip()


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    repo = tmp_path / "repo"
    repo.mkdir()
    run_command(["git", "init", "-q", "-b", "main"], repo)
    run_command(["git", "config", "user.email", "test@example.invalid"], repo)
    run_command(["git", "config", "user.name", "test"], repo)
    return repo


def test_a_table_only_commit_keeps_the_grid_of_the_commit_before(repo: Path) -> None:
    output = Path("reports/experiments")
    code = _commit(repo, {"params.yaml": "train: {steps: 1}\n"}, "params")
    first_table = _commit(repo, {"reports/experiments/table.md": "a\n"}, "Grid of 4: table")
    second_table = _commit(repo, {"reports/experiments/accuracy.png": "b\n"}, "Grid of 4: picture")
    assert grid_commit(repo, second_table, output) == code == grid_commit(repo, first_table, output)
    assert grid_commit(repo, code, output) == code
    changed = _commit(repo, {"reports/experiments/table.md": "c\n", "params.yaml": "train: {steps: 2}\n"}, "both")
    assert grid_commit(repo, changed, output) == changed  # an input changed with it: a new grid
    assert grid_commit(repo, changed, Path("elsewhere")) == changed


def test_the_grid_runs_only_from_a_clean_commit_the_remote_has(repo: Path, tmp_path: Path) -> None:
    _commit(repo, {"params.yaml": "a: 1\n"}, "first")
    remote = tmp_path / "remote.git"
    run_command(["git", "clone", "-q", "--bare", str(repo), str(remote)], tmp_path)
    run_command(["git", "remote", "add", "origin", str(remote)], repo)
    assert pushed_commit(repo).branch == "main"
    (repo / "params.yaml").write_text("a: 2\n")
    with pytest.raises(TeamError, match="commit .and push. these changes first"):
        pushed_commit(repo)
    _commit(repo, {}, "second")
    with pytest.raises(TeamError, match="is not on origin/main, which the workers clone; `git push origin main` first"):
        pushed_commit(repo)


def test_the_pool_executor_needs_a_pool_and_a_server(monkeypatch: pytest.MonkeyPatch,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--seeds", "1"]) == 2
    assert "give --pool" in capsys.readouterr().err
    monkeypatch.delenv("PREFECT_API_URL", raising=False)
    assert main(["--pool", "mnist-pool"]) == 2
    assert "set PREFECT_API_URL" in capsys.readouterr().err
