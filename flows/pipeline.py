"""The pipeline as a Prefect flow: download -> train -> evaluate -> promote, each through DVC.

Each Prefect task runs ``dvc repro --single-item <stage>``, so DVC decides what is stale and
``dvc.lock``, the cache and the run-cache stay the single truth: an unchanged stage is skipped
by DVC and shown in Prefect as a Completed state named "Skipped". Prefect adds what DVC does
not have: retries (download, with exponential backoff), per-stage time-outs, the stage output
streamed into the run logs, and artifacts — a table of the evaluation metrics against the
last commit, a summary of the promotion decision and the run's pictures. Ctrl-C or SIGTERM stops
the running stage before the flow exits (one line). No TensorFlow here.

    python -m flows.pipeline [--repo .]             # the local loop: never commits or pushes
    python -m flows.pipeline [--repo .] --publish   # team mode (what prefect.yaml's deployment runs)

With ``--publish`` (flow parameter ``publish``) the run follows its git branch and records
itself (see ``tasks/lib/repository.py``): tasks ``git-sync`` (the branch's newest commit and its tags)
and ``dvc-pull`` come before the stages, and ``publish`` after them when a stage ran
(``dvc push``, one commit of the results, GTO tags of a promoted version, one atomic push).

With ``PREFECT_API_URL`` set, the run is recorded on that server; otherwise on a temporary local
server started for the run (``flows/temporary_server.py``), on the database in ``PREFECT_HOME``.
"""

from __future__ import annotations

import argparse
import base64
import json
import signal
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.states import Completed, State
from prefect.tasks import exponential_backoff

from flows import temporary_server
from tasks.lib import repository as team
from tasks.lib.files import read_regular_file, read_text_file
from tasks.lib.params import Params, Paths, load_params
from tasks.lib.processes import CommandTimedOut
from tasks.lib.registry.tags import ARTIFACT, register_promotion

STAGES = ("download", "train", "evaluate", "promote")


class StageFailed(RuntimeError):
    """A DVC stage exited non-zero or ran past its time-out; the message carries its last output."""


@dataclass(frozen=True)
class StageOutcome:
    stage: str
    skipped: bool
    seconds: float


def run_dvc(arguments: list[str], repo: Path, timeout: float, log: object) -> list[str]:
    """Run `dvc <arguments>` in ``repo``, each output line into the task's log; StageFailed on a
    non-zero exit or after ``timeout`` seconds (DVC and the stage it runs are then stopped)."""
    command = f"dvc {' '.join(arguments)}"
    try:
        code, lines = team.dvc_stream(repo, arguments, timeout, log.info)
    except CommandTimedOut:
        raise StageFailed(f"`{command}` timed out after {timeout:.0f} s") from None
    if code != 0:
        tail = "\n".join(lines[-15:])
        raise StageFailed(f"`{command}` failed with exit code {code}:\n{tail}")
    return lines


def stage_is_up_to_date(stage: str, repo: Path) -> bool:
    """DVC's own verdict, as `dvc status <stage>` gives it (through its Python API)."""
    with team.open_dvc_repo(repo) as dvc_repo:
        return not dvc_repo.status(targets=[stage])


def stages_up_to_date(repo: Path) -> set[str]:
    """The stages DVC finds up to date, from one `dvc status` of the whole pipeline: true until a
    stage runs (then what follows it is asked again, stage by stage)."""
    with team.open_dvc_repo(repo) as dvc_repo:
        stale = dvc_repo.status()
    return {stage for stage in STAGES if stage not in stale}


# persist_result=False: outcomes stay in memory; Prefect would otherwise pickle them to disk.
@task(task_run_name="{stage}", persist_result=False)
def reproduce_stage(stage: str, repo: Path, timeout: float, known_up_to_date: bool = False) -> StageOutcome | State:
    """Bring one DVC stage up to date; report it as skipped when DVC found nothing to do
    (``known_up_to_date``: DVC said so already, in this run, and nothing ran since)."""
    started = time.perf_counter()
    log = get_run_logger()
    skipped = known_up_to_date or stage_is_up_to_date(stage, repo)
    if not skipped:
        run_dvc(["repro", "--single-item", stage], repo, timeout, log)
    outcome = StageOutcome(stage, skipped, round(time.perf_counter() - started, 2))
    if skipped:
        log.info("Stage '%s' didn't change, skipping", stage)
        return Completed(name="Skipped", message=f"{stage}: inputs unchanged, DVC skipped it", data=outcome)
    return outcome


