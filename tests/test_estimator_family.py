"""FirstOrder, Reptile, HessianFree and Implicit (with Proximal), in float64.

Each is checked against an independent computation: a closed form on quadratics
(SPEC section 7, and iMAML's implicit gradient ``(I + A_S / lam)^{-1} (A_T phi - c_T)``),
or the algorithm written out by hand with ``torch.autograd`` on the hand-written MLP of
tests/problems.py, or a dense Hessian solve. Then: the vectorised, stacked and
task-by-task paths agree, sampler tasks and ``adapted=`` selections work or are
refused with exact messages, bad arguments raise exact messages, and a meta step
runs end to end, or raises and changes nothing.
"""

from __future__ import annotations

import itertools
import re
from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch import Tensor, nn

import torch_maml as tm
from tests.problems import (
    Quadratic,
    QuadraticSequence,
    RegressionSampler,
    Vector,
    make_mlp,
    mse_by_hand,
    mse_loss,
    params_relative_error,
    quadratic_loss,
    random_quadratic,
    regression_tasks,
    relative_error,
)
from tests.typing_cases.user_components import HeavyBall

ALPHA = 0.1
DIM = 4
INNER, HESSIAN, OUTER = 2, 3, 4  # distinct sample sizes: QuadraticSequence keys on them
TIGHT = 1e-10
SAME = 1e-12  # two code paths of one algorithm: equal up to rounding

Grads = dict[str, Tensor]


def meta_grads(
    model: nn.Module,
    loss_fn: Any,
    inner_loop: tm.InnerLoop,
    estimator: tm.MetaGradientEstimator,
    tasks: Any,
    **options: Any,
) -> tuple[Grads, tm.MetaBackwardInfo]:
    """The meta gradient that ``meta_backward`` writes into each ``.grad``, and its info."""
    meta_opt = tm.MetaOptimizer(
        model,
        loss_fn,
        inner_loop=inner_loop,
        estimator=estimator,
        step_size=tm.Constant(1.0),
        generator=torch.Generator().manual_seed(0),
        **options,
    )
    info = meta_opt.meta_backward(tasks)
    grads = {}
    for name, p in model.named_parameters():
        assert p.grad is not None
        grads[name] = p.grad.clone()
    return grads, info


def vector_grad(
    w: Tensor,
    inner_loop: tm.InnerLoop,
    estimator: tm.MetaGradientEstimator,
    tasks: Any,
    **options: Any,
) -> Tensor:
    grads, _ = meta_grads(Vector(w), quadratic_loss, inner_loop, estimator, tasks, **options)
    return grads["w"]


def mlp_grads(
    inner_loop: tm.InnerLoop, estimator: tm.MetaGradientEstimator, tasks: Any, **options: Any
) -> Grads:
    grads, _ = meta_grads(make_mlp(0), mse_loss, inner_loop, estimator, tasks, **options)
    return grads


@pytest.fixture
def gen() -> torch.Generator:
    return torch.Generator().manual_seed(1234)


# ---------------------------------------------------------------- closed forms


def gd_last(
    w: Tensor, alpha: float, inner: list[Quadratic], lam: float = 0.0, moving: slice = slice(None)
) -> Tensor:
    """``x_N`` of ``x_{j+1} = x_j - alpha P (A_j x_j - c_j + lam (x_j - w))``.

    ``P`` keeps the coordinates ``moving`` (an adapted selection), zeroing the others.
    """
    x = w.clone()
    for a, c in inner:
        step = torch.zeros_like(x)
        step[moving] = (a @ x - c + lam * (x - w))[moving]
        x = x - alpha * step
    return x


def product_then(
    alpha: float, hessian: list[Quadratic], vector: Tensor, moving: slice = slice(None)
) -> Tensor:
    """``prod_j (I - alpha A_{D,j} P) v``, j = 0 leftmost (the transposed Jacobians)."""
    eye = torch.eye(vector.numel(), dtype=torch.float64)
    projector = torch.zeros_like(eye)
    projector[moving, moving] = eye[moving, moving]
    product = eye
    for a, _ in hessian:
        product = product @ (eye - alpha * a @ projector)
    return product @ vector


def outer_grad(outer: Quadratic, x: Tensor) -> Tensor:
    a, c = outer
    return a @ x - c


def implicit_closed_form(a_s: Tensor, lam: float, g: Tensor) -> Tensor:
    """``(I + A_S / lam)^{-1} g``."""
    eye = torch.eye(g.numel(), dtype=torch.float64)
    solution: Tensor = torch.linalg.solve(eye + a_s / lam, g)
    return solution


def support_query_pairs(
    count: int, gen: torch.Generator
) -> tuple[list[tuple[Quadratic, Quadratic]], list[tm.SupportQuery[Quadratic]]]:
    pairs = [(random_quadratic(DIM, gen), random_quadratic(DIM, gen)) for _ in range(count)]
    return pairs, [tm.SupportQuery(s, t) for s, t in pairs]


# ---------------------------------------------------------------- hand-written references


Weights = list[Tensor]


def grads_at(weights: Weights, batch: tuple[Tensor, Tensor]) -> Weights:
    """``grad l(w; batch)`` of the hand-written MLP, by torch.autograd."""
    leaves = [p.detach().clone().requires_grad_(True) for p in weights]
    return list(torch.autograd.grad(mse_by_hand(leaves, batch), leaves))


def heavy_ball_by_hand(inner: HeavyBall, weights: Weights, batch: tuple[Tensor, Tensor]) -> Weights:
    """The heavy-ball inner loop's last iterate, written out in plain torch."""
    w, velocity = weights, [torch.zeros_like(p) for p in weights]
    for _ in range(inner.steps):
        grads = grads_at(w, batch)
        velocity = [inner.momentum * b + g for b, g in zip(velocity, grads, strict=True)]
        w = [p - inner.lr * b for p, b in zip(w, velocity, strict=True)]
    return w


