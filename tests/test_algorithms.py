"""The per-task algorithms, called directly on an Ops (one task, and vectorised).

The forward rollout that every algorithm shares, the two exact meta gradients
(autograd through the unrolled loop, and the recursion) against each other and
autograd by hand, the finite-difference HVP and conjugate gradient against closed
forms, and the algorithms' own argument checks. The estimators that choose their
data are tested in tests/test_estimators.py.
"""

from __future__ import annotations

import re

import pytest
import torch

import torch_maml as tm
from tests.problems import (
    ALPHA,
    DIM,
    SAME,
    STEPS,
    TIGHT,
    Vector,
    grads_at,
    make_mlp,
    mse_by_hand,
    mse_loss,
    params_relative_error,
    quadratic_loss,
    random_quadratic,
    random_spd,
    reference_meta_gradient,
    regression_tasks,
    relative_error,
)
from torch_maml import algorithms
from torch_maml.typing import Params


def mlp_ops(batched: bool = False, inner: tm.InnerLoop | None = None) -> tm.Ops:
    model = make_mlp(0)
    loss = tm.TaskLoss(model, mse_loss, [n for n, _ in model.named_parameters()])
    return tm.Ops(loss, inner or tm.GradientDescent(STEPS, ALPHA), batched=batched)


def params() -> Params:
    return {n: p.detach() for n, p in make_mlp(0).named_parameters()}


def test_rollout_records_the_inner_path() -> None:
    task = regression_tasks(1, torch.Generator().manual_seed(0))[0]
    run = algorithms.rollout(mlp_ops(), params(), [task.support] * STEPS, record=True)
    w = list(params().values())
    for j in range(STEPS):
        assert params_relative_error(run.iterates[j], dict(zip(run.params, w, strict=True))) < SAME
        assert torch.allclose(run.values[j], mse_by_hand(w, task.support), rtol=SAME, atol=0)
        w = [p - ALPHA * g for p, g in zip(w, grads_at(w, task.support), strict=True)]
    expected = dict(zip(params(), w, strict=True))
    assert params_relative_error(run.params, expected) < SAME
    assert run.states == [()] * STEPS
    assert run.pullbacks == [None] * STEPS  # none asked for
    unrecorded = algorithms.rollout(mlp_ops(), params(), [task.support] * STEPS)
    assert unrecorded.iterates == []
    assert all(torch.equal(unrecorded.params[n], run.params[n]) for n in run.params)


@pytest.mark.parametrize("keep_graphs", [False, True])
def test_the_recursion_and_the_unrolled_loop_are_maml(keep_graphs: bool) -> None:
    tasks = regression_tasks(1, torch.Generator().manual_seed(1))
    task = tasks[0]
    data = tm.TaskData([task.support] * STEPS, (), task.query)
    model = make_mlp(0)
    loss = tm.TaskLoss(model, mse_loss, [n for n, _ in model.named_parameters()])
    ops = tm.Ops(loss, tm.GradientDescent(STEPS, ALPHA), batched=False, keep_graphs=keep_graphs)
    expected = reference_meta_gradient(make_mlp(0), tasks, STEPS, ALPHA)
    recursion = algorithms.recursion_meta_gradient(ops, params(), data)
    unrolled = algorithms.unrolled_meta_gradient(ops, params(), data)
    for result in (recursion, unrolled):
        assert params_relative_error(result.grads, expected) < TIGHT
        assert (result.grad_evals, result.hvp_evals) == (STEPS + 1, STEPS)
    # Hessians on explicit batches, here the same as the steps': the same recursion.
    explicit = tm.TaskData([task.support] * STEPS, [task.support] * STEPS, task.query)
    again = algorithms.recursion_meta_gradient(ops, params(), explicit)
    assert params_relative_error(again.grads, recursion.grads) < SAME


def test_the_hessian_batches_must_match_the_steps() -> None:
    task = regression_tasks(1, torch.Generator().manual_seed(2))[0]
    data = tm.TaskData([task.support] * STEPS, [task.support] * 2, task.query)
    message = f"'hessian' must hold one batch per inner step ({STEPS}) or none (got 2)"
    for algorithm in (
        algorithms.recursion_meta_gradient,
        lambda ops, w, d: algorithms.hessian_free_meta_gradient(ops, w, d, lr=ALPHA, delta=0.1),
    ):
        with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
            algorithm(mlp_ops(), params(), data)


