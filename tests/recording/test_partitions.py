"""Out-of-core recording: partitions recorded after training from the stored per-step weights
give the in-memory recorder's hypergradients, survive a lost worker, and refuse a stored
trajectory that does not match its weights."""

from __future__ import annotations

import os
import shutil
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr
from distributed import Client, LocalCluster
from distributed.diagnostics.plugin import WorkerPlugin

from hydra_store.core.projection import CountSketchProjector
from hydra_store.core.sketched_gradients import tensor_sketch_projector
from hydra_store.data.models import build_model
from hydra_store.errors import InvalidArgumentError, ReplayMismatchError, StoreFormatError
from hydra_store.recording.partitions import (
    StatePool,
    TrainingData,
    check_recorded_steps,
    pending_partitions,
    record_partitions,
    run_partitions,
)
from hydra_store.recording.recorder import HydraRecorder
from hydra_store.recording.training import record_run
from hydra_store.store.describe import rows_written
from tests.conftest import small_digits, tiny_config

# float64 small run (tests.conftest.record_small_run): 6 tracked rows of 310 parameters, both
# recurrences with momentum: (310 + 310) x 8 bytes x 2 per row.
SMALL_ROW_BYTES = 9920


def _small_model(dtype=torch.float64):
    return build_model("mlp:hidden=4", input_shape=(1, 8, 8), n_classes=10, seed=0, dtype=dtype)


def record_small(path: Path, *, memory_budget=None, mode="both", projector=None, **options):
    """The float64 run of tests.conftest.record_small_run, finished with its training data so
    that a budget below the state's size records it in partitions."""
    train = small_digits()
    model = _small_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.2, momentum=0.9, weight_decay=0.01)
    schedule = torch.optim.lr_scheduler.ExponentialLR(optimizer, gamma=0.93)
    generator = torch.Generator().manual_seed(0)
    recorder = HydraRecorder(
        model,
        optimizer,
        path,
        n_train=len(train),
        tracked=[0, 4, 5, 9, 13, 21],
        mode=mode,
        memory_budget=memory_budget,
        projector=projector,
        **options,
    )
    inputs = train.inputs.to(torch.float64)
    with recorder:
        for _ in range(3):
            order = torch.randperm(len(train), generator=generator)
            for start in range(0, len(train), 6):
                index = order[start : start + 6]
                recorder.step(inputs[index], train.targets[index], index)
                schedule.step()
            recorder.end_epoch()
        recorder.finish(training_data=TrainingData(_small_model(), inputs, train.targets))
    return recorder, zarr.open_group(path, mode="r")


def rows_done(group: zarr.Group) -> int:
    info = group.attrs["partitions"]
    done = np.asarray(group["partition_done"][:])
    return rows_written(done, int(info["rows"]), int(group.attrs["n_tracked"]))


def test_partitions_equal_the_in_memory_recording_exact_and_approximate(tmp_path):
    _, memory = record_small(tmp_path / "memory.zarr", hypergradient_history=True)
    recorder, parts = record_small(
        tmp_path / "parts.zarr", memory_budget=2 * SMALL_ROW_BYTES, hypergradient_history=True
    )
    assert recorder.plan.n_partitions == 3 and recorder.plan.rows_per_partition == 2
    assert parts.attrs["status"] == "complete"
    assert np.asarray(parts["partition_done"][:]).all() and rows_done(parts) == 6
    for name in (
        "hypergradient",
        "hypergradient_exact",
        "hypergradient_history",
        "hypergradient_exact_history",
    ):
        expected = np.asarray(memory[name][:])
        assert np.abs(expected).max() > 0.1
        np.testing.assert_array_equal(np.asarray(parts[name][:]), expected, err_msg=name)
    # The trajectory is the same run's: weights, batches and learning rates.
    np.testing.assert_array_equal(parts["weights"][:], memory["weights"][:])
    np.testing.assert_array_equal(parts["batch_index"][:], memory["batch_index"][:])
    assert check_recorded_steps(parts) < 1e-6


