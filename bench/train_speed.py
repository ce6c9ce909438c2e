"""Training speed: our XLA-compiled ``Trainer.run_steps`` against Keras ``model.fit`` and peers, side by side.

All train the seed's network with the hyperparameters of ``params.yaml`` on the real MNIST
training split (random data of the same shape, with a warning, when ``data/raw`` is missing):
784-500-10 ReLU MLP, truncated-normal init, plain SGD at batch 100 with the staircase
exponential learning-rate decay, L2 on the weight matrices (Keras ``L2(l2_rate / 2)`` is
``l2_rate * sum(W^2) / 2``, our ``l2_rate * tf.nn.l2_loss``), mean sparse cross-entropy from
logits, and an exponential moving average of the weights after every step (Keras
``SGD(use_ema=True, ema_momentum=moving_average_decay)``; Keras skips our short EMA warm-up,
which costs nothing either way).

Measured, in one process so all share the same TensorFlow thread pools:

* ``keras fit``: ``model.fit`` on the numpy arrays (``batch_size``, ``shuffle=True``, default
  ``steps_per_execution=1``, ``jit_compile="auto"`` which is off on CPU): the idiomatic loop.
* ``ours``: ``Trainer.run_steps`` in chunks of ``train.steps_per_call`` steps, one call of the
  XLA-compiled loop each, batch order from ``tasks.lib.schedules.BatchOrder`` (its cost is
  included, like Keras's shuffling).
* ``ours, 1 step/call`` (context): our compiled loop called once per step from Python, which
  shows what per-step dispatch costs.
* ``ours @ REV`` (with ``--baseline REV``, repeatable): the train stage's ``Trainer``, with the
  rest of ``tasks/``, as it was at git revision REV (``tasks/lib/trainer.py``, or
  ``tasks/trainer.py`` before the ``tasks.lib`` layout), called like ours, in the same rounds:
  the paired no-regression check for a change to the trainer (``--baseline HEAD`` before
  committing, or the commit before a series). ``--baseline 21e9733`` times the hand-tuned
  ``tf.function`` graph-mode trainer the XLA loop replaced: what the XLA loop gained.
* ``jax scan`` (a peer a user might pick instead): bench/jax_trainer.py, ``jax.jit`` of a
  ``lax.scan`` over ``train.steps_per_call`` steps with ``jax.grad``, written plainly. Only
  when JAX is installed (``pip install -e '.[bench]'``); otherwise the row is left out, saying so.

Each is warmed up first (tracing and compiling, one epoch for Keras, one call for the others),
then timed over ``--epochs`` epochs (550 steps each) per round; the measurements alternate for
``--rounds`` rounds, in a rotating order, so that background load hits all of them alike (on a
shared 2-core machine it moves every few seconds, hence many short rounds rather than a few long
ones). It does not hit them equally hard: the XLA loop loses its lead over the graph trainer
(``--baseline 21e9733``) when another process takes a core (docs/benchmarks.md), so compare on an idle
machine. Keras is timed from the start of its first timed epoch to the end of its last (a
callback), which leaves out ``fit``'s per-call set-up. Reported: best and median steps/s, the
peak RSS of the process after each set-up, the median of the per-round ratios (ours / Keras,
ours / JAX and ours / each baseline in the same round), and as the last line
``ratio_vs_keras_fit=<best ours / best keras>``.

    python bench/train_speed.py [--rounds 8] [--epochs 1] [--threads 0] [--inter-op-threads 0] [--no-per-step]
        [--no-jax] [--baseline REV ...] [--params params.yaml] [--raw-data data/raw]
"""

from __future__ import annotations

import argparse
import importlib
import os
import platform
import re
import resource
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402

from tasks.lib import mnist, processes  # noqa: E402
from tasks.lib.params import ModelParams, TrainParams, load_params  # noqa: E402
from tasks.lib.schedules import BatchOrder, decay_steps_for  # noqa: E402


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def load_training(raw_data: Path, validation_size: int) -> tuple[np.ndarray, np.ndarray]:
    try:
        split = mnist.load_split(raw_data, "train", validation_size)
        return split.images, split.labels
    except (FileNotFoundError, mnist.DataError) as error:
        print(f"WARNING: no MNIST in {raw_data} ({error}); timing random data of the same shape instead")
        rng = np.random.default_rng(0)
        images = rng.integers(0, 256, (60_000 - validation_size, 784), dtype=np.uint8).astype(np.float32) / 255
        return images, rng.integers(0, 10, len(images)).astype(np.int32)


