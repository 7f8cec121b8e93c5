r"""Meta-gradient estimators: which data feeds which term of ``G_i`` (SPEC sections 2-3).

Every estimator returns the mean over the meta-batch of

.. math::
    G_i(w) = (I - \alpha H_0)(I - \alpha H_1)\cdots(I - \alpha H_{N-1})\, g_N,
    \qquad H_j = \nabla^2 l_i(w_j; \mathrm{hess}_j), \quad g_N = \nabla l_i(w_N; \mathrm{outer})

and they differ in the batches, and in how the product is computed:

=================  ==========================  ======================  ====================
estimator          inner step ``batch_j``      Hessian ``hess_j``      outer batch
=================  ==========================  ======================  ====================
:class:`Exact`     support (or a fresh draw)   same as ``batch_j``     query (or a draw)
:class:`FiniteSum` support ``S_i``             ``S_i``                 query ``T_i``
:class:`Resampled` fresh ``S_{k,j}``           fresh ``D_{k,j}``       fresh ``T_k``
=================  ==========================  ======================  ====================

All three run vectorised over tasks (``torch.func.vmap``) when the tasks' batches
stack, in chunks of the objective's ``task_chunk_size``, and task by task otherwise.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple, Protocol, runtime_checkable

import torch
from torch import Tensor

from ._validation import optional_positive_int, positive_int
from .batching import (
    Method,
    TaskData,
    chunk_sizes,
    chunk_sum,
    expand_params,
    plan_chunk_size,
    stack_task_data,
    take,
)
from .functional import OracleCounts, recursion_meta_gradient, unrolled_meta_gradient
from .objective import MetaObjective
from .tasks import Sampler, StackedTasks, SupportQuery, Task, task_kind
from .typing import Batch, Params

__all__ = ["Exact", "FiniteSum", "MetaGradient", "MetaGradientEstimator", "Resampled"]


class MetaGradient(NamedTuple):
    """An estimator's result for one meta-batch."""

    grads: Params
    """The mean over the meta-batch of ``G_i``, by parameter name."""
    loss: Tensor
    """The mean outer (query) loss after adaptation, a detached scalar."""
    grad_evals: int
    """Gradient evaluations made (SPEC section 6)."""
    hvp_evals: int
    """Hessian-vector products made (SPEC section 6)."""


@runtime_checkable
class MetaGradientEstimator(Protocol):
    """Estimates the meta gradient ``mean_i G_i(w)`` of a meta-batch of tasks."""

    def meta_gradient(
        self,
        objective: MetaObjective,
        params: Params,
        tasks: Sequence[Task[Any]],
        generator: torch.Generator,
    ) -> MetaGradient:
        """The meta gradient at ``params`` (``w_k``), averaged over ``tasks``.

        Args:
            objective: the task loss, the inner loop, and the operations on them.
            params: the meta parameters ``w_k``, detached.
            tasks: a non-empty meta-batch of one kind of task.
            generator: the generator to draw any fresh samples from.
        """
        ...


class _Stacked(NamedTuple):
    """Task data already stacked along a leading dimension of ``count`` tasks."""

    data: TaskData
    size: int


