"""Deprecated: the functions of torch_maml 0.1's functional layer, kept for a release.

They now live, reorganised, in :mod:`torch_maml.algorithms` (per-task algorithms
over an :class:`~torch_maml.Ops`), :mod:`torch_maml.ops` and
:class:`~torch_maml.MetaObjective`. Each name here still works as before for one
task, with a :class:`DeprecationWarning` that says what replaces it; the old
``Ops`` bundle is now :class:`~torch_maml.Ops`, which ``task_ops`` and
``batched_ops`` build. ``TaskLoss`` and ``OracleCounts`` are not deprecated.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Collection, Sequence
from typing import Any

import torch
from torch import Tensor

from . import algorithms
from .inner import InnerLoop
from .model import TaskLoss
from .ops import MetaGradient, OracleCounts
from .ops import Ops as _Ops  # reached through the deprecated name below
from .tasks import TaskData
from .typing import Batch, InnerState, Params

__all__ = ["OracleCounts", "TaskLoss"]

_REPLACEMENTS = {
    "task_ops": "torch_maml.Ops(loss, inner_loop, batched=False)",
    "batched_ops": "torch_maml.Ops(loss, inner_loop, batched=True)",
    "loss_grad": "Ops.grad",
    "loss_hvp": "Ops.hvp",
    "inner_step": "Ops.step",
    "step_vjp": "Ops.step_vjp",
    "adapt": "MetaObjective.adapt or torch_maml.algorithms.rollout",
    "unrolled_meta_gradient": "torch_maml.algorithms.unrolled_meta_gradient",
    "recursion_meta_gradient": "torch_maml.algorithms.recursion_meta_gradient",
    "first_order_meta_gradient": "torch_maml.algorithms.first_order_meta_gradient",
    "reptile_meta_gradient": "torch_maml.algorithms.reptile_meta_gradient",
    "hessian_free_meta_gradient": "torch_maml.algorithms.hessian_free_meta_gradient",
    "implicit_meta_gradient": "torch_maml.algorithms.implicit_meta_gradient",
    "finite_difference_hvp": "torch_maml.algorithms.finite_difference_hvp",
    "conjugate_gradient": "torch_maml.algorithms.conjugate_gradient",
}


def _counted(result: MetaGradient, counts: OracleCounts, tasks: int) -> tuple[Params, Tensor]:
    counts.grad_evals += result.grad_evals * tasks
    counts.hvp_evals += result.hvp_evals * tasks
    return result.grads, result.loss


def _task_ops(loss: TaskLoss, inner_loop: InnerLoop) -> _Ops:
    return _Ops(loss, inner_loop, batched=False)


def _batched_ops(loss: TaskLoss, inner_loop: InnerLoop, compilable: bool = False) -> _Ops:
    return _Ops(loss, inner_loop, batched=True)


def _loss_grad(loss: TaskLoss, params: Params, batch: Batch) -> tuple[Params, Tensor]:
    return _Ops(loss, None, batched=False).grad(params, batch)


def _loss_hvp(loss: TaskLoss, params: Params, batch: Batch, vector: Params) -> Params:
    return _Ops(loss, None, batched=False).hvp(params, batch, vector)


def _inner_step(
    loss: TaskLoss, inner_loop: InnerLoop, params: Params, state: InnerState, batch: Batch
) -> tuple[Params, InnerState]:
    step = _Ops(loss, inner_loop, batched=False).step(params, state, batch)
    return step.params, step.state


def _step_vjp(
    loss: TaskLoss,
    inner_loop: InnerLoop,
    params: Params,
    state: InnerState,
    hessian_batch: Batch,
    cotangent: tuple[Params, InnerState],
    compilable: bool = False,
) -> tuple[Params, InnerState]:
    return _Ops(loss, inner_loop, batched=False).step_vjp(params, state, hessian_batch, cotangent)


def _adapt(
    loss: TaskLoss,
    inner_loop: InnerLoop,
    params: Params,
    inner_batches: Sequence[Batch],
    counts: OracleCounts | None = None,
) -> Params:
    run = algorithms.rollout(_Ops(loss, inner_loop, batched=False), params, inner_batches)
    if counts is not None:
        counts.grad_evals += len(inner_batches)
    return run.params


def _unrolled(
    ops: _Ops,
    params: Params,
    inner_batches: Sequence[Batch],
    outer_batch: Batch,
    counts: OracleCounts,
    tasks: int = 1,
) -> tuple[Params, Tensor]:
    data = TaskData(inner_batches, (), outer_batch)
    return _counted(algorithms.unrolled_meta_gradient(ops, params, data), counts, tasks)


def _recursion(
    ops: _Ops,
    params: Params,
    inner_batches: Sequence[Batch],
    hessian_batches: Sequence[Batch],
    outer_batch: Batch,
    counts: OracleCounts,
    tasks: int = 1,
) -> tuple[Params, Tensor]:
    data = TaskData(inner_batches, hessian_batches, outer_batch)
    return _counted(algorithms.recursion_meta_gradient(ops, params, data), counts, tasks)


def _first_order(
    ops: _Ops,
    params: Params,
    inner_batches: Sequence[Batch],
    outer_batch: Batch,
    counts: OracleCounts,
    tasks: int = 1,
) -> tuple[Params, Tensor]:
    data = TaskData(inner_batches, (), outer_batch)
    return _counted(algorithms.first_order_meta_gradient(ops, params, data), counts, tasks)


def _reptile(
    ops: _Ops,
    loss: TaskLoss,
    params: Params,
    inner_batches: Sequence[Batch],
    outer_batch: Batch,
    scale: float,
    counts: OracleCounts,
    tasks: int = 1,
    batched: bool = False,
) -> tuple[Params, Tensor]:
    data = TaskData(inner_batches, (), outer_batch)
    result = algorithms.reptile_meta_gradient(ops, params, data, scale=scale)
    return _counted(result, counts, tasks)


def _hessian_free(
    ops: _Ops,
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
    data = TaskData(inner_batches, hessian_batches, outer_batch)
    result = algorithms.hessian_free_meta_gradient(ops, params, data, lr=lr, delta=delta)
    return _counted(result, counts, tasks)


def _implicit(
    ops: _Ops,
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
    data = TaskData(inner_batches, [hessian_batch], outer_batch)
    result = algorithms.implicit_meta_gradient(
        ops, params, data, lam=lam, cg_steps=cg_steps, tol=tol
    )
    return _counted(result, counts, tasks)


def _finite_difference_hvp(
    grad_fn: Callable[[Params, Batch], tuple[Params, Tensor]],
    params: Params,
    batch: Batch,
    vector: Params,
    delta: float,
    batched: bool = False,
) -> Params:
    ops = _Ops(None, None, batched=batched)
    norm = ops.norm(vector)
    h = delta / torch.where(norm > 0, norm, torch.ones_like(norm))
    step = ops.scale(vector, h)
    plus, _ = grad_fn({n: p + step[n] for n, p in params.items()}, batch)
    minus, _ = grad_fn({n: p - step[n] for n, p in params.items()}, batch)
    return ops.scale({n: (plus[n] - minus[n]).detach() for n in params}, 0.5 / h)


def _conjugate_gradient(
    matvec: Callable[[Params], Params],
    rhs: Params,
    steps: int,
    tol: float = 0.0,
    batched: bool = False,
) -> tuple[Params, int]:
    return algorithms.conjugate_gradient(_Ops(None, None, batched=batched), matvec, rhs, steps, tol)


_SHIMS: dict[str, Any] = {
    "task_ops": _task_ops,
    "batched_ops": _batched_ops,
    "loss_grad": _loss_grad,
    "loss_hvp": _loss_hvp,
    "inner_step": _inner_step,
    "step_vjp": _step_vjp,
    "adapt": _adapt,
    "unrolled_meta_gradient": _unrolled,
    "recursion_meta_gradient": _recursion,
    "first_order_meta_gradient": _first_order,
    "reptile_meta_gradient": _reptile,
    "hessian_free_meta_gradient": _hessian_free,
    "implicit_meta_gradient": _implicit,
    "finite_difference_hvp": _finite_difference_hvp,
    "conjugate_gradient": _conjugate_gradient,
    "Ops": _Ops,
}


def __getattr__(name: str) -> Any:
    if name in _SHIMS:
        replacement = _REPLACEMENTS.get(name, f"torch_maml.{name}")
        warnings.warn(
            f"torch_maml.functional.{name} is deprecated and will be removed in the next "
            f"release; use {replacement}",
            DeprecationWarning,
            stacklevel=2,
        )
        return _SHIMS[name]
    raise AttributeError(f"module 'torch_maml.functional' has no attribute {name!r}")
