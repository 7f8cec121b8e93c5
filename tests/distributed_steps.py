"""Run by tests/test_distributed.py under torchrun (2 processes, gloo): uneven steps.

1. Rank 1 holds no task: both processes end with the weights of one process that
   takes rank 0's three tasks (it contributes nothing to the mean).
2. Rank 1's tasks are refused (an empty support set): rank 1 raises its own error,
   rank 0 a RuntimeError saying so; neither changes its weights, and the next good
   step still pairs the processes' collectives.
3. Rank 1 resumes from a checkpoint one step older than rank 0's: both raise the same
   RuntimeError naming the steps, and neither changes its weights.
4. As 2, with ``SmoothnessAdaptive(every=1)``, whose estimate of L, rho and b and whose
   probe gradients, all-reduced before the meta gradient, meet the refusal first.

Each process writes what it saw to ``OUT/rank<N>.json`` (``OUT``, the first argument);
rank 0 prints "done" last.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

import torch_maml as tm
from tests.problems import make_mlp, mse_loss, regression_tasks, same, snapshot


def build(distributed: bool, step_size: tm.StepSizePolicy | None = None) -> Any:
    return tm.MetaOptimizer(
        make_mlp(0),
        mse_loss,
        inner_loop=tm.GradientDescent(steps=2, lr=0.1),
        estimator=tm.FiniteSum(),
        step_size=step_size or tm.Constant(0.1),
        distributed=distributed,
    )


def close(a: tm.MetaOptimizer[Any, Any], b: tm.MetaOptimizer[Any, Any]) -> bool:
    """The two models' weights agree to 1e-12 (the sums run in different orders)."""
    pairs = zip(snapshot(a.model).values(), snapshot(b.model).values(), strict=True)
    return all(float((p - q).abs().max()) <= 1e-12 * float(q.abs().max()) for p, q in pairs)


def error_of(call: Any) -> str:
    try:
        call()
    except (RuntimeError, ValueError) as error:
        return f"{type(error).__name__}: {error}"
    return "no error"


def main() -> None:
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    tasks = regression_tasks(3, torch.Generator().manual_seed(1))
    seen: dict[str, Any] = {"rank": rank}

    # 1. no task on rank 1
    meta_opt = build(distributed=True)
    meta_opt.step(tasks if rank == 0 else [])
    alone = build(distributed=False)
    alone.step(tasks)
    seen["empty shard equals one process"] = close(meta_opt, alone)

    # 2. rank 1's tasks refused
    before = snapshot(meta_opt.model)
    empty = tm.SupportQuery((tasks[0].support[0][:0], tasks[0].support[1][:0]), tasks[0].query)
    seen["refused"] = error_of(lambda: meta_opt.step(tasks if rank == 0 else [empty]))
    seen["refused changed nothing"] = same(snapshot(meta_opt.model), before)
    meta_opt.step(tasks[rank:])  # still paired: shards of 3 and 2 tasks
    alone.step(tasks + tasks[1:])
    seen["paired after refusal"] = close(meta_opt, alone)

    # 3. rank 1 resumes one step behind
    checkpoint = meta_opt.state_dict()
    meta_opt.step(tasks[rank:])
    if rank == 1:
        meta_opt.load_state_dict(checkpoint)
    before = snapshot(meta_opt.model)
    seen["stale checkpoint"] = error_of(lambda: meta_opt.step(tasks[rank:]))
    seen["stale changed nothing"] = same(snapshot(meta_opt.model), before)

    # 4. refused while the step size is estimated
    adaptive = tm.SmoothnessAdaptive.from_data(make_mlp(0), mse_loss, tasks, c_beta=80, every=1)
    meta_opt = build(distributed=True, step_size=adaptive)
    before = snapshot(meta_opt.model)
    seen["refused, adaptive"] = error_of(lambda: meta_opt.step(tasks if rank == 0 else [empty]))
    seen["refused, adaptive, changed nothing"] = same(snapshot(meta_opt.model), before)
    meta_opt.step(tasks[rank:])  # still paired
    seen["adaptive paired after refusal"] = not same(snapshot(meta_opt.model), before)

    (Path(sys.argv[1]) / f"rank{rank}.json").write_text(json.dumps(seen))
    dist.barrier()
    dist.destroy_process_group()
    if rank == 0:
        print("done")


if __name__ == "__main__":
    main()