def descend(
    weights: Weights,
    batch: tuple[Tensor, Tensor],
    steps: int,
    alpha: float,
    lam: float = 0.0,
    moving: tuple[int, ...] = (0, 1, 2, 3),
) -> list[Weights]:
    """Iterates ``w_0..w_N`` of (proximal) gradient descent on the hand-written MLP."""
    iterates = [weights]
    for _ in range(steps):
        current = iterates[-1]
        grads = grads_at(current, batch)
        iterates.append(
            [
                p - alpha * (g + lam * (p - w)) if k in moving else p
                for k, (p, g, w) in enumerate(zip(current, grads, weights, strict=True))
            ]
        )
    return iterates


def mean_by_hand(
    model: nn.Module,
    tasks: list[tm.SupportQuery[tuple[Tensor, Tensor]]],
    per_task: Callable[[Weights, tm.SupportQuery[tuple[Tensor, Tensor]]], Weights],
) -> Grads:
    weights = [p.detach().clone() for p in model.parameters()]
    names = [n for n, _ in model.named_parameters()]
    total = [torch.zeros_like(p) for p in weights]
    for task in tasks:
        total = [t + g for t, g in zip(total, per_task(weights, task), strict=True)]
    return {n: t / len(tasks) for n, t in zip(names, total, strict=True)}


def norm(vector: Weights) -> Tensor:
    return torch.sqrt(sum(((v * v).sum() for v in vector), torch.zeros((), dtype=torch.float64)))


def hessian_free_by_hand(
    weights: Weights,
    task: tm.SupportQuery[tuple[Tensor, Tensor]],
    steps: int,
    alpha: float,
    delta: float,
) -> Weights:
    """The N-step HF-MAML recursion, written out: central differences at distance delta."""
    iterates = descend(weights, task.support, steps, alpha)
    v = grads_at(iterates[-1], task.query)
    for j in reversed(range(steps)):
        h = delta / norm(v)
        plus = grads_at([p + h * u for p, u in zip(iterates[j], v, strict=True)], task.support)
        minus = grads_at([p - h * u for p, u in zip(iterates[j], v, strict=True)], task.support)
        v = [u - alpha * (gp - gm) / (2 * h) for u, gp, gm in zip(v, plus, minus, strict=True)]
    return v


def flat(weights: Weights) -> Tensor:
    return torch.cat([w.reshape(-1) for w in weights])


def unflat(vector: Tensor, like: Weights) -> Weights:
    pieces, start = [], 0
    for w in like:
        pieces.append(vector[start : start + w.numel()].view_as(w))
        start += w.numel()
    return pieces


def dense_hessian(fn: Callable[[Tensor], Tensor], x: Tensor) -> Tensor:
    """The full Hessian of ``fn`` at ``x``, row by row, by double backward."""
    point = x.detach().clone().requires_grad_(True)
    (gradient,) = torch.autograd.grad(fn(point), point, create_graph=True)
    rows = [torch.autograd.grad(gradient[i], point, retain_graph=True)[0] for i in range(x.numel())]
    return torch.stack(rows)


def implicit_by_dense_solve(
    weights: Weights, task: tm.SupportQuery[tuple[Tensor, Tensor]], steps: int, lam: float
) -> Weights:
    """``(I + H_S(phi_N) / lam)^{-1} grad l_T(phi_N)``: the full Hessian, a direct solve."""
    phi = descend(weights, task.support, steps, ALPHA, lam)[-1]

    def support_loss(vector: Tensor) -> Tensor:
        return mse_by_hand(unflat(vector, phi), task.support)

    hessian = dense_hessian(support_loss, flat(phi))
    eye = torch.eye(hessian.shape[0], dtype=torch.float64)
    solution = torch.linalg.solve(eye + hessian / lam, flat(grads_at(phi, task.query)))
    return unflat(solution, phi)


# ---------------------------------------------------------------- FirstOrder


@pytest.mark.parametrize("steps", [1, 2, 5])
def test_first_order_on_quadratics_is_the_outer_gradient_at_w_n(
    steps: int, gen: torch.Generator
) -> None:
    """``G = A_T w_N - c_T``: support/query tasks, and samplers with a quadratic per step."""
    w = torch.randn(DIM, generator=gen, dtype=torch.float64)
    inner = tm.GradientDescent(steps=steps, lr=ALPHA)
    pairs, tasks = support_query_pairs(3, gen)
    expected = torch.stack([outer_grad(t, gd_last(w, ALPHA, [s] * steps)) for s, t in pairs])
    assert relative_error(vector_grad(w, inner, tm.FirstOrder(), tasks), expected.mean(0)) < TIGHT

    families = [([random_quadratic(DIM, gen) for _ in range(steps)], random_quadratic(DIM, gen))]
    families.append(
        ([random_quadratic(DIM, gen) for _ in range(steps)], random_quadratic(DIM, gen))
    )
    samplers = [QuadraticSequence({INNER: s, OUTER: [t]}) for s, t in families]
    expected = torch.stack([outer_grad(t, gd_last(w, ALPHA, s)) for s, t in families])
    actual = vector_grad(w, inner, tm.FirstOrder(inner_size=INNER, outer_size=OUTER), samplers)
    assert relative_error(actual, expected.mean(0)) < TIGHT


@pytest.mark.parametrize("steps", [1, 3])
def test_first_order_on_an_mlp_equals_the_loop_written_by_hand(
    steps: int, gen: torch.Generator
) -> None:
    tasks = regression_tasks(4, gen)

    def by_hand(weights: Weights, task: tm.SupportQuery[tuple[Tensor, Tensor]]) -> Weights:
        return grads_at(descend(weights, task.support, steps, ALPHA)[-1], task.query)

    expected = mean_by_hand(make_mlp(0), tasks, by_hand)
    actual = mlp_grads(tm.GradientDescent(steps, ALPHA), tm.FirstOrder(), tasks)
    assert params_relative_error(actual, expected) < TIGHT


