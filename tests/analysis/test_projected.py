"""`analyze` of a store recorded with `--project-dim`: the test gradients are projected with the
store's projector, so C(i, j) is the dot product of the projected hypergradient and the
projected test gradient; and at K = 1,024 the projected totals rank the samples as the full ones
do."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import zarr
from scipy.stats import spearmanr

from hydra_store.analysis.stored import analyze, open_analysis
from hydra_store.arguments import AnalyzeConfig
from hydra_store.core.parameters import ParameterLayout
from hydra_store.core.projection import projector_from_attrs
from hydra_store.recording.training import record_run
from hydra_store.replay.recorded_run import load_run_data, model_at_checkpoint
from tests.conftest import tiny_config

QUIET = AnalyzeConfig(figures=False, clusters_k=50)


@pytest.fixture(scope="module")
def full_and_projected(tmp_path_factory):
    """One digits run (the default 2,410-parameter MLP) recorded in full and at K = 1,024."""
    folder = tmp_path_factory.mktemp("projected")
    options = dict(model="mlp", epochs=4)
    full, projected = folder / "full.zarr", folder / "k1024.zarr"
    record_run(tiny_config(full, **options))
    record_run(tiny_config(projected, project_dim=1024, **options))
    for path in (full, projected):
        analyze(path, QUIET)
    return full, projected


def _independent_test_gradients(path) -> torch.Tensor:
    """Each test sample's loss gradient by plain autograd, one sample at a time."""
    model = model_at_checkpoint(path)
    model.eval()
    test = load_run_data(path).bundle.test
    layout = ParameterLayout.from_model(model)
    params = [dict(model.named_parameters())[n] for n in layout.names]
    rows = []
    for x, y in zip(test.inputs, test.targets, strict=True):
        loss = F.cross_entropy(model(x[None]), y[None])
        rows.append(torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, params)]))
    return torch.stack(rows).double()


def test_projected_contributions_are_dot_products_of_projected_vectors(full_and_projected):
    full, projected = full_and_projected
    group = zarr.open_group(projected, mode="r")
    projector = projector_from_attrs(group.attrs["projection"], int(group.attrs["n_params"]))
    assert group["hypergradient"].shape == (1437, projector.width) and projector.width <= 1024
    # The projected store holds R^T h of the full store's h (same seed: same training).
    h_full = torch.from_numpy(np.asarray(zarr.open_group(full, mode="r")["hypergradient"][:]))
    h_projected = projector.project(h_full.double())
    stored = np.asarray(group["hypergradient"][:], dtype=np.float64)
    scale = np.abs(stored).max()
    assert np.abs(stored - h_projected.numpy()).max() <= 1e-5 * scale
    g_projected = projector.project(_independent_test_gradients(full))
    expected = -(h_projected @ g_projected.T).numpy() / 1437
    c = np.asarray(open_analysis(projected)["contribution"].values, dtype=np.float64)
    assert np.abs(c - expected).max() <= 1e-5 * np.abs(expected).max()


def test_projected_totals_rank_samples_as_the_full_ones(full_and_projected):
    full, projected = full_and_projected
    totals = [open_analysis(p)["total_contribution"].values for p in (full, projected)]
    rho = spearmanr(*totals).statistic
    assert rho > 0.95, rho


def test_the_cli_records_analyses_and_describes_a_projected_store(tmp_path):
    from typer.testing import CliRunner

    from hydra_store_cli.main import app

    out = str(tmp_path / "p.zarr")
    runner = CliRunner()
    recorded = runner.invoke(app, ["record", "--epochs", "1", "--project-dim", "512", "--out", out])
    assert recorded.exit_code == 0, recorded.output
    info = runner.invoke(app, ["info", out])
    assert "projection tensor-sketch: 512 dimensions, seed 0" in info.output
    assert "hypergradient: 1437 x 512 float32" in info.output
    analysed = runner.invoke(app, ["analyze", out, "--no-figures", "--clusters-k", "20"])
    assert analysed.exit_code == 0, analysed.output
    assert "2410 parameters, projected to 512)" in analysed.output
