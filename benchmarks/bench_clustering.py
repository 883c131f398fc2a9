"""Finding injected label noise by clustering (the paper's Table 4), studied on digits.

Records digits runs with label noise (several noise rates, seeds, models and training lengths),
computes per-test contributions (exact and approximate by reverse mode `--per-test`, approximate
from the stored hypergradients by `analyze`), and compares the clustering features of
`hydra_store.analysis.clustering` (the paper's signs, C(i) alone, per-test-class means, ...):
Jaccard indices (correct / random labels, per class averaged over classes, as the paper) and
the AUC of -C(i). It also prints why the paper's sign features stay near 0.5 here: the share of
positive signs per test sample, by whether the test sample is of the training sample's class.

    nice -n 5 .venv/bin/python benchmarks/bench_clustering.py [--runs main|all] [--dir DIR]

Stores are kept in --dir (default /tmp/bench-clustering) and reused when complete, so a second
invocation only re-scores. Recording and analysing every run of `--runs all` takes about an
hour on 2 cores (the exact per-test contributions for 360 test samples dominate).
"""

from __future__ import annotations

import argparse
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import xarray as xr
import zarr


@dataclass(frozen=True)
class Run:
    """One recorded digits run with label noise."""

    model: str
    epochs: int
    noise: float
    seed: int
    lr: float = 0.1
    lr_step_epochs: int = 5

    @property
    def name(self) -> str:
        model = self.model.replace(":", "-").replace("=", "").replace(",", "-")
        return f"{model}-e{self.epochs}-n{round(self.noise * 100)}-s{self.seed}"

    @property
    def setting(self) -> str:
        return f"{self.model}, {self.epochs} epochs"


def planned_runs(which: str) -> list[Run]:
    """The runs, most important first (a long study can be cut short and still say something):
    the MLP of the lead (20 epochs, lr 0.1 x0.1 every 5 epochs) at three noise rates, a smaller
    MLP, logistic regression, and 50 epochs with the decay every 20 epochs (a longer fit)."""
    main = [Run("mlp", 20, noise, 0) for noise in (0.5, 0.2, 0.8)]
    if which == "main":
        return main
    others = [
        Run("logreg", 20, 0.5, 0),
        Run("mlp:hidden=16", 20, 0.5, 0),
        Run("mlp", 50, 0.5, 0, lr_step_epochs=20),
    ]
    second = [Run(r.model, r.epochs, r.noise, 1, r.lr, r.lr_step_epochs) for r in main + others]
    return main + others + second + [Run("mlp", 20, 0.5, 2)]


def prepare(run: Run, directory: Path, per_test: int) -> tuple[Path, float]:
    """Record the run, analyse it (approximate C(i, j) from the stored hypergradients) and run
    reverse mode with per-test sweeps (exact and approximate C(i, j)); skip what exists."""
    from hydra_store.analysis.reverse import run_exact_analysis
    from hydra_store.analysis.stored import analyze
    from hydra_store.arguments import AnalyzeConfig, RecordConfig, ReverseConfig
    from hydra_store.recording.training import record_run

    store = directory / f"{run.name}.zarr"
    done = store / "reverse" / "test" / "zarr.json"
    if done.is_file():
        accuracy = float(zarr.open_group(str(store), mode="r").attrs.get("bench_accuracy", np.nan))
        return store, accuracy
    config = RecordConfig(
        dataset="digits",
        model=run.model,
        epochs=run.epochs,
        lr=run.lr,
        lr_step_epochs=run.lr_step_epochs,
        label_noise=run.noise,
        seed=run.seed,
        out=str(store),
        overwrite=True,
    )
    started = time.perf_counter()
    recorded = record_run(config)
    accuracy = float(recorded.epochs[-1].test_accuracy)
    analyze(store, AnalyzeConfig(figures=False))
    run_exact_analysis(store, ReverseConfig(per_test=per_test))
    zarr.open_group(str(store), mode="r+").attrs["bench_accuracy"] = accuracy
    print(
        f"  prepared {run.name}: test accuracy {accuracy:.3f}, "
        f"{time.perf_counter() - started:.0f} s",
        flush=True,
    )
    return store, accuracy


SOURCES = {
    # label: (group, C(i, j), C(i))
    "exact": ("reverse/test", "contribution_exact", "total_contribution_exact"),
    "approx": ("analysis/test", "contribution", "total_contribution"),
    # The baselines, where `--baselines` computed their per-test contributions.
    "influence": ("influence/test", "contribution", "total_contribution"),
    "tracin": ("tracin/test", "contribution", "total_contribution"),
    "trak": ("trak/test", "contribution", "total_contribution"),
}
BASELINES = ("influence", "tracin", "trak")


