"""The theory's formulas: eq. 13, 21, 14, 22 and the inner step-size bound, by hand.

``torch_maml.formulas`` holds them, ``tm.theory`` shows them to users (with the
estimates of tests/test_smoothness.py).
"""

# The paper's symbol L is kept as a name on purpose.
# ruff: noqa: N803, N806

from __future__ import annotations

import itertools
import math
import warnings
from typing import Any, Literal

import pytest

import torch_maml as tm
from torch_maml import theory


def close(actual: float, expected: float) -> bool:
    return math.isclose(actual, expected, rel_tol=1e-12, abs_tol=0.0)


# Worked by hand. alpha = 0.1, L = 1, rho = 2, so q = 1 + alpha L = 1.1:
#   N = 1: eq. 13: (q^0 * 0.1 * 2 + 2 * q * (q^0 - 1)) * q = 0.2 * 1.1 = 0.22
#          eq. 21: (0.1 * 2 + 2 * q^0) * q^2 = 2.2 * 1.21 = 2.662
#          derived: K = 0.2, C_L = K q = 0.22, C_b = K (q - 1) = 0.02
#   N = 2: eq. 13: (q * 0.2 + 2 * q^2 * (q - 1)) * q^2 = (0.22 + 0.242) * 1.21 = 0.55902
#          eq. 21: (0.2 + 2 * q) * q^4 = 2.4 * 1.4641 = 3.51384
#          derived: K = 0.462, C_L = K q^2 = 0.55902, C_b = K (q^2 - 1) = 0.462 * 0.21 = 0.09702
# alpha = 0.05, L = 2, rho = 3, N = 3, so q = 1.1 again:
#          eq. 13: (q^2 * 0.15 + 1.5 * q^3 * (q^2 - 1)) * q^3
#                = (0.1815 + 1.5 * 1.331 * 0.21) * 1.331 = 0.600765 * 1.331 = 0.799618215
#          eq. 21: (0.15 + 1.5 * q^2) * q^6 = 1.965 * 1.771561 = 3.481117365
HAND = [
    # alpha, L, rho, N, eq13, eq21, derived C_b, derived C_L
    (0.1, 1.0, 2.0, 1, 0.22, 2.662, 0.02, 0.22),
    (0.1, 1.0, 2.0, 2, 0.55902, 3.51384, 0.09702, 0.55902),
    (0.05, 2.0, 3.0, 3, 0.799618215, 3.481117365, 0.600765 * (1.331 - 1), 0.799618215),
]


@pytest.mark.parametrize(("alpha", "L", "rho", "steps", "eq13", "eq21", "c_b", "c_l"), HAND)
def test_constants_match_hand_arithmetic(
    alpha: float, L: float, rho: float, steps: int, eq13: float, eq21: float, c_b: float, c_l: float
) -> None:
    assert close(theory.resampling_constant(alpha=alpha, L=L, rho=rho, steps=steps), eq13)
    stated = theory.finite_sum_constants(alpha=alpha, L=L, rho=rho, steps=steps)
    assert close(stated.c_b, eq21)
    assert close(stated.c_l, eq21)
    derived = theory.finite_sum_constants(
        alpha=alpha, L=L, rho=rho, steps=steps, constants="derived"
    )
    assert close(derived.c_b, c_b)
    assert close(derived.c_l, c_l)


def test_smoothness_estimates_match_hand_arithmetic() -> None:
    # alpha = 0.1, L = 1, rho = 2, N = 2, mean gradient norm 2, b = 0.5; (1 + alpha L)^4 = 1.4641
    resampling = theory.smoothness_resampling(alpha=0.1, L=1.0, rho=2.0, steps=2, grad_norm=2.0)
    assert close(resampling, 1.4641 + 0.55902 * 2)
    cases: list[tuple[Literal["theorem", "derived"], float]] = [
        ("theorem", 1.4641 + 3.51384 * 0.5 + 3.51384 * 2),
        ("derived", 1.4641 + 0.09702 * 0.5 + 0.55902 * 2),
    ]
    for constants, expected in cases:
        finite_sum = theory.smoothness_finite_sum(
            alpha=0.1, L=1.0, rho=2.0, steps=2, b=0.5, grad_norm=2.0, constants=constants
        )
        assert close(finite_sum, expected)


def test_with_rho_zero_the_constants_vanish() -> None:
    """Quadratics have rho = 0, so C_L = C_b = 0 and Lhat is constant."""
    assert theory.resampling_constant(alpha=0.1, L=2.0, rho=0.0, steps=4) == 0.0
    assert theory.finite_sum_constants(alpha=0.1, L=2.0, rho=0.0, steps=4) == (0.0, 0.0)
    lhat = theory.smoothness_finite_sum(alpha=0.1, L=2.0, rho=0.0, steps=4, b=3.0, grad_norm=123.0)
    assert close(lhat, 1.2**8 * 2.0)


