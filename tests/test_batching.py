"""Vectorised meta-batches: every path gives the per-task loop's result (float64)."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch import Tensor, nn

import torch_maml as tm
from tests.problems import (
    RegressionSampler,
    make_mlp,
    mse_loss,
    params_relative_error,
    reference_meta_gradient,
    regression_tasks,
)
from torch_maml import batching
from torch_maml.batching import TaskFootprint, chunk_sizes, plan_chunk_size

ALPHA, STEPS, TASKS = 0.1, 3, 5
CHUNKS: list[tm.batching.ChunkSize] = [1, 2, 3, None, "auto"]


def meta_gradient(
    estimator: tm.MetaGradientEstimator, tasks: Any, chunk: tm.batching.ChunkSize
) -> tuple[tm.typing.Params, tm.MetaBackwardInfo]:
    model = make_mlp(0)
    meta_opt = tm.MetaOptimizer(
        model,
        mse_loss,
        inner_loop=tm.GradientDescent(steps=STEPS, lr=ALPHA),
        estimator=estimator,
        step_size=tm.Constant(0.1),
        generator=torch.Generator().manual_seed(0),
        task_chunk_size=chunk,
    )
    info = meta_opt.meta_backward(tasks)
    grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    return grads, info


def support_query_tasks() -> list[tm.SupportQuery[tuple[Tensor, Tensor]]]:
    return regression_tasks(TASKS, torch.Generator().manual_seed(1))


def sampler_tasks() -> list[RegressionSampler]:
    return [RegressionSampler(1.0 + 0.3 * i, 0.2 * i) for i in range(TASKS)]


CASES: list[tuple[str, tm.MetaGradientEstimator, Any]] = [
    ("Exact", tm.Exact(), support_query_tasks),
    ("FiniteSum", tm.FiniteSum(), support_query_tasks),
    ("Resampled", tm.Resampled(3, 4, 5), sampler_tasks),
    ("Exact on samplers", tm.Exact(inner_size=3, outer_size=5), sampler_tasks),
]


@pytest.mark.parametrize(("name", "estimator", "tasks"), CASES, ids=[c[0] for c in CASES])
def test_loop_vmap_and_chunked_paths_agree(
    name: str, estimator: tm.MetaGradientEstimator, tasks: Any
) -> None:
    """Task by task (torch.autograd), all at once and in chunks (torch.func.vmap): 1e-12."""
    loop, loop_info = meta_gradient(estimator, tasks(), 1)
    for chunk in CHUNKS[1:]:
        grads, info = meta_gradient(estimator, tasks(), chunk)
        assert params_relative_error(grads, loop) < 1e-12, chunk
        assert torch.allclose(info.loss, loop_info.loss, rtol=1e-12, atol=0)
        assert (info.grad_evals, info.hvp_evals) == (loop_info.grad_evals, loop_info.hvp_evals)
    if name in ("Exact", "FiniteSum"):  # and against torch.autograd written out by hand
        reference = reference_meta_gradient(make_mlp(0), support_query_tasks(), STEPS, ALPHA)
        assert params_relative_error(loop, reference) < 1e-12


@pytest.mark.parametrize("estimator", [tm.Exact(), tm.FiniteSum()], ids=["Exact", "FiniteSum"])
@pytest.mark.parametrize("chunk", CHUNKS)
def test_stacked_tasks_give_the_same_meta_gradient(
    estimator: tm.MetaGradientEstimator, chunk: tm.batching.ChunkSize
) -> None:
    listed = support_query_tasks()
    expected, expected_info = meta_gradient(estimator, listed, 1)
    grads, info = meta_gradient(estimator, tm.StackedTasks.stack(listed), chunk)
    assert params_relative_error(grads, expected) < 1e-12
    assert (info.grad_evals, info.hvp_evals) == (expected_info.grad_evals, expected_info.hvp_evals)


def test_tasks_that_do_not_stack_run_one_by_one() -> None:
    """Support sets of different sizes cannot be stacked: the loop path takes them."""
    gen = torch.Generator().manual_seed(2)
    tasks = regression_tasks(2, gen, support=4) + regression_tasks(2, gen, support=7)
    reference = reference_meta_gradient(make_mlp(0), tasks, STEPS, ALPHA)
    for chunk in CHUNKS:
        grads, info = meta_gradient(tm.FiniteSum(), tasks, chunk)
        assert params_relative_error(grads, reference) < 1e-12
        assert info.hvp_evals == len(tasks) * STEPS


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


@pytest.mark.parametrize(
    ("tasks", "largest", "expected"),
    [(25, 8, [7, 6, 6, 6]), (8, 8, [8]), (5, 1, [1] * 5), (9, 4, [3, 3, 3]), (1, 4, [1])],
)
def test_chunks_are_even_and_bounded(tasks: int, largest: int, expected: list[int]) -> None:
    sizes = chunk_sizes(tasks, largest)
    assert sizes == expected
    assert sum(sizes) == tasks
    assert max(sizes) <= largest


MIB = 2**20


@pytest.mark.parametrize(
    ("setting", "footprint", "expected"),
    [
        (None, None, 25),
        (4, None, 4),
        (100, None, 25),
        ("auto", TaskFootprint(activations=1000, total=MIB, on_cpu=True), 25),
        ("auto", TaskFootprint(activations=1000, total=20 * MIB, on_cpu=False), 12),
        ("auto", TaskFootprint(activations=1000, total=200 * MIB, on_cpu=False), 4),
        ("auto", TaskFootprint(activations=2 * MIB, total=20 * MIB, on_cpu=True), 1),
        ("auto", TaskFootprint(activations=2 * MIB, total=20 * MIB, on_cpu=False), 12),
    ],
)
def test_auto_chunk_size_bounds_memory(
    setting: tm.batching.ChunkSize, footprint: TaskFootprint | None, expected: int
) -> None:
    chunk = plan_chunk_size(setting, 25, footprint)
    assert chunk == expected
    if setting == "auto" and footprint is not None:
        assert chunk * footprint.total <= max(4 * footprint.total, 256 * MIB)


class Wide(nn.Module):
    """A layer whose activations are easy to count: a (batch, 1000) float64 output."""

    def __init__(self) -> None:
        super().__init__()
        self.layer = nn.Linear(4, 1000).double()

    def forward(self, x: Tensor) -> Tensor:
        out: Tensor = self.layer(x)
        return out


def wide_loss(model: nn.Module, batch: tuple[Tensor, Tensor]) -> Tensor:
    x, y = batch
    loss: Tensor = ((model(x) - y) ** 2).mean()
    return loss


def test_footprint_counts_saved_activations_once_per_shape() -> None:
    model = Wide()
    meta_opt = tm.MetaOptimizer(
        model,
        wide_loss,
        inner_loop=tm.GradientDescent(steps=2, lr=0.01),
        estimator=tm.FiniteSum(),
        step_size=tm.Constant(0.1),
    )
    objective = meta_opt.objective
    params = objective.loss.params()

    def footprint(rows: int, method: batching.Method = "recursion") -> TaskFootprint:
        x = torch.randn(rows, 4, dtype=torch.float64)
        y = torch.zeros(rows, 1000, dtype=torch.float64)
        sample = batching.TaskData([(x, y)] * 2, [(x, y)] * 2, (x, y))
        return objective.footprint(params, sample, False, method)

    small, large = footprint(10), footprint(20)
    # The (rows, 1000) output minus target is saved for the square's backward: 8 bytes each.
    assert small.activations == 10 * 1000 * 8
    assert large.activations == 2 * small.activations
    parameters = (4 * 1000 + 1000) * 8
    assert small.total == 3 * small.activations + (2 + 2) * parameters
    assert footprint(10, "unrolled").total == (2 * 2 + 3) * small.activations + 4 * parameters
    assert footprint(10) is small  # measured once per shape, then cached
