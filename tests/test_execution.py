"""How tasks run: every path of the execution layer gives the per-task loop's result.

Stacked or not, all at once, in chunks or one by one, vectorised or after a
fallback, compiled (integration tests: torch.compile with dynamo's "eager" backend,
and one with inductor; an algorithm's first call runs eagerly, later ones compiled) or
in a checked capture region: one answer, to rounding (float64, 1e-12). Then the
memory plan of ``task_chunk_size="auto"``.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import Any, cast

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import Tensor, nn
from torch._dynamo.utils import counters

import torch_maml as tm
from tests.problems import (
    ALPHA,
    EVERY_PATH,
    LAM,
    SAME,
    STEPS,
    TIGHT,
    MlpProblem,
    Pair,
    Path,
    RegressionSampler,
    Switch,
    make_mlp,
    meta_gradient,
    mlp_meta_gradient,
    mlp_problems,
    mse_loss,
    optimizer_state,
    params_relative_error,
    reference_meta_gradient,
    regression_tasks,
    same,
    stacked_tasks,
)
from torch_maml import algorithms
from torch_maml.execution import (
    AUTO_CHUNK_BYTES,
    AUTO_CPU_TASK_BYTES,
    ChunkPlan,
    ChunkSize,
    Executor,
    HostSyncError,
    TaskFootprint,
    chunk_sizes,
    estimate_task_bytes,
    no_host_sync,
    plan_chunks,
)
from torch_maml.typing import Params

TASKS = 5
CHUNKS: list[ChunkSize] = [1, 2, 3, None, "auto"]
Optimizer = tm.MetaOptimizer[nn.Module, Pair]


def support_query_tasks() -> list[tm.SupportQuery[Pair]]:
    return regression_tasks(TASKS, torch.Generator().manual_seed(1))


def sampler_tasks() -> list[RegressionSampler]:
    return [RegressionSampler(1.0 + 0.3 * i, 0.2 * i) for i in range(TASKS)]


def gd() -> tm.GradientDescent:
    return tm.GradientDescent(STEPS, ALPHA)


# ---------------------------------------------------------------- every path, one answer

PATH_CASES: list[tuple[str, tm.MetaGradientEstimator, Any]] = [
    ("Exact", tm.Exact(), support_query_tasks),
    ("FiniteSum", tm.FiniteSum(), support_query_tasks),
    ("Resampled", tm.Resampled(3, 4, 5), sampler_tasks),
    ("Exact on samplers", tm.Exact(inner_size=3, outer_size=5), sampler_tasks),
]


@pytest.mark.parametrize(("name", "estimator", "tasks"), PATH_CASES, ids=[c[0] for c in PATH_CASES])
def test_loop_vmap_and_chunked_paths_agree(
    name: str, estimator: tm.MetaGradientEstimator, tasks: Any
) -> None:
    """Task by task, all at once and in chunks (vectorised): 1e-12, and the same counts."""
    loop, loop_info = meta_gradient(
        make_mlp(0), mse_loss, gd(), estimator, tasks(), task_chunk_size=1
    )
    for chunk in CHUNKS[1:]:
        grads, info = meta_gradient(
            make_mlp(0), mse_loss, gd(), estimator, tasks(), task_chunk_size=chunk
        )
        assert params_relative_error(grads, loop) < SAME, chunk
        assert torch.allclose(info.loss, loop_info.loss, rtol=SAME, atol=0)
        assert (info.grad_evals, info.hvp_evals) == (loop_info.grad_evals, loop_info.hvp_evals)
    if name in ("Exact", "FiniteSum"):  # and against torch.autograd written out by hand
        reference = reference_meta_gradient(make_mlp(0), support_query_tasks(), STEPS, ALPHA)
        assert params_relative_error(loop, reference) < SAME


@pytest.mark.parametrize("estimator", [tm.Exact(), tm.FiniteSum()], ids=["Exact", "FiniteSum"])
@pytest.mark.parametrize("chunk", CHUNKS)
def test_stacked_tasks_give_the_same_meta_gradient(
    estimator: tm.MetaGradientEstimator, chunk: ChunkSize
) -> None:
    listed = support_query_tasks()
    expected, expected_info = meta_gradient(
        make_mlp(0), mse_loss, gd(), estimator, listed, task_chunk_size=1
    )
    grads, info = meta_gradient(
        make_mlp(0), mse_loss, gd(), estimator, tm.StackedTasks.stack(listed), task_chunk_size=chunk
    )
    assert params_relative_error(grads, expected) < SAME
    assert (info.grad_evals, info.hvp_evals) == (expected_info.grad_evals, expected_info.hvp_evals)


def test_tasks_that_do_not_stack_run_one_by_one() -> None:
    """Support sets of different sizes cannot be stacked: the loop path takes them."""
    gen = torch.Generator().manual_seed(2)
    tasks = regression_tasks(2, gen, support=4) + regression_tasks(2, gen, support=7)
    reference = reference_meta_gradient(make_mlp(0), tasks, STEPS, ALPHA)
    for chunk in CHUNKS:
        grads, info = meta_gradient(
            make_mlp(0), mse_loss, gd(), tm.FiniteSum(), tasks, task_chunk_size=chunk
        )
        assert params_relative_error(grads, reference) < SAME
        assert info.hvp_evals == len(tasks) * STEPS


@settings(max_examples=25, deadline=None)
@given(mlp_problems(), st.sampled_from(["auto", None, 1, 2]), st.sampled_from([None, ["2"], ["0"]]))
def test_finite_sum_equals_exact_for_any_chunking_and_selection(
    problem: MlpProblem,
    chunk: ChunkSize,
    adapted: list[str] | None,
) -> None:
    """FiniteSum's meta gradient equals Exact's (1e-10), with the paper's oracle counts."""
    model, tasks, steps, alpha = problem
    results = []
    for estimator in (tm.Exact(), tm.FiniteSum()):
        grads, info = meta_gradient(
            model,
            mse_loss,
            tm.GradientDescent(steps, alpha),
            estimator,
            tasks,
            task_chunk_size=chunk,
            adapted=adapted,
        )
        assert (info.grad_evals, info.hvp_evals) == (len(tasks) * (steps + 1), len(tasks) * steps)
        results.append(grads)
    exact, finite_sum = results
    scale = max(float(g.abs().max()) for g in exact.values())
    if scale > 1e-12:  # a meta gradient of exactly zero has no relative error to speak of
        assert params_relative_error(finite_sum, exact) < TIGHT


