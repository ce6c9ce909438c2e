"""The model registry's command line: what is registered and served, and the one rollback.

    python -m tasks.commands.registry show                   # registered versions, the one in prod,
                                                             # and what models/production/ serves
    python -m tasks.commands.registry rollback [--to N]      # serve version N again on this machine
                                                             # (default: the one before the newest)
    python -m tasks.commands.registry rollback --to N --push # ... and for the team (GTO prod, git, DVC)

``prod`` means one thing: the highest version in ``models/production/`` (what TF Serving serves
and the next promotion's champion), and, for the team, GTO's stage ``prod``. A rollback moves
all of them: N's files are re-published as a new version M, recorded in models/registry.json and
in dvc.lock (`dvc commit promote`, so `dvc checkout` keeps it); with ``--push`` M is committed,
registered, assigned prod and pushed, like a run's promotion (tasks/lib/registry/rollback.py).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from tasks.lib.params import ParamsError, Paths, load_params
from tasks.lib.registry.production import RegistryError, versions
from tasks.lib.registry.rollback import publish_rollback, record_in_dvc, rollback
from tasks.lib.registry.tags import ARTIFACT, STAGE, prod_version, registered_versions
from tasks.lib.repository import REMOTE, TeamError


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m tasks.commands.registry", description=__doc__.split("\n")[0])
    parser.add_argument("--repo", type=Path, default=Path("."), help="the project directory")
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("show", help="registered versions, the one in prod, and the local models/production/")
    back = commands.add_parser("rollback", help="serve an earlier version again (as a new, highest version)")
    back.add_argument("--to", type=int, default=None, help="the version to restore (default: the one before)")
    back.add_argument("--push", action="store_true",
                      help=f"for the team: commit, register and assign prod, push to {REMOTE} and the DVC remote")
    return parser


def _rollback(repo: Path, paths: Paths, args: argparse.Namespace, keep_versions: int) -> None:
    if args.push:
        publish_rollback(repo, paths, args.to, keep_versions)
        return
    version = rollback(paths, args.to, keep_versions)
    record_in_dvc(repo)
    print(f"rollback: recorded in dvc.lock; `git commit dvc.lock {paths.registry.relative_to(repo)}` keeps it, "
          f"`rollback --to {args.to or 'N'} --push` does it for the team (GTO {STAGE} = version {version})")


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    repo = args.repo.resolve()
    try:
        params = load_params(repo / "params.yaml")
        paths = Paths.under(repo, params.paths)
        if args.command == "rollback":
            _rollback(repo, paths, args, params.promote.keep_versions)
        else:
            print(f"{ARTIFACT}: registered {registered_versions(repo) or 'none'}; in {STAGE}: {prod_version(repo)}; "
                  f"{paths.production} holds {versions(paths.production) or 'nothing'}")
    except (ParamsError, RegistryError, TeamError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
