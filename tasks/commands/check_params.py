"""Check a params file the way every stage will read it, before anything runs.

    python -m tasks.commands.check_params [PATH]     # exit 0 when PATH (default params.yaml) is valid

`make run` and `make experiments` call it before DVC reads the file, so a hostile or broken
file fails in milliseconds with one line per problem.
"""

from __future__ import annotations

import sys
from pathlib import Path

from tasks.lib.params import DEFAULT_PARAMS_PATH, ParamsError, load_params


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) > 1 or any(arg.startswith("-") for arg in args):
        print("usage: python -m tasks.commands.check_params [PATH]", file=sys.stderr)
        return 2
    path = Path(args[0]) if args else DEFAULT_PARAMS_PATH
    try:
        load_params(path)
    except ParamsError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    print(f"{path}: ok")
    return 0


if __name__ == "__main__":
    sys.exit(main())
