"""Prefect flows: the pipeline flow (`flows.pipeline`) and its scheduled deployment (`flows.deploy`).

Safe defaults for every process that imports Prefect through this package, set before Prefect
reads its settings: no telemetry (this pipeline runs where the internet may be closed), and a
startup timeout for Prefect's temporary ("ephemeral") server long enough for a 2-core machine,
where the 20 s default was seen to fail. Explicit settings in the environment win.

`python -m flows.pipeline` with no server configured starts its temporary Prefect server here,
before anything else, so that the server's start overlaps this process's imports
(``flows/temporary_server.py``).

Prefect itself is imported here with the cyclic garbage collector paused, and the objects of that
import (alive until exit) then frozen out of its sight: a flow process starts and exits about
0.7 s of CPU sooner (bench/fixed_costs.py), as ``tasks.lib.tf_loader`` does for TensorFlow.
"""

import gc
import os

os.environ.setdefault("DO_NOT_TRACK", "1")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "180")

from flows import temporary_server  # noqa: E402  the standard library and tasks.lib.processes only

temporary_server.start_if_run_as("flows.pipeline")

_collecting = gc.isenabled()
gc.disable()
try:
    import prefect.artifacts  # noqa: F401, E402  what flows.pipeline uses of Prefect, loaded under the paused GC
    import prefect.flows  # noqa: F401, E402
    import prefect.tasks  # noqa: F401, E402
finally:
    gc.freeze()
    if _collecting:
        gc.enable()
