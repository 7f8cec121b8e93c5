"""Momentum, Adam and Meta-SGD: meta gradients against hand-written unrolled loops.

Every reference here is independent of torch_maml: the inner loops are written out
by hand on lists of tensors (the MLP and its loss by ``tests.problems.mse_by_hand``),
differentiated with ``torch.autograd.grad(create_graph=True)``, or given in closed
form on quadratics. Gradients are float64 and compared at 1e-10 relative.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import pytest
import torch
from torch import Tensor, nn

import torch_maml as tm
from tests.problems import (
    Quadratic,
    RegressionSampler,
    Vector,
    make_mlp,
    meta_objective,
    mse_by_hand,
    mse_loss,
    params_relative_error,
    quadratic_loss,
    random_quadratic,
    random_spd,
    regression_tasks,
    relative_error,
)
from torch_maml.functional import TaskLoss, loss_grad, task_ops
from torch_maml.inner import AdamState

Pair = tuple[Tensor, Tensor]
State = list[Tensor]
HandInit = Callable[[list[Tensor]], State]
HandStep = Callable[
    [int, list[Tensor], Sequence[Tensor], State, list[Tensor]], tuple[list[Tensor], State]
]
"""``(j, w_j, g_j, s_j, step sizes) -> (w_{j+1}, s_{j+1})`` on lists of tensors."""

STEPS = 3
TIGHT = 1e-10


# ---------------------------------------------------------------- hand-written inner loops


def momentum_by_hand(lr: float, mu: float, nesterov: bool) -> tuple[HandInit, HandStep]:
    def init(w: list[Tensor]) -> State:
        return [torch.zeros_like(p) for p in w]

    def step(
        j: int, w: list[Tensor], g: Sequence[Tensor], b: State, a: list[Tensor]
    ) -> tuple[list[Tensor], State]:
        b = [mu * bi + gi for bi, gi in zip(b, g, strict=True)]
        d = [gi + mu * bi for gi, bi in zip(g, b, strict=True)] if nesterov else b
        return [p - lr * di for p, di in zip(w, d, strict=True)], b

    return init, step


def adam_by_hand(
    lr: float,
    betas: tuple[float, float],
    eps: float,
    sqrt: Callable[[Tensor], Tensor] = torch.sqrt,
) -> tuple[HandInit, HandStep]:
    b1, b2 = betas

    def init(w: list[Tensor]) -> State:
        return [torch.zeros_like(p) for p in w] + [torch.zeros_like(p) for p in w]

    def step(
        j: int, w: list[Tensor], g: Sequence[Tensor], state: State, a: list[Tensor]
    ) -> tuple[list[Tensor], State]:
        n = len(w)
        m = [b1 * mi + (1 - b1) * gi for mi, gi in zip(state[:n], g, strict=True)]
        v = [b2 * vi + (1 - b2) * gi * gi for vi, gi in zip(state[n:], g, strict=True)]
        t = j + 1
        new = [
            p - lr * (mi / (1 - b1**t)) / (sqrt(vi / (1 - b2**t)) + eps)
            for p, mi, vi in zip(w, m, v, strict=True)
        ]
        return new, m + v

    return init, step


def meta_sgd_by_hand() -> tuple[HandInit, HandStep]:
    def init(w: list[Tensor]) -> State:
        return []

    def step(
        j: int, w: list[Tensor], g: Sequence[Tensor], state: State, a: list[Tensor]
    ) -> tuple[list[Tensor], State]:
        return [p - ai * gi for p, ai, gi in zip(w, a, g, strict=True)], state

    return init, step


HandTask = tuple[list[Pair], list[Pair], Pair]
"""One task by hand: its inner batches, its Hessian batches, its outer batch."""


def hand_meta_gradient(
    loop: tuple[HandInit, HandStep],
    weights: Sequence[Tensor],
    step_sizes: Sequence[Tensor],
    tasks: Sequence[HandTask],
) -> list[Tensor]:
    """Mean meta gradient, with respect to ``weights + step_sizes``, by plain autograd.

    A step whose Hessian batch is its inner batch is unrolled as it is; otherwise by
    the surrogate of SPEC section 3, ``F_D(w, s) + stopgrad(F_S(w, s) - F_D(w, s))``:
    the values of the inner batches, the derivative of the Hessian batches (eq. 7).
    """
    init, step = loop
    total: list[Tensor] | None = None
    for inner, hessian, outer in tasks:
        w0 = [p.detach().clone().requires_grad_(True) for p in weights]
        a = [s.detach().clone().requires_grad_(True) for s in step_sizes]
        w, state = list(w0), init(w0)
        for j, (batch, hess) in enumerate(zip(inner, hessian, strict=True)):
            g_hess = torch.autograd.grad(mse_by_hand(w, hess), w, create_graph=True)
            w_hess, state_hess = step(j, w, g_hess, state, a)
            if hess is batch:
                w, state = w_hess, state_hess
                continue
            g_inner = torch.autograd.grad(mse_by_hand(w, batch), w, create_graph=True)
            w_inner, state_inner = step(j, w, g_inner, state, a)
            w = [h + (i - h).detach() for h, i in zip(w_hess, w_inner, strict=True)]
            state = [h + (i - h).detach() for h, i in zip(state_hess, state_inner, strict=True)]
        meta = list(torch.autograd.grad(mse_by_hand(w, outer), w0 + a))
        total = meta if total is None else [t + g for t, g in zip(total, meta, strict=True)]
    assert total is not None
    return [t / len(tasks) for t in total]


# ---------------------------------------------------------------- the cases


def wrapped_mlp(seed: int) -> tm.LearnedStepSizes[nn.Sequential]:
    """The MLP in LearnedStepSizes, its step sizes drawn in [0.02, 0.08]."""
    model = tm.LearnedStepSizes(make_mlp(seed), lr=0.05)
    generator = torch.Generator().manual_seed(100 + seed)
    with torch.no_grad():
        for _, a in model.named_step_sizes():
            a.copy_(0.02 + 0.06 * torch.rand(a.shape, generator=generator, dtype=a.dtype))
    return model


def weights_and_step_sizes(model: nn.Module) -> tuple[list[Tensor], list[Tensor]]:
    if isinstance(model, tm.LearnedStepSizes):
        return list(model.module.parameters()), [a for _, a in model.named_step_sizes()]
    return list(model.parameters()), []


LOOPS: dict[str, tuple[tm.InnerLoop, tuple[HandInit, HandStep]]] = {
    "momentum": (tm.Momentum(STEPS, lr=0.05, momentum=0.9), momentum_by_hand(0.05, 0.9, False)),
    "nesterov": (
        tm.Momentum(STEPS, lr=0.05, momentum=0.8, nesterov=True),
        momentum_by_hand(0.05, 0.8, True),
    ),
    "adam": (
        tm.Adam(STEPS, lr=0.01, betas=(0.8, 0.99), eps=1e-6),
        adam_by_hand(0.01, (0.8, 0.99), 1e-6),
    ),
    "meta-sgd": (tm.MetaSGD(STEPS), meta_sgd_by_hand()),
}


def build_model(loop: str) -> nn.Module:
    return wrapped_mlp(0) if loop == "meta-sgd" else make_mlp(0)


def optimizer_meta_gradient(
    model: nn.Module,
    inner: tm.InnerLoop,
    estimator: tm.MetaGradientEstimator,
    tasks: Sequence[tm.Task[Any]],
    **options: Any,
) -> tm.typing.Params:
    """The MetaOptimizer's meta gradient, read from ``.grad`` after meta_backward."""
    meta_opt = tm.MetaOptimizer(
        model,
        mse_loss,
        inner_loop=inner,
        estimator=estimator,
        step_size=tm.Constant(0.1),
        **options,
    )
    meta_opt.meta_backward(tasks)
    grads = {}
    for name, p in model.named_parameters():
        assert p.grad is not None, name
        grads[name] = p.grad.clone()
    return grads


