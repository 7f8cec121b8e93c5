r"""The mathematics of multi-step MAML as pure functions over parameter dicts.

Everything here takes the meta parameters ``w`` as a :data:`~torch_maml.typing.Params`
dict and returns new dicts; nothing mutates a module. The classes of the package
(estimators, :class:`~torch_maml.MetaOptimizer`) only choose which batches feed
which term and call these functions. They are public so that a user's own
:class:`~torch_maml.MetaGradientEstimator` can reuse them.

Two ways to compute one task's meta gradient (SPEC section 2):

* :func:`unrolled_meta_gradient`: autograd through the unrolled inner loop
  (nested ``torch.func.grad``, the same as ``create_graph=True``). Each Hessian is
  taken on the batch that moved the iterate. Memory grows with ``N``.
* :func:`recursion_meta_gradient`: the iterates ``w_0..w_N`` are computed without a
  graph, then the vector-Jacobian products of the inner steps are applied right to
  left, each on its own Hessian batch. For gradient descent this is eq. 7 / eq. 12:

  .. math::
      v \leftarrow \nabla l(w_N; \mathrm{outer}), \qquad
      v \leftarrow v - \alpha\, \nabla^2 l(w_j; \mathrm{hess}_j)\, v
      \quad (j = N-1, \dots, 0), \qquad G = v

  Memory holds the iterates and one step's graph, whatever ``N``.

Hessian-vector products are reverse-over-reverse (``torch.func.vjp`` of
``torch.func.grad``): forward-over-reverse fails on ``F.mse_loss`` in torch 2.13.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Generic, NamedTuple

import torch
from torch import Tensor, nn
from torch.func import functional_call, grad_and_value, vjp

# torch.func's own pytree utilities; torch has no public pytree module before 2.x releases
# that this package supports, and these functions have been stable since torch 1.13.
from torch.utils._pytree import tree_leaves, tree_map

from .inner import InnerLoop
from .typing import Batch, InnerState, LossFn, ModelT, Params

__all__ = [
    "MetaObjective",
    "OracleCounts",
    "TaskLoss",
    "adapt",
    "inner_iterates",
    "inner_step",
    "loss_grad",
    "recursion_meta_gradient",
    "unrolled_meta_gradient",
]


class _LossModule(nn.Module, Generic[ModelT]):
    """Runs ``loss_fn(model, batch)`` as a module so functional_call can swap weights."""

    def __init__(self, model: ModelT, loss_fn: LossFn[ModelT, Any]) -> None:
        super().__init__()
        self.model = model
        self.loss_fn = loss_fn

    def forward(self, batch: Batch) -> Tensor:
        return self.loss_fn(self.model, batch)


class TaskLoss:
    """``l(w; batch)``: the user's loss closure as a pure function of the adapted weights.

    ``loss_fn(model, batch)`` is called with the user's own module, its adapted
    parameters swapped for ``params`` by :func:`torch.func.functional_call`; the
    other parameters (``requires_grad=False``) and the buffers are the module's own.

    Args:
        model: the user's module.
        loss_fn: ``loss_fn(model, batch) -> scalar Tensor``.
        names: the names (as in ``model.named_parameters()``) of the adapted parameters.
    """

    def __init__(self, model: ModelT, loss_fn: LossFn[ModelT, Any], names: Sequence[str]) -> None:
        self._module = _LossModule(model, loss_fn)
        self.model: nn.Module = model
        self.names = tuple(names)

    def __call__(self, params: Params, batch: Batch) -> Tensor:
        """The loss of ``batch`` at the weights ``params``, checked to be a real scalar."""
        swapped = {f"model.{name}": value for name, value in params.items()}
        out = functional_call(self._module, swapped, (batch,))
        if not isinstance(out, Tensor):
            raise TypeError(
                "'loss_fn' must return a scalar Tensor "
                f"(got an object of type {type(out).__name__})"
            )
        if out.ndim != 0:
            raise ValueError(
                "'loss_fn' must return a scalar Tensor "
                f"(got a Tensor of shape {tuple(out.shape)}); reduce it, e.g. with .mean()"
            )
        if not out.is_floating_point():
            raise TypeError(
                f"'loss_fn' must return a floating point Tensor (got dtype {out.dtype})"
            )
        return out

    def params(self) -> Params:
        """The current values of the adapted parameters, detached: ``w_k``."""
        named = dict(self.model.named_parameters())
        return {name: named[name].detach() for name in self.names}


class MetaObjective(NamedTuple):
    """What defines the meta objective ``L(w) = l(w_N(w); outer)`` apart from the data."""

    loss: TaskLoss
    inner_loop: InnerLoop


@dataclass
class OracleCounts:
    """Oracle calls made so far (SPEC section 6): gradients and Hessian-vector products."""

    grad_evals: int = 0
    hvp_evals: int = 0


def loss_grad(loss: TaskLoss, params: Params, batch: Batch) -> tuple[Params, Tensor]:
    """``(grad l(w; batch), l(w; batch))``, differentiable when called under a transform.

    Raises:
        ValueError: the loss does not depend on the adapted parameters at all.
    """

    def checked(p: Params) -> Tensor:
        out = loss(p, batch)
        if not out.requires_grad:
            raise ValueError(
                "'loss_fn' returned a loss that does not depend on the adapted parameters "
                "(it has no grad); does it detach, or ignore the model?"
            )
        return out

    grads, value = grad_and_value(checked)(params)
    return grads, value


def inner_step(
    objective: MetaObjective, params: Params, state: InnerState, batch: Batch
) -> tuple[Params, InnerState]:
    """One inner step on ``batch``: ``update(w_j, grad l(w_j; batch), s_j)``."""
    grads, _ = loss_grad(objective.loss, params, batch)
    return objective.inner_loop.update(params, grads, state)


def inner_iterates(
    objective: MetaObjective,
    params: Params,
    inner_batches: Sequence[Batch],
    counts: OracleCounts,
) -> tuple[list[Params], list[InnerState]]:
    """The iterates ``w_0..w_N`` and states ``s_0..s_N``, one step per inner batch."""
    iterates = [params]
    states = [objective.inner_loop.init(params)]
    for batch in inner_batches:
        new_params, new_state = inner_step(objective, iterates[-1], states[-1], batch)
        counts.grad_evals += 1
        iterates.append(new_params)
        states.append(new_state)
    return iterates, states


def adapt(
    objective: MetaObjective,
    params: Params,
    inner_batches: Sequence[Batch],
    counts: OracleCounts | None = None,
) -> Params:
    """The adapted weights ``w_N``, detached, after one step per inner batch."""
    w, state = params, objective.inner_loop.init(params)
    for batch in inner_batches:
        w, state = inner_step(objective, w, state, batch)
        if counts is not None:
            counts.grad_evals += 1
    return {name: value.detach() for name, value in w.items()}


def unrolled_meta_gradient(
    objective: MetaObjective,
    params: Params,
    inner_batches: Sequence[Batch],
    outer_batch: Batch,
    counts: OracleCounts,
) -> tuple[Params, Tensor]:
    """One task's meta gradient by autograd through the unrolled inner loop (eq. 3).

    Differentiates ``l(w_N(w); outer)`` with respect to ``w``, where ``w_N`` takes
    one step per inner batch; the Hessian of each step is therefore taken on that
    step's own batch. Costs N + 1 gradients and N Hessian-vector products (the
    backward pass through each inner step) and keeps the whole unrolled graph.

    Returns:
        ``(G, l(w_N; outer))``, both detached.
    """

    def meta_loss(w: Params) -> Tensor:
        state = objective.inner_loop.init(w)
        for batch in inner_batches:
            w, state = inner_step(objective, w, state, batch)
        return objective.loss(w, outer_batch)

    meta_grad, value = grad_and_value(meta_loss)(params)
    steps = len(inner_batches)
    counts.grad_evals += steps + 1
    counts.hvp_evals += steps
    return meta_grad, value.detach()


def _step_vjp(
    objective: MetaObjective,
    params: Params,
    state: InnerState,
    hessian_batch: Batch,
    cotangent: tuple[Params, InnerState],
) -> tuple[Params, InnerState]:
    """The vector-Jacobian product of one inner step, its gradient taken on ``hessian_batch``.

    For gradient descent, ``(v, ()) -> (v - alpha * H(w_j; hessian_batch) v, ())``.
    """

    def step_map(p: Params, s: InnerState) -> tuple[Params, InnerState]:
        return inner_step(objective, p, s, hessian_batch)

    pullback = vjp(step_map, params, state)[1]
    cot_params, cot_state = pullback(cotangent)
    return cot_params, cot_state


def recursion_meta_gradient(
    objective: MetaObjective,
    params: Params,
    inner_batches: Sequence[Batch],
    hessian_batches: Sequence[Batch],
    outer_batch: Batch,
    counts: OracleCounts,
) -> tuple[Params, Tensor]:
    r"""One task's meta gradient by the backward recursion over stored iterates (eq. 7, 12).

    .. math::
        G = (I - \alpha H_0)(I - \alpha H_1)\cdots(I - \alpha H_{N-1})
            \,\nabla l(w_N; \mathrm{outer}),
        \qquad H_j = \nabla^2 l(w_j; \mathrm{hess}_j)

    for gradient descent; for any other inner loop, the product of the transposed
    Jacobians of its steps, each step's gradient taken on ``hess_j``. The iterates
    move on ``inner_batches``; Hessians use ``hessian_batches``, which may be
    independent of them (the resampling case). Costs N + 1 gradients and N
    Hessian-vector products; no graph of the unrolled loop is kept.

    Returns:
        ``(G, l(w_N; outer))``, both detached.
    """
    if len(hessian_batches) != len(inner_batches):
        raise ValueError(
            f"'hessian_batches' must hold one batch per inner step ({len(inner_batches)}) "
            f"(got {len(hessian_batches)})"
        )
    iterates, states = inner_iterates(objective, params, inner_batches, counts)
    outer_grad, value = loss_grad(objective.loss, iterates[-1], outer_batch)
    counts.grad_evals += 1

    cot_params: Params = outer_grad
    cot_state: InnerState = tree_map(torch.zeros_like, states[-1])
    for j in reversed(range(len(inner_batches))):
        cot_params, cot_state = _step_vjp(
            objective, iterates[j], states[j], hessian_batches[j], (cot_params, cot_state)
        )
        counts.hvp_evals += 1

    if tree_leaves(cot_state):
        # The state s_0 = init(w) may depend on w: add its share of the gradient.
        init_pullback = vjp(objective.inner_loop.init, params)[1]
        (through_state,) = init_pullback(cot_state)
        cot_params = {name: g + through_state[name] for name, g in cot_params.items()}
    return {name: g.detach() for name, g in cot_params.items()}, value.detach()
