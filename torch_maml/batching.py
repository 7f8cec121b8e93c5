"""Meta-batches as data: stacking tasks, and how many to vectorise at once.

Estimators turn each task into a :class:`TaskData` (its inner, Hessian and outer
batches), stack the data of several tasks along a leading task dimension, and run
the algorithms of :mod:`torch_maml.functional` on chunks of tasks with vmapped
operations. :func:`plan_chunk_size` decides the chunk size.

The automatic chunk size bounds memory: it estimates the working set of one task
(:func:`estimate_task_bytes`) and vectorises at most ``max(4, 256 MiB / estimate)``
tasks at once, so a vectorised meta step uses at most four times the working set
of the per-task loop, or 256 MiB more, whichever is larger. On the CPU it also
runs large tasks (more than 1 MiB of activations per loss evaluation) one by one:
they are compute-bound, and vectorising them only costs memory (a conv4 meta step
of 8 tasks took 1.6x longer vectorised than task by task, a 1-40-40-1 MLP's 15x
less).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal, NamedTuple, TypeAlias

import torch
from torch import Tensor
from torch.utils._pytree import tree_leaves, tree_map

from ._validation import positive_int
from .functional import TaskLoss
from .tasks import stack_batches
from .typing import Batch, Params

__all__ = [
    "AUTO_CHUNK_BYTES",
    "AUTO_CHUNK_FACTOR",
    "AUTO_CPU_TASK_ACTIVATIONS",
    "ChunkSize",
    "Method",
    "TaskData",
    "TaskFootprint",
    "check_chunk_size",
    "chunk_sizes",
    "estimate_task_bytes",
    "plan_chunk_size",
    "stack_task_data",
    "take",
]

ChunkSize: TypeAlias = int | Literal["auto"] | None
"""Tasks vectorised at once: a number, ``"auto"`` (memory-bounded), or ``None`` (all)."""


def check_chunk_size(value: object) -> ChunkSize:
    """Return ``value`` if it is a valid ``task_chunk_size``, else raise naming it."""
    if value is None or value == "auto":
        return value
    if isinstance(value, str):
        raise ValueError(
            f"'task_chunk_size' must be a positive int, 'auto' or None (got {value!r})"
        )
    return positive_int("task_chunk_size", value)


Method = Literal["recursion", "unrolled"]
"""How the meta gradient is computed: HVP recursion (one step's graph) or unrolled autograd."""

AUTO_CHUNK_FACTOR = 4
"""``"auto"`` vectorises at least this many tasks' working sets..."""
AUTO_CHUNK_BYTES = 256 * 2**20
"""...or as many as fit in this many bytes, whichever is more tasks."""
AUTO_CPU_TASK_ACTIVATIONS = 2**20
"""On the CPU, tasks with more activation bytes than this run one by one under ``"auto"``."""


class TaskData(NamedTuple):
    """The batches one task's meta gradient uses, or those of a chunk of tasks, stacked."""

    inner: Sequence[Batch]
    """One batch per inner step."""
    hessian: Sequence[Batch]
    """One batch per inner step for its Hessian (empty for the unrolled method)."""
    outer: Batch
    """The batch of the outer loss."""


def take(data: TaskData, index: int | slice) -> TaskData:
    """Task ``index`` (or a slice of tasks) of stacked task data."""
    memo: dict[int, Batch] = {}

    def one(batch: Batch) -> Batch:
        if id(batch) not in memo:
            memo[id(batch)] = tree_map(lambda leaf: leaf[index], batch)
        return memo[id(batch)]

    return TaskData([one(b) for b in data.inner], [one(b) for b in data.hessian], one(data.outer))


def stack_task_data(items: Sequence[TaskData]) -> TaskData | None:
    """The data of several tasks stacked along a new leading dimension, or None.

    None when their batches differ in structure, shape, dtype or device. A batch
    used at several positions (a support set at every inner step) is stacked once.
    """
    memo: dict[tuple[int, ...], Batch | None] = {}

    def column(batches: Sequence[Batch]) -> Batch | None:
        key = tuple(id(batch) for batch in batches)
        if key not in memo:
            memo[key] = stack_batches(batches)
        return memo[key]

    inner = [column([item.inner[j] for item in items]) for j in range(len(items[0].inner))]
    hessian = [column([item.hessian[j] for item in items]) for j in range(len(items[0].hessian))]
    outer = column([item.outer for item in items])
    if outer is None or any(batch is None for batch in (*inner, *hessian)):
        return None
    return TaskData(inner, hessian, outer)


def _saved_bytes(loss: TaskLoss, params: Params, batch: Batch) -> int:
    """Bytes of the tensors autograd saves for one backward of ``l(w; batch)``."""
    weights = {name: p.detach().requires_grad_(True) for name, p in params.items()}
    known = {t.data_ptr() for t in tree_leaves((weights, batch)) if isinstance(t, Tensor)}
    total = 0

    def pack(tensor: Tensor) -> Tensor:
        nonlocal total
        pointer = tensor.data_ptr()
        if pointer not in known:
            known.add(pointer)
            total += tensor.numel() * tensor.element_size()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        loss(weights, batch)
    return total


class TaskFootprint(NamedTuple):
    """What one task's meta gradient costs in memory (estimates, in bytes)."""

    activations: int
    """Activation memory autograd saves for one loss evaluation (the largest batch)."""
    total: int
    """The working set of one task's meta gradient."""
    on_cpu: bool
    """Whether the parameters live on the CPU."""


def estimate_task_bytes(
    loss: TaskLoss, params: Params, sample: TaskData, method: Method
) -> TaskFootprint:
    """An estimate of the memory one task's meta gradient works in.

    ``3 a + (N + 2) p`` for the recursion, ``(2 N + 3) a + (N + 2) p`` unrolled, where
    ``a`` is the activation memory autograd saves for one loss evaluation (measured
    by one forward pass on the task's largest batch) and ``p`` the adapted
    parameters' size: one step's forward, backward and double-backward graphs (all
    ``N`` steps' when unrolled) and the stored iterates.
    """
    batches = {id(b): b for b in (*sample.inner[:1], *sample.hessian[:1], sample.outer)}
    activations = max(_saved_bytes(loss, params, batch) for batch in batches.values())
    parameters = sum(p.numel() * p.element_size() for p in params.values())
    steps = len(sample.inner)
    graphs = 3 if method == "recursion" else 2 * steps + 3
    on_cpu = all(p.device.type == "cpu" for p in params.values())
    return TaskFootprint(
        activations, max(1, graphs * activations + (steps + 2) * parameters), on_cpu
    )


def plan_chunk_size(setting: ChunkSize, tasks: int, footprint: TaskFootprint | None) -> int:
    """How many of ``tasks`` tasks to vectorise at once.

    Args:
        setting: a number (at most that many), None (all), or ``"auto"``.
        tasks: the number of tasks in the meta-batch.
        footprint: for ``"auto"``, :func:`estimate_task_bytes` of one task.
    """
    if setting is None or tasks == 1:
        return tasks
    if setting != "auto":
        return min(setting, tasks)
    if footprint is None:
        raise ValueError("an 'auto' chunk size needs an estimate of one task's footprint")
    if footprint.on_cpu and footprint.activations > AUTO_CPU_TASK_ACTIVATIONS:
        return 1
    budget = max(AUTO_CHUNK_FACTOR * footprint.total, AUTO_CHUNK_BYTES)
    return max(1, min(tasks, budget // footprint.total))


def chunk_sizes(tasks: int, largest: int) -> list[int]:
    """Split ``tasks`` into as few chunks of at most ``largest`` as possible, evenly.

    Even chunks (25 tasks by 8: 7, 6, 6, 6) keep the number of distinct shapes, and
    hence of compiled graphs, at two at most.
    """
    count = -(-tasks // largest)
    base, extra = divmod(tasks, count)
    return [base + 1] * extra + [base] * (count - extra)


def expand_params(params: Params, tasks: int) -> Params:
    """``w`` along a new leading task dimension, as a view (no copy)."""
    return {name: p.expand(tasks, *p.shape) for name, p in params.items()}


def chunk_sum(value: Any, batched: bool) -> Any:
    """Sum a chunk's per-task results over the task dimension (identity for one task)."""
    if not batched:
        return value
    return tree_map(lambda t: t.sum(0), value)
