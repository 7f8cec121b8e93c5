"""The estimators against closed forms, autograd and finite differences (float64).

The paper's three (Exact, FiniteSum, Resampled: eq. 3, 12 and 7), then FirstOrder,
Reptile, HessianFree and Implicit. Each is checked against an independent
computation: a closed form on quadratics (eq. 7's product, and iMAML's implicit
gradient ``(I + A_S / lam)^{-1} (A_T phi - c_T)``), the algorithm written out by hand
with ``torch.autograd`` on the hand-written MLP of tests/problems.py, a dense Hessian
solve, or finite differences of the meta objective. Then: the oracle counts of
Corollaries 6 and 10, every path of each estimator, a meta step end to end, and the
refusals: bad arguments and refused configurations, with their exact messages,
before anything changes.
"""

from __future__ import annotations

import itertools
import re
from collections.abc import Callable
from typing import Any

import pytest
import torch
from hypothesis import given, settings
from torch import Tensor

import torch_maml as tm
from tests.problems import (
    ALPHA,
    DIM,
    HESSIAN,
    INNER,
    LAM,
    OUTER,
    SAME,
    TIGHT,
    MlpProblem,
    NoisyQuadratic,
    Pair,
    Quadratic,
    QuadraticSequence,
    Recorder,
    RegressionSampler,
    TwoBlock,
    Vector,
    Weights,
    closed_form_meta_gradient,
    dense_hessian,
    descend,
    flat,
    gd_last,
    grads_at,
    heavy_ball_by_hand,
    implicit_closed_form,
    make_mlp,
    mean_by_hand,
    meta_gradient,
    meta_objective,
    mlp_meta_gradient,
    mlp_problems,
    mse_by_hand,
    mse_loss,
    norm,
    outer_grad,
    params_relative_error,
    product_then,
    proximal_last,
    quadratic_loss,
    query_gradient_scale,
    random_quadratic,
    reference_meta_gradient,
    regression_tasks,
    relative_error,
    support_query_pairs,
    two_block_loss,
    unflat,
    vector_meta_gradient,
)
from tests.typing_cases.user_components import HeavyBall


def gd(steps: int) -> tm.GradientDescent:
    return tm.GradientDescent(steps, ALPHA)


# ---------------------------------------------------------------- the paper's three, quadratics


@pytest.mark.parametrize("steps", [1, 2, 5])
def test_support_query_quadratics_match_closed_form(steps: int, gen: torch.Generator) -> None:
    """Different support and query quadratics: all three estimators equal eq. 12's closed form."""
    w = torch.randn(DIM, generator=gen, dtype=torch.float64)
    pairs, support_query = support_query_pairs(3, gen)
    expected = torch.stack(
        [closed_form_meta_gradient(w, ALPHA, [s] * steps, [s] * steps, t) for s, t in pairs]
    ).mean(0)
    samplers = [
        QuadraticSequence({INNER: [s] * steps, HESSIAN: [s] * steps, OUTER: [t]}) for s, t in pairs
    ]
    results = {
        "Exact": vector_meta_gradient(w, gd(steps), tm.Exact(), support_query),
        "FiniteSum": vector_meta_gradient(w, gd(steps), tm.FiniteSum(), support_query),
        "Resampled": vector_meta_gradient(
            w, gd(steps), tm.Resampled(INNER, HESSIAN, OUTER), samplers
        ),
    }
    for name, actual in results.items():
        assert relative_error(actual, expected) < TIGHT, name


def per_step_families(
    steps: int, gen: torch.Generator
) -> tuple[list[Quadratic], list[Quadratic], Quadratic]:
    inner = [random_quadratic(DIM, gen) for _ in range(steps)]
    hessian = [random_quadratic(DIM, gen) for _ in range(steps)]
    return inner, hessian, random_quadratic(DIM, gen)


@pytest.mark.parametrize("steps", [1, 2, 5])
def test_a_different_quadratic_at_each_step_matches_closed_form(
    steps: int, gen: torch.Generator
) -> None:
    """``G = prod_j (I - alpha A_{S,j}) (A_T w_N - c_T)``, product in step order.

    Exact differentiates the sampled loop; Resampled gets Hessian batches equal to
    the inner ones. (FiniteSum uses one support set at every step by definition; its
    recursion order is checked on the MLP, whose Hessian changes from step to step.)
    """
    w = torch.randn(DIM, generator=gen, dtype=torch.float64)
    families = [per_step_families(steps, gen) for _ in range(3)]
    expected = torch.stack(
        [closed_form_meta_gradient(w, ALPHA, s, s, t) for s, _, t in families]
    ).mean(0)

    def samplers() -> list[QuadraticSequence]:
        return [QuadraticSequence({INNER: s, HESSIAN: s, OUTER: [t]}) for s, _, t in families]

    exact = vector_meta_gradient(
        w, gd(steps), tm.Exact(inner_size=INNER, outer_size=OUTER), samplers()
    )
    resampled = vector_meta_gradient(w, gd(steps), tm.Resampled(INNER, HESSIAN, OUTER), samplers())
    assert relative_error(exact, expected) < TIGHT
    assert relative_error(resampled, expected) < TIGHT
    if steps > 1:  # the test has the power to see a reversed product
        reversed_order = torch.stack(
            [closed_form_meta_gradient(w, ALPHA, s, s[::-1], t) for s, _, t in families]
        ).mean(0)
        assert relative_error(reversed_order, expected) > 1e5 * TIGHT


