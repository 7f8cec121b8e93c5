r"""Outer step sizes ``beta_k`` (Theorems 5 and 9; ``docs/theory.md``).

A :class:`StepSizePolicy` is called once per meta step with a :class:`StepContext`
and returns a :class:`StepSize`. The context's ``lr`` is the optimizer's
``param_groups[0]["lr"]``, which starts at the policy's ``lr`` and is what
``torch.optim.lr_scheduler`` schedulers change.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, NamedTuple, Protocol, runtime_checkable

from torch import nn

from .checks import nonnegative_float, optional_positive_int, positive_float
from .formulas import check_inner_lr, smoothness_finite_sum, smoothness_resampling
from .inner import InnerLoop, descent_lr, describe
from .model import ParamSelection
from .smoothness import SmoothnessEstimate, estimate_smoothness
from .tasks import Task
from .typing import LossFn

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
        state: the policy's own state, kept by the optimizer between steps and saved
            in its ``state_dict`` (a policy may change it; the optimizer keeps the
            changes only if the step succeeds).
        estimate_smoothness: runs :func:`torch_maml.theory.estimate_smoothness` at
            ``w_k`` on the probe tasks, with the given keyword arguments.
    """

    def __init__(
        self,
        *,
        lr: float,
        step: int,
        inner_loop: InnerLoop,
        setting: Setting,
        probe_grad_norm: Callable[[int | None], float],
        state: dict[str, Any] | None = None,
        estimate_smoothness: Callable[..., SmoothnessEstimate] | None = None,
    ) -> None:
        self.lr = lr
        self.step = step
        self.inner_loop = inner_loop
        self.setting: Setting = setting
        self.state: dict[str, Any] = {} if state is None else state
        self._probe_grad_norm = probe_grad_norm
        self._estimate_smoothness = estimate_smoothness
        self._cache: dict[int | None, float] = {}

    def estimate_smoothness(self, **options: Any) -> SmoothnessEstimate:
        """:func:`~torch_maml.theory.estimate_smoothness` at ``w_k`` on the probe tasks.

        Args:
            options: its keyword arguments (``sample_size``, ``iterations``, ``tol``,
                ``restarts``, ``radius``); the parameters, the generator and the
                tasks are the optimizer's.

        Raises:
            RuntimeError: the context was built without a way to estimate.
        """
        if self._estimate_smoothness is None:
            raise RuntimeError("this StepContext was built without 'estimate_smoothness'")
        return self._estimate_smoothness(**options)

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


_ESTIMATE_OPTIONS = ("sample_size", "iterations", "tol", "restarts", "radius")