def _decimals(value: object) -> int:
    """Digits after the point in a metric as written (its precision): 0.9838 -> 4, 162 -> 0."""
    text = repr(value) if isinstance(value, float) else ""
    return len(text.split(".")[1]) if "." in text and "e" not in text else 0


def rounded_change(old: object, new: object, change: object) -> object:
    """``change`` (DVC's new - old, with float noise: 0.0020000000000000018) rounded to the finer
    precision of the two values."""
    if not isinstance(change, float):
        return change
    return round(change, max(_decimals(old), _decimals(new)))


def metrics_table(repo: Path, metrics_file: str) -> list[dict[str, object]]:
    """Rows of `dvc metrics diff --all` (workspace against HEAD): metric, last commit, now, change."""
    with team.open_dvc_repo(repo) as dvc_repo:
        diff = dvc_repo.metrics.diff(a_rev="HEAD", all=True).get("diff", {}).get(metrics_file, {})
    return [{"metric": name, "last commit": values.get("old"), "this run": values.get("new"),
             "change": rounded_change(values.get("old"), values.get("new"), values.get("diff"))}
            for name, values in sorted(diff.items())]


PICTURES = (("Learning curves", "learning_curves.png"), ("Confusion matrix", "confusion_matrix.png"),
            ("Misclassified test digits", "misclassified.png"))


PICTURE_MAX_BYTES = 8 << 20  # evaluate's PNGs are ~100 KB each; a bigger file is not one of them
PICTURES_SUMMARY = "Learning curves, confusion matrix and misclassified digits of this run"


def _data_uri(picture: Path) -> str:
    return "data:image/png;base64," + base64.b64encode(read_regular_file(picture, PICTURE_MAX_BYTES)).decode("ascii")


def pictures_description(plots: Path) -> str:
    """The run-pictures artifact's description: the run's PNGs as data: URIs, all on its first line.

    The Prefect UI (3.9.1) lists a flow run's artifacts on its Artifacts tab as cards that show
    only the first line of each description, rendered as markdown (a markdown image as a plain
    <img>); so the pictures show on the tab itself, with no file server. Stored once: the
    artifact's own page shows the description above its markdown."""
    images = " ".join(f"![{title}]({_data_uri(plots / name)})" for title, name in PICTURES
                      if (plots / name).is_file())
    return f"{images or 'No pictures: evaluate wrote none.'}\n\n{PICTURES_SUMMARY}"


def pictures_markdown(plots: Path) -> str:
    """The run-pictures artifact's markdown: which pictures its description shows, and which are missing."""
    lines = ["The pictures are this artifact's description, shown above and on the flow run's Artifacts tab:", ""]
    for title, name in PICTURES:
        found = (plots / name).is_file()
        lines.append(f"- {title}: `{name}`" if found else f"- {title}: (no `{name}`: evaluate did not write it)")
    return "\n".join(lines)


def promotion_markdown(promotion_file: Path) -> str:
    decision = json.loads(read_text_file(promotion_file))
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
    return reproduce_stage.with_options(retries=schedule.download_retries,
                                        retry_delay_seconds=exponential_backoff(schedule.retry_delay_seconds))


def _publish_artifacts(repo: Path, params: Params) -> None:
    create_table_artifact(table=metrics_table(repo, params.paths.metrics), key="evaluation-metrics",
                          description="Evaluation metrics of this run against the last commit (dvc metrics diff)")
    promotion = Paths.under(repo, params.paths).promotion
    create_markdown_artifact(markdown=promotion_markdown(promotion), key="promotion-decision",
                             description="The promotion decision of this run")
    plots = Paths.under(repo, params.paths).plots
    create_markdown_artifact(markdown=pictures_markdown(plots), key="run-pictures",
                             description=pictures_description(plots))


