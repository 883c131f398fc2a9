"""`hydra-store analyze` and `hydra-store suspects`: parse, call the library, print."""

from __future__ import annotations

import sys
import warnings
from pathlib import Path

import typer

from hydra_store.arguments import AnalyzeConfig, InfluenceConfig, TrakConfig
from hydra_store.errors import IndefiniteHessianWarning
from hydra_store.execution import SCHEDULER_HELP
from hydra_store_cli.common import (
    DATA_ROOT_OPTION,
    DATA_SEED_OPTION,
    DATASET_OPTION,
    MODEL_OPTION,
    RESULTS_OUT_OPTION,
    StageBars,
    name_store,
    user_errors,
)

# Every option's default is the AnalyzeConfig's: the CLI repeats none of them.
_ANALYZE = AnalyzeConfig()
_INFLUENCE, _TRAK = InfluenceConfig(), TrakConfig()


def _given(**options):
    """The baselines' options that were given (None: the method's own default)."""
    return {name: value for name, value in options.items() if value is not None}


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
    lines.append(f"sign clustering: {summary.n_suspects} of {summary.n_samples} samples suspect")
    if summary.noise is not None:
        n = summary.noise
        lines.append(
            f"injected label noise ({n.noise_rate:.0%}): Jaccard {n.jaccard:.3f} "
            f"(mislabelled {n.jaccard_noisy:.3f}, correct {n.jaccard_clean:.3f}), "
            f"AUC {n.auc:.3f}, precision at the noise rate {n.precision_at_rate:.3f}"
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
            _ANALYZE.checkpoint, help="checkpoint whose weights give the test gradients"
        ),
        top_k: int = typer.Option(
            _ANALYZE.top_k, "--top-k", help="influencers kept per test sample"
        ),
        clusters_k: int = typer.Option(
            _ANALYZE.clusters_k,
            "--clusters-k",
            help="test samples drawn for sign clustering (all if fewer)",
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
            None, "--per-test", help="hydra-exact only: test samples given their own sweep"
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
        out: str | None = RESULTS_OUT_OPTION,
        dataset: str | None = DATASET_OPTION,
        model: str | None = MODEL_OPTION,
        data_root: str | None = DATA_ROOT_OPTION,
        data_seed: int = DATA_SEED_OPTION,
    ) -> None:
        """Contributions, inter-class matrix, top influencers and sign clustering of a store."""
        from hydra_store.analysis.methods import default_methods

        bars = StageBars()
        with user_errors():
            name_store(store, dataset, model, data_root, data_seed)
            try:
                chosen = default_methods()[method]
                config = chosen.config_from_options(
                    {
                        "test_set": test_set,
                        "checkpoint": checkpoint,
                        "top_k": top_k,
                        "clusters_k": clusters_k,
                        "seed": seed,
                        "scheduler": scheduler,
                        "memory_limit": memory_limit,
                        "batch_size": batch_size,
                        "figures": not no_figures,
                        "per_test": per_test,
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
    ) -> None:
        """Training samples ranked from most harmful, as CSV (index, label, total contribution,
        suspect flag)."""
        with user_errors():
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
                f"{n['precision_at_noise_rate']:.3f}, AUC {n['auc']:.3f}, Jaccard {n['jaccard']:.3f}",
                err=True,
            )
