"""Tasks: where the batches of each term of the meta gradient come from.

Two kinds of task cover the paper's two settings (the table of ``docs/theory.md``):

* :class:`SupportQuery` (finite-sum, eq. 9-12): a fixed support set ``S_i`` for the
  inner steps and a fixed query set ``T_i`` for the outer loss.
* any :class:`Sampler` (resampling, eq. 6-7): an object with
  ``sample(size, generator=None) -> batch`` that draws fresh data on every call.

A meta-batch is a non-empty sequence of tasks of one kind. An estimator turns each
task into a :class:`TaskData` (the batch of each inner step, of each step's
Hessian, and of the outer loss); :func:`support_query_data` does it for
SupportQuery tasks, keeping a :class:`StackedTasks` meta-batch stacked.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import (
    Generic,
    Literal,
    NamedTuple,
    Protocol,
    TypeAlias,
    TypeVar,
    overload,
    runtime_checkable,
)

import torch
from torch import Tensor
from torch.utils._pytree import tree_flatten, tree_map, tree_unflatten

from .typing import Batch, BatchT

__all__ = [
    "MetaBatchData",
    "Sampler",
    "StackedTaskData",
    "StackedTasks",
    "SupportQuery",
    "Task",
    "TaskData",
    "TaskKind",
    "check_batch",
    "stack_batches",
    "support_query_data",
    "task_kind",
]

BatchT_co = TypeVar("BatchT_co", covariant=True)


@dataclass(frozen=True, eq=False)
class SupportQuery(Generic[BatchT]):
    """A finite-sum task: a support set for adaptation and a query set for evaluation.

    The inner loop takes every step on the whole ``support`` batch (eq. 11); the
    outer loss and its gradient use the ``query`` batch (eq. 12). For the exact
    setting of eq. 3, where one loss serves both, pass the same batch twice.

    Args:
        support: the batch of ``S_i`` (any pytree of tensors ``loss_fn`` takes).
        query: the batch of ``T_i``.

    Example:
        >>> import torch, torch_maml as tm
        >>> x, y = torch.randn(10, 1), torch.randn(10, 1)
        >>> task = tm.SupportQuery(support=(x[:5], y[:5]), query=(x[5:], y[5:]))
    """

    support: BatchT
    query: BatchT


@runtime_checkable
class Sampler(Protocol[BatchT_co]):
    """A resampling task: draws a fresh batch of ``size`` samples on each call.

    ``generator`` is the :class:`torch.Generator` the sampler must draw from, so
    that a seeded :class:`~torch_maml.MetaOptimizer` is reproducible.
    """

    def sample(self, size: int, generator: torch.Generator | None = None) -> BatchT_co:
        """Return a batch of ``size`` fresh samples of this task."""
        ...


@dataclass(frozen=True, eq=False)
class StackedTasks(Sequence[SupportQuery[BatchT]]):
    """A meta-batch of SupportQuery tasks stored stacked: a leading task dimension.

    Every tensor of ``support`` and of ``query`` has the number of tasks as its first
    dimension; task ``i`` is ``SupportQuery(support[i], query[i])`` leaf by leaf. It
    is a sequence of :class:`SupportQuery` (``len``, indexing, iteration), and the
    estimators run it vectorised without stacking anything. A list of SupportQuery
    tasks whose batches have equal shapes is stacked automatically; build one
    directly when your data loader already produces stacked tensors.

    Args:
        support: the support batches, stacked.
        query: the query batches, stacked.

    Example:
        >>> import torch, torch_maml as tm
        >>> x, y = torch.randn(25, 20, 1), torch.randn(25, 20, 1)
        >>> tasks = tm.StackedTasks(support=(x[:, :10], y[:, :10]), query=(x[:, 10:], y[:, 10:]))
        >>> len(tasks), tasks[0].support[0].shape
        (25, torch.Size([10, 1]))
    """

    support: BatchT
    query: BatchT

    def __post_init__(self) -> None:
        sizes = set()
        for name in ("support", "query"):
            leaves, _ = tree_flatten(getattr(self, name))
            if not leaves:
                raise ValueError(f"StackedTasks: '{name}' must hold at least one tensor")
            for leaf in leaves:
                if not isinstance(leaf, Tensor) or leaf.ndim == 0:
                    raise TypeError(
                        f"StackedTasks: every leaf of '{name}' must be a Tensor with a leading "
                        f"task dimension (got {_leaf_description(leaf)})"
                    )
                sizes.add(leaf.shape[0])
        if len(sizes) != 1:
            raise ValueError(
                "StackedTasks: all tensors must have the same leading (task) dimension "
                f"(got sizes {sorted(sizes)})"
            )
        if sizes == {0}:
            raise ValueError("StackedTasks must hold at least one task (got 0)")

    @classmethod
    def stack(cls, tasks: Sequence[SupportQuery[BatchT]]) -> StackedTasks[BatchT]:
        """Stack SupportQuery tasks whose batches have equal structure and shapes.

        Raises:
            ValueError: the tasks' batches differ in structure, shape, dtype or device.
        """
        if task_kind(tasks) != "support-query":
            raise TypeError("StackedTasks.stack takes SupportQuery tasks (got samplers)")
        support = stack_batches([task.support for task in tasks])
        query = stack_batches([task.query for task in tasks])
        if support is None or query is None:
            raise ValueError(
                "StackedTasks.stack: the tasks' batches differ in structure, shape, dtype "
                "or device, so they cannot be stacked"
            )
        return cls(support, query)

    def __len__(self) -> int:
        leaves, _ = tree_flatten(self.support)
        return int(leaves[0].shape[0])

    @overload
    def __getitem__(self, index: int) -> SupportQuery[BatchT]: ...

    @overload
    def __getitem__(self, index: slice) -> StackedTasks[BatchT]: ...

    def __getitem__(self, index: int | slice) -> SupportQuery[BatchT] | StackedTasks[BatchT]:
        """Task ``index`` as a SupportQuery, or a slice of tasks, still stacked."""
        if isinstance(index, slice):
            return StackedTasks(_take(self.support, index), _take(self.query, index))
        if not -len(self) <= index < len(self):
            raise IndexError(f"task index {index} out of range for {len(self)} tasks")
        return SupportQuery(_take(self.support, index), _take(self.query, index))


def _take(batch: BatchT, index: int | slice) -> BatchT:
    taken: BatchT = tree_map(lambda leaf: leaf[index], batch)
    return taken


def _leaf_description(leaf: object) -> str:
    if isinstance(leaf, Tensor):
        return "a 0-dimensional Tensor"
    return f"an object of type {type(leaf).__name__}"


def stack_batches(batches: Sequence[BatchT]) -> BatchT | None:
    """Stack batches leaf by leaf along a new leading dimension, or None if they differ.

    Batches stack when they have the same pytree structure and every leaf is a
    Tensor of the same shape, dtype and device as its counterparts.
    """
    flat = [tree_flatten(batch) for batch in batches]
    leaves0, spec0 = flat[0]
    if not all(isinstance(leaf, Tensor) for leaf in leaves0):
        return None
    for leaves, spec in flat[1:]:
        if spec != spec0:
            return None
        for leaf, first in zip(leaves, leaves0, strict=True):
            if not (
                isinstance(leaf, Tensor)
                and leaf.shape == first.shape
                and leaf.dtype == first.dtype
                and leaf.device == first.device
            ):
                return None
    columns = zip(*(leaves for leaves, _ in flat), strict=True)
    stacked = [torch.stack(list(column)) for column in columns]
    result: BatchT = tree_unflatten(stacked, spec0)
    return result


Task: TypeAlias = SupportQuery[BatchT] | Sampler[BatchT]
"""One task of a meta-batch: a :class:`SupportQuery` or a :class:`Sampler`."""

TaskKind: TypeAlias = Literal["support-query", "sampler"]


def task_kind(tasks: object, name: str = "tasks") -> TaskKind:
    """Check that ``tasks`` is a non-empty sequence of tasks of one kind; return it.

    Raises:
        TypeError: ``tasks`` is not a sequence, or holds something that is not a
            task, or mixes support/query tasks with samplers.
        ValueError: ``tasks`` is empty.
    """
    if isinstance(tasks, StackedTasks):
        return "support-query"
    if not isinstance(tasks, Sequence) or isinstance(tasks, (str, bytes)):
        raise TypeError(
            f"'{name}' must be a sequence of tasks (SupportQuery or samplers) "
            f"(got an object of type {type(tasks).__name__})"
        )
    if len(tasks) == 0:
        raise ValueError(f"'{name}' must hold at least one task (got an empty meta-batch)")
    kinds: list[TaskKind] = []
    for index, task in enumerate(tasks):
        if isinstance(task, SupportQuery):
            kinds.append("support-query")
        elif isinstance(task, Sampler):
            kinds.append("sampler")
        else:
            raise TypeError(
                f"'{name}[{index}]' must be a SupportQuery or have a "
                f"sample(size, generator) method (got an object of type {type(task).__name__})"
            )
    if len(set(kinds)) > 1:
        first_other = next(i for i, kind in enumerate(kinds) if kind != kinds[0])
        raise TypeError(
            f"'{name}' mixes task kinds: '{name}[0]' is a {kinds[0]} task but "
            f"'{name}[{first_other}]' is a {kinds[first_other]} task"
        )
    return kinds[0]


class TaskData(NamedTuple):
    """The batches one task's meta gradient uses (or a chunk of tasks', stacked)."""

    inner: Sequence[Batch]
    """One batch per inner step, ``batch_0 .. batch_{N-1}``."""
    hessian: Sequence[Batch]
    """One batch per inner step for its Hessian, ``hess_0 .. hess_{N-1}``; empty: each
    step's Hessian is taken on the step's own batch."""
    outer: Batch
    """The batch of the outer loss."""


class StackedTaskData(NamedTuple):
    """The data of several tasks with a leading task dimension on every tensor."""

    data: TaskData
    """The tasks' batches, stacked."""
    tasks: int
    """How many tasks (the size of the leading dimension)."""


