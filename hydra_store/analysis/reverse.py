"""Reverse mode through the stored trajectory: exact (Hessian-aware) and approximate HyDRA
contributions of every training sample at once, for one or a batch of test directions.

The recorded training is ``w_t = w_{t-1} - eta_t v_t``, ``v_t = p v_{t-1} + g_t(w_{t-1}) +
lambda w_{t-1}``. For a test direction u we want ``s_i = u . dw_T/d eps_i`` for every i. The adjoint
runs backwards from ``a_w = u, a_v = 0``; at step t (T down to 1), with w_{t-1} the weights before
the step::

    a_vt  = a_v - eta_t a_w
    s_i  += (N / B_t) g_{t,i}(w_{t-1}) . a_vt        for each slot of step t's batch
    a_w   = a_w + (H_t(w_{t-1}) + lambda I) a_vt
    a_v   = p a_vt

and ``C(i) = -(1/N) s_i``. Dropping H_t gives the approximate (Algorithm 1) contribution; both
are carried in the same pass. Per step: one double-backward graph of the batch loss (with
per-sample weights) gives H_t a_vt, all ``g_{t,i} . a_vt`` of the batch, and the approximate
twin's dot products; nothing scales with N except the output vector.

The weights w_{t-1} come from replaying each segment between stored checkpoints forward
(`hydra_store.replay.trajectory.Trajectory.replay_segment`, checked against the stored checkpoint at the segment's end), one
segment in memory at a time, walked backwards.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import zarr

from hydra_store.analysis.metrics import sign_error_rate, spearman
from hydra_store.analysis.test_sets import group_name, resolve_test_set
from hydra_store.arguments import ReverseConfig, resolve_config
from hydra_store.core.gradients import (
    mean_loss_gradient,
    per_sample_loss_function,
    per_sample_loss_gradients,
)
from hydra_store.core.losses import LossFunction, cross_entropy
from hydra_store.core.model_state import step_randomness
from hydra_store.core.parameters import ParameterLayout
from hydra_store.data.datasets import Split
from hydra_store.errors import AnalysisError, InvalidArgumentError
from hydra_store.execution import map_tasks
from hydra_store.replay.recorded_run import RunInputs, load_run_data, model_at_checkpoint
from hydra_store.replay.trajectory import Trajectory
from hydra_store.store.format import open_group, require_complete
from hydra_store.store.groups import write_result_group
from hydra_store.store.integrity import reads_store
from hydra_store.store.location import store_path
from hydra_store.store.results import results_root

Progress = Callable[[str, int, int], None]

REVERSE_GROUP = "reverse"
# Directions per dask task when per-test contributions are asked for.
DIRECTION_CHUNK = 16


def resolve_checkpoint(n_checkpoints: int, checkpoint: int | None) -> int:
    """A checkpoint index (negative counts from the end; None is the last), checked."""
    end = n_checkpoints - 1 if checkpoint is None else int(checkpoint)
    if end < 0:
        end += n_checkpoints
    if not 0 <= end < n_checkpoints:
        raise InvalidArgumentError(
            f"checkpoint {checkpoint} does not exist; the store has checkpoints "
            f"0..{n_checkpoints - 1}"
        )
    return end


@dataclass(frozen=True)
class AdjointResult:
    """Contributions C = -(1/N) s for K directions and all N training samples: (K, N) each."""

    exact: np.ndarray
    approx: np.ndarray
    checkpoint: int
    step: int


@contextlib.contextmanager
def flush_denormals() -> Iterator[None]:
    """Flush subnormal floats to zero inside the block.

    Late in training, float32 softmax probabilities of well-fit samples underflow into
    subnormals, and CPU arithmetic on subnormals is ~10-100x slower: measured on digits, the
    last segments of a reverse sweep ran 5x slower without this. Values below ~1e-38 change
    nothing the replay check (rtol 1e-5) or the results can see. torch has no getter for the
    flag; it is set back to off (torch's default) on the way out.
    """
    torch.set_flush_denormal(True)
    try:
        yield
    finally:
        torch.set_flush_denormal(False)


def adjoint_step_products(
    model: torch.nn.Module,
    layout: ParameterLayout,
    inputs: torch.Tensor,
    targets: torch.Tensor,
    point: torch.Tensor,
    exact_vectors: torch.Tensor,
    approx_vectors: torch.Tensor,
    loss: LossFunction = cross_entropy,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(H a for each exact row (K, P), G a for each exact row (K, B), G b for each approx row
    (K, B)) with H the Hessian of the batch's mean loss and G the per-sample gradients at `point`.

    One double-backward graph serves all three: with per-sample weights omega (all ones) on the
    batch loss L = sum_i omega_i l_i / B, the gradient g = dL/dw is built with its graph; then
    d(g . a)/dw = H a and d(g . a)/d omega_i = g_i . a / B, and d(g . b)/d omega = G b / B. The
    first-order graph is shared by every direction. Measured per step (64 samples): 2.4 ms
    against 7.5 ms for torch.func forward-over-reverse plus a forward product on the digits MLP,
    34 ms against 43 ms on LeNet-5; and no forward-mode AD, whose levels are process-wide, so
    tasks on dask threads need no lock.
    """
    losses = per_sample_loss_function(model, layout, inputs, targets, loss)
    batch = inputs.shape[0]
    with torch.enable_grad():
        w = point.detach().requires_grad_(True)
        omega = torch.ones(batch, dtype=point.dtype, device=point.device, requires_grad=True)
        (g,) = torch.autograd.grad((omega * losses(w)).sum() / batch, w, create_graph=True)
        hv, ga, gb = [], [], []
        for a, b in zip(exact_vectors, approx_vectors, strict=True):
            h_a, g_a = torch.autograd.grad(g, (w, omega), grad_outputs=a, retain_graph=True)
            (g_b,) = torch.autograd.grad(g, omega, grad_outputs=b, retain_graph=True)
            hv.append(h_a)
            ga.append(g_a * batch)
            gb.append(g_b * batch)
    return torch.stack(hv), torch.stack(ga), torch.stack(gb)


def adjoint_contributions(
    trajectory: Trajectory,
    model: torch.nn.Module,
    train: Split,
    directions: torch.Tensor,
    *,
    checkpoint: int | None = None,
    check: bool = True,
    progress: Progress | None = None,
) -> AdjointResult:
    """Exact and approximate contributions of all N training samples along K test directions.

    `directions` (K, P) are test-loss gradients at the weights of `checkpoint` (default: the
    last); the trajectory is truncated there. `model` is used as scratch for the replay (its
    dtype is the dtype of the whole computation). Raises ReplayMismatchError when a segment's
    replay does not reproduce its stored end checkpoint (with `check`).
    """
    end = resolve_checkpoint(len(trajectory.checkpoint_step), checkpoint)
    results = adjoint_contributions_at_checkpoints(
        trajectory, model, train, {end: directions}, check=check, progress=progress
    )
    return results[end]


def adjoint_contributions_at_checkpoints(
    trajectory: Trajectory,
    model: torch.nn.Module,
    train: Split,
    directions: Mapping[int, torch.Tensor | np.ndarray],
    *,
    check: bool = True,
    progress: Progress | None = None,
    description: str = "reverse sweep",
) -> dict[int, AdjointResult]:
    """`adjoint_contributions` at several checkpoints in one backward sweep.

    `directions` maps each checkpoint (negative counts from the end) to its (K_k, P) test
    directions, taken at that checkpoint's weights. The sweep starts at the last of them; as it
    reaches each earlier one's step it adds that checkpoint's adjoint rows (a_w = b_w = its
    directions, a_v = b_v = 0) and their scores, and from there every step's one first-order
    graph serves all active rows. The trajectory is replayed (and checked) once, where one sweep
    per checkpoint replays it about K/2 times for checkpoints 1..K (the second-order products
    still add up: checkpoint k's rows are carried over its k segments). Each checkpoint's rows
    keep tensors of their own, so their
    arithmetic is that of `adjoint_contributions(..., checkpoint=k)` operation for operation
    and the results are the same to the bit. Returns {checkpoint: AdjointResult}, by ascending
    checkpoint; checkpoint 0 gets zero contributions (no step precedes it).
    """
    n_checkpoints = len(trajectory.checkpoint_step)
    layout = trajectory.layout
    param = next(model.parameters())
    dtype, device = param.dtype, param.device
    rows: dict[int, torch.Tensor] = {}
    for checkpoint, given in directions.items():
        end = resolve_checkpoint(n_checkpoints, checkpoint)
        if end in rows:
            raise InvalidArgumentError(
                f"checkpoint {end} is given twice; give each checkpoint's directions once"
            )
        rows[end] = _direction_rows(given, layout.n_params, dtype, device)
    if not rows:
        raise InvalidArgumentError("no checkpoint given: map at least one to its directions")
    n_train = trajectory.n_train
    if len(train) != n_train:
        raise AnalysisError(
            f"the training split has {len(train)} samples but the store records n_train={n_train}"
        )
    with flush_denormals():
        adjoints = _sweep(trajectory, model, train, rows, check, progress, description)
    factor = -1.0 / n_train
    return {
        end: AdjointResult(
            exact=(adjoints[end].s_exact * factor).cpu().numpy(),
            approx=(adjoints[end].s_approx * factor).cpu().numpy(),
            checkpoint=end,
            step=int(trajectory.checkpoint_step[end]),
        )
        for end in sorted(rows)
    }


def _direction_rows(
    directions: torch.Tensor | np.ndarray, n_params: int, dtype: torch.dtype, device: torch.device
) -> torch.Tensor:
    """Directions as (K, P) rows of the model's dtype on its device, checked."""
    directions = torch.as_tensor(directions).to(device, dtype)
    if directions.ndim == 1:
        directions = directions[None]
    if directions.ndim != 2 or directions.shape[1] != n_params or directions.shape[0] == 0:
        raise InvalidArgumentError(
            f"directions must be (K, {n_params}) with K >= 1; got {tuple(directions.shape)}"
        )
    return directions


class _Adjoint:
    """One checkpoint's adjoint rows (exact a_w, a_v; approximate b_w, b_v: (K, P)) and their
    scores s (K, N), float64."""

    def __init__(self, directions: torch.Tensor, n_train: int) -> None:
        k, device = directions.shape[0], directions.device
        self.a_w, self.a_v = directions.clone(), torch.zeros_like(directions)
        self.b_w, self.b_v = directions.clone(), torch.zeros_like(directions)
        self.s_exact = torch.zeros(k, n_train, dtype=torch.float64, device=device)
        self.s_approx = torch.zeros(k, n_train, dtype=torch.float64, device=device)


def _sweep(trajectory, model, train, rows, check, progress, description) -> dict[int, _Adjoint]:
    """The backward sweep from the last checkpoint of `rows` ({checkpoint: (K, P) directions})
    to step 0, each checkpoint's adjoint joining at its step."""
    n_train, layout = trajectory.n_train, trajectory.layout
    param = next(model.parameters())
    dtype, device = param.dtype, param.device
    last = max(rows)
    adjoints: dict[int, _Adjoint] = {}
    active: list[_Adjoint] = []

    def join(checkpoint: int) -> None:
        if checkpoint in rows:
            adjoints[checkpoint] = _Adjoint(rows[checkpoint], n_train)
            active.append(adjoints[checkpoint])

    total = int(trajectory.checkpoint_step[last])
    done = 0
    inputs, targets = train.inputs, train.targets
    for segment in range(last - 1, -1, -1):
        join(segment + 1)
        steps = list(trajectory.replay_segment(model, train, segment, check=check))
        for step in reversed(steps):
            s = step.settings
            index = torch.from_numpy(np.asarray(step.batch_index, dtype=np.int64))
            scale = n_train / index.numel()
            a_vt = [adjoint.a_v - s.lr * adjoint.a_w for adjoint in active]
            b_vt = [adjoint.b_v - s.lr * adjoint.b_w for adjoint in active]
            with step_randomness(trajectory.step_seed(step.step), device):
                hv, ga, gb = adjoint_step_products(
                    model,
                    layout,
                    inputs[index].to(device, dtype),
                    targets[index].to(device),
                    step.weights_before.to(device, dtype),
                    torch.cat(a_vt),
                    torch.cat(b_vt),
                    trajectory.loss,
                )
            device_index = index.to(device)
            start = 0
            for adjoint, a, b in zip(active, a_vt, b_vt, strict=True):
                own = slice(start, start + a.shape[0])
                start = own.stop
                adjoint.s_exact.index_add_(1, device_index, ga[own].to(torch.float64), alpha=scale)
                adjoint.s_approx.index_add_(1, device_index, gb[own].to(torch.float64), alpha=scale)
                adjoint.a_w = adjoint.a_w + hv[own] + s.weight_decay * a
                adjoint.b_w = adjoint.b_w + s.weight_decay * b
                adjoint.a_v = s.momentum * a
                adjoint.b_v = s.momentum * b
            done += 1
            if progress is not None:
                progress(description, done, total)
        del steps
    join(0)
    return adjoints


# -- tasks and the analysis --------------------------------------------------------------------


def _direction_task(
    path: str,
    directions: np.ndarray,
    checkpoint: int,
    check: bool,
    inputs: RunInputs | None = None,
    device: str | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """One dask task: a chunk of test directions over the whole trajectory (self-contained, so
    that it runs the same on threads and on dask.distributed worker processes), on `device`
    (None: the CPU)."""
    trajectory = Trajectory(path, loss=inputs.loss if inputs is not None else None)
    model = model_at_checkpoint(path, 0, inputs=inputs, device=device)
    data = load_run_data(path, inputs)
    result = adjoint_contributions(
        trajectory,
        model,
        data.train,
        torch.from_numpy(directions),
        checkpoint=checkpoint,
        check=check,
    )
    return result.exact, result.approx


def select_test_samples(per_test: int | Sequence[int] | None, n_test: int) -> np.ndarray:
    """The test positions `--per-test` names: none, the first K, or the given indices (checked
    against the test set's size); shared by reverse mode and the baselines."""
    if per_test is None:
        return np.zeros(0, dtype=np.int64)
    if isinstance(per_test, (int, np.integer)):
        count = int(per_test)
        if not 1 <= count <= n_test:
            raise InvalidArgumentError(
                f"--per-test {count}: the test set has {n_test} samples; ask for 1..{n_test}"
            )
        return np.arange(count, dtype=np.int64)
    index = np.asarray(list(per_test), dtype=np.int64).reshape(-1)
    if index.size == 0:
        raise InvalidArgumentError("--per-test: the list of test samples is empty")
    if index.min() < 0 or index.max() >= n_test or np.unique(index).size != index.size:
        raise InvalidArgumentError(
            f"--per-test: test indices must be distinct and lie in [0, {n_test})"
        )
    return index


def _run_direction_chunks(
    path: Path,
    directions: np.ndarray,
    checkpoint: int,
    scheduler: str | None,
    progress: Progress | None,
    inputs: RunInputs | None = None,
    device: str | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Per-test directions in chunks of DIRECTION_CHUNK, one dask task per chunk."""
    chunks = [
        (str(path), directions[start : start + DIRECTION_CHUNK], checkpoint, True, inputs, device)
        for start in range(0, directions.shape[0], DIRECTION_CHUNK)
    ]
    results = map_tasks(
        _direction_task,
        chunks,
        scheduler=scheduler,
        progress=progress,
        description="per-test directions",
    )
    exact = np.concatenate([r[0] for r in results], axis=0)
    approx = np.concatenate([r[1] for r in results], axis=0)
    return exact, approx


@dataclass
class ExactAnalysisSummary:
    """What `run_exact_analysis` computed and where it wrote it."""

    path: Path
    group: str
    test_set: str
    n_train: int
    n_steps: int
    checkpoint: int
    test_loss: float
    n_per_test: int
    seconds: float
    total_exact: np.ndarray = field(repr=False)
    total_approx: np.ndarray = field(repr=False)

    def lines(self) -> list[str]:
        exact, approx = self.total_exact, self.total_approx
        order = np.argsort(exact)
        lines = [
            f"exact (reverse-mode) contributions of all {self.n_train} training samples to "
            f"test set {self.test_set!r} at checkpoint {self.checkpoint} (step {self.n_steps}), "
            f"in {self.seconds:.1f} s",
            f"written to {self.path}/{self.group}: total_contribution_exact, "
            "total_contribution_approx"
            + (
                f", contribution_exact / contribution_approx for {self.n_per_test} test samples"
                if self.n_per_test
                else ""
            ),
            f"test loss {self.test_loss:.4f}; approximate against exact: sign error "
            f"{sign_error_rate(approx, exact):.4f}, Spearman {spearman(approx, exact):.4f}",
            "most helpful: " + ", ".join(f"{i} ({exact[i]:+.3g})" for i in order[::-1][:5]),
            "most harmful: " + ", ".join(f"{i} ({exact[i]:+.3g})" for i in order[:5]),
        ]
        return lines


@reads_store
def run_exact_analysis(
    path: str | Path,
    config: ReverseConfig | str = "test",
    *,
    progress: Progress | None = None,
    inputs: RunInputs | None = None,
    out: str | Path | None = None,
    **options: Any,
) -> ExactAnalysisSummary:
    """Exact and approximate total contributions of every training sample to a test set (and,
    with `per_test`, to each of a subset of test samples), written to `reverse/<test set>`.

    `config` is a ReverseConfig, or the test set's name with the ReverseConfig fields as keyword
    options. Works on any complete store, including trajectory-only ones: no stored
    hypergradient is read. `per_test` is a count (the first K test samples) or a list of test
    indices; those directions run as dask tasks of DIRECTION_CHUNK directions each on
    `scheduler`. `checkpoint` truncates the trajectory there (the test direction is taken at its
    weights). `inputs` gives the model, data and loss in Python (a store recorded around a
    user's loop that names none; `hydra_store.RunInputs`), checked against the store. `out`:
    a results store to write `reverse/<test set>` to instead of the recording. `device`
    ("cuda"): the model, the adjoint state and the (K, N) scores live on the GPU, each batch of
    the replay is moved there, and the scores come back to host memory at the end; a run whose
    dropout masks were drawn on one kind of device replays only on that kind
    (`Trajectory.check_mask_device`).
    """
    if isinstance(options.get("per_test"), Sequence):
        options["per_test"] = tuple(int(i) for i in options["per_test"])
    config = resolve_config(ReverseConfig, config, options)
    config.validate()
    started = time.perf_counter()
    path = store_path(path)
    require_complete(open_group(path), path)
    trajectory = Trajectory(path, loss=inputs.loss if inputs is not None else None)
    end = resolve_checkpoint(len(trajectory.checkpoint_step), config.checkpoint)
    data = load_run_data(path, inputs)
    tests = resolve_test_set(path, config.test_set, run=data)
    model = model_at_checkpoint(path, end, inputs=inputs, device=config.device)
    layout, loss = trajectory.layout, trajectory.loss
    u, test_loss = mean_loss_gradient(model, layout, tests.inputs, tests.targets, loss=loss)
    chosen = select_test_samples(config.per_test, int(tests.targets.shape[0]))
    per_test_directions = _per_test_directions(model, layout, tests, chosen, loss)
    result = adjoint_contributions(
        trajectory, model, data.train, u[None], checkpoint=end, progress=progress
    )
    arrays = _total_arrays(trajectory.n_train, data.train, result)
    if per_test_directions is not None:
        exact, approx = _run_direction_chunks(
            path, per_test_directions, end, config.scheduler, progress, inputs, config.device
        )
        arrays.update(_per_test_arrays(chosen, tests, exact, approx))
    seconds = time.perf_counter() - started
    attrs = {
        "method": "hydra-exact (reverse mode)",
        "config": _config_attrs(config),
        "test_set": config.test_set,
        "checkpoint": end,
        "step": result.step,
        "n_train": trajectory.n_train,
        "test_loss": test_loss,
        "seconds": seconds,
        "sign_convention": "positive: removing the sample would raise the test loss (it helps)",
    }
    name = f"{REVERSE_GROUP}/{tests.name}"
    results = results_root(path, out)
    write_result_group(results, name, arrays, attrs)
    return ExactAnalysisSummary(
        path=results,
        group=name,
        test_set=tests.name,
        n_train=trajectory.n_train,
        n_steps=result.step,
        checkpoint=end,
        test_loss=test_loss,
        n_per_test=int(chosen.size),
        seconds=seconds,
        total_exact=result.exact[0],
        total_approx=result.approx[0],
    )


def _config_attrs(config: ReverseConfig) -> dict[str, Any]:
    attrs = dict(config.__dict__)
    if isinstance(config.per_test, tuple):
        attrs["per_test"] = list(config.per_test)
    return attrs


def _per_test_directions(
    model: torch.nn.Module, layout: ParameterLayout, tests, chosen: np.ndarray, loss: LossFunction
) -> np.ndarray | None:
    """The loss gradient of each chosen test sample, (K, P), or None when none is chosen."""
    if not chosen.size:
        return None
    index = torch.from_numpy(chosen)
    gradients = per_sample_loss_gradients(
        model, layout, tests.inputs[index], tests.targets[index], loss
    )
    return gradients.detach().cpu().numpy()


ArraySpec = tuple[np.ndarray, tuple[str, ...], dict[str, Any]]


def _total_arrays(n_train: int, train: Split, result: AdjointResult) -> dict[str, ArraySpec]:
    arrays: dict[str, ArraySpec] = {"train": (np.arange(n_train, dtype=np.int64), ("train",), {})}
    if not train.targets.is_floating_point():
        arrays["train_label"] = (train.targets.numpy().astype(np.int64), ("train",), {})
    return arrays | {
        "total_contribution_exact": (
            result.exact[0],
            ("train",),
            {"long_name": "C(i) exact, reverse mode (Hessian kept)"},
        ),
        "total_contribution_approx": (
            result.approx[0],
            ("train",),
            {"long_name": "C(i) approximate, reverse mode (Hessian dropped, Algorithm 1)"},
        ),
    }


def _per_test_arrays(
    chosen: np.ndarray, tests, exact: np.ndarray, approx: np.ndarray
) -> dict[str, ArraySpec]:
    arrays: dict[str, ArraySpec] = {"test": (chosen, ("test",), {})}
    if not tests.targets.is_floating_point():
        arrays["test_label"] = (tests.targets[torch.from_numpy(chosen)].numpy(), ("test",), {})
    return arrays | {
        "contribution_exact": (
            exact.T,
            ("train", "test"),
            {"long_name": "C(i, j) exact, reverse mode"},
        ),
        "contribution_approx": (
            approx.T,
            ("train", "test"),
            {"long_name": "C(i, j) approximate, reverse mode"},
        ),
    }


# -- reading ------------------------------------------------------------------------------------


def read_reverse_group(path: str | Path, test_set: str = "test") -> zarr.Group | None:
    """The `reverse/<test set>` group of a store (a recording or a results store), or None when
    not computed yet."""
    group = open_group(path)
    name = f"{REVERSE_GROUP}/{group_name(test_set)}"
    try:
        node = group[name]
    except KeyError:
        return None
    return node if isinstance(node, zarr.Group) else None