def _push_if_configured(repo: Path, params: Params, log: object) -> None:
    remote = team.default_remote(repo)
    if params.schedule.push and remote:
        run_dvc(["push"], repo, params.schedule.stage_timeout_seconds["download"], log)
    elif params.schedule.push:
        log.warning("schedule.push is true but no DVC remote is configured; skipping dvc push")


WORKER_DIRECTORIES = "tmp*prefect"  # Prefect's process worker: tempfile.TemporaryDirectory(suffix="prefect")


def sweep_dead_runs(repo: Path) -> None:
    """A worker's run works in a clone inside a temporary directory of its own; mark this run's as
    in use, and remove the ones whose run died with its worker (a SIGKILL leaves them)."""
    workspace = repo.parent
    if not workspace.match(WORKER_DIRECTORIES):
        return  # not started by a process worker: nothing of ours to sweep
    team.claim_run_directory(workspace)
    for removed in team.sweep_dead_run_directories(workspace.parent, WORKER_DIRECTORIES):
        get_run_logger().warning("team: removed %s, left by a run whose worker died", removed)


@task(name="git-sync", task_run_name="git-sync", persist_result=False)
def sync_with_branch(repo: Path) -> team.RunStart:
    """Team mode: the newest commit of the branch and every registry tag, before anything runs."""
    start = team.start_from_branch(repo)
    sweep_dead_runs(repo)
    get_run_logger().info("team: starting from %s at %s (flow code from %s)", start.branch, start.commit,
                          Path(__file__).resolve().parent)
    return start


@task(name="dvc-pull", task_run_name="dvc-pull", persist_result=False)
def pull_from_remote(repo: Path, timeout: float) -> None:
    """Team mode: what the DVC remote has is not computed again, and the champion is known."""
    get_run_logger().info("dvc pull: %s", team.pull_outputs(repo, required=True, timeout=timeout).summary())


def commit_message(start: team.RunStart, outcomes: list[StageOutcome], metrics: dict, decision: dict | None) -> str:
    """Names the run, its test accuracy and its promotion decision."""
    from prefect.runtime import deployment, flow_run

    accuracy = metrics.get("test", {}).get("accuracy")
    if decision is None:
        verdict = "no promotion decision (promote did not run)"
    elif decision.get("promoted"):
        verdict = f"promoted as {ARTIFACT} version {decision['version']}"
    else:
        verdict = "not promoted"
    ran = [outcome.stage for outcome in outcomes if not outcome.skipped]
    skipped = [outcome.stage for outcome in outcomes if outcome.skipped]
    lines = [f"Run {flow_run.name}: test accuracy {accuracy}, {verdict}", "",
             f"Flow run {flow_run.name} ({flow_run.id}) of deployment {deployment.name or '(none)'}, "
             f"from {start.branch} at {start.commit[:12]}.",
             f"Stages run: {', '.join(ran)}; skipped: {', '.join(skipped) or 'none'}."]
    if decision is not None:
        lines.append(f"Promotion: {decision.get('reason')}")
    return "\n".join(lines)


@task(name="publish", task_run_name="publish", persist_result=False)
def publish_run(repo: Path, start: team.RunStart, outcomes: list[StageOutcome], params: Params) -> team.Publication:
    """Team mode, when a stage ran: data to the DVC remote first, then one commit, tags, one git push."""
    log = get_run_logger()
    log.info("dvc push: %s", team.push_data(repo, params.schedule.stage_timeout_seconds["download"]))
    promote_ran = any(outcome.stage == "promote" and not outcome.skipped for outcome in outcomes)
    paths = Paths.under(repo, params.paths)
    decision = json.loads(read_text_file(paths.promotion)) if promote_ran else None
    metrics = json.loads(read_text_file(paths.metrics))
    message = commit_message(start, outcomes, metrics, decision)
    version = decision["version"] if decision and decision.get("promoted") else None
    publication = team.publish_results(repo, start, message,
                                       lambda commit: register_promotion(repo, version, commit) if version else [])
    if publication.commit is None:
        log.info("publish: the stages changed nothing git tracks; nothing pushed to git")
    else:
        moved = _joined(publication)
        log.info("publish: pushed %s to %s%s; tags: %s", publication.commit, publication.branch, moved,
                 ", ".join(publication.tags) or "none")
        create_markdown_artifact(key="git-publication", description="What this run pushed to git",
                                 markdown=f"# Commit `{publication.commit[:12]}` on `{publication.branch}`{moved}\n\n"
                                          f"```\n{message}\n```\n\nTags: {', '.join(publication.tags) or 'none'}")
    return publication


