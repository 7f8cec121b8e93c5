"""Run by tests/test_distributed.py under torchrun: combine per-process smoothness estimates.

Each process makes its own estimate, as ``SmoothnessAdaptive(every=k)`` does on its
shard, and the optimizer's reduction combines them; rank 0 prints the result as JSON.

Then the reductions must leave nothing with the backend: every tensor that torch_maml
hands to a collective is freed before the reduction returns. Were one still held by
gloo's worker thread then, the ``barrier()`` that a job calls next could keep it until
the interpreter shuts down, and the process could abort at exit after its work was done
(see ``torch_maml/distributed.py``). Each reduction here is followed at once by a
barrier, which rank 0 enters late, as at the end of a job; rank 0 prints how many
tensors, over both processes, were still alive when their reduction returned.
"""

from __future__ import annotations

import json
import time
import weakref
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from torch_maml.distributed import all_reduce_estimate, all_reduce_probe, broadcast_parameters
from torch_maml.theory import SmoothnessEstimate

# Without torch_maml's wait, about one tensor in four would still be held: 30 rounds (120
# tensors) all passing by chance is out of the question.
ROUNDS = 30

handed: list[weakref.ref[torch.Tensor]] = []


def recording(collective: Callable[..., Any]) -> Callable[..., Any]:
    """``collective``, noting (weakly) each tensor handed to it."""

    def run(tensor: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        handed.append(weakref.ref(tensor))
        return collective(tensor, *args, **kwargs)

    return run


def still_held(reduce: Callable[[], object]) -> int:
    """How many tensors ``reduce`` handed to collectives are alive when it returns."""
    handed.clear()
    reduce()
    return sum(ref() is not None for ref in handed)


def main() -> None:
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    shard = rank + 2  # shards of 2 and 3 tasks: a plain mean of the b's would be wrong
    mine = SmoothnessEstimate(
        L=[3.0, 5.0][rank],
        rho=[7.0, 2.0][rank],
        b=[1.0, 4.0][rank],
        b_max=[1.5, 6.0][rank],
        L_iterations=10,
        L_converged=True,
        rho_iterations=20,
        rho_converged=True,
        grad_evals=2 * shard,
        hvp_evals=100 * shard,
    )
    group = dist.group.WORLD
    assert group is not None  # initialised above
    combined = all_reduce_estimate(mine, shard, group)
    if rank == 0:
        print(json.dumps(combined._asdict()), flush=True)

    dist.all_reduce = recording(dist.all_reduce)
    dist.broadcast = recording(dist.broadcast)
    params = [nn.Parameter(torch.zeros(10, dtype=torch.float64)) for _ in range(2)]
    held = 0
    for _ in range(ROUNDS):
        held += still_held(lambda: all_reduce_estimate(mine, shard, group))
        held += still_held(lambda: broadcast_parameters(params, group))
        if rank == 0:
            time.sleep(0.005)
        dist.barrier()
    total, _ = all_reduce_probe(float(held), 1, group)
    if rank == 0:
        print(f"tensors still held by the backend after their reduction: {int(total)}", flush=True)
    dist.barrier()
    dist.destroy_process_group()
    print("done")


if __name__ == "__main__":
    main()
