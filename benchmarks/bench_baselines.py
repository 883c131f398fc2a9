"""The baselines beside HyDRA (influence functions, TracIn, TRAK-style) against leave-one-out
retraining and against HyDRA's exact contribution, side by side with HyDRA, with their times.

Records a run (default: `hydra-store record`'s default config, digits), computes the exact
contributions by reverse mode, retrains `--samples` training samples out once (`validate`), and
then runs each method setting, timing it (median of `--repeats` runs) and scoring its C(i):
Spearman and Pearson with the measured leave-one-out changes of the test loss, and sign error
and Spearman against the exact C(i) of all training samples.

    .venv/bin/python benchmarks/bench_baselines.py                      # the default run
    .venv/bin/python benchmarks/bench_baselines.py --epochs 10 --lr 0.1 # the issue's run
    .venv/bin/python benchmarks/bench_baselines.py --store run.zarr     # an existing store
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np

# (label, method, options): each runs in turn and replaces its method's group.
SETTINGS = [
    ("influence, explicit, damping automatic", "influence", {"solver": "explicit"}),
    ("influence, explicit, damping = weight decay", "influence", {"damping": "weight_decay"}),
    ("influence, explicit, damping 0.01", "influence", {"damping": 0.01}),
    ("influence, explicit, damping 1", "influence", {"damping": 1.0}),
    ("influence, cg, damping automatic", "influence", {"solver": "cg"}),
    ("influence, cg, damping 0.05", "influence", {"solver": "cg", "damping": 0.05}),
    ("influence, lissa, damping automatic", "influence", {"solver": "lissa"}),
    ("tracin", "tracin", {}),
    ("trak-style, K 1024, damping 0.01", "trak", {}),
    ("trak-style, K 1024, damping 1", "trak", {"damping": 1.0}),
]


def record(args, out: Path) -> None:
    """Record in a process of its own (started with spawn), so that nothing the recording sets
    in this process (torch's thread count, its start-up) shifts the timings below."""
    import multiprocessing

    context = multiprocessing.get_context("spawn")
    with context.Pool(1) as pool:
        print(pool.apply(_record, (args.epochs, args.lr, str(out))))


def _record(epochs: int | None, lr: float | None, out: str) -> str:
    from hydra_store.arguments import RecordConfig
    from hydra_store.recording.training import record_run

    overrides = {k: v for k, v in (("epochs", epochs), ("lr", lr)) if v is not None}
    summary = record_run(RecordConfig(out=out, overwrite=True, **overrides))
    last = summary.epochs[-1]
    return (
        f"recorded {out}: {summary.n_train} samples, {summary.n_params} parameters, "
        f"{len(summary.epochs)} epochs, test accuracy {last.test_accuracy:.3f}, "
        f"{summary.seconds:.1f} s"
    )


def timed(function, repeats: int):
    times, result = [], None
    for _ in range(repeats):
        tick = time.perf_counter()
        result = function()
        times.append(time.perf_counter() - tick)
    return result, statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--store", type=Path, help="an existing complete store (no recording)")
    parser.add_argument("--epochs", type=int, help="record with this many epochs")
    parser.add_argument("--lr", type=float, help="record with this learning rate")
    parser.add_argument("--samples", type=int, default=60, help="samples left out")
    parser.add_argument("--selection", default="mixed", help="random, influential or mixed")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per setting")
    args = parser.parse_args()

    import zarr

    from hydra_store.analysis.methods import default_methods
    from hydra_store.analysis.metrics import pearson, sign_error_rate, spearman
    from hydra_store.analysis.reverse import run_exact_analysis
    from hydra_store.analysis.validation import run_validation
    from hydra_store.errors import IndefiniteHessianWarning
    from hydra_store.replay.trajectory import Trajectory

    folder = tempfile.TemporaryDirectory(prefix="bench-baselines-")
    path = args.store or Path(folder.name) / "run.zarr"
    if args.store is None:
        record(args, path)
    exact_run, exact_seconds = timed(lambda: run_exact_analysis(path, "test"), args.repeats)
    exact, approx = exact_run.total_exact, exact_run.total_approx
    validation = run_validation(path, "test", samples=args.samples, selection=args.selection)
    chosen, change = validation.samples, validation.loss_change
    print(
        f"leave-one-out: {chosen.size} samples ({args.selection}), "
        f"{validation.seconds:.1f} s; times are medians of {args.repeats} runs"
    )
    trajectory = Trajectory(path)
    weight_decay = float(np.asarray(trajectory.group["weight_decay"][-1]))

    rows = []

    def add(label: str, values: np.ndarray, seconds: float, note: str = "") -> None:
        rows.append(
            (
                label,
                spearman(values[chosen], change),
                pearson(values[chosen], change),
                sign_error_rate(values, exact),
                spearman(values, exact),
                seconds,
                note,
            )
        )

    add("HyDRA exact (reverse mode)", exact, exact_seconds)
    add("HyDRA approximate (reverse mode, same sweep)", approx, exact_seconds)
    registry = default_methods()
    for label, name, options in SETTINGS:
        method = registry[name]
        options = dict(options)
        if options.get("damping") == "weight_decay":
            options["damping"] = weight_decay
        config = method.config_from_options({"test_set": "test", **options})
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            summary, seconds = timed(lambda m=method, c=config: m.run(path, c), args.repeats)
        (values,) = [v for _, v in method.totals(path, "test").values()]
        note = ""
        if name == "influence":
            note = f"damping {summary.damping:.3g}"
            if summary.inverse.negative_share is not None:
                note += f", {summary.inverse.negative_share:.1%} negative eigenvalues"
            if any(issubclass(w.category, IndefiniteHessianWarning) for w in caught):
                note += ", indefinite"
        add(label, values, seconds, note)

    root = zarr.open_group(str(path), mode="r")
    print(f"store {path}, weight decay {weight_decay:g}, n_train {root.attrs['n_train']}")
    print(
        f"{'method, setting':<46} {'LOO Spearman':>12} {'LOO Pearson':>11} "
        f"{'sign err vs exact':>17} {'Spearman vs exact':>17} {'seconds':>8}  note"
    )
    for label, s, p, e, r, seconds, note in rows:
        print(f"{label:<46} {s:>12.3f} {p:>11.3f} {e:>17.3f} {r:>17.3f} {seconds:>8.2f}  {note}")


if __name__ == "__main__":
    main()
