r"""The theory of Ji, Yang & Liang (2022) that a user can compute and check.

The formulas (:mod:`torch_maml.formulas`): the inner step-size bound of
Propositions 3-4, the corollaries' recommended step size, the constants of eq. 13
and 21 and the smoothness estimates of eq. 14 and 22. And their inputs measured
from a model and data (:mod:`torch_maml.smoothness`): :func:`estimate_smoothness`
of ``L``, ``rho`` and ``b``.

All functions take the paper's symbols: ``alpha`` the inner step size (the
``lr`` of :class:`~torch_maml.GradientDescent`), ``steps`` the number ``N`` of
inner steps, ``L`` the gradient Lipschitz constant (a bound on the Hessian's
spectral norm), ``rho`` the Hessian Lipschitz constant, ``b`` the support/query
gradient gap of Assumption 5. ``docs/theory.md`` derives them in prose.

References:
    K. Ji, J. Yang, Y. Liang. *Theoretical Convergence of Multi-Step Model-Agnostic
    Meta-Learning.* JMLR 23, 2022.
"""

from __future__ import annotations

from .formulas import (
    FiniteSumConstants,
    check_inner_lr,
    finite_sum_constants,
    inner_lr_bound,
    recommended_inner_lr,
    resampling_constant,
    smoothness_finite_sum,
    smoothness_resampling,
)
from .smoothness import SmoothnessEstimate, estimate_smoothness

__all__ = [
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
]
