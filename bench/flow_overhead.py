"""What the Prefect flow adds on top of `dvc repro` when every stage is cached.

Measures, side by side in one run, the wall time of

* ``dvc repro``                                  (the baseline: DVC alone finds nothing to do),
* ``python -m flows.pipeline`` against a running ``prefect server`` (started here),
* ``python -m flows.pipeline`` with no server configured (Prefect's temporary local server),

each repeated ``--repeat`` times (median reported), and prints the overhead of each flow
variant over the baseline. Targets: <= 5 s against a running server, <= 15 s with the
temporary one.

    python bench/flow_overhead.py [--repo .] [--repeat 3]     # --repo: any checkout of this project

The repository must have been reproduced once (`dvc repro`); the benchmark runs that first.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from flows.server import start_server  # noqa: E402
from tasks.lib.processes import child_environment, python_module, run  # noqa: E402


def timed(command: list[str], repo: Path, environment: dict[str, str]) -> float:
    started = time.perf_counter()
    result = run(command, repo, environment=environment)
    elapsed = time.perf_counter() - started
    if result.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed:\n{result.stdout[-2000:]}\n{result.stderr[-2000:]}")
    return elapsed


def median_time(command: list[str], repo: Path, environment: dict[str, str], repeat: int) -> float:
    return statistics.median(timed(command, repo, environment) for _ in range(repeat))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repo", type=Path, default=ROOT)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    scratch = Path(tempfile.mkdtemp(prefix="flow-overhead-"))
    repo = args.repo.resolve()
    base = {k: v for k, v in child_environment().items() if not k.startswith("PREFECT_API")}
    dvc_repro = python_module("dvc", "repro")
    flow = python_module("flows.pipeline", "--repo", str(repo))
    print(f"repository: {repo}\nwarming up: dvc repro (everything must be cached) ...", flush=True)
    timed(dvc_repro, repo, base)
    baseline = median_time(dvc_repro, repo, base, args.repeat)
    server = start_server(scratch / "server-home")
    try:
        served = median_time(flow, ROOT, base | server.client_environment(), args.repeat)
    finally:
        server.stop()
    ephemeral_environment = base | {"PREFECT_HOME": str(scratch / "ephemeral-home")}
    timed(flow, ROOT, ephemeral_environment)  # the first ephemeral run also migrates a new database
    ephemeral = median_time(flow, ROOT, ephemeral_environment, args.repeat)
    print(f"dvc repro (all cached):                 {baseline:6.2f} s")
    print(f"flow against a running server:          {served:6.2f} s  overhead {served - baseline:5.2f} s (target <= 5)")
    print(f"flow with Prefect's temporary server:   {ephemeral:6.2f} s  overhead {ephemeral - baseline:5.2f} s "
          f"(target <= 15)")
    print(f"overhead_running_server_s={served - baseline:.2f}")
    print(f"overhead_ephemeral_server_s={ephemeral - baseline:.2f}")


if __name__ == "__main__":
    os.environ.setdefault("DO_NOT_TRACK", "1")
    main()
