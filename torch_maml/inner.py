r"""Inner loops: how a task adapts the meta parameters (eq. 1, 6, 9, 11).

An inner loop is a differentiable optimiser written as a pure function, in the
style of optax: :meth:`InnerLoop.init` makes its state from ``w_0 = w`` and
:meth:`InnerLoop.update` takes one step from the gradient of the task's loss:

.. math:: (w_{j+1}, s_{j+1}) = \mathrm{update}(w_j, \nabla l(w_j; \mathrm{batch}_j), s_j)

The estimators differentiate through ``update`` (the exact one by autograd, the
others by its vector-Jacobian product, step by step), so any inner loop written
in differentiable torch operations works with all of them.

Built in: :class:`GradientDescent` (the paper's inner loop), :class:`Momentum`
(heavy ball, Polyak 1964, or Nesterov), :class:`Adam` (Kingma & Ba 2015),
:class:`~torch_maml.MetaSGD` (Li et al. 2017: learned per-parameter step sizes),
:class:`~torch_maml.Proximal` (iMAML's regularised inner problem) and
:class:`Masked` (any of them, adapting only some parameters: ANIL).

Some components need to know more about an inner loop than the protocol says. An
inner loop tells them through optional methods, each its own small protocol, so
that a wrapper of your own that forwards attribute access (``__getattr__``) to a
built-in loop is accepted wherever that loop is:

* :class:`GradientDescentSteps` (``descent_lr()``): every step is
  ``w - alpha * grad``. :class:`~torch_maml.HessianFree`, ``Reptile()`` (its default
  scale) and :class:`~torch_maml.SmoothnessAdaptive` need it.
* :class:`ProximalSteps` (``proximal_lam()``): the steps solve iMAML's regularised
  problem. :class:`~torch_maml.Implicit` needs it.
* :class:`SelectsParameters` (``adapted_names(names)``): only some parameters move.
* the attribute ``elementwise = True``: ``update`` acts on each element alone, so it
  may be handed every task's tensors at once (a leading task dimension). The built-in
  loops say so; any other loop is vectorised over tasks with ``torch.func.vmap``, so
  an update that reduces over a tensor (a normalised step) stays per task.

Which estimator works with which inner loop is the table of the docs' inner-loop
page; a refused pair raises a ``TypeError`` that says what it needs, when the
:class:`~torch_maml.MetaOptimizer` is built.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, Protocol, TypedDict, runtime_checkable

import torch
from torch import Tensor

from .checks import positive_float, positive_int, unit_interval
from .formulas import check_inner_lr
from .model import ParamSelection, resolve_selection
from .typing import InnerState, Params

__all__ = [
    "Adam",
    "AdamState",
    "GradientDescent",
    "GradientDescentSteps",
    "InnerLoop",
    "Masked",
    "Momentum",
    "ProximalSteps",
    "SelectsParameters",
    "adapted_names",
    "descent_lr",
    "describe",
    "elementwise",
    "proximal_lam",
    "selects_parameters",
]


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


@runtime_checkable
class GradientDescentSteps(Protocol):
    """An inner loop whose every step is plain gradient descent on what it adapts.

    ``w_{j+1} = w_j - alpha * grad l(w_j; batch_j)``: the step's Jacobian is then
    ``I - alpha H``, which :class:`~torch_maml.HessianFree` replaces by finite
    differences and the constants of eq. 13 and 21 assume.
    """

    @property
    def steps(self) -> int:
        """The number ``N`` of inner steps."""
        ...

    def descent_lr(self) -> float:
        """The inner step size ``alpha``."""
        ...


@runtime_checkable
class ProximalSteps(Protocol):
    """An inner loop that minimises ``l(phi; batch) + lam/2 ||phi - w||^2`` (iMAML)."""

    def proximal_lam(self) -> float:
        """The regularisation strength ``lam``."""
        ...


@runtime_checkable
class SelectsParameters(Protocol):
    """An inner loop that adapts only some of the meta parameters."""

    def adapted_names(self, names: Sequence[str]) -> tuple[str, ...]:
        """Which of the meta parameters ``names`` the steps move, in their order.

        Raises:
            ValueError: the selection does not fit ``names``.
        """
        ...


# The optional methods are looked up with getattr, not isinstance on the protocols: since
# Python 3.12 a protocol's isinstance ignores __getattr__, which transparent wrappers
# (and Masked) forward attribute access with.


def adapted_names(inner_loop: InnerLoop, names: Sequence[str]) -> tuple[str, ...]:
    """The meta parameters ``inner_loop`` moves: all of ``names`` unless it selects some."""
    method = getattr(inner_loop, "adapted_names", None)
    return tuple(method(names)) if callable(method) else tuple(names)


def selects_parameters(inner_loop: InnerLoop) -> bool:
    """Whether ``inner_loop`` adapts only a selection (:class:`SelectsParameters`)."""
    return callable(getattr(inner_loop, "adapted_names", None))


def descent_lr(inner_loop: InnerLoop) -> float | None:
    """``alpha`` if every step is plain gradient descent (:class:`GradientDescentSteps`)."""
    method = getattr(inner_loop, "descent_lr", None)
    return float(method()) if callable(method) else None


def proximal_lam(inner_loop: InnerLoop) -> float | None:
    """``lam`` if the steps solve iMAML's regularised problem (:class:`ProximalSteps`)."""
    method = getattr(inner_loop, "proximal_lam", None)
    return float(method()) if callable(method) else None


