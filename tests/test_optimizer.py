"""MetaOptimizer: torch.optim conventions, exact resume, adaptation, and bad input.

A meta step is ``w - beta G`` with G what ``meta_backward`` writes; the conventions of
torch.optim (param groups, schedulers, ``zero_grad``, any outer optimizer); resuming
from a ``state_dict`` (bitwise, also after a SIGKILL: an integration test running
tests/fault_run.py); ``adapt``. Then one table of bad input with the exact error each
gets, and the guarantee that a failed ``step`` or ``meta_backward`` leaves the model,
its gradients, the optimizer's state and its generator bitwise as they were; then
``nan_policy="skip"``, and a property-based check of that guarantee.
"""

from __future__ import annotations

import copy
import io
import math
import queue
import re
import shutil
import signal
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import Tensor, nn
from torch.func import functional_call

import torch_maml as tm
from tests.problems import (
    ALPHA,
    Pair,
    RegressionSampler,
    Switch,
    make_mlp,
    mse_by_hand,
    mse_loss,
    optimizer_state,
    regression_tasks,
    same,
    snapshot,
)

Optimizer = tm.MetaOptimizer[nn.Module, Pair]


def make_optimizer(
    model: nn.Module,
    estimator: tm.MetaGradientEstimator | None = None,
    step_size: tm.StepSizePolicy | None = None,
    steps: int = 2,
    seed: int = 0,
) -> Optimizer:
    return tm.MetaOptimizer(
        model,
        mse_loss,
        inner_loop=tm.GradientDescent(steps=steps, lr=ALPHA),
        estimator=estimator if estimator is not None else tm.FiniteSum(),
        step_size=step_size if step_size is not None else tm.Constant(0.05),
        generator=torch.Generator().manual_seed(seed),
    )


def assert_same(model: nn.Module, saved: dict[str, Tensor]) -> None:
    for name, p in model.named_parameters():
        assert torch.equal(p, saved[name]), name


def test_step_moves_the_weights_by_minus_beta_times_the_meta_gradient() -> None:
    tasks = regression_tasks(3, torch.Generator().manual_seed(0))
    model, twin = make_mlp(0), make_mlp(0)
    before = snapshot(model)
    info = make_optimizer(model, step_size=tm.Constant(0.05)).step(tasks)
    make_optimizer(twin).meta_backward(tasks)
    assert info.beta == 0.05
    for name, p in model.named_parameters():
        grad = dict(twin.named_parameters())[name].grad
        assert grad is not None
        assert p.grad is None  # step() leaves .grad alone
        torch.testing.assert_close(p.detach(), before[name] - 0.05 * grad, rtol=1e-15, atol=0)


def test_meta_backward_sums_into_existing_grads() -> None:
    tasks = regression_tasks(2, torch.Generator().manual_seed(1))
    model, twin = make_mlp(0), make_mlp(0)
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    before = snapshot(model)
    make_optimizer(model).meta_backward(tasks)
    make_optimizer(twin).meta_backward(tasks)
    assert_same(model, before)  # meta_backward never moves the weights
    for (name, p), q in zip(model.named_parameters(), twin.parameters(), strict=True):
        assert p.grad is not None
        assert q.grad is not None
        torch.testing.assert_close(p.grad, 1 + q.grad, rtol=1e-15, atol=0, msg=name)


def test_meta_backward_with_adam_trains() -> None:
    gen = torch.Generator().manual_seed(2)
    tasks = regression_tasks(4, gen)
    model = make_mlp(0, width=16)
    meta_opt = make_optimizer(model, steps=3)
    adam = torch.optim.Adam(model.parameters(), lr=0.01)
    losses = []
    for _ in range(40):
        adam.zero_grad()
        losses.append(float(meta_opt.meta_backward(tasks).loss))
        adam.step()
    assert losses[-1] < 0.5 * losses[0]


def test_step_lr_changes_the_step_actually_taken() -> None:
    tasks = regression_tasks(2, torch.Generator().manual_seed(3))
    model, twin = make_mlp(0), make_mlp(0)
    meta_opt = make_optimizer(model, step_size=tm.Constant(0.1))
    scheduler = torch.optim.lr_scheduler.StepLR(meta_opt, step_size=2, gamma=0.1)
    twin_opt = make_optimizer(twin)
    betas = []
    for _ in range(4):
        before = snapshot(model)
        info = meta_opt.step(tasks)
        scheduler.step()
        betas.append(info.beta)
        for p in twin.parameters():
            p.grad = None
        twin_opt.meta_backward(tasks)  # the meta gradient at the same weights
        for (name, p), q in zip(model.named_parameters(), twin.parameters(), strict=True):
            assert q.grad is not None
            torch.testing.assert_close(
                p.detach(), before[name] - info.beta * q.grad, rtol=1e-14, atol=0
            )
            q.data.copy_(p.detach())
    assert betas == pytest.approx([0.1, 0.1, 0.01, 0.01], rel=1e-15)