@pytest.mark.parametrize("steps", [1, 2, 5])
def test_resampled_takes_hessians_on_their_own_batches(steps: int, gen: torch.Generator) -> None:
    """Eq. 7 proper: Hessians from quadratics other than the inner ones.

    Resampled equals ``prod_j (I - alpha A_{D,j}) (A_T w_N - c_T)``; autograd through
    the unrolled loop (Exact on the same sampler) cannot, and gives the A_S product.
    """
    w = torch.randn(DIM, generator=gen, dtype=torch.float64)
    families = [per_step_families(steps, gen) for _ in range(3)]
    eq7 = torch.stack([closed_form_meta_gradient(w, ALPHA, s, d, t) for s, d, t in families]).mean(
        0
    )
    unrolled = torch.stack(
        [closed_form_meta_gradient(w, ALPHA, s, s, t) for s, _, t in families]
    ).mean(0)

    def samplers() -> list[QuadraticSequence]:
        return [QuadraticSequence({INNER: s, HESSIAN: d, OUTER: [t]}) for s, d, t in families]

    resampled = vector_meta_gradient(w, gd(steps), tm.Resampled(INNER, HESSIAN, OUTER), samplers())
    exact = vector_meta_gradient(
        w, gd(steps), tm.Exact(inner_size=INNER, outer_size=OUTER), samplers()
    )
    assert relative_error(resampled, eq7) < TIGHT
    assert relative_error(exact, unrolled) < TIGHT
    assert relative_error(exact, eq7) > 1e-2  # plain unrolled autograd fails eq. 7


# ---------------------------------------------------------------- the paper's three, the MLP


@pytest.mark.parametrize("steps", [1, 3, 5])
def test_finite_sum_equals_exact_and_autograd_on_an_mlp(steps: int, gen: torch.Generator) -> None:
    """FiniteSum (HVP recursion) == Exact (unrolled) == torch.autograd unrolled by hand."""
    tasks = regression_tasks(4, gen)
    reference = reference_meta_gradient(make_mlp(0), tasks, steps, ALPHA)
    exact = mlp_meta_gradient(gd(steps), tm.Exact(), tasks)
    finite_sum = mlp_meta_gradient(gd(steps), tm.FiniteSum(), tasks)
    assert params_relative_error(finite_sum, exact) < TIGHT
    assert params_relative_error(exact, reference) < TIGHT
    assert params_relative_error(finite_sum, reference) < TIGHT


@pytest.mark.parametrize("steps", [1, 3])
def test_exact_equals_finite_differences_of_the_meta_objective(
    steps: int, gen: torch.Generator
) -> None:
    """Directional derivatives of ``mean_i l(w_N^i(w); T_i)`` by a 5-point stencil.

    The stencil's truncation error is O(h^4) and its rounding O(1e-16 / h): with
    h = 1e-3 both are far below the 1e-8 tolerance.
    """
    tasks = regression_tasks(3, gen)
    exact = mlp_meta_gradient(gd(steps), tm.Exact(), tasks)
    model = make_mlp(0)
    weights = [p.detach() for p in model.parameters()]
    names = [n for n, _ in model.named_parameters()]
    h = 1e-3
    for _ in range(3):
        direction = [torch.randn(p.shape, generator=gen, dtype=torch.float64) for p in weights]

        def objective(t: float, direction: list[Tensor] = direction) -> float:
            moved = [p + t * u for p, u in zip(weights, direction, strict=True)]
            return float(meta_objective(tasks, steps, ALPHA, moved))

        fd = (-objective(2 * h) + 8 * objective(h) - 8 * objective(-h) + objective(-2 * h)) / (
            12 * h
        )
        analytic = float(sum((exact[n] * u).sum() for n, u in zip(names, direction, strict=True)))
        assert abs(analytic - fd) <= 1e-8 * abs(analytic)


@pytest.mark.parametrize("steps", [1, 3])
def test_resampled_on_an_mlp_equals_the_surrogate_step_unrolled(steps: int) -> None:
    """Eq. 7 on a non-quadratic loss, against an independent check: unrolling the
    surrogate step ``w_{j+1} = w_j - alpha g(w_j; D_j) + stopgrad(alpha g(w_j; D_j) -
    alpha g(w_j; S_j))`` has the iterates of eq. 6 and the derivative of eq. 7."""
    recorders = [Recorder(RegressionSampler(1.0 + i, 0.5 * i)) for i in range(3)]
    resampled = mlp_meta_gradient(gd(steps), tm.Resampled(INNER, HESSIAN, OUTER), recorders)

    model = make_mlp(0)
    names = [n for n, _ in model.named_parameters()]
    total = [torch.zeros_like(p) for p in model.parameters()]
    for recorder in recorders:
        inner, hessian = recorder.batches[INNER], recorder.batches[HESSIAN]
        (outer,) = recorder.batches[OUTER]
        w0 = [p.detach().clone().requires_grad_(True) for p in model.parameters()]
        w = list(w0)
        for j in range(steps):
            g_d = torch.autograd.grad(mse_by_hand(w, hessian[j]), w, create_graph=True)
            g_s = torch.autograd.grad(mse_by_hand(w, inner[j]), w)
            w = [
                p - ALPHA * gd + (ALPHA * gd - ALPHA * gs).detach()
                for p, gd, gs in zip(w, g_d, g_s, strict=True)
            ]
        meta = torch.autograd.grad(mse_by_hand(w, outer), w0)
        total = [t + g for t, g in zip(total, meta, strict=True)]
    reference = {n: t / len(recorders) for n, t in zip(names, total, strict=True)}
    assert params_relative_error(resampled, reference) < TIGHT


