"""The paper's training-time study, measured here: seconds per step of plain SGD training and of
recording HyDRA's approximate hypergradients, for LeNet-5, DenseNet-40 and MobileNetV2, with 400,
2,000 and 10,000 tracked samples, side by side in one run.

Each configuration trains `--steps` steps on synthetic data of the model's input shape (MNIST
shape for LeNet-5, CIFAR shape for the others) after one warm-up step, plain (forward, backward,
`optimizer.step()`) and through `HydraRecorder` (per-sample gradients, the lazy recurrence, the
store); the medians per step are printed with their ratio, the training samples per second, and
a CIFAR-10 epoch (50,000 samples) extrapolated from them. The training phase is timed; a
tracked state larger than the memory budget is recorded in partitions after training, which is
not timed here (docs/scaling.md measures it).

    .venv/bin/python benchmarks/bench_paper_models.py --steps 5
    .venv/bin/python benchmarks/bench_paper_models.py --models lenet5 --tracked 400,2000,10000
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch

from hydra_store.data.datasets import load_dataset
from hydra_store.data.models import build_model
from hydra_store.recording.recorder import HydraRecorder

SHAPES = {"lenet5": "channels=1,size=28", "densenet40": "channels=3,size=32"}
SHAPES["mobilenetv2"] = "channels=3,size=32"
CIFAR_EPOCH = 50_000


def per_step(seconds: list[float]) -> float:
    return statistics.median(seconds[1:]) if len(seconds) > 1 else seconds[0]


def plain_steps(model: torch.nn.Module, x, y, batch: int, steps: int) -> list[float]:
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    times = []
    for k in range(steps + 1):
        index = torch.arange(k * batch, (k + 1) * batch) % x.shape[0]
        start = time.perf_counter()
        optimizer.zero_grad()
        torch.nn.functional.cross_entropy(model(x[index]), y[index]).backward()
        optimizer.step()
        times.append(time.perf_counter() - start)
    return times


def recorded_steps(model, x, y, tracked: int, batch: int, steps: int, store: Path):
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    recorder = HydraRecorder(
        model,
        optimizer,
        store,
        n_train=x.shape[0],
        tracked=range(tracked),
        planned_steps=steps + 1,
        planned_epochs=1,
        planned_checkpoints=2,
    )
    plan = recorder.plan
    times = []
    try:
        for k in range(steps + 1):
            index = torch.arange(k * batch, (k + 1) * batch) % x.shape[0]
            start = time.perf_counter()
            recorder.step(x[index], y[index], index)
            times.append(time.perf_counter() - start)
    finally:
        recorder.fail("benchmark: the training phase only")
    where = (
        "memory" if plan is None or plan.n_partitions == 1 else f"{plan.n_partitions} partitions"
    )
    return times, where


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default="lenet5,densenet40,mobilenetv2")
    parser.add_argument("--tracked", default="400,2000,10000")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=64)
    args = parser.parse_args()
    counts = [int(c) for c in args.tracked.split(",")]
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, CPU")
    print(
        f"{'model':<12} {'params':>10} {'tracked':>8} {'state':>10} {'plain s/step':>13} "
        f"{'record s/step':>14} {'ratio':>6} {'samples/s':>10} {'CIFAR epoch':>12}"
    )
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models.split(","):
            data = load_dataset(f"synthetic:n={max(counts)},{SHAPES[name]},test=10", seed=0)
            x, y = data.train.inputs, data.train.targets
            model = build_model(name, input_shape=data.input_shape, n_classes=10)
            params = sum(p.numel() for p in model.parameters())
            plain = per_step(plain_steps(model, x, y, args.batch_size, args.steps))
            for tracked in counts:
                model = build_model(name, input_shape=data.input_shape, n_classes=10)
                store = Path(tmp) / f"{name}-{tracked}.zarr"
                times, where = recorded_steps(
                    model, x, y, tracked, args.batch_size, args.steps, store
                )
                record = per_step(times)
                state = tracked * params * 4 * 2 / 2**30
                epoch = CIFAR_EPOCH / args.batch_size * record
                print(
                    f"{name:<12} {params:>10,} {tracked:>8,} {state:>7.2f} GiB {plain:>13.3f} "
                    f"{record:>14.3f} {record / plain:>6.2f} {args.batch_size / record:>10.1f} "
                    f"{epoch / 60:>9.1f} min  ({where})"
                )


if __name__ == "__main__":
    main()
