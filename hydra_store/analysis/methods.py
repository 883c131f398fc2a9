"""The contribution-method seam: every way of scoring training samples against a test set is a
`ContributionMethod`, and `analyze --method`, `compare` and `validate` find them in a
`MethodRegistry`.

A method runs from a store and its own arguments dataclass, writes its results to its own group
(`<group>/<test set>`, so re-running one method never touches another's results), and reads back
its total contributions C(i) for `compare` and `validate` to score. Built in: `hydra` (the stored
hypergradients, `analysis/`) and `hydra-exact` (reverse mode, `reverse/`), and the baselines
`influence`, `tracin`, `trak`. A method may also give its C(i) at any stored checkpoint without
writing it (`totals_at`), which `compare` scores over checkpoints. How to add one:
docs/design.md, "Adding a contribution method".
"""

from __future__ import annotations

import dataclasses
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from hydra_store.analysis.test_sets import group_name
from hydra_store.arguments import AnalyzeConfig, ReverseConfig
from hydra_store.errors import InvalidArgumentError
from hydra_store.store.format import open_group

Progress = Callable[[str, int, int], None]
# label -> (training-set indices, C(i) of those samples)
Totals = dict[str, tuple[np.ndarray, np.ndarray]]


class ContributionMethod(ABC):
    """One way of computing the contribution of training samples to a test set."""

    name: str  # what `analyze --method` takes
    group: str  # parent group of its results: `<group>/<test set>`
    config_type: type  # its arguments dataclass (has a `test_set` field)
    description: str

    def config_from_options(self, options: Mapping[str, Any]) -> Any:
        """Its arguments from a flat mapping of options (the CLI's), ignoring those it lacks."""
        names = {f.name for f in dataclasses.fields(self.config_type)}
        return self.config_type(**{k: v for k, v in options.items() if k in names})

    @abstractmethod
    def run(
        self,
        path: Path,
        config: Any,
        progress: Progress | None = None,
        inputs: Any = None,
        out: Any = None,
    ) -> Any:
        """Compute and write `<group>/<test set>`; return a summary with a `lines()` method.
        `inputs`: the run's model, data and loss given in Python (`hydra_store.RunInputs`),
        for a store that does not name them. `out`: a results store to write to instead of
        the recording (`hydra_store.store.results.results_root(path, out)` says where)."""

    @abstractmethod
    def totals(self, path: Path, test_set: str) -> Totals:
        """Its stored C(i) for a test set (empty when it has not run on it); `path` is where
        its results are: the recording, or the results store they were written to."""

    # -- optional: C(i) at earlier checkpoints, for `compare` over checkpoints ------------------

    def totals_at(
        self,
        path: Path,
        checkpoints: Sequence[int],
        config: Any,
        *,
        inputs: Any = None,
        progress: Progress | None = None,
    ) -> np.ndarray:
        """C(i) of all N training samples at each of `checkpoints` (of the recording `path`),
        (len(checkpoints), N) float64: what `run` would store with `config` at `checkpoint=k`,
        computed without writing anything. A method that cannot leaves this out
        (`scores_checkpoints` is then False)."""
        raise NotImplementedError(f"method {self.name!r} gives no C(i) at other checkpoints")

    @property
    def scores_checkpoints(self) -> bool:
        """Whether the method implements `totals_at`."""
        return type(self).totals_at is not ContributionMethod.totals_at

    @property
    def takes_device(self) -> bool:
        """Whether it runs on a device of the caller's choice: its arguments have a `device`
        ("cpu", "cuda"; None: the CPU). `analyze --device cuda` is refused for a method without
        one, and `compare --device` reaches only those with one; the others run on the CPU."""
        return "device" in {f.name for f in dataclasses.fields(self.config_type)}

    def checkpoint_config(
        self, results: Path, test_set: str, device: str | None = None
    ) -> tuple[Any, bool]:
        """(the arguments `compare` scores it with over checkpoints, whether they are the ones it
        last ran with on this test set): its stored `config` attribute in `results` (without
        `per_test` and `checkpoint`), else `default_checkpoint_config`; on `device` when it
        takes one. The device is where a method runs, not what it computes: a stored config's
        own device is replaced by `device`, and it is still the config it last ran with."""
        stored = stored_config(results, f"{self.group}/{group_name(test_set)}", self.config_type)
        if stored is None:
            config, found = self.default_checkpoint_config(test_set), False
        else:
            names = {f.name for f in dataclasses.fields(stored)}
            reset = {k: None for k in ("per_test", "checkpoint") if k in names}
            config, found = dataclasses.replace(stored, **reset), True
        if self.takes_device:
            config = dataclasses.replace(config, device=device)
        return config, found

    def default_checkpoint_config(self, test_set: str) -> Any:
        """The arguments it is scored with over checkpoints when it has not run on the store."""
        return self.config_type(test_set=test_set)

    def config_label(self, config: Any) -> str:
        """How `compare` names the method run with `config`."""
        return self.name