MetaBatchData: TypeAlias = Sequence[TaskData] | StackedTaskData
"""A meta-batch's data: one :class:`TaskData` per task, or all of them stacked."""


def check_batch(batch: Batch, where: str) -> None:
    """Refuse a batch that holds an empty tensor: its mean loss would be 0 / 0.

    Raises:
        ValueError: naming ``where`` and the empty tensor's shape.
    """
    for leaf in tree_flatten(batch)[0]:
        if isinstance(leaf, Tensor) and leaf.numel() == 0:
            raise ValueError(
                f"{where} holds an empty tensor (shape {tuple(leaf.shape)}): every batch "
                "needs at least one sample"
            )


def support_query_data(tasks: Sequence[Task[BatchT]], steps: int) -> MetaBatchData:
    """The finite-sum data of eq. 10-12: support set at every inner step, query outside.

    Each step's Hessian is then taken on the support set, the step's own batch.

    A :class:`StackedTasks` meta-batch stays stacked (nothing is copied).

    Raises:
        TypeError: the tasks are samplers.
    """
    if isinstance(tasks, StackedTasks):
        check_batch(tasks.support, "'tasks.support'")
        check_batch(tasks.query, "'tasks.query'")
        support = [tasks.support] * steps
        return StackedTaskData(TaskData(support, (), tasks.query), len(tasks))
    if task_kind(tasks) != "support-query":
        raise TypeError(
            "these estimators need SupportQuery tasks (a support and a query set) for this "
            "setting; 'tasks' holds samplers"
        )
    data = []
    for index, task in enumerate(tasks):
        assert isinstance(task, SupportQuery)  # task_kind checked every task
        check_batch(task.support, f"'tasks[{index}].support'")
        check_batch(task.query, f"'tasks[{index}].query'")
        data.append(TaskData([task.support] * steps, (), task.query))
    return data
