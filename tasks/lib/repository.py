"""git and DVC on the project's repository: team mode's branch, remotes and results commit.

A published run (``python -m flows.pipeline --publish``, or the work-pool deployment of
prefect.yaml, whose worker clones the branch first) goes:

1. ``start_from_branch``: the newest commit of the branch, and every tag (the registered model
   versions, which promote numbers after); then ``pull_outputs``: ``dvc pull`` what the DVC
   remote has, so nothing computed before is computed again and the champion is known;
2. the stages, through the flow, as in the local loop;
3. only if a stage ran: ``push_data`` (``dvc push``) first, then ``publish_results``: one commit
   of the results, the registry tags of a promoted version (``tasks.lib.registry.tags``) on
   that commit, and one atomic ``git push``. Data first: every commit on the git remote has its
   data in the DVC remote. If a teammate pushed meanwhile: commits that touch none of the run's
   inputs or outputs are kept by rebasing the run's commit onto them; commits that change an
   input (params, code, data: what dvc.lock records) are joined by a merge commit, the run's
   commit staying on its start commit, so every tagged commit has `dvc status` clean; commits
   that touch a file this run wrote fail the run and the git remote keeps what it had.

Every git and dvc command goes through ``git``/``dvc`` below (and so through
``tasks.lib.processes``); DVC is asked through its Python API where it answers a question
(``open_dvc_repo``), and as a command where it does work whose output a person reads.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import re
import shutil
import socket
import subprocess
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from tasks.lib import processes

REMOTE = "origin"
PUSH_ATTEMPTS = 3


class TeamError(RuntimeError):
    """A team-mode step cannot proceed; the message says why and what was left as it was."""


@dataclass(frozen=True)
class RunStart:
    branch: str
    commit: str


@dataclass(frozen=True)
class Publication:
    commit: str | None  # None: nothing to commit
    branch: str
    tags: list[str] = field(default_factory=list)
    rebased_onto: str | None = None
    run_commit: str | None = None  # the commit the tags name (the head, or the merge's first parent)
    merged_with: str | None = None  # the teammate's tip the run's commit was merged with


def _git(repo: Path, arguments: tuple[str, ...]) -> subprocess.CompletedProcess:
    return processes.run(["git", *arguments], cwd=repo)


def git(repo: Path, *arguments: str, check: bool = True) -> str:
    """Run git in ``repo``; return its output. A failure is a TeamError carrying git's message."""
    result = _git(repo, arguments)
    if check and result.returncode != 0:
        raise TeamError(f"`git {' '.join(arguments)}` failed: {(result.stderr or result.stdout).strip()}")
    return result.stdout.strip()


def git_succeeds(repo: Path, *arguments: str) -> bool:
    return _git(repo, arguments).returncode == 0


def toplevel(path: Path) -> Path | None:
    """The root of the git work tree that holds ``path`` (a directory), or None outside git."""
    result = _git(path, ("rev-parse", "--show-toplevel")) if path.is_dir() else None
    return Path(result.stdout.strip()) if result is not None and result.returncode == 0 else None


def git_revision(repo: Path) -> str:
    """The commit checked out in ``repo``, or "unknown" outside git."""
    result = _git(repo, ("rev-parse", "HEAD"))
    return result.stdout.strip() if result.returncode == 0 else "unknown"


def dvc(repo: Path, *arguments: str, timeout: float | None = 3600, capture: bool = True) -> subprocess.CompletedProcess:
    """Run `dvc` (this interpreter's) in ``repo``; with ``capture`` False its output goes to the terminal."""
    return processes.run(processes.python_module("dvc", *arguments), cwd=repo, timeout=timeout, capture=capture)


def dvc_stream(repo: Path, arguments: list[str], timeout: float,
               on_line: Callable[[str], object]) -> tuple[int, list[str]]:
    """Run `dvc` in ``repo`` handing each output line to ``on_line`` (a Prefect task's log)."""
    return processes.stream(processes.python_module("dvc", *arguments), repo, timeout, on_line)


