"""The fault harness of issue 24: hostile inputs, each run in its own bounded child process, each
outcome classified and asserted (tests/test_hostile.py runs the table; docs/robustness.md lists
the classes and the figures).

A case prepares a directory (a project on tiny synthetic data: params.yaml, data/raw/, and, for
cases that need one, a trained candidate, a production model and train's reports), then runs one
command there (`python -m tasks.commands.check_params`, a stage, predict) under a time bound,
an address-space bound (RLIMIT_AS) and, where the case says so, a file-size limit (RLIMIT_FSIZE)
or a tiny tmpfs mounted over one directory in a private mount namespace (a full disk, root only).
The outcome is one of

    refused cleanly   exit 1, exactly one `error:` line, naming the path, no traceback
    correct           exit 0 and the case's check of the result holds
    hang              killed at the time bound
    runaway           peak memory above the case's bound, or MemoryError / killed by the AS bound
    traceback         a Python traceback on stderr
    silent wrong      exit 0 where a refusal was due, or a result the check rejects
    unclean refusal   exit non-zero without the one clear line

    python -m tests.hostile_inputs [CODE_ROOT [TEXT]]   # the table (cases whose name has TEXT), a summary per class

CODE_ROOT (default: this checkout) is the code under test: point it at an export of an older
commit to see what that code did with the same inputs.
"""

from __future__ import annotations

import copy
import os
import resource
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import yaml

REPO_ROOT = Path(__file__).resolve().parents[1]
GiB = 1 << 30
OUTCOMES = ("refused cleanly", "correct", "hang", "runaway", "traceback", "silent wrong", "unclean refusal")


class CaseUnavailable(RuntimeError):
    """This machine cannot set up the case (no immutable attribute for root, say); it is skipped."""


@dataclass
class Result:
    returncode: int | None
    stdout: str
    stderr: str
    seconds: float
    peak_rss_bytes: int
    timed_out: bool


Check = Callable[[Path, Result], "str | None"]  # a problem with the result, or None


@dataclass
class Case:
    klass: str
    name: str
    command: list[str]  # python -m <command[0]> <command[1:]>, run in the case's directory
    prepare: Callable[[Path], None]
    expect: str  # "refused" (with ``needle`` in the error) or "correct"
    needle: str = ""
    check: Check | None = None  # for "correct"; for "refused", what must have been kept
    trained: bool = False  # start from a project with a trained candidate, reports and production/1
    timeout: float = 60.0
    memory_bytes: int = 3 * GiB  # peak RSS above this is a runaway
    file_size_limit: int | None = None
    tmpfs: tuple[str, int] | None = None  # (directory, bytes): a full disk there (root only)
    environment: dict[str, str] = field(default_factory=dict)


# --- running one case --------------------------------------------------------------------------


def _limits(case: Case) -> Callable[[], None]:
    def apply() -> None:
        os.setsid()
        address_space = 12 * GiB  # TensorFlow and XLA reserve far more than they use; RSS is watched
        resource.setrlimit(resource.RLIMIT_AS, (address_space, address_space))
        if case.file_size_limit is not None:
            resource.setrlimit(resource.RLIMIT_FSIZE, (case.file_size_limit, case.file_size_limit))
    return apply


def _command(case: Case) -> list[str]:
    python = [sys.executable, "-m", *case.command]
    if case.tmpfs is None:
        return python
    directory, size = case.tmpfs
    # a tiny file system over ``directory``, filled to the last byte: the stage's first write there
    # fails with ENOSPC. The mount lives in the child's own namespace and goes with it.
    script = (f'mkdir -p "{directory}" && mount -t tmpfs -o size={size} tmpfs "{directory}" && '
              f'(cat /dev/zero > "{directory}/.filler" 2>/dev/null; true) && exec "$@"')
    return ["unshare", "-m", "--propagation", "private", "sh", "-c", script, "sh", *python]


