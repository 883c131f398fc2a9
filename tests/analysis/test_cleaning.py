"""`clean` (the paper's Table 3): what each ranking drops against brute force and the injected
noise, the from-scratch retraining against a plain float64 SGD loop, the reported accuracy
against a direct computation, and the command's one-line errors."""

from __future__ import annotations

import itertools
import math
import shutil
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest
import torch
import typer
import xarray as xr
import zarr
from torch.func import functional_call
from typer.testing import CliRunner

from hydra_store.analysis.cleaning import (
    CLEAN_GROUP,
    TrainingRecipe,
    class_drop_counts,
    drop_count,
    drop_lowest,
    drop_lowest_within_class,
    random_drop,
    random_drop_within_class,
    run_cleaning,
    store_recipe,
    train_from_scratch,
)
from hydra_store.analysis.methods import ContributionMethod, MethodRegistry
from hydra_store.analysis.stored import analyze
from hydra_store.analysis.test_sets import resolve_test_set
from hydra_store.arguments import AnalyzeConfig, CleanConfig, ScheduleSpec
from hydra_store.core.parameters import ParameterLayout, get_flat_parameters
from hydra_store.data.datasets import load_dataset, subset
from hydra_store.data.models import build_model
from hydra_store.data.training_data import load_training_data
from hydra_store.errors import AnalysisError, InvalidArgumentError
from hydra_store.recording.training import record_run
from hydra_store.replay.recorded_run import load_run_data, recorded_config
from hydra_store.store.format import consolidate
from hydra_store_cli.main import app
from tests.cli.test_record import assert_one_error_line
from tests.conftest import tiny_config

runner = CliRunner()


@pytest.fixture(scope="module")
def noisy_store(tmp_path_factory) -> Path:
    """digits with half the labels wrong, a fifth of the training set carved out as a
    validation split, every sample tracked, 3 epochs; analysed against the validation split."""
    out = tmp_path_factory.mktemp("cleaning") / "noisy.zarr"
    record_run(tiny_config(out, label_noise=0.5, validation_fraction=0.2))
    analyze(out, AnalyzeConfig(test_set="validation", figures=False, clusters_k=20))
    return out


@pytest.fixture()
def noisy_copy(noisy_store, tmp_path) -> Path:
    target = tmp_path / "copy.zarr"
    shutil.copytree(noisy_store, target)
    return target


@dataclass(frozen=True)
class _NoConfig:
    test_set: str = "test"


class GivenRanking(ContributionMethod):
    """A method whose C(i) are given here (for any test set)."""

    name, group, config_type, description = "given", "given", _NoConfig, "given C(i)"

    def __init__(self, index: np.ndarray, values: np.ndarray) -> None:
        self.index, self.values = index, values

    def run(self, path, config, progress=None, inputs=None, out=None):
        raise NotImplementedError

    def totals(self, path, test_set):
        return {"given ranking": (self.index, self.values)}


def given(index, values) -> MethodRegistry:
    return MethodRegistry((GivenRanking(np.asarray(index), np.asarray(values, dtype=float)),))


def n_train_of(path: Path) -> int:
    return int(zarr.open_group(path, mode="r").attrs["n_train"])


# -- what is dropped ----------------------------------------------------------------------------


def test_the_lowest_contributions_are_dropped_ties_to_the_lower_index():
    rng = np.random.default_rng(3)
    n = 60
    values = np.round(rng.normal(size=n), 1)  # many ties
    index = rng.permutation(n) + 100  # training indices, not positions, in no order
    brute = sorted(zip(values.tolist(), index.tolist(), strict=True))
    for count in (0, 1, 17, 30, n):
        expected = sorted(i for _, i in brute[:count])
        assert drop_lowest(index, values, count).tolist() == expected
    with pytest.raises(InvalidArgumentError):
        drop_lowest(index, values, n + 1)