def test_first_order_takes_any_inner_loop(gen: torch.Generator) -> None:
    """A user's heavy-ball inner loop: the outer gradient where it ends, by hand."""
    tasks = regression_tasks(3, gen)
    inner = HeavyBall(steps=3, lr=0.05, momentum=0.9)

    def by_hand(weights: Weights, task: tm.SupportQuery[tuple[Tensor, Tensor]]) -> Weights:
        return grads_at(heavy_ball_by_hand(inner, weights, task.support), task.query)

    expected = mean_by_hand(make_mlp(0), tasks, by_hand)
    assert params_relative_error(mlp_grads(inner, tm.FirstOrder(), tasks), expected) < TIGHT


def test_first_order_with_an_adapted_selection(gen: torch.Generator) -> None:
    """ANIL: only the head adapts; every parameter gets its query gradient at w_N."""
    tasks = regression_tasks(3, gen)

    def by_hand(weights: Weights, task: tm.SupportQuery[tuple[Tensor, Tensor]]) -> Weights:
        last = descend(weights, task.support, 3, ALPHA, moving=(2, 3))[-1]
        return grads_at(last, task.query)

    expected = mean_by_hand(make_mlp(0), tasks, by_hand)
    actual = mlp_grads(tm.GradientDescent(3, ALPHA), tm.FirstOrder(), tasks, adapted=["2"])
    assert params_relative_error(actual, expected) < TIGHT
    all_adapted = mlp_grads(tm.GradientDescent(3, ALPHA), tm.FirstOrder(), tasks)
    assert params_relative_error(actual, all_adapted) > 1e-3  # the selection mattered


# ---------------------------------------------------------------- Reptile


@pytest.mark.parametrize("steps", [1, 2, 5])
def test_reptile_on_quadratics_is_the_mean_inner_gradient(steps: int, gen: torch.Generator) -> None:
    """``G = (w - w_N) / (N alpha)``, which is the mean of the inner gradients."""
    w = torch.randn(DIM, generator=gen, dtype=torch.float64)
    inner = tm.GradientDescent(steps=steps, lr=ALPHA)
    pairs, tasks = support_query_pairs(3, gen)
    mean_gradients = []
    for s, _ in pairs:
        x, total = w, torch.zeros_like(w)
        for _ in range(steps):
            total = total + outer_grad(s, x)
            x = x - ALPHA * outer_grad(s, x)
        mean_gradients.append(total / steps)
    expected = torch.stack(mean_gradients).mean(0)
    assert relative_error(vector_grad(w, inner, tm.Reptile(), tasks), expected) < TIGHT
    difference = torch.stack([w - gd_last(w, ALPHA, [s] * steps) for s, _ in pairs]).mean(0)
    assert relative_error(vector_grad(w, inner, tm.Reptile(scale=1.0), tasks), difference) < TIGHT
    scaled = vector_grad(w, inner, tm.Reptile(scale=2.5), tasks)
    assert relative_error(scaled, 2.5 * difference) < TIGHT

    families = [[random_quadratic(DIM, gen) for _ in range(steps)] for _ in range(2)]
    samplers = [QuadraticSequence({INNER: s, OUTER: [s[0]]}) for s in families]
    expected = torch.stack([(w - gd_last(w, ALPHA, s)) / (steps * ALPHA) for s in families])
    actual = vector_grad(w, inner, tm.Reptile(inner_size=INNER, outer_size=OUTER), samplers)
    assert relative_error(actual, expected.mean(0)) < TIGHT


@pytest.mark.parametrize("steps", [1, 3])
def test_reptile_on_an_mlp_equals_the_loop_written_by_hand(
    steps: int, gen: torch.Generator
) -> None:
    """The direction by hand, and the reported loss: the query loss at w_N."""
    tasks = regression_tasks(4, gen)
    losses = []

    def by_hand(weights: Weights, task: tm.SupportQuery[tuple[Tensor, Tensor]]) -> Weights:
        last = descend(weights, task.support, steps, ALPHA)[-1]
        losses.append(mse_by_hand(last, task.query))
        return [(w - p) / (steps * ALPHA) for w, p in zip(weights, last, strict=True)]

    expected = mean_by_hand(make_mlp(0), tasks, by_hand)
    grads, info = meta_grads(
        make_mlp(0), mse_loss, tm.GradientDescent(steps, ALPHA), tm.Reptile(), tasks
    )
    assert params_relative_error(grads, expected) < TIGHT
    expected_loss = torch.stack(losses).mean()
    assert abs(float(info.loss) - float(expected_loss)) <= TIGHT * float(expected_loss)


def test_a_meta_step_with_reptile_is_the_published_update(gen: torch.Generator) -> None:
    """``w + epsilon mean_i (w_N^i - w)``: beta = epsilon N alpha, or scale=1, beta = epsilon."""
    steps, epsilon = 3, 0.7
    w = torch.randn(DIM, generator=gen, dtype=torch.float64)
    pairs, tasks = support_query_pairs(3, gen)
    target = torch.stack([gd_last(w, ALPHA, [s] * steps) for s, _ in pairs]).mean(0)
    expected = w + epsilon * (target - w)
    for estimator, beta in (
        (tm.Reptile(), epsilon * steps * ALPHA),
        (tm.Reptile(scale=1.0), epsilon),
    ):
        model = Vector(w)
        meta_opt = tm.MetaOptimizer(
            model,
            quadratic_loss,
            inner_loop=tm.GradientDescent(steps, ALPHA),
            estimator=estimator,
            step_size=tm.Constant(beta),
        )
        meta_opt.step(tasks)
        assert relative_error(model.w.detach(), expected) < TIGHT


def test_reptile_with_a_scale_takes_any_inner_loop(gen: torch.Generator) -> None:
    tasks = regression_tasks(3, gen)
    inner = HeavyBall(steps=3, lr=0.05, momentum=0.9)

    def by_hand(weights: Weights, task: tm.SupportQuery[tuple[Tensor, Tensor]]) -> Weights:
        w = heavy_ball_by_hand(inner, weights, task.support)
        return [0.5 * (p0 - p) for p0, p in zip(weights, w, strict=True)]

    expected = mean_by_hand(make_mlp(0), tasks, by_hand)
    actual = mlp_grads(inner, tm.Reptile(scale=0.5), tasks)
    assert params_relative_error(actual, expected) < TIGHT


# ---------------------------------------------------------------- HessianFree


