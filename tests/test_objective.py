"""MetaObjective: a user's estimator gets chunking, vectorisation and stacking for free.

A per-task algorithm written by a user with the public operations (``Ops.grad``,
``Ops.step_vjp``, ``algorithms.rollout``) and run with ``objective.map_tasks`` equals
the built-in estimator on every path (float64, 1e-12). Then a user's whole estimator
and step-size policy (tests/typing_cases/user_components.py) drive a MetaOptimizer,
and the objective's own ``adapt`` and ``loss_grad``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import pytest
import torch
from torch import nn

import torch_maml as tm
from tests.problems import (
    ALPHA,
    SAME,
    STEPS,
    grads_at,
    make_mlp,
    meta_gradient,
    mse_by_hand,
    mse_loss,
    params_relative_error,
    regression_tasks,
)
from tests.typing_cases.user_components import FirstOrder, HeavyBall, InverseSqrtDecay, build
from torch_maml import algorithms, trees
from torch_maml.execution import ChunkSize
from torch_maml.typing import Params


def users_first_order(ops: tm.Ops, params: Params, data: tm.TaskData) -> tm.MetaGradient:
    """First-order MAML, as a user writes it: roll the inner loop out, one outer gradient."""
    run = algorithms.rollout(ops, params, data.inner)
    grads, loss = ops.grad(run.params, data.outer)
    return tm.MetaGradient(grads, loss, len(data.inner) + 1, 0)


def users_maml(ops: tm.Ops, params: Params, data: tm.TaskData) -> tm.MetaGradient:
    """MAML's recursion (eq. 12), as a user writes it: the steps' vector-Jacobian products
    from the outer gradient back to ``w``."""
    run = algorithms.rollout(ops, params, data.inner, record=True)
    grads, loss = ops.grad(run.params, data.outer)
    cotangent = (grads, trees.zeros_like(run.state))
    for j in reversed(range(len(data.inner))):
        cotangent = ops.step_vjp(run.iterates[j], run.states[j], data.inner[j], cotangent)
    steps = len(data.inner)
    return tm.MetaGradient(cotangent[0], loss, steps + 1, steps)


class UsersEstimator:
    """A user's estimator around a per-task algorithm: the objective runs it."""

    def __init__(self, algorithm: Any) -> None:
        self.algorithm = algorithm

    def meta_gradient(
        self,
        objective: tm.MetaObjective,
        params: Params,
        tasks: Sequence[tm.Task[Any]],
        generator: torch.Generator,
    ) -> tm.MetaGradient:
        data = tm.support_query_data(tasks, objective.inner_loop.steps)
        result: tm.MetaGradient = objective.map_tasks(self.algorithm, params, data)
        return result


PATHS: list[tuple[str, ChunkSize, bool]] = [
    ("one by one", 1, False),
    ("chunks of 2", 2, False),
    ("all at once", None, False),
    ("auto", "auto", False),
    ("stacked, one by one", 1, True),
    ("stacked, chunks of 2", 2, True),
    ("stacked", None, True),
    ("stacked, auto", "auto", True),
]


@pytest.mark.parametrize(
    ("algorithm", "builtin"),
    [(users_first_order, tm.FirstOrder()), (users_maml, tm.FiniteSum())],
    ids=["first-order", "maml"],
)
@pytest.mark.parametrize(("path", "chunk", "stacked"), PATHS, ids=[p[0] for p in PATHS])
def test_a_users_algorithm_equals_the_built_in_estimator_on_every_path(
    algorithm: Any, builtin: tm.MetaGradientEstimator, path: str, chunk: ChunkSize, stacked: bool
) -> None:
    tasks = regression_tasks(5, torch.Generator().manual_seed(0))
    data: Any = tm.StackedTasks.stack(tasks) if stacked else tasks
    inner = tm.GradientDescent(STEPS, ALPHA)
    expected, expected_info = meta_gradient(
        make_mlp(0), mse_loss, inner, builtin, tasks, task_chunk_size=1
    )
    grads, info = meta_gradient(
        make_mlp(0), mse_loss, inner, UsersEstimator(algorithm), data, task_chunk_size=chunk
    )
    assert params_relative_error(grads, expected) < SAME
    assert torch.allclose(info.loss, expected_info.loss, rtol=SAME, atol=0)
    assert (info.grad_evals, info.hvp_evals) == (expected_info.grad_evals, expected_info.hvp_evals)