def test_drop_count_and_random_drop():
    assert drop_count(0.5, 1149) == 574 == round(574.5)  # Python's rounding (to even)
    assert drop_count(0.8, 1437) == 1150
    with pytest.raises(InvalidArgumentError, match=r"--rate 0\.999"):
        drop_count(0.999, 100)
    a = random_drop(1437, 719, seed=4)
    assert a.size == np.unique(a).size == 719 and a.min() >= 0 and a.max() < 1437
    assert (a == random_drop(1437, 719, seed=4)).all()
    assert not (a == random_drop(1437, 719, seed=5)).all()


def brute_force_counts(rate: float, sizes: list[int]) -> list[int]:
    """Of every integer vector 0 <= c_k <= n_k adding up to round(r N): the closest to r n_k
    in squared distance (what the largest remainders give), ties to the lower classes."""
    total = round(rate * sum(sizes))
    exact = Fraction(repr(rate))
    best = None
    for counts in itertools.product(*(range(n + 1) for n in sizes)):
        if sum(counts) != total:
            continue
        distance = sum((c - exact * n) ** 2 for c, n in zip(counts, sizes, strict=True))
        key = (distance, tuple(-c for c in counts))  # then the most to the lowest classes
        if best is None or key < best[0]:
            best = (key, list(counts))
    assert best is not None
    return best[1]


def test_class_drop_counts_against_brute_force():
    rng = np.random.default_rng(11)
    checked = 0
    for _ in range(300):
        k = int(rng.integers(1, 5))
        sizes = rng.integers(1, 7, size=k).tolist()
        classes = np.sort(rng.choice(10, size=k, replace=False))  # not 0..k-1: observed ones
        labels = rng.permutation(np.repeat(classes, sizes))
        rate = float(rng.choice([0.1, 0.25, 0.3, 0.5, 0.7, 0.8, 0.15, 0.45, 0.9]))
        n = labels.size
        if round(rate * n) >= n:
            with pytest.raises(InvalidArgumentError, match="leaves none to train on"):
                class_drop_counts(rate, labels)
            continue
        counts = class_drop_counts(rate, labels)
        assert list(counts) == classes.tolist()
        assert list(counts.values()) == brute_force_counts(rate, sizes)
        assert sum(counts.values()) == drop_count(rate, n) == round(rate * n)
        for c, size in zip(classes.tolist(), sizes, strict=True):
            assert abs(counts[c] - Fraction(repr(rate)) * size) < 1 and counts[c] <= size
        checked += 1
    assert checked > 200


def test_class_drop_counts_worked_examples():
    # r n_c is the decimal rate times n_c: 0.7 x 10 is 7 (the binary 0.7, times 10, is just
    # under 7)
    assert class_drop_counts(0.7, np.repeat([0, 1], 10)) == {0: 7, 1: 7}
    # 0.5 x (3, 3, 3, 1) = 1.5, 1.5, 1.5, 0.5: total 5, floors 1, 1, 1, 0; the two extra go to
    # the tied remainders of the lowest classes
    labels = np.repeat([0, 1, 2, 3], [3, 3, 3, 1])
    assert class_drop_counts(0.5, labels) == {0: 2, 1: 2, 2: 1, 3: 0}
    # 0.3 x (10, 5, 5) = 3, 1.5, 1.5: total 6, floors 3, 1, 1: the tie goes to class 7
    labels = np.repeat([4, 7, 9], [10, 5, 5])
    assert class_drop_counts(0.3, labels) == {4: 3, 7: 2, 9: 1}
    # the largest remainders, not the lowest classes: 0.3 x (1, 3, 6) = 0.3, 0.9, 1.8: total 3,
    # floors 0, 0, 1, remainders 0.3, 0.9, 0.8
    assert class_drop_counts(0.3, np.repeat([0, 1, 2], [1, 3, 6])) == {0: 0, 1: 1, 2: 2}
    assert class_drop_counts(0.2, np.repeat([0, 1], [4, 2])) == {0: 1, 1: 0}  # 0.8 > 0.4
    with pytest.raises(InvalidArgumentError, match="integer label"):
        class_drop_counts(0.5, np.array([0.5, 1.0]))