@settings(max_examples=30, deadline=None)
@given(mlp_problems())
def test_finite_sum_equals_exact_everywhere(problem: MlpProblem) -> None:
    """Any small MLP, meta-batch, N and alpha: FiniteSum and Exact equal autograd through the
    hand-written unrolled loop, with the paper's oracle counts.

    To 1e-10 of the larger of the meta gradient and the query gradients it starts from
    (rounding in eq. 12's product is relative to those: a meta gradient that cancels to nearly
    0 keeps their absolute rounding), so that every example is checked, however small its G.
    """
    model, tasks, steps, alpha = problem
    weights = [p.detach().clone() for p in model.parameters()]
    reference = reference_meta_gradient(model, tasks, steps, alpha)
    scale = max(
        float(norm(list(reference.values()))),
        query_gradient_scale(weights, tasks, steps, alpha),
    )
    assert scale > 0  # random targets: the query gradients are not all exactly 0
    for estimator in (tm.Exact(), tm.FiniteSum()):
        grads, info = meta_gradient(
            model, mse_loss, tm.GradientDescent(steps, alpha), estimator, tasks
        )
        assert (info.grad_evals, info.hvp_evals) == (len(tasks) * (steps + 1), len(tasks) * steps)
        error = float(norm([grads[name] - reference[name] for name in reference]))
        assert error <= TIGHT * scale, (type(estimator).__name__, error, scale)


def test_resampled_with_one_step_is_unbiased() -> None:
    """For N = 1, E[G] is the population meta gradient (eq. 7 with independent batches).

    2000 independent draws, in 50 meta-batches of 40 tasks (each meta gradient the mean
    of 40 draws): each coordinate's Monte Carlo mean lies within 4.5 standard errors of
    the truth (a false alarm has probability ~1e-4 per coordinate, with the standard
    error estimated from 50 means; the run is seeded, so the test is deterministic). The
    same test detects the bias of Exact on the same samplers, whose Hessian batch is the
    inner batch that moved w_1 (bias alpha^2 E[E A E] w for noise E), at more than 15
    standard errors (about 28 expected for this family).
    """
    gen = torch.Generator().manual_seed(7)
    dim, alpha, meta_batches, tasks = 2, 0.8, 50, 40
    a, c = random_quadratic(dim, gen)
    a = a / torch.linalg.eigvalsh(a).max()  # L = 1, so alpha L = 0.8: a strong Hessian term
    task = NoisyQuadratic(a, c, noise=0.5)
    w = 3 * torch.randn(dim, generator=gen, dtype=torch.float64)
    eye = torch.eye(dim, dtype=torch.float64)
    w1 = w - alpha * (a @ w - c)
    truth = (eye - alpha * a) @ (a @ w1 - c)

    def z_scores(estimator: tm.MetaGradientEstimator) -> Tensor:
        model = Vector(w)
        meta_opt = tm.MetaOptimizer(
            model,
            quadratic_loss,
            inner_loop=tm.GradientDescent(steps=1, lr=alpha),
            estimator=estimator,
            step_size=tm.Constant(1.0),
            generator=torch.Generator().manual_seed(11),
        )
        means: list[Tensor] = []
        for _ in range(meta_batches):
            model.w.grad = None
            meta_opt.meta_backward([task] * tasks)  # each task draws its own batches
            assert model.w.grad is not None
            means.append(model.w.grad.clone())
        stacked = torch.stack(means)
        standard_error = stacked.std(0) / meta_batches**0.5
        z: Tensor = (stacked.mean(0) - truth) / standard_error
        return z

    assert z_scores(tm.Resampled(inner_size=1, hessian_size=1, outer_size=1)).abs().max() < 4.5
    assert z_scores(tm.Exact(inner_size=1, outer_size=1)).abs().max() > 15


def test_resampled_is_reproducible_from_a_seeded_generator() -> None:
    tasks = [RegressionSampler(1.5, 0.3), RegressionSampler(0.7, 1.1)]

    def run(seed: int) -> list[Tensor]:
        model = make_mlp(0)
        meta_opt = tm.MetaOptimizer(
            model,
            mse_loss,
            inner_loop=gd(3),
            estimator=tm.Resampled(INNER, HESSIAN, OUTER),
            step_size=tm.Constant(0.1),
            generator=torch.Generator().manual_seed(seed),
        )
        for _ in range(3):
            meta_opt.step(tasks)
        return [p.detach().clone() for p in model.parameters()]

    first, again, other = run(5), run(5), run(6)
    assert all(torch.equal(a, b) for a, b in zip(first, again, strict=True))
    assert not all(torch.equal(a, b) for a, b in zip(first, other, strict=True))


def test_reported_loss_is_the_mean_query_loss_after_adaptation(gen: torch.Generator) -> None:
    tasks = regression_tasks(3, gen)
    model = make_mlp(0)
    meta_opt = tm.MetaOptimizer(
        model, mse_loss, inner_loop=gd(3), estimator=tm.FiniteSum(), step_size=tm.Constant(0.01)
    )
    weights = [p.detach().clone() for p in model.parameters()]
    expected = meta_objective(tasks, 3, ALPHA, weights)
    info = meta_opt.step(tasks)
    assert abs(float(info.loss) - float(expected)) <= TIGHT * float(expected)


# ---------------------------------------------------------------- FirstOrder


@pytest.mark.parametrize("steps", [1, 2, 5])
def test_first_order_on_quadratics_is_the_outer_gradient_at_w_n(
    steps: int, gen: torch.Generator
) -> None:
    """``G = A_T w_N - c_T``: support/query tasks, and samplers with a quadratic per step."""
    w = torch.randn(DIM, generator=gen, dtype=torch.float64)
    pairs, tasks = support_query_pairs(3, gen)
    expected = torch.stack([outer_grad(t, gd_last(w, ALPHA, [s] * steps)) for s, t in pairs])
    actual = vector_meta_gradient(w, gd(steps), tm.FirstOrder(), tasks)
    assert relative_error(actual, expected.mean(0)) < TIGHT

    families = [
        ([random_quadratic(DIM, gen) for _ in range(steps)], random_quadratic(DIM, gen))
        for _ in range(2)
    ]
    samplers = [QuadraticSequence({INNER: s, OUTER: [t]}) for s, t in families]
    expected = torch.stack([outer_grad(t, gd_last(w, ALPHA, s)) for s, t in families])
    estimator = tm.FirstOrder(inner_size=INNER, outer_size=OUTER)
    assert (
        relative_error(vector_meta_gradient(w, gd(steps), estimator, samplers), expected.mean(0))
        < TIGHT
    )