# ---------------------------------------------------------------- a model that cannot vectorise


def branching_loss(model: nn.Module, batch: Pair) -> Tensor:
    """Python control flow on a tensor's value: torch.func.vmap cannot run it."""
    x, y = batch
    out: Tensor = model(x)
    if float(out.detach().abs().max()) > 1e6:
        out = out.clamp(-1e6, 1e6)
    return F.mse_loss(out, y)


def test_a_model_that_cannot_vectorise_runs_one_by_one_after_one_warning() -> None:
    tasks = support_query_tasks()
    expected, _ = meta_gradient(
        make_mlp(0), branching_loss, gd(), tm.FiniteSum(), tasks, task_chunk_size=1
    )
    model = make_mlp(0)
    meta_opt: Optimizer = tm.MetaOptimizer(
        model,
        branching_loss,
        inner_loop=gd(),
        estimator=tm.FiniteSum(),
        step_size=tm.Constant(0.1),
        task_chunk_size=None,
    )
    with pytest.warns(tm.VectorizationWarning, match="run one by one from now on") as record:
        meta_opt.meta_backward(tasks)
    assert len(record) == 1
    assert not meta_opt.objective.executor.vectorise
    grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    assert params_relative_error(grads, expected) < SAME
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no second warning
        meta_opt.step(tasks)


@pytest.mark.parametrize(
    "fallback",
    ["vectorise", pytest.param("compile", marks=pytest.mark.integration)],
)
@pytest.mark.usefixtures("fresh_dynamo")
def test_a_fallback_warning_points_at_the_users_line(fallback: str) -> None:
    """Like the step-size warnings, a VectorizationWarning or CompileWarning names the
    line of the user's code that called the optimizer, not a line of torch_maml."""
    options: dict[str, Any] = {"task_chunk_size": None}
    if fallback == "compile":
        options["compile"] = {"backend": "eager"}
    meta_opt: Optimizer = tm.MetaOptimizer(
        make_mlp(0),
        branching_loss if fallback == "vectorise" else breaking_loss,
        inner_loop=gd(),
        estimator=tm.FiniteSum(),
        step_size=tm.Constant(0.1),
        **options,
    )
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        for _ in range(2):  # compiled code runs from the second call on
            meta_opt.step(support_query_tasks())
    assert len(record) == 1
    assert record[0].filename == __file__


def test_an_error_of_the_model_itself_is_raised_as_it_is() -> None:
    """A loss that fails one by one too: its own error, no fallback, no warning."""

    def non_scalar(model: nn.Module, batch: Pair) -> Tensor:
        x, y = batch
        squares: Tensor = (model(x) - y) ** 2
        return squares

    meta_opt: Optimizer = tm.MetaOptimizer(
        make_mlp(0),
        non_scalar,
        inner_loop=gd(),
        estimator=tm.FiniteSum(),
        step_size=tm.Constant(0.1),
        task_chunk_size=None,
    )
    with pytest.raises(ValueError, match="'loss_fn' must return a scalar Tensor"):
        meta_opt.step(support_query_tasks())
    assert meta_opt.objective.executor.vectorise