def test_drop_within_class_equals_a_naive_per_class_sort():
    rng = np.random.default_rng(5)
    for trial in range(20):
        n = int(rng.integers(5, 60))
        labels = rng.choice([0, 2, 3, 8], size=n, p=[0.5, 0.3, 0.15, 0.05])
        index = rng.permutation(n)  # training indices in no order
        values = np.round(rng.normal(size=n), 1)  # ties
        rate = float(rng.choice([0.2, 0.5, 0.8]))
        counts = class_drop_counts(rate, labels)
        naive = []
        for c, count in counts.items():
            mine = sorted((v, i) for v, i in zip(values, index, strict=True) if labels[i] == c)
            naive += [i for _, i in mine[:count]]
        dropped = drop_lowest_within_class(index, values, labels, counts)
        assert dropped.tolist() == sorted(naive), trial
        assert dropped.size == round(rate * n)
        for c, count in counts.items():
            assert (labels[dropped] == c).sum() == count
    # a global ranking that would take a whole class takes only its share within classes
    labels = np.repeat([0, 1], [10, 10])
    values = np.where(labels == 0, -1.0, 1.0)
    assert drop_lowest(np.arange(20), values, 10).tolist() == list(range(10))
    within = drop_lowest_within_class(np.arange(20), values, labels, {0: 5, 1: 5})
    assert within.tolist() == [0, 1, 2, 3, 4, 10, 11, 12, 13, 14]
    with pytest.raises(InvalidArgumentError, match="name the classes"):
        drop_lowest_within_class(np.arange(20), values, labels, {0: 5})
    with pytest.raises(InvalidArgumentError, match="cannot drop 11 of 10"):
        drop_lowest_within_class(np.arange(20), values, labels, {0: 11, 1: 0})


def test_random_drop_within_class():
    rng = np.random.default_rng(2)
    labels = rng.choice([1, 4, 6], size=300, p=[0.6, 0.3, 0.1])
    counts = class_drop_counts(0.8, labels)
    a = random_drop_within_class(labels, counts, seed=4)
    assert a.dtype == np.int64 and a.size == np.unique(a).size == round(0.8 * 300)
    assert {c: int((labels[a] == c).sum()) for c in counts} == counts
    assert np.array_equal(a, random_drop_within_class(labels, counts, seed=4))
    b = random_drop_within_class(labels, counts, seed=5)
    for c in counts:  # a different draw in every class
        assert not np.array_equal(a[labels[a] == c], b[labels[b] == c])


@pytest.mark.parametrize(
    ("config", "message"),
    [
        (CleanConfig(rate=1.0), "--rate must be a fraction in"),
        (CleanConfig(rate=-0.1), "--rate"),
        (CleanConfig(rate=math.nan), "--rate"),
        (CleanConfig(seeds=0), "--seeds must be between 1"),
        (CleanConfig(rankings=("hydra", "hydra")), "--method hydra is given twice"),
        (CleanConfig(rankings=()), "--method"),
        (CleanConfig(device="tpu"), "--device"),
        (CleanConfig(workers=0), "--workers"),
        (CleanConfig(test_set=""), "--test-set"),
        (
            CleanConfig(within_class=True, rankings=("none", "oracle")),
            "--within-class changes only",
        ),
    ],
)
def test_bad_arguments_are_refused(config, message):
    with pytest.raises(InvalidArgumentError, match=message):
        config.validate()


