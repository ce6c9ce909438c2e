"""Fixed costs: where the seconds of each stage and of a cached flow run go, now and at ``--baseline REV``.

For every variant (the working tree, and each ``--baseline`` revision) the bench builds a scratch
git + DVC repository holding that revision's code, ``dvc.yaml`` and ``params.yaml`` (with
``data.sources`` pointed at ``--raw-data``, ``train.steps`` set to ``--steps`` and
``promote.min_accuracy`` 0.5, so a champion exists), runs ``dvc repro`` there once, and then times,
in alternating rounds (the variants' order rotates each round, so background load hits them alike):

* ``python -m flows.pipeline`` with every stage cached, against a running ``prefect server``
  (started here) and with Prefect's temporary server (a warm database; one untimed run first);
* ``python -m tasks.download|train|evaluate|promote`` (train from step 0: its checkpoints are
  deleted first; promote with the champion of the first run, the steady state of a re-run).

Each timed command runs in a child process under a small probe (this file, ``--probe``) that splits
its wall time, exclusively, into phases:

* ``start and exit``: the interpreter's start and shutdown (wall time outside the probe);
* ``import <package>``: every import, charged to the outermost non-project package being imported
  (``import tensorflow`` includes what TensorFlow loads), timed around ``importlib``'s
  ``_find_and_load``; ``import (project)`` is the project's own modules;
* named phases, timed around the functions in ``PHASES`` (``data`` = checksums and IDX reading,
  ``model load``, ``work``, ``outputs``, ``registry``, ``dvc status``...); time spent importing
  inside them goes to the import rows, not to them;
* ``rest``: everything else in the process (for the flow, Prefect's engine, API calls and the
  temporary server's start and stop).

Only the main thread is accounted; Prefect's threads count as the main thread's wait (``rest``).
It prints, per command, the median of each phase per variant and the median of the per-round ratios
(variant / working tree), then ``<command>_seconds=<median wall, working tree>`` lines. Speed is
only measured here, never asserted; the machine line and the load average say where it ran.

    python bench/fixed_costs.py [--baseline REV ...] [--rounds 3] [--steps 1100] [--raw-data data/raw]
        [--params FILE] [--no-flow] [--no-stages] [--stage NAME ...] [--scratch DIR]

``--steps 30000`` is the full run (each variant's set-up then trains it once); ``--raw-data`` of
synthetic IDX files with ``--params`` (their checksums and class counts) is the short run the tests use.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tarfile
import tempfile
import threading
import time
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PROJECT_PACKAGES = {"tasks", "flows", "bench"}
STAGES = ("download", "train", "evaluate", "promote")

# "module:qualified name" -> the phase its time is charged to (exclusively: what it calls that is
# listed too, or imports, is charged there). Names a revision lacks are skipped.
PHASES: dict[str, str] = {
    "tasks.lib.params:load_params": "params",
    "tasks.lib.mnist:verify_checksums": "data",
    "tasks.lib.mnist:load_split": "data",
    "tasks.lib.mnist:validate_dataset": "data",
    "tasks.download:fetch_source": "work",
    "tasks.lib.model:load_serving_model": "model load",
    "tasks.lib.model:predict_logits": "work",
    "tasks.lib.trainer:Trainer.__init__": "model build and trace",
    "tasks.lib.trainer:Trainer.run_steps": "work",
    "tasks.lib.trainer:Trainer.accuracy": "work",
    "tasks.lib.checkpoints:Checkpoints.save": "outputs",
    "tasks.lib.model:export": "outputs",
    "tasks.lib.atomic:write_bytes_atomic": "outputs",
    "tasks.evaluate:write_plots": "outputs",
    "tasks.lib.registry.production:tree_sha256": "model digests",
    "tasks.lib.registry.production:publish": "outputs",
    "tasks.lib.registry.production:append_registry": "outputs",
    "tasks.lib.registry.production:reconcile": "registry",
    "tasks.lib.registry.tags:registered_versions": "registry",
    "tasks.lib.repository:git_revision": "registry",
    "flows.pipeline:stage_is_up_to_date": "dvc status",
    "flows.pipeline:stages_up_to_date": "dvc status",
    "flows.pipeline:metrics_table": "dvc metrics diff",
    "tasks.lib.processes:run": "child processes",
    "tasks.lib.processes:stream": "child processes",
}


# --- the probe: runs inside the timed child process ---------------------------------------------


class Ledger:
    """Exclusive time per phase on the main thread: each interval goes to the innermost open phase."""

    def __init__(self) -> None:
        self.totals: dict[str, float] = defaultdict(float)
        self.stack = ["rest"]
        self.started = self.last = time.perf_counter()
        self.main = threading.get_ident()

    def _charge(self) -> None:
        now = time.perf_counter()
        self.totals[self.stack[-1]] += now - self.last
        self.last = now

    def enter(self, phase: str) -> None:
        self._charge()
        self.stack.append(phase)

    def leave(self) -> None:
        self._charge()
        self.stack.pop()

    def timed(self, function: Callable, phase: str) -> Callable:
        def wrapper(*arguments: object, **keywords: object) -> object:
            if threading.get_ident() != self.main:
                return function(*arguments, **keywords)
            self.enter(phase)
            try:
                return function(*arguments, **keywords)
            finally:
                self.leave()

        wrapper.__wrapped__ = function  # type: ignore[attr-defined]
        return wrapper


def _import_phase(current: str, name: str) -> str:
    """Nested imports stay charged to the outermost third-party package being imported."""
    if current.startswith("import ") and current != "import (project)":
        return current
    top = name.partition(".")[0]
    return "import (project)" if top in PROJECT_PACKAGES else f"import {top}"


def _wrap_module(ledger: Ledger, name: str, module: object) -> None:
    for target, phase in PHASES.items():
        module_name, _, qualified = target.partition(":")
        if module_name != name:
            continue
        owner, _, attribute = qualified.rpartition(".")
        holder = getattr(module, owner, None) if owner else module
        function = getattr(holder, attribute, None) if holder is not None else None
        if callable(function):
            setattr(holder, attribute, ledger.timed(function, phase))


def install_probe(ledger: Ledger) -> None:
    """Time every import (``importlib._bootstrap._find_and_load``, which ``import`` calls for a module
    not loaded yet) and wrap the functions of ``PHASES`` as their modules load, before anything
    binds their names."""
    import importlib._bootstrap as bootstrap

    original = bootstrap._find_and_load

    def find_and_load(name: str, import_: Callable) -> object:
        if threading.get_ident() != ledger.main:
            return original(name, import_)
        ledger.enter(_import_phase(ledger.stack[-1], name))
        try:
            module = original(name, import_)
        finally:
            ledger.leave()
        _wrap_module(ledger, name, module)
        return module

    bootstrap._find_and_load = find_and_load


def probe(module_name: str, report: Path, arguments: list[str]) -> int:
    """Run ``module_name``'s ``main(arguments)`` under the ledger; write the phases to ``report``."""
    import importlib

    ledger = Ledger()
    install_probe(ledger)
    code = 1
    # The command line the module would see as `python -m module arguments` (flows/__init__.py
    # reads it to start the flow's temporary server before Prefect's import).
    sys.orig_argv = [sys.executable, "-m", module_name, *arguments]
    try:
        code = importlib.import_module(module_name).main(arguments)
    finally:
        ledger._charge()
        phases = dict(ledger.totals) | {"in process": time.perf_counter() - ledger.started}
        report.write_text(json.dumps({"code": code, "phases": phases}))
    return code