@pytest.mark.parametrize("steps", [1, 3])
def test_first_order_on_an_mlp_equals_the_loop_written_by_hand(
    steps: int, gen: torch.Generator
) -> None:
    tasks = regression_tasks(4, gen)

    def by_hand(weights: Weights, task: tm.SupportQuery[Pair]) -> Weights:
        return grads_at(descend(weights, task.support, steps, ALPHA)[-1], task.query)

    expected = mean_by_hand(make_mlp(0), tasks, by_hand)
    actual = mlp_meta_gradient(gd(steps), tm.FirstOrder(), tasks)
    assert params_relative_error(actual, expected) < TIGHT


def test_first_order_takes_any_inner_loop(gen: torch.Generator) -> None:
    """A user's heavy-ball inner loop: the outer gradient where it ends, by hand."""
    tasks = regression_tasks(3, gen)
    inner = HeavyBall(steps=3, lr=0.05, momentum=0.9)

    def by_hand(weights: Weights, task: tm.SupportQuery[Pair]) -> Weights:
        return grads_at(heavy_ball_by_hand(3, 0.05, 0.9, weights, task.support), task.query)

    expected = mean_by_hand(make_mlp(0), tasks, by_hand)
    assert params_relative_error(mlp_meta_gradient(inner, tm.FirstOrder(), tasks), expected) < TIGHT


def test_first_order_with_an_adapted_selection(gen: torch.Generator) -> None:
    """ANIL: only the head adapts; every parameter gets its query gradient at w_N."""
    tasks = regression_tasks(3, gen)

    def by_hand(weights: Weights, task: tm.SupportQuery[Pair]) -> Weights:
        last = descend(weights, task.support, 3, ALPHA, moving=(2, 3))[-1]
        return grads_at(last, task.query)

    expected = mean_by_hand(make_mlp(0), tasks, by_hand)
    actual = mlp_meta_gradient(gd(3), tm.FirstOrder(), tasks, adapted=["2"])
    assert params_relative_error(actual, expected) < TIGHT
    all_adapted = mlp_meta_gradient(gd(3), tm.FirstOrder(), tasks)
    assert params_relative_error(actual, all_adapted) > 1e-3  # the selection mattered


# ---------------------------------------------------------------- Reptile


@pytest.mark.parametrize("steps", [1, 2, 5])
def test_reptile_on_quadratics_is_the_mean_inner_gradient(steps: int, gen: torch.Generator) -> None:
    """``G = (w - w_N) / (N alpha)``, which is the mean of the inner gradients."""
    w = torch.randn(DIM, generator=gen, dtype=torch.float64)
    pairs, tasks = support_query_pairs(3, gen)
    mean_gradients = []
    for s, _ in pairs:
        x, total = w, torch.zeros_like(w)
        for _ in range(steps):
            total = total + outer_grad(s, x)
            x = x - ALPHA * outer_grad(s, x)
        mean_gradients.append(total / steps)
    expected = torch.stack(mean_gradients).mean(0)
    assert relative_error(vector_meta_gradient(w, gd(steps), tm.Reptile(), tasks), expected) < TIGHT
    difference = torch.stack([w - gd_last(w, ALPHA, [s] * steps) for s, _ in pairs]).mean(0)
    unit = vector_meta_gradient(w, gd(steps), tm.Reptile(scale=1.0), tasks)
    assert relative_error(unit, difference) < TIGHT
    scaled = vector_meta_gradient(w, gd(steps), tm.Reptile(scale=2.5), tasks)
    assert relative_error(scaled, 2.5 * difference) < TIGHT

    families = [[random_quadratic(DIM, gen) for _ in range(steps)] for _ in range(2)]
    samplers = [QuadraticSequence({INNER: s, OUTER: [s[0]]}) for s in families]
    expected = torch.stack([(w - gd_last(w, ALPHA, s)) / (steps * ALPHA) for s in families])
    estimator = tm.Reptile(inner_size=INNER, outer_size=OUTER)
    actual = vector_meta_gradient(w, gd(steps), estimator, samplers)
    assert relative_error(actual, expected.mean(0)) < TIGHT


@pytest.mark.parametrize("steps", [1, 3])
def test_reptile_on_an_mlp_equals_the_loop_written_by_hand(
    steps: int, gen: torch.Generator
) -> None:
    """The direction by hand, and the reported loss: the query loss at w_N."""
    tasks = regression_tasks(4, gen)
    losses = []

    def by_hand(weights: Weights, task: tm.SupportQuery[Pair]) -> Weights:
        last = descend(weights, task.support, steps, ALPHA)[-1]
        losses.append(mse_by_hand(last, task.query))
        return [(w - p) / (steps * ALPHA) for w, p in zip(weights, last, strict=True)]

    expected = mean_by_hand(make_mlp(0), tasks, by_hand)
    grads, info = meta_gradient(make_mlp(0), mse_loss, gd(steps), tm.Reptile(), tasks)
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
            inner_loop=gd(steps),
            estimator=estimator,
            step_size=tm.Constant(beta),
        )
        meta_opt.step(tasks)
        assert relative_error(model.w.detach(), expected) < TIGHT


def test_reptile_with_a_scale_takes_any_inner_loop(gen: torch.Generator) -> None:
    tasks = regression_tasks(3, gen)
    inner = HeavyBall(steps=3, lr=0.05, momentum=0.9)

    def by_hand(weights: Weights, task: tm.SupportQuery[Pair]) -> Weights:
        w = heavy_ball_by_hand(3, 0.05, 0.9, weights, task.support)
        return [0.5 * (p0 - p) for p0, p in zip(weights, w, strict=True)]

    expected = mean_by_hand(make_mlp(0), tasks, by_hand)
    actual = mlp_meta_gradient(inner, tm.Reptile(scale=0.5), tasks)
    assert params_relative_error(actual, expected) < TIGHT


