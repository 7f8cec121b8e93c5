"""Captured meta steps on a GPU: capture cost, replay time, and replay == eager, bitwise.

``python -m benchmarks.capture`` (on a CUDA machine; benchmarks/gpu.sh runs it): for each
workload and estimator, two optimizers from the same initialisation take the same
meta steps on fresh meta-batches, one eager (``capture=False``), one with the default
``capture="auto"``. Step 1 of the captured one runs eagerly, step 2 warms up, captures
and replays the CUDA graph (the capture cost), later steps replay it. It prints, per
row: the eager step's median, the capturing step's time, the replay's median (CUDA
events around the step, after a synchronisation), and whether the weights after all
steps are bitwise equal. Writes a markdown table to ``--out``.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

import torch_maml as tm

from .impls import ESTIMATORS, meta_optimizer, stacked_tasks
from .workloads import WORKLOADS, Workload, setup


def _batches(workload: Workload, count: int) -> list[tm.StackedTasks[tuple[Tensor, Tensor]]]:
    """``count`` fresh meta-batches on the GPU, float32."""
    batches = []
    for seed in range(count):
        data = workload.make_data(
            workload.tasks, torch.Generator().manual_seed(100 + seed), torch.float32
        )
        batches.append(stacked_tasks(tuple(t.cuda() for t in data)))  # type: ignore[arg-type]
    return batches


def _timed(optimizer: tm.MetaOptimizer[nn.Module, Any], tasks: Any) -> float:
    """One step, in milliseconds, the device's work included."""
    torch.cuda.synchronize()
    start = time.perf_counter()
    optimizer.step(tasks)
    torch.cuda.synchronize()
    return (time.perf_counter() - start) * 1e3


def measure(workload: Workload, estimator: str, steps: int, rounds: int) -> dict[str, Any]:
    """Eager and captured runs of ``rounds`` steps from one initialisation."""
    batches = _batches(workload, rounds)
    times: dict[str, list[float]] = {}
    weights = []
    captures = 0
    for capture in (False, "auto"):
        model, _ = setup(workload, torch.float32, "cuda")
        optimizer = meta_optimizer(
            workload, model, steps, 1e-3, ESTIMATORS[estimator](), capture=capture
        )
        times[str(capture)] = [_timed(optimizer, tasks) for tasks in batches]
        weights.append([p.detach().clone() for p in model.parameters()])
        captures = optimizer.cuda_graphs.captures
    equal = all(torch.equal(a, b) for a, b in zip(*weights, strict=True))
    eager, captured = times["False"], times["auto"]
    return {
        "workload": workload.name,
        "estimator": estimator,
        "N": steps,
        "eager ms": statistics.median(eager[1:]),
        "capture step ms": captured[1],
        "replay ms": statistics.median(captured[2:]),
        "graphs captured": captures,
        "bitwise equal": equal,
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description="Captured meta steps on a GPU: capture cost, replay time, replay == eager."
    )
    parser.add_argument(
        "--workloads",
        nargs="+",
        default=["sinusoid", "conv4"],
        help="workloads to run (default: sinusoid conv4)",
    )
    parser.add_argument(
        "--steps",
        nargs="+",
        type=int,
        default=[5, 10],
        help="inner steps N (default: 5 10; conv4 takes the first only)",
    )
    parser.add_argument("--rounds", type=int, default=30, help="meta steps per run (default 30)")
    parser.add_argument(
        "--out",
        type=Path,
        default=Path("benchmarks/results/capture.md"),
        help="where to write the markdown table",
    )
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("benchmarks.capture needs a CUDA device")
    rows = []
    for name in args.workloads:
        for steps in args.steps if name != "conv4" else args.steps[:1]:
            for estimator in ESTIMATORS:
                row = measure(WORKLOADS[name], estimator, steps, args.rounds)
                rows.append(row)
                print(
                    " | ".join(
                        f"{k}={v:.3f}" if isinstance(v, float) else f"{k}={v}"
                        for k, v in row.items()
                    ),
                    flush=True,
                )
    header = list(rows[0])
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        cells = [f"{row[k]:.2f}" if isinstance(row[k], float) else str(row[k]) for k in header]
        lines.append("| " + " | ".join(cells) + " |")
    device = torch.cuda.get_device_name()
    text = f"{device}, torch {torch.__version__}, float32\n\n" + "\n".join(lines) + "\n"
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
