"""Stage `promote`: bless the candidate (or not) and publish it for serving.

Like a TFX blessing, the candidate must pass

* the value threshold: test accuracy (EMA weights) >= ``promote.min_accuracy``, and
* the change threshold: accuracy >= champion accuracy + ``promote.min_improvement``, where the
  champion (the highest version in ``models/production/``) is re-evaluated here, on the same
  test data, in the same run. With no champion only the value threshold applies.

A champion that cannot be loaded cannot serve either: the candidate is then judged on the
value threshold alone, and the reason says so, so a broken production model can be replaced.

A blessed candidate becomes ``models/production/<N+1>/`` (TF Serving layout): it is copied to
a temporary directory inside ``models/production/`` and renamed, so a reader never sees half a
version; the newest ``promote.keep_versions`` versions are kept. ``models/registry.json`` is an
append-only history of decisions; ``reports/promotion.json`` holds this run's. A rejected
candidate leaves production byte-for-byte untouched.

    python -m tasks.promote [--params params.yaml]
    python -m tasks.promote rollback [--to N]    # re-publish version N (default: the one
                                                 # before the current) as the newest version
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import subprocess
import sys
import tempfile
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path

from tasks import mnist
from tasks.params import ParamsError, PromoteParams, load_params

PARAMS_SECTIONS = ("promote",)


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


def versions(production: Path) -> list[int]:
    """Published versions, oldest first; temporary and foreign entries are ignored."""
    if not production.is_dir():
        return []
    return sorted(int(entry.name) for entry in production.iterdir() if entry.is_dir() and entry.name.isdigit())


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


def publish(model_dir: Path, production: Path, keep_versions: int) -> int:
    """Copy ``model_dir`` in as the next version, atomically; prune the oldest. Return the version."""
    production.mkdir(parents=True, exist_ok=True)
    for stale in production.glob(".publishing-*"):  # left by a publish that was killed
        shutil.rmtree(stale, ignore_errors=True)
    version = (versions(production) or [0])[-1] + 1
    staging = Path(tempfile.mkdtemp(dir=production, prefix=".publishing-"))  # same filesystem: rename is atomic
    try:
        shutil.copytree(model_dir, staging / "model")
        (staging / "model").rename(production / str(version))
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    for old in versions(production)[:-keep_versions]:
        shutil.rmtree(production / str(old))
    return version


def _git_revision() -> str:
    result = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True)
    return result.stdout.strip() if result.returncode == 0 else "unknown"


def _fingerprint(paths: list[Path]) -> str:
    digest = hashlib.sha256()
    for path in paths:
        digest.update(mnist.sha256_of(path).encode() if path.is_file() else b"missing")
    return digest.hexdigest()[:16]


def read_registry(registry: Path) -> list:
    """The history so far; a damaged file is an error, never silently replaced."""
    try:
        history = json.loads(registry.read_text()) if registry.exists() else []
    except (ValueError, UnicodeDecodeError) as error:
        raise PromotionError(f"{registry} is not valid JSON ({error}); refusing to overwrite it") from None
    if not isinstance(history, list):
        raise PromotionError(f"{registry} is not a JSON list; refusing to overwrite it")
    return history


def append_registry(registry: Path, entry: dict) -> None:
    """Append one entry; the file is rewritten whole through a temporary file and a rename."""
    history = read_registry(registry)
    history.append(entry)
    mnist.write_bytes_atomic(registry, (json.dumps(history, indent=2) + "\n").encode())


def _record(registry: Path, promotion: Path, decision: Decision, context: dict) -> None:
    entry = {"action": "promote", "time": datetime.now(UTC).isoformat(timespec="seconds"),
             "git_revision": _git_revision(), **context, **asdict(decision)}
    append_registry(registry, entry)
    mnist.write_bytes_atomic(promotion, (json.dumps(entry, indent=2) + "\n").encode())


def promote_candidate(promote: PromoteParams, candidate_dir: Path, data_dir: Path, production: Path,
                      registry: Path, promotion: Path, params_file: Path) -> Decision:
    """Judge the candidate against the thresholds and the re-evaluated champion; publish if blessed."""
    from tasks.model import ModelLoadError

    read_registry(registry)  # a damaged history stops us before anything is published
    test = mnist.load_split(data_dir, "test", validation_size=0)
    champion_version, champion, note = _champion(production, test)
    try:
        candidate = test_accuracy(candidate_dir, test)
        promoted, reason = decide(promote, candidate, champion_version, champion, note)
    except ModelLoadError as error:
        candidate, promoted, reason = None, False, f"candidate cannot be loaded: {error}"
    version = publish(candidate_dir, production, promote.keep_versions) if promoted else None
    decision = Decision(promoted, reason, candidate, champion_version, champion, version)
    data_files = [data_dir / name for name in (mnist.TEST_IMAGES, mnist.TEST_LABELS)]
    context = {"data_fingerprint": _fingerprint(data_files), "params_fingerprint": _fingerprint([params_file])}
    _record(registry, promotion, decision, context)
    verdict = f"promoted as version {version}" if promoted else "rejected"
    print(f"promote: {verdict}: {reason}", flush=True)
    return decision


def rollback(production: Path, registry: Path, to_version: int | None, keep_versions: int) -> int:
    """Re-publish an earlier version as the newest (so TF Serving serves it); return its number."""
    published = versions(production)
    if len(published) < 2 and to_version is None:
        raise PromotionError(f"nothing to roll back to: {production} holds versions {published}")
    target = published[-2] if to_version is None else to_version
    if target not in published:
        raise PromotionError(f"version {target} is not in {production} (available: {published})")
    version = publish(production / str(target), production, keep_versions)
    append_registry(registry, {"action": "rollback", "time": datetime.now(UTC).isoformat(timespec="seconds"),
                               "git_revision": _git_revision(), "restored_version": target, "version": version,
                               "replaced_version": published[-1]})
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
        paths = params.paths
        if args.command == "rollback":
            rollback(Path(paths.production), Path(paths.registry), args.to, params.promote.keep_versions)
        else:
            promote_candidate(params.promote, Path(paths.candidate), Path(paths.raw_data), Path(paths.production),
                              Path(paths.registry), Path(paths.promotion), args.params)
    except (ParamsError, PromotionError, mnist.DataError, FileNotFoundError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
