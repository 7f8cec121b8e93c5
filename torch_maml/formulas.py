r"""The formulas of Ji, Yang & Liang (2022): constants, bounds and step sizes.

Pure arithmetic on the paper's symbols; :mod:`torch_maml.theory` is where users
find it, with the estimation of ``L``, ``rho`` and ``b`` from data.

All functions take the paper's symbols: ``alpha`` the inner step size (the
``lr`` of :class:`~torch_maml.GradientDescent`), ``steps`` the number ``N`` of
inner steps, ``L`` the gradient Lipschitz constant (a bound on the Hessian's
spectral norm), ``rho`` the Hessian Lipschitz constant, ``b`` the support/query
gradient gap of Assumption 5.

References:
    K. Ji, J. Yang, Y. Liang. *Theoretical Convergence of Multi-Step Model-Agnostic
    Meta-Learning.* JMLR 23, 2022.
"""

from __future__ import annotations

import math
import warnings
from typing import Literal, NamedTuple

from .checks import nonnegative_float, positive_float, positive_int
from .errors import InnerStepSizeWarning, warn_user

__all__ = [
    "FiniteSumConstants",
    "check_inner_lr",
    "finite_sum_constants",
    "inner_lr_bound",
    "recommended_inner_lr",
    "resampling_constant",
    "smoothness_finite_sum",
    "smoothness_resampling",
]

# The paper's symbols (L, rho, alpha...) are kept as names on purpose (N803, N806), and
# are documented once, in this module's docstring, rather than in every Args: (D417).
# ruff: noqa: N803, N806, D417


def inner_lr_bound(steps: int, L: float) -> float:
    r"""The inner step size bound of the convergence guarantee (Propositions 3-4).

    .. math:: \alpha < \frac{2^{1/(2N)} - 1}{L}

    It keeps :math:`(1 + \alpha L)^{2N} < 2`. The bound is sufficient for the
    paper's guarantee, not a divergence threshold.
    """
    steps = positive_int("steps", steps)
    L = positive_float("L", L)
    return (math.pow(2.0, 1.0 / (2 * steps)) - 1.0) / L


def recommended_inner_lr(steps: int, L: float) -> float:
    r"""The inner step size of Corollaries 6 and 10: :math:`\alpha = 1 / (8 N L)`."""
    steps = positive_int("steps", steps)
    L = positive_float("L", L)
    return 1.0 / (8 * steps * L)


def check_inner_lr(alpha: float, steps: int, L: float, *, stacklevel: int | None = None) -> bool:
    """Warn with :class:`InnerStepSizeWarning` if ``alpha`` breaks :func:`inner_lr_bound`.

    ``stacklevel`` counts as in :func:`warnings.warn` from the caller's frame; by default
    the warning names the first caller outside torch_maml.

    Returns:
        True if ``alpha`` satisfies the bound, False if it warned.
    """
    bound = inner_lr_bound(steps, L)
    if alpha < bound:
        return True
    message = (
        f"inner step size lr={alpha:g} breaks the convergence bound of Ji, Yang & Liang "
        f"(2022): with steps={steps} and L={L:g} it must be < (2**(1/(2*{steps})) - 1) / L "
        f"= {bound:.6g}; the corollaries pick 1/(8*N*L) = {recommended_inner_lr(steps, L):.6g}"
    )
    if stacklevel is None:
        warn_user(message, InnerStepSizeWarning)
    else:
        warnings.warn(message, InnerStepSizeWarning, stacklevel=stacklevel + 1)
    return False


def _checked(alpha: float, L: float, rho: float, steps: int) -> tuple[float, float, float, int]:
    return (
        positive_float("alpha", alpha),
        positive_float("L", L),
        nonnegative_float("rho", rho),
        positive_int("steps", steps),
    )


def resampling_constant(*, alpha: float, L: float, rho: float, steps: int) -> float:
    r"""``C_L`` of eq. 13 (Proposition 1, resampling case).

    .. math::
        C_{\mathcal L} = \Big((1+\alpha L)^{N-1}\alpha\rho
            + \frac{\rho}{L}(1+\alpha L)^N\big((1+\alpha L)^{N-1} - 1\big)\Big)(1+\alpha L)^N
    """
    alpha, L, rho, steps = _checked(alpha, L, rho, steps)
    q = 1.0 + alpha * L
    return (
        q ** (steps - 1) * alpha * rho + rho / L * q**steps * (q ** (steps - 1) - 1.0)
    ) * q**steps