def _joined(publication: team.Publication) -> str:
    """How the run's commit met a teammate's push, for the log and the artifact."""
    if publication.merged_with:
        return (f" (merged with {publication.merged_with[:12]}, whose commits changed an input of this run; "
                f"tags on the run's commit {publication.run_commit[:12]})")
    return f" (rebased onto {publication.rebased_onto[:12]})" if publication.rebased_onto else ""


def _run_stages(root: Path, params: Params) -> list[StageOutcome]:
    log = get_run_logger()
    outcomes = []
    up_to_date = stages_up_to_date(root)  # one question instead of four when everything is cached
    for stage in STAGES:
        timeout = params.schedule.stage_timeout_seconds[stage]
        state = _stage_task(stage, params)(stage, root, timeout, stage in up_to_date, return_state=True)
        outcome = state.result()  # re-raises the stage's error: the flow fails, later stages never run
        outcomes.append(outcome)
        if not outcome.skipped:
            up_to_date = set()
        log.info("%s: %s", stage, "skipped (unchanged)" if outcome.skipped else f"ran in {outcome.seconds} s")
    return outcomes


@flow(name="mnist-pipeline", log_prints=True, persist_result=False)
def pipeline(repo: str = ".", publish: bool = False) -> list[dict]:
    """download -> train -> evaluate -> promote, each stage reproduced by DVC in ``repo``.

    ``publish``: follow the git branch and record the run in git and DVC (team mode).
    """
    root = Path(repo).resolve()
    start = sync_with_branch(root) if publish else None  # before params: the branch may change them
    params = load_params(root / "params.yaml")  # fails here, before any stage, on bad params
    if publish:
        pull_from_remote(root, params.schedule.stage_timeout_seconds["download"])
    outcomes = _run_stages(root, params)
    _publish_artifacts(root, params)
    if not publish:
        _push_if_configured(root, params, get_run_logger())
    elif any(not outcome.skipped for outcome in outcomes):
        publish_run(root, start, outcomes, params)
    else:
        get_run_logger().info("publish: every stage was up to date; nothing pushed")
    return [asdict(outcome) for outcome in outcomes]


def _interrupt(signal_number: int, _frame: object) -> None:
    raise KeyboardInterrupt(f"signal {signal_number}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repo", default=".", help="the project directory (a git + DVC repository)")
    parser.add_argument("--publish", action="store_true",
                        help="team mode: follow the git branch, then dvc push and commit + push the results")
    args = parser.parse_args(argv)
    if holder := team.dvc_lock_holder(Path(args.repo).resolve()):
        print(f"error: another DVC command (process {holder}) holds {Path(args.repo).resolve()}/.dvc/tmp/lock; "
              "wait for it to finish, then run the flow again", file=sys.stderr)
        return 1
    # SIGTERM as Ctrl-C: the running stage is stopped (tasks/lib/processes.py) before this exits.
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        temporary_server.adopt()  # the server started early, if no server is configured
        state = pipeline(repo=args.repo, publish=args.publish, return_state=True)
    except KeyboardInterrupt:
        print("interrupted: the running stage was stopped; dvc.lock records the stages that finished",
              file=sys.stderr)
        return 130
    if not state.is_completed():
        print(f"error: the pipeline flow ended {state.name}: {state.message}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