def run_case(case: Case, directory: Path, code_root: Path = REPO_ROOT) -> Result:
    """Run ``case``'s command in ``directory`` (prepared), bounded in time and memory."""
    environment = {key: value for key, value in os.environ.items() if not key.startswith("PYTEST")}
    environment.update({"PYTHONPATH": str(code_root), "PYTHONUNBUFFERED": "1", "GIT_TERMINAL_PROMPT": "0",
                        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
                        **case.environment})
    started = time.monotonic()
    process = subprocess.Popen(_command(case), cwd=directory, env=environment, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, preexec_fn=_limits(case))
    timed_out = threading.Event()

    def stop() -> None:
        timed_out.set()
        os.killpg(process.pid, signal.SIGKILL)

    outputs: dict[str, bytes] = {}
    readers = [threading.Thread(target=lambda name=name, stream=stream: outputs.__setitem__(name, stream.read()))
               for name, stream in (("stdout", process.stdout), ("stderr", process.stderr))]
    for reader in readers:
        reader.start()
    watchdog = threading.Timer(case.timeout, stop)
    watchdog.start()
    try:
        # wait4, not wait: the child's own resource usage, so ru_maxrss is this case's peak RSS
        _, status, usage = os.wait4(process.pid, 0)
    finally:
        watchdog.cancel()
    process.returncode = os.waitstatus_to_exitcode(status)
    for reader in readers:
        reader.join(timeout=10)
    text = {name: outputs.get(name, b"").decode("utf-8", "replace") for name in ("stdout", "stderr")}
    return Result(process.returncode, text["stdout"], text["stderr"], time.monotonic() - started,
                  usage.ru_maxrss * 1024, timed_out.is_set())


