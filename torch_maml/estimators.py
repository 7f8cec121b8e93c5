r"""Meta-gradient estimators: which data feeds which term of ``G_i`` (SPEC sections 2-3).

The paper's three estimators return the mean over the meta-batch of

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

Four more are the field's usual alternatives, each a cheaper or different answer to
the same question:

* :class:`FirstOrder` (FOMAML): ``G_i = g_N``, the product dropped.
* :class:`Reptile`: the mean inner gradient ``(w - w_N) / (N alpha)``, no query
  gradient at all.
* :class:`HessianFree` (HF-MAML): the product above with each Hessian-vector
  product replaced by a central difference of two gradients.
* :class:`Implicit` (iMAML): the implicit-function gradient of a proximally
  regularised inner problem (inner loop :class:`~torch_maml.Proximal`), by
  conjugate gradient.

All of them run vectorised over tasks (``torch.func.vmap``) when the tasks' batches
stack, in chunks of the objective's ``task_chunk_size``, and task by task otherwise.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple, Protocol, TypeAlias, runtime_checkable

import torch
from torch import Tensor

from ._validation import nonnegative_float, optional_positive_int, positive_float, positive_int
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
from .functional import (
    Ops,
    OracleCounts,
    first_order_meta_gradient,
    hessian_free_meta_gradient,
    implicit_meta_gradient,
    loss_hvp,
    recursion_meta_gradient,
    reptile_meta_gradient,
    unrolled_meta_gradient,
)
from .inner import GradientDescent, InnerLoop, _Subset
from .objective import MetaObjective
from .proximal import Proximal
from .tasks import Sampler, StackedTasks, SupportQuery, Task, task_kind
from .typing import Batch, Params

__all__ = [
    "Exact",
    "FiniteSum",
    "FirstOrder",
    "HessianFree",
    "Implicit",
    "MetaGradient",
    "MetaGradientEstimator",
    "Reptile",
    "Resampled",
]


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


_Algorithm: TypeAlias = Callable[[Ops, Params, TaskData, OracleCounts, int], tuple[Params, Tensor]]
"""``(ops, w, data, counts, tasks) -> (sum-ready G, loss)`` for one task or a chunk of them."""


def _mean_meta_gradient(
    objective: MetaObjective,
    params: Params,
    tasks: Sequence[TaskData] | _Stacked,
    method: Method,
    algorithm: _Algorithm | None = None,
) -> MetaGradient:
    """Average the meta gradient over the tasks, vectorising chunks of them.

    ``method`` computes it, unless an ``algorithm`` is given (``method`` then only
    sizes the memory estimate of ``"auto"`` chunks).
    """
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
        if algorithm is not None:
            grads, loss = algorithm(ops, start, data, counts, size)
        elif method == "recursion":
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


def _sampler_sizes(estimator: str, **sizes: int | None) -> list[int]:
    """The sample sizes an estimator needs for sampler tasks, all given, in order."""
    given = [size for size in sizes.values() if size is not None]
    if len(given) < len(sizes):
        names = [f"'{name}'" for name in sizes]
        listed = " and ".join([", ".join(names[:-1]), names[-1]])
        got = ", ".join(f"{name}={size}" for name, size in sizes.items())
        raise ValueError(f"{estimator} needs {listed} for sampler tasks (got {got})")
    return given


def _inner_outer_data(
    estimator: str,
    tasks: Sequence[Task[Any]],
    steps: int,
    generator: torch.Generator,
    inner_size: int | None,
    outer_size: int | None,
) -> list[TaskData] | _Stacked:
    """Support at every step and query outside, or fresh inner and outer draws."""
    if task_kind(tasks) == "support-query":
        return _support_query_data(tasks, estimator, steps, hessian=False)
    inner, outer = _sampler_sizes(estimator, inner_size=inner_size, outer_size=outer_size)
    return [
        TaskData(_draws(task, inner, steps, generator), [], task.sample(outer, generator=generator))
        for task in _samplers(estimator, tasks)
    ]


def _unwrap(inner_loop: InnerLoop) -> tuple[InnerLoop, tuple[str, ...] | None]:
    """The inner loop the user gave, and the names it adapts if ``adapted=`` chose some."""
    if isinstance(inner_loop, _Subset):
        return inner_loop.inner_loop, inner_loop.names
    return inner_loop, None


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
        data = _inner_outer_data(
            "Exact",
            tasks,
            objective.inner_loop.steps,
            generator,
            self.inner_size,
            self.outer_size,
        )
        return _mean_meta_gradient(objective, params, data, "unrolled")


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


@dataclass(frozen=True)
class FirstOrder:
    r"""First-order MAML (FOMAML): the outer gradient at the adapted weights.

    .. math:: \hat G_i(w) = \nabla l_i(w_N; \mathrm{outer})

    MAML's meta gradient (eq. 3) with every factor ``I - alpha H_j`` replaced by
    ``I``: no Hessian-vector product, and only the current iterate in memory. It is
    biased, by ``O(alpha N L)`` relative to eq. 3, and cheap. Works with any inner
    loop; with ``adapted=`` on the optimizer, every meta parameter gets its outer
    gradient at ``w_N``. For :class:`~torch_maml.SupportQuery` tasks the inner steps
    use the support set and the outer gradient the query set; for sampler tasks it
    draws ``inner_size`` samples per inner step and ``outer_size`` for the outer
    gradient. Costs ``B (N + 1)`` gradients per meta-batch of ``B`` tasks, no HVP.

    Args:
        inner_size: samples per inner step, for sampler tasks only. Default: None.
        outer_size: samples of the outer batch, for sampler tasks only. Default: None.

    References:
        C. Finn, P. Abbeel, S. Levine. *Model-Agnostic Meta-Learning for Fast
        Adaptation of Deep Networks.* ICML 2017 (section 5.2).
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
        """Mean over ``tasks`` of ``grad l_i(w_N; outer)``."""
        data = _inner_outer_data(
            "FirstOrder",
            tasks,
            objective.inner_loop.steps,
            generator,
            self.inner_size,
            self.outer_size,
        )

        def algorithm(
            ops: Ops, start: Params, item: TaskData, counts: OracleCounts, size: int
        ) -> tuple[Params, Tensor]:
            return first_order_meta_gradient(ops, start, item.inner, item.outer, counts, size)

        return _mean_meta_gradient(objective, params, data, "recursion", algorithm)


