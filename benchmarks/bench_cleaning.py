"""The paper's Table 3 on digits: clean a training set with injected label noise by each
method's ranking, retrain from scratch, and compare the final test accuracies, with the times.

For each noise rate (default 50% and 80%): records a digits run with that share of the training
labels reassigned to wrong classes and a validation split (`--validation-fraction`, clean
labels), computes every method's contributions to the validation split (`analyze --test-set
validation` with `--method hydra-exact`, `hydra`, `influence`, `tracin`, `trak`), then runs
`clean` (drop the noise rate's share with the lowest C(i), retrain from scratch with the
recorded recipe over `--seeds` seeds, accuracy on the test split) and prints the table beside
the paper's MNIST figures.

    nice -n 5 .venv/bin/python benchmarks/bench_cleaning.py
    nice -n 5 .venv/bin/python benchmarks/bench_cleaning.py --noise 0.8 --seeds 3 --lr 0.01

`--within-class` also runs `clean --within-class` (not the paper's method: every ranking drops
its lowest C(i) within each training class, the same total shared among the classes, random as
many per class) and prints it beside the global ranking (docs/analysis.md, "Cleaning noisy
labels").
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
import warnings
from pathlib import Path

# The methods whose rankings are computed, in order: `analyze --method NAME`.
METHODS = ("hydra-exact", "hydra", "influence", "tracin", "trak")


def record(args, noise: float, out: Path) -> str:
    """Record in a process of its own (spawn), so nothing the recording sets in this process
    (torch's thread count) shifts the timings below."""
    import multiprocessing

    context = multiprocessing.get_context("spawn")
    with context.Pool(1) as pool:
        options = (args.epochs, args.lr, args.model, noise, args.validation_fraction, str(out))
        return pool.apply(_record, options)


def _record(epochs, lr, model, noise, validation_fraction, out) -> str:
    from hydra_store.arguments import RecordConfig
    from hydra_store.recording.training import record_run

    config = RecordConfig(
        epochs=epochs,
        lr=lr,
        model=model,
        label_noise=noise,
        validation_fraction=validation_fraction,
        out=out,
        overwrite=True,
    )
    summary = record_run(config)
    last = summary.epochs[-1]
    return (
        f"recorded {out}: digits, {model}, {summary.n_train} training samples "
        f"({noise:.0%} of the labels wrong), {summary.n_params} parameters, "
        f"{len(summary.epochs)} epochs, lr {lr:g}; test accuracy {100 * last.test_accuracy:.2f}%,"
        f" {summary.seconds:.1f} s"
    )


def rankings(path: Path) -> dict[str, float]:
    """Run every method on the validation split; its seconds by method name."""
    from hydra_store.analysis.methods import default_methods
    from hydra_store.errors import IndefiniteHessianWarning

    registry = default_methods()
    seconds = {}
    for name in METHODS:
        method = registry[name]
        config = method.config_from_options({"test_set": "validation", "figures": False})
        tick = time.perf_counter()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", IndefiniteHessianWarning)
            method.run(path, config)
        seconds[name] = time.perf_counter() - tick
    return seconds


def print_table(summary, seconds: dict[str, float], within=None) -> None:
    """One row per ranking: mislabelled among the dropped and the accuracy of the global drop,
    and of `within` (the same rankings dropped within each class) beside when given; the
    ranking's time."""
    import numpy as np

    def cells(result, n: int) -> str:
        values = 100 * result.accuracy[n]
        spread = float(np.std(values, ddof=1)) if values.size > 1 else 0.0
        wrong = int(result.mislabelled_dropped[n])
        share = f"{wrong} ({wrong / max(1, result.n_drop):.1%})" if result.n_drop else "0"
        return f"{share:>20} {f'{values.mean():.2f} ± {spread:.2f}':>16}"

    header = f"{'mislabelled dropped':>20} {'accuracy (%)':>16}"
    if within is not None:
        if within.labels != summary.labels:
            raise RuntimeError(f"the rankings differ: {summary.labels} and {within.labels}")
        print(f"{'':<44} {'global ranking':>37} {'within each class':>37}")
        header = f"{header} {header}"
    print(f"{'ranking':<44} {header} {'ranking time (s)':>17}")
    for n, label in enumerate(summary.labels):
        took = seconds.get(summary.methods[n])
        row = cells(summary, n) if within is None else f"{cells(summary, n)} {cells(within, n)}"
        print(f"{label:<44} {row} {'' if took is None else f'{took:.1f}':>17}")
    for line in summary.skipped:
        print(f"skipped {line}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--noise", type=float, nargs="+", default=[0.5, 0.8])
    parser.add_argument("--seeds", type=int, default=5, help="retrainings per ranking")
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--lr", type=float, default=0.1)
    parser.add_argument("--model", default="mlp")
    parser.add_argument("--validation-fraction", type=float, default=0.2)
    parser.add_argument("--workers", type=int, default=None, help="retrainings at once")
    parser.add_argument("--dir", type=Path, help="keep the stores here (default: a temp dir)")
    parser.add_argument(
        "--within-class",
        action="store_true",
        help="also `clean --within-class`, printed beside the global ranking",
    )
    args = parser.parse_args()

    from hydra_store.analysis.cleaning import PAPER_TABLE3, run_cleaning

    folder = tempfile.TemporaryDirectory(prefix="bench-cleaning-")
    where = args.dir or Path(folder.name)
    where.mkdir(parents=True, exist_ok=True)
    print(f"load average at start: {', '.join(f'{x:.1f}' for x in os.getloadavg())}")
    for noise in args.noise:
        path = where / f"digits-noise{round(100 * noise)}.zarr"
        tick = time.perf_counter()
        print(record(args, noise, path))
        seconds = rankings(path)
        summary = run_cleaning(path, seeds=args.seeds, workers=args.workers)
        print(
            f"\nnoise {noise:.0%}: drop {summary.n_drop} of {summary.n_train} by C(i) on the "
            f"validation split; retrain from scratch ({summary.recipe.describe()}), seeds "
            f"0-{args.seeds - 1}; test accuracy; retraining {summary.seconds:.1f} s for "
            f"{len(summary.labels) * args.seeds} runs"
        )
        within = None
        if args.within_class:
            # the same store (it holds the rankings): this replaces the global run's group
            within = run_cleaning(
                path,
                seeds=args.seeds,
                workers=args.workers,
                within_class=True,
                png=str(where / f"{path.stem}-clean-within-class.png"),
            )
            print(
                f"clean --within-class: the same {within.n_drop} dropped, shared among the "
                f"training classes; retraining {within.seconds:.1f} s"
            )
        print_table(summary, seconds, within)
        paper = PAPER_TABLE3["MNIST, LeNet-5"].get(round(noise, 2))
        if paper is not None:
            print(
                "paper, MNIST LeNet-5 (final accuracy): "
                + ", ".join(f"{k} {v:.2f}%" for k, v in paper.items())
            )
        print(f"({time.perf_counter() - tick:.0f} s for this noise rate)\n")
    print(f"load average at end: {', '.join(f'{x:.1f}' for x in os.getloadavg())}")


if __name__ == "__main__":
    main()
