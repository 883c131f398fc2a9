"""One `analyze` run: test gradients, contributions, inter-class matrix, top influencers, sign
clustering, noise scores and figures, written into `analysis/<name>` of the store and swapped in
atomically. The library never prints: progress goes through a callback."""

from __future__ import annotations

import ctypes
import dataclasses
import os
import shutil
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import dask
import dask.array as da
import numpy as np
import xarray as xr
import zarr
from dask.callbacks import Callback
from threadpoolctl import threadpool_limits

from hydra_store.analysis.clustering import NoiseScores, noise_scores, sign_clusters
from hydra_store.analysis.contributions import (
    _as_dask,
    hypergradient_variables,
)
from hydra_store.analysis.influencers import extreme_samples, top_influencers
from hydra_store.analysis.interclass import class_means, normalise, one_hot
from hydra_store.errors import AnalysisError, InvalidArgumentError
from hydra_store.scheduler import dask_scheduler
from hydra_store.store import (
    consolidate,
    create_array,
    matrix_chunks,
    now_iso,
    open_group,
    require_complete,
)

# progress(stage, done, total): stage names are stable ("test gradients", "contributions", ...).
ProgressCallback = Callable[[str, int, int], None]

SUFFIX = {"hypergradient": "", "hypergradient_exact": "_exact"}


@dataclass(frozen=True)
class AnalyzeConfig:
    """Arguments of one `analyze` run; saved as the `config` attribute of the analysis group."""

    test_set: str = "test"
    checkpoint: int = -1
    top_k: int = 10
    clusters_k: int = 1000
    seed: int = 0
    scheduler: str = "threads"
    memory_limit: str | None = None
    n_workers: int | None = None
    batch_size: int = 256
    figures: bool = True
    grid_tests: int = 4  # test samples shown in the influencer grid

    def validate(self) -> None:
        for name in ("top_k", "clusters_k", "batch_size", "grid_tests"):
            if getattr(self, name) < 1:
                raise InvalidArgumentError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.n_workers is not None and self.n_workers < 1:
            raise InvalidArgumentError(f"n_workers must be at least 1, got {self.n_workers}")


@dataclass
class AnalyzeSummary:
    """What one `analyze` run computed and where it wrote it."""

    path: Path
    group: str
    test_set: str
    n_samples: int
    n_test: int
    n_params: int
    variables: list[str]
    figures: list[Path]
    extremes: dict[str, dict[str, np.ndarray]]
    class_names: list[str]
    interclass_diagonal_share: float  # share of classes whose own test class is their best
    n_suspects: int
    noise: NoiseScores | None
    seconds: float
    timings: dict[str, float] = field(default_factory=dict)


# -- atomic replacement ------------------------------------------------------------------------


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swap two directories (Linux renameat2 RENAME_EXCHANGE); False if unsupported."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    result = renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange)
    return result == 0


def analysis_paths(path: Path, name: str) -> tuple[Path, Path, Path]:
    base = path / "analysis"
    return base / name, base / f".{name}.partial", base / f".{name}.old"


def _recover(final: Path, partial: Path, old: Path) -> None:
    """Undo what a crash between two renames can leave, then drop any half-written group."""
    if old.exists():
        if final.exists():
            shutil.rmtree(old)
        else:
            old.rename(final)
    if partial.exists():
        shutil.rmtree(partial)


def _swap_in(final: Path, partial: Path, old: Path) -> None:
    if final.exists():
        if _exchange(partial, final):
            shutil.rmtree(partial)  # now holds the previous results
            return
        final.rename(old)
        partial.rename(final)
        shutil.rmtree(old)
    else:
        partial.rename(final)


# -- writing -----------------------------------------------------------------------------------


def _write(group: zarr.Group, name: str, values: Any, dims: tuple[str, ...], **attrs: Any) -> None:
    values = np.asarray(values)
    dtype = str if values.dtype.kind in "OUT" else values.dtype
    array = create_array(group, name, dims=dims, shape=values.shape, dtype=dtype, attrs=attrs)
    if values.size:
        array[...] = values


