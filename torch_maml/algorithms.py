r"""The meta-gradient algorithms, each written once, for one task, over an :class:`~torch_maml.Ops`.

Each takes ``(ops, w, data)`` (a :class:`~torch_maml.TaskData`: one batch per inner
step, one per step for its Hessian or none to take each on the step's own batch,
one outer batch) and returns a
:class:`~torch_maml.MetaGradient` for that task. :meth:`~torch_maml.MetaObjective.map_tasks`
runs one over a meta-batch, task by task or vectorised, chunked, compiled or
captured: the algorithm never knows which (see :mod:`torch_maml.ops`).

All of them move the weights with the same forward rollout of the inner loop,
:func:`rollout`, which :meth:`~torch_maml.MetaOptimizer.adapt` runs too. The
paper's meta gradient (eq. 3, 7, 12),

.. math::
    G = (I - \alpha H_0)(I - \alpha H_1)\cdots(I - \alpha H_{N-1})\,\nabla l(w_N; \mathrm{outer}),
    \qquad H_j = \nabla^2 l(w_j; \mathrm{hess}_j),

is :func:`recursion_meta_gradient` (right to left, by Hessian-vector products, for any
inner loop the product of its steps' transposed Jacobians) and, when every
``hess_j`` is the batch that moved ``w_j``, also :func:`unrolled_meta_gradient`
(autograd through the unrolled loop). The others are the field's alternatives:
first-order MAML, Reptile, Hessian-free MAML and iMAML.

Costs, per task, in gradient evaluations and Hessian-vector products (the
counts of the paper's Corollaries 6 and 10) are returned with each result.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import NamedTuple

import torch
from torch import Tensor

from . import trees
from .ops import MetaGradient, Ops, Pullback
from .tasks import TaskData
from .typing import Batch, InnerState, Params

__all__ = [
    "Rollout",
    "conjugate_gradient",
    "finite_difference_hvp",
    "first_order_meta_gradient",
    "hessian_free_meta_gradient",
    "implicit_meta_gradient",
    "recursion_meta_gradient",
    "reptile_meta_gradient",
    "rollout",
    "unrolled_meta_gradient",
]


class Rollout(NamedTuple):
    """The inner loop run forward: ``w_N`` and, if recorded, every step on the way."""

    params: Params
    """``w_N``, detached."""
    state: InnerState
    """``s_N``, detached."""
    values: list[Tensor]
    """``l(w_j; batch_j)`` for ``j = 0 .. N-1`` (one per task when vectorised)."""
    iterates: list[Params]
    """``w_0 .. w_{N-1}`` if recorded, else empty."""
    states: list[InnerState]
    """``s_0 .. s_{N-1}`` if recorded, else empty."""
    pullbacks: list[Pullback | None]
    """Each step's pullback on its own batch, where asked for (``linearize``)."""


def rollout(
    ops: Ops,
    params: Params,
    batches: Sequence[Batch],
    *,
    record: bool = False,
    linearize: Sequence[bool] = (),
) -> Rollout:
    """Run the inner loop from ``w_0 = params``, one step per batch.

    Args:
        ops: the operations.
        params: ``w_0``.
        batches: ``batch_0 .. batch_{N-1}``.
        record: keep every iterate and state (the recursions need them).
        linearize: for each step, whether to return its pullback on its own batch.
    """
    w, state = trees.detach(params), ops.init(params)
    values: list[Tensor] = []
    iterates: list[Params] = []
    states: list[InnerState] = []
    pullbacks: list[Pullback | None] = []
    for j, batch in enumerate(batches):
        if record:
            iterates.append(w)
            states.append(state)
        step = ops.step(w, state, batch, linearize=j < len(linearize) and linearize[j])
        w, state = step.params, step.state
        values.append(step.value)
        pullbacks.append(step.pullback)
    return Rollout(w, state, values, iterates, states, pullbacks)


def unrolled_meta_gradient(ops: Ops, params: Params, data: TaskData) -> MetaGradient:
    """The meta gradient by autograd through the unrolled inner loop (eq. 3).

    Differentiates ``l(w_N(w); outer)`` with respect to ``w``; the Hessian of each
    step is taken on the batch that moved the iterate (``data.hessian`` is not used).
    Costs N + 1 gradients and N Hessian-vector products and keeps the whole unrolled
    graph.
    """
    grads, value = ops.unrolled(params, data.inner, data.outer)
    steps = len(data.inner)
    return MetaGradient(grads, value, steps + 1, steps)


