"""The three estimators against closed forms, autograd and finite differences (float64)."""

from __future__ import annotations

from collections import defaultdict
from typing import Any

import pytest
import torch
from torch import Tensor, nn

import torch_maml as tm
from tests.problems import (
    NoisyQuadratic,
    Quadratic,
    QuadraticSequence,
    RegressionSampler,
    Vector,
    closed_form_meta_gradient,
    make_mlp,
    meta_objective,
    mse_by_hand,
    mse_loss,
    params_relative_error,
    quadratic_loss,
    random_quadratic,
    reference_meta_gradient,
    regression_tasks,
    relative_error,
)

ALPHA = 0.1
DIM = 4
INNER, HESSIAN, OUTER = 2, 3, 4  # distinct sample sizes: QuadraticSequence keys on them
TIGHT = 1e-10


def written_meta_gradient(
    model: nn.Module,
    loss_fn: tm.typing.LossFn[Any, Any],
    estimator: tm.MetaGradientEstimator,
    steps: int,
    tasks: list[Any],
) -> tm.typing.Params:
    """The meta gradient that torch_maml's meta_backward writes into each ``.grad``."""
    meta_opt = tm.MetaOptimizer(
        model,
        loss_fn,
        inner_loop=tm.GradientDescent(steps=steps, lr=ALPHA),
        estimator=estimator,
        step_size=tm.Constant(1.0),
        generator=torch.Generator().manual_seed(0),
    )
    meta_opt.meta_backward(tasks)
    grads = {}
    for name, p in model.named_parameters():
        assert p.grad is not None
        grads[name] = p.grad
    return grads


def vector_meta_gradient(
    w: Tensor, estimator: tm.MetaGradientEstimator, steps: int, tasks: list[Any]
) -> Tensor:
    return written_meta_gradient(Vector(w), quadratic_loss, estimator, steps, tasks)["w"]


@pytest.fixture
def gen() -> torch.Generator:
    return torch.Generator().manual_seed(1234)


# ---------------------------------------------------------------- quadratic families


@pytest.mark.parametrize("steps", [1, 2, 5])
def test_support_query_quadratics_match_closed_form(steps: int, gen: torch.Generator) -> None:
    """Different support and query quadratics: all three estimators equal eq. 12's closed form."""
    w = torch.randn(DIM, generator=gen, dtype=torch.float64)
    pairs = [(random_quadratic(DIM, gen), random_quadratic(DIM, gen)) for _ in range(3)]
    expected = torch.stack(
        [closed_form_meta_gradient(w, ALPHA, [s] * steps, [s] * steps, t) for s, t in pairs]
    ).mean(0)

    support_query = [tm.SupportQuery(s, t) for s, t in pairs]
    samplers = [
        QuadraticSequence({INNER: [s] * steps, HESSIAN: [s] * steps, OUTER: [t]}) for s, t in pairs
    ]
    results = {
        "Exact": vector_meta_gradient(w, tm.Exact(), steps, support_query),
        "FiniteSum": vector_meta_gradient(w, tm.FiniteSum(), steps, support_query),
        "Resampled": vector_meta_gradient(w, tm.Resampled(INNER, HESSIAN, OUTER), steps, samplers),
    }
    for name, actual in results.items():
        assert relative_error(actual, expected) < TIGHT, name


