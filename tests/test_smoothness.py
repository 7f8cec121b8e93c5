"""``tm.theory.estimate_smoothness`` against families whose constants are known.

The cubics of tests/problems.py (``Cubic``) have known ``L``, ``rho`` and ``b``; on the
MLP, ``L`` is checked against the dense Hessian's eigenvalues. The power iteration's
stopping rule, on diagonal Hessians whose iterates are known. Then the estimate's
options, its vectorised and one-by-one paths, what it leaves alone, and its errors.
``SmoothnessAdaptive``, which uses the estimates, is tested in tests/test_step_size.py.
"""

from __future__ import annotations

import math
import re
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

import torch_maml as tm
from tests.problems import (
    CUBIC_DIM,
    Cubic,
    Quadratic,
    Vector,
    cubic_batch,
    cubic_family,
    cubic_loss,
    make_mlp,
    mse_loss,
    quadratic_loss,
    regression_tasks,
    spectrum_matrix,
)

DIM = CUBIC_DIM


def test_quadratics_give_l_to_1e6_rho_zero_and_b_in_closed_form() -> None:
    g = torch.Generator().manual_seed(1)
    w = torch.randn(DIM, generator=g, dtype=torch.float64)
    tasks, true_l = cubic_family([0.0, 0.0, 0.0])
    est = tm.theory.estimate_smoothness(Vector(w), cubic_loss, tasks)

    assert abs(est.L - true_l) / true_l < 1e-6
    assert est.L_converged
    assert est.rho_converged
    assert est.rho < 1e-8 * true_l
    gaps = [
        float(((t.support[0] - t.query[0]) @ w - (t.support[1] - t.query[1])).norm()) for t in tasks
    ]
    assert est.b is not None
    assert est.b_max is not None
    assert abs(est.b - sum(gaps) / len(gaps)) <= 1e-12 * est.b
    assert abs(est.b_max - max(gaps)) <= 1e-12 * est.b_max
    assert est.grad_evals == 2 * len(tasks)
    # 2 batches per task, each: its L iterations, then 3 restarts of 2 products per rho
    # iteration (one each here: the Hessian does not change at all).
    batches = 2 * len(tasks)
    assert est.rho_iterations == 1
    assert batches * (2 + 3 * 2) <= est.hvp_evals <= batches * (est.L_iterations + 3 * 2)


# ---------------------------------------------------------------- the power iteration's stop
# A row stops at the first iteration k >= 3 where its best ||Hv|| grew by at most tol relative
# since iteration k - 2, or else runs to ``iterations`` and reports not converged. Quadratics
# with a diagonal Hessian make the iterates known whatever the random start v_0: with H = 3 I,
# ||Hv|| = 3 from the first iteration; with H = diag(5, 0, 0, 0) (rank one) it is 5 |v_0[0]|
# < 5 at the first, then v = +-e_1 and it is 5 from the second.


def diagonal_task(*eigenvalues: float) -> tm.SupportQuery[Quadratic]:
    """Support and query the quadratic ``0.5 w^T diag(eigenvalues) w``: Hessian known."""
    data = (torch.diag(torch.tensor(eigenvalues, dtype=torch.float64)), torch.zeros(4).double())
    return tm.SupportQuery(data, data)


def power_estimate(
    task: tm.SupportQuery[Quadratic], **options: Any
) -> tm.theory.SmoothnessEstimate:
    w = torch.tensor([1.0, -2.0, 0.5, 3.0], dtype=torch.float64)
    return tm.theory.estimate_smoothness(Vector(w), quadratic_loss, [task], restarts=1, **options)


# Two batches (support and query), one rho restart: on a quadratic, rho's first difference is
# exactly 0, below its floor, so it stops at its first iteration, 2 batches x 2 products.
RHO_PRODUCTS = 2 * 2


