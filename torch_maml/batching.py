"""Deprecated: stacking and chunk planning moved to :mod:`torch_maml.execution`.

The type aliases are re-exported as they were; each function still works, with a
:class:`DeprecationWarning` naming its new home.
"""

from __future__ import annotations

import warnings
from typing import Any

from . import execution
from .execution import ChunkSize, Memory, TaskFootprint
from .tasks import TaskData

__all__ = ["ChunkSize", "Method", "TaskData", "TaskFootprint"]

Method = Memory
"""Deprecated alias of :data:`torch_maml.execution.Memory`."""


def _plan_chunk_size(setting: ChunkSize, tasks: int, footprint: TaskFootprint) -> int:
    return execution.plan_chunks(setting, tasks, footprint).size


_MOVED: dict[str, tuple[Any, str]] = {
    name: (getattr(execution, name), f"torch_maml.execution.{name}")
    for name in (
        "AUTO_CHUNK_BYTES",
        "AUTO_CHUNK_FACTOR",
        "check_chunk_size",
        "chunk_sizes",
        "estimate_task_bytes",
        "stack_task_data",
        "take",
    )
}
_MOVED["AUTO_CPU_TASK_ACTIVATIONS"] = (
    execution.AUTO_CPU_TASK_BYTES,
    "torch_maml.execution.AUTO_CPU_TASK_BYTES",
)
_MOVED["plan_chunk_size"] = (_plan_chunk_size, "torch_maml.execution.plan_chunks")


def __getattr__(name: str) -> Any:
    if name in _MOVED:
        value, replacement = _MOVED[name]
        warnings.warn(
            f"torch_maml.batching.{name} is deprecated and will be removed in the next "
            f"release; use {replacement}",
            DeprecationWarning,
            stacklevel=2,
        )
        return value
    raise AttributeError(f"module 'torch_maml.batching' has no attribute {name!r}")