def _per_step_families(
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
    families = [_per_step_families(steps, gen) for _ in range(3)]
    expected = torch.stack(
        [closed_form_meta_gradient(w, ALPHA, s, s, t) for s, _, t in families]
    ).mean(0)

    def samplers() -> list[QuadraticSequence]:
        return [QuadraticSequence({INNER: s, HESSIAN: s, OUTER: [t]}) for s, _, t in families]

    exact = vector_meta_gradient(w, tm.Exact(inner_size=INNER, outer_size=OUTER), steps, samplers())
    resampled = vector_meta_gradient(w, tm.Resampled(INNER, HESSIAN, OUTER), steps, samplers())
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
    families = [_per_step_families(steps, gen) for _ in range(3)]
    eq7 = torch.stack([closed_form_meta_gradient(w, ALPHA, s, d, t) for s, d, t in families]).mean(
        0
    )
    unrolled = torch.stack(
        [closed_form_meta_gradient(w, ALPHA, s, s, t) for s, _, t in families]
    ).mean(0)

    def samplers() -> list[QuadraticSequence]:
        return [QuadraticSequence({INNER: s, HESSIAN: d, OUTER: [t]}) for s, d, t in families]

    resampled = vector_meta_gradient(w, tm.Resampled(INNER, HESSIAN, OUTER), steps, samplers())
    exact = vector_meta_gradient(w, tm.Exact(inner_size=INNER, outer_size=OUTER), steps, samplers())
    assert relative_error(resampled, eq7) < TIGHT
    assert relative_error(exact, unrolled) < TIGHT
    assert relative_error(exact, eq7) > 1e-2  # plain unrolled autograd fails eq. 7


# ---------------------------------------------------------------- a small MLP


def mlp_meta_gradient(
    estimator: tm.MetaGradientEstimator, steps: int, tasks: list[Any]
) -> tm.typing.Params:
    return written_meta_gradient(make_mlp(0), mse_loss, estimator, steps, tasks)


@pytest.mark.parametrize("steps", [1, 3, 5])
def test_finite_sum_equals_exact_and_autograd_on_an_mlp(steps: int, gen: torch.Generator) -> None:
    """FiniteSum (HVP recursion) == Exact (torch.func unrolled) == torch.autograd unrolled."""
    tasks = regression_tasks(4, gen)
    reference = reference_meta_gradient(make_mlp(0), tasks, steps, ALPHA)
    exact = mlp_meta_gradient(tm.Exact(), steps, tasks)
    finite_sum = mlp_meta_gradient(tm.FiniteSum(), steps, tasks)
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
    exact = mlp_meta_gradient(tm.Exact(), steps, tasks)
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


class Recorder:
    """Wraps a sampler and records each batch it hands out, by size, in order."""

    def __init__(self, sampler: RegressionSampler) -> None:
        self.sampler = sampler
        self.batches: defaultdict[int, list[tuple[Tensor, Tensor]]] = defaultdict(list)

    def sample(self, size: int, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
        batch = self.sampler.sample(size, generator)
        self.batches[size].append(batch)
        return batch


@pytest.mark.parametrize("steps", [1, 3])
def test_resampled_on_an_mlp_equals_the_surrogate_step_unrolled(steps: int) -> None:
    """Eq. 7 on a non-quadratic loss, against SPEC section 3's independent check.

    Unrolling the surrogate step
    ``w_{j+1} = w_j - alpha g(w_j; D_j) + stopgrad(alpha g(w_j; D_j) - alpha g(w_j; S_j))``
    has the iterates of eq. 6 and the derivative of eq. 7.
    """
    recorders = [Recorder(RegressionSampler(1.0 + i, 0.5 * i)) for i in range(3)]
    resampled = mlp_meta_gradient(tm.Resampled(INNER, HESSIAN, OUTER), steps, list(recorders))

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


# ---------------------------------------------------------------- statistics


def test_resampled_with_one_step_is_unbiased() -> None:
    """SPEC section 2: for N = 1, E[G] is the population meta gradient.

    With M independent draws, each coordinate's Monte Carlo mean lies within
    4.5 standard errors of the truth (a false alarm has probability ~1e-5 per
    coordinate; the run is seeded, so the test is deterministic). The same test
    detects the bias of Exact on the same samplers, whose Hessian batch is the
    inner batch that moved w_1 (bias alpha^2 E[E A E] w for noise E), at more than
    15 standard errors (about 28 expected for this family).
    """
    gen = torch.Generator().manual_seed(7)
    dim, alpha, draws = 2, 0.8, 2000
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
        samples: list[Tensor] = []
        for _ in range(draws):
            model.w.grad = None
            meta_opt.meta_backward([task])
            assert model.w.grad is not None
            samples.append(model.w.grad.clone())
        stacked = torch.stack(samples)
        standard_error = stacked.std(0) / draws**0.5
        z: Tensor = (stacked.mean(0) - truth) / standard_error
        return z

    assert z_scores(tm.Resampled(inner_size=1, hessian_size=1, outer_size=1)).abs().max() < 4.5
    assert z_scores(tm.Exact(inner_size=1, outer_size=1)).abs().max() > 15


# ---------------------------------------------------------------- oracle counts


@pytest.mark.parametrize("steps", [1, 2, 5])
@pytest.mark.parametrize("name", ["Exact", "FiniteSum", "Resampled"])
def test_oracle_counts_are_linear_in_the_number_of_steps(name: str, steps: int) -> None:
    """SPEC section 6: B (N + 1) gradients and B N Hessian-vector products per step."""
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
        inner_loop=tm.GradientDescent(steps=steps, lr=ALPHA),
        estimator=estimator,
        step_size=tm.Constant(0.01),
    )
    info = meta_opt.step(tasks)
    assert (info.grad_evals, info.hvp_evals) == (batch_size * (steps + 1), batch_size * steps)
    backward = meta_opt.meta_backward(tasks)
    assert (backward.grad_evals, backward.hvp_evals) == (info.grad_evals, info.hvp_evals)


def test_reported_loss_is_the_mean_query_loss_after_adaptation(gen: torch.Generator) -> None:
    tasks = regression_tasks(3, gen)
    model = make_mlp(0)
    meta_opt = tm.MetaOptimizer(
        model,
        mse_loss,
        inner_loop=tm.GradientDescent(steps=3, lr=ALPHA),
        estimator=tm.FiniteSum(),
        step_size=tm.Constant(0.01),
    )
    weights = [p.detach().clone() for p in model.parameters()]
    expected = meta_objective(tasks, 3, ALPHA, weights)
    info = meta_opt.step(tasks)
    assert abs(float(info.loss) - float(expected)) <= TIGHT * float(expected)


def test_resampled_is_reproducible_from_a_seeded_generator() -> None:
    tasks = [RegressionSampler(1.5, 0.3), RegressionSampler(0.7, 1.1)]

    def run(seed: int) -> list[Tensor]:
        model = make_mlp(0)
        meta_opt = tm.MetaOptimizer(
            model,
            mse_loss,
            inner_loop=tm.GradientDescent(steps=3, lr=ALPHA),
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