def test_oracle_and_references_drop_what_they_should(noisy_copy):
    summary = run_cleaning(noisy_copy, rankings=("none", "random", "oracle"), seeds=1)
    ds = xr.open_zarr(str(noisy_copy), group=f"{CLEAN_GROUP}/validation")
    n_train = n_train_of(noisy_copy)
    count = round(0.5 * n_train)
    assert list(ds.ranking.values) == ["no filtering", "random", "oracle"]
    dropped = ds.dropped.values
    # the oracle: exactly the samples whose label the noise changed, rebuilt independently
    config = recorded_config(zarr.open_group(noisy_copy, mode="r"))
    _, noisy_labels, clean_labels = load_training_data(config)
    truth = noisy_labels != clean_labels
    assert truth.sum() == count  # the noise changed round(0.5 N) labels
    assert (dropped[2] == truth).all()
    assert (dropped[2] == zarr.open_group(noisy_copy, mode="r")["is_noisy"][:]).all()
    # no filtering drops nothing; random drops exactly round(r N), reproducibly from the seed
    assert not dropped[0].any()
    assert (np.flatnonzero(dropped[1]) == random_drop(n_train, count, seed=0)).all()
    assert ds.n_dropped.values.tolist() == [0, count, count]
    assert ds.mislabelled_dropped.values.tolist() == [0, int(truth[dropped[1]].sum()), count]
    assert ds.attrs["ranked_by"] == "validation" and ds.attrs["evaluated_on"] == "test"
    assert not ds.attrs["ranking_leaks_evaluation_labels"]
    assert ds.attrs["config"]["test_set"] == "validation"  # the choice is saved explicitly
    assert summary.png is not None and summary.png.is_file()
    assert any(line.startswith("oracle") for line in summary.lines())


def test_a_ranking_drops_exactly_what_it_names(noisy_copy):
    """The stored HyDRA ranking on the validation split: the dropped set is the round(r N)
    lowest C(i), by brute force over the stored values."""
    summary = run_cleaning(noisy_copy, rankings=("hydra",), seeds=1, rate=0.3)
    root = zarr.open_group(noisy_copy, mode="r")
    values = np.asarray(root["analysis/validation/total_contribution"][:], dtype=np.float64)
    sample = np.asarray(root["sample"][:])
    count = round(0.3 * sample.size)
    brute = sorted(i for _, i in sorted(zip(values.tolist(), sample.tolist(), strict=True))[:count])
    ds = xr.open_zarr(str(noisy_copy), group=f"{CLEAN_GROUP}/validation")
    assert list(ds.ranking.values) == ["analysis:total_contribution"]
    assert np.flatnonzero(ds.dropped.values[0]).tolist() == brute
    assert summary.n_drop == count and ds.attrs["rate"] == 0.3


