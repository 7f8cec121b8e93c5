"""locate_nonfinite: where a NaN or Inf first appears in a meta step, for its error.

Directly on an objective; the messages as users see them, in a NonFiniteError of the
optimizer, are in the bad-input table of tests/test_optimizer.py.
"""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch
from torch import Tensor, nn

import torch_maml as tm
from tests.problems import ALPHA, Pair, RegressionSampler, make_mlp, mse_loss, regression_tasks
from torch_maml.diagnosis import locate_nonfinite


def objective(loss_fn: tm.typing.LossFn[nn.Module, Pair] = mse_loss) -> tm.MetaObjective:
    model = make_mlp(0)
    loss = tm.TaskLoss(model, loss_fn, [n for n, _ in model.named_parameters()])
    return tm.MetaObjective(loss, tm.GradientDescent(3, ALPHA))


def scaled(task: tm.SupportQuery[Pair], support: float = 1.0, query: float = 1.0) -> Any:
    (xs, ys), (xq, yq) = task.support, task.query
    return tm.SupportQuery((xs, ys * support), (xq, yq * query))


TASKS = regression_tasks(3, torch.Generator().manual_seed(0))


def where(tasks: list[Any], loss_fn: tm.typing.LossFn[nn.Module, Pair] = mse_loss) -> str:
    target = objective(loss_fn)
    return locate_nonfinite(target, target.loss.params(), tasks)


def nan_gradient(model: nn.Module, batch: Pair) -> Tensor:
    """A finite loss whose gradient is NaN: d sqrt(0 * u)/du is inf * 0."""
    return mse_loss(model, batch) + (0 * next(model.parameters()).sum()).sqrt()


@pytest.mark.parametrize(
    ("tasks", "loss_fn", "expected"),
    [
        (TASKS, mse_loss, ""),
        (
            [TASKS[0], scaled(TASKS[1], support=math.nan)],
            mse_loss,
            "the support loss at inner step 0 of task 1 (nan)",
        ),
        (
            [TASKS[0], TASKS[1], scaled(TASKS[2], query=math.inf)],
            mse_loss,
            "the query loss of task 2 (inf)",
        ),
        (TASKS, nan_gradient, "the support-loss gradient at inner step 0 of task 0"),
    ],
    ids=["finite", "support", "query", "gradient"],
)
def test_the_first_non_finite_value_is_named(
    tasks: list[Any], loss_fn: tm.typing.LossFn[nn.Module, Pair], expected: str
) -> None:
    assert where(tasks, loss_fn) == expected


def test_a_later_inner_step_is_named() -> None:
    model = make_mlp(0)
    loss = tm.TaskLoss(model, mse_loss, [n for n, _ in model.named_parameters()])
    diverging = tm.MetaObjective(loss, tm.GradientDescent(3, 1e200))
    found = locate_nonfinite(diverging, loss.params(), TASKS[:1])
    assert found.startswith("the support loss at inner step 1 of task 0")


def test_sampler_draws_cannot_be_replayed() -> None:
    assert where([RegressionSampler(math.nan, 0.0)]) == ""