# ---------------------------------------------------------------- bad input: one error, every path
#
# The same bad input gets the same exception, word for word, whichever path runs it:
# every task_chunk_size, a list or stacked tasks, compiled code (reached after a good
# history: the first calls compile on good input, then the input turns bad) and the
# checked capture region. Nothing changes when it is raised.

EXTERNAL = torch.ones((), dtype=torch.float64, requires_grad=True)
"""A tensor outside the model that requires grad."""


def independent_loss(model: nn.Module, batch: Pair) -> Tensor:
    """A loss that requires grad (through :data:`EXTERNAL`) but not through the weights."""
    x, y = batch
    return F.mse_loss(model(x).detach(), y) * EXTERNAL


def non_scalar_loss(model: nn.Module, batch: Pair) -> Tensor:
    x, y = batch
    squares: Tensor = (model(x) - y) ** 2
    return squares


def integer_loss(model: nn.Module, batch: Pair) -> Tensor:
    """How many predictions exceed their target: an int64 count."""
    x, y = batch
    count: Tensor = (model(x) > y).sum()
    return count


NO_DEPENDENCE = (
    "'loss_fn' returned a loss that does not depend on the adapted parameters (it has no "
    "grad); does it detach, or ignore the model?"
)
BAD_LOSSES = [
    pytest.param(independent_loss, ValueError, NO_DEPENDENCE, id="not on the weights"),
    pytest.param(
        non_scalar_loss,
        ValueError,
        "'loss_fn' must return a scalar Tensor (got a Tensor of shape (6, 1)); reduce it, e.g. "
        "with .mean()",
        id="non-scalar",
    ),
    pytest.param(
        integer_loss,
        TypeError,
        "'loss_fn' must return a floating point Tensor (got dtype torch.int64)",
        id="integer",
    ),
]

EVERY_ESTIMATOR: list[tuple[str, tm.MetaGradientEstimator, tm.InnerLoop]] = [
    ("FiniteSum", tm.FiniteSum(), gd()),
    ("Exact", tm.Exact(), gd()),
    ("FirstOrder", tm.FirstOrder(), gd()),
    ("Reptile", tm.Reptile(), gd()),
    ("HessianFree", tm.HessianFree(1e-4), gd()),
    ("Implicit", tm.Implicit(cg_steps=4), tm.Proximal(gd(), LAM)),
]
"""Each built-in estimator with an inner loop it takes."""
# Every path for Exact and FiniteSum; the others on every path but the compiled ones
# (the same compiled machinery, and each compiled case costs seconds).
PATH_AND_ESTIMATOR = [
    pytest.param(
        path.values[0],
        estimator,
        inner_loop,
        id=f"{path.id}-{name}",
        marks=path.marks,
    )
    for path in EVERY_PATH
    for name, estimator, inner_loop in EVERY_ESTIMATOR
    if not cast(Path, path.values[0]).compile or name in ("Exact", "FiniteSum")
]


def warmed_up(
    path: Path, estimator: tm.MetaGradientEstimator, inner_loop: tm.InnerLoop, loss_fn: Any
) -> tuple[Optimizer, list[tm.SupportQuery[Pair]]]:
    """An optimizer on ``path`` after ``path.calls`` good calls (compiled code, if compiled)."""
    optimizer: Optimizer = tm.MetaOptimizer(
        make_mlp(0),
        loss_fn,
        inner_loop=inner_loop,
        estimator=estimator,
        step_size=tm.Constant(0.1),
        generator=torch.Generator().manual_seed(0),
        **path.options(),
    )
    tasks = support_query_tasks()[:4]
    for _ in range(path.calls):
        optimizer.meta_backward(path.meta_batch(tasks))
    return optimizer, tasks


def assert_refused(optimizer: Optimizer, tasks: Any, error: type[Exception], message: str) -> None:
    """``step`` and ``meta_backward`` raise exactly ``error(message)`` and change nothing."""
    before = optimizer_state(optimizer)
    for method in (optimizer.step, optimizer.meta_backward):
        with pytest.raises(error) as caught:
            method(tasks)
        assert type(caught.value) is error
        assert str(caught.value) == message
        assert same(optimizer_state(optimizer), before)


@pytest.mark.usefixtures("fresh_dynamo")
@pytest.mark.parametrize(("path", "estimator", "inner_loop"), PATH_AND_ESTIMATOR)
@pytest.mark.parametrize(("bad", "error", "message"), BAD_LOSSES)
def test_a_bad_loss_gets_one_error_on_every_path(
    path: Path,
    estimator: tm.MetaGradientEstimator,
    inner_loop: tm.InnerLoop,
    bad: Any,
    error: type[Exception],
    message: str,
) -> None:
    loss_fn = Switch(bad)
    optimizer, tasks = warmed_up(path, estimator, inner_loop, loss_fn)
    loss_fn.on = True
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no fallback warning on the way to the error
        assert_refused(optimizer, path.meta_batch(tasks), error, message)
        with pytest.raises(error) as caught:
            optimizer.adapt(tasks[0])
    assert str(caught.value) == message


