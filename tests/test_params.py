"""tasks/lib/params.py: a good file passes; each kind of typo or bad value fails naming the key."""

from __future__ import annotations

import copy
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tasks.commands.check_params import main
from tasks.lib.params import ParamsError, load_params, parse_params

from .conftest import REPO_ROOT, base_params_document


def test_repository_params_are_valid_and_match_the_seed() -> None:
    params = load_params(REPO_ROOT / "params.yaml")
    assert (params.model.hidden_units, params.model.activation, params.model.init_stddev) == (500, "relu", 0.1)
    train = params.train
    assert (train.batch_size, train.steps, train.learning_rate, train.learning_rate_decay) == (100, 30000, 0.8, 0.99)
    assert (train.l2_rate, train.moving_average_decay, train.decay_steps) == (0.0001, 0.99, None)
    assert params.data.validation_size == 5000
    assert sum(params.data.class_counts.train) == 60000 and sum(params.data.class_counts.test) == 10000


def test_params_are_frozen() -> None:
    params = parse_params(base_params_document())
    with pytest.raises(ValueError):
        params.train.steps = 1  # type: ignore[misc]


def _error_for(section: str, key: str, value: object) -> str:
    document = copy.deepcopy(base_params_document())
    document[section][key] = value
    with pytest.raises(ParamsError) as caught:
        parse_params(document, Path("params.yaml"))
    return str(caught.value)


@pytest.mark.parametrize(
    ("section", "key", "value", "expected"),
    [
        ("train", "learning_rate", 0, "train.learning_rate = 0: Input should be greater than 0"),
        ("train", "learning_rate_decay", 1.5, "train.learning_rate_decay = 1.5: Input should be less than or equal"),
        ("train", "batch_size", 0, "train.batch_size = 0"),
        ("train", "steps", "many", "train.steps = 'many'"),
        ("train", "moving_average_decay", 1.0, "train.moving_average_decay = 1.0"),
        ("model", "activation", "tanh", "model.activation = 'tanh'"),
        ("data", "validation_size", 60000, "validation_size must be smaller than the training set"),
        ("data", "sources", ["ftp://example/mnist"], "data.sources.0 = 'ftp://example/mnist'"),
        ("data", "sources", [], "data.sources"),
        ("schedule", "cron", "61 * * * *", "schedule.cron = '61 * * * *'"),
        ("schedule", "timezone", "Mars/Olympus", "schedule.timezone = 'Mars/Olympus'"),
        ("promote", "min_accuracy", 1.2, "promote.min_accuracy = 1.2"),
        ("paths", "candidate", "/abs/path", "paths.candidate = '/abs/path'"),
    ],
)
def test_bad_values_name_the_file_key_value_and_constraint(section: str, key: str, value: object,
                                                           expected: str) -> None:
    message = _error_for(section, key, value)
    assert "params.yaml" in message
    assert expected in message


def test_bad_checksum_is_rejected() -> None:
    document = copy.deepcopy(base_params_document())
    document["data"]["sha256"]["train-images-idx3-ubyte"] = "abc"
    with pytest.raises(ParamsError, match=r"data.sha256.train-images-idx3-ubyte = 'abc': .*SHA-256"):
        parse_params(document)


def test_misspelled_key_is_named_with_a_suggestion() -> None:
    document = copy.deepcopy(base_params_document())
    document["train"]["learnig_rate"] = document["train"].pop("learning_rate")
    with pytest.raises(ParamsError) as caught:
        parse_params(document)
    assert "train.learnig_rate: unknown key (did you mean 'learning_rate'?)" in str(caught.value)
    assert "train.learning_rate: Field required" in str(caught.value)


def test_unknown_section_and_missing_section() -> None:
    document = copy.deepcopy(base_params_document())
    document["trian"] = document.pop("train")
    with pytest.raises(ParamsError, match=r"trian: unknown key \(did you mean 'train'\?\)"):
        parse_params(document)


def test_batch_larger_than_training_set_is_rejected() -> None:
    document = copy.deepcopy(base_params_document())
    document["train"]["batch_size"] = 60000
    with pytest.raises(ParamsError, match="larger than the 55000 training examples"):
        parse_params(document)


def test_not_a_mapping_and_not_yaml(tmp_path: Path) -> None:
    with pytest.raises(ParamsError, match="expected a mapping"):
        parse_params(["a", "list"])
    broken = tmp_path / "broken.yaml"
    broken.write_text("train: [unclosed\n")
    with pytest.raises(ParamsError, match="not valid YAML"):
        load_params(broken)
    with pytest.raises(ParamsError, match="missing.yaml: no such file"):
        load_params(tmp_path / "missing.yaml")


