"""A grid's comparison over several seeds: Welch intervals, a markdown table and a PNG.

Pure functions of the per-seed outcomes that `tasks.commands.experiments` reads from
`dvc exp show`: each variant's test accuracy (EMA and raw weights) as mean ± sample standard
deviation over its seeds, and its difference to the grid's first variant (the seed's: "all
optimisations") with a 95 % Welch t interval. A verdict is "better" or "worse" only when that
interval excludes 0; a variant whose runs were stopped by the divergence guard is reported as
diverged, never with numbers. No SciPy: the Student-t quantile comes from its CDF (a
regularised incomplete beta function), inverted by bisection.
"""

from __future__ import annotations

import io
import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # no display on servers and CI
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.transforms import offset_copy  # noqa: E402

from tasks.lib.atomic import write_bytes_atomic  # noqa: E402

CONFIDENCE = 0.95


# --- Student t ----------------------------------------------------------------------------


def _incomplete_beta_fraction(a: float, b: float, x: float) -> float:
    """Continued fraction of the incomplete beta function (modified Lentz's method)."""
    tiny, epsilon = 1e-300, 1e-15
    c, d = 1.0, 1.0 - (a + b) * x / (a + 1.0)
    d = 1.0 / (d if abs(d) > tiny else tiny)
    result = d
    for m in range(1, 10_000):
        for numerator in (m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m)),
                          -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1))):
            d = 1.0 + numerator * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + numerator / c
            c = c if abs(c) > tiny else tiny
            result *= c * d
        if abs(c * d - 1.0) < epsilon:
            return result
    raise ArithmeticError(f"incomplete beta fraction did not converge (a={a}, b={b}, x={x})")


def regularized_incomplete_beta(a: float, b: float, x: float) -> float:
    """I_x(a, b), the CDF of a Beta(a, b) variable at x."""
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    log_front = math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x)
    # The fraction converges fast only on this side of the mean; use the symmetry otherwise.
    if x < (a + 1.0) / (a + b + 2.0):
        return math.exp(log_front) * _incomplete_beta_fraction(a, b, x) / a
    return 1.0 - math.exp(log_front) * _incomplete_beta_fraction(b, a, 1.0 - x) / b


def student_t_cdf(t: float, degrees_of_freedom: float) -> float:
    """P(T <= t) for Student's t with (possibly fractional) degrees of freedom."""
    tail = 0.5 * regularized_incomplete_beta(degrees_of_freedom / 2, 0.5,
                                             degrees_of_freedom / (degrees_of_freedom + t * t))
    return 1.0 - tail if t >= 0 else tail


def student_t_quantile(probability: float, degrees_of_freedom: float) -> float:
    """The t with P(T <= t) = probability, by bisection on the CDF."""
    if not 0.0 < probability < 1.0 or degrees_of_freedom <= 0:
        raise ValueError(f"need 0 < probability < 1 and degrees of freedom > 0, got {probability}, "
                         f"{degrees_of_freedom}")
    if probability < 0.5:
        return -student_t_quantile(1.0 - probability, degrees_of_freedom)
    low, high = 0.0, 1.0
    while student_t_cdf(high, degrees_of_freedom) < probability:
        low, high = high, 2 * high
    for _ in range(200):
        middle = (low + high) / 2
        low, high = (middle, high) if student_t_cdf(middle, degrees_of_freedom) < probability else (low, middle)
        if high - low < 1e-12 * high:
            break
    return (low + high) / 2


# --- the difference of two means ---------------------------------------------------------


@dataclass(frozen=True)
class Interval:
    difference: float  # mean of the variant minus mean of the reference
    low: float
    high: float
    degrees_of_freedom: float


def welch_interval(variant: Sequence[float], reference: Sequence[float], confidence: float = CONFIDENCE) -> Interval:
    """Welch's t interval for mean(variant) - mean(reference); needs at least two values each."""
    if len(variant) < 2 or len(reference) < 2:
        raise ValueError("Welch's interval needs at least two seeds on each side")
    difference = statistics.fmean(variant) - statistics.fmean(reference)
    shares = [statistics.variance(values) / len(values) for values in (variant, reference)]
    standard_error = math.sqrt(sum(shares))
    if standard_error == 0.0:  # every seed gave the same number on both sides: nothing to widen
        return Interval(difference, difference, difference, math.inf)
    degrees_of_freedom = sum(shares) ** 2 / sum(share**2 / (len(values) - 1)
                                                 for share, values in zip(shares, (variant, reference)))
    half_width = student_t_quantile(0.5 + confidence / 2, degrees_of_freedom) * standard_error
    return Interval(difference, difference - half_width, difference + half_width, degrees_of_freedom)