def sampler_tasks(seed: int) -> list[RegressionSampler]:
    gen = torch.Generator().manual_seed(seed)
    return [
        RegressionSampler(float(1 + 2 * torch.rand(1, generator=gen)), float(i)) for i in range(3)
    ]


def resampled_run(
    model: nn.Module, seed: int
) -> tuple[tm.MetaOptimizer[nn.Module, Pair], torch.optim.lr_scheduler.StepLR]:
    meta_opt = make_optimizer(
        model,
        estimator=tm.Resampled(inner_size=4, hessian_size=5, outer_size=6),
        step_size=tm.Constant(0.05),
        seed=seed,
    )
    return meta_opt, torch.optim.lr_scheduler.StepLR(meta_opt, step_size=2, gamma=0.5)


def test_resume_from_a_checkpoint_is_bitwise_identical() -> None:
    """Save at step 3, load into a fresh model and optimizer, continue: same weights."""
    tasks = sampler_tasks(4)
    model = make_mlp(0)
    meta_opt, scheduler = resampled_run(model, seed=10)
    for _ in range(6):
        meta_opt.step(tasks)
        scheduler.step()

    interrupted = make_mlp(0)
    first_opt, first_scheduler = resampled_run(interrupted, seed=10)
    for _ in range(3):
        first_opt.step(tasks)
        first_scheduler.step()
    buffer = io.BytesIO()
    torch.save(
        {
            "model": interrupted.state_dict(),
            "meta_opt": first_opt.state_dict(),
            "scheduler": first_scheduler.state_dict(),
        },
        buffer,
    )
    buffer.seek(0)
    checkpoint = torch.load(buffer, weights_only=True)

    resumed = make_mlp(99)  # other weights, other generator seed: all must come from the file
    resumed_opt, resumed_scheduler = resampled_run(resumed, seed=12345)
    resumed.load_state_dict(checkpoint["model"])
    resumed_scheduler.load_state_dict(checkpoint["scheduler"])
    resumed_opt.load_state_dict(checkpoint["meta_opt"])
    assert resumed_opt.meta_steps == 3
    for _ in range(3):
        resumed_opt.step(tasks)
        resumed_scheduler.step()

    assert_same(resumed, snapshot(model))
    assert resumed_opt.meta_steps == meta_opt.meta_steps == 6
    assert torch.equal(resumed_opt.generator.get_state(), meta_opt.generator.get_state())
    assert resumed_opt.param_groups[0]["lr"] == meta_opt.param_groups[0]["lr"]


def test_load_state_dict_refuses_another_configuration() -> None:
    saved = make_optimizer(make_mlp(0)).state_dict()
    other_estimator = make_optimizer(make_mlp(0), estimator=tm.Exact())
    with pytest.raises(
        ValueError, match="estimator: saved 'FiniteSum\\(\\)', this optimizer has 'Exact"
    ):
        other_estimator.load_state_dict(saved)
    other_model = make_optimizer(make_mlp(0, width=5))
    with pytest.raises(ValueError, match="another configuration: params: saved"):
        other_model.load_state_dict(saved)
    plain = torch.optim.SGD(make_mlp(0).parameters(), lr=0.1).state_dict()
    target = make_optimizer(make_mlp(0))
    generator_before = target.generator.get_state()
    with pytest.raises(ValueError, match=re.escape("(it has no ['meta'] entry)")):
        target.load_state_dict(plain)
    assert torch.equal(target.generator.get_state(), generator_before)