def test_check_command_exit_codes(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main([str(REPO_ROOT / "params.yaml")]) == 0
    document = base_params_document()
    document["model"]["hiden_units"] = document["model"].pop("hidden_units")
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(document))
    assert main([str(bad)]) == 1
    assert "model.hiden_units: unknown key (did you mean 'hidden_units'?)" in capsys.readouterr().err
    assert main(["one.yaml", "two.yaml"]) == 2 and main(["--strict"]) == 2
    assert main([str(tmp_path / "missing.yaml")]) == 1


def test_check_command_runs_as_a_module(tmp_path: Path) -> None:
    result = subprocess.run([sys.executable, "-m", "tasks.commands.check_params", "params.yaml"],
                            cwd=REPO_ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert "params.yaml: ok" in result.stdout


@pytest.mark.parametrize("stage", ["download", "train", "evaluate", "promote"])
def test_stage_commands_refuse_bad_params_with_one_clear_line(stage: str, tmp_path: Path) -> None:
    document = base_params_document()
    document["promote"]["min_acuracy"] = document["promote"].pop("min_accuracy")
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(document))
    result = subprocess.run([sys.executable, "-m", f"tasks.{stage}"], cwd=tmp_path, capture_output=True, text=True,
                            env={"PYTHONPATH": str(REPO_ROOT), "PATH": "/usr/bin:/bin"})
    assert result.returncode == 1
    assert "promote.min_acuracy: unknown key (did you mean 'min_accuracy'?)" in result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "data").exists() and not (tmp_path / "models").exists()


def _params_text() -> str:
    return (REPO_ROOT / "params.yaml").read_text()


def _check_in_a_process(path: Path) -> subprocess.CompletedProcess:
    """`python -m tasks.commands.check_params`, as `make run` calls it; the time-out only stops a hang."""
    return subprocess.run([sys.executable, "-m", "tasks.commands.check_params", str(path)], cwd=REPO_ROOT,
                          capture_output=True, text=True, timeout=30)


def test_yaml_alias_bomb_is_refused_at_once_with_a_short_message(tmp_path: Path) -> None:
    """Nine levels of nine aliases: 387 million strings when expanded, 900 bytes written. Before
    aliases were refused, the error message printed the expanded value: 60 s and 5 GB, and on."""
    levels = ['a0: &a0 ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]']
    levels += [f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 9)}]" for i in range(1, 9)]
    bomb = tmp_path / "params.yaml"
    bomb.write_text("\n".join(levels) + "\n" + re.sub(r"(?m)^  steps: \d+", "  steps: *a8", _params_text()))
    result = _check_in_a_process(bomb)
    assert result.returncode == 1
    assert "YAML aliases (*name) are not allowed" in result.stderr and str(bomb) in result.stderr
    assert len(result.stderr) < 300 and "Traceback" not in result.stderr


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        (b"# padding\n" * 120_000, "larger than the 1048576 bytes allowed for it; not a params file"),
        ("# caf\u00e9 in Latin-1\n".encode("latin-1"), "not UTF-8 text (byte 0xe9 at offset 5)"),
        (b"train: " + b"[" * 5000 + b"]" * 5000 + b"\n", "nested more than 20 levels deep"),
    ],
    ids=["oversize", "latin-1", "deep-nesting"],
)
def test_hostile_files_fail_with_one_short_line(tmp_path: Path, content: bytes, expected: str) -> None:
    path = tmp_path / "params.yaml"
    path.write_bytes(_params_text().encode() + content if expected.startswith("larger") else content)
    result = _check_in_a_process(path)
    assert result.returncode == 1
    assert expected in result.stderr and "Traceback" not in result.stderr
    assert len(result.stderr.splitlines()) == 1


@pytest.mark.parametrize(
    ("section", "key", "value", "expected"),
    [
        ("train", "steps", True, "train.steps = True: Input should be a valid integer"),
        ("train", "learning_rate", True, "train.learning_rate = True: Input should be a valid number"),
        ("model", "hidden_units", 32.0, "model.hidden_units = 32.0: Input should be a valid integer"),
        ("train", "steps", "30000", "train.steps = '30000': Input should be a valid integer (this is a string; "
                                    "write the number unquoted, as 30000)"),
        ("train", "l2_rate", "1e-4", "train.l2_rate = '1e-4': Input should be a valid number (this is a string; "
                                     "write the number unquoted, as 0.0001)"),
        ("train", "l2_rate", "1e-7", "as 1.0e-07)"),  # YAML 1.1 reads 1e-07 as a string again
        ("schedule", "push", "yes", "schedule.push = 'yes': Input should be a valid boolean"),
    ],
)
def test_types_are_strict(section: str, key: str, value: object, expected: str) -> None:
    assert expected in _error_for(section, key, value)


def test_an_integer_is_still_a_valid_float() -> None:
    document = copy.deepcopy(base_params_document())
    document["train"]["learning_rate_decay"] = 1
    assert parse_params(document).train.learning_rate_decay == 1.0