def keras_model(model: ModelParams, train: TrainParams, decay_steps: int):
    import keras

    def dense(units: int, activation: str | None):
        return keras.layers.Dense(
            units, activation=activation,
            kernel_initializer=keras.initializers.TruncatedNormal(stddev=model.init_stddev, seed=train.seed),
            kernel_regularizer=keras.regularizers.L2(train.l2_rate / 2),  # = l2_rate * sum(W^2) / 2
        )

    layers = [keras.Input((784,)), dense(model.hidden_units, model.activation), dense(10, None)]
    network = keras.Sequential(layers if model.hidden_units else [layers[0], layers[2]])
    schedule = keras.optimizers.schedules.ExponentialDecay(
        train.learning_rate, decay_steps, train.learning_rate_decay, staircase=True)
    network.compile(
        optimizer=keras.optimizers.SGD(schedule, use_ema=True, ema_momentum=train.moving_average_decay),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    return network


def keras_runner(model: ModelParams, train: TrainParams, images: np.ndarray, labels: np.ndarray,
                 decay_steps: int, epochs: int) -> Callable[[], float]:
    """Build, compile and warm up (one epoch); return a function timing ``epochs`` epochs of fit."""
    import keras

    network = keras_model(model, train, decay_steps)
    fit = dict(x=images, y=labels, batch_size=train.batch_size, shuffle=True, verbose=0)
    network.fit(epochs=1, **fit)

    class EpochClock(keras.callbacks.Callback):
        def on_epoch_begin(self, epoch: int, logs: dict | None = None) -> None:
            if epoch == 0:
                self.started = time.perf_counter()

        def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
            self.ended = time.perf_counter()

    def run() -> float:
        clock = EpochClock()
        network.fit(epochs=epochs, callbacks=[clock], **fit)
        return epochs * (len(labels) // train.batch_size) / (clock.ended - clock.started)

    return run


def timed_steps(trainer, order: BatchOrder, steps: int, per_call: int) -> Callable[[], float]:
    """Warm ``trainer`` up with one call; return a function timing its next ``steps`` steps,
    ``per_call`` steps a call (anything with ``run_steps(batches)``: ours, a baseline's, JAX)."""
    trainer.run_steps(order.batches(0, per_call))
    next_step = per_call

    def run() -> float:
        nonlocal next_step
        started = time.perf_counter()
        for first in range(next_step, next_step + steps, per_call):
            trainer.run_steps(order.batches(first, min(per_call, next_step + steps - first)))
        next_step += steps
        return steps / (time.perf_counter() - started)

    return run


def trainer_runner(model: ModelParams, train: TrainParams, images: np.ndarray, labels: np.ndarray,
                   decay_steps: int, steps: int, per_call: int,
                   trainer_class: type | None = None) -> Callable[[], float]:
    """The train stage's Trainer (or ``trainer_class``, an earlier version of it), ``per_call`` steps a call."""
    if trainer_class is None:
        from tasks.lib.trainer import Trainer as trainer_class

    trainer = trainer_class(model, train.model_copy(update={"steps_per_call": per_call}), images, labels, decay_steps)
    return timed_steps(trainer, BatchOrder(len(labels), train.batch_size, train.seed), steps, per_call)


def _git(*arguments: str) -> str:
    shown = processes.run(["git", *arguments], ROOT)
    if shown.returncode != 0:
        raise SystemExit(f"--baseline: git {' '.join(arguments)}: {shown.stderr.strip()}")
    return shown.stdout


def trainer_at(revision: str, scratch: Path) -> type:
    """The ``Trainer`` class of the train stage as it was at git ``revision`` of this repository:
    that revision's whole ``tasks/`` tree (subpackages too) is copied to ``scratch`` as package
    ``tasks_at_<revision>``, its imports of ``tasks`` renamed to match (real files: tf.function's
    AutoGraph reads the source), and the class comes from ``tasks/lib/trainer.py`` when the
    revision has it, else from ``tasks/trainer.py`` (the layout before ``tasks.lib``). Today's
    params objects are passed in, so the revision must accept them."""
    package = f"tasks_at_{re.sub(r'[^0-9A-Za-z_]', '_', revision)}"
    paths = _git("ls-tree", "-r", "--name-only", revision, "--", "tasks/").splitlines()
    for path in paths:
        target = scratch / package / Path(path).relative_to("tasks")
        target.parent.mkdir(parents=True, exist_ok=True)
        source = _git("show", f"{revision}:{path}")
        if path.endswith(".py"):
            source = re.sub(r"\b(from|import) tasks\b", rf"\1 {package}", source)
        target.write_text(source)
    if "tasks/lib/trainer.py" in paths:
        module = f"{package}.lib.trainer"
    elif "tasks/trainer.py" in paths:
        module = f"{package}.trainer"
    else:
        raise SystemExit(f"--baseline: {revision} has neither tasks/lib/trainer.py nor tasks/trainer.py")
    if str(scratch) not in sys.path:
        sys.path.insert(0, str(scratch))
    return importlib.import_module(module).Trainer


def jax_runner(model: ModelParams, train: TrainParams, images: np.ndarray, labels: np.ndarray,
               decay_steps: int, steps: int) -> Callable[[], float] | None:
    """The JAX peer (bench/jax_trainer.py), or None when JAX is not installed."""
    try:
        from bench.jax_trainer import JaxTrainer
    except ImportError as error:
        print(f"no jax scan row: {error} (pip install -e '.[bench]' adds JAX)")
        return None
    from tasks.lib.model import initial_values

    initial = [value.numpy() for value in initial_values(model, train.seed)]
    trainer = JaxTrainer(initial, model.activation, train, images, labels, decay_steps)
    return timed_steps(trainer, BatchOrder(len(labels), train.batch_size, train.seed), steps, train.steps_per_call)


def machine() -> str:
    """The CPU the figures belong to: model name and core count (Linux), and the Python platform."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
        model = next(line.split(":", 1)[1].strip() for line in lines if line.startswith("model name"))
        flags = next(line.split(":", 1)[1].split() for line in lines if line.startswith("flags"))
        model += ", AVX-512" if "avx512f" in flags else ", AVX2" if "avx2" in flags else ""
    except (OSError, StopIteration):
        model = platform.processor() or "unknown CPU"
    return f"machine: {model}, {os.cpu_count()} cores, {platform.platform()}"


def configure_threads(intra_op: int, inter_op: int) -> str:
    """Size TensorFlow's two thread pools before TensorFlow loads, through the environment variables
    it reads when its runtime starts (``tasks.lib.tf_loader`` starts it as it imports TensorFlow,
    after which ``tf.config.threading`` can no longer change them). 0 keeps what the environment
    already says, else TensorFlow's default, one per core."""
    pools = (("intra-op", "TF_NUM_INTRAOP_THREADS", intra_op), ("inter-op", "TF_NUM_INTEROP_THREADS", inter_op))
    if "tensorflow" in sys.modules and (intra_op or inter_op):
        raise SystemExit("--threads/--inter-op-threads: TensorFlow is already loaded, its thread pools are fixed")
    for _, variable, threads in pools:
        if threads:
            os.environ[variable] = str(threads)
    default = f"default ({os.cpu_count()} cores)"
    return "TensorFlow threads: " + ", ".join(f"{name} {os.environ.get(variable) or default}"
                                              for name, variable, _ in pools)


def build_runners(args: argparse.Namespace, model: ModelParams, train: TrainParams, images: np.ndarray,
                  labels: np.ndarray, decay_steps: int, steps: int) -> dict[str, Callable[[], float]]:
    """Set up (and warm up) every row; print the peak RSS after each."""
    runners: dict[str, Callable[[], float]] = {}
    runners["keras fit"] = keras_runner(model, train, images, labels, decay_steps, args.epochs)
    print(f"peak RSS after Keras set-up {peak_rss_mib():.0f} MiB")
    runners["ours"] = trainer_runner(model, train, images, labels, decay_steps, steps, train.steps_per_call)
    print(f"peak RSS after Trainer set-up {peak_rss_mib():.0f} MiB")
    for revision, trainer_class in args.baseline_classes.items():
        runners[f"ours @ {revision}"] = trainer_runner(model, train, images, labels, decay_steps, steps,
                                                       train.steps_per_call, trainer_class)
    if not args.no_per_step:
        runners["ours, 1 step/call"] = trainer_runner(model, train, images, labels, decay_steps, steps, 1)
    if not args.no_jax and (runner := jax_runner(model, train, images, labels, decay_steps, steps)):
        runners["jax scan"] = runner
    print(f"peak RSS after all set-ups {peak_rss_mib():.0f} MiB")
    return runners


def paired_ratio(rates: dict[str, list[float]], name: str, other: str) -> float:
    """Median over rounds of ``name`` / ``other`` in the same round: robust to load that moves between rounds."""
    return statistics.median(mine / theirs for mine, theirs in zip(rates[name], rates[other]))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=8, help="timed repetitions of each measurement")
    parser.add_argument("--epochs", type=int, default=1, help="epochs (of 550 steps) per timed measurement")
    parser.add_argument("--threads", type=int, default=0,
                        help="intra-op threads; 0 = $TF_NUM_INTRAOP_THREADS, else TF default")
    parser.add_argument("--inter-op-threads", type=int, default=0,
                        help="inter-op threads; 0 = $TF_NUM_INTEROP_THREADS, else TF default")
    parser.add_argument("--no-per-step", action="store_true", help="skip the 1-step-per-call context row")
    parser.add_argument("--no-jax", action="store_true", help="skip the JAX peer row")
    parser.add_argument("--baseline", action="append", default=[], metavar="REV",
                        help="add the Trainer as it was at git revision REV as a row (repeatable)")
    parser.add_argument("--params", type=Path, default=ROOT / "params.yaml")
    parser.add_argument("--raw-data", type=Path, help="IDX files to train on; default: paths.raw_data of --params")
    args = parser.parse_args(argv)

    print(machine())
    print(configure_threads(args.threads, args.inter_op_threads))
    from tasks.lib.tf_loader import tf  # after the thread pools are sized; its start-up chatter stays out

    print(f"TF {tf.__version__}, TF_ENABLE_ONEDNN_OPTS={os.environ.get('TF_ENABLE_ONEDNN_OPTS', 'unset (on)')}")
    params = load_params(args.params)
    model, train = params.model, params.train
    images, labels = load_training(args.raw_data or ROOT / params.paths.raw_data, params.data.validation_size)
    decay_steps = decay_steps_for(train, len(labels))
    steps = args.epochs * (len(labels) // train.batch_size)
    print(f"{len(labels)} training examples, batch {train.batch_size}, {steps} timed steps per round, "
          f"{args.rounds} rounds; peak RSS after loading data {peak_rss_mib():.0f} MiB")

    with tempfile.TemporaryDirectory() as scratch:  # the --baseline trainers' sources
        # Before any set-up: a revision git does not know fails at once.
        args.baseline_classes = {revision: trainer_at(revision, Path(scratch)) for revision in args.baseline}
        runners = build_runners(args, model, train, images, labels, decay_steps, steps)
    rates: dict[str, list[float]] = {name: [] for name in runners}
    names = list(runners)
    for round_ in range(args.rounds):
        for name in names[round_ % len(names):] + names[: round_ % len(names)]:  # rotate the order
            rates[name].append(runners[name]())
        print(f"  round {round_ + 1}: " + " | ".join(f"{name} {rates[name][-1]:.1f}" for name in names), flush=True)

    width = max(18, *(len(name) for name in rates))
    print(f"\n{'':<{width}} {'best':>8} {'median':>8}  steps/s")
    for name, values in rates.items():
        print(f"{name:<{width}} {max(values):8.1f} {statistics.median(values):8.1f}")
    print(f"peak RSS {peak_rss_mib():.0f} MiB (whole process: data, Keras and every trainer)")
    print(f"ours / keras fit: median of per-round ratios {paired_ratio(rates, 'ours', 'keras fit'):.2f}")
    for other in ("jax scan", *(f"ours @ {revision}" for revision in args.baseline)):
        if other in rates:
            print(f"ours / {other}: best / best {max(rates['ours']) / max(rates[other]):.2f}, "
                  f"median of per-round ratios {paired_ratio(rates, 'ours', other):.2f}")
    print(f"ratio_vs_keras_fit={max(rates['ours']) / max(rates['keras fit']):.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
