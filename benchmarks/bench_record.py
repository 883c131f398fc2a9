"""Recording cost, measured side by side in one run (issue: "Record HyDRA hypergradients").

1. Throughput on the same model, data and batch size: plain training (loss.backward +
   SGD.step), training from per-sample gradients only, and `record` with every sample tracked.
2. Per-step time of the lazy approximate update against the dense one (every tracked row
   touched every step) as the number of tracked samples grows.

    python benchmarks/bench_record.py                 # defaults: a few minutes on 2 cores
    python benchmarks/bench_record.py --quick         # smaller, for a smoke run

Figures are medians over repeats; the machine is shared and noisy, so read the ratios.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from hydra_store.core.gradients import PerSampleGradients, per_sample_loss
from hydra_store.core.hypergradient import ApproximateHypergradient, TrackedSelection
from hydra_store.core.parameters import ParameterLayout
from hydra_store.core.sgd import SGDSettings, read_sgd_settings, sgd_step
from hydra_store.core.state import InMemoryTrackedState
from hydra_store.data.datasets import load_dataset
from hydra_store.data.models import build_model
from hydra_store.recording.recorder import HydraRecorder


def batches(n: int, batch_size: int, seed: int):
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    return [order[s : s + batch_size] for s in range(0, n, batch_size)]


def epoch_seconds(kind: str, spec: str, model_spec: str, batch_size: int, seed: int) -> float:
    bundle = load_dataset(spec, seed=0)
    x, y = bundle.train.inputs, bundle.train.targets
    n = len(y)
    model = build_model(model_spec, input_shape=bundle.input_shape, n_classes=10, seed=seed)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=2e-5)
    layout = ParameterLayout.from_model(model)
    with tempfile.TemporaryDirectory() as tmp:
        recorder = per_sample = None
        if kind == "record":
            recorder = HydraRecorder(model, optimizer, Path(tmp) / "r.zarr", n_train=n)
        elif kind == "per-sample":
            per_sample = PerSampleGradients(model, layout)
        tick = time.perf_counter()
        for index in batches(n, batch_size, seed):
            if kind == "plain":
                optimizer.zero_grad()
                per_sample_loss(model(x[index]), y[index]).mean().backward()
                optimizer.step()
            elif kind == "per-sample":
                read_sgd_settings(optimizer)
                _, grads = per_sample(x[index], y[index])
                sgd_step(model, optimizer, layout, grads)
            else:
                recorder.step(x[index], y[index], index)
        seconds = time.perf_counter() - tick
        if recorder is not None:
            tick = time.perf_counter()
            recorder.finish()
            write = time.perf_counter() - tick
            epoch_seconds.last_write = write
    return seconds


def throughput(spec: str, model_spec: str, batch_size: int, repeats: int) -> None:
    n = len(load_dataset(spec, seed=0).train.targets)
    print(f"\n== throughput: {spec}, {model_spec}, batch {batch_size}, {n} samples/epoch ==")
    results = {}
    for kind in ("plain", "per-sample", "record"):
        epoch_seconds(kind, spec, model_spec, batch_size, 99)  # warm-up
    times = {k: [] for k in ("plain", "per-sample", "record")}
    writes = []
    for r in range(repeats):
        for kind in times:  # interleaved, so drifts of the machine hit all three alike
            times[kind].append(epoch_seconds(kind, spec, model_spec, batch_size, r))
            if kind == "record":
                writes.append(epoch_seconds.last_write)
    for kind, values in times.items():
        results[kind] = n / statistics.median(values)
        print(f"  {kind:<11} {results[kind]:>10,.0f} samples/s  (median of {repeats} epochs)")
    print(f"  record / per-sample time ratio: {results['per-sample'] / results['record']:.2f}x")
    print(f"  record / plain time ratio:      {results['plain'] / results['record']:.2f}x")
    print(f"  final hypergradient write ({n} rows): median {statistics.median(writes):.2f} s")


def dense_step(state, rows_in_batch, grads, s: SGDSettings, scale: float):
    """The naive update: every tracked row, every step (O(N P))."""
    h, m = state.h, state.m
    m.mul_(s.momentum).add_(h, alpha=s.weight_decay)
    m.index_add_(0, rows_in_batch, grads, alpha=scale)
    h.add_(m, alpha=-s.lr)


def scaling(sizes: list[int], n_params: int, batch_size: int, steps: int) -> None:
    print(f"\n== per-step update time vs tracked samples (P = {n_params:,}, batch {batch_size}) ==")
    print(f"  {'tracked':>8} {'lazy ms':>9} {'dense ms':>9} {'dense/lazy':>10}")
    settings = SGDSettings(0.01, 0.9, 2e-5)
    rng = np.random.default_rng(0)
    grads = torch.randn(batch_size, n_params)
    for n in sizes:
        lazy_state = InMemoryTrackedState(n, n_params, has_momentum=True)
        lazy = ApproximateHypergradient(lazy_state, TrackedSelection(n, np.arange(n)))
        lazy_times = []
        order = rng.permutation(n)
        for k in range(steps):
            start = (k * batch_size) % max(1, n - batch_size)
            index = order[start : start + batch_size]
            tick = time.perf_counter()
            lazy.step(index, grads, settings)
            lazy_times.append(time.perf_counter() - tick)
        del lazy, lazy_state
        dense_state = InMemoryTrackedState(n, n_params, has_momentum=True)
        dense_times = []
        for k in range(max(3, steps // 4)):
            index = torch.from_numpy(
                order[(k * batch_size) % max(1, n - batch_size) :][:batch_size]
            )
            tick = time.perf_counter()
            dense_step(dense_state, index, grads, settings, n / batch_size)
            dense_times.append(time.perf_counter() - tick)
        del dense_state
        lazy_ms = 1e3 * statistics.median(lazy_times[2:])
        dense_ms = 1e3 * statistics.median(dense_times[1:])
        print(f"  {n:>8,} {lazy_ms:>9.2f} {dense_ms:>9.2f} {dense_ms / lazy_ms:>9.1f}x")


def update_kernels(n_params: int, rows: int, repeats: int = 20) -> None:
    """The three implementations of the batch-row update of the in-memory state, side by side."""
    print(
        f"\n== one batch-row update, {rows} rows, P = {n_params:,}, momentum (median of {repeats}) =="
    )
    state = InMemoryTrackedState(2_000, n_params, has_momentum=True)
    state.h.normal_()
    state.m.normal_()
    index = torch.randperm(2_000)[:rows]
    transition = torch.randn(rows, 2, 2, dtype=torch.float64)
    injection = torch.randn(rows, 2, dtype=torch.float64)
    grads = torch.randn(rows, n_params)
    timings = {}
    for name in ("_update_fused", "_update_rowwise", "_update_block"):
        update = getattr(state, name)
        update(index, transition, injection, grads)  # warm-up (and numba compilation)
        values = []
        for _ in range(repeats):
            tick = time.perf_counter()
            update(index, transition, injection, grads)
            values.append(time.perf_counter() - tick)
        timings[name] = 1e3 * statistics.median(values)
    fused = timings["_update_fused"]
    labels = {
        "_update_fused": "fused numba kernel (CPU default)",
        "_update_rowwise": "torch, in place per row view",
        "_update_block": "torch, index_select/index_copy_",
    }
    for name, ms in timings.items():
        print(f"  {labels[name]:<34} {ms:7.2f} ms  ({ms / fused:.1f}x fused)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="small sizes, for a smoke run")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    torch.manual_seed(0)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    if args.quick:
        update_kernels(61_706, 64, 5)
        throughput("digits", "mlp", 64, 3)
        scaling([1_000, 5_000], 4_970, 64, 10)
        return
    update_kernels(61_706, 64)
    throughput("digits", "mlp", 64, args.repeats)
    throughput("synthetic:n=5000,size=28,test=100", "lenet5", 64, args.repeats)
    # An MLP on 12x12 synthetic images has 4,970 parameters: 50,000 tracked rows of h and m
    # take 2 GB, so the dense baseline fits in memory.
    scaling([1_000, 10_000, 50_000], 4_970, 64, 40)


if __name__ == "__main__":
    main()
