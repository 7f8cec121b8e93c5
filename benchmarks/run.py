"""Time and measure one meta step of torch_maml and of other libraries, side by side.

Usage::

    python -m benchmarks.run                      # both suites: 25 minutes on a busy 2-core CPU
    python -m benchmarks.run --suite peers        # torch_maml against the other libraries
    python -m benchmarks.run --suite paths        # task_chunk_size "auto" against 1 and None
    python -m benchmarks.run --workloads sinusoid --steps 1 5 10 20
    python -m benchmarks.run --impls "torch_maml Exact" parallel-metalearn
    python -m benchmarks.run --quick              # a smoke run: small workloads, N=1, 2 rounds
    python -m benchmarks.run --device cuda        # on a GPU

Suites (``--workloads``, ``--steps`` and ``--impls`` replace a suite's own lists):

* ``peers``: sinusoid (B=25), N=5 and 20: torch_maml's ``FiniteSum`` and ``Exact``
  (default ``task_chunk_size="auto"``, eager) against parallel-metalearn, TorchOpt,
  higher, a plain torch.func loop and JAX (when installed).
* ``paths``: how torch_maml runs a meta-batch: ``task_chunk_size="auto"`` against one
  task at a time (``1``) and all tasks at once (``None``), for ``FiniteSum`` and
  ``Exact``, on a meta-batch of one task, the sinusoid MLP (B=25), a wide 1-640-640-1
  MLP (B=25) and conv4 (B=8), N=5. Each torch_maml row shows the chunk size the run
  used and the footprint that ``"auto"`` planned from.

Each implementation runs in a subprocess of its own, for each workload and number of
inner steps ``N``, to measure its first step (which includes any compilation) and the
peak memory of two more steps above what the process held before them (CPU: the
resident set's high-water mark, reset through ``/proc/self/clear_refs``, with glibc
told to map large blocks separately so that the resident set is the memory in use;
CUDA: the allocator's peak). Step times come from one more process that runs all the
implementations in turns, in a shuffled order, ``--repeats`` rounds, and reports the
medians of the wall time and of the process's CPU time: the same conditions for all.
Every process uses ``--threads`` threads (default 1). The
correctness column is the relative difference ``||g - g_ref|| / ||g_ref||`` (all
parameters as one vector) between the implementation's meta gradient and that of
torch_maml's ``Exact`` run one task at a time (``task_chunk_size=1``), in float64, on
the same weights and data. Results go to ``--out`` as JSON and Markdown.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import datetime
import gc
import hashlib
import importlib.metadata
import inspect
import json
import math
import os
import platform
import random
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, NamedTuple
from unittest import mock

import torch

from .impls import IMPLEMENTATIONS
from .workloads import WORKLOADS, setup

REFERENCE = "torch_maml Exact chunk=1"
"""The float64 meta gradient every implementation is compared with."""
PML = "parallel-metalearn"
JAX_CONV4_MAX_STEPS = 5
"""JAX's conv4 step unrolls tasks and steps inside jit: about 60 s to compile at N=5."""
BETA = 1e-3
REPEATS = {"conv4": 7, "mlp640": 15, "sinusoid-B1": 100}
"""Timed rounds per workload (others: 30), unless ``--repeats`` says."""


class Suite(NamedTuple):
    """A set of measurements reported as one table."""

    title: str
    workloads: tuple[str, ...]
    steps: tuple[int, ...]
    impls: tuple[str, ...]
    quick_workloads: tuple[str, ...]
    """``--quick`` runs these, at N=1."""


SUITES = {
    "peers": Suite(
        "torch_maml against the other libraries",
        ("sinusoid",),
        (5, 20),
        (
            "torch_maml FiniteSum",
            "torch_maml Exact",
            PML,
            "TorchOpt",
            "higher",
            "torch.func loop",
            "JAX",
        ),
        ("sinusoid",),
    ),
    "paths": Suite(
        'task_chunk_size: "auto" (default) against 1 (one task at a time) and None (all at once)',
        ("sinusoid-B1", "sinusoid", "mlp640", "conv4"),
        (5,),
        tuple(
            f"torch_maml {estimator}{chunk}"
            for estimator in ("FiniteSum", "Exact")
            for chunk in ("", " chunk=1", " chunk=None")
        ),
        ("sinusoid-B1", "sinusoid"),
    ),
}


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