def with_an_empty(tasks: list[tm.SupportQuery[Pair]], which: str, path: Path) -> Any:
    """The meta-batch with the ``which`` set emptied: task 2's (a list), or every task's
    (stacked: one tensor holds them all)."""
    if path.stacked:
        stacked = tm.StackedTasks.stack(tasks)
        x, y = getattr(stacked, which)
        empty = (x[:, :0], y[:, :0])
        if which == "support":
            return tm.StackedTasks(empty, stacked.query)
        return tm.StackedTasks(stacked.support, empty)
    task = tasks[2]
    x, y = getattr(task, which)
    empty = (x[:0], y[:0])
    tasks = list(tasks)
    tasks[2] = (
        tm.SupportQuery(empty, task.query)
        if which == "support"
        else tm.SupportQuery(task.support, empty)
    )
    return tasks


@pytest.mark.usefixtures("fresh_dynamo")
@pytest.mark.parametrize(("path", "estimator", "inner_loop"), PATH_AND_ESTIMATOR)
@pytest.mark.parametrize("which", ["support", "query"])
def test_an_empty_batch_gets_one_error_on_every_path(
    path: Path, estimator: tm.MetaGradientEstimator, inner_loop: tm.InnerLoop, which: str
) -> None:
    """Its mean loss would be 0 / 0: refused, naming the batch and the empty tensor's shape."""
    optimizer, tasks = warmed_up(path, estimator, inner_loop, mse_loss)
    where, shape = ("tasks", "(4, 0, 1)") if path.stacked else ("tasks[2]", "(0, 1)")
    message = (
        f"'{where}.{which}' holds an empty tensor (shape {shape}): every batch needs at least "
        "one sample"
    )
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert_refused(optimizer, with_an_empty(tasks, which, path), ValueError, message)


# ---------------------------------------------------------------- chunks and memory


@pytest.mark.parametrize(
    ("tasks", "largest", "expected"),
    [(25, 8, [7, 6, 6, 6]), (8, 8, [8]), (5, 1, [1] * 5), (9, 4, [3, 3, 3]), (1, 4, [1])],
)
def test_chunks_are_even_and_bounded(tasks: int, largest: int, expected: list[int]) -> None:
    sizes = chunk_sizes(tasks, largest)
    assert sizes == expected
    assert sum(sizes) == tasks
    assert max(sizes) <= largest


MIB = 2**20


def footprint(activations: int, parameters: int, steps: int, on_cpu: bool) -> TaskFootprint:
    """A footprint by the module's formulas: ``lean = 3a + (N+2)p``, ``kept = (2N+3)a + (N+2)p``."""
    iterates = (steps + 2) * parameters
    lean = 3 * activations + iterates
    return TaskFootprint(
        activations, parameters, lean, (2 * steps + 3) * activations + iterates, on_cpu
    )


SMALL = footprint(1000, 1000, 3, on_cpu=True)  # lean 8 kB, kept 14 kB
LARGE_ACTIVATIONS = footprint(2 * MIB, 1000, 3, on_cpu=False)  # lean ~6 MiB, kept ~18 MiB
HUGE = footprint(100 * MIB, MIB, 3, on_cpu=False)  # lean ~305 MiB, kept ~905 MiB


@pytest.mark.parametrize(
    ("setting", "fp", "memory", "expected"),
    [
        (None, SMALL, "steps", ChunkPlan(25, True)),
        (4, SMALL, "steps", ChunkPlan(4, True)),
        (100, SMALL, "steps", ChunkPlan(25, True)),
        ("auto", SMALL, "steps", ChunkPlan(25, True)),  # all 25 with their graphs: 350 kB
        (None, HUGE, "steps", ChunkPlan(25, False)),  # an explicit size stays, graphs go
        # 25 * 18 MiB with graphs is over 256 MiB: as many as fit without them (all 25)...
        ("auto", LARGE_ACTIVATIONS, "steps", ChunkPlan(25, False)),
        # ...while an unrolled algorithm keeps graphs anyway: as many as fit with them.
        ("auto", LARGE_ACTIVATIONS, "unrolled", ChunkPlan(14, True)),
        ("auto", HUGE, "steps", ChunkPlan(4, False)),  # the budget is 4 lean here
        # on the CPU, tasks over 1 MiB run one by one
        ("auto", footprint(2 * MIB, 1000, 3, on_cpu=True), "steps", ChunkPlan(1, True)),
    ],
)
def test_auto_chunks_bound_memory(
    setting: ChunkSize, fp: TaskFootprint, memory: Any, expected: ChunkPlan
) -> None:
    plan = plan_chunks(setting, 25, fp, memory)
    assert plan == expected
    budget = max(4 * fp.lean, AUTO_CHUNK_BYTES)
    if setting == "auto" and plan.size > 1:
        assert plan.size * (fp.kept if plan.keep_graphs else fp.lean) <= budget
    assert plan.keep_graphs == (plan.size * fp.kept <= budget)
    assert plan_chunks("auto", 1, fp, memory).size == 1