@pytest.mark.parametrize(
    ("eigenvalues", "tol", "stops_at"),
    [
        ((3.0, 3.0, 3.0, 3.0), 1e-9, 3),  # ||Hv|| constant: the earliest the rule allows
        ((3.0, -3.0, 3.0, -3.0), 1e-9, 3),  # ... also when v flips between two directions
        ((5.0, 0.0, 0.0, 0.0), 1e-9, 4),  # 5 |v_0[0]|, 5, 5: unchanged over two iterations at 4
        ((5.0, 0.0, 0.0, 0.0), 1e-300, 4),  # the same: no growth meets any tol
        ((2.0, 1.0, 0.5, 0.25), 1.0, 3),  # tol = 1: growth over two iterations is at most 100%
    ],
)
def test_power_iteration_stops_where_its_tolerance_is_met(
    eigenvalues: tuple[float, ...], tol: float, stops_at: int
) -> None:
    est = power_estimate(diagonal_task(*eigenvalues), tol=tol)
    assert est.L_converged
    assert est.L_iterations == stops_at
    assert est.hvp_evals == 2 * stops_at + RHO_PRODUCTS
    if tol < 1:  # the estimate is the largest |eigenvalue|, to rounding
        largest = max(abs(e) for e in eigenvalues)
        assert abs(est.L - largest) <= 1e-15 * largest


@pytest.mark.parametrize(
    ("eigenvalues", "iterations", "expected"),
    [
        ((3.0, 3.0, 3.0, 3.0), 2, 3.0),  # stopped before the rule can be met: 3 is exact though
        ((5.0, 0.0, 0.0, 0.0), 2, 5.0),  # ... and 5 from the second iteration
        ((5.0, 0.0, 0.0, 0.0), 3, 5.0),  # 5 - 5 |v_0[0]| over the last two: not met at 3
    ],
)
def test_power_iteration_that_misses_its_tolerance_runs_to_the_most_iterations(
    eigenvalues: tuple[float, ...], iterations: int, expected: float
) -> None:
    est = power_estimate(diagonal_task(*eigenvalues), iterations=iterations)
    assert not est.L_converged
    assert est.L_iterations == iterations
    assert est.hvp_evals == 2 * iterations + RHO_PRODUCTS
    assert abs(est.L - expected) <= 1e-15 * expected


def test_power_iteration_with_an_eigengap_stops_within_tol() -> None:
    """Eigenvalues 2, 1, 0.5, 0.25: the error of ||Hv|| shrinks 4-fold an iteration, so once the
    growth over two iterations is at most tol (1e-9 of 2), the error left is below 1e-9 / 15.
    Capped one iteration short of that, it runs to the cap and says it did not converge."""
    task = diagonal_task(2.0, 1.0, 0.5, 0.25)
    est = power_estimate(task)
    assert est.L_converged
    assert 3 <= est.L_iterations < 40
    assert -2e-15 <= 2.0 - est.L <= 2.0 * 1e-9 / 15  # ||Hv|| <= 2 for a unit v
    capped = power_estimate(task, iterations=est.L_iterations - 1)
    assert not capped.L_converged
    assert capped.L_iterations == est.L_iterations - 1
    assert capped.L <= est.L


def test_batches_iterate_together_until_the_last_stops() -> None:
    """A support set that stops at 3 (H = 3 I) and a query set that stops at 4 (rank one):
    vectorised together, both run 4 iterations; L_iterations is the most any needed."""
    support = diagonal_task(3.0, 3.0, 3.0, 3.0).support
    query = diagonal_task(5.0, 0.0, 0.0, 0.0).query
    est = power_estimate(tm.SupportQuery(support, query))
    assert est.L_converged
    assert est.L_iterations == 4
    assert est.hvp_evals == 2 * 4 + RHO_PRODUCTS
    assert abs(est.L - 5.0) <= 1e-15 * 5.0


def test_largest_absolute_eigenvalue_is_found_when_it_is_negative() -> None:
    g = torch.Generator().manual_seed(2)
    a = spectrum_matrix([-3.0, 2.0, 1.0, 0.5, -0.5, 0.1], g)
    data: Cubic = (a, torch.zeros(DIM, dtype=torch.float64), torch.eye(DIM).double(), 0.0)
    est = tm.theory.estimate_smoothness(
        Vector(torch.zeros(DIM, dtype=torch.float64)), cubic_loss, [tm.SupportQuery(data, data)]
    )
    assert abs(est.L - 3.0) / 3.0 < 1e-6