@contextlib.contextmanager
def open_dvc_repo(repo: Path) -> Iterator:
    """DVC's Python API, in-process (a `dvc` process start costs about a second). DVC resolves
    paths against the working directory, so work from the repository root while it runs."""
    from dvc.repo import Repo  # DVC's import is slow; only callers that ask DVC something pay it

    with contextlib.chdir(repo), Repo(".") as dvc_repo:
        yield dvc_repo


def dvc_lock_holder(repo: Path) -> str | None:
    """The process id holding DVC's repository lock (a running `dvc repro`), or None when free.
    The lock is taken and released at once, the way DVC takes it (zc.lockfile)."""
    import zc.lockfile

    lock = repo / ".dvc" / "tmp" / "lock"
    if not lock.parent.is_dir():
        return None
    try:
        zc.lockfile.LockFile(str(lock)).close()
    except zc.lockfile.LockError:
        return lock.read_text(errors="replace").strip() or "another process"
    return None


def default_remote(repo: Path) -> str | None:
    with open_dvc_repo(repo) as dvc_repo:
        return dvc_repo.config["core"].get("remote")


# ---- the run's directory ---------------------------------------------------------------------

RUN_MARK = ".mnist-pipeline-run"  # in the directory a worker made for one run; locked while it runs
_held_marks: list[int] = []  # descriptors of this process's marks: their locks last as long as it does


def claim_run_directory(directory: Path) -> None:
    """Mark ``directory`` (a worker's temporary directory of this run) as in use, for as long as
    this process lives: an exclusive lock on a file in it, which the kernel drops when the process
    dies, however it dies."""
    staged = directory / f"{RUN_MARK}.{os.getpid()}"
    descriptor = os.open(staged, os.O_RDWR | os.O_CREAT, 0o600)
    fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
    staged.rename(directory / RUN_MARK)  # appears locked: a sweeper never sees it free while we live
    _held_marks.append(descriptor)


def _unlocked(mark: Path) -> bool:
    try:
        descriptor = os.open(mark, os.O_RDWR)
    except OSError:
        return False
    try:
        fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except OSError:
        return False
    finally:
        os.close(descriptor)  # closing releases the lock


def sweep_dead_run_directories(parent: Path, pattern: str) -> list[Path]:
    """Remove the directories in ``parent`` matching ``pattern`` that a run marked and whose run is
    dead (a SIGKILLed worker cannot remove its own); return them. Unmarked ones are not ours."""
    removed = []
    for directory in sorted(parent.glob(pattern)):
        if directory.is_dir() and _unlocked(directory / RUN_MARK):
            shutil.rmtree(directory, ignore_errors=True)
            removed.append(directory)
    return removed


# ---- start of a run -------------------------------------------------------------------------

def current_branch(repo: Path) -> str:
    branch = git(repo, "symbolic-ref", "--quiet", "--short", "HEAD", check=False)
    if not branch:
        raise TeamError(f"{repo}: HEAD is detached; a published run needs a checked-out branch")
    return branch


def ensure_identity(repo: Path) -> None:
    """Commits and tags need an author; a worker machine may have none configured."""
    if not git(repo, "config", "user.email", check=False):
        git(repo, "config", "user.name", "mnist-pipeline")
        git(repo, "config", "user.email", f"mnist-pipeline@{socket.gethostname()}")


def fetch_branch(repo: Path, branch: str) -> str:
    """Fetch the branch (all history: rebase and GTO need it) and every tag; return the remote tip."""
    unshallow = ["--unshallow"] if git(repo, "rev-parse", "--is-shallow-repository") == "true" else []
    # --force: the remote's tags win over stale local ones (a registry tag names one commit).
    git(repo, "fetch", "--quiet", "--tags", "--force", *unshallow, REMOTE, branch)
    return git(repo, "rev-parse", "FETCH_HEAD")