def test_map_tasks_is_the_mean_of_the_algorithm_over_the_tasks() -> None:
    """Against the algorithm run on each task's data by hand, with the sums of its counts."""
    model = make_mlp(0)
    loss = tm.TaskLoss(model, mse_loss, [n for n, _ in model.named_parameters()])
    inner = tm.GradientDescent(STEPS, ALPHA)
    objective = tm.MetaObjective(loss, inner, task_chunk_size=None)
    tasks = regression_tasks(3, torch.Generator().manual_seed(1))
    params = loss.params()
    result = objective.map_tasks(users_first_order, params, tm.support_query_data(tasks, STEPS))
    weights = [params[n] for n in params]
    expected = [torch.zeros_like(w) for w in weights]
    losses = []
    for task in tasks:
        w = weights
        for _ in range(STEPS):
            w = [p - ALPHA * g for p, g in zip(w, grads_at(w, task.support), strict=True)]
        expected = [e + g / 3 for e, g in zip(expected, grads_at(w, task.query), strict=True)]
        losses.append(mse_by_hand(w, task.query))
    assert params_relative_error(result.grads, dict(zip(params, expected, strict=True))) < SAME
    assert torch.allclose(result.loss, torch.stack(losses).mean(), rtol=SAME, atol=0)
    assert (result.grad_evals, result.hvp_evals) == (3 * (STEPS + 1), 0)
    assert objective.task_chunk_size is None
    assert objective.compile is False


def test_the_objective_adapts_one_task_and_counts() -> None:
    model = make_mlp(0)
    loss = tm.TaskLoss(model, mse_loss, [n for n, _ in model.named_parameters()])
    objective = tm.MetaObjective(loss, tm.GradientDescent(STEPS, ALPHA))
    task = regression_tasks(1, torch.Generator().manual_seed(2))[0]
    counts = tm.OracleCounts()
    adapted = objective.adapt(loss.params(), [task.support] * STEPS, counts)
    w = [p.detach() for p in model.parameters()]
    for _ in range(STEPS):
        w = [p - ALPHA * g for p, g in zip(w, grads_at(w, task.support), strict=True)]
    assert params_relative_error(adapted, dict(zip(loss.names, w, strict=True))) < SAME
    assert not any(t.requires_grad for t in adapted.values())
    assert counts == tm.OracleCounts(grad_evals=STEPS, hvp_evals=0)
    grads, value = objective.loss_grad(adapted, task.query)
    expected = grads_at(w, task.query)
    assert params_relative_error(grads, dict(zip(loss.names, expected, strict=True))) < SAME
    assert torch.allclose(value, mse_by_hand(w, task.query), rtol=SAME, atol=0)


# ---------------------------------------------------------------- a user's components


def test_user_components_satisfy_the_protocols() -> None:
    assert isinstance(HeavyBall(2, 0.1, 0.5), tm.InnerLoop)
    assert isinstance(FirstOrder(), tm.MetaGradientEstimator)
    assert isinstance(InverseSqrtDecay(0.1), tm.StepSizePolicy)


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
        torch.testing.assert_close(p.detach(), before - 0.01 * g, rtol=SAME, atol=1e-15)

    betas = [meta_opt.step(tasks).beta for _ in range(2)]
    assert betas == pytest.approx([0.01 / math.sqrt(2), 0.01 / math.sqrt(3)], rel=1e-15)
