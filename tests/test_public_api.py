"""The package's public names resolve, and the dask-side analysis code stays free of torch."""

from __future__ import annotations

import subprocess
import sys

import pytest

import hydra_store


@pytest.mark.parametrize("name", [n for n in hydra_store.__all__ if n != "__version__"])
def test_every_exported_name_resolves(name):
    assert getattr(hydra_store, name) is not None


def test_unknown_attribute_is_an_attribute_error():
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        _ = hydra_store.nope


def test_analysis_functions_import_without_torch():
    code = "import sys, hydra_store.analysis; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


@pytest.mark.parametrize(
    "name", ["AnalyzeConfig", "AnalyzeSummary", "SuspectsTable", "ProgressCallback", "analyze"]
)
def test_analysis_names_resolve(name):
    import hydra_store.analysis

    assert getattr(hydra_store.analysis, name) is not None
    assert name in hydra_store.analysis.__all__ or name == "ProgressCallback"
