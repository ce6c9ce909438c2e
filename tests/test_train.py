"""tasks/train.py and tasks/lib/trainer.py: the seed's algorithm, determinism, resume, divergence."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pytest
import yaml

from tasks.lib import mnist
from tasks.lib.checkpoints import newest_checkpoint, read_state
from tasks.lib.divergence import TrainingDiverged, read_record
from tasks.lib.params import Params, Paths, TrainParams, parse_params
from tasks.lib.schedules import BatchOrder, learning_rate_at, learning_rates, moving_average_decays
from tasks.lib.trainer import Trainer
from tasks.train import CURVE_COLUMNS, TrainSummary, train_model

from .conftest import (
    dvc,
    make_params_document,
    make_project,
    run_command,
    tool_environment,
    with_default_threads,
    write_synthetic,
)
from .test_checkpoints import DAMAGES


def _train_params(**changes: object) -> TrainParams:
    base = parse_params(make_params_document(_shared_source())).train
    return base.model_copy(update=changes)


_SOURCE: list[Path] = []


def _shared_source() -> Path:
    if not _SOURCE:
        import tempfile

        directory = Path(tempfile.mkdtemp(prefix="synthetic-mnist-"))
        write_synthetic(directory)
        _SOURCE.append(directory)
    return _SOURCE[0]


def test_staircase_learning_rate() -> None:
    train = _train_params(learning_rate=0.8, learning_rate_decay=0.99)
    rates = learning_rates(train, 550, np.array([0, 549, 550, 1099, 1100, 29999]))
    assert rates.dtype == np.float32
    assert rates[0] == rates[1] == np.float32(0.8)
    assert rates[2] == rates[3] == pytest.approx(0.8 * 0.99, rel=1e-6)
    assert rates[4] == pytest.approx(0.8 * 0.99**2, rel=1e-6)
    assert rates[5] == pytest.approx(0.8 * 0.99**54, rel=1e-6) == learning_rate_at(29999, train, 550)
    no_decay = learning_rates(_train_params(learning_rate_decay=1.0), 550, np.arange(0, 30000, 97))
    assert set(no_decay.tolist()) == {np.float32(_train_params().learning_rate)}


def test_learning_rate_is_worked_out_as_tensorflow_works_the_seeds() -> None:
    """Bit for bit what Keras ExponentialDecay (the seed's tf.train.exponential_decay) gives for
    one step at a time, at every level of the seed's 30000 steps; float64 rounded at the end would not be."""
    import keras
    import tensorflow as tf

    train = _train_params(learning_rate=0.8, learning_rate_decay=0.99)
    schedule = keras.optimizers.schedules.ExponentialDecay(0.8, 550, 0.99, staircase=True)
    steps = np.arange(0, 30000, 275)
    expected = np.array([np.float32(schedule(tf.constant(step, tf.int64))) for step in steps])
    assert np.array_equal(learning_rates(train, 550, steps), expected)
    float64_then_rounded = np.array([0.8 * 0.99 ** (step // 550) for step in steps], np.float32)
    assert np.count_nonzero(float64_then_rounded != expected) > len(steps) // 2


def test_moving_average_warm_up() -> None:
    decays = moving_average_decays(_train_params(moving_average_decay=0.99), np.array([0, 10, 889, 890, 5000]))
    assert decays.dtype == np.float32
    assert decays[0] == np.float32(0.1)
    assert decays[1] == np.float32(11 / 20)
    assert decays[2] < np.float32(0.99)  # (1+889)/(10+889) < 0.99
    assert decays[3] == decays[4] == np.float32(0.99)  # (1+890)/(10+890) = 0.99
    assert moving_average_decays(_train_params(moving_average_decay=0.0), np.array([5000])).tolist() == [0.0]


def test_batch_order_is_a_pure_function_of_seed_and_step() -> None:
    first, second = BatchOrder(500, 50, seed=7), BatchOrder(500, 50, seed=7)
    assert np.array_equal(first.batches(0, 30), second.batches(0, 30))
    assert np.array_equal(first.batches(0, 30)[17:], second.batches(17, 13))  # resuming mid-epoch
    epoch = first.batches(0, 10)
    assert sorted(epoch.reshape(-1).tolist()) == list(range(500))  # each epoch sees every example once
    assert not np.array_equal(epoch, first.batches(10, 10))  # and the next epoch is reshuffled
    assert not np.array_equal(epoch, BatchOrder(500, 50, seed=8).batches(0, 10))


def _numpy_step(state: dict[str, np.ndarray], x: np.ndarray, y: np.ndarray, rate: float, l2: float):
    w1, b1, w2, b2 = (state[f"weight_{i}"].astype(np.float64) for i in range(4))
    pre = x @ w1 + b1
    hidden = np.maximum(pre, 0)
    logits = hidden @ w2 + b2
    probabilities = np.exp(logits - logits.max(1, keepdims=True))
    probabilities /= probabilities.sum(1, keepdims=True)
    d_logits = probabilities.copy()
    d_logits[np.arange(len(y)), y] -= 1
    d_logits /= len(y)
    d_pre = (d_logits @ w2.T) * (pre > 0)
    gradients = [x.T @ d_pre + l2 * w1, d_pre.sum(0), hidden.T @ d_logits + l2 * w2, d_logits.sum(0)]
    return [w - rate * g for w, g in zip((w1, b1, w2, b2), gradients)]


def test_one_step_equals_hand_computed_sgd_with_l2_and_moving_average(params: Params) -> None:
    training = mnist.load_split(params.data.sources[0], "train", params.data.validation_size)
    train = params.train.model_copy(update={"l2_rate": 0.01})
    trainer = Trainer(params.model, train, training.images, training.labels, decay_steps=10)
    before = trainer.state()
    batch = np.arange(7, 7 + train.batch_size, dtype=np.int32)
    loss = trainer.run_steps(batch[None, :])
    expected = _numpy_step(before, training.images[batch], training.labels[batch], train.learning_rate, 0.01)
    after = trainer.state()
    for i, value in enumerate(expected):
        assert np.allclose(after[f"weight_{i}"], value, rtol=1e-4, atol=1e-6)
        decay = 0.1  # min(0.99, (1 + 0) / (10 + 0)) at the first step
        assert np.allclose(after[f"average_{i}"], decay * before[f"weight_{i}"] + (1 - decay) * value, atol=1e-6)
    assert loss.shape == (1,) and np.isfinite(loss[0])
    assert trainer.current_step() == 1


def _run(params: Params, root: Path, steps: int | None = None, **train_changes: object):
    train = params.train.model_copy(update={**train_changes, **({"steps": steps} if steps else {})})
    return train_model(params.model, train, _paths(root, Path(params.data.sources[0])),
                       validation_size=params.data.validation_size, data_sha256=params.data.sha256)


def _paths(root: Path, data: Path) -> Paths:
    """The train stage's paths in ``root``, reading the data in ``data``."""
    return replace(Paths.under(root), raw_data=data, candidate=root / "candidate", train_reports=root / "reports")


def _final_state(root: Path) -> dict[str, np.ndarray]:
    return read_state(newest_checkpoint(root / "checkpoints"))


def _curves(reports: Path) -> dict[str, str]:
    """The training curves as DVCLive wrote them, one TSV per metric."""
    return {name: (reports / "plots" / "metrics" / f"{name}.tsv").read_text() for name in CURVE_COLUMNS[1:]}


def _assert_same_state(first: dict[str, np.ndarray], second: dict[str, np.ndarray]) -> None:
    assert first.keys() == second.keys()
    for key in first:
        assert np.array_equal(first[key], second[key]), key


def test_resume_ends_with_the_weights_of_an_uninterrupted_run(interrupted_run: Runs, tmp_path: Path,
                                                              capsys: pytest.CaptureFixture[str]) -> None:
    params, uninterrupted = interrupted_run.params, interrupted_run.whole_summary
    _copy_of(interrupted_run.checkpoints, tmp_path / "b")  # "interrupted" after the checkpoint at step 40
    resumed = _run(params, tmp_path / "b")
    assert "resuming from" in capsys.readouterr().out
    assert resumed.resumed_from_step == 40 and uninterrupted.resumed_from_step == 0
    _assert_same_state(_final_state(interrupted_run.whole), _final_state(tmp_path / "b"))
    assert resumed.validation_accuracy == uninterrupted.validation_accuracy
    curves = _curves(tmp_path / "b" / "reports")
    assert curves == _curves(interrupted_run.whole / "reports")  # the points before the resume come from the checkpoint
    loss = curves["loss"].splitlines()
    assert loss[0] == "step\tloss" and [row.split("\t")[0] for row in loss[1:]] == ["20", "40", "60"]
    summary = json.loads((tmp_path / "b" / "reports" / "metrics.json").read_text())
    assert summary["resumed_from_step"] == 40 and summary["steps"] == summary["step"] == 60
    assert summary["validation_accuracy"] == round(resumed.validation_accuracy, 6)


def test_changed_params_start_fresh(interrupted_run: Runs, tmp_path: Path,
                                   capsys: pytest.CaptureFixture[str]) -> None:
    params = interrupted_run.params
    _copy_of(interrupted_run.checkpoints, tmp_path)  # a run of these params, to step 40
    summary = _run(params, tmp_path, l2_rate=0.001)
    output = capsys.readouterr().out
    assert "params or data changed" in output and "starting fresh" in output
    assert summary.resumed_from_step == 0
    assert summary.steps == params.train.steps


def test_switching_params_back_resumes(interrupted_run: Runs, tmp_path: Path,
                                       capsys: pytest.CaptureFixture[str]) -> None:
    """hidden_units 32 -> 16 -> 32 (the seed's 500 -> 300 -> 500, small): the third run resumes
    the first one's checkpoint instead of starting from zero."""
    params = interrupted_run.params
    wide, narrow = params.model, params.model.model_copy(update={"hidden_units": 16})
    paths = _paths(tmp_path, Path(params.data.sources[0]))
    shutil.copytree(interrupted_run.whole / "checkpoints", paths.checkpoints)  # the first (wide) run, whole
    train_model(narrow, params.train, paths, validation_size=params.data.validation_size,
                data_sha256=params.data.sha256)
    capsys.readouterr()
    summary = train_model(wide, params.train, paths, validation_size=params.data.validation_size,
                          data_sha256=params.data.sha256)
    assert summary.resumed_from_step == params.train.steps and "resuming from" in capsys.readouterr().out


def test_a_run_that_fails_before_its_first_checkpoint_deletes_nothing(interrupted_run: Runs, tmp_path: Path) -> None:
    params = interrupted_run.params
    _copy_of(interrupted_run.checkpoints, tmp_path)  # a run to step 40
    before = sorted(path.relative_to(tmp_path) for path in (tmp_path / "checkpoints").rglob("*"))
    with pytest.raises(TrainingDiverged):  # other params, failing before their first checkpoint
        _run(params, tmp_path, learning_rate=100.0, max_loss=1.0)
    after = {path.relative_to(tmp_path) for path in (tmp_path / "checkpoints").rglob("*")}
    assert set(before) <= after and any(path.suffix == ".index" for path in before)


def test_leftovers_of_a_killed_export_are_swept(params: Params, tmp_path: Path,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    leftover = tmp_path / ".candidate.partial-killed"
    (leftover / "variables").mkdir(parents=True)
    _run(params, tmp_path, steps=20)
    assert not leftover.exists() and f"removed {leftover}" in capsys.readouterr().out


def test_outputs_and_learning(params: Params, tmp_path: Path) -> None:
    summary = _run(params, tmp_path, steps=200, eval_every=100, steps_per_call=50, checkpoint_every=50)
    assert summary.validation_accuracy > 0.8  # the synthetic digits are easy; chance is 0.1
    assert (tmp_path / "candidate" / "saved_model.pb").is_file()
    kept = sorted(int(path.stem.split("-")[1]) for path in (tmp_path / "checkpoints").glob("*/ckpt-*.index"))
    assert kept == [100, 150, 200][-params.train.keep_checkpoints:]  # the newest, every checkpoint_every (50)
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_divergence_stops_with_the_step_and_rate_and_writes_no_model(params: Params, tmp_path: Path,
                                                                     capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(TrainingDiverged, match=r"at step \d+ with learning rate 100") as raised:
        _run(params, tmp_path, learning_rate=100.0, learning_rate_decay=1.0, l2_rate=1.0)
    assert not (tmp_path / "candidate").exists()
    # Why it stopped, as data: in the DVCLive summary and as the record line a failed experiment's log keeps.
    stopped = json.loads((tmp_path / "reports" / "metrics.json").read_text())["stopped"]
    assert stopped == asdict(raised.value.divergence) and stopped["reason"] == "diverged"
    assert read_record(capsys.readouterr().out) == raised.value.divergence


@pytest.mark.slow
def test_killed_stage_resumes_to_identical_weights(tmp_path: Path, synthetic_source: Path) -> None:
    """SIGKILL `python -m tasks.train` after its first checkpoint and a curve point past it, re-run,
    compare with a clean run: the same weights, and the same curve (the point past the checkpoint
    is logged once, by the resumed run)."""
    document = make_params_document(synthetic_source)
    document["train"].update(steps=10000, steps_per_call=10, eval_every=500, checkpoint_every=1000)
    roots = []
    for name in ("killed", "clean"):
        root = tmp_path / name
        write_synthetic(root / "data" / "raw")
        (root / "params.yaml").write_text(yaml.safe_dump(document))
        roots.append(root)
    killed, clean = roots
    command = [sys.executable, "-m", "tasks.train"]
    # TensorFlow's default threads, as in `dvc repro`: resume must be exact with them.
    environment = with_default_threads(tool_environment() | {"PYTHONPATH": str(Path(__file__).resolve().parents[1])})
    process = subprocess.Popen(command, cwd=killed, env=environment, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 120
    loss_curve = killed / "reports" / "train" / "plots" / "metrics" / "loss.tsv"
    while time.monotonic() < deadline and not (newest_checkpoint(killed / "checkpoints") and loss_curve.is_file()
                                               and "\n1500\t" in loss_curve.read_text()):
        time.sleep(0.02)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert process.returncode == -signal.SIGKILL, "the run finished before it could be killed"
    assert not (killed / "models" / "candidate").exists()
    resumed = subprocess.run(command, cwd=killed, env=environment, capture_output=True, text=True, check=True)
    assert "resuming from" in resumed.stdout
    subprocess.run(command, cwd=clean, env=environment, capture_output=True, text=True, check=True)
    _assert_same_state(_final_state_at(killed), _final_state_at(clean))
    assert _curves(killed / "reports" / "train") == _curves(clean / "reports" / "train")  # the curve too
    exported = [{str(p.relative_to(root)): p.read_bytes() for p in (root / "models" / "candidate").rglob("*")
                 if p.is_file()} for root in (killed, clean)]
    assert exported[0] == exported[1]  # the same candidate, byte for byte: DVC sees nothing new


def _final_state_at(root: Path) -> dict[str, np.ndarray]:
    return read_state(newest_checkpoint(root / "checkpoints"))


def test_moving_average_off_serves_the_raw_weights(params: Params, tmp_path: Path) -> None:
    summary = _run(params, tmp_path, moving_average_decay=0.0)
    state = _final_state(tmp_path)
    for i in range(4):
        assert np.array_equal(state[f"average_{i}"], state[f"weight_{i}"])
    assert summary.validation_accuracy == summary.validation_accuracy_raw


@pytest.mark.parametrize(("hidden_units", "activation"), [(0, "relu"), (32, "linear")])
def test_ablated_networks_train(params: Params, tmp_path: Path, hidden_units: int, activation: str) -> None:
    changed = params.model_copy(update={"model": params.model.model_copy(
        update={"hidden_units": hidden_units, "activation": activation})})
    summary = _run(changed, tmp_path, steps=100)
    assert summary.validation_accuracy > 0.5
    assert len(_final_state(tmp_path)) == (4 if hidden_units == 0 else 8)  # weights + averages


def test_finite_divergence_above_max_loss_stops_training(params: Params, tmp_path: Path) -> None:
    """A rate of 100 throws the loss up to ~1e7 and back without ever making it NaN; only
    train.max_loss notices. The seed's own settings peak at 12.3 on MNIST (tasks/lib/params.py)."""
    with pytest.raises(TrainingDiverged, match=r"reached [\d.e+]+ \(above train.max_loss 100\) at step 1 with "
                                               r"learning rate 100"):
        _run(params, tmp_path, learning_rate=100.0)
    assert not (tmp_path / "candidate").exists()
    summary = _run(params, tmp_path / "tolerant", learning_rate=100.0, max_loss=1e12)
    assert summary.steps == params.train.steps  # finite all along: NaN/inf alone would let it finish


def test_max_loss_does_not_invalidate_checkpoints(interrupted_run: Runs, tmp_path: Path,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    params = interrupted_run.params
    _copy_of(interrupted_run.checkpoints, tmp_path)  # a run to step 40
    assert _run(params, tmp_path, max_loss=50.0).resumed_from_step == 40
    assert "resuming from" in capsys.readouterr().out


# --- damaged checkpoints ------------------------------------------------------------------
# What each kind of damage does to the files themselves is tests/test_checkpoints.py's subject;
# here: a run passes over a damaged newest checkpoint with one short note, resumes from the one
# before it, and still ends with the weights of an uninterrupted run.


class Runs(NamedTuple):
    """Two runs of the same params, read-only: tests copy what they change."""

    params: Params
    checkpoints: Path  # of the run interrupted at step 40: checkpoints at steps 20 and 40
    expected: dict[str, np.ndarray]  # the final weights of the whole run
    whole: Path  # the whole 60-step run's directory (checkpoints, reports)
    whole_summary: TrainSummary


@pytest.fixture(scope="module")
def interrupted_run(tmp_path_factory: pytest.TempPathFactory) -> Runs:
    """A whole 60-step run and one interrupted after its checkpoint at step 40. Built once per
    module (each run costs about a second of set-up and export); a test that resumes or changes
    either copies its checkpoints first."""
    params = parse_params(make_params_document(_shared_source()))
    whole, interrupted = tmp_path_factory.mktemp("whole"), tmp_path_factory.mktemp("interrupted")
    summary = _run(params, whole)
    _run(params, interrupted, steps=40)
    return Runs(params, interrupted / "checkpoints", _final_state(whole), whole, summary)


def _copy_of(checkpoints: Path, root: Path) -> Path:
    """A copy of the interrupted run's checkpoints in ``root``; the prefix of its newest (step 40)."""
    shutil.copytree(checkpoints, root / "checkpoints")
    newest = newest_checkpoint(root / "checkpoints")
    assert newest is not None and newest.name == "ckpt-40"
    return newest


@pytest.mark.parametrize("damage", list(DAMAGES))
def test_damaged_newest_checkpoint_is_skipped_with_a_message(interrupted_run, tmp_path: Path, damage: str,
                                                            capsys: pytest.CaptureFixture[str]) -> None:
    params, checkpoints, expected = interrupted_run[:3]
    root = tmp_path / "run"
    DAMAGES[damage][0](_copy_of(checkpoints, root))
    summary = _run(params, root)
    output = capsys.readouterr().out
    assert "train: ignoring checkpoint ckpt-40: " in output
    notes = [line for line in output.splitlines() if "ignoring" in line]
    assert len(notes) == 1 and len(notes[0]) < 200  # one short line, not a traceback
    assert summary.resumed_from_step == 20
    _assert_same_state(_final_state(root), expected)  # fell back to step 20 and still ends the same


def test_a_lost_list_of_checkpoints_loses_nothing(interrupted_run, tmp_path: Path,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    """TensorFlow's `checkpoint` file (the list the manager prunes by) turned to garbage: the run
    resumes from the newest checkpoint file all the same, and pruning still keeps only the newest."""
    params, checkpoints, expected = interrupted_run[:3]
    root = tmp_path / "run"
    newest = _copy_of(checkpoints, root)
    (newest.parent / "checkpoint").write_bytes(np.random.default_rng(0).bytes(300))
    summary = _run(params, root, steps=100)
    assert summary.resumed_from_step == 40 and "ignoring" not in capsys.readouterr().out
    kept = sorted(path.name for path in newest.parent.glob("*.index"))
    assert kept == ["ckpt-100.index", "ckpt-60.index", "ckpt-80.index"]  # keep_checkpoints: 3


def test_every_checkpoint_damaged_starts_fresh(interrupted_run, tmp_path: Path,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    params, checkpoints, expected = interrupted_run[:3]
    root = tmp_path / "run"
    newest = _copy_of(checkpoints, root)
    for path in newest.parent.glob("ckpt-*.data-*"):
        path.write_bytes(path.read_bytes()[:100])
    summary = _run(params, root)
    output = capsys.readouterr().out
    assert output.count("ignoring checkpoint") == 2 and "starting fresh" in output
    assert summary.resumed_from_step == 0
    _assert_same_state(_final_state(root), expected)


def test_checkpoints_of_the_older_npz_format_are_ignored(interrupted_run, tmp_path: Path,
                                                         capsys: pytest.CaptureFixture[str]) -> None:
    """An upgrade leaves the previous code's `checkpoints/ckpt-<step>.npz` files behind."""
    params, _, expected = interrupted_run[:3]
    old = tmp_path / "checkpoints" / "ckpt-000000040.npz"
    old.parent.mkdir()
    old.write_bytes(b"PK\x03\x04" + bytes(100))
    summary = _run(params, tmp_path)
    output = capsys.readouterr().out
    assert "ignoring checkpoints/ckpt-000000040.npz: not a checkpoint of this version" in output.replace(
        str(tmp_path) + "/", "")
    assert summary.resumed_from_step == 0 and not old.exists()
    _assert_same_state(_final_state(tmp_path), expected)


def test_tampered_training_data_is_refused_before_use(params: Params, tmp_path: Path) -> None:
    data = tmp_path / "data"
    shutil.copytree(params.data.sources[0], data)
    images = data / mnist.TRAIN_IMAGES
    content = bytearray(images.read_bytes())
    content[5000] ^= 0x80
    images.write_bytes(bytes(content))
    with pytest.raises(mnist.DataError, match=f"{mnist.TRAIN_IMAGES} was changed or damaged .*dvc checkout --relink"):
        train_model(params.model, params.train, _paths(tmp_path, data), validation_size=params.data.validation_size,
                    data_sha256=params.data.sha256)
    assert not (tmp_path / "candidate").exists() and not (tmp_path / "checkpoints").exists()


def _tree(directory: Path) -> dict[str, bytes]:
    return {str(path.relative_to(directory)): path.read_bytes() for path in directory.rglob("*") if path.is_file()}


@pytest.mark.slow
def test_failed_train_under_dvc_says_how_to_get_the_candidate_back(tmp_path: Path, synthetic_source: Path) -> None:
    """`dvc repro` deletes a stage's outputs before running it. When train then fails (tampered
    data, divergence), the error says what to run, and running it restores the candidate."""
    project = make_project(tmp_path / "project", make_params_document(synthetic_source))
    dvc(project, "repro", "train")
    candidate = _tree(project / "models" / "candidate")
    # 1. A byte of data/raw changed in place, size and time restored: DVC sees nothing ...
    images = project / "data" / "raw" / mnist.TRAIN_IMAGES
    before, content = images.stat(), bytearray(images.read_bytes())
    content[20_000] ^= 0x10
    images.write_bytes(bytes(content))
    os.utime(images, ns=(before.st_atime_ns, before.st_mtime_ns))
    assert "up to date" in dvc(project, "status", "train").stdout
    # ... until a params change re-runs train, which checks the data first.
    document = yaml.safe_load((project / "params.yaml").read_text())
    document["train"]["steps"] = 40
    (project / "params.yaml").write_text(yaml.safe_dump(document, sort_keys=False))
    failed = dvc(project, "repro", "train", check=False)
    output = failed.stdout + failed.stderr
    assert failed.returncode != 0 and "Traceback" not in output
    assert f"data/raw/{mnist.TRAIN_IMAGES} was changed or damaged" in output
    assert "`dvc checkout --relink data/raw`" in output and "`dvc checkout models/candidate`" in output
    assert not (project / "models" / "candidate").exists()  # DVC removed it before the stage ran
    dvc(project, "checkout", "--relink", "data/raw")
    dvc(project, "checkout", "models/candidate")
    assert mnist.sha256_of(images) == document["data"]["sha256"][mnist.TRAIN_IMAGES]
    assert _tree(project / "models" / "candidate") == candidate
    # 2. A diverging run: the same note, the same way back.
    document["train"]["learning_rate"] = 100.0
    (project / "params.yaml").write_text(yaml.safe_dump(document, sort_keys=False))
    failed = dvc(project, "repro", "train", check=False)
    assert "training diverged" in failed.stderr + failed.stdout
    assert "`dvc checkout models/candidate` brings back the previous version" in failed.stderr + failed.stdout
    dvc(project, "checkout", "models/candidate")
    assert _tree(project / "models" / "candidate") == candidate


def _running_experiments(project: Path) -> list[dict]:
    """The experiments `dvc exp show --json` reports as running, with their data."""
    shown = json.loads(dvc(project, "exp", "show", "--json").stdout)
    return [revision for baseline in shown for experiment in baseline.get("experiments") or []
            if experiment.get("executor", {}).get("state") == "running" for revision in experiment["revs"]]


@pytest.mark.slow
def test_dvc_exp_show_sees_the_metrics_of_a_running_experiment(tmp_path: Path, synthetic_source: Path) -> None:
    """While `dvc exp run` trains, `dvc exp show` lists it as running with the metrics DVCLive
    wrote so far; DVCLive itself neither writes a dvc.yaml nor stages anything in git."""
    document = make_params_document(synthetic_source)
    document["train"].update(steps=40000, steps_per_call=10, eval_every=500, checkpoint_every=10000)
    project = make_project(tmp_path / "project", document)
    command = [sys.executable, "-m", "dvc", "exp", "run", "train"]
    running = subprocess.Popen(command, cwd=project, env=tool_environment(), stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True)
    assert running.stdout is not None
    for line in running.stdout:  # wait for the second curve point: metrics.json is being rewritten
        if line.startswith("train: step    1000/40000"):
            break
    # DVCLive rewrites metrics.json in place, so a read can land on a half-written file; DVC then
    # reports {"error": ...} for it. Ask again (a few times, the run is long) until a whole file is read.
    for _ in range(5):
        experiments = _running_experiments(project)
        metrics = experiments[0]["data"].get("metrics") or {} if len(experiments) == 1 else {}
        shown = metrics.get("reports/train/metrics.json", {})
        if "data" in shown:
            break
    rest = running.stdout.read()
    assert running.wait() == 0, rest
    assert len(experiments) == 1
    live = shown["data"]
    assert 1000 <= live["step"] < 40000 and set(CURVE_COLUMNS[1:]) <= set(live)
    assert "steps_per_second" not in live  # the summary comes at the end: this is a run in progress
    final = json.loads((project / "reports" / "train" / "metrics.json").read_text())
    assert final["step"] == final["steps"] == 40000
    assert run_command(["git", "status", "--porcelain", "--", "dvc.yaml"], project).stdout == ""
    assert run_command(["git", "diff", "--cached", "--name-only"], project).stdout == ""
    assert not list((project / "reports").rglob("dvc.yaml"))
