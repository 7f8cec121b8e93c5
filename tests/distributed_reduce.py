"""Run by tests/test_distributed.py under torchrun: combine per-process smoothness estimates.

Each process makes its own estimate, as ``SmoothnessAdaptive(every=k)`` does on its
shard, and the optimizer's reduction combines them; rank 0 prints the result as JSON.
"""

from __future__ import annotations

import json

import torch.distributed as dist

from torch_maml.distributed import all_reduce_estimate
from torch_maml.theory import SmoothnessEstimate


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
        print(json.dumps(combined._asdict()))
    dist.barrier()
    dist.destroy_process_group()
    print("done")


if __name__ == "__main__":
    main()
