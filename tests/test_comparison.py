"""tasks/lib/comparison.py: Student t, Welch intervals against hand computations, the table and the PNG."""

from __future__ import annotations

import math
import warnings
from pathlib import Path

import pytest

from tasks.lib.comparison import (
    Outcome,
    Row,
    accuracy_figure,
    markdown_table,
    student_t_cdf,
    student_t_quantile,
    table_rows,
    verdict,
    welch_interval,
)

# Two-sided 95 % and 99 % critical values from printed t tables.
T_TABLE = {1: (12.706, 63.657), 2: (4.303, 9.925), 4: (2.776, 4.604), 5: (2.571, 4.032), 10: (2.228, 3.169),
           30: (2.042, 2.750)}


@pytest.mark.parametrize("degrees_of_freedom", sorted(T_TABLE))
def test_student_t_quantile_matches_the_printed_table(degrees_of_freedom: int) -> None:
    for probability, expected in zip((0.975, 0.995), T_TABLE[degrees_of_freedom]):
        assert student_t_quantile(probability, degrees_of_freedom) == pytest.approx(expected, abs=6e-4)
    assert student_t_quantile(0.025, degrees_of_freedom) == pytest.approx(-T_TABLE[degrees_of_freedom][0], abs=6e-4)


def test_student_t_quantile_tends_to_the_normal_and_is_monotone_in_fractional_degrees() -> None:
    assert student_t_quantile(0.975, 1e6) == pytest.approx(1.95996, abs=1e-4)
    assert student_t_quantile(0.975, 5) < student_t_quantile(0.975, 4.5) < student_t_quantile(0.975, 4)


@pytest.mark.parametrize("t", [-7.0, -1.3, 0.0, 0.4, 2.5, 40.0])
def test_student_t_cdf_equals_the_closed_forms_for_one_and_two_degrees(t: float) -> None:
    assert student_t_cdf(t, 1) == pytest.approx(0.5 + math.atan(t) / math.pi, abs=1e-12)  # Cauchy
    assert student_t_cdf(t, 2) == pytest.approx(0.5 + t / (2 * math.sqrt(2 + t * t)), abs=1e-12)


def test_student_t_quantile_rejects_impossible_arguments() -> None:
    for probability, degrees in ((0.0, 4), (1.0, 4), (0.9, 0)):
        with pytest.raises(ValueError):
            student_t_quantile(probability, degrees)


def test_welch_interval_by_hand_equal_variances() -> None:
    # means 2 and 5, variances 1 and 1: SE = sqrt(1/3 + 1/3) = 0.81650; df = (2/3)^2 / (2 (1/3)^2 / 2) = 4;
    # t(0.975, 4) = 2.7764: -3 ± 2.2670.
    interval = welch_interval([1.0, 2.0, 3.0], [4.0, 5.0, 6.0])
    assert interval.degrees_of_freedom == pytest.approx(4.0)
    assert (interval.difference, interval.low, interval.high) == pytest.approx((-3.0, -5.2670, -0.7330), abs=1e-4)
    assert verdict(interval) == "worse"


def test_welch_interval_by_hand_two_seeds() -> None:
    # means 0.985 and 0.975, variances 5e-5 each: SE = sqrt(2.5e-5 + 2.5e-5) = 0.0070711;
    # df = (5e-5)^2 / (2 (2.5e-5)^2 / 1) = 2; t(0.975, 2) = 4.3027: 0.01 ± 0.030425.
    interval = welch_interval([0.98, 0.99], [0.97, 0.98])
    assert interval.degrees_of_freedom == pytest.approx(2.0)
    assert (interval.low, interval.high) == pytest.approx((-0.020425, 0.040425), abs=1e-6)
    assert verdict(interval) == "no measurable difference"