def test_eq21_bounds_the_derived_constants_from_above() -> None:
    for alpha, L, rho, steps in itertools.product(
        [0.001, 0.05, 0.3], [0.5, 1.0, 4.0], [0.1, 1.0, 10.0], [1, 2, 5, 20]
    ):
        stated = theory.finite_sum_constants(alpha=alpha, L=L, rho=rho, steps=steps)
        derived = theory.finite_sum_constants(
            alpha=alpha, L=L, rho=rho, steps=steps, constants="derived"
        )
        assert derived.c_b <= stated.c_b
        assert derived.c_l <= stated.c_l
    # At Corollary 10's alpha = 1/(8NL), eq. 21 as Theorem 9 states it is about 10x the
    # derived C_L of Proposition 7's proof.
    alpha = theory.recommended_inner_lr(5, 1.0)
    stated = theory.finite_sum_constants(alpha=alpha, L=1.0, rho=1.0, steps=5)
    derived = theory.finite_sum_constants(alpha=alpha, L=1.0, rho=1.0, steps=5, constants="derived")
    assert 5 < stated.c_l / derived.c_l < 15


def test_inner_lr_bound_and_recommendation() -> None:
    assert close(theory.inner_lr_bound(1, 1.0), math.sqrt(2) - 1)
    assert close(theory.inner_lr_bound(5, 2.0), (2**0.1 - 1) / 2)
    assert close(theory.recommended_inner_lr(5, 2.0), 1 / 80)
    for steps in (1, 2, 10, 100):
        # The corollaries' choice satisfies the bound, and (1 + alpha L)^(2N) < 2 below it.
        assert theory.recommended_inner_lr(steps, 3.0) < theory.inner_lr_bound(steps, 3.0)
        below = 0.999 * theory.inner_lr_bound(steps, 3.0)
        assert (1 + below * 3.0) ** (2 * steps) < 2


def test_gradient_descent_warns_when_lr_breaks_the_bound() -> None:
    bound = theory.inner_lr_bound(5, 1.0)
    with pytest.warns(tm.InnerStepSizeWarning, match=f"{bound:.6g}") as record:
        tm.GradientDescent(steps=5, lr=0.1, L=1.0)
    assert record[0].filename == __file__  # points at the user's line
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        tm.GradientDescent(steps=5, lr=0.9 * bound, L=1.0)
        tm.GradientDescent(steps=5, lr=0.1)  # no L, nothing to check


def test_check_inner_lr_reports_and_returns() -> None:
    assert theory.check_inner_lr(0.01, 2, 1.0)
    with pytest.warns(tm.InnerStepSizeWarning, match="1/\\(8\\*N\\*L\\)") as record:
        assert not theory.check_inner_lr(1.0, 2, 1.0)
    assert record[0].filename == __file__


NOT_AN_INT: Any = 2.5  # values of the wrong type, as an untyped caller would pass
UNKNOWN: Any = "x"


@pytest.mark.parametrize(
    ("call", "error", "pattern"),
    [
        (
            lambda: theory.inner_lr_bound(0, 1.0),
            ValueError,
            "'steps' must be a positive int \\(got 0\\)",
        ),
        (
            lambda: theory.inner_lr_bound(2, 0.0),
            ValueError,
            "'L' must be a finite number > 0 \\(got 0.0\\)",
        ),
        (
            lambda: theory.inner_lr_bound(NOT_AN_INT, 1.0),
            TypeError,
            "'steps' must be a positive int \\(got 2.5\\)",
        ),
        (lambda: theory.resampling_constant(alpha=-1, L=1, rho=1, steps=1), ValueError, "'alpha'"),
        (
            lambda: theory.resampling_constant(alpha=0.1, L=1, rho=-1, steps=1),
            ValueError,
            "'rho' must be a finite number >= 0",
        ),
        (
            lambda: theory.finite_sum_constants(alpha=0.1, L=1, rho=1, steps=1, constants=UNKNOWN),
            ValueError,
            "'constants' must be 'theorem' or 'derived' \\(got 'x'\\)",
        ),
        (
            lambda: theory.smoothness_finite_sum(alpha=0.1, L=1, rho=1, steps=1, b=-1, grad_norm=1),
            ValueError,
            "'b'",
        ),
        (
            lambda: theory.smoothness_resampling(
                alpha=0.1, L=1, rho=1, steps=1, grad_norm=math.nan
            ),
            ValueError,
            "'grad_norm'",
        ),
    ],
)
def test_bad_arguments_are_named(call: object, error: type[Exception], pattern: str) -> None:
    assert callable(call)
    with pytest.raises(error, match=pattern):
        call()


def test_the_theory_module_shows_the_formulas_and_the_estimates() -> None:
    from torch_maml import formulas, smoothness

    for name in theory.__all__:
        source = formulas if hasattr(formulas, name) else smoothness
        assert getattr(theory, name) is getattr(source, name), name
    assert set(theory.__all__) == {
        "FiniteSumConstants",
        "SmoothnessEstimate",
        "check_inner_lr",
        "estimate_smoothness",
        "finite_sum_constants",
        "inner_lr_bound",
        "recommended_inner_lr",
        "resampling_constant",
        "smoothness_finite_sum",
        "smoothness_resampling",
    }