def by_name(model: nn.Module, values: Sequence[Tensor]) -> tm.typing.Params:
    return {name: v for (name, _), v in zip(model.named_parameters(), values, strict=True)}


class FixedBatches:
    """A sampler that always returns the same batch for a given size."""

    def __init__(self, by_size: dict[int, Pair]) -> None:
        self.by_size = by_size

    def sample(self, size: int, generator: torch.Generator | None = None) -> Pair:
        return self.by_size[size]


ESTIMATORS = [
    "exact",
    "exact-one-by-one",
    "finite-sum",
    "finite-sum-stacked",
    "finite-sum-one-by-one",
    "resampled",
    "resampled-one-by-one",
]


def estimator_case(
    name: str, tasks: list[tm.SupportQuery[Pair]]
) -> tuple[tm.MetaGradientEstimator, Sequence[tm.Task[Any]], dict[str, Any]]:
    """The estimator, the meta-batch and the options of one way to compute the same G."""
    one_by_one: dict[str, Any] = {"task_chunk_size": 1} if name.endswith("one-by-one") else {}
    if name.startswith("exact"):
        return tm.Exact(), tasks, one_by_one
    if name == "finite-sum-stacked":
        return tm.FiniteSum(), tm.StackedTasks.stack(tasks), {"task_chunk_size": None}
    if name.startswith("finite-sum"):
        return tm.FiniteSum(), tasks, one_by_one
    # Samplers that always return the support set (6 points) or the query set (9):
    # eq. 7 with every Hessian batch the inner batch, the unrolled derivative.
    samplers = [FixedBatches({6: task.support, 9: task.query}) for task in tasks]
    return tm.Resampled(inner_size=6, hessian_size=6, outer_size=9), samplers, one_by_one


# ---------------------------------------------------------------- meta gradients on the MLP


@pytest.mark.parametrize(
    ("loop", "estimator"),
    [pytest.param(name, e, id=f"{name}-{e}") for name in LOOPS for e in ESTIMATORS],
)
def test_meta_gradient_equals_the_hand_unrolled_loop(loop: str, estimator: str) -> None:
    """Exact, FiniteSum (list, stacked, one by one) and Resampled == autograd by hand."""
    tasks = regression_tasks(3, torch.Generator().manual_seed(0))
    inner, hand = LOOPS[loop]
    weights, step_sizes = weights_and_step_sizes(build_model(loop))
    hand_tasks = [([t.support] * STEPS, [t.support] * STEPS, t.query) for t in tasks]
    model = build_model(loop)
    expected = by_name(model, hand_meta_gradient(hand, weights, step_sizes, hand_tasks))

    chosen, meta_batch, options = estimator_case(estimator, tasks)
    actual = optimizer_meta_gradient(model, inner, chosen, meta_batch, **options)
    assert params_relative_error(actual, expected) < TIGHT


