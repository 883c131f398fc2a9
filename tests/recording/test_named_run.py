"""A user's own loop that names its data set and model (`dataset_spec=`, `model_spec=`): the
store is analysed by the CLI like a built-in run's and equals the built-in run with the same
batches; a loop whose batches are not the named data set's is refused."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import xarray as xr
import zarr
from torch.utils.data import DataLoader, TensorDataset
from typer.testing import CliRunner

from hydra_store import HydraRecorder, IndexedDataset
from hydra_store.analysis.reverse import run_exact_analysis
from hydra_store.data.datasets import load_dataset
from hydra_store.data.models import build_model
from hydra_store.errors import InvalidArgumentError
from hydra_store_cli.main import app

runner = CliRunner()


def own_loop(out, stored: zarr.Group, *, shift: float = 0.0, **named) -> HydraRecorder:
    """The built-in digits run of `digits_store`, as a user would write it: a DataLoader over
    the data set with its indices, the built-in run's batches and learning rates."""
    train = load_dataset("digits", seed=0).train
    model = build_model("mlp:hidden=16", input_shape=(1, 8, 8), n_classes=10, seed=0)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=2e-5)
    batches = np.asarray(stored["batch_index"][:])
    lrs = np.asarray(stored["lr"][:])
    steps_per_epoch = 23
    dataset = IndexedDataset(TensorDataset(train.inputs + shift, train.targets))
    recorder = HydraRecorder(
        model, optimizer, out, n_train=len(train.targets), **({"seed": 0} | named)
    )
    with recorder:
        for epoch in range(3):
            epoch_batches = [
                [int(i) for i in row if i >= 0]
                for row in batches[epoch * steps_per_epoch : (epoch + 1) * steps_per_epoch]
            ]
            for k, (inputs, targets, indices) in enumerate(
                DataLoader(dataset, batch_sampler=epoch_batches)
            ):
                for group in optimizer.param_groups:
                    group["lr"] = float(lrs[epoch * steps_per_epoch + k])
                recorder.step(inputs, targets, indices)
            recorder.end_epoch()
    return recorder


NAMED = {"dataset_spec": "digits", "model_spec": "mlp:hidden=16"}


def test_a_named_own_loop_equals_the_built_in_run_through_every_analyser(digits_store, tmp_path):
    stored = zarr.open_group(digits_store, mode="r")
    out = tmp_path / "own.zarr"
    own_loop(out, stored, **NAMED)
    own = zarr.open_group(out, mode="r")
    assert own.attrs["config"]["dataset"] == "digits"
    assert own.attrs["dataset"]["train_fingerprint"] == stored.attrs["dataset"]["train_fingerprint"]
    h, expected = np.asarray(own["hypergradient"][:]), np.asarray(stored["hypergradient"][:])
    assert np.abs(h - expected).max() <= 1e-6 * np.abs(expected).max()

    analysed = runner.invoke(app, ["analyze", str(out), "--clusters-k", "50", "--no-figures"])
    assert analysed.exit_code == 0, analysed.output
    builtin = tmp_path / "builtin.zarr"
    import shutil

    shutil.copytree(digits_store, builtin)
    assert (
        runner.invoke(
            app, ["analyze", str(builtin), "--clusters-k", "50", "--no-figures"]
        ).exit_code
        == 0
    )
    mine = xr.open_zarr(str(out), group="analysis/test")["total_contribution"].values
    theirs = xr.open_zarr(str(builtin), group="analysis/test")["total_contribution"].values
    assert np.abs(mine - theirs).max() <= 1e-6 * np.abs(theirs).max()

    run_exact_analysis(out)
    run_exact_analysis(builtin)
    mine = xr.open_zarr(str(out), group="reverse/test")["total_contribution_exact"].values
    theirs = xr.open_zarr(str(builtin), group="reverse/test")["total_contribution_exact"].values
    assert np.abs(mine - theirs).max() <= 1e-6 * np.abs(theirs).max()
    verified = runner.invoke(app, ["verify", str(out)])
    assert verified.exit_code == 0 and "no faults" in verified.output


def test_batches_that_are_not_the_named_data_set_are_refused(digits_store, tmp_path):
    stored = zarr.open_group(digits_store, mode="r")
    out = tmp_path / "shifted.zarr"
    with pytest.raises(InvalidArgumentError, match="step 1: the batch's inputs differ from"):
        own_loop(out, stored, shift=0.5, **NAMED)
    attrs = zarr.open_group(out, mode="r").attrs
    assert attrs["status"] == "failed" and "inputs differ" in attrs["failure"]


def test_a_named_model_of_another_layout_is_refused_before_writing(digits_store, tmp_path):
    stored = zarr.open_group(digits_store, mode="r")
    out = tmp_path / "other.zarr"
    with pytest.raises(InvalidArgumentError, match="builds a different parameter layout"):
        own_loop(out, stored, dataset_spec="digits", model_spec="mlp:hidden=8")
    with pytest.raises(InvalidArgumentError, match="name both the data set and the model"):
        own_loop(out, stored, dataset_spec="digits")
    assert not out.exists()


