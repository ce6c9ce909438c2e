"""Prefect flows: the pipeline flow (`flows.pipeline`) and its scheduled deployment (`flows.deploy`).

Safe defaults for every process that imports Prefect through this package, set before Prefect
reads its settings: no telemetry (this pipeline runs where the internet may be closed), and a
startup timeout for Prefect's temporary ("ephemeral") server long enough for a 2-core machine,
where the 20 s default was seen to fail. Explicit settings in the environment win.
"""

import os

os.environ.setdefault("DO_NOT_TRACK", "1")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "180")