def test_adapt_runs_the_inner_loop_on_the_support_set() -> None:
    task = regression_tasks(1, torch.Generator().manual_seed(5))[0]
    model = make_mlp(0)
    meta_opt = make_optimizer(model, steps=2)
    for steps in (None, 4):
        adapted = meta_opt.adapt(task, steps=steps)
        w = [p.detach().clone().requires_grad_(True) for p in model.parameters()]
        for _ in range(2 if steps is None else steps):
            grads = torch.autograd.grad(mse_by_hand(w, task.support), w)
            w = [
                (p - ALPHA * g).detach().requires_grad_(True) for p, g in zip(w, grads, strict=True)
            ]
        for (name, _), expected in zip(model.named_parameters(), w, strict=True):
            torch.testing.assert_close(adapted[name], expected.detach(), rtol=1e-12, atol=1e-14)
            assert not adapted[name].requires_grad
    x, _ = task.query
    out = functional_call(model, adapted, (x,))
    assert out.shape == (x.shape[0], 1)


def test_adapt_on_a_sampler_draws_inner_batches() -> None:
    model = make_mlp(0)
    sampler = RegressionSampler(1.0, 0.5)
    resampled = make_optimizer(model, estimator=tm.Resampled(3, 4, 5))
    state = resampled.generator.get_state()
    own = torch.Generator().manual_seed(0)
    first = resampled.adapt(sampler, generator=own)
    assert torch.equal(resampled.generator.get_state(), state)  # its own generator was used
    second = resampled.adapt(sampler, generator=torch.Generator().manual_seed(0))
    for name in first:
        assert torch.equal(first[name], second[name])
    resampled.adapt(sampler)
    assert not torch.equal(resampled.generator.get_state(), state)
    finite_sum = make_optimizer(model)
    with pytest.raises(ValueError, match="needs 'inner_size'"):
        finite_sum.adapt(sampler)
    assert set(finite_sum.adapt(sampler, inner_size=3)) == {n for n, _ in model.named_parameters()}


def test_frozen_parameters_are_neither_adapted_nor_updated() -> None:
    tasks = regression_tasks(2, torch.Generator().manual_seed(6))
    model = make_mlp(0)
    first = model[0]
    assert isinstance(first, nn.Linear)
    first.bias.requires_grad_(False)
    frozen = first.bias.detach().clone()
    meta_opt = make_optimizer(model)
    meta_opt.step(tasks)
    assert torch.equal(first.bias, frozen)
    assert "0.bias" not in meta_opt.adapt(tasks[0])
    trainable = [first.weight, model[2].weight, model[2].bias]
    assert meta_opt.param_groups[0]["params"] == trainable


# ---------------------------------------------------------------- bad input, one step at a time


def _sq(x: Tensor, y: Tensor) -> tm.SupportQuery[Pair]:
    return tm.SupportQuery((x, y), (x, y))


def _good() -> list[tm.SupportQuery[Pair]]:
    return regression_tasks(2, torch.Generator().manual_seed(7))


def _with_nan() -> list[tm.SupportQuery[Pair]]:
    x = torch.ones(4, 1, dtype=torch.float64)
    return [_sq(x, torch.full((4, 1), float("nan"), dtype=torch.float64))]


def _with_inf_support() -> list[tm.SupportQuery[Pair]]:
    task = _good()[0]
    x, y = task.support
    return [tm.SupportQuery((x, y * float("inf")), task.query)]


def _non_scalar_loss(model: nn.Module, batch: Pair) -> Tensor:
    x, y = batch
    squares: Tensor = (model(x) - y) ** 2
    return squares


def _detached_loss(model: nn.Module, batch: Pair) -> Tensor:
    return mse_loss(model, batch).detach()


BAD_STEPS: list[tuple[str, Callable[[], Any], Any, type[Exception], str]] = [
    # name, tasks, estimator or loss_fn override, error, message pattern
    ("empty", lambda: [], None, ValueError, "'tasks' must hold at least one task"),
    ("not a sequence", lambda: _good()[0], None, TypeError, "'tasks' must be a sequence of tasks"),
    ("a closure", lambda: lambda: 0.0, None, TypeError, "not a loss closure"),
    (
        "mixed kinds",
        lambda: [_good()[0], RegressionSampler(1.0, 0.0)],
        None,
        TypeError,
        "mixes task kinds",
    ),
    (
        "FiniteSum given samplers",
        lambda: [RegressionSampler(1.0, 0.0)],
        tm.FiniteSum(),
        TypeError,
        "FiniteSum needs SupportQuery tasks",
    ),
    (
        "Resampled given SupportQuery",
        _good,
        tm.Resampled(2, 2, 2),
        TypeError,
        "Resampled needs tasks with a sample\\(size, generator\\) method",
    ),
    (
        "Exact on samplers without sizes",
        lambda: [RegressionSampler(1.0, 0.0)],
        tm.Exact(),
        ValueError,
        "Exact needs 'inner_size' and 'outer_size' for sampler tasks",
    ),
    (
        "non-scalar loss",
        _good,
        _non_scalar_loss,
        ValueError,
        "'loss_fn' must return a scalar Tensor \\(got a Tensor of shape \\(6, 1\\)\\)",
    ),
    (
        "loss without grad",
        _good,
        _detached_loss,
        ValueError,
        "does not depend on the adapted parameters",
    ),
    ("NaN loss", _with_nan, None, tm.NonFiniteError, "non-finite outer loss"),
    ("Inf in the support set", _with_inf_support, None, tm.NonFiniteError, "non-finite"),
]