def test_projected_partitions_equal_the_projected_in_memory_recording(tmp_path):
    projector = CountSketchProjector(310, 40, seed=5)
    _, memory = record_small(tmp_path / "m.zarr", mode="approximate", projector=projector)
    recorder, parts = record_small(
        tmp_path / "p.zarr", mode="approximate", projector=projector, memory_budget=1300
    )
    assert recorder.plan.n_partitions == 3  # 2 x 40 x 8 bytes a row: 2 rows each
    assert parts["hypergradient"].shape == (6, projector.width)
    np.testing.assert_array_equal(parts["hypergradient"][:], memory["hypergradient"][:])


def test_sketched_partitions_store_the_full_paths_fingerprints(tmp_path):
    """A tensor-sketch recording under a budget (the projected gradients from one backward
    pass, each step's fingerprints and gradient scale from the same hooks) against the same
    projector through full per-sample gradients: the same fingerprints, scales and
    hypergradients (float64), the SGD-update check passes, and in memory gives the same rows."""
    projector = tensor_sketch_projector(_small_model(), 40, seed=5)
    options = dict(mode="approximate", projector=projector, memory_budget=1300)
    _, sketched = record_small(tmp_path / "s.zarr", **options)
    _, full = record_small(tmp_path / "f.zarr", sketch_gradients=False, **options)
    assert sketched.attrs["step_gradient"] == "sketched_backward"
    assert full.attrs["step_gradient"] == "per_sample_mean"
    assert sketched.attrs["partitions"]["count"] == 3
    for name in ("gradient_fingerprint", "gradient_scale", "hypergradient"):
        got, want = np.asarray(sketched[name][:]), np.asarray(full[name][:])
        np.testing.assert_allclose(got, want, rtol=1e-10, atol=1e-12, err_msg=name)
    assert check_recorded_steps(sketched) < 1e-6
    _, memory = record_small(tmp_path / "m.zarr", mode="approximate", projector=projector)
    np.testing.assert_array_equal(sketched["hypergradient"][:], memory["hypergradient"][:])


def test_a_built_in_run_under_a_budget_equals_the_unbudgeted_one(digits_store, tmp_path):
    """digits, 1,437 tracked, float32, two partitions at a time on local threads."""
    seen = []
    out = tmp_path / "budget.zarr"
    summary = record_run(
        tiny_config(out, memory_budget="1MB", workers=2),
        partition_progress=lambda stage, done, total: seen.append((stage, done, total)),
    )
    budgeted, full = zarr.open_group(out, mode="r"), zarr.open_group(digits_store, mode="r")
    assert summary.n_partitions >= 3 and budgeted.attrs["partitions"]["workers"] == 2
    h, expected = np.asarray(budgeted["hypergradient"][:]), np.asarray(full["hypergradient"][:])
    assert np.abs(h - expected).max() <= 1e-6 * np.abs(expected).max()
    assert seen[-1] == ("partition steps", summary.n_partitions * 69, summary.n_partitions * 69)


def _pending_copy(source: Path, target: Path) -> zarr.Group:
    """A copy of a partitioned store whose partitions are all to be recorded again."""
    shutil.copytree(source, target)
    group = zarr.open_group(target, mode="r+")
    group["partition_done"][:] = False
    group["hypergradient"][:] = 0
    return group


