"""Per-sample gradients of chosen batch slots (`slot_gradients`) for a batch-coupled model
(BatchNorm, dropout): each row against one plain backward pass of that sample's loss, the mean
gradient against `batch_gradient`, and one forward pass's worth of running statistics."""

from __future__ import annotations

import pytest
import torch

from hydra_store.core.gradients import (
    batch_gradient,
    batched_backward_gradients,
    slot_gradients,
)
from hydra_store.core.losses import cross_entropy
from hydra_store.core.model_state import step_randomness
from hydra_store.core.parameters import ParameterLayout
from tests.conftest import coupled_net

BATCH = 7


def batch():
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(BATCH, 4, generator=generator, dtype=torch.float64)
    y = torch.randint(0, 3, (BATCH,), generator=generator)
    return x, y


def one_backward_per_sample(model, layout, x, y, slots) -> torch.Tensor:
    """The naive way: one forward pass of the batch, then one plain backward pass of each
    chosen sample's loss."""
    params = [dict(model.named_parameters())[n] for n in layout.names]
    losses = cross_entropy(model(x), y)
    rows = []
    for slot in slots:
        grads = torch.autograd.grad(losses[slot], params, retain_graph=True)
        rows.append(torch.cat([g.reshape(-1) for g in grads]))
    return torch.stack(rows)


@pytest.mark.parametrize("slots", [[3], [0, 5, 6], [6, 1]])
def test_the_slots_rows_are_each_samples_own_backward_pass_with_the_batch_coupling(slots):
    x, y = batch()
    model = coupled_net()
    layout = ParameterLayout.from_model(model)
    with step_randomness(11):
        naive = one_backward_per_sample(model, layout, x, y, slots)
    with step_randomness(11):
        losses, mean, rows = slot_gradients(model, layout, x, y, torch.tensor(slots))
    assert rows.shape == (len(slots), layout.n_params)
    torch.testing.assert_close(rows, naive, rtol=1e-12, atol=1e-14)
    with step_randomness(11):
        every = batched_backward_gradients(model, layout, x, y)[1]
    torch.testing.assert_close(mean[0], every.mean(0), rtol=1e-12, atol=1e-14)
    assert losses.shape == (BATCH,) and not losses.requires_grad


def test_the_mean_gradient_is_one_plain_backward_pass_to_the_bit_whatever_the_slots():
    """A replay by `step_gradient: batch_backward` retakes a recorded step by one backward pass
    of the batch's mean loss: the step's gradient must be that pass's, bit for bit, however many
    slots' rows were taken beside it (float32, where the order of a sum shows)."""
    x, y = batch()
    layout = ParameterLayout.from_model(coupled_net())
    plain = coupled_net().float()
    with step_randomness(5):
        cross_entropy(plain(x.float()), y).mean().backward()
    expected = torch.cat([dict(plain.named_parameters())[n].grad.reshape(-1) for n in layout.names])
    for slots in ([], [2], list(range(BATCH))):
        model = coupled_net().float()
        with step_randomness(5):
            _, mean, rows = slot_gradients(model, layout, x.float(), y, torch.tensor(slots))
        assert torch.equal(mean[0], expected)
        assert rows.shape == (len(slots), layout.n_params)
    model = coupled_net().float()  # built outside: coupled_net seeds torch's generator
    with step_randomness(5):
        _, stepped = batch_gradient(model, layout, x.float(), y)
    assert torch.equal(stepped[0], expected)


def test_one_forward_pass_updates_the_running_statistics_once():
    x, y = batch()
    model = coupled_net()
    layout = ParameterLayout.from_model(model)
    reference = coupled_net()
    with torch.no_grad():
        reference(x)
    slot_gradients(model, layout, x, y, torch.tensor([0, 4]))
    assert int(model[1].num_batches_tracked) == 1
    torch.testing.assert_close(model[1].running_mean, reference[1].running_mean)
    torch.testing.assert_close(model[1].running_var, reference[1].running_var)


def test_without_the_mean_only_the_rows_are_taken():
    x, y = batch()
    model = coupled_net()
    layout = ParameterLayout.from_model(model)
    with step_randomness(2):
        _, mean, rows = slot_gradients(model, layout, x, y, torch.tensor([1]), mean=False)
    fresh = coupled_net()
    with step_randomness(2):
        naive = one_backward_per_sample(fresh, layout, x, y, [1])
    assert mean is None
    torch.testing.assert_close(rows, naive, rtol=1e-12, atol=1e-14)
