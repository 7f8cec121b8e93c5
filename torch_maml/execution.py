"""How a per-task algorithm runs over a meta-batch: the one place that decides.

:class:`Executor` takes an algorithm written for one task (see :mod:`torch_maml.ops`)
and a meta-batch's data, and returns the mean result. It decides, and nothing else
does:

* **stacking**: tasks whose batches have equal shapes are stacked along a leading
  task dimension (a :class:`~torch_maml.StackedTasks` meta-batch already is);
* **chunking**: how many tasks run at once (:func:`plan_chunks`), and whether each
  inner step's graph is kept for the backward pass or recomputed, to bound memory;
* **vectorising**: a chunk of several tasks runs once, vectorised (the loss
  evaluated with ``torch.func.vmap``, derivatives by autograd); a chunk of one runs
  on plain tensors. If a model cannot be vectorised (a forward pass that writes a
  buffer in place, data-dependent Python control flow...), its tasks run one by one
  from then on, after one :class:`~torch_maml.VectorizationWarning` with the reason;
  an error that the one-by-one run raises too is raised as it is;
* **compiling** (``compile=True``): each chunk's computation is one function compiled
  by ``torch.compile``, cached per algorithm and shapes; if it does not compile, it
  runs eagerly after one :class:`~torch_maml.CompileWarning`.

Memory. ``"auto"`` chunks estimate, once per shape, the activation memory ``a`` one
task's loss saves for backward and the adapted parameters' size ``p``
(:func:`estimate_task_bytes`): a task's working set is ``lean = 3a + (N + 2) p``
(one step's forward, backward and double-backward graphs, and the iterates) or
``kept = (2N + 3) a + (N + 2) p`` (every step's graph, as autograd through the
unrolled loop keeps). A chunk may use ``max(4 lean, 256 MiB)``, or on a GPU up to an
eighth of its memory if that is more: the whole meta-batch at once with every step's
graph kept if that fits, else as many tasks as fit with steps recomputed. On the CPU,
tasks of more than 1 MiB (activations and parameters) run one by one: they are
compute-bound, and vectorising them only costs memory.
"""

from __future__ import annotations

import contextlib
import itertools
import types
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any, Literal, NamedTuple, TypeAlias, TypeVar

import torch
from torch import Tensor
from torch.func import vmap
from torch.nn.attention import SDPBackend, sdpa_kernel

from . import trees
from .checks import positive_int
from .errors import CaptureWarning, CompileWarning, VectorizationWarning, warn_user
from .inner import InnerLoop
from .model import TaskLoss, batch_norm_by_formula
from .ops import FunctionalOps, HostSyncError, MetaGradient, Ops
from .tasks import (
    MetaBatchData,
    StackedTaskData,
    StackedTasks,
    SupportQuery,
    Task,
    TaskData,
    stack_batches,
)
from .typing import Batch, Params

__all__ = [
    "AUTO_CHUNK_BYTES",
    "AUTO_CHUNK_FACTOR",
    "AUTO_CPU_TASK_BYTES",
    "AUTO_DEVICE_SHARE",
    "CAPTURE_BOUND",
    "Algorithm",
    "CaptureSetting",
    "ChunkPlan",
    "ChunkSize",
    "Executor",
    "HostSyncError",
    "Inputs",
    "Memory",
    "StepCapture",
    "TaskFootprint",
    "check_capture",
    "check_chunk_size",
    "chunk_sizes",
    "estimate_task_bytes",
    "math_attention",
    "no_host_sync",
    "plan_chunks",
    "stack_task_data",
    "take",
    "task_layout",
]

Algorithm: TypeAlias = Callable[[Ops, Params, TaskData], MetaGradient]
"""``(ops, w, data) -> MetaGradient``: a meta-gradient algorithm for one task."""

ChunkSize: TypeAlias = int | Literal["auto"] | None
"""Tasks vectorised at once: a number, ``"auto"`` (memory-bounded), or ``None`` (all)."""

Memory: TypeAlias = Literal["steps", "unrolled"]
"""What an algorithm keeps for its backward pass: step by step, or the unrolled loop."""

AUTO_CHUNK_FACTOR = 4
"""``"auto"`` lets a chunk use this many times the per-task working set..."""
AUTO_CHUNK_BYTES = 256 * 2**20
"""...or this many bytes, whichever is more."""
AUTO_CPU_TASK_BYTES = 2**20
"""On the CPU, tasks of more bytes than this (activations and parameters) run one by one."""
AUTO_DEVICE_SHARE = 8
"""On a GPU, ``"auto"`` also lets a chunk use up to 1/8 of the device's memory."""


