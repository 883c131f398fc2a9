"""Analysers given the model and the data in Python (`RunInputs`): a store recorded around a
user's loop that names no data set or model is analysed by every analyser, with the results of
the equivalent built-in run; data or a model other than the ones trained on are refused."""

from __future__ import annotations

import numpy as np
import pytest
import xarray as xr
import zarr
from torch.utils.data import TensorDataset

from hydra_store import IndexedDataset, RunInputs
from hydra_store.analysis.comparison import run_comparison
from hydra_store.analysis.reverse import run_exact_analysis
from hydra_store.analysis.stored import analyze
from hydra_store.analysis.validation import run_validation
from hydra_store.arguments import AnalyzeConfig
from hydra_store.data.datasets import load_dataset
from hydra_store.data.models import build_model
from hydra_store.errors import InvalidArgumentError, ReplayMismatchError, StoreFormatError
from tests.recording.test_named_run import own_loop


@pytest.fixture(scope="module")
def unnamed_store(digits_store, tmp_path_factory):
    """The built-in digits run's batches and learning rates through a user's loop that names
    nothing."""
    out = tmp_path_factory.mktemp("own") / "unnamed.zarr"
    own_loop(out, zarr.open_group(digits_store, mode="r"))
    return out


def digits_inputs(**changes) -> RunInputs:
    bundle = load_dataset("digits", seed=0)
    options = {
        "model": lambda: build_model("mlp:hidden=16", input_shape=(1, 8, 8), n_classes=10),
        "train": IndexedDataset(TensorDataset(bundle.train.inputs, bundle.train.targets)),
        "test": (bundle.test.inputs, bundle.test.targets),
        "class_names": bundle.class_names,
    }
    return RunInputs(**(options | changes))


def relative(mine, theirs) -> float:
    return float(np.abs(np.asarray(mine) - np.asarray(theirs)).max() / np.abs(theirs).max())


def test_every_analyser_takes_the_run_in_python_and_equals_the_built_in_run(
    unnamed_store, store_copy
):
    with pytest.raises(StoreFormatError, match="named no data set and model"):
        analyze(unnamed_store)
    inputs = digits_inputs()
    config = AnalyzeConfig(clusters_k=50, figures=False)
    summary = analyze(unnamed_store, AnalyzeConfig(clusters_k=50), inputs=inputs)
    assert {f.name for f in summary.figures} >= {"influencers.png", "interclass.png"}
    assert all(f.is_file() for f in summary.figures)
    analyze(store_copy, config)
    for variable in ("total_contribution", "interclass"):
        mine = xr.open_zarr(str(unnamed_store), group="analysis/test")[variable].values
        theirs = xr.open_zarr(str(store_copy), group="analysis/test")[variable].values
        assert relative(mine, theirs) <= 1e-6, variable

    mine = run_exact_analysis(unnamed_store, inputs=inputs, per_test=3)
    theirs = run_exact_analysis(store_copy, per_test=3)
    assert relative(mine.total_exact, theirs.total_exact) <= 1e-6
    assert relative(mine.total_approx, theirs.total_approx) <= 1e-6
    per_test = xr.open_zarr(str(unnamed_store), group="reverse/test")["contribution_exact"]
    expected = xr.open_zarr(str(store_copy), group="reverse/test")["contribution_exact"]
    assert relative(per_test.values, expected.values) <= 1e-6

    compared = run_comparison(unnamed_store, inputs=inputs)
    reference = run_comparison(store_copy)
    for a, b in zip(compared.scores, reference.scores, strict=True):
        assert a.method == b.method and a.n_samples == b.n_samples
        assert a.spearman == pytest.approx(b.spearman, abs=1e-6)

    validated = run_validation(unnamed_store, inputs=inputs, samples=4, selection="random")
    baseline = run_validation(store_copy, samples=4, selection="random")
    np.testing.assert_array_equal(validated.samples, baseline.samples)
    assert validated.base_loss == pytest.approx(baseline.base_loss, rel=1e-6)
    assert relative(validated.loss_change, baseline.loss_change) <= 1e-4


def test_a_training_set_other_than_the_one_trained_on_is_refused_by_its_digests(unnamed_store):
    bundle = load_dataset("digits", seed=0)
    shifted = bundle.train.inputs.clone()
    shifted[7] += 0.25
    with pytest.raises(ReplayMismatchError, match="sample 7 \\(and 0 more"):
        run_exact_analysis(
            unnamed_store, inputs=digits_inputs(train=(shifted, bundle.train.targets))
        )
    relabelled = bundle.train.targets.clone()
    relabelled[[3, 11]] = (relabelled[[3, 11]] + 1) % 10
    with pytest.raises(ReplayMismatchError, match="sample 3 \\(and 1 more"):
        run_exact_analysis(
            unnamed_store, inputs=digits_inputs(train=(bundle.train.inputs, relabelled))
        )
    with pytest.raises(InvalidArgumentError, match="has 1000 samples; the run recorded in"):
        run_exact_analysis(
            unnamed_store,
            inputs=digits_inputs(train=(bundle.train.inputs[:1000], bundle.train.targets[:1000])),
        )


def test_a_model_other_than_the_one_trained_is_refused(unnamed_store):
    other = build_model("mlp:hidden=8", input_shape=(1, 8, 8), n_classes=10)
    with pytest.raises(InvalidArgumentError, match="the model given has a different parameter"):
        run_exact_analysis(unnamed_store, inputs=digits_inputs(model=other))
    with pytest.raises(InvalidArgumentError, match=r"must be a torch\.nn\.Module or a function"):
        run_exact_analysis(unnamed_store, inputs=digits_inputs(model="mlp"))
    with pytest.raises(InvalidArgumentError, match="the training data must be a torch Dataset"):
        run_exact_analysis(unnamed_store, inputs=digits_inputs(train=42))


def test_the_store_of_an_unnamed_loop_holds_a_digest_of_every_sample_drawn(unnamed_store):
    digests = np.asarray(zarr.open_group(unnamed_store, mode="r")["train_digest"][:])
    assert digests.shape == (1437,) and (digests != 0).all()
    assert np.unique(digests).size == 1437
    bundle = load_dataset("digits", seed=0)
    from hydra_store.core.fingerprints import sample_digests

    again = sample_digests(bundle.train.inputs[:5], bundle.train.targets[:5])
    np.testing.assert_array_equal(again, digests[:5])
