"""MetaOptimizer: torch.optim conventions, exact resume, adaptation, and bad input."""

from __future__ import annotations

import copy
import io
from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch import Tensor, nn
from torch.func import functional_call

import torch_maml as tm
from tests.problems import (
    RegressionSampler,
    make_mlp,
    mse_by_hand,
    mse_loss,
    regression_tasks,
)

ALPHA = 0.1


def make_optimizer(
    model: nn.Module,
    estimator: tm.MetaGradientEstimator | None = None,
    step_size: tm.StepSizePolicy | None = None,
    steps: int = 2,
    seed: int = 0,
) -> tm.MetaOptimizer[nn.Module, tuple[Tensor, Tensor]]:
    return tm.MetaOptimizer(
        model,
        mse_loss,
        inner_loop=tm.GradientDescent(steps=steps, lr=ALPHA),
        estimator=estimator if estimator is not None else tm.FiniteSum(),
        step_size=step_size if step_size is not None else tm.Constant(0.05),
        generator=torch.Generator().manual_seed(seed),
    )


def snapshot(model: nn.Module) -> dict[str, Tensor]:
    return {name: p.detach().clone() for name, p in model.named_parameters()}


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
) -> tuple[tm.MetaOptimizer[nn.Module, tuple[Tensor, Tensor]], torch.optim.lr_scheduler.StepLR]:
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
    with pytest.raises(ValueError, match="no 'meta' entry"):
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


# ---------------------------------------------------------------- bad input


def _sq(x: Tensor, y: Tensor) -> tm.SupportQuery[tuple[Tensor, Tensor]]:
    return tm.SupportQuery((x, y), (x, y))


def _good() -> list[tm.SupportQuery[tuple[Tensor, Tensor]]]:
    return regression_tasks(2, torch.Generator().manual_seed(7))


def _with_nan() -> list[tm.SupportQuery[tuple[Tensor, Tensor]]]:
    x = torch.ones(4, 1, dtype=torch.float64)
    return [_sq(x, torch.full((4, 1), float("nan"), dtype=torch.float64))]


def _with_inf_support() -> list[tm.SupportQuery[tuple[Tensor, Tensor]]]:
    task = _good()[0]
    x, y = task.support
    return [tm.SupportQuery((x, y * float("inf")), task.query)]


def _non_scalar_loss(model: nn.Module, batch: tuple[Tensor, Tensor]) -> Tensor:
    x, y = batch
    squares: Tensor = (model(x) - y) ** 2
    return squares


def _detached_loss(model: nn.Module, batch: tuple[Tensor, Tensor]) -> Tensor:
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
