"""Out-of-core recording and projection, measured side by side (docs/scaling.md).

Sections (each prints its figures and ratios; run one with --section):

  full       synthetic 28x28, LeNet-5, every sample tracked at full dimension, 1 epoch, under
             --memory-budget: wall time and peak RSS of the whole process, against plain
             training (--trajectory-only) on the same data and the in-memory recorder on a
             subset; 1 and 2 single-threaded LocalCluster workers; bytes on disk; then
             reverse mode on that store, whose approximate C(i) must equal the stored
             hypergradients' C(i) from `analyze`.
  projected  the same network and data at a larger scale with --project-dim, under a budget,
             against in-memory projected recording of a subset that fits.
  quality    digits, an MLP of 17,226 parameters: projected against full C(i) (Spearman, top-10
             overlap) for several K, and each against reverse mode's exact C(i).
  cost       one epoch's recording cost against plain training: full per-sample gradients,
             and with the projection.

    python benchmarks/bench_scaling.py --section full                 # ~10 min on 2 cores
    python benchmarks/bench_scaling.py --section projected            # ~20 min, 3 GB of data
    python benchmarks/bench_scaling.py --section quality
    python benchmarks/bench_scaling.py --section cost
    python benchmarks/bench_scaling.py --quick --section all          # a smoke run, small sizes

Whole processes are timed (os.wait4 gives each one's peak RSS, its worker processes
included). The machine is shared and noisy: read the ratios.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

CLI = [sys.executable, "-m", "hydra_store_cli.main"]
GIB = 2**30


def run(args: list[str]) -> dict:
    """Run a CLI command; its wall seconds, peak RSS (bytes) and printed `time X s`."""
    tick = time.perf_counter()
    process = subprocess.Popen(
        CLI + args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    output = process.stdout.read()
    _, status, usage = os.wait4(process.pid, 0)
    wall = time.perf_counter() - tick
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"failed: {' '.join(args)}\n{output}")
    found = re.search(r"time ([\d.]+) s", output)
    return {
        "wall": wall,
        "rss": usage.ru_maxrss * 1024,
        "recording": float(found.group(1)) if found else float("nan"),
        "output": output,
        "cpu_sys": usage.ru_stime,
        "cpu_user": usage.ru_utime,
    }


def directory_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def line(label: str, result: dict, samples: int) -> None:
    print(
        f"  {label:<46} wall {result['wall']:7.1f} s  recording {result['recording']:7.1f} s  "
        f"{samples / result['wall']:8,.0f} samples/s  peak RSS {result['rss'] / GIB:5.2f} GiB  "
        f"(user {result['cpu_user']:.0f} s, sys {result['cpu_sys']:.0f} s)"
    )


def section_full(folder: Path, n: int, subset: int, budget: str) -> None:
    data = f"synthetic:n={n},size=28"
    common = ["--model", "lenet5", "--epochs", "1", "--overwrite"]
    print(f"\n== full dimension: {data}, LeNet-5 (61,706 parameters), 1 epoch ==")
    plain = run(
        ["record", "--dataset", data, "--trajectory-only", "--out", str(folder / "t.zarr"), *common]
    )
    line("plain training (--trajectory-only)", plain, n)
    memory = run(
        [
            "record",
            "--dataset",
            f"synthetic:n={subset},size=28",
            "--out",
            str(folder / "m.zarr"),
            *common,
        ]
    )
    line(f"in-memory recorder, {subset} samples", memory, subset)
    store = folder / "budget.zarr"
    budgeted = run(
        ["record", "--dataset", data, "--memory-budget", budget, "--out", str(store), *common]
    )
    line(f"--memory-budget {budget}, threads", budgeted, n)
    plan = re.search(r"(\d+) partitions of up to (\d+)", budgeted["output"])
    print(
        f"    {plan.group(0) if plan else '?'}; store {directory_bytes(store) / GIB:.2f} GiB on disk"
    )
    for workers in (1, 2):
        cluster = run(
            [
                "record",
                "--dataset",
                data,
                "--memory-budget",
                budget,
                "--out",
                str(folder / f"cluster{workers}.zarr"),
                "--scheduler",
                "local-cluster",
                "--workers",
                str(workers),
                *common,
            ]
        )
        line(f"--memory-budget {budget}, {workers} cluster worker(s)", cluster, n)
        if workers == 1:
            one = cluster
        else:
            print(
                f"    speed-up from 1 to 2 single-threaded workers: {one['wall'] / cluster['wall']:.2f}x"
            )
        shutil.rmtree(folder / f"cluster{workers}.zarr")
    per_sample_memory = memory["wall"] / subset
    per_sample_budget = budgeted["wall"] / n
    print(
        f"    throughput under the budget / in-memory: {per_sample_memory / per_sample_budget:.2f} "
        f"(goal >= 0.25); / plain training: {plain['wall'] / budgeted['wall']:.2f}"
    )
    print(f"    peak RSS - budget: {(budgeted['rss'] - parse(budget)) / GIB:+.2f} GiB (goal <= +1)")
    reverse = run(["analyze", str(store), "--method", "hydra-exact"])
    print(
        f"  reverse mode on that store: {reverse['wall']:.1f} s, peak RSS {reverse['rss'] / GIB:.2f} GiB"
    )
    stored = run(["analyze", str(store), "--no-figures", "--clusters-k", "100"])
    print(
        f"  analyze (stored hypergradients): {stored['wall']:.1f} s, peak RSS {stored['rss'] / GIB:.2f} GiB"
    )
    agreement(store)


def parse(size: str) -> int:
    from dask.utils import parse_bytes

    return int(parse_bytes(size))


def agreement(store: Path) -> None:
    """The stored approximate C(i) against reverse mode's approximate C(i)."""
    from scipy.stats import spearmanr

    from hydra_store.analysis.reverse import read_reverse_group
    from hydra_store.analysis.stored import open_analysis

    stored = open_analysis(store)["total_contribution"].values
    reverse = np.asarray(read_reverse_group(store)["total_contribution_approx"][:])
    error = np.abs(stored - reverse).max() / np.abs(reverse).max()
    rho = spearmanr(stored, reverse).statistic
    print(
        f"    stored approximate C(i) vs reverse mode's: max difference {error:.1e} of the "
        f"largest |C|, Spearman {rho:.6f}"
    )