def describe(inner_loop: object) -> str:
    """An inner loop's type, with the loops it wraps: ``Masked(Proximal(GradientDescent))``."""
    wrapped = getattr(inner_loop, "__dict__", {}).get("inner_loop")
    name = type(inner_loop).__name__
    return name if wrapped is None else f"{name}({describe(wrapped)})"


def elementwise(inner_loop: InnerLoop) -> bool:
    """Whether ``update`` acts on each element alone (the attribute ``elementwise``).

    Such an update may be handed tensors with a leading task dimension: it treats each
    task alone. Any other is vectorised over tasks with ``torch.func.vmap``.
    """
    return getattr(inner_loop, "elementwise", False) is True


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

    elementwise: ClassVar[bool] = True
    """Its update acts on each element alone (vectorised over tasks as it is)."""

    steps: int
    lr: float
    L: float | None = None

    def __post_init__(self) -> None:
        positive_int("steps", self.steps)
        object.__setattr__(self, "lr", positive_float("lr", self.lr))
        if self.L is not None:
            object.__setattr__(self, "L", positive_float("L", self.L))
            check_inner_lr(self.lr, self.steps, self.L)

    def init(self, params: Params) -> InnerState:
        """Plain gradient descent keeps no state."""
        return ()

    def descent_lr(self) -> float:
        """``lr``: every step is plain gradient descent (:class:`GradientDescentSteps`)."""
        return self.lr

    def update(self, params: Params, grads: Params, state: InnerState) -> tuple[Params, InnerState]:
        """``w - lr * grad`` for every adapted parameter."""
        return {name: p.add(grads[name], alpha=-self.lr) for name, p in params.items()}, state


