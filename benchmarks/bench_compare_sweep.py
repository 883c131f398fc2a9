"""`compare`'s exact C(i) over checkpoints: one truncated adjoint sweep per checkpoint (how
`checkpoint_study` computed them before) against the one backward sweep that serves every
checkpoint (`adjoint_contributions_at_checkpoints`), side by side in one process, on a digits
run recorded into a temporary folder (trajectory only, `hydra-store record` defaults but the
epochs). Prints the median and min wall and CPU seconds of each over the repeats, alternating
the two so that both see the same load, their ratios, the largest difference between their
C(i) (and exits non-zero above 1e-12 relative), and the load average before and after.

    nice -n 5 .venv/bin/python benchmarks/bench_compare_sweep.py --epochs 20 --repeats 3
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np


def record(out: Path, epochs: int) -> None:
    from hydra_store.arguments import RecordConfig
    from hydra_store.recording.training import record_run

    record_run(RecordConfig(epochs=epochs, mode="trajectory", out=str(out), overwrite=True))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--epochs", type=int, default=10, help="one checkpoint per epoch")
    parser.add_argument("--every", type=int, default=1, help="compare's --every")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--threads", type=int, default=None, help="torch threads (default: its own)"
    )
    parser.add_argument("--out-dir", default=None, help="keep the store here (default: a temp)")
    args = parser.parse_args()

    import torch

    if args.threads is not None:
        torch.set_num_threads(args.threads)
    from hydra_store.analysis.reverse import (
        adjoint_contributions,
        adjoint_contributions_at_checkpoints,
    )
    from hydra_store.analysis.test_sets import resolve_test_set
    from hydra_store.core.gradients import mean_loss_gradient
    from hydra_store.replay.recorded_run import load_run_data, model_at_checkpoint
    from hydra_store.replay.trajectory import Trajectory

    root = Path(args.out_dir or tempfile.mkdtemp(prefix="bench-compare-sweep-"))
    root.mkdir(parents=True, exist_ok=True)
    path = root / "digits.zarr"
    print(f"load average at start: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    tick = time.perf_counter()
    record(path, args.epochs)
    print(
        f"recorded `hydra-store record --epochs {args.epochs} --trajectory-only` in "
        f"{time.perf_counter() - tick:.1f} s: {path}"
    )

    trajectory = Trajectory(path)
    data = load_run_data(path)
    tests = resolve_test_set(path, "test", run=data)
    last = len(trajectory.checkpoint_step) - 1
    chosen = sorted(set(range(1, last + 1, args.every)) | {last})
    directions = {}
    for k in chosen:
        model = model_at_checkpoint(path, k)
        u, _ = mean_loss_gradient(model, trajectory.layout, tests.inputs, tests.targets)
        directions[k] = u[None]
    steps = [int(trajectory.checkpoint_step[k]) for k in chosen]
    print(
        f"N = {trajectory.n_train}, {trajectory.layout.n_params} parameters, "
        f"{len(chosen)} checkpoints (steps {steps[0]}..{steps[-1]}); steps replayed: "
        f"{sum(steps)} by one sweep per checkpoint, {steps[-1]} by the one sweep; "
        f"torch threads {torch.get_num_threads()}"
    )

    def separate() -> dict:
        scratch = model_at_checkpoint(path, 0)
        return {
            k: adjoint_contributions(trajectory, scratch, data.train, d, checkpoint=k)
            for k, d in directions.items()
        }

    def shared() -> dict:
        scratch = model_at_checkpoint(path, 0)
        return adjoint_contributions_at_checkpoints(trajectory, scratch, data.train, directions)

    # torch's one-off start-up (lazy imports, first graphs) is paid before any timing
    first = chosen[0]
    adjoint_contributions(
        trajectory, model_at_checkpoint(path, 0), data.train, directions[first], checkpoint=first
    )
    times: dict[str, list[float]] = {"separate": [], "shared": []}
    cpu: dict[str, list[float]] = {"separate": [], "shared": []}
    results = {}
    for _ in range(args.repeats):
        for name, run in (("separate", separate), ("shared", shared)):
            tick, cpu_tick = time.perf_counter(), time.process_time()
            results[name] = run()
            times[name].append(time.perf_counter() - tick)
            cpu[name].append(time.process_time() - cpu_tick)

    worst = 0.0
    for k in chosen:
        for kind in ("exact", "approx"):
            a = getattr(results["shared"][k], kind)
            b = getattr(results["separate"][k], kind)
            scale = np.abs(b).max()
            worst = max(worst, float(np.abs(a - b).max() / scale) if scale else float(a.any()))
    bitwise = all(
        np.array_equal(results["shared"][k].exact, results["separate"][k].exact)
        and np.array_equal(results["shared"][k].approx, results["separate"][k].approx)
        for k in chosen
    )

    print(
        f"{'':<34} {'wall: median':>12} {'min':>6} {'CPU: median':>12} {'min':>6}   "
        f"(s, {args.repeats} repeats; wall of each)"
    )
    for label, name in (
        ("one sweep per checkpoint (before)", "separate"),
        ("one sweep for all checkpoints", "shared"),
    ):
        wall, used = times[name], cpu[name]
        print(
            f"{label:<34} {statistics.median(wall):>12.2f} {min(wall):>6.2f} "
            f"{statistics.median(used):>12.2f} {min(used):>6.2f}   "
            + ", ".join(f"{t:.2f}" for t in wall)
        )
    for what, table in (("wall", times), ("CPU", cpu)):
        before, now = table["separate"], table["shared"]
        print(
            f"ratio before / now, {what}: {statistics.median(before) / statistics.median(now):.2f}x "
            f"of the medians, {min(before) / min(now):.2f}x of the minima"
        )
    print(
        f"largest relative difference of the C(i) (exact and approximate, every checkpoint): "
        f"{worst:.1e}; identical to the bit: {bitwise}"
    )
    print(f"load average at end: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    if args.out_dir is None:
        shutil.rmtree(root)
    if worst > 1e-12:
        raise SystemExit("the one sweep does not agree with the separate sweeps")


if __name__ == "__main__":
    main()
