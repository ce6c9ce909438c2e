"""The divergence guard of stage `train`, and the record it leaves.

A batch loss that is NaN, infinite or above ``train.max_loss`` stops training: a rate too large
can throw the loss up by orders of magnitude and back, leaving a useless model. The train stage
then fails (the candidate is not replaced) and records why it stopped, as data:

* in its DVCLive summary (``reports/train/metrics.json``): ``"stopped": {"reason": "diverged",
  "step": N, "loss": L, "learning_rate": R}``;
* as one line of its output, ``train: stopped {...}`` with the same JSON, which is what survives
  a failed DVC experiment (DVC keeps a failed queued run's log, not its files).

The experiment driver (``tasks.commands.experiments``) reads that record with :func:`read_record`;
nothing parses the error's wording.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass

import numpy as np

RECORD_PREFIX = "train: stopped "


@dataclass(frozen=True)
class Divergence:
    step: int
    loss: float
    learning_rate: float
    reason: str = "diverged"

    def record_line(self) -> str:
        return RECORD_PREFIX + json.dumps(asdict(self), sort_keys=True)


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite or rose above ``train.max_loss``; the candidate model was not
    replaced. ``divergence`` says where."""

    def __init__(self, divergence: Divergence, max_loss: float) -> None:
        loss = divergence.loss
        what = f"reached {loss:.4g} (above train.max_loss {max_loss:g})" if np.isfinite(loss) else f"became {loss}"
        super().__init__(f"training diverged: the loss {what} at step {divergence.step} with learning rate "
                         f"{divergence.learning_rate:.4g}; lower train.learning_rate (the candidate model was not "
                         f"replaced)")
        self.divergence = divergence


def first_divergence(losses: np.ndarray, first_step: int, max_loss: float) -> tuple[int, float] | None:
    """(step, loss) of the first loss of ``losses`` (steps from ``first_step``) that is NaN,
    infinite or above ``max_loss``; None when every one is fine."""
    bad = np.flatnonzero(~np.isfinite(losses) | (losses > max_loss))
    return (first_step + int(bad[0]), float(losses[bad[0]])) if bad.size else None


def read_record(log: str) -> Divergence | None:
    """The divergence record in a train stage's output, if it stopped on one."""
    for line in reversed(log.splitlines()):
        if line.startswith(RECORD_PREFIX):
            try:
                fields = json.loads(line[len(RECORD_PREFIX):])
                return Divergence(**fields) if fields.get("reason") == "diverged" else None
            except (ValueError, TypeError):
                return None
    return None