@pytest.mark.parametrize("delta", [1e-3, 0.1, 1.0, 10.0])
@pytest.mark.parametrize("steps", [1, 3])
def test_hessian_free_is_exact_on_quadratics_for_any_delta(
    steps: int, delta: float, gen: torch.Generator
) -> None:
    """The third derivative is 0: the central difference is the HVP, whatever delta.

    Support/query tasks give eq. 12's closed form; samplers whose Hessian batches are
    other quadratics than the inner ones give eq. 7's (the Hessian product on A_D).
    """
    w = torch.randn(DIM, generator=gen, dtype=torch.float64)
    inner = tm.GradientDescent(steps=steps, lr=ALPHA)
    pairs, tasks = support_query_pairs(3, gen)
    expected = torch.stack(
        [
            product_then(ALPHA, [s] * steps, outer_grad(t, gd_last(w, ALPHA, [s] * steps)))
            for s, t in pairs
        ]
    ).mean(0)
    assert relative_error(vector_grad(w, inner, tm.HessianFree(delta), tasks), expected) < TIGHT

    families = [
        (
            [random_quadratic(DIM, gen) for _ in range(steps)],
            [random_quadratic(DIM, gen) for _ in range(steps)],
            random_quadratic(DIM, gen),
        )
        for _ in range(2)
    ]
    samplers = [QuadraticSequence({INNER: s, HESSIAN: d, OUTER: [t]}) for s, d, t in families]
    expected = torch.stack(
        [product_then(ALPHA, d, outer_grad(t, gd_last(w, ALPHA, s))) for s, d, t in families]
    ).mean(0)
    estimator = tm.HessianFree(delta, inner_size=INNER, hessian_size=HESSIAN, outer_size=OUTER)
    assert relative_error(vector_grad(w, inner, estimator, samplers), expected) < TIGHT


@pytest.mark.parametrize("steps", [1, 3])
def test_hessian_free_on_an_mlp_equals_the_recursion_written_by_hand(
    steps: int, gen: torch.Generator
) -> None:
    tasks = regression_tasks(4, gen)
    delta = 1e-2
    expected = mean_by_hand(
        make_mlp(0),
        tasks,
        lambda weights, task: hessian_free_by_hand(weights, task, steps, ALPHA, delta),
    )
    actual = mlp_grads(tm.GradientDescent(steps, ALPHA), tm.HessianFree(delta), tasks)
    assert params_relative_error(actual, expected) < TIGHT


def test_hessian_free_error_is_second_order_in_delta(gen: torch.Generator) -> None:
    """On the tanh MLP, against the exact recursion (FiniteSum): halving delta quarters it.

    From delta = 0.2 to 0.025 the truncation error (~1e-4 to ~1e-6 relative) dwarfs
    rounding (~1e-16 / delta); the ratios come out at 3.99 to 4.00.
    """
    tasks = regression_tasks(3, gen)
    inner = tm.GradientDescent(2, ALPHA)
    exact = mlp_grads(inner, tm.FiniteSum(), tasks)
    errors = [
        params_relative_error(mlp_grads(inner, tm.HessianFree(delta), tasks), exact)
        for delta in (0.2, 0.1, 0.05, 0.025)
    ]
    for coarse, fine in itertools.pairwise(errors):
        assert 3.8 < coarse / fine < 4.2, errors
    assert errors[-1] < 1e-5


def test_hessian_free_with_an_adapted_selection(gen: torch.Generator) -> None:
    """Only the block ``a`` adapts: ``G = prod_j (I - alpha A P_a) (A_T x_N - c_T)``, exactly."""
    w = torch.randn(DIM, generator=gen, dtype=torch.float64)
    pairs, tasks = support_query_pairs(3, gen)
    a = slice(0, 2)
    expected = torch.stack(
        [
            product_then(ALPHA, [s] * 3, outer_grad(t, gd_last(w, ALPHA, [s] * 3, moving=a)), a)
            for s, t in pairs
        ]
    ).mean(0)
    grads, _ = meta_grads(
        TwoBlock(w),
        two_block_loss,
        tm.GradientDescent(3, ALPHA),
        tm.HessianFree(0.1),
        tasks,
        adapted=["a"],
    )
    assert relative_error(torch.cat([grads["a"], grads["f"]]), expected) < TIGHT


class TwoBlock(nn.Module):
    """``x = (a, f)``, two parameters, for selections: ``adapted=["a"]``."""

    def __init__(self, x: Tensor) -> None:
        super().__init__()
        self.a = nn.Parameter(x[:2].clone())
        self.f = nn.Parameter(x[2:].clone())


def two_block_loss(model: TwoBlock, batch: Quadratic) -> Tensor:
    return quadratic_loss_of(torch.cat([model.a, model.f]), batch)


def quadratic_loss_of(x: Tensor, batch: Quadratic) -> Tensor:
    a, c = batch
    loss: Tensor = 0.5 * x @ a @ x - c @ x
    return loss


# ---------------------------------------------------------------- Proximal and Implicit


LAM = 2.0


def proximal_last(
    w: Tensor, support: Quadratic, steps: int, lam: float, alpha: float = ALPHA
) -> Tensor:
    return gd_last(w, alpha, [support] * steps, lam)


@pytest.mark.parametrize("estimator", [tm.Exact(), tm.FiniteSum()], ids=["Exact", "FiniteSum"])
def test_differentiating_through_proximal_matches_its_closed_form(
    estimator: tm.MetaGradientEstimator, gen: torch.Generator
) -> None:
    """``phi_{j+1} = M phi_j + alpha lam w + alpha c``, ``M = I - alpha (A + lam I)``:
    ``G = (M^N + alpha lam sum_k M^k) (A_T phi_N - c_T)``. FiniteSum gets the anchor's
    share through the state's cotangent, Exact through the unrolled graph."""
    steps = 4
    w = torch.randn(DIM, generator=gen, dtype=torch.float64)
    pairs, tasks = support_query_pairs(3, gen)
    eye = torch.eye(DIM, dtype=torch.float64)
    expected = []
    for s, t in pairs:
        m = eye - ALPHA * (s[0] + LAM * eye)
        jacobian = torch.linalg.matrix_power(m, steps) + ALPHA * LAM * sum(
            (torch.linalg.matrix_power(m, k) for k in range(steps)), torch.zeros_like(eye)
        )
        expected.append(jacobian @ outer_grad(t, proximal_last(w, s, steps, LAM)))
    inner = tm.Proximal(tm.GradientDescent(steps, ALPHA), LAM)
    assert (
        relative_error(vector_grad(w, inner, estimator, tasks), torch.stack(expected).mean(0))
        < TIGHT
    )


