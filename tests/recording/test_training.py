"""The built-in run's pieces: label noise, tracked selection (the schedules:
tests/core/test_lr_schedules.py)."""

from __future__ import annotations

import numpy as np
import pytest

from hydra_store.data.training_data import apply_label_noise
from hydra_store.errors import InvalidArgumentError
from hydra_store.recording.training import select_tracked


def test_label_noise_reassigns_the_fraction_to_wrong_classes():
    clean = np.repeat(np.arange(10), 100)
    noisy, mask = apply_label_noise(clean, 10, 0.3, seed=4)
    assert mask.sum() == 300
    assert (noisy[mask] != clean[mask]).all() and (noisy[~mask] == clean[~mask]).all()
    counts = np.bincount((noisy[mask] - clean[mask]) % 10, minlength=10)
    assert counts[0] == 0 and counts[1:].min() > 15  # every wrong class is reachable
    again, _ = apply_label_noise(clean, 10, 0.3, seed=4)
    np.testing.assert_array_equal(noisy, again)


def test_tracked_count_is_stratified_by_class():
    labels = np.array([0] * 600 + [1] * 300 + [2] * 100)
    chosen = select_tracked("100", labels, seed=0)
    assert chosen.size == 100 and np.unique(chosen).size == 100
    np.testing.assert_array_equal(np.bincount(labels[chosen]), [60, 30, 10])
    assert select_tracked("all", labels, 0).size == 1000


def test_tracked_index_file(tmp_path):
    labels = np.zeros(50, dtype=np.int64)
    (tmp_path / "idx.txt").write_text("3 7\n11\n")
    np.testing.assert_array_equal(select_tracked(str(tmp_path / "idx.txt"), labels, 0), [3, 7, 11])
    (tmp_path / "bad.txt").write_text("3 70\n")
    with pytest.raises(InvalidArgumentError, match=r"\[0, 50\)"):
        select_tracked(str(tmp_path / "bad.txt"), labels, 0)
    with pytest.raises(InvalidArgumentError, match="only 50"):
        select_tracked("51", labels, 0)