# ---------------------------------------------------------------- HessianFree


def hessian_free_by_hand(
    weights: Weights, task: tm.SupportQuery[Pair], steps: int, alpha: float, delta: float
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
    pairs, tasks = support_query_pairs(3, gen)
    expected = torch.stack(
        [
            product_then(ALPHA, [s] * steps, outer_grad(t, gd_last(w, ALPHA, [s] * steps)))
            for s, t in pairs
        ]
    ).mean(0)
    actual = vector_meta_gradient(w, gd(steps), tm.HessianFree(delta), tasks)
    assert relative_error(actual, expected) < TIGHT

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
    assert relative_error(vector_meta_gradient(w, gd(steps), estimator, samplers), expected) < TIGHT


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
    actual = mlp_meta_gradient(gd(steps), tm.HessianFree(delta), tasks)
    assert params_relative_error(actual, expected) < TIGHT


@pytest.mark.parametrize("chunk", [None, 1])
def test_hessian_free_where_the_query_gradient_is_exactly_zero(
    chunk: int | None, gen: torch.Generator
) -> None:
    """A query gradient of exactly 0 at w_N gives ``G = prod_j (I - alpha A_S) 0 = 0``: every
    vector of the recursion is 0, and the difference along it (``h = delta / ||v||``, no
    direction to step along) must be 0, not ``0 * inf = NaN``. Two ways to it: ``w`` is the
    minimiser of a task whose support and query sets are the same quadratic (the inner steps
    do not move it), or the query loss is 0 whatever the weights. Among other tasks, such a
    task adds exactly 0 to the mean."""
    a = torch.diag(torch.tensor([2.0, 4.0, 0.5, 1.0], dtype=torch.float64))
    w = torch.tensor([1.0, -1.0, 2.0, 0.5], dtype=torch.float64)
    c = torch.tensor([2.0, -4.0, 1.0, 0.5], dtype=torch.float64)  # a w - c = 0, exactly
    at_minimum = tm.SupportQuery((a, c), (a, c))
    zero = torch.zeros(DIM, DIM, dtype=torch.float64), torch.zeros(DIM, dtype=torch.float64)
    zero_query = tm.SupportQuery(random_quadratic(DIM, gen), zero)
    estimator, steps = tm.HessianFree(1e-3), 3
    for task in (at_minimum, zero_query):
        alone = vector_meta_gradient(w, gd(steps), estimator, [task], task_chunk_size=chunk)
        assert torch.equal(alone, torch.zeros(DIM, dtype=torch.float64))

    pairs, others = support_query_pairs(2, gen)
    expected = (
        torch.stack(
            [
                product_then(ALPHA, [s] * steps, outer_grad(t, gd_last(w, ALPHA, [s] * steps)))
                for s, t in pairs
            ]
        ).sum(0)
        / 4
    )
    tasks = [others[0], at_minimum, others[1], zero_query]
    actual = vector_meta_gradient(w, gd(steps), estimator, tasks, task_chunk_size=chunk)
    assert relative_error(actual, expected) < TIGHT


def test_hessian_free_error_is_second_order_in_delta(gen: torch.Generator) -> None:
    """On the tanh MLP, against the exact recursion (FiniteSum): halving delta quarters it.

    From delta = 0.2 to 0.025 the truncation error (~1e-4 to ~1e-6 relative) dwarfs
    rounding (~1e-16 / delta); the ratios come out at 3.99 to 4.00.
    """
    tasks = regression_tasks(3, gen)
    exact = mlp_meta_gradient(gd(2), tm.FiniteSum(), tasks)
    errors = [
        params_relative_error(mlp_meta_gradient(gd(2), tm.HessianFree(delta), tasks), exact)
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
    grads, _ = meta_gradient(
        TwoBlock(w), two_block_loss, gd(3), tm.HessianFree(0.1), tasks, adapted=["a"]
    )
    assert relative_error(torch.cat([grads["a"], grads["f"]]), expected) < TIGHT


# ---------------------------------------------------------------- Implicit


def implicit_by_dense_solve(
    weights: Weights, task: tm.SupportQuery[Pair], steps: int, lam: float
) -> Weights:
    """``(I + H_S(phi_N) / lam)^{-1} grad l_T(phi_N)``: the full Hessian, a direct solve."""
    phi = descend(weights, task.support, steps, ALPHA, lam)[-1]

    def support_loss(vector: Tensor) -> Tensor:
        return mse_by_hand(unflat(vector, phi), task.support)

    hessian = dense_hessian(support_loss, flat(phi))
    eye = torch.eye(hessian.shape[0], dtype=torch.float64)
    solution = torch.linalg.solve(eye + hessian / lam, flat(grads_at(phi, task.query)))
    return unflat(solution, phi)


def proximal(steps: int, lam: float = LAM, alpha: float = ALPHA) -> tm.Proximal:
    return tm.Proximal(tm.GradientDescent(steps, alpha), lam)


@pytest.mark.parametrize("steps", [1, 5])
def test_implicit_on_quadratics_matches_the_closed_form_at_phi_n(
    steps: int, gen: torch.Generator
) -> None:
    """``G = (I + A_S / lam)^{-1} (A_T phi_N - c_T)`` at the inner loop's phi_N: CG with
    cg_steps = dim is exact. ``MetaOptimizer.adapt`` returns that same phi_N."""
    w = torch.randn(DIM, generator=gen, dtype=torch.float64)
    pairs, tasks = support_query_pairs(3, gen)
    inner = proximal(steps)
    expected = torch.stack(
        [
            implicit_closed_form(s[0], LAM, outer_grad(t, proximal_last(w, s, steps, LAM)))
            for s, t in pairs
        ]
    ).mean(0)
    actual = vector_meta_gradient(w, inner, tm.Implicit(cg_steps=DIM), tasks)
    assert relative_error(actual, expected) < TIGHT
    # The paper's Implicit(lam, cg_steps), with the inner loop's lam: the same gradient.
    stated = vector_meta_gradient(w, inner, tm.Implicit(LAM, DIM), tasks)
    assert torch.equal(stated, actual)

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
    inner = proximal(steps, lam, alpha)
    implicit = vector_meta_gradient(w, inner, tm.Implicit(cg_steps=DIM), tasks)
    assert relative_error(implicit, implicit_gradient) < TIGHT
    assert (
        relative_error(vector_meta_gradient(w, inner, tm.Exact(), tasks), implicit_gradient) < TIGHT
    )
    few = proximal(3, lam, alpha)
    assert relative_error(vector_meta_gradient(w, few, tm.Exact(), tasks), implicit_gradient) > 1e-3


def test_implicit_on_an_mlp_equals_a_dense_hessian_solve(gen: torch.Generator) -> None:
    """CG to convergence (100 iterations, 25 parameters) against torch.linalg.solve with
    the full support Hessian at the hand-computed phi_N."""
    tasks = regression_tasks(3, gen)
    steps = 5
    expected = mean_by_hand(
        make_mlp(0), tasks, lambda weights, task: implicit_by_dense_solve(weights, task, steps, LAM)
    )
    actual = mlp_meta_gradient(proximal(steps), tm.Implicit(cg_steps=100), tasks)
    assert params_relative_error(actual, expected) < TIGHT


def test_exact_through_a_converged_proximal_loop_matches_implicit_on_an_mlp(
    gen: torch.Generator,
) -> None:
    """The consistency of the pair: both converge to the same implicit gradient."""
    tasks = regression_tasks(2, gen)
    inner = proximal(150, 3.0, 0.2)
    exact = mlp_meta_gradient(inner, tm.Exact(), tasks)
    implicit = mlp_meta_gradient(inner, tm.Implicit(cg_steps=100), tasks)
    assert params_relative_error(implicit, exact) < 1e-8


def test_implicit_stops_early_at_its_tolerance(gen: torch.Generator) -> None:
    """With tol, CG stops once converged (at most dim + 1 HVPs a task on a quadratic),
    with the same answer; without, it runs all cg_steps."""
    w = torch.randn(DIM, generator=gen, dtype=torch.float64)
    pairs, tasks = support_query_pairs(3, gen)
    inner = proximal(3)
    expected = torch.stack(
        [
            implicit_closed_form(s[0], LAM, outer_grad(t, proximal_last(w, s, 3, LAM)))
            for s, t in pairs
        ]
    ).mean(0)
    for chunk in (None, 1):
        grads, info = meta_gradient(
            Vector(w),
            quadratic_loss,
            inner,
            tm.Implicit(cg_steps=50, tol=1e-13),
            tasks,
            task_chunk_size=chunk,
        )
        assert relative_error(grads["w"], expected) < TIGHT
        assert info.hvp_evals <= 3 * (DIM + 1)
        _, info = meta_gradient(
            Vector(w), quadratic_loss, inner, tm.Implicit(cg_steps=50), tasks, task_chunk_size=chunk
        )
        assert info.hvp_evals == 3 * 50


def cg_by_hand(matrix: Tensor, rhs: Tensor, steps: int, tol: float) -> tuple[Tensor, int]:
    """Textbook conjugate gradient from 0 on a dense system: at most ``steps`` iterations,
    stopping before the first one at which ``||r|| <= tol ||rhs||``; and the iterations run."""
    x, r = torch.zeros_like(rhs), rhs.clone()
    p, rr = r.clone(), r @ r
    for k in range(steps):
        if rr.sqrt() <= tol * rhs.norm():
            return x, k
        ap = matrix @ p
        step = rr / (p @ ap)
        x, r = x + step * p, r - step * ap
        rr, previous = r @ r, rr
        p = r + (rr / previous) * p
    return x, steps


def test_implicit_with_a_loose_tol_stops_each_task_where_it_meets_it(gen: torch.Generator) -> None:
    """tol = 1e-2 on MLP tasks: each task's CG stops at its own iteration (3 to 5 here), which
    conjugate gradient written out on the dense support Hessian at the hand-computed phi_N
    reproduces. Vectorised, a task that met tol stays where it stopped while the others go on,
    so all at once, in chunks and one by one agree to rounding."""
    tasks = regression_tasks(5, gen)
    steps, tol, cg_steps = 3, 1e-2, 30
    weights = [p.detach().clone() for p in make_mlp(0).parameters()]
    solutions, iterations, converged = [], [], []
    for task in tasks:
        phi = descend(weights, task.support, steps, ALPHA, LAM)[-1]

        def support_loss(vector: Tensor, phi: Weights = phi, batch: Pair = task.support) -> Tensor:
            return mse_by_hand(unflat(vector, phi), batch)

        hessian = dense_hessian(support_loss, flat(phi))
        matrix = torch.eye(hessian.shape[0], dtype=torch.float64) + hessian / LAM
        rhs = flat(grads_at(phi, task.query))
        solution, count = cg_by_hand(matrix, rhs, cg_steps, tol)
        solutions.append(solution)
        iterations.append(count)
        converged.append(torch.linalg.solve(matrix, rhs))
    assert len(set(iterations)) > 1, iterations  # the tasks stop at different iterations
    assert max(iterations) < cg_steps
    names = [n for n, _ in make_mlp(0).named_parameters()]
    expected = dict(zip(names, unflat(torch.stack(solutions).mean(0), weights), strict=True))
    # Running a task past its stop would move it by far more than rounding.
    assert relative_error(torch.stack(solutions).mean(0), torch.stack(converged).mean(0)) > 1e-4

    estimator = tm.Implicit(cg_steps=cg_steps, tol=tol)
    results = {}
    for chunk in (None, 2, 1):
        grads, info = meta_gradient(
            make_mlp(0), mse_loss, proximal(steps), estimator, tasks, task_chunk_size=chunk
        )
        assert params_relative_error(grads, expected) < TIGHT, chunk
        results[chunk] = grads, info.hvp_evals
    assert params_relative_error(results[None][0], results[1][0]) < SAME
    assert params_relative_error(results[2][0], results[1][0]) < SAME
    # One by one, each task pays for its own iterations; all at once, all for the last one's.
    assert results[1][1] == sum(iterations)
    assert results[None][1] == len(tasks) * max(iterations)


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
    actual = vector_meta_gradient(w, tm.Proximal(heavy, LAM), tm.Implicit(cg_steps=DIM), tasks)
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
    inner = proximal(steps, lam, alpha)
    for estimator in (tm.Implicit(cg_steps=2), tm.Exact()):
        grads, _ = meta_gradient(
            TwoBlock(w), two_block_loss, inner, estimator, tasks, adapted=["a"]
        )
        actual = torch.cat([grads["a"], grads["f"]])
        assert relative_error(actual, implicit_gradient) < TIGHT, type(estimator).__name__


# ---------------------------------------------------------------- oracle counts


@pytest.mark.parametrize("steps", [1, 2, 5])
@pytest.mark.parametrize("name", ["Exact", "FiniteSum", "Resampled"])
def test_the_papers_oracle_counts_are_linear_in_the_number_of_steps(name: str, steps: int) -> None:
    """Corollaries 6 and 10: B (N + 1) gradients and B N Hessian-vector products per step."""
    gen = torch.Generator().manual_seed(3)
    batch_size = 3
    tasks: list[Any]
    if name == "Resampled":
        estimator: tm.MetaGradientEstimator = tm.Resampled(INNER, HESSIAN, OUTER)
        tasks = [RegressionSampler(1.0, 0.0) for _ in range(batch_size)]
    else:
        estimator = tm.Exact() if name == "Exact" else tm.FiniteSum()
        tasks = list(regression_tasks(batch_size, gen))
    meta_opt = tm.MetaOptimizer(
        make_mlp(0),
        mse_loss,
        inner_loop=gd(steps),
        estimator=estimator,
        step_size=tm.Constant(0.01),
    )
    info = meta_opt.step(tasks)
    assert (info.grad_evals, info.hvp_evals) == (batch_size * (steps + 1), batch_size * steps)
    backward = meta_opt.meta_backward(tasks)
    assert (backward.grad_evals, backward.hvp_evals) == (info.grad_evals, info.hvp_evals)


def family(name: str, steps: int = 3) -> tuple[tm.InnerLoop, tm.MetaGradientEstimator]:
    families: dict[str, tuple[tm.InnerLoop, tm.MetaGradientEstimator]] = {
        "FirstOrder": (gd(steps), tm.FirstOrder()),
        "Reptile": (gd(steps), tm.Reptile()),
        "HessianFree": (gd(steps), tm.HessianFree(1e-2)),
        "Implicit": (proximal(steps), tm.Implicit(cg_steps=30)),
    }
    return families[name]


NAMES = ["FirstOrder", "Reptile", "HessianFree", "Implicit"]


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("steps", [1, 3])
def test_the_other_estimators_oracle_counts(name: str, steps: int, gen: torch.Generator) -> None:
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
        _, info = meta_gradient(
            make_mlp(0), mse_loss, inner, estimator, tasks, task_chunk_size=chunk
        )
        assert (info.grad_evals, info.hvp_evals) == expected
    if name in ("FirstOrder", "HessianFree", "Implicit"):
        _, info = meta_gradient(make_mlp(0), mse_loss, inner, estimator, tasks, adapted=["2"])
        extra = 3 if name == "Implicit" else 0
        assert (info.grad_evals, info.hvp_evals) == (expected[0], expected[1] + extra)


# ---------------------------------------------------------------- every path, one answer


@pytest.mark.parametrize("name", NAMES)
def test_vectorised_stacked_and_task_by_task_paths_agree(name: str, gen: torch.Generator) -> None:
    """A list (vmapped, stacked on the fly), a StackedTasks, chunks of 2, and one by one."""
    tasks = regression_tasks(5, gen)
    inner, estimator = family(name)
    reference = mlp_meta_gradient(inner, estimator, tasks, task_chunk_size=1)
    for data, chunk in ((tasks, "auto"), (tm.StackedTasks.stack(tasks), None), (tasks, 2)):
        actual = mlp_meta_gradient(inner, estimator, data, task_chunk_size=chunk)
        assert params_relative_error(actual, reference) < SAME, (type(data).__name__, chunk)


@pytest.mark.parametrize("name", NAMES)
def test_a_meta_step_runs_end_to_end(name: str, gen: torch.Generator) -> None:
    """``w - beta G``, G as meta_backward gives it; adapt returns weights; state_dict loads."""
    tasks = regression_tasks(3, gen)
    inner, estimator = family(name)
    grads = mlp_meta_gradient(inner, estimator, tasks)
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

# What the optimizer refuses when it is built: the estimator's check of the inner loop.
REFUSED_WHEN_BUILT: list[
    tuple[str, tm.InnerLoop, tm.MetaGradientEstimator, dict[str, Any], type[Exception], str]
] = [
    (
        "HessianFree, heavy ball",
        HEAVY,
        tm.HessianFree(1e-3),
        {},
        TypeError,
        "HessianFree needs a GradientDescent inner loop: its finite differences stand for the "
        "Hessian-vector products of gradient-descent steps (got an inner loop of type HeavyBall)",
    ),
    (
        "HessianFree, proximal",
        PROXIMAL,
        tm.HessianFree(1e-3),
        {"adapted": ["2"]},
        TypeError,
        "HessianFree needs a GradientDescent inner loop: its finite differences stand for the "
        "Hessian-vector products of gradient-descent steps "
        "(got an inner loop of type Masked(Proximal(GradientDescent)))",
    ),
    (
        "Implicit, plain gradient descent",
        tm.GradientDescent(2, ALPHA),
        tm.Implicit(cg_steps=5),
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
        {},
        ValueError,
        f"Implicit(lam={LAM + 1:g}) differs from its Proximal inner loop's lam={LAM:g}: "
        "the regularised problem has one lam",
    ),
    (
        "Reptile, heavy ball without a scale",
        HEAVY,
        tm.Reptile(),
        {},
        TypeError,
        "Reptile() needs a GradientDescent inner loop: it takes its scale 1 / (N * lr) from "
        "it; pass Reptile(scale=...) for other inner loops (scale=1.0 gives G = w - w_N) "
        "(got an inner loop of type HeavyBall)",
    ),
    (
        "Reptile, a selection",
        tm.GradientDescent(2, ALPHA),
        tm.Reptile(),
        {"adapted": ["2"]},
        ValueError,
        "Reptile moves each parameter by its inner-loop displacement w - w_N, which is 0 for "
        "the parameters that 'adapted' leaves out: they would never be trained. Adapt all of "
        "them, or freeze the others with requires_grad_(False)",
    ),
    (
        "Reptile, a Masked inner loop",
        tm.Masked(tm.GradientDescent(2, ALPHA), ["2"]),
        tm.Reptile(scale=1.0),
        {},
        ValueError,
        "Reptile moves each parameter by its inner-loop displacement w - w_N, which is 0 for "
        "the parameters that 'adapted' leaves out: they would never be trained. Adapt all of "
        "them, or freeze the others with requires_grad_(False)",
    ),
]


@pytest.mark.parametrize(
    ("case", "inner", "estimator", "options", "error", "message"),
    REFUSED_WHEN_BUILT,
    ids=[case[0] for case in REFUSED_WHEN_BUILT],
)
def test_refused_pairs_raise_when_the_optimizer_is_built_and_change_nothing(
    case: str,
    inner: tm.InnerLoop,
    estimator: tm.MetaGradientEstimator,
    options: dict[str, Any],
    error: type[Exception],
    message: str,
) -> None:
    """The exact message; the model, its gradients and torch's global RNG (which a new
    optimizer draws its generator's seed from) untouched."""
    model = make_mlp(0)
    before = [p.detach().clone() for p in model.parameters()]
    rng = torch.get_rng_state()
    with pytest.raises(error, match=f"^{re.escape(message)}$"):
        tm.MetaOptimizer(
            model,
            mse_loss,
            inner_loop=inner,
            estimator=estimator,
            step_size=tm.Constant(0.1),
            **options,
        )
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before, strict=True))
    assert all(p.grad is None for p in model.parameters())
    assert torch.equal(torch.get_rng_state(), rng)