def test_within_class_drops_each_class_share_and_is_recorded(noisy_copy):
    """The stored HyDRA ranking and random within each training label (noisy, as trained on)
    against a naive per-class sort of the stored values; a later global run replaces the
    group whole, its attributes included."""
    summary = run_cleaning(
        noisy_copy, rankings=("random", "hydra", "oracle"), seeds=1, rate=0.3, within_class=True
    )
    root = zarr.open_group(noisy_copy, mode="r")
    labels = np.asarray(root["train_label"][:])
    sample = np.asarray(root["sample"][:])
    train_labels = np.empty(sample.size, dtype=np.int64)
    train_labels[sample] = labels
    assert np.array_equal(train_labels, load_run_data(noisy_copy).train.targets.numpy())
    values = np.asarray(root["analysis/validation/total_contribution"][:], dtype=np.float64)
    counts = class_drop_counts(0.3, train_labels)
    naive = []
    for c, count in counts.items():
        mine = sorted((v, i) for v, i in zip(values, sample, strict=True) if train_labels[i] == c)
        naive += [i for _, i in mine[:count]]
    ds = xr.open_zarr(str(noisy_copy), group=f"{CLEAN_GROUP}/validation")
    assert list(ds.ranking.values) == ["random", "analysis:total_contribution", "oracle"]
    dropped = ds.dropped.values
    assert np.flatnonzero(dropped[1]).tolist() == sorted(naive)
    assert np.array_equal(
        np.flatnonzero(dropped[0]), random_drop_within_class(train_labels, counts, seed=0)
    )
    assert (dropped[2] == root["is_noisy"][:]).all()  # the oracle is unchanged
    for row in (0, 1):
        per_class = {c: int((train_labels[dropped[row]] == c).sum()) for c in counts}
        assert per_class == counts
    assert ds.n_dropped.values.tolist() == [round(0.3 * sample.size)] * 2 + [
        int(root["is_noisy"][:].sum())
    ]
    assert ds.attrs["within_class"] is True and ds.attrs["config"]["within_class"] is True
    assert ds.attrs["class_drop_counts"] == {str(c): n for c, n in counts.items()}
    assert summary.within_class and "dropped within each class" in summary.lines()[0]

    again = run_cleaning(noisy_copy, rankings=("random",), seeds=1, rate=0.3)
    ds = xr.open_zarr(str(noisy_copy), group=f"{CLEAN_GROUP}/validation")
    assert ds.attrs["within_class"] is False and ds.attrs["class_drop_counts"] is None
    assert ds.attrs["config"]["within_class"] is False
    assert np.array_equal(
        np.flatnonzero(ds.dropped.values[0]), random_drop(sample.size, round(0.3 * sample.size), 0)
    )
    assert "within each class" not in "\n".join(again.lines())