@dataclass(frozen=True)
class Momentum:
    r"""``steps`` steps of SGD with heavy-ball (Polyak) or Nesterov momentum.

    With ``torch.optim.SGD``'s convention (no dampening), a buffer ``b`` per parameter:

    .. math::
        b_0 = 0, \qquad b_{j+1} = \mu b_j + g_j, \qquad
        w_{j+1} = w_j - \alpha b_{j+1}, \qquad g_j = \nabla l_i(w_j; \mathrm{batch}_j)

    or, with ``nesterov``, :math:`w_{j+1} = w_j - \alpha (g_j + \mu b_{j+1})`.
    The buffer starts at zero, so the first step sets :math:`b_1 = g_0`, as
    ``torch.optim.SGD`` does (it starts its buffer at the first gradient): the
    iterates are those of ``torch.optim.SGD(momentum=mu, nesterov=...)``.
    ``momentum=0`` is :class:`GradientDescent`. The state is the buffers, by
    parameter name; the estimators differentiate through them.

    Args:
        steps: the number ``N`` of inner steps, >= 1.
        lr: the inner step size ``alpha``, > 0.
        momentum: the momentum factor ``mu``, in [0, 1). Default: 0.9.
        nesterov: use Nesterov's momentum instead of the heavy ball. Default: False.

    References:
        B. T. Polyak. *Some methods of speeding up the convergence of iteration
        methods.* USSR Computational Mathematics and Mathematical Physics, 1964.
        I. Sutskever, J. Martens, G. Dahl, G. Hinton. *On the importance of
        initialization and momentum in deep learning.* ICML 2013.

    Example:
        >>> import torch, torch_maml as tm
        >>> inner = tm.Momentum(steps=5, lr=0.01, momentum=0.9)
        >>> params = {"w": torch.tensor([1.0])}
        >>> state = inner.init(params)
        >>> params, state = inner.update(params, {"w": torch.tensor([2.0])}, state)
        >>> params["w"], state["w"]
        (tensor([0.9800]), tensor([2.]))
    """

    elementwise: ClassVar[bool] = True
    """Its update acts on each element alone (vectorised over tasks as it is)."""

    steps: int
    lr: float
    momentum: float = 0.9
    nesterov: bool = False

    def __post_init__(self) -> None:
        positive_int("steps", self.steps)
        object.__setattr__(self, "lr", positive_float("lr", self.lr))
        object.__setattr__(self, "momentum", unit_interval("momentum", self.momentum))
        if not isinstance(self.nesterov, bool):
            raise TypeError(f"'nesterov' must be a bool (got {self.nesterov!r})")

    def init(self, params: Params) -> InnerState:
        """The momentum buffers ``b_0 = 0``, by parameter name."""
        return {name: torch.zeros_like(p) for name, p in params.items()}

    def update(self, params: Params, grads: Params, state: InnerState) -> tuple[Params, InnerState]:
        """``b' = mu b + g``; ``w' = w - lr b'`` (or ``w - lr (g + mu b')``, Nesterov)."""
        buffers = {name: self.momentum * state[name] + grads[name] for name in params}
        if self.nesterov:
            directions = {name: grads[name] + self.momentum * buffers[name] for name in params}
        else:
            directions = buffers
        return {name: p - self.lr * directions[name] for name, p in params.items()}, buffers


class AdamState(TypedDict):
    """The state of :class:`Adam`: the moment estimates and the step count.

    A plain dict at run time (a ``TypedDict`` for the type checker).
    """

    m: Params
    """The first-moment estimates ``m_j``, by parameter name."""
    v: Params
    """The second-moment estimates ``v_j``, by parameter name."""
    t: Tensor
    """The number ``j`` of steps taken, a floating point scalar."""


def _sqrt(x: Tensor) -> Tensor:
    """``sqrt(x)`` for ``x >= 0``, its derivative at 0 taken as 0 rather than infinite."""
    positive = x > 0
    root = torch.sqrt(torch.where(positive, x, torch.ones_like(x)))
    return torch.where(positive, root, torch.zeros_like(x))


