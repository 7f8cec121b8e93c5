r"""Inner loops: how a task adapts the meta parameters (SPEC section 1).

An inner loop is a differentiable optimiser written as a pure function, in the
style of optax: :meth:`InnerLoop.init` makes its state from ``w_0 = w`` and
:meth:`InnerLoop.update` takes one step from the gradient of the task's loss:

.. math:: (w_{j+1}, s_{j+1}) = \mathrm{update}(w_j, \nabla l(w_j; \mathrm{batch}_j), s_j)

The estimators differentiate through ``update`` (the exact one by autograd, the
others by its vector-Jacobian product, step by step), so any inner loop written
in differentiable torch operations works with all of them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, runtime_checkable

from ._validation import positive_float, positive_int
from .theory import check_inner_lr
from .typing import InnerState, Params

__all__ = ["GradientDescent", "InnerLoop"]


@runtime_checkable
class InnerLoop(Protocol):
    """The inner optimiser of MAML: ``steps`` updates from the meta parameters.

    Implement it to bring your own differentiable inner optimiser; see the
    docs' "custom components" page for a momentum example.
    """

    @property
    def steps(self) -> int:
        """The number ``N`` of inner steps."""
        ...

    def init(self, params: Params) -> InnerState:
        """The optimiser state at ``w_0 = params``: a pytree of tensors, ``()`` if none."""
        ...

    def update(self, params: Params, grads: Params, state: InnerState) -> tuple[Params, InnerState]:
        """One inner step: ``(w_{j+1}, s_{j+1})`` from ``w_j``, its gradient and ``s_j``.

        Must be written in differentiable torch operations and must not modify its
        arguments in place.
        """
        ...


@dataclass(frozen=True)
class GradientDescent:
    r"""``steps`` steps of gradient descent with step size ``lr`` (eq. 1, 6, 9, 11).

    .. math:: w_0 = w, \qquad w_{j+1} = w_j - \alpha \nabla l_i(w_j; \mathrm{batch}_j)

    Args:
        steps: the number ``N`` of inner steps, >= 1.
        lr: the inner step size ``alpha``, > 0.
        L: optional gradient Lipschitz constant of the task losses. When given,
            an :class:`~torch_maml.InnerStepSizeWarning` is issued if ``lr`` breaks
            the bound ``(2**(1/(2N)) - 1) / L`` of the paper's guarantee.

    Example:
        >>> import torch_maml as tm
        >>> inner = tm.GradientDescent(steps=5, lr=0.01)
    """

    steps: int
    lr: float
    L: float | None = None

    def __post_init__(self) -> None:
        positive_int("steps", self.steps)
        object.__setattr__(self, "lr", positive_float("lr", self.lr))
        if self.L is not None:
            object.__setattr__(self, "L", positive_float("L", self.L))
            check_inner_lr(self.lr, self.steps, self.L, stacklevel=3)

    def init(self, params: Params) -> InnerState:
        """Plain gradient descent keeps no state."""
        return ()

    def update(self, params: Params, grads: Params, state: InnerState) -> tuple[Params, InnerState]:
        """``w - lr * grad`` for every adapted parameter."""
        return {name: p - self.lr * grads[name] for name, p in params.items()}, state


@dataclass(frozen=True)
class _Subset:
    """``inner_loop`` adapting only the parameters ``names``; the others pass through.

    The others are still meta parameters: the estimators differentiate each step
    with respect to all of them (for gradient descent, their share of the meta
    gradient is ``-alpha * H_{fa} v`` at each step plus their outer gradient), so
    the meta gradient reaches every trainable parameter, as in ANIL.
    """

    inner_loop: InnerLoop
    names: tuple[str, ...]

    @property
    def steps(self) -> int:
        return self.inner_loop.steps

    def init(self, params: Params) -> InnerState:
        return self.inner_loop.init({name: params[name] for name in self.names})

    def update(self, params: Params, grads: Params, state: InnerState) -> tuple[Params, InnerState]:
        adapted, state = self.inner_loop.update(
            {name: params[name] for name in self.names},
            {name: grads[name] for name in self.names},
            state,
        )
        return {**params, **adapted}, state
