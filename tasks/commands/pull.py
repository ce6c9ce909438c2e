"""Fetch what the DVC remote already holds of the pipeline's outputs, quietly (what `make run` does
first, so `dvc repro` recomputes only what nobody computed and pushed before).

    python -m tasks.commands.pull [--repo .]

Only outputs missing here are pulled, so local changes are never overwritten. An empty or absent
remote is normal (nothing pushed yet) and prints nothing; a failure is one line, and the stages
then compute what is missing. Never commits or pushes.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from tasks.lib.repository import TeamError, pull_outputs


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tasks.commands.pull", description=__doc__.split("\n")[0])
    parser.add_argument("--repo", type=Path, default=Path("."), help="the project directory")
    args = parser.parse_args(argv)
    try:
        outcome = pull_outputs(args.repo.resolve(), required=False)
    except TeamError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    if outcome.pulled or outcome.failure:  # an empty or absent remote is no news
        print(f"dvc pull: {outcome.summary()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