@pytest.mark.parametrize("steps", [1, 5])
def test_implicit_on_quadratics_matches_the_closed_form_at_phi_n(
    steps: int, gen: torch.Generator
) -> None:
    """``G = (I + A_S / lam)^{-1} (A_T phi_N - c_T)`` at the inner loop's phi_N: CG with
    cg_steps = dim is exact. ``MetaOptimizer.adapt`` returns that same phi_N."""
    w = torch.randn(DIM, generator=gen, dtype=torch.float64)
    pairs, tasks = support_query_pairs(3, gen)
    inner = tm.Proximal(tm.GradientDescent(steps, ALPHA), LAM)
    expected = torch.stack(
        [
            implicit_closed_form(s[0], LAM, outer_grad(t, proximal_last(w, s, steps, LAM)))
            for s, t in pairs
        ]
    ).mean(0)
    assert relative_error(vector_grad(w, inner, tm.Implicit(cg_steps=DIM), tasks), expected) < TIGHT
    # The paper's Implicit(lam, cg_steps), with the inner loop's lam: the same gradient.
    stated = vector_grad(w, inner, tm.Implicit(LAM, DIM), tasks)
    assert torch.equal(stated, vector_grad(w, inner, tm.Implicit(cg_steps=DIM), tasks))

    meta_opt = tm.MetaOptimizer(
        Vector(w),
        quadratic_loss,
        inner_loop=inner,
        estimator=tm.Implicit(cg_steps=DIM),
        step_size=tm.Constant(1.0),
    )
    for (s, _), task in zip(pairs, tasks, strict=True):
        adapted = meta_opt.adapt(task)["w"]
        assert relative_error(adapted, proximal_last(w, s, steps, LAM)) < SAME


def test_implicit_with_a_converged_inner_loop_is_the_implicit_gradient(
    gen: torch.Generator,
) -> None:
    """Many inner steps: phi_N -> phi* = (A_S + lam I)^{-1} (c_S + lam w), and both Implicit
    and Exact (autograd through the unrolled proximal loop) -> the implicit gradient at phi*.

    alpha = 0.2, lam = 1, eig(A_S) in [0.5, 2]: each step contracts by 0.7 at most, so
    after 200 steps phi_N is phi* to rounding.
    """
    steps, alpha, lam = 200, 0.2, 1.0
    w = torch.randn(DIM, generator=gen, dtype=torch.float64)
    pairs, tasks = support_query_pairs(2, gen)
    eye = torch.eye(DIM, dtype=torch.float64)
    expected = []
    for s, t in pairs:
        phi_star = torch.linalg.solve(s[0] + lam * eye, s[1] + lam * w)
        assert relative_error(proximal_last(w, s, steps, lam, alpha), phi_star) < 1e-13
        expected.append(implicit_closed_form(s[0], lam, outer_grad(t, phi_star)))
    implicit_gradient = torch.stack(expected).mean(0)
    inner = tm.Proximal(tm.GradientDescent(steps, alpha), lam)
    assert (
        relative_error(vector_grad(w, inner, tm.Implicit(cg_steps=DIM), tasks), implicit_gradient)
        < TIGHT
    )
    assert relative_error(vector_grad(w, inner, tm.Exact(), tasks), implicit_gradient) < TIGHT
    few = tm.Proximal(tm.GradientDescent(3, alpha), lam)
    assert relative_error(vector_grad(w, few, tm.Exact(), tasks), implicit_gradient) > 1e-3


def test_implicit_on_an_mlp_equals_a_dense_hessian_solve(gen: torch.Generator) -> None:
    """CG to convergence (100 iterations, 25 parameters) against torch.linalg.solve with
    the full support Hessian at the hand-computed phi_N."""
    tasks = regression_tasks(3, gen)
    steps = 5
    expected = mean_by_hand(
        make_mlp(0), tasks, lambda weights, task: implicit_by_dense_solve(weights, task, steps, LAM)
    )
    inner = tm.Proximal(tm.GradientDescent(steps, ALPHA), LAM)
    assert (
        params_relative_error(mlp_grads(inner, tm.Implicit(cg_steps=100), tasks), expected) < TIGHT
    )


def test_exact_through_a_converged_proximal_loop_matches_implicit_on_an_mlp(
    gen: torch.Generator,
) -> None:
    """The consistency of the pair: both converge to the same implicit gradient."""
    tasks = regression_tasks(2, gen)
    inner = tm.Proximal(tm.GradientDescent(150, 0.2), 3.0)
    exact = mlp_grads(inner, tm.Exact(), tasks)
    implicit = mlp_grads(inner, tm.Implicit(cg_steps=100), tasks)
    assert params_relative_error(implicit, exact) < 1e-8


def test_implicit_stops_early_at_its_tolerance(gen: torch.Generator) -> None:
    """With tol, CG stops once converged (at most dim + 1 HVPs a task on a quadratic),
    with the same answer; without, it runs all cg_steps."""
    w = torch.randn(DIM, generator=gen, dtype=torch.float64)
    pairs, tasks = support_query_pairs(3, gen)
    inner = tm.Proximal(tm.GradientDescent(3, ALPHA), LAM)
    expected = torch.stack(
        [
            implicit_closed_form(s[0], LAM, outer_grad(t, proximal_last(w, s, 3, LAM)))
            for s, t in pairs
        ]
    ).mean(0)
    for chunk in (None, 1):
        grads, info = meta_grads(
            Vector(w),
            quadratic_loss,
            inner,
            tm.Implicit(cg_steps=50, tol=1e-13),
            tasks,
            task_chunk_size=chunk,
        )
        assert relative_error(grads["w"], expected) < TIGHT
        assert info.hvp_evals <= 3 * (DIM + 1)
        _, info = meta_grads(
            Vector(w), quadratic_loss, inner, tm.Implicit(cg_steps=50), tasks, task_chunk_size=chunk
        )
        assert info.hvp_evals == 3 * 50


