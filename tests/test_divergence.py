"""tasks/lib/divergence.py: the guard finds the first bad loss, and its record is read back as data."""

from __future__ import annotations

import numpy as np
import pytest

from tasks.lib.divergence import Divergence, TrainingDiverged, first_divergence, read_record


@pytest.mark.parametrize("losses", [[1.0, np.inf, 2.0], [1.0, np.nan], [1.0, 5.6e4]],
                         ids=["infinite", "nan", "finite, above max_loss"])
def test_the_first_bad_loss_is_found(losses: list[float]) -> None:
    step, loss = first_divergence(np.array(losses), 35, max_loss=100.0)
    assert step == 36 and (loss == losses[1] or (np.isnan(loss) and np.isnan(losses[1])))


def test_losses_within_bounds_are_no_divergence() -> None:
    assert first_divergence(np.array([12.3, 0.5, 100.0]), 0, max_loss=100.0) is None


@pytest.mark.parametrize("loss", [float("inf"), 5.6e4], ids=["infinite", "finite"])
def test_the_record_survives_a_log_and_names_step_loss_and_rate(loss: float) -> None:
    divergence = Divergence(step=3, loss=loss, learning_rate=0.8)
    error = TrainingDiverged(divergence, max_loss=100.0)
    log = f"train: step 0/30000\n{divergence.record_line()}\nerror: {error}\nERROR: failed to reproduce 'train'\n"
    assert read_record(log) == divergence
    assert "at step 3" in str(error) and "the candidate model was not replaced" in str(error)


def test_a_log_without_a_record_or_with_a_damaged_one_has_none() -> None:
    assert read_record("Killed\n") is None
    assert read_record('train: stopped {"reason": "diverged", "step": \n') is None
