"""The baselines beside HyDRA (influence functions, TracIn, TRAK-style) through the method
registry: each writes only its own group, and `compare` and `validate` score all three with no
code of theirs changed."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import xarray as xr

from hydra_store import RunInputs
from hydra_store.analysis.baselines import load_recorded_run, training_dots
from hydra_store.analysis.comparison import run_comparison
from hydra_store.analysis.lds import find_contributions
from hydra_store.analysis.methods import default_methods
from hydra_store.analysis.tracin import tracin_terms
from hydra_store.analysis.validation import run_validation
from hydra_store.arguments import InfluenceConfig, TracInConfig, TrakConfig
from hydra_store.errors import InvalidArgumentError
from hydra_store.store.format import open_group
from tests.conftest import coupled_net
from tests.recording.test_batch_norm import data, record_coupled_run


@pytest.fixture()
def run_copy(float64_run, tmp_path) -> Path:
    path = tmp_path / "copy.zarr"
    shutil.copytree(float64_run.path, path)
    return path


def test_compare_and_validate_score_every_baseline(run_copy):
    registry = default_methods()
    assert registry.names() == ["hydra-exact", "hydra", "influence", "tracin", "trak"]
    for name in ("influence", "tracin", "trak"):
        method = registry[name]
        method.run(run_copy, method.config_from_options({"test_set": "test", "top_k": 3}))
    root = open_group(run_copy)
    assert {"influence", "tracin", "trak"} <= set(root.group_keys())
    totals = registry.totals(run_copy, "test")
    labels = [
        label for label in totals if label.split(" ")[0] in ("influence", "tracin", "trak-style")
    ]
    assert len(labels) == 3

    comparison = run_comparison(run_copy, "test", over_checkpoints=False)
    scores = {s.method: s for s in comparison.scores}
    for label in labels:
        assert scores[label].n_samples == 200
        assert np.isfinite(scores[label].spearman) and 0 <= scores[label].sign_error <= 1

    validation = run_validation(run_copy, "test", samples=4)
    scored = {c.method for c in validation.correlations}
    assert set(labels) <= scored
    ds = xr.open_zarr(str(run_copy), group="reverse/test/validation")
    for variable, label in zip(
        ("predicted_influence", "predicted_tracin", "predicted_trak_style"), labels, strict=True
    ):
        _, values = totals[label]
        np.testing.assert_array_equal(ds[variable].values, values[ds["validation_sample"].values])

    # Each owns its group: running one again leaves the others' results as they were.
    before = registry.totals(run_copy, "test")
    registry["tracin"].run(run_copy, registry["tracin"].config_from_options({}))
    after = registry.totals(run_copy, "test")
    for label in labels:
        np.testing.assert_array_equal(after[label][1], before[label][1])


def test_per_test_contributions_are_found_and_truncated_results_are_not_scored(run_copy):
    """Every baseline's per-test C(i, j) is `contribution` (train, test) float64 beside `test`,
    where the LDS (and the clustering) find it; one computed before the last checkpoint is left
    out of the LDS, compare and validate alike."""
    registry = default_methods()
    chosen = (4, 0, 9)
    for name in ("influence", "tracin", "trak"):
        method = registry[name]
        options = {"per_test": chosen, "solver": "cg", "project_dim": 64}
        method.run(run_copy, method.config_from_options(options))
        group = open_group(run_copy)[f"{method.group}/test"]
        assert group["contribution"].metadata.dimension_names == ("train", "test")
        assert group["contribution"].dtype == np.float64
        assert group["contribution"].shape == (200, 3)
        np.testing.assert_array_equal(group["test"][:], chosen)
        assert group.attrs["config"]["per_test"] == list(chosen)
    per_test, totals, skipped = find_contributions(run_copy, "test", registry, 4)
    assert {c.label for c in per_test} == {
        "influence:contribution",
        "tracin:contribution",
        "trak:contribution",
    }
    assert len(totals) == 3 and skipped == []

    registry["tracin"].run(run_copy, TracInConfig(checkpoint=1, per_test=chosen))
    per_test, totals, skipped = find_contributions(run_copy, "test", registry, 4)
    assert "tracin:contribution" not in {c.label for c in per_test}
    assert skipped == ["tracin/test (tracin): computed at an earlier checkpoint"]
    assert not any(label.startswith("tracin") for label in registry.totals(run_copy, "test"))
    validation = run_validation(run_copy, "test", samples=3)
    assert not any(c.method.startswith("tracin") for c in validation.correlations)


@pytest.mark.parametrize(
    ("config", "message"),
    [
        (InfluenceConfig(per_test=0), "--per-test must be at least 1, got 0"),
        (TracInConfig(per_test=True), "--per-test must be a count or a tuple"),
        (TrakConfig(per_test=[1, 2]), "--per-test must be a count or a tuple"),
        (TrakConfig(checkpoint=1.5), "--checkpoint must be an integer, got 1.5"),
    ],
)
def test_bad_checkpoint_and_per_test_are_refused(config, message):
    with pytest.raises(InvalidArgumentError, match=message):
        config.validate()


def test_a_batch_norm_and_dropout_model_is_scored_in_eval_mode(tmp_path):
    """The baselines take each training sample's own gradient with the model in eval mode:
    their dot products equal one plain backward pass of each sample alone (running statistics,
    no dropout), and TracIn computed twice gives the same numbers (in training mode dropout
    drew new masks at every call: two calls differed by 0.010 against a largest C(i) of 0.013)."""
    path = tmp_path / "coupled.zarr"
    record_coupled_run(path)
    (x, y), test = data()
    run = load_recorded_run(path, "test", RunInputs(coupled_net, (x, y), test))
    assert not run.model.training
    directions = torch.randn(2, run.layout.n_params, dtype=torch.float64)
    params = [dict(run.model.named_parameters())[n] for n in run.layout.names]
    naive = []
    for i in range(x.shape[0]):
        loss = torch.nn.functional.cross_entropy(run.model(x[i : i + 1]), y[i : i + 1])
        grads = torch.autograd.grad(loss, params)
        naive.append(directions @ torch.cat([g.reshape(-1) for g in grads]))
    naive = torch.stack(naive)
    dots = training_dots(run, directions)
    torch.testing.assert_close(dots, naive, rtol=1e-10, atol=1e-12)
    first, second = tracin_terms(run).total, tracin_terms(run).total
    assert np.abs(first).max() > 1e-4
    np.testing.assert_array_equal(first, second)
