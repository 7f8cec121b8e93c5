"""Bad input, one table: each case gets its exact error type and message, and a failed
``step`` or ``meta_backward`` leaves the model, its gradients, the optimizer's state and
its generator bitwise as they were. Then ``nan_policy="skip"``.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pytest
import torch
from torch import Tensor, nn

import torch_maml as tm
from tests.problems import RegressionSampler, make_mlp, mse_loss, regression_tasks

Optimizer = tm.MetaOptimizer[nn.Module, tuple[Tensor, Tensor]]
TASKS = regression_tasks(3, torch.Generator().manual_seed(0))
NAN = float("nan")


def build(
    loss: Callable[[nn.Module, tuple[Tensor, Tensor]], Tensor] = mse_loss,
    inner: tm.InnerLoop | None = None,
    estimator: tm.MetaGradientEstimator | None = None,
    step_size: tm.StepSizePolicy | None = None,
    **options: Any,
) -> Optimizer:
    return tm.MetaOptimizer(
        make_mlp(0),
        loss,
        inner_loop=inner if inner is not None else tm.GradientDescent(steps=2, lr=0.1),
        estimator=estimator if estimator is not None else tm.FiniteSum(),
        step_size=step_size if step_size is not None else tm.Constant(0.1),
        generator=torch.Generator().manual_seed(1),
        **options,
    )


def with_query(task: tm.SupportQuery[tuple[Tensor, Tensor]], scale: float) -> Any:
    x, y = task.query
    return tm.SupportQuery(task.support, (x, y * scale))


def with_support(task: tm.SupportQuery[tuple[Tensor, Tensor]], scale: float) -> Any:
    x, y = task.support
    return tm.SupportQuery((x, y * scale), task.query)


def nan_gradient_loss(model: nn.Module, batch: tuple[Tensor, Tensor]) -> Tensor:
    """A finite loss whose gradient is NaN: d sqrt(0 * u)/du is inf * 0."""
    first = next(model.parameters())
    return mse_loss(model, batch) + (0 * first.sum()).sqrt()


class Switch:
    """A loss closure that turns into ``bad`` once switched on: good history first."""

    def __init__(self, bad: Callable[[nn.Module, tuple[Tensor, Tensor]], Tensor]) -> None:
        self.bad, self.on = bad, True

    def __call__(self, model: nn.Module, batch: tuple[Tensor, Tensor]) -> Tensor:
        return self.bad(model, batch) if self.on else mse_loss(model, batch)


class NanBeta:
    """A step-size policy that returns NaN (when switched on): the outer step is bad."""

    lr = 0.1

    def __init__(self) -> None:
        self.on = True

    def __call__(self, context: tm.StepContext) -> tm.StepSize:
        return tm.StepSize(beta=NAN if self.on else self.lr)


@dataclass
class Case:
    name: str
    call: Callable[[], object]
    error: type[Exception]
    message: str


def step(
    optimizer: Optimizer | None = None, tasks: Any = TASKS, **options: Any
) -> Callable[[], object]:
    return lambda: (optimizer or build(**options)).step(tasks)


NOT_A_MODULE: Any = print  # a callable, not an nn.Module
SAMPLERS = [RegressionSampler(1.0, 0.0), RegressionSampler(2.0, 1.0)]
MISMATCHED = (
    (torch.zeros(3, 4, 1), torch.zeros(3, 4, 1)),
    (torch.zeros(2, 5, 1), torch.zeros(2, 5, 1)),
)

CASES = [
    # the loss closure
    Case(
        "non-scalar loss",
        step(loss=lambda m, b: (m(b[0]) - b[1]) ** 2),
        ValueError,
        r"'loss_fn' must return a scalar Tensor (got a Tensor of shape (6, 1)); reduce it",
    ),
    Case(
        "loss that is not a tensor",
        step(loss=lambda m, b: 1.0),
        TypeError,
        r"'loss_fn' must return a scalar Tensor (got an object of type float)",
    ),
    Case(
        "integer loss",
        step(loss=lambda m, b: torch.tensor(1)),
        TypeError,
        r"'loss_fn' must return a floating point Tensor (got dtype torch.int64)",
    ),
    Case(
        "loss without grad",
        step(loss=lambda m, b: mse_loss(m, b).detach()),
        ValueError,
        r"'loss_fn' returned a loss that does not depend on the adapted parameters",
    ),
    # non-finite values, and where they first appear
    Case(
        "NaN support loss at inner step 0",
        step(tasks=[TASKS[0], with_support(TASKS[1], NAN)]),
        tm.NonFiniteError,
        r"non-finite outer loss (loss=nan); it first appears in the support loss at inner "
        r"step 0 of task 1 (nan); no weights were changed",
    ),
    Case(
        "Inf support loss at a later inner step",
        step(inner=tm.GradientDescent(steps=3, lr=1e200)),
        tm.NonFiniteError,
        r"it first appears in the support loss at inner step 1 of task 0 (inf)",
    ),
    Case(
        "NaN gradient with a finite loss",
        step(loss=nan_gradient_loss),
        tm.NonFiniteError,
        r"it first appears in the support-loss gradient at inner step 0 of task 0",
    ),
    Case(
        "Inf query loss",
        step(tasks=[TASKS[0], TASKS[1], with_query(TASKS[2], math.inf)]),
        tm.NonFiniteError,
        r"non-finite outer loss (loss=inf); it first appears in the query loss of task 2 (inf)",
    ),
    Case(
        "NaN outer step size",
        step(step_size=NanBeta()),
        tm.NonFiniteError,
        r"'step_size' returned beta=nan: it must be a finite number > 0; no weights were changed",
    ),
    Case(
        "NaN in meta_backward",
        lambda: build().meta_backward([with_query(TASKS[0], NAN)]),
        tm.NonFiniteError,
        r"it first appears in the query loss of task 0 (nan)",
    ),
    # meta-batches
    Case(
        "empty meta-batch",
        step(tasks=[]),
        ValueError,
        r"'tasks' must hold at least one task (got an empty meta-batch)",
    ),
    Case(
        "not a sequence",
        step(tasks=5),
        TypeError,
        r"'tasks' must be a sequence of tasks (SupportQuery or samplers) "
        r"(got an object of type int)",
    ),
    Case(
        "not tasks",
        step(tasks=[1, 2]),
        TypeError,
        r"'tasks[0]' must be a SupportQuery or have a sample(size, generator) method",
    ),
    Case(
        "tasks of mixed kinds",
        step(tasks=[TASKS[0], SAMPLERS[0]]),
        TypeError,
        r"'tasks' mixes task kinds: 'tasks[0]' is a support-query task but 'tasks[1]' is a "
        r"sampler task",
    ),
    Case(
        "stacked tasks of mismatched shapes",
        lambda: tm.StackedTasks(*MISMATCHED),
        ValueError,
        r"StackedTasks: all tensors must have the same leading (task) dimension (got sizes [2, 3])",
    ),
    Case(
        "a closure instead of tasks",
        step(tasks=lambda: 0.0),
        TypeError,
        r"MetaOptimizer takes a meta-batch of tasks, not a loss closure",
    ),
    # estimators and tasks that do not go together
    Case(
        "Resampled given tasks without sample",
        step(estimator=tm.Resampled(2, 2, 2)),
        TypeError,
        r"Resampled needs tasks with a sample(size, generator) method; 'tasks' holds "
        r"SupportQuery tasks",
    ),
    Case(
        "FiniteSum given tasks without support/query",
        step(tasks=SAMPLERS),
        TypeError,
        r"FiniteSum needs SupportQuery tasks (a support and a query set); 'tasks' holds samplers",
    ),
    # components and the model
    Case(
        "steps < 1",
        lambda: tm.GradientDescent(steps=0, lr=0.1),
        ValueError,
        r"'steps' must be a positive int (got 0)",
    ),
    Case(
        "steps not an int",
        lambda: tm.GradientDescent(steps=2.5, lr=0.1),  # type: ignore[arg-type]
        TypeError,
        r"'steps' must be a positive int (got 2.5)",
    ),
    Case(
        "inner lr <= 0",
        lambda: tm.GradientDescent(steps=1, lr=0.0),
        ValueError,
        r"'lr' must be a finite number > 0 (got 0.0)",
    ),
    Case(
        "inner lr NaN",
        lambda: tm.GradientDescent(steps=1, lr=NAN),
        ValueError,
        r"'lr' must be a finite number > 0 (got nan)",
    ),
    Case(
        "outer lr <= 0",
        lambda: tm.Constant(-1.0),
        ValueError,
        r"'lr' must be a finite number > 0 (got -1.0)",
    ),
    Case(
        "model with no trainable parameters",
        lambda: tm.MetaOptimizer(
            nn.Linear(1, 1).requires_grad_(False),
            mse_loss,
            inner_loop=tm.GradientDescent(steps=1, lr=0.1),
            estimator=tm.FiniteSum(),
            step_size=tm.Constant(0.1),
        ),
        ValueError,
        r"'model' has no trainable parameters (none with requires_grad=True)",
    ),
    Case(
        "not a model",
        lambda: tm.MetaOptimizer(
            NOT_A_MODULE,
            mse_loss,
            inner_loop=tm.GradientDescent(steps=1, lr=0.1),
            estimator=tm.FiniteSum(),
            step_size=tm.Constant(0.1),
        ),
        TypeError,
        r"'model' must be a torch.nn.Module (got an object of type builtin_function_or_method)",
    ),
    Case(
        "unknown nan_policy",
        lambda: build(nan_policy="ignore"),
        ValueError,
        r"'nan_policy' must be 'raise' or 'skip' (got 'ignore')",
    ),
    Case(
        "distributed without a process group",
        lambda: build(distributed=True),
        ValueError,
        r"'distributed' needs torch.distributed to be initialised first",
    ),
    Case(
        "load_state_dict from another configuration",
        lambda: build().load_state_dict(build(estimator=tm.Exact()).state_dict()),
        ValueError,
        r"'state_dict' comes from a MetaOptimizer of another configuration: estimator: saved "
        r"'Exact(inner_size=None, outer_size=None)', this optimizer has 'FiniteSum()'",
    ),
    Case(
        "load_state_dict of something else",
        lambda: build().load_state_dict({"state": {}}),
        ValueError,
        r"'state_dict' must come from MetaOptimizer.state_dict() (it has no 'meta' entry)",
    ),
]


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_bad_input_gets_its_error(case: Case) -> None:
    with pytest.raises(case.error, match=re.escape(case.message)):
        case.call()


def snapshot(optimizer: Optimizer) -> list[Any]:
    model = optimizer.model
    return [
        {n: p.detach().clone() for n, p in model.named_parameters()},
        {n: None if p.grad is None else p.grad.clone() for n, p in model.named_parameters()},
        {n: b.clone() for n, b in model.named_buffers()},
        optimizer.state_dict(),
        optimizer.generator.get_state(),
        optimizer.meta_steps,
        optimizer.skipped_steps,
    ]


def same(a: Any, b: Any) -> bool:
    if isinstance(a, Tensor):
        return isinstance(b, Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b, strict=True))
    return bool(a == b)


def non_scalar(model: nn.Module, batch: tuple[Tensor, Tensor]) -> Tensor:
    x, y = batch
    out: Tensor = (model(x) - y) ** 2
    return out


FAILING_STEPS: list[tuple[str, Callable[[Optimizer], object], dict[str, Any]]] = [
    ("non-scalar loss", lambda o: o.step(TASKS), {"loss": Switch(non_scalar)}),
    ("NaN support", lambda o: o.step([TASKS[0], with_support(TASKS[1], NAN)]), {}),
    ("NaN gradient", lambda o: o.step(TASKS), {"loss": Switch(nan_gradient_loss)}),
    ("Inf query", lambda o: o.step([with_query(TASKS[0], math.inf)]), {}),
    ("NaN beta", lambda o: o.step(TASKS), {"step_size": NanBeta()}),
    ("empty", lambda o: o.step([]), {}),
    ("mixed kinds", lambda o: o.step([TASKS[0], SAMPLERS[0]]), {}),
    ("samplers to FiniteSum", lambda o: o.step(SAMPLERS), {}),
    ("SupportQuery to Resampled", lambda o: o.step(TASKS), {"estimator": tm.Resampled(2, 2, 2)}),
    ("NaN in meta_backward", lambda o: o.meta_backward([with_query(TASKS[0], NAN)]), {}),
    (
        "NaN samples in Resampled",
        lambda o: o.step([RegressionSampler(NAN, 0.0)]),
        {"estimator": tm.Resampled(3, 3, 3)},
    ),
    (
        "NaN probe gradients",
        lambda o: o.step([TASKS[0]], probe_tasks=[with_query(TASKS[1], NAN)]),
        {"step_size": tm.SmoothnessAdaptive(L=1.0, rho=1.0, c_beta=4.0)},
    ),
]


@pytest.mark.parametrize(
    ("name", "fail", "options"), FAILING_STEPS, ids=[f[0] for f in FAILING_STEPS]
)
def test_failed_step_changes_nothing(
    name: str, fail: Callable[[Optimizer], object], options: dict[str, Any]
) -> None:
    switches = [o for o in options.values() if hasattr(o, "on")]
    for switch in switches:
        switch.on = False
    optimizer = build(**options)
    good = SAMPLERS if isinstance(optimizer.estimator, tm.Resampled) else TASKS
    optimizer.step(good)  # some history: a step count, a generator that has moved
    optimizer.meta_backward(good)  # and gradients to be left alone
    for switch in switches:
        switch.on = True
    before = snapshot(optimizer)
    with pytest.raises((ValueError, TypeError, tm.NonFiniteError)):
        fail(optimizer)
    assert same(snapshot(optimizer), before)


# ---------------------------------------------------------------- nan_policy="skip"


SKIPPABLE = FAILING_STEPS[1:5] + FAILING_STEPS[9:]


@pytest.mark.parametrize(("name", "fail", "options"), SKIPPABLE, ids=[f[0] for f in SKIPPABLE])
def test_skip_policy_skips_non_finite_steps(
    name: str, fail: Callable[[Optimizer], Any], options: dict[str, Any]
) -> None:
    optimizer = build(nan_policy="skip", **options)
    before = snapshot(optimizer)
    info = fail(optimizer)
    assert info.skipped
    after = snapshot(optimizer)
    assert same(after[:3], before[:3])  # weights, gradients, buffers untouched
    assert optimizer.skipped_steps == 1
    assert optimizer.meta_steps == 0
    if isinstance(info, tm.MetaStepInfo):
        assert info.beta == 0.0
        assert info.grad_evals > 0


def test_skip_policy_then_trains_on_and_resumes_its_count() -> None:
    optimizer = build(nan_policy="skip")
    assert optimizer.step([with_query(TASKS[0], NAN)]).skipped
    info = optimizer.step(TASKS)
    assert not info.skipped
    assert info.beta == 0.1
    assert (optimizer.meta_steps, optimizer.skipped_steps) == (1, 1)
    resumed = build(nan_policy="skip")
    resumed.load_state_dict(optimizer.state_dict())
    assert (resumed.meta_steps, resumed.skipped_steps) == (1, 1)


def test_raise_policy_is_the_default() -> None:
    assert build().nan_policy == "raise"
