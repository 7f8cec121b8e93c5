"""Time and measure one meta step of every implementation, side by side, in one run.

Usage::

    python -m benchmarks.run                          # everything: about 25 minutes on 2 cores
    python -m benchmarks.run --workloads sinusoid --steps 5 10
    python -m benchmarks.run --quick                  # a smoke run of seconds
    python -m benchmarks.run --device cuda            # on a GPU

Each implementation runs in a subprocess of its own, for each workload and number of
inner steps ``N``, to measure its first step (which includes any compilation) and the
peak memory of two more steps above what the process held before them (CPU: the
resident set's high-water mark, reset through ``/proc/self/clear_refs``, with glibc
told to map large blocks separately so that the resident set is the memory in use;
CUDA: the allocator's peak). Step times
come from one more process that runs all the implementations in turns, ``--repeats``
rounds, and reports medians: the same conditions for all. The correctness
column is the relative difference ``||g - g_ref|| / ||g_ref||`` (all parameters as one
vector) between the implementation's meta gradient and torch_maml's ``Exact`` in
float64, on the same weights and data. Results go to ``--out`` as JSON and Markdown.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import datetime
import gc
import importlib.metadata
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from .impls import IMPLEMENTATIONS
from .workloads import WORKLOADS, setup

PEERS = ("higher", "TorchOpt")
JAX_CONV4_MAX_STEPS = 5
"""JAX's conv4 step unrolls tasks and steps inside jit: about 60 s to compile at N=5."""
BETA = 1e-3


# ---------------------------------------------------------------- worker side


def _status_kib(key: str) -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(key):
                return int(line.split()[1])
    raise KeyError(key)


class _Memory:
    """Peak memory of a stretch of code above what was held at its start, in MiB."""

    def __init__(self, device: str) -> None:
        self.device = device

    def start(self) -> None:
        if self.device == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.before = torch.cuda.memory_allocated()
        else:
            with open("/proc/self/clear_refs", "w") as clear:
                clear.write("5")  # resets VmHWM to the current resident set
            self.before = _status_kib("VmRSS") * 1024

    def peak_mib(self) -> float:
        if self.device == "cuda":
            return (torch.cuda.max_memory_allocated() - self.before) / 2**20
        return (_status_kib("VmHWM") * 1024 - self.before) / 2**20


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def _jax_factories() -> Any:
    from . import jax_impl

    return jax_impl if jax_impl.available() else None


def _numpy_setup(workload_name: str, dtype: torch.dtype) -> tuple[dict[str, Any], tuple[Any, ...]]:
    model, data = setup(WORKLOADS[workload_name], dtype, "cpu")
    params = {n: p.detach().numpy() for n, p in model.named_parameters()}
    return params, tuple(t.numpy() for t in data)


def _make_runner(name: str, workload_name: str, steps: int, device: str) -> Any:
    """A callable that takes one meta step of ``name`` and waits for it to finish."""
    workload = WORKLOADS[workload_name]
    if name == "JAX":
        jax_impl = _jax_factories()
        params, data = _numpy_setup(workload_name, torch.float32)
        # vmap turns conv4's per-task convolutions into grouped ones, which XLA:CPU runs
        # about 8x slower than a loop over the tasks inside jit; sinusoid is the reverse.
        tasks = "unroll" if workload_name == "conv4" and device == "cpu" else "vmap"
        return jax_impl.make_step(
            workload_name, params, data, steps, workload.alpha, BETA, tasks=tasks
        )
    make_step, _ = IMPLEMENTATIONS[name]()
    model, data = setup(workload, torch.float32, device)
    step = make_step(workload, model, data, steps, BETA)

    def run() -> None:
        step()
        _sync(device)

    return run


def _release_freed_memory() -> None:
    """Hand freed heap memory back to the OS, so the resident set is what is in use."""
    gc.collect()
    with contextlib.suppress(OSError):  # not glibc: the peak also counts memory kept for reuse
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def worker(job: dict[str, Any]) -> dict[str, Any]:
    """One implementation, one workload and N: first step, peak memory, correctness."""
    name, workload_name, steps, device = job["impl"], job["workload"], job["steps"], job["device"]
    workload = WORKLOADS[workload_name]
    run = _make_runner(name, workload_name, steps, device)
    start = time.perf_counter()
    run()  # includes any compilation
    first = time.perf_counter() - start
    _release_freed_memory()
    memory = _Memory(device)
    memory.start()
    for _ in range(2):
        run()
    # JAX allocates outside torch's allocator: on CUDA its peak is not measured here.
    peak = float("nan") if name == "JAX" and device == "cuda" else memory.peak_mib()

    if name == "JAX":
        jax_impl = _jax_factories()
        params64, data64 = _numpy_setup(workload_name, torch.float64)
        grads = {
            n: torch.from_numpy(g)
            for n, g in jax_impl.meta_gradient(
                workload_name, params64, data64, steps, workload.alpha
            ).items()
        }
    else:
        _, gradient = IMPLEMENTATIONS[name]()
        model64, data64 = setup(workload, torch.float64, device)
        grads = gradient(workload, model64, data64, steps)
    reference = torch.load(job["reference"], weights_only=True)
    # One relative error over all parameters together: per parameter it is ill-defined
    # for conv4's convolution biases, whose meta gradient is zero up to rounding (the
    # batch normalisation after each convolution subtracts its bias right back out).
    actual = torch.cat([grads[n].to(reference[n]).reshape(-1) for n in reference])
    expected = torch.cat([reference[n].reshape(-1) for n in reference])
    return {
        **{k: job[k] for k in ("impl", "workload", "steps", "device")},
        "first_step_s": first,
        "peak_mib": peak,
        "rel_diff": float((actual - expected).norm() / expected.norm()),
    }