def test_the_cpu_threshold_is_on_activations_and_parameters() -> None:
    below = footprint(AUTO_CPU_TASK_BYTES // 2, AUTO_CPU_TASK_BYTES // 2, 3, on_cpu=True)
    above = footprint(AUTO_CPU_TASK_BYTES // 2, AUTO_CPU_TASK_BYTES // 2 + 1, 3, on_cpu=True)
    assert plan_chunks("auto", 25, below).size > 1
    assert plan_chunks("auto", 25, above).size == 1


class Wide(nn.Module):
    """A layer whose activations are easy to count: a (batch, 1000) float64 output."""

    def __init__(self) -> None:
        super().__init__()
        self.layer = nn.Linear(4, 1000).double()

    def forward(self, x: Tensor) -> Tensor:
        out: Tensor = self.layer(x)
        return out


class Counting:
    """A loss closure that counts its calls (a vectorised call counts once)."""

    def __init__(self, loss_fn: Any) -> None:
        self.loss_fn, self.calls = loss_fn, 0

    def __call__(self, model: nn.Module, batch: Pair) -> Tensor:
        self.calls += 1
        loss: Tensor = self.loss_fn(model, batch)
        return loss


def wide_loss(model: nn.Module, batch: Pair) -> Tensor:
    x, y = batch
    loss: Tensor = ((model(x) - y) ** 2).mean()
    return loss


def test_the_footprint_counts_saved_activations_once_per_distinct_batch() -> None:
    model = Wide()
    counting = Counting(wide_loss)
    loss = tm.TaskLoss(model, counting, [n for n, _ in model.named_parameters()])
    params = loss.params()

    def measure(rows: int, steps: int = 2) -> TaskFootprint:
        x = torch.randn(rows, 4, dtype=torch.float64)
        batch = (x, torch.zeros(rows, 1000, dtype=torch.float64))
        outer = (x, torch.zeros(rows, 1000, dtype=torch.float64))
        return estimate_task_bytes(
            loss, params, tm.TaskData([batch] * steps, [batch] * steps, outer)
        )

    small = measure(10)
    assert counting.calls == 2  # the inner (and Hessian) batch, and the outer one
    # The (rows, 1000) output minus target is saved for the square's backward: 8 bytes each.
    assert small.activations == 10 * 1000 * 8
    assert measure(20).activations == 2 * small.activations
    parameters = (4 * 1000 + 1000) * 8
    assert small.parameters == parameters
    assert small.lean == 3 * small.activations + (2 + 2) * parameters
    assert small.kept == (2 * 2 + 3) * small.activations + (2 + 2) * parameters
    assert measure(10, steps=5).kept == (2 * 5 + 3) * small.activations + (5 + 2) * parameters
    assert small.on_cpu


@pytest.mark.parametrize(("chunk", "per_call"), [("auto", 3), (None, 3), (2, 6), (1, 9)])
def test_the_footprint_is_measured_once_per_shape(chunk: ChunkSize, per_call: int) -> None:
    """First-order MAML, N = 2, three tasks: one loss call per step and one for the outer
    gradient per chunk; the footprint's two calls (one per distinct batch) only once."""
    model = make_mlp(0)
    counting = Counting(mse_loss)
    loss = tm.TaskLoss(model, counting, [n for n, _ in model.named_parameters()])
    executor = Executor(loss, tm.GradientDescent(2, ALPHA), task_chunk_size=chunk)
    data = tm.support_query_data(regression_tasks(3, torch.Generator().manual_seed(0)), 2)
    calls = []
    for _ in range(3):
        counting.calls = 0
        executor.map_tasks(algorithms.first_order_meta_gradient, loss.params(), data)
        calls.append(counting.calls)
    assert calls == [per_call + 2, per_call, per_call]


# ---------------------------------------------------------------- compiled (torch.compile)


def graphs() -> int:
    return int(counters["stats"]["unique_graphs"])


def compiled_optimizer(
    model: nn.Module,
    compile: bool | dict[str, Any],
    estimator: tm.MetaGradientEstimator | None = None,
    loss_fn: Any = mse_loss,
    inner_loop: tm.InnerLoop | None = None,
) -> Optimizer:
    return tm.MetaOptimizer(
        model,
        loss_fn,
        inner_loop=inner_loop if inner_loop is not None else gd(),
        estimator=estimator if estimator is not None else tm.FiniteSum(),
        step_size=tm.Constant(0.05),
        task_chunk_size=None,
        compile=compile,
    )


def grads_of(model: nn.Module) -> Params:
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


EAGER_BACKEND = {"backend": "eager"}


@pytest.mark.integration
@pytest.mark.usefixtures("fresh_dynamo")
def test_inductor_matches_eager_and_never_recompiles() -> None:
    eager_model, compiled_model = make_mlp(0), make_mlp(0)
    eager = compiled_optimizer(eager_model, False)
    compiled = compiled_optimizer(compiled_model, True)
    for step in range(4):  # new data each step, same shapes
        tasks = stacked_tasks(step)
        eager.zero_grad()
        compiled.zero_grad()
        expected = eager.meta_backward(tasks)
        info = compiled.meta_backward(tasks)
        assert params_relative_error(grads_of(compiled_model), grads_of(eager_model)) < SAME
        assert torch.allclose(info.loss, expected.loss, rtol=SAME, atol=0)
        assert (info.grad_evals, info.hvp_evals) == (expected.grad_evals, expected.hvp_evals)
        # the first call runs eagerly; then the whole recursion is one graph, compiled once
        assert graphs() == (0 if step == 0 else 1)
    assert not counters["recompiles"]


ESTIMATORS: list[tuple[str, tm.MetaGradientEstimator, tm.InnerLoop, bool]] = [
    ("Exact", tm.Exact(), gd(), False),
    ("FiniteSum", tm.FiniteSum(), gd(), False),
    ("Resampled", tm.Resampled(4, 5, 6), gd(), True),
    ("FirstOrder", tm.FirstOrder(), gd(), False),
    ("Reptile", tm.Reptile(), gd(), False),
    ("HessianFree", tm.HessianFree(1e-3), gd(), False),
    ("Implicit", tm.Implicit(cg_steps=10), tm.Proximal(gd(), LAM), False),
]


@pytest.mark.integration
@pytest.mark.usefixtures("fresh_dynamo")
@pytest.mark.parametrize(
    ("name", "estimator", "inner_loop", "samplers"), ESTIMATORS, ids=[e[0] for e in ESTIMATORS]
)
def test_every_built_in_estimator_compiles_to_the_eager_result(
    name: str, estimator: tm.MetaGradientEstimator, inner_loop: tm.InnerLoop, samplers: bool
) -> None:
    """The second call runs compiled code, one graph, without a warning
    (filterwarnings = error): the eager result to 1e-12, and the same counts."""
    tasks: Any = sampler_tasks()[:3] if samplers else stacked_tasks(0)
    results = []
    for compile in (False, EAGER_BACKEND):
        grads, info = meta_gradient(
            make_mlp(0),
            mse_loss,
            inner_loop,
            estimator,
            tasks,
            calls=2,
            task_chunk_size=None,
            compile=compile,
        )
        results.append((grads, info))
    (eager, eager_info), (compiled, info) = results
    assert params_relative_error(compiled, eager) < SAME
    assert torch.allclose(info.loss, eager_info.loss, rtol=SAME, atol=0)
    assert (info.grad_evals, info.hvp_evals) == (eager_info.grad_evals, eager_info.hvp_evals)
    assert graphs() == 1
    assert not counters["recompiles"]


@pytest.mark.integration
@pytest.mark.usefixtures("fresh_dynamo")
def test_implicit_with_a_tolerance_decides_on_the_host_and_runs_eagerly() -> None:
    """CG that stops at a tolerance branches on tensor values: it cannot be one graph.
    One CompileWarning, then the eager result, every step."""
    inner_loop = tm.Proximal(gd(), LAM)
    estimator = tm.Implicit(cg_steps=10, tol=1e-6)
    eager_model, model = make_mlp(0), make_mlp(0)
    eager = compiled_optimizer(eager_model, False, estimator, inner_loop=inner_loop)
    compiled = compiled_optimizer(model, EAGER_BACKEND, estimator, inner_loop=inner_loop)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        for seed in range(2):
            eager.zero_grad()
            compiled.zero_grad()
            expected = eager.meta_backward(stacked_tasks(seed))
            info = compiled.meta_backward(stacked_tasks(seed))
            assert params_relative_error(grads_of(model), grads_of(eager_model)) < SAME
            assert info.hvp_evals == expected.hvp_evals
    fallbacks = [w for w in record if issubclass(w.category, tm.CompileWarning)]
    assert len(fallbacks) == 1
    assert "could not compile" in str(fallbacks[0].message)
    assert len(record) == 1


@pytest.mark.integration
@pytest.mark.usefixtures("fresh_dynamo")
@pytest.mark.parametrize("steps", [2, 6])
def test_the_graphs_do_not_depend_on_the_number_of_inner_steps(steps: int) -> None:
    meta_opt = compiled_optimizer(
        make_mlp(0), EAGER_BACKEND, inner_loop=tm.GradientDescent(steps=steps, lr=ALPHA)
    )
    meta_opt.step(stacked_tasks(0))
    meta_opt.step(stacked_tasks(1))
    assert graphs() == 1


@pytest.mark.integration
@pytest.mark.usefixtures("fresh_dynamo")
def test_ten_optimizers_on_different_models_all_stay_compiled() -> None:
    """Each optimizer has its own compile cache: no recompile limit, no eager fallback."""
    optimizers = []
    for i in range(10):
        torch.manual_seed(i)
        width = 4 + i
        model = nn.Sequential(nn.Linear(1, width), nn.Tanh(), nn.Linear(width, 1)).double()
        optimizers.append(compiled_optimizer(model, EAGER_BACKEND))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a CompileWarning (eager fallback) would fail here
        for meta_opt in optimizers:
            meta_opt.step(stacked_tasks(0))  # the first call runs eagerly
        assert graphs() == 0
        for seed in (1, 2):
            for meta_opt in optimizers:
                meta_opt.step(stacked_tasks(seed))
            assert graphs() == 10
    assert not counters["recompiles"]


def breaking_loss(model: nn.Module, batch: Pair) -> Tensor:
    torch._dynamo.graph_break()  # something dynamo cannot put in one graph
    return mse_loss(model, batch)


@pytest.mark.integration
@pytest.mark.usefixtures("fresh_dynamo")
def test_a_model_the_compiler_cannot_handle_falls_back_with_one_warning() -> None:
    eager_model, model = make_mlp(0), make_mlp(0)
    eager = compiled_optimizer(eager_model, False)
    meta_opt = compiled_optimizer(model, EAGER_BACKEND, loss_fn=breaking_loss)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        for seed in range(2):
            tasks = stacked_tasks(seed)
            eager.zero_grad()
            meta_opt.zero_grad()
            eager.meta_backward(tasks)
            meta_opt.meta_backward(tasks)
            assert params_relative_error(grads_of(model), grads_of(eager_model)) < SAME
    fallbacks = [w for w in record if issubclass(w.category, tm.CompileWarning)]
    assert len(fallbacks) == 1
    assert "runs eagerly from now on" in str(fallbacks[0].message)


@pytest.mark.integration
@pytest.mark.usefixtures("fresh_dynamo")
def test_bad_input_under_compile_is_the_usual_error_without_warning() -> None:
    def non_scalar(model: nn.Module, batch: Pair) -> Tensor:
        x, y = batch
        squares: Tensor = (model(x) - y) ** 2
        return squares

    meta_opt = compiled_optimizer(make_mlp(0), EAGER_BACKEND, loss_fn=non_scalar)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(ValueError, match="'loss_fn' must return a scalar Tensor"):
            meta_opt.step(stacked_tasks(0))


@pytest.mark.parametrize("value", ["yes", 1, None])
def test_compile_argument_is_checked(value: Any) -> None:
    with pytest.raises(TypeError, match="'compile' must be a bool or a dict"):
        compiled_optimizer(make_mlp(0), value)


@pytest.mark.integration
@pytest.mark.usefixtures("fresh_dynamo")
def test_a_stateful_inner_loop_compiles_to_the_same_result() -> None:
    """Per-step batches and an inner state carried from step to step: compiled == eager."""
    from tests.typing_cases.user_components import HeavyBall

    samplers = [RegressionSampler(1.0 + 0.5 * i, 0.3 * i) for i in range(3)]
    inner_loop = HeavyBall(STEPS, ALPHA, 0.9)
    eager = mlp_meta_gradient(
        inner_loop, tm.Resampled(4, 5, 6), samplers, calls=2, task_chunk_size=None
    )
    compiled = mlp_meta_gradient(
        inner_loop,
        tm.Resampled(4, 5, 6),
        samplers,
        calls=2,
        task_chunk_size=None,
        compile=EAGER_BACKEND,
    )
    assert params_relative_error(compiled, eager) < SAME
    assert graphs() == 1


# ---------------------------------------------------------------- capture (CUDA graphs), checked


CAPTURE_CASES = [*EVERY_ESTIMATOR, ("FiniteSum, Adam", tm.FiniteSum(), tm.Adam(STEPS, ALPHA))]


def capturing(
    estimator: tm.MetaGradientEstimator,
    inner_loop: tm.InnerLoop,
    capture: Any,
    chunk: ChunkSize = "auto",
    **options: Any,
) -> tuple[nn.Module, Optimizer]:
    model: nn.Module = make_mlp(0)
    optimizer: Optimizer = tm.MetaOptimizer(
        model,
        mse_loss,
        inner_loop=inner_loop,
        estimator=estimator,
        step_size=tm.Constant(0.1),
        capture=capture,
        task_chunk_size=chunk,
        **options,
    )
    return model, optimizer


@pytest.mark.parametrize(
    ("name", "estimator", "inner_loop"), CAPTURE_CASES, ids=[c[0] for c in CAPTURE_CASES]
)
@pytest.mark.parametrize("chunk", [1, 2, None], ids=str)
def test_the_captured_region_never_synchronises_and_equals_eager(
    name: str, estimator: tm.MetaGradientEstimator, inner_loop: tm.InnerLoop, chunk: Any
) -> None:
    """``capture="check"`` runs the region a GPU would capture, with host synchronisations
    made to raise: bitwise the eager result, for every built-in estimator."""
    tasks = regression_tasks(4, torch.Generator().manual_seed(0))
    results = []
    for capture in (False, "check"):
        model, optimizer = capturing(estimator, inner_loop, capture, chunk)
        optimizer.step(tm.StackedTasks.stack(tasks))
        optimizer.step(tasks)
        optimizer.meta_backward(tasks)
        results.append([p.detach().clone() for p in model.parameters()])
        grads = [p.grad for p in model.parameters()]
        assert all(g is not None for g in grads)
        results.append([g for g in grads if g is not None])
    for eager, checked in zip(results[0] + results[1], results[2] + results[3], strict=True):
        assert torch.equal(eager, checked)


@pytest.mark.parametrize("policy", ["raise", "skip"])
def test_the_region_checks_finiteness_on_the_device(policy: str) -> None:
    tasks = regression_tasks(3, torch.Generator().manual_seed(1))
    x, y = tasks[1].support
    tasks[1] = tm.SupportQuery((x, torch.full_like(y, float("nan"))), tasks[1].query)
    model, optimizer = capturing(tm.FiniteSum(), gd(), "check", nan_policy=policy)
    before = [p.detach().clone() for p in model.parameters()]
    if policy == "raise":
        with pytest.raises(tm.NonFiniteError, match="support loss at inner step 0 of task 1"):
            optimizer.step(tasks)
    else:
        assert optimizer.step(tasks).skipped
    for a, b in zip(before, model.parameters(), strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize(
    ("method", "call"),
    [
        ("item", lambda t: t.item()),
        ("__bool__", lambda t: bool(t)),
        ("__float__", lambda t: float(t)),
        ("tolist", lambda t: t.tolist()),
        ("cpu", lambda t: t.cpu()),
        ("numpy", lambda t: t.numpy()),
        ("nonzero", lambda t: t.nonzero()),
    ],
)
def test_no_host_sync_refuses_each_synchronisation(method: str, call: Any) -> None:
    t = torch.ones(())
    with no_host_sync(), pytest.raises(HostSyncError, match=f"Tensor.{method}"):
        call(t)
    call(t)  # and restores the methods after


class SyncingFirstOrder:
    """A user's estimator that decides on the host: it cannot be captured."""

    def meta_gradient(
        self,
        objective: tm.MetaObjective,
        params: Params,
        tasks: Sequence[tm.Task[Any]],
        generator: torch.Generator,
    ) -> tm.MetaGradient:
        result = tm.FirstOrder().meta_gradient(objective, params, tasks, generator)
        if result.loss > 100:  # bool(tensor): a host synchronisation
            raise RuntimeError("diverged")
        return result


def test_check_names_the_synchronisation_of_a_users_estimator() -> None:
    tasks = regression_tasks(3, torch.Generator().manual_seed(2))
    _, optimizer = capturing(SyncingFirstOrder(), gd(), "check")
    with pytest.raises(HostSyncError, match=r"Tensor.__bool__"):
        optimizer.step(tasks)
    _, eager = capturing(SyncingFirstOrder(), gd(), "auto")
    assert not eager.step(tasks).skipped  # on the CPU, "auto" never captures


def test_implicit_with_a_tolerance_cannot_be_captured() -> None:
    """CG that stops early decides on the host: such a step runs eagerly on a GPU."""
    tasks = regression_tasks(3, torch.Generator().manual_seed(3))
    _, optimizer = capturing(tm.Implicit(cg_steps=6, tol=1e-3), tm.Proximal(gd(), LAM), "check")
    with pytest.raises(HostSyncError):
        optimizer.step(tasks)


def test_capture_true_without_cuda_is_refused_and_bad_values_are_named() -> None:
    tasks = regression_tasks(2, torch.Generator().manual_seed(4))
    _, optimizer = capturing(tm.FiniteSum(), gd(), True)
    with pytest.raises(ValueError, match=r"capture=True, but .*not all on one CUDA device"):
        optimizer.step(tasks)
    with pytest.raises(ValueError, match="'capture' must be 'auto', True, False or 'check'"):
        capturing(tm.FiniteSum(), gd(), "always")
