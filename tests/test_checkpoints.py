"""tasks/lib/checkpoints.py: what a checkpoint holds, which are kept, and what each kind of damage does."""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf

from tasks.lib.checkpoints import (
    CURVE_WIDTH,
    CheckpointError,
    Checkpoints,
    Snapshot,
    load_checkpoint,
    newest_checkpoint,
    read_state,
)
from tasks.lib.params import parse_params
from tasks.lib.trainer import Trainer

from .conftest import make_params_document, write_synthetic

FINGERPRINT = "0123456789abcdef"


def _curve(step: int) -> list[tuple[float, ...]]:
    return [(point, 1.0 / point, 0.1, 0.5, 0.6) for point in range(20, step + 1, 20)]


@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, np.ndarray], Snapshot]:
    """Checkpoints at steps 20 and 40 of a real trainer; the prefix of the one at 40, the
    trainer's state (the template) and what that checkpoint must read back as."""
    source = tmp_path_factory.mktemp("source")
    write_synthetic(source)
    params = parse_params(make_params_document(source))
    labels = np.arange(600) % 10
    images = np.random.default_rng(0).random((600, 784), dtype=np.float32)
    trainer = Trainer(params.model, params.train, images, labels, decay_steps=10)
    checkpoints = Checkpoints(tmp_path_factory.mktemp("run") / "checkpoints", FINGERPRINT, keep=3)
    assert checkpoints.find(1000, trainer.state()) == (None, [])
    batches = np.arange(40 * 50, dtype=np.int32).reshape(40, 50) % 600
    for step in (20, 40):
        trainer.run_steps(batches[step - 20 : step])
        prefix = checkpoints.save(trainer, _curve(step), seconds=step / 10)
    return prefix, trainer.state(), Snapshot(40, FINGERPRINT, trainer.state(), _curve(40), 4.0)


def _assert_same(loaded: Snapshot, expected: Snapshot) -> None:
    assert (loaded.step, loaded.fingerprint, loaded.curve, loaded.seconds) == (
        expected.step, expected.fingerprint, expected.curve, expected.seconds)
    assert loaded.state.keys() == expected.state.keys()
    for name, array in expected.state.items():
        assert loaded.state[name].dtype == array.dtype and np.array_equal(loaded.state[name], array), name


def test_a_checkpoint_reads_back_exactly(saved) -> None:
    prefix, template, expected = saved
    assert prefix.name == "ckpt-40" and prefix.parent.name == FINGERPRINT
    _assert_same(load_checkpoint(prefix, template, FINGERPRINT), expected)
    assert read_state(prefix).keys() == template.keys()
    with pytest.raises(CheckpointError, match="belongs to other params or data"):
        load_checkpoint(prefix, template, "f" * 16)


class _Variables:
    """Stands in for a trainer where only variables and the step are read (they are real tf.Variables)."""

    def __init__(self, template: dict[str, np.ndarray]) -> None:
        count = len(template) // 2
        self.weights = [tf.Variable(template[f"weight_{i}"]) for i in range(count)]
        self.averages = [tf.Variable(template[f"average_{i}"]) for i in range(count)]
        self.step = tf.Variable(0, dtype=tf.int64)

    def current_step(self) -> int:
        return int(self.step.numpy())


def test_only_the_newest_are_kept_and_listed(saved, tmp_path: Path) -> None:
    prefix, template, _ = saved
    checkpoints = Checkpoints(tmp_path, FINGERPRINT, keep=2)
    trainer = _Variables(template)
    for step in (60, 80, 100):
        trainer.step.assign(step)
        checkpoints.save(trainer, _curve(step), seconds=1.0)
    assert sorted(path.name for path in checkpoints.directory.iterdir()) == [
        "checkpoint", "ckpt-100.data-00000-of-00001", "ckpt-100.index", "ckpt-80.data-00000-of-00001",
        "ckpt-80.index"]
    listed = tf.train.get_checkpoint_state(str(checkpoints.directory)).all_model_checkpoint_paths
    assert list(listed) == [str(checkpoints.directory / "ckpt-80"), str(checkpoints.directory / "ckpt-100")]


# --- damage --------------------------------------------------------------------------------


def _index(prefix: Path) -> Path:
    return prefix.with_name(f"{prefix.name}.index")


def _data(prefix: Path) -> Path:
    return next(prefix.parent.glob(f"{prefix.name}.data-*"))


def _rewrite(path: Path, change: Callable[[bytes], bytes]) -> None:
    path.write_bytes(change(path.read_bytes()))


