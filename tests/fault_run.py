"""A small meta-training run that checkpoints after every step, for tests/test_faults.py.

Run from the repository root::

    python -m tests.fault_run --checkpoint PATH --steps M [--resume] [--sleep S]

It meta-trains a float64 MLP on sinusoid sampler tasks with every piece of state a real
run has: the model's weights, the MetaOptimizer (whose generator draws the Resampled
estimator's batches), an outer Adam taking the step through ``meta_backward``, a StepLR
schedule on Adam, and a generator of the script's own that picks each step's tasks.
After step ``k`` it writes all of them atomically to PATH (``PATH.tmp``, then
``os.replace``), prints ``step k`` and, with ``--sleep``, sleeps, so that a parent can
kill it between checkpoints. ``--resume`` continues from PATH if it exists. At the end
it saves the model's ``state_dict`` to ``PATH.final`` and prints ``done``.

``--forget-meta-state`` resumes without restoring the MetaOptimizer's state: a broken
resume, which the tests use to show that they can fail.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import torch_maml as tm

POOL = 6
"""Sinusoid tasks in the pool."""
META_BATCH = 3
"""Tasks drawn from the pool for each meta step."""
SEED = 0


class Sinusoid:
    """A sampler task: fresh points of ``amplitude * sin(x + phase)`` on every call."""

    def __init__(self, amplitude: float, phase: float) -> None:
        self.amplitude, self.phase = amplitude, phase

    def sample(self, size: int, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
        x = 4 * torch.rand(size, 1, generator=generator, dtype=torch.float64) - 2
        return x, self.amplitude * torch.sin(x + self.phase)


def mse_loss(model: nn.Module, batch: tuple[Tensor, Tensor]) -> Tensor:
    x, y = batch
    return F.mse_loss(model(x), y)


def parse(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m tests.fault_run", description=__doc__)
    parser.add_argument("--checkpoint", required=True, help="checkpoint path")
    parser.add_argument("--steps", type=int, required=True, help="total meta steps M")
    parser.add_argument("--resume", action="store_true", help="continue from the checkpoint")
    parser.add_argument("--sleep", type=float, default=0.0, help="seconds after each checkpoint")
    parser.add_argument(
        "--forget-meta-state",
        action="store_true",
        help="on --resume, do not restore the MetaOptimizer's state (a broken resume)",
    )
    return parser.parse_args(argv)


def save_atomically(obj: object, path: str) -> None:
    tmp = path + ".tmp"
    torch.save(obj, tmp)
    os.replace(tmp, path)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse(argv)
    torch.set_num_threads(1)
    torch.manual_seed(SEED)

    model = nn.Sequential(nn.Linear(1, 16), nn.Tanh(), nn.Linear(16, 1)).double()
    # No generator given: the MetaOptimizer seeds its own from torch's global RNG.
    meta_opt = tm.MetaOptimizer(
        model,
        mse_loss,
        inner_loop=tm.GradientDescent(steps=2, lr=0.05),
        estimator=tm.Resampled(inner_size=5, hessian_size=5, outer_size=10),
        step_size=tm.Constant(1.0),
    )
    adam = torch.optim.Adam(model.parameters(), lr=0.02)
    # Its period does not divide the tests' kill step (3 or 4), so a resume that lost the
    # scheduler's state would halve Adam's lr at other steps.
    scheduler = torch.optim.lr_scheduler.StepLR(adam, step_size=5, gamma=0.5)
    data = torch.Generator().manual_seed(SEED + 1)
    pool = [Sinusoid(0.5 + 0.4 * i, 0.5 * i) for i in range(POOL)]

    start = 0
    if args.resume and os.path.exists(args.checkpoint):
        state: dict[str, Any] = torch.load(args.checkpoint, weights_only=True)
        model.load_state_dict(state["model"])
        if not args.forget_meta_state:
            meta_opt.load_state_dict(state["meta_opt"])
        adam.load_state_dict(state["adam"])
        scheduler.load_state_dict(state["scheduler"])
        data.set_state(state["data_generator"])
        start = int(state["step"])

    for step in range(start + 1, args.steps + 1):
        picked = torch.randperm(POOL, generator=data)[:META_BATCH].tolist()
        tasks = [pool[i] for i in picked]
        meta_opt.meta_backward(tasks)
        adam.step()
        adam.zero_grad()
        scheduler.step()
        save_atomically(
            {
                "step": step,
                "model": model.state_dict(),
                "meta_opt": meta_opt.state_dict(),
                "adam": adam.state_dict(),
                "scheduler": scheduler.state_dict(),
                "data_generator": data.get_state(),
            },
            args.checkpoint,
        )
        print(f"step {step}", flush=True)
        if args.sleep > 0:
            time.sleep(args.sleep)

    save_atomically(model.state_dict(), args.checkpoint + ".final")
    print("done", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
