"""Proximal: iMAML's regularised inner loop, ``inner_loop`` on ``l + lam/2 ||phi - w||^2``.

Its steps and the meta gradient through them against closed forms on quadratics
(float64, 1e-10); what it tells the estimators (``proximal_lam``), its configuration
in a ``state_dict``, its argument checks, and the compiled recursion through its
state. The implicit meta gradient that needs it is tested with the estimators
(tests/test_estimators.py).
"""

from __future__ import annotations

import re
from collections.abc import Callable

import pytest
import torch
from torch import nn

import torch_maml as tm
from tests.problems import (
    ALPHA,
    DIM,
    LAM,
    SAME,
    TIGHT,
    Pair,
    make_mlp,
    mlp_meta_gradient,
    mse_loss,
    outer_grad,
    params_relative_error,
    proximal_last,
    regression_tasks,
    relative_error,
    support_query_pairs,
    vector_meta_gradient,
)
from tests.typing_cases.user_components import HeavyBall
from torch_maml.inner import descent_lr


def test_a_step_descends_the_regularised_loss() -> None:
    """``phi' = phi - lr (g + lam (phi - w))``, the anchor ``w`` kept in the state."""
    inner = tm.Proximal(tm.GradientDescent(2, 0.5), lam=2.0)
    w = {"p": torch.tensor([1.0, -1.0], dtype=torch.float64)}
    state = inner.init(w)
    phi, state = inner.update(w, {"p": torch.tensor([2.0, 0.0], dtype=torch.float64)}, state)
    assert torch.equal(phi["p"], torch.tensor([0.0, -1.0], dtype=torch.float64))
    phi, state = inner.update(phi, {"p": torch.tensor([0.0, 0.0], dtype=torch.float64)}, state)
    # g = 0: the pull back to w alone, lr * lam * (phi - w) = 1.0 * (-1, 0)
    assert torch.equal(phi["p"], torch.tensor([1.0, -1.0], dtype=torch.float64))
    anchor, inner_state = state
    assert torch.equal(anchor["p"], w["p"])
    assert inner_state == ()


def test_it_tells_the_estimators_its_lam_and_nothing_else() -> None:
    inner = tm.Proximal(tm.GradientDescent(10, 0.1), lam=2)
    assert isinstance(inner, tm.InnerLoop)
    assert isinstance(inner, tm.ProximalSteps)
    assert descent_lr(inner) is None  # its steps are not plain descent
    assert (inner.steps, inner.proximal_lam(), inner.lam) == (10, 2.0, 2.0)
    assert isinstance(inner.lam, float)
    assert repr(inner) == (
        "Proximal(inner_loop=GradientDescent(steps=10, lr=0.1, L=None), lam=2.0)"
    )
    around_a_users_loop = tm.Proximal(HeavyBall(2, 0.1, 0.5), 1.0)
    assert repr(around_a_users_loop) == (
        "Proximal(inner_loop=tests.typing_cases.user_components.HeavyBall, lam=1.0)"
    )


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
    actual = vector_meta_gradient(w, inner, estimator, tasks)
    assert relative_error(actual, torch.stack(expected).mean(0)) < TIGHT


def test_a_state_dict_with_proximal_loads_into_a_fresh_optimizer(gen: torch.Generator) -> None:
    """The configuration check compares Proximal's repr: run-independent, also around a
    user's inner loop that is no dataclass (no memory address in it)."""
    tasks = regression_tasks(2, gen)

    def build() -> tm.MetaOptimizer[nn.Sequential, Pair]:
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


def gd() -> tm.GradientDescent:
    return tm.GradientDescent(2, ALPHA)


def wrong(value: object) -> tm.InnerLoop:
    """A value of the wrong type, passed as the type checker would refuse."""
    return value  # type: ignore[return-value]


@pytest.mark.parametrize(
    ("build", "error", "message"),
    [
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
    ],
)
def test_bad_arguments_are_refused_with_exact_messages(
    build: Callable[[], object], error: type[Exception], message: str
) -> None:
    with pytest.raises(error, match=f"^{re.escape(message)}$"):
        build()


@pytest.mark.slow
@pytest.mark.integration
def test_the_compiled_recursion_runs_through_proximal(gen: torch.Generator) -> None:
    """torch.compile takes Proximal's state (no warning): FiniteSum, compiled = eager."""
    tasks = regression_tasks(4, gen)
    inner = tm.Proximal(tm.GradientDescent(3, ALPHA), LAM)
    eager = mlp_meta_gradient(inner, tm.FiniteSum(), tasks, task_chunk_size=None)
    compiled = mlp_meta_gradient(  # the second call runs compiled code, the first eagerly
        inner, tm.FiniteSum(), tasks, calls=2, task_chunk_size=None, compile=True
    )
    assert params_relative_error(compiled, eager) < SAME


def test_exact_and_finite_sum_agree_through_proximal_around_a_stateful_loop(
    gen: torch.Generator,
) -> None:
    """Exact (autograd through the unrolled steps) and FiniteSum (the recursion through
    the state, the anchor included) agree around a user's stateful loop."""
    tasks = regression_tasks(3, gen)
    inner = tm.Proximal(HeavyBall(3, 0.05, 0.5), LAM)
    exact = mlp_meta_gradient(inner, tm.Exact(), tasks)
    finite_sum = mlp_meta_gradient(inner, tm.FiniteSum(), tasks)
    assert all(bool(torch.isfinite(g).all()) for g in exact.values())
    assert params_relative_error(finite_sum, exact) < TIGHT
