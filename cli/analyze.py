"""`hydra-store analyze` and `hydra-store suspects`: parse, call the library, print."""

from __future__ import annotations

import sys
import warnings
from pathlib import Path

import typer

from hydra_store.arguments import (
    CLUSTER_FEATURES,
    AnalyzeConfig,
    ClusteringConfig,
    InfluenceConfig,
    TrakConfig,
    validate_device,
)
from hydra_store.errors import IndefiniteHessianWarning, InvalidArgumentError
from hydra_store.execution import SCHEDULER_HELP
from hydra_store_cli.common import (
    DATA_ROOT_OPTION,
    DATA_SEED_OPTION,
    DATASET_OPTION,
    MODEL_OPTION,
    RESULTS_OUT_OPTION,
    StageBars,
    full_float32_on_gpus,
    name_store,
    user_errors,
)

# Every option's default is the AnalyzeConfig's: the CLI repeats none of them.
_ANALYZE = AnalyzeConfig()
_INFLUENCE, _TRAK = InfluenceConfig(), TrakConfig()
_CLUSTERING = ClusteringConfig()
CLUSTER_FEATURES_HELP = (
    "features the training classes are clustered on to find mislabelled samples: "
    f"{', '.join(CLUSTER_FEATURES)} (paper-signs: the paper's Table 4; docs/analysis.md)"
)


def _given(**options):
    """The baselines' options that were given (None: the method's own default)."""
    return {name: value for name, value in options.items() if value is not None}


def _check_device(method, device: str | None) -> None:
    """A device other than the CPU only for a method that takes one (its arguments have a
    `device`: every built-in method; a plug-in's may not)."""
    if device in (None, "cpu") or method.takes_device:
        return
    validate_device(device)  # a name that is no device says so first
    raise InvalidArgumentError(
        f"--device {device}: method {method.name!r} runs on the CPU only; leave --device out"
    )


def summary_lines(summary) -> list[str]:
    names = summary.class_names
    lines = [
        f"analysed {summary.path} against test set {summary.test_set!r} "
        f"({summary.n_samples} training samples x {summary.n_test} test samples, "
        f"{summary.n_params} parameters"
        + (
            f", projected to {summary.projected_width}"
            if summary.projected_width is not None
            else ""
        )
        + f") in {summary.seconds:.1f} s",
        f"written to group {summary.group}: {', '.join(summary.variables)}",
        f"open with: xr.open_zarr({str(summary.path)!r}, group={summary.group!r})",
    ]
    for name, parts in summary.extremes.items():
        tiles = ", ".join(
            f"#{i} ({names[int(label)]}) {value:+.3g}"
            for i, label, value in list(
                zip(parts["index"], parts["label"], parts["value"], strict=True)
            )[:5]
        )
        lines.append(f"{name.replace('_', ' ')}: {tiles}")
    lines.append(
        f"inter-class: {summary.interclass_diagonal_share:.0%} of training classes help their "
        "own test class most"
    )
    lines.append(
        f"clustering on {summary.cluster_features}: {summary.n_suspects} of "
        f"{summary.n_samples} samples suspect"
    )
    if summary.noise is not None:
        n = summary.noise
        lines.append(
            f"injected label noise ({n.noise_rate:.0%}): AUC {n.auc:.3f}, precision at the "
            f"noise rate {n.precision_at_rate:.3f}"
        )
        for scores in (summary.noise, summary.noise_paper):
            if scores is not None:
                lines.append(
                    f"  clustering on {scores.features}: Jaccard correct labels "
                    f"{scores.jaccard_clean:.3f}, random labels {scores.jaccard_noisy:.3f}"
                )
    for figure in summary.figures:
        lines.append(f"figure: {figure}")
    return lines


