"""The projector seam: a linear projector dropped into the recorder tracks exactly the projection
of the full hypergradients, and an analysis of projected hypergradients against projected test
gradients equals the projected dot products."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import xarray as xr

from hydra_store.analysis import contributions
from hydra_store.core.projection import (
    CountSketchProjector,
    IdentityProjector,
    Projector,
    projector_from_attrs,
)
from hydra_store.errors import InvalidArgumentError, StoreFormatError
from tests.conftest import record_small_run


class DenseGaussianProjector(Projector):
    """A seeded dense Gaussian R (P x K): fine for a tiny test model, the simplest second
    implementation of the seam."""

    dim = "projection"

    def __init__(self, n_params: int, width: int, seed: int) -> None:
        self.n_params, self.width = n_params, width
        generator = torch.Generator().manual_seed(seed)
        self.matrix = torch.randn(n_params, width, generator=generator, dtype=torch.float64)

    def project(self, vectors):
        return vectors @ self.matrix.to(vectors.dtype)

    def to_attrs(self):
        return {"kind": "dense-gaussian-test", "width": self.width}


N_PARAMS = 8 * 8 * 4 + 4 + 4 * 10 + 10  # mlp:hidden=4 on 8x8 digits


def test_projected_recording_is_the_projection_of_the_full_one(tmp_path):
    projector = DenseGaussianProjector(N_PARAMS, 16, seed=3)
    _, _, _, full, _ = record_small_run(tmp_path / "full.zarr", mode="approximate")
    _, _, _, projected, _ = record_small_run(
        tmp_path / "projected.zarr", mode="approximate", projector=projector
    )
    assert projected.shape == (6, 16)
    torch.testing.assert_close(projected, full @ projector.matrix, rtol=1e-10, atol=1e-12)
    ds = xr.open_zarr(str(tmp_path / "projected.zarr"))
    assert ds["hypergradient"].dims == ("sample", "projection")
    assert ds.attrs["projection"] == {"kind": "dense-gaussian-test", "width": 16}
    with pytest.raises(StoreFormatError, match="dense-gaussian-test"):
        projector_from_attrs(ds.attrs["projection"], N_PARAMS)

    # The analysers take the width from the store: C(i, j) of the projected store against
    # projected test gradients is the projected dot product.
    test_gradients = torch.randn(5, N_PARAMS, dtype=torch.float64, generator=torch.Generator())
    projected_tests = xr.DataArray(
        projector.project(test_gradients).numpy(), dims=("test", "projection")
    )
    c = contributions(ds.astype(np.float64), projected_tests).compute().values
    expected = -(projected.numpy() @ projected_tests.values.T) / ds.attrs["n_train"]
    np.testing.assert_allclose(c, expected, rtol=1e-5)


def test_the_exact_mode_refuses_a_projection(tmp_path):
    projector = DenseGaussianProjector(N_PARAMS, 8, seed=0)
    with pytest.raises(InvalidArgumentError, match="without a projection"):
        record_small_run(tmp_path / "x.zarr", mode="both", projector=projector)
    assert not (tmp_path / "x.zarr").exists()


def test_identity_projector():
    identity = IdentityProjector(5)
    v = torch.randn(3, 5)
    assert identity.project(v) is v
    assert identity.width == 5 and identity.dim == "param" and identity.is_identity
    rebuilt = projector_from_attrs(identity.to_attrs(), 5)
    assert isinstance(rebuilt, IdentityProjector) and rebuilt.width == 5
    assert isinstance(projector_from_attrs(None, 5), IdentityProjector)


def test_the_count_sketch_is_linear_seeded_and_rebuilt_from_its_attributes():
    projector = CountSketchProjector(N_PARAMS, 40, seed=3)
    assert (projector.n_params, projector.width, projector.dim) == (N_PARAMS, 40, "projection")
    generator = torch.Generator().manual_seed(0)
    a, b = (torch.randn(3, N_PARAMS, dtype=torch.float64, generator=generator) for _ in range(2))
    torch.testing.assert_close(
        projector.project(2 * a - 0.5 * b), 2 * projector.project(a) - 0.5 * projector.project(b)
    )
    again = CountSketchProjector(N_PARAMS, 40, seed=3)
    torch.testing.assert_close(again.project(a), projector.project(a), rtol=0, atol=0)
    other = CountSketchProjector(N_PARAMS, 40, seed=4)
    assert not torch.allclose(other.project(a), projector.project(a))
    rebuilt = projector_from_attrs(projector.to_attrs(), N_PARAMS)
    torch.testing.assert_close(rebuilt.project(a), projector.project(a), rtol=0, atol=0)
    with pytest.raises(StoreFormatError, match="does not match its parameter layout"):
        projector_from_attrs(projector.to_attrs(), N_PARAMS + 1)
    with pytest.raises(InvalidArgumentError, match="not smaller than the 310 parameters"):
        CountSketchProjector(N_PARAMS, N_PARAMS, seed=0)


def _matrix(projector: Projector) -> torch.Tensor:
    """R (n_params x width), by projecting the identity."""
    return projector.project(torch.eye(projector.n_params, dtype=torch.float64))


def test_the_count_sketch_matrix_is_naive_bucketing_with_signs():
    """Against a hand-built R: one +-1 per parameter, in the column of its bucket."""
    projector = CountSketchProjector(N_PARAMS, 16, seed=7)
    naive = torch.zeros(N_PARAMS, 16, dtype=torch.float64)
    for j in range(N_PARAMS):
        naive[j, int(projector.bucket[j])] = float(projector.sign[j])
    torch.testing.assert_close(_matrix(projector), naive, rtol=0, atol=0)
    assert set(projector.sign.tolist()) == {-1, 1}


def test_the_projection_preserves_dot_products_on_average():
    """E[R R^T] = I: over 2,000 seeds the mean of R R^T is the identity within sampling error
    (diagonal exactly 1; off-diagonal entries +-1 with probability 1/K, mean 0)."""
    total = torch.zeros(N_PARAMS, N_PARAMS, dtype=torch.float64)
    n = 2000
    for seed in range(n):
        r = _matrix(CountSketchProjector(N_PARAMS, 16, seed=seed))
        total += r @ r.T
    mean = total / n
    torch.testing.assert_close(mean.diagonal(), torch.ones(N_PARAMS, dtype=torch.float64))
    off = mean - torch.diag(mean.diagonal())
    # Each off-diagonal mean: variance (1/16) / 2000, standard deviation 0.0056.
    assert off.abs().max() < 6 * 0.0056 and (off**2).mean() < 1.2 * (1 / 16) / n


def test_a_count_sketch_recording_is_the_projection_of_the_full_one(tmp_path):
    projector = CountSketchProjector(N_PARAMS, 40, seed=1)
    _, _, _, full, _ = record_small_run(tmp_path / "full.zarr", mode="approximate")
    _, _, _, projected, _ = record_small_run(
        tmp_path / "k.zarr", mode="approximate", projector=projector
    )
    torch.testing.assert_close(projected, projector.project(full), rtol=1e-10, atol=1e-12)
    ds = xr.open_zarr(str(tmp_path / "k.zarr"))
    assert ds["hypergradient"].dims == ("sample", "projection")
    assert ds.attrs["projection"] == {
        "kind": "count-sketch",
        "width": 40,
        "seed": 1,
        "n_params": 310,
    }
