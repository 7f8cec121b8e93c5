"""Ops: the operations every algorithm is built from, per task and vectorised over tasks.

Each oracle against an independent computation (the hand-written MLP differentiated by
``torch.autograd``, or a quadratic's closed form), and the vectorised operations row
by row against the per-task ones (float64, 1e-12). Then what the algebra keeps per
task, the zero gradients of unused parameters, a loss that ignores its parameters,
and the two ways a step's pullback is kept (its graph, or a recomputation that
replays the step's random draws).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

import torch_maml as tm
from tests.problems import (
    ALPHA,
    DIM,
    SAME,
    STEPS,
    TIGHT,
    Pair,
    Vector,
    grads_at,
    make_mlp,
    meta_gradient,
    mse_by_hand,
    mse_loss,
    params_relative_error,
    quadratic_loss,
    random_quadratic,
    regression_tasks,
    relative_error,
)
from torch_maml import algorithms
from torch_maml.typing import Params


def mlp_loss(model: nn.Module | None = None) -> tm.TaskLoss:
    model = make_mlp(0) if model is None else model
    return tm.TaskLoss(model, mse_loss, [n for n, _ in model.named_parameters()])


def stacked(tasks: list[tm.SupportQuery[Pair]]) -> tm.StackedTasks[Pair]:
    return tm.StackedTasks.stack(tasks)


def rows(params: Params, count: int) -> Params:
    """``params`` repeated along a new leading task dimension."""
    return {n: p.expand(count, *p.shape) for n, p in params.items()}


def row(tree: Params, i: int) -> Params:
    return {n: t[i] for n, t in tree.items()}


def test_grad_and_value_are_those_of_the_loss() -> None:
    loss = mlp_loss()
    params = loss.params()
    task = regression_tasks(1, torch.Generator().manual_seed(0))[0]
    ops = tm.Ops(loss, None, batched=False)
    grads, value = ops.grad(params, task.support)
    weights = list(params.values())
    expected = dict(zip(params, grads_at(weights, task.support), strict=True))
    assert params_relative_error(grads, expected) < SAME
    assert not any(g.requires_grad for g in grads.values())
    assert torch.allclose(value, mse_by_hand(weights, task.support), rtol=SAME, atol=0)
    assert torch.equal(ops.value(params, task.support), value)


def test_hvp_and_step_vjp_on_a_quadratic_are_its_closed_forms() -> None:
    """``H v = A v``; a gradient-descent step's transposed Jacobian is ``v - alpha A v``."""
    gen = torch.Generator().manual_seed(1)
    quadratic = random_quadratic(DIM, gen)
    w = torch.randn(DIM, generator=gen, dtype=torch.float64)
    v = torch.randn(DIM, generator=gen, dtype=torch.float64)
    loss = tm.TaskLoss(Vector(w), quadratic_loss, ["w"])
    ops = tm.Ops(loss, tm.GradientDescent(1, ALPHA), batched=False)
    a = quadratic[0]
    assert relative_error(ops.hvp(loss.params(), quadratic, {"w": v})["w"], a @ v) < SAME
    (vjp, state) = ops.step_vjp(loss.params(), (), quadratic, ({"w": v}, ()))
    assert relative_error(vjp["w"], v - ALPHA * a @ v) < SAME
    assert state == ()


@pytest.mark.parametrize("inner", [tm.GradientDescent(STEPS, ALPHA), tm.Adam(STEPS, 0.01)])
def test_the_vectorised_operations_are_the_per_task_ones_row_by_row(inner: tm.InnerLoop) -> None:
    tasks = regression_tasks(3, torch.Generator().manual_seed(2))
    together = stacked(tasks)
    loss = mlp_loss()
    params = loss.params()
    one, many = tm.Ops(loss, inner, batched=False), tm.Ops(loss, inner, batched=True)
    w = rows(params, 3)
    vector = {n: torch.randn(3, *p.shape, dtype=p.dtype) for n, p in params.items()}
    grads, values = many.grad(w, together.support)
    products = many.hvp(w, together.support, vector)
    unrolled, unrolled_values = many.unrolled(w, [together.support] * STEPS, together.query)
    state = many.init(w)
    stepped = many.step(w, state, together.support)
    assert values.shape == (3,)
    for i, task in enumerate(tasks):
        g, value = one.grad(params, task.support)
        assert params_relative_error(row(grads, i), g) < SAME
        assert torch.allclose(values[i], value, rtol=SAME, atol=0)
        product = one.hvp(params, task.support, row(vector, i))
        assert params_relative_error(row(products, i), product) < SAME
        u, u_value = one.unrolled(params, [task.support] * STEPS, task.query)
        assert params_relative_error(row(unrolled, i), u) < SAME
        assert torch.allclose(unrolled_values[i], u_value, rtol=SAME, atol=0)
        single = one.step(params, one.init(params), task.support)
        assert params_relative_error(row(stepped.params, i), single.params) < SAME


