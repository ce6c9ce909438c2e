"""Stage `promote`: bless the candidate (or not) and publish it for serving.

Like a TFX blessing, the candidate must pass

* the value threshold: test accuracy (EMA weights) >= ``promote.min_accuracy``, and
* the change threshold: accuracy >= champion accuracy + ``promote.min_improvement``, where the
  champion (the highest version in ``models/production/``) is scored on the same test data, in the
  same run. With no champion only the value threshold applies.

A score is measured (TensorFlow) unless one was recorded for the same model bytes, test data and
scoring code (``tasks/lib/scores.py``): evaluate's record of the candidate, ``reports/scores.json``,
and the registry's record of the champion's promotion, whose files are hashed now to compare.
The record says which scores were reused (``scored``).

A champion that cannot be loaded cannot serve either: the candidate is then judged on the
value threshold alone, and the reason says so, so a broken production model can be replaced.

A blessed candidate becomes ``models/production/<N>/`` (TF Serving layout), recorded in
``models/registry.json`` before it becomes visible; ``tasks/lib/registry/production.py`` keeps that true
whenever the process is killed. The newest ``promote.keep_versions`` versions are kept.
``reports/promotion.json`` holds this run's decision. A rejected candidate leaves production
byte-for-byte untouched.

Each record names what the candidate is: ``model_sha256`` (its files; training is
deterministic, so the same code, params and data give the same bytes), ``data_fingerprint`` (the
test files it was judged on) and ``git_revision``. Rollback is ``python -m tasks.commands.registry
rollback --to N [--push]`` (tasks/lib/registry/rollback.py); a candidate whose ``model_sha256`` is
that of a version rolled back from (and not restored since) is rejected, and the reason says so.

    python -m tasks.promote [--params params.yaml]
"""

from __future__ import annotations

import json
import sys
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path

from tasks.lib import mnist, scores
from tasks.lib.atomic import PreparedWrite
from tasks.lib.params import Params, Paths, PromoteParams
from tasks.lib.registry.production import (
    RegistryError,
    append_registry,
    locked,
    next_version,
    now,
    publish,
    read_registry,
    reconcile,
    remove_stale_temporaries,
    rolled_back_models,
    versions,
)
from tasks.lib.repository import git_revision
from tasks.lib.stage import run_stage


class PromotionError(RuntimeError):
    """Publishing cannot proceed; production is unchanged."""


@dataclass(frozen=True)
class Decision:
    promoted: bool
    reason: str
    candidate_accuracy: float | None
    champion_version: int | None
    champion_accuracy: float | None
    version: int | None  # the version published, when promoted


@dataclass(frozen=True)
class Records:
    """Where recorded scores come from: evaluate's record and the registry's history."""

    evaluated: list[dict]
    history: list[dict]
    test_sha256: Mapping[str, str]


def test_accuracy(model_dir: Path, test: mnist.Split, records: list[dict], test_sha256: Mapping[str, str],
                  accuracy_field: str, how: dict[str, str], role: str) -> float:
    """The recorded score of these bytes, data and scoring code, or else one measured now."""
    found = scores.recorded(records, scores.score_key(model_dir, test_sha256), accuracy_field)
    how[role] = "measured" if found is None else "reused (model bytes, test data and scoring code unchanged)"
    return scores.measure(model_dir, test) if found is None else found


def _champion(production: Path, test: mnist.Split, records: Records,
              how: dict[str, str]) -> tuple[int | None, float | None, str]:
    published = versions(production)
    if not published:
        return None, None, "no champion yet"
    promoted = [entry for entry in records.history if entry.get("version") == published[-1]
                and entry.get("action") == "promote"]
    try:
        return published[-1], test_accuracy(production / str(published[-1]), test, promoted, records.test_sha256,
                                            "candidate_accuracy", how, "champion"), ""
    except scores.UnloadableModel as error:
        return published[-1], None, f"champion v{published[-1]} cannot be loaded ({error}); value threshold only"


def decide(promote: PromoteParams, candidate: float, champion_version: int | None,
           champion: float | None, note: str) -> tuple[bool, str]:
    if candidate < promote.min_accuracy:
        return False, f"test accuracy {candidate:.4f} is below promote.min_accuracy {promote.min_accuracy}"
    if champion is None:
        return True, f"test accuracy {candidate:.4f} >= {promote.min_accuracy} ({note})"
    needed = champion + promote.min_improvement
    if candidate < needed:
        return False, (f"test accuracy {candidate:.4f} does not beat champion v{champion_version} ({champion:.4f}) "
                       f"by promote.min_improvement {promote.min_improvement}")
    return True, f"test accuracy {candidate:.4f} beats champion v{champion_version} ({champion:.4f}) by >= " \
                 f"{promote.min_improvement}"