def start_from_branch(repo: Path) -> RunStart:
    """Bring a clean checkout to the newest commit of its branch, with every registry tag."""
    branch = current_branch(repo)
    changed = git(repo, "status", "--porcelain", "--untracked-files=no")
    if changed:
        raise TeamError(f"{repo}: a published run needs a clean checkout; tracked files have changes:\n{changed}")
    tip = fetch_branch(repo, branch)
    if not git_succeeds(repo, "merge", "--ff-only", "--quiet", tip):
        raise TeamError(f"{repo}: the local '{branch}' has commits that {REMOTE}/{branch} has not; "
                        "push or drop them before a published run")
    ensure_identity(repo)
    return RunStart(branch, tip)


def missing_outputs(repo: Path) -> list[str]:
    """Outputs recorded in dvc.lock and kept in DVC's cache that are absent from the workspace."""
    with open_dvc_repo(repo) as dvc_repo:
        return [out.def_path for out in dvc_repo.index.outs if out.use_cache and out.hash_info and not out.exists]


@dataclass(frozen=True)
class PullOutcome:
    remote: str | None
    pulled: list[str] = field(default_factory=list)
    absent: list[str] = field(default_factory=list)  # missing here, and not in the remote either
    failure: str | None = None

    def summary(self) -> str:
        if self.remote is None:
            return "no DVC remote configured; nothing pulled"
        if self.failure:
            return f"dvc pull from remote '{self.remote}' failed ({self.failure}); the stages compute what is missing"
        pulled = f"pulled {', '.join(self.pulled)}" if self.pulled else "nothing to pull"
        absent = f"; not in the remote yet: {', '.join(self.absent)}" if self.absent else ""
        return f"{pulled} (DVC remote '{self.remote}'){absent}"


def pull_outputs(repo: Path, required: bool, timeout: float = 3600) -> PullOutcome:
    """`dvc pull` what the default remote has of the outputs missing here.

    An empty or absent remote is normal (nothing pushed yet): the stages compute what is missing.
    Only missing outputs are pulled, so local changes to an output are never overwritten.
    ``required`` (a published run): no remote, or one that cannot be read, is an error.
    """
    remote = default_remote(repo)
    if remote is None:
        if required:
            raise TeamError("a published run needs a default DVC remote that every clone knows: "
                            "`dvc remote add -d <name> <url>`, then commit .dvc/config")
        return PullOutcome(None)
    missing = missing_outputs(repo)
    if not missing:
        return PullOutcome(remote)
    result = dvc(repo, "pull", "--allow-missing", *missing, timeout=timeout)
    if result.returncode != 0:
        failure = (result.stderr.strip().splitlines() or ["no message"])[-1]
        if required:
            raise TeamError(f"dvc pull from remote '{remote}' failed: {failure}")
        return PullOutcome(remote, failure=failure)
    absent = missing_outputs(repo)
    return PullOutcome(remote, [path for path in missing if path not in absent], absent)


# ---- publishing -------------------------------------------------------------------------------

def push_data(repo: Path, timeout: float = 3600) -> str:
    """`dvc push` every cached output; must succeed before the commit that names them is pushed."""
    result = dvc(repo, "push", timeout=timeout)
    if result.returncode != 0:
        raise TeamError(f"dvc push failed, so nothing was committed or pushed to git:\n{result.stderr.strip()}")
    return result.stdout.strip().splitlines()[-1] if result.stdout.strip() else "dvc push: done"


def result_paths(repo: Path) -> list[str]:
    """What git records of a run: dvc.lock, the outputs DVC leaves to git, the .gitignore DVC writes."""
    with open_dvc_repo(repo) as dvc_repo:
        outs = list(dvc_repo.index.outs)
    paths = {"dvc.lock"} | {out.def_path for out in outs if not out.use_cache}
    paths |= {str(Path(out.def_path).parent / ".gitignore") for out in outs if out.use_cache}
    tracked = set(git(repo, "ls-files", "--", *paths).splitlines())
    return sorted(path for path in paths if (repo / path).exists() or path in tracked
                  or any(name.startswith(path + "/") for name in tracked))