@pytest.mark.parametrize(
    ("loop", "tasks"),
    [pytest.param(name, count, id=f"{name}-{count}-tasks") for name in LOOPS for count in (3, 1)],
)
def test_resampled_takes_each_hessian_on_its_own_batch(loop: str, tasks: int) -> None:
    """Eq. 7 for any inner loop: the step Jacobians on D_j, the iterates on S_j."""
    generator = torch.Generator().manual_seed(3)
    samplers, hand_tasks = [], []
    for i in range(tasks):
        source = RegressionSampler(amplitude=1.0 + 0.5 * i, phase=0.3 * i)
        inner_batch = source.sample(6, generator)
        hessian_batch = source.sample(7, generator)
        outer_batch = source.sample(9, generator)
        samplers.append(FixedBatches({6: inner_batch, 7: hessian_batch, 9: outer_batch}))
        hand_tasks.append(([inner_batch] * STEPS, [hessian_batch] * STEPS, outer_batch))
    inner, hand = LOOPS[loop]
    weights, step_sizes = weights_and_step_sizes(build_model(loop))
    model = build_model(loop)
    expected = by_name(model, hand_meta_gradient(hand, weights, step_sizes, hand_tasks))
    estimator = tm.Resampled(inner_size=6, hessian_size=7, outer_size=9)
    actual = optimizer_meta_gradient(model, inner, estimator, samplers)
    assert params_relative_error(actual, expected) < TIGHT
    # and it is not the unrolled gradient, whose Hessians are taken on the inner batches
    unrolled = hand_meta_gradient(
        hand, weights, step_sizes, [(s, s, outer) for s, _, outer in hand_tasks]
    )
    assert params_relative_error(actual, by_name(model, unrolled)) > 1e-4


@pytest.mark.slow
@pytest.mark.parametrize("loop", list(LOOPS))
def test_compiled_meta_gradient_equals_the_hand_unrolled_loop(loop: str) -> None:
    tasks = regression_tasks(3, torch.Generator().manual_seed(0))
    inner, hand = LOOPS[loop]
    weights, step_sizes = weights_and_step_sizes(build_model(loop))
    hand_tasks = [([t.support] * STEPS, [t.support] * STEPS, t.query) for t in tasks]
    model = build_model(loop)
    expected = by_name(model, hand_meta_gradient(hand, weights, step_sizes, hand_tasks))
    actual = optimizer_meta_gradient(
        model, inner, tm.FiniteSum(), tm.StackedTasks.stack(tasks), compile=True
    )
    assert params_relative_error(actual, expected) < TIGHT


# ---------------------------------------------------------------- closed forms on quadratics


def quadratic_task(dim: int, seed: int) -> tm.SupportQuery[Quadratic]:
    generator = torch.Generator().manual_seed(seed)
    return tm.SupportQuery(random_quadratic(dim, generator), random_quadratic(dim, generator))