data_fingerprint = scores.data_fingerprint  # of the test files the candidate was judged on


def _reconcile(production: Path, registry: Path, promotion: Path | None = None) -> None:
    """Repair what a killed promote or rollback left (the caller holds the lock), and say so."""
    if promotion is not None:
        remove_stale_temporaries(promotion)
    for note in reconcile(production, registry):
        print(f"promote: {note}", flush=True)


def _judge(promote: PromoteParams, candidate_dir: Path, production: Path, test: mnist.Split,
           records: Records, how: dict[str, str]) -> Decision:
    champion_version, champion, note = _champion(production, test, records, how)
    try:
        candidate = test_accuracy(candidate_dir, test, records.evaluated, records.test_sha256, "test_accuracy",
                                  how, "candidate")
        promoted, reason = decide(promote, candidate, champion_version, champion, note)
    except scores.UnloadableModel as error:
        candidate, promoted, reason = None, False, f"candidate cannot be loaded: {error}"
    return Decision(promoted, reason, candidate, champion_version, champion, None)


def _not_again(decision: Decision, model_sha256: str, history: list[dict]) -> Decision:
    """A blessed candidate whose files are those of a version rolled back from is not promoted again."""
    rolled_back = rolled_back_models(history).get(model_sha256)
    if not decision.promoted or rolled_back is None:
        return decision
    reason = (f"the candidate is the model of version {rolled_back['replaced_version']} (model_sha256 "
              f"{model_sha256[:12]}: the same code, params and data), which was rolled back from on "
              f"{rolled_back['time']} (version {rolled_back['restored_version']} served again as version "
              f"{rolled_back['version']}); not promoted again")
    return Decision(**{**asdict(decision), "promoted": False, "reason": reason})


def _record(promote: PromoteParams, paths: Paths, entry: dict) -> None:
    """Publish (when promoted) and record ``entry`` in the registry and ``paths.promotion``.

    The registry append is the commit point. Everything written after it is written before it:
    ``paths.promotion`` is prepared (written and fsynced beside its place) first, and after the
    commit point only renamed into place, which needs no space; a read-only directory, a full
    disk or a size limit therefore stops the stage before production or the registry change."""
    if entry["promoted"]:  # the number publish will take: it holds the lock, nothing changes meanwhile
        entry["version"] = next_version(paths.production, read_registry(paths.registry))
    prepared = PreparedWrite(paths.promotion, (json.dumps(entry, indent=2) + "\n").encode())
    try:
        if entry["promoted"]:
            publish(paths.candidate, paths.production, paths.registry, entry, promote.keep_versions)
        else:
            append_registry(paths.registry, entry)
    except BaseException:
        prepared.discard()
        raise
    prepared.commit()


def promote_candidate(promote: PromoteParams, paths: Paths, *, data_sha256: Mapping[str, str]) -> Decision:
    """Judge ``paths.candidate`` against the thresholds and the re-evaluated champion in
    ``paths.production``; publish it there if blessed; record the decision in ``paths.registry``
    and ``paths.promotion``.

    The test files are checked against ``data_sha256`` (params.yaml ``data.sha256``) first. The
    registry records the decision before a blessed version becomes visible."""
    test_sha256 = scores.test_sha256(data_sha256)
    mnist.verify_checksums(paths.raw_data, test_sha256)
    with locked(paths.production):
        _reconcile(paths.production, paths.registry, paths.promotion)
        test = mnist.load_split(paths.raw_data, "test", validation_size=0)
        records = Records(scores.read_records(paths.scores), read_registry(paths.registry), test_sha256)
        how: dict[str, str] = {}
        key = scores.score_key(paths.candidate, test_sha256)
        decision = _not_again(_judge(promote, paths.candidate, paths.production, test, records, how),
                              key["model_sha256"], records.history)
        entry = {"action": "promote", "time": now(), "git_revision": git_revision(Path.cwd()),
                 **key, **asdict(decision), "scored": how}
        _record(promote, paths, entry)
    verdict = f"promoted as version {entry['version']}" if decision.promoted else "rejected"
    print(f"promote: {verdict}: {decision.reason}", flush=True)
    return Decision(**{**asdict(decision), "version": entry["version"]})


def stage_arguments(params: Params) -> dict[str, object]:
    """What promote reads of params.yaml (dvc.yaml lists the same: tests/test_dvc_yaml.py)."""
    return {"promote": params.promote, "paths": params.stage_paths, "data_sha256": params.data.sha256}


def main(argv: list[str] | None = None) -> int:
    return run_stage(argv, __doc__.split("\n")[0], promote_candidate, stage_arguments,
                     (PromotionError, RegistryError, mnist.DataError))


if __name__ == "__main__":
    sys.exit(main())
