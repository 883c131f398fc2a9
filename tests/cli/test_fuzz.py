"""Property-based fuzzing (hypothesis) of what a user can get wrong: any value of any `record`
option, and any value of any root attribute of a store, ends in success or in one error line
with a non-zero exit, never a traceback."""

from __future__ import annotations

import json
import math
import os
import shutil

import pytest
import zarr
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from hydra_store.store.format import consolidate
from hydra_store_cli.main import app

runner = CliRunner()

# 40 examples a test in CI; HYDRA_FUZZ_EXAMPLES=400 for a deeper local run.
settings.register_profile("hydra", max_examples=int(os.environ.get("HYDRA_FUZZ_EXAMPLES", "40")))
settings.load_profile("hydra")

# A valid run that records in a fraction of a second, for the options not under test.
BASE = {
    "--dataset": "synthetic:n=40,size=8,test=10",
    "--model": "logreg",
    "--epochs": "1",
    "--batch-size": "8",
    "--track": "10",
}
OPTIONS = [
    "--dataset",
    "--model",
    "--epochs",
    "--batch-size",
    "--lr",
    "--momentum",
    "--weight-decay",
    "--schedule",
    "--lr-decay",
    "--lr-step-epochs",
    "--plateau-patience",
    "--seed",
    "--track",
    "--label-noise",
    "--checkpoint-every",
    "--device",
    "--mode",
    "--validation-fraction",
    "--memory-budget",
    "--project-dim",
    "--scheduler",
    "--workers",
]
VALUES = st.one_of(
    st.integers(min_value=-(10**12), max_value=10**12).map(str),
    st.floats(allow_nan=True, allow_infinity=True).map(repr),
    st.sampled_from(["", " ", "0", "-1", "1e400", "nan", "inf", "all", "abc", "1GiB", "x:y=z"]),
    st.text(min_size=1, max_size=12).filter(lambda t: not t.startswith("-")),
)


def assert_clean(result) -> None:
    """Exit 0, or exit non-zero with exactly one `error:` line; never a traceback."""
    output = result.output
    assert "Traceback" not in output, output
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise AssertionError(f"uncaught {result.exception!r}\n{output}")
    if result.exit_code != 0:
        errors = [line for line in output.splitlines() if line.startswith("error:")]
        assert len(errors) == 1, output


@settings(
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(option=st.sampled_from(OPTIONS), value=VALUES)
def test_any_value_of_any_record_option(tmp_path, option, value):
    out = tmp_path / "fuzz.zarr"
    arguments = {**BASE, option: value}
    args = ["record", "--overwrite", "--out", str(out)]
    for name, text in arguments.items():
        args += [name, text]
    assert_clean(runner.invoke(app, args))


ATTRIBUTE_VALUES = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(10**6), max_value=10**6),
    st.floats(allow_nan=False, allow_infinity=False),
    st.text(max_size=8),
    st.lists(st.integers(min_value=-3, max_value=3), max_size=3),
    st.dictionaries(st.text(max_size=4), st.integers(), max_size=2),
)


@pytest.fixture(scope="module")
def fuzz_store(tmp_path_factory):
    out = tmp_path_factory.mktemp("fuzz") / "base.zarr"
    result = runner.invoke(
        app, ["record", "--out", str(out), *[x for kv in BASE.items() for x in kv]]
    )
    assert result.exit_code == 0, result.output
    return out


@settings(
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(data=st.data())
def test_any_value_of_any_store_attribute(fuzz_store, tmp_path, data):
    store = tmp_path / "attrs.zarr"
    shutil.rmtree(store, ignore_errors=True)
    shutil.copytree(fuzz_store, store)
    group = zarr.open_group(store, mode="r+")
    attrs = dict(group.attrs)
    key = data.draw(st.sampled_from(sorted(attrs)), label="attribute")
    if data.draw(st.booleans(), label="delete"):
        del attrs[key]
    else:
        value = data.draw(ATTRIBUTE_VALUES, label="value")
        if isinstance(value, float) and not math.isfinite(value):
            value = 0.0
        attrs[key] = json.loads(json.dumps(value))
    group.attrs.clear()
    group.attrs.update(attrs)
    consolidate(store)
    for command in (["info"], ["analyze", "--clusters-k", "5", "--no-figures"]):
        assert_clean(runner.invoke(app, [command[0], str(store), *command[1:]]))
    verified = runner.invoke(app, ["verify", "--no-replay", str(store)])
    if verified.exit_code == 1:  # a report of faults, not an error
        assert "fault(s):" in verified.output and "Traceback" not in verified.output
    else:
        assert_clean(verified)
