"""The pipeline as a Prefect flow: download -> train -> evaluate -> promote, each through DVC.

Each Prefect task runs ``dvc repro --single-item <stage>``, so DVC decides what is stale and
``dvc.lock``, the cache and the run-cache stay the single truth: an unchanged stage is skipped
by DVC and shown in Prefect as a Completed state named "Skipped". Prefect adds what DVC does
not have: retries (download, with exponential backoff), per-stage time-outs, the stage output
streamed into the run logs, and artifacts — a table of the evaluation metrics against the
last commit and a summary of the promotion decision. No TensorFlow here.

    python -m flows.pipeline [--repo .]

With ``PREFECT_API_URL`` set, the run is recorded on that server; otherwise Prefect starts a
temporary local server for the run.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

from dvc.repo import Repo
from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.states import Completed, State

from tasks.params import Params, load_params

STAGES = ("download", "train", "evaluate", "promote")


class StageFailed(RuntimeError):
    """A DVC stage exited non-zero or ran past its time-out; the message carries its last output."""


@dataclass(frozen=True)
class StageOutcome:
    stage: str
    skipped: bool
    seconds: float


def tool_environment() -> dict[str, str]:
    """Stage commands say `python`; make it this interpreter, unbuffered so logs stream live."""
    path = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"
    return {**os.environ, "PATH": path, "PYTHONUNBUFFERED": "1"}


def run_command(command: list[str], repo: Path, timeout: float, log: object) -> list[str]:
    """Run ``command`` in ``repo``, logging each output line as it comes; kill it after ``timeout``."""
    process = subprocess.Popen(command, cwd=repo, env=tool_environment(), stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True, bufsize=1, start_new_session=True)
    timed_out = threading.Event()

    def kill() -> None:
        timed_out.set()
        os.killpg(process.pid, signal.SIGTERM)  # the whole group: dvc and the stage it runs

    watchdog = threading.Timer(timeout, kill)
    watchdog.start()
    lines = []
    try:
        for line in process.stdout:  # type: ignore[union-attr]
            lines.append(line.rstrip())
            log.info(line.rstrip())
        process.wait()
    finally:
        watchdog.cancel()
    if timed_out.is_set():
        raise StageFailed(f"`{' '.join(command)}` timed out after {timeout:.0f} s")
    if process.returncode != 0:
        tail = "\n".join(lines[-15:])
        raise StageFailed(f"`{' '.join(command)}` failed with exit code {process.returncode}:\n{tail}")
    return lines


# persist_result=False: outcomes stay in memory; Prefect would otherwise pickle them to disk.
@contextlib.contextmanager
def open_dvc_repo(repo: Path) -> Iterator[Repo]:
    """DVC's Python API, in-process (a `dvc` process start costs about a second). DVC resolves
    paths against the working directory, so work from the repository root while it runs."""
    with contextlib.chdir(repo), Repo(".") as dvc_repo:
        yield dvc_repo


def stage_is_up_to_date(stage: str, repo: Path) -> bool:
    """DVC's own verdict, as `dvc status <stage>` gives it."""
    with open_dvc_repo(repo) as dvc_repo:
        return not dvc_repo.status(targets=[stage])


@task(task_run_name="{stage}", persist_result=False)
def reproduce_stage(stage: str, repo: Path, timeout: float) -> StageOutcome | State:
    """Bring one DVC stage up to date; report it as skipped when DVC found nothing to do."""
    started = time.perf_counter()
    log = get_run_logger()
    skipped = stage_is_up_to_date(stage, repo)
    if not skipped:
        lines = run_command([sys.executable, "-m", "dvc", "repro", "--single-item", stage], repo, timeout, log)
        skipped = any(f"Stage '{stage}' didn't change, skipping" in line for line in lines)
    outcome = StageOutcome(stage, skipped, round(time.perf_counter() - started, 2))
    if skipped:
        log.info("Stage '%s' didn't change, skipping", stage)
        return Completed(name="Skipped", message=f"{stage}: inputs unchanged, DVC skipped it", data=outcome)
    return outcome


def metrics_table(repo: Path, metrics_file: str) -> list[dict[str, object]]:
    """Rows of `dvc metrics diff --all` (workspace against HEAD): metric, last commit, now, change."""
    with open_dvc_repo(repo) as dvc_repo:
        diff = dvc_repo.metrics.diff(a_rev="HEAD", all=True).get("diff", {}).get(metrics_file, {})
    return [{"metric": name, "last commit": values.get("old"), "this run": values.get("new"),
             "change": values.get("diff")} for name, values in sorted(diff.items())]


def promotion_markdown(promotion_file: Path) -> str:
    decision = json.loads(promotion_file.read_text())
    verdict = f"promoted as version **{decision['version']}**" if decision["promoted"] else "**rejected**"
    champion = decision.get("champion_version")
    lines = [f"# Promotion: {verdict}", "", decision["reason"], "",
             "| | test accuracy |", "| --- | --- |",
             f"| candidate | {decision.get('candidate_accuracy')} |",
             f"| champion {f'v{champion}' if champion else '(none)'} | {decision.get('champion_accuracy')} |",
             "", f"git revision `{decision.get('git_revision')}`, recorded {decision.get('time')}"]
    return "\n".join(lines)


def _stage_task(stage: str, params: Params):
    schedule = params.schedule
    if stage != "download":  # train resumes from checkpoints when re-run; no blind retries
        return reproduce_stage
    delays = [schedule.retry_delay_seconds * 2**attempt for attempt in range(schedule.download_retries)]
    return reproduce_stage.with_options(retries=schedule.download_retries, retry_delay_seconds=delays or 0)


def _publish_artifacts(repo: Path, params: Params) -> None:
    create_table_artifact(table=metrics_table(repo, params.paths.metrics), key="evaluation-metrics",
                          description="Evaluation metrics of this run against the last commit (dvc metrics diff)")
    create_markdown_artifact(markdown=promotion_markdown(repo / params.paths.promotion), key="promotion-decision",
                             description="The promotion decision of this run")


def _push_if_configured(repo: Path, params: Params, log: object) -> None:
    with open_dvc_repo(repo) as dvc_repo:
        remote = dvc_repo.config["core"].get("remote")
    if params.schedule.push and remote:
        run_command([sys.executable, "-m", "dvc", "push"], repo, params.schedule.stage_timeout_seconds["download"], log)
    elif params.schedule.push:
        log.warning("schedule.push is true but no DVC remote is configured; skipping dvc push")


@flow(name="mnist-pipeline", log_prints=True, persist_result=False)
def pipeline(repo: str = ".") -> list[dict]:
    """download -> train -> evaluate -> promote, each stage reproduced by DVC in ``repo``."""
    root = Path(repo).resolve()
    params = load_params(root / "params.yaml")  # fails here, before any stage, on bad params
    log = get_run_logger()
    outcomes = []
    for stage in STAGES:
        timeout = params.schedule.stage_timeout_seconds[stage]
        state = _stage_task(stage, params)(stage, root, timeout, return_state=True)
        outcome = state.result()  # re-raises the stage's error: the flow fails, later stages never run
        outcomes.append(asdict(outcome))
        log.info("%s: %s", stage, "skipped (unchanged)" if outcome.skipped else f"ran in {outcome.seconds} s")
    _publish_artifacts(root, params)
    _push_if_configured(root, params, log)
    return outcomes


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repo", default=".", help="the project directory (a git + DVC repository)")
    args = parser.parse_args(argv)
    state = pipeline(repo=args.repo, return_state=True)
    if not state.is_completed():
        print(f"error: the pipeline flow ended {state.name}: {state.message}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