def prepare_baselines(store: Path, per_test: int) -> None:
    """The baselines' per-test contributions (their defaults), where not computed yet."""
    from hydra_store.analysis.methods import default_methods

    methods = default_methods()
    for name in BASELINES:
        if (store / name / "test" / "zarr.json").is_file():
            continue
        method = methods[name]
        started = time.perf_counter()
        method.run(store, method.config_from_options({"per_test": per_test}))
        print(f"  {name} on {store.name}: {time.perf_counter() - started:.0f} s", flush=True)


# (label, features, K test samples or None for all): the library's features and the paper's
# signs at fewer test samples.
CHOICES = [
    ("paper-signs", "paper-signs", None),
    ("paper-signs K=100", "paper-signs", 100),
    ("paper-signs K=36", "paper-signs", 36),
    ("median-signs", "median-signs", None),
    ("class-means", "class-means", None),
    ("total", "total", None),
]


def per_class_jaccard(suspect: np.ndarray, noisy: np.ndarray, labels: np.ndarray) -> tuple:
    from hydra_store.analysis.clustering import noise_scores

    scores = noise_scores(suspect, noisy, labels, np.zeros(labels.size))
    return scores.jaccard_clean, scores.jaccard_noisy


def score_run(run: Run, store: Path, accuracy: float, seed: int) -> dict:
    """Jaccard (correct, random) of every feature choice, the AUC of -C(i), and the
    diagnostics of the paper's signs, for each source of C(i, j)."""
    from sklearn.metrics import normalized_mutual_info_score

    from hydra_store.analysis.clustering import cluster_samples, noise_scores

    root = xr.open_zarr(str(store))
    labels = root["label"].values.astype(np.int64)
    noisy = root["is_noisy"].values.astype(bool)
    clean_label = root["clean_label"].values.astype(np.int64)
    result: dict = {"run": run, "accuracy": accuracy, "sources": {}}
    for source, (group, variable, total_name) in SOURCES.items():
        if not (store / group / "zarr.json").is_file():
            continue
        g = xr.open_zarr(str(store), group=group)
        values = np.asarray(g[variable].values, dtype=np.float64)
        total = np.asarray(g[total_name].values, dtype=np.float64)
        test_labels = g["test_label"].values.astype(np.int64)
        contribution = xr.DataArray(values, dims=("sample", "test"))
        row: dict = {"auc": noise_scores(noisy, noisy, labels, total).auc}
        for label, features, k in CHOICES:
            clusters = cluster_samples(
                contribution,
                labels,
                total,
                features=features,
                n_tests=k or values.shape[1],
                seed=seed,
                test_labels=test_labels,
            )
            row[label] = per_class_jaccard(clusters["suspect"].values, noisy, labels)
        # References that are not clustering: C(i) < 0, and the n_c * r lowest C(i) of each
        # class (knowing the noise rate r: what a ranking by C(i) allows at best).
        row["C(i) < 0"] = per_class_jaccard(total < 0, noisy, labels)
        lowest = np.zeros(labels.size, dtype=bool)
        for c in np.unique(labels):
            members = np.flatnonzero(labels == c)
            count = round(noisy[members].mean() * members.size)
            lowest[members[np.argsort(total[members], kind="stable")[:count]]] = True
        row["lowest r of each class (oracle r)"] = per_class_jaccard(lowest, noisy, labels)
        row["diagnostics"] = sign_diagnostics(
            values,
            total,
            labels,
            noisy,
            clean_label,
            test_labels,
            seed,
            normalized_mutual_info_score,
        )
        result["sources"][source] = row
    return result


