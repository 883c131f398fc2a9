"""The cost of durable points (what `record --resume` continues from): one run recorded without
any, with the default policy (`--durable-seconds 120`), with one every `--seconds` seconds, and
with one at the end of every epoch, alternated, side by side (median of `--repeats`), with the
cost of one durable point in seconds and bytes. Wall-clock and CPU time (all the process's
threads): on a shared machine the CPU time is the steadier of the two.

    .venv/bin/python benchmarks/bench_resume.py --dataset digits --model mlp --epochs 20
    .venv/bin/python benchmarks/bench_resume.py --dataset synthetic:n=5000,size=28 \\
        --model lenet5 --epochs 2
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import statistics
import tempfile
import time
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", default="digits")
    parser.add_argument("--model", default="mlp")
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--track", default="all")
    parser.add_argument("--seconds", type=float, default=10.0, help="the time-based variant")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    from hydra_store.arguments import RecordConfig
    from hydra_store.recording import training
    from hydra_store.recording.training import record_run
    from hydra_store.store.location import tree_bytes

    original = training._EpochLoop.run_epoch
    on_disk: list[int] = []

    def every_epoch(self, epoch, start_step=0, order=None):
        original(self, epoch, start_step, order)
        self._durable_point(epoch + 1, 0, None)
        slot = self.recorder.store.group.attrs["durable_point"]["slot"]
        on_disk.append(tree_bytes(self.recorder.path / "resume" / f"slot-{slot}"))

    variants = {
        "none": math.inf,
        "default (120 s)": RecordConfig().durable_seconds,
        f"every {args.seconds:g} s": args.seconds,
        "every epoch": math.inf,
    }
    timings: dict[str, list[float]] = {name: [] for name in variants}
    cpu: dict[str, list[float]] = {name: [] for name in variants}
    points: dict[str, list[int]] = {name: [] for name in variants}
    costs: list[training.DurableCost] = []
    with tempfile.TemporaryDirectory() as scratch:
        # A first run loads the data and compiles the kernels: not timed.
        warm = RecordConfig(
            dataset=args.dataset, model=args.model, epochs=1, track="10", out=f"{scratch}/w.zarr"
        )
        record_run(warm)
        for repeat in range(args.repeats):
            for name, seconds in variants.items():
                training._EpochLoop.run_epoch = every_epoch if name == "every epoch" else original
                out = str(Path(scratch) / f"run-{repeat}.zarr")
                config = RecordConfig(
                    dataset=args.dataset,
                    model=args.model,
                    epochs=args.epochs,
                    track=args.track,
                    out=out,
                    overwrite=True,
                )
                config = dataclasses.replace(config, durable_seconds=seconds)
                started, started_cpu = time.perf_counter(), time.process_time()
                summary = record_run(config)
                timings[name].append(time.perf_counter() - started)
                cpu[name].append(time.process_time() - started_cpu)
                points[name].append(len(summary.durable_points))
                if name == "every epoch":
                    costs.extend(summary.durable_points)
    training._EpochLoop.run_epoch = original
    print(
        f"{args.dataset}/{args.model}, {args.epochs} epochs, track {args.track}, median of "
        f"{args.repeats}"
    )
    none = statistics.median(timings["none"])
    none_cpu = statistics.median(cpu["none"])
    print(f"{'':<18} {'wall':>10} {'ratio':>7}   {'CPU':>10} {'ratio':>7}   durable points")
    for name in variants:
        took, used = statistics.median(timings[name]), statistics.median(cpu[name])
        count = statistics.median(points[name])
        print(
            f"{name:<18} {took:8.2f} s {took / none:7.3f}   {used:8.2f} s {used / none_cpu:7.3f}"
            f"   {count:g}"
        )
    seconds = statistics.median(c.seconds for c in costs)
    state = statistics.median(c.bytes for c in costs)
    print(
        f"one durable point: {seconds:.3f} s (median of {len(costs)}), {state / 2**20:.1f} MiB "
        f"uncompressed, {statistics.median(on_disk) / 2**20:.1f} MiB on disk"
    )


if __name__ == "__main__":
    main()