def _jax_model(workload_name: str) -> str:
    """The JAX model of a workload: the MLPs of any width are jax_impl's "sinusoid"."""
    return "conv4" if workload_name == "conv4" else "sinusoid"


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
            _jax_model(workload_name), params, data, steps, workload.alpha, BETA, tasks=tasks
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


@contextlib.contextmanager
def _recorded_plans() -> Iterator[list[dict[str, Any]]]:
    """torch_maml's chunk plans made in the block: the planner's inputs and its answer."""
    from torch_maml import execution

    plans: list[dict[str, Any]] = []
    original = execution.plan_chunks
    with mock.patch.object(execution, "plan_chunks", wraps=original) as spy:
        yield plans
    signature = inspect.signature(original)
    for call in spy.call_args_list:
        plan = original(*call.args, **call.kwargs)
        bound = signature.bind(*call.args, **call.kwargs)
        bound.apply_defaults()
        arguments = bound.arguments
        plans.append(
            {
                "setting": arguments["setting"],
                "tasks": arguments["tasks"],
                "memory": arguments["memory"],
                "footprint": arguments["footprint"]._asdict(),
                "size": plan.size,
                "keep_graphs": plan.keep_graphs,
            }
        )


def _threads(count: int) -> None:
    torch.set_num_threads(count)


def worker(job: dict[str, Any]) -> dict[str, Any]:
    """One implementation, one workload and N: first step, peak memory, correctness."""
    _threads(job["threads"])
    name, workload_name, steps, device = job["impl"], job["workload"], job["steps"], job["device"]
    workload = WORKLOADS[workload_name]
    run = _make_runner(name, workload_name, steps, device)
    with _recorded_plans() as plans:
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
                _jax_model(workload_name), params64, data64, steps, workload.alpha
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
        "tasks": workload.tasks,
        "first_step_s": first,
        "peak_mib": peak,
        "rel_diff": float((actual - expected).norm() / expected.norm()),
        "plan": plans[0] if plans else None,
        "sources": code_hash(),
    }


def timer(job: dict[str, Any]) -> dict[str, dict[str, float]]:
    """Median step times of every implementation, timed in turns in one process.

    Round-robin timing in one process compares the implementations under the same
    conditions (separate processes on a shared 2-core machine differed by up to 30%);
    the order of the turns is shuffled every round, so that no implementation always
    follows the same one. Returns the medians of the wall time and of the process's
    CPU time, in ms, by implementation.
    """
    _threads(job["threads"])
    runners = {
        name: _make_runner(name, job["workload"], job["steps"], job["device"])
        for name in job["impls"]
    }
    for run in runners.values():
        run()  # warm up, compile
    wall: dict[str, list[float]] = {name: [] for name in runners}
    cpu: dict[str, list[float]] = {name: [] for name in runners}
    order = list(runners)
    shuffle = random.Random(0).shuffle
    for _ in range(job["repeats"]):
        shuffle(order)
        for name in order:
            start, start_cpu = time.perf_counter(), time.process_time()
            runners[name]()
            wall[name].append(time.perf_counter() - start)
            cpu[name].append(time.process_time() - start_cpu)
    return {
        name: {
            "median_ms": 1000 * statistics.median(wall[name]),
            "cpu_ms": 1000 * statistics.median(cpu[name]),
        }
        for name in runners
    }


def reference(job: dict[str, Any]) -> None:
    """Save the float64 meta gradient of torch_maml's Exact, one task at a time, on the CPU."""
    _threads(job["threads"])
    workload = WORKLOADS[job["workload"]]
    _, gradient = IMPLEMENTATIONS[REFERENCE]()
    model, data = setup(workload, torch.float64, "cpu")
    torch.save(gradient(workload, model, data, job["steps"]), job["reference"])


# ---------------------------------------------------------------- driver side


