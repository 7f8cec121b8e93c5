"""Where a NaN or Inf first appears in a meta step, for the error that reports it."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from .algorithms import rollout
from .objective import MetaObjective
from .tasks import SupportQuery, Task
from .typing import Params

__all__ = ["locate_nonfinite"]


def locate_nonfinite(objective: MetaObjective, params: Params, tasks: Sequence[Task[Any]]) -> str:
    """The first support loss, inner step or query loss that is not finite, or ``""``.

    Replays :class:`~torch_maml.SupportQuery` tasks one by one with the inner loop's
    forward rollout; a sampler's draws cannot be replayed.
    """
    if not all(isinstance(task, SupportQuery) for task in tasks):
        return ""
    ops = objective.ops()
    for i, task in enumerate(tasks):
        assert isinstance(task, SupportQuery)  # checked above
        batches = [task.support] * objective.inner_loop.steps
        run = rollout(ops, params, batches, record=True)
        for j, value in enumerate(run.values):
            if not bool(torch.isfinite(value)):
                return f"the support loss at inner step {j} of task {i} ({value.item():.6g})"
            following = run.iterates[j + 1] if j + 1 < len(run.iterates) else run.params
            if not _finite(following):
                return f"the support-loss gradient at inner step {j} of task {i}"
        grads, value = ops.grad(run.params, task.query)
        if not bool(torch.isfinite(value)):
            return f"the query loss of task {i} ({value.item():.6g})"
        if not _finite(grads):
            return f"the query-loss gradient of task {i}"
    return ""


def _finite(tree: Params) -> bool:
    return all(bool(torch.isfinite(t).all()) for t in tree.values())