@pytest.mark.parametrize("nesterov", [False, True])
def test_momentum_on_a_quadratic_matches_the_closed_form(nesterov: bool) -> None:
    """The state (w, b) moves linearly: d w_N / d w_0 is a block of T^N."""
    dim, lr, mu, steps = 4, 0.1, 0.7, 5
    task = quadratic_task(dim, 0)
    (a, c), (a_t, c_t) = task.support, task.query
    w0 = torch.randn(dim, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    w, b = w0, torch.zeros(dim, dtype=torch.float64)
    for _ in range(steps):
        g = a @ w - c
        b = mu * b + g
        w = w - lr * (g + mu * b if nesterov else b)
    eye = torch.eye(dim, dtype=torch.float64)
    if nesterov:
        top = torch.cat([eye - lr * (1 + mu) * a, -lr * mu * mu * eye], dim=1)
    else:
        top = torch.cat([eye - lr * a, -lr * mu * eye], dim=1)
    transition = torch.cat([top, torch.cat([a, mu * eye], dim=1)])
    jacobian = torch.linalg.matrix_power(transition, steps)[:dim, :dim]
    expected = jacobian.T @ (a_t @ w - c_t)

    inner = tm.Momentum(steps, lr=lr, momentum=mu, nesterov=nesterov)
    for estimator in (tm.Exact(), tm.FiniteSum()):
        model = Vector(w0)
        meta_opt = tm.MetaOptimizer(
            model, quadratic_loss, inner_loop=inner, estimator=estimator, step_size=tm.Constant(1)
        )
        meta_opt.meta_backward([task])
        assert model.w.grad is not None
        assert relative_error(model.w.grad, expected) < TIGHT


def wrapped_quadratic_loss(model: tm.LearnedStepSizes[Vector], batch: Quadratic) -> Tensor:
    return quadratic_loss(model.module, batch)


def meta_sgd_closed_form(
    w0: Tensor, step_sizes: Tensor, task: tm.SupportQuery[Quadratic], steps: int
) -> tuple[Tensor, Tensor]:
    """``(G_w, G_a)`` of Meta-SGD on a quadratic.

    ``w_{j+1} = (I - D A) w_j + D c`` with ``D = diag(a)``, so ``d w_N / d w_0 = (I - D A)^N``
    and ``d w_N / d a = -sum_j (I - D A)^(N-1-j) diag(g_j)``.
    """
    (a, c), (a_t, c_t) = task.support, task.query
    step = torch.eye(w0.numel(), dtype=torch.float64) - torch.diag(step_sizes) @ a
    w, gradients = w0, []
    for _ in range(steps):
        gradients.append(a @ w - c)
        w = w - step_sizes * gradients[-1]
    q = a_t @ w - c_t
    g_w = torch.linalg.matrix_power(step, steps).T @ q
    g_a = torch.zeros_like(w0)
    for j, g in enumerate(gradients):
        g_a = g_a - g * (torch.linalg.matrix_power(step, steps - 1 - j).T @ q)
    return g_w, g_a


def test_meta_sgd_on_a_quadratic_matches_the_closed_form() -> None:
    dim, steps = 4, 4
    task = quadratic_task(dim, 2)
    generator = torch.Generator().manual_seed(3)
    w0 = torch.randn(dim, generator=generator, dtype=torch.float64)
    step_sizes = 0.05 + 0.3 * torch.rand(dim, generator=generator, dtype=torch.float64)
    g_w, g_a = meta_sgd_closed_form(w0, step_sizes, task, steps)
    for estimator in (tm.Exact(), tm.FiniteSum()):
        model = tm.LearnedStepSizes(Vector(w0))
        with torch.no_grad():
            model.step_sizes.get_parameter("w").copy_(step_sizes)
        meta_opt = tm.MetaOptimizer(
            model,
            wrapped_quadratic_loss,
            inner_loop=tm.MetaSGD(steps),
            estimator=estimator,
            step_size=tm.Constant(1),
            task_chunk_size=None,
        )
        meta_opt.meta_backward(tm.StackedTasks.stack([task, task]))  # vectorised
        weight_grad, step_size_grad = model.module.w.grad, model.step_sizes.get_parameter("w").grad
        assert weight_grad is not None
        assert step_size_grad is not None
        assert relative_error(weight_grad, g_w) < TIGHT
        assert relative_error(step_size_grad, g_a) < TIGHT


def adam_first_step_task(dim: int) -> tuple[tm.SupportQuery[Quadratic], Tensor]:
    """A quadratic task and w_0 = 0 where the last coordinate's gradient is exactly 0."""
    generator = torch.Generator().manual_seed(4)
    a = random_spd(dim, generator)  # coupled: the zero coordinate has a Hessian row
    c = torch.randn(dim, generator=generator, dtype=torch.float64)
    c[-1] = 0.0  # g(0) = -c
    return tm.SupportQuery((a, c), random_quadratic(dim, generator)), torch.zeros(
        dim, dtype=torch.float64
    )


def vector_meta_gradient(
    w0: Tensor, inner: tm.InnerLoop, estimator: tm.MetaGradientEstimator, task: tm.Task[Any]
) -> Tensor:
    model = Vector(w0)
    meta_opt = tm.MetaOptimizer(
        model, quadratic_loss, inner_loop=inner, estimator=estimator, step_size=tm.Constant(1)
    )
    meta_opt.meta_backward([task])
    assert model.w.grad is not None
    return model.w.grad


@pytest.mark.parametrize("eps", [1e-8, 0.1])
def test_adam_with_an_exactly_zero_gradient_matches_the_first_step_closed_form(
    eps: float,
) -> None:
    """One Adam step is ``w - lr g / (|g| + eps)``: Jacobian ``I - lr diag(eps/(|g|+eps)^2) A``.

    Its derivative is finite at g = 0 (1/eps), where plain autograd through sqrt(v)
    gives NaN.
    """
    dim, lr = 3, 0.1
    task, w0 = adam_first_step_task(dim)
    (a, c), (a_t, c_t) = task.support, task.query
    g = a @ w0 - c
    assert g[-1] == 0.0
    w1 = w0 - lr * g / (g.abs() + eps)
    scale = eps / (g.abs() + eps) ** 2
    expected = (torch.eye(dim, dtype=torch.float64) - lr * torch.diag(scale) @ a).T @ (
        a_t @ w1 - c_t
    )
    for estimator in (tm.Exact(), tm.FiniteSum()):
        actual = vector_meta_gradient(w0, tm.Adam(1, lr=lr, eps=eps), estimator, task)
        assert bool(torch.isfinite(actual).all())
        assert relative_error(actual, expected) < TIGHT


def test_adam_with_an_exactly_zero_gradient_over_several_steps() -> None:
    """Against Adam by hand with sqrt(max(v, 1e-300)), and central finite differences."""
    dim, lr, eps, steps = 3, 0.1, 0.1, 3
    task, w0 = adam_first_step_task(dim)
    clamped = adam_by_hand(lr, (0.9, 0.999), eps, sqrt=lambda v: v.clamp_min(1e-300).sqrt())
    init, step = clamped
    start = w0.clone().requires_grad_(True)

    def hand_loss(vector: list[Tensor], batch: Quadratic) -> Tensor:
        a, c = batch
        value: Tensor = 0.5 * vector[0] @ a @ vector[0] - c @ vector[0]
        return value

    def meta_loss(weights: Tensor, create_graph: bool) -> Tensor:
        w, state = [weights], init([weights])
        for j in range(steps):
            g = torch.autograd.grad(hand_loss(w, task.support), w, create_graph=create_graph)
            w, state = step(j, w, g, state, [])
        return hand_loss(w, task.query)

    (expected,) = torch.autograd.grad(meta_loss(start, True), [start])
    for estimator in (tm.Exact(), tm.FiniteSum()):
        actual = vector_meta_gradient(w0, tm.Adam(steps, lr=lr, eps=eps), estimator, task)
        assert relative_error(actual, expected) < TIGHT

    h = 1e-6
    differences = []
    for i in range(dim):
        e = torch.zeros(dim, dtype=torch.float64)
        e[i] = h
        up = meta_loss((w0 + e).requires_grad_(True), False)
        down = meta_loss((w0 - e).requires_grad_(True), False)
        differences.append((up - down).detach() / (2 * h))
    assert relative_error(expected, torch.stack(differences)) < 1e-4  # a kink at g = 0: O(h/eps)


# ---------------------------------------------------------------- reductions


@pytest.mark.parametrize("nesterov", [False, True])
def test_momentum_zero_is_gradient_descent(nesterov: bool) -> None:
    tasks = regression_tasks(3, torch.Generator().manual_seed(5))
    expected = optimizer_meta_gradient(
        make_mlp(0), tm.GradientDescent(STEPS, 0.05), tm.FiniteSum(), tasks
    )
    inner = tm.Momentum(STEPS, 0.05, momentum=0.0, nesterov=nesterov)
    actual = optimizer_meta_gradient(make_mlp(0), inner, tm.FiniteSum(), tasks)
    assert params_relative_error(actual, expected) < 1e-12


def test_meta_sgd_with_equal_step_sizes_is_gradient_descent_and_gives_d_dalpha() -> None:
    """Weights: GradientDescent's meta gradient. Step sizes: summed, d L / d alpha."""
    alpha = 0.05
    tasks = regression_tasks(3, torch.Generator().manual_seed(6))
    plain = make_mlp(0)
    expected = optimizer_meta_gradient(plain, tm.GradientDescent(STEPS, alpha), tm.Exact(), tasks)
    model = tm.LearnedStepSizes(make_mlp(0), lr=alpha)
    actual = optimizer_meta_gradient(model, tm.MetaSGD(STEPS), tm.Exact(), tasks)
    weights = {name: actual[f"module.{name}"] for name in expected}
    assert params_relative_error(weights, expected) < 1e-12

    d_alpha = sum(float(g.sum()) for name, g in actual.items() if name.startswith("step_sizes."))
    h = 1e-5
    start = [p.detach() for p in plain.parameters()]
    differences = (
        meta_objective(tasks, STEPS, alpha + h, start)
        - meta_objective(tasks, STEPS, alpha - h, start)
    ) / (2 * h)
    assert abs(d_alpha - float(differences)) < 1e-6 * abs(d_alpha)


def test_meta_sgd_d_dalpha_on_a_quadratic_matches_the_closed_form() -> None:
    """``d L / d alpha = -sum_j q^T (I - alpha A)^(N-1-j) g_j`` for gradient descent."""
    dim, steps, alpha = 4, 5, 0.2
    task = quadratic_task(dim, 7)
    (a, c), (a_t, c_t) = task.support, task.query
    w0 = torch.randn(dim, generator=torch.Generator().manual_seed(8), dtype=torch.float64)
    w, gradients = w0, []
    for _ in range(steps):
        gradients.append(a @ w - c)
        w = w - alpha * gradients[-1]
    q = a_t @ w - c_t
    step = torch.eye(dim, dtype=torch.float64) - alpha * a
    expected = -sum(
        float(q @ torch.linalg.matrix_power(step, steps - 1 - j) @ g)
        for j, g in enumerate(gradients)
    )
    model = tm.LearnedStepSizes(Vector(w0), lr=alpha)
    meta_opt = tm.MetaOptimizer(
        model,
        wrapped_quadratic_loss,
        inner_loop=tm.MetaSGD(steps),
        estimator=tm.FiniteSum(),
        step_size=tm.Constant(1),
    )
    meta_opt.meta_backward(tm.StackedTasks.stack([task, task]))
    grad = model.step_sizes.get_parameter("w").grad
    assert grad is not None
    assert abs(float(grad.sum()) - expected) < TIGHT * abs(expected)


# ---------------------------------------------------------------- iterates against torch.optim


def quadratic_iterates(
    optimizer: Callable[[list[nn.Parameter]], torch.optim.Optimizer], steps: int
) -> list[Tensor]:
    generator = torch.Generator().manual_seed(9)
    a, c = random_quadratic(3, generator)
    c[0] = 0.0  # with w_0 = 0, coordinate 0 starts with an exactly zero gradient
    w = nn.Parameter(torch.zeros(3, dtype=torch.float64))
    opt = optimizer([w])
    iterates = []
    for _ in range(steps):
        (w.grad,) = torch.autograd.grad(0.5 * w @ a @ w - c @ w, [w])
        opt.step()
        iterates.append(w.detach().clone())
    return iterates


def inner_loop_iterates(inner: tm.InnerLoop, steps: int) -> list[Tensor]:
    generator = torch.Generator().manual_seed(9)
    a, c = random_quadratic(3, generator)
    c[0] = 0.0
    params = {"w": torch.zeros(3, dtype=torch.float64)}
    state = inner.init(params)
    iterates = []
    for _ in range(steps):
        params, state = inner.update(params, {"w": a @ params["w"] - c}, state)
        iterates.append(params["w"])
    return iterates


@pytest.mark.parametrize(
    ("inner", "optimizer"),
    [
        (
            tm.Momentum(6, lr=0.1, momentum=0.9),
            lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9),
        ),
        (
            tm.Momentum(6, lr=0.1, momentum=0.5, nesterov=True),
            lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.5, nesterov=True),
        ),
        (
            tm.Adam(6, lr=0.05, betas=(0.8, 0.95), eps=1e-3),
            lambda p: torch.optim.Adam(p, lr=0.05, betas=(0.8, 0.95), eps=1e-3),
        ),
        (tm.Adam(6, lr=0.05), lambda p: torch.optim.Adam(p, lr=0.05)),
    ],
    ids=["momentum", "nesterov", "adam", "adam-defaults"],
)
def test_iterates_are_those_of_torch_optim(
    inner: tm.InnerLoop, optimizer: Callable[[list[nn.Parameter]], torch.optim.Optimizer]
) -> None:
    expected = quadratic_iterates(optimizer, inner.steps)
    actual = inner_loop_iterates(inner, inner.steps)
    for mine, theirs in zip(actual, expected, strict=True):
        assert torch.allclose(mine, theirs, rtol=1e-13, atol=1e-15)