def stored_config(path: Path, group: str, kind: type) -> Any | None:
    """The `config` attribute of a result group as a `kind` dataclass (unknown fields dropped,
    lists as tuples), or None when the group or the attribute is absent."""
    root = open_group(path)
    try:
        node = root[group]
    except KeyError:
        return None
    attrs = node.attrs.get("config")
    if not isinstance(attrs, dict):
        return None
    names = {f.name for f in dataclasses.fields(kind)}
    values = {k: tuple(v) if isinstance(v, list) else v for k, v in attrs.items() if k in names}
    return kind(**values)


class StoredHypergradientMethod(ContributionMethod):
    """HyDRA from the hypergradients recorded in the store (`analysis/<test set>`)."""

    name = "hydra"
    group = "analysis"
    config_type = AnalyzeConfig
    description = "stored hypergradients"

    def run(
        self,
        path: Path,
        config: AnalyzeConfig,
        progress: Progress | None = None,
        inputs: Any = None,
        out: Any = None,
    ) -> Any:
        from hydra_store.analysis.stored import analyze

        return analyze(path, config, progress, inputs=inputs, out=out)

    def totals(self, path: Path, test_set: str) -> Totals:
        """Every `total_contribution*` of `analysis/<test set>` over tracked samples, labelled
        `analysis:<variable>`."""
        root = open_group(path)
        try:
            group = root[f"{self.group}/{group_name(test_set)}"]
        except KeyError:
            return {}
        found: Totals = {}
        sample = group if "sample" in group else root  # a results store has no root `sample`
        index = np.asarray(sample["sample"][:]) if "sample" in sample else None
        for key in sorted(group.array_keys()):
            if not key.startswith("total_contribution"):
                continue
            array = group[key]
            dims = tuple(array.metadata.dimension_names or ())
            values = np.asarray(array[:], dtype=np.float64)
            if dims == ("sample",) and index is not None and values.size == index.size:
                found[f"analysis:{key}"] = (index.astype(np.int64), values)
        return found


class ReverseModeMethod(ContributionMethod):
    """Exact (and approximate) HyDRA for every training sample by one backward sweep through
    the stored trajectory (`reverse/<test set>`)."""

    name = "hydra-exact"
    group = "reverse"
    config_type = ReverseConfig
    description = "reverse sweep through the trajectory"
    EXACT = "hydra-exact (reverse mode)"
    APPROXIMATE = "hydra-approx (reverse mode)"

    def run(
        self,
        path: Path,
        config: ReverseConfig,
        progress: Progress | None = None,
        inputs: Any = None,
        out: Any = None,
    ) -> Any:
        from hydra_store.analysis.reverse import run_exact_analysis

        return run_exact_analysis(path, config, progress=progress, inputs=inputs, out=out)

    def totals(self, path: Path, test_set: str) -> Totals:
        from hydra_store.analysis.reverse import read_reverse_group

        group = read_reverse_group(path, test_set)
        if group is None or "total_contribution_exact" not in group:
            return {}
        exact = np.asarray(group["total_contribution_exact"][:], dtype=np.float64)
        approx = np.asarray(group["total_contribution_approx"][:], dtype=np.float64)
        index = np.arange(exact.size)
        return {self.EXACT: (index, exact), self.APPROXIMATE: (index, approx)}