def test_welch_interval_by_hand_unequal_variances() -> None:
    # variances 2.5 and 10 over 5 seeds each: SE^2 = 0.5 + 2 = 2.5; df = 2.5^2 / (0.5^2/4 + 2^2/4) = 5.8824,
    # so the t factor lies between t(0.975, 6) = 2.4469 and t(0.975, 5) = 2.5706: 3 ± about 3.9, which
    # includes 0, so a mean three times larger is no measurable difference with this much noise.
    interval = welch_interval([2.0, 4.0, 6.0, 8.0, 10.0], [1.0, 2.0, 3.0, 4.0, 5.0])
    assert interval.degrees_of_freedom == pytest.approx(5.88235, abs=1e-5)
    factor = (interval.high - interval.difference) / math.sqrt(2.5)
    assert 2.4469 < factor < 2.5706
    assert interval.difference == pytest.approx(3.0) and verdict(interval) == "no measurable difference"


def test_welch_interval_needs_two_seeds_each() -> None:
    with pytest.raises(ValueError):
        welch_interval([0.98], [0.97, 0.98])


def _rows() -> list[Row]:
    return [
        Row("all-optimisations", [Outcome(0, 0.98, 0.97, 300.0, 10.0), Outcome(1, 0.99, 0.98, 320.0, 10.0)]),
        Row("no-lr-decay", [Outcome(0, 0.97, 0.97, 290.0, 9.0), Outcome(1, 0.98, 0.96, 310.0, 9.0)]),
        Row("no-activation", [Outcome(0, diverged_at=36), Outcome(1, diverged_at=38)]),
        Row("no-hidden-layer", [Outcome(0, 0.92, 0.91, 1700.0, 2.0), Outcome(1)]),
        Row("no-moving-average", [Outcome(0, 0.97, 0.97, 300.0, 1.0), Outcome(1, failure="`dvc queue logs x`")]),
    ]


def test_table_rows_by_hand() -> None:
    reference, decay, diverged, partial, failed = table_rows(_rows())
    # 0.98 and 0.99: mean 98.50 %, sample sd = 0.01 / sqrt(2) = 0.71 points; steps/s mean 310.
    assert reference == ["all-optimisations", "2", "98.50 ± 0.71", "97.50 ± 0.71", "-", "reference", "310"]
    # 97.50 - 98.50 = -1.00 points, ± 4.3027 * 0.7071 = ± 3.04 (see test_welch_interval_by_hand_two_seeds).
    assert decay == ["no-lr-decay", "2", "97.50 ± 0.71", "96.50 ± 0.71", "−1.00 [−4.04, +2.04]",
                     "no measurable difference", "300"]
    assert diverged == ["no-activation", "0/2", "-", "-", "-", "diverged (step 36, 38)", "-"]
    assert partial == ["no-hidden-layer", "1/2", "92.00", "91.00", "-", "too few seeds (1 not run yet)", "1700"]
    assert failed[5] == "too few seeds (1 failed: `dvc queue logs x`)"


def test_markdown_table_has_a_header_a_row_per_variant_and_the_footer() -> None:
    table = markdown_table(_rows(), ["footer line"])
    lines = table.splitlines()
    assert lines[0].startswith("| variant | seeds | test accuracy, EMA (%) |")
    assert lines[1] == "|" + " --- |" * 7
    assert len([line for line in lines if line.startswith("| ")]) == 2 + len(_rows())
    assert lines[-1] == "footer line" and table.endswith("\n")


def test_accuracy_figure_is_a_png(tmp_path: Path) -> None:
    path = tmp_path / "out" / "accuracy.png"
    far = Row("far-off", [Outcome(0, 0.92, 0.91), Outcome(1, 0.93, 0.92)])  # drawn at the edge, with its numbers
    accuracy_figure([*_rows(), far], path, "2 seeds; a machine")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert [item.name for item in path.parent.iterdir()] == ["accuracy.png"]  # no temporary file left behind


def test_accuracy_figure_with_a_diverged_first_row_draws_without_warnings(tmp_path: Path) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # e.g. matplotlib's "no artists with labels" for the legend
        rows = _rows()
        accuracy_figure([rows[2], *rows[:2], *rows[3:]], tmp_path / "accuracy.png", "caption")
    assert (tmp_path / "accuracy.png").stat().st_size > 0