@pytest.mark.parametrize(
    ("name", "tasks", "override", "error", "pattern"), BAD_STEPS, ids=[b[0] for b in BAD_STEPS]
)
@pytest.mark.parametrize("method", ["step", "meta_backward"])
def test_a_failed_step_raises_and_changes_nothing(
    name: str,
    tasks: Callable[[], Any],
    override: Any,
    error: type[Exception],
    pattern: str,
    method: str,
) -> None:
    model = make_mlp(0)
    meta_opt: tm.MetaOptimizer[nn.Module, Any]
    if callable(override) and not isinstance(override, tm.MetaGradientEstimator):
        meta_opt = tm.MetaOptimizer(
            model,
            override,
            inner_loop=tm.GradientDescent(steps=2, lr=ALPHA),
            estimator=tm.FiniteSum(),
            step_size=tm.Constant(0.05),
        )
    else:
        meta_opt = make_optimizer(model, estimator=override)
    before = snapshot(model)
    generator = meta_opt.generator.get_state()
    with pytest.raises(error, match=pattern):
        getattr(meta_opt, method)(tasks())
    assert_same(model, before)
    assert all(p.grad is None for p in model.parameters())
    assert torch.equal(meta_opt.generator.get_state(), generator)
    assert meta_opt.meta_steps == 0


def test_a_non_finite_step_size_changes_nothing() -> None:
    class Exploding:
        lr = 1.0

        def __call__(self, context: tm.StepContext) -> tm.StepSize:
            return tm.StepSize(beta=float("inf"))

    model = make_mlp(0)
    meta_opt = make_optimizer(model, step_size=Exploding())
    before = snapshot(model)
    with pytest.raises(tm.NonFiniteError, match="'step_size' returned beta=inf"):
        meta_opt.step(_good())
    assert_same(model, before)


def test_probe_tasks_must_match_the_tasks_kind() -> None:
    meta_opt = make_optimizer(make_mlp(0))
    with pytest.raises(TypeError, match="'probe_tasks' must be of the same kind"):
        meta_opt.step(_good(), probe_tasks=[RegressionSampler(1.0, 0.0)])
    with pytest.raises(ValueError, match="'probe_tasks' must hold at least one task"):
        meta_opt.step(_good(), probe_tasks=[])


class NoParams(nn.Module):
    def forward(self, x: Tensor) -> Tensor:
        return x


BAD_CONSTRUCTION: list[tuple[str, dict[str, Any], type[Exception], str]] = [
    (
        "model",
        {"model": "net"},
        TypeError,
        "'model' must be a torch.nn.Module \\(got an object of type str\\)",
    ),
    ("loss_fn", {"loss_fn": 3}, TypeError, "'loss_fn' must be callable"),
    (
        "inner_loop",
        {"inner_loop": object()},
        TypeError,
        "'inner_loop' must implement the InnerLoop protocol",
    ),
    (
        "estimator",
        {"estimator": tm.GradientDescent(1, 0.1)},
        TypeError,
        "'estimator' must implement the MetaGradientEstimator protocol "
        "\\(got an object of type GradientDescent\\)",
    ),
    (
        "step_size",
        {"step_size": 0.1},
        TypeError,
        "'step_size' must implement the StepSizePolicy protocol",
    ),
    ("generator", {"generator": 0}, TypeError, "'generator' must be a torch.Generator or None"),
    (
        "no trainable parameters",
        {"model": NoParams()},
        ValueError,
        "'model' has no trainable parameters",
    ),
    (
        "frozen model",
        {"model": make_mlp(0).requires_grad_(False)},
        ValueError,
        "'model' has no trainable",
    ),
]


