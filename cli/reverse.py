"""`compare` and `validate`: the exact reverse-mode contribution as the gold standard, and
leave-one-out retraining as the ground truth (thin: parse, call, print)."""

from __future__ import annotations

import typer

from hydra_store.arguments import CompareConfig, LdsConfig, ValidateConfig
from hydra_store.errors import InvalidArgumentError
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

# Every option's default is its config's: the CLI repeats none of them.
_COMPARE = CompareConfig()
_VALIDATE = ValidateConfig()
_LDS = LdsConfig()


def _method_names(text: str | None) -> tuple[str, ...] | None:
    """`--checkpoint-methods` as names: None (all), () for 'none', else the comma-separated
    names."""
    if text is None:
        return None
    names = tuple(part.strip() for part in text.split(",") if part.strip())
    if names == ("none",):
        return ()
    if not names:
        raise InvalidArgumentError(
            "--checkpoint-methods: name methods separated by commas (e.g. influence,tracin), "
            "or 'none'"
        )
    return names


def register(app: typer.Typer) -> None:
    """Add the `compare` and `validate` commands to the hydra-store app."""

    @app.command()
    def compare(
        store: str = typer.Argument(..., help="the recorded store"),
        test_set: str = typer.Option(
            _COMPARE.test_set, "--test-set", help="test split or data set"
        ),
        checkpoints: bool = typer.Option(
            _COMPARE.over_checkpoints,
            "--checkpoints/--no-checkpoints",
            help="also score over checkpoints and plot",
        ),
        every: int = typer.Option(_COMPARE.every, "--every", help="score every k-th checkpoint"),
        png: str | None = typer.Option(
            None, "--png", help="plot path or URL (default beside store)"
        ),
        checkpoint_methods: str | None = typer.Option(
            _COMPARE.checkpoint_methods,
            "--checkpoint-methods",
            help="methods scored over checkpoints beside HyDRA's approximation, comma-"
            "separated (influence, tracin, trak), each with the options it last ran with on "
            "this store, else its defaults (influence: cg); 'none': HyDRA only "
            "[default: all of them]",
        ),
        device: str | None = typer.Option(
            _COMPARE.device,
            "--device",
            help="cpu or cuda: where the reverse sweeps (over checkpoints, and one for the exact "
            "contributions not stored yet) and the checkpoint methods run (a method's stored "
            "options are reused, its device is this one) [default: cpu]",
        ),
        out: str | None = RESULTS_OUT_OPTION,
        dataset: str | None = DATASET_OPTION,
        model: str | None = MODEL_OPTION,
        data_root: str | None = DATA_ROOT_OPTION,
        data_seed: int = DATA_SEED_OPTION,
    ) -> None:
        """Score the approximate HyDRA contribution (and every stored method) against the exact
        contribution of all training samples: sign error rate and Spearman correlation; over
        checkpoints also influence functions, TracIn and TRAK-style (the paper's Figures 4
        and 5)."""
        from hydra_store.analysis.comparison import run_comparison

        full_float32_on_gpus()
        bars = StageBars()
        with user_errors():
            name_store(store, dataset, model, data_root, data_seed)
            try:
                config = CompareConfig(
                    test_set=test_set,
                    over_checkpoints=checkpoints,
                    every=every,
                    png=None if png is None else str(png),
                    checkpoint_methods=_method_names(checkpoint_methods),
                    device=device,
                )
                summary = run_comparison(store, config, progress=bars, out=out)
            finally:
                bars.close()
        for line in summary.lines():
            typer.echo(line)

    @app.command()
    def validate(
        store: str = typer.Argument(..., help="the recorded store"),
        test_set: str = typer.Option(
            _VALIDATE.test_set, "--test-set", help="test split or data set"
        ),
        samples: int = typer.Option(
            _VALIDATE.samples, "--samples", help="training samples to leave out"
        ),
        selection: str = typer.Option(
            _VALIDATE.selection, "--selection", help="random, influential (largest |C|) or mixed"
        ),
        seed: int = typer.Option(_VALIDATE.seed, "--seed"),
        lds: bool = typer.Option(
            False,
            "--lds",
            help="instead of leave-one-out: the linear datamodeling score (retrain on random "
            "training subsets; per test sample, Spearman between each method's predicted and "
            "the measured test loss)",
        ),
        lds_subsets: int | None = typer.Option(
            None,
            "--lds-subsets",
            help=f"with --lds: how many random subsets to retrain on [default: {_LDS.subsets}]",
        ),
        lds_fraction: float | None = typer.Option(
            None,
            "--lds-fraction",
            help=f"with --lds: the fraction of the training set in each subset "
            f"[default: {_LDS.fraction:g}]",
        ),
        scheduler: str = typer.Option(
            _VALIDATE.scheduler,
            "--scheduler",
            help="threads, local-cluster, or a scheduler address",
        ),
        device: str | None = typer.Option(
            _VALIDATE.device,
            "--device",
            help="cpu or cuda: where the retrainings (and a reverse sweep not stored yet) run "
            "[default: cpu]",
        ),
        out: str | None = RESULTS_OUT_OPTION,
        dataset: str | None = DATASET_OPTION,
        model: str | None = MODEL_OPTION,
        data_root: str | None = DATA_ROOT_OPTION,
        data_seed: int = DATA_SEED_OPTION,
    ) -> None:
        """Leave-one-out retraining through the stored trajectory: correlation of each stored
        method's predicted contribution with the measured change of the test loss. With --lds,
        the linear datamodeling score over random training subsets instead."""
        from hydra_store.analysis.lds import run_lds
        from hydra_store.analysis.validation import run_validation

        full_float32_on_gpus()
        bars = StageBars()
        with user_errors():
            lds_config = None
            if lds:
                lds_config = LdsConfig(
                    test_set=test_set,
                    subsets=_LDS.subsets if lds_subsets is None else lds_subsets,
                    fraction=_LDS.fraction if lds_fraction is None else lds_fraction,
                    seed=seed,
                    scheduler=scheduler,
                    device=device,
                )
                lds_config.validate()  # before a store is named or anything is read
            elif lds_subsets is not None or lds_fraction is not None:
                raise InvalidArgumentError("--lds-subsets and --lds-fraction need --lds")
            name_store(store, dataset, model, data_root, data_seed)
            try:
                if lds_config is not None:
                    summary = run_lds(store, lds_config, progress=bars, out=out)
                else:
                    config = ValidateConfig(
                        test_set=test_set,
                        samples=samples,
                        selection=selection,
                        seed=seed,
                        scheduler=scheduler,
                        device=device,
                    )
                    summary = run_validation(store, config, progress=bars, out=out)
            finally:
                bars.close()
        for line in summary.lines():
            typer.echo(line)
