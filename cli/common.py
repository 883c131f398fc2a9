"""What every command shares: one-line errors without tracebacks, progress bars, sizes."""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TypeVar

import typer
from tqdm import tqdm
from typer.core import TyperGroup

try:  # typer >= 0.20 carries its own copy of click
    from typer._click.exceptions import UsageError
except ImportError:  # older typer runs on click itself
    from click.exceptions import UsageError

from hydra_store.errors import HydraStoreError, Terminated, unwrap_interruption

T = TypeVar("T")

EXIT_USAGE = 2


def fail(message: str) -> None:
    """Print one error line to stderr and exit non-zero."""
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(EXIT_USAGE)


class OneLineErrors(TyperGroup):
    """The app's command group: a bad command line (an unknown option, a value of the wrong
    type) is one `error:` line and exit 2, like every other error, instead of click's usage box."""

    def main(self, *args, standalone_mode: bool = True, **kwargs):  # type: ignore[override]
        try:
            result = super().main(*args, standalone_mode=False, **kwargs)
        except UsageError as error:
            message = error.format_message()
            command = error.ctx.command_path if error.ctx is not None else "hydra-store"
            if message:  # empty after the help a bare command prints
                typer.echo(f"error: {message} (see `{command} --help`)", err=True)
            sys.exit(EXIT_USAGE)
        except typer.Abort:
            typer.echo("interrupted", err=True)
            sys.exit(130)
        if isinstance(result, int):  # typer.Exit(code) returns its code outside standalone mode
            sys.exit(result)
        return result


# For a store recorded from a user's loop that names no data set and model (docs/own-loop.md).
DATASET_OPTION = typer.Option(
    None,
    "--dataset",
    help="For a store from your own loop that names none: the data set it was trained on "
    "(the grammar of `record --dataset`); checked by replaying the first epoch, then kept.",
)
MODEL_OPTION = typer.Option(
    None, "--model", help="With --dataset: the model it was trained on (`record --model`)."
)
DATA_ROOT_OPTION = typer.Option(None, "--data-root", help="With --dataset: its data root.")
DATA_SEED_OPTION = typer.Option(
    0, "--data-seed", help="With --dataset: the seed it is loaded with."
)
RESULTS_OUT_OPTION = typer.Option(
    None,
    "--out",
    help="Write the results to this separate results store (path or URL; created if absent) "
    "instead of into the recording, which is then only read: a read-only recording can be "
    "analysed this way.",
)


def name_store(store: str, dataset: str | None, model: str | None, data_root, seed: int) -> None:
    """Name the data set and model of a store that lacks them (hydra_store.replay.naming)."""
    if dataset is None and model is None:
        return
    from hydra_store.replay.naming import name_recorded_run

    if name_recorded_run(
        store, dataset, model, seed=seed, data_root=None if data_root is None else str(data_root)
    ):
        typer.echo(f"{store} now names data set {dataset!r} and model {model!r}", err=True)


def describe_os_error(error: OSError) -> str:
    """One line for a file-system failure: what happened, where, and what to do."""
    import errno

    where = f" ({error.filename})" if error.filename else ""
    if error.errno == errno.ENOSPC:
        return f"the disk is full{where}; free some space and run again"
    if error.errno in (errno.EACCES, errno.EPERM):
        return f"permission denied{where}; check the permissions of the store and its folder"
    if error.errno == errno.EROFS:
        return f"the file system is read-only{where}; write to a writable folder"
    return f"{error.strerror or type(error).__name__}{where}"


def full_float32_on_gpus() -> None:
    """Float32 on a GPU in full float32: cuDNN's default lets float32 convolutions round their
    inputs to TF32's 10-bit mantissa (about 5e-4 relative) on Ampere and newer GPUs, which moves
    the recorded hypergradients and the replayed weights away from the CPU's by more than
    replay's checks allow. The command owns its process, so it sets torch's flags (a user's own
    training loop chooses for itself: docs/recording.md)."""
    import torch

    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_tf32 = False


@contextmanager
def user_errors() -> Iterator[None]:
    """Turn the library's named errors (and Ctrl-C) into one line and a non-zero exit."""
    try:
        yield
    except HydraStoreError as error:
        fail(str(error))
    except OSError as error:
        fail(describe_os_error(error))
    except KeyboardInterrupt:
        typer.echo("interrupted", err=True)
        raise typer.Exit(130) from None
    except Terminated:
        typer.echo("terminated (SIGTERM)", err=True)
        raise typer.Exit(143) from None
    except RuntimeError as error:
        signal = unwrap_interruption(error)
        if signal is error:
            raise
        interrupted = isinstance(signal, KeyboardInterrupt)
        typer.echo("interrupted" if interrupted else "terminated (SIGTERM)", err=True)
        raise typer.Exit(130 if interrupted else 143) from None


def terminate_on_sigterm() -> None:
    """Turn SIGTERM into a `Terminated` exception in the main thread, so that a recording that
    is asked to stop marks its store failed (with the reason) instead of vanishing."""
    import signal

    def handler(signum, frame):
        raise Terminated("SIGTERM received")

    signal.signal(signal.SIGTERM, handler)


def limit_malloc_arenas() -> None:
    """One glibc malloc arena for the whole process (as MALLOC_ARENA_MAX=1 would).

    A partition recorded on a dask thread otherwise gets its own arena, whose freed blocks are
    kept: 0.3 GiB more peak RSS over a 4 GiB budget (docs/scaling.md). A no-op where the C
    library is not glibc."""
    import ctypes
    import ctypes.util

    m_arena_max = -8
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.mallopt(m_arena_max, 1)
    except (OSError, AttributeError):
        pass


def progress_bar(total: int, description: str, unit: str = "it") -> tqdm:
    return tqdm(
        total=total,
        desc=description,
        unit=unit,
        file=sys.stderr,
        dynamic_ncols=True,
        leave=False,
        mininterval=0.5,
        disable=None,  # only on a terminal: no carriage-return noise in logs
    )


def human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1024 or unit == "TB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n:.1f} TB"


def call(fn: Callable[..., T], *args, **kwargs) -> T:
    with user_errors():
        return fn(*args, **kwargs)


class StageBars:
    """A progress callback `(stage, done, total)` for the library: one bar per stage, the
    previous one closed when the next stage starts; `close()` ends the last."""

    def __init__(self) -> None:
        self.stage: str | None = None
        self.bar = None

    def __call__(self, stage: str, done: int, total: int) -> None:
        if stage != self.stage:
            self.close()
            self.stage = stage
            self.bar = progress_bar(total, stage)
        self.bar.total = total
        self.bar.n = done
        self.bar.refresh()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
