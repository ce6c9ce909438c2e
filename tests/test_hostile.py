"""The fault harness (tests/hostile_inputs.py), one test per hostile input: each must end in a
clean refusal (exit 1, one `error:` line naming the path, no traceback, what must be kept kept)
or in the correct result, within its time bound and its memory bound.

Cases that start TensorFlow (a stage or predict) are marked slow; the params cases take about
half a second each. The figures of the last full run are in docs/robustness.md; to see what an
older commit did with the same inputs: `git archive <commit> | tar -x -C /tmp/old` and
`python -m tests.hostile_inputs /tmp/old`.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from .conftest import write_synthetic
from .hostile_inputs import (
    CHECK,
    Case,
    CaseUnavailable,
    all_cases,
    classify,
    prepare_case,
    release,
    run_case,
    train_template,
)

CASES = all_cases()
RESULTS = os.environ.get("HOSTILE_RESULTS")  # a JSON-lines file to collect outcomes and peaks in


def _marks(case: Case) -> list[pytest.MarkDecorator]:
    return [] if case.command == CHECK and not case.trained else [pytest.mark.slow]


@pytest.fixture(scope="module")
def source(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("hostile-source")
    write_synthetic(directory)
    return directory


@pytest.fixture(scope="module")
def template(tmp_path_factory: pytest.TempPathFactory, source: Path) -> Path:
    directory = tmp_path_factory.mktemp("hostile-template") / "project"
    train_template(directory, source)
    return directory


def test_the_harness_has_at_least_100_inputs_in_every_class() -> None:
    classes = {case.klass for case in CASES}
    assert len(CASES) >= 100 and len(classes) >= 7
    assert len({(case.klass, case.name) for case in CASES}) == len(CASES)


@pytest.mark.parametrize("case", [pytest.param(case, id=f"{case.klass[:12]}: {case.name}", marks=_marks(case))
                                  for case in CASES])
def test_hostile_input(case: Case, request: pytest.FixtureRequest, tmp_path: Path, source: Path) -> None:
    template = request.getfixturevalue("template") if case.trained else None
    directory = tmp_path / "case"
    try:
        prepare_case(case, directory, source, template)
    except CaseUnavailable as unavailable:
        release(directory)
        pytest.skip(str(unavailable))
    try:
        result = run_case(case, directory)
        outcome, detail = classify(case, result, directory)
    finally:
        release(directory)
    if RESULTS:
        with open(RESULTS, "a") as stream:
            stream.write(json.dumps({"class": case.klass, "case": case.name, "outcome": outcome,
                                     "seconds": round(result.seconds, 2), "peak_rss_mib": result.peak_rss_bytes >> 20})
                         + "\n")
    expected = "refused cleanly" if case.expect == "refused" else "correct"
    assert outcome == expected, f"{outcome}: {detail}\n{result.stderr[-2000:]}"
    assert result.peak_rss_bytes <= case.memory_bytes, f"peak RSS {result.peak_rss_bytes >> 20} MiB"
    assert result.seconds < case.timeout