def test_the_state_is_a_pytree_of_tensors() -> None:
    params = {"a": torch.ones(2, dtype=torch.float64), "b": torch.ones(())}
    state = tm.Adam(2, 0.1).init(params)
    assert set(state) == set(AdamState.__annotations__) == {"m", "v", "t"}
    assert state["t"].dtype == torch.float64
    assert state["t"].item() == 0.0
    assert state["m"]["a"] is not state["v"]["a"]
    _, state = tm.Adam(2, 0.1).update(params, params, state)
    assert state["t"].item() == 1.0
    buffers = tm.Momentum(2, 0.1).init(params)
    assert set(buffers) == {"a", "b"}
    assert all(bool((b == 0).all()) for b in buffers.values())


# ---------------------------------------------------------------- Meta-SGD in the optimizer


def test_learned_step_sizes_mirror_the_trainable_parameters() -> None:
    net = make_mlp(0)
    net[0].bias.requires_grad_(False)
    model = tm.LearnedStepSizes(net, lr=0.25)
    names = [name for name, _ in model.named_parameters()]
    assert names == [
        "module.0.weight",
        "module.0.bias",  # frozen: no step size
        "module.2.weight",
        "module.2.bias",
        "step_sizes.0.weight",
        "step_sizes.2.weight",
        "step_sizes.2.bias",
    ]
    assert [name for name, _ in model.named_step_sizes()] == ["0.weight", "2.weight", "2.bias"]
    for name, a in model.named_step_sizes():
        weight = net.get_parameter(name)
        assert a.shape == weight.shape
        assert a.dtype == weight.dtype
        assert bool((a == 0.25).all())
    x = torch.randn(5, 1, dtype=torch.float64)
    assert torch.equal(model(x), net(x))
    assert model.module is net