def sign_diagnostics(values, total, labels, noisy, clean_label, test_labels, seed, nmi) -> dict:
    """Why the paper's signs fail: the share of positive signs by (clean / noisy sample) x
    (test sample of the training label's class / of another class), the share of the features
    that are own-class test samples, and what the k-means split of the signs follows
    (normalised mutual information with `is_noisy` and with the true class)."""
    from hydra_store.analysis.clustering import class_features, split_two, suspect_group

    own = labels[:, None] == test_labels[None, :]
    positive = values > 0
    out = {
        "positive clean/own": positive[~noisy][own[~noisy]].mean(),
        "positive noisy/own": positive[noisy][own[noisy]].mean(),
        "positive clean/other": positive[~noisy][~own[~noisy]].mean(),
        "positive noisy/other": positive[noisy][~own[noisy]].mean(),
        "own-class share of features": own.mean(),
    }
    noise_info, class_info, own_j = [], [], []
    for c in np.unique(labels):
        members = np.flatnonzero(labels == c)
        groups = split_two(class_features("paper-signs", values[members], total[members]), seed)
        noise_info.append(nmi(noisy[members], groups))
        class_info.append(nmi(clean_label[members], groups))
        # Signs of the own-class test samples alone.
        block = values[members][:, test_labels == c]
        split = suspect_group(split_two(np.where(block > 0, 1.0, -1.0), seed), total[members])
        own_j.append(per_class_jaccard(split, noisy[members], labels[members]))
    out["NMI(sign split, is_noisy)"] = float(np.mean(noise_info))
    out["NMI(sign split, true class)"] = float(np.mean(class_info))
    out["own-class signs only"] = tuple(np.mean(own_j, axis=0))
    return out


def sign_algorithms(store: Path) -> None:
    """The paper's signs clustered by other algorithms than k-means (is it the clustering?)."""
    import warnings

    from sklearn.cluster import AgglomerativeClustering, KMeans, SpectralClustering

    from hydra_store.analysis.clustering import noise_scores, suspect_group

    algorithms = {
        "k-means": lambda x: KMeans(2, n_init=4, random_state=0).fit_predict(x),
        "agglomerative, Ward": lambda x: AgglomerativeClustering(2, linkage="ward").fit_predict(x),
        "agglomerative, average Hamming": lambda x: AgglomerativeClustering(
            2, metric="hamming", linkage="average"
        ).fit_predict(x),
        "spectral, nearest neighbours": lambda x: SpectralClustering(
            2, random_state=0, affinity="nearest_neighbors"
        ).fit_predict(x),
    }
    root = xr.open_zarr(str(store))
    labels, noisy = root["label"].values, root["is_noisy"].values
    print(f"\n== the paper's signs clustered by other algorithms ({store.name}) ==")
    for source, (group, variable, total_name) in SOURCES.items():
        if not (store / group / "zarr.json").is_file():
            continue
        g = xr.open_zarr(str(store), group=group)
        values, total = g[variable].values, g[total_name].values
        cells = []
        for name, fit in algorithms.items():
            suspect = np.zeros(labels.size, dtype=bool)
            for c in np.unique(labels):
                m = np.flatnonzero(labels == c)
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    groups = fit(np.where(values[m] > 0, 1.0, -1.0))
                suspect[m] = suspect_group(groups, total[m])
            scores = noise_scores(suspect, noisy, labels, total)
            cells.append(f"{name} {scores.jaccard_clean:.3f}/{scores.jaccard_noisy:.3f}")
        print(f"{source:>9}: " + ", ".join(cells))


def print_tables(rows: list[dict]) -> None:
    from hydra_store.analysis.noise_table import PAPER_TABLE4

    labels = [c[0] for c in CHOICES] + ["C(i) < 0", "lowest r of each class (oracle r)"]
    for source in SOURCES:
        print(f"\n== Jaccard correct / random labels ({source} C(i, j)); AUC of -C(i) ==")
        head = f"{'run':<28} {'acc':>5} " + " ".join(f"{c[:17]:>17}" for c in labels) + "    AUC"
        print(head)
        for row in rows:
            if source not in row["sources"]:
                continue
            r = row["sources"][source]
            cells = " ".join(f"{r[c][0]:>8.3f}/{r[c][1]:<8.3f}" for c in labels)
            print(f"{row['run'].name:<28} {row['accuracy']:>5.3f} {cells} {r['auc']:.3f}")
        print("  by setting (mean over the runs of the setting):")
        settings = sorted({(row["run"].setting, row["run"].noise) for row in rows})
        for setting, noise in settings:
            chosen = [
                r["sources"][source]
                for r in rows
                if (r["run"].setting, r["run"].noise) == (setting, noise) and source in r["sources"]
            ]
            if not chosen:
                continue
            cells = " ".join(
                f"{np.mean([c[x][0] for c in chosen]):>8.3f}/"
                f"{np.mean([c[x][1] for c in chosen]):<8.3f}"
                for x in labels
            )
            auc = np.mean([c["auc"] for c in chosen])
            print(f"{setting + f' {noise:.0%}':<28} {len(chosen):>5} {cells} {auc:.3f}")
    print("\n== why the paper's signs stay near 0.5: diagnostics ==")
    for source in SOURCES:
        for row in [row for row in rows if source in row["sources"]]:
            d = row["sources"][source]["diagnostics"]
            text = ", ".join(
                f"{k} {v[0]:.3f}/{v[1]:.3f}" if isinstance(v, tuple) else f"{k} {v:.3f}"
                for k, v in d.items()
            )
            print(f"{source:>6} {row['run'].name:<28} {text}")
    print("\npaper's Table 4 (Jaccard correct / random labels):")
    for name, (correct, random) in PAPER_TABLE4.items():
        print(f"  {name:<36} {correct:.4f} / {random:.4f}")
    print("a random 50/50 split of a class with half of it mislabelled scores about 0.33")