@dataclass(frozen=True)
class Adam:
    r"""``steps`` steps of Adam (Kingma & Ba 2015), differentiable, with bias correction.

    With ``betas = (beta_1, beta_2)`` and ``g_j = grad l_i(w_j; batch_j)``, elementwise:

    .. math::
        m_{j+1} = \beta_1 m_j + (1 - \beta_1) g_j, \qquad
        v_{j+1} = \beta_2 v_j + (1 - \beta_2) g_j^2, \qquad m_0 = v_0 = 0

    .. math::
        w_{j+1} = w_j - \alpha \frac{\hat m_{j+1}}{\sqrt{\hat v_{j+1}} + \epsilon}, \qquad
        \hat m_{j+1} = \frac{m_{j+1}}{1 - \beta_1^{j+1}}, \quad
        \hat v_{j+1} = \frac{v_{j+1}}{1 - \beta_2^{j+1}}

    the iterates of ``torch.optim.Adam`` (``eps`` outside the square root, as there).

    **At v = 0.** The derivative of ``sqrt(v)`` is infinite at ``v = 0``, where a
    parameter has had an exactly zero gradient at every step so far (a weight the
    loss does not use, a ReLU unit that never fires): plain autograd then gives
    ``inf * 0 = NaN`` meta gradients. Here the square root's derivative at ``v = 0``
    is taken as 0. The iterates stay those of ``torch.optim.Adam``, and the meta
    gradient is still the exact derivative of the step: where ``v = 0``, ``m = 0``
    too (both are sums over the same past gradients, all zero), so near such a
    point the step is :math:`w - \alpha \hat m / \epsilon` to first order, whatever
    the square root's derivative is taken to be. (An ``eps`` inside the square root,
    as TorchOpt's ``eps_root``, would also avoid the NaN, but changes the iterates.)
    The factor :math:`1/\epsilon` is Adam's own sensitivity to a gradient near zero:
    a larger ``eps`` makes the meta gradient smoother.

    The state is an :class:`AdamState`, ``{"m": m, "v": v, "t": t}``; the estimators
    differentiate through ``m`` and ``v``. The step count ``t`` only counts.

    Args:
        steps: the number ``N`` of inner steps, >= 1.
        lr: the inner step size ``alpha``, > 0.
        betas: the moment decay rates ``(beta_1, beta_2)``, each in [0, 1).
            Default: (0.9, 0.999).
        eps: ``epsilon``, added to the denominator, > 0. Default: 1e-8.

    References:
        D. P. Kingma, J. Ba. *Adam: A Method for Stochastic Optimization.* ICLR 2015.

    Example:
        >>> import torch, torch_maml as tm
        >>> inner = tm.Adam(steps=5, lr=0.1)
        >>> params = {"w": torch.tensor([1.0, 2.0])}
        >>> state = inner.init(params)
        >>> params, state = inner.update(params, {"w": torch.tensor([4.0, 0.0])}, state)
        >>> params["w"]  # the first step moves by lr * sign(g), nearly
        tensor([0.9000, 2.0000])
    """

    elementwise: ClassVar[bool] = True
    """Its update acts on each element alone (vectorised over tasks as it is)."""

    steps: int
    lr: float
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8

    def __post_init__(self) -> None:
        positive_int("steps", self.steps)
        object.__setattr__(self, "lr", positive_float("lr", self.lr))
        betas = self.betas
        if not isinstance(betas, (tuple, list)) or len(betas) != 2:
            shown = (
                repr(betas)
                if isinstance(betas, (tuple, list))
                else f"an object of type {type(betas).__name__}"
            )
            raise TypeError(f"'betas' must be a pair of numbers in [0, 1) (got {shown})")
        object.__setattr__(
            self,
            "betas",
            (unit_interval("betas[0]", betas[0]), unit_interval("betas[1]", betas[1])),
        )
        object.__setattr__(self, "eps", positive_float("eps", self.eps))

    def init(self, params: Params) -> InnerState:
        """``m_0 = v_0 = 0`` and ``t = 0`` (in the parameters' dtype)."""
        first = next(iter(params.values()), None)
        t = torch.zeros(()) if first is None else first.new_zeros(())
        m = {name: torch.zeros_like(p) for name, p in params.items()}
        v = {name: torch.zeros_like(p) for name, p in params.items()}
        return AdamState(m=m, v=v, t=t)

    def update(self, params: Params, grads: Params, state: InnerState) -> tuple[Params, InnerState]:
        """One Adam step, as in ``torch.optim.Adam``; see the class docstring."""
        beta1, beta2 = self.betas
        t = state["t"].detach() + 1  # a count: nothing to differentiate
        correction1 = 1 - torch.pow(beta1, t)
        correction2 = 1 - torch.pow(beta2, t)
        m = {name: beta1 * state["m"][name] + (1 - beta1) * grads[name] for name in params}
        v = {name: beta2 * state["v"][name] + (1 - beta2) * grads[name].square() for name in params}
        new = {
            name: p - self.lr * (m[name] / correction1) / (_sqrt(v[name] / correction2) + self.eps)
            for name, p in params.items()
        }
        return new, AdamState(m=m, v=v, t=t)