def test_implicit_takes_any_inner_loop_under_proximal(gen: torch.Generator) -> None:
    """The implicit gradient does not depend on how phi_N was reached: heavy ball here."""
    w = torch.randn(DIM, generator=gen, dtype=torch.float64)
    pairs, tasks = support_query_pairs(2, gen)
    heavy = HeavyBall(steps=4, lr=0.05, momentum=0.5)
    expected = []
    for s, t in pairs:
        x, velocity = w, torch.zeros_like(w)
        for _ in range(heavy.steps):
            velocity = heavy.momentum * velocity + outer_grad(s, x) + LAM * (x - w)
            x = x - heavy.lr * velocity
        expected.append(implicit_closed_form(s[0], LAM, outer_grad(t, x)))
    actual = vector_grad(w, tm.Proximal(heavy, LAM), tm.Implicit(cg_steps=DIM), tasks)
    assert relative_error(actual, torch.stack(expected).mean(0)) < TIGHT


def test_implicit_with_an_adapted_selection(gen: torch.Generator) -> None:
    """Only ``a`` adapts; ``f`` is a fixed input of the inner problem:
    ``G_a = (I + A_aa / lam)^{-1} g_a`` and ``G_f = g_f - A_fa G_a / lam``; Exact through
    a converged loop (autograd) agrees."""
    w = torch.randn(DIM, generator=gen, dtype=torch.float64)
    pairs, tasks = support_query_pairs(2, gen)
    a, f = slice(0, 2), slice(2, DIM)
    steps, alpha, lam = 200, 0.2, 1.0
    expected = []
    for s, t in pairs:
        g = outer_grad(t, gd_last(w, alpha, [s] * steps, lam, moving=a))
        g_a = implicit_closed_form(s[0][a, a], lam, g[a])
        expected.append(torch.cat([g_a, g[f] - s[0][f, a] @ g_a / lam]))
    implicit_gradient = torch.stack(expected).mean(0)
    inner = tm.Proximal(tm.GradientDescent(steps, alpha), lam)
    for estimator in (tm.Implicit(cg_steps=2), tm.Exact()):
        grads, _ = meta_grads(TwoBlock(w), two_block_loss, inner, estimator, tasks, adapted=["a"])
        actual = torch.cat([grads["a"], grads["f"]])
        assert relative_error(actual, implicit_gradient) < TIGHT, type(estimator).__name__


# ---------------------------------------------------------------- every path, one answer


def family(name: str, steps: int = 3) -> tuple[tm.InnerLoop, tm.MetaGradientEstimator]:
    gd = tm.GradientDescent(steps, ALPHA)
    families: dict[str, tuple[tm.InnerLoop, tm.MetaGradientEstimator]] = {
        "FirstOrder": (gd, tm.FirstOrder()),
        "Reptile": (gd, tm.Reptile()),
        "HessianFree": (gd, tm.HessianFree(1e-2)),
        "Implicit": (tm.Proximal(gd, LAM), tm.Implicit(cg_steps=30)),
    }
    return families[name]


NAMES = ["FirstOrder", "Reptile", "HessianFree", "Implicit"]


@pytest.mark.parametrize("name", NAMES)
def test_vectorised_stacked_and_task_by_task_paths_agree(name: str, gen: torch.Generator) -> None:
    """A list (vmapped, stacked on the fly), a StackedTasks, chunks of 2, and one by one."""
    tasks = regression_tasks(5, gen)
    inner, estimator = family(name)
    reference = mlp_grads(inner, estimator, tasks, task_chunk_size=1)
    for data, chunk in ((tasks, "auto"), (tm.StackedTasks.stack(tasks), None), (tasks, 2)):
        actual = mlp_grads(inner, estimator, data, task_chunk_size=chunk)
        assert params_relative_error(actual, reference) < SAME, (type(data).__name__, chunk)


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("steps", [1, 3])
def test_oracle_counts(name: str, steps: int, gen: torch.Generator) -> None:
    """B = 3 tasks: FirstOrder B(N+1) gradients; Reptile BN; HessianFree B(N+1) + 2BN;
    Implicit B(N+1) and B * cg_steps HVPs (tol = 0), one more per task with a selection."""
    tasks = regression_tasks(3, gen)
    inner, estimator = family(name, steps)
    expected = {
        "FirstOrder": (3 * (steps + 1), 0),
        "Reptile": (3 * steps, 0),
        "HessianFree": (3 * (steps + 1) + 2 * 3 * steps, 0),
        "Implicit": (3 * (steps + 1), 3 * 30),
    }[name]
    for chunk in ("auto", 1):
        _, info = meta_grads(make_mlp(0), mse_loss, inner, estimator, tasks, task_chunk_size=chunk)
        assert (info.grad_evals, info.hvp_evals) == expected
    if name in ("FirstOrder", "HessianFree", "Implicit"):
        _, info = meta_grads(make_mlp(0), mse_loss, inner, estimator, tasks, adapted=["2"])
        extra = 3 if name == "Implicit" else 0
        assert (info.grad_evals, info.hvp_evals) == (expected[0], expected[1] + extra)


@pytest.mark.parametrize("name", NAMES)
def test_a_meta_step_runs_end_to_end(name: str, gen: torch.Generator) -> None:
    """``w - beta G``, G as meta_backward gives it; adapt returns weights; state_dict loads."""
    tasks = regression_tasks(3, gen)
    inner, estimator = family(name)
    grads = mlp_grads(inner, estimator, tasks)
    model = make_mlp(0)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    meta_opt = tm.MetaOptimizer(
        model, mse_loss, inner_loop=inner, estimator=estimator, step_size=tm.Constant(0.05)
    )
    info = meta_opt.step(tasks)
    assert info.beta == 0.05
    after = {n: p.detach() for n, p in model.named_parameters()}
    expected = {n: before[n] - 0.05 * grads[n] for n in before}
    assert params_relative_error(after, expected) < SAME
    assert set(meta_opt.adapt(tasks[0])) == set(before)
    meta_opt.step(tasks)
    meta_opt.load_state_dict(meta_opt.state_dict())


