"""tasks/promote.py: the champion/challenger gate, the registry record, rollback."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import pytest

from tasks.lib import mnist, scores
from tasks.lib import model as network
from tasks.lib.params import Paths, PromoteParams, parse_params
from tasks.lib.registry.production import RegistryError, locked, publish, reconcile, tree_sha256, versions
from tasks.lib.registry.rollback import rollback
from tasks.promote import promote_candidate
from tasks.train import train_model

from .conftest import REPO_ROOT, make_params_document, tool_environment, tree_digest, write_synthetic


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """A trained ("good", test accuracy ~0.99) and an untrained ("bad", ~0.1) model, trained once."""
    root = tmp_path_factory.mktemp("models")
    write_synthetic(root / "data")
    params = parse_params(make_params_document(root / "data"))
    paths = replace(Paths.under(root), raw_data=root / "data", candidate=root / "good")
    train_model(params.model, params.train, paths, validation_size=100, data_sha256=params.data.sha256)
    initial = network.initial_values(params.model, seed=5)
    network.export(network.ServingModel(initial, initial, "relu"), str(root / "bad"))
    return {"good": root / "good", "bad": root / "bad", "data": root / "data", "params": params}



def _promote(models: dict, tmp_path: Path, candidate: str | Path, **thresholds: float):
    settings = {"min_accuracy": 0.5, "min_improvement": 0.0001, "keep_versions": 3} | thresholds
    candidate_dir = models[candidate] if isinstance(candidate, str) else candidate
    return promote_candidate(PromoteParams(**settings), _paths(tmp_path, candidate_dir, models["data"]),
                             data_sha256=models["params"].data.sha256)


def _paths(tmp_path: Path, candidate: Path = Path("unused"), data: Path = Path("unused")) -> Paths:
    """Production, registry and promotion record side by side in ``tmp_path``, where the tests look."""
    return replace(Paths.under(tmp_path), candidate=candidate, raw_data=data, production=tmp_path / "production",
                   registry=tmp_path / "registry.json", promotion=tmp_path / "promotion.json")


def _rollback(tmp_path: Path, to_version: int | None) -> int:
    return rollback(_paths(tmp_path), to_version, keep_versions=5)


def _registry(tmp_path: Path) -> list[dict]:
    return json.loads((tmp_path / "registry.json").read_text())


def test_first_candidate_needs_only_the_value_threshold(models: dict, tmp_path: Path) -> None:
    decision = _promote(models, tmp_path, "good")
    assert decision.promoted and decision.version == 1 and "no champion yet" in decision.reason
    assert versions(tmp_path / "production") == [1]
    assert tree_digest(tmp_path / "production" / "1") == tree_digest(models["good"])
    promotion = json.loads((tmp_path / "promotion.json").read_text())
    assert promotion["promoted"] is True and promotion["version"] == 1
    entry = _registry(tmp_path)[0]
    for key in ("version", "time", "git_revision", "data_fingerprint", "model_sha256",
                "candidate_accuracy", "champion_accuracy", "promoted", "reason"):
        assert key in entry
    assert entry["model_sha256"] == tree_sha256(models["good"])  # names the model: same files, same digest


def test_better_candidate_replaces_the_re_evaluated_champion(models: dict, tmp_path: Path) -> None:
    _promote(models, tmp_path, "bad", min_accuracy=0.0)
    decision = _promote(models, tmp_path, "good")
    assert decision.promoted and decision.version == 2 and decision.champion_version == 1
    assert decision.champion_accuracy is not None and decision.champion_accuracy < 0.3  # measured now, not trusted
    assert len(_registry(tmp_path)) == 2


def test_worse_candidate_is_rejected_and_production_untouched(models: dict, tmp_path: Path) -> None:
    _promote(models, tmp_path, "good")
    before = tree_digest(tmp_path / "production")
    decision = _promote(models, tmp_path, "bad", min_accuracy=0.0)
    assert not decision.promoted and "does not beat champion v1" in decision.reason
    assert tree_digest(tmp_path / "production") == before
    assert json.loads((tmp_path / "promotion.json").read_text())["promoted"] is False
    assert [entry["promoted"] for entry in _registry(tmp_path)] == [True, False]


def test_equal_candidate_needs_the_minimum_improvement(models: dict, tmp_path: Path) -> None:
    _promote(models, tmp_path, "good")
    assert not _promote(models, tmp_path, "good").promoted
    assert _promote(models, tmp_path, "good", min_improvement=0.0).promoted


def test_candidate_below_the_value_threshold_is_rejected(models: dict, tmp_path: Path) -> None:
    decision = _promote(models, tmp_path, "bad", min_accuracy=0.9)
    assert not decision.promoted and "below promote.min_accuracy 0.9" in decision.reason
    assert versions(tmp_path / "production") == []


def test_corrupt_candidate_is_rejected(models: dict, tmp_path: Path) -> None:
    _promote(models, tmp_path, "good")
    before = tree_digest(tmp_path / "production")
    corrupt = tmp_path / "corrupt"
    corrupt.mkdir()
    (corrupt / "saved_model.pb").write_bytes(b"\x00garbage")
    decision = _promote(models, tmp_path, corrupt)
    assert not decision.promoted and "candidate cannot be loaded" in decision.reason
    assert tree_digest(tmp_path / "production") == before


def test_unloadable_champion_is_judged_on_the_value_threshold(models: dict, tmp_path: Path) -> None:
    _promote(models, tmp_path, "good")
    (tmp_path / "production" / "1" / "saved_model.pb").write_bytes(b"broken")
    decision = _promote(models, tmp_path, "good")
    assert decision.promoted and decision.version == 2 and "champion v1 cannot be loaded" in decision.reason


def _publish(model_dir: Path, tmp_path: Path, keep_versions: int = 5) -> int:
    with locked(tmp_path / "production"):
        return publish(model_dir, tmp_path / "production", tmp_path / "registry.json", {"action": "test"},
                       keep_versions)


def test_keep_versions_prunes_the_oldest(models: dict, tmp_path: Path) -> None:
    for _ in range(4):
        _publish(models["good"], tmp_path, keep_versions=3)
    assert versions(tmp_path / "production") == [2, 3, 4]
    assert sorted(p.name for p in (tmp_path / "production").iterdir()) == ["2", "3", "4"]  # nothing left over


def test_rollback_republishes_an_earlier_version(models: dict, tmp_path: Path) -> None:
    production = tmp_path / "production"
    _publish(models["good"], tmp_path)
    _publish(models["bad"], tmp_path)
    assert _rollback(tmp_path, None) == 3
    assert tree_digest(production / "3") == tree_digest(production / "1")
    assert _registry(tmp_path)[-1] | {"time": None, "git_revision": None} == {
        "action": "rollback", "restored_version": 1, "version": 3, "replaced_version": 2,
        "model_sha256": tree_sha256(models["good"]), "replaced_sha256": tree_sha256(models["bad"]),
        "time": None, "git_revision": None}
    assert _rollback(tmp_path, 2) == 4
    with pytest.raises(RegistryError, match="version 9 is not in"):
        _rollback(tmp_path, 9)


def test_a_rolled_back_lineage_is_not_promoted_again_until_restored(models: dict, tmp_path: Path) -> None:
    _promote(models, tmp_path, "good")
    _promote(models, tmp_path, "bad", min_improvement=-1.0, min_accuracy=0.0)  # version 2, then rolled back from
    assert _rollback(tmp_path, 1) == 3
    again = _promote(models, tmp_path, "bad", min_improvement=-1.0, min_accuracy=0.0)
    assert not again.promoted and again.champion_version == 3  # the champion is the served version
    assert again.reason.startswith(f"the candidate is the model of version 2 (model_sha256 "
                                   f"{tree_sha256(models['bad'])[:12]}")
    assert "rolled back from" in again.reason and "version 1 served again as version 3" in again.reason
    assert versions(tmp_path / "production")[-1] == 3 and _registry(tmp_path)[-1]["promoted"] is False
    assert _rollback(tmp_path, 2) == 4  # rolled forward by hand: that lineage may be promoted again
    assert _promote(models, tmp_path, "bad", min_improvement=-1.0, min_accuracy=0.0).promoted


def test_rollback_to_the_served_version_is_refused(models: dict, tmp_path: Path) -> None:
    _promote(models, tmp_path, "good")
    _promote(models, tmp_path, "bad", min_improvement=-1.0, min_accuracy=0.0)
    with pytest.raises(RegistryError, match="version 2 is already the served version"):
        _rollback(tmp_path, 2)


def test_rollback_with_nothing_to_restore(tmp_path: Path) -> None:
    with pytest.raises(RegistryError, match="nothing to roll back to"):
        _rollback(tmp_path, None)


@pytest.mark.slow
def test_publish_killed_midway_leaves_only_complete_versions(models: dict, tmp_path: Path) -> None:
    """SIGKILL a publish while it copies files (slowed down); no partial version may appear."""
    production = tmp_path / "production"
    _publish(models["good"], tmp_path)
    before = tree_digest(production)
    script = (
        "import shutil, time\n"
        "from pathlib import Path\n"
        "from tasks.lib.registry import production as promote\n"
        "original = shutil.copyfile\n"
        "def slow_copy(*args, **kwargs):\n"
        "    print('copying', flush=True); time.sleep(1.0); return original(*args, **kwargs)\n"
        "shutil.copyfile = slow_copy  # copy2, which copytree uses, looks copyfile up at call time\n"
        f"promote.publish(Path({str(models['bad'])!r}), Path({str(production)!r}), "
        f"Path({str(tmp_path / 'registry.json')!r}), {{}}, 5)\n"
    )
    environment = tool_environment() | {"PYTHONPATH": str(REPO_ROOT)}
    process = subprocess.Popen([sys.executable, "-c", script], env=environment, stdout=subprocess.PIPE, text=True)
    assert process.stdout is not None and process.stdout.readline().strip() == "copying"
    time.sleep(1.5)  # at least one file copied, more to come
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert versions(production) == [1]
    assert tree_digest(production / "1") == tree_digest(models["good"])
    assert [p.name for p in production.iterdir() if not p.name.startswith(".")] == ["1"]
    with locked(production):  # the next run cleans up what the killed one left
        reconcile(production, tmp_path / "registry.json")
    _publish(models["bad"], tmp_path)
    # 2 was handed out (its staging directory bore the number) and is never handed out again
    assert sorted(p.name for p in production.iterdir()) == ["1", "3"]
    assert before != tree_digest(production)


def test_corrupt_registry_is_a_clear_error_and_left_alone(tmp_path: Path) -> None:
    from tasks.lib.registry.production import append_registry

    registry = tmp_path / "registry.json"
    registry.write_text('[{"action": "promote"')  # truncated by hand
    with pytest.raises(RegistryError, match="is not valid JSON"):
        append_registry(registry, {"action": "rollback"})
    assert registry.read_text() == '[{"action": "promote"'


def test_corrupt_registry_stops_promotion_before_publishing(models: dict, tmp_path: Path) -> None:
    (tmp_path / "registry.json").write_text("not json")
    with pytest.raises(RegistryError, match="is not valid JSON"):
        _promote(models, tmp_path, "good")
    assert versions(tmp_path / "production") == []


def test_rollback_refuses_a_version_that_cannot_serve(models: dict, tmp_path: Path) -> None:
    production = tmp_path / "production"
    _publish(models["good"], tmp_path)
    _publish(models["good"], tmp_path)
    (production / "1" / "saved_model.pb").write_bytes(b"damaged")
    before = tree_digest(production)
    with pytest.raises(RegistryError, match="version 1 cannot serve, so it is not restored"):
        _rollback(tmp_path, 1)
    assert tree_digest(production) == before and len(_registry(tmp_path)) == 2


def test_a_fresh_clone_continues_the_recorded_version_numbers(models: dict, tmp_path: Path) -> None:
    """The registry (in git) knows versions 1..3 although production/ is empty (not pulled)."""
    history = [{"action": "promote", "promoted": True, "version": version} for version in (1, 2, 3)]
    (tmp_path / "registry.json").write_text(json.dumps(history))
    decision = _promote(models, tmp_path, "good")
    assert decision.promoted and decision.version == 4 and versions(tmp_path / "production") == [4]


def test_promote_repairs_what_a_killed_run_left(models: dict, tmp_path: Path,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    _promote(models, tmp_path, "good")
    shutil.rmtree(tmp_path / "production" / "1")  # as if killed after the record, before the rename:
    shutil.copytree(models["good"], tmp_path / "production" / ".publishing-v1-x" / "model")
    (tmp_path / ".promotion.json.abc.tmp").write_text("{")
    decision = _promote(models, tmp_path, "good")
    assert "finished publishing version 1" in capsys.readouterr().out
    assert not decision.promoted and decision.champion_version == 1  # the champion is back, and re-evaluated
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []


def test_tampered_test_data_is_refused_before_anything_changes(models: dict, tmp_path: Path) -> None:
    data = tmp_path / "data"
    shutil.copytree(models["data"], data)
    labels = data / "t10k-labels-idx1-ubyte"
    labels.write_bytes(labels.read_bytes()[:-1] + bytes([(labels.read_bytes()[-1] + 1) % 10]))
    with pytest.raises(mnist.DataError, match="t10k-labels-idx1-ubyte was changed or damaged"):
        promote_candidate(PromoteParams(min_accuracy=0.5, min_improvement=0.0, keep_versions=3),
                          _paths(tmp_path, models["good"], data), data_sha256=models["params"].data.sha256)
    assert not (tmp_path / "registry.json").exists() and versions(tmp_path / "production") == []


def _record_evaluation(models: dict, tmp_path: Path, candidate: str, accuracy: float) -> None:
    """What evaluate records of the candidate it scored (reports/scores.json), with ``accuracy``."""
    key = scores.score_key(models[candidate], scores.test_sha256(models["params"].data.sha256))
    scores.write_record(_paths(tmp_path).scores, key, accuracy)


def test_recorded_scores_are_reused_only_for_the_same_bytes(models: dict, tmp_path: Path) -> None:
    """A recorded score stands in for a measurement only while the model's files, the test data and
    the scoring code are those it was measured with; the record says which scores were reused."""
    first = _promote(models, tmp_path, "good")
    assert _registry(tmp_path)[0]["scored"] == {"candidate": "measured"}
    _record_evaluation(models, tmp_path, "good", 0.75)  # a recorded figure unlike the measured one
    history = _registry(tmp_path)
    history[0]["candidate_accuracy"] = 0.7  # the champion's record, likewise
    (tmp_path / "registry.json").write_text(json.dumps(history))
    reused = _promote(models, tmp_path, "good")
    assert (reused.candidate_accuracy, reused.champion_accuracy) == (0.75, 0.7) and reused.promoted
    assert set(_registry(tmp_path)[-1]["scored"].values()) == {
        "reused (model bytes, test data and scoring code unchanged)"}
    champion = tmp_path / "production" / str(versions(tmp_path / "production")[-1])
    variables = champion / "variables" / "variables.data-00000-of-00001"
    variables.write_bytes(variables.read_bytes())  # the same bytes: still reused
    kept = _promote(models, tmp_path, "good")  # 0.75 does not beat 0.75: the champion stays
    assert not kept.promoted and kept.champion_accuracy == 0.75 and kept.champion_version == 2
    shutil.rmtree(champion)  # another model under the champion's version: measured again
    shutil.copytree(models["bad"], champion)
    judged = _promote(models, tmp_path, "good", min_improvement=0.0)
    assert judged.champion_accuracy is not None and judged.champion_accuracy < 0.3
    assert judged.candidate_accuracy == 0.75 and _registry(tmp_path)[-1]["scored"]["champion"] == "measured"
    other_data = {**models["params"].data.sha256, mnist.TEST_LABELS: "0" * 64}  # other test data: not reused
    assert scores.recorded(scores.read_records(_paths(tmp_path).scores),
                           scores.score_key(models["good"], scores.test_sha256(other_data)), "test_accuracy") is None
    assert first.candidate_accuracy == pytest.approx(scores.measure(models["good"], mnist.load_split(
        models["data"], "test", 0)))


def test_a_score_measured_in_other_batches_or_by_other_code_is_not_reused(models: dict, tmp_path: Path) -> None:
    test_files = scores.test_sha256(models["params"].data.sha256)
    key = scores.score_key(models["good"], test_files)
    assert scores.score_key(models["good"], test_files, batch_size=100)["scoring_sha256"] != key["scoring_sha256"]
    assert scores.recorded([{**key, "scoring_sha256": "other code", "test_accuracy": 0.5}], key,
                           "test_accuracy") is None
    assert scores.recorded([{**key, "test_accuracy": 0.5}], key, "test_accuracy") == 0.5


@pytest.mark.slow
def test_promote_loads_no_tensorflow_when_both_scores_are_recorded(models: dict, tmp_path: Path) -> None:
    """The point of the records: a re-run of promote after evaluate is seconds, not TensorFlow's import."""
    _promote(models, tmp_path, "good")
    _record_evaluation(models, tmp_path, "good", 1.0)  # >= any champion: promoted, without TensorFlow
    script = (
        "import sys\n"
        "from dataclasses import replace\n"
        "from pathlib import Path\n"
        "from tasks.lib.params import Paths, PromoteParams\n"
        "from tasks.promote import promote_candidate\n"
        f"root = Path({str(tmp_path)!r})\n"
        f"paths = replace(Paths.under(root), candidate=Path({str(models['good'])!r}), "
        f"raw_data=Path({str(models['data'])!r}), production=root / 'production', registry=root / 'registry.json', "
        "promotion=root / 'promotion.json')\n"
        "decision = promote_candidate(PromoteParams(min_accuracy=0.5, min_improvement=0.0, keep_versions=3), paths, "
        f"data_sha256={dict(models['params'].data.sha256)!r})\n"
        "print(decision.promoted, 'tensorflow' in sys.modules)\n"
    )
    environment = tool_environment() | {"PYTHONPATH": str(REPO_ROOT)}
    result = subprocess.run([sys.executable, "-c", script], env=environment, capture_output=True, text=True,
                            cwd=REPO_ROOT)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split()[-2:] == ["True", "False"]


def test_a_score_record_that_is_not_a_small_file_is_passed_over_not_read(tmp_path: Path) -> None:
    """A FIFO would block a plain read for ever; an endless file would grow without bound."""
    fifo, directory, huge = tmp_path / "fifo.json", tmp_path / "directory.json", tmp_path / "huge.json"
    os.mkfifo(fifo)
    directory.mkdir()
    huge.write_bytes(b" " * (scores.RECORD_MAX_BYTES + 1))
    started = time.monotonic()
    assert [scores.read_records(path) for path in (fifo, directory, huge)] == [[], [], []]
    assert time.monotonic() - started < 10