@pytest.mark.parametrize("columns", [1, 3, DIM])
def test_cubic_rho_is_a_lower_bound_within_a_factor_2(columns: int) -> None:
    g = torch.Generator().manual_seed(3)
    kappas = [0.5, 2.0, 1.25]
    tasks = []
    for kappa in kappas:
        support = cubic_batch([2.0, 1.0, 0.5, 0.3, 0.2, 0.1], kappa, g, columns)
        query = cubic_batch([1.5, 1.0, 0.5, 0.3, 0.2, 0.1], kappa, g, columns)
        tasks.append(tm.SupportQuery(support, query))
    w = torch.randn(DIM, generator=g, dtype=torch.float64)
    est = tm.theory.estimate_smoothness(Vector(w), cubic_loss, tasks)
    true_rho = max(kappas)
    assert true_rho / 2 <= est.rho <= true_rho * (1 + 1e-8)
    # Along the directions u_k the difference is exact (H is linear in w): it finds rho.
    assert abs(est.rho - true_rho) / true_rho < 1e-6


def test_rho_on_an_mlp_barely_depends_on_the_radius() -> None:
    # On a tanh MLP rho is unknown; the difference over a radius 100 times larger
    # measures nearly the same change of the Hessian.
    tasks = regression_tasks(3, torch.Generator().manual_seed(4))
    model = make_mlp(5)
    options: dict[str, Any] = {"iterations": 30, "restarts": 2}  # rho converges in these
    small = tm.theory.estimate_smoothness(model, mse_loss, tasks, radius=1e-4, **options)
    large = tm.theory.estimate_smoothness(model, mse_loss, tasks, radius=1e-2, **options)
    assert small.rho > 0
    assert large.rho > 0
    assert abs(small.rho - large.rho) / small.rho < 0.1
    assert small.L == large.L


def test_l_matches_the_dense_hessian_of_an_mlp() -> None:
    tasks = regression_tasks(2, torch.Generator().manual_seed(5))
    model = make_mlp(6)
    # L converges in 27 iterations; the cap of 60 only stops rho's, which is not checked here
    est = tm.theory.estimate_smoothness(
        model, mse_loss, tasks, iterations=60, tol=1e-12, restarts=1
    )
    names = [n for n, _ in model.named_parameters()]
    flat = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    shapes = [p.shape for p in model.parameters()]

    def loss_of(vector: Tensor, data: Any) -> Tensor:
        params, offset = {}, 0
        for name, shape in zip(names, shapes, strict=True):
            params[name] = vector[offset : offset + shape.numel()].reshape(shape)
            offset += shape.numel()
        out: Tensor = torch.func.functional_call(model, params, (data[0],))
        return F.mse_loss(out, data[1])

    largest = 0.0
    for task in tasks:
        for data in (task.support, task.query):
            hessian = torch.func.jacrev(torch.func.jacrev(loss_of))(flat, data)
            largest = max(largest, float(torch.linalg.eigvalsh(hessian).abs().max()))
    assert est.L_converged
    assert abs(est.L - largest) / largest < 1e-8


def test_sampler_tasks_use_one_draw_each_and_give_no_b() -> None:
    class Fixed:
        def __init__(self, data: Cubic) -> None:
            self.data = data
            self.sizes: list[int] = []

        def sample(self, size: int, generator: torch.Generator | None = None) -> Cubic:
            self.sizes.append(size)
            return self.data

    tasks, true_l = cubic_family([0.0, 0.0])
    samplers = [Fixed(t.query) for t in tasks]
    est = tm.theory.estimate_smoothness(
        Vector(torch.zeros(DIM, dtype=torch.float64)), cubic_loss, samplers, sample_size=7
    )
    assert est.b is None
    assert est.b_max is None
    assert [s.sizes for s in samplers] == [[7], [7]]
    assert abs(est.L - true_l) / true_l < 1e-6


def test_selection_restricts_the_hessian_to_the_adapted_parameters() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 1)).double()
    x = torch.randn(10, 3, dtype=torch.float64)
    y = torch.randn(10, 1, dtype=torch.float64)
    task = tm.SupportQuery((x, y), (x, y))
    est = tm.theory.estimate_smoothness(model, mse_loss, [task], adapted=["2"])
    # The loss is quadratic in the head: its Hessian is (2/n) [h 1]^T [h 1] (mean squared error).
    h = torch.cat([torch.tanh(model[0](x)), torch.ones(10, 1, dtype=torch.float64)], 1).detach()
    true_l = float(torch.linalg.eigvalsh(2 / 10 * h.T @ h).max())
    assert abs(est.L - true_l) / true_l < 1e-6
    assert est.rho < 1e-6 * true_l
    assert est.b == 0.0


