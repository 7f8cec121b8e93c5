"""Property-based checks over shapes, steps and meta-batch sizes (hypothesis)."""

from __future__ import annotations

from typing import Any

import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import torch_maml as tm
from tests.problems import mse_loss, params_relative_error


@st.composite
def problems(
    draw: st.DrawFn,
) -> tuple[nn.Module, list[tm.SupportQuery[tuple[torch.Tensor, torch.Tensor]]], int, float]:
    seed = draw(st.integers(0, 2**16))
    features = draw(st.integers(1, 3))
    width = draw(st.integers(1, 6))
    outputs = draw(st.integers(1, 2))
    tasks = draw(st.integers(1, 3))
    support = draw(st.integers(1, 5))
    query = draw(st.integers(1, 5))
    steps = draw(st.integers(1, 4))
    alpha = draw(st.floats(0.001, 0.3))
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(features, width), nn.Tanh(), nn.Linear(width, outputs)).double()

    def batch(n: int) -> tuple[torch.Tensor, torch.Tensor]:
        x = torch.randn(n, features, generator=gen, dtype=torch.float64)
        return x, torch.randn(n, outputs, generator=gen, dtype=torch.float64)

    return (
        model,
        [tm.SupportQuery(batch(support), batch(query)) for _ in range(tasks)],
        steps,
        alpha,
    )


Problem = tuple[nn.Module, list[tm.SupportQuery[tuple[torch.Tensor, torch.Tensor]]], int, float]


def check_finite_sum_equals_exact(problem: Problem, **options: Any) -> None:
    """FiniteSum's meta gradient equals Exact's (1e-10), with the paper's oracle counts."""
    model, tasks, steps, alpha = problem
    results = []
    for estimator in (tm.Exact(), tm.FiniteSum()):
        meta_opt = tm.MetaOptimizer(
            model,
            mse_loss,
            inner_loop=tm.GradientDescent(steps=steps, lr=alpha),
            estimator=estimator,
            step_size=tm.Constant(0.1),
            **options,
        )
        meta_opt.zero_grad()
        info = meta_opt.meta_backward(tasks)
        assert (info.grad_evals, info.hvp_evals) == (len(tasks) * (steps + 1), len(tasks) * steps)
        results.append(
            {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        )
    exact, finite_sum = results
    scale = max(float(g.abs().max()) for g in exact.values())
    if scale > 1e-12:  # a meta gradient of exactly zero has no relative error to speak of
        assert params_relative_error(finite_sum, exact) < 1e-10


@settings(max_examples=30, deadline=None)
@given(problems())
def test_finite_sum_equals_exact_everywhere(problem: Problem) -> None:
    check_finite_sum_equals_exact(problem)


@st.composite
def anything(draw: st.DrawFn) -> dict[str, Any]:
    """A model, a meta-batch (maybe ragged, maybe non-finite) and optimizer options."""
    dtype = draw(st.sampled_from([torch.float32, torch.float64]))
    seed = draw(st.integers(0, 2**16))
    features, width = draw(st.integers(1, 3)), draw(st.integers(1, 5))
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(features, width), nn.Tanh(), nn.Linear(width, 1)).to(dtype)
    poison = draw(st.sampled_from([None, float("nan"), float("inf")]))
    ragged = draw(st.booleans())

    def batch(n: int) -> tuple[torch.Tensor, torch.Tensor]:
        x = torch.randn(n, features, generator=gen, dtype=dtype)
        return x, torch.randn(n, 1, generator=gen, dtype=dtype)

    tasks = []
    for i in range(draw(st.integers(1, 4))):
        support = batch(draw(st.integers(1, 4)) if ragged else 3)
        query = batch(3)
        if poison is not None and i == 0 and draw(st.booleans()):
            query = (query[0], query[1] * poison)
        tasks.append(tm.SupportQuery(support, query))
    return {
        "model": model,
        "tasks": tasks,
        "steps": draw(st.integers(1, 4)),
        "alpha": draw(st.sampled_from([1e-3, 0.1, 1.0, 1e30])),
        "estimator": draw(st.sampled_from([tm.FiniteSum(), tm.Exact()])),
        "chunk": draw(st.sampled_from(["auto", None, 1, 2])),
        "adapted": draw(st.sampled_from([None, ["2"], ["0.weight"]])),
        "nan_policy": draw(st.sampled_from(["raise", "skip"])),
    }


@settings(max_examples=40, deadline=None)
@given(anything())
def test_a_step_succeeds_or_raises_a_documented_error_and_changes_nothing(
    case: dict[str, Any],
) -> None:
    model: nn.Module = case["model"]
    meta_opt = tm.MetaOptimizer(
        model,
        mse_loss,
        inner_loop=tm.GradientDescent(steps=case["steps"], lr=case["alpha"]),
        estimator=case["estimator"],
        step_size=tm.Constant(0.01),
        task_chunk_size=case["chunk"],
        adapted=case["adapted"],
        nan_policy=case["nan_policy"],
    )
    before = [p.detach().clone() for p in model.parameters()]
    try:
        info = meta_opt.step(case["tasks"])
    except tm.NonFiniteError:
        assert case["nan_policy"] == "raise"
        changed = False
    else:
        assert info.skipped or bool(torch.isfinite(info.loss))
        changed = not info.skipped
        assert all(bool(torch.isfinite(p).all()) for p in model.parameters()) or not changed
    for p, old in zip(model.parameters(), before, strict=True):
        assert p.dtype == old.dtype
        if not changed:
            assert torch.equal(p, old)


@settings(max_examples=25, deadline=None)
@given(problems(), st.sampled_from(["auto", None, 1, 2]), st.sampled_from([None, ["2"], ["0"]]))
def test_finite_sum_equals_exact_for_any_chunking_and_selection(
    problem: Problem, chunk: tm.batching.ChunkSize, adapted: list[str] | None
) -> None:
    check_finite_sum_equals_exact(problem, task_chunk_size=chunk, adapted=adapted)
