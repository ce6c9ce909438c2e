"""What stage `train` does between graph calls, against the graph calls themselves.

Checkpoints (``tasks.checkpoints.Checkpoints.save``: a ``tf.train.Checkpoint`` through
``tf.train.CheckpointManager``) and curve points (four metrics through DVCLive, then
``Live.next_step``, which rewrites ``metrics.json``) happen only between calls of
``Trainer.run_steps``, so they cannot slow the loop itself; this measures what they add to a
run. With the seed's network and params.yaml (real MNIST from ``data/raw``; random data of
the same shape, with a warning, when it is missing), alternating for ``--rounds`` rounds:

* ``graph call``: ``Trainer.run_steps`` of ``train.steps_per_call`` steps (batch order included);
* ``checkpoint``: one save, with a curve of ``train.steps / train.eval_every`` points;
* ``curve point``: one point logged through DVCLive.

Printed: the median of each, then for one run of ``train.steps`` steps the seconds of the
graph calls, of ``steps / checkpoint_every`` saves and of ``steps / eval_every`` points, and
``boundary_share=<saves and points / graph calls>``. (The validation accuracy computed at each
curve point is the same as before and not counted.)

    python bench/train_boundaries.py [--rounds 8] [--params params.yaml] [--raw-data data/raw]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


from bench.train_speed import load_training  # noqa: E402  the same data, or the same random stand-in
from tasks.params import load_params  # noqa: E402
from tasks.train import BatchOrder, curve_point, decay_steps_for, log_point, open_live  # noqa: E402


def _timed(action: Callable[[], object]) -> float:
    started = time.perf_counter()
    action()
    return time.perf_counter() - started


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=8, help="timed repetitions of each measurement")
    parser.add_argument("--params", type=Path, default=ROOT / "params.yaml")
    parser.add_argument("--raw-data", type=Path, help="IDX files to train on; default: paths.raw_data of --params")
    args = parser.parse_args(argv)
    params = load_params(args.params)
    model, train = params.model, params.train
    images, labels = load_training(args.raw_data or ROOT / params.paths.raw_data, params.data.validation_size)

    from tasks.checkpoints import Checkpoints
    from tasks.trainer import Trainer

    trainer = Trainer(model, train, images, labels, decay_steps_for(train, len(labels)))
    order = BatchOrder(len(labels), train.batch_size, train.seed)
    points = max(1, train.steps // train.eval_every)
    curve = [curve_point(step, 0.1, 0.5, 0.9, 0.9) for step in range(1, points + 1)]
    with tempfile.TemporaryDirectory() as scratch:
        checkpoints = Checkpoints(Path(scratch) / "checkpoints", "0" * 16, train.keep_checkpoints)
        checkpoints.find(train.steps, trainer.state())
        with open_live(Path(scratch) / "reports", []) as live:
            def call() -> None:
                trainer.run_steps(order.batches(trainer.current_step(), train.steps_per_call))

            def point() -> None:
                log_point(live, curve_point(trainer.current_step() + 1, 0.1, 0.5, 0.9, 0.9))
                live.next_step()

            call(), checkpoints.save(trainer, curve, 1.0), point()  # warm-up: tracing, first writes
            times: dict[str, list[float]] = {"graph call": [], "checkpoint": [], "curve point": []}
            for _ in range(args.rounds):
                times["graph call"].append(_timed(call))
                times["checkpoint"].append(_timed(lambda: checkpoints.save(trainer, curve, 1.0)))
                times["curve point"].append(_timed(point))
    _report({name: statistics.median(values) for name, values in times.items()}, train, args.rounds)
    return 0


def _report(median: dict[str, float], train, rounds: int) -> None:
    print(f"machine: {os.cpu_count()} CPUs; {rounds} rounds; medians")
    for name, seconds in median.items():
        print(f"{name:<12} {1000 * seconds:9.2f} ms")
    loop = train.steps / train.steps_per_call * median["graph call"]
    saves = train.steps / train.checkpoint_every * median["checkpoint"]
    points = train.steps / train.eval_every * median["curve point"]
    print(f"one run of {train.steps} steps: graph calls {loop:.2f} s, {train.steps // train.checkpoint_every} "
          f"checkpoints {saves:.3f} s, {train.steps // train.eval_every} curve points {points:.3f} s")
    print(f"boundary_share={(saves + points) / loop:.4f}")


if __name__ == "__main__":
    sys.exit(main())