def test_the_inner_gradient_of_the_step_sizes_is_zero() -> None:
    """The task loss does not use the step sizes: torch.func and autograd give zeros."""
    model = wrapped_mlp(0)
    names = [name for name, _ in model.named_parameters()]
    loss = TaskLoss(model, mse_loss, names)
    params = loss.params()
    batch = regression_tasks(1, torch.Generator().manual_seed(0))[0].support
    by_func, _ = loss_grad(loss, params, batch)
    by_autograd, _ = task_ops(loss, tm.MetaSGD(1)).loss_grad(params, batch)
    for grads in (by_func, by_autograd):
        for name in names:
            if name.startswith("step_sizes."):
                assert torch.equal(grads[name], torch.zeros_like(params[name]))
            else:
                assert bool((grads[name] != 0).any())


def test_meta_sgd_refuses_a_model_that_is_not_wrapped() -> None:
    model = make_mlp(0)
    before = [p.detach().clone() for p in model.parameters()]
    meta_opt = tm.MetaOptimizer(
        model,
        mse_loss,
        inner_loop=tm.MetaSGD(2),
        estimator=tm.FiniteSum(),
        step_size=tm.Constant(1),
    )
    tasks = regression_tasks(2, torch.Generator().manual_seed(0))
    message = (
        r"MetaSGD needs the model wrapped in LearnedStepSizes \(model = "
        r"tm.LearnedStepSizes\(net, lr=0.01\)\), whose parameters are named 'module.\*' "
        r"\(weights\) and 'step_sizes.\*' \(got a parameter named '0.weight'\)"
    )
    with pytest.raises(ValueError, match=message):
        meta_opt.step(tasks)
    with pytest.raises(ValueError, match=message):
        meta_opt.meta_backward(tasks)
    with pytest.raises(ValueError, match=message):
        meta_opt.adapt(tasks[0])
    for p, old in zip(model.parameters(), before, strict=True):
        assert torch.equal(p, old)
        assert p.grad is None
    assert meta_opt.meta_steps == 0


def test_meta_sgd_needs_the_step_sizes_of_the_adapted_weights() -> None:
    model = wrapped_mlp(0)
    before = [p.detach().clone() for p in model.parameters()]
    meta_opt = tm.MetaOptimizer(
        model,
        mse_loss,
        inner_loop=tm.MetaSGD(2),
        estimator=tm.FiniteSum(),
        step_size=tm.Constant(1),
        adapted=["module.2"],
    )
    message = (
        r"MetaSGD: the weight 'module.2.weight' has no step size 'step_sizes.2.weight' among "
        r"the adapted parameters: with adapted=..., select each weight's step size with it "
        r"\(e.g. adapted=\['module.head', 'step_sizes.head'\]\)"
    )
    with pytest.raises(ValueError, match=message):
        meta_opt.step(regression_tasks(2, torch.Generator().manual_seed(0)))
    for p, old in zip(model.parameters(), before, strict=True):
        assert torch.equal(p, old)
    with pytest.raises(ValueError, match="MetaSGD adapts no weight"):
        tm.MetaSGD(1).init({"step_sizes.w": torch.ones(2)})
    with pytest.raises(ValueError, match=r"the step size 'step_sizes.w' has shape \(3,\)"):
        tm.MetaSGD(1).update(
            {"module.w": torch.ones(2), "step_sizes.w": torch.ones(3)},
            {"module.w": torch.ones(2), "step_sizes.w": torch.zeros(3)},
            (),
        )