def test_long_values_and_many_errors_are_cut_short() -> None:
    document = copy.deepcopy(base_params_document())
    document["data"]["sources"] = ["ftp://" + "x" * 10_000] * 50
    with pytest.raises(ParamsError) as caught:
        parse_params(document)
    message = str(caught.value)
    assert len(message) < 2000 and "... and 40 more" in message and "xxx..." in message


def test_a_relative_path_is_read_from_the_current_directory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """load_params caches per file, not per spelling: `params.yaml` in two directories is two files."""
    for name, steps in (("first", 100), ("second", 200)):
        document = base_params_document()
        document["train"]["steps"] = steps
        (tmp_path / name).mkdir()
        (tmp_path / name / "params.yaml").write_text(yaml.safe_dump(document))
        monkeypatch.chdir(tmp_path / name)
        assert load_params(Path("params.yaml")).train.steps == steps


# --- issue 24: "ok" means the stages can run ------------------------------------------------------


@pytest.mark.parametrize(
    ("section", "key", "value", "expected"),
    [
        ("train", "seed", 2**64, "train.seed = 18446744073709551616: Input should be less than or equal to"),
        ("train", "decay_steps", 2**63, "train.decay_steps"),
        ("train", "eval_every", 2**70, "train.eval_every"),
        ("train", "max_loss", float("nan"), "train.max_loss = nan"),
        ("train", "max_loss", float("inf"), "train.max_loss = inf"),
        ("paths", "production", "../outside-prod", "must stay inside the repository"),
        ("paths", "registry", "models/../../registry.json", "must stay inside the repository"),
        ("schedule", "stage_timeout_seconds", {"train": -1.0}, "schedule.stage_timeout_seconds.train = -1.0"),
        ("data", "class_counts", {"train": [10**12] * 10, "test": [1] * 10}, "data.class_counts.train.0"),
    ],
)
def test_values_the_stages_cannot_run_are_refused(section: str, key: str, value: object, expected: str) -> None:
    assert expected in _error_for(section, key, value)


def test_the_largest_integers_the_stages_accept_pass() -> None:
    document = copy.deepcopy(base_params_document())
    document["train"].update(seed=2**63 - 1, decay_steps=2**63 - 1)
    params = parse_params(document)
    assert params.train.seed == 2**63 - 1


def test_a_duplicate_key_is_refused_naming_the_line(tmp_path: Path) -> None:
    path = tmp_path / "params.yaml"
    path.write_text(_params_text().replace("  seed: 0\n", "  seed: 0\n  seed: 1\n"))
    with pytest.raises(ParamsError, match=r"params.yaml: line \d+: key 'seed' appears twice"):
        load_params(path)


def test_a_path_linked_outside_the_repository_is_refused(tmp_path: Path) -> None:
    repo, outside = tmp_path / "repo", tmp_path / "outside"
    repo.mkdir(), outside.mkdir()
    (repo / "models").symlink_to(outside)
    (repo / "params.yaml").write_text(_params_text())
    with pytest.raises(ParamsError, match=r"paths.candidate = 'models/candidate' leads outside the repository"):
        load_params(repo / "params.yaml")


def test_a_run_that_needs_more_memory_than_the_machine_is_refused_with_the_estimate() -> None:
    from tasks.lib.params import check_fits_machine, training_memory_bytes

    document = copy.deepcopy(base_params_document())
    document["train"].update(steps_per_call=100_000, batch_size=55_000)
    params = parse_params(document)
    assert training_memory_bytes(params)["batch_indices"] == 100_000 * 55_000 * 4 * 3
    with pytest.raises(ParamsError, match=r"would need about 63\.9 GiB .*batch_indices: 61\.5 GiB.* has 8\.0 GiB"):
        check_fits_machine(params, Path("params.yaml"), available=8 << 30)
    defaults = parse_params(base_params_document())
    assert 1.2 * 2**30 < sum(training_memory_bytes(defaults).values()) < 2 * 2**30  # measured: 1.24 GiB peak
    check_fits_machine(defaults, Path("params.yaml"), available=4 << 30)


def test_a_fifo_or_a_directory_as_the_params_file_is_one_line_at_once(tmp_path: Path) -> None:
    fifo = tmp_path / "fifo.yaml"
    os.mkfifo(fifo)
    for path, kind in ((fifo, "a FIFO"), (tmp_path, "a directory")):
        result = subprocess.run([sys.executable, "-m", "tasks.commands.check_params", str(path)], cwd=REPO_ROOT,
                                capture_output=True, text=True, timeout=60)
        assert result.returncode == 1 and f"is {kind}" in result.stderr
        assert len(result.stderr.splitlines()) == 1