def fashion_mnist(data_root: str, directory: Path) -> None:
    """The paper's second data set, cut to what 2 cores allow: 6,000 training samples (600 per
    class, drawn with seed 0) and the first 1,000 test samples (the paper's 1,000-dimensional
    feature), the MLP for 20 epochs at lr 0.1, 50% label noise; approximate C(i, j) from
    `analyze`, TRAK-style and TracIn per test sample (reverse mode's exact sweeps and the
    influence functions' per-test solves would take hours here), then the table."""
    from hydra_store.analysis.methods import default_methods
    from hydra_store.analysis.noise_table import run_noise_table
    from hydra_store.analysis.stored import analyze
    from hydra_store.arguments import AnalyzeConfig, RecordConfig
    from hydra_store.data.datasets import load_dataset
    from hydra_store.recording.training import record_run

    data = directory / "fashion-mnist-6k.npz"
    store = directory / "fashion-mnist-6k-n50.zarr"
    if not data.is_file():
        bundle = load_dataset("fashion-mnist", data_root=data_root, seed=0)
        rng = np.random.default_rng(0)
        y = bundle.train.targets.numpy()
        keep = np.sort(
            np.concatenate(
                [rng.choice(np.flatnonzero(y == c), 600, replace=False) for c in range(10)]
            )
        )
        np.savez(
            data,
            x_train=bundle.train.inputs.numpy()[keep],
            y_train=y[keep],
            x_test=bundle.test.inputs.numpy()[:1000],
            y_test=bundle.test.targets.numpy()[:1000],
            class_names=np.asarray(bundle.class_names, dtype=str),
        )
    if not (store / "trak" / "test" / "zarr.json").is_file():
        config = RecordConfig(
            dataset=str(data), epochs=20, lr=0.1, label_noise=0.5, out=str(store), overwrite=True
        )
        recorded = record_run(config)
        print(f"  fashion-mnist: test accuracy {recorded.epochs[-1].test_accuracy:.3f}")
        analyze(store, AnalyzeConfig(figures=False))
        methods = default_methods()
        for name in ("tracin", "trak"):
            methods[name].run(store, methods[name].config_from_options({"per_test": 1000}))
    print("\n== Fashion-MNIST, 6,000 training samples, 1,000 test samples, 50% noise ==")
    for line in run_noise_table(store).lines():
        print(line)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", choices=("main", "all"), default="all")
    parser.add_argument("--dir", default="/tmp/bench-clustering")
    parser.add_argument("--per-test", type=int, default=360)
    parser.add_argument("--prepare-only", action="store_true")
    parser.add_argument(
        "--baselines",
        choices=("none", "main", "all"),
        default="main",
        help="runs given the baselines' per-test contributions (main: the three noise rates of "
        "the MLP, seed 0)",
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of k-means and the draws")
    parser.add_argument(
        "--fashion-mnist",
        metavar="DATA_ROOT",
        help="also a Fashion-MNIST run (its IDX files under DATA_ROOT/fashion-mnist)",
    )
    args = parser.parse_args()
    directory = Path(args.dir)
    directory.mkdir(parents=True, exist_ok=True)
    stores = []
    main_runs = planned_runs("main")
    for run in planned_runs(args.runs):
        stores.append((run, *prepare(run, directory, args.per_test)))
        if args.baselines == "all" or (args.baselines == "main" and run in main_runs):
            prepare_baselines(stores[-1][1], args.per_test)
    if args.prepare_only:
        return
    rows = [score_run(run, store, accuracy, args.seed) for run, store, accuracy in stores]
    print_tables(rows)
    sign_algorithms(stores[0][1])
    if args.fashion_mnist:
        fashion_mnist(args.fashion_mnist, directory)


if __name__ == "__main__":
    main()
