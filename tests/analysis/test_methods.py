"""The contribution-method seam: a method dropped into a registry is run, kept in its own group,
and scored by `compare` and `validate` with no code of theirs changed."""

from __future__ import annotations

import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pytest
import xarray as xr
from typer.testing import CliRunner

from hydra_store.analysis.comparison import run_comparison
from hydra_store.analysis.methods import (
    ContributionMethod,
    MethodRegistry,
    ReverseModeMethod,
    default_methods,
)
from hydra_store.analysis.reverse import (
    adjoint_contributions,
    read_reverse_group,
    run_exact_analysis,
)
from hydra_store.analysis.test_sets import resolve_test_set
from hydra_store.analysis.validation import run_validation
from hydra_store.core.gradients import mean_loss_gradient
from hydra_store.errors import InvalidArgumentError
from hydra_store.replay.recorded_run import load_run_data, model_at_checkpoint
from hydra_store.replay.trajectory import Trajectory
from hydra_store.store.format import open_group
from hydra_store.store.groups import write_result_group
from hydra_store_cli.main import app


@dataclass(frozen=True)
class ScaledConfig:
    test_set: str = "test"
    factor: float = 2.0


class ScaledExactMethod(ContributionMethod):
    """A stand-in method: the reverse-mode exact C(i) times a positive factor (so it must rank
    exactly like the exact contribution), written to its own group `scaled/<test set>`."""

    name = "scaled"
    group = "scaled"
    config_type = ScaledConfig
    description = "test stand-in"

    def run(self, path, config, progress=None, inputs=None):
        exact = np.asarray(read_reverse_group(path, config.test_set)["total_contribution_exact"])
        values = config.factor * exact
        arrays = {"total_contribution": (values, ("train",), {})}
        write_result_group(path, f"scaled/{config.test_set}", arrays, {"config": asdict(config)})
        return values

    def totals(self, path, test_set):
        root = open_group(path)
        if f"scaled/{test_set}" not in root:
            return {}
        values = np.asarray(root[f"scaled/{test_set}/total_contribution"][:])
        return {"scaled exact": (np.arange(values.size), values)}


@pytest.fixture()
def run_copy(float64_run, tmp_path) -> Path:
    path = tmp_path / "copy.zarr"
    shutil.copytree(float64_run.path, path)
    return path


def test_a_new_method_is_scored_by_compare_and_validate(run_copy):
    registry = default_methods()
    registry.add(ScaledExactMethod())
    run_exact_analysis(run_copy, "test")
    exact = np.asarray(read_reverse_group(run_copy, "test")["total_contribution_exact"])
    method = registry["scaled"]
    method.run(run_copy, method.config_from_options({"test_set": "test", "top_k": 3}))

    comparison = run_comparison(run_copy, "test", over_checkpoints=False, methods=registry)
    scores = {s.method: s for s in comparison.scores}
    assert scores["scaled exact"].spearman == pytest.approx(1.0)
    assert scores["scaled exact"].sign_error == 0.0
    assert scores["scaled exact"].n_samples == exact.size

    validation = run_validation(run_copy, "test", samples=5, methods=registry)
    by_method = {c.method: c for c in validation.correlations}
    assert by_method["scaled exact"].spearman == pytest.approx(
        by_method[ReverseModeMethod.EXACT].spearman
    )
    ds = xr.open_zarr(str(run_copy), group="reverse/test/validation")
    np.testing.assert_allclose(
        ds["predicted_scaled"].values, 2.0 * exact[ds["validation_sample"].values]
    )

    # Each method owns its group: re-running reverse mode keeps the other method's results.
    run_exact_analysis(run_copy, "test")
    assert "scaled exact" in registry.totals(run_copy, "test")


class ScaledOverCheckpoints(ScaledExactMethod):
    """The stand-in, also at earlier checkpoints: the exact C(i) there (an adjoint truncated at
    the checkpoint, the test direction at its weights) times the factor."""

    name = "scaled-checkpoints"
    group = "scaled-checkpoints"

    def totals_at(self, path, checkpoints, config, *, inputs=None, progress=None):
        trajectory = Trajectory(path)
        train = load_run_data(path).train
        tests = resolve_test_set(path, config.test_set)
        rows = []
        for k in checkpoints:
            model = model_at_checkpoint(path, k)
            u, _ = mean_loss_gradient(model, trajectory.layout, tests.inputs, tests.targets)
            scratch = model_at_checkpoint(path, 0)
            result = adjoint_contributions(trajectory, scratch, train, u[None], checkpoint=k)
            rows.append(config.factor * result.exact[0])
        return np.array(rows)


def test_a_new_method_with_totals_at_is_scored_over_checkpoints(run_copy):
    registry = default_methods()
    assert [m.name for m in registry if m.scores_checkpoints] == ["influence", "tracin", "trak"]
    registry.add(ScaledExactMethod())
    registry.add(ScaledOverCheckpoints())
    assert not registry["scaled"].scores_checkpoints
    assert registry["scaled-checkpoints"].scores_checkpoints
    summary = run_comparison(
        run_copy, "test", methods=registry, checkpoint_methods=("scaled-checkpoints",)
    )
    study = summary.study
    assert study.labels[1] == "scaled-checkpoints" and study.stored == [True, False]
    # a positive multiple of the exact contribution at every checkpoint: no sign flipped
    np.testing.assert_array_equal(study.sign_error[1], np.zeros(3))
    np.testing.assert_allclose(study.spearman[1], np.ones(3), rtol=1e-12)
    with pytest.raises(InvalidArgumentError, match="'scaled' gives no C"):
        run_comparison(run_copy, "test", methods=registry, checkpoint_methods=("scaled",))


def test_registry_refuses_clashes_and_names_its_methods():
    registry = default_methods()
    assert registry.names() == ["hydra-exact", "hydra", "influence", "tracin", "trak"]
    with pytest.raises(InvalidArgumentError, match="exists"):
        registry.add(ReverseModeMethod())
    clash = ScaledExactMethod()
    clash.name, clash.group = "other", "reverse"
    with pytest.raises(InvalidArgumentError, match="another method's group"):
        registry.add(clash)
    with pytest.raises(InvalidArgumentError, match="choose one of hydra-exact, hydra, influence"):
        registry["datamodels"]
    assert [m.name for m in MethodRegistry((ScaledExactMethod(),))] == ["scaled"]


def test_cli_unknown_method_is_one_error_line(digits_store):
    result = CliRunner().invoke(app, ["analyze", str(digits_store), "--method", "datamodels"])
    assert result.exit_code == 2
    assert (
        "unknown method 'datamodels'; choose one of hydra-exact, hydra, influence, tracin, trak"
        in result.output
    )
    assert "Traceback" not in result.output