# ---------------------------------------------------------------- refusals


def gd() -> tm.GradientDescent:
    return tm.GradientDescent(2, ALPHA)


def wrong(value: object) -> Any:
    """A value of the wrong type, passed as the type checker would refuse."""
    return value


BAD_ARGUMENTS: list[tuple[Callable[[], object], type[Exception], str]] = [
    (lambda: tm.HessianFree(0.0), ValueError, "'delta' must be a finite number > 0 (got 0.0)"),
    (lambda: tm.HessianFree(-1e-3), ValueError, "'delta' must be a finite number > 0 (got -0.001)"),
    (
        lambda: tm.HessianFree(float("nan")),
        ValueError,
        "'delta' must be a finite number > 0 (got nan)",
    ),
    (
        lambda: tm.HessianFree(float("inf")),
        ValueError,
        "'delta' must be a finite number > 0 (got inf)",
    ),
    (
        lambda: tm.HessianFree(wrong("0.1")),
        TypeError,
        "'delta' must be a finite number > 0 (got '0.1')",
    ),
    (lambda: tm.HessianFree(True), TypeError, "'delta' must be a finite number > 0 (got True)"),
    (
        lambda: tm.HessianFree(0.1, inner_size=0),
        ValueError,
        "'inner_size' must be a positive int (got 0)",
    ),
    (
        lambda: tm.HessianFree(0.1, hessian_size=wrong(2.5)),
        TypeError,
        "'hessian_size' must be a positive int (got 2.5)",
    ),
    (
        lambda: tm.HessianFree(0.1, outer_size=-1),
        ValueError,
        "'outer_size' must be a positive int (got -1)",
    ),
    (lambda: tm.Implicit(cg_steps=0), ValueError, "'cg_steps' must be a positive int (got 0)"),
    (lambda: tm.Implicit(0.0, 5), ValueError, "'lam' must be a finite number > 0 (got 0.0)"),
    (lambda: tm.Implicit(float("inf")), ValueError, "'lam' must be a finite number > 0 (got inf)"),
    (
        lambda: tm.Implicit(cg_steps=wrong(5.0)),
        TypeError,
        "'cg_steps' must be a positive int (got 5.0)",
    ),
    (lambda: tm.Implicit(cg_steps=True), TypeError, "'cg_steps' must be a positive int (got True)"),
    (
        lambda: tm.Implicit(cg_steps=5, tol=-1e-6),
        ValueError,
        "'tol' must be a finite number >= 0 (got -1e-06)",
    ),
    (
        lambda: tm.Implicit(cg_steps=5, tol=float("nan")),
        ValueError,
        "'tol' must be a finite number >= 0 (got nan)",
    ),
    (lambda: tm.Proximal(gd(), 0.0), ValueError, "'lam' must be a finite number > 0 (got 0.0)"),
    (lambda: tm.Proximal(gd(), -2), ValueError, "'lam' must be a finite number > 0 (got -2.0)"),
    (
        lambda: tm.Proximal(gd(), float("nan")),
        ValueError,
        "'lam' must be a finite number > 0 (got nan)",
    ),
    (
        lambda: tm.Proximal(gd(), float("inf")),
        ValueError,
        "'lam' must be a finite number > 0 (got inf)",
    ),
    (
        lambda: tm.Proximal(wrong("sgd"), 1.0),
        TypeError,
        "'inner_loop' must implement the InnerLoop protocol (got an object of type str)",
    ),
    (lambda: tm.Reptile(scale=0.0), ValueError, "'scale' must be a finite number > 0 (got 0.0)"),
    (
        lambda: tm.Reptile(scale=float("nan")),
        ValueError,
        "'scale' must be a finite number > 0 (got nan)",
    ),
    (lambda: tm.Reptile(inner_size=0), ValueError, "'inner_size' must be a positive int (got 0)"),
    (
        lambda: tm.FirstOrder(outer_size=0),
        ValueError,
        "'outer_size' must be a positive int (got 0)",
    ),
    (
        lambda: tm.FirstOrder(inner_size=wrong(1.5)),
        TypeError,
        "'inner_size' must be a positive int (got 1.5)",
    ),
]


@pytest.mark.parametrize(("build", "error", "message"), BAD_ARGUMENTS)
def test_bad_arguments_are_refused_with_exact_messages(
    build: Callable[[], object], error: type[Exception], message: str
) -> None:
    with pytest.raises(error, match=f"^{re.escape(message)}$"):
        build()


HEAVY = HeavyBall(steps=2, lr=0.05, momentum=0.9)
PROXIMAL = tm.Proximal(tm.GradientDescent(2, ALPHA), LAM)