@dataclasses.dataclass(frozen=True)
class PerTestArray:
    """One (train or sample, test) array of C(i, j) in a method's result group."""

    label: str  # "<group>:<variable>"
    method: str  # the method's registry name
    train: np.ndarray  # training-set index of each row
    test: np.ndarray  # test-set index of each column
    values: Any = dataclasses.field(repr=False)  # the zarr array, read lazily
    long_name: str = ""


def per_test_arrays(group: Any, method: ContributionMethod, *holders: Any) -> list[PerTestArray]:
    """Every (train, test) or (sample, test) array of C(i, j) in a method's result group, with the
    group's `test` index and its `train` (or `sample`) index, taken from the group or else from
    the first of `holders` that has it (a recording keeps `sample` at its root)."""
    if "test" not in group:
        return []
    test = np.asarray(group["test"][:], dtype=np.int64)
    found = []
    for key in sorted(group.array_keys()):
        array = group[key]
        dims = tuple(array.metadata.dimension_names or ())
        if len(dims) != 2 or dims[1] != "test" or dims[0] not in ("train", "sample"):
            continue
        holder = next((h for h in (group, *holders) if dims[0] in h), None)
        if holder is None:
            continue
        train = np.asarray(holder[dims[0]][:], dtype=np.int64)
        if array.shape != (train.size, test.size):
            continue
        found.append(
            PerTestArray(
                label=f"{method.group}:{key}",
                method=method.name,
                train=train,
                test=test,
                values=array,
                long_name=str(array.attrs.get("long_name", "")),
            )
        )
    return found


class MethodRegistry:
    """Contribution methods by name, in the order they were added."""

    def __init__(self, methods: tuple[ContributionMethod, ...] = ()) -> None:
        self._methods: dict[str, ContributionMethod] = {}
        for method in methods:
            self.add(method)

    def add(self, method: ContributionMethod) -> None:
        if method.name in self._methods:
            raise InvalidArgumentError(f"a contribution method named {method.name!r} exists")
        if any(m.group == method.group for m in self._methods.values()):
            raise InvalidArgumentError(
                f"method {method.name!r} would write to {method.group!r}, another method's group"
            )
        self._methods[method.name] = method

    def __getitem__(self, name: str) -> ContributionMethod:
        try:
            return self._methods[name]
        except KeyError:
            raise InvalidArgumentError(
                f"unknown method {name!r}; choose one of {', '.join(self.names())}"
            ) from None

    def __iter__(self) -> Iterator[ContributionMethod]:
        return iter(self._methods.values())

    def names(self) -> list[str]:
        return list(self._methods)

    def totals(self, path: Path, test_set: str) -> Totals:
        """Every stored C(i) of every method for a test set."""
        found: Totals = {}
        for method in self:
            found.update(method.totals(path, test_set))
        return found


def default_methods() -> MethodRegistry:
    """A new registry of the built-in methods: the reverse-mode gold standard first, then HyDRA
    from the stored hypergradients, then the baselines beside HyDRA (influence functions,
    TracIn, TRAK-style; docs/analysis.md, "Baselines"). The baselines' modules import this one,
    so they are imported here, when a registry is built."""
    from hydra_store.analysis.influence import InfluenceMethod
    from hydra_store.analysis.tracin import TracInMethod
    from hydra_store.analysis.trak import TrakMethod

    return MethodRegistry(
        (
            ReverseModeMethod(),
            StoredHypergradientMethod(),
            InfluenceMethod(),
            TracInMethod(),
            TrakMethod(),
        )
    )
