"""Per-sample training losses: which function of (model output, target) a sample's loss is.

A recording stores its loss by spec (root attribute `loss`), so that replay, reverse mode and
leave-one-out retraining rebuild the very function training used:

- ``cross-entropy`` (the default): cross-entropy on logits, integer class targets;
- ``mse``: the mean over the output's entries of the squared error, targets of the output's
  shape (a (B,) target against a (B, 1) output is read as (B, 1));
- ``package.module:function``: a user's function ``f(outputs, targets) -> (B,)`` losses,
  imported by that name (module level, so that another process can import it).

A bare callable is accepted too; it is stored by its import name when it has one, and a store
whose loss has no import name needs the loss passed again to every analyser.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from hydra_store.errors import InvalidArgumentError
from hydra_store.plugins import is_plugin_spec, load_plugin_function

LossFunction = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def cross_entropy(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of each sample's logits against its class index, (B,)."""
    return F.cross_entropy(outputs, targets, reduction="none")


def squared_error(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """The mean squared error of each sample over its output entries, (B,)."""
    error = outputs - targets.reshape(outputs.shape).to(outputs.dtype)
    return error.square().reshape(outputs.shape[0], -1).mean(dim=1)


@dataclass(frozen=True)
class PerSampleLoss:
    """A per-sample loss: `function(outputs (B, ...), targets (B, ...)) -> (B,)`.

    `spec` is how a store names it (None: it has no import name, so it cannot be rebuilt from
    the store); `classification` says whether targets are class indices and outputs logits, so
    that accuracy, class matrices and label noise mean something.
    """

    function: LossFunction
    spec: str | None
    classification: bool

    def __call__(self, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return self.function(outputs, targets)

    def to_attrs(self) -> dict[str, object]:
        return {"spec": self.spec, "classification": self.classification}


CROSS_ENTROPY = PerSampleLoss(cross_entropy, "cross-entropy", classification=True)
MEAN_SQUARED_ERROR = PerSampleLoss(squared_error, "mse", classification=False)
BUILT_IN_LOSSES = {loss.spec: loss for loss in (CROSS_ENTROPY, MEAN_SQUARED_ERROR)}
_ACCEPTED = (
    "'cross-entropy', 'mse', 'package.module:function' (a function of (outputs, targets) "
    "returning one loss per sample), or such a function"
)


def resolve_loss(
    loss: str | PerSampleLoss | LossFunction | None, *, classification: bool | None = None
) -> PerSampleLoss:
    """The per-sample loss named by `loss` (None: cross-entropy).

    A user's function is taken for a classification loss unless `classification=False`.
    """
    if loss is None:
        return CROSS_ENTROPY
    if isinstance(loss, PerSampleLoss):
        return loss
    if isinstance(loss, str):
        spec = loss.strip()
        if spec in BUILT_IN_LOSSES:
            return BUILT_IN_LOSSES[spec]
        if not is_plugin_spec(spec):
            raise InvalidArgumentError(f"unknown loss {loss!r}; accepted: {_ACCEPTED}")
        function = load_plugin_function(spec, what="loss", error=InvalidArgumentError)
        return PerSampleLoss(function, spec, classification=classification is not False)
    if callable(loss):
        for built_in in BUILT_IN_LOSSES.values():
            if loss is built_in.function:
                return built_in
        return PerSampleLoss(loss, _import_name(loss), classification=classification is not False)
    raise InvalidArgumentError(
        f"the loss must be a name or a function, got {type(loss).__name__}; accepted: {_ACCEPTED}"
    )


def recorded_loss(attrs: object, given: str | PerSampleLoss | LossFunction | None) -> PerSampleLoss:
    """The loss of a store whose root attribute `loss` is `attrs` (absent: cross-entropy, as
    every store before the attribute existed), or the loss a caller passes for it.

    A store whose loss has no import name needs `given`; a given loss must agree with the
    store's in kind (classification or not), and with its spec when both have one.
    """
    stored = attrs if isinstance(attrs, dict) else {}
    spec = stored.get("spec", "cross-entropy") if attrs is not None else "cross-entropy"
    classification = bool(stored.get("classification", True))
    if given is None:
        if spec is None:
            raise InvalidArgumentError(
                "this store was recorded with a loss function that has no import name; pass "
                "the same function again (loss=...)"
            )
        return resolve_loss(spec, classification=classification)
    loss = resolve_loss(given, classification=classification)
    if spec is not None and loss.spec is not None and loss.spec != spec:
        raise InvalidArgumentError(
            f"the store was recorded with the loss {spec!r}, not {loss.spec!r}; pass that loss, "
            "or none to use the store's"
        )
    if loss.classification != classification:
        raise InvalidArgumentError(
            f"the loss given is {'a classification' if loss.classification else 'a regression'} "
            f"loss; the store's is {'a classification' if classification else 'a regression'} one"
        )
    return loss


def _import_name(function: Callable) -> str | None:
    """`module:name` when `function` can be imported back by that name, else None."""
    module, name = getattr(function, "__module__", None), getattr(function, "__qualname__", "")
    if not module or not name or "<" in name or "." in name or module == "__main__":
        return None
    spec = f"{module}:{name}"
    if not is_plugin_spec(spec):
        return None
    try:
        found = load_plugin_function(spec, what="loss", error=InvalidArgumentError)
    except InvalidArgumentError:
        return None
    return spec if found is function else None
