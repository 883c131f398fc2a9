"""The per-sample losses and how they are named (core/losses.py)."""

from __future__ import annotations

import pytest
import torch

from hydra_store.core.losses import (
    CROSS_ENTROPY,
    MEAN_SQUARED_ERROR,
    cross_entropy,
    recorded_loss,
    resolve_loss,
    squared_error,
)
from hydra_store.errors import InvalidArgumentError
from tests.user_plugins import pseudo_huber


def test_the_built_in_losses_equal_their_textbook_formulas():
    logits = torch.tensor([[2.0, 0.5, -1.0], [0.0, 0.0, 0.0]], dtype=torch.float64)
    labels = torch.tensor([0, 2])
    expected = -torch.log_softmax(logits, dim=1)[torch.arange(2), labels]
    torch.testing.assert_close(cross_entropy(logits, labels), expected)
    outputs = torch.tensor([[1.0, 2.0], [0.0, -1.0]], dtype=torch.float64)
    targets = torch.tensor([[0.0, 0.0], [1.0, 1.0]], dtype=torch.float64)
    torch.testing.assert_close(squared_error(outputs, targets), torch.tensor([2.5, 2.5]).double())
    # a (B,) target against a (B, 1) output is read as (B, 1), not broadcast to (B, B)
    torch.testing.assert_close(
        squared_error(torch.tensor([[1.0], [3.0]]), torch.tensor([0.0, 1.0])),
        torch.tensor([1.0, 4.0]),
    )


def test_losses_resolve_by_name_spec_and_function():
    assert resolve_loss(None) is CROSS_ENTROPY
    assert resolve_loss("mse") is MEAN_SQUARED_ERROR
    assert resolve_loss(squared_error) is MEAN_SQUARED_ERROR
    by_spec = resolve_loss("tests.user_plugins:pseudo_huber", classification=False)
    assert by_spec.function is pseudo_huber and not by_spec.classification
    by_function = resolve_loss(pseudo_huber)
    assert by_function.spec == "tests.user_plugins:pseudo_huber"
    assert resolve_loss(lambda o, t: o.sum(1)).spec is None
    with pytest.raises(InvalidArgumentError, match="unknown loss 'l1'; accepted"):
        resolve_loss("l1")
    with pytest.raises(InvalidArgumentError, match="must be a name or a function, got int"):
        resolve_loss(3)


def test_a_store_without_a_loss_attribute_was_trained_with_cross_entropy():
    assert recorded_loss(None, None) is CROSS_ENTROPY
    assert recorded_loss({"spec": "mse", "classification": False}, None) is MEAN_SQUARED_ERROR
    with pytest.raises(InvalidArgumentError, match="has no import name"):
        recorded_loss({"spec": None, "classification": True}, None)
    with pytest.raises(InvalidArgumentError, match="recorded with the loss 'cross-entropy'"):
        recorded_loss(None, "mse")