class FiniteSumConstants(NamedTuple):
    """``C_b`` and ``C_L`` of the finite-sum smoothness estimate (eq. 22)."""

    c_b: float
    c_l: float


def finite_sum_constants(
    *,
    alpha: float,
    L: float,
    rho: float,
    steps: int,
    constants: Literal["theorem", "derived"] = "theorem",
) -> FiniteSumConstants:
    r"""``C_b`` and ``C_L`` of the finite-sum case (Proposition 7).

    With ``constants="theorem"`` (default), eq. 21 as Theorem 9 states it:

    .. math::
        C_b = C_{\mathcal L}
            = \Big(\alpha\rho + \frac{\rho}{L}(1+\alpha L)^{N-1}\Big)(1+\alpha L)^{2N}

    With ``constants="derived"``, the tighter pair that the proof of Proposition 7 derives
    (and Corollary 10's arithmetic uses), with
    :math:`K = (1+\alpha L)^{N-1}\alpha\rho + \frac{\rho}{L}(1+\alpha L)^N((1+\alpha L)^{N-1}-1)`:

    .. math:: C_{\mathcal L} = K (1+\alpha L)^N, \qquad C_b = K \big((1+\alpha L)^N - 1\big)

    Eq. 21 bounds both derived constants from above; both are valid.
    """
    alpha, L, rho, steps = _checked(alpha, L, rho, steps)
    if constants not in ("theorem", "derived"):
        raise ValueError(f"'constants' must be 'theorem' or 'derived' (got {constants!r})")
    q = 1.0 + alpha * L
    if constants == "theorem":
        c = (alpha * rho + rho / L * q ** (steps - 1)) * q ** (2 * steps)
        return FiniteSumConstants(c_b=c, c_l=c)
    k = q ** (steps - 1) * alpha * rho + rho / L * q**steps * (q ** (steps - 1) - 1.0)
    return FiniteSumConstants(c_b=k * (q**steps - 1.0), c_l=k * q**steps)


def smoothness_resampling(
    *, alpha: float, L: float, rho: float, steps: int, grad_norm: float
) -> float:
    r"""``Lhat(w_k)`` of eq. 14, the resampling case's estimate of the meta smoothness.

    .. math::
        \hat L(w_k) = (1+\alpha L)^{2N} L + C_{\mathcal L}\,
            \frac{1}{|B'_k|}\sum_{i\in B'_k} \|\nabla l_i(w_k; D_L^i)\|

    Args:
        grad_norm: the mean gradient norm over the probe batch (the sum term).
    """
    grad_norm = nonnegative_float("grad_norm", grad_norm)
    c_l = resampling_constant(alpha=alpha, L=L, rho=rho, steps=steps)
    return (1.0 + alpha * L) ** (2 * steps) * L + c_l * grad_norm


def smoothness_finite_sum(
    *,
    alpha: float,
    L: float,
    rho: float,
    steps: int,
    b: float,
    grad_norm: float,
    constants: Literal["theorem", "derived"] = "theorem",
) -> float:
    r"""``Lhat(w_k)`` of eq. 22, the finite-sum case's estimate of the meta smoothness.

    .. math::
        \hat L(w_k) = (1+\alpha L)^{2N} L + C_b b + C_{\mathcal L}\,
            \frac{1}{|B'_k|}\sum_{i\in B'_k} \|\nabla l_{T_i}(w_k)\|

    Args:
        b: the mean support/query gradient gap ``b`` of Assumption 5.
        grad_norm: the mean query gradient norm over the probe batch.
        constants: ``"theorem"`` (eq. 21) or ``"derived"`` (the proof of
            Proposition 7); see :func:`finite_sum_constants`.
    """
    b = nonnegative_float("b", b)
    grad_norm = nonnegative_float("grad_norm", grad_norm)
    pair = finite_sum_constants(alpha=alpha, L=L, rho=rho, steps=steps, constants=constants)
    return (1.0 + alpha * L) ** (2 * steps) * L + pair.c_b * b + pair.c_l * grad_norm