def recursion_meta_gradient(ops: Ops, params: Params, data: TaskData) -> MetaGradient:
    r"""The meta gradient by the backward recursion over stored iterates (eq. 7, 12).

    .. math::
        v \leftarrow \nabla l(w_N; \mathrm{outer}), \qquad
        v \leftarrow v - \alpha\, \nabla^2 l(w_j; \mathrm{hess}_j)\, v
        \quad (j = N-1, \dots, 0), \qquad G = v

    for gradient descent; for any other inner loop, the product of the transposed
    Jacobians of its steps, each step's gradient taken on ``hess_j``. The iterates
    move on ``data.inner``; Hessians use ``data.hessian``, which may be independent
    of them (the resampling case), or, if it is empty, each step's own batch: then
    the step's pullback comes from the rollout (kept or recomputed, as the
    execution layer chose for memory). Costs N + 1 gradients and N
    Hessian-vector products.

    Raises:
        ValueError: ``data.hessian`` is neither empty nor one batch per inner step.
    """
    steps = len(data.inner)
    own = _check_hessian(data)
    run = rollout(ops, params, data.inner, record=True, linearize=[own] * steps)
    outer_grad, value = ops.grad(run.params, data.outer)
    cotangent = (outer_grad, trees.zeros_like(run.state))
    for j in reversed(range(steps)):
        pullback = run.pullbacks[j]
        if pullback is not None:
            cotangent = pullback(cotangent)
        else:
            cotangent = ops.step_vjp(run.iterates[j], run.states[j], data.hessian[j], cotangent)
    grads, cot_state = cotangent
    if trees.leaves(cot_state):  # the state s_0 = init(w) may depend on w
        grads = trees.add(grads, ops.init_vjp(params, cot_state))
    return MetaGradient(trees.detach(grads), value, steps + 1, steps)


def _check_hessian(data: TaskData) -> bool:
    """Whether each step's Hessian is on its own batch (no ``hessian``); else check them."""
    if not data.hessian:
        return True
    if len(data.hessian) != len(data.inner):
        raise ValueError(
            f"'hessian' must hold one batch per inner step ({len(data.inner)}) or none "
            f"(got {len(data.hessian)})"
        )
    return False


def _hessian_batch(data: TaskData, j: int) -> Batch:
    return data.hessian[j] if data.hessian else data.inner[j]


def first_order_meta_gradient(ops: Ops, params: Params, data: TaskData) -> MetaGradient:
    r"""First-order MAML: the outer gradient at the adapted weights, no Hessian term.

    .. math:: G = \nabla l(w_N; \mathrm{outer})

    Costs N + 1 gradients and no Hessian-vector product.
    """
    run = rollout(ops, params, data.inner)
    grads, value = ops.grad(run.params, data.outer)
    return MetaGradient(grads, value, len(data.inner) + 1, 0)


def reptile_meta_gradient(
    ops: Ops, params: Params, data: TaskData, *, scale: float
) -> MetaGradient:
    r"""Reptile's direction, scaled: ``G = scale * (w - w_N)``.

    .. math:: G = s\,(w - w_N)

    With gradient descent and ``scale = 1 / (N alpha)`` this is the mean of the inner
    gradients along the path. The outer loss is evaluated at ``w_N`` (a forward
    pass, not counted); costs N gradients.
    """
    run = rollout(ops, params, data.inner)
    value = ops.value(run.params, data.outer)
    grads = {name: scale * (p - run.params[name]) for name, p in params.items()}
    return MetaGradient(grads, value, len(data.inner), 0)


def finite_difference_hvp(
    ops: Ops, params: Params, batch: Batch, vector: Params, delta: float
) -> Params:
    r"""A Hessian-vector product from two gradients, by a central difference.

    .. math::
        \nabla^2 l(w)\, v \approx
        \frac{\nabla l(w + h v) - \nabla l(w - h v)}{2 h}, \qquad h = \frac{\delta}{\|v\|}

    The two points lie at distance ``delta`` from ``w`` whatever the size of ``v``, so
    the relative error is ``O(delta^2)`` (exact for quadratic losses); ``v = 0``
    gives 0.
    """
    norm = ops.norm(vector)
    h = delta / torch.where(norm > 0, norm, torch.ones_like(norm))
    step = ops.scale(vector, h)
    grads_plus, _ = ops.grad(trees.add(params, step), batch)
    grads_minus, _ = ops.grad(trees.axpy(-1.0, step, params), batch)
    difference = trees.axpy(-1.0, grads_minus, grads_plus)
    return ops.scale(difference, 0.5 / h)


def _restricted(ops: Ops, v: Params) -> Params:
    """``v`` with the entries of the parameters the inner loop does not move set to 0."""
    if len(ops.adapted) == len(v):
        return v
    return {n: g if n in ops.adapted else torch.zeros_like(g) for n, g in v.items()}