def check_chunk_size(value: object) -> ChunkSize:
    """Return ``value`` if it is a valid ``task_chunk_size``, else raise naming it."""
    if value is None or value == "auto":
        return value
    if isinstance(value, str):
        raise ValueError(
            f"'task_chunk_size' must be a positive int, 'auto' or None (got {value!r})"
        )
    return positive_int("task_chunk_size", value)


# ---------------------------------------------------------------- stacking


def take(data: TaskData, index: int | slice) -> TaskData:
    """Task ``index`` (or a slice of tasks) of stacked task data.

    A batch used at several positions is sliced once, and stays one object.
    """
    memo: dict[int, Batch] = {}

    def one(batch: Batch) -> Batch:
        if id(batch) not in memo:
            memo[id(batch)] = trees.unflatten(
                [leaf[index] for leaf in trees.leaves(batch)], trees.flatten(batch)[1]
            )
        return memo[id(batch)]

    return TaskData([one(b) for b in data.inner], [one(b) for b in data.hessian], one(data.outer))


def stack_task_data(items: Sequence[TaskData]) -> TaskData | None:
    """The data of several tasks stacked along a new leading dimension, or None.

    None when their batches differ in structure, shape, dtype or device. A batch
    used at several positions (a support set at every inner step) is stacked once,
    and stays one object.
    """
    memo: dict[tuple[int, ...], Batch | None] = {}

    def column(batches: Sequence[Batch]) -> Batch | None:
        key = tuple(id(batch) for batch in batches)
        if key not in memo:
            memo[key] = stack_batches(batches)
        return memo[key]

    first = items[0]
    if any(
        len(item.inner) != len(first.inner) or len(item.hessian) != len(first.hessian)
        for item in items
    ):
        return None
    inner = [column([item.inner[j] for item in items]) for j in range(len(first.inner))]
    hessian = [column([item.hessian[j] for item in items]) for j in range(len(first.hessian))]
    outer = column([item.outer for item in items])
    if outer is None or any(batch is None for batch in (*inner, *hessian)):
        return None
    return TaskData(inner, hessian, outer)


# ---------------------------------------------------------------- memory and chunks


class TaskFootprint(NamedTuple):
    """What one task's meta gradient costs in memory (estimates, in bytes)."""

    activations: int
    """Activation memory autograd saves for one loss evaluation (the largest batch)."""
    parameters: int
    """The meta parameters' size."""
    lean: int
    """The working set with one inner step's graph at a time: ``3a + (N + 2) p``."""
    kept: int
    """The working set with every inner step's graph kept: ``(2N + 3) a + (N + 2) p``."""
    on_cpu: bool
    """Whether the parameters live on the CPU."""
    device_memory: int = 0
    """The memory of the parameters' GPU, in bytes (0 on the CPU)."""


def _saved_bytes(loss: TaskLoss, params: Params, batch: Batch) -> int:
    """Bytes of the tensors autograd saves for one backward of ``l(w; batch)``."""
    weights = trees.requiring_grad(params)
    known = {t.data_ptr() for t in trees.leaves((weights, batch)) if isinstance(t, Tensor)}
    total = 0

    def pack(tensor: Tensor) -> Tensor:
        nonlocal total
        pointer = tensor.data_ptr()
        if pointer not in known:
            known.add(pointer)
            total += tensor.numel() * tensor.element_size()
        return tensor

    devices = [t.device for t in weights.values() if t.device.type == "cuda"]
    with (
        torch.random.fork_rng(devices=devices),  # the probe draws nothing from the user's RNG
        torch.enable_grad(),
        torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t),
    ):
        loss(weights, batch)
    return total