def _mean_meta_gradient(
    objective: MetaObjective,
    params: Params,
    tasks: Sequence[TaskData] | _Stacked,
    method: Method,
) -> MetaGradient:
    """Average the meta gradient over the tasks, vectorising chunks of them."""
    count = tasks.size if isinstance(tasks, _Stacked) else len(tasks)
    footprint = None
    if objective.task_chunk_size == "auto" and count > 1:
        if isinstance(tasks, _Stacked):
            footprint = objective.footprint(params, tasks.data, True, method)
        else:
            footprint = objective.footprint(params, tasks[0], False, method)
    largest = plan_chunk_size(objective.task_chunk_size, count, footprint)

    counts = OracleCounts()
    sums: list[tuple[Params, Tensor]] = []  # per chunk: the sums over its tasks

    def run(data: TaskData, size: int) -> None:
        batched = size > 1
        ops = objective.ops(batched)
        start = expand_params(params, size) if batched else params
        if method == "recursion":
            grads, loss = recursion_meta_gradient(
                ops, start, data.inner, data.hessian, data.outer, counts, tasks=size
            )
        else:
            grads, loss = unrolled_meta_gradient(ops, start, data.inner, data.outer, counts, size)
        sums.append((chunk_sum(grads, batched), chunk_sum(loss, batched)))

    begin = 0
    for size in chunk_sizes(count, largest):
        if isinstance(tasks, _Stacked):
            if size == count > 1:
                run(tasks.data, size)  # one chunk of all: no slicing
            else:
                run(take(tasks.data, begin if size == 1 else slice(begin, begin + size)), size)
        else:
            items = tasks[begin : begin + size]
            together = stack_task_data(items) if size > 1 else None
            if together is not None:
                run(together, size)
            else:  # a single task, or tasks whose batches do not stack: one by one
                for item in items:
                    run(item, 1)
        begin += size
    totals, loss_total = sums[0]
    for grads, loss in sums[1:]:
        totals = {name: total + grads[name] for name, total in totals.items()}
        loss_total = loss_total + loss
    return MetaGradient(
        grads={name: total / count for name, total in totals.items()},
        loss=loss_total / count,
        grad_evals=counts.grad_evals,
        hvp_evals=counts.hvp_evals,
    )


def _draws(task: Sampler[Any], size: int, count: int, generator: torch.Generator) -> list[Batch]:
    return [task.sample(size, generator=generator) for _ in range(count)]


def _support_query(estimator: str, tasks: Sequence[Task[Any]]) -> list[SupportQuery[Any]]:
    if task_kind(tasks) != "support-query":
        raise TypeError(
            f"{estimator} needs SupportQuery tasks (a support and a query set); "
            "'tasks' holds samplers: use Resampled(...) for them"
        )
    return [task for task in tasks if isinstance(task, SupportQuery)]


def _samplers(estimator: str, tasks: Sequence[Task[Any]]) -> list[Sampler[Any]]:
    if task_kind(tasks) != "sampler":
        raise TypeError(
            f"{estimator} needs tasks with a sample(size, generator) method; "
            "'tasks' holds SupportQuery tasks: use FiniteSum() or Exact() for them"
        )
    return [task for task in tasks if not isinstance(task, SupportQuery)]


def _support_query_data(
    tasks: Sequence[Task[Any]], estimator: str, steps: int, hessian: bool
) -> list[TaskData] | _Stacked:
    """Support set at every step (and as every Hessian batch), query set outside."""
    if isinstance(tasks, StackedTasks):
        support = [tasks.support] * steps
        return _Stacked(TaskData(support, support if hessian else [], tasks.query), len(tasks))
    data = []
    for task in _support_query(estimator, tasks):
        support = [task.support] * steps
        data.append(TaskData(support, support if hessian else [], task.query))
    return data


@dataclass(frozen=True)
class Exact:
    r"""Autograd through the unrolled inner loop: the reference (eq. 3, eq. 10).

    Differentiates ``l_i(w_N(w); outer)`` exactly, with the Hessian of every step
    taken on the batch that moved the iterate. For :class:`~torch_maml.SupportQuery`
    tasks the inner steps use the support set and the outer loss the query set,
    which gives exactly eq. 10, as :class:`FiniteSum` does. For sampler tasks it
    draws ``inner_size`` samples per inner step and ``outer_size`` for the outer
    loss, and differentiates the sampled loop: its Hessians share the inner
    samples, so it is not eq. 7 (use :class:`Resampled` for that).

    Keeps the graph of the whole unrolled loop: memory grows with ``N``.

    Args:
        inner_size: samples per inner step, for sampler tasks only.
        outer_size: samples of the outer batch, for sampler tasks only.
    """

    inner_size: int | None = None
    outer_size: int | None = None

    def __post_init__(self) -> None:
        optional_positive_int("inner_size", self.inner_size)
        optional_positive_int("outer_size", self.outer_size)

    def meta_gradient(
        self,
        objective: MetaObjective,
        params: Params,
        tasks: Sequence[Task[Any]],
        generator: torch.Generator,
    ) -> MetaGradient:
        """Mean over ``tasks`` of the unrolled-autograd meta gradient."""
        steps = objective.inner_loop.steps
        data: list[TaskData] | _Stacked
        if task_kind(tasks) == "support-query":
            data = _support_query_data(tasks, "Exact", steps, hessian=False)
        else:
            inner_size, outer_size = self._sampler_sizes()
            data = [
                TaskData(
                    _draws(task, inner_size, steps, generator),
                    [],
                    task.sample(outer_size, generator=generator),
                )
                for task in _samplers("Exact", tasks)
            ]
        return _mean_meta_gradient(objective, params, data, "unrolled")

    def _sampler_sizes(self) -> tuple[int, int]:
        if self.inner_size is None or self.outer_size is None:
            raise ValueError(
                "Exact needs 'inner_size' and 'outer_size' for sampler tasks "
                f"(got inner_size={self.inner_size}, outer_size={self.outer_size})"
            )
        return self.inner_size, self.outer_size


