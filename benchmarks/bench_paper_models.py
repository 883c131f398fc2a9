"""The paper's training-time study, measured here: seconds per step of plain SGD training and of
recording HyDRA's approximate hypergradients, for LeNet-5, DenseNet-40 and MobileNetV2, with 400,
2,000 and 10,000 tracked samples, side by side in one run.

Each configuration trains `--steps` steps on synthetic data of the model's input shape (MNIST
shape for LeNet-5, CIFAR shape for the others) after one warm-up step, plain (forward, backward,
`optimizer.step()`) and through `HydraRecorder` (per-sample gradients, the lazy recurrence, the
store), one step of each in turn so that a shared machine's load moves both alike; the medians
per step are printed with their ratio, the training samples per second, and
a CIFAR-10 epoch (50,000 samples) extrapolated from them, and the paper's measure: the time of a
step divided by the number of tracked samples and of parameters. The training phase is timed; a
tracked state larger than the memory budget is recorded in partitions after training, which is
not timed here (docs/scaling.md measures it).

    .venv/bin/python benchmarks/bench_paper_models.py --steps 5
    .venv/bin/python benchmarks/bench_paper_models.py --models lenet5 --tracked 400,2000,10000
    .venv/bin/python benchmarks/bench_paper_models.py --device cuda --tracked 400,2000
    .venv/bin/python benchmarks/bench_paper_models.py --device cuda --device-memory-budget 1MiB

By default every sample of a batch is tracked (the tracked samples are the first ones, drawn in
order): the most a step can cost. `--train-size 50000` is the paper's setting instead: the
tracked samples drawn at random from a CIFAR-sized training set, and each batch a random draw
from it without replacement, so that a batch of 64 holds 64 x tracked / 50,000 tracked samples
on average (0.5 for 400). A model with BatchNorm or dropout takes per-sample gradients of its
tracked slots only (core/gradients.py `slot_gradients`), so its recording costs about 1 + that
many backward passes a step; the `tracked/batch` column prints the mean of the timed steps.

    .venv/bin/python benchmarks/bench_paper_models.py --models densenet40 --train-size 50000

`--memory-budget 1GiB` times the training phase of a partitioned recording (a state larger than
the budget): each step stores its weights, and a BatchNorm or dropout model fingerprints every
slot by one forward-mode pass. With `--tracked 400` and `--train-size` 50000, 10000 and 2000 a
batch draws as many tracked samples on average as with 400, 2,000 and 10,000 of 50,000, within
this machine's disk (the store of MobileNetV2 with 2,000 tracked samples needs 18 GB).

`--device-memory-budget` (with --device cuda) caps the GPU memory the tracked state may take:
a state over it stays in host memory, each step's batch rows staged to the GPU and back
(core/host_staged_state.py), which is what a state larger than the GPU costs.

With `--device cuda` the models, the data and the tracked state are on the GPU (where the
state's planned partitions fit: the plan is made against host memory, docs/scaling.md), and
every timer starts and stops after `torch.cuda.synchronize()`, so that a step's queued kernels
are counted in the step that queued them.
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
from hydra_store.recording.memory import parse_size
from hydra_store.recording.recorder import HydraRecorder

SHAPES = {"lenet5": "channels=1,size=28", "densenet40": "channels=3,size=32"}
SHAPES["mobilenetv2"] = "channels=3,size=32"
CIFAR_EPOCH = 50_000


def per_step(seconds: list[float]) -> float:
    return statistics.median(seconds[1:]) if len(seconds) > 1 else seconds[0]


def synchronize(device: torch.device) -> None:
    """Wait for the kernels queued on a GPU (a no-op on the CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def plain_step(model: torch.nn.Module, optimizer, x, y) -> float:
    synchronize(x.device)
    start = time.perf_counter()
    optimizer.zero_grad()
    torch.nn.functional.cross_entropy(model(x), y).backward()
    optimizer.step()
    synchronize(x.device)
    return time.perf_counter() - start


def interleaved_steps(
    name: str,
    shape,
    x,
    y,
    tracked: int,
    batch: int,
    steps: int,
    store: Path,
    device_memory_budget: int | None = None,
    train_size: int | None = None,
    memory_budget: int | None = None,
):
    """Per-step seconds of plain training and of recording, one step of each in turn (so that
    the machine's load moves both alike), where the tracked state lives, and the mean number of
    tracked samples in a batch. With `train_size`, the tracked samples and each batch's
    training-set indices are drawn at random from that many (the inputs are `x`'s, in turn)."""
    plain_model = build_model(name, input_shape=shape, n_classes=10).to(x.device)
    plain_optimizer = torch.optim.SGD(plain_model.parameters(), lr=0.01, momentum=0.9)
    model = build_model(name, input_shape=shape, n_classes=10).to(x.device)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    n_train = train_size or x.shape[0]
    generator = torch.Generator().manual_seed(0)
    chosen = (
        torch.randperm(n_train, generator=generator)[:tracked].sort().values
        if train_size
        else torch.arange(tracked)
    )
    recorder = HydraRecorder(
        model,
        optimizer,
        store,
        n_train=n_train,
        tracked=chosen,
        planned_steps=steps + 1,
        planned_epochs=1,
        planned_checkpoints=2,
        device_memory_budget=device_memory_budget,
        memory_budget=memory_budget,
    )
    plan = recorder.plan
    plain, recorded, in_batch = [], [], []
    is_tracked = torch.zeros(n_train, dtype=torch.bool)
    is_tracked[chosen] = True
    try:
        for k in range(steps + 1):
            position = torch.arange(k * batch, (k + 1) * batch) % x.shape[0]
            index = torch.randperm(n_train, generator=generator)[:batch] if train_size else position
            in_batch.append(int(is_tracked[index].sum()))
            on_device = position.to(x.device)
            plain.append(plain_step(plain_model, plain_optimizer, x[on_device], y[on_device]))
            synchronize(x.device)
            start = time.perf_counter()
            recorder.step(x[on_device], y[on_device], index)
            synchronize(x.device)
            recorded.append(time.perf_counter() - start)
    finally:
        recorder.fail("benchmark: the training phase only")
    if plan is not None and plan.partitioned:
        where = f"{plan.n_partitions} partitions"
    elif plan is not None and plan.location == "host":
        where = "host memory, staged"
    else:
        where = "memory"
    return plain, recorded, where, statistics.mean(in_batch[1:] or in_batch)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default="lenet5,densenet40,mobilenetv2")
    parser.add_argument("--tracked", default="400,2000,10000")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--device-memory-budget", default=None)
    parser.add_argument(
        "--train-size",
        type=int,
        default=None,
        help="draw the tracked samples and the batches at random from this many training "
        "samples (the paper's CIFAR-10: 50000); default: every sample of a batch tracked",
    )
    parser.add_argument(
        "--memory-budget",
        default=None,
        help="the tracked state's memory budget (e.g. 1GiB); a state over it is recorded in "
        "partitions after training, and training stores each step's weights and fingerprints",
    )
    args = parser.parse_args()
    if args.device_memory_budget is not None and args.device != "cuda":
        parser.error("--device-memory-budget is the GPU's budget: give it with --device cuda")
    if args.train_size is not None and args.train_size < max(
        int(c) for c in args.tracked.split(",")
    ):
        parser.error("--train-size must be at least the largest --tracked count")
    device_budget = (
        None if args.device_memory_budget is None else parse_size(args.device_memory_budget)
    )
    budget = None if args.memory_budget is None else parse_size(args.memory_budget)
    counts = [int(c) for c in args.tracked.split(",")]
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA GPU is visible to torch on this machine")
    if device.type == "cuda":  # full float32, as the commands compute (docs/recording.md)
        torch.backends.cudnn.allow_tf32 = False
        torch.backends.cuda.matmul.allow_tf32 = False
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {where}")
    print(
        f"{'model':<12} {'params':>10} {'tracked':>8} {'state':>10} {'plain s/step':>13} "
        f"{'record s/step':>14} {'ratio':>6} {'samples/s':>10} {'CIFAR epoch plain/record':>25} "
        f"{'ns/(tracked x param)':>21} {'tracked/batch':>14}"
    )
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models.split(","):
            data = load_dataset(f"synthetic:n={max(counts)},{SHAPES[name]},test=10", seed=0)
            x, y = data.train.inputs.to(device), data.train.targets.to(device)
            model = build_model(name, input_shape=data.input_shape, n_classes=10)
            params = sum(p.numel() for p in model.parameters())
            for tracked in counts:
                store = Path(tmp) / f"{name}-{tracked}.zarr"
                plain_times, times, where, per_batch = interleaved_steps(
                    name,
                    data.input_shape,
                    x,
                    y,
                    tracked,
                    args.batch_size,
                    args.steps,
                    store,
                    device_budget,
                    args.train_size,
                    budget,
                )
                if device.type == "cuda":
                    # Free the blocks this configuration cached: the next recorder's default
                    # GPU budget is 70% of what torch.cuda.mem_get_info reports free.
                    torch.cuda.empty_cache()
                plain, record = per_step(plain_times), per_step(times)
                state = tracked * params * 4 * 2 / 2**30
                epoch = CIFAR_EPOCH / args.batch_size * record
                print(
                    f"{name:<12} {params:>10,} {tracked:>8,} {state:>7.2f} GiB {plain:>13.3f} "
                    f"{record:>14.3f} {record / plain:>6.2f} {args.batch_size / record:>10.1f} "
                    f"{CIFAR_EPOCH / args.batch_size * plain / 60:>9.1f} / {epoch / 60:>7.1f} min "
                    f"{1e9 * record / (tracked * params):>21.4f} {per_batch:>14.1f}  ({where})"
                )


if __name__ == "__main__":
    main()
