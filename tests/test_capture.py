"""Captured meta steps, checked on the CPU: the captured region never synchronises.

A CUDA graph replays device work only: any host synchronisation inside the region
(``Tensor.item``, ``bool(tensor)``...) breaks a capture. ``capture="check"`` runs the
very region that is captured on a GPU, eagerly, with those synchronisations made to
raise: these tests run it for every built-in estimator, so that capturability cannot
regress unseen. The GPU behaviour itself is tested in tests/test_cuda.py.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import pytest
import torch
from torch import Tensor, nn

import torch_maml as tm
from tests.problems import make_mlp, mse_loss, regression_tasks
from torch_maml.execution import HostSyncError, no_host_sync
from torch_maml.typing import Params

ALPHA, STEPS = 0.1, 3

CASES: list[tuple[str, tm.MetaGradientEstimator, tm.InnerLoop]] = [
    ("FiniteSum", tm.FiniteSum(), tm.GradientDescent(STEPS, ALPHA)),
    ("Exact", tm.Exact(), tm.GradientDescent(STEPS, ALPHA)),
    ("FirstOrder", tm.FirstOrder(), tm.GradientDescent(STEPS, ALPHA)),
    ("Reptile", tm.Reptile(), tm.GradientDescent(STEPS, ALPHA)),
    ("HessianFree", tm.HessianFree(1e-4), tm.GradientDescent(STEPS, ALPHA)),
    ("Implicit", tm.Implicit(cg_steps=4), tm.Proximal(tm.GradientDescent(STEPS, ALPHA), 2.0)),
    ("FiniteSum, Adam", tm.FiniteSum(), tm.Adam(STEPS, ALPHA)),
]


def build(
    estimator: tm.MetaGradientEstimator,
    inner_loop: tm.InnerLoop,
    capture: Any,
    chunk: tm.execution.ChunkSize = "auto",
    **options: Any,
) -> tuple[nn.Module, tm.MetaOptimizer[nn.Module, tuple[Tensor, Tensor]]]:
    model: nn.Module = make_mlp(0)
    optimizer: tm.MetaOptimizer[nn.Module, tuple[Tensor, Tensor]] = tm.MetaOptimizer(
        model,
        mse_loss,
        inner_loop=inner_loop,
        estimator=estimator,
        step_size=tm.Constant(0.1),
        capture=capture,
        task_chunk_size=chunk,
        **options,
    )
    return model, optimizer


@pytest.mark.parametrize(("name", "estimator", "inner_loop"), CASES, ids=[c[0] for c in CASES])
@pytest.mark.parametrize("chunk", [1, 2, None], ids=str)
def test_the_captured_region_never_synchronises_and_equals_eager(
    name: str, estimator: tm.MetaGradientEstimator, inner_loop: tm.InnerLoop, chunk: Any
) -> None:
    tasks = regression_tasks(4, torch.Generator().manual_seed(0))
    results = []
    for capture in (False, "check"):
        model, optimizer = build(estimator, inner_loop, capture, chunk)
        optimizer.step(tm.StackedTasks.stack(tasks))
        optimizer.step(tasks)
        optimizer.meta_backward(tasks)
        results.append([p.detach().clone() for p in model.parameters()])
        grads = [p.grad for p in model.parameters()]
        assert all(g is not None for g in grads)
        results.append([g for g in grads if g is not None])
    for eager, checked in zip(results[0] + results[1], results[2] + results[3], strict=True):
        assert torch.equal(eager, checked)


@pytest.mark.parametrize("policy", ["raise", "skip"])
def test_the_region_checks_finiteness_on_the_device(policy: str) -> None:
    tasks = regression_tasks(3, torch.Generator().manual_seed(1))
    x, y = tasks[1].support
    tasks[1] = tm.SupportQuery((x, torch.full_like(y, float("nan"))), tasks[1].query)
    model, optimizer = build(
        tm.FiniteSum(), tm.GradientDescent(STEPS, ALPHA), "check", nan_policy=policy
    )
    before = [p.detach().clone() for p in model.parameters()]
    if policy == "raise":
        with pytest.raises(tm.NonFiniteError, match="support loss at inner step 0 of task 1"):
            optimizer.step(tasks)
    else:
        assert optimizer.step(tasks).skipped
    for a, b in zip(before, model.parameters(), strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize(
    ("method", "call"),
    [
        ("item", lambda t: t.item()),
        ("__bool__", lambda t: bool(t)),
        ("__float__", lambda t: float(t)),
        ("tolist", lambda t: t.tolist()),
        ("cpu", lambda t: t.cpu()),
        ("numpy", lambda t: t.numpy()),
        ("nonzero", lambda t: t.nonzero()),
    ],
)
def test_no_host_sync_refuses_each_synchronisation(method: str, call: Any) -> None:
    t = torch.ones(())
    with no_host_sync(), pytest.raises(HostSyncError, match=f"Tensor.{method}"):
        call(t)
    call(t)  # and restores the methods after


class SyncingFirstOrder:
    """A user's estimator that decides on the host: it cannot be captured."""

    def meta_gradient(
        self,
        objective: tm.MetaObjective,
        params: Params,
        tasks: Sequence[tm.Task[Any]],
        generator: torch.Generator,
    ) -> tm.MetaGradient:
        result = tm.FirstOrder().meta_gradient(objective, params, tasks, generator)
        if result.loss > 100:  # bool(tensor): a host synchronisation
            raise RuntimeError("diverged")
        return result


def test_check_names_the_synchronisation_of_a_users_estimator() -> None:
    tasks = regression_tasks(3, torch.Generator().manual_seed(2))
    _, optimizer = build(SyncingFirstOrder(), tm.GradientDescent(STEPS, ALPHA), "check")
    with pytest.raises(HostSyncError, match=r"Tensor.__bool__"):
        optimizer.step(tasks)
    _, eager = build(SyncingFirstOrder(), tm.GradientDescent(STEPS, ALPHA), "auto")
    assert not eager.step(tasks).skipped  # on the CPU, "auto" never captures


def test_implicit_with_a_tolerance_is_data_dependent() -> None:
    """CG that stops early decides on the host: such a step runs eagerly on a GPU."""
    tasks = regression_tasks(3, torch.Generator().manual_seed(3))
    inner = tm.Proximal(tm.GradientDescent(STEPS, ALPHA), 2.0)
    _, optimizer = build(tm.Implicit(cg_steps=6, tol=1e-3), inner, "check")
    with pytest.raises(HostSyncError):
        optimizer.step(tasks)


def test_capture_true_without_cuda_is_refused_and_bad_values_are_named() -> None:
    tasks = regression_tasks(2, torch.Generator().manual_seed(4))
    _, optimizer = build(tm.FiniteSum(), tm.GradientDescent(STEPS, ALPHA), True)
    with pytest.raises(ValueError, match=r"capture=True, but .*not all on one CUDA device"):
        optimizer.step(tasks)
    with pytest.raises(ValueError, match="'capture' must be 'auto', True, False or 'check'"):
        build(tm.FiniteSum(), tm.GradientDescent(STEPS, ALPHA), "always")