def commit_results(repo: Path, message: str, paths: list[str] | None = None) -> str | None:
    """One commit of the run's results (or of ``paths``); None when git sees no change."""
    git(repo, "add", "--all", "--", *(paths if paths is not None else result_paths(repo)))
    if not git(repo, "diff", "--cached", "--name-only"):
        return None
    git(repo, "commit", "--quiet", "--no-verify", "-m", message)
    return git(repo, "rev-parse", "HEAD")


def run_paths(repo: Path, commit: str) -> list[str]:
    """What the run at ``commit`` read or wrote, as its dvc.lock records it: every stage's deps,
    params files and outs, with dvc.yaml and dvc.lock (a change there changes what a stage runs)."""
    lock = yaml.safe_load(git(repo, "show", f"{commit}:dvc.lock", check=False) or "{}") or {}
    paths = {"dvc.yaml", "dvc.lock"}
    for stage in (lock.get("stages") or {}).values():
        paths |= {entry["path"] for entry in [*stage.get("deps", []), *stage.get("outs", [])]}
        paths |= set(stage.get("params") or {})
    return sorted(paths)


def _touches(files: set[str], paths: list[str]) -> list[str]:
    """The files that are one of ``paths`` or lie under one of them (a directory output)."""
    return sorted(name for name in files if any(name == path or name.startswith(path.rstrip("/") + "/")
                                                for path in paths))


def _join(repo: Path, commit: str, tip: str) -> tuple[str, str | None, str | None]:
    """Join the run's ``commit`` with the branch's new ``tip``: (the run's commit, rebased onto,
    merged with).

    A teammate's commits that change none of the run's inputs or outputs: the run's commit is
    rebased onto them (it stays consistent: its dvc.lock still describes its tree). Commits that
    change an input (params, code, data): the run's commit stays on its start commit, where its
    dvc.lock is true, and a merge commit joins the two; the next run trains their change. Commits
    that change a file the run also wrote: nothing is pushed (TeamError)."""
    git(repo, "reset", "--quiet", "--hard", commit)
    ours = set(git(repo, "diff", "--name-only", f"{commit}~1", commit).splitlines())
    base = git(repo, "merge-base", commit, tip)
    theirs = set(git(repo, "diff", "--name-only", base, tip).splitlines())
    commits = git(repo, "log", "--format=%h %an: %s", f"{base}..{tip}")
    if overlap := sorted(ours & theirs):
        raise TeamError("the branch moved during this run and the new commits change files this run also wrote "
                        f"({', '.join(overlap)}):\n{commits}\nNothing was pushed to git (the git remote is as "
                        "it was; the data in the DVC remote is harmless); the next run starts from their commit.")
    if inputs := _touches(theirs, run_paths(repo, commit)):
        message = (f"Merge {tip[:12]} into this run's results\n\nThe branch moved during the run, and the new "
                   f"commits change what the run read ({', '.join(inputs)}), so the run's commit stays on the "
                   f"commit it started from (its dvc.lock is true there) and the next run trains their change:\n"
                   f"{commits}")
        if not git_succeeds(repo, "merge", "--quiet", "--no-ff", "--no-verify", "-m", message, tip):
            git(repo, "merge", "--abort", check=False)
            raise TeamError(f"could not merge {tip[:12]} with this run's commit; nothing was pushed to git")
        return commit, None, tip
    if not git_succeeds(repo, "rebase", "--quiet", tip):
        git(repo, "rebase", "--abort", check=False)
        raise TeamError(f"could not rebase this run's commit onto {tip[:12]}; nothing was pushed to git")
    return git(repo, "rev-parse", "HEAD"), tip, None