def register(app: typer.Typer) -> None:
    """Add the `analyze` and `suspects` commands to the app."""

    @app.command()
    def analyze(
        store: str = typer.Argument(..., help="a complete hydra-store store"),
        test_set: str = typer.Option(
            _ANALYZE.test_set,
            "--test-set",
            help="'test' (the run's test split), 'validation', or a data-set spec of the same "
            "input shape",
        ),
        checkpoint: int = typer.Option(
            _ANALYZE.checkpoint,
            help="checkpoint whose weights give the test gradients (negative: from the end); "
            "hydra-exact: the trajectory is cut there; influence, trak: computed at its "
            "weights; tracin: summed over checkpoints 1..it",
        ),
        top_k: int = typer.Option(
            _ANALYZE.top_k, "--top-k", help="influencers kept per test sample"
        ),
        clusters_k: int = typer.Option(
            _ANALYZE.clusters_k,
            "--clusters-k",
            help="test samples drawn for clustering on per-test features (all if fewer)",
        ),
        cluster_features: str = typer.Option(
            _ANALYZE.cluster_features,
            "--cluster-features",
            help=CLUSTER_FEATURES_HELP,
        ),
        seed: int = typer.Option(
            _ANALYZE.seed, help="seed of the test samples drawn for clustering"
        ),
        scheduler: str = typer.Option(_ANALYZE.scheduler, help=SCHEDULER_HELP),
        memory_limit: str | None = typer.Option(
            _ANALYZE.memory_limit,
            "--memory-limit",
            help="memory limit per worker for local-cluster, e.g. 2GB",
        ),
        batch_size: int = typer.Option(
            _ANALYZE.batch_size, "--batch-size", help="test samples per gradient batch"
        ),
        method: str = typer.Option(
            "hydra",
            help="hydra: stored hypergradients; hydra-exact: reverse sweep through the "
            "trajectory; baselines: influence (influence functions at the final weights), "
            "tracin (TracIn over the checkpoints), trak (TRAK-style, projected gradients) "
            "(the contribution methods of hydra_store.analysis.methods)",
        ),
        per_test: int | None = typer.Option(
            None,
            "--per-test",
            help="hydra-exact, influence, tracin, trak: C(i, j) for the first K test samples "
            "too (hydra-exact: a sweep each)",
        ),
        solver: str | None = typer.Option(
            None,
            "--solver",
            help=f"influence only: explicit, cg or lissa [default: {_INFLUENCE.solver}]",
        ),
        damping: float | None = typer.Option(
            None,
            "--damping",
            help="influence: added to the Hessian [default: 3 x its most negative eigenvalue]; "
            f"trak: added to the Gram matrix / N [default: {_TRAK.damping}]",
        ),
        lissa_scale: float | None = typer.Option(
            None, "--lissa-scale", help="influence lissa: scale [default: 1.5 x largest eigenvalue]"
        ),
        lissa_depth: int | None = typer.Option(
            None,
            "--lissa-depth",
            help=f"influence lissa: recursion depth [default: {_INFLUENCE.lissa_depth}]",
        ),
        lissa_repeats: int | None = typer.Option(
            None,
            "--lissa-repeats",
            help=f"influence lissa: recursions averaged [default: {_INFLUENCE.lissa_repeats}]",
        ),
        project_dim: int | None = typer.Option(
            None,
            "--project-dim",
            help=f"trak only: projection width [default: {_TRAK.project_dim}]",
        ),
        no_figures: bool = typer.Option(False, "--no-figures", help="skip the PNG figures"),
        device: str | None = typer.Option(
            None,
            "--device",
            help="cpu or cuda: where the model's work runs (hydra: the test gradients; "
            "hydra-exact: the reverse sweep; influence, tracin, trak: the model, its gradients, "
            "the Hessian and its solves or the projected Gram matrix) [default: cpu]",
        ),
        out: str | None = RESULTS_OUT_OPTION,
        dataset: str | None = DATASET_OPTION,
        model: str | None = MODEL_OPTION,
        data_root: str | None = DATA_ROOT_OPTION,
        data_seed: int = DATA_SEED_OPTION,
    ) -> None:
        """Contributions, inter-class matrix, top influencers and clustering of a store."""
        from hydra_store.analysis.methods import default_methods

        full_float32_on_gpus()
        bars = StageBars()
        with user_errors():
            name_store(store, dataset, model, data_root, data_seed)
            try:
                chosen = default_methods()[method]
                _check_device(chosen, device)
                config = chosen.config_from_options(
                    {
                        "test_set": test_set,
                        "checkpoint": checkpoint,
                        "top_k": top_k,
                        "clusters_k": clusters_k,
                        "cluster_features": cluster_features,
                        "seed": seed,
                        "scheduler": scheduler,
                        "memory_limit": memory_limit,
                        "batch_size": batch_size,
                        "figures": not no_figures,
                        "per_test": per_test,
                        "device": device,
                        **_given(
                            solver=solver,
                            damping=damping,
                            lissa_scale=lissa_scale,
                            lissa_depth=lissa_depth,
                            lissa_repeats=lissa_repeats,
                            project_dim=project_dim,
                        ),
                    }
                )
                with warnings.catch_warnings():
                    # An indefinite Hessian is a line of the summary, not a Python warning.
                    warnings.simplefilter("ignore", IndefiniteHessianWarning)
                    summary = chosen.run(store, config, progress=bars, out=out)
            finally:
                bars.close()
        lines = summary_lines(summary) if chosen.name == "hydra" else summary.lines()
        for line in lines:
            typer.echo(line)

    @app.command()
    def suspects(
        store: str = typer.Argument(..., help="a store analysed with `hydra-store analyze`"),
        test_set: str = typer.Option("test", "--test-set", help="the analysed test set"),
        out: Path | None = typer.Option(None, "--out", help="CSV file (default: stdout)"),
        results: str | None = typer.Option(
            None,
            "--results",
            help="the results store the analysis was written to (--out of analyze)",
        ),
        all_methods: bool = typer.Option(
            False,
            "--all-methods",
            help="instead of the CSV: the paper's Table 4 for every method with per-test "
            "contributions (Jaccard indices and AUC against the injected label noise), written "
            "to clustering/<test set>",
        ),
        cluster_features: str | None = typer.Option(
            None,
            "--cluster-features",
            help=f"with --all-methods: {CLUSTER_FEATURES_HELP} [default: "
            f"{_CLUSTERING.features}; the paper's signs are always scored too]",
        ),
        clusters_k: int | None = typer.Option(
            None,
            "--clusters-k",
            help="with --all-methods: test samples drawn for per-test features [default: "
            f"{_CLUSTERING.clusters_k}, all if fewer]",
        ),
        seed: int | None = typer.Option(
            None,
            help=f"with --all-methods: seed of the draw and k-means [default: {_CLUSTERING.seed}]",
        ),
    ) -> None:
        """Training samples ranked from most harmful, as CSV (index, label, total contribution,
        suspect flag); with --all-methods, the clustering table of every method."""
        with user_errors():
            clustering = _given(features=cluster_features, clusters_k=clusters_k, seed=seed)
            if all_methods:
                if out is not None:
                    raise InvalidArgumentError(
                        "--out writes the CSV of one analysis; leave it out with --all-methods "
                        "(the table is written to clustering/<test set>)"
                    )
                from hydra_store.analysis.noise_table import run_noise_table

                config = ClusteringConfig(test_set=test_set, **clustering)
                for line in run_noise_table(store, config, results=results).lines():
                    typer.echo(line)
                return
            if clustering:
                raise InvalidArgumentError(
                    "--cluster-features, --clusters-k and --seed go with --all-methods; the CSV "
                    "shows the clustering `analyze` made (give them to `analyze`)"
                )
            from hydra_store.analysis.stored import suspects as run_suspects

            table = run_suspects(store, test_set, results)
        text = table.to_csv()
        if out is None:
            sys.stdout.write(text)
        else:
            out.write_text(text)
            typer.echo(f"wrote {len(table.rows)} rows to {out}", err=True)
        if table.noise is not None:
            n = table.noise
            typer.echo(
                f"injected label noise ({n['noise_rate']:.0%}): precision at the noise rate "
                f"{n['precision_at_noise_rate']:.3f}, AUC {n['auc']:.3f}",
                err=True,
            )
            for scores in (table.noise, table.noise_paper):
                if scores:
                    typer.echo(
                        f"  clustering on {scores.get('features', 'paper-signs')}: Jaccard "
                        f"correct labels {scores['jaccard_clean']:.3f}, random labels "
                        f"{scores['jaccard_noisy']:.3f}",
                        err=True,
                    )
