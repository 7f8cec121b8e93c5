r"""The mathematics of multi-step MAML as pure functions over parameter dicts.

Everything here takes the meta parameters ``w`` as a :data:`~torch_maml.typing.Params`
dict and returns new dicts; nothing mutates a module. The classes of the package
(estimators, :class:`~torch_maml.MetaOptimizer`) only choose which batches feed
which term and call these functions. They are public so that a user's own
:class:`~torch_maml.MetaGradientEstimator` can reuse them.

The algorithms are written once, against an :class:`Ops` bundle of three
single-step operations (an inner step, a loss gradient, the vector-Jacobian
product of an inner step). :func:`task_ops` gives them for one task;
:func:`batched_ops` gives the same operations ``torch.func.vmap``-ed over a leading
task dimension, optionally compiled (see :mod:`torch_maml.compiling`). Two ways to
compute the meta gradient (SPEC section 2):

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

The last section holds the algorithms of the estimators beyond the paper's three:
:func:`first_order_meta_gradient`, :func:`reptile_meta_gradient`,
:func:`hessian_free_meta_gradient` (the recursion with :func:`finite_difference_hvp`)
and :func:`implicit_meta_gradient` (:func:`conjugate_gradient` with :func:`loss_hvp`).

Hessian-vector products are reverse-over-reverse (forward-over-reverse fails on
``F.mse_loss`` in torch 2.13): ``torch.func.vjp`` of a step, or, for torch.compile,
which cannot trace ``vjp`` inside ``vmap``, ``grad_w <F(w), v>`` from nested
``torch.func.grad``.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass
from typing import Any, Generic

import torch
from torch import Tensor, nn
from torch.func import functional_call, grad, grad_and_value, vjp, vmap

# torch.func's own pytree utilities: torch has no public pytree module in the releases
# this package supports, and these functions have been stable since torch 1.13.
from torch.utils._pytree import tree_flatten, tree_leaves, tree_map, tree_unflatten

from .inner import InnerLoop, _Subset
from .typing import Batch, InnerState, LossFn, ModelT, Params

__all__ = [
    "Ops",
    "OracleCounts",
    "TaskLoss",
    "adapt",
    "batched_ops",
    "conjugate_gradient",
    "finite_difference_hvp",
    "first_order_meta_gradient",
    "hessian_free_meta_gradient",
    "implicit_meta_gradient",
    "inner_step",
    "loss_grad",
    "loss_hvp",
    "recursion_meta_gradient",
    "reptile_meta_gradient",
    "step_vjp",
    "task_ops",
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


@dataclass
class OracleCounts:
    """Oracle calls made so far (SPEC section 6): gradients and Hessian-vector products."""

    grad_evals: int = 0
    hvp_evals: int = 0


# ---------------------------------------------------------------- one task, one step


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
    loss: TaskLoss, inner_loop: InnerLoop, params: Params, state: InnerState, batch: Batch
) -> tuple[Params, InnerState]:
    """One inner step on ``batch``: ``update(w_j, grad l(w_j; batch), s_j)``.

    When only some parameters are adapted, only their gradient is taken.
    """
    adapted = _adapted_names(inner_loop)
    if adapted is None:
        grads, _ = loss_grad(loss, params, batch)
    else:
        fixed = {name: p for name, p in params.items() if name not in adapted}
        grads, _ = grad_and_value(lambda a: _checked_value(loss, {**fixed, **a}, batch))(
            {name: params[name] for name in adapted}
        )
    return inner_loop.update(params, grads, state)


def _adapted_names(inner_loop: InnerLoop) -> frozenset[str] | None:
    """The names an inner loop adapts, if not all of them."""
    return frozenset(inner_loop.names) if isinstance(inner_loop, _Subset) else None


def _inner_product(a: Any, b: Any) -> Tensor:
    """``<a, b>`` summed over all the tensors of two pytrees of the same structure."""
    products = [(x * y).sum() for x, y in zip(tree_leaves(a), tree_leaves(b), strict=True)]
    return torch.stack(products).sum() if products else torch.zeros(())


def step_vjp(
    loss: TaskLoss,
    inner_loop: InnerLoop,
    params: Params,
    state: InnerState,
    hessian_batch: Batch,
    cotangent: tuple[Params, InnerState],
    compilable: bool = False,
) -> tuple[Params, InnerState]:
    """The vector-Jacobian product of one inner step, its gradient taken on ``hessian_batch``.

    For the step ``F`` on ``hessian_batch``, by ``torch.func.vjp``, or, with
    ``compilable``, as ``grad_{(w, s)} <F(w, s), (v_w, v_s)>`` (the same product from
    ``torch.func.grad`` alone, which torch.compile can trace; about 20% slower eagerly).
    For gradient descent, ``(v, ()) -> (v - alpha * H(w_j; hessian_batch) v, ())``.
    """
    if not compilable:

        def step_map(p: Params, s: InnerState) -> tuple[Params, InnerState]:
            return inner_step(loss, inner_loop, p, s, hessian_batch)

        pullback = vjp(step_map, params, state)[1]
        cot_params, cot_state = pullback(cotangent)
        return cot_params, cot_state

    def projected(p: Params, s: InnerState) -> Tensor:
        return _inner_product(inner_step(loss, inner_loop, p, s, hessian_batch), cotangent)

    if tree_leaves(state):
        cot_params, cot_state = grad(projected, argnums=(0, 1))(params, state)
        return cot_params, cot_state
    cot: Params = grad(projected)(params, state)
    return cot, state


def _init_vjp(inner_loop: InnerLoop, params: Params, cot_state: InnerState) -> Params:
    """``grad_w <init(w), v_s>``: the share of the gradient that reaches ``w`` via ``s_0``."""
    cot: Params = grad(lambda p: _inner_product(inner_loop.init(p), cot_state))(params)
    return cot


def _unrolled_value_and_grad(
    loss: TaskLoss,
    inner_loop: InnerLoop,
    params: Params,
    inner_batches: Sequence[Batch],
    outer_batch: Batch,
) -> tuple[Params, Tensor]:
    def meta_loss(w: Params) -> Tensor:
        state = inner_loop.init(w)
        for batch in inner_batches:
            w, state = inner_step(loss, inner_loop, w, state, batch)
        return loss(w, outer_batch)

    meta_grad, value = grad_and_value(meta_loss)(params)
    return meta_grad, value


# ---------------------------------------------------------------- operation bundles


@dataclass(frozen=True)
class Ops:
    """The operations the algorithms are built from, for one task or a batch of tasks.

    For a batch, every argument and result has a leading task dimension.
    """

    init: Callable[[Params], InnerState]
    step: Callable[[Params, InnerState, Batch], tuple[Params, InnerState]]
    loss_grad: Callable[[Params, Batch], tuple[Params, Tensor]]
    step_vjp: Callable[
        [Params, InnerState, Batch, tuple[Params, InnerState]], tuple[Params, InnerState]
    ]
    init_vjp: Callable[[Params, InnerState], Params]
    unrolled: Callable[[Params, Sequence[Batch], Batch], tuple[Params, Tensor]]
    recursion: (
        Callable[[Params, Sequence[Batch], Sequence[Batch], Batch], tuple[Params, Tensor]] | None
    ) = None
    """The whole recursion in one call (compiled), or None to loop over the steps in Python."""


def _func_ops(loss: TaskLoss, inner_loop: InnerLoop, compilable: bool) -> Ops:
    """The operations on one task, by torch.func transforms (vmap-friendly)."""
    return Ops(
        init=inner_loop.init,
        step=lambda p, s, b: inner_step(loss, inner_loop, p, s, b),
        loss_grad=lambda p, b: loss_grad(loss, p, b),
        step_vjp=lambda p, s, b, c: step_vjp(loss, inner_loop, p, s, b, c, compilable),
        init_vjp=lambda p, c: _init_vjp(inner_loop, p, c),
        unrolled=lambda p, inner, outer: _unrolled_value_and_grad(
            loss, inner_loop, p, inner, outer
        ),
    )


def _leaves_requiring_grad(tree: Any) -> Any:
    return tree_map(lambda t: t.detach().requires_grad_(True) if t.is_floating_point() else t, tree)


def _autograd(output: Tensor, inputs: Any) -> Any:
    """``d output / d inputs`` for a pytree of tensors; zeros where it does not depend."""
    leaves, spec = tree_flatten(inputs)
    wanted = [leaf for leaf in leaves if leaf.requires_grad]
    found = iter(
        torch.autograd.grad(output, wanted, allow_unused=True)
        if output.requires_grad
        else [None] * len(wanted)
    )
    grads = []
    for leaf in leaves:
        g = next(found) if leaf.requires_grad else None
        grads.append(torch.zeros_like(leaf) if g is None else g)
    return tree_unflatten(grads, spec)


def _checked_value(loss: TaskLoss, params: Params, batch: Batch) -> Tensor:
    value = loss(params, batch)
    if not value.requires_grad:
        raise ValueError(
            "'loss_fn' returned a loss that does not depend on the adapted parameters "
            "(it has no grad); does it detach, or ignore the model?"
        )
    return value


def task_ops(loss: TaskLoss, inner_loop: InnerLoop) -> Ops:
    """The operations on one task (no task dimension), by ``torch.autograd``.

    The same mathematics as :func:`batched_ops`, without torch.func's transforms,
    whose per-operation overhead made unvectorised steps of a conv net about 25%
    slower (torch 2.13, CPU).
    """
    adapted = _adapted_names(inner_loop)

    def differentiated(weights: Params) -> list[str]:
        """The names whose gradient an inner step needs."""
        return [name for name in weights if adapted is None or name in adapted]

    def grads_and_value(params: Params, batch: Batch) -> tuple[Params, Tensor]:
        with torch.enable_grad():
            weights = _leaves_requiring_grad(params)
            value = _checked_value(loss, weights, batch)
            return _autograd(value, weights), value.detach()

    def step(params: Params, state: InnerState, batch: Batch) -> tuple[Params, InnerState]:
        with torch.enable_grad():
            weights = {name: p.detach() for name, p in params.items()}
            names = differentiated(weights)
            for name in names:
                weights[name].requires_grad_(True)
            value = _checked_value(loss, weights, batch)
            grads: Params = _autograd(value, {name: weights[name] for name in names})
        return inner_loop.update(params, grads, state)

    def step_vjp_(
        params: Params, state: InnerState, batch: Batch, cotangent: tuple[Params, InnerState]
    ) -> tuple[Params, InnerState]:
        with torch.enable_grad():
            inputs = _leaves_requiring_grad((params, state))
            weights, start = inputs
            value = _checked_value(loss, weights, batch)
            names = differentiated(weights)
            grads = dict(
                zip(
                    names,
                    torch.autograd.grad(
                        value,
                        [weights[n] for n in names],
                        create_graph=True,
                        materialize_grads=True,  # zeros for parameters the loss does not use
                    ),
                    strict=True,
                )
            )
            projected = _inner_product(inner_loop.update(weights, grads, start), cotangent)
            cot_params, cot_state = _autograd(projected, inputs)
        return cot_params, cot_state

    def init_vjp(params: Params, cot_state: InnerState) -> Params:
        with torch.enable_grad():
            weights = _leaves_requiring_grad(params)
            cot: Params = _autograd(_inner_product(inner_loop.init(weights), cot_state), weights)
        return cot

    def unrolled(
        params: Params, inner_batches: Sequence[Batch], outer_batch: Batch
    ) -> tuple[Params, Tensor]:
        with torch.enable_grad():
            start = _leaves_requiring_grad(params)
            weights, state = start, inner_loop.init(start)
            for batch in inner_batches:
                value = _checked_value(loss, weights, batch)
                names = differentiated(weights)
                grads = torch.autograd.grad(
                    value, [weights[n] for n in names], create_graph=True, materialize_grads=True
                )
                weights, state = inner_loop.update(
                    weights, dict(zip(names, grads, strict=True)), state
                )
            value = loss(weights, outer_batch)
            meta_grad: Params = _autograd(value, start)
        return meta_grad, value.detach()

    return Ops(
        init=inner_loop.init,
        step=step,
        loss_grad=grads_and_value,
        step_vjp=step_vjp_,
        init_vjp=init_vjp,
        unrolled=unrolled,
    )


def batched_ops(loss: TaskLoss, inner_loop: InnerLoop, compilable: bool = False) -> Ops:
    """The operations ``torch.func.vmap``-ed over a leading task dimension.

    With ``compilable``, only transforms that torch.compile can trace are used.
    """
    ops = _func_ops(loss, inner_loop, compilable)
    return Ops(
        init=vmap(ops.init),
        step=vmap(ops.step),
        loss_grad=vmap(ops.loss_grad),
        step_vjp=vmap(ops.step_vjp),
        init_vjp=vmap(ops.init_vjp),
        unrolled=vmap(ops.unrolled),
    )


# ---------------------------------------------------------------- algorithms


def adapt(
    loss: TaskLoss,
    inner_loop: InnerLoop,
    params: Params,
    inner_batches: Sequence[Batch],
    counts: OracleCounts | None = None,
) -> Params:
    """The adapted weights ``w_N`` of one task, detached, one step per inner batch."""
    ops = task_ops(loss, inner_loop)
    w, state = params, inner_loop.init(params)
    for batch in inner_batches:
        w, state = ops.step(w, state, batch)
        if counts is not None:
            counts.grad_evals += 1
    return {name: value.detach() for name, value in w.items()}


def unrolled_meta_gradient(
    ops: Ops,
    params: Params,
    inner_batches: Sequence[Batch],
    outer_batch: Batch,
    counts: OracleCounts,
    tasks: int = 1,
) -> tuple[Params, Tensor]:
    """The meta gradient by autograd through the unrolled inner loop (eq. 3).

    Differentiates ``l(w_N(w); outer)`` with respect to ``w``, where ``w_N`` takes
    one step per inner batch; the Hessian of each step is therefore taken on that
    step's own batch. Costs N + 1 gradients and N Hessian-vector products per task
    (the backward pass through each inner step) and keeps the whole unrolled graph.

    Args:
        ops: :func:`task_ops` for one task, :func:`batched_ops` for a batch.
        params: ``w`` (with a task dimension for batched ops).
        inner_batches: one batch per inner step.
        outer_batch: the batch of the outer loss.
        counts: where to add the oracle calls made.
        tasks: how many tasks one call of ``ops`` covers.

    Returns:
        ``(G, l(w_N; outer))``, detached.
    """
    meta_grad, value = ops.unrolled(params, inner_batches, outer_batch)
    steps = len(inner_batches)
    counts.grad_evals += (steps + 1) * tasks
    counts.hvp_evals += steps * tasks
    return {name: g.detach() for name, g in meta_grad.items()}, value.detach()


def recursion_meta_gradient(
    ops: Ops,
    params: Params,
    inner_batches: Sequence[Batch],
    hessian_batches: Sequence[Batch],
    outer_batch: Batch,
    counts: OracleCounts,
    tasks: int = 1,
) -> tuple[Params, Tensor]:
    r"""The meta gradient by the backward recursion over stored iterates (eq. 7, 12).

    .. math::
        G = (I - \alpha H_0)(I - \alpha H_1)\cdots(I - \alpha H_{N-1})
            \,\nabla l(w_N; \mathrm{outer}),
        \qquad H_j = \nabla^2 l(w_j; \mathrm{hess}_j)

    for gradient descent; for any other inner loop, the product of the transposed
    Jacobians of its steps, each step's gradient taken on ``hess_j``. The iterates
    move on ``inner_batches``; Hessians use ``hessian_batches``, which may be
    independent of them (the resampling case). Costs N + 1 gradients and N
    Hessian-vector products per task; no graph of the unrolled loop is kept.

    Args:
        ops: :func:`task_ops` for one task, :func:`batched_ops` for a batch.
        params: ``w`` (with a task dimension for batched ops).
        inner_batches: one batch per inner step.
        hessian_batches: one batch per inner step, for its Hessian.
        outer_batch: the batch of the outer loss.
        counts: where to add the oracle calls made.
        tasks: how many tasks one call of ``ops`` covers.

    Returns:
        ``(G, l(w_N; outer))``, detached.
    """
    if len(hessian_batches) != len(inner_batches):
        raise ValueError(
            f"'hessian_batches' must hold one batch per inner step ({len(inner_batches)}) "
            f"(got {len(hessian_batches)})"
        )
    if ops.recursion is not None:
        meta_grad, value = ops.recursion(params, inner_batches, hessian_batches, outer_batch)
        counts.grad_evals += (len(inner_batches) + 1) * tasks
        counts.hvp_evals += len(inner_batches) * tasks
        return meta_grad, value
    iterates, states = [params], [ops.init(params)]
    for batch in inner_batches:
        new_params, new_state = ops.step(iterates[-1], states[-1], batch)
        iterates.append({name: p.detach() for name, p in new_params.items()})
        states.append(tree_map(torch.Tensor.detach, new_state))
    outer_grad, value = ops.loss_grad(iterates[-1], outer_batch)
    counts.grad_evals += (len(inner_batches) + 1) * tasks

    cotangent: tuple[Params, InnerState] = (outer_grad, tree_map(torch.zeros_like, states[-1]))
    for j in reversed(range(len(inner_batches))):
        cotangent = ops.step_vjp(iterates[j], states[j], hessian_batches[j], cotangent)
        counts.hvp_evals += tasks
    cot_params, cot_state = cotangent
    if tree_leaves(cot_state):  # the state s_0 = init(w) may depend on w
        through_state = ops.init_vjp(params, cot_state)
        cot_params = {name: g + through_state[name] for name, g in cot_params.items()}
    return {name: g.detach() for name, g in cot_params.items()}, value.detach()


def split_steps(batches: Sequence[Batch]) -> tuple[Batch | None, Batch | None]:
    """``(shared, None)`` if every step uses the same batch, else ``(None, stacked)``.

    ``stacked`` has the steps' batches stacked along a new leading step dimension.
    """
    if all(batch is batches[0] for batch in batches):
        return batches[0], None
    return None, tree_map(lambda *leaves: torch.stack(leaves), *batches)


def join_steps(steps: int, shared: Batch | None, stacked: Batch | None) -> list[Batch]:
    """The per-step batches that :func:`split_steps` split."""
    if stacked is None:
        return [shared] * steps
    return [tree_map(lambda leaf, j=j: leaf[j], stacked) for j in range(steps)]


def scanned_recursion(
    ops: Ops,
    params: Params,
    steps: int,
    inner: tuple[Batch | None, Batch | None],
    hessian: tuple[Batch | None, Batch | None],
    outer_batch: Batch,
) -> tuple[Params, Tensor]:
    """:func:`recursion_meta_gradient`'s arithmetic with the steps in two ``scan`` loops.

    The forward loop stores the iterates as its output, the backward loop runs over
    them in reverse. Traced by torch.compile, each loop's body is compiled once: the
    compile time does not grow with ``N``, and a meta step is one call.

    Args:
        ops: the (batched) operations.
        params: ``w``.
        steps: ``N``.
        inner: the inner batches, as :func:`split_steps` gives them.
        hessian: the Hessian batches, likewise.
        outer_batch: the batch of the outer loss.
    """
    from torch._higher_order_ops.scan import scan  # only compile=True needs it

    placeholder = torch.zeros(steps, 1)

    def at(split: tuple[Batch | None, Batch | None], scanned: Any) -> Batch:
        shared, stacked = split
        return shared if stacked is None else scanned

    def scanned(split: tuple[Batch | None, Batch | None]) -> Any:
        return placeholder if split[1] is None else split[1]

    def forward(carry: tuple[Params, InnerState], x: Any) -> tuple[Any, Any]:
        params_j, state_j = carry
        new_params, new_state = ops.step(params_j, state_j, at(inner, x))
        # scan's outputs may not alias its inputs: parameters that an inner loop
        # leaves as they are (not adapted) are passed on as copies.
        new_params = {
            name: p.clone() if p is params_j[name] else p for name, p in new_params.items()
        }
        new = (new_params, new_state)
        return new, (tree_map(torch.clone, params_j), tree_map(torch.clone, state_j))

    params = {name: p.contiguous() for name, p in params.items()}  # scan's carry layout
    start = (params, ops.init(params))
    (last, last_state), (iterates, states) = scan(forward, start, scanned(inner))
    outer_grad, value = ops.loss_grad(last, outer_batch)

    def backward(cotangent: tuple[Params, InnerState], xs: Any) -> tuple[Any, Any]:
        params_j, state_j, x = xs
        return ops.step_vjp(params_j, state_j, at(hessian, x), cotangent), torch.zeros(1)

    start_cot = (outer_grad, tree_map(torch.zeros_like, last_state))
    (cot_params, cot_state), _ = scan(
        backward, start_cot, (iterates, states, scanned(hessian)), reverse=True
    )
    if tree_leaves(cot_state):
        through_state = ops.init_vjp(params, cot_state)
        cot_params = {name: g + through_state[name] for name, g in cot_params.items()}
    return cot_params, value


# ---------------------------------------------------------------- beyond the paper's three
#
# The estimators beyond the paper's three (FirstOrder, Reptile, HessianFree, Implicit)
# reuse the Ops bundle. Where they need a per-task scalar (a norm, an inner product),
# ``batched`` says whether the tensors carry a leading task dimension.


def _task_dot(a: Params, b: Params, batched: bool) -> Tensor:
    """``<a, b>`` over all parameters: a scalar, or one per task when ``batched``."""
    if batched:
        terms = [(a[n] * b[n]).reshape(a[n].shape[0], -1).sum(1) for n in a]
    else:
        terms = [(a[n] * b[n]).sum() for n in a]
    return torch.stack(terms).sum(0)


def _per_task(scalar: Tensor, like: Tensor, batched: bool) -> Tensor:
    """A per-task scalar shaped to broadcast against ``like`` (task dimension first)."""
    return scalar.reshape(-1, *([1] * (like.ndim - 1))) if batched else scalar


def _final_iterate(ops: Ops, params: Params, inner_batches: Sequence[Batch]) -> Params:
    """``w_N``, detached: one inner step per batch, no graph kept."""
    w, state = params, ops.init(params)
    for batch in inner_batches:
        w, state = ops.step(w, state, batch)
        w = {name: p.detach() for name, p in w.items()}
        state = tree_map(torch.Tensor.detach, state)
    return w


def first_order_meta_gradient(
    ops: Ops,
    params: Params,
    inner_batches: Sequence[Batch],
    outer_batch: Batch,
    counts: OracleCounts,
    tasks: int = 1,
) -> tuple[Params, Tensor]:
    r"""First-order MAML: the outer gradient at the adapted weights, no Hessian term.

    .. math:: G = \nabla l(w_N; \mathrm{outer})

    Costs N + 1 gradients per task and no Hessian-vector product.

    Args:
        ops: :func:`task_ops` for one task, :func:`batched_ops` for a batch.
        params: ``w`` (with a task dimension for batched ops).
        inner_batches: one batch per inner step.
        outer_batch: the batch of the outer loss.
        counts: where to add the oracle calls made.
        tasks: how many tasks one call of ``ops`` covers.

    Returns:
        ``(G, l(w_N; outer))``, detached.
    """
    last = _final_iterate(ops, params, inner_batches)
    grads, value = ops.loss_grad(last, outer_batch)
    counts.grad_evals += (len(inner_batches) + 1) * tasks
    return {name: g.detach() for name, g in grads.items()}, value.detach()


def reptile_meta_gradient(
    ops: Ops,
    loss: TaskLoss,
    params: Params,
    inner_batches: Sequence[Batch],
    outer_batch: Batch,
    scale: float,
    counts: OracleCounts,
    tasks: int = 1,
    batched: bool = False,
) -> tuple[Params, Tensor]:
    r"""Reptile's direction, scaled: ``G = scale * (w - w_N)``.

    .. math:: G = s\,(w - w_N)

    With gradient descent and ``scale = 1 / (N alpha)`` this is the mean of the inner
    gradients, ``(1/N) sum_j grad l(w_j; batch_j)``. The outer loss is evaluated at
    ``w_N`` (a forward pass, not counted); costs N gradients per task.

    Args:
        ops: :func:`task_ops` for one task, :func:`batched_ops` for a batch.
        loss: the task loss, to evaluate the outer loss.
        params: ``w`` (with a task dimension when ``batched``).
        inner_batches: one batch per inner step.
        outer_batch: the batch of the outer loss (reported, not differentiated).
        scale: ``s``.
        counts: where to add the oracle calls made.
        tasks: how many tasks one call of ``ops`` covers.
        batched: whether ``ops`` and the tensors have a leading task dimension.

    Returns:
        ``(G, l(w_N; outer))``, detached.
    """
    last = _final_iterate(ops, params, inner_batches)
    counts.grad_evals += len(inner_batches) * tasks
    with torch.no_grad():
        value = vmap(loss)(last, outer_batch) if batched else loss(last, outer_batch)
    return {name: scale * (params[name] - last[name]) for name in params}, value.detach()


def finite_difference_hvp(
    grad_fn: Callable[[Params, Batch], tuple[Params, Tensor]],
    params: Params,
    batch: Batch,
    vector: Params,
    delta: float,
    batched: bool = False,
) -> Params:
    r"""A Hessian-vector product from two gradients, by a central difference.

    .. math::
        \nabla^2 l(w)\, v \approx
        \frac{\nabla l(w + h v) - \nabla l(w - h v)}{2 h}, \qquad h = \frac{\delta}{\|v\|}

    The two points lie at distance ``delta`` from ``w`` whatever the size of ``v``, so
    the relative error is ``O(delta^2)`` (exact for quadratic losses) and ``delta``
    is in the units of the parameters. ``||v||`` is taken over all the parameters of a
    task; ``v = 0`` gives 0.

    Args:
        grad_fn: ``(w, batch) -> (grad l(w; batch), l(w; batch))``, e.g. ``ops.loss_grad``.
        params: ``w`` (with a task dimension when ``batched``).
        batch: the batch of the Hessian.
        vector: ``v``, by parameter name like ``params``.
        delta: the distance of the two points from ``w``, > 0.
        batched: whether the tensors have a leading task dimension.
    """
    norm = _task_dot(vector, vector, batched).sqrt()
    h = delta / torch.where(norm > 0, norm, torch.ones_like(norm))
    plus, minus = {}, {}
    for name, p in params.items():
        step = _per_task(h, p, batched) * vector[name]
        plus[name], minus[name] = p + step, p - step
    grads_plus, _ = grad_fn(plus, batch)
    grads_minus, _ = grad_fn(minus, batch)
    return {
        name: (grads_plus[name] - grads_minus[name]).detach() / (2 * _per_task(h, p, batched))
        for name, p in params.items()
    }


def hessian_free_meta_gradient(
    ops: Ops,
    params: Params,
    inner_batches: Sequence[Batch],
    hessian_batches: Sequence[Batch],
    outer_batch: Batch,
    lr: float,
    delta: float,
    counts: OracleCounts,
    tasks: int = 1,
    batched: bool = False,
    adapted: Collection[str] | None = None,
) -> tuple[Params, Tensor]:
    r"""The gradient-descent recursion with finite-difference HVPs (HF-MAML, N steps).

    .. math::
        v \leftarrow \nabla l(w_N; \mathrm{outer}), \qquad
        v \leftarrow v - \alpha\, \frac{\nabla l(w_j + h_j \tilde v; \mathrm{hess}_j)
            - \nabla l(w_j - h_j \tilde v; \mathrm{hess}_j)}{2 h_j}
        \quad (j = N-1, \dots, 0), \qquad G = v

    with ``h_j = delta / ||v~||`` (:func:`finite_difference_hvp`), and ``v~ = v``, or, when
    only the parameters ``adapted`` take inner steps, ``v`` with the others' entries
    set to 0 (the transposed Jacobian of such a step is ``v - alpha H v~``). For
    gradient descent only. Costs N + 1 gradients plus 2 N gradients for the
    differences, per task, and no Hessian-vector product.

    Args:
        ops: :func:`task_ops` for one task, :func:`batched_ops` for a batch (their inner
            loop: gradient descent with step size ``lr``).
        params: ``w`` (with a task dimension when ``batched``).
        inner_batches: one batch per inner step.
        hessian_batches: one batch per inner step, for its Hessian.
        outer_batch: the batch of the outer loss.
        lr: the inner step size ``alpha``.
        delta: the distance of the difference points from ``w_j``.
        counts: where to add the oracle calls made.
        tasks: how many tasks one call of ``ops`` covers.
        batched: whether ``ops`` and the tensors have a leading task dimension.
        adapted: the names the inner loop adapts (None: all).

    Returns:
        ``(G, l(w_N; outer))``, detached.
    """
    if len(hessian_batches) != len(inner_batches):
        raise ValueError(
            f"'hessian_batches' must hold one batch per inner step ({len(inner_batches)}) "
            f"(got {len(hessian_batches)})"
        )
    iterates, state = [params], ops.init(params)
    for batch in inner_batches:
        new_params, state = ops.step(iterates[-1], state, batch)
        iterates.append({name: p.detach() for name, p in new_params.items()})
    v, value = ops.loss_grad(iterates[-1], outer_batch)
    v = {name: g.detach() for name, g in v.items()}
    for j in reversed(range(len(inner_batches))):
        direction = {
            name: g if adapted is None or name in adapted else torch.zeros_like(g)
            for name, g in v.items()
        }
        product = finite_difference_hvp(
            ops.loss_grad, iterates[j], hessian_batches[j], direction, delta, batched
        )
        v = {name: g - lr * product[name] for name, g in v.items()}
    steps = len(inner_batches)
    counts.grad_evals += (steps + 1 + 2 * steps) * tasks
    return v, value.detach()


def loss_hvp(loss: TaskLoss, params: Params, batch: Batch, vector: Params) -> Params:
    """``H(w; batch) v``, the exact Hessian-vector product, reverse-over-reverse.

    By ``torch.func`` alone, so it can be vmapped over a leading task dimension.
    """

    def projected(p: Params) -> Tensor:
        grads, _ = loss_grad(loss, p, batch)
        return _inner_product(grads, vector)

    product: Params = grad(projected)(params)
    return product


def conjugate_gradient(
    matvec: Callable[[Params], Params],
    rhs: Params,
    steps: int,
    tol: float = 0.0,
    batched: bool = False,
) -> tuple[Params, int]:
    r"""At most ``steps`` iterations of conjugate gradient for ``A x = b``, from ``x = 0``.

    ``A`` (given by ``matvec``) must be symmetric positive definite. Each task stops
    moving once its residual satisfies ``||b - A x|| <= tol * ||b||``; with
    ``batched``, the loop runs until every task has (a task that has stopped keeps
    its ``x``). A zero residual or curvature stops a task instead of dividing by 0.

    Args:
        matvec: ``x -> A x``.
        rhs: ``b``.
        steps: the largest number of iterations (one ``matvec`` each).
        tol: the relative residual at which to stop, >= 0 (0: run all ``steps``).
        batched: whether the tensors have a leading task dimension (one system per task).

    Returns:
        ``(x, iterations)``: the solution and the number of ``matvec`` calls made.
    """
    x = {name: torch.zeros_like(b) for name, b in rhs.items()}
    r = dict(rhs)
    p = dict(rhs)
    rr = _task_dot(r, r, batched)
    threshold = tol**2 * rr
    iterations = 0
    for _ in range(steps):
        active = rr > threshold
        if tol > 0 and not bool(active.any()):
            break
        ap = matvec(p)
        iterations += 1
        curvature = _task_dot(p, ap, batched)
        moving = active & (curvature != 0)
        step = torch.where(moving, rr / torch.where(moving, curvature, 1), 0)
        x = {n: x[n] + _per_task(step, x[n], batched) * p[n] for n in x}
        r = {n: r[n] - _per_task(step, r[n], batched) * ap[n] for n in r}
        rr_new = _task_dot(r, r, batched)
        moving = active & (rr != 0)
        ratio = torch.where(moving, rr_new / torch.where(moving, rr, 1), 0)
        p = {n: r[n] + _per_task(ratio, p[n], batched) * p[n] for n in p}
        rr = torch.where(active, rr_new, rr)
    return x, iterations


def implicit_meta_gradient(
    ops: Ops,
    hvp: Callable[[Params, Batch, Params], Params],
    params: Params,
    inner_batches: Sequence[Batch],
    hessian_batch: Batch,
    outer_batch: Batch,
    lam: float,
    cg_steps: int,
    tol: float,
    counts: OracleCounts,
    tasks: int = 1,
    batched: bool = False,
    adapted: Collection[str] | None = None,
) -> tuple[Params, Tensor]:
    r"""The implicit meta gradient of iMAML, by conjugate gradient.

    The inner loop (of ``ops``) approximately solves
    ``phi*(w) = argmin_phi l(phi; hess) + lam/2 ||phi - w||^2``; by the implicit
    function theorem at its result ``phi_N``,

    .. math::
        G = \Big(I + \frac{1}{\lambda} \nabla^2 l(\phi_N; \mathrm{hess})\Big)^{-1}
            \nabla l(\phi_N; \mathrm{outer})

    solved by :func:`conjugate_gradient` with ``cg_steps`` iterations (one HVP each).
    When only the parameters ``adapted`` (``a``) take inner steps, the others (``f``)
    enter ``phi*`` as fixed inputs: ``G_a = x`` solves the system restricted to
    ``a``, and ``G_f = grad_f l(phi_N; outer) - H_{fa} x / lam`` (one more HVP).
    Costs N + 1 gradients and (CG iterations) HVPs per task.

    Args:
        ops: :func:`task_ops` for one task, :func:`batched_ops` for a batch, whose inner
            loop is the proximal one (:class:`~torch_maml.Proximal`).
        hvp: ``(phi, batch, v) -> H(phi; batch) v``, e.g. :func:`loss_hvp` (vmapped for
            a batch).
        params: ``w`` (with a task dimension when ``batched``).
        inner_batches: one batch per inner step.
        hessian_batch: the batch of the inner objective's Hessian (the support set).
        outer_batch: the batch of the outer loss.
        lam: the regularisation strength ``lambda`` of the inner problem.
        cg_steps: the largest number of conjugate gradient iterations.
        tol: conjugate gradient's relative residual at which to stop (0: never early).
        counts: where to add the oracle calls made.
        tasks: how many tasks one call of ``ops`` covers.
        batched: whether ``ops`` and the tensors have a leading task dimension.
        adapted: the names the inner loop adapts (None: all).

    Returns:
        ``(G, l(phi_N; outer))``, detached.
    """
    last = _final_iterate(ops, params, inner_batches)
    outer_grad, value = ops.loss_grad(last, outer_batch)
    outer_grad = {name: g.detach() for name, g in outer_grad.items()}
    counts.grad_evals += (len(inner_batches) + 1) * tasks

    def restricted(v: Params) -> Params:
        if adapted is None:
            return v
        return {name: g if name in adapted else torch.zeros_like(g) for name, g in v.items()}

    def matvec(v: Params) -> Params:
        product = hvp(last, hessian_batch, v)
        return restricted({name: g + product[name].detach() / lam for name, g in v.items()})

    solution, iterations = conjugate_gradient(
        matvec, restricted(outer_grad), cg_steps, tol, batched
    )
    counts.hvp_evals += iterations * tasks
    if adapted is None:
        return solution, value.detach()
    product = hvp(last, hessian_batch, solution)
    counts.hvp_evals += tasks
    grads = {
        name: solution[name] if name in adapted else g - product[name].detach() / lam
        for name, g in outer_grad.items()
    }
    return grads, value.detach()
