"""Meta-batches sharded over the processes of ``torch.distributed``.

Each process passes its own shard of the meta-batch; the reductions here combine the
shards' results so that every process applies the update of the whole meta-batch.
Means are weighted by each shard's number of tasks.

Every tensor handed to a collective is made here for that collective alone, and the
function returns only once the backend has let go of it (``_collective``). The reason
is the exit of a finished job. With gloo, a synchronous collective returns as soon as
it has completed, but the worker thread that ran it drops its reference to the work a
little later (in about one call in four); a ``barrier()`` called in that moment keeps
that work, and so the tensor, until the barrier's own work is freed, which the worker
thread does after ``barrier()`` has returned. Releasing a tensor that has a Python
object takes the interpreter's lock. Meanwhile the process group and its worker
threads often outlive ``destroy_process_group()``: the first ``torch.optim`` optimizer
(a MetaOptimizer too) imports ``torch._dynamo``, and if that happens after
``init_process_group()``, one of the modules it imports stores the default group in
its functions' default arguments. A worker thread that frees such a tensor while the
interpreter shuts down cannot take the lock, and the process aborts ("terminate called
without an active exception") after its work is done.
"""

from __future__ import annotations

import itertools
import threading
import weakref
from collections.abc import Callable
from typing import TypeVar

import torch
import torch.distributed as dist
from torch import nn

from .ops import MetaGradient
from .smoothness import SmoothnessEstimate

__all__ = [
    "GroupHandle",
    "agree_on_step",
    "all_reduce_estimate",
    "all_reduce_mean",
    "all_reduce_probe",
    "broadcast_parameters",
    "process_group",
]

_R = TypeVar("_R")

# How long to wait for the backend to let go of a tensor once its collective has completed
# (gloo's worker thread does within microseconds; a wait that times out changes no result).
_RELEASE_TIMEOUT = 60.0


REFUSED_ELSEWHERE = (
    "torch.distributed: another process's tasks were refused at this step (see its "
    "error); no process changed its weights"
)


class GroupHandle:
    """The process group a MetaOptimizer averages over, without keeping it alive.

    An optimizer that held its process group would keep it, and gloo's worker threads,
    alive after ``destroy_process_group()``. The handle finds the default group anew
    each time (``distributed=True``), or holds a given group weakly.
    """

    def __init__(self, group: dist.ProcessGroup | None) -> None:
        self._ref = None if group is None else weakref.ref(group)

    def __call__(self) -> dist.ProcessGroup:
        """The group.

        Raises:
            RuntimeError: it was destroyed.
        """
        group = dist.group.WORLD if self._ref is None else self._ref()
        if group is None or not dist.is_initialized():
            raise RuntimeError(
                "the MetaOptimizer's process group was destroyed (destroy_process_group); "
                "build a new MetaOptimizer after init_process_group to go on"
            )
        return group


def process_group(distributed: bool | dist.ProcessGroup) -> GroupHandle | None:
    """A handle on the process group to average over, checked; None when not distributed."""
    if distributed is False:
        return None
    if distributed is not True and not isinstance(distributed, dist.ProcessGroup):
        raise TypeError(
            "'distributed' must be a bool or a torch.distributed.ProcessGroup "
            f"(got an object of type {type(distributed).__name__})"
        )
    if not (dist.is_available() and dist.is_initialized()):
        raise ValueError(
            "'distributed' needs torch.distributed to be initialised first "
            "(torch.distributed.init_process_group)"
        )
    if distributed is True and dist.group.WORLD is None:
        raise ValueError("'distributed': torch.distributed has no default process group")
    return GroupHandle(None if distributed is True else distributed)


def broadcast_parameters(params: list[nn.Parameter], group: dist.ProcessGroup) -> None:
    """Give every process of ``group`` the parameters of its first rank."""
    source = dist.get_global_rank(group, 0)
    for p in params:
        _broadcast_into(p, source, group)


def _broadcast_into(param: nn.Parameter, source: int, group: dist.ProcessGroup) -> None:
    """Overwrite ``param`` in place with the one of process ``source`` (a global rank)."""
    with torch.no_grad():
        _collective(
            lambda: param.data,  # a new tensor on the parameter's storage
            lambda data: dist.broadcast(data, src=source, group=group),
            lambda data: None,
        )


def _collective(
    make: Callable[[], torch.Tensor],
    run: Callable[[torch.Tensor], object],
    read: Callable[[torch.Tensor], _R],
) -> _R:
    """One collective on a tensor of its own, returning once the backend has let go of it.

    Args:
        make: makes the tensor to hand to the collective; nothing else may keep it.
        run: runs the collective (synchronously) on it.
        read: what to return, read from it after the collective; must not keep it.

    Returns:
        ``read(tensor)``. For a CPU tensor, only once the tensor is freed: it is freed
        when the last reference to it goes, so no thread of the backend holds it, nor
        the work of the collective, and a later ``barrier()`` cannot keep it (see the
        module's docstring). CUDA tensors are not waited for: NCCL frees them once its
        own thread sees the collective done on the GPU, later.
    """
    sent = make()
    freed = threading.Event()
    watch = weakref.ref(sent, lambda _: freed.set())  # called by the thread that frees it
    run(sent)
    result = read(sent)
    wait = sent.device.type == "cpu"
    del sent  # from here the backend's references are the last ones
    if wait and watch() is not None:
        freed.wait(_RELEASE_TIMEOUT)  # releases the interpreter's lock, which freeing takes
    return result


