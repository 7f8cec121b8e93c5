r"""Meta-gradient estimators: which data feeds which term of ``G_i``, and which algorithm.

The paper's three estimators return the mean over the meta-batch of

.. math::
    G_i(w) = (I - \alpha H_0)(I - \alpha H_1)\cdots(I - \alpha H_{N-1})\, g_N,
    \qquad H_j = \nabla^2 l_i(w_j; \mathrm{hess}_j), \quad g_N = \nabla l_i(w_N; \mathrm{outer})

(eq. 3, 7, 12) and they differ in the batches, and in how the product is computed:

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

Each chooses its tasks' batches and an algorithm of :mod:`torch_maml.algorithms`, and
runs it with :meth:`~torch_maml.MetaObjective.map_tasks`, which vectorises,
chunks, compiles or captures it as the optimizer was set up. An estimator that
needs a particular kind of inner loop says so in its ``check(inner_loop)``, which
the :class:`~torch_maml.MetaOptimizer` calls when it is built.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple, Protocol, runtime_checkable

import torch

from .algorithms import (
    first_order_meta_gradient,
    hessian_free_meta_gradient,
    implicit_meta_gradient,
    recursion_meta_gradient,
    reptile_meta_gradient,
    unrolled_meta_gradient,
)
from .checks import nonnegative_float, optional_positive_int, positive_float, positive_int
from .inner import InnerLoop, descent_lr, describe, proximal_lam, selects_parameters
from .objective import MetaObjective
from .ops import MetaGradient, Ops
from .tasks import (
    MetaBatchData,
    Sampler,
    SupportQuery,
    Task,
    TaskData,
    check_batch,
    support_query_data,
    task_kind,
)
from .typing import Batch, Params

__all__ = [
    "DrawsSamples",
    "Exact",
    "FiniteSum",
    "FirstOrder",
    "HessianFree",
    "Implicit",
    "MetaGradient",
    "MetaGradientEstimator",
    "Reptile",
    "Resampled",
    "SampleSizes",
]


@runtime_checkable
class MetaGradientEstimator(Protocol):
    """Estimates the meta gradient ``mean_i G_i(w)`` of a meta-batch of tasks.

    An estimator may also define ``check(inner_loop)``, which the
    :class:`~torch_maml.MetaOptimizer` calls when it is built, to refuse an inner loop
    it cannot differentiate (raise a ``TypeError`` that says what it needs), and
    :class:`DrawsSamples`' ``sample_sizes``, for what it draws from sampler tasks.
    """

    def meta_gradient(
        self,
        objective: MetaObjective,
        params: Params,
        tasks: Sequence[Task[Any]],
        generator: torch.Generator,
    ) -> MetaGradient:
        """The meta gradient at ``params`` (``w_k``), averaged over ``tasks``.

        Args:
            objective: the task loss and the inner loop; its
                :meth:`~torch_maml.MetaObjective.map_tasks` runs a per-task algorithm.
            params: the meta parameters ``w_k``, detached.
            tasks: a non-empty meta-batch of one kind of task.
            generator: the generator to draw any fresh samples from.
        """
        ...


class SampleSizes(NamedTuple):
    """How many samples an estimator draws from a sampler task for each term."""

    inner: int | None = None
    """Samples per inner step."""
    hessian: int | None = None
    """Samples per Hessian batch."""
    outer: int | None = None
    """Samples of the outer batch."""


@runtime_checkable
class DrawsSamples(Protocol):
    """An estimator that says how many samples it draws from sampler tasks.

    :meth:`~torch_maml.MetaOptimizer.adapt` draws ``inner`` samples per step, and a
    smoothness-adaptive step size ``outer`` samples per probe, unless told otherwise.
    """

    @property
    def sample_sizes(self) -> SampleSizes:
        """The sizes (None: not drawn, or not set)."""
        ...


# ---------------------------------------------------------------- which data feeds which term


def _support_query(estimator: str, tasks: Sequence[Task[Any]], steps: int) -> MetaBatchData:
    if task_kind(tasks) != "support-query":
        raise TypeError(
            f"{estimator} needs SupportQuery tasks (a support and a query set); "
            "'tasks' holds samplers: use Resampled(...) for them"
        )
    return support_query_data(tasks, steps)


def _samplers(estimator: str, tasks: Sequence[Task[Any]]) -> list[Sampler[Any]]:
    if task_kind(tasks) != "sampler":
        raise TypeError(
            f"{estimator} needs tasks with a sample(size, generator) method; "
            "'tasks' holds SupportQuery tasks: use FiniteSum() or Exact() for them"
        )
    return [task for task in tasks if not isinstance(task, SupportQuery)]


def _sizes(estimator: str, **sizes: int | None) -> list[int]:
    """The sample sizes an estimator needs for sampler tasks, all given, in order."""
    given = [size for size in sizes.values() if size is not None]
    if len(given) < len(sizes):
        names = [f"'{name}'" for name in sizes]
        listed = " and ".join([", ".join(names[:-1]), names[-1]])
        got = ", ".join(f"{name}={size}" for name, size in sizes.items())
        raise ValueError(f"{estimator} needs {listed} for sampler tasks (got {got})")
    return given


def _draw(task: Sampler[Any], size: int, generator: torch.Generator, index: int) -> Batch:
    batch = task.sample(size, generator=generator)
    check_batch(batch, f"a sample of size {size} drawn from 'tasks[{index}]'")
    return batch


def _sampled(
    estimator: str,
    tasks: Sequence[Task[Any]],
    steps: int,
    generator: torch.Generator,
    inner_size: int | None,
    outer_size: int | None,
    hessian_size: int | None = None,
    independent_hessians: bool = False,
) -> MetaBatchData:
    """Support/query data, or fresh draws for each sampler task.

    Per task: ``N`` inner batches, then (with ``independent_hessians``) ``N`` Hessian
    batches, then the outer batch. Without independent Hessian batches, each step's
    Hessian is taken on its own batch.
    """
    if task_kind(tasks) == "support-query":
        return support_query_data(tasks, steps)
    if independent_hessians:
        inner, hessian, outer = _sizes(
            estimator, inner_size=inner_size, hessian_size=hessian_size, outer_size=outer_size
        )
    else:
        inner, outer = _sizes(estimator, inner_size=inner_size, outer_size=outer_size)
    data = []
    for i, task in enumerate(_samplers(estimator, tasks)):
        inner_batches = [_draw(task, inner, generator, i) for _ in range(steps)]
        hessians = []
        if independent_hessians:
            hessians = [_draw(task, hessian, generator, i) for _ in range(steps)]
        data.append(TaskData(inner_batches, hessians, _draw(task, outer, generator, i)))
    return data


def _gradient_descent_lr(estimator: str, inner_loop: InnerLoop, why: str) -> float:
    """The step size of a gradient-descent inner loop, or a TypeError saying what is needed."""
    lr = descent_lr(inner_loop)
    if lr is None:
        raise TypeError(
            f"{estimator} needs a GradientDescent inner loop: {why} "
            f"(got an inner loop of type {describe(inner_loop)})"
        )
    return lr


# ---------------------------------------------------------------- the paper's three


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

    @property
    def sample_sizes(self) -> SampleSizes:
        """``inner_size`` and ``outer_size`` (for sampler tasks)."""
        return SampleSizes(inner=self.inner_size, outer=self.outer_size)

    def meta_gradient(
        self,
        objective: MetaObjective,
        params: Params,
        tasks: Sequence[Task[Any]],
        generator: torch.Generator,
    ) -> MetaGradient:
        """Mean over ``tasks`` of the unrolled-autograd meta gradient."""
        steps = objective.inner_loop.steps
        data = _sampled("Exact", tasks, steps, generator, self.inner_size, self.outer_size)
        return objective.map_tasks(unrolled_meta_gradient, params, data, memory="unrolled")


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
        data = _support_query("FiniteSum", tasks, objective.inner_loop.steps)
        return objective.map_tasks(recursion_meta_gradient, params, data)


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

    @property
    def sample_sizes(self) -> SampleSizes:
        """``inner_size``, ``hessian_size`` and ``outer_size``."""
        return SampleSizes(self.inner_size, self.hessian_size, self.outer_size)

    def meta_gradient(
        self,
        objective: MetaObjective,
        params: Params,
        tasks: Sequence[Task[Any]],
        generator: torch.Generator,
    ) -> MetaGradient:
        """Mean over ``tasks`` of eq. 7."""
        _samplers("Resampled", tasks)
        data = _sampled(
            "Resampled",
            tasks,
            objective.inner_loop.steps,
            generator,
            self.inner_size,
            self.outer_size,
            self.hessian_size,
            independent_hessians=True,
        )
        return objective.map_tasks(recursion_meta_gradient, params, data)


# ---------------------------------------------------------------- beyond the paper's three


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

    @property
    def sample_sizes(self) -> SampleSizes:
        """``inner_size`` and ``outer_size`` (for sampler tasks)."""
        return SampleSizes(inner=self.inner_size, outer=self.outer_size)

    def meta_gradient(
        self,
        objective: MetaObjective,
        params: Params,
        tasks: Sequence[Task[Any]],
        generator: torch.Generator,
    ) -> MetaGradient:
        """Mean over ``tasks`` of ``grad l_i(w_N; outer)``."""
        steps = objective.inner_loop.steps
        data = _sampled("FirstOrder", tasks, steps, generator, self.inner_size, self.outer_size)
        return objective.map_tasks(first_order_meta_gradient, params, data)


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

    @property
    def sample_sizes(self) -> SampleSizes:
        """``inner_size`` and ``outer_size`` (for sampler tasks)."""
        return SampleSizes(inner=self.inner_size, outer=self.outer_size)

    def check(self, inner_loop: InnerLoop) -> None:
        """Refuse a selection of adapted parameters, and a non-descent loop without ``scale``.

        Raises:
            ValueError: the inner loop adapts only some parameters (``adapted=``).
            TypeError: ``scale`` is None and the inner loop is not gradient descent.
        """
        if selects_parameters(inner_loop):
            raise ValueError(
                "Reptile moves each parameter by its inner-loop displacement w - w_N, which "
                "is 0 for the parameters that 'adapted' leaves out: they would never be "
                "trained. Adapt all of them, or freeze the others with requires_grad_(False)"
            )
        if self.scale is None:
            _gradient_descent_lr(
                "Reptile()",
                inner_loop,
                "it takes its scale 1 / (N * lr) from it; pass Reptile(scale=...) for other "
                "inner loops (scale=1.0 gives G = w - w_N)",
            )

    def meta_gradient(
        self,
        objective: MetaObjective,
        params: Params,
        tasks: Sequence[Task[Any]],
        generator: torch.Generator,
    ) -> MetaGradient:
        """Mean over ``tasks`` of ``scale * (w - w_N)``."""
        self.check(objective.inner_loop)
        steps = objective.inner_loop.steps
        data = _sampled("Reptile", tasks, steps, generator, self.inner_size, self.outer_size)
        return objective.map_tasks(self._algorithm, params, data)

    def _algorithm(self, ops: Ops, params: Params, data: TaskData) -> MetaGradient:
        scale = self.scale
        if scale is None:
            lr = _gradient_descent_lr("Reptile()", ops.inner_loop, "")
            scale = 1.0 / (len(data.inner) * lr)
        return reptile_meta_gradient(ops, params, data, scale=scale)


@dataclass(frozen=True)
class HessianFree:
    r"""HF-MAML for ``N`` steps: the HVP recursion with finite-difference HVPs.

    .. math::
        v \leftarrow \nabla l_i(w_N; \mathrm{outer}), \qquad
        v \leftarrow v - \frac{\alpha}{2 h_j} \big(\nabla l_i(w_j + h_j v; \mathrm{hess}_j)
            - \nabla l_i(w_j - h_j v; \mathrm{hess}_j)\big),
        \quad h_j = \frac{\delta}{\|v\|} \quad (j = N-1, \dots, 0), \qquad \hat G_i = v

    The recursion of eq. 7 and 12 with each Hessian-vector product replaced by a
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

    @property
    def sample_sizes(self) -> SampleSizes:
        """``inner_size``, ``hessian_size`` and ``outer_size`` (for sampler tasks)."""
        return SampleSizes(self.inner_size, self.hessian_size, self.outer_size)

    def check(self, inner_loop: InnerLoop) -> None:
        """Refuse an inner loop that is not gradient descent.

        Raises:
            TypeError: the inner loop is not gradient descent.
        """
        _gradient_descent_lr(
            "HessianFree",
            inner_loop,
            "its finite differences stand for the Hessian-vector products of "
            "gradient-descent steps",
        )

    def meta_gradient(
        self,
        objective: MetaObjective,
        params: Params,
        tasks: Sequence[Task[Any]],
        generator: torch.Generator,
    ) -> MetaGradient:
        """Mean over ``tasks`` of the finite-difference recursion."""
        self.check(objective.inner_loop)
        data = _sampled(
            "HessianFree",
            tasks,
            objective.inner_loop.steps,
            generator,
            self.inner_size,
            self.outer_size,
            self.hessian_size,
            independent_hessians=True,
        )
        return objective.map_tasks(self._algorithm, params, data)

    def _algorithm(self, ops: Ops, params: Params, data: TaskData) -> MetaGradient:
        lr = _gradient_descent_lr("HessianFree", ops.inner_loop, "")
        return hessian_free_meta_gradient(ops, params, data, lr=lr, delta=self.delta)


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

    def check(self, inner_loop: InnerLoop) -> None:
        """Refuse an inner loop that is not proximal, or whose ``lam`` differs.

        Raises:
            TypeError: the inner loop is not :class:`~torch_maml.Proximal`.
            ValueError: ``lam`` was given and differs from the inner loop's.
        """
        lam = proximal_lam(inner_loop)
        if lam is None:
            lam_text = "lam" if self.lam is None else f"lam={self.lam:g}"
            raise TypeError(
                "Implicit needs a Proximal inner loop, whose regularised inner problem it "
                f"differentiates: wrap yours as tm.Proximal(inner_loop, {lam_text}) "
                f"(got an inner loop of type {describe(inner_loop)})"
            )
        if self.lam is not None and self.lam != lam:
            raise ValueError(
                f"Implicit(lam={self.lam:g}) differs from its Proximal inner loop's "
                f"lam={lam:g}: the regularised problem has one lam"
            )

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
        self.check(objective.inner_loop)
        if task_kind(tasks) != "support-query":
            raise TypeError(
                "Implicit needs SupportQuery tasks: its inner problem is a fixed support "
                "set's regularised loss ('tasks' holds samplers)"
            )
        data = support_query_data(tasks, objective.inner_loop.steps)
        return objective.map_tasks(self._algorithm, params, data)

    def _algorithm(self, ops: Ops, params: Params, data: TaskData) -> MetaGradient:
        lam = proximal_lam(ops.inner_loop)
        assert lam is not None  # check() refused the other inner loops
        return implicit_meta_gradient(
            ops, params, data, lam=lam, cg_steps=self.cg_steps, tol=self.tol
        )
