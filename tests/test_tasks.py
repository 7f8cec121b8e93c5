"""Meta-batches: one kind of task, never empty, clear errors otherwise."""

from __future__ import annotations

import pytest
import torch

import torch_maml as tm
from tests.problems import RegressionSampler
from torch_maml.tasks import task_kind


def sq() -> tm.SupportQuery[torch.Tensor]:
    return tm.SupportQuery(torch.zeros(1), torch.ones(1))


def test_kinds_are_recognised() -> None:
    assert task_kind([sq(), sq()]) == "support-query"
    assert task_kind((RegressionSampler(1.0, 0.0),)) == "sampler"
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