def section_projected(folder: Path, n: int, subset: int, budget: str, k: int) -> None:
    common = ["--model", "lenet5", "--epochs", "1", "--overwrite", "--project-dim", str(k)]
    data = f"synthetic:n={n},size=28"
    print(f"\n== projected: {data}, LeNet-5, --project-dim {k}, 1 epoch ==")
    memory = run(
        [
            "record",
            "--dataset",
            f"synthetic:n={subset},size=28",
            "--out",
            str(folder / "pm.zarr"),
            *common,
        ]
    )
    line(f"in-memory, {subset} samples", memory, subset)
    store = folder / "pbig.zarr"
    budgeted = run(
        ["record", "--dataset", data, "--memory-budget", budget, "--out", str(store), *common]
    )
    line(f"{n} samples, --memory-budget {budget}", budgeted, n)
    plan = re.search(r"(\d+) partitions of up to (\d+)", budgeted["output"])
    dataset_bytes = n * 28 * 28 * 4
    print(
        f"    {plan.group(0) if plan else 'in memory'}; data set {dataset_bytes / GIB:.2f} GiB; "
        f"store {directory_bytes(store) / GIB:.2f} GiB"
    )
    ratio = (n / budgeted["wall"]) / (subset / memory["wall"])
    print(f"    samples/s under the budget / in-memory subset: {ratio:.2f} (goal >= 0.5)")
    analysed = run(["analyze", str(store), "--no-figures", "--clusters-k", "100"])
    print(f"  analyze: {analysed['wall']:.1f} s, peak RSS {analysed['rss'] / GIB:.2f} GiB")


