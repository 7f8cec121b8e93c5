"""The meta objective an estimator differentiates, and how its operations run.

A :class:`MetaObjective` holds the task loss and the inner loop (what defines
``L(w) = mean_i l_i(w_N^i(w); outer_i)``) and the execution choices of its
:class:`~torch_maml.MetaOptimizer`: how many tasks to vectorise at once, and
whether to compile. Estimators receive it, and take the operations they need from
:meth:`MetaObjective.ops`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from torch import Tensor
from torch.utils._pytree import tree_leaves

from .batching import (
    ChunkSize,
    Method,
    TaskData,
    TaskFootprint,
    check_chunk_size,
    estimate_task_bytes,
    take,
)
from .functional import (
    Ops,
    OracleCounts,
    TaskLoss,
    adapt,
    batched_ops,
    loss_grad,
    task_ops,
)
from .inner import InnerLoop
from .typing import Batch, Params

__all__ = ["MetaObjective"]


class MetaObjective:
    """The task loss and inner loop, with the operations estimators are built from.

    Args:
        loss: the task loss ``l(w; batch)``.
        inner_loop: the inner optimiser that produces ``w_N`` from ``w``.
        task_chunk_size: how many tasks the estimators vectorise at once: a number,
            ``"auto"`` (see :func:`torch_maml.batching.plan_chunk_size`) or ``None`` (all
            the tasks of a meta-batch at once). 1 runs tasks one by one, unvectorised.
        compile: compile the vectorised operations with ``torch.compile``: ``True``
            for its defaults, or a dict of its keyword arguments.
    """

    def __init__(
        self,
        loss: TaskLoss,
        inner_loop: InnerLoop,
        *,
        task_chunk_size: ChunkSize = "auto",
        compile: bool | Mapping[str, Any] = False,
    ) -> None:
        self.loss = loss
        self.inner_loop = inner_loop
        self.task_chunk_size = check_chunk_size(task_chunk_size)
        if not isinstance(compile, (bool, Mapping)):
            raise TypeError(
                "'compile' must be a bool or a dict of torch.compile options "
                f"(got an object of type {type(compile).__name__})"
            )
        self.compile = compile
        self._task_ops: Ops | None = None
        self._batched_ops: Ops | None = None
        self._footprints: dict[tuple[Any, ...], TaskFootprint] = {}

    def ops(self, batched: bool) -> Ops:
        """The operations for one task, or vectorised over a leading task dimension.

        The vectorised ones are compiled if the objective was built with ``compile``;
        both are built once and cached.
        """
        if not batched:
            if self._task_ops is None:
                self._task_ops = task_ops(self.loss, self.inner_loop)
            return self._task_ops
        if self._batched_ops is None:
            ops = batched_ops(self.loss, self.inner_loop, compilable=self.compile is not False)
            if self.compile is not False:
                from .compiling import compiled_ops  # torch.compile only when asked for

                options = self.compile if isinstance(self.compile, Mapping) else None
                ops = compiled_ops(ops, options)
            self._batched_ops = ops
        return self._batched_ops

    def footprint(
        self, params: Params, data: TaskData, stacked: bool, method: Method
    ) -> TaskFootprint:
        """:func:`~torch_maml.batching.estimate_task_bytes` of one task, once per shape.

        Args:
            params: ``w``.
            data: one task's data, or several tasks' stacked (``stacked``): their first
                task is measured.
            stacked: whether ``data`` has a leading task dimension.
            method: how the meta gradient will be computed.
        """
        batches = (data.inner[0] if data.inner else None, data.outer)
        key = (method, len(data.inner), stacked, _signature(batches))
        if key not in self._footprints:
            sample = take(data, 0) if stacked else data
            self._footprints[key] = estimate_task_bytes(self.loss, params, sample, method)
        return self._footprints[key]

    def loss_grad(self, params: Params, batch: Batch) -> tuple[Params, Any]:
        """``(grad l(w; batch), l(w; batch))`` for one task."""
        return loss_grad(self.loss, params, batch)

    def adapt(
        self, params: Params, inner_batches: Sequence[Batch], counts: OracleCounts | None = None
    ) -> Params:
        """The adapted weights ``w_N`` of one task, detached, one step per inner batch."""
        return adapt(self.loss, self.inner_loop, params, inner_batches, counts)


def _signature(tree: Any) -> tuple[Any, ...]:
    """Shapes, dtypes and devices of a pytree's tensors: what memory depends on."""
    return tuple(
        (leaf.shape, leaf.dtype, leaf.device) if isinstance(leaf, Tensor) else leaf
        for leaf in tree_leaves(tree)
    )