def verdict(interval: Interval) -> str:
    if interval.low > 0:
        return "better"
    if interval.high < 0:
        return "worse"
    return "no measurable difference"


# --- per-variant summaries -------------------------------------------------------------------


@dataclass(frozen=True)
class Outcome:
    """One seed of one variant: its metrics, or why it has none."""

    seed: int
    accuracy: float | None = None
    accuracy_raw: float | None = None
    steps_per_second: float | None = None
    seconds: float | None = None
    diverged_at: int | None = None  # step at which the divergence guard stopped training
    failure: str | None = None  # any other reason this seed has no metrics


@dataclass
class Row:
    variant: str
    outcomes: list[Outcome] = field(default_factory=list)

    @property
    def finished(self) -> list[Outcome]:
        return [outcome for outcome in self.outcomes if outcome.accuracy is not None]

    @property
    def diverged(self) -> list[Outcome]:
        return [outcome for outcome in self.outcomes if outcome.diverged_at is not None]

    def values(self, name: str) -> list[float]:
        return [getattr(outcome, name) for outcome in self.finished if getattr(outcome, name) is not None]


def _mean_sd(values: Sequence[float], scale: float = 100.0, digits: int = 2) -> str:
    if not values:
        return "-"
    mean = f"{scale * statistics.fmean(values):.{digits}f}"
    return f"{mean} ± {scale * statistics.stdev(values):.{digits}f}" if len(values) > 1 else mean


def _signed(value: float) -> str:
    return f"{value:+.2f}".replace("-", "−")


def compare(row: Row, reference: Row | None) -> tuple[str, str]:
    """(difference to the reference in points with its interval, verdict) for one row."""
    if row.diverged and not row.finished:
        steps = sorted({outcome.diverged_at for outcome in row.diverged})
        return "-", f"diverged (step {', '.join(map(str, steps))})"
    if reference is None or row.variant == reference.variant:
        return "-", "reference" if reference is not None else "-"
    mine, theirs = row.values("accuracy"), reference.values("accuracy")
    if len(mine) < 2 or len(theirs) < 2:
        return "-", "too few seeds"
    interval = welch_interval(mine, theirs)
    text = f"{_signed(100 * interval.difference)} [{_signed(100 * interval.low)}, {_signed(100 * interval.high)}]"
    return text, verdict(interval)


def _notes(row: Row) -> str:
    notes = []
    if row.diverged and row.finished:
        notes.append(f"{len(row.diverged)} seeds diverged")
    failed = [outcome for outcome in row.outcomes if outcome.failure]
    if failed:
        notes.append(f"{len(failed)} failed: {failed[0].failure}")
    missing = len(row.outcomes) - len(row.finished) - len(row.diverged) - len(failed)
    if missing:
        notes.append(f"{missing} not run yet")
    return "; ".join(notes)


def header(reference: str) -> tuple[str, ...]:
    return ("variant", "seeds", "test accuracy, EMA (%)", "raw weights (%)",
            f"Δ EMA vs {reference} (points, {CONFIDENCE:.0%} interval)", "verdict", "steps/s")


def reference_row(rows: Sequence[Row]) -> Row | None:
    """The grid's first variant: what the others are compared with (the seed's: all optimisations)."""
    return rows[0] if rows else None


def table_rows(rows: Sequence[Row]) -> list[list[str]]:
    reference = reference_row(rows)
    lines = []
    for row in rows:
        difference, word = compare(row, reference)
        notes = _notes(row)
        speeds = row.values("steps_per_second")
        seeds = f"{len(row.finished)}/{len(row.outcomes)}" if len(row.finished) != len(row.outcomes) else \
            str(len(row.outcomes))
        lines.append([row.variant, seeds, _mean_sd(row.values("accuracy")), _mean_sd(row.values("accuracy_raw")),
                      difference, f"{word} ({notes})" if notes else word,
                      f"{statistics.fmean(speeds):.0f}" if speeds else "-"])
    return lines


def markdown_table(rows: Sequence[Row], footer: Sequence[str] = ()) -> str:
    columns = header(rows[0].variant if rows else "-")
    lines = ["| " + " | ".join(columns) + " |", "|" + " --- |" * len(columns)]
    lines += ["| " + " | ".join(cells) + " |" for cells in table_rows(rows)]
    if footer:
        lines += ["", *footer]
    return "\n".join(lines) + "\n"


# --- the picture ---------------------------------------------------------------------------


_COLOURS = {"better": "tab:green", "worse": "tab:red", "no measurable difference": "tab:gray"}