def test_batch_norm_statistics_and_weights_are_left_alone() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Tanh(), nn.Linear(4, 1)).double()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.randn(8, 3, dtype=torch.float64)
    y = torch.randn(8, 1, dtype=torch.float64)
    task = tm.SupportQuery((x, y), (x + 1, y))
    tm.theory.estimate_smoothness(model, mse_loss, [task], iterations=5, restarts=1)
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), key


def test_estimates_are_reproducible() -> None:
    tasks = regression_tasks(2, torch.Generator().manual_seed(7))
    model = make_mlp(7)
    options: dict[str, Any] = {"iterations": 10, "restarts": 2}
    first = tm.theory.estimate_smoothness(model, mse_loss, tasks, **options)
    second = tm.theory.estimate_smoothness(model, mse_loss, tasks, **options)
    assert first == second


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({"iterations": 0}, ValueError, "'iterations' must be a positive int (got 0)"),
        ({"tol": 0.0}, ValueError, "'tol' must be a finite number > 0 (got 0.0)"),
        ({"restarts": 1.5}, TypeError, "'restarts' must be a positive int (got 1.5)"),
        ({"radius": math.nan}, ValueError, "'radius' must be a finite number > 0 (got nan)"),
        (
            {"tasks": []},
            ValueError,
            "'tasks' must hold at least one task (got an empty meta-batch)",
        ),
        (
            {"tasks": "samplers"},
            ValueError,
            "estimate_smoothness needs a 'sample_size' for sampler tasks (got None)",
        ),
        ({"adapted": ["head"]}, ValueError, "'adapted' entry 'head' selects no trainable"),
    ],
)
def test_bad_input(kwargs: dict[str, Any], error: type[Exception], message: str) -> None:
    tasks, _ = cubic_family([0.0])
    arguments: dict[str, Any] = {"tasks": tasks, **kwargs}
    if arguments["tasks"] == "samplers":
        arguments["tasks"] = [_Draws()]
    with pytest.raises(error, match=re.escape(message)):
        tm.theory.estimate_smoothness(
            Vector(torch.zeros(DIM, dtype=torch.float64)), cubic_loss, **arguments
        )


class _Draws:
    def sample(self, size: int, generator: torch.Generator | None = None) -> Cubic:
        tasks, _ = cubic_family([0.0])
        return tasks[0].support


def test_nan_loss_raises_nonfinite_error() -> None:
    tasks, _ = cubic_family([0.0])
    a, c, u, kappa = tasks[0].support
    bad = tm.SupportQuery((a * math.nan, c, u, kappa), tasks[0].query)
    with pytest.raises(tm.NonFiniteError, match="support/query gradient gap of task 0"):
        tm.theory.estimate_smoothness(
            Vector(torch.zeros(DIM, dtype=torch.float64)), cubic_loss, [bad]
        )


def test_vectorised_and_one_by_one_estimates_agree() -> None:
    """Batches that stack run together under vmap; others one by one: the same numbers."""
    tasks = regression_tasks(3, torch.Generator().manual_seed(10))
    model = make_mlp(11)

    def tagged_loss(model: nn.Module, batch: tuple[Tensor, Tensor, str]) -> Tensor:
        return mse_loss(model, (batch[0], batch[1]))

    # A string leaf keeps a batch from stacking: every batch then runs on its own.
    alone = [
        tm.SupportQuery((*t.support, f"s{i}"), (*t.query, f"q{i}")) for i, t in enumerate(tasks)
    ]
    together = tasks  # supports stack with supports, queries with queries
    vectorised = tm.theory.estimate_smoothness(model, mse_loss, together, iterations=30, restarts=2)
    one_by_one = tm.theory.estimate_smoothness(model, tagged_loss, alone, iterations=30, restarts=2)
    assert abs(vectorised.L - one_by_one.L) <= 1e-10 * one_by_one.L
    assert abs(vectorised.rho - one_by_one.rho) <= 1e-6 * one_by_one.rho
    assert vectorised.b == one_by_one.b
    assert vectorised.L_iterations == one_by_one.L_iterations
    # One by one, each batch stops where it converges; together, all run to the last.
    assert vectorised.hvp_evals >= one_by_one.hvp_evals