def classify(case: Case, result: Result, directory: Path) -> tuple[str, str]:
    """(outcome, detail) of one run."""
    if result.timed_out:
        return "hang", f"killed after {case.timeout:.0f} s"
    if "MemoryError" in result.stderr or result.returncode == -signal.SIGKILL:
        return "runaway", "MemoryError or killed"
    if "Traceback (most recent call last)" in result.stderr:
        return "traceback", result.stderr.strip().splitlines()[-1][:200]
    problem = case.check(directory, result) if case.check else None
    if case.expect == "correct":
        if result.returncode != 0:
            return "unclean refusal" if "error:" not in result.stderr else "silent wrong", result.stderr[-300:]
        return ("silent wrong", problem) if problem else ("correct", "")
    if result.returncode == 0:
        return "silent wrong", "exit 0 where a refusal was due: " + result.stdout[-200:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    if result.returncode != 1 or len(errors) != 1 or not result.stderr.startswith("error:"):
        return "unclean refusal", result.stderr[-300:]
    if case.needle not in result.stderr:
        return "unclean refusal", f"{case.needle!r} not in: {result.stderr[-300:]}"
    if problem:
        return "silent wrong", f"refused, but {problem}"
    return "refused cleanly", ""


# --- projects on tiny synthetic data -------------------------------------------------------------


def params_document(source: Path) -> dict:
    from tests.conftest import make_params_document

    document = make_params_document(source)
    document["data"]["sources"] = ["source"]  # relative to the case directory, inside it
    # Older code under test (HOSTILE_CODE_ROOT) knows only the keys of its own params.yaml
    known = yaml.safe_load((Path(os.environ.get("HOSTILE_CODE_ROOT", REPO_ROOT)) / "params.yaml").read_text())
    for section, values in document.items():
        if isinstance(values, dict) and isinstance(known.get(section), dict):
            document[section] = {key: value for key, value in values.items() if key in known[section]}
    return document


def write_project(directory: Path, source: Path, document: dict | None = None) -> None:
    """params.yaml, the synthetic source and data/raw/ (as download would leave it)."""
    directory.mkdir(parents=True, exist_ok=True)
    shutil.copytree(source, directory / "source", dirs_exist_ok=True)
    shutil.copytree(source, directory / "data" / "raw", dirs_exist_ok=True)
    document = document or params_document(source)
    (directory / "params.yaml").write_text(yaml.safe_dump(document, sort_keys=False))


def train_template(directory: Path, source: Path, code_root: Path = REPO_ROOT) -> None:
    """A project with a trained candidate, train's reports and production version 1."""
    write_project(directory, source)
    environment = {**os.environ, "PYTHONPATH": str(code_root)}
    for stage in ("train", "evaluate"):
        subprocess.run([sys.executable, "-m", f"tasks.{stage}"], cwd=directory, env=environment, check=True,
                       capture_output=True, timeout=600)
    shutil.copytree(directory / "models" / "candidate", directory / "models" / "production" / "1")
    (directory / "models" / "registry.json").write_text('[{"action": "promote", "version": 1}]\n')


def prepare_case(case: Case, directory: Path, source: Path, template: Path | None) -> None:
    if case.trained:
        assert template is not None
        shutil.copytree(template, directory, symlinks=True)
    else:
        write_project(directory, source)
    case.prepare(directory)


# --- the table ---------------------------------------------------------------------------------


def _edit_params(directory: Path, change: Callable[[dict], None]) -> None:
    path = directory / "params.yaml"
    document = yaml.safe_load(path.read_text())
    change(document)
    path.write_text(yaml.safe_dump(document, sort_keys=False))


def setting(section: str, key: str, value: object) -> Callable[[Path], None]:
    def prepare(directory: Path) -> None:
        _edit_params(directory, lambda document: document[section].__setitem__(key, copy.deepcopy(value)))
    return prepare


def text_edit(old: str, new: str) -> Callable[[Path], None]:
    def prepare(directory: Path) -> None:
        path = directory / "params.yaml"
        text = path.read_text()
        assert old in text, old
        path.write_text(text.replace(old, new, 1))
    return prepare


def replace_with(relative: str, kind: str, target: str = "") -> Callable[[Path], None]:
    """Put something other than what belongs at ``relative``: fifo, dir, file, link, sparse, loop."""
    def prepare(directory: Path) -> None:
        path = directory / relative
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        elif path.exists() or path.is_symlink():
            path.unlink()
        path.parent.mkdir(parents=True, exist_ok=True)
        if kind == "fifo":
            os.mkfifo(path)
        elif kind == "dir":
            path.mkdir()
        elif kind == "file":
            path.write_text("not what belongs here\n")
        elif kind == "link":
            path.symlink_to(target)
        elif kind == "loop":
            path.symlink_to(path.name)
        elif kind == "sparse":  # a huge file that takes no disk
            with open(path, "wb") as stream:
                stream.truncate(int(target))
        elif kind == "text":
            path.write_text(target)
        else:
            raise ValueError(kind)
    return prepare


def both(*steps: Callable[[Path], None]) -> Callable[[Path], None]:
    def prepare(directory: Path) -> None:
        for step in steps:
            step(directory)
    return prepare


def unchanged(relative: str) -> Check:
    """The refusal kept ``relative`` as the template had it (a trained project's file or directory)."""
    def check(directory: Path, result: Result) -> str | None:
        from tests.conftest import tree_digest

        path = directory / relative
        marker = directory / ".before" / relative.replace("/", "_")
        if not marker.exists():
            return None
        now = tree_digest(path) if path.is_dir() else path.read_bytes().hex() if path.exists() else "missing"
        return None if now == marker.read_text() else f"{relative} changed"
    return check


def remember(relative: str) -> Callable[[Path], None]:
    def prepare(directory: Path) -> None:
        from tests.conftest import tree_digest

        path = directory / relative
        (directory / ".before").mkdir(exist_ok=True)
        digest = tree_digest(path) if path.is_dir() else path.read_bytes().hex()
        (directory / ".before" / relative.replace("/", "_")).write_text(digest)
    return prepare


def production_is(expected: list[str]) -> Check:
    def check(directory: Path, result: Result) -> str | None:
        found = sorted(entry.name for entry in (directory / "models" / "production").iterdir())
        return None if found == expected else f"models/production holds {found}, expected {expected}"
    return check


def stdout_has(text: str) -> Check:
    def check(directory: Path, result: Result) -> str | None:
        return None if text in result.stdout + result.stderr else f"{text!r} not in the output"
    return check


CHECK = ["tasks.commands.check_params", "params.yaml"]


def _params_cases() -> list[Case]:
    """Values the check used to pass that the stages cannot run, and files that are not params."""
    values = [
        ("train", "seed", 2**64, "train.seed"), ("train", "seed", 2**63, "train.seed"),
        ("train", "seed", -1, "train.seed"), ("train", "decay_steps", 2**63, "train.decay_steps"),
        ("train", "decay_steps", 10**30, "train.decay_steps"), ("train", "eval_every", 2**64, "train.eval_every"),
        ("train", "checkpoint_every", 10**40, "train.checkpoint_every"),
        ("train", "learning_rate", float("nan"), "train.learning_rate"),
        ("train", "max_loss", float("inf"), "train.max_loss"), ("train", "max_loss", float("nan"), "train.max_loss"),
        ("train", "l2_rate", float("nan"), "train.l2_rate"),
        ("model", "init_stddev", float("nan"), "model.init_stddev"),
        ("promote", "min_accuracy", float("nan"), "promote.min_accuracy"),
        ("data", "timeout_seconds", float("nan"), "data.timeout_seconds"),
        ("schedule", "stage_timeout_seconds", {"train": float("inf")}, "stage_timeout_seconds.train"),
        ("schedule", "stage_timeout_seconds", {"train": -5.0}, "stage_timeout_seconds.train"),
        ("schedule", "stage_timeout_seconds", {"promote": 0.0}, "stage_timeout_seconds.promote"),
        ("data", "validation_size", 10**20, "data.validation_size"),
        ("data", "class_counts", {"train": [10**15] * 10, "test": [20] * 10}, "data.class_counts.train"),
        ("train", "keep_runs", -1, "train.keep_runs"), ("train", "batch_size", 2**40, "train.batch_size"),
        ("model", "hidden_units", 2**31, "model.hidden_units"), ("train", "steps", 2**63, "train.steps"),
    ]
    cases = [Case("values the check passed", f"{section}.{key}={value!r}"[:60], CHECK, setting(section, key, value),
                  "refused", needle) for section, key, value, needle in values]
    # MNIST's own sizes: the 22 GB batch-index array, and others past any machine
    memory = [{"steps_per_call": 100_000, "batch_size": 55_000}, {"steps_per_call": 50_000, "batch_size": 50_000},
              {"steps_per_call": 100_000, "batch_size": 20_000}]
    cases += [Case("values the check passed", f"memory: {changes}", CHECK,
                   lambda directory, changes=changes: _edit_params(directory, lambda d: _mnist_sized(d, changes)),
                   "refused", "would need about") for changes in memory]
    cases.append(Case("values the check passed", "memory: 10000 hidden units x 60000 validation images", CHECK,
                      both(setting("model", "hidden_units", 10_000),
                           lambda d: _edit_params(d, _huge_validation)), "refused", "would need about"))
    return cases


def _mnist_sized(document: dict, train_changes: dict) -> None:
    from tests.conftest import base_params_document

    document["data"]["class_counts"] = base_params_document()["data"]["class_counts"]
    document["data"]["validation_size"] = 5000
    document["train"].update(train_changes)


def _huge_validation(document: dict) -> None:
    document["data"]["class_counts"]["train"] = [9_000_000] * 10
    document["data"]["validation_size"] = 80_000_000


def _path_cases() -> list[Case]:
    names = ["raw_data", "candidate", "checkpoints", "train_reports", "metrics", "plots", "production", "registry",
             "promotion"]
    cases = [Case("paths leaving the repository", f"paths.{name}: ../outside", CHECK,
                  setting("paths", name, "../outside-" + name), "refused", "must stay inside the repository")
             for name in names]
    cases += [
        Case("paths leaving the repository", "paths.production: models/../../prod", CHECK,
             setting("paths", "production", "models/../../prod"), "refused", "must stay inside"),
        Case("paths leaving the repository", "models/ a link to /tmp", CHECK,
             replace_with("models", "link", "/tmp"), "refused", "leads outside the repository"),
        Case("paths leaving the repository", "reports/ a link to ..", CHECK,
             replace_with("reports", "link", ".."), "refused", "leads outside the repository"),
        Case("paths leaving the repository", "paths.plots: ~/plots", CHECK,
             setting("paths", "plots", "~/plots"), "refused", "paths.plots"),
        Case("paths leaving the repository", "paths.metrics: /etc/x", CHECK,
             setting("paths", "metrics", "/etc/x"), "refused", "paths.metrics"),
    ]
    return cases


def _yaml_cases() -> list[Case]:
    edits = [
        ("  seed: 0\n", "  seed: 0\n  seed: 1\n", "key 'seed' appears twice"),
        ("  steps: 60\n", "  steps: 60\n  steps: 60\n", "key 'steps' appears twice"),
        ("model:\n", "model:\n  hidden_units: 7\n", "key 'hidden_units' appears twice"),
        ("promote:\n", "evaluate:\n  batch_size: 1\npromote:\n", "key 'evaluate' appears twice"),
        ("paths:\n", "paths:\n  production: elsewhere\n", "key 'production' appears twice"),
        ("  seed: 0\n", "  seed: !!python/object/apply:os.system ['true']\n", "not valid YAML"),
        ("  seed: 0\n", "  seed: &s 0\n  l2_rate_copy: *s\n", "YAML aliases"),
    ]
    return [Case("YAML read two ways", f"params.yaml: {needle}", CHECK, text_edit(old, new), "refused", needle)
            for old, new, needle in edits]


def _file_cases() -> list[Case]:
    klass = "files that are not what they seem"
    params = [("fifo", "", "is a FIFO"), ("dir", "", "is a directory"), ("link", "/dev/zero", "character device"),
              ("link", "/dev/urandom", "character device"), ("link", "/proc/self/environ", "params.yaml"),
              ("sparse", str(3 << 30), "larger than"), ("loop", "", "params.yaml: cannot be read"),
              ("link", "missing.yaml", "no such file")]
    cases = [Case(klass, f"params.yaml as {kind} {target}"[:60], CHECK, replace_with("params.yaml", kind, target),
                  "refused", needle) for kind, target, needle in params]
    registry = [("fifo", "", "is a FIFO"), ("dir", "", "is a directory"), ("link", "/dev/zero", "registry.json"),
                ("sparse", str(2 << 30), "larger than"), ("text", "[" * 100_000, "not valid JSON"),
                ("text", '{"a": 1}', "not a JSON list"), ("loop", "", "registry.json")]
    cases += [Case(klass, f"registry.json as {kind} {target[:10]}", ["tasks.promote"],
                   replace_with("models/registry.json", kind, target), "refused", needle)
              for kind, target, needle in registry]
    cases += [
        Case(klass, "data/raw as a file", ["tasks.promote"], replace_with("data/raw", "file"), "refused",
             "data/raw"),
        Case(klass, "models/candidate as a file", ["tasks.evaluate"], replace_with("models/candidate", "file"),
             "refused", "models/candidate", trained=True),
        Case(klass, "models/production as a file", ["tasks.promote"], replace_with("models/production", "file"),
             "refused", "where a directory belongs"),
        Case(klass, "data/raw/t10k-images as a FIFO", ["tasks.promote"],
             replace_with("data/raw/t10k-images-idx3-ubyte", "fifo"), "refused", "is a FIFO"),
        Case(klass, "data/raw/train-images as /dev/zero", ["tasks.train"],
             replace_with("data/raw/train-images-idx3-ubyte", "link", "/dev/zero"), "refused", "character device"),
        Case(klass, "checkpoints as a file", ["tasks.train"], replace_with("checkpoints", "file"), "refused",
             "checkpoints: is a regular file where a directory belongs"),
        Case(klass, "reports/train/metrics.json as a FIFO", ["tasks.evaluate"],
             replace_with("reports/train/metrics.json", "fifo"), "refused", "is a FIFO", trained=True),
        Case(klass, "reports/train/metrics.json not train's", ["tasks.evaluate"],
             replace_with("reports/train/metrics.json", "text", "[1, 2]"), "refused", "lacks the numbers",
             trained=True),
        Case(klass, "a curve TSV as a FIFO", ["tasks.evaluate"],
             replace_with("reports/train/plots/metrics/loss.tsv", "fifo"), "refused", "is a FIFO", trained=True),
        Case(klass, "candidate holds a FIFO", ["tasks.evaluate"],
             replace_with("models/candidate/variables/variables.index", "fifo"), "refused", "is a FIFO",
             trained=True),
        Case(klass, "a checkpoint index as a FIFO: passed over", ["tasks.train"],
             _fifo_checkpoint, "correct", check=stdout_has("is not a regular file"), trained=True),
    ]
    return cases


def _fifo_checkpoint(directory: Path) -> None:
    newest = max((directory / "checkpoints").glob("*/ckpt-*.index"), key=lambda path: int(path.stem.split("-")[1]))
    newest.unlink()
    os.mkfifo(newest)
    (directory / "models" / "candidate").rename(directory / "models" / "old-candidate")


def _environment_cases() -> list[Case]:
    klass = "full disk, read-only, size limits"
    cases = [
        Case(klass, "train under a 64 KiB file-size limit", ["tasks.train"], remember("models/candidate"), "refused",
             "file-size limit", check=unchanged("models/candidate"), trained=True, file_size_limit=64 << 10),
        Case(klass, "evaluate under a 4 KiB file-size limit", ["tasks.evaluate"], lambda directory: None,
             "refused", "file-size limit", trained=True, file_size_limit=4 << 10),
        Case(klass, "download under a 64 KiB file-size limit", ["tasks.download"],
             both(remember("data/raw")), "refused", "file-size limit", check=unchanged("data/raw"),
             file_size_limit=64 << 10),
        Case(klass, "promote with reports/ read-only", ["tasks.promote"],
             both(_fresh_candidate, _read_only("reports")), "refused", "reports/promotion.json",
             check=production_is(["1"]), trained=True),
        Case(klass, "promote with models/ read-only", ["tasks.promote"],
             both(_fresh_candidate, _read_only("models/production")), "refused", "models/production",
             check=production_is(["1"]), trained=True),
        Case(klass, "promote under a 32 KiB file-size limit", ["tasks.promote"], both(_fresh_candidate),
             "refused", "file-size limit", check=production_is(["1"]), trained=True, file_size_limit=32 << 10),
    ]
    if os.geteuid() == 0 and shutil.which("unshare"):
        cases += [
            Case(klass, "train with checkpoints/ on a full 16 KiB disk", ["tasks.train"], _no_checkpoints,
                 "refused", "the disk is full", tmpfs=("checkpoints", 16 << 10), trained=True),
            Case(klass, "promote with reports/ on a full 4 KiB disk", ["tasks.promote"],
                 _fresh_candidate, "refused", "the disk is full",
                 check=production_is(["1"]), tmpfs=("reports", 4 << 10), trained=True),
            Case(klass, "download with data/ on a full 64 KiB disk", ["tasks.download"], lambda d: None,
                 "refused", "the disk is full", tmpfs=("data", 64 << 10)),
        ]
    return cases


def _no_checkpoints(directory: Path) -> None:
    shutil.rmtree(directory / "checkpoints")


def _fresh_candidate(directory: Path) -> None:
    """Make the trained candidate beat production: production/1 becomes an unloadable champion, so
    the candidate is judged on the value threshold alone and would be published as version 2."""
    (directory / "models" / "production" / "1" / "saved_model.pb").write_bytes(b"broken")


def _read_only(relative: str) -> Callable[[Path], None]:
    def prepare(directory: Path) -> None:
        path = directory / relative
        if os.geteuid() == 0:  # root ignores permission bits: the immutable attribute stops it
            if subprocess.run(["chattr", "+i", str(path)], capture_output=True).returncode != 0:
                raise CaseUnavailable(f"chattr +i {path} failed (file system or capability)")
        else:
            path.chmod(0o555)
    return prepare


def release(directory: Path) -> None:
    """Undo what ``_read_only`` did anywhere below ``directory``, so it can be deleted."""
    if os.geteuid() == 0:
        for relative in ("reports", "models/production"):
            if (directory / relative).exists():
                subprocess.run(["chattr", "-i", str(directory / relative)], capture_output=True)


PREDICT = "tasks.commands.predict"


def _image_cases() -> list[Case]:
    klass = "inputs predict cannot read as digits"
    refusals = [
        ("empty.idx", "idx:0", "holds no images"), ("blank.png", "blank", "the image is blank"),
        ("nan.tiff", "nan", "NaN or infinite"), ("negative.tiff", "negative", "pixel values from"),
        ("huge.tiff", "huge", "pixel values from"), ("frames.gif", "frames", "frames"),
        ("fifo.png", "fifo", "is a FIFO"), ("folder.png", "dir", "is a directory"),
        ("zero.png", "/dev/zero", "character device"), ("labels.idx", "labels", "not a readable image"),
        ("row.idx", "idx1d", "holds images of 784x1"), ("empty.png", "empty", "not a readable image"),
    ]
    cases = [Case(klass, f"predict {name}", [PREDICT, name], _image(name, kind), "refused", needle, trained=True)
             for name, kind, needle in refusals]
    for name, kind in (("alpha.png", "alpha"), ("sixteen.png", "16-bit"), ("float.tiff", "float"),
                       ("paper.png", "dark-on-light"), ("palette.png", "palette-alpha"), ("grey-alpha.png", "LA"),
                       ("rgb.png", "rgb")):
        cases.append(Case(klass, f"predict {name} ({kind})", [PREDICT, name, "reference.png"], _image(name, kind),
                          "correct", check=_same_digit_as_reference, trained=True))
    return cases


def _digit() -> np.ndarray:
    from tests.conftest import synthetic_arrays

    digit = synthetic_arrays()["t10k-images-idx3-ubyte"][3].copy()
    digit[:3], digit[-3:], digit[:, :3], digit[:, -3:] = 0, 0, 0, 0  # MNIST's black border
    return digit


def _image(name: str, kind: str) -> Callable[[Path], None]:
    def prepare(directory: Path) -> None:
        from PIL import Image

        from tasks.lib import mnist

        digit, path = _digit(), directory / name
        # the 8-bit grey image the input must read as (a palette image holds the digit at 1 bit)
        reference = np.where(digit > 127, 255, 0).astype(np.uint8) if kind == "palette-alpha" else digit
        Image.fromarray(reference).save(directory / "reference.png")
        rgba = np.zeros((28, 28, 4), np.uint8)
        writers = {
            "idx:0": lambda: path.write_bytes(mnist.encode_idx(np.zeros((0, 28, 28), np.uint8))),
            "idx1d": lambda: path.write_bytes(np.array([2051, 1, 1, 784], ">i4").tobytes() + bytes(784)),
            "labels": lambda: path.write_bytes(mnist.encode_idx(np.arange(5, dtype=np.uint8))),
            "blank": lambda: Image.fromarray(np.full((28, 28), 200, np.uint8)).save(path),
            "nan": lambda: Image.fromarray(np.full((28, 28), np.nan, np.float32), mode="F").save(path),
            "negative": lambda: Image.fromarray(-digit.astype(np.float32), mode="F").save(path),
            "huge": lambda: Image.fromarray(digit.astype(np.float32) * 1e6, mode="F").save(path),
            "frames": lambda: Image.fromarray(digit).save(path, save_all=True,
                                                         append_images=[Image.fromarray(255 - digit)]),
            "fifo": lambda: os.mkfifo(path), "dir": lambda: path.mkdir(),
            "/dev/zero": lambda: path.symlink_to("/dev/zero"), "empty": lambda: path.write_bytes(b""),
            "alpha": lambda: (rgba.__setitem__((..., 3), digit), Image.fromarray(rgba, "RGBA").save(path)),
            "16-bit": lambda: Image.fromarray(digit.astype(np.uint16) * 257).save(path),
            "float": lambda: Image.fromarray(digit.astype(np.float32) / 255, mode="F").save(path),
            "dark-on-light": lambda: Image.fromarray(255 - digit).save(path),
            "palette-alpha": lambda: _palette_alpha(digit, path),
            "LA": lambda: Image.fromarray(np.stack([np.full_like(digit, 255), digit], -1), "LA").save(path),
            "rgb": lambda: Image.fromarray(np.stack([digit] * 3, -1)).save(path),
        }
        writers[kind]()
    return prepare


def _palette_alpha(digit: np.ndarray, path: Path) -> None:
    from PIL import Image

    rgba = np.zeros((28, 28, 4), np.uint8)
    rgba[..., 3] = np.where(digit > 127, 255, 0)
    Image.fromarray(rgba, "RGBA").quantize(colors=2, method=Image.Quantize.FASTOCTREE).save(path)


def _same_digit_as_reference(directory: Path, result: Result) -> str | None:
    lines = [line for line in result.stdout.splitlines() if ": " in line]
    if len(lines) != 2:
        return f"expected two predictions, got {lines}"
    # the digit and its probability to 3 decimals: a misread image (blank, clipped, inverted)
    # gives other probabilities even where the tiny model happens to name the same digit
    answers = [line.split(": ", 1)[1] for line in lines]
    return None if answers[0] == answers[1] else f"read as {answers[0]}, the 8-bit original as {answers[1]}"


def _leftover_cases() -> list[Case]:
    klass = "leftovers and reuse"
    return [
        Case(klass, "train sweeps .candidate.partial-* of a killed train", ["tasks.train"],
             lambda d: (d / "models" / ".candidate.partial-x1" / "variables").mkdir(parents=True), "correct",
             check=_gone("models/.candidate.partial-x1"), trained=True),
        Case(klass, "promote after a publish killed before its commit point", ["tasks.promote"],
             both(_fresh_candidate, lambda d: (d / "models" / "production" / ".publishing-v2-killed" / "model")
                  .mkdir(parents=True)), "correct", check=production_is(["1", "3"]), trained=True),
        Case(klass, "train of other params, then back: resumes", ["tasks.train"], _other_params_in_between, "correct",
             check=stdout_has("resuming from"), trained=True, timeout=120),
    ]


def _gone(relative: str) -> Check:
    return lambda directory, result: f"{relative} is still there" if (directory / relative).exists() else None


def _other_params_in_between(directory: Path) -> None:
    """Train other params (fewer hidden units) to their end, as the user switching 32 -> 16 would;
    the case's run is then back at 32 units and must resume its own checkpoint."""
    original = (directory / "params.yaml").read_text()
    _edit_params(directory, lambda document: document["model"].update(hidden_units=16))
    subprocess.run([sys.executable, "-m", "tasks.train"], cwd=directory, check=False, capture_output=True,
                   env={**os.environ, "PYTHONPATH": os.environ.get("HOSTILE_CODE_ROOT", str(REPO_ROOT))},
                   timeout=300)
    (directory / "params.yaml").write_text(original)


def all_cases() -> list[Case]:
    return (_params_cases() + _path_cases() + _yaml_cases() + _file_cases() + _environment_cases()
            + _image_cases() + _leftover_cases())


def main(argv: list[str]) -> int:
    """Run every case (or those whose name holds argv[1]) against CODE_ROOT (argv[0], default this
    checkout); print a line per case and a summary per class."""
    import tempfile
    from collections import Counter

    from tests.conftest import write_synthetic

    code_root = Path(argv[0]).resolve() if argv else REPO_ROOT
    os.environ["HOSTILE_CODE_ROOT"] = str(code_root)
    work = Path(tempfile.mkdtemp(prefix="hostile-"))
    source = work / "source"
    write_synthetic(source)
    template = work / "template"
    train_template(template, source, code_root)
    counts: dict[str, Counter] = {}
    chosen = [case for case in all_cases() if len(argv) < 2 or argv[1] in case.name]
    for index, case in enumerate(chosen):
        directory = work / f"case-{index}"
        prepare_case(case, directory, source, template)
        result = run_case(case, directory, code_root)
        outcome, detail = classify(case, result, directory)
        counts.setdefault(case.klass, Counter())[outcome] += 1
        print(f"{outcome:16} {result.seconds:5.1f} s {case.klass[:28]:28} {case.name[:60]} {detail[:120]}",
              flush=True)
        release(directory)
    for klass, counter in counts.items():
        print(f"{klass}: {dict(counter)}")
    shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