@pytest.mark.parametrize(
    ("name", "changes", "error", "pattern"), BAD_CONSTRUCTION, ids=[b[0] for b in BAD_CONSTRUCTION]
)
def test_bad_construction_is_named(
    name: str, changes: dict[str, Any], error: type[Exception], pattern: str
) -> None:
    kwargs: dict[str, Any] = {
        "model": make_mlp(0),
        "loss_fn": mse_loss,
        "inner_loop": tm.GradientDescent(1, 0.1),
        "estimator": tm.FiniteSum(),
        "step_size": tm.Constant(0.1),
    }
    kwargs.update(changes)
    with pytest.raises(error, match=pattern):
        tm.MetaOptimizer(**kwargs)


def test_zero_grad_and_param_groups_follow_torch_optim() -> None:
    model = make_mlp(0)
    meta_opt = make_optimizer(model)
    meta_opt.meta_backward(_good())
    assert all(p.grad is not None for p in model.parameters())
    meta_opt.zero_grad()
    assert all(p.grad is None for p in model.parameters())
    assert isinstance(meta_opt, torch.optim.Optimizer)
    assert len(meta_opt.param_groups) == 1
    assert meta_opt.param_groups[0]["params"] == list(model.parameters())
    with pytest.raises(TypeError, match="MetaOptimizer has one parameter group"):
        meta_opt.add_param_group({"params": [torch.zeros(1, requires_grad=True)]})
    copy.deepcopy(meta_opt.state_dict())  # plain data, copyable


# ---------------------------------------------------------------- the model changes afterwards


def freeze_a_bias(model: nn.Module) -> None:
    model.get_parameter("0.bias").requires_grad_(False)


def replace_a_bias(model: nn.Module) -> None:
    layer = model.get_submodule("0")
    assert isinstance(layer, nn.Linear)
    layer.bias = nn.Parameter(layer.bias.detach().clone())


def add_a_parameter(model: nn.Module) -> None:
    model.register_parameter("extra", nn.Parameter(torch.zeros(2, dtype=torch.float64)))


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (freeze_a_bias, "the model's parameter '0.bias' was frozen (requires_grad=False) since"),
        (replace_a_bias, "the model's parameter '0.bias' was replaced since the MetaOptimizer"),
        (add_a_parameter, "the model has trainable parameters ['extra'] that it did not have"),
    ],
    ids=["frozen", "replaced", "added"],
)
def test_parameters_changed_after_construction_are_refused(
    change: Callable[[nn.Module], None], message: str
) -> None:
    """The optimizer's parameters are fixed when it is built: step, meta_backward and
    adapt refuse a model whose trainable parameters changed, and change nothing."""
    tasks = _good()
    model = make_mlp(0)
    meta_opt = make_optimizer(model)
    meta_opt.step(tasks)
    change(model)
    before = snapshot(model)
    state = meta_opt.state_dict()
    for call in (meta_opt.step, meta_opt.meta_backward, lambda t: meta_opt.adapt(t[0])):
        with pytest.raises(ValueError, match=re.escape(message)):
            call(tasks)
    assert_same(model, before)
    assert all(p.grad is None for p in model.parameters())
    assert same(meta_opt.state_dict(), state)


@pytest.mark.integration
def test_a_compiled_model_is_meta_learned_through_its_original_module() -> None:
    tasks = _good()
    model = make_mlp(0)
    with pytest.warns(
        tm.CompileWarning, match="'model' is a torch.compile\\(\\)d module"
    ) as record:
        compiled = make_optimizer(torch.compile(model))  # type: ignore[arg-type]
    (warning,) = [w for w in record if issubclass(w.category, tm.CompileWarning)]
    assert warning.filename == __file__
    assert compiled.model is model
    twin = make_mlp(0)
    make_optimizer(twin).step(tasks)
    compiled.step(tasks)
    assert_same(model, snapshot(twin))


def valid_state(edit: Callable[[dict[str, Any]], None]) -> dict[str, Any]:
    state = make_optimizer(make_mlp(0)).state_dict()
    edit(state)
    return state