def _accuracy_panel(axis: plt.Axes, rows: Sequence[Row]) -> None:
    labelled = False  # one legend entry per marker, from the first row that has numbers
    for position, row in enumerate(rows):
        accuracies = [100 * value for value in row.values("accuracy")]
        if accuracies:
            axis.scatter(accuracies, [position] * len(accuracies), s=12, color="tab:blue", alpha=0.35, zorder=2)
            sd = statistics.stdev(accuracies) if len(accuracies) > 1 else 0.0
            axis.errorbar(statistics.fmean(accuracies), position, xerr=sd, fmt="o", color="tab:blue", capsize=4,
                          zorder=3, label=None if labelled else "EMA: mean ± sd (dots: seeds)")
            raw = [100 * value for value in row.values("accuracy_raw")]
            if raw:
                axis.scatter([statistics.fmean(raw)], [position], marker="x", color="tab:orange", zorder=3,
                             label=None if labelled else "raw weights: mean")
            labelled = True
        elif row.diverged:
            axis.annotate("diverged", (0.02, position), xycoords=("axes fraction", "data"), va="center",
                          color="tab:red")
    axis.set(title="test accuracy (%) per variant", xlabel="test accuracy (%)")
    axis.grid(axis="x", alpha=0.3)
    # Under the panel, clear of the points whatever their range: a fixed offset below the x label.
    below = offset_copy(axis.transAxes, fig=axis.figure, y=-32, units="points")
    if labelled:
        axis.legend(loc="upper left", bbox_to_anchor=(0, 0), bbox_transform=below, fontsize=8, ncol=2, frameon=False)


NEAR_POINTS = 1.0  # differences farther than this are drawn at the panel's edge, so the small ones stay legible


def _difference_panel(axis: plt.Axes, rows: Sequence[Row]) -> None:
    """Each variant's interval; the panel spans the near ones (and 0), far ones sit at its edge with their numbers."""
    reference = reference_row(rows)
    drawn: dict[int, tuple[str, str, Interval]] = {}
    for position, row in enumerate(rows):
        difference, word = compare(row, reference)
        if difference != "-":
            drawn[position] = (difference, word, welch_interval(row.values("accuracy"), reference.values("accuracy")))
        colour = "tab:red" if word.startswith("diverged") else _COLOURS.get(word, "black")
        axis.annotate(word, (1.02, position), xycoords=("axes fraction", "data"), va="center", fontsize=8,
                      color=colour, annotation_clip=False)
    near = [interval for _, _, interval in drawn.values() if abs(100 * interval.difference) <= NEAR_POINTS]
    low = min([0.0, *(100 * interval.low for interval in near)])
    high = max([0.0, *(100 * interval.high for interval in near)])
    margin = 0.15 * (high - low) or 0.1
    low, high = low - margin, high + margin
    for position, (text, word, interval) in drawn.items():
        centre = 100 * interval.difference
        if low <= centre <= high:
            axis.errorbar(centre, position, xerr=[[centre - 100 * interval.low], [100 * interval.high - centre]],
                          fmt="o", capsize=4, color=_COLOURS[word])
        else:  # off the scale: an arrow at the edge, and the numbers
            edge, marker, align = (low, "<", "left") if centre < low else (high, ">", "right")
            axis.plot(edge, position, marker=marker, color=_COLOURS[word], markersize=9, clip_on=False)
            axis.annotate(text, (edge, position), xytext=(10 if align == "left" else -10, 0),
                          textcoords="offset points", ha=align, va="center", fontsize=8, color=_COLOURS[word])
    axis.axvline(0.0, color="black", linewidth=1)
    axis.set_xlim(low, high)
    axis.set(title=f"EMA accuracy minus {rows[0].variant} (points), {CONFIDENCE:.0%} Welch interval", xlabel="points")
    axis.grid(axis="x", alpha=0.3)


def accuracy_figure(rows: Sequence[Row], path: Path, caption: str) -> None:
    """Left: accuracy per variant with error bars; right: the difference to the reference."""
    figure, (left, right) = plt.subplots(1, 2, figsize=(14, 1.0 + 0.55 * len(rows)), sharey=True)
    _accuracy_panel(left, rows)
    _difference_panel(right, rows)
    left.set_yticks(range(len(rows)), [row.variant for row in rows])
    left.invert_yaxis()  # the table's order, top to bottom
    figure.suptitle(caption, fontsize=8, x=0.01, ha="left", y=1.0, va="bottom")
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=100, bbox_inches="tight", metadata={"Software": None})
    plt.close(figure)
    write_bytes_atomic(path, buffer.getvalue())