def _all_reduce_values(
    values: list[float],
    group: dist.ProcessGroup,
    op: dist.ReduceOp.RedOpType = dist.ReduceOp.SUM,
    device: torch.device | None = None,
) -> list[float]:
    """The reduction ``op`` over the processes of ``group`` of each of ``values``.

    The values travel in float64 on ``device`` (the CPU by default).
    """
    reduced: list[float] = _collective(
        lambda: torch.tensor(values, dtype=torch.float64, device=device),
        lambda sent: dist.all_reduce(sent, op=op, group=group),
        lambda sent: sent.tolist(),
    )
    return reduced


def agree_on_step(calls: int, kind: str | None, group: dist.ProcessGroup) -> str:
    """Check that every process is at the same step, and agree on the tasks' kind.

    Args:
        calls: how many steps and meta_backward calls this process has made.
        kind: this process's kind of tasks, None if it holds no task this step, or
            ``"failed"`` if its tasks are bad (it raises its own error after this).
        group: the process group.

    Returns:
        The kind of tasks of the meta-batch (every process's that holds tasks).

    Raises:
        RuntimeError: the processes are at different steps (one skipped or failed a
            step: the collectives would pair different steps), or hold tasks of
            different kinds, or none holds a task. Every process raises it alike.
    """
    kinds = ("support-query", "sampler")
    flags = [float(calls), -float(calls), float(kind == "failed")]
    agreed = _all_reduce_values(flags + [float(kind == k) for k in kinds], group, dist.ReduceOp.MAX)
    latest, earliest = int(agreed[0]), -int(agreed[1])
    if agreed[2] and kind != "failed":
        raise RuntimeError(REFUSED_ELSEWHERE)
    if latest != earliest:
        raise RuntimeError(
            "torch.distributed: the processes are at different meta steps (this one has "
            f"made {calls} steps, others between {earliest} and {latest}); a process "
            "skipped a step or failed one, so their collectives no longer pair up. Every "
            "process must call step (or meta_backward) the same number of times"
        )
    present = [k for k, flag in zip(kinds, agreed[3:], strict=True) if flag]
    if len(present) != 1:
        raise RuntimeError(
            "torch.distributed: "
            + (
                "no process holds a task this step"
                if not present
                else "the processes hold tasks of different kinds (SupportQuery and samplers)"
            )
        )
    return present[0]


def all_reduce_mean(
    result: MetaGradient, count: int, group: dist.ProcessGroup, *, refused: bool = False
) -> MetaGradient:
    """The mean over every process's tasks of a per-process mean over ``count`` tasks.

    Raises:
        RuntimeError: another process's tasks were refused at this step (it passes
            ``refused=True``, and raises its own error after this).
    """
    grads = list(result.grads.values())
    totals = _all_reduce_values(
        [count, result.grad_evals, result.hvp_evals, refused], group, device=grads[0].device
    )
    if totals[-1]:  # a process's tasks were refused: no process goes on to the mean
        _raise_if_refused(refused)
        return result
    tasks, grad_evals, hvp_evals = (int(v) for v in totals[:-1])
    flat = _collective(
        lambda: torch.cat(
            [g.reshape(-1) for g in grads] + [result.loss.reshape(1).to(grads[0])]
        ).mul_(count),
        lambda sent: dist.all_reduce(sent, group=group),
        lambda sent: sent / tasks,
    )
    offsets = [0]
    for g in grads:
        offsets.append(offsets[-1] + g.numel())
    pieces = [flat[a:b] for a, b in itertools.pairwise(offsets)]
    return MetaGradient(
        grads={
            name: piece.view_as(g)
            for (name, g), piece in zip(result.grads.items(), pieces, strict=True)
        },
        loss=flat[-1].to(result.loss.dtype),
        grad_evals=grad_evals,
        hvp_evals=hvp_evals,
    )


def all_reduce_estimate(
    estimate: SmoothnessEstimate,
    count: int,
    group: dist.ProcessGroup,
    has_b: bool | None = None,
    *,
    refused: bool = False,
) -> SmoothnessEstimate:
    """Every process's estimate combined: maxima of L, rho, b_max; the mean of b; sums.

    ``has_b``: whether the meta-batch has a ``b`` (SupportQuery tasks); by default,
    whether this process's estimate has one (a process with no task has none).

    Raises:
        RuntimeError: another process's tasks were refused (see :func:`all_reduce_mean`).
    """
    largest = _all_reduce_values(
        [estimate.L, estimate.rho, estimate.b_max or 0.0, refused], group, dist.ReduceOp.MAX
    )
    if largest[-1]:
        _raise_if_refused(refused)
        return estimate
    summed = _all_reduce_values(
        [(estimate.b or 0.0) * count, count, estimate.grad_evals, estimate.hvp_evals], group
    )
    has_b = estimate.b is not None if has_b is None else has_b
    return estimate._replace(
        L=largest[0],
        rho=largest[1],
        b=summed[0] / summed[1] if has_b else None,
        b_max=largest[2] if has_b else None,
        grad_evals=int(summed[2]),
        hvp_evals=int(summed[3]),
    )


def all_reduce_probe(
    total: float, count: int, group: dist.ProcessGroup, *, refused: bool = False
) -> tuple[float, int]:
    """The sum of every process's probe-gradient norms, and of their numbers of probes.

    Raises:
        RuntimeError: another process's tasks were refused (see :func:`all_reduce_mean`).
    """
    summed = _all_reduce_values([total, count, refused], group)
    if summed[-1]:
        _raise_if_refused(refused)
    return summed[0], int(summed[1])


def _raise_if_refused(refused_here: bool) -> None:
    """When a process's tasks were refused: raise on the others (it raises its own error)."""
    if not refused_here:
        raise RuntimeError(REFUSED_ELSEWHERE)
