"""One `analyze` run of the stored hypergradients: test gradients, contributions, inter-class
matrix, top influencers, clustering (to find mislabelled samples), noise scores and figures,
written into `analysis/<test set>` of the store and swapped in atomically. The library never
prints: progress goes through a callback."""

from __future__ import annotations

import dataclasses
import os
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

from hydra_store.analysis.clustering import (
    PAPER_FEATURES,
    NoiseScores,
    cluster_samples,
    noise_scores,
)
from hydra_store.analysis.contributions import _as_dask, hypergradient_variables
from hydra_store.analysis.figures import analysis_figures
from hydra_store.analysis.influencers import extreme_samples, top_influencers
from hydra_store.analysis.interclass import class_means, normalise, one_hot
from hydra_store.analysis.test_sets import TestSet, group_name, resolve_test_set
from hydra_store.arguments import AnalyzeConfig
from hydra_store.core.losses import CROSS_ENTROPY, PerSampleLoss, recorded_loss
from hydra_store.errors import AnalysisError
from hydra_store.execution import dask_scheduler
from hydra_store.replay.recorded_run import RunData, RunInputs, load_run_data
from hydra_store.store.arrays import create_array, matrix_chunks, write_array
from hydra_store.store.format import now_iso, open_group, require_complete
from hydra_store.store.groups import replace_group
from hydra_store.store.integrity import reads_store
from hydra_store.store.location import store_path
from hydra_store.store.results import results_root

# progress(stage, done, total): stage names are stable ("test gradients", "contributions", ...).
ProgressCallback = Callable[[str, int, int], None]

