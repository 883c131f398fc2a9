"""Atomic result groups: a reader sees the old results or the new ones, a failure keeps the old,
and a crash between the two renames of a swap is undone on the next write."""

from __future__ import annotations

import numpy as np
import pytest
import xarray as xr
import zarr

from hydra_store.store.groups import replace_group, write_result_group


def values_of(path, name):
    return xr.open_zarr(str(path), group=name)["x"].values


def test_replace_then_fail_keeps_the_previous_results(store_copy):
    write_result_group(store_copy, "results/test", {"x": (np.arange(3), ("i",), {})}, {})
    np.testing.assert_array_equal(values_of(store_copy, "results/test"), [0, 1, 2])
    write_result_group(store_copy, "results/test", {"x": (np.arange(4) * 2, ("i",), {})}, {})
    np.testing.assert_array_equal(values_of(store_copy, "results/test"), [0, 2, 4, 6])
    with pytest.raises(RuntimeError), replace_group(store_copy, "results/test") as (group, _):
        group.create_array("x", shape=(1,), dtype="i8")
        raise RuntimeError("failure while computing")
    np.testing.assert_array_equal(values_of(store_copy, "results/test"), [0, 2, 4, 6])
    assert sorted(p.name for p in (store_copy / "results").iterdir()) == ["test", "zarr.json"]


def test_a_crash_between_the_renames_is_undone(store_copy):
    write_result_group(store_copy, "results/test", {"x": (np.arange(3), ("i",), {})}, {})
    # What a crash right after moving the old results aside leaves behind:
    (store_copy / "results" / "test").rename(store_copy / "results" / ".test.old-deadbeef")
    with replace_group(store_copy, "results/other") as (group, _):
        group.attrs["unrelated"] = True
    with replace_group(store_copy, "results/test") as (group, _):
        previous = zarr.open_group(store_copy / "results" / "test", mode="r")
        np.testing.assert_array_equal(previous["x"][:], [0, 1, 2])
        group.attrs["replaced"] = True
    assert not list((store_copy / "results").glob(".test.*"))
    assert zarr.open_group(store_copy / "results" / "test", mode="r").attrs["replaced"] is True


def test_the_staging_of_a_killed_analysis_is_removed_by_the_next_one(store_copy):
    write_result_group(store_copy, "analysis/x", {"x": (np.arange(3.0), ("i",), {})}, {})
    killed = store_copy / "analysis" / ".x.partial-deadbeef"
    zarr.open_group(killed, mode="w").create_array("half", shape=(2,), dtype="f4")
    other = store_copy / "analysis" / ".y.partial-deadbeef"  # another group's: not touched
    other.mkdir()
    write_result_group(store_copy, "analysis/x", {"x": (np.arange(4.0), ("i",), {})}, {})
    assert not killed.exists() and other.exists()
    assert values_of(store_copy, "analysis/x").shape == (4,)