def _flip_bit(data: bytes, position: int) -> bytes:
    return data[: position // 8] + bytes([data[position // 8] ^ (1 << position % 8)]) + data[position // 8 + 1:]


def _random_bytes(prefix: Path) -> None:
    for path in (_index(prefix), _data(prefix)):
        _rewrite(path, lambda data: np.random.default_rng(0).bytes(len(data)))


def _written_again(prefix: Path, without: tuple[str, ...] = (), **changes: object) -> None:
    """The checkpoint at ``prefix`` written anew through tf.train.Checkpoint, well formed, with
    some contents changed or left out: damage no checksum can see."""
    stored = load_checkpoint(prefix, read_state(prefix), prefix.parent.name)
    values = {"state": stored.state, "step": stored.step, "curve": stored.curve, "seconds": stored.seconds,
              "fingerprint": stored.fingerprint} | changes
    state, count = values["state"], len(values["state"]) // 2
    variables = {
        "weights": [tf.Variable(state[f"weight_{i}"]) for i in range(count)],
        "averages": [tf.Variable(state[f"average_{i}"]) for i in range(count)],
        "step": tf.Variable(values["step"], dtype=tf.int64),
        "curve": tf.Variable(np.asarray(values["curve"], np.float64).reshape(-1, CURVE_WIDTH)),
        "seconds": tf.Variable(values["seconds"], dtype=tf.float64),
        "fingerprint": tf.Variable(values["fingerprint"]),
    }
    checkpoint = tf.train.Checkpoint(**{name: value for name, value in variables.items() if name not in without})
    checkpoint.save_counter  # noqa: B018  (as the manager's saves hold it)
    for path in prefix.parent.glob(f"{prefix.name}.*"):
        path.unlink()
    checkpoint.write(str(prefix))


def _smaller_network(prefix: Path) -> None:
    state = read_state(prefix)
    _written_again(prefix, state={name: array[..., :8] if array.ndim and array.shape[-1] == 32 else array
                                  for name, array in state.items()})


def _non_finite(prefix: Path) -> None:
    state = read_state(prefix)
    state["average_0"] = state["average_0"].copy()
    state["average_0"][3, 5] = np.nan
    _written_again(prefix, state=state)


# Each kind of damage, done to the newest checkpoint (step 40), and what the refusal says.
DAMAGES: dict[str, tuple[Callable[[Path], None], str]] = {
    "index-empty": (lambda prefix: _index(prefix).write_bytes(b""), "too short to be an sstable"),
    "index-truncated": (lambda prefix: _rewrite(_index(prefix), lambda data: data[: len(data) // 2]), "sstable"),
    "index-bit-flip": (lambda prefix: _rewrite(_index(prefix), lambda data: _flip_bit(data, 8 * 40 + 3)),
                       "unreadable"),
    "index-deleted": (lambda prefix: _index(prefix).unlink(), "NotFoundError"),
    "data-empty": (lambda prefix: _data(prefix).write_bytes(b""), "unreadable"),
    "data-truncated": (lambda prefix: _rewrite(_data(prefix), lambda data: data[: len(data) // 2]), "unreadable"),
    "bit-flip-in-weights": (lambda prefix: _rewrite(_data(prefix), lambda data: _flip_bit(data, 8 * (len(data) // 3))),
                            "Checksum does not match"),
    "data-deleted": (lambda prefix: _data(prefix).unlink(), "No such file"),
    "random-bytes": (_random_bytes, "unreadable"),
    "arrays-of-another-network": (_smaller_network, "unreadable"),
    "without-curve-and-time": (lambda prefix: _written_again(prefix, without=("curve", "seconds", "fingerprint")),
                               "unreadable"),
    "of-other-params": (lambda prefix: _written_again(prefix, fingerprint="f" * 16), "other params or data"),
    "non-finite-weights": (_non_finite, "non-finite weights"),
    "step-before-its-curve": (lambda prefix: _written_again(prefix, step=30), "does not fit its training curve"),
    "negative-time": (lambda prefix: _written_again(prefix, seconds=-1.0), "is not a duration"),
}


@pytest.mark.parametrize("damage", list(DAMAGES))
def test_each_kind_of_damage_is_refused_and_the_previous_checkpoint_found(saved, tmp_path: Path,
                                                                          damage: str) -> None:
    prefix, template, _ = saved
    shutil.copytree(prefix.parent.parent, tmp_path / "checkpoints")
    damaged = tmp_path / "checkpoints" / FINGERPRINT / "ckpt-40"
    do, says = DAMAGES[damage]
    do(damaged)
    with pytest.raises(CheckpointError, match=says) as refused:
        load_checkpoint(damaged, template, FINGERPRINT)
    assert len(str(refused.value)) < 150
    found, notes = Checkpoints(tmp_path / "checkpoints", FINGERPRINT, keep=3).find(1000, template)
    assert found is not None and found.step == 20
    assert notes == [f"ignoring checkpoint ckpt-40: {refused.value}"]
    assert not list(damaged.parent.glob("ckpt-40*"))  # passed over for good: it would be refused again
    assert newest_checkpoint(tmp_path / "checkpoints") == damaged.with_name("ckpt-20")


def test_a_save_killed_half_way_is_passed_over(saved, tmp_path: Path) -> None:
    """TensorFlow writes the data into `ckpt-<step>_temp/`, moves it into place, then writes the
    index: a kill in between leaves data without an index, or the temporary directory."""
    prefix, template, expected = saved
    shutil.copytree(prefix.parent.parent, tmp_path / "checkpoints")
    directory = tmp_path / "checkpoints" / FINGERPRINT
    shutil.copy(_data(prefix), directory / "ckpt-60.data-00000-of-00001")
    (directory / "ckpt-80_temp").mkdir()
    (directory / "ckpt-80_temp" / "part-00000-of-00001.data-00000-of-00001").write_bytes(b"\0" * 100)
    found, notes = Checkpoints(tmp_path / "checkpoints", FINGERPRINT, keep=3).find(1000, template)
    assert found is not None
    _assert_same(found, expected)
    assert len(notes) == 1 and notes[0].startswith("ignoring checkpoint ckpt-60: unreadable (NotFoundError")
    assert sorted(path.name for path in directory.iterdir()) == [
        "checkpoint", "ckpt-20.data-00000-of-00001", "ckpt-20.index", "ckpt-40.data-00000-of-00001", "ckpt-40.index"]


def test_checkpoints_after_the_last_step_wait(saved, tmp_path: Path) -> None:
    """A run asked for fewer steps than a checkpoint holds resumes from an earlier one and keeps the later."""
    prefix, template, _ = saved
    shutil.copytree(prefix.parent.parent, tmp_path / "checkpoints")
    found, notes = Checkpoints(tmp_path / "checkpoints", FINGERPRINT, keep=3).find(30, template)
    assert found is not None and found.step == 20 and notes == []
    assert (tmp_path / "checkpoints" / FINGERPRINT / "ckpt-40.index").is_file()


def _trainer(tmp_path: Path) -> Trainer:
    write_synthetic(tmp_path / "source")
    params = parse_params(make_params_document(tmp_path / "source"))
    return Trainer(params.model, params.train, np.zeros((600, 784), np.float32), np.arange(600) % 10, decay_steps=10)


def test_other_runs_are_kept_within_keep_runs_and_pruned_only_after_a_save(saved, tmp_path: Path) -> None:
    prefix, template, _ = saved
    shutil.copytree(prefix.parent.parent, tmp_path / "checkpoints")
    found, notes = Checkpoints(tmp_path / "checkpoints", FINGERPRINT, keep=3).find(1000, template)
    assert found is not None and found.step == 40 and notes == []
    (tmp_path / "checkpoints" / "notes.txt").write_text("not ours")
    for age, name in enumerate(("e" * 16, "d" * 16)):  # two more runs of other params, older
        (tmp_path / "checkpoints" / name).mkdir()
        os.utime(tmp_path / "checkpoints" / name, (1000 + age, 1000 + age))
    other = Checkpoints(tmp_path / "checkpoints", "f" * 16, keep=3, keep_runs=2)
    found, notes = other.find(1000, template)
    assert found is None
    assert f"ignoring the checkpoints in {tmp_path / 'checkpoints' / FINGERPRINT}: params or data " \
           f"changed since they were written" in notes
    everything = sorted(path.name for path in (tmp_path / "checkpoints").iterdir())
    assert everything == sorted([FINGERPRINT, "d" * 16, "e" * 16, "f" * 16, "notes.txt"])  # nothing deleted yet
    other.save(_trainer(tmp_path), [], 1.0)
    # the two most recently written other runs stay (FINGERPRINT's, then d's); e's, the oldest, goes
    assert sorted(path.name for path in (tmp_path / "checkpoints").iterdir()) == sorted(
        [FINGERPRINT, "d" * 16, "f" * 16, "notes.txt"])


def _outcome(prefix: Path, template: dict[str, np.ndarray], expected: Snapshot) -> str:
    try:
        loaded = load_checkpoint(prefix, template, FINGERPRINT)
    except CheckpointError:
        return "refused"
    _assert_same(loaded, expected)
    return "harmless"


def _varint(data: bytes, position: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        byte = data[position]
        value, shift, position = value | (byte & 0x7F) << shift, shift + 7, position + 1
        if byte < 0x80:
            return value, position


def _unchecksummed_start(index: bytes) -> int:
    """Where the index's metaindex block begins (the SSTable footer's first block handle). Before
    it: the data blocks, each under its own CRC32C; from it: the metaindex block (which no reader
    looks at), the index block and the 48-byte footer, which are read as structure."""
    offset, _ = _varint(index[-48:], 0)
    assert 0 < offset < len(index) - 48
    return offset


def _one_bit_per_byte(first: int, last: int) -> list[int]:
    """One bit of each byte in [first, last), the bit position turning with the byte: every byte
    is damaged once, and every bit position is damaged in every eight consecutive bytes."""
    return [8 * byte + byte % 8 for byte in range(first, last)]


# The points of the two tests below. They were every bit of the index (6800 flips) and every
# cut of it, and 4000 bits and 400 cuts of the data: 12000 loads, 72 s of a core. A CRC32C
# catches every single-bit error in what it covers, so one flipped bit per byte there shows
# that each byte is covered and checked; the parts no checksum covers (the index's metaindex,
# index block and footer) still get every bit, and so do both ends of the data file (the
# object graph first, the last tensors), where the readers parse structure. About 3700 loads.


@pytest.mark.slow  # about 1800 damaged files
def test_every_damage_to_the_index_is_caught_or_harmless(saved, tmp_path: Path) -> None:
    """Flip one bit of each byte of the index, and each bit of its unchecksummed tail; cut it at
    every length near either end of the file or in that tail, and at every fifth in between. A
    damaged index is refused with CheckpointError, or the checkpoint reads back exactly as saved
    (a flipped bit no reader looks at, such as the metaindex block or padding in the footer);
    damage to the checksummed data blocks is always refused."""
    prefix, template, expected = saved
    directory = tmp_path / FINGERPRINT
    shutil.copytree(prefix.parent, directory)
    copy = directory / prefix.name
    index = _index(copy).read_bytes()
    tail = _unchecksummed_start(index)

    def with_index(content: bytes) -> str:
        _index(copy).write_bytes(content)
        return _outcome(copy, template, expected)

    flips = {bit: with_index(_flip_bit(index, bit)) for bit in _one_bit_per_byte(0, len(index))}
    assert list(flips.values()).count("refused") > 0.8 * len(flips)
    assert {flips[bit] for bit in _one_bit_per_byte(0, tail)} == {"refused"}
    assert {with_index(_flip_bit(index, bit)) for bit in range(8 * tail, 8 * len(index))} <= {"refused", "harmless"}
    cuts = sorted({*range(0, 64), *range(64, tail, 5), *range(tail - 8, len(index))})
    assert {with_index(index[:cut]) for cut in cuts} == {"refused"}


@pytest.mark.slow  # about 1900 damaged files
def test_every_damage_to_the_data_is_caught(saved, tmp_path: Path) -> None:
    """Flip every bit of the first and last 64 bytes of the data file, one bit of each byte of the
    136 bytes after and before them, and 400 bits spread over it; cut it at every length below
    64 and at 136 lengths spread over the rest. Damage to the data is always refused."""
    prefix, template, expected = saved
    directory = tmp_path / FINGERPRINT
    shutil.copytree(prefix.parent, directory)
    copy = directory / prefix.name
    data = _data(copy).read_bytes()

    def with_data(content: bytes) -> str:
        _data(copy).write_bytes(content)
        return _outcome(copy, template, expected)

    rng = np.random.default_rng(1)
    bits = [*range(8 * 64), *_one_bit_per_byte(64, 200), *_one_bit_per_byte(len(data) - 200, len(data) - 64),
            *range(8 * (len(data) - 64), 8 * len(data)), *rng.integers(0, 8 * len(data), 400).tolist()]
    assert {with_data(_flip_bit(data, bit)) for bit in bits} == {"refused"}
    cuts = [*range(0, 64), *rng.integers(64, len(data), 136).tolist()]
    assert {with_data(data[:cut]) for cut in cuts} == {"refused"}
