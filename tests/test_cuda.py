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
    estimator: tm.MetaGradientEstimator, chunk: tm.execution.ChunkSize, stacked: bool
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


# ------------------------------------------------------------- captured steps (CUDA graphs)


def float_tasks(seed: int, tasks: int = TASKS, shift: int = 0) -> Any:
    """Stacked float32 regression tasks on the GPU (support of 8 + shift points)."""
    cpu = regression_tasks(tasks, torch.Generator().manual_seed(seed), support=8 + shift, query=10)
    stacked = tm.StackedTasks.stack(to_cuda(cpu))
    return tm.StackedTasks(
        tuple(t.float() for t in stacked.support), tuple(t.float() for t in stacked.query)
    )


def weights(model: nn.Module) -> list[Tensor]:
    return [p.detach().clone() for p in model.parameters()]


@pytest.mark.parametrize(
    "estimator",
    [tm.FiniteSum(), tm.Exact(), tm.FirstOrder(), tm.Reptile(), tm.HessianFree(5e-3)],
    ids=["FiniteSum", "Exact", "FirstOrder", "Reptile", "HessianFree"],
)
def test_captured_steps_equal_eager_steps_bitwise(estimator: tm.MetaGradientEstimator) -> None:
    """Step 1 eager, step 2 captured and replayed, steps 3-5 replayed: bitwise eager."""
    batches = [float_tasks(seed) for seed in range(5)]
    results, infos = [], []
    for capture in (False, True):
        model = make_mlp(seed=6).float().cuda()
        optimizer = meta_optimizer(model, estimator, capture=capture)
        infos.append([optimizer.step(tasks) for tasks in batches])
        results.append(weights(model))
        if capture:
            assert optimizer.cuda_graphs.captures == 1  # one signature, captured once
    for eager, captured in zip(results[0], results[1], strict=True):
        assert torch.equal(eager, captured)
    for eager_info, captured_info in zip(*infos, strict=True):
        assert torch.equal(eager_info.loss, captured_info.loss)
        assert eager_info[1:] == captured_info[1:]


def test_new_shapes_are_captured_once_each_and_graphs_are_bounded() -> None:
    model = make_mlp(seed=7).float().cuda()
    optimizer = meta_optimizer(model, tm.FiniteSum(), capture=True)
    shapes = list(range(tm.execution.CAPTURE_BOUND + 2))
    for _ in range(2):  # each signature: eager the first time, captured the second
        for shift in shapes:
            optimizer.step(float_tasks(shift, shift=shift))
    assert optimizer.cuda_graphs.captures == len(shapes)
    assert optimizer.cuda_graphs.graphs == tm.execution.CAPTURE_BOUND


def test_replaced_parameter_storage_is_recaptured_never_stale() -> None:
    tasks = float_tasks(8)
    twin, model = make_mlp(seed=9).float().cuda(), make_mlp(seed=9).float().cuda()
    eager = meta_optimizer(twin, tm.FiniteSum(), capture=False)
    captured = meta_optimizer(model, tm.FiniteSum(), capture=True)
    for _ in range(3):
        eager.step(tasks)
        captured.step(tasks)
    with torch.no_grad():  # new storage for every parameter, same objects (as .to() does)
        for p in model.parameters():
            p.data = p.data.clone()
    for _ in range(3):
        eager.step(tasks)
        captured.step(tasks)
    assert captured.cuda_graphs.captures == 2
    for a, b in zip(weights(twin), weights(model), strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize("policy", ["raise", "skip"])
def test_a_captured_step_that_meets_a_nan_changes_nothing(policy: str) -> None:
    tasks = float_tasks(10)
    model = make_mlp(seed=11).float().cuda()
    optimizer = meta_optimizer(model, tm.FiniteSum(), capture=True, nan_policy=policy)
    for _ in range(3):
        optimizer.step(tasks)  # the third step replays the graph
    before = weights(model)
    poisoned = tm.StackedTasks(
        (tasks.support[0], tasks.support[1].clone().fill_(float("nan"))), tasks.query
    )
    if policy == "raise":
        with pytest.raises(tm.NonFiniteError, match="non-finite"):
            optimizer.step(poisoned)
    else:
        assert optimizer.step(poisoned).skipped
    assert optimizer.cuda_graphs.captures == 1  # the poisoned step replayed the graph
    for a, b in zip(before, weights(model), strict=True):
        assert torch.equal(a, b)
    optimizer.step(tasks)  # and training goes on
    assert not torch.equal(before[0], weights(model)[0])


def test_captured_meta_backward_with_adam_equals_eager() -> None:
    batches = [float_tasks(seed) for seed in range(12, 16)]
    results = []
    for capture in (False, True):
        model = make_mlp(seed=13).float().cuda()
        optimizer = meta_optimizer(model, tm.FiniteSum(), capture=capture)
        adam = torch.optim.Adam(model.parameters(), lr=1e-3)
        for tasks in batches:
            adam.zero_grad()
            optimizer.meta_backward(tasks)
            adam.step()
        results.append(weights(model))
    for eager, captured in zip(*results, strict=True):
        assert torch.equal(eager, captured)


def test_samplers_run_eagerly_with_one_notice_and_capture_true_refuses() -> None:
    from tests.problems import RegressionSampler

    class OnCuda:
        def __init__(self, sampler: RegressionSampler) -> None:
            self.sampler = sampler

        def sample(self, size: int, generator: torch.Generator | None = None) -> Any:
            x, y = self.sampler.sample(size, generator)
            return x.cuda(), y.cuda()

    samplers = [OnCuda(RegressionSampler(1.0 + 0.3 * i, 0.2 * i)) for i in range(3)]
    model = make_mlp(seed=14).cuda()
    optimizer = meta_optimizer(model, tm.Resampled(3, 4, 5))
    with pytest.warns(tm.CaptureWarning, match="sampler tasks"):
        optimizer.step(samplers)
    with warnings.catch_warnings():
        warnings.simplefilter("error", tm.CaptureWarning)
        optimizer.step(samplers)  # one notice per reason
    forced = meta_optimizer(make_mlp(seed=14).cuda(), tm.Resampled(3, 4, 5), capture=True)
    with pytest.raises(ValueError, match="capture=True, but"):
        forced.step(samplers)
