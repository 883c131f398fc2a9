"""Projected recording against plain training, side by side (docs/scaling.md, "Sketched
per-sample gradients").

LeNet-5 on synthetic 28x28 data, batches of 64, SGD with momentum, every sample tracked,
through `HydraRecorder` in this process (the loop `record` runs, without its data set-up and
test evaluation), four ways:

  plain        mode "trajectory" (what `record --trajectory-only` does: one backward pass)
  count-sketch --project-dim K as recorded before tensor sketches: full per-sample gradients
               (torch.func), then a CountSketch
  full path    the tensor sketch, but through full per-sample gradients (sketch_gradients=False)
  sketched     the tensor sketch from one backward pass (what `record --project-dim K` does)

Two measurements:

  epochs       one epoch each, --repeats times, the kinds taking turns so that a busy spell of
               the shared machine hits them alike: medians of wall and CPU seconds (this
               process, all threads) of the steps, the fastest run of each, and the steps with
               `finish` (the hypergradients written), each against plain training.
  steps        the four recorders side by side in one epoch, each step taken by all four on
               the same batch in turn: the median step time of each (the least disturbed
               comparison on a shared machine).

    python benchmarks/bench_projection.py                  # 20,000 samples, K = 1,024, 3 repeats
    python benchmarks/bench_projection.py --quick          # 2,000 samples, 1 repeat
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch

from hydra_store.core.projection import CountSketchProjector
from hydra_store.core.sketched_gradients import tensor_sketch_projector
from hydra_store.data.datasets import load_dataset
from hydra_store.data.models import build_model
from hydra_store.recording.recorder import HydraRecorder

KINDS = ("plain", "count-sketch", "full path", "sketched")
BATCH = 64


def recorder(kind: str, folder: str, n: int, width: int) -> HydraRecorder:
    """A fresh LeNet-5 (the same initial weights every time) and its recorder."""
    model = build_model("lenet5", input_shape=(1, 28, 28), n_classes=10, seed=0)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)
    options: dict = {"mode": "trajectory" if kind == "plain" else "approximate"}
    if kind == "count-sketch":
        n_params = sum(p.numel() for p in model.parameters())
        options["projector"] = CountSketchProjector(n_params, width, seed=0)
    elif kind in ("full path", "sketched"):
        options["projector"] = tensor_sketch_projector(model, width, seed=0)
        options["sketch_gradients"] = kind == "sketched"
    path = Path(folder) / f"{kind.replace(' ', '-')}.zarr"
    return HydraRecorder(model, optimizer, path, n_train=n, flush_seconds=600, **options)


def batches(n: int) -> list[torch.Tensor]:
    order = torch.randperm(n, generator=torch.Generator().manual_seed(0))
    return [order[start : start + BATCH] for start in range(0, n, BATCH)]


def epoch_seconds(
    kind: str, inputs: torch.Tensor, targets: torch.Tensor, width: int
) -> tuple[float, float, float]:
    """Wall and CPU seconds of one recorded epoch's steps (the store is created before the
    clocks start), and wall seconds of the steps and `finish`."""
    with tempfile.TemporaryDirectory() as folder:
        rec = recorder(kind, folder, len(targets), width)
        with rec:
            tick, cpu = time.perf_counter(), time.process_time()
            for index in batches(len(targets)):
                rec.step(inputs[index], targets[index], index)
            steps = time.perf_counter() - tick, time.process_time() - cpu
            rec.end_epoch()
            rec.finish()
            whole = time.perf_counter() - tick
    return (*steps, whole)


def measure_epochs(inputs: torch.Tensor, targets: torch.Tensor, width: int, repeats: int) -> None:
    for kind in KINDS:  # warm-up: numba's kernels, torch.func's first traces
        epoch_seconds(kind, inputs[:640], targets[:640], width)
    wall: dict[str, list[float]] = {kind: [] for kind in KINDS}
    cpu: dict[str, list[float]] = {kind: [] for kind in KINDS}
    whole: dict[str, list[float]] = {kind: [] for kind in KINDS}
    for _ in range(repeats):
        for kind in KINDS:
            seconds = epoch_seconds(kind, inputs, targets, width)
            wall[kind].append(seconds[0])
            cpu[kind].append(seconds[1])
            whole[kind].append(seconds[2])
    n = len(targets)
    print(f"epochs (median of {repeats}):")
    base = {
        "wall": statistics.median(wall["plain"]),
        "cpu": statistics.median(cpu["plain"]),
        "fastest": min(wall["plain"]),
        "whole": statistics.median(whole["plain"]),
    }
    for kind in KINDS:
        median, median_cpu = statistics.median(wall[kind]), statistics.median(cpu[kind])
        fastest, finished = min(wall[kind]), statistics.median(whole[kind])
        runs = ", ".join(f"{s:.2f}" for s in wall[kind])
        print(
            f"  {kind:<13} steps {median:6.2f} s {median / base['wall']:5.2f}x "
            f"({n / median:,.0f} samples/s); CPU {median_cpu:6.2f} s "
            f"{median_cpu / base['cpu']:5.2f}x; fastest {fastest:6.2f} s "
            f"{fastest / base['fastest']:5.2f}x; with finish {finished:6.2f} s "
            f"{finished / base['whole']:5.2f}x   (steps of each run: {runs} s)"
        )


def measure_steps(inputs: torch.Tensor, targets: torch.Tensor, width: int) -> None:
    seconds: dict[str, list[float]] = {kind: [] for kind in KINDS}
    with tempfile.TemporaryDirectory() as folder:
        recorders = {kind: recorder(kind, folder, len(targets), width) for kind in KINDS}
        for k, index in enumerate(batches(len(targets))):
            for kind, rec in recorders.items():
                tick = time.perf_counter()
                rec.step(inputs[index], targets[index], index)
                if k >= 10:  # the first steps warm up (and check the hooks once)
                    seconds[kind].append(time.perf_counter() - tick)
        for rec in recorders.values():
            rec.fail("benchmark: nothing to keep")
    plain = statistics.median(seconds["plain"])
    print(f"steps, interleaved (median of {len(seconds['plain'])} steps):")
    for kind in KINDS:
        median = statistics.median(seconds[kind])
        print(f"  {kind:<13} {median * 1e3:6.2f} ms a step  {median / plain:5.2f}x plain")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--samples", type=int, default=20_000)
    parser.add_argument("--project-dim", type=int, default=1024)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="2,000 samples, one repeat")
    args = parser.parse_args()
    samples, repeats = (2_000, 1) if args.quick else (args.samples, args.repeats)
    bundle = load_dataset(f"synthetic:n={samples},size=28", seed=0)
    inputs, targets = bundle.train.inputs, bundle.train.targets
    print(
        f"LeNet-5 (61,706 parameters), synthetic 28x28, {len(targets):,} samples, 1 epoch, "
        f"batch {BATCH}, K = {args.project_dim}, {torch.get_num_threads()} torch threads"
    )
    measure_epochs(inputs, targets, args.project_dim, repeats)
    measure_steps(inputs, targets, args.project_dim)


if __name__ == "__main__":
    main()
