"""`history`: the paper's Figure 3, the drift of the Hessian-free hypergradient from the exact one
over training (thin: parse, call, print)."""

from __future__ import annotations

import typer

from hydra_store_cli.common import RESULTS_OUT_OPTION, user_errors


def history_lines(store: str, png: str | None = None, out: str | None = None) -> list[str]:
    """Run the Figure 3 analysis of a `--mode both --hypergradient-history` store; its lines."""
    from hydra_store.analysis.history import run_history

    return run_history(store, png=png, out=out).lines()


def register(app: typer.Typer) -> None:
    """Add the `history` command to the hydra-store app."""

    @app.command()
    def history(
        store: str = typer.Argument(
            ..., help="a store recorded with --mode both --hypergradient-history"
        ),
        png: str | None = typer.Option(
            None, "--png", help="plot path or URL (default: <store>-history.png beside it)"
        ),
        out: str | None = RESULTS_OUT_OPTION,
    ) -> None:
        """The paper's Figure 3: |h_exact - h|_2 of every tracked sample at every checkpoint,
        its mean and spread, written to history/hypergradient_error and plotted."""
        with user_errors():
            lines = history_lines(store, png, out)
        for line in lines:
            typer.echo(line)