@pytest.mark.parametrize(
    ("state", "message"),
    [
        (
            ["not", "a", "dict"],
            "'state_dict' must be a dict from MetaOptimizer.state_dict() (got "
            "an object of type list)",
        ),
        (
            valid_state(lambda s: s["meta"].pop("config")),
            "'state_dict[\"meta\"]' has no ['config'] entry",
        ),
        (
            valid_state(lambda s: s["meta"].update(meta_steps=-1)),
            '\'state_dict["meta"]["meta_steps"]\' must be an int >= 0 (got -1)',
        ),
        (
            valid_state(lambda s: s["meta"].update(generator="seed")),
            '\'state_dict["meta"]["generator"]\' is not a generator state',
        ),
        (
            valid_state(lambda s: s["param_groups"][0].update(lr=math.nan)),
            '\'state_dict["param_groups"][0]["lr"]\' must be a finite number (got nan)',
        ),
        (
            valid_state(lambda s: s["param_groups"].append(dict(s["param_groups"][0]))),
            "'state_dict[\"param_groups\"]' must hold one group of 4 parameters",
        ),
    ],
    ids=["not a dict", "no config", "negative count", "bad generator", "NaN lr", "two groups"],
)
def test_a_damaged_state_dict_is_refused_and_changes_nothing(state: Any, message: str) -> None:
    target = make_optimizer(make_mlp(0))
    target.step(_good())
    before = target.state_dict()
    with pytest.raises(ValueError, match=re.escape(message)):
        target.load_state_dict(state)
    assert same(target.state_dict(), before)


# ---------------------------------------------------------------- bad input, one table


TASKS = regression_tasks(3, torch.Generator().manual_seed(0))
NAN = float("nan")


def build(
    loss: Callable[[nn.Module, Pair], Tensor] = mse_loss,
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


def with_query(task: tm.SupportQuery[Pair], scale: float) -> Any:
    x, y = task.query
    return tm.SupportQuery(task.support, (x, y * scale))


def with_support(task: tm.SupportQuery[Pair], scale: float) -> Any:
    x, y = task.support
    return tm.SupportQuery((x, y * scale), task.query)


def nan_gradient_loss(model: nn.Module, batch: Pair) -> Tensor:
    """A finite loss whose gradient is NaN: d sqrt(0 * u)/du is inf * 0."""
    first = next(model.parameters())
    return mse_loss(model, batch) + (0 * first.sum()).sqrt()


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
        r"'state_dict' must come from MetaOptimizer.state_dict() (it has no ['param_groups', "
        r"'meta'] entry)",
    ),
]


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_bad_input_gets_its_error(case: Case) -> None:
    with pytest.raises(case.error, match=re.escape(case.message)):
        case.call()


def non_scalar(model: nn.Module, batch: Pair) -> Tensor:
    x, y = batch
    out: Tensor = (model(x) - y) ** 2
    return out


FAILING_STEPS: list[tuple[str, Callable[[Optimizer], object], dict[str, Any]]] = [
    ("non-scalar loss", lambda o: o.step(TASKS), {"loss": Switch(non_scalar, on=True)}),
    ("NaN support", lambda o: o.step([TASKS[0], with_support(TASKS[1], NAN)]), {}),
    ("NaN gradient", lambda o: o.step(TASKS), {"loss": Switch(nan_gradient_loss, on=True)}),
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
    before = optimizer_state(optimizer)
    with pytest.raises((ValueError, TypeError, tm.NonFiniteError)):
        fail(optimizer)
    assert same(optimizer_state(optimizer), before)


# ---------------------------------------------------------------- nan_policy="skip"


SKIPPABLE = FAILING_STEPS[1:5] + FAILING_STEPS[9:]


@pytest.mark.parametrize(("name", "fail", "options"), SKIPPABLE, ids=[f[0] for f in SKIPPABLE])
def test_skip_policy_skips_non_finite_steps(
    name: str, fail: Callable[[Optimizer], Any], options: dict[str, Any]
) -> None:
    optimizer = build(nan_policy="skip", **options)
    before = optimizer_state(optimizer)
    info = fail(optimizer)
    assert info.skipped
    after = optimizer_state(optimizer)
    assert same(after[:3], before[:3])  # weights, gradients, buffers untouched
    assert optimizer.skipped_steps == 1
    assert optimizer.meta_steps == 0
    if isinstance(info, tm.MetaStepInfo):
        assert info.beta == 0.0
        if name == "NaN beta":  # the policy runs first: no meta gradient was computed
            assert (info.grad_evals, info.hvp_evals) == (0, 0)
        else:
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


# ---------------------------------------------------------------- any input


@st.composite
def anything(draw: st.DrawFn) -> dict[str, Any]:
    """A model, a meta-batch (maybe ragged, maybe non-finite) and optimizer options."""
    dtype = draw(st.sampled_from([torch.float32, torch.float64]))
    seed = draw(st.integers(0, 2**16))
    features, width = draw(st.integers(1, 3)), draw(st.integers(1, 5))
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(features, width), nn.Tanh(), nn.Linear(width, 1)).to(dtype)
    poison = draw(st.sampled_from([None, float("nan"), float("inf")]))
    ragged = draw(st.booleans())

    def batch(n: int) -> tuple[torch.Tensor, torch.Tensor]:
        x = torch.randn(n, features, generator=gen, dtype=dtype)
        return x, torch.randn(n, 1, generator=gen, dtype=dtype)

    tasks = []
    for i in range(draw(st.integers(1, 4))):
        support = batch(draw(st.integers(1, 4)) if ragged else 3)
        query = batch(3)
        if poison is not None and i == 0 and draw(st.booleans()):
            query = (query[0], query[1] * poison)
        tasks.append(tm.SupportQuery(support, query))
    return {
        "model": model,
        "tasks": tasks,
        "steps": draw(st.integers(1, 4)),
        "alpha": draw(st.sampled_from([1e-3, 0.1, 1.0, 1e30])),
        "estimator": draw(st.sampled_from([tm.FiniteSum(), tm.Exact()])),
        "chunk": draw(st.sampled_from(["auto", None, 1, 2])),
        "adapted": draw(st.sampled_from([None, ["2"], ["0.weight"]])),
        "nan_policy": draw(st.sampled_from(["raise", "skip"])),
    }


