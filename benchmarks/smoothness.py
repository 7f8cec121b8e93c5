"""Time ``torch_maml.theory.estimate_smoothness``: batches vectorised, and one by one.

Usage::

    python -m benchmarks.smoothness               # 10 tasks, 1-32-32-1 tanh MLP, float64
    python -m benchmarks.smoothness --tasks 25 --repeats 5
    python -m benchmarks.smoothness --quick       # seconds

No other library estimates L, rho and b, so the comparison is between the two paths of
torch_maml's own estimator on the same tasks: batches whose tensors stack run together
under ``torch.func.vmap``; a batch with a non-tensor leaf (here an extra string the loss
ignores) cannot stack and runs alone. The table gives the median seconds of each, their
ratio, and how far apart the estimates are (they must agree; the one-by-one path is the
reference).
"""

from __future__ import annotations

import argparse
import math
import statistics
import time
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import torch_maml as tm


def make_tasks(count: int, seed: int) -> list[tm.SupportQuery[tuple[Tensor, Tensor]]]:
    """Sinusoid regression tasks, 10 support and 10 query points each, float64."""
    generator = torch.Generator().manual_seed(seed)
    tasks = []
    for _ in range(count):
        amplitude = 0.5 + 1.5 * torch.rand((), generator=generator, dtype=torch.float64)
        phase = math.pi * torch.rand((), generator=generator, dtype=torch.float64)
        x = 6 * torch.rand(20, 1, generator=generator, dtype=torch.float64) - 3
        y = amplitude * torch.sin(x + phase)
        tasks.append(tm.SupportQuery((x[:10], y[:10]), (x[10:], y[10:])))
    return tasks


def mse(model: nn.Module, batch: Any) -> Tensor:
    """Mean squared error; ignores any leaf after ``(x, y)``."""
    return F.mse_loss(model(batch[0]), batch[1])


def main(argv: list[str] | None = None) -> dict[str, float]:
    """Run the comparison; return the table's numbers."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="2 tasks, 20 iterations, 1 repeat")
    args = parser.parse_args(argv)
    count, repeats, iterations = (2, 1, 20) if args.quick else (args.tasks, args.repeats, 200)

    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(1, 32), nn.Tanh(), nn.Linear(32, 32), nn.Tanh(), nn.Linear(32, 1)
    ).double()
    together = make_tasks(count, seed=1)
    alone = [
        tm.SupportQuery((*t.support, f"s{i}"), (*t.query, f"q{i}")) for i, t in enumerate(together)
    ]
    seconds: dict[str, list[float]] = {"vectorised": [], "one by one": []}
    estimates = {}
    for _ in range(repeats):
        for name, tasks in (("vectorised", together), ("one by one", alone)):
            began = time.perf_counter()
            estimates[name] = tm.theory.estimate_smoothness(
                model, mse, tasks, iterations=iterations
            )
            seconds[name].append(time.perf_counter() - began)
    vectorised, one_by_one = estimates["vectorised"], estimates["one by one"]
    result = {
        "vectorised_s": statistics.median(seconds["vectorised"]),
        "one_by_one_s": statistics.median(seconds["one by one"]),
        "L_rel_diff": abs(vectorised.L - one_by_one.L) / one_by_one.L,
        "rho_rel_diff": abs(vectorised.rho - one_by_one.rho) / one_by_one.rho,
    }
    print(f"estimate_smoothness, {count} tasks (2 batches each), 1-32-32-1 tanh MLP, float64,")
    print(f"{iterations} iterations at most, median of {repeats}, torch {torch.__version__}")
    print("| path | seconds | L | rho |")
    print("|---|---:|---:|---:|")
    for name in ("one by one", "vectorised"):
        estimate = estimates[name]
        median = statistics.median(seconds[name])
        print(f"| {name} | {median:.2f} | {estimate.L:.10g} | {estimate.rho:.6g} |")
    print(
        f"speed-up {result['one_by_one_s'] / result['vectorised_s']:.2f}x; relative "
        f"difference L {result['L_rel_diff']:.1e}, rho {result['rho_rel_diff']:.1e}"
    )
    return result


if __name__ == "__main__":
    main()
