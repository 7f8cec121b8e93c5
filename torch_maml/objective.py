r"""The meta objective an estimator differentiates, and the way to run algorithms on it.

A :class:`MetaObjective` holds the task loss and the inner loop, which define

.. math::
    \mathcal L(w) = \frac{1}{|B|} \sum_{i \in B} l_i\big(w_N^i(w); \mathrm{outer}_i\big),

and the :class:`~torch_maml.execution.Executor` its :class:`~torch_maml.MetaOptimizer`
configured. An estimator chooses each task's batches and an algorithm, and calls
:meth:`MetaObjective.map_tasks`: the tasks then run one by one or vectorised, in
chunks, compiled or captured, as the optimizer was set up, whoever wrote the
estimator.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from torch import Tensor

from .algorithms import rollout
from .execution import Algorithm, ChunkSize, Executor, Memory
from .inner import InnerLoop
from .model import TaskLoss
from .ops import MetaGradient, Ops, OracleCounts
from .tasks import MetaBatchData
from .typing import Batch, Params

__all__ = ["MetaObjective"]


class MetaObjective:
    """The task loss and inner loop, and how algorithms run over a meta-batch of them.

    Args:
        loss: the task loss ``l(w; batch)``.
        inner_loop: the inner optimiser that produces ``w_N`` from ``w``.
        task_chunk_size: how many tasks run vectorised at once: a number, ``"auto"``
            or ``None`` (all the tasks of a meta-batch at once); 1 runs them one by one.
        compile: compile each chunk's computation with ``torch.compile``: ``True`` for
            its defaults, or a dict of its keyword arguments.
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
        self.executor = Executor(loss, inner_loop, task_chunk_size=task_chunk_size, compile=compile)

    @property
    def task_chunk_size(self) -> ChunkSize:
        """How many tasks run vectorised at once."""
        return self.executor.task_chunk_size

    @property
    def compile(self) -> bool | Mapping[str, Any]:
        """The ``torch.compile`` setting."""
        return self.executor.compile

    def map_tasks(
        self,
        algorithm: Algorithm,
        params: Params,
        data: MetaBatchData,
        *,
        memory: Memory = "steps",
    ) -> MetaGradient:
        """Run a per-task algorithm over a meta-batch: the mean of its results.

        ``algorithm(ops, w, task_data)`` computes one task's
        :class:`~torch_maml.MetaGradient` with the operations of ``ops`` (see
        :mod:`torch_maml.ops`); it may be handed tensors with a leading task
        dimension, and must then reduce them only through ``ops``. The tasks run one
        by one or vectorised, in chunks, and compiled, as the optimizer was set up.

        Args:
            algorithm: the per-task algorithm: a function or a method (the same
                object every call, so that compiled code is reused).
            params: ``w``, detached.
            data: one :class:`~torch_maml.TaskData` per task, or all of them stacked
                (:func:`~torch_maml.tasks.support_query_data` builds either).
            memory: ``"unrolled"`` if the algorithm keeps the graph of the whole
                unrolled loop (for the memory plan of ``"auto"`` chunks).

        Returns:
            The mean gradient and loss over the tasks, with the counts summed.
        """
        return self.executor.map_tasks(algorithm, params, data, memory=memory)

    def ops(self, batched: bool = False) -> Ops:
        """The operations for one task (or vectorised over a leading task dimension)."""
        return self.executor.ops(batched)

    def loss_grad(self, params: Params, batch: Batch) -> tuple[Params, Tensor]:
        """``(grad l(w; batch), l(w; batch))`` for one task."""
        return self.ops().grad(params, batch)

    def adapt(
        self, params: Params, inner_batches: Sequence[Batch], counts: OracleCounts | None = None
    ) -> Params:
        """The adapted weights ``w_N`` of one task, detached, one step per inner batch."""
        run = rollout(self.ops(), params, inner_batches)
        if counts is not None:
            counts.grad_evals += len(inner_batches)
        return run.params
