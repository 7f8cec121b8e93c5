r"""The proximal inner loop of iMAML: adapt with a pull back towards the meta parameters.

iMAML (Rajeswaran et al. 2019) adapts each task by minimising its support loss plus
a proximal term that anchors the adapted weights to the meta parameters ``w``:

.. math::
    \phi^*(w) = \arg\min_\phi\; l(\phi; S) + \frac{\lambda}{2} \|\phi - w\|^2

:class:`Proximal` wraps any inner loop so that it takes its steps on this
regularised objective. It is an ordinary :class:`~torch_maml.InnerLoop`: the
optimizer's ``adapt`` uses it, and every estimator differentiates through it
(:class:`~torch_maml.Exact` through the unrolled steps). :class:`~torch_maml.Implicit`
needs it: it reads ``lam`` from it, and differentiates ``phi*`` implicitly.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from .checks import positive_float
from .inner import InnerLoop, elementwise
from .typing import InnerState, Params

__all__ = ["Proximal"]


@dataclass(frozen=True, repr=False)
class Proximal:
    r"""``inner_loop`` run on the support loss plus ``lam/2 ||phi - w||^2`` (iMAML).

    Each step hands the wrapped inner loop the gradient of the regularised loss:

    .. math::
        \phi_0 = w, \qquad
        (\phi_{j+1}, s_{j+1}) = \mathrm{update}\big(\phi_j,\;
            \nabla l(\phi_j; \mathrm{batch}_j) + \lambda (\phi_j - w),\; s_j\big)

    so ``Proximal(GradientDescent(steps, lr), lam)`` is
    ``phi_{j+1} = phi_j - lr * (grad l(phi_j) + lam * (phi_j - w))``, gradient descent
    on iMAML's inner objective. The state is the pair ``(anchor, inner_state)``: the
    anchor ``w`` (not detached, so that autograd through the unrolled loop and the
    recursion's state cotangent see how the steps depend on ``w``) and the wrapped
    inner loop's own state.

    Args:
        inner_loop: the inner optimiser to regularise, e.g.
            :class:`~torch_maml.GradientDescent`.
        lam: the regularisation strength ``lambda``, > 0.

    References:
        A. Rajeswaran, C. Finn, S. Kakade, S. Levine. *Meta-Learning with Implicit
        Gradients.* NeurIPS 2019.

    Example:
        >>> import torch_maml as tm
        >>> inner = tm.Proximal(tm.GradientDescent(steps=10, lr=0.1), lam=2.0)
        >>> inner.steps
        10
    """

    inner_loop: InnerLoop
    lam: float

    def __post_init__(self) -> None:
        if not isinstance(self.inner_loop, InnerLoop):
            raise TypeError(
                "'inner_loop' must implement the InnerLoop protocol "
                f"(got an object of type {type(self.inner_loop).__name__})"
            )
        object.__setattr__(self, "lam", positive_float("lam", self.lam))

    def __repr__(self) -> str:
        # The wrapped loop by its repr if it is a dataclass (a run-independent one), else by
        # its type: MetaOptimizer.state_dict compares configurations by these strings.
        inner = self.inner_loop
        described = (
            repr(inner)
            if dataclasses.is_dataclass(inner)
            else f"{type(inner).__module__}.{type(inner).__qualname__}"
        )
        return f"Proximal(inner_loop={described}, lam={self.lam!r})"

    @property
    def steps(self) -> int:
        """The wrapped inner loop's number ``N`` of steps."""
        return self.inner_loop.steps

    @property
    def elementwise(self) -> bool:
        """Whether the wrapped loop's update acts on each element alone (then so does this)."""
        return elementwise(self.inner_loop)

    def proximal_lam(self) -> float:
        """``lam`` (:class:`~torch_maml.inner.ProximalSteps`)."""
        return self.lam

    def init(self, params: Params) -> InnerState:
        """``(anchor, inner_state)``: ``w_0 = params`` and the wrapped loop's initial state."""
        return dict(params), self.inner_loop.init(params)

    def update(self, params: Params, grads: Params, state: InnerState) -> tuple[Params, InnerState]:
        """One step of the wrapped inner loop on the regularised gradient."""
        anchor, inner = state
        regularised = {
            name: g + self.lam * (params[name] - anchor[name]) for name, g in grads.items()
        }
        new_params, new_inner = self.inner_loop.update(params, regularised, inner)
        return new_params, (anchor, new_inner)
