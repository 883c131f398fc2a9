"""Time and peak memory of `analyze`'s contribution products against plain in-memory numpy, in
one run, on a store with a synthetic hypergradient; and the same with a dask memory limit
smaller than the hypergradient (a LocalCluster).

    .venv/bin/python benchmarks/bench_analyze.py --samples 20000 --params 61706 --tests 1000

Each measurement runs in a fresh subprocess so its peak RSS (ru_maxrss) is its own.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np


def build(path: Path, samples: int, params: int, tests: int) -> None:
    import zarr

    from hydra_store.store.arrays import FLOAT_CODEC, matrix_chunks
    from hydra_store.store.format import consolidate

    group = zarr.open_group(path, mode="w", zarr_format=3)
    group.attrs.update({"n_train": samples, "hydra_store_format": 1, "status": "complete"})
    chunks = matrix_chunks(samples, params)
    h = group.create_array(
        "hypergradient",
        shape=(samples, params),
        dtype="f4",
        chunks=chunks,
        dimension_names=("sample", "param"),
        compressors=FLOAT_CODEC,
    )
    rng = np.random.default_rng(0)
    for s in range(0, samples, chunks[0]):
        e = min(samples, s + chunks[0])
        h[s:e] = rng.standard_normal((e - s, params), dtype=np.float32)
    group.create_array("sample", data=np.arange(samples), dimension_names=("sample",))
    group.create_array("label", data=np.arange(samples) % 10, dimension_names=("sample",))
    g = group.create_array(
        "test_gradient",
        shape=(tests, params),
        dtype="f4",
        chunks=matrix_chunks(tests, params),
        dimension_names=("test", "param"),
        compressors=FLOAT_CODEC,
    )
    g[...] = rng.standard_normal((tests, params), dtype=np.float32)
    group.create_array("test_label", data=np.arange(tests) % 10, dimension_names=("test",))
    consolidate(path)


def run_numpy(path: Path) -> dict:
    import zarr

    group = zarr.open_group(path, mode="r")
    t = time.perf_counter()
    h, g = group["hypergradient"][...], group["test_gradient"][...]
    n = group.attrs["n_train"]
    c = -(h @ g.T) / n
    # float32 throughout, as a numpy user would write it (a float64 mean vector would make
    # numpy copy the whole hypergradient to float64)
    total = -(h @ g.mean(axis=0, dtype=np.float64).astype(np.float32)) / n
    labels, test_labels = group["label"][...], group["test_label"][...]
    hot, thot = np.eye(10)[labels], np.eye(10)[test_labels]
    inter = (hot.T @ c @ thot) / np.outer(hot.sum(0), thot.sum(0))
    out = zarr.open_group(path.with_suffix(".np.zarr"), mode="w")
    out.create_array("c", data=c)
    return {"seconds": time.perf_counter() - t, "check": float(total[:5].sum() + inter[0, 0])}


def run_dask(path: Path, scheduler: str, memory_limit: str | None) -> dict:
    import xarray as xr
    import zarr

    from hydra_store.analysis.stored import stream_contributions
    from hydra_store.execution import dask_scheduler

    ds = xr.open_zarr(str(path))
    grads = xr.open_zarr(str(path))["test_gradient"]
    n_s, n_t = ds.sizes["sample"], ds.sizes["test"]
    t = time.perf_counter()
    with dask_scheduler(scheduler, memory_limit=memory_limit) as client:
        target = zarr.open_group(path.with_suffix(".dask.zarr"), mode="w").create_array(
            "c", shape=(n_s, n_t), dtype="f4", chunks=(ds["hypergradient"].data.chunks[0][0], n_t)
        )
        total, inter = stream_contributions(
            ds, grads, ds["test_label"].values, target, client=client, n_classes=10
        )
    return {"seconds": time.perf_counter() - t, "check": float(total[:5].sum() + inter[0, 0])}


def child(args) -> None:
    path = Path(args.store)
    result = (
        run_numpy(path)
        if args.child == "numpy"
        else run_dask(path, args.scheduler, args.memory_limit)
    )
    result["peak_rss"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    # A LocalCluster's workers are other processes: count their peaks too.
    result["children_rss"] = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024
    print(json.dumps(result))


def measure(args, kind: str, scheduler="threads", memory_limit=None) -> dict:
    cmd = [
        sys.executable,
        __file__,
        "--child",
        kind,
        "--store",
        args.store,
        "--scheduler",
        scheduler,
    ] + (["--memory-limit", memory_limit] if memory_limit else [])
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"{kind} ({scheduler}) failed:\n{done.stderr[-3000:]}")
    out = done.stdout
    return json.loads(out.strip().splitlines()[-1])


def noise_study(out_dir: Path, epochs: int, lr: float, model: str) -> None:
    """The paper's Table 4 experiment on digits: 50% of the training labels reassigned to wrong
    classes, then the clustering (default features and the paper's signs) and the noisy-label
    ranking of `analyze` (benchmarks/bench_clustering.py studies the clustering)."""
    from hydra_store.analysis.stored import analyze
    from hydra_store.arguments import AnalyzeConfig, RecordConfig
    from hydra_store.recording.training import record_run

    store = out_dir / "noisy-digits.zarr"
    config = RecordConfig(
        dataset="digits",
        model=model,
        epochs=epochs,
        lr=lr,
        label_noise=0.5,
        out=str(store),
        overwrite=True,
    )
    run = record_run(config)
    summary = analyze(store, AnalyzeConfig(figures=False))
    n = summary.noise
    print(
        f"\n== digits, 50% label noise: {model}, {epochs} epochs, lr {lr}; test accuracy "
        f"{run.epochs[-1].test_accuracy:.3f} (on the clean test labels) =="
    )
    print(f"  {'':<28} {'Jaccard correct':>16} {'Jaccard random':>15} {'AUC':>6} {'prec@50%':>9}")
    for scores in (n, summary.noise_paper):
        print(
            f"  {'digits, ' + scores.features:<28} {scores.jaccard_clean:>16.3f} "
            f"{scores.jaccard_noisy:>15.3f} {n.auc:>6.3f} {n.precision_at_rate:>9.3f}"
        )
    print(f"  {'paper, MNIST (HyDRA)':<28} {0.9713:>16.3f} {0.9716:>15.3f} {'':>6} {'':>9}")
    print(f"  {'paper, Fashion-MNIST':<28} {0.7806:>16.3f} {0.7773:>15.3f} {'':>6} {'':>9}")
    print("  a random 50/50 split scores about 0.33")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--samples", type=int, default=20000)
    parser.add_argument("--params", type=int, default=61706)
    parser.add_argument("--tests", type=int, default=1000)
    parser.add_argument("--store", default="/tmp/bench-analyze.zarr")
    parser.add_argument("--memory-limit", default=None, help="per worker, for the bounded run")
    parser.add_argument("--child", default=None)
    parser.add_argument("--scheduler", default="threads")
    parser.add_argument("--skip-build", action="store_true")
    parser.add_argument("--noise-only", action="store_true", help="only the label-noise study")
    parser.add_argument("--noise-epochs", type=int, default=20)
    parser.add_argument("--noise-lr", type=float, default=0.1)
    parser.add_argument("--noise-model", default="mlp")
    args = parser.parse_args()
    if args.child:
        return child(args)
    if args.noise_only:
        return noise_study(
            Path(args.store).parent, args.noise_epochs, args.noise_lr, args.noise_model
        )
    h_bytes = args.samples * args.params * 4
    if not args.skip_build:
        build(Path(args.store), args.samples, args.params, args.tests)
    limit = args.memory_limit or f"{max(h_bytes // 4, 1200 * 2**20) // 2**20}MiB"
    gib = 2**30
    rows = [
        ("numpy in memory", measure(args, "numpy")),
        ("analysis, dask threads", measure(args, "dask")),
        (f"analysis, local-cluster {limit}/worker", measure(args, "dask", "local-cluster", limit)),
    ]
    print(
        f"hypergradient {args.samples} x {args.params} float32 = {h_bytes / gib:.2f} GiB, "
        f"{args.tests} test samples"
    )
    base = rows[0][1]
    for name, r in rows:
        rss = max(r["peak_rss"], r["children_rss"])
        print(
            f"{name:42s} {r['seconds']:7.1f} s ({r['seconds'] / base['seconds']:.2f}x numpy)  "
            f"peak RSS {rss / gib:.2f} GiB ({rss / max(base['peak_rss'], 1):.2f}x)  check {r['check']:.6g}"
        )
    noise_study(Path(args.store).parent, args.noise_epochs, args.noise_lr, args.noise_model)


if __name__ == "__main__":
    main()