REFUSED: list[
    tuple[str, tm.InnerLoop, tm.MetaGradientEstimator, str, dict[str, Any], type[Exception], str]
] = [
    (
        "HessianFree, heavy ball",
        HEAVY,
        tm.HessianFree(1e-3),
        "support-query",
        {},
        TypeError,
        "HessianFree needs a GradientDescent inner loop: its finite differences stand for the "
        "Hessian-vector products of gradient-descent steps (got an inner loop of type HeavyBall)",
    ),
    (
        "HessianFree, proximal",
        PROXIMAL,
        tm.HessianFree(1e-3),
        "support-query",
        {"adapted": ["2"]},
        TypeError,
        "HessianFree needs a GradientDescent inner loop: its finite differences stand for the "
        "Hessian-vector products of gradient-descent steps (got an inner loop of type Proximal)",
    ),
    (
        "HessianFree, sampler sizes",
        tm.GradientDescent(2, ALPHA),
        tm.HessianFree(1e-3, inner_size=2),
        "sampler",
        {},
        ValueError,
        "HessianFree needs 'inner_size', 'hessian_size' and 'outer_size' for sampler tasks "
        "(got inner_size=2, hessian_size=None, outer_size=None)",
    ),
    (
        "Implicit, plain gradient descent",
        tm.GradientDescent(2, ALPHA),
        tm.Implicit(cg_steps=5),
        "support-query",
        {},
        TypeError,
        "Implicit needs a Proximal inner loop, whose regularised inner problem it "
        "differentiates: wrap yours as tm.Proximal(inner_loop, lam) "
        "(got an inner loop of type GradientDescent)",
    ),
    (
        "Implicit(lam), plain gradient descent",
        tm.GradientDescent(2, ALPHA),
        tm.Implicit(0.5, 5),
        "support-query",
        {},
        TypeError,
        "Implicit needs a Proximal inner loop, whose regularised inner problem it "
        "differentiates: wrap yours as tm.Proximal(inner_loop, lam=0.5) "
        "(got an inner loop of type GradientDescent)",
    ),
    (
        "Implicit, another lam",
        PROXIMAL,
        tm.Implicit(LAM + 1, 5),
        "support-query",
        {},
        ValueError,
        f"Implicit(lam={LAM + 1:g}) differs from its Proximal inner loop's lam={LAM:g}: "
        "the regularised problem has one lam",
    ),
    (
        "Implicit, samplers",
        PROXIMAL,
        tm.Implicit(cg_steps=5),
        "sampler",
        {},
        TypeError,
        "Implicit needs SupportQuery tasks: its inner problem is a fixed support "
        "set's regularised loss ('tasks' holds samplers)",
    ),
    (
        "Reptile, heavy ball without a scale",
        HEAVY,
        tm.Reptile(),
        "support-query",
        {},
        TypeError,
        "Reptile() takes its scale 1 / (N * lr) from a GradientDescent inner loop "
        "(got an inner loop of type HeavyBall); pass Reptile(scale=...) for other inner "
        "loops (scale=1.0 gives G = w - w_N)",
    ),
    (
        "Reptile, a selection",
        tm.GradientDescent(2, ALPHA),
        tm.Reptile(),
        "support-query",
        {"adapted": ["2"]},
        ValueError,
        "Reptile moves each parameter by its inner-loop displacement w - w_N, which is 0 for "
        "the parameters that 'adapted' leaves out: they would never be trained. Adapt all of "
        "them, or freeze the others with requires_grad_(False)",
    ),
    (
        "Reptile, sampler sizes",
        tm.GradientDescent(2, ALPHA),
        tm.Reptile(inner_size=3),
        "sampler",
        {},
        ValueError,
        "Reptile needs 'inner_size' and 'outer_size' for sampler tasks "
        "(got inner_size=3, outer_size=None)",
    ),
    (
        "FirstOrder, sampler sizes",
        tm.GradientDescent(2, ALPHA),
        tm.FirstOrder(),
        "sampler",
        {},
        ValueError,
        "FirstOrder needs 'inner_size' and 'outer_size' for sampler tasks "
        "(got inner_size=None, outer_size=None)",
    ),
]


@pytest.mark.parametrize(
    ("case", "inner", "estimator", "kind", "options", "error", "message"),
    REFUSED,
    ids=[case[0] for case in REFUSED],
)
def test_refused_configurations_raise_and_change_nothing(
    case: str,
    inner: tm.InnerLoop,
    estimator: tm.MetaGradientEstimator,
    kind: str,
    options: dict[str, Any],
    error: type[Exception],
    message: str,
) -> None:
    """step and meta_backward raise the exact message; weights, .grad, generator untouched."""
    tasks: list[Any]
    if kind == "sampler":
        tasks = [RegressionSampler(1.0, 0.0), RegressionSampler(2.0, 0.5)]
    else:
        tasks = list(regression_tasks(2, torch.Generator().manual_seed(0)))
    model = make_mlp(0)
    before = [p.detach().clone() for p in model.parameters()]
    meta_opt = tm.MetaOptimizer(
        model,
        mse_loss,
        inner_loop=inner,
        estimator=estimator,
        step_size=tm.Constant(0.1),
        **options,
    )
    generator_state = meta_opt.generator.get_state()
    for call in (meta_opt.step, meta_opt.meta_backward):
        with pytest.raises(error, match=f"^{re.escape(message)}$"):
            call(tasks)
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before, strict=True))
    assert all(p.grad is None for p in model.parameters())
    assert torch.equal(meta_opt.generator.get_state(), generator_state)
    assert meta_opt.meta_steps == 0


# ---------------------------------------------------------------- compiled


@pytest.mark.slow
def test_the_compiled_recursion_runs_through_proximal(gen: torch.Generator) -> None:
    """torch.compile's scan takes Proximal's state (no warning): FiniteSum, compiled = eager."""
    tasks = regression_tasks(4, gen)
    inner = tm.Proximal(tm.GradientDescent(3, ALPHA), LAM)
    eager = mlp_grads(inner, tm.FiniteSum(), tasks, task_chunk_size=None)
    compiled = mlp_grads(inner, tm.FiniteSum(), tasks, task_chunk_size=None, compile=True)
    assert params_relative_error(compiled, eager) < SAME


def test_a_state_dict_with_proximal_loads_into_a_fresh_optimizer(gen: torch.Generator) -> None:
    """The configuration check compares Proximal's repr: run-independent, also around a
    user's inner loop that is no dataclass (no memory address in it)."""
    tasks = regression_tasks(2, gen)

    def build() -> tm.MetaOptimizer[nn.Sequential, tuple[Tensor, Tensor]]:
        return tm.MetaOptimizer(
            make_mlp(0),
            mse_loss,
            inner_loop=tm.Proximal(HeavyBall(steps=2, lr=0.05, momentum=0.5), LAM),
            estimator=tm.Implicit(cg_steps=10),
            step_size=tm.Constant(0.1),
        )

    first = build()
    first.step(tasks)
    second = build()
    second.load_state_dict(first.state_dict())
    assert second.meta_steps == 1