@pytest.mark.parametrize("delta", [1e-3, 1.0, 100.0])
def test_the_finite_difference_hvp_is_exact_on_a_quadratic(delta: float) -> None:
    gen = torch.Generator().manual_seed(3)
    quadratic = random_quadratic(DIM, gen)
    w = torch.randn(DIM, generator=gen, dtype=torch.float64)
    v = torch.randn(DIM, generator=gen, dtype=torch.float64)
    loss = tm.TaskLoss(Vector(w), quadratic_loss, ["w"])
    ops = tm.Ops(loss, None, batched=False)
    product = algorithms.finite_difference_hvp(ops, loss.params(), quadratic, {"w": v}, delta)
    assert relative_error(product["w"], quadratic[0] @ v) < TIGHT
    zero = algorithms.finite_difference_hvp(
        ops, loss.params(), quadratic, {"w": torch.zeros(DIM, dtype=torch.float64)}, delta
    )
    assert torch.equal(zero["w"], torch.zeros(DIM, dtype=torch.float64))


def test_conjugate_gradient_solves_each_tasks_system() -> None:
    """Vectorised: each task its own SPD matrix; exact in dim iterations; a task with a
    zero right-hand side stays at 0 (no division by zero)."""
    gen = torch.Generator().manual_seed(4)
    matrices = torch.stack([random_spd(DIM, gen) for _ in range(3)])
    rhs = torch.randn(3, DIM, generator=gen, dtype=torch.float64)
    rhs[2] = 0.0
    ops = tm.Ops(None, None, batched=True)

    def matvec(v: Params) -> Params:
        return {"x": torch.einsum("bij,bj->bi", matrices, v["x"])}

    solution, iterations = algorithms.conjugate_gradient(ops, matvec, {"x": rhs}, DIM)
    assert iterations == DIM
    for i in range(2):
        expected = torch.linalg.solve(matrices[i], rhs[i])
        assert relative_error(solution["x"][i], expected) < TIGHT
    assert torch.equal(solution["x"][2], torch.zeros(DIM, dtype=torch.float64))


def test_conjugate_gradient_stops_at_its_tolerance() -> None:
    gen = torch.Generator().manual_seed(5)
    matrix = torch.diag(torch.tensor([1.0, 1.0, 3.0, 3.0], dtype=torch.float64))  # 2 eigenvalues
    rhs = torch.randn(DIM, generator=gen, dtype=torch.float64)
    ops = tm.Ops(None, None, batched=False)

    def matvec(v: Params) -> Params:
        return {"x": matrix @ v["x"]}

    solution, iterations = algorithms.conjugate_gradient(ops, matvec, {"x": rhs}, 50, tol=1e-12)
    assert iterations <= 3  # two distinct eigenvalues: exact after 2, one more to see it
    assert relative_error(solution["x"], torch.linalg.solve(matrix, rhs)) < TIGHT
    _, iterations = algorithms.conjugate_gradient(ops, matvec, {"x": rhs}, 50)
    assert iterations == 50  # tol = 0: every iteration


def test_first_order_reptile_and_hessian_free_on_one_task() -> None:
    """Against the loop by hand: the outer gradient at w_N, (w - w_N) scaled, and the
    gradient-descent recursion with central differences (the exact one, to O(delta^2))."""
    task = regression_tasks(1, torch.Generator().manual_seed(6))[0]
    data = tm.TaskData([task.support] * STEPS, (), task.query)
    ops = mlp_ops()
    w = list(params().values())
    iterates = [w]
    for _ in range(STEPS):
        w = [p - ALPHA * g for p, g in zip(w, grads_at(w, task.support), strict=True)]
        iterates.append(w)
    names = list(params())
    first = algorithms.first_order_meta_gradient(ops, params(), data)
    expected = dict(zip(names, grads_at(w, task.query), strict=True))
    assert params_relative_error(first.grads, expected) < SAME
    assert (first.grad_evals, first.hvp_evals) == (STEPS + 1, 0)
    reptile = algorithms.reptile_meta_gradient(ops, params(), data, scale=2.0)
    expected = {n: 2.0 * (a - b) for n, a, b in zip(names, iterates[0], w, strict=True)}
    assert params_relative_error(reptile.grads, expected) < SAME
    assert torch.allclose(reptile.loss, mse_by_hand(w, task.query), rtol=SAME, atol=0)
    assert (reptile.grad_evals, reptile.hvp_evals) == (STEPS, 0)
    exact = algorithms.recursion_meta_gradient(ops, params(), data)
    free = algorithms.hessian_free_meta_gradient(ops, params(), data, lr=ALPHA, delta=1e-5)
    assert params_relative_error(free.grads, exact.grads) < 1e-8
    assert (free.grad_evals, free.hvp_evals) == (3 * STEPS + 1, 0)