def _in_process(mode: str, job: dict[str, Any]) -> Any:
    """``mode`` run here: no process start-up, but no timeout and CPU peaks include history."""
    try:
        if mode == "reference":
            reference(job)
            return {}
        return worker(job) if mode == "worker" else timer(job)
    except Exception as error:  # report and go on with the other implementations
        print(f"  {job.get('impl', mode)}: failed: {error!r}", flush=True)
        return None


def _subprocess(mode: str, job: dict[str, Any], timeout: float) -> Any:
    command = [sys.executable, "-m", "benchmarks.run", f"--{mode}", json.dumps(job)]
    environment = dict(os.environ)
    threads = str(job["threads"])
    environment.update(OMP_NUM_THREADS=threads, MKL_NUM_THREADS=threads)
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


def code_hash() -> str:
    """A hash of the imported torch_maml's source files: which code was measured."""
    import torch_maml

    digest = hashlib.sha256()
    package = Path(torch_maml.__file__).resolve().parent
    for path in sorted(package.rglob("*.py")):
        digest.update(str(path.relative_to(package)).encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()[:12]


def _revision() -> str:
    """The repository's commit (if any), whether torch_maml/ differs from it, its hash."""
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--", "torch_maml"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        where = commit + (" + uncommitted changes" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        where = "outside git"
    return f"{where}, sources {code_hash()}"


def _environment(device: str, threads: int) -> dict[str, Any]:
    versions: dict[str, str] = {"torch": str(torch.__version__)}
    for package in ("parallel-metalearn", "higher", "torchopt", "jax"):
        try:
            versions[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            versions[package] = "not installed"
    return {
        "date": datetime.date.today().isoformat(),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, {platform.processor() or 'cpu'}",
        "device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
        "python": platform.python_version(),
        "torch threads": threads,
        "torch_maml": _revision(),
        **versions,
    }


def _chunk(result: dict[str, Any]) -> str:
    plan = result.get("plan")
    if not plan:
        return "-"
    # keep_graphs matters where an algorithm linearises steps one by one (FiniteSum)
    recomputed = plan.get("memory") == "steps" and not plan["keep_graphs"]
    return f"{plan['size']}" + (", steps recomputed" if recomputed else "")


def _ratio(numerator: float, denominator: float | None) -> str:
    return f"{numerator / denominator:.2f}" if denominator else "-"


def _time(result: dict[str, Any]) -> float:
    """The time the ratios divide: CPU time on the CPU, wall time on a GPU."""
    return float(result["cpu_ms"] if result["device"] == "cpu" else result["median_ms"])


def table(results: Sequence[dict[str, Any]]) -> str:
    """The results as Markdown: one row per workload, N and implementation.

    "median ms" is the median wall time of a step, "CPU ms" the median CPU time of the
    process during it. "÷ parallel-metalearn" divides the row's time by
    parallel-metalearn's; "auto ÷ best fixed" divides a ``task_chunk_size="auto"`` row
    by the faster of the same estimator with ``task_chunk_size=1`` and ``None``. On the
    CPU both divide CPU times, which other processes on the machine disturb less than
    wall times; on a GPU, wall times.
    """
    lines = [
        "| workload | B | N | implementation | chunk | median ms | CPU ms | ÷ parallel-metalearn "
        "| auto ÷ best fixed | first step s | peak MiB | rel. diff (float64) |",
        "|---|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    keyed: dict[tuple[str, int], dict[str, dict[str, Any]]] = {}
    for result in results:
        keyed.setdefault((result["workload"], result["steps"]), {})[result["impl"]] = result
    for (workload, steps), group in keyed.items():
        pml = _time(group[PML]) if PML in group else None
        for name, r in group.items():
            fixed = [
                group[f"{name} chunk={c}"] for c in ("1", "None") if f"{name} chunk={c}" in group
            ]
            best_fixed = min(_time(f) for f in fixed) if len(fixed) == 2 else None
            peak = "-" if math.isnan(r["peak_mib"]) else f"{r['peak_mib']:.0f}"
            lines.append(
                f"| {workload} | {WORKLOADS[workload].tasks} | {steps} | {name} | {_chunk(r)} "
                f"| {r['median_ms']:.1f} | {r['cpu_ms']:.1f} | {_ratio(_time(r), pml)} "
                f"| {_ratio(_time(r), best_fixed)} | {r['first_step_s']:.1f} | {peak} "
                f"| {r['rel_diff']:.1e} |"
            )
    return "\n".join(lines)


def _kib(count: int) -> str:
    return f"{count / 1024:.0f} KiB" if count < 2**20 else f"{count / 2**20:.1f} MiB"


def footprints(results: Sequence[dict[str, Any]]) -> str:
    """What ``task_chunk_size="auto"`` planned from, per workload and N (from its rows)."""
    lines = []
    seen = set()
    for r in results:
        plan = r.get("plan")
        if not plan or plan["setting"] != "auto" or (r["workload"], r["steps"]) in seen:
            continue
        seen.add((r["workload"], r["steps"]))
        f = plan["footprint"]
        chosen = ", ".join(
            f"{o['impl'].removeprefix('torch_maml ')} {_chunk(o)}"
            for o in results
            if (o["workload"], o["steps"]) == (r["workload"], r["steps"])
            and o.get("plan")
            and o["plan"]["setting"] == "auto"
        )
        lines.append(
            f"- {r['workload']} (B={r['tasks']}), N={r['steps']}: activations a = "
            f"{_kib(f['activations'])}, parameters p = {_kib(f['parameters'])} per task "
            f"(a + p {'above' if f['activations'] + f['parameters'] > 2**20 else 'within'} "
            f"1 MiB), lean {_kib(f['lean'])}, kept {_kib(f['kept'])}; auto chose: {chosen}"
        )
    return "\n".join(lines)


def _runs(impl: str, workload: str, steps: int) -> bool:
    if impl == "JAX" and workload == "conv4" and steps > JAX_CONV4_MAX_STEPS:
        print(f"  JAX: left out (N > {JAX_CONV4_MAX_STEPS}: its unrolled jit compiles for minutes)")
        return False
    return True


def _summary(r: dict[str, Any]) -> str:
    return (
        f"{r['impl']}: {r['median_ms']:.1f} ms (CPU {r['cpu_ms']:.1f}), {r['peak_mib']:.0f} MiB, "
        f"first {r['first_step_s']:.1f} s, diff {r['rel_diff']:.1e}, chunk {_chunk(r)}"
    )


def _suites(args: argparse.Namespace) -> dict[str, Suite]:
    """The selected suites, with the command line's workloads, steps and impls in place."""
    selected = {}
    for name in args.suite:
        suite = SUITES[name]
        if args.quick:
            suite = suite._replace(workloads=suite.quick_workloads, steps=(1,))
        if args.workloads:
            suite = suite._replace(workloads=tuple(args.workloads))
        if args.steps:
            suite = suite._replace(steps=tuple(args.steps))
        impls = args.impls or suite.impls
        if args.device == "cpu" and not args.impls:
            impls = [i for i in impls if "CUDA" not in i]
        if "JAX" in impls and _jax_factories() is None:
            impls = [i for i in impls if i != "JAX"]
        selected[name] = suite._replace(impls=tuple(impls))
    return selected


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument(
        "--suite", nargs="+", default=list(SUITES), choices=list(SUITES), help="default: all"
    )
    parser.add_argument(
        "--workloads",
        nargs="+",
        choices=list(WORKLOADS),
        metavar="NAME",
        help="instead of each suite's: " + ", ".join(WORKLOADS),
    )
    parser.add_argument("--steps", nargs="+", type=int, help="instead of each suite's N")
    implementations = [*IMPLEMENTATIONS, "JAX"]
    parser.add_argument(
        "--impls",
        nargs="+",
        choices=implementations,
        metavar="NAME",
        help="instead of each suite's: " + ", ".join(f'"{i}"' for i in implementations),
    )
    parser.add_argument(
        "--repeats",
        type=int,
        default=None,
        help="timed rounds (default: 30, sinusoid-B1 100, mlp640 15, conv4 7)",
    )
    parser.add_argument("--threads", type=int, default=1, help="torch threads per process")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--timeout", type=float, default=900.0, help="seconds per measurement")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    parser.add_argument(
        "--quick", action="store_true", help="N=1, 2 rounds, small workloads: a smoke run"
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
    suites = _suites(args)
    if "JAX" in (args.impls or []) and _jax_factories() is None:
        print("JAX is not installed: leaving it out", flush=True)
    if args.in_process:
        _threads(args.threads)

    def measure(mode: str, job: dict[str, Any]) -> Any:
        job = {**job, "threads": args.threads, "device": args.device}
        if args.in_process:
            return _in_process(mode, job)
        return _subprocess(mode, job, args.timeout)

    # Each workload and N is measured once, with every implementation a suite asks for.
    cases: dict[tuple[str, int], list[str]] = {}
    for suite in suites.values():
        for workload in suite.workloads:
            for steps in suite.steps:
                impls = cases.setdefault((workload, steps), [])
                impls += [i for i in suite.impls if i not in impls]

    environment = _environment(args.device, args.threads)
    print(json.dumps(environment), flush=True)
    results: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as scratch:
        for (workload, steps), names in cases.items():
            ref = str(Path(scratch) / f"{workload}-{steps}.pt")
            job: dict[str, Any] = {"workload": workload, "steps": steps, "reference": ref}
            if measure("reference", job) is None:
                continue
            print(f"{workload} (B={WORKLOADS[workload].tasks}), N={steps}:", flush=True)
            measured = {}
            for impl in [i for i in names if _runs(i, workload, steps)]:
                result = measure("worker", {**job, "impl": impl})
                if result is not None:
                    if result["sources"] not in environment["torch_maml"]:
                        print(f"  {impl}: torch_maml's sources changed during the run", flush=True)
                    measured[impl] = result
                    print(f"  {impl}: first step {result['first_step_s']:.1f} s", flush=True)
            repeats = args.repeats or (2 if args.quick else REPEATS.get(workload, 30))
            timing = {**job, "impls": list(measured), "repeats": repeats}
            medians = measure("timer", timing)
            for impl, result in measured.items():
                if medians is not None:
                    result.update(medians[impl])
                    print(f"  {_summary(result)}", flush=True)
                    results.append(result)
            _write(args.out, args.device, environment, suites, results)  # what is done so far
    print(_markdown(environment, suites, results))
    return results


def _markdown(
    environment: dict[str, Any], suites: dict[str, Suite], results: list[dict[str, Any]]
) -> str:
    parts = ["\n".join(f"- {k}: {v}" for k, v in environment.items())]
    for name, suite in suites.items():
        rows = [
            r
            for r in results
            if r["workload"] in suite.workloads
            and r["steps"] in suite.steps
            and r["impl"] in suite.impls
        ]
        if not rows:
            continue
        parts.append(f"## {name}: {suite.title}\n\n{table(rows)}")
        plans = footprints(rows)
        if plans:
            parts.append(f'What task_chunk_size="auto" planned from:\n\n{plans}')
    worst: dict[str, float] = {}
    for r in results:
        worst[r["impl"]] = max(worst.get(r["impl"], 0.0), r["rel_diff"])
    parts.append(
        f"Largest relative difference from {REFERENCE} (float64), over all rows:\n\n"
        + "\n".join(f"- {impl}: {diff:.1e}" for impl, diff in worst.items())
    )
    return "\n\n".join(parts) + "\n"


def _write(
    out: Path,
    device: str,
    environment: dict[str, Any],
    suites: dict[str, Suite],
    results: list[Any],
) -> None:
    out.mkdir(parents=True, exist_ok=True)
    stamp = f"{environment['date']}-{device}"
    suite_info = {name: suite._asdict() for name, suite in suites.items()}
    (out / f"{stamp}.json").write_text(
        json.dumps({"environment": environment, "suites": suite_info, "results": results}, indent=1)
    )
    (out / f"{stamp}.md").write_text(_markdown(environment, suites, results))


if __name__ == "__main__":
    main()