@dataclass(frozen=True)
class Reptile:
    r"""Reptile: move ``w`` towards the adapted weights, as a meta gradient.

    .. math::
        \hat G_i(w) = \frac{w - w_N}{N \alpha}
            = \frac{1}{N} \sum_{j=0}^{N-1} \nabla l_i(w_j; \mathrm{batch}_j)
        \quad \text{(default)}, \qquad
        \hat G_i(w) = s\, (w - w_N) \quad \text{(with ``scale`` } s)

    Published Reptile updates ``w <- w + epsilon * mean_i (w_N^i - w)``. A
    :class:`~torch_maml.MetaOptimizer` step ``w - beta * mean_i G_i`` is exactly that
    update with ``beta = epsilon * N * alpha`` (default), or with ``scale=1.0`` and
    ``beta = epsilon``.

    The default divides by ``N alpha`` (``steps`` and ``lr`` of the
    :class:`~torch_maml.GradientDescent` inner loop) so that ``G_i`` is a gradient,
    the mean of the inner gradients along the path: its scale does not change with
    ``N`` or ``alpha``, it can be compared with the other estimators' (for
    ``N = 1`` it is the support gradient at ``w``; as ``alpha -> 0`` it tends to it
    for any ``N``), and the step-size policies, ``meta_backward`` with any
    ``torch.optim`` optimizer, and gradient clipping see the magnitudes they expect.
    Other inner loops have no ``alpha``: give ``scale`` for them (any inner loop
    then works). Reptile has no query gradient: the inner steps use the support
    set (as :meth:`~torch_maml.MetaOptimizer.adapt` does, so ``w`` moves towards
    the weights it produces), and the query set only gives the reported loss at
    ``w_N`` (a forward pass, not counted). For sampler tasks it draws
    ``inner_size`` samples per inner step and ``outer_size`` for that loss. The
    parameters an ``adapted=`` selection leaves out would get ``G = 0`` and never
    change, so a selection is refused. Costs ``B N`` gradients per meta-batch of
    ``B`` tasks, no HVP.

    Args:
        scale: ``s``, a finite number > 0, or None (default) for ``1 / (N alpha)``
            from a gradient-descent inner loop.
        inner_size: samples per inner step, for sampler tasks only. Default: None.
        outer_size: samples of the batch of the reported loss, for sampler tasks
            only. Default: None.

    References:
        A. Nichol, J. Achiam, J. Schulman. *On First-Order Meta-Learning Algorithms.*
        arXiv:1803.02999, 2018.
    """

    scale: float | None = None
    inner_size: int | None = None
    outer_size: int | None = None

    def __post_init__(self) -> None:
        if self.scale is not None:
            object.__setattr__(self, "scale", positive_float("scale", self.scale))
        optional_positive_int("inner_size", self.inner_size)
        optional_positive_int("outer_size", self.outer_size)

    def meta_gradient(
        self,
        objective: MetaObjective,
        params: Params,
        tasks: Sequence[Task[Any]],
        generator: torch.Generator,
    ) -> MetaGradient:
        """Mean over ``tasks`` of ``scale * (w - w_N)``.

        Raises:
            TypeError: ``scale`` is None and the inner loop is not gradient descent.
            ValueError: the optimizer adapts only some parameters (``adapted=``).
        """
        inner_loop, adapted = _unwrap(objective.inner_loop)
        if adapted is not None:
            raise ValueError(
                "Reptile moves each parameter by its inner-loop displacement w - w_N, which "
                "is 0 for the parameters that 'adapted' leaves out: they would never be "
                "trained. Adapt all of them, or freeze the others with requires_grad_(False)"
            )
        scale = self.scale
        if scale is None:
            if not isinstance(inner_loop, GradientDescent):
                raise TypeError(
                    "Reptile() takes its scale 1 / (N * lr) from a GradientDescent inner loop "
                    f"(got an inner loop of type {type(inner_loop).__name__}); pass "
                    "Reptile(scale=...) for other inner loops (scale=1.0 gives G = w - w_N)"
                )
            scale = 1.0 / (inner_loop.steps * inner_loop.lr)
        data = _inner_outer_data(
            "Reptile", tasks, inner_loop.steps, generator, self.inner_size, self.outer_size
        )

        def algorithm(
            ops: Ops, start: Params, item: TaskData, counts: OracleCounts, size: int
        ) -> tuple[Params, Tensor]:
            return reptile_meta_gradient(
                ops, objective.loss, start, item.inner, item.outer, scale, counts, size, size > 1
            )

        return _mean_meta_gradient(objective, params, data, "recursion", algorithm)


