"""The stored-hypergradient analysis saves its arguments beside its outputs, as the recording
does."""

from __future__ import annotations

import dataclasses

import zarr

from hydra_store.arguments import AnalyzeConfig, RecordConfig


def test_each_stage_saves_its_arguments_beside_its_outputs(analysed_store, digits_store):
    root = zarr.open_group(analysed_store, mode="r")
    assert root["analysis/test"].attrs["config"] == dataclasses.asdict(
        AnalyzeConfig(figures=False, top_k=5)
    )
    recorded = zarr.open_group(digits_store, mode="r").attrs["config"]
    assert RecordConfig.from_attrs(recorded).epochs == 3