def timer(job: dict[str, Any]) -> dict[str, float]:
    """Median step time of every implementation, timed in turns in one process.

    Round-robin timing in one process compares the implementations under the same
    conditions; separate processes on a shared 2-core machine differed by up to 30%.
    """
    runners = {
        name: _make_runner(name, job["workload"], job["steps"], job["device"])
        for name in job["impls"]
    }
    for run in runners.values():
        run()  # warm up, compile
    times: dict[str, list[float]] = {name: [] for name in runners}
    for _ in range(job["repeats"]):
        for name, run in runners.items():
            start = time.perf_counter()
            run()
            times[name].append(time.perf_counter() - start)
    return {name: 1000 * statistics.median(ts) for name, ts in times.items()}


def reference(job: dict[str, Any]) -> None:
    """Save torch_maml Exact's float64 meta gradient for a workload and N."""
    workload = WORKLOADS[job["workload"]]
    _, gradient = IMPLEMENTATIONS["torch_maml Exact"]()
    model, data = setup(workload, torch.float64, "cpu")
    torch.save(gradient(workload, model, data, job["steps"]), job["reference"])


# ---------------------------------------------------------------- driver side


def _in_process(mode: str, job: dict[str, Any]) -> dict[str, Any] | None:
    """``mode`` run here: no process start-up, but no timeout and CPU peaks include history."""
    try:
        if mode == "reference":
            reference(job)
            return {}
        return worker(job) if mode == "worker" else timer(job)
    except Exception as error:  # report and go on with the other implementations
        print(f"  {job.get('impl', mode)}: failed: {error!r}", flush=True)
        return None


def _subprocess(mode: str, job: dict[str, Any], timeout: float) -> dict[str, Any] | None:
    command = [sys.executable, "-m", "benchmarks.run", f"--{mode}", json.dumps(job)]
    environment = dict(os.environ)
    if mode == "worker":
        # glibc then maps every block of 64 KiB or more separately and unmaps it when
        # freed, so the resident set tracks the memory in use, not the heap's high tide
        # (measured on conv4: 24 MiB live against 53 MiB of heap for the same step).
        environment["MALLOC_MMAP_THRESHOLD_"] = str(64 * 1024)
    # JAX would otherwise take most of the GPU's memory, leaving little to torch.
    environment.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
    try:
        done = subprocess.run(
            command, capture_output=True, text=True, timeout=timeout, check=False, env=environment
        )
    except subprocess.TimeoutExpired:
        print(f"  {job.get('impl', mode)}: timed out after {timeout:.0f} s", flush=True)
        return None
    if done.returncode != 0:
        tail = (done.stderr or done.stdout).strip().splitlines()[-3:]
        print(f"  {job.get('impl', mode)}: failed: {' | '.join(tail)}", flush=True)
        return None
    lines = done.stdout.strip().splitlines()
    return json.loads(lines[-1]) if mode in ("worker", "timer") else {}