def test_a_sample_twice_in_one_batch_is_refused(tmp_path):
    model = torch.nn.Linear(3, 2)
    recorder = HydraRecorder(
        model, torch.optim.SGD(model.parameters(), lr=0.1), tmp_path / "d.zarr", n_train=5
    )
    with pytest.raises(InvalidArgumentError, match=r"samples \[2\] more than once"):
        recorder.step(torch.zeros(3, 3), torch.zeros(3, dtype=torch.long), [2, 0, 2])
    recorder.fail("test")


def test_the_readme_own_loop_example_runs_as_written_and_is_analysed(tmp_path, monkeypatch):
    from pathlib import Path

    readme = (Path(__file__).parents[2] / "README.md").read_text()
    section = readme.split("### Around your own training loop", 1)[1]
    code = section.split("```python\n", 1)[1].split("```", 1)[0]
    monkeypatch.chdir(tmp_path)
    exec(compile(code, "README.md", "exec"), {})
    store = zarr.open_group(tmp_path / "own-run.zarr", mode="r")
    assert store.attrs["status"] == "complete" and store["weights"].shape[0] == 11
    analysed = runner.invoke(app, ["analyze", "own-run.zarr", "--clusters-k", "50"])
    assert analysed.exit_code == 0, analysed.output
    assert (
        tmp_path / "own-run.zarr" / "analysis" / "test" / "figures" / "influencers.png"
    ).is_file()


def test_a_store_that_names_nothing_is_named_once_by_the_cli_after_a_replay_check(
    digits_store, tmp_path
):
    stored = zarr.open_group(digits_store, mode="r")
    out = tmp_path / "anonymous.zarr"
    own_loop(out, stored)
    needs = runner.invoke(app, ["analyze", str(out), "--no-figures"])
    assert needs.exit_code == 2 and "name them once with --dataset and --model" in needs.output
    wrong = runner.invoke(
        app,
        [
            "compare",
            str(out),
            "--dataset",
            "digits",
            "--data-seed",
            "1",
            "--model",
            "mlp:hidden=16",
        ],
    )
    assert wrong.exit_code == 2 and "does not reproduce its first checkpoint" in wrong.output
    assert "dataset" not in (zarr.open_group(out, mode="r").attrs.get("config") or {})
    named = runner.invoke(
        app,
        [
            "analyze",
            str(out),
            "--dataset",
            "digits",
            "--model",
            "mlp:hidden=16",
            "--no-figures",
            "--clusters-k",
            "50",
        ],
    )
    assert named.exit_code == 0, named.output
    assert "now names data set 'digits' and model 'mlp:hidden=16'" in named.output
    compared = runner.invoke(app, ["compare", str(out), "--no-checkpoints"])  # no names needed
    assert compared.exit_code == 0, compared.output
    validated = runner.invoke(app, ["validate", str(out), "--samples", "3"])
    assert validated.exit_code == 0, validated.output
    assert "leave-one-out retraining of 3 training samples" in validated.output
    h = np.asarray(zarr.open_group(out, mode="r")["hypergradient"][:])
    np.testing.assert_allclose(
        h, np.asarray(stored["hypergradient"][:]), rtol=0, atol=1e-6 * np.abs(h).max()
    )


def test_a_named_own_loop_under_a_memory_budget_records_its_partitions_itself(
    digits_store, tmp_path
):
    stored = zarr.open_group(digits_store, mode="r")
    out = tmp_path / "budget.zarr"
    recorder = own_loop(out, stored, memory_budget=2_000_000, **NAMED)
    assert recorder.partitioned and recorder.plan.n_partitions >= 3
    h = np.asarray(zarr.open_group(out, mode="r")["hypergradient"][:])
    expected = np.asarray(stored["hypergradient"][:])
    assert np.abs(h - expected).max() <= 1e-6 * np.abs(expected).max()


@pytest.mark.parametrize(
    ("indices", "message"),
    [
        (None, "step 1: no indices given"),
        ([0.5, 1.0], "indices must be integers .*got float64"),
        ([0, 7], r"batch indices must lie in \[0, 5\)"),
        ([1, 1], r"samples \[1\] more than once"),
    ],
)
def test_bad_indices_get_one_clear_error_and_leave_the_store_failed(tmp_path, indices, message):
    model = torch.nn.Linear(3, 2)
    out = tmp_path / "bad.zarr"
    recorder = HydraRecorder(model, torch.optim.SGD(model.parameters(), lr=0.1), out, n_train=5)
    with pytest.raises(InvalidArgumentError, match=message), recorder:
        recorder.step(torch.zeros(2, 3), torch.zeros(2, dtype=torch.long), indices)
    attrs = zarr.open_group(out, mode="r").attrs
    assert attrs["status"] == "failed" and "InvalidArgumentError" in attrs["failure"]
