"""Stage `promote`: bless the candidate (or not) and publish it for serving.

Like a TFX blessing, the candidate must pass

* the value threshold: test accuracy (EMA weights) >= ``promote.min_accuracy``, and
* the change threshold: accuracy >= champion accuracy + ``promote.min_improvement``, where the
  champion (the highest version in ``models/production/``) is re-evaluated here, on the same
  test data, in the same run. With no champion only the value threshold applies.

A champion that cannot be loaded cannot serve either: the candidate is then judged on the
value threshold alone, and the reason says so, so a broken production model can be replaced.

A blessed candidate becomes ``models/production/<N>/`` (TF Serving layout), recorded in
``models/registry.json`` before it becomes visible; ``tasks/production.py`` keeps that true
whenever the process is killed. The newest ``promote.keep_versions`` versions are kept.
``reports/promotion.json`` holds this run's decision. A rejected candidate leaves production
byte-for-byte untouched.

    python -m tasks.promote [--params params.yaml]
    python -m tasks.promote rollback [--to N]    # re-publish version N (default: the one
                                                 # before the current) as the newest version
"""

from __future__ import annotations

import argparse
import hashlib
import json
import subprocess
import sys
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path

from tasks import mnist
from tasks.atomic import write_bytes_atomic
from tasks.params import ParamsError, Paths, PromoteParams, load_params
from tasks.production import (
    RegistryError,
    append_registry,
    locked,
    now,
    publish,
    reconcile,
    remove_stale_temporaries,
    versions,
)

PARAMS_SECTIONS = ("promote", "data.sha256")


class PromotionError(RuntimeError):
    """Rollback or publishing cannot proceed; production is unchanged."""


@dataclass(frozen=True)
class Decision:
    promoted: bool
    reason: str
    candidate_accuracy: float | None
    champion_version: int | None
    champion_accuracy: float | None
    version: int | None  # the version published, when promoted


def test_accuracy(model_dir: Path, test: mnist.Split) -> float:
    from tasks.model import load_serving_model, predict_logits

    logits = predict_logits(load_serving_model(str(model_dir)), test.images)
    return float((logits.argmax(axis=1) == test.labels).mean())


def _champion(production: Path, test: mnist.Split) -> tuple[int | None, float | None, str]:
    from tasks.model import ModelLoadError

    published = versions(production)
    if not published:
        return None, None, "no champion yet"
    try:
        return published[-1], test_accuracy(production / str(published[-1]), test), ""
    except ModelLoadError as error:
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


def _git_revision() -> str:
    result = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True)
    return result.stdout.strip() if result.returncode == 0 else "unknown"


def _fingerprint(paths: list[Path]) -> str:
    digest = hashlib.sha256()
    for path in paths:
        digest.update(mnist.sha256_of(path).encode() if path.is_file() else b"missing")
    return digest.hexdigest()[:16]


def _reconcile(production: Path, registry: Path, promotion: Path | None = None) -> None:
    """Repair what a killed promote or rollback left (the caller holds the lock), and say so."""
    if promotion is not None:
        remove_stale_temporaries(promotion)
    for note in reconcile(production, registry):
        print(f"promote: {note}", flush=True)


def _judge(promote: PromoteParams, candidate_dir: Path, production: Path, test: mnist.Split) -> Decision:
    from tasks.model import ModelLoadError

    champion_version, champion, note = _champion(production, test)
    try:
        candidate = test_accuracy(candidate_dir, test)
        promoted, reason = decide(promote, candidate, champion_version, champion, note)
    except ModelLoadError as error:
        candidate, promoted, reason = None, False, f"candidate cannot be loaded: {error}"
    return Decision(promoted, reason, candidate, champion_version, champion, None)


def promote_candidate(promote: PromoteParams, paths: Paths, params_file: Path, *,
                      data_sha256: Mapping[str, str]) -> Decision:
    """Judge ``paths.candidate`` against the thresholds and the re-evaluated champion in
    ``paths.production``; publish it there if blessed; record the decision in ``paths.registry``
    and ``paths.promotion``.

    The test files are checked against ``data_sha256`` (params.yaml ``data.sha256``) first. The
    registry records the decision before a blessed version becomes visible."""
    test_files = (mnist.TEST_IMAGES, mnist.TEST_LABELS)
    mnist.verify_checksums(paths.raw_data, {name: data_sha256[name] for name in test_files})
    with locked(paths.production):
        _reconcile(paths.production, paths.registry, paths.promotion)
        test = mnist.load_split(paths.raw_data, "test", validation_size=0)
        decision = _judge(promote, paths.candidate, paths.production, test)
        data_files = [paths.raw_data / name for name in test_files]
        entry = {"action": "promote", "time": now(), "git_revision": _git_revision(),
                 "data_fingerprint": _fingerprint(data_files), "params_fingerprint": _fingerprint([params_file]),
                 **asdict(decision)}
        if decision.promoted:
            entry["version"] = publish(paths.candidate, paths.production, paths.registry, entry, promote.keep_versions)
        else:
            append_registry(paths.registry, entry)
        write_bytes_atomic(paths.promotion, (json.dumps(entry, indent=2) + "\n").encode())
    verdict = f"promoted as version {entry['version']}" if decision.promoted else "rejected"
    print(f"promote: {verdict}: {decision.reason}", flush=True)
    return Decision(**{**asdict(decision), "version": entry["version"]})


def _rollback_target(production: Path, to_version: int | None) -> tuple[int, int]:
    """(the version to restore, the version served now), after checking the target can serve."""
    from tasks.model import ModelLoadError, load_serving_model

    published = versions(production)
    if len(published) < 2 and to_version is None:
        raise PromotionError(f"nothing to roll back to: {production} holds versions {published}")
    target = published[-2] if to_version is None else to_version
    if target not in published:
        raise PromotionError(f"version {target} is not in {production} (available: {published})")
    try:
        load_serving_model(str(production / str(target)))
    except ModelLoadError as error:
        raise PromotionError(f"version {target} cannot serve, so it is not restored: {error}") from None
    return target, published[-1]


def rollback(promote: PromoteParams, paths: Paths, to_version: int | None) -> int:
    """Re-publish an earlier version of ``paths.production`` as the newest (so TF Serving serves
    it), recorded in ``paths.registry``; return its number. ``to_version`` None: the one before."""
    production = paths.production
    with locked(production):
        _reconcile(production, paths.registry)
        target, replaced = _rollback_target(production, to_version)
        entry = {"action": "rollback", "time": now(), "git_revision": _git_revision(),
                 "restored_version": target, "replaced_version": replaced}
        version = publish(production / str(target), production, paths.registry, entry, promote.keep_versions)
    print(f"rollback: version {target} is now served as version {version}; record it with `dvc commit promote`")
    return version


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("command", nargs="?", choices=["promote", "rollback"], default="promote")
    parser.add_argument("--to", type=int, default=None, help="rollback: the version to restore")
    parser.add_argument("--params", type=Path, default=Path("params.yaml"))
    args = parser.parse_args(argv)
    try:
        params = load_params(args.params)
        if args.command == "rollback":
            rollback(params.promote, params.stage_paths, args.to)
        else:
            promote_candidate(params.promote, params.stage_paths, args.params, data_sha256=params.data.sha256)
    except (ParamsError, PromotionError, RegistryError, mnist.DataError, FileNotFoundError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