@dataclass(frozen=True)
class HessianFree:
    r"""HF-MAML for ``N`` steps: the HVP recursion with finite-difference HVPs.

    .. math::
        v \leftarrow \nabla l_i(w_N; \mathrm{outer}), \qquad
        v \leftarrow v - \frac{\alpha}{2 h_j} \big(\nabla l_i(w_j + h_j v; \mathrm{hess}_j)
            - \nabla l_i(w_j - h_j v; \mathrm{hess}_j)\big),
        \quad h_j = \frac{\delta}{\|v\|} \quad (j = N-1, \dots, 0), \qquad \hat G_i = v

    SPEC section 2's recursion with each Hessian-vector product replaced by a
    central difference of two gradients (for ``N = 1``, HF-MAML): first-order
    oracles only. Its error is ``O(delta^2)`` relative to the exact recursion
    (:class:`FiniteSum`, :class:`Resampled`) and zero for quadratic losses. The
    step ``h_j = delta / ||v||`` puts the two points at distance ``delta`` from
    ``w_j`` whatever ``||v||`` (which shrinks or grows along the recursion and with
    the loss's scale): ``delta`` is a length in parameter space, and the relative
    error does not depend on the size of the gradients. Pick it between rounding
    (``eps / delta``) and truncation (``delta^2`` times the third derivative): the
    total is smallest near ``eps^(1/3)`` times the parameters' scale, about ``1e-5``
    in float64 and ``5e-3`` in float32 (on the tests' tanh MLP in float64, the relative
    error is 1.5e-8 at ``delta = 1e-3`` and 4e-12 at ``1e-5``).

    Needs a :class:`~torch_maml.GradientDescent` inner loop (the recursion is its
    steps' Jacobian); with ``adapted=``, the differences are taken along ``v``'s
    adapted entries only, which is that of a step that moves only them. Batches as
    :class:`FiniteSum` for :class:`~torch_maml.SupportQuery` tasks (support for the
    inner steps and Hessians, query outside), and as :class:`Resampled` for sampler
    tasks (``N`` inner draws, then ``N`` Hessian draws, then the outer draw). Costs
    ``B (N + 1) + 2 B N`` gradients per meta-batch of ``B`` tasks, no HVP.

    Args:
        delta: the distance ``delta`` of the difference points, a finite number > 0.
        inner_size: ``S``, samples per inner step, for sampler tasks only. Default: None.
        hessian_size: ``D``, samples per Hessian batch, for sampler tasks only.
            Default: None.
        outer_size: ``T``, samples of the outer batch, for sampler tasks only.
            Default: None.

    References:
        A. Fallah, A. Mokhtari, A. Ozdaglar. *On the Convergence Theory of
        Gradient-Based Model-Agnostic Meta-Learning Algorithms.* AISTATS 2020.
    """

    delta: float
    inner_size: int | None = None
    hessian_size: int | None = None
    outer_size: int | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "delta", positive_float("delta", self.delta))
        optional_positive_int("inner_size", self.inner_size)
        optional_positive_int("hessian_size", self.hessian_size)
        optional_positive_int("outer_size", self.outer_size)

    def meta_gradient(
        self,
        objective: MetaObjective,
        params: Params,
        tasks: Sequence[Task[Any]],
        generator: torch.Generator,
    ) -> MetaGradient:
        """Mean over ``tasks`` of the finite-difference recursion.

        Raises:
            TypeError: the inner loop is not gradient descent.
        """
        inner_loop, adapted = _unwrap(objective.inner_loop)
        if not isinstance(inner_loop, GradientDescent):
            raise TypeError(
                "HessianFree needs a GradientDescent inner loop: its finite differences "
                "stand for the Hessian-vector products of gradient-descent steps "
                f"(got an inner loop of type {type(inner_loop).__name__})"
            )
        steps, lr = inner_loop.steps, inner_loop.lr
        data: list[TaskData] | _Stacked
        if task_kind(tasks) == "support-query":
            data = _support_query_data(tasks, "HessianFree", steps, hessian=True)
        else:
            inner, hessian, outer = _sampler_sizes(
                "HessianFree",
                inner_size=self.inner_size,
                hessian_size=self.hessian_size,
                outer_size=self.outer_size,
            )
            data = [
                TaskData(
                    _draws(task, inner, steps, generator),
                    _draws(task, hessian, steps, generator),
                    task.sample(outer, generator=generator),
                )
                for task in _samplers("HessianFree", tasks)
            ]

        def algorithm(
            ops: Ops, start: Params, item: TaskData, counts: OracleCounts, size: int
        ) -> tuple[Params, Tensor]:
            return hessian_free_meta_gradient(
                ops,
                start,
                item.inner,
                item.hessian,
                item.outer,
                lr,
                self.delta,
                counts,
                size,
                batched=size > 1,
                adapted=adapted,
            )

        return _mean_meta_gradient(objective, params, data, "recursion", algorithm)