def _environment(device: str) -> dict[str, Any]:
    versions: dict[str, str] = {"torch": str(torch.__version__)}
    for package in ("higher", "torchopt", "jax"):
        try:
            versions[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            versions[package] = "not installed"
    return {
        "date": datetime.date.today().isoformat(),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, {platform.processor() or 'cpu'}",
        "device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
        "python": platform.python_version(),
        "torch threads": torch.get_num_threads(),
        **versions,
    }


def table(results: list[dict[str, Any]]) -> str:
    """The results as Markdown: one row per workload, N and implementation."""
    lines = [
        "| workload | N | implementation | median ms | x faster than best peer | first step s "
        "| peak MiB | rel. diff (float64) |",
        "|---|---:|---|---:|---:|---:|---:|---:|",
    ]
    keyed: dict[tuple[str, int], list[dict[str, Any]]] = {}
    for result in results:
        keyed.setdefault((result["workload"], result["steps"]), []).append(result)
    for (workload, steps), group in keyed.items():
        peers = [r["median_ms"] for r in group if r["impl"] in PEERS]
        best_peer = min(peers) if peers else None
        for r in group:
            speedup = f"{best_peer / r['median_ms']:.1f}" if best_peer else "-"
            peak = "-" if math.isnan(r["peak_mib"]) else f"{r['peak_mib']:.0f}"
            lines.append(
                f"| {workload} | {steps} | {r['impl']} | {r['median_ms']:.1f} | {speedup} "
                f"| {r['first_step_s']:.1f} | {peak} | {r['rel_diff']:.1e} |"
            )
    return "\n".join(lines)


def _runs(impl: str, workload: str, steps: int) -> bool:
    if impl == "JAX" and workload == "conv4" and steps > JAX_CONV4_MAX_STEPS:
        print(f"  JAX: left out (N > {JAX_CONV4_MAX_STEPS}: its unrolled jit compiles for minutes)")
        return False
    return True


def _summary(r: dict[str, Any]) -> str:
    return (
        f"{r['impl']}: {r['median_ms']:.1f} ms, {r['peak_mib']:.0f} MiB, "
        f"first {r['first_step_s']:.1f} s, diff {r['rel_diff']:.1e}"
    )


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workloads", nargs="+", default=list(WORKLOADS), choices=list(WORKLOADS))
    parser.add_argument("--steps", nargs="+", type=int, default=[1, 5, 10, 20])
    implementations = [*IMPLEMENTATIONS, "JAX"]
    parser.add_argument("--impls", nargs="+", default=implementations, choices=implementations)
    parser.add_argument(
        "--repeats", type=int, default=None, help="timed rounds (default: 30, conv4 7)"
    )
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--timeout", type=float, default=900.0, help="seconds per measurement")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    parser.add_argument(
        "--quick", action="store_true", help="sinusoid, N=1, 2 repeats: a smoke run"
    )
    parser.add_argument(
        "--in-process",
        action="store_true",
        help="measure in this process (where starting processes is slow, as on some GPU "
        "machines): no --timeout, and CPU memory peaks are not comparable",
    )
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--timer", help=argparse.SUPPRESS)
    parser.add_argument("--reference", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.worker:
        print(json.dumps(worker(json.loads(args.worker))))
        return []
    if args.timer:
        print(json.dumps(timer(json.loads(args.timer))))
        return []
    if args.reference:
        reference(json.loads(args.reference))
        return []
    if args.device == "cpu" and "--impls" not in (argv if argv is not None else sys.argv):
        args.impls = [i for i in args.impls if "CUDA" not in i]
    if args.quick:
        args.workloads, args.steps, args.repeats = ["sinusoid"], [1], 2
    if "JAX" in args.impls and _jax_factories() is None:
        print("JAX is not installed: leaving it out", flush=True)
        args.impls = [i for i in args.impls if i != "JAX"]

    def measure(mode: str, job: dict[str, Any]) -> dict[str, Any] | None:
        if args.in_process:
            return _in_process(mode, job)
        return _subprocess(mode, job, args.timeout)

    environment = _environment(args.device)
    print(json.dumps(environment), flush=True)
    results = []
    with tempfile.TemporaryDirectory() as scratch:
        for workload in args.workloads:
            repeats = args.repeats or (7 if workload == "conv4" else 30)
            for steps in args.steps:
                ref = str(Path(scratch) / f"{workload}-{steps}.pt")
                job = {"workload": workload, "steps": steps, "reference": ref}
                if measure("reference", job) is None:
                    continue
                print(f"{workload}, N={steps}:", flush=True)
                impls = [i for i in args.impls if _runs(i, workload, steps)]
                measured = {}
                for impl in impls:
                    job = {
                        "impl": impl,
                        "workload": workload,
                        "steps": steps,
                        "device": args.device,
                        "reference": ref,
                    }
                    result = measure("worker", job)
                    if result is not None:
                        measured[impl] = result
                        print(f"  {impl}: first step {result['first_step_s']:.1f} s", flush=True)
                timing = {
                    "workload": workload,
                    "steps": steps,
                    "device": args.device,
                    "impls": list(measured),
                    "repeats": repeats,
                }
                medians = measure("timer", timing)
                for impl, result in measured.items():
                    if medians is not None:
                        result["median_ms"] = medians[impl]
                        print(f"  {_summary(result)}", flush=True)
                        results.append(result)
                _write(args.out, environment, args.device, results)  # what is done so far
    print(table(results))
    return results


def _write(out: Path, environment: dict[str, Any], device: str, results: list[Any]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    stamp = f"{environment['date']}-{device}"
    (out / f"{stamp}.json").write_text(
        json.dumps({"environment": environment, "results": results}, indent=1)
    )
    header = "\n".join(f"- {k}: {v}" for k, v in environment.items())
    (out / f"{stamp}.md").write_text(f"{header}\n\n{table(results)}\n")


if __name__ == "__main__":
    main()
