"""The model registry's command line: what is registered and served, and rollbacks.

    python -m tasks.commands.registry show                      # registered versions, the one in prod,
                                                                # and what models/production/ serves
    python -m tasks.commands.registry rollback [--to N]         # this machine: serve version N again
                                                                # (default: the one before the newest)
    python -m tasks.commands.registry assign-prod N [--push]    # the team: GTO stage prod to version N
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from tasks.lib.params import ParamsError, Paths, load_params
from tasks.lib.registry.production import RegistryError, versions
from tasks.lib.registry.rollback import rollback
from tasks.lib.registry.tags import ARTIFACT, STAGE, assign_prod, prod_version, registered_versions
from tasks.lib.repository import REMOTE, TeamError


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m tasks.commands.registry", description=__doc__.split("\n")[0])
    parser.add_argument("--repo", type=Path, default=Path("."), help="the project directory")
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("show", help="registered versions, the one in prod, and the local models/production/")
    back = commands.add_parser("rollback", help="serve an earlier version of models/production/ again")
    back.add_argument("--to", type=int, default=None, help="the version to restore (default: the one before)")
    assign = commands.add_parser("assign-prod", help="assign GTO stage prod to a registered version")
    assign.add_argument("version", type=int)
    assign.add_argument("--push", action="store_true", help=f"push the tag to {REMOTE}")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    repo = args.repo.resolve()
    try:
        params = load_params(repo / "params.yaml")
        paths = Paths.under(repo, params.paths)
        if args.command == "rollback":
            rollback(paths, args.to, params.promote.keep_versions)
        elif args.command == "assign-prod":
            tag = assign_prod(repo, args.version, args.push)
            print(f"{ARTIFACT}: version {args.version} is in {STAGE} ({tag}{', pushed' if args.push else ''})")
        else:
            print(f"{ARTIFACT}: registered {registered_versions(repo) or 'none'}; in {STAGE}: {prod_version(repo)}; "
                  f"{paths.production} holds {versions(paths.production) or 'nothing'}")
    except (ParamsError, RegistryError, TeamError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