def test_retraining_from_scratch_equals_a_plain_sgd_loop():
    """float64: momentum, weight decay, a step schedule and partial last batches, against SGD
    written out here with its own batch order from the same seed."""
    train = subset(load_dataset("digits", seed=0).train, np.arange(60))
    kept = np.sort(np.random.default_rng(0).choice(60, size=41, replace=False))
    recipe = TrainingRecipe(
        model="mlp:hidden=6",
        epochs=5,
        batch_size=8,
        lr=0.3,
        momentum=0.9,
        weight_decay=0.01,
        schedule=ScheduleSpec("step", decay=0.5, step_epochs=2),
    )
    seed = 7
    shape = {"input_shape": (1, 8, 8), "n_classes": 10, "dtype": torch.float64}
    model = build_model(recipe.model, seed=seed, **shape)
    layout = ParameterLayout.from_model(model)
    w = get_flat_parameters(model, layout).clone()
    initial = w.clone()
    batches: list[np.ndarray] = []
    train_from_scratch(model, train, kept, recipe, seed=seed, on_batch=batches.append)

    shell = build_model(recipe.model, seed=0, **shape)  # its weights are never used
    x, y = train.inputs.to(torch.float64), train.targets
    v = torch.zeros_like(w)
    generator = torch.Generator().manual_seed(seed)
    seen = []
    for epoch in range(recipe.epochs):
        lr = 0.3 * 0.5 ** (epoch // 2)
        order = kept[torch.randperm(kept.size, generator=generator).numpy()]
        for start in range(0, kept.size, 8):
            batch = torch.from_numpy(order[start : start + 8])
            seen.append(batch.numpy())
            flat = w.clone().requires_grad_(True)
            logits = functional_call(shell, layout.unflatten(flat), (x[batch],))
            loss = torch.nn.functional.cross_entropy(logits, y[batch])
            (g,) = torch.autograd.grad(loss, flat)
            v = 0.9 * v + g + 0.01 * w
            w = w - lr * v
    assert len(batches) == len(seen) == 5 * 6  # 41 samples: 5 batches of 8 and one of 1
    for mine, theirs in zip(batches, seen, strict=True):
        assert (mine == theirs).all()
    for epoch in range(5):  # every epoch is a permutation of the kept samples, nothing else
        assert np.array_equal(np.sort(np.concatenate(batches[6 * epoch : 6 * epoch + 6])), kept)
    trained = get_flat_parameters(model, layout)
    assert torch.allclose(trained, w, rtol=0, atol=1e-12)
    assert (trained - initial).abs().max() > 0.1  # it moved


def test_reported_accuracy_equals_a_direct_computation(noisy_copy):
    """The stored accuracy of the oracle at seed 1 against a model trained here on the kept
    samples and scored by argmax; with nothing dropped, seed 0 is the recorded run itself."""
    run_cleaning(noisy_copy, rankings=("none", "oracle"), seeds=2, test_set="test")
    ds = xr.open_zarr(str(noisy_copy), group=f"{CLEAN_GROUP}/test")
    assert ds.attrs["ranking_leaks_evaluation_labels"]  # ranked on the set it is scored on
    recipe = store_recipe(noisy_copy)
    data = load_run_data(noisy_copy)
    tests = resolve_test_set(noisy_copy, "test", run=data)
    kept = np.flatnonzero(~ds.dropped.values[1])
    model = build_model(recipe.model, input_shape=(1, 8, 8), n_classes=10, seed=1)
    train_from_scratch(model, data.train, kept, recipe, seed=1)
    model.eval()
    with torch.no_grad():
        predicted = model(tests.inputs).argmax(1).numpy()
    direct = float(np.mean(predicted == tests.targets.numpy()))
    assert ds.accuracy.values[1, 1] == direct
    root = zarr.open_group(noisy_copy, mode="r")
    assert ds.accuracy.values[0, 0] == root["test_accuracy"][-1]
    assert ds.test_loss.values[0, 0] == pytest.approx(root["test_loss"][-1], rel=1e-4)


def test_a_class_dropped_is_never_trained_on(noisy_copy):
    data = load_run_data(noisy_copy)
    labels = data.train.targets.numpy()
    n_train = labels.size
    three = labels == 3
    ranking = given(np.arange(n_train), np.where(three, -1.0, 1.0))
    rate = three.sum() / n_train
    run_cleaning(noisy_copy, rate=rate, seeds=1, methods=ranking, rankings=("given",))
    ds = xr.open_zarr(str(noisy_copy), group=f"{CLEAN_GROUP}/validation")
    assert (ds.dropped.values[0] == three).all()
    recipe = store_recipe(noisy_copy)
    model = build_model(recipe.model, input_shape=(1, 8, 8), n_classes=10, seed=0)
    batches: list[np.ndarray] = []
    kept = np.flatnonzero(~three)
    train_from_scratch(model, data.train, kept, recipe, seed=0, on_batch=batches.append)
    assert not three[np.concatenate(batches)].any()
    tests = resolve_test_set(noisy_copy, "test", run=data)
    model.eval()
    with torch.no_grad():
        assert (model(tests.inputs).argmax(1) != 3).all()  # it never learned the label 3


def test_partial_rankings_are_skipped_or_refused_when_asked_for(noisy_copy):
    n_train = n_train_of(noisy_copy)
    half = given(np.arange(0, n_train, 2), np.zeros(n_train // 2 + n_train % 2))
    summary = run_cleaning(noisy_copy, seeds=1, methods=half, rankings=None)
    assert summary.labels == ["no filtering", "random", "oracle"]
    assert any("given ranking: covers 575 of the 1149" in line for line in summary.lines())
    with pytest.raises(AnalysisError, match="covers 575 of the 1149"):
        run_cleaning(noisy_copy, seeds=1, methods=half, rankings=("given",))


def test_results_store_and_rankings_not_computed(noisy_store, tmp_path):
    out = tmp_path / "results.zarr"
    with pytest.raises(
        AnalysisError, match=r"hydra-store analyze STORE --test-set validation --out"
    ):
        run_cleaning(noisy_store, rankings=("hydra",), out=out)
    with pytest.raises(AnalysisError, match=r"--method influence --test-set validation"):
        run_cleaning(noisy_store, rankings=("influence",))
    run_cleaning(noisy_store, rankings=("none",), seeds=1, out=out, png=str(tmp_path / "c.png"))
    assert xr.open_zarr(str(out), group=f"{CLEAN_GROUP}/validation").accuracy.shape == (1, 1)
    assert CLEAN_GROUP not in zarr.open_group(noisy_store, mode="r")  # only read
    assert (tmp_path / "c.png").is_file()


def test_a_config_that_does_not_describe_the_trajectory_is_refused(noisy_copy):
    root = zarr.open_group(noisy_copy, mode="r+")
    config = dict(root.attrs["config"])
    root.attrs["config"] = {**config, "lr": 0.05}
    consolidate(noisy_copy)
    with pytest.raises(AnalysisError, match=r"step 1 took lr 0\.1, the configured schedule 0\.05"):
        run_cleaning(noisy_copy, rankings=("none",))
    root.attrs["config"] = {**config, "source": "user training loop"}
    consolidate(noisy_copy)
    with pytest.raises(AnalysisError, match="user's own training loop"):
        store_recipe(noisy_copy)


# -- the command --------------------------------------------------------------------------------


def test_clean_command_within_class(noisy_copy):
    result = runner.invoke(
        app,
        ["clean", str(noisy_copy), "--within-class", "--method", "random", "--seeds", "1"],
    )
    assert result.exit_code == 0, result.output
    assert "dropped within each class" in result.output
    ds = xr.open_zarr(str(noisy_copy), group=f"{CLEAN_GROUP}/validation")
    assert ds.attrs["within_class"] is True and ds.attrs["rate"] == 0.5
    labels = load_run_data(noisy_copy).train.targets.numpy()
    counts = class_drop_counts(0.5, labels)
    expected = random_drop_within_class(labels, counts, seed=0)
    assert np.array_equal(np.flatnonzero(ds.dropped.values[0]), expected)


def test_clean_command_prints_the_table(noisy_copy):
    result = runner.invoke(
        app, ["clean", str(noisy_copy), "--method", "none", "--method", "oracle", "--seeds", "1"]
    )
    assert result.exit_code == 0, result.output
    assert "oracle" in result.output and "MNIST, LeNet-5" in result.output
    assert f"written to {noisy_copy}/{CLEAN_GROUP}/validation" in result.output
    assert (noisy_copy.parent / "copy-clean-validation.png").is_file()


@pytest.mark.parametrize(
    ("args", "fragments"),
    [
        (["--method", "nope"], ["--method nope: unknown; choose from", "oracle"]),
        (
            ["--method", "tracin"],
            ["hydra-store analyze STORE --method tracin --test-set validation"],
        ),
        (["--rate", "1.5"], ["--rate must be a fraction in [0, 1)"]),
        (["--seeds", "0"], ["--seeds must be between 1"]),
        (["--evaluate-on", "synthetic:n=50,size=28,test=20"], ["shape"]),
        (["--test-set", "nothing.npz"], []),
        (
            ["--within-class", "--method", "none", "--method", "oracle"],
            ["--within-class changes only", "leave out --within-class"],
        ),
    ],
)
def test_clean_command_errors_are_one_line(noisy_store, args, fragments):
    result = runner.invoke(app, ["clean", str(noisy_store), *args])
    assert_one_error_line(result, *fragments)


def test_clean_command_defaults_are_the_configs():
    command = typer.main.get_command(app).commands["clean"]
    defaults = {p.name: p.default for p in command.params if not p.required}
    config = CleanConfig()
    names = ("test_set", "evaluate_on", "rate", "seeds", "seed", "scheduler", "workers", "device")
    names += ("within_class",)
    for name in names:
        assert defaults[name] == getattr(config, name), name
    assert defaults["method"] is None and config.rankings is None


def test_clean_command_on_a_missing_store(tmp_path):
    assert_one_error_line(runner.invoke(app, ["clean", str(tmp_path / "none.zarr")]))
