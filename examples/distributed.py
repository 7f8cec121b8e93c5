"""Multi-step MAML on several processes with ``torch.distributed``: each process adapts
to its own shard of the meta-batch, and ``MetaOptimizer(..., distributed=True)``
averages the meta gradients over all of them before every update.

Run it with::

    torchrun --standalone --nproc_per_node=2 examples/distributed.py   # 2 processes
    python examples/distributed.py                                     # 1 process, same result

``torchrun`` starts the processes and sets the variables (``RANK``, ``WORLD_SIZE``,
``MASTER_ADDR``...) that ``torch.distributed.init_process_group`` reads; the gloo
backend runs on CPUs, NCCL on GPUs (``--device cuda``: each process takes the GPU of
its local rank). Without ``torchrun`` the script runs as one process.

What happens at each meta step:

1. every process draws the same meta-batch of ``--tasks`` sinusoid tasks from a
   generator seeded alike on all of them, and keeps its shard ``tasks[rank::world]``;
2. ``meta_opt.step(shard)`` computes the shard's meta gradient, all-reduces the sum
   over the tasks of every shard, divides by the total number of tasks, and updates:
   each process applies the same update to the same weights (broadcast from rank 0
   when the optimizer was built), so all hold the same model without any further
   synchronisation.

The result is the meta step on the whole meta-batch: in float64 (``--dtype float64``),
two processes end, after ``--iterations`` steps, with the weights of one process that
takes the whole meta-batch, up to rounding (``tests/test_distributed.py`` checks it to
1e-10). ``--out PATH`` saves rank 0's final weights.
"""

from __future__ import annotations

import argparse
import math
import os
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

import torch_maml as tm

Batch = tuple[Tensor, Tensor]


def sample_tasks(
    count: int, generator: torch.Generator, dtype: torch.dtype, k: int = 10
) -> list[tm.SupportQuery[Batch]]:
    """``count`` sinusoid tasks (amplitude in [0.1, 5], phase in [0, pi]), K support/query."""
    tasks = []
    for _ in range(count):
        amplitude = 0.1 + 4.9 * torch.rand((), generator=generator, dtype=dtype)
        phase = math.pi * torch.rand((), generator=generator, dtype=dtype)

        def points(amplitude: Tensor = amplitude, phase: Tensor = phase) -> Batch:
            x = 10 * torch.rand(k, 1, generator=generator, dtype=dtype) - 5
            return x, amplitude * torch.sin(x - phase)

        tasks.append(tm.SupportQuery(points(), points()))
    return tasks


def loss_fn(model: nn.Module, batch: Batch) -> Tensor:
    x, y = batch
    return F.mse_loss(model(x), y)


def to(task: tm.SupportQuery[Batch], device: torch.device) -> tm.SupportQuery[Batch]:
    return tm.SupportQuery(
        (task.support[0].to(device), task.support[1].to(device)),
        (task.query[0].to(device), task.query[1].to(device)),
    )


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iterations", type=int, default=300)
    parser.add_argument("--tasks", type=int, default=16, help="meta-batch size, all processes")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--dtype", choices=["float32", "float64"], default="float32")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument(
        "--outer",
        choices=["constant", "adaptive"],
        default="constant",
        help="outer step: Constant(0.01), or SmoothnessAdaptive, whose probe gradient "
        "norms are averaged over the processes too",
    )
    parser.add_argument("--out", type=Path, default=None, help="save rank 0's final weights")
    parser.add_argument("--quick", action="store_true", help="5 iterations of 5 tasks")
    args = parser.parse_args(argv)
    if args.quick:
        args.iterations, args.tasks = 5, 5
    return args


def main(argv: list[str] | None = None) -> dict[str, Tensor]:
    args = parse_args(argv)
    distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1
    device = torch.device(args.device)
    if distributed:
        dist.init_process_group("nccl" if args.device == "cuda" else "gloo")
        if args.device == "cuda":
            device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
            torch.cuda.set_device(device)
    rank, world = (dist.get_rank(), dist.get_world_size()) if distributed else (0, 1)
    dtype = getattr(torch, args.dtype)

    # Each process may start from different weights: the optimizer broadcasts rank 0's.
    torch.manual_seed(args.seed + rank)
    model = nn.Sequential(
        nn.Linear(1, 40), nn.ReLU(), nn.Linear(40, 40), nn.ReLU(), nn.Linear(40, 1)
    )
    model.to(device=device, dtype=dtype)
    meta_opt = tm.MetaOptimizer(
        model,
        loss_fn,
        inner_loop=tm.GradientDescent(steps=5, lr=0.01),
        estimator=tm.FiniteSum(),
        step_size=(
            tm.Constant(0.01)
            if args.outer == "constant"
            else tm.SmoothnessAdaptive(L=1.0, rho=1.0, c_beta=1.0, b=1.0)
        ),
        distributed=distributed,
    )
    tasks_generator = torch.Generator().manual_seed(args.seed)  # the same on every process
    for iteration in range(1, args.iterations + 1):
        tasks = sample_tasks(args.tasks, tasks_generator, dtype)
        shard = [to(task, device) for task in tasks[rank::world]]
        info = meta_opt.step(shard)  # info.loss: the mean over all processes' tasks
        if rank == 0 and (iteration % 50 == 0 or iteration == args.iterations):
            print(f"iteration {iteration}: mean query loss after adaptation {info.loss:.4f}")

    weights = {name: p.detach().cpu() for name, p in model.named_parameters()}
    if rank == 0:
        print(f"{world} process(es), {args.tasks} tasks per meta-batch: done")
        if args.out is not None:
            torch.save(weights, args.out)
    if distributed:
        dist.barrier()  # no process tears its connections down while another still uses them
        dist.destroy_process_group()
    return weights


if __name__ == "__main__":
    main()