@settings(max_examples=40, deadline=None)
@given(anything())
def test_a_step_succeeds_or_raises_a_documented_error_and_changes_nothing(
    case: dict[str, Any],
) -> None:
    model: nn.Module = case["model"]
    meta_opt = tm.MetaOptimizer(
        model,
        mse_loss,
        inner_loop=tm.GradientDescent(steps=case["steps"], lr=case["alpha"]),
        estimator=case["estimator"],
        step_size=tm.Constant(0.01),
        task_chunk_size=case["chunk"],
        adapted=case["adapted"],
        nan_policy=case["nan_policy"],
    )
    before = [p.detach().clone() for p in model.parameters()]
    try:
        info = meta_opt.step(case["tasks"])
    except tm.NonFiniteError:
        assert case["nan_policy"] == "raise"
        changed = False
    else:
        assert info.skipped or bool(torch.isfinite(info.loss))
        changed = not info.skipped
        assert all(bool(torch.isfinite(p).all()) for p in model.parameters()) or not changed
    for p, old in zip(model.parameters(), before, strict=True):
        assert p.dtype == old.dtype
        if not changed:
            assert torch.equal(p, old)


# ---------------------------------------------------------------- a killed run resumes
#
# Fault tolerance: a run killed mid-training and resumed from its checkpoint.
#
# The training script is ``tests/fault_run.py``, run in real subprocesses. A run is killed
# by SIGKILL after its checkpoint of step KILL_AFTER; resumed from that checkpoint (model,
# MetaOptimizer, Adam, StepLR and the script's task generator), it must end with bitwise
# the same weights as an uninterrupted run, which runs alongside the killed one. Resumed
# without the MetaOptimizer's state (whose generator draws the Resampled estimator's
# batches), it must not: the comparison can fail.
#
# Each process spends about 2.5 s importing torch and torch._dynamo, and 0.1 s training.


ROOT = Path(__file__).resolve().parent.parent
FAULT_STEPS = 8
KILL_AFTER = 3
TIMEOUT = 120.0


def command(checkpoint: Path, *flags: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "tests.fault_run",
        "--checkpoint",
        str(checkpoint),
        "--steps",
        str(FAULT_STEPS),
        *flags,
    ]


def step_lines(first: int) -> list[str]:
    return [f"step {k}" for k in range(first, FAULT_STEPS + 1)] + ["done"]