SUFFIX = {"hypergradient": "", "hypergradient_exact": "_exact"}


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
    noise: NoiseScores | None  # the suspects of `--cluster-features`
    seconds: float
    timings: dict[str, float] = field(default_factory=dict)
    projected_width: int | None = None  # the projection's width, for a projected store
    noise_paper: NoiseScores | None = None  # the paper's sign clustering
    cluster_features: str = ""  # what `suspect` was clustered on (`--cluster-features`)


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
    products slower; docs/design.md, "Measured facts"); task progress on local threads, start/end otherwise."""
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


@reads_store
def analyze(
    path: str | Path,
    config: AnalyzeConfig | None = None,
    progress: ProgressCallback | None = None,
    *,
    inputs: RunInputs | None = None,
    out: str | Path | None = None,
) -> AnalyzeSummary:
    """Run every analysis for one test set and swap the results into `analysis/<name>`.

    `inputs`: the model, data and loss given in Python (`hydra_store.RunInputs`), for a store
    recorded around a user's loop that does not name them; checked against the store. `out`:
    a results store to write `analysis/<name>` to instead of the recording, which is then only
    read (store/results.py)."""
    started = time.perf_counter()
    config = config or AnalyzeConfig()
    config.validate()
    path = store_path(path)
    require_complete(open_group(path), path)
    ds = xr.open_zarr(str(path))
    variables = hypergradient_variables(ds)
    loss = recorded_loss(ds.attrs.get("loss"), inputs.loss if inputs is not None else None)
    if not loss.classification:
        raise AnalysisError(
            f"{path} was trained with a regression loss ({loss.spec or 'a user function'}), "
            "and `analyze` ranks by classes (class matrices, sign clustering by label); use "
            "reverse mode (`run_exact_analysis`), `run_comparison`, `run_validation`, or "
            "`hydra_store.analysis.total_contributions` on the store"
        )
    run = load_run_data(path, inputs)
    test = resolve_test_set(path, config.test_set, run=run)
    scheduler = dask_scheduler(
        config.scheduler, n_workers=config.n_workers, memory_limit=config.memory_limit
    )
    # Everything above validated the inputs, and the scheduler starts before the group is
    # staged: only then is anything written.
    results = results_root(path, out)
    with scheduler as client, replace_group(results, f"analysis/{test.name}") as (group, staging):
        stages = _AnalysisRun(path, ds, run, test, config, group, client, progress)
        stages.inputs, stages.loss = inputs, loss
        summary = stages.run(variables, staging)
    final = results / "analysis" / test.name
    summary.path = results
    summary.figures = [final / f.relative_to(staging) for f in summary.figures]
    summary.seconds = time.perf_counter() - started
    return summary


class _AnalysisRun:
    """The stages of one `analyze` run, writing into the staged group."""

    def __init__(
        self,
        path: Path,
        ds: xr.Dataset,
        run: RunData,
        test: TestSet,
        config: AnalyzeConfig,
        group: zarr.Group,
        client: object | None,
        progress: ProgressCallback | None,
    ) -> None:
        self.path, self.ds, self.run_data, self.test = path, ds, run, test
        self.config, self.group, self.client, self.progress = config, group, client, progress
        self.test_labels = test.targets.numpy().astype(np.int64)
        self.labels = ds["label"].values.astype(np.int64)
        self.sample = ds["sample"].values.astype(np.int64)
        self.timings: dict[str, float] = {}
        self.written: list[str] = []
        self.inputs: RunInputs | None = None
        self.loss: PerSampleLoss = CROSS_ENTROPY

    def reporter(self, stage: str) -> Callable[[int, int], None]:
        def report(done: int, total: int) -> None:
            if self.progress is not None:
                self.progress(stage, done, total)

        return report

    def write(self, name: str, values: Any, dims: tuple[str, ...], **attrs: Any) -> None:
        write_array(self.group, name, values, dims, attrs=attrs)

    def run(self, variables: list[str], staging: Path) -> AnalyzeSummary:
        self.write_header()
        self.timed("test gradients", self.test_gradients)
        totals, matrices = {}, {}
        for variable in variables:
            sfx = SUFFIX[variable]
            totals[variable], matrices[variable] = self.timed(
                f"contributions{sfx}", self.contributions, variable
            )
        names = np.asarray(self.test.class_names, dtype=str)
        self.write("train_class", names, ("train_class",))
        self.write("test_class", names, ("test_class",))
        main = variables[0]
        extremes = self.timed("top influencers", self.influencers, totals[main], main)
        suspects, noise = self.timed("clustering", self.clustering, totals[main], main)
        figures: list[Path] = []
        if self.config.figures:
            figures = self.timed(
                "figures",
                analysis_figures,
                staging / "figures",
                self.run_data,
                self.test,
                self.group,
                matrices[main],
                extremes,
                self.config.grid_tests,
            )
        self.group.attrs.update(
            {
                "status": "complete",
                "completed": now_iso(),
                "variables": self.written,
                "figures": [str(f.relative_to(staging)) for f in figures],
            }
        )
        return AnalyzeSummary(
            path=self.path,
            group=f"analysis/{self.test.name}",
            test_set=self.config.test_set,
            n_samples=int(self.ds.sizes["sample"]),
            n_test=len(self.test_labels),
            n_params=int(self.ds.attrs["n_params"]),
            projected_width=(self.ds.attrs.get("projection") or {}).get("width"),
            variables=self.written,
            figures=figures,
            extremes=extremes,
            class_names=list(self.test.class_names),
            interclass_diagonal_share=_diagonal_share(matrices[main]),
            n_suspects=int(suspects.sum()),
            noise=noise[0],
            noise_paper=noise[1],
            cluster_features=self.config.cluster_features,
            seconds=0.0,
            timings=self.timings,
        )

    def timed(self, stage: str, function: Callable[..., Any], *args: Any) -> Any:
        started = time.perf_counter()
        result = function(*args)
        self.timings[stage] = time.perf_counter() - started
        return result

    def write_header(self) -> None:
        n_test = len(self.test_labels)
        self.group.attrs.update(
            {
                "status": "writing",
                "created": now_iso(),
                "config": dataclasses.asdict(self.config),
                "test_set": self.config.test_set,
                "n_train": int(self.ds.attrs["n_train"]),
                "checkpoint": self.config.checkpoint,
            }
        )
        self.write("test", np.arange(n_test, dtype=np.int64), ("test",))
        self.write("test_label", self.test_labels, ("test",))
        self.write("sample", self.ds["sample"].values, ("sample",))
        self.write("label", self.ds["label"].values, ("sample",))

    def test_gradients(self) -> None:
        """Per-sample test-loss gradients at a checkpoint (projected as the store's
        hypergradients are), in batches with torch.func, streamed to `test_gradient` one whole
        chunk at a time. With `device`, the model lives there and each batch is moved there;
        the projected gradients come back to host memory batch by batch."""
        import torch

        from hydra_store.core.gradients import PerSampleGradients
        from hydra_store.core.parameters import ParameterLayout
        from hydra_store.core.projection import projector_from_attrs
        from hydra_store.replay.recorded_run import model_at_checkpoint

        report = self.reporter("test gradients")
        model = model_at_checkpoint(
            self.path, self.config.checkpoint, inputs=self.inputs, device=self.config.device
        )
        model.eval()
        layout = ParameterLayout.from_model(model)
        projector = projector_from_attrs(self.ds.attrs.get("projection"), layout.n_params)
        per_sample = PerSampleGradients(model, layout, self.loss)
        dtype, device = next(model.parameters()).dtype, next(model.parameters()).device
        np_dtype = np.float64 if dtype == torch.float64 else np.float32
        inputs, targets = self.test.inputs.to(dtype), self.test.targets
        n_test, width = len(targets), projector.width
        chunks = matrix_chunks(n_test, width, np.dtype(np_dtype).itemsize)
        gradients = create_array(
            self.group,
            "test_gradient",
            dims=("test", projector.dim),
            shape=(n_test, width),
            dtype=np_dtype,
            chunks=chunks,
            attrs={"long_name": "per-sample test-loss gradient at the analysed checkpoint"},
        )
        losses = np.empty(n_test, dtype=np.float64)
        block = np.empty((chunks[0], width), dtype=np_dtype)
        report(0, n_test)
        for start in range(0, n_test, chunks[0]):
            stop = min(n_test, start + chunks[0])
            for b in range(start, stop, self.config.batch_size):
                e = min(stop, b + self.config.batch_size)
                loss, grads = per_sample(inputs[b:e].to(device), targets[b:e].to(device))
                block[b - start : e - start] = projector.project(grads).detach().cpu().numpy()
                losses[b:e] = loss.detach().cpu().numpy()
                report(e, n_test)
            gradients[start:stop] = block[: stop - start]
        self.write("test_loss", losses, ("test",), long_name="per-sample test loss")
        self.written += ["test", "test_label", "test_loss", "test_gradient"]

    def contributions(self, variable: str) -> tuple[np.ndarray, np.ndarray]:
        """C(i, j), C(i) and the inter-class matrices of one hypergradient variable."""
        sfx = SUFFIX[variable]
        hyper = self.ds[variable]
        grads = xr.DataArray(
            da.from_zarr(self.group["test_gradient"]),
            dims=("test", hyper.dims[1]),
            coords={"test": np.arange(len(self.test_labels))},
        )
        target = create_array(
            self.group,
            f"contribution{sfx}",
            dims=("sample", "test"),
            shape=(hyper.shape[0], len(self.test_labels)),
            dtype=np.result_type(hyper.dtype, grads.dtype),
            chunks=(hyper.data.chunks[0][0], len(self.test_labels)),
            attrs={"long_name": f"C(i, j) from {variable}", "source": variable},
        )
        totals, matrix = stream_contributions(
            self.ds,
            grads,
            self.test_labels,
            target,
            variable=variable,
            client=self.client,
            report=self.reporter(f"contributions{sfx}"),
            n_classes=len(self.test.class_names),
        )
        normalised = normalise(matrix)
        classes = ("train_class", "test_class")
        self.write(f"total_contribution{sfx}", totals, ("sample",), source=variable)
        self.write(f"interclass{sfx}", matrix, classes, source=variable)
        self.write(
            f"interclass_normalised{sfx}",
            normalised,
            classes,
            source=variable,
            rule="entry / sqrt(row sum * column sum); NaN where either sum is not positive",
        )
        self.written += [f"contribution{sfx}", f"total_contribution{sfx}", f"interclass{sfx}"]
        self.written.append(f"interclass_normalised{sfx}")
        return np.asarray(totals), np.asarray(normalised)

    def stored_contributions(self) -> xr.DataArray:
        return xr.DataArray(
            da.from_zarr(self.group["contribution"]),
            dims=("sample", "test"),
            coords={"sample": self.sample, "test": np.arange(len(self.test_labels))},
        )

    def influencers(self, totals: np.ndarray, main: str) -> dict[str, dict[str, np.ndarray]]:
        """Top helpful and harmful training samples of every test sample, and the extremes."""
        top = top_influencers(self.stored_contributions(), self.config.top_k)
        top_values = _compute(
            self.client,
            self.reporter("top influencers"),
            *[top[v].data for v in top.data_vars],
        )
        for name, values in zip(top.data_vars, top_values, strict=True):
            self.write(name, values, ("test", "k"), source=main)
        self.write("k", np.arange(top.sizes["k"], dtype=np.int64), ("k",))
        extremes = extreme_samples(totals, self.sample, self.labels, self.config.top_k)
        for name, parts in extremes.items():
            self.write(name, parts["index"], ("k",), source=main)
            self.write(f"{name}_label", parts["label"], ("k",))
            self.write(f"{name}_contribution", parts["value"], ("k",))
        self.written += [*top.data_vars, "most_helpful", "most_harmful"]
        return extremes

    def clustering(
        self, totals: np.ndarray, main: str
    ) -> tuple[np.ndarray, tuple[NoiseScores | None, NoiseScores | None]]:
        """Clustering on `--cluster-features` (`cluster`, `suspect`) and the paper's sign
        clustering (`sign_cluster`, Table 4), and, with injected noise, the scores of both."""
        report = self.reporter("clustering")
        report(0, 2)
        features = self.config.cluster_features

        def split(chosen: str) -> xr.Dataset:
            return cluster_samples(
                self.stored_contributions(),
                self.labels,
                totals,
                features=chosen,
                n_tests=self.config.clusters_k,
                seed=self.config.seed,
                test_labels=self.test_labels,
            )

        clusters = split(features)
        report(1, 2)
        paper_clusters = clusters if features == PAPER_FEATURES else split(PAPER_FEATURES)
        report(2, 2)
        suspect = clusters["suspect"].values
        self.write(
            "cluster", clusters["cluster"].values, ("sample",), source=main, features=features
        )
        self.write("suspect", suspect, ("sample",), source=main, features=features)
        self.write(
            "sign_cluster",
            paper_clusters["cluster"].values,
            ("sample",),
            source=main,
            features=PAPER_FEATURES,
        )
        self.write("cluster_test", paper_clusters["cluster_test"].values, ("cluster_test",))
        self.written += ["cluster", "suspect", "sign_cluster"]
        if "is_noisy" not in self.ds.variables:
            return suspect, (None, None)
        is_noisy = self.ds["is_noisy"].values
        features = self.config.cluster_features
        noise = noise_scores(suspect, is_noisy, self.labels, totals, features)
        paper = noise_scores(
            paper_clusters["suspect"].values, is_noisy, self.labels, totals, PAPER_FEATURES
        )
        self.group.attrs["noise_scores"] = noise.to_attrs()
        self.group.attrs["noise_scores_paper"] = paper.to_attrs()
        return suspect, (noise, paper)


def _diagonal_share(normalised: np.ndarray) -> float:
    """Share of training classes whose own test class is the one they help most."""
    best = np.nanargmax(np.where(np.isfinite(normalised), normalised, -np.inf), axis=1)
    return float(np.mean(best == np.arange(len(best)))) if len(best) else float("nan")


# -- suspects ------------------------------------------------------------------------------------


@dataclass
class SuspectsTable:
    """Training samples ranked from most harmful; `noise` is set when label noise was injected."""

    rows: Any  # pandas DataFrame: index, label, total_contribution, suspect[, is_noisy]
    noise: dict[str, Any] | None  # the scores of `analyze --cluster-features`
    noise_paper: dict[str, Any] | None = None  # the scores of the paper's sign clustering

    def to_csv(self) -> str:
        return self.rows.to_csv(index=False)


def open_analysis(
    path: str | Path, test_set: str = "test", results: str | Path | None = None
) -> xr.Dataset:
    """The analysis group of a test set as a lazy Dataset (AnalysisError if not analysed yet);
    read from the results store `results` when the analysis was written to one."""
    path = store_path(path)
    open_group(path)
    where = results_root(path, results, create=False)
    name = group_name(test_set)
    if not (where / "analysis" / name / "zarr.json").is_file():
        out = f" --out {where}" if results is not None else ""
        raise AnalysisError(
            f"{where} has no analysis for test set {test_set!r}; run "
            f"`hydra-store analyze {path} --test-set {test_set}{out}` first"
        )
    return xr.open_zarr(str(where), group=f"analysis/{name}")


@reads_store
def suspects(
    path: str | Path, test_set: str = "test", results: str | Path | None = None
) -> SuspectsTable:
    """Training samples ranked by total contribution, most harmful first (from the results
    store `results` when the analysis was written to one)."""
    import pandas as pd

    analysis = open_analysis(path, test_set, results)
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
    paper = analysis.attrs.get("noise_scores_paper")
    return SuspectsTable(
        rows=frame,
        noise=dict(noise) if noise else None,
        noise_paper=dict(paper) if paper else None,
    )
