"""`hydra-store`: record HyDRA hypergradients, inspect stores, analyse them."""

from __future__ import annotations

import sys
from pathlib import Path

import typer

from hydra_store.arguments import RecordConfig
from hydra_store.execution import SCHEDULER_HELP
from hydra_store.store.location import store_path, tree_bytes
from hydra_store_cli.common import (
    OneLineErrors,
    StageBars,
    call,
    full_float32_on_gpus,
    human_bytes,
    limit_malloc_arenas,
    progress_bar,
    terminate_on_sigterm,
    user_errors,
)

# Every option's default is the RecordConfig's: the CLI repeats none of them.
_RECORD = RecordConfig()

app = typer.Typer(
    cls=OneLineErrors,
    help="HyDRA: measure how much each training sample helped or hurt each test prediction, "
    "from hypergradients tracked along the whole SGD trajectory and kept in a Zarr store.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)


@app.callback()
def _root() -> None:
    """hydra-store: record, inspect and analyse HyDRA hypergradient stores."""


@app.command()
def record(
    context: typer.Context,
    dataset: str = typer.Option(
        _RECORD.dataset,
        help="digits (scikit-learn, offline), synthetic[:n=..,size=..,channels=..,classes=..,"
        "test=..], mnist, fashion-mnist, cifar10 (standard files in --data-root), a .npz file "
        "or zarr group with x_train/y_train/x_test/y_test, or package.module:function.",
    ),
    model: str = typer.Option(
        _RECORD.model, help="logreg, mlp (mlp:hidden=64,32), lenet5, or package.module:function."
    ),
    epochs: int = typer.Option(_RECORD.epochs, help="Training epochs."),
    batch_size: int = typer.Option(_RECORD.batch_size, help="Mini-batch size B."),
    lr: float = typer.Option(_RECORD.lr, help="Initial learning rate."),
    momentum: float = typer.Option(_RECORD.momentum, help="SGD momentum p (0 for plain SGD)."),
    weight_decay: float = typer.Option(
        _RECORD.weight_decay, help="Weight decay λ (L2 coefficient)."
    ),
    schedule: str = typer.Option(
        _RECORD.schedule,
        help="Learning-rate schedule: constant; step (x --lr-decay every --lr-step-epochs); "
        "exponential (x --lr-decay every epoch); plateau (x --lr-decay when train+validation "
        "loss has not improved by 0.01% for --plateau-patience epochs); cosine (per step).",
    ),
    lr_decay: float = typer.Option(
        _RECORD.lr_decay, help="Decay factor (default: 0.1 step, 0.95 exponential, 0.5 plateau)."
    ),
    lr_step_epochs: int = typer.Option(
        _RECORD.lr_step_epochs, help="Epochs between decays of the step schedule."
    ),
    plateau_patience: int = typer.Option(
        _RECORD.plateau_patience, help="Epochs without improvement before a decay."
    ),
    seed: int = typer.Option(
        _RECORD.seed, help="Seed of the split, model init, batch order, noise, tracking."
    ),
    track: str = typer.Option(
        _RECORD.track,
        help="Training samples to track: 'all', a count (drawn stratified by class), or a file "
        "of indices (.npy or whitespace-separated text).",
    ),
    label_noise: float = typer.Option(
        _RECORD.label_noise,
        help="Fraction of training labels reassigned at random to a wrong class.",
    ),
    checkpoint_every: int = typer.Option(
        _RECORD.checkpoint_every, help="Epochs between stored weight checkpoints."
    ),
    hypergradient_history: bool = typer.Option(
        _RECORD.hypergradient_history,
        "--hypergradient-history",
        help="Also store the hypergradients at every checkpoint (checkpoint x sample x param; "
        "written in the background while training goes on).",
    ),
    out: str = typer.Option(
        _RECORD.out,
        help="Path of the Zarr store to write, or an fsspec URL (s3://bucket/run.zarr).",
    ),
    overwrite: bool = typer.Option(_RECORD.overwrite, help="Replace an existing store at --out."),
    device: str = typer.Option(_RECORD.device, help="cpu or cuda."),
    mode: str = typer.Option(
        _RECORD.mode,
        help="approximate (the paper's Algorithm 1), exact (Hessian-aware: one Hessian-vector "
        "product per tracked sample per step; hundreds of samples), or both.",
    ),
    trajectory_only: bool = typer.Option(
        False,
        "--trajectory-only",
        help="Record only the trajectory (checkpoints, batches, learning rates) at the cost of "
        "plain training; analyse later with `analyze --method hydra-exact`.",
    ),
    data_root: Path = typer.Option(
        _RECORD.data_root, help="Directory holding mnist/fashion-mnist/cifar10 files."
    ),
    validation_fraction: float = typer.Option(
        _RECORD.validation_fraction,
        help="Carve a stratified validation split of this size out of the training set.",
    ),
    memory_budget: str = typer.Option(
        _RECORD.memory_budget,
        help="Memory the tracked state may take, e.g. 4GiB (default: 80% of the memory "
        "available). A larger state is recorded in partitions after training.",
    ),
    device_memory_budget: str = typer.Option(
        _RECORD.device_memory_budget,
        help="With --device cuda: GPU memory the tracked state may take (default: 70% of the "
        "GPU's free memory). A larger state stays in host memory, each batch's rows copied to "
        "the GPU and back (approximate mode), or is recorded in partitions.",
    ),
    project_dim: int = typer.Option(
        _RECORD.project_dim,
        help="Track a seeded random projection (a tensor sketch) of the hypergradients to this many "
        "dimensions (approximate mode); analyze projects the test gradients the same way.",
    ),
    scheduler: str = typer.Option(
        _RECORD.scheduler, help=f"Where partitions run: {SCHEDULER_HELP}."
    ),
    workers: int = typer.Option(
        _RECORD.workers,
        help="Partitions recorded at once (threads or LocalCluster workers); each holds its "
        "share of --memory-budget.",
    ),
    durable_seconds: float = typer.Option(
        _RECORD.durable_seconds,
        help="Seconds of training between durable points, from which --resume continues a "
        "killed recording (and never more often than 10x a point's own cost; 0: after every "
        "step; inf: never).",
    ),
    resume: str | None = typer.Option(
        None,
        "--resume",
        help="Finish this stopped recording instead of starting one: from its last durable "
        "point, or the partitions it left undone (with --scheduler, --workers); the other "
        "options are the store's own and are ignored.",
    ),
) -> None:
    """Train a model with SGD and record HyDRA hypergradients into a Zarr store."""
    from hydra_store.recording.training import prepare_run, record_run

    limit_malloc_arenas()
    terminate_on_sigterm()
    full_float32_on_gpus()

    if resume is not None:
        # --scheduler and --workers only when given: by default, the recording's own.
        given = {
            name
            for name in ("scheduler", "workers")
            if getattr(context.get_parameter_source(name), "name", "DEFAULT") != "DEFAULT"
        }
        _resume(
            resume,
            scheduler if "scheduler" in given else None,
            workers if "workers" in given else None,
        )
        return
    with user_errors():
        if trajectory_only and mode != "approximate":
            raise_usage(
                "--trajectory-only records no hypergradients; do not combine it with --mode"
            )
        config = RecordConfig(
            dataset=dataset,
            model=model,
            epochs=epochs,
            batch_size=batch_size,
            lr=lr,
            momentum=momentum,
            weight_decay=weight_decay,
            schedule=schedule,
            lr_decay=lr_decay,
            lr_step_epochs=lr_step_epochs,
            plateau_patience=plateau_patience,
            seed=seed,
            track=track,
            label_noise=label_noise,
            checkpoint_every=checkpoint_every,
            hypergradient_history=hypergradient_history,
            out=out,
            overwrite=overwrite,
            device=device,
            mode="trajectory" if trajectory_only else mode,
            data_root=None if data_root is None else str(data_root),
            validation_fraction=validation_fraction,
            memory_budget=memory_budget,
            device_memory_budget=device_memory_budget,
            project_dim=project_dim,
            scheduler=scheduler,
            workers=workers,
            durable_seconds=durable_seconds,
        )
        prepared = prepare_run(config)
        n_train = len(prepared.bundle.train.targets)
        total = -(-n_train // batch_size) * epochs
        bar = progress_bar(total, "training", unit="step")

        def on_progress(p) -> None:
            bar.update(p.step - bar.n)
            bar.set_postfix_str(
                f"epoch {p.epoch}/{p.epochs} loss {p.loss:.4f} {p.samples_per_second:,.0f} samples/s"
            )

        stages = StageBars()

        def on_plan(plan) -> None:
            typer.echo(plan.describe(), err=True)

        try:
            summary = record_run(
                config,
                progress=on_progress,
                prepared=prepared,
                on_plan=on_plan,
                partition_progress=stages,
            )
        finally:
            bar.close()
            stages.close()
    last = summary.epochs[-1]
    typer.echo(f"recorded {summary.path}  (status: complete)")
    typer.echo(
        f"  data {prepared.bundle.name}: {summary.n_train} training samples, "
        f"{summary.n_tracked} tracked; model {model}: {summary.n_params:,} parameters"
    )
    typer.echo(
        f"  {len(summary.epochs)} epochs: train loss {last.train_loss:.4f}, test loss "
        f"{last.test_loss:.4f}, test accuracy {100 * last.test_accuracy:.2f}%"
    )
    if summary.n_partitions > 1:
        typer.echo(
            f"  {summary.n_partitions} partitions recorded after training in "
            f"{summary.partition_seconds:.1f} s"
        )
    typer.echo(
        f"  time {summary.seconds:.1f} s ({summary.samples_per_second:,.0f} training samples/s); "
        f"store size {human_bytes(summary.store_bytes)}"
    )
    if config.mode == "both" and config.hypergradient_history:
        _figure_3(str(summary.path))


def _figure_3(store: str) -> None:
    """The paper's Figure 3, computed when a `--mode both --hypergradient-history` recording
    ends (and when one is resumed to its end, so that both give the same store)."""
    from hydra_store_cli.history import history_lines

    with user_errors():
        lines = history_lines(store)
    typer.echo("approximation error over training (the paper's Figure 3):")
    for line in lines:
        typer.echo(f"  {line}")


def _resume(store: str, scheduler: str | None, workers: int | None) -> None:
    from hydra_store.recording.resume import resume_recording

    stages = StageBars()
    bar = None

    def on_progress(p) -> None:
        nonlocal bar
        if bar is None:
            bar = progress_bar(p.total_steps, "training", unit="step")
        bar.update(p.step - bar.n)
        bar.set_postfix_str(f"epoch {p.epoch}/{p.epochs} loss {p.loss:.4f}")

    with user_errors():
        try:
            done = resume_recording(
                store,
                scheduler=scheduler,
                workers=workers,
                progress=on_progress,
                partition_progress=stages,
            )
        finally:
            if bar is not None:
                bar.close()
            stages.close()
    if done.how == "partitions":
        typer.echo(f"resumed {store}: {done.partitions} partitions recorded  (status: complete)")
        return
    if done.how == "start":
        typer.echo(
            f"resumed {store}: it had no durable point yet, so it was recorded again from the "
            "start  (status: complete)"
        )
    else:
        typer.echo(
            f"resumed {store} from its durable point at step {done.from_step} (epoch "
            f"{done.from_epoch} done)  (status: complete)"
        )
    summary = done.record
    last = summary.epochs[-1]
    typer.echo(
        f"  {len(summary.epochs)} epochs: train loss {last.train_loss:.4f}, test loss "
        f"{last.test_loss:.4f}, test accuracy {100 * last.test_accuracy:.2f}%"
    )
    typer.echo(f"  time {summary.seconds:.1f} s; store size {human_bytes(summary.store_bytes)}")
    from hydra_store.store.format import open_group

    recorded = dict(open_group(store_path(store)).attrs.get("config") or {})
    if recorded.get("mode") == "both" and recorded.get("hypergradient_history"):
        _figure_3(store)


def raise_usage(message: str) -> None:
    from hydra_store.errors import InvalidArgumentError

    raise InvalidArgumentError(message)


@app.command()
def info(
    store: str = typer.Argument(..., help="Path or fsspec URL of a hydra-store store."),
) -> None:
    """Show what a store holds: run config, status, sizes, epochs, accuracy, analyses."""
    from hydra_store.store.describe import describe_store

    with user_errors():
        lines = describe_store(store)
    for line in lines:
        typer.echo(line)
    typer.echo(f"  size on disk: {human_bytes(call(tree_bytes, store_path(store)))}")


@app.command()
def verify(
    store: str = typer.Argument(..., help="Path or fsspec URL of a hydra-store store."),
    replay: bool = typer.Option(
        True, "--replay/--no-replay", help="Also replay the training against its checkpoints."
    ),
) -> None:
    """Read every chunk (checksums), count the recorded steps, checkpoints and rows, and replay
    the training against the stored checkpoints; exit 1 on any fault."""
    from hydra_store.replay.verification import verify_recording

    stages = StageBars()
    with user_errors():
        try:
            report = verify_recording(store, replay=replay, progress=stages)
        finally:
            stages.close()
    typer.echo(f"verified {store}: {report.arrays} arrays, {report.chunks} chunks read")
    if report.unchecked:
        typer.echo(
            f"  {len(report.unchecked)} arrays have no checksums (written before checksums "
            f"existed): damage inside their chunks goes undetected ({', '.join(report.unchecked[:5])}"
            + (", ..." if len(report.unchecked) > 5 else "")
            + ")"
        )
    for reason in report.skipped:
        typer.echo(f"  not checked: {reason}")
    if report.ok:
        typer.echo("  no faults")
        return
    typer.echo(f"  {len(report.faults)} fault(s):")
    for fault in report.faults:
        typer.echo(f"    {fault}")
    raise typer.Exit(1)


def _register_optional() -> None:
    """Commands contributed by the analysis modules."""
    from hydra_store_cli import analyze, clean, history, reverse

    analyze.register(app)
    reverse.register(app)
    history.register(app)
    clean.register(app)


_register_optional()


def main() -> None:
    app()


if __name__ == "__main__":
    sys.exit(main())