def run_to_end(checkpoint: Path, *flags: str) -> list[str]:
    """Run the script to completion; its stdout lines."""
    done = subprocess.run(
        command(checkpoint, *flags),
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout.splitlines()


def final_weights(checkpoint: Path) -> dict[str, Tensor]:
    weights: dict[str, Tensor] = torch.load(f"{checkpoint}.final", weights_only=True)
    return weights


def checkpoint_step(checkpoint: Path) -> int:
    state: dict[str, Any] = torch.load(checkpoint, weights_only=True)
    return int(state["step"])


def read_lines(stream: IO[str], lines: queue.Queue[str | None]) -> None:
    for line in stream:
        lines.put(line.rstrip("\n"))
    lines.put(None)


def run_and_kill(checkpoint: Path, stderr: IO[str]) -> None:
    """Run the script, SIGKILL it once it prints ``step KILL_AFTER``, check it died of it."""
    with subprocess.Popen(
        command(checkpoint, "--sleep", "1"),
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=stderr,
        text=True,
    ) as proc:
        assert proc.stdout is not None
        lines: queue.Queue[str | None] = queue.Queue()
        reader = threading.Thread(target=read_lines, args=(proc.stdout, lines), daemon=True)
        reader.start()
        try:
            seen: list[str] = []
            while not seen or seen[-1] != f"step {KILL_AFTER}":
                line = lines.get(timeout=TIMEOUT)
                assert line is not None, f"the run ended before it was killed: {seen}"
                seen.append(line)
            proc.send_signal(signal.SIGKILL)
            proc.wait(timeout=TIMEOUT)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait(timeout=TIMEOUT)
            reader.join(timeout=TIMEOUT)
    stderr.seek(0)
    assert proc.returncode == -signal.SIGKILL, stderr.read()


class Resumed:
    """A resume of a copy of the killed run's checkpoint, started at once."""

    def __init__(self, killed: Path, checkpoint: Path, *flags: str) -> None:
        shutil.copyfile(killed, checkpoint)
        self.checkpoint = checkpoint
        self.proc = subprocess.Popen(
            command(checkpoint, "--resume", *flags),
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )

    def finish(self) -> tuple[list[str], dict[str, Tensor]]:
        """Wait for it: its stdout lines and final weights."""
        stdout, stderr = self.proc.communicate(timeout=TIMEOUT)
        assert self.proc.returncode == 0, stdout + stderr
        return stdout.splitlines(), final_weights(self.checkpoint)


class Runs:
    """An uninterrupted run and a killed one, side by side; then two resumes of the latter.

    The uninterrupted run goes alongside the killed one, and the two resumes (one
    faithful, one without the MetaOptimizer's state) alongside each other: two
    processes at a time, most of each spent importing torch.
    """

    def __init__(self, tmp: Path) -> None:
        reference = tmp / "uninterrupted.pt"
        uninterrupted = subprocess.Popen(
            command(reference),
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        self.killed = tmp / "killed.pt"
        try:
            with open(tmp / "killed.stderr", "w+") as stderr:
                run_and_kill(self.killed, stderr)
        except BaseException:
            uninterrupted.kill()
            uninterrupted.communicate(timeout=TIMEOUT)
            raise
        stdout, err = uninterrupted.communicate(timeout=TIMEOUT)
        assert uninterrupted.returncode == 0, stdout + err
        assert stdout.splitlines() == step_lines(1), stdout + err
        self.reference = final_weights(reference)
        self.killed_at = checkpoint_step(self.killed)
        self.killed_finished = Path(f"{self.killed}.final").exists()
        resumes = [
            Resumed(self.killed, tmp / "resumed.pt"),
            Resumed(self.killed, tmp / "forgetful.pt", "--forget-meta-state"),
        ]
        try:
            self.resumed = resumes[0].finish()
            self.forgetful = resumes[1].finish()
        finally:
            for resume in resumes:
                if resume.proc.poll() is None:
                    resume.proc.kill()
                resume.proc.communicate(timeout=TIMEOUT)


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Runs]:
    tmp = tmp_path_factory.mktemp("faults")
    try:
        yield Runs(tmp)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


@pytest.mark.integration
def test_killed_run_resumes_to_bitwise_the_same_weights(runs: Runs) -> None:
    assert not runs.killed_finished
    assert KILL_AFTER <= runs.killed_at < FAULT_STEPS

    lines, weights = runs.resumed
    assert lines == step_lines(runs.killed_at + 1)
    assert weights.keys() == runs.reference.keys()
    for name, tensor in runs.reference.items():
        assert torch.equal(weights[name], tensor), name


@pytest.mark.integration
def test_resuming_without_the_meta_optimizer_state_diverges(runs: Runs) -> None:
    lines, weights = runs.forgetful
    assert lines == step_lines(runs.killed_at + 1)
    assert weights.keys() == runs.reference.keys()
    assert not all(torch.equal(weights[name], t) for name, t in runs.reference.items())