@dataclass(frozen=True)
class Masked:
    r"""``inner_loop`` adapting only the selected parameters; the others pass through.

    The others are still meta parameters: the estimators differentiate each step
    with respect to all of them (for gradient descent, their share of the meta
    gradient is ``-alpha H_{fa} v`` at each step plus their outer gradient), so the
    meta gradient reaches every trainable parameter, as in ANIL (Raghu et al. 2020,
    with the head selected). ``MetaOptimizer(adapted=...)`` builds one.

    The wrapped loop's optional methods (:class:`GradientDescentSteps`,
    :class:`ProximalSteps`) are forwarded: ``Masked(GradientDescent(...), ...)`` is
    still gradient descent, on the selected parameters.

    Args:
        inner_loop: the inner optimiser of the selected parameters.
        selection: parameter names or module prefixes (``["head"]`` selects
            ``head.weight`` and ``head.bias``), or a predicate on names.

    Example:
        >>> import torch_maml as tm
        >>> inner = tm.Masked(tm.GradientDescent(steps=5, lr=0.1), ["head"])
        >>> inner.adapted_names(["body.weight", "head.weight", "head.bias"])
        ('head.weight', 'head.bias')
    """

    inner_loop: InnerLoop
    selection: ParamSelection = field(hash=False)

    def __post_init__(self) -> None:
        if not isinstance(self.inner_loop, InnerLoop):
            raise TypeError(
                "'inner_loop' must implement the InnerLoop protocol "
                f"(got an object of type {type(self.inner_loop).__name__})"
            )
        if not callable(self.selection):
            if (
                isinstance(self.selection, str)
                or not isinstance(self.selection, Collection)
                or not all(isinstance(e, str) for e in self.selection)
            ):
                raise TypeError(
                    "'selection' must be a collection of parameter names or module prefixes, "
                    f"or a predicate on names (got {self.selection!r})"
                )
            object.__setattr__(self, "selection", tuple(self.selection))
        object.__setattr__(self, "_resolved", {})  # names -> selection, per call site

    def __getattr__(self, name: str) -> Any:
        # The wrapped loop's optional protocol methods (descent_lr, proximal_lam...).
        if name.startswith("__") or "inner_loop" not in self.__dict__:
            raise AttributeError(name)
        return getattr(self.__dict__["inner_loop"], name)

    @property
    def steps(self) -> int:
        """The wrapped loop's number ``N`` of steps."""
        return self.inner_loop.steps

    def adapted_names(self, names: Sequence[str]) -> tuple[str, ...]:
        """The names of ``names`` that the selection picks (and the wrapped loop adapts)."""
        chosen = resolve_selection(self.selection, names, argument="selection")
        return adapted_names(self.inner_loop, chosen)

    def init(self, params: Params) -> InnerState:
        """The wrapped loop's state for the selected parameters."""
        return self.inner_loop.init(self._selected(params))

    def update(self, params: Params, grads: Params, state: InnerState) -> tuple[Params, InnerState]:
        """A step of the selected parameters; the others are returned as they are."""
        selected = self._selected(params)
        adapted, state = self.inner_loop.update(
            selected, {name: grads[name] for name in selected}, state
        )
        return {**params, **adapted}, state

    def _selected(self, params: Params) -> Params:
        key = tuple(params)
        resolved: dict[tuple[str, ...], tuple[str, ...]] = self.__dict__["_resolved"]
        if key not in resolved:
            resolved[key] = resolve_selection(self.selection, key, argument="selection")
        return {name: params[name] for name in resolved[key]}