@pytest.fixture(scope="module")
def partitioned_store(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("partitions") / "parts.zarr"
    record_small(path, memory_budget=2 * SMALL_ROW_BYTES)
    return path


def _data():
    train = small_digits()
    return TrainingData(_small_model(), train.inputs.to(torch.float64), train.targets)


def test_rerunning_pending_partitions_restores_the_rows(partitioned_store, tmp_path):
    group = _pending_copy(partitioned_store, tmp_path / "again.zarr")
    assert pending_partitions(group) == [0, 1, 2] and rows_done(group) == 0
    group["partition_done"][1] = True  # as if a lost worker had finished partition 1
    group["hypergradient"][2:4] = 7.0
    seconds = run_partitions(tmp_path / "again.zarr", _data())
    assert len(seconds) == 2  # partitions 0 and 2 only
    h = np.asarray(group["hypergradient"][:])
    expected = zarr.open_group(partitioned_store, mode="r")["hypergradient"][:]
    np.testing.assert_array_equal(h[[0, 1, 4, 5]], expected[[0, 1, 4, 5]])
    assert (h[2:4] == 7.0).all()  # a done partition is not recorded again
    assert pending_partitions(group) == []
    assert record_partitions(_data(), str(tmp_path / "again.zarr"), [0, 1, 2]) == []


def test_a_changed_learning_rate_is_refused(partitioned_store, tmp_path):
    group = _pending_copy(partitioned_store, tmp_path / "lr.zarr")
    lr = group["lr"][:]
    lr[7] *= 1.1
    group["lr"][:] = lr
    with pytest.raises(ReplayMismatchError, match="step 8 of the stored trajectory is not the SGD"):
        run_partitions(tmp_path / "lr.zarr", _data())
    assert not np.asarray(group["partition_done"][:]).any()


def test_a_changed_batch_is_refused(partitioned_store, tmp_path):
    group = _pending_copy(partitioned_store, tmp_path / "batch.zarr")
    batches = group["batch_index"][:]
    step = 4
    tracked = np.asarray(group["sample"][:])
    slot = int(np.nonzero(~np.isin(batches[step], tracked) & (batches[step] >= 0))[0][0])
    replacement = next(int(i) for i in tracked if i not in batches[step])
    batches[step, slot] = replacement
    group["batch_index"][:] = batches
    with pytest.raises(
        ReplayMismatchError,
        match=f"the gradient of training sample {replacement} at step {step + 1} differs",
    ):
        run_partitions(tmp_path / "batch.zarr", _data())


def test_other_data_is_refused(partitioned_store, tmp_path):
    _pending_copy(partitioned_store, tmp_path / "data.zarr")
    data = _data()
    shifted = TrainingData(data.model, data.inputs.roll(1, dims=0), data.targets.roll(1))
    with pytest.raises(ReplayMismatchError, match="differs from the one training took"):
        run_partitions(tmp_path / "data.zarr", shifted)


def test_finishing_without_the_training_data_says_how_and_marks_the_store_failed(tmp_path):
    train = small_digits()
    model = _small_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    recorder = HydraRecorder(
        model, optimizer, tmp_path / "r.zarr", n_train=len(train), memory_budget=20_000
    )
    assert recorder.partitioned
    with (
        pytest.raises(InvalidArgumentError, match=r"call finish\(training_data=TrainingData"),
        recorder,
    ):
        recorder.step(train.inputs[:6].double(), train.targets[:6], np.arange(6))
        recorder.end_epoch()
    group = zarr.open_group(tmp_path / "r.zarr", mode="r")
    assert group.attrs["status"] == "failed"
    with pytest.raises(InvalidArgumentError, match="read them from the store"):
        recorder.hypergradients()


class _KillOnce(WorkerPlugin):
    """A dask worker plugin that kills its worker process 0.2 s after the first partition task
    starts executing anywhere (a marker file makes it once per test)."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def setup(self, worker) -> None:
        self.worker = worker

    def teardown(self, worker) -> None:
        pass

    def transition(self, key, start, finish, **kwargs) -> None:
        name = key[0] if isinstance(key, tuple) else key
        if finish != "executing" or "record_partition" not in str(name):
            return
        try:
            fd = os.open(self.marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            return
        os.write(fd, str(self.worker.address).encode())
        os.close(fd)
        threading.Timer(0.2, os._exit, (1,)).start()


def test_a_partition_whose_worker_is_killed_is_recorded_again(digits_store, tmp_path):
    marker = tmp_path / "killed"
    with (
        LocalCluster(
            n_workers=2, threads_per_worker=1, dashboard_address=None, processes=True
        ) as cluster,
        Client(cluster) as client,
    ):
        client.register_plugin(_KillOnce(str(marker)), name="kill-once")
        out = tmp_path / "cluster.zarr"
        summary = record_run(
            tiny_config(out, epochs=8, memory_budget="2MB", scheduler=cluster.scheduler_address)
        )
    assert marker.exists(), "no worker was killed: the test did not test anything"
    group = zarr.open_group(out, mode="r")
    assert group.attrs["status"] == "complete" and summary.n_partitions == 7
    assert np.asarray(group["partition_done"][:]).all()
    expected = tmp_path / "memory.zarr"
    record_run(tiny_config(expected, epochs=8))
    h, full = group["hypergradient"][:], zarr.open_group(expected, mode="r")["hypergradient"][:]
    assert np.abs(h - full).max() <= 1e-6 * np.abs(full).max()


def test_the_state_pool_hands_zeroed_buffers_to_the_next_partition():
    pool = StatePool(rows=5)
    # The last, smaller partition may come first: its buffer still has the largest one's rows.
    first = pool.take(3, 3, has_momentum=True, dtype=torch.float32, device="cpu")
    assert first.h.shape == (3, 3)
    first.h.fill_(2.0)
    first.m.fill_(3.0)
    pointer = first.h.data_ptr()
    pool.give_back(first)
    second = pool.take(5, 3, has_momentum=True, dtype=torch.float32, device="cpu")
    assert second.h.data_ptr() == pointer and second.h.shape == (5, 3)
    assert second.h.abs().sum() == 0 and second.m.abs().sum() == 0
    # Another taken while the buffers are lent, or of another width, gets its own allocation.
    other = pool.take(4, 3, has_momentum=True, dtype=torch.float32, device="cpu")
    assert other.h.data_ptr() != pointer
    wider = pool.take(2, 4, has_momentum=True, dtype=torch.float32, device="cpu")
    assert wider.h.shape == (2, 4)


def test_info_shows_the_partitions_done_during_a_recording(partitioned_store, tmp_path):
    from hydra_store.store.describe import describe_store

    group = _pending_copy(partitioned_store, tmp_path / "progress.zarr")
    group.attrs["status"] = "recording"
    group["partition_done"][1] = True
    lines = describe_store(tmp_path / "progress.zarr")
    assert (
        "  format 1, status recording (no process is writing it: the recording was killed or crashed)"
        in lines
    )
    assert any("partitions: 3 of up to 2 samples" in line for line in lines)
    assert any(line.endswith("1 done, 2 of 6 rows written") for line in lines), lines


def test_a_projected_run_logs_gradients_and_removes_the_log(tmp_path):
    projector = CountSketchProjector(310, 40, seed=2)
    options = dict(mode="approximate", projector=projector)
    recorder, parts = record_small(tmp_path / "a.zarr", memory_budget=3 * 640, **options)
    assert recorder.plan.n_partitions == 2  # 3 rows of 2 x 40 x 8 bytes each
    assert parts.attrs["partitions"]["gradient_log"]
    assert not (tmp_path / "a.zarr" / ".gradient-log").exists()
    # No per-step weights: only their components along u, which the SGD check reads.
    assert "step_weights" not in parts and parts["step_weight_dot"].shape == (12,)
    assert check_recorded_steps(parts) < 1e-6
    _, memory = record_small(tmp_path / "m.zarr", **options)
    np.testing.assert_array_equal(parts["hypergradient"][:], memory["hypergradient"][:])
    # Without its log a partition cannot be recorded again: refused, not zeros.
    group = _pending_copy(tmp_path / "a.zarr", tmp_path / "again.zarr")
    with pytest.raises(StoreFormatError, match=r"gradient log of partition 0 .* is missing"):
        run_partitions(tmp_path / "again.zarr", _data())
    assert not np.asarray(group["partition_done"][:]).any()
    lr = group["lr"][:]
    lr[3] *= 1.1
    group["lr"][:] = lr
    with pytest.raises(ReplayMismatchError, match="step 4 of the stored trajectory"):
        check_recorded_steps(group)