# What only the meta-batch can tell: refused at step time.
REFUSED_AT_STEP: list[tuple[str, tm.InnerLoop, tm.MetaGradientEstimator, type[Exception], str]] = [
    (
        "HessianFree, sampler sizes",
        tm.GradientDescent(2, ALPHA),
        tm.HessianFree(1e-3, inner_size=2),
        ValueError,
        "HessianFree needs 'inner_size', 'hessian_size' and 'outer_size' for sampler tasks "
        "(got inner_size=2, hessian_size=None, outer_size=None)",
    ),
    (
        "Implicit, samplers",
        PROXIMAL,
        tm.Implicit(cg_steps=5),
        TypeError,
        "Implicit needs SupportQuery tasks: its inner problem is a fixed support "
        "set's regularised loss ('tasks' holds samplers)",
    ),
    (
        "Reptile, sampler sizes",
        tm.GradientDescent(2, ALPHA),
        tm.Reptile(inner_size=3),
        ValueError,
        "Reptile needs 'inner_size' and 'outer_size' for sampler tasks "
        "(got inner_size=3, outer_size=None)",
    ),
    (
        "FirstOrder, sampler sizes",
        tm.GradientDescent(2, ALPHA),
        tm.FirstOrder(),
        ValueError,
        "FirstOrder needs 'inner_size' and 'outer_size' for sampler tasks "
        "(got inner_size=None, outer_size=None)",
    ),
]


@pytest.mark.parametrize(
    ("case", "inner", "estimator", "error", "message"),
    REFUSED_AT_STEP,
    ids=[case[0] for case in REFUSED_AT_STEP],
)
def test_refused_meta_batches_raise_and_change_nothing(
    case: str,
    inner: tm.InnerLoop,
    estimator: tm.MetaGradientEstimator,
    error: type[Exception],
    message: str,
) -> None:
    """step and meta_backward raise the exact message; weights, .grad, generator untouched."""
    tasks = [RegressionSampler(1.0, 0.0), RegressionSampler(2.0, 0.5)]
    model = make_mlp(0)
    before = [p.detach().clone() for p in model.parameters()]
    meta_opt = tm.MetaOptimizer(
        model, mse_loss, inner_loop=inner, estimator=estimator, step_size=tm.Constant(0.1)
    )
    generator_state = meta_opt.generator.get_state()
    for call in (meta_opt.step, meta_opt.meta_backward):
        with pytest.raises(error, match=f"^{re.escape(message)}$"):
            call(tasks)
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before, strict=True))
    assert all(p.grad is None for p in model.parameters())
    assert torch.equal(meta_opt.generator.get_state(), generator_state)
    assert meta_opt.meta_steps == 0