def estimate_task_bytes(loss: TaskLoss, params: Params, sample: TaskData) -> TaskFootprint:
    """An estimate of the memory one task's meta gradient works in (see the module doc).

    ``a`` is measured by one forward pass on the task's largest batch.
    """
    batches = {id(b): b for b in (*sample.inner[:1], *sample.hessian[:1], sample.outer)}
    activations = max(_saved_bytes(loss, params, batch) for batch in batches.values())
    parameters = sum(p.numel() * p.element_size() for p in params.values())
    steps = len(sample.inner)
    iterates = (steps + 2) * parameters
    on_cpu = all(p.device.type == "cpu" for p in params.values())
    device = next(iter(params.values())).device
    memory = torch.cuda.get_device_properties(device).total_memory if device.type == "cuda" else 0
    return TaskFootprint(
        activations,
        parameters,
        max(1, 3 * activations + iterates),
        max(1, (2 * steps + 3) * activations + iterates),
        on_cpu,
        memory,
    )


class ChunkPlan(NamedTuple):
    """How a meta-batch runs: the most tasks at once, and whether step graphs are kept."""

    size: int
    keep_graphs: bool


def plan_chunks(
    setting: ChunkSize, tasks: int, footprint: TaskFootprint, memory: Memory = "steps"
) -> ChunkPlan:
    """How many of ``tasks`` tasks to run at once, and whether to keep step graphs.

    Args:
        setting: a number (at most that many), None (all), or ``"auto"``.
        tasks: the number of tasks in the meta-batch.
        footprint: :func:`estimate_task_bytes` of one task.
        memory: ``"unrolled"`` for algorithms that keep every step's graph anyway.
    """
    budget = max(
        AUTO_CHUNK_FACTOR * footprint.lean,
        AUTO_CHUNK_BYTES,
        footprint.device_memory // AUTO_DEVICE_SHARE,
    )
    if setting == "auto":
        per_task = footprint.activations + footprint.parameters
        if tasks == 1 or (footprint.on_cpu and per_task > AUTO_CPU_TASK_BYTES):
            size = 1
        elif memory == "unrolled" or tasks * footprint.kept <= budget:
            size = min(tasks, max(1, budget // footprint.kept))
        else:
            size = min(tasks, max(1, budget // footprint.lean))
    else:
        size = tasks if setting is None else min(setting, tasks)
    return ChunkPlan(size, size * footprint.kept <= budget)


def chunk_sizes(tasks: int, largest: int) -> list[int]:
    """Split ``tasks`` into as few chunks of at most ``largest`` as possible, evenly.

    Even chunks (25 tasks by 8: 7, 6, 6, 6) keep the number of distinct shapes, and
    hence of compiled graphs, at two at most.
    """
    count = -(-tasks // largest)
    base, extra = divmod(tasks, count)
    return [base + 1] * extra + [base] * (count - extra)


# ---------------------------------------------------------------- the executor


F = TypeVar("F", bound=Callable[..., Any])
_ids = itertools.count()


def _own_code(fn: F) -> F:
    """A copy of ``fn`` with a code object of its own: dynamo keys its cache on code."""
    code = fn.__code__.replace(co_name=f"{fn.__name__}_{next(_ids)}")
    copy = types.FunctionType(code, fn.__globals__, code.co_name, fn.__defaults__, fn.__closure__)
    result: F = copy  # type: ignore[assignment]  # same signature, same behaviour
    return result


class Executor:
    """Runs per-task algorithms over meta-batches (see the module docstring).

    Args:
        loss: the task loss.
        inner_loop: the inner optimiser.
        task_chunk_size: ``"auto"``, a number, or ``None`` (all tasks at once); 1 runs
            tasks one by one.
        compile: compile each chunk's computation with ``torch.compile``: ``True`` for
            its defaults (``fullgraph=True``, ``dynamic=False``), or a dict of its
            keyword arguments.
    """

    def __init__(
        self,
        loss: TaskLoss,
        inner_loop: InnerLoop,
        *,
        task_chunk_size: ChunkSize = "auto",
        compile: bool | Mapping[str, Any] = False,
    ) -> None:
        if not isinstance(compile, (bool, Mapping)):
            raise TypeError(
                "'compile' must be a bool or a dict of torch.compile options "
                f"(got an object of type {type(compile).__name__})"
            )
        mode = compile.get("mode") if isinstance(compile, Mapping) else None
        if mode in ("reduce-overhead", "max-autotune"):
            raise ValueError(
                f"'compile' mode {mode!r} captures CUDA graphs of its own inside a meta "
                "step, which torch_maml captures whole: drop the mode (capture='auto', the "
                "default, captures compiled steps on a GPU) or use 'max-autotune-no-cudagraphs'"
            )
        self.loss = loss
        self.inner_loop = inner_loop
        self.task_chunk_size = check_chunk_size(task_chunk_size)
        self.compile = compile
        self.vectorise = True
        """False once a model failed to vectorise: its tasks then run one by one."""
        self._footprints: dict[tuple[Any, ...], TaskFootprint] = {}
        self._compiled: dict[tuple[Any, bool, bool], _Compiled] = {}
        self._compile_failed = False

    def ops(self, batched: bool, keep_graphs: bool = False) -> Ops:
        """The operations for one task, or vectorised over a leading task dimension."""
        return Ops(self.loss, self.inner_loop, batched=batched, keep_graphs=keep_graphs)

    def map_tasks(
        self,
        algorithm: Algorithm,
        params: Params,
        data: MetaBatchData,
        *,
        memory: Memory = "steps",
    ) -> MetaGradient:
        """The mean over tasks of ``algorithm(ops, w, task_data)``; counts summed.

        Args:
            algorithm: the per-task algorithm. Pass the same object every call (a
                function or a method) so that compiled code is reused.
            params: ``w``, detached.
            data: one :class:`~torch_maml.TaskData` per task, or all stacked.
            memory: ``"unrolled"`` if the algorithm keeps the whole unrolled graph
                (for the memory plan).
        """
        chunks = self._chunks(params, data, memory)
        total: MetaGradient | None = None
        count = 0
        for chunk, size, keep_graphs in chunks:
            result = self._run(algorithm, params, chunk, size, keep_graphs)
            total = result if total is None else _add(total, result)
            count += size
        assert total is not None  # a meta-batch holds at least one task
        return total._replace(
            grads={name: g / count for name, g in total.grads.items()}, loss=total.loss / count
        )

    # ------------------------------------------------------------ planning

    def _chunks(
        self, params: Params, data: MetaBatchData, memory: Memory
    ) -> list[tuple[TaskData, int, bool]]:
        """``(data, tasks, keep_graphs)`` per chunk, stacked where the tasks stack."""
        if isinstance(data, StackedTaskData):
            stacked, count = data.data, data.tasks
        else:
            count = len(data)
            together = stack_task_data(data) if count > 1 else None
            if together is None:  # one task, or tasks whose batches do not stack
                return [
                    (item, 1, self._plan(params, item, False, 1, memory).keep_graphs)
                    for item in data
                ]
            stacked = together
        plan = self._plan(params, stacked, True, count, memory)
        if plan.size == count:  # one chunk of all (one task: without its task dimension)
            return [(stacked if count > 1 else take(stacked, 0), count, plan.keep_graphs)]
        chunks, begin = [], 0
        for size in chunk_sizes(count, plan.size):
            index: int | slice = begin if size == 1 else slice(begin, begin + size)
            chunks.append((take(stacked, index), size, plan.keep_graphs))
            begin += size
        return chunks

    def _plan(
        self, params: Params, data: TaskData, stacked: bool, count: int, memory: Memory
    ) -> ChunkPlan:
        batches = (data.inner[0] if data.inner else None, data.outer)
        key = (len(data.inner), stacked, _signature(batches), _signature(params))
        if key not in self._footprints:
            sample = take(data, 0) if stacked else data
            self._footprints[key] = estimate_task_bytes(self.loss, params, sample)
        return plan_chunks(self.task_chunk_size, count, self._footprints[key], memory)

    # ------------------------------------------------------------ running

    def _run(
        self, algorithm: Algorithm, params: Params, data: TaskData, size: int, keep_graphs: bool
    ) -> MetaGradient:
        if size == 1 or not self.vectorise:
            return self._one_by_one(algorithm, params, data, size, keep_graphs)
        try:
            return self._call(algorithm, params, data, size, keep_graphs)
        except Warning:  # a warning the caller turned into an error is theirs
            raise
        except Exception as error:
            result = self._one_by_one(algorithm, params, data, size, keep_graphs)
            self.vectorise = False  # the error was vectorisation's own: tasks run one by one
            reason = str(error).strip().splitlines()
            warn_user(
                "torch_maml could not vectorise this model's meta step over tasks "
                f"({type(error).__name__}: {reason[0] if reason else ''}); its tasks run one "
                "by one from now on, with the same results.",
                VectorizationWarning,
            )
            return result

    def _one_by_one(
        self, algorithm: Algorithm, params: Params, data: TaskData, size: int, keep_graphs: bool
    ) -> MetaGradient:
        if size == 1:
            return self._call(algorithm, params, data, 1, keep_graphs)
        results = [
            self._call(algorithm, params, take(data, i), 1, keep_graphs) for i in range(size)
        ]
        total = results[0]
        for result in results[1:]:
            total = _add(total, result)
        return total

    def _call(
        self, algorithm: Algorithm, params: Params, data: TaskData, size: int, keep_graphs: bool
    ) -> MetaGradient:
        """The sum over a chunk's tasks of the algorithm's results (counts summed).

        With ``compile``, an algorithm's first call runs eagerly (it checks the input
        and counts the oracle calls, per task); later calls run compiled code.
        """
        key = (algorithm, size > 1, keep_graphs)
        compiled = self._compiled.get(key)
        if self.compile is False or self._compile_failed or compiled is None:
            with math_attention():
                result = self._summed(algorithm, params, data, size, keep_graphs)
            if self.compile is not False and not self._compile_failed and compiled is None:
                evals = (result.grad_evals // size, result.hvp_evals // size)
                self._compiled[key] = _Compiled(self._compile(algorithm, key), *evals)
            return result
        try:
            with math_attention(), batch_norm_by_formula(self.loss.model):
                grads, loss = compiled.run(params, data)
        except Warning:  # a warning the caller turned into an error is theirs
            raise
        except Exception as compile_error:
            with math_attention():
                result = self._summed(algorithm, params, data, size, keep_graphs)
            self._compile_failed = True
            reason = str(compile_error).strip().splitlines()
            warn_user(
                "torch.compile could not compile this MetaOptimizer's meta step "
                f"({type(compile_error).__name__}: {reason[0] if reason else ''}); it "
                "runs eagerly from now on. Pass compile=False to skip compilation.",
                CompileWarning,
            )
            return result
        return MetaGradient(grads, loss, compiled.grad_evals * size, compiled.hvp_evals * size)

    def _summed(
        self, algorithm: Algorithm, params: Params, data: TaskData, size: int, keep_graphs: bool
    ) -> MetaGradient:
        batched = size > 1
        ops = self.ops(batched, keep_graphs)
        start = params
        if batched:
            start = {name: p.expand(size, *p.shape) for name, p in params.items()}
        result = algorithm(ops, start, data)
        if not batched:
            return result
        return MetaGradient(
            {name: g.sum(0) for name, g in result.grads.items()},
            result.loss.sum(0),
            result.grad_evals * size,
            result.hvp_evals * size,
        )

    def _compile(
        self, algorithm: Algorithm, key: tuple[Any, bool, bool]
    ) -> Callable[[Params, TaskData], tuple[Params, Tensor]]:
        """The chunk's computation by :class:`~torch_maml.ops.FunctionalOps`, compiled.

        Vectorised, the whole per-task algorithm is vmapped over the tasks (the
        parameters shared), and the results summed: one graph per chunk shape.
        """
        _, batched, keep_graphs = key
        ops = FunctionalOps(self.loss, self.inner_loop, keep_graphs=keep_graphs)

        def per_task(params: Params, data: TaskData) -> tuple[Params, Tensor]:
            result = algorithm(ops, params, data)
            return result.grads, result.loss

        def run(params: Params, data: TaskData) -> tuple[Params, Tensor]:
            if not batched:
                return per_task(params, data)
            vectorised = vmap(per_task, in_dims=(None, 0), randomness="different")
            grads, loss = vectorised(params, data)
            return {name: g.sum(0) for name, g in grads.items()}, loss.sum(0)

        options = self.compile if isinstance(self.compile, Mapping) else {}
        settings: dict[str, Any] = {"fullgraph": True, "dynamic": False, **options}
        compiled: Callable[[Params, TaskData], tuple[Params, Tensor]] = torch.compile(
            _own_code(run), **settings
        )
        return compiled


class _Compiled(NamedTuple):
    """A compiled chunk computation, and the oracle calls per task it makes."""

    run: Callable[[Params, TaskData], tuple[Params, Tensor]]
    grad_evals: int
    hvp_evals: int


def math_attention() -> contextlib.AbstractContextManager[Any]:
    """Scaled dot-product attention by its math kernel, during meta-gradient work.

    The fused kernels (flash, memory-efficient) have no double backward, which the
    second-order estimators need, and no vmap rule; the math kernel has both.
    """
    return sdpa_kernel([SDPBackend.MATH])


def _add(a: MetaGradient, b: MetaGradient) -> MetaGradient:
    return MetaGradient(
        trees.add(a.grads, b.grads),
        a.loss + b.loss,
        a.grad_evals + b.grad_evals,
        a.hvp_evals + b.hvp_evals,
    )


def _signature(tree: Any) -> tuple[Any, ...]:
    """Shapes, dtypes and devices of a pytree's tensors: what memory depends on."""
    return tuple(
        (leaf.shape, leaf.dtype, leaf.device) if isinstance(leaf, Tensor) else leaf
        for leaf in trees.leaves(tree)
    )


# ---------------------------------------------------------------- capture (CUDA graphs)


_SYNCING_METHODS = (
    "item",
    "tolist",
    "__bool__",
    "__float__",
    "__int__",
    "__index__",
    "__complex__",
    "__array__",
    "cpu",
    "numpy",
    "nonzero",
)


@contextlib.contextmanager
def no_host_sync() -> Iterator[None]:
    """Inside, the tensor methods that make the host wait for the device raise.

    ``Tensor.item``, ``tolist``, ``bool(t)``, ``float(t)``, ``int(t)``, ``cpu()``,
    ``numpy()``, ``nonzero()`` and ``torch.cuda.synchronize`` raise
    :class:`HostSyncError`, on any device: a function that runs under it without an
    error makes none of these synchronisations, and so can be captured as a CUDA graph
    (as far as Python can tell; a synchronising kernel called from C++ is not seen).
    Used for the second warm-up of every capture, and by ``capture="check"``.
    """
    originals = {name: getattr(Tensor, name) for name in _SYNCING_METHODS}
    synchronize = torch.cuda.synchronize

    def refuse(name: str) -> Callable[..., Any]:
        def refused(*args: Any, **kwargs: Any) -> Any:
            raise HostSyncError(
                f"Tensor.{name} makes the host wait for the device, which a captured meta "
                "step cannot do"
            )

        return refused

    try:
        for name in _SYNCING_METHODS:
            setattr(Tensor, name, refuse(name))
        torch.cuda.synchronize = refuse("torch.cuda.synchronize")
        yield
    finally:
        for name, method in originals.items():
            setattr(Tensor, name, method)
        torch.cuda.synchronize = synchronize


CaptureSetting: TypeAlias = bool | Literal["auto", "check"]
"""``"auto"``: capture where it applies; True: always (refuse otherwise); False: never;
``"check"``: run eagerly, with host synchronisation forbidden as in a capture."""

CAPTURE_BOUND = 8
"""The most CUDA graphs one optimizer keeps, one per input signature (least recently used go)."""

R = TypeVar("R")


def check_capture(value: object) -> CaptureSetting:
    """Return ``value`` if it is a valid ``capture`` setting, else raise naming it."""
    if value in ("auto", "check") or isinstance(value, bool):
        return value
    raise ValueError(f"'capture' must be 'auto', True, False or 'check' (got {value!r})")


class Inputs(NamedTuple):
    """A step's inputs as tensors, for a capture: what to copy, and how to rebuild them."""

    leaves: list[Tensor]
    """Every tensor of the inputs, in order."""
    rebuild: Callable[[list[Tensor]], Any]
    """Builds inputs of the same structure around other tensors (the static copies)."""
    key: tuple[Any, ...]
    """What a captured graph depends on: shapes, dtypes, devices, parameter storage..."""


def task_layout(tasks: Sequence[Task[Any]]) -> Inputs | None:
    """The tensors of SupportQuery tasks, and how to rebuild the tasks around others.

    None if a batch holds something other than tensors.
    """
    stacked = isinstance(tasks, StackedTasks)
    if isinstance(tasks, StackedTasks):
        pairs = [(tasks.support, tasks.query)]
    else:
        pairs = [(t.support, t.query) for t in tasks if isinstance(t, SupportQuery)]
    batches = [batch for pair in pairs for batch in pair]
    flat = [trees.flatten(batch) for batch in batches]
    leaves = [leaf for batch_leaves, _ in flat for leaf in batch_leaves]
    if not all(isinstance(leaf, Tensor) for leaf in leaves):
        return None
    specs = [spec for _, spec in flat]
    sizes = [len(batch_leaves) for batch_leaves, _ in flat]

    def rebuild(new: list[Tensor]) -> Any:
        values, begin = [], 0
        for spec, size in zip(specs, sizes, strict=True):
            values.append(trees.unflatten(new[begin : begin + size], spec))
            begin += size
        if stacked:
            return StackedTasks(values[0], values[1])
        return [SupportQuery(s, q) for s, q in zip(values[::2], values[1::2], strict=True)]

    key = (stacked, tuple(str(spec) for spec in specs), _signature(leaves))
    return Inputs(leaves, rebuild, key)


class _Graph(NamedTuple):
    graph: Any  # torch.cuda.CUDAGraph
    static: list[Tensor]
    outputs: Any


class StepCapture:
    """CUDA graphs of a meta step's device work, one per input signature.

    ``run(region, inputs, layout, reason)`` runs ``region(inputs, commit=True)``: eagerly,
    or from a CUDA graph. A signature (``layout.key``) runs eagerly the first time it is
    seen; the second time, the region is warmed up twice on a side stream (the second
    time with :func:`no_host_sync`, and without committing anything) and captured, and
    from then on each step copies its tensors into the graph's static inputs and
    replays it. At most :data:`CAPTURE_BOUND` graphs are kept. Whatever prevents a
    capture (``reason``, or an error while warming up or capturing) makes the step run
    eagerly, after one :class:`~torch_maml.CaptureWarning` per reason; with
    ``setting=True`` it is an error instead.

    Args:
        setting: ``"auto"``, True, False or ``"check"``.
    """

    def __init__(self, setting: CaptureSetting = "auto") -> None:
        self.setting = check_capture(setting)
        self._graphs: dict[tuple[Any, ...], _Graph] = {}
        self._seen: set[tuple[Any, ...]] = set()
        self._refused: set[tuple[Any, ...]] = set()
        self._warned: set[str] = set()
        self.captures = 0
        """How many graphs were captured so far."""

    @property
    def graphs(self) -> int:
        """How many graphs are kept now."""
        return len(self._graphs)

    def run(
        self,
        region: Callable[[Any, bool], R],
        inputs: Any,
        layout: Inputs | None,
        reason: str | None,
    ) -> R:
        """``region(inputs, True)``, eagerly or replayed from a graph (see the class doc)."""
        if self.setting is False:
            return region(inputs, True)
        if self.setting == "check":
            with no_host_sync():
                return region(inputs, True)
        if reason is not None or layout is None:
            why = reason or "the step has no capturable layout"
            if self.setting is True:
                raise ValueError(f"capture=True, but this step cannot be captured: {why}")
            self._notice(why)
            return region(inputs, True)
        key = layout.key
        entry = self._graphs.pop(key, None)
        if entry is None:
            if key in self._refused or key not in self._seen:
                self._seen.add(key)
                return region(inputs, True)
            try:
                entry = self._capture(region, layout)
            except Warning:
                raise
            except Exception as error:
                self._refused.add(key)
                message = str(error).strip().splitlines()
                why = f"{type(error).__name__}: {message[0] if message else ''}"
                if self.setting is True:
                    raise ValueError(f"capture=True, but capturing failed ({why})") from error
                self._notice(why)
                return region(inputs, True)
        else:
            for static, leaf in zip(entry.static, layout.leaves, strict=True):
                static.copy_(leaf)
        self._graphs[key] = entry  # most recently used last
        while len(self._graphs) > CAPTURE_BOUND:
            del self._graphs[next(iter(self._graphs))]
        entry.graph.replay()
        outputs: R = entry.outputs
        return outputs

    def _capture(self, region: Callable[[Any, bool], Any], layout: Inputs) -> _Graph:
        static = [leaf.clone() for leaf in layout.leaves]
        inputs = layout.rebuild(static)
        side = torch.cuda.Stream()  # type: ignore[no-untyped-call]  # torch's own stub
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            region(inputs, False)  # lazy initialisation, compilation (which synchronises)
            with no_host_sync():  # the work itself must not: a sync cannot be captured
                region(inputs, False)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            outputs = region(inputs, True)
        self.captures += 1
        return _Graph(graph, static, outputs)

    def _notice(self, reason: str) -> None:
        if reason not in self._warned:
            self._warned.add(reason)
            warn_user(
                f"this meta step runs eagerly, not as a CUDA graph: {reason}. "
                "Pass capture=False to silence this.",
                CaptureWarning,
            )
