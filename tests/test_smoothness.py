"""``tm.theory.estimate_smoothness`` against families whose constants are known.

The cubics of tests/problems.py (``Cubic``) have known ``L``, ``rho`` and ``b``; on the
MLP, ``L`` is checked against the dense Hessian's eigenvalues. Then the estimate's
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
    Vector,
    cubic_batch,
    cubic_family,
    cubic_loss,
    make_mlp,
    mse_loss,
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