@pytest.mark.parametrize("estimator", ["exact", "finite-sum", "finite-sum-stacked"])
def test_meta_sgd_adapting_the_head_only(estimator: str) -> None:
    """ANIL with learned step sizes for the head: the body's step sizes get no gradient."""
    tasks = regression_tasks(3, torch.Generator().manual_seed(10))
    model = wrapped_mlp(0)
    weights, step_sizes = weights_and_step_sizes(model)
    total = [torch.zeros_like(p) for p in weights + step_sizes[2:]]
    for task in tasks:
        w0 = [p.detach().clone().requires_grad_(True) for p in weights]
        a = [s.detach().clone().requires_grad_(True) for s in step_sizes[2:]]
        w = list(w0)
        for _ in range(STEPS):
            g = torch.autograd.grad(mse_by_hand(w, task.support), w[2:], create_graph=True)
            w = w[:2] + [p - ai * gi for p, ai, gi in zip(w[2:], a, g, strict=True)]
        meta = torch.autograd.grad(mse_by_hand(w, task.query), w0 + a)
        total = [t + m / len(tasks) for t, m in zip(total, meta, strict=True)]
    names = [name for name, _ in model.named_parameters()]
    expected = dict(zip(names[:4] + names[6:], total, strict=True))

    chosen, meta_batch, options = estimator_case(estimator, tasks)
    actual = optimizer_meta_gradient(
        model,
        tm.MetaSGD(STEPS),
        chosen,
        meta_batch,
        adapted=["module.2", "step_sizes.2"],
        **options,
    )
    assert params_relative_error({n: actual[n] for n in expected}, expected) < TIGHT
    for name in ("step_sizes.0.weight", "step_sizes.0.bias"):
        assert torch.equal(actual[name], torch.zeros_like(actual[name]))


def test_meta_sgd_adapt_moves_the_weights_by_their_step_sizes() -> None:
    model = wrapped_mlp(0)
    task = regression_tasks(1, torch.Generator().manual_seed(11))[0]
    weights, step_sizes = weights_and_step_sizes(model)
    w = [p.detach().clone().requires_grad_(True) for p in weights]
    for _ in range(5):
        g = torch.autograd.grad(mse_by_hand(w, task.support), w)
        w = [
            (p - a * gi).detach().requires_grad_(True)
            for p, a, gi in zip(w, step_sizes, g, strict=True)
        ]
    meta_opt = tm.MetaOptimizer(
        model,
        mse_loss,
        inner_loop=tm.MetaSGD(STEPS),
        estimator=tm.FiniteSum(),
        step_size=tm.Constant(1),
    )
    adapted = meta_opt.adapt(task, steps=5)
    names = [name for name, _ in model.named_parameters()]
    for name, expected in zip(names, w + step_sizes, strict=True):
        assert torch.allclose(adapted[name], expected, rtol=1e-12, atol=1e-14), name
    for name, a in model.named_step_sizes():
        assert torch.equal(adapted[f"step_sizes.{name}"], a.detach())


def test_meta_sgd_with_torch_optim_adam_and_a_state_dict_round_trip() -> None:
    """meta_backward fills every .grad (step sizes too); torch.optim.Adam steps on them."""
    tasks = regression_tasks(3, torch.Generator().manual_seed(12))
    model = wrapped_mlp(0)
    weights, step_sizes = weights_and_step_sizes(model)
    hand_tasks = [([t.support] * STEPS, [t.support] * STEPS, t.query) for t in tasks]
    expected = hand_meta_gradient(meta_sgd_by_hand(), weights, step_sizes, hand_tasks)
    meta_opt = tm.MetaOptimizer(
        model,
        mse_loss,
        inner_loop=tm.MetaSGD(STEPS),
        estimator=tm.FiniteSum(),
        step_size=tm.Constant(1),
    )
    adam = torch.optim.Adam(model.parameters(), lr=1e-3)
    adam.zero_grad()
    meta_opt.meta_backward(tasks)
    before = [p.detach().clone() for p in model.parameters()]
    for p, g in zip(model.parameters(), expected, strict=True):
        assert p.grad is not None
        assert relative_error(p.grad, g) < TIGHT
    adam.step()
    for p, old, g in zip(model.parameters(), before, expected, strict=True):
        # Adam's first step: lr * g / (|g| + eps), the sign of g nearly
        assert torch.allclose(p.detach(), old - 1e-3 * g / (g.abs() + 1e-8), rtol=0, atol=1e-15)

    # MetaOptimizer.step and the state_dicts: a fresh model and optimizer resume exactly.
    meta_opt.step(tasks)
    saved_model, saved_opt = model.state_dict(), meta_opt.state_dict()
    other = tm.LearnedStepSizes(make_mlp(1), lr=0.5)
    resumed = tm.MetaOptimizer(
        other,
        mse_loss,
        inner_loop=tm.MetaSGD(STEPS),
        estimator=tm.FiniteSum(),
        step_size=tm.Constant(1),
    )
    other.load_state_dict(saved_model)
    resumed.load_state_dict(saved_opt)
    meta_opt.step(tasks)
    resumed.step(tasks)
    for (name, p), q in zip(model.named_parameters(), other.parameters(), strict=True):
        assert torch.equal(p, q), name
    assert resumed.meta_steps == meta_opt.meta_steps == 2
    mismatched = tm.MetaOptimizer(
        tm.LearnedStepSizes(make_mlp(1)),
        mse_loss,
        inner_loop=tm.MetaSGD(STEPS + 1),
        estimator=tm.FiniteSum(),
        step_size=tm.Constant(1),
    )
    with pytest.raises(ValueError, match=r"inner_loop: saved 'MetaSGD\(steps=3\)'"):
        mismatched.load_state_dict(saved_opt)


@pytest.mark.parametrize(
    "inner",
    [tm.Momentum(2, 0.1), tm.Adam(2, 0.1), tm.MetaSGD(2)],
    ids=["momentum", "adam", "meta-sgd"],
)
def test_smoothness_adaptive_refuses_other_inner_loops(inner: tm.InnerLoop) -> None:
    model = wrapped_mlp(0) if isinstance(inner, tm.MetaSGD) else make_mlp(0)
    with pytest.raises(TypeError, match="SmoothnessAdaptive needs a GradientDescent inner loop"):
        tm.MetaOptimizer(
            model,
            mse_loss,
            inner_loop=inner,
            estimator=tm.FiniteSum(),
            step_size=tm.SmoothnessAdaptive(L=2.0, rho=1.0, c_beta=80),
        )


