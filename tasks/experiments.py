"""The seed's comparison table as DVC experiments: every optimisation, then each one dropped.

Not a pipeline stage: a driver for `dvc exp`. It queues one experiment per variant up to the
`evaluate` stage (experiments never publish to production), runs the queue one at a time
(two cores: parallel runs would only slow each other down), and prints the table from
`dvc exp show`. The experiments stay in DVC: `dvc exp show`, `dvc exp diff`, `dvc exp apply`.

    python -m tasks.experiments [--steps N] [--jobs 1] [--only VARIANT ...]   # or: make experiments
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

# The seed's ablations, each a set of `-S` overrides of params.yaml.
VARIANTS: dict[str, list[str]] = {
    "all-optimisations": [],
    "no-regularisation": ["train.l2_rate=0"],
    "no-moving-average": ["train.moving_average_decay=0"],
    "no-lr-decay": ["train.learning_rate_decay=1"],
    "no-hidden-layer": ["model.hidden_units=0"],
    "no-activation": ["model.activation=linear"],
    # Without the activation the network is linear and, at the seed's rate of 0.8, its loss
    # explodes within a few dozen steps (the divergence guard stops it); at 0.1 it trains.
    "no-activation-lr-0.1": ["model.activation=linear", "train.learning_rate=0.1"],
}
COLUMNS = ("test.accuracy", "test.accuracy_raw", "test.errors", "train.steps_per_second")


def dvc(*arguments: str, capture: bool = False) -> str:
    environment = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    result = subprocess.run([sys.executable, "-m", "dvc", *arguments], env=environment, text=True,
                            capture_output=capture)
    if result.returncode != 0:
        detail = (result.stderr or "").strip() if capture else ""
        raise SystemExit(f"error: `dvc {' '.join(arguments)}` failed with exit code {result.returncode} {detail}")
    return result.stdout if capture else ""


def queue_variants(steps: int | None, only: list[str]) -> list[str]:
    names = []
    for name, overrides in VARIANTS.items():
        if only and name not in only:
            continue
        extra = [f"train.steps={steps}"] if steps else []
        settings = [argument for override in overrides + extra for argument in ("-S", override)]
        print(f"experiments: queueing {name} {' '.join(overrides + extra)}", flush=True)
        dvc("exp", "run", "--queue", "evaluate", "--name", name, *settings)
        names.append(name)
    return names


def _metric(experiment: dict, key: str) -> object:
    metrics = experiment.get("data", {}).get("metrics", {}).get("reports/metrics.json", {}).get("data", {})
    section, name = key.split(".")
    return metrics.get(section, {}).get(name)


def collect_table(names: list[str]) -> list[dict[str, object]]:
    return rows_from_exp_show(json.loads(dvc("exp", "show", "--json", capture=True)), names)


def rows_from_exp_show(exp_show: list[dict], names: list[str]) -> list[dict[str, object]]:
    """One row per experiment name from `dvc exp show --json` output (the newest run of each)."""
    rows: dict[str, dict[str, object]] = {}
    for commit in exp_show:
        for experiment in commit.get("experiments") or []:
            for revision in experiment.get("revs", []):
                name = revision.get("name")
                if name not in names or name in rows:
                    continue
                if revision.get("error"):  # a failed run shows its baseline's metrics: do not report them
                    rows[name] = {"variant": name, COLUMNS[0]: f"failed: `dvc queue logs {name}`"}
                elif revision.get("data", {}).get("metrics"):
                    rows[name] = {"variant": name, **{key: _metric(revision, key) for key in COLUMNS}}
    return [rows[name] for name in names if name in rows]


def format_table(rows: list[dict[str, object]]) -> str:
    header = ["variant", *COLUMNS]
    lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    lines += ["| " + " | ".join(str(row.get(column, "-")) for column in header) + " |" for row in rows]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=None, help="override train.steps (quick runs)")
    parser.add_argument("--jobs", type=int, default=1, help="experiments run at once")
    parser.add_argument("--only", nargs="*", default=[], choices=list(VARIANTS), help="run only these variants")
    args = parser.parse_args(argv)
    names = queue_variants(args.steps, args.only)
    print(f"experiments: running {len(names)} queued experiments, {args.jobs} at a time", flush=True)
    dvc("exp", "run", "--run-all", "--jobs", str(args.jobs))
    rows = collect_table(names)
    print(format_table(rows))
    missing = len(names) - len(rows)
    if missing:
        print(f"error: {missing} experiments left no record; see `dvc queue status`", file=sys.stderr)
    return 1 if missing else 0


if __name__ == "__main__":
    sys.exit(main())
