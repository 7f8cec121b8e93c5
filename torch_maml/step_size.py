r"""Outer step sizes ``beta_k`` (SPEC section 4).

A :class:`StepSizePolicy` is called once per meta step with a :class:`StepContext`
and returns a :class:`StepSize`. The context's ``lr`` is the optimizer's
``param_groups[0]["lr"]``, which starts at the policy's ``lr`` and is what
``torch.optim.lr_scheduler`` schedulers change.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal, NamedTuple, Protocol, runtime_checkable

from ._validation import nonnegative_float, optional_positive_int, positive_float
from .inner import GradientDescent, InnerLoop
from .theory import check_inner_lr, smoothness_finite_sum, smoothness_resampling

__all__ = [
    "Constant",
    "Setting",
    "SmoothnessAdaptive",
    "StepContext",
    "StepSize",
    "StepSizePolicy",
]

Setting = Literal["finite-sum", "resampling"]
"""The paper's setting of a meta-batch: SupportQuery tasks or samplers."""


class StepSize(NamedTuple):
    """A policy's answer for one meta step."""

    beta: float
    """The outer step size ``beta_k`` (> 0)."""
    lhat: float | None = None
    """The smoothness estimate ``Lhat(w_k)`` it came from, if any (eq. 14 / 22)."""


class StepContext:
    """What a :class:`StepSizePolicy` may use to choose ``beta_k``.

    Args:
        lr: ``param_groups[0]["lr"]`` now.
        step: ``k``, the number of meta steps taken so far.
        inner_loop: the optimizer's inner loop.
        setting: ``"finite-sum"`` for SupportQuery tasks, ``"resampling"`` for samplers.
        probe_grad_norm: computes the mean gradient norm over the probe batch at
            ``w_k`` for a sample size (``None``: the default size); called at most
            once per size, only if the policy asks.
    """

    def __init__(
        self,
        *,
        lr: float,
        step: int,
        inner_loop: InnerLoop,
        setting: Setting,
        probe_grad_norm: Callable[[int | None], float],
    ) -> None:
        self.lr = lr
        self.step = step
        self.inner_loop = inner_loop
        self.setting: Setting = setting
        self._probe_grad_norm = probe_grad_norm
        self._cache: dict[int | None, float] = {}

    def mean_probe_grad_norm(self, size: int | None = None) -> float:
        r"""``mean_{i in B'_k} ||grad l_i(w_k; probe_i)||`` at the current meta parameters.

        The probe batch of a task is its query set (finite-sum) or a fresh sample of
        ``size`` (resampling; ``None`` takes the estimator's outer batch size). The
        probe tasks ``B'_k`` are those passed as ``probe_tasks`` to the step, or else
        the step's own tasks. Each probe task costs one gradient evaluation.
        """
        if size not in self._cache:
            self._cache[size] = self._probe_grad_norm(size)
        return self._cache[size]


@runtime_checkable
class StepSizePolicy(Protocol):
    """Chooses the outer step size ``beta_k`` of each meta step."""

    @property
    def lr(self) -> float:
        """The initial ``param_groups[0]["lr"]`` of a MetaOptimizer using this policy."""
        ...

    def __call__(self, context: StepContext) -> StepSize:
        """The step size of this meta step."""
        ...


@dataclass(frozen=True)
class Constant:
    r"""A constant outer step size: :math:`\beta_k = \beta` (the paper's practical choice).

    ``lr`` is the initial ``param_groups[0]["lr"]``; each step uses the group's
    current ``lr``, so any ``torch.optim.lr_scheduler`` scheduler applies.

    Args:
        lr: the outer step size ``beta``, > 0.
    """

    lr: float

    def __post_init__(self) -> None:
        object.__setattr__(self, "lr", positive_float("lr", self.lr))

    def __call__(self, context: StepContext) -> StepSize:
        """``beta_k = param_groups[0]["lr"]``."""
        return StepSize(beta=context.lr)


def _needs_gradient_descent(inner_loop: object) -> str:
    return (
        "SmoothnessAdaptive needs a GradientDescent inner loop (eq. 14 and 22 are derived "
        f"for plain gradient descent) (got {type(inner_loop).__name__})"
    )


