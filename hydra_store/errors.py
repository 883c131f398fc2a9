"""Named exceptions. Every error a user can cause is one of these, with a message that says
what is wrong and how to fix it; the CLI prints the message on one line and exits non-zero."""

from __future__ import annotations


class HydraStoreError(Exception):
    """Base class of every error hydra-store raises on purpose."""


class InvalidArgumentError(HydraStoreError, ValueError):
    """A parameter is out of range or of the wrong kind."""


class DatasetError(HydraStoreError):
    """A data set is unknown, malformed or inconsistent."""


class DataFilesMissingError(DatasetError, FileNotFoundError):
    """A data set's files are not where they must be; the message lists what to put where."""


class ModelError(HydraStoreError):
    """A model is unknown, cannot be built for the data, or contains an unsupported layer."""


class UnsupportedOptimizerError(HydraStoreError):
    """The optimizer or one of its settings is outside what the HyDRA recurrence models."""


class StoreExistsError(HydraStoreError, FileExistsError):
    """The output path exists and overwriting was not asked for."""


class StoreNotFoundError(HydraStoreError, FileNotFoundError):
    """No hydra-store store at the given path."""


class StoreFormatError(HydraStoreError):
    """The path holds something that is not a hydra-store store of a known format version."""


class StoreIncompleteError(HydraStoreError):
    """The store's recording did not finish (status 'recording' or 'failed')."""


class ReplayMismatchError(HydraStoreError):
    """Replaying the stored trajectory does not reproduce the stored weights."""


class AnalysisError(HydraStoreError):
    """An analysis cannot run on the given inputs (wrong shapes, missing variables, ...)."""


class SchedulerError(HydraStoreError):
    """A dask scheduler address cannot be reached or started."""


class StoreCorruptError(HydraStoreError):
    """A store's chunks are missing or damaged (failed checksums)."""


class StoreLockedError(HydraStoreError):
    """Another live process is writing the store (or the result group)."""


class Terminated(BaseException):
    """The process was asked to stop (SIGTERM). A BaseException, like KeyboardInterrupt, so that
    no `except Exception` swallows it; the recorder marks its store failed on the way out."""


class IndefiniteHessianWarning(UserWarning):
    """The damped Hessian of an influence-function analysis has negative eigenvalues: at the
    final weights the training loss is not locally convex, so ``H^{-1}`` is no longer the
    response of a minimum to a perturbation and the scores can be meaningless. Raise the
    damping (docs/analysis.md, "Baselines")."""


def unwrap_interruption(error: BaseException) -> BaseException:
    """The `Terminated` or `KeyboardInterrupt` that TorchScript wrapped into a RuntimeError when
    the signal came in the middle of a scripted operation (BatchNorm's decompositions under
    torch.func are scripted); any other error as it is."""
    if isinstance(error, RuntimeError) and not isinstance(error, HydraStoreError):
        text = str(error)
        if "Terminated: SIGTERM received" in text:
            return Terminated("SIGTERM received")
        if "KeyboardInterrupt" in text:
            return KeyboardInterrupt()
    return error