def hessian_free_meta_gradient(
    ops: Ops, params: Params, data: TaskData, *, lr: float, delta: float
) -> MetaGradient:
    r"""The gradient-descent recursion with finite-difference HVPs (HF-MAML, N steps).

    .. math::
        v \leftarrow \nabla l(w_N; \mathrm{outer}), \qquad
        v \leftarrow v - \alpha\, \frac{\nabla l(w_j + h_j \tilde v; \mathrm{hess}_j)
            - \nabla l(w_j - h_j \tilde v; \mathrm{hess}_j)}{2 h_j}
        \quad (j = N-1, \dots, 0), \qquad G = v

    with ``h_j = delta / ||v~||`` (:func:`finite_difference_hvp`) and ``v~`` the
    entries of ``v`` that the inner loop moves (the others 0: the transposed
    Jacobian of such a step is ``v - alpha H v~``). For gradient descent of step
    size ``lr``. Costs N + 1 gradients plus 2 N for the differences, no HVP.
    """
    steps = len(data.inner)
    _check_hessian(data)
    run = rollout(ops, params, data.inner, record=True)
    v, value = ops.grad(run.params, data.outer)
    for j in reversed(range(steps)):
        direction = _restricted(ops, v)
        batch = _hessian_batch(data, j)
        product = finite_difference_hvp(ops, run.iterates[j], batch, direction, delta)
        v = trees.axpy(-lr, product, v)
    return MetaGradient(v, value, 3 * steps + 1, 0)


def conjugate_gradient(
    ops: Ops, matvec: Callable[[Params], Params], rhs: Params, steps: int, tol: float = 0.0
) -> tuple[Params, int]:
    r"""At most ``steps`` iterations of conjugate gradient for ``A x = b``, from ``x = 0``.

    ``A`` (given by ``matvec``) must be symmetric positive definite. A task stops
    moving once its residual satisfies ``||b - A x|| <= tol * ||b||``; the loop ends
    when every task has (vectorised, the tasks that stopped keep their ``x``). A
    zero residual or curvature stops a task instead of dividing by 0.

    Returns:
        ``(x, iterations)``: the solution and the number of ``matvec`` calls made.
    """
    x = trees.zeros_like(rhs)
    r, p = dict(rhs), dict(rhs)
    rr = ops.dot(r, r)
    threshold = tol**2 * rr
    iterations = 0
    for _ in range(steps):
        active = rr > threshold
        if tol > 0 and not ops.any(active):
            break
        ap = matvec(p)
        iterations += 1
        curvature = ops.dot(p, ap)
        moving = active & (curvature != 0)
        step = torch.where(moving, rr / torch.where(moving, curvature, 1), 0)
        x = trees.add(x, ops.scale(p, step))
        r = trees.axpy(-1.0, ops.scale(ap, step), r)
        rr_new = ops.dot(r, r)
        moving = active & (rr != 0)
        ratio = torch.where(moving, rr_new / torch.where(moving, rr, 1), 0)
        p = trees.add(r, ops.scale(p, ratio))
        rr = torch.where(active, rr_new, rr)
    return x, iterations


def implicit_meta_gradient(
    ops: Ops, params: Params, data: TaskData, *, lam: float, cg_steps: int, tol: float
) -> MetaGradient:
    r"""The implicit meta gradient of iMAML, by conjugate gradient.

    The (proximal) inner loop approximately solves
    ``phi*(w) = argmin_phi l(phi; hess) + lam/2 ||phi - w||^2``; by the implicit
    function theorem at its result ``phi_N``,

    .. math::
        G = \Big(I + \frac{1}{\lambda} \nabla^2 l(\phi_N; \mathrm{hess})\Big)^{-1}
            \nabla l(\phi_N; \mathrm{outer})

    solved by :func:`conjugate_gradient` (one HVP per iteration) on the first Hessian
    batch (the support set).
    When only some parameters ``a`` take inner steps, the others ``f`` enter ``phi*`` as
    fixed inputs: ``G_a = x`` solves the system restricted to ``a``, and
    ``G_f = grad_f l(phi_N; outer) - H_{fa} x / lam`` (one more HVP). Costs N + 1
    gradients and the CG iterations' HVPs.
    """
    hessian_batch = _hessian_batch(data, 0)
    run = rollout(ops, params, data.inner)
    outer_grad, value = ops.grad(run.params, data.outer)

    def matvec(v: Params) -> Params:
        product = ops.hvp(run.params, hessian_batch, v)
        return _restricted(ops, trees.axpy(1.0 / lam, product, v))

    solution, iterations = conjugate_gradient(
        ops, matvec, _restricted(ops, outer_grad), cg_steps, tol
    )
    evals = (len(data.inner) + 1, iterations)
    if len(ops.adapted) == len(params):
        return MetaGradient(solution, value, *evals)
    product = ops.hvp(run.params, hessian_batch, solution)
    grads = {
        name: solution[name] if name in ops.adapted else g - product[name] / lam
        for name, g in outer_grad.items()
    }
    return MetaGradient(grads, value, evals[0], evals[1] + 1)
