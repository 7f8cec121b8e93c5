"""Tasks: where the batches of each term of the meta gradient come from.

Two kinds of task cover the paper's two settings (SPEC section 3):

* :class:`SupportQuery` (finite-sum, eq. 9-12): a fixed support set ``S_i`` for the
  inner steps and a fixed query set ``T_i`` for the outer loss.
* any :class:`Sampler` (resampling, eq. 6-7): an object with
  ``sample(size, generator=None) -> batch`` that draws fresh data on every call.

A meta-batch is a non-empty sequence of tasks of one kind.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Generic, Literal, Protocol, TypeAlias, TypeVar, runtime_checkable

import torch

from .typing import BatchT

__all__ = ["Sampler", "SupportQuery", "Task", "TaskKind", "task_kind"]

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
