"""Reverse-mode exact contributions against the forward exact mode and plain training, on one
model and trajectory; then the approximation study (paper Figures 4/5) and leave-one-out
validation. Each timed phase runs in a fresh process so its peak memory (ru_maxrss) is its own.

    .venv/bin/python benchmarks/bench_reverse.py --epochs 20 --track 100 --validate 50
"""

from __future__ import annotations

import argparse
import multiprocessing
import resource
import tempfile
import time
from pathlib import Path


def _config(args, out: Path, mode: str, track: str):
    from hydra_store.arguments import RecordConfig

    return RecordConfig(
        dataset=args.dataset,
        model=args.model,
        epochs=args.epochs,
        batch_size=args.batch_size,
        lr=args.lr,
        lr_step_epochs=args.lr_step_epochs,
        track=track,
        mode=mode,
        out=str(out),
        overwrite=True,
    )


def _peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def phase_record(args, out: Path, mode: str, track: str) -> dict:
    from hydra_store.recording.training import record_run

    summary = record_run(_config(args, out, mode, track))
    return {
        "seconds": summary.training_seconds,
        "total_seconds": summary.seconds,
        "peak_mb": _peak_mb(),
        "n_train": summary.n_train,
        "n_params": summary.n_params,
        "test_accuracy": summary.epochs[-1].test_accuracy,
    }


def phase_reverse(out: Path) -> dict:
    from hydra_store.analysis.reverse import run_exact_analysis

    # The first call in a process also pays torch.func's one-off start-up (its lazy imports,
    # seconds); the second is what every further analysis costs.
    tick = time.perf_counter()
    run_exact_analysis(out, "test")
    cold = time.perf_counter() - tick
    tick = time.perf_counter()
    summary = run_exact_analysis(out, "test")
    return {
        "seconds": time.perf_counter() - tick,
        "cold_seconds": cold,
        "peak_mb": _peak_mb(),
        "n": summary.n_train,
    }


def phase_idle() -> dict:
    """Baseline memory of a process that imported everything and loaded the store's data."""
    import hydra_store.reverse
    import hydra_store.training  # noqa: F401

    return {"peak_mb": _peak_mb()}


def in_child(fn, *a):
    with multiprocessing.get_context("spawn").Pool(1) as pool:
        return pool.apply(fn, a)


def memory_study(root: Path, sizes: list[int]) -> None:
    """Peak memory of the reverse sweep as N grows (same model, same number of steps)."""
    from types import SimpleNamespace

    print("\n== reverse-mode peak memory vs N (synthetic 12x12, mlp, 640 steps) ==")
    print(f"  {'N':>7} {'plain training MB':>18} {'reverse MB':>11} {'reverse s':>10}")
    for n in sizes:
        args = SimpleNamespace(
            dataset=f"synthetic:n={n},size=12,test=200",
            model="mlp",
            epochs=max(1, 640 * 64 // n),
            batch_size=64,
            lr=0.05,
            lr_step_epochs=1000,
        )
        store = root / f"memory-{n}.zarr"
        plain = in_child(phase_record, args, store, "trajectory", "all")
        reverse = in_child(phase_reverse, store)
        print(
            f"  {n:>7,} {plain['peak_mb']:>18.0f} {reverse['peak_mb']:>11.0f} "
            f"{reverse['seconds']:>10.1f}"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--dataset", default="digits")
    parser.add_argument("--model", default="mlp")
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=0.05)
    parser.add_argument("--lr-step-epochs", type=int, default=10)
    parser.add_argument("--track", type=int, default=100)
    parser.add_argument("--validate", type=int, default=50)
    parser.add_argument("--selection", default="random")
    parser.add_argument("--every", type=int, default=4, help="compare every k-th checkpoint")
    parser.add_argument("--out-dir", default=None)
    parser.add_argument(
        "--memory-sizes", default="5000,40000", help="N values of the memory study ('' to skip)"
    )
    args = parser.parse_args()
    root = Path(args.out_dir or tempfile.mkdtemp(prefix="bench-reverse-"))
    root.mkdir(parents=True, exist_ok=True)
    trajectory_store, exact_store = root / "trajectory.zarr", root / "exact.zarr"

    plain = in_child(phase_record, args, trajectory_store, "trajectory", "all")
    forward = in_child(phase_record, args, exact_store, "exact", str(args.track))
    reverse = in_child(phase_reverse, trajectory_store)
    idle = in_child(phase_idle)
    n, p = plain["n_train"], plain["n_params"]
    print(
        f"{args.dataset}, {args.model} ({p} parameters), N = {n}, {args.epochs} epochs, batch "
        f"{args.batch_size}, final test accuracy {plain['test_accuracy']:.3f}"
    )
    print(f"{'run':<52} {'seconds':>8} {'x plain':>8} {'peak RSS MB':>12}")
    rows = [
        ("plain training (trajectory-only recording, loop)", plain),
        (f"forward exact mode, {args.track} tracked samples", forward),
        (f"reverse mode, exact + approx, all {n} (warm, total)", reverse),
    ]
    for name, r in rows:
        print(
            f"{name:<52} {r['seconds']:>8.2f} {r['seconds'] / plain['seconds']:>8.1f} "
            f"{r['peak_mb']:>12.0f}"
        )
    print(
        f"{'(a process that only imported the library)':<52} {'':>8} {'':>8} {idle['peak_mb']:>12.0f}"
    )
    print(
        f"end to end: trajectory-only recording {plain['total_seconds']:.2f} s (data, training, "
        f"evaluation, store); reverse mode {reverse['seconds']:.2f} s warm = "
        f"{reverse['seconds'] / plain['total_seconds']:.1f}x, first call in a fresh process "
        f"{reverse['cold_seconds']:.2f} s = {reverse['cold_seconds'] / plain['total_seconds']:.1f}x"
    )
    print(
        f"per-sample cost: forward exact {forward['seconds'] / args.track * 1e3:.1f} ms/sample, "
        f"reverse {reverse['seconds'] / n * 1e3:.2f} ms/sample"
    )

    if args.memory_sizes:
        memory_study(root, [int(x) for x in args.memory_sizes.split(",")])

    from hydra_store.analysis.comparison import run_comparison
    from hydra_store.analysis.validation import run_validation

    tick = time.perf_counter()
    comparison = run_comparison(
        trajectory_store, "test", every=args.every, png=root / "compare.png"
    )
    print(f"\ncompare ({time.perf_counter() - tick:.1f} s):")
    for line in comparison.lines():
        print(line)
    tick = time.perf_counter()
    validation = run_validation(
        trajectory_store, "test", samples=args.validate, selection=args.selection
    )
    print(f"\nvalidate ({time.perf_counter() - tick:.1f} s):")
    for line in validation.lines():
        print(line)


if __name__ == "__main__":
    main()