@dataclass(frozen=True)
class FiniteSum:
    r"""Eq. 12 of the finite-sum case (Algorithm 2) by the backward HVP recursion.

    .. math::
        \hat G_i(w_k) = \prod_{j=0}^{N-1}\big(I - \alpha \nabla^2 l_{S_i}(w_{k,j})\big)\,
            \nabla l_{T_i}(w_{k,N})

    Inner steps and Hessians on the whole support set ``S_i``, the outer gradient
    on the query set ``T_i`` (:class:`~torch_maml.SupportQuery` tasks). Equal to
    :class:`Exact` up to rounding, but keeps only the iterates ``w_0..w_N`` and one
    step's graph, not the unrolled loop's.
    """

    def meta_gradient(
        self,
        objective: MetaObjective,
        params: Params,
        tasks: Sequence[Task[Any]],
        generator: torch.Generator,
    ) -> MetaGradient:
        """Mean over ``tasks`` of eq. 12."""
        data = _support_query_data(tasks, "FiniteSum", objective.inner_loop.steps, hessian=True)
        return _mean_meta_gradient(objective, params, data, "recursion")


@dataclass(frozen=True)
class Resampled:
    r"""Eq. 7 of the resampling case (Algorithm 1): independent fresh samples per term.

    .. math::
        \hat G_i(w_k) = \prod_{j=0}^{N-1}\big(I - \alpha \nabla^2 l_i(w_{k,j}; D_{k,j})\big)\,
            \nabla l_i(w_{k,N}; T_k)

    For each task, in this order: ``N`` inner batches ``S_{k,j}`` of ``inner_size``
    samples, ``N`` Hessian batches ``D_{k,j}`` of ``hessian_size``, and one outer
    batch ``T_k`` of ``outer_size``, each drawn by ``task.sample(size, generator)``.
    The Hessian batches are independent of the iterates' batches, which autograd
    through the unrolled loop cannot express: the HVP recursion computes it.

    Args:
        inner_size: ``S``, samples per inner step.
        hessian_size: ``D``, samples per Hessian batch.
        outer_size: ``T``, samples of the outer batch.
    """

    inner_size: int
    hessian_size: int
    outer_size: int

    def __post_init__(self) -> None:
        positive_int("inner_size", self.inner_size)
        positive_int("hessian_size", self.hessian_size)
        positive_int("outer_size", self.outer_size)

    def meta_gradient(
        self,
        objective: MetaObjective,
        params: Params,
        tasks: Sequence[Task[Any]],
        generator: torch.Generator,
    ) -> MetaGradient:
        """Mean over ``tasks`` of eq. 7."""
        steps = objective.inner_loop.steps
        data = [
            TaskData(
                _draws(task, self.inner_size, steps, generator),
                _draws(task, self.hessian_size, steps, generator),
                task.sample(self.outer_size, generator=generator),
            )
            for task in _samplers("Resampled", tasks)
        ]
        return _mean_meta_gradient(objective, params, data, "recursion")