# --- the bench: builds the variants, runs the rounds, prints the table ---------------------------


def _run(command: list[str], cwd: Path, environment: dict[str, str] | None = None, timeout: float = 3600):
    from tasks.lib.processes import run

    result = run(command, cwd, environment=environment, timeout=timeout)
    if result.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed in {cwd}:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
    return result


def _checkout(revision: str | None, repo: Path) -> None:
    """The code, dvc.yaml and params.yaml of ``revision`` (None: the working tree) into ``repo``."""
    import shutil

    items = ("tasks", "flows", "dvc.yaml", "params.yaml", ".gitignore", ".dvcignore")
    repo.mkdir(parents=True)
    if revision is None:
        for item in items:
            copy = shutil.copytree if (ROOT / item).is_dir() else shutil.copy
            copy(ROOT / item, repo / item, **({"ignore": shutil.ignore_patterns("__pycache__")}
                                             if (ROOT / item).is_dir() else {}))
        return
    archive = repo.parent / f"{repo.name}.tar"
    _run(["git", "archive", "-o", str(archive), revision, *items], ROOT)
    with tarfile.open(archive) as tar:
        tar.extractall(repo, filter="data")
    archive.unlink()


def _bench_params(repo: Path, raw_data: Path, steps: int, params_file: Path | None) -> None:
    import yaml

    document = yaml.safe_load((params_file or repo / "params.yaml").read_text())
    document["data"]["sources"] = [str(raw_data)]
    document["train"]["steps"] = steps
    document["promote"]["min_accuracy"] = 0.5  # a champion exists after the set-up, as in a re-run
    (repo / "params.yaml").write_text(yaml.safe_dump(document, sort_keys=False))