def test_the_algebra_stays_per_task() -> None:
    ops = tm.Ops(None, None, batched=True)
    a = {"x": torch.tensor([[1.0, 2.0], [3.0, 4.0]]), "y": torch.tensor([[1.0], [0.0]])}
    b = {"x": torch.tensor([[1.0, 1.0], [1.0, 0.0]]), "y": torch.tensor([[2.0], [5.0]])}
    assert torch.equal(ops.dot(a, b), torch.tensor([5.0, 3.0]))
    assert torch.allclose(ops.norm(a), torch.tensor([6.0, 25.0]).sqrt())
    scaled = ops.scale(a, torch.tensor([2.0, -1.0]))
    assert torch.equal(scaled["x"], torch.tensor([[2.0, 4.0], [-3.0, -4.0]]))
    chosen = ops.where(torch.tensor([True, False]), a, b)
    assert torch.equal(chosen["x"], torch.tensor([[1.0, 2.0], [1.0, 0.0]]))
    assert torch.equal(chosen["y"], torch.tensor([[1.0], [5.0]]))
    assert ops.any(torch.tensor([False, True]))
    assert not ops.any(torch.tensor([False, False]))
    one = tm.Ops(None, None, batched=False)
    assert torch.equal(one.dot(row(a, 1), row(b, 1)), torch.tensor(3.0))


def test_operations_built_without_a_loss_or_inner_loop_say_so() -> None:
    params = {"w": torch.zeros(2)}
    with pytest.raises(RuntimeError, match="these operations were built without a loss"):
        tm.Ops(None, None, batched=False).grad(params, None)
    with pytest.raises(RuntimeError, match="these operations were built without an inner loop"):
        tm.Ops(mlp_loss(), None, batched=False).init(params)


@pytest.mark.parametrize("batched", [False, True])
@pytest.mark.parametrize("how", ["detached", "of the batch only"])
def test_a_loss_that_does_not_depend_on_the_parameters_is_refused(batched: bool, how: str) -> None:
    def loss_fn(model: nn.Module, batch: Pair) -> Tensor:
        if how == "detached":
            return mse_loss(model, batch).detach()
        return batch[1].mean()  # it has a grad, but not from the parameters

    loss = tm.TaskLoss(make_mlp(0), loss_fn, ["0.weight"])
    x = torch.ones(2, 3, 1, dtype=torch.float64)
    batch = (x, x.clone().requires_grad_(True))
    params = rows(loss.params(), 2)
    if not batched:
        batch, params = (x[0], x[0].clone().requires_grad_(True)), loss.params()
    with pytest.raises(ValueError, match="does not depend on the adapted parameters"):
        tm.Ops(loss, None, batched=batched).grad(params, batch)


@pytest.mark.parametrize("chunk", [1, None])
def test_a_trainable_parameter_the_loss_does_not_use_gets_a_zero_meta_gradient(
    chunk: int | None,
) -> None:
    """Per task and vectorised alike (Meta-SGD's step sizes are such parameters)."""
    tasks = regression_tasks(2, torch.Generator().manual_seed(1))
    for estimator in (tm.Exact(), tm.FiniteSum()):
        model = make_mlp(0)
        unused = nn.Parameter(torch.ones(3, dtype=torch.float64))
        model.register_parameter("unused", unused)
        grads, _ = meta_gradient(
            model,
            mse_loss,
            tm.GradientDescent(steps=2, lr=0.1),
            estimator,
            tasks,
            task_chunk_size=chunk,
        )
        assert torch.equal(grads["unused"], torch.zeros(3, dtype=torch.float64))
        assert bool((grads["0.weight"] != 0).any())


class Dropping(nn.Module):
    """An MLP with dropout: each forward pass in training mode draws a mask."""

    def __init__(self) -> None:
        super().__init__()
        self.net = make_mlp(0, width=16)
        self.drop = nn.Dropout(0.5)

    def forward(self, x: Tensor) -> Tensor:
        hidden = self.drop(torch.tanh(self.net[0](x)))
        out: Tensor = self.net[2](hidden)
        return out


def dropping_loss(model: nn.Module, batch: Pair) -> Tensor:
    x, y = batch
    return F.mse_loss(model(x), y)


@pytest.mark.parametrize("batched", [False, True])
def test_a_recomputed_step_replays_its_random_draws(batched: bool) -> None:
    """With dropout, the recursion's pullbacks kept as graphs or recomputed (replaying the
    step's draws) give the same meta gradient: every step sees one mask."""
    model = Dropping()
    loss = tm.TaskLoss(model, dropping_loss, [n for n, _ in model.named_parameters()])
    tasks = regression_tasks(2, torch.Generator().manual_seed(3))
    inner = tm.GradientDescent(STEPS, ALPHA)
    if batched:
        together = stacked(tasks)
        data = tm.TaskData([together.support] * STEPS, (), together.query)
        params = rows(loss.params(), 2)
    else:
        data = tm.TaskData([tasks[0].support] * STEPS, (), tasks[0].query)
        params = loss.params()
    results = []
    for keep_graphs in (True, False):
        torch.manual_seed(0)
        ops = tm.Ops(loss, inner, batched=batched, keep_graphs=keep_graphs)
        results.append(algorithms.recursion_meta_gradient(ops, params, data))
    kept, recomputed = results
    assert params_relative_error(recomputed.grads, kept.grads) < SAME
    torch.manual_seed(1)  # other masks: another meta gradient (the test can fail)
    other = algorithms.recursion_meta_gradient(
        tm.Ops(loss, inner, batched=batched, keep_graphs=True), params, data
    )
    assert params_relative_error(other.grads, kept.grads) > TIGHT