class _TaskProgress(Callback):
    """Counts finished dask tasks (local schedulers) and reports them as progress."""

    def __init__(self, report: Callable[[int, int], None]) -> None:
        super().__init__()
        self._report = report
        self._done = 0
        self._total = 1
        self._step = 1

    def _start(self, dsk) -> None:
        self._total = max(1, len(dsk))
        self._step = max(1, self._total // 200)
        self._report(0, self._total)

    def _posttask(self, key, result, dsk, state, worker_id) -> None:
        self._done += 1
        if self._done % self._step == 0:
            self._report(min(self._done, self._total), self._total)

    def _finish(self, dsk, state, errored) -> None:
        self._report(self._total, self._total)


def _compute(client: object | None, report: Callable[[int, int], None], *values: Any) -> tuple:
    """dask.compute without graph optimisation (fusing zarr reads into every consumer made the
    products slower, DESIGN.md section 5); task progress on local threads, start/end otherwise."""
    if client is None:
        with _TaskProgress(report):
            return dask.compute(*values, optimize_graph=False)
    report(0, 1)
    result = dask.compute(*values, optimize_graph=False)
    report(1, 1)
    return result


# -- the run ------------------------------------------------------------------------------------


def stream_contributions(
    ds: xr.Dataset,
    grads: xr.DataArray,
    test_labels: np.ndarray,
    target: zarr.Array,
    *,
    variable: str = "hypergradient",
    client: object | None = None,
    report: Callable[[int, int], None] | None = None,
    n_classes: int | None = None,
    batch_chunks: int | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Write C(i, j) into `target` and return (C(i), inter-class matrix), reading every
    hypergradient chunk once.

    The rows are processed in batches of a few hypergradient chunks, each batch one dask
    computation of its three consumers (contributions, totals, class sums): computed as one graph
    over all rows, dask's ordering finished one consumer before the others and so held every
    hypergradient chunk in memory at once (measured: the whole array). The test gradients are
    persisted first (in memory, or on the cluster's workers) so batches do not re-read them.
    """
    report = report or (lambda done, total: None)
    hyper = ds[variable].data
    labels = np.asarray(ds["label"].values, dtype=np.int64)
    if n_classes is None:
        n_classes = int(max(labels.max(initial=0), np.max(test_labels, initial=0)) + 1)
    # Everything derived from the test gradients is prepared once, not once per batch: the
    # scaled, transposed, param-aligned matrix (P, test) for C(i, j), and the mean gradient for
    # C(i). Persisted, they live in memory (threads) or on the workers (distributed).
    scale = -1.0 / int(ds.attrs["n_train"])
    g = _as_dask(grads)
    prepared = (g * np.asarray(scale, dtype=hyper.dtype)).astype(hyper.dtype).T
    prepared = prepared.rechunk((hyper.chunks[1], -1))
    gbar64 = g.mean(axis=0, dtype=np.float64).rechunk((hyper.chunks[1],))
    prepared, gbar64 = dask.persist(prepared, gbar64, optimize_graph=False)
    gbar = class_means(g, np.asarray(test_labels), n_classes)
    hot = one_hot(labels, n_classes)
    bounds = np.cumsum((0, *hyper.chunks[0]))
    workers = 2
    if client is not None:
        workers = max(1, sum(client.nthreads().values()))
    else:
        workers = dask.config.get("num_workers", None) or os.cpu_count() or 2
    step = batch_chunks or max(1, workers)
    totals = np.empty(hyper.shape[0], dtype=np.float64)
    sums = np.zeros((n_classes, hyper.shape[1]), dtype=np.float64)
    n_batches = -(-(len(bounds) - 1) // step)
    report(0, n_batches)
    # On local threads, dask runs one task per core and each task's BLAS call would start one
    # thread per core as well: oversubscribed, the products ran 1.7x slower than numpy (6,000
    # x 61,706 hypergradients, 1,000 tests: 19.5 s against 11.5 s); with one BLAS thread per task,
    # 12.3 s. dask.distributed's worker processes already start with one BLAS thread each.
    blas = threadpool_limits(limits=1, user_api="blas") if client is None else nullcontext()
    with blas:
        for b, first in enumerate(range(0, len(bounds) - 1, step)):
            s, e = int(bounds[first]), int(bounds[min(first + step, len(bounds) - 1)])
            block = hyper[s:e]
            stored = da.store(
                da.matmul(block, prepared),
                target,
                regions=(slice(s, e), slice(None)),
                lock=False,
                compute=False,
            )
            # One float64 copy of each chunk serves both float64 reductions.
            block64 = block.astype(np.float64)
            total = da.matmul(block64, gbar64) * scale
            part = da.matmul(hot[s:e].T, block64)
            _, totals[s:e], part_sums = dask.compute(stored, total, part, optimize_graph=False)
            sums += part_sums
            report(b + 1, n_batches)
    counts = hot.sum(axis=0)
    with np.errstate(invalid="ignore", divide="ignore"):
        hbar = sums / np.where(counts > 0, counts, np.nan)[:, None]
    matrix = (hbar @ np.asarray(gbar.compute()).T) * (-1.0 / int(ds.attrs["n_train"]))
    return totals, matrix


def _check_store(path: Path) -> zarr.Group:
    group = open_group(path)
    require_complete(group, path)
    return group


def _test_gradients(
    path: Path,
    group: zarr.Group,
    test,
    config: AnalyzeConfig,
    report: Callable[[int, int], None],
) -> None:
    """Per-sample test-loss gradients at a checkpoint, in batches with torch.func, streamed to
    `test_gradient` one whole chunk at a time."""
    import torch

    from hydra_store.hypergradient import PerSampleGradients
    from hydra_store.parameters import ParameterLayout
    from hydra_store.replay import model_at_checkpoint

    model = model_at_checkpoint(path, config.checkpoint)
    model.eval()
    layout = ParameterLayout.from_model(model)
    per_sample = PerSampleGradients(model, layout)
    dtype = next(model.parameters()).dtype
    np_dtype = np.float64 if dtype == torch.float64 else np.float32
    inputs, targets = test.inputs.to(dtype), test.targets
    n_test, n_params = len(targets), layout.n_params
    chunks = matrix_chunks(n_test, n_params, np.dtype(np_dtype).itemsize)
    gradients = create_array(
        group,
        "test_gradient",
        dims=("test", "param"),
        shape=(n_test, n_params),
        dtype=np_dtype,
        chunks=chunks,
        attrs={"long_name": "per-sample test-loss gradient at the analysed checkpoint"},
    )
    losses = np.empty(n_test, dtype=np.float64)
    block = np.empty((chunks[0], n_params), dtype=np_dtype)
    report(0, n_test)
    for start in range(0, n_test, chunks[0]):
        stop = min(n_test, start + chunks[0])
        for b in range(start, stop, config.batch_size):
            e = min(stop, b + config.batch_size)
            loss, grads = per_sample(inputs[b:e], targets[b:e])
            block[b - start : e - start] = grads.detach().cpu().numpy()
            losses[b:e] = loss.detach().cpu().numpy()
            report(e, n_test)
        gradients[start:stop] = block[: stop - start]
    _write(group, "test_loss", losses, ("test",), long_name="per-sample test loss")


def analyze(
    path: str | Path, config: AnalyzeConfig | None = None, progress: ProgressCallback | None = None
) -> AnalyzeSummary:
    """Run every analysis for one test set and swap the results into `analysis/<name>`."""
    from hydra_store.replay import load_run_data
    from hydra_store.testsets import resolve_test_set

    started = time.perf_counter()
    timings: dict[str, float] = {}
    config = config or AnalyzeConfig()
    config.validate()
    path = Path(path)
    root = _check_store(path)
    ds = xr.open_zarr(str(path))
    variables = hypergradient_variables(ds)
    run = load_run_data(path)
    test = resolve_test_set(path, config.test_set, run=run)

    def reporter(stage: str) -> Callable[[int, int], None]:
        def report(done: int, total: int) -> None:
            if progress is not None:
                progress(stage, done, total)

        return report

    final, partial, old = analysis_paths(path, test.name)
    with dask_scheduler(
        config.scheduler, n_workers=config.n_workers, memory_limit=config.memory_limit
    ) as client:
        # Everything above validated the inputs and the scheduler: only now is anything written.
        zarr.open_group(path / "analysis", mode="a", zarr_format=3)
        _recover(final, partial, old)
        group = zarr.open_group(partial, mode="w", zarr_format=3)
        try:
            summary = _run(
                path,
                root,
                ds,
                variables,
                run,
                test,
                config,
                group,
                partial,
                client,
                reporter,
                timings,
            )
        except BaseException:
            shutil.rmtree(partial, ignore_errors=True)
            raise
        consolidate(partial)
        _swap_in(final, partial, old)
        consolidate(path)
    summary.figures = [final / f.relative_to(partial) for f in summary.figures]
    summary.seconds = time.perf_counter() - started
    summary.timings = timings
    return summary


def _run(
    path, root, ds, variables, run, test, config, group, partial, client, reporter, timings
) -> AnalyzeSummary:
    t0 = time.perf_counter()
    class_names = list(test.class_names)
    n_sample = int(ds.sizes["sample"])
    test_labels = test.targets.numpy().astype(np.int64)
    n_test = len(test_labels)
    group.attrs.update(
        {
            "status": "writing",
            "created": now_iso(),
            "config": dataclasses.asdict(config),
            "test_set": config.test_set,
            "n_train": int(ds.attrs["n_train"]),
            "checkpoint": config.checkpoint,
        }
    )
    _write(group, "test", np.arange(n_test, dtype=np.int64), ("test",))
    _write(group, "test_label", test_labels, ("test",))
    _write(group, "sample", ds["sample"].values, ("sample",))
    _write(group, "label", ds["label"].values, ("sample",))
    _test_gradients(path, group, test, config, reporter("test gradients"))
    timings["test gradients"] = time.perf_counter() - t0

    grads = xr.DataArray(
        da.from_zarr(group["test_gradient"]),
        dims=("test", "param"),
        coords={"test": np.arange(n_test)},
    )
    written = ["test", "test_label", "test_loss", "test_gradient"]
    totals: dict[str, np.ndarray] = {}
    matrices: dict[str, np.ndarray] = {}
    for variable in variables:
        t0 = time.perf_counter()
        sfx = SUFFIX[variable]
        target = create_array(
            group,
            f"contribution{sfx}",
            dims=("sample", "test"),
            shape=(n_sample, n_test),
            dtype=np.result_type(ds[variable].dtype, grads.dtype),
            chunks=(ds[variable].data.chunks[0][0], n_test),
            attrs={"long_name": f"C(i, j) from {variable}", "source": variable},
        )
        total_values, matrix = stream_contributions(
            ds,
            grads,
            test_labels,
            target,
            variable=variable,
            client=client,
            report=reporter(f"contributions{sfx}"),
            n_classes=len(class_names),
        )
        normalised = normalise(matrix)
        totals[variable] = np.asarray(total_values)
        matrices[variable] = np.asarray(normalised)
        _write(group, f"total_contribution{sfx}", total_values, ("sample",), source=variable)
        _write(group, f"interclass{sfx}", matrix, ("train_class", "test_class"), source=variable)
        _write(
            group,
            f"interclass_normalised{sfx}",
            normalised,
            ("train_class", "test_class"),
            source=variable,
            rule="entry / sqrt(row sum * column sum); NaN where either sum is not positive",
        )
        written += [f"contribution{sfx}", f"total_contribution{sfx}", f"interclass{sfx}"]
        written.append(f"interclass_normalised{sfx}")
        timings[f"contributions{sfx}"] = time.perf_counter() - t0
    _write(group, "train_class", np.asarray(class_names, dtype=str), ("train_class",))
    _write(group, "test_class", np.asarray(class_names, dtype=str), ("test_class",))

    # Top influencers and clustering from the stored (sample, test) contributions.
    t0 = time.perf_counter()
    main = variables[0]
    stored_c = xr.DataArray(
        da.from_zarr(group["contribution"]),
        dims=("sample", "test"),
        coords={"sample": ds["sample"].values, "test": np.arange(n_test)},
    )
    top = top_influencers(stored_c, config.top_k)
    k = top.sizes["k"]
    top_values = _compute(
        client, reporter("top influencers"), *[top[v].data for v in top.data_vars]
    )
    for name, values in zip(top.data_vars, top_values, strict=True):
        _write(group, name, values, ("test", "k"), source=main)
    _write(group, "k", np.arange(k, dtype=np.int64), ("k",))
    labels = ds["label"].values.astype(np.int64)
    sample = ds["sample"].values.astype(np.int64)
    extremes = extreme_samples(totals[main], sample, labels, config.top_k)
    for name, parts in extremes.items():
        _write(group, name, parts["index"], ("k",), source=main)
        _write(group, f"{name}_label", parts["label"], ("k",))
        _write(group, f"{name}_contribution", parts["value"], ("k",))
    written += [*top.data_vars, "most_helpful", "most_harmful"]
    timings["top influencers"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    report = reporter("sign clustering")
    report(0, 1)
    clusters = sign_clusters(
        stored_c, labels, totals[main], n_tests=config.clusters_k, seed=config.seed
    )
    report(1, 1)
    _write(group, "sign_cluster", clusters["sign_cluster"].values, ("sample",), source=main)
    _write(group, "suspect", clusters["suspect"].values, ("sample",), source=main)
    _write(group, "cluster_test", clusters["cluster_test"].values, ("cluster_test",))
    written += ["sign_cluster", "suspect"]
    noise = None
    if "is_noisy" in ds.variables:
        noise = noise_scores(
            clusters["suspect"].values, ds["is_noisy"].values, labels, totals[main]
        )
        group.attrs["noise_scores"] = noise.to_attrs()
    timings["sign clustering"] = time.perf_counter() - t0

    figures: list[Path] = []
    if config.figures:
        t0 = time.perf_counter()
        figures = _figures(partial, run, test, group, matrices[main], extremes, config)
        timings["figures"] = time.perf_counter() - t0
    diag = matrices[main]
    best = np.nanargmax(np.where(np.isfinite(diag), diag, -np.inf), axis=1)
    share = float(np.mean(best == np.arange(len(best)))) if len(best) else float("nan")
    group.attrs.update(
        {
            "status": "complete",
            "completed": now_iso(),
            "variables": written,
            "figures": [str(f.relative_to(partial)) for f in figures],
        }
    )
    return AnalyzeSummary(
        path=path,
        group=f"analysis/{test.name}",
        test_set=config.test_set,
        n_samples=n_sample,
        n_test=n_test,
        n_params=int(ds.sizes["param"]),
        variables=written,
        figures=figures,
        extremes=extremes,
        class_names=class_names,
        interclass_diagonal_share=share,
        n_suspects=int(clusters["suspect"].values.sum()),
        noise=noise,
        seconds=0.0,
    )


def _figures(partial: Path, run, test, group, normalised, extremes, config) -> list[Path]:
    from hydra_store.analysis import plots

    out = partial / "figures"
    out.mkdir(exist_ok=True)
    names = list(test.class_names)
    figures = [
        plots.interclass_heatmap(
            normalised, names, out / "interclass.png", title="inter-class contribution (normalised)"
        )
    ]
    if not test.is_image:
        return figures
    train_inputs = run.train.inputs.numpy()
    train_labels = run.train.targets.numpy()
    helpful = np.asarray(group["top_helpful"][:])
    harmful = np.asarray(group["top_harmful"][:])
    helpful_v = np.asarray(group["top_helpful_contribution"][:])
    harmful_v = np.asarray(group["top_harmful_contribution"][:])
    shown = min(5, helpful.shape[1])
    rows = []
    for j in range(min(config.grid_tests, len(test.targets))):
        rows.append(
            {
                "test_index": j,
                "test_image": test.inputs[j].numpy(),
                "test_label": int(test.targets[j]),
                "helpers": [
                    (train_inputs[i], int(train_labels[i]), float(v))
                    for i, v in zip(helpful[j, :shown], helpful_v[j, :shown], strict=True)
                ],
                "harmers": [
                    (train_inputs[i], int(train_labels[i]), float(v))
                    for i, v in zip(harmful[j, :shown], harmful_v[j, :shown], strict=True)
                ],
            }
        )
    figures.append(
        plots.influencer_grid(
            rows, names, out / "influencers.png", title="test sample | most helpful | most harmful"
        )
    )
    groups = {
        name: [
            (train_inputs[i], int(i), int(label), float(v))
            for i, label, v in zip(parts["index"], parts["label"], parts["value"], strict=True)
        ]
        for name, parts in extremes.items()
    }
    figures.append(
        plots.extremes_grid(
            groups, names, out / "extremes.png", title="training samples with extreme C(i)"
        )
    )
    return figures


# -- suspects ------------------------------------------------------------------------------------


@dataclass
class SuspectsTable:
    """Training samples ranked from most harmful; `noise` is set when label noise was injected."""

    rows: Any  # pandas DataFrame: index, label, total_contribution, suspect[, is_noisy]
    noise: dict[str, float] | None

    def to_csv(self) -> str:
        return self.rows.to_csv(index=False)


def open_analysis(path: str | Path, test_set: str = "test") -> xr.Dataset:
    """The analysis group of a test set as a lazy Dataset (AnalysisError if not analysed yet)."""
    from hydra_store.testsets import group_name

    path = Path(path)
    open_group(path)
    name = group_name(test_set)
    if not (path / "analysis" / name / "zarr.json").is_file():
        raise AnalysisError(
            f"{path} has no analysis for test set {test_set!r}; run "
            f"`hydra-store analyze {path} --test-set {test_set}` first"
        )
    return xr.open_zarr(str(path), group=f"analysis/{name}")


def suspects(path: str | Path, test_set: str = "test") -> SuspectsTable:
    """Training samples ranked by total contribution, most harmful first."""
    import pandas as pd

    analysis = open_analysis(path, test_set)
    root = xr.open_zarr(str(path))
    frame = pd.DataFrame(
        {
            "index": analysis["sample"].values.astype(np.int64),
            "label": analysis["label"].values.astype(np.int64),
            "total_contribution": analysis["total_contribution"].values,
            "suspect": analysis["suspect"].values.astype(bool),
        }
    )
    if "is_noisy" in root.variables:
        frame["is_noisy"] = root["is_noisy"].values.astype(bool)
    frame = frame.sort_values("total_contribution", kind="stable").reset_index(drop=True)
    noise = analysis.attrs.get("noise_scores")
    return SuspectsTable(rows=frame, noise=dict(noise) if noise else None)