@dataclass(frozen=True)
class Implicit:
    r"""iMAML: the implicit gradient of a proximally regularised inner problem.

    With the inner loop :class:`~torch_maml.Proximal` ``(inner_loop, lam)``, the
    adapted weights approximate

    .. math::
        \phi^*_i(w) = \arg\min_\phi\; l_i(\phi; S_i) + \frac{\lambda}{2}\|\phi - w\|^2,
        \qquad
        \frac{d\phi^*_i}{dw} = \Big(I + \frac{1}{\lambda}\nabla^2 l_i(\phi^*_i; S_i)\Big)^{-1}

    and the meta gradient is, at the inner loop's result ``phi_N``,

    .. math::
        \hat G_i(w) = \Big(I + \frac{1}{\lambda}\nabla^2 l_i(\phi_N; S_i)\Big)^{-1}
            \nabla l_i(\phi_N; T_i)

    solved by conjugate gradient: ``cg_steps`` iterations, one HVP on the support
    set each, fewer if the relative residual falls to ``tol``. The result does not
    depend on how ``phi_N`` was reached, so memory holds one iterate; it is the
    gradient of the meta objective once ``phi_N`` is ``phi*`` (the inner loop
    converged) and CG has converged (``cg_steps`` >= the number of parameters
    suffices in exact arithmetic). CG needs ``I + H / lam`` positive definite:
    ``lam`` larger than minus the support Hessian's smallest eigenvalue.

    ``lam`` is the inner loop's: the regularised problem is defined once, by
    :class:`~torch_maml.Proximal`, which :meth:`~torch_maml.MetaOptimizer.adapt`
    runs too, so the weights this estimator differentiates are those ``adapt``
    returns. ``Implicit(lam, cg_steps)`` (the paper's parameters) states it here too,
    and is then checked against the inner loop's. With ``adapted=``, the others
    (``f``) are fixed inputs of the inner problem: ``G_a`` solves the system
    restricted to the adapted ones (``a``), and
    ``G_f = grad_f l_i(phi_N; T_i) - H_{fa} G_a / lam``, one HVP more. For
    :class:`~torch_maml.SupportQuery` tasks only: the inner problem is a fixed
    support set's. Costs ``B (N + 1)`` gradients and ``B`` times the CG iterations
    HVPs per meta-batch of ``B`` tasks (a vectorised chunk iterates until its last
    task meets ``tol``).

    Args:
        lam: the regularisation ``lambda``, if given: it must be the
            :class:`~torch_maml.Proximal` inner loop's. Default: None (the inner loop's).
        cg_steps: the largest number of conjugate gradient iterations, >= 1. Default: 10.
        tol: stop early once ``||r|| <= tol * ||grad l_i(phi_N; T_i)||`` for the CG
            residual ``r``, a finite number >= 0. Default: 0.0 (run all ``cg_steps``).

    References:
        A. Rajeswaran, C. Finn, S. Kakade, S. Levine. *Meta-Learning with Implicit
        Gradients.* NeurIPS 2019.
    """

    lam: float | None = None
    cg_steps: int = 10
    tol: float = 0.0

    def __post_init__(self) -> None:
        if self.lam is not None:
            object.__setattr__(self, "lam", positive_float("lam", self.lam))
        positive_int("cg_steps", self.cg_steps)
        object.__setattr__(self, "tol", nonnegative_float("tol", self.tol))

    def meta_gradient(
        self,
        objective: MetaObjective,
        params: Params,
        tasks: Sequence[Task[Any]],
        generator: torch.Generator,
    ) -> MetaGradient:
        """Mean over ``tasks`` of the implicit meta gradient.

        Raises:
            TypeError: the inner loop is not :class:`~torch_maml.Proximal`, or the
                tasks are samplers.
        """
        inner_loop, adapted = _unwrap(objective.inner_loop)
        if not isinstance(inner_loop, Proximal):
            lam_text = "lam" if self.lam is None else f"lam={self.lam:g}"
            raise TypeError(
                "Implicit needs a Proximal inner loop, whose regularised inner problem it "
                f"differentiates: wrap yours as tm.Proximal(inner_loop, {lam_text}) "
                f"(got an inner loop of type {type(inner_loop).__name__})"
            )
        if self.lam is not None and self.lam != inner_loop.lam:
            raise ValueError(
                f"Implicit(lam={self.lam:g}) differs from its Proximal inner loop's "
                f"lam={inner_loop.lam:g}: the regularised problem has one lam"
            )
        if task_kind(tasks) != "support-query":
            raise TypeError(
                "Implicit needs SupportQuery tasks: its inner problem is a fixed support "
                "set's regularised loss ('tasks' holds samplers)"
            )
        lam = inner_loop.lam
        data = _support_query_data(tasks, "Implicit", inner_loop.steps, hessian=False)

        def algorithm(
            ops: Ops, start: Params, item: TaskData, counts: OracleCounts, size: int
        ) -> tuple[Params, Tensor]:
            def hvp(phi: Params, batch: Batch, vector: Params) -> Params:
                return loss_hvp(objective.loss, phi, batch, vector)

            return implicit_meta_gradient(
                ops,
                torch.func.vmap(hvp) if size > 1 else hvp,
                start,
                item.inner,
                item.inner[0],
                item.outer,
                lam,
                self.cg_steps,
                self.tol,
                counts,
                size,
                batched=size > 1,
                adapted=adapted,
            )

        return _mean_meta_gradient(objective, params, data, "recursion", algorithm)
