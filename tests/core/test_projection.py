"""The projector seam: a linear projector dropped into the recorder tracks exactly the projection
of the full hypergradients, and an analysis of projected hypergradients against projected test
gradients equals the projected dot products. The built-in projectors: CountSketch (what older
stores hold) and the tensor sketch (`record --project-dim`)."""

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
    SketchedLayer,
    TensorSketchProjector,
    projector_from_attrs,
)
from hydra_store.core.sketched_gradients import tensor_sketch_projector
from hydra_store.data.models import build_model
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


# A layout of 30 parameters: a fallback block of 3, a (4 x 5) weight, 3 more fallback, a bias
# of 4 for the weight.
LAYER = SketchedLayer(weight_offset=3, d_out=4, d_in=5, bias_offset=26)


def test_the_tensor_sketch_is_linear_seeded_and_rebuilt_from_its_attributes():
    projector = TensorSketchProjector(30, 8, seed=3, layers=[LAYER])
    assert (projector.n_params, projector.width, projector.dim) == (30, 8, "projection")
    generator = torch.Generator().manual_seed(0)
    a, b = (torch.randn(3, 30, dtype=torch.float64, generator=generator) for _ in range(2))
    torch.testing.assert_close(
        projector.project(2 * a - 0.5 * b), 2 * projector.project(a) - 0.5 * projector.project(b)
    )
    again = TensorSketchProjector(30, 8, seed=3, layers=[LAYER])
    torch.testing.assert_close(again.project(a), projector.project(a), rtol=0, atol=0)
    other = TensorSketchProjector(30, 8, seed=4, layers=[LAYER])
    assert not torch.allclose(other.project(a), projector.project(a))
    attrs = projector.to_attrs()
    assert attrs == {
        "kind": "tensor-sketch",
        "width": 8,
        "seed": 3,
        "n_params": 30,
        "layers": [[3, 4, 5, 26]],
    }
    rebuilt = projector_from_attrs(attrs, 30)
    assert isinstance(rebuilt, TensorSketchProjector) and rebuilt.layers == (LAYER,)
    torch.testing.assert_close(rebuilt.project(a), projector.project(a), rtol=0, atol=0)
    with pytest.raises(StoreFormatError, match="does not match its parameter layout"):
        projector_from_attrs(attrs, 31)
    with pytest.raises(StoreFormatError, match="not a valid tensor sketch"):
        projector_from_attrs({**attrs, "layers": [[3, 4, 5, 20]]}, 30)  # bias inside the weight
    with pytest.raises(StoreFormatError, match="not a valid tensor sketch"):
        projector_from_attrs({k: v for k, v in attrs.items() if k != "layers"}, 30)
    with pytest.raises(InvalidArgumentError, match="not smaller than the 30 parameters"):
        TensorSketchProjector(30, 30, layers=[LAYER])


def test_the_tensor_sketch_hash_is_the_product_of_its_layer_factors():
    """Entry (o, i) of the layer's weight, and o of its bias as column d_in, goes to bucket
    (h_out[o] + h_in[i]) mod K with sign s_out[o] s_in[i]; every other parameter keeps the
    CountSketch of the same seed."""
    projector = TensorSketchProjector(30, 8, seed=5, layers=[LAYER])
    (factors,) = projector.hashes
    plain = CountSketchProjector(30, 8, seed=5)
    naive = torch.zeros(30, 8, dtype=torch.float64)
    for j in [*range(3), *range(23, 26)]:
        naive[j, int(plain.bucket[j])] = float(plain.sign[j])
    for o in range(4):
        for i in range(6):
            j = 3 + 5 * o + i if i < 5 else 26 + o
            bucket = (int(factors.h_out[o]) + int(factors.h_in[i])) % 8
            naive[j, bucket] = float(factors.s_out[o] * factors.s_in[i])
    torch.testing.assert_close(_matrix(projector), naive, rtol=0, atol=0)
    assert set(factors.s_out.tolist()) <= {-1, 1} and set(factors.s_in.tolist()) <= {-1, 1}
    # Without layers it is the CountSketch, hash for hash.
    torch.testing.assert_close(
        _matrix(TensorSketchProjector(30, 8, seed=5)), _matrix(plain), rtol=0, atol=0
    )


def test_the_tensor_sketch_preserves_dot_products_on_average():
    """E[R R^T] = I: two distinct entries of the layer differ in o or in i, so the product of
    their signs has mean 0 over seeds; the diagonal is exactly 1."""
    total = torch.zeros(30, 30, dtype=torch.float64)
    n = 2000
    for seed in range(n):
        r = _matrix(TensorSketchProjector(30, 8, seed=seed, layers=[LAYER]))
        total += r @ r.T
    mean = total / n
    torch.testing.assert_close(mean.diagonal(), torch.ones(30, dtype=torch.float64))
    off = mean - torch.diag(mean.diagonal())
    # Each off-diagonal mean: variance at most (1/8) / 2000, standard deviation 0.0079.
    assert off.abs().max() < 6 * 0.0079 and (off**2).mean() < 1.2 * (1 / 8) / n


def test_a_tensor_sketch_recording_is_the_projection_of_the_full_one(tmp_path):
    """The recorder's sketched per-sample gradients (no per-sample gradient formed), through
    the whole recurrence: R^T of the full hypergradients."""
    model = build_model("mlp:hidden=4", input_shape=(1, 8, 8), n_classes=10, seed=0)
    projector = tensor_sketch_projector(model, 40, seed=1)
    assert isinstance(projector, TensorSketchProjector) and len(projector.layers) == 2
    _, _, _, full, _ = record_small_run(tmp_path / "full.zarr", mode="approximate")
    _, _, _, projected, _ = record_small_run(
        tmp_path / "k.zarr", mode="approximate", projector=projector
    )
    torch.testing.assert_close(projected, projector.project(full), rtol=1e-10, atol=1e-12)
    ds = xr.open_zarr(str(tmp_path / "k.zarr"))
    assert ds.attrs["projection"] == projector.to_attrs()
    assert ds.attrs["step_gradient"] == "sketched_backward"