@dataclass(frozen=True)
class SmoothnessAdaptive:
    r"""The smoothness-adaptive step of Theorems 5 and 9: ``beta_k = 1 / (c_beta * Lhat(w_k))``.

    .. math:: \beta_k = \frac{1}{C_\beta \hat L(w_k)}

    :math:`\hat L(w_k)` is eq. 14 for sampler tasks (resampling) and eq. 22 for
    SupportQuery tasks (finite-sum), with the gradient norms taken at ``w_k`` on the
    probe batch (see :meth:`StepContext.mean_probe_grad_norm`). The inner loop must
    be :class:`~torch_maml.GradientDescent`, whose ``lr`` and ``steps`` are the
    ``alpha`` and ``N`` of the formulas. ``param_groups[0]["lr"]`` multiplies
    ``beta_k`` (1.0 by default: the theorem's step), so schedulers still apply.

    Args:
        L: gradient Lipschitz constant of the task losses, > 0.
        rho: Hessian Lipschitz constant, >= 0.
        c_beta: ``C_beta`` (Corollary 6: 100 for resampling; Corollary 10: 80 for finite-sum).
        b: the support/query gradient gap of Assumption 5 (finite-sum only), >= 0.
        constants: ``"theorem"`` for eq. 21 as Theorem 9 states it, ``"derived"`` for
            the tighter constants of the proof of Proposition 7 (finite-sum only).
        probe_size: samples per probe batch for sampler tasks (default: the
            estimator's ``outer_size``).
        lr: initial multiplier of ``beta_k``, > 0.

    Example:
        >>> import torch_maml as tm
        >>> policy = tm.SmoothnessAdaptive(L=2.0, rho=1.0, c_beta=80)
    """

    L: float
    rho: float
    c_beta: float
    b: float = 0.0
    constants: Literal["theorem", "derived"] = "theorem"
    probe_size: int | None = None
    lr: float = 1.0

    def __post_init__(self) -> None:
        object.__setattr__(self, "L", positive_float("L", self.L))
        object.__setattr__(self, "rho", nonnegative_float("rho", self.rho))
        object.__setattr__(self, "c_beta", positive_float("c_beta", self.c_beta))
        object.__setattr__(self, "b", nonnegative_float("b", self.b))
        object.__setattr__(self, "lr", positive_float("lr", self.lr))
        optional_positive_int("probe_size", self.probe_size)
        if self.constants not in ("theorem", "derived"):
            raise ValueError(f"'constants' must be 'theorem' or 'derived' (got {self.constants!r})")

    def check(self, inner_loop: InnerLoop, *, stacklevel: int = 1) -> None:
        """Check that ``inner_loop`` is gradient descent; warn if its lr breaks the bound.

        Raises:
            TypeError: ``inner_loop`` is not :class:`~torch_maml.GradientDescent`.
        """
        if not isinstance(inner_loop, GradientDescent):
            raise TypeError(_needs_gradient_descent(inner_loop))
        if inner_loop.L != self.L:  # GradientDescent already warned for its own L
            check_inner_lr(inner_loop.lr, inner_loop.steps, self.L, stacklevel=stacklevel + 1)

    def __call__(self, context: StepContext) -> StepSize:
        """``beta_k = lr / (c_beta * Lhat(w_k))``, with ``Lhat`` recorded."""
        inner = context.inner_loop
        if not isinstance(inner, GradientDescent):
            raise TypeError(_needs_gradient_descent(inner))
        if context.setting == "resampling":
            if self.b != 0.0:
                raise ValueError(
                    "SmoothnessAdaptive: 'b' is the support/query gap of eq. 22 and has no "
                    f"place in eq. 14 for sampler tasks (got b={self.b})"
                )
            lhat = smoothness_resampling(
                alpha=inner.lr,
                L=self.L,
                rho=self.rho,
                steps=inner.steps,
                grad_norm=context.mean_probe_grad_norm(self.probe_size),
            )
        else:
            lhat = smoothness_finite_sum(
                alpha=inner.lr,
                L=self.L,
                rho=self.rho,
                steps=inner.steps,
                b=self.b,
                grad_norm=context.mean_probe_grad_norm(None),
                constants=self.constants,
            )
        return StepSize(beta=context.lr / (self.c_beta * lhat), lhat=lhat)
