"""``torch_maml.theory.estimate_smoothness`` against families whose constants are known.

Quadratics ``0.5 w^T A w - c^T w`` have Hessian ``A``: ``L = max |eig(A)|`` over every
batch, ``rho = 0``, and ``b_i = ||(A_S - A_T) w - (c_S - c_T)||``. Adding the cubic
``kappa/6 * sum_k (u_k . w)^3`` with orthonormal ``u_k`` makes the Hessian
``A + kappa * sum_k (u_k . w) u_k u_k^T``, whose change over ``w -> w + d`` is
``kappa * sum_k (u_k . d) u_k u_k^T``, of norm at most ``kappa ||d||`` with equality for
``d = u_k``: ``rho = kappa`` exactly.
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
from tests.problems import Vector, make_mlp, mse_loss, regression_tasks

Cubic = tuple[Tensor, Tensor, Tensor, float]
"""A batch ``(A, c, U, kappa)``: ``0.5 w^T A w - c^T w + kappa/6 sum_k (U[:, k] . w)^3``."""

DIM = 6


def cubic_loss(model: Vector, batch: Cubic) -> Tensor:
    a, c, u, kappa = batch
    w = model.w
    loss: Tensor = 0.5 * w @ a @ w - c @ w + kappa / 6 * ((u.T @ w) ** 3).sum()
    return loss


def spectrum_matrix(eigenvalues: list[float], generator: torch.Generator) -> Tensor:
    q, _ = torch.linalg.qr(torch.randn(DIM, DIM, generator=generator, dtype=torch.float64))
    matrix: Tensor = q @ torch.diag(torch.tensor(eigenvalues, dtype=torch.float64)) @ q.T
    return matrix


def batch(
    eigenvalues: list[float], kappa: float, generator: torch.Generator, columns: int = DIM
) -> Cubic:
    u, _ = torch.linalg.qr(torch.randn(DIM, DIM, generator=generator, dtype=torch.float64))
    c = torch.randn(DIM, generator=generator, dtype=torch.float64)
    return spectrum_matrix(eigenvalues, generator), c, u[:, :columns], kappa


def family(kappas: list[float], seed: int = 0) -> tuple[list[tm.SupportQuery[Cubic]], float]:
    """Support/query tasks, one kappa per task; returns them and the true L at w = 0."""
    g = torch.Generator().manual_seed(seed)
    tasks, tops = [], []
    for i, kappa in enumerate(kappas):
        top = 1.0 + 0.5 * i
        # Eigenvalues of both signs; the largest |eig| has a gap of 25% to the next.
        support = [top, -0.75 * top, 0.5, 0.3, -0.2, 0.1]
        query = [-1.1 * top, 0.7 * top, 0.4, -0.3, 0.2, 0.05]
        tops.append(1.1 * top)
        tasks.append(tm.SupportQuery(batch(support, kappa, g), batch(query, kappa, g)))
    return tasks, max(tops)


def test_quadratics_give_l_to_1e6_rho_zero_and_b_in_closed_form() -> None:
    g = torch.Generator().manual_seed(1)
    w = torch.randn(DIM, generator=g, dtype=torch.float64)
    tasks, true_l = family([0.0, 0.0, 0.0])
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
        support = batch([2.0, 1.0, 0.5, 0.3, 0.2, 0.1], kappa, g, columns)
        query = batch([1.5, 1.0, 0.5, 0.3, 0.2, 0.1], kappa, g, columns)
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
    small = tm.theory.estimate_smoothness(model, mse_loss, tasks, radius=1e-4)
    large = tm.theory.estimate_smoothness(model, mse_loss, tasks, radius=1e-2)
    assert small.rho > 0
    assert large.rho > 0
    assert abs(small.rho - large.rho) / small.rho < 0.1
    assert small.L == large.L


def test_l_matches_the_dense_hessian_of_an_mlp() -> None:
    tasks = regression_tasks(2, torch.Generator().manual_seed(5))
    model = make_mlp(6)
    est = tm.theory.estimate_smoothness(model, mse_loss, tasks, iterations=2000, tol=1e-12)
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

    tasks, true_l = family([0.0, 0.0])
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
    tm.theory.estimate_smoothness(model, mse_loss, [tm.SupportQuery((x, y), (x + 1, y))])
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), key


def test_estimates_are_reproducible() -> None:
    tasks = regression_tasks(2, torch.Generator().manual_seed(7))
    model = make_mlp(7)
    first = tm.theory.estimate_smoothness(model, mse_loss, tasks)
    second = tm.theory.estimate_smoothness(model, mse_loss, tasks)
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
    tasks, _ = family([0.0])
    arguments: dict[str, Any] = {"tasks": tasks, **kwargs}
    if arguments["tasks"] == "samplers":
        arguments["tasks"] = [_Draws()]
    with pytest.raises(error, match=re.escape(message)):
        tm.theory.estimate_smoothness(
            Vector(torch.zeros(DIM, dtype=torch.float64)), cubic_loss, **arguments
        )


class _Draws:
    def sample(self, size: int, generator: torch.Generator | None = None) -> Cubic:
        tasks, _ = family([0.0])
        return tasks[0].support


def test_nan_loss_raises_nonfinite_error() -> None:
    tasks, _ = family([0.0])
    a, c, u, kappa = tasks[0].support
    bad = tm.SupportQuery((a * math.nan, c, u, kappa), tasks[0].query)
    with pytest.raises(tm.NonFiniteError, match="support/query gradient gap of task 0"):
        tm.theory.estimate_smoothness(
            Vector(torch.zeros(DIM, dtype=torch.float64)), cubic_loss, [bad]
        )


# ---------------------------------------------------------------- SmoothnessAdaptive.from_data


def cubic_optimizer(policy: tm.SmoothnessAdaptive, w: Tensor) -> tm.MetaOptimizer[Vector, Cubic]:
    return tm.MetaOptimizer(
        Vector(w),
        cubic_loss,
        inner_loop=tm.GradientDescent(steps=3, lr=0.02),
        estimator=tm.FiniteSum(),
        step_size=policy,
        generator=torch.Generator().manual_seed(0),  # re-estimates draw their directions here
    )


def test_from_data_uses_the_estimates_in_eq_22() -> None:
    tasks, _ = family([0.5, 1.0])
    w = torch.full((DIM,), 0.1, dtype=torch.float64)
    est = tm.theory.estimate_smoothness(Vector(w), cubic_loss, tasks)
    policy = tm.SmoothnessAdaptive.from_data(Vector(w), cubic_loss, tasks, c_beta=80)
    assert (policy.L, policy.rho, policy.b) == (est.L, est.rho, est.b)
    assert abs(policy.rho - 1.0) < 1e-6
    by_hand = tm.SmoothnessAdaptive(L=est.L, rho=est.rho, c_beta=80, b=est.b or 0.0)
    info = cubic_optimizer(policy, w).step(tasks)
    expected = cubic_optimizer(by_hand, w).step(tasks)
    assert info.beta == expected.beta
    assert info.lhat == expected.lhat


def test_reestimates_every_k_steps_at_the_current_weights() -> None:
    tasks, _ = family([0.5, 1.0], seed=8)
    w = torch.full((DIM,), 0.1, dtype=torch.float64)
    policy = tm.SmoothnessAdaptive.from_data(Vector(w), cubic_loss, tasks, c_beta=80, every=2)
    meta_opt = cubic_optimizer(policy, w)
    infos = []
    for k in range(5):
        w_k = meta_opt.model.w.detach().clone()
        infos.append(meta_opt.step(tasks))
        state = meta_opt.step_size_state
        if k < 2:
            assert state == {}
        if k in (2, 4):  # re-estimated at w_k: the Hessian of (A, c, U, kappa) at w is
            true_l = 0.0  # A + kappa U diag(U^T w) U^T
            for task in tasks:
                for a, _, u, kappa in (task.support, task.query):
                    hessian = a + kappa * u @ torch.diag(u.T @ w_k) @ u.T
                    true_l = max(true_l, float(torch.linalg.eigvalsh(hessian).abs().max()))
            assert abs(state["L"] - true_l) / true_l < 1e-6
            assert abs(state["rho"] - 1.0) < 1e-6
    # A re-estimating step pays for it: its HVP count is far above FiniteSum's B*N.
    assert infos[0].hvp_evals == infos[1].hvp_evals == 2 * 3
    assert infos[2].hvp_evals > 10 * infos[1].hvp_evals


def test_reestimated_constants_are_saved_and_resume_exactly() -> None:
    tasks, _ = family([0.5, 1.0], seed=9)
    w = torch.full((DIM,), 0.1, dtype=torch.float64)
    policy = tm.SmoothnessAdaptive.from_data(Vector(w), cubic_loss, tasks, c_beta=80, every=2)
    straight = cubic_optimizer(policy, w)
    for _ in range(5):
        straight.step(tasks)
    first = cubic_optimizer(policy, w)
    for _ in range(3):
        first.step(tasks)
    checkpoint = first.state_dict(), first.model.state_dict()
    resumed = cubic_optimizer(policy, torch.zeros(DIM, dtype=torch.float64))
    resumed.model.load_state_dict(checkpoint[1])
    resumed.load_state_dict(checkpoint[0])
    assert resumed.step_size_state == first.step_size_state != {}
    for _ in range(2):
        resumed.step(tasks)
    assert torch.equal(resumed.model.w, straight.model.w)


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
    vectorised = tm.theory.estimate_smoothness(model, mse_loss, together, iterations=60)
    one_by_one = tm.theory.estimate_smoothness(model, tagged_loss, alone, iterations=60)
    assert abs(vectorised.L - one_by_one.L) <= 1e-10 * one_by_one.L
    assert abs(vectorised.rho - one_by_one.rho) <= 1e-6 * one_by_one.rho
    assert vectorised.b == one_by_one.b
    assert vectorised.L_iterations == one_by_one.L_iterations
    # One by one, each batch stops where it converges; together, all run to the last.
    assert vectorised.hvp_evals >= one_by_one.hvp_evals