def publish_results(repo: Path, start: RunStart, message: str,
                    tag_commit: Callable[[str], list[str]] = lambda commit: [],
                    paths: list[str] | None = None) -> Publication:
    """Commit the results (or ``paths``), tag the run's commit (``tag_commit(commit)``: make the
    local tags, return their names; the registry's, for a promoted version), push the branch and
    the tags in one atomic push. The tags always name the run's own commit, where `dvc status` is clean."""
    commit = commit_results(repo, message, paths)
    if commit is None:
        return Publication(None, start.branch)
    rebased_onto = merged_with = None
    for _attempt in range(PUSH_ATTEMPTS):
        tip = fetch_branch(repo, start.branch)
        if git(repo, "rev-parse", f"{commit}~1") != tip:
            commit, rebased, merged = _join(repo, commit, tip)
            rebased_onto, merged_with = rebased or rebased_onto, merged
        tags = tag_commit(commit)
        if _push(repo, start.branch, tags):
            return Publication(git(repo, "rev-parse", "HEAD"), start.branch, tags, rebased_onto, commit, merged_with)
        for tag in tags:  # the branch moved again: tag the joined commit next time
            git(repo, "tag", "--delete", tag)
    raise TeamError(f"the branch kept moving; gave up after {PUSH_ATTEMPTS} pushes (the git remote is as it was)")


def _push(repo: Path, branch: str, tags: list[str]) -> bool:
    """One atomic push of the branch and the tags: all of it lands, or none. False: branch moved."""
    refs = [f"HEAD:refs/heads/{branch}", *(f"refs/tags/{tag}" for tag in tags)]
    result = _git(repo, ("push", "--atomic", "--porcelain", REMOTE, *refs))
    if result.returncode == 0:
        return True
    if re.search(rf"refs/heads/{re.escape(branch)}\t\[rejected\] \((fetch first|non-fast-forward)\)", result.stdout):
        return False
    raise TeamError(f"git push to {REMOTE} failed; nothing was pushed:\n{(result.stdout + result.stderr).strip()}")


# ---- a grid's cells on the team's remotes (flows/grid.py) ----------------------------------------

def pushed_commit(repo: Path) -> RunStart:
    """The branch and commit a grid runs from: a clean checkout whose HEAD is on the team's
    remote (the workers clone from there), fetched and checked here."""
    branch = current_branch(repo)
    if changed := git(repo, "status", "--porcelain", "--untracked-files=no"):
        raise TeamError(f"{repo}: the workers run the grid from a commit; commit (and push) these changes first:\n"
                        f"{changed}")
    commit, tip = git(repo, "rev-parse", "HEAD"), fetch_branch(repo, branch)
    if not git_succeeds(repo, "merge-base", "--is-ancestor", commit, tip):
        raise TeamError(f"{repo}: commit {commit[:12]} is not on {REMOTE}/{branch}, which the workers clone; "
                        f"`git push {REMOTE} {branch}` first")
    return RunStart(branch, commit)


def checkout_commit(repo: Path, commit: str) -> None:
    """A worker's clone (the branch's newest, shallow) detached at the grid's ``commit``."""
    unshallow = ["--unshallow"] if git(repo, "rev-parse", "--is-shallow-repository") == "true" else []
    git(repo, "fetch", "--quiet", *unshallow, REMOTE)
    if not git_succeeds(repo, "cat-file", "-e", f"{commit}^{{commit}}"):
        raise TeamError(f"commit {commit} is not on the branch the worker cloned from {REMOTE}; push it first")
    git(repo, "checkout", "--quiet", "--detach", commit)


def remote_experiments(repo: Path, baseline: str) -> set[str]:
    """The names of the DVC experiments of commit ``baseline`` on the git remote: the refs
    `dvc exp push` writes, ``refs/exps/<2 hex>/<38 hex>/<name>`` (what `dvc exp list origin --rev`
    reads, one git call instead of a DVC process)."""
    prefix = f"refs/exps/{baseline[:2]}/{baseline[2:]}/"
    result = _git(repo, ("ls-remote", REMOTE, f"{prefix}*"))
    if result.returncode != 0:
        raise TeamError(f"git ls-remote {REMOTE} failed: {result.stderr.strip()}")
    refs = (line.split("\t", 1)[1] for line in result.stdout.splitlines() if "\t" in line)
    return {ref.removeprefix(prefix) for ref in refs if ref.startswith(prefix)}
