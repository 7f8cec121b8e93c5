"""A user's own InnerLoop, MetaGradientEstimator and StepSizePolicy work when passed in."""

from __future__ import annotations

import math

import pytest
import torch
from torch import Tensor, nn

import torch_maml as tm
from tests.problems import make_mlp, mse_by_hand, mse_loss, params_relative_error, regression_tasks
from tests.typing_cases.user_components import FirstOrder, HeavyBall, InverseSqrtDecay, build


def test_user_components_satisfy_the_protocols() -> None:
    assert isinstance(HeavyBall(2, 0.1, 0.5), tm.InnerLoop)
    assert isinstance(FirstOrder(), tm.MetaGradientEstimator)
    assert isinstance(InverseSqrtDecay(0.1), tm.StepSizePolicy)


def momentum_reference(
    model: nn.Module, tasks: list[tm.SupportQuery[tuple[Tensor, Tensor]]], inner: HeavyBall
) -> tm.typing.Params:
    """Meta gradient through the unrolled heavy-ball loop, by torch.autograd."""
    names = [n for n, _ in model.named_parameters()]
    total = [torch.zeros_like(p) for p in model.parameters()]
    for task in tasks:
        w0 = [p.detach().clone().requires_grad_(True) for p in model.parameters()]
        w, v = list(w0), [torch.zeros_like(p) for p in w0]
        for _ in range(inner.steps):
            grads = torch.autograd.grad(mse_by_hand(w, task.support), w, create_graph=True)
            v = [inner.momentum * vi + g for vi, g in zip(v, grads, strict=True)]
            w = [p - inner.lr * vi for p, vi in zip(w, v, strict=True)]
        meta = torch.autograd.grad(mse_by_hand(w, task.query), w0)
        total = [t + g for t, g in zip(total, meta, strict=True)]
    return {n: t / len(tasks) for n, t in zip(names, total, strict=True)}


@pytest.mark.parametrize("steps", [1, 3])
def test_a_stateful_inner_loop_works_with_every_estimator(steps: int) -> None:
    """The recursion carries the optimizer state's cotangent too: FiniteSum == Exact == autograd."""
    tasks = regression_tasks(3, torch.Generator().manual_seed(0))
    inner = HeavyBall(steps=steps, lr=0.05, momentum=0.9)
    reference = momentum_reference(make_mlp(0), tasks, inner)
    for estimator in (tm.Exact(), tm.FiniteSum()):
        model = make_mlp(0)
        meta_opt = tm.MetaOptimizer(
            model, mse_loss, inner_loop=inner, estimator=estimator, step_size=tm.Constant(0.1)
        )
        meta_opt.meta_backward(tasks)
        grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
        assert params_relative_error(grads, reference) < 1e-10, type(estimator).__name__


def test_a_user_estimator_and_step_size_drive_a_meta_optimizer() -> None:
    tasks = regression_tasks(2, torch.Generator().manual_seed(1))
    model = make_mlp(0)
    assert isinstance(model, nn.Sequential)
    meta_opt = build(model)
    weights = [p.detach().clone() for p in model.parameters()]
    info = meta_opt.step(tasks)
    assert info.beta == 0.01
    assert (info.grad_evals, info.hvp_evals) == (2 * 4, 0)

    # First-order MAML: the query gradient at the adapted weights, averaged.
    inner = HeavyBall(steps=3, lr=0.05, momentum=0.9)
    expected = [torch.zeros_like(w) for w in weights]
    for task in tasks:
        w = [p.clone().requires_grad_(True) for p in weights]
        v = [torch.zeros_like(p) for p in w]
        for _ in range(inner.steps):
            grads = torch.autograd.grad(mse_by_hand(w, task.support), w)
            v = [inner.momentum * vi + g for vi, g in zip(v, grads, strict=True)]
            w = [
                (p - inner.lr * vi).detach().requires_grad_(True)
                for p, vi in zip(w, v, strict=True)
            ]
        query_grads = torch.autograd.grad(mse_by_hand(w, task.query), w)
        expected = [e + g / len(tasks) for e, g in zip(expected, query_grads, strict=True)]
    for p, before, g in zip(model.parameters(), weights, expected, strict=True):
        torch.testing.assert_close(p.detach(), before - 0.01 * g, rtol=1e-12, atol=1e-15)

    betas = [meta_opt.step(tasks).beta for _ in range(2)]
    assert betas == pytest.approx([0.01 / math.sqrt(2), 0.01 / math.sqrt(3)], rel=1e-15)
