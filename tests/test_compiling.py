"""compile=True: the same results, compiled once, per optimizer, with an eager fallback.

One test compiles with inductor, the real backend (about 20 s on 2 cores); the
others use dynamo's "eager" backend, which exercises the same capture, guards and
caches without generating code.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from typing import Any

import pytest
import torch
import torch._dynamo
from torch import Tensor, nn
from torch._dynamo.utils import counters

import torch_maml as tm
from tests.problems import make_mlp, mse_loss, params_relative_error, regression_tasks

ALPHA, STEPS = 0.1, 3


@pytest.fixture(autouse=True)
def fresh_dynamo() -> Iterator[None]:
    torch._dynamo.reset()
    counters.clear()
    yield
    torch._dynamo.reset()


def graphs() -> int:
    return int(counters["stats"]["unique_graphs"])


def stacked_tasks(seed: int, tasks: int = 4) -> tm.StackedTasks[tuple[Tensor, Tensor]]:
    return tm.StackedTasks.stack(regression_tasks(tasks, torch.Generator().manual_seed(seed)))


def make(
    model: nn.Module,
    compile: bool | dict[str, Any],
    estimator: tm.MetaGradientEstimator | None = None,
    loss_fn: Any = mse_loss,
) -> tm.MetaOptimizer[nn.Module, tuple[Tensor, Tensor]]:
    return tm.MetaOptimizer(
        model,
        loss_fn,
        inner_loop=tm.GradientDescent(steps=STEPS, lr=ALPHA),
        estimator=estimator if estimator is not None else tm.FiniteSum(),
        step_size=tm.Constant(0.05),
        task_chunk_size=None,
        compile=compile,
    )


def grads_of(model: nn.Module) -> tm.typing.Params:
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_inductor_matches_eager_and_never_recompiles() -> None:
    eager_model, compiled_model = make_mlp(0), make_mlp(0)
    eager, compiled = make(eager_model, False), make(compiled_model, True)
    for step in range(3):  # new data each step, same shapes
        tasks = stacked_tasks(step)
        eager.zero_grad()
        compiled.zero_grad()
        expected = eager.meta_backward(tasks)
        info = compiled.meta_backward(tasks)
        assert params_relative_error(grads_of(compiled_model), grads_of(eager_model)) < 1e-12
        assert torch.allclose(info.loss, expected.loss, rtol=1e-12, atol=0)
        if step == 0:
            after_first = graphs()
            assert after_first == 1  # the whole recursion, its steps in scan loops
    assert graphs() == after_first
    assert not counters["recompiles"]


@pytest.mark.parametrize("steps", [2, 6])
def test_the_graphs_do_not_depend_on_the_number_of_inner_steps(steps: int) -> None:
    model = make_mlp(0)
    meta_opt = tm.MetaOptimizer(
        model,
        mse_loss,
        inner_loop=tm.GradientDescent(steps=steps, lr=ALPHA),
        estimator=tm.FiniteSum(),
        step_size=tm.Constant(0.05),
        task_chunk_size=None,
        compile={"backend": "eager"},
    )
    meta_opt.step(stacked_tasks(0))
    meta_opt.step(stacked_tasks(1))
    assert graphs() == 1


def test_ten_optimizers_on_different_models_all_stay_compiled() -> None:
    """Each optimizer has its own compile cache: no recompile limit, no eager fallback."""
    optimizers = []
    for i in range(10):
        torch.manual_seed(i)
        width = 4 + i
        model = nn.Sequential(nn.Linear(1, width), nn.Tanh(), nn.Linear(width, 1)).double()
        optimizers.append(make(model, {"backend": "eager"}))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a CompileWarning (eager fallback) would fail here
        for meta_opt in optimizers:
            meta_opt.step(stacked_tasks(0))
        assert graphs() == 10
        for meta_opt in optimizers:
            meta_opt.step(stacked_tasks(1))
        assert graphs() == 10
    assert not counters["recompiles"]


def breaking_loss(model: nn.Module, batch: tuple[Tensor, Tensor]) -> Tensor:
    torch._dynamo.graph_break()  # something dynamo cannot put in one graph
    return mse_loss(model, batch)


def test_a_model_the_compiler_cannot_handle_falls_back_with_one_warning() -> None:
    eager_model, model = make_mlp(0), make_mlp(0)
    eager = make(eager_model, False)
    meta_opt = make(model, {"backend": "eager"}, loss_fn=breaking_loss)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        for seed in range(2):
            tasks = stacked_tasks(seed)
            eager.zero_grad()
            meta_opt.zero_grad()
            eager.meta_backward(tasks)
            meta_opt.meta_backward(tasks)
            assert params_relative_error(grads_of(model), grads_of(eager_model)) < 1e-12
    fallbacks = [w for w in record if issubclass(w.category, tm.CompileWarning)]
    assert len(fallbacks) == 1
    assert "runs eagerly from now on" in str(fallbacks[0].message)


def test_bad_input_under_compile_is_the_usual_error_without_warning() -> None:
    def non_scalar(model: nn.Module, batch: tuple[Tensor, Tensor]) -> Tensor:
        x, y = batch
        squares: Tensor = (model(x) - y) ** 2
        return squares

    meta_opt = make(make_mlp(0), {"backend": "eager"}, loss_fn=non_scalar)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(ValueError, match="'loss_fn' must return a scalar Tensor"):
            meta_opt.step(stacked_tasks(0))


def test_exact_compiles_its_unrolled_gradient() -> None:
    eager_model, model = make_mlp(0), make_mlp(0)
    tasks = stacked_tasks(3)
    make(eager_model, False, tm.Exact()).meta_backward(tasks)
    make(model, {"backend": "eager"}, tm.Exact()).meta_backward(tasks)
    assert params_relative_error(grads_of(model), grads_of(eager_model)) < 1e-12
    assert graphs() == 1


@pytest.mark.parametrize("value", ["yes", 1, None])
def test_compile_argument_is_checked(value: Any) -> None:
    with pytest.raises(TypeError, match="'compile' must be a bool or a dict"):
        make(make_mlp(0), value)


def test_resampled_and_a_stateful_inner_loop_compile_to_the_same_result() -> None:
    """Per-step batches (scanned over) and an inner state (carried): compiled == eager."""
    from tests.problems import RegressionSampler
    from tests.typing_cases.user_components import HeavyBall

    samplers = [RegressionSampler(1.0 + 0.5 * i, 0.3 * i) for i in range(3)]
    for inner_loop in (tm.GradientDescent(steps=STEPS, lr=ALPHA), HeavyBall(STEPS, ALPHA, 0.9)):
        results = []
        for compile in (False, {"backend": "eager"}):
            model = make_mlp(0)
            meta_opt = tm.MetaOptimizer(
                model,
                mse_loss,
                inner_loop=inner_loop,
                estimator=tm.Resampled(4, 5, 6),
                step_size=tm.Constant(0.05),
                generator=torch.Generator().manual_seed(0),
                task_chunk_size=None,
                compile=compile,
            )
            with warnings.catch_warnings():
                warnings.simplefilter("error")
                meta_opt.meta_backward(samplers)
            results.append(grads_of(model))
        assert params_relative_error(results[1], results[0]) < 1e-12