# ---------------------------------------------------------------- bad input


def test_the_new_inner_loops_are_immutable_inner_loops() -> None:
    for inner in (tm.Momentum(2, 1), tm.Adam(2, 1), tm.MetaSGD(2)):
        assert isinstance(inner, tm.InnerLoop)
        with pytest.raises(AttributeError):
            inner.steps = 3  # type: ignore[misc]
    adam = tm.Adam(2, 1, betas=[0, 0.5])  # type: ignore[arg-type]
    assert adam.betas == (0.0, 0.5)
    assert isinstance(tm.Momentum(2, 1, momentum=0).momentum, float)


@pytest.mark.parametrize(
    ("build", "error", "message"),
    [
        (lambda: tm.Momentum(0, 0.1), ValueError, "'steps' must be a positive int (got 0)"),
        (lambda: tm.Momentum(1, 0.0), ValueError, "'lr' must be a finite number > 0 (got 0.0)"),
        (lambda: tm.Momentum(1, -1), ValueError, "'lr' must be a finite number > 0 (got -1.0)"),
        (lambda: tm.Momentum(1, 0.1, 1.5), ValueError, "'momentum' must be in [0, 1) (got 1.5)"),
        (lambda: tm.Momentum(1, 0.1, 1), ValueError, "'momentum' must be in [0, 1) (got 1.0)"),
        (lambda: tm.Momentum(1, 0.1, -0.1), ValueError, "'momentum' must be in [0, 1) (got -0.1)"),
        (
            lambda: tm.Momentum(1, 0.1, math.nan),
            ValueError,
            "'momentum' must be in [0, 1) (got nan)",
        ),
        (
            lambda: tm.Momentum(1, 0.1, "0.9"),  # type: ignore[arg-type]
            TypeError,
            "'momentum' must be in [0, 1) (got '0.9')",
        ),
        (
            lambda: tm.Momentum(1, 0.1, nesterov=1),  # type: ignore[arg-type]
            TypeError,
            "'nesterov' must be a bool (got 1)",
        ),
        (lambda: tm.Adam(0, 0.1), ValueError, "'steps' must be a positive int (got 0)"),
        (
            lambda: tm.Adam(1.5, 0.1),  # type: ignore[arg-type]
            TypeError,
            "'steps' must be a positive int (got 1.5)",
        ),
        (lambda: tm.Adam(1, 0), ValueError, "'lr' must be a finite number > 0 (got 0.0)"),
        (
            lambda: tm.Adam(1, 0.1, betas=(1.0, 0.999)),
            ValueError,
            "'betas[0]' must be in [0, 1) (got 1.0)",
        ),
        (
            lambda: tm.Adam(1, 0.1, betas=(0.9, -0.5)),
            ValueError,
            "'betas[1]' must be in [0, 1) (got -0.5)",
        ),
        (
            lambda: tm.Adam(1, 0.1, betas=(0.9,)),  # type: ignore[arg-type]
            TypeError,
            "'betas' must be a pair of numbers in [0, 1) (got (0.9,))",
        ),
        (
            lambda: tm.Adam(1, 0.1, betas=0.9),  # type: ignore[arg-type]
            TypeError,
            "'betas' must be a pair of numbers in [0, 1) (got an object of type float)",
        ),
        (lambda: tm.Adam(1, 0.1, eps=0), ValueError, "'eps' must be a finite number > 0 (got 0.0)"),
        (
            lambda: tm.Adam(1, 0.1, eps=-1e-8),
            ValueError,
            "'eps' must be a finite number > 0 (got -1e-08)",
        ),
        (lambda: tm.MetaSGD(0), ValueError, "'steps' must be a positive int (got 0)"),
        (
            lambda: tm.MetaSGD(True),
            TypeError,
            "'steps' must be a positive int (got True)",
        ),
        (
            lambda: tm.LearnedStepSizes(nn.Linear(1, 1), lr=0),
            ValueError,
            "'lr' must be a finite number > 0 (got 0.0)",
        ),
        (
            lambda: tm.LearnedStepSizes(3),  # type: ignore[type-var]
            TypeError,
            "'module' must be a torch.nn.Module (got an object of type int)",
        ),
        (
            lambda: tm.LearnedStepSizes(nn.Linear(1, 1).requires_grad_(False)),
            ValueError,
            "'module' has no trainable parameters (none with requires_grad=True)",
        ),
    ],
)
def test_bad_arguments_are_named(
    build: Callable[[], object], error: type[Exception], message: str
) -> None:
    with pytest.raises(error) as raised:
        build()
    assert str(raised.value) == message


@pytest.mark.parametrize("chunk", [1, None])
def test_a_trainable_parameter_the_loss_does_not_use_gets_a_zero_meta_gradient(
    chunk: int | None,
) -> None:
    """Per task and vectorised alike (Meta-SGD's step sizes are such parameters)."""
    model = make_mlp(0)
    unused = nn.Parameter(torch.ones(3, dtype=torch.float64))
    model.register_parameter("unused", unused)
    tasks = regression_tasks(2, torch.Generator().manual_seed(1))
    for estimator in (tm.Exact(), tm.FiniteSum()):
        meta_opt = tm.MetaOptimizer(
            model,
            mse_loss,
            inner_loop=tm.GradientDescent(steps=2, lr=0.1),
            estimator=estimator,
            step_size=tm.Constant(0.1),
            task_chunk_size=chunk,
        )
        meta_opt.zero_grad()
        meta_opt.meta_backward(tasks)
        assert unused.grad is not None
        assert torch.equal(unused.grad, torch.zeros(3, dtype=torch.float64))
