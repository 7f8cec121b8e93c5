"""Tasks and meta-batches: one kind of task, never empty, stacked or not, clear errors.

And the data each task hands the estimators (:func:`tm.support_query_data`): the
support set at every inner step, the query set outside, a stacked meta-batch kept
stacked.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch

import torch_maml as tm
from tests.problems import RegressionSampler
from torch_maml.tasks import stack_batches, task_kind


def sq() -> tm.SupportQuery[torch.Tensor]:
    return tm.SupportQuery(torch.zeros(1), torch.ones(1))


def test_kinds_are_recognised() -> None:
    assert task_kind([sq(), sq()]) == "support-query"
    assert task_kind((RegressionSampler(1.0, 0.0),)) == "sampler"
    assert task_kind(tm.StackedTasks(torch.zeros(2, 3), torch.zeros(2, 1))) == "support-query"
    assert isinstance(RegressionSampler(1.0, 0.0), tm.Sampler)


@pytest.mark.parametrize(
    ("tasks", "error", "pattern"),
    [
        ([], ValueError, "'tasks' must hold at least one task \\(got an empty meta-batch\\)"),
        (
            sq(),
            TypeError,
            "'tasks' must be a sequence of tasks .* \\(got an object of type SupportQuery\\)",
        ),
        ("abc", TypeError, "'tasks' must be a sequence of tasks"),
        (
            [sq(), 3],
            TypeError,
            "'tasks\\[1\\]' must be a SupportQuery or have a sample\\(size, generator\\) method "
            "\\(got an object of type int\\)",
        ),
        (
            [sq(), RegressionSampler(1.0, 0.0)],
            TypeError,
            "'tasks' mixes task kinds: 'tasks\\[0\\]' is a support-query task "
            "but 'tasks\\[1\\]' is a sampler task",
        ),
    ],
)
def test_bad_meta_batches_are_named(tasks: object, error: type[Exception], pattern: str) -> None:
    with pytest.raises(error, match=pattern):
        task_kind(tasks)


def test_support_query_holds_any_batch() -> None:
    task = tm.SupportQuery(support={"x": torch.zeros(2)}, query={"x": torch.ones(3)})
    assert task.support["x"].shape == (2,)
    with pytest.raises(AttributeError):
        task.support = {}  # type: ignore[misc]


# ---------------------------------------------------------------- stacked tasks


def test_stacked_tasks_are_a_sequence_of_support_query_tasks() -> None:
    x, y = torch.randn(6, 8, 2), torch.randn(6, 8, 1)
    tasks = tm.StackedTasks(
        support={"x": x[:, :3], "y": y[:, :3]}, query={"x": x[:, 3:], "y": y[:, 3:]}
    )
    assert len(tasks) == 6
    third = tasks[2]
    assert isinstance(third, tm.SupportQuery)
    assert torch.equal(third.support["x"], x[2, :3])
    assert torch.equal(tasks[-1].query["y"], y[5, 3:])
    part = tasks[1:4]
    assert isinstance(part, tm.StackedTasks)
    assert len(part) == 3
    assert torch.equal(part[0].support["y"], y[1, :3])
    assert [t.support["x"].shape for t in tasks] == [torch.Size([3, 2])] * 6
    with pytest.raises(IndexError, match="task index 6 out of range for 6 tasks"):
        tasks[6]
    restacked = tm.StackedTasks.stack(list(tasks))
    assert torch.equal(restacked.query["x"], x[:, 3:])


@pytest.mark.parametrize(
    ("support", "query", "error", "pattern"),
    [
        (torch.zeros(3, 2), torch.zeros(4, 2), ValueError, "same leading \\(task\\) dimension"),
        (torch.zeros(0, 2), torch.zeros(0, 2), ValueError, "at least one task \\(got 0\\)"),
        (torch.zeros(()), torch.zeros(3), TypeError, "a 0-dimensional Tensor"),
        ((torch.zeros(3), 1.0), torch.zeros(3), TypeError, "got an object of type float"),
        ((), torch.zeros(3), ValueError, "'support' must hold at least one tensor"),
    ],
)
def test_bad_stacked_tasks_are_named(
    support: Any, query: Any, error: type[Exception], pattern: str
) -> None:
    with pytest.raises(error, match=pattern):
        tm.StackedTasks(support, query)


def test_stack_refuses_tasks_that_differ() -> None:
    tasks = [
        tm.SupportQuery(torch.zeros(3), torch.zeros(2)),
        tm.SupportQuery(torch.zeros(4), torch.zeros(2)),
    ]
    with pytest.raises(ValueError, match="cannot be stacked"):
        tm.StackedTasks.stack(tasks)
    with pytest.raises(TypeError, match="takes SupportQuery tasks"):
        tm.StackedTasks.stack([RegressionSampler(1.0, 0.0)])  # type: ignore[arg-type]


def test_batches_stack_leaf_by_leaf_only_when_everything_matches() -> None:
    a = {"x": torch.zeros(2, 3), "y": torch.ones(2)}
    b = {"x": torch.ones(2, 3), "y": torch.zeros(2)}
    stacked = stack_batches([a, b])
    assert stacked is not None
    assert stacked["x"].shape == (2, 2, 3)
    assert torch.equal(stacked["y"][1], b["y"])
    assert stack_batches([a, {"x": torch.zeros(2, 4), "y": torch.ones(2)}]) is None  # shape
    assert stack_batches([a, {"x": torch.zeros(2, 3), "y": torch.ones(2).double()}]) is None
    assert stack_batches([a, {"x": torch.zeros(2, 3)}]) is None  # structure
    assert stack_batches([(torch.zeros(1), "tag"), (torch.zeros(1), "tag")]) is None  # not tensors


# ---------------------------------------------------------------- the data of each term


def test_support_query_data_uses_the_support_at_every_step() -> None:
    x = torch.randn(3, 5, 1)
    listed = [tm.SupportQuery((x[i, :2],), (x[i, 2:],)) for i in range(3)]
    data = tm.support_query_data(listed, 4)
    assert isinstance(data, list)
    assert len(data) == 3
    for task, item in zip(listed, data, strict=True):
        assert len(item.inner) == 4
        assert all(batch is task.support for batch in item.inner)
        assert len(item.hessian) == 0  # each step's Hessian on its own batch
        assert item.outer is task.query

    stacked = tm.StackedTasks((x[:, :2],), (x[:, 2:],))
    together = tm.support_query_data(stacked, 4)
    assert isinstance(together, tm.StackedTaskData)
    assert together.tasks == 3
    assert all(batch is stacked.support for batch in together.data.inner)  # nothing copied
    assert together.data.outer is stacked.query


def test_support_query_data_refuses_samplers_and_empty_batches() -> None:
    with pytest.raises(TypeError, match="need SupportQuery tasks"):
        tm.support_query_data([RegressionSampler(1.0, 0.0)], 2)
    empty = tm.SupportQuery((torch.zeros(0, 1),), (torch.zeros(3, 1),))
    mixed: list[Any] = [sq(), empty]
    with pytest.raises(
        ValueError, match=r"'tasks\[1\].support' holds an empty tensor \(shape \(0, 1\)\)"
    ):
        tm.support_query_data(mixed, 2)
    with pytest.raises(ValueError, match=r"'tasks.query' holds an empty tensor"):
        tm.support_query_data(tm.StackedTasks(torch.zeros(2, 3), torch.zeros(2, 0)), 2)