def section_quality(folder: Path, ks: list[int], epochs: int) -> None:
    from scipy.stats import spearmanr

    from hydra_store.analysis.reverse import read_reverse_group
    from hydra_store.analysis.stored import open_analysis

    model = "mlp:hidden=128,64"
    common = ["--model", model, "--epochs", str(epochs), "--overwrite"]
    print(f"\n== projection quality: digits, {model} (17,226 parameters), {epochs} epochs ==")
    full = folder / "qfull.zarr"
    run(["record", *common, "--out", str(full)])
    run(["analyze", str(full), "--no-figures", "--clusters-k", "50"])
    run(["analyze", str(full), "--method", "hydra-exact"])
    totals = open_analysis(full)["total_contribution"].values
    exact = np.asarray(read_reverse_group(full)["total_contribution_exact"][:])

    def top(values: np.ndarray) -> set[int]:
        order = np.argsort(values)
        return set(order[:10]) | set(order[-10:])

    print(
        f"  full (unprojected): Spearman against exact {spearmanr(totals, exact).statistic:.3f}, "
        f"top-10 overlap {len(top(totals) & top(exact)) / 20:.2f}"
    )
    for k in ks:
        path = folder / f"q{k}.zarr"
        run(["record", *common, "--project-dim", str(k), "--out", str(path)])
        run(["analyze", str(path), "--no-figures", "--clusters-k", "50"])
        projected = open_analysis(path)["total_contribution"].values
        print(
            f"  K = {k:5d}: Spearman against full {spearmanr(projected, totals).statistic:.3f}, "
            f"top-10 overlap {len(top(projected) & top(totals)) / 20:.2f}; against exact "
            f"{spearmanr(projected, exact).statistic:.3f}, "
            f"top-10 overlap {len(top(projected) & top(exact)) / 20:.2f}"
        )


def section_cost(folder: Path, n: int, k: int) -> None:
    data = f"synthetic:n={n},size=28"
    common = ["--dataset", data, "--model", "lenet5", "--epochs", "1", "--overwrite"]
    print(f"\n== recording cost against plain training: {data}, LeNet-5, 1 epoch ==")
    results = {}
    for label, extra in (
        ("plain training (--trajectory-only)", ["--trajectory-only"]),
        ("full per-sample gradients", []),
        (f"projected, --project-dim {k}", ["--project-dim", str(k)]),
    ):
        results[label] = run(["record", *common, *extra, "--out", str(folder / "c.zarr")])
        line(label, results[label], n)
    plain = results["plain training (--trajectory-only)"]["recording"]
    for label, result in results.items():
        print(f"    {label}: {result['recording'] / plain:.2f}x plain training's recording time")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--section", default="all", choices=["full", "projected", "quality", "cost", "all"]
    )
    parser.add_argument("--quick", action="store_true", help="small sizes, for a smoke run")
    parser.add_argument(
        "--dir", default=None, help="where the stores go (default: a temporary folder)"
    )
    args = parser.parse_args()
    folder = Path(args.dir or tempfile.mkdtemp(prefix="hydra-scaling-"))
    folder.mkdir(parents=True, exist_ok=True)
    sections = ["full", "projected", "quality", "cost"] if args.section == "all" else [args.section]
    try:
        for section in sections:
            if section == "full":
                if args.quick:
                    section_full(folder, 3000, 1000, "100MiB")
                else:
                    section_full(folder, 60_000, 5_000, "4GiB")
            elif section == "projected":
                if args.quick:
                    section_projected(folder, 20_000, 5_000, "20MiB", 256)
                else:
                    section_projected(folder, 1_000_000, 100_000, "2GiB", 1024)
            elif section == "quality":
                section_quality(
                    folder,
                    [256, 1024] if args.quick else [256, 1024, 4096],
                    3 if args.quick else 10,
                )
            else:
                section_cost(folder, 5_000 if args.quick else 20_000, 1024)
    finally:
        if args.dir is None:
            shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    main()
