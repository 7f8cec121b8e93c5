"""How long ``compile=True`` takes to start: cold, and in a second process.

Each measurement is a fresh Python process that builds a ``MetaOptimizer(compile=True)``
on a workload of :mod:`benchmarks.workloads` and times its first steps: the first runs
eagerly (it checks the input), the second compiles, the third runs compiled code. The
processes share one compile cache folder (``TORCHINDUCTOR_CACHE_DIR``), empty for the
first ("cold") and kept for the next ("second process")::

    OMP_NUM_THREADS=1 python -m benchmarks.compile_time --workload sinusoid --steps 5

prints one line per process, and the torch version and thread count it ran with.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

import torch

from .impls import ESTIMATORS, meta_optimizer, stacked_tasks
from .workloads import WORKLOADS, setup


def measure(workload_name: str, steps: int, estimator: str, device: str) -> dict[str, float]:
    """Seconds of each of the first three steps of a compiled optimizer, in this process."""
    workload = WORKLOADS[workload_name]
    model, data = setup(workload, torch.float32, device)
    meta_opt = meta_optimizer(
        workload, model, steps, 1e-3, ESTIMATORS[estimator](), compile=True, capture=False
    )
    tasks = stacked_tasks(data)
    seconds: dict[str, float] = {}
    for name in ("eager first step", "compiling step", "compiled step"):
        start = time.perf_counter()
        meta_opt.step(tasks)
        if device == "cuda":
            torch.cuda.synchronize()
        seconds[name] = time.perf_counter() - start
    return seconds


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workload", default="sinusoid", choices=sorted(WORKLOADS))
    parser.add_argument("--steps", type=int, default=5, help="inner steps N (default 5)")
    parser.add_argument(
        "--estimator", default="FiniteSum", choices=sorted(ESTIMATORS), help="default FiniteSum"
    )
    parser.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    parser.add_argument(
        "--processes", type=int, default=2, help="processes sharing one cache (default 2)"
    )
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(measure(args.workload, args.steps, args.estimator, args.device)))
        return
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} thread(s), {args.device}, "
        f"{args.workload} N={args.steps} {args.estimator}"
    )
    with tempfile.TemporaryDirectory() as cache:
        environment = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": cache}
        for index in range(args.processes):
            child = [sys.executable, "-m", "benchmarks.compile_time", "--child"]
            options = ["--workload", args.workload, "--steps", str(args.steps)]
            options += ["--estimator", args.estimator, "--device", args.device]
            done = subprocess.run(
                child + options, env=environment, capture_output=True, text=True, check=True
            )
            seconds = json.loads(done.stdout.strip().splitlines()[-1])
            label = "cold cache   " if index == 0 else "second process"
            print(label + ": " + ", ".join(f"{k} {v:.2f} s" for k, v in seconds.items()))


if __name__ == "__main__":
    main()
