"""The store a built-in run writes: every variable of the format, its dims and values, and the
trajectory replayed from it."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import xarray as xr
import zarr

from hydra_store.errors import ReplayMismatchError, StoreExistsError, StoreFormatError
from hydra_store.replay.recorded_run import model_at_checkpoint
from hydra_store.replay.trajectory import replay_training
from hydra_store.store.format import FORMAT_VERSION, open_group
from hydra_store.store.writer import RecordingStore
from tests.conftest import tiny_config

EXPECTED_DIMS = {
    "sample": ("sample",),
    "label": ("sample",),
    "hypergradient": ("sample", "param"),
    "weights": ("checkpoint", "param"),
    "velocity": ("checkpoint", "param"),
    "checkpoint_step": ("checkpoint",),
    "checkpoint_epoch": ("checkpoint",),
    "batch_index": ("step", "slot"),
    "lr": ("step",),
    "momentum": ("step",),
    "weight_decay": ("step",),
    "step_epoch": ("step",),
    "train_loss": ("epoch",),
    "test_loss": ("epoch",),
    "test_accuracy": ("epoch",),
    "layer_name": ("layer",),
    "layer_offset": ("layer",),
    "layer_size": ("layer",),
    "train_label": ("train",),
    "test_label": ("test",),
}


def test_xarray_opens_the_store_with_no_arguments(digits_store):
    with __import__("warnings").catch_warnings():
        __import__("warnings").simplefilter("error")
        ds = xr.open_zarr(digits_store)
    for name, dims in EXPECTED_DIMS.items():
        assert ds[name].dims == dims, name
    assert "sample" in ds.indexes
    assert ds.attrs["hydra_store_format"] == FORMAT_VERSION
    assert ds.attrs["status"] == "complete"
    config = ds.attrs["config"]
    assert (config["dataset"], config["epochs"], config["batch_size"]) == ("digits", 3, 64)
    assert ds.attrs["n_train"] == 1437 == ds.sizes["sample"]


def test_trajectory_variables_have_the_recorded_values(digits_store):
    ds = xr.open_zarr(digits_store)
    n, batch, epochs = 1437, 64, 3
    steps_per_epoch = -(-n // batch)
    assert ds.sizes["step"] == steps_per_epoch * epochs
    batches = ds.batch_index.values
    for epoch in range(epochs):
        block = batches[epoch * steps_per_epoch : (epoch + 1) * steps_per_epoch]
        seen = block[block >= 0]
        np.testing.assert_array_equal(np.sort(seen), np.arange(n))  # each epoch a permutation
    assert (batches[steps_per_epoch - 1] == -1).sum() == steps_per_epoch * batch - n
    # step schedule: lr 0.1, times 0.1 after epoch 2 (tiny_config: lr_step_epochs=2)
    np.testing.assert_allclose(ds.lr.values[: 2 * steps_per_epoch], 0.1)
    np.testing.assert_allclose(ds.lr.values[2 * steps_per_epoch :], 0.01)
    np.testing.assert_allclose(ds.momentum.values, 0.9)
    np.testing.assert_array_equal(ds.checkpoint_step.values, [0, 23, 46, 69])
    np.testing.assert_array_equal(ds.checkpoint_epoch.values, [0, 1, 2, 3])
    assert ds.test_accuracy.values[-1] > 0.5
    np.testing.assert_array_equal(ds.label.values, ds.train_label.values[ds.sample.values])
    offsets, sizes = ds.layer_offset.values, ds.layer_size.values
    assert offsets[0] == 0 and offsets[-1] + sizes[-1] == ds.sizes["param"]
    assert list(ds.layer_name.values) == ["fc1.weight", "fc1.bias", "out.weight", "out.bias"]


def test_initial_weights_are_the_models_and_replay_reproduces_the_final_ones(digits_store):
    ds = xr.open_zarr(digits_store)
    from hydra_store.core.parameters import ParameterLayout, get_flat_parameters
    from hydra_store.data.models import build_model

    fresh = build_model("mlp:hidden=16", input_shape=(1, 8, 8), n_classes=10, seed=0)
    initial = get_flat_parameters(fresh, ParameterLayout.from_model(fresh)).numpy()
    np.testing.assert_array_equal(ds.weights.values[0], initial)
    final = replay_training(digits_store).numpy()
    np.testing.assert_allclose(final, ds.weights.values[-1], rtol=0, atol=1e-6)
    assert np.abs(final - initial).max() > 1e-2
    model = model_at_checkpoint(digits_store, -1)
    weights = get_flat_parameters(model, ParameterLayout.from_model(model)).numpy()
    np.testing.assert_array_equal(weights, ds.weights.values[-1])


def test_replay_refuses_a_store_whose_checkpoint_was_tampered_with(store_copy):
    group = zarr.open_group(store_copy, mode="r+")
    weights = group["weights"]
    last = weights[-1]
    weights[-1] = last + 0.01
    with pytest.raises(ReplayMismatchError, match="does not reproduce checkpoint 3"):
        replay_training(store_copy)


def test_label_noise_is_recorded_per_sample(noisy_digits_store):
    ds = xr.open_zarr(noisy_digits_store)
    noisy = ds.is_noisy.values
    assert noisy.mean() == pytest.approx(0.5, abs=1 / 1437)
    assert (ds.label.values[noisy] != ds.clean_label.values[noisy]).all()
    assert (ds.label.values[~noisy] == ds.clean_label.values[~noisy]).all()


def test_existing_path_is_never_overwritten_without_asking(tmp_path, digits_store):
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "keep.txt").write_text("mine")
    with pytest.raises(StoreExistsError, match="--overwrite"):
        RecordingStore(digits_store)
    with pytest.raises(StoreExistsError, match="not a hydra-store store"):
        RecordingStore(tmp_path / "notes", overwrite=True)
    assert (tmp_path / "notes" / "keep.txt").read_text() == "mine"
    assert open_group(digits_store).attrs["status"] == "complete"


def test_a_plain_zarr_group_is_not_taken_for_a_store(tmp_path):
    zarr.open_group(tmp_path / "other.zarr", mode="w")
    with pytest.raises(StoreFormatError, match="not a hydra-store store"):
        open_group(tmp_path / "other.zarr")


def test_trajectory_only_store_replays(tmp_path):
    from hydra_store.recording.training import record_run

    out = tmp_path / "traj.zarr"
    record_run(tiny_config(out, mode="trajectory", epochs=2))
    ds = xr.open_zarr(out)
    assert "hypergradient" not in ds and ds.attrs["status"] == "complete"
    np.testing.assert_allclose(replay_training(out).numpy(), ds.weights.values[-1], atol=1e-6)


def test_every_variable_and_attribute_is_documented(digits_store, noisy_digits_store):
    doc = (Path(__file__).resolve().parents[2] / "docs" / "store-format.md").read_text()
    for store in (digits_store, noisy_digits_store):
        group = zarr.open_group(store, mode="r")
        for name in dict(group.arrays()):
            assert f"`{name}`" in doc, f"variable {name} is missing from docs/store-format.md"
        for name in group.attrs:
            assert f"`{name}`" in doc, f"attribute {name} is missing from docs/store-format.md"


def test_hypergradient_history_matches_shorter_runs(tmp_path):
    from hydra_store.recording.training import record_run

    long = tmp_path / "long.zarr"
    record_run(tiny_config(long, epochs=3, hypergradient_history=True, track="200"))
    history = xr.open_zarr(long).hypergradient_history
    assert history.dims == ("checkpoint", "sample", "param")
    assert history.sizes["checkpoint"] == 4
    np.testing.assert_array_equal(history.values[0], 0)
    np.testing.assert_array_equal(history.values[-1], xr.open_zarr(long).hypergradient.values)
    short = tmp_path / "short.zarr"
    record_run(tiny_config(short, epochs=2, track="200"))
    want = xr.open_zarr(short).hypergradient.values
    np.testing.assert_allclose(history.values[2], want, rtol=1e-5, atol=1e-6 * np.abs(want).max())
    assert np.abs(history.values[2] - history.values[3]).max() > 1e-3


def test_an_output_inside_a_store_or_holding_the_working_directory_is_refused(
    store_copy, monkeypatch
):
    from hydra_store.store.format import check_output_path

    files = sorted(p.name for p in store_copy.iterdir())
    with pytest.raises(StoreExistsError, match="is inside the store"):
        RecordingStore(store_copy / "analysis" / "inner.zarr")
    monkeypatch.chdir(store_copy)
    with pytest.raises(StoreExistsError, match="holds the current directory"):
        check_output_path(".", overwrite=True)
    with pytest.raises(StoreExistsError, match="holds the current directory"):
        RecordingStore(store_copy.parent, overwrite=True)
    assert sorted(p.name for p in store_copy.iterdir()) == files
