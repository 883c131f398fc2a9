"""Every contribution method against leave-one-out retraining and the linear datamodeling score
(LDS), with its run time, side by side in one table per run: HyDRA exact and approximate
(reverse mode), HyDRA from the stored hypergradients, influence functions, TracIn and the
TRAK-style estimator, each at its default setting.

Runs (`--runs`, comma-separated):
- `digits`: `hydra-store record`'s defaults (digits, MLP 64-32-10, 2,410 parameters, 20 epochs);
- `lenet5`: LeNet-5 (61,706 parameters) on `synthetic:n=1000,size=28,test=200`, 4 epochs at
  the default lr 0.01 (90% test accuracy; influence functions by conjugate gradients: the
  explicit inverse is refused above 5,000 parameters).

Per run: record (all samples tracked, in a process of its own), run each method once with
per-test contributions for the first `--per-test` test samples (timed: the seconds include the
per-test part), retrain `--samples` samples out (`validate --selection mixed`: half the largest
|C_exact|, half at random) and `--lds-subsets` random subsets of `--lds-fraction` of the training
set (`validate --lds`), then print, per method: Spearman and Pearson of C(i) with the measured
leave-one-out changes, the per-test LDS (mean ± std over the test samples it covers), the LDS of
the mean test loss from C(i), and the method's seconds.

    .venv/bin/python benchmarks/bench_methods.py
    .venv/bin/python benchmarks/bench_methods.py --runs lenet5 --samples 40
"""

from __future__ import annotations

import argparse
import multiprocessing
import tempfile
import time
from pathlib import Path

RUNS = {
    "digits": {},
    "lenet5": {
        "dataset": "synthetic:n=1000,size=28,test=200",
        "model": "lenet5",
        "epochs": 4,
    },
}


def _record(overrides: dict, out: str) -> str:
    from hydra_store.arguments import RecordConfig
    from hydra_store.recording.training import record_run

    summary = record_run(RecordConfig(out=out, overwrite=True, **overrides))
    last = summary.epochs[-1]
    return (
        f"recorded {out}: {summary.n_train} samples, {summary.n_params:,} parameters, "
        f"{len(summary.epochs)} epochs, test accuracy {last.test_accuracy:.3f}, "
        f"{summary.seconds:.1f} s"
    )


def record(overrides: dict, out: Path) -> str:
    """In a spawned process, so that nothing the recording sets in this one (torch's thread
    count, its start-up) shifts the timings below."""
    with multiprocessing.get_context("spawn").Pool(1) as pool:
        return pool.apply(_record, (overrides, str(out)))


def run_methods(path: Path, per_test: int) -> list[tuple[str, str, str, float]]:
    """Run every method; (row label, totals label, per-test label, seconds) per row."""
    import zarr

    from hydra_store.analysis.methods import ReverseModeMethod, default_methods

    registry = default_methods()
    n_params = int(zarr.open_group(str(path), mode="r")["weights"].shape[1])
    rows = []
    for name in ("hydra-exact", "hydra", "influence", "tracin", "trak"):
        method = registry[name]
        options = {"test_set": "test", "per_test": per_test}
        if name == "influence" and n_params > 5000:
            options["solver"] = "cg"
        config = method.config_from_options(options)
        tick = time.perf_counter()
        method.run(path, config)
        seconds = time.perf_counter() - tick
        if name == "hydra-exact":
            rows.append(
                (
                    "HyDRA exact (reverse mode)",
                    ReverseModeMethod.EXACT,
                    "reverse:contribution_exact",
                    seconds,
                )
            )
            rows.append(
                (
                    "HyDRA approximate (reverse mode)",
                    ReverseModeMethod.APPROXIMATE,
                    "reverse:contribution_approx",
                    seconds,
                )
            )
        elif name == "hydra":
            rows.append(
                (
                    "HyDRA approximate (stored hypergradients)",
                    "analysis:total_contribution",
                    "analysis:contribution",
                    seconds,
                )
            )
        else:
            (label,) = method.totals(path, "test")
            rows.append((label, label, f"{method.group}:contribution", seconds))
    return rows


def measure(run: str, folder: Path, args: argparse.Namespace) -> None:
    from hydra_store.analysis.lds import run_lds
    from hydra_store.analysis.validation import run_validation

    path = folder / f"{run}.zarr"
    print(f"\n== {run}: {record(RUNS[run], path)}")
    rows = run_methods(path, args.per_test)
    loo = run_validation(path, "test", samples=args.samples, selection="mixed")
    lds = run_lds(path, "test", subsets=args.lds_subsets, fraction=args.lds_fraction)
    by_loo = {c.method: c for c in loo.correlations}
    by_lds = {m.method: m for m in lds.per_test}
    by_mean = {m.method: m for m in lds.mean_loss}
    print(
        f"leave-one-out: {loo.samples.size} samples (mixed), {loo.seconds:.0f} s; LDS: "
        f"{lds.n_subsets} subsets of {lds.subset_size} ({lds.fraction:g}), {lds.seconds:.0f} s; "
        f"per-test contributions for the first {args.per_test} test samples"
    )
    print(
        f"{'method':<52} {'LOO Spearman':>12} {'LOO Pearson':>11} {'LDS per test':>16} "
        f"{'LDS mean loss':>13} {'seconds':>8}"
    )
    for label, total_label, per_test_label, seconds in rows:
        c, m, t = by_loo.get(total_label), by_lds.get(per_test_label), by_mean.get(total_label)
        loo_s = f"{c.spearman:>12.3f} {c.pearson:>11.3f}" if c else f"{'-':>12} {'-':>11}"
        lds_s = f"{m.mean:.3f} ± {m.std:.3f}" if m else "-"
        mean_s = f"{t.lds:.3f}" if t else "-"
        print(f"{label:<52} {loo_s} {lds_s:>16} {mean_s:>13} {seconds:>8.1f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", default="digits,lenet5")
    parser.add_argument("--samples", type=int, default=60, help="samples left out")
    parser.add_argument("--per-test", type=int, default=50, help="test samples with C(i, j)")
    parser.add_argument("--lds-subsets", type=int, default=32)
    parser.add_argument("--lds-fraction", type=float, default=0.5)
    parser.add_argument("--dir", type=Path, help="keep the stores here (default: a temporary one)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-methods-") as tmp:
        folder = args.dir or Path(tmp)
        folder.mkdir(parents=True, exist_ok=True)
        for run in args.runs.split(","):
            measure(run, folder, args)


if __name__ == "__main__":
    main()
