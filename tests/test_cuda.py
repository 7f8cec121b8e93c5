"""On a CUDA device: the same meta gradients as the CPU reference, weights kept on the device.

Skipped where no CUDA device is present (CI has none); run on a GPU machine with
``python -m pytest tests/test_cuda.py``.
"""

from __future__ import annotations

import warnings
from typing import Any

import pytest
import torch
import torch._dynamo
from torch import Tensor, nn

import torch_maml as tm
from tests.problems import (
    make_mlp,
    mse_loss,
    params_relative_error,
    reference_meta_gradient,
    regression_tasks,
)

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")

ALPHA, STEPS, TASKS = 0.1, 4, 6


def to_cuda(
    tasks: list[tm.SupportQuery[tuple[Tensor, Tensor]]],
) -> list[tm.SupportQuery[tuple[Tensor, Tensor]]]:
    def move(batch: tuple[Tensor, Tensor]) -> tuple[Tensor, Tensor]:
        return batch[0].cuda(), batch[1].cuda()

    return [tm.SupportQuery(move(t.support), move(t.query)) for t in tasks]


def meta_optimizer(
    model: nn.Module, estimator: tm.MetaGradientEstimator, **options: Any
) -> tm.MetaOptimizer[nn.Module, tuple[Tensor, Tensor]]:
    return tm.MetaOptimizer(
        model,
        mse_loss,
        inner_loop=tm.GradientDescent(steps=STEPS, lr=ALPHA),
        estimator=estimator,
        step_size=tm.Constant(0.05),
        **options,
    )


@pytest.mark.parametrize("estimator", [tm.FiniteSum(), tm.Exact()], ids=["FiniteSum", "Exact"])
@pytest.mark.parametrize("chunk", ["auto", None, 1, 4], ids=str)
@pytest.mark.parametrize("stacked", [False, True], ids=["list", "stacked"])
def test_cuda_meta_gradient_equals_cpu_reference(
    estimator: tm.MetaGradientEstimator, chunk: tm.batching.ChunkSize, stacked: bool
) -> None:
    cpu_tasks = regression_tasks(TASKS, torch.Generator().manual_seed(0))
    model = make_mlp(seed=1)
    expected = reference_meta_gradient(model, cpu_tasks, STEPS, ALPHA)
    model.cuda()
    tasks: Any = to_cuda(cpu_tasks)
    if stacked:
        tasks = tm.StackedTasks.stack(tasks)
    optimizer = meta_optimizer(model, estimator, task_chunk_size=chunk)
    optimizer.meta_backward(tasks)
    grads = {n: p.grad.cpu() for n, p in model.named_parameters() if p.grad is not None}
    assert all(p.device.type == "cuda" and p.dtype == torch.float64 for p in model.parameters())
    assert params_relative_error(grads, expected) < 1e-10


def test_cuda_step_keeps_device_and_dtype_and_adapts_on_device() -> None:
    model = make_mlp(seed=2).float().cuda()
    tasks = to_cuda(regression_tasks(TASKS, torch.Generator().manual_seed(3)))
    tasks = [
        tm.SupportQuery(
            (t.support[0].float(), t.support[1].float()), (t.query[0].float(), t.query[1].float())
        )
        for t in tasks
    ]
    optimizer = meta_optimizer(model, tm.FiniteSum())
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    info = optimizer.step(tasks)
    assert torch.isfinite(info.loss)
    for name, p in model.named_parameters():
        assert p.device.type == "cuda"
        assert p.dtype == torch.float32
        assert not torch.equal(p, before[name])
    adapted = optimizer.adapt(tasks[0])
    assert all(w.device.type == "cuda" and w.dtype == torch.float32 for w in adapted.values())


def test_cuda_compiled_equals_eager_without_fallback() -> None:
    torch._dynamo.reset()
    tasks = tm.StackedTasks.stack(
        to_cuda(regression_tasks(TASKS, torch.Generator().manual_seed(4)))
    )
    results = []
    for compile in (False, True):
        model = make_mlp(seed=5).cuda()
        optimizer = meta_optimizer(model, tm.FiniteSum(), task_chunk_size=None, compile=compile)
        with warnings.catch_warnings():
            warnings.simplefilter("error", tm.errors.CompileWarning)
            for _ in range(2):
                optimizer.zero_grad()
                optimizer.meta_backward(tasks)
        results.append({n: p.grad.cpu() for n, p in model.named_parameters() if p.grad is not None})
    torch._dynamo.reset()
    assert params_relative_error(results[1], results[0]) < 1e-10