def prepare(name: str, revision: str | None, scratch: Path, raw_data: Path, steps: int,
            params_file: Path | None, environment: dict[str, str]) -> Path:
    """A git + DVC repository of ``revision``'s code where `dvc repro` has run once."""
    from tasks.lib.processes import python_module

    repo = scratch / name
    _checkout(revision, repo)
    _bench_params(repo, raw_data, steps, params_file)
    for command in (["git", "init", "-q", "-b", "main"], ["git", "config", "user.email", "bench@example.invalid"],
                    ["git", "config", "user.name", "bench"], python_module("dvc", "init", "-q"),
                    python_module("dvc", "config", "core.analytics", "false"), ["git", "add", "-A"],
                    ["git", "commit", "-q", "-m", f"bench: {name}"]):
        _run(command, repo, environment)
    print(f"{name}: dvc repro ({steps} training steps) ...", flush=True)
    _run(python_module("dvc", "repro"), repo, environment)
    return repo


def measure(module: str, repo: Path, environment: dict[str, str]) -> dict[str, float]:
    """Wall time of `python -m <module>` in ``repo`` and its phases (the probe's report)."""
    from tasks.lib.processes import run

    with tempfile.NamedTemporaryFile(suffix=".json") as report:
        command = [sys.executable, str(Path(__file__).resolve()), "--probe", module, "--report", report.name]
        started = time.perf_counter()
        result = run(command, repo, environment=environment | {"PYTHONPATH": str(repo)}, timeout=3600)
        wall = time.perf_counter() - started
        if result.returncode != 0:
            raise SystemExit(f"{module} failed in {repo}:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
        phases = json.loads(Path(report.name).read_text())["phases"]
    phases["start and exit"] = wall - phases.pop("in process")
    return {"wall": wall, **phases}


def rotated(items: list, round_index: int) -> list:
    shift = round_index % len(items)
    return items[shift:] + items[:shift]


def _median_rows(samples: list[dict[str, float]]) -> dict[str, float]:
    names = {name for sample in samples for name in sample}
    return {name: statistics.median(sample.get(name, 0.0) for sample in samples) for name in names}


def _order(rows: dict[str, float]) -> list[str]:
    rest = sorted((name for name in rows if name not in ("wall", "start and exit", "rest")), key=lambda n: -rows[n])
    return ["wall", "start and exit", *rest, "rest"]


def report(command: str, samples: dict[str, list[dict[str, float]]], reference: str) -> None:
    """One block per command: the median of each phase per variant, and the paired ratios."""
    medians = {variant: _median_rows(runs) for variant, runs in samples.items()}
    names = [name for name in _order(medians[reference])
             if any(medians[variant].get(name, 0.0) >= 0.05 for variant in medians) or name == "wall"]
    names += [name for variant in medians for name in _order(medians[variant])
              if name not in names and medians[variant].get(name, 0.0) >= 0.05]
    print(f"\n{command} (median of {len(samples[reference])} rounds, seconds)")
    print(f"  {'phase':30}" + "".join(f"{variant:>14}" for variant in medians))
    for name in names:
        print(f"  {name:30}" + "".join(f"{medians[variant].get(name, 0.0):14.2f}" for variant in medians))
    for variant, runs in samples.items():
        if variant != reference:
            ratios = [other["wall"] / ours["wall"] for other, ours in zip(runs, samples[reference])]
            print(f"  {variant} / {reference}: {statistics.median(ratios):.2f} (median of per-round wall ratios)")


def _flow_rounds(variants: dict[str, Path], rounds: int, base: dict[str, str], scratch: Path) -> dict:
    from flows.server import start_server

    samples: dict[str, dict[str, list]] = defaultdict(lambda: defaultdict(list))
    temporary = {name: base | {"PREFECT_HOME": str(scratch / f"prefect-home-{name}")} for name in variants}
    for name, repo in variants.items():  # the first run with a temporary server creates its database
        measure("flows.pipeline", repo, temporary[name])
    server = start_server(scratch / "server-home")
    try:
        served = base | server.client_environment()
        for round_index in range(rounds):
            for name in rotated(list(variants), round_index):
                samples["flow, running server"][name].append(measure("flows.pipeline", variants[name], served))
                samples["flow, temporary server"][name].append(measure("flows.pipeline", variants[name],
                                                                       temporary[name]))
    finally:
        server.stop()
    return samples


def _stage_rounds(variants: dict[str, Path], rounds: int, base: dict[str, str], stages: list[str]) -> dict:
    import shutil

    samples: dict[str, dict[str, list]] = defaultdict(lambda: defaultdict(list))
    for round_index in range(rounds):
        for name in rotated(list(variants), round_index):
            for stage in stages:
                if stage == "train":  # from step 0, not resumed from the set-up's checkpoints
                    shutil.rmtree(variants[name] / "checkpoints", ignore_errors=True)
                samples[stage][name].append(measure(f"tasks.{stage}", variants[name], base))
    return samples


def _arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--baseline", action="append", default=[], metavar="REV",
                        help="also time git revision REV (repeatable), e.g. bfc8abd")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=1100, help="train.steps (30000: the full run)")
    parser.add_argument("--raw-data", type=Path, default=ROOT / "data" / "raw", help="the MNIST IDX files")
    parser.add_argument("--params", type=Path, help="params.yaml to use for every variant (default: each one's own)")
    parser.add_argument("--no-flow", action="store_true", help="leave out the flow runs")
    parser.add_argument("--no-stages", action="store_true", help="leave out the stage runs")
    parser.add_argument("--stage", action="append", choices=STAGES, help="time only these stages (repeatable)")
    parser.add_argument("--scratch", type=Path, help="where the variants' repositories go (default: a temp dir)")
    return parser.parse_args()


