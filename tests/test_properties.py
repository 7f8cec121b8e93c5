"""Property-based checks over shapes, steps and meta-batch sizes (hypothesis)."""

from __future__ import annotations

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


@settings(max_examples=30, deadline=None)
@given(problems())
def test_finite_sum_equals_exact_everywhere(
    problem: tuple[nn.Module, list[tm.SupportQuery[tuple[torch.Tensor, torch.Tensor]]], int, float],
) -> None:
    model, tasks, steps, alpha = problem
    results = []
    for estimator in (tm.Exact(), tm.FiniteSum()):
        meta_opt = tm.MetaOptimizer(
            model,
            mse_loss,
            inner_loop=tm.GradientDescent(steps=steps, lr=alpha),
            estimator=estimator,
            step_size=tm.Constant(0.1),
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
