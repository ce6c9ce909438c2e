"""The log filter of a team's workers (``flows/worker_logging.yml``): a run waiting for the
deployment's concurrency slot is reported once in its log, not on every retry.

While a run of the deployment waits for the one slot, the server answers each of the worker's
attempts to submit it with *AwaitingConcurrencySlot* (a ``SCHEDULED`` state), and the worker
(``prefect.workers.base`` ``_propose_pending_state``) logs, into that run's log at INFO,
"Aborted submission of flow run '<id>': Server returned a non-pending state 'SCHEDULED'" each
time: every ``PREFECT_SERVER_DEPLOYMENTS_CONCURRENCY_SLOT_WAIT_SECONDS`` (30 s by default), for as
long as the other run lasts. ``WaitingRunFilter`` keeps the first such line of each run, which says
that it waits, and drops the repeats; every other record passes.
"""

from __future__ import annotations

import logging
from collections import OrderedDict

from prefect.logging.loggers import get_logger

# The logger a worker's flow-run logger writes to (`BaseWorker.get_flow_run_logger`), as Prefect names it.
WORKER_RUN_LOGGER = get_logger("flow_runs").getChild("worker").name
WAITING = "Server returned a non-pending state 'SCHEDULED'"
REMEMBERED_RUNS = 10_000  # a worker lives for months: the runs it has seen waiting are bounded


class WaitingRunFilter(logging.Filter):
    """Passes the first "waiting for the slot" record of each flow run and drops the repeats."""

    def __init__(self) -> None:
        super().__init__()
        self._seen: OrderedDict[str, None] = OrderedDict()

    def filter(self, record: logging.LogRecord) -> bool:
        if record.name != WORKER_RUN_LOGGER or WAITING not in record.getMessage():
            return True
        run = str(getattr(record, "flow_run_id", ""))
        if run in self._seen:
            return False
        self._seen[run] = None
        if len(self._seen) > REMEMBERED_RUNS:
            self._seen.popitem(last=False)
        return True