def main() -> None:
    sys.path.insert(0, str(ROOT))
    from bench.train_speed import machine
    from tasks.lib.processes import child_environment

    args = _arguments()
    scratch = Path(tempfile.mkdtemp(prefix="fixed-costs-", dir=args.scratch))
    base = {key: value for key, value in child_environment().items() if not key.startswith("PREFECT_API")}
    base |= {"DO_NOT_TRACK": "1"}
    print(machine(), flush=True)
    print(f"load average at the start: {' '.join(f'{value:.2f}' for value in os.getloadavg())}", flush=True)
    raw_data = args.raw_data.resolve()
    revisions = {"now": None} | {f"@{revision}": revision for revision in args.baseline}
    variants = {name: prepare(name.strip("@"), revision, scratch, raw_data, args.steps, args.params, base)
                for name, revision in revisions.items()}
    samples = {} if args.no_flow else _flow_rounds(variants, args.rounds, base, scratch)
    samples |= {} if args.no_stages else _stage_rounds(variants, args.rounds, base, args.stage or list(STAGES))
    for command, runs in samples.items():
        report(command, runs, "now")
    print(f"\nload average at the end: {' '.join(f'{value:.2f}' for value in os.getloadavg())}")
    for command, runs in samples.items():
        key = command.replace(", ", "_").replace(" ", "_")
        print(f"{key}_seconds={statistics.median(run['wall'] for run in runs['now']):.2f}")


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--probe":
        # The probe imports nothing of the project before the timed module: the code under test is
        # the variant's (PYTHONPATH), not this checkout's.
        sys.path.pop(0)  # this script's directory (bench/)
        sys.exit(probe(sys.argv[2], Path(sys.argv[4]), sys.argv[5:]))
    main()