def _descent_lr(inner_loop: InnerLoop) -> float:
    """The inner loop's ``alpha`` as gradient descent, or the TypeError saying it must be."""
    lr = descent_lr(inner_loop)
    if lr is None:
        raise TypeError(
            "SmoothnessAdaptive needs a GradientDescent inner loop (eq. 14 and 22 are "
            f"derived for plain gradient descent) (got {describe(inner_loop)})"
        )
    return lr


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
        every: re-estimate ``L``, ``rho`` and ``b`` at ``w_k`` on the probe tasks
            every ``every`` meta steps (at steps ``every, 2 every, ...``) with
            :func:`~torch_maml.theory.estimate_smoothness`; ``None`` (default): keep
            the given constants. The latest estimates are kept in the optimizer's
            :attr:`~torch_maml.MetaOptimizer.step_size_state` (and its ``state_dict``).
        estimate_options: keyword arguments of ``estimate_smoothness`` for the
            re-estimates (``sample_size``, ``iterations``, ``tol``, ``restarts``,
            ``radius``).

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
    every: int | None = None
    estimate_options: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        object.__setattr__(self, "L", positive_float("L", self.L))
        object.__setattr__(self, "rho", nonnegative_float("rho", self.rho))
        object.__setattr__(self, "c_beta", positive_float("c_beta", self.c_beta))
        object.__setattr__(self, "b", nonnegative_float("b", self.b))
        object.__setattr__(self, "lr", positive_float("lr", self.lr))
        optional_positive_int("probe_size", self.probe_size)
        optional_positive_int("every", self.every)
        if self.constants not in ("theorem", "derived"):
            raise ValueError(f"'constants' must be 'theorem' or 'derived' (got {self.constants!r})")
        unknown = sorted(set(self.estimate_options) - set(_ESTIMATE_OPTIONS))
        if unknown:
            raise ValueError(
                f"'estimate_options' has unknown keys {unknown} (known: {list(_ESTIMATE_OPTIONS)})"
            )

    @classmethod
    def from_data(
        cls,
        model: nn.Module,
        loss_fn: LossFn[Any, Any],
        tasks: Sequence[Task[Any]],
        *,
        c_beta: float,
        every: int | None = None,
        adapted: ParamSelection | None = None,
        sample_size: int | None = None,
        iterations: int = 200,
        tol: float = 1e-9,
        restarts: int = 3,
        radius: float | None = None,
        constants: Literal["theorem", "derived"] = "theorem",
        probe_size: int | None = None,
        lr: float = 1.0,
    ) -> SmoothnessAdaptive:
        r"""The policy with ``L``, ``rho`` and ``b`` estimated from the model and data.

        Runs :func:`~torch_maml.theory.estimate_smoothness` once, at the model's
        current weights, on ``tasks`` (``b`` is 0 for sampler tasks, which eq. 14
        does not use); with ``every``, the optimizer re-estimates them every
        ``every`` meta steps, with the same options, on each step's probe tasks.

        Args:
            model: the module, at its initial weights.
            loss_fn: the loss closure the MetaOptimizer will use.
            tasks: tasks to measure on (a meta-batch or more).
            c_beta: ``C_beta`` (Corollary 6: 100; Corollary 10: 80).
            every: re-estimate every ``every`` meta steps (default: never).
            adapted: the parameters the inner loop adapts, as for the MetaOptimizer.
            sample_size: samples per batch of sampler tasks.
            iterations: the most power iterations per batch.
            tol: the power iterations' relative tolerance.
            restarts: random starting directions per batch for rho.
            radius: the distance of the Hessian differences for rho.
            constants: as for :class:`SmoothnessAdaptive`.
            probe_size: as for :class:`SmoothnessAdaptive`.
            lr: as for :class:`SmoothnessAdaptive`.

        Example:
            >>> import torch, torch.nn.functional as F, torch_maml as tm
            >>> model = torch.nn.Sequential(
            ...     torch.nn.Linear(1, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1)
            ... )
            >>> x = torch.linspace(-1, 1, 10).unsqueeze(1)
            >>> task = tm.SupportQuery((x, torch.sin(x)), (x, torch.cos(x)))
            >>> policy = tm.SmoothnessAdaptive.from_data(
            ...     model, lambda m, b: F.mse_loss(m(b[0]), b[1]), [task], c_beta=80
            ... )
            >>> policy.L > 0
            True
        """
        options: dict[str, Any] = {
            "sample_size": sample_size,
            "iterations": iterations,
            "tol": tol,
            "restarts": restarts,
            "radius": radius,
        }
        estimate = estimate_smoothness(model, loss_fn, tasks, adapted=adapted, **options)
        if estimate.L == 0.0:
            raise ValueError(
                "SmoothnessAdaptive.from_data: the estimated L is 0 (the loss has no "
                "curvature at these weights), so eq. 14/22 gives no step size; pass L yourself"
            )
        return cls(
            L=estimate.L,
            rho=estimate.rho,
            c_beta=c_beta,
            b=estimate.b or 0.0,
            constants=constants,
            probe_size=probe_size,
            lr=lr,
            every=every,
            estimate_options={k: v for k, v in options.items() if v is not None},
        )

    def check(self, inner_loop: InnerLoop, *, stacklevel: int | None = None) -> None:
        """Check that ``inner_loop`` is gradient descent; warn if its lr breaks the bound.

        Raises:
            TypeError: ``inner_loop`` is not gradient descent
                (:class:`~torch_maml.inner.GradientDescentSteps`).
        """
        alpha = _descent_lr(inner_loop)
        level = None if stacklevel is None else stacklevel + 1
        check_inner_lr(alpha, inner_loop.steps, self.L, stacklevel=level)

    def __call__(self, context: StepContext) -> StepSize:
        """``beta_k = lr / (c_beta * Lhat(w_k))``, with ``Lhat`` recorded."""
        inner = context.inner_loop
        alpha = _descent_lr(inner)
        if self.every is not None and context.step > 0 and context.step % self.every == 0:
            estimate = context.estimate_smoothness(**self.estimate_options)
            context.state.update(L=estimate.L, rho=estimate.rho, b=estimate.b or 0.0)
        L = float(context.state.get("L", self.L))  # noqa: N806 (the paper's symbol)
        rho = float(context.state.get("rho", self.rho))
        b = float(context.state.get("b", self.b))
        if context.setting == "resampling":
            if self.b != 0.0:
                raise ValueError(
                    "SmoothnessAdaptive: 'b' is the support/query gap of eq. 22 and has no "
                    f"place in eq. 14 for sampler tasks (got b={self.b})"
                )
            lhat = smoothness_resampling(
                alpha=alpha,
                L=L,
                rho=rho,
                steps=inner.steps,
                grad_norm=context.mean_probe_grad_norm(self.probe_size),
            )
        else:
            lhat = smoothness_finite_sum(
                alpha=alpha,
                L=L,
                rho=rho,
                steps=inner.steps,
                b=b,
                grad_norm=context.mean_probe_grad_norm(None),
                constants=self.constants,
            )
        return StepSize(beta=context.lr / (self.c_beta * lhat), lhat=lhat)
