"""`clean`: the paper's Table 3, cleaning a noisy training set by each method's ranking and
retraining from scratch (thin: parse, call, print)."""

from __future__ import annotations

import typer

from hydra_store.arguments import CleanConfig
from hydra_store.execution import SCHEDULER_HELP
from hydra_store_cli.common import (
    RESULTS_OUT_OPTION,
    StageBars,
    full_float32_on_gpus,
    user_errors,
)

# Every option's default is the CleanConfig's: the CLI repeats none of them.
_CLEAN = CleanConfig()


def register(app: typer.Typer) -> None:
    """Add the `clean` command to the hydra-store app."""

    @app.command()
    def clean(
        store: str = typer.Argument(..., help="the recorded store"),
        test_set: str | None = typer.Option(
            _CLEAN.test_set,
            "--test-set",
            help="the set whose contributions C(i) rank the training samples (default: "
            "validation when the store has a validation split, else test)",
        ),
        evaluate_on: str = typer.Option(
            _CLEAN.evaluate_on, "--evaluate-on", help="the set the accuracy is measured on"
        ),
        rate: float | None = typer.Option(
            _CLEAN.rate,
            "--rate",
            help="share of the training set to drop, in [0, 1) (default: the store's injected "
            "label-noise rate)",
        ),
        seeds: int = typer.Option(
            _CLEAN.seeds,
            "--seeds",
            help="retrainings per ranking, seeds 0..S-1 (initial weights and batch order)",
        ),
        method: list[str] | None = typer.Option(
            None,
            "--method",
            help="a ranking to retrain with (repeatable): hydra-exact, hydra, influence, "
            "tracin, trak (their stored C(i)), none (no filtering), random, oracle (the "
            "mislabelled samples); default: every stored ranking and the three references",
        ),
        seed: int = typer.Option(_CLEAN.seed, "--seed", help="seed of the random drop"),
        scheduler: str = typer.Option(
            _CLEAN.scheduler, "--scheduler", help=f"where the retrainings run: {SCHEDULER_HELP}"
        ),
        workers: int | None = typer.Option(
            _CLEAN.workers, "--workers", help="retrainings at once (threads or cluster workers)"
        ),
        device: str | None = typer.Option(
            _CLEAN.device, "--device", help="cpu or cuda (default: the store's)"
        ),
        png: str | None = typer.Option(
            _CLEAN.png, "--png", help="bar chart path (default beside the store)"
        ),
        within_class: bool = typer.Option(
            _CLEAN.within_class,
            "--within-class",
            help="drop the lowest C(i) within each training class (the same total, shared "
            "among the classes by their sizes; random as many per class) instead of one "
            "global ranking",
        ),
        out: str | None = RESULTS_OUT_OPTION,
    ) -> None:
        """Drop the training samples each method ranks least useful (the lowest C(i), the
        given share), retrain from scratch on the rest with the store's recipe over several
        seeds, and report the final accuracy beside no filtering, a random drop and the oracle
        (the paper's Table 3)."""
        from hydra_store.analysis.cleaning import run_cleaning

        full_float32_on_gpus()
        bars = StageBars()
        with user_errors():
            config = CleanConfig(
                test_set=test_set,
                evaluate_on=evaluate_on,
                rate=rate,
                seeds=seeds,
                rankings=tuple(method) if method else None,
                seed=seed,
                scheduler=scheduler,
                workers=workers,
                device=device,
                png=png,
                within_class=within_class,
            )
            config.validate()  # before the store is read
            try:
                summary = run_cleaning(store, config, progress=bars, out=out)
            finally:
                bars.close()
        for line in summary.lines():
            typer.echo(line)
