"""`compare` and `validate`: the exact reverse-mode contribution as the gold standard, and
leave-one-out retraining as the ground truth (thin: parse, call, print)."""

from __future__ import annotations

from pathlib import Path

import typer

from cli.common import StageBars, user_errors


def register(app: typer.Typer) -> None:
    """Add the `compare` and `validate` commands to the hydra-store app."""

    @app.command()
    def compare(
        store: Path = typer.Argument(..., help="the recorded store"),
        test_set: str = typer.Option("test", "--test-set", help="test split or data set"),
        checkpoints: bool = typer.Option(
            True, "--checkpoints/--no-checkpoints", help="also score over checkpoints and plot"
        ),
        every: int = typer.Option(1, "--every", help="score every k-th checkpoint"),
        png: Path | None = typer.Option(None, "--png", help="plot path (default beside store)"),
    ) -> None:
        """Score the approximate HyDRA contribution (and every stored method) against the exact
        contribution of all training samples: sign error rate and Spearman correlation."""
        from hydra_store.comparison import run_comparison

        bars = StageBars()
        with user_errors():
            try:
                summary = run_comparison(
                    store,
                    test_set,
                    over_checkpoints=checkpoints,
                    every=every,
                    png=png,
                    progress=bars,
                )
            finally:
                bars.close()
        for line in summary.lines():
            typer.echo(line)

    @app.command()
    def validate(
        store: Path = typer.Argument(..., help="the recorded store"),
        test_set: str = typer.Option("test", "--test-set", help="test split or data set"),
        samples: int = typer.Option(50, "--samples", help="training samples to leave out"),
        selection: str = typer.Option(
            "random", "--selection", help="random, influential (largest |C|) or mixed"
        ),
        seed: int = typer.Option(0, "--seed"),
        scheduler: str = typer.Option(
            "threads", "--scheduler", help="threads, local-cluster, or a scheduler address"
        ),
    ) -> None:
        """Leave-one-out retraining through the stored trajectory: correlation of each stored
        method's predicted contribution with the measured change of the test loss."""
        from hydra_store.validation import run_validation

        bars = StageBars()
        with user_errors():
            try:
                summary = run_validation(
                    store,
                    test_set,
                    samples=samples,
                    selection=selection,
                    seed=seed,
                    scheduler=scheduler,
                    progress=bars,
                )
            finally:
                bars.close()
        for line in summary.lines():
            typer.echo(line)
