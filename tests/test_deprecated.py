"""The compatibility modules of torch_maml 0.1: each old name warns, and still works.

``torch_maml.functional`` (the functions of the old functional layer),
``torch_maml.batching`` (moved to ``torch_maml.execution``) and
``torch_maml.compiling`` (compilation is now the optimizer's ``compile=``) keep their
names for a release. Each use warns with a ``DeprecationWarning`` that names the
replacement, and computes what it did, checked here against the new API or by hand.
The rest of the test suite uses only the new API.
"""

from __future__ import annotations

import importlib
import re
import warnings
from typing import Any

import pytest
import torch
from torch import Tensor

import torch_maml as tm
from tests.problems import (
    ALPHA,
    DIM,
    STEPS,
    TIGHT,
    Pair,
    Vector,
    grads_at,
    make_mlp,
    mse_by_hand,
    mse_loss,
    params_relative_error,
    quadratic_loss,
    random_quadratic,
    random_spd,
    reference_meta_gradient,
    regression_tasks,
    relative_error,
)
from torch_maml import algorithms, execution
from torch_maml.typing import Params

FUNCTIONAL = {
    "task_ops": "torch_maml.Ops(loss, inner_loop, batched=False)",
    "batched_ops": "torch_maml.Ops(loss, inner_loop, batched=True)",
    "loss_grad": "Ops.grad",
    "loss_hvp": "Ops.hvp",
    "inner_step": "Ops.step",
    "step_vjp": "Ops.step_vjp",
    "adapt": "MetaObjective.adapt or torch_maml.algorithms.rollout",
    "unrolled_meta_gradient": "torch_maml.algorithms.unrolled_meta_gradient",
    "recursion_meta_gradient": "torch_maml.algorithms.recursion_meta_gradient",
    "first_order_meta_gradient": "torch_maml.algorithms.first_order_meta_gradient",
    "reptile_meta_gradient": "torch_maml.algorithms.reptile_meta_gradient",
    "hessian_free_meta_gradient": "torch_maml.algorithms.hessian_free_meta_gradient",
    "implicit_meta_gradient": "torch_maml.algorithms.implicit_meta_gradient",
    "finite_difference_hvp": "torch_maml.algorithms.finite_difference_hvp",
    "conjugate_gradient": "torch_maml.algorithms.conjugate_gradient",
    "Ops": "torch_maml.Ops",
}
BATCHING = {
    "AUTO_CHUNK_BYTES": "torch_maml.execution.AUTO_CHUNK_BYTES",
    "AUTO_CHUNK_FACTOR": "torch_maml.execution.AUTO_CHUNK_FACTOR",
    "AUTO_CPU_TASK_ACTIVATIONS": "torch_maml.execution.AUTO_CPU_TASK_BYTES",
    "check_chunk_size": "torch_maml.execution.check_chunk_size",
    "chunk_sizes": "torch_maml.execution.chunk_sizes",
    "estimate_task_bytes": "torch_maml.execution.estimate_task_bytes",
    "plan_chunk_size": "torch_maml.execution.plan_chunks",
    "stack_task_data": "torch_maml.execution.stack_task_data",
    "take": "torch_maml.execution.take",
}


def old(module: str, name: str) -> Any:
    """``torch_maml.<module>.<name>``, checking the warning that says what replaces it."""
    replacement = (FUNCTIONAL if module == "functional" else BATCHING)[name]
    message = (
        f"torch_maml.{module}.{name} is deprecated and will be removed in the next release; "
        f"use {replacement}"
    )
    with pytest.warns(DeprecationWarning, match=f"^{re.escape(message)}$") as record:
        value = getattr(importlib.import_module(f"torch_maml.{module}"), name)
    assert len(record) == 1
    assert record[0].filename == __file__  # the warning points at the user's line
    return value


@pytest.mark.parametrize("name", sorted(FUNCTIONAL))
def test_every_old_functional_name_warns_with_its_replacement(name: str) -> None:
    assert callable(old("functional", name))


@pytest.mark.parametrize("name", sorted(BATCHING))
def test_every_old_batching_name_warns_with_its_replacement(name: str) -> None:
    old("batching", name)


def test_the_names_that_stay_do_not_warn() -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for module in ("functional", "batching", "compiling"):
            importlib.import_module(f"torch_maml.{module}")
        assert tm.functional.TaskLoss is tm.TaskLoss
        assert tm.functional.OracleCounts is tm.OracleCounts
        from torch_maml import batching

        assert batching.TaskData is tm.TaskData
        assert batching.TaskFootprint is execution.TaskFootprint
        assert batching.ChunkSize is execution.ChunkSize
        assert batching.Method is execution.Memory


@pytest.mark.parametrize("module", ["functional", "batching"])
def test_an_unknown_name_is_an_attribute_error(module: str) -> None:
    imported = importlib.import_module(f"torch_maml.{module}")
    with pytest.raises(
        AttributeError, match=f"module 'torch_maml.{module}' has no attribute 'nothing'"
    ):
        imported.nothing  # noqa: B018


# ---------------------------------------------------------------- functional, still working


def task_loss() -> tm.TaskLoss:
    model = make_mlp(0)
    return tm.TaskLoss(model, mse_loss, [n for n, _ in model.named_parameters()])


def one_task() -> tm.SupportQuery[Pair]:
    return regression_tasks(1, torch.Generator().manual_seed(0))[0]


def weights() -> list[Tensor]:
    return [p.detach() for p in make_mlp(0).parameters()]


def test_old_gradients_and_hessian_vector_products() -> None:
    loss, task = task_loss(), one_task()
    params = loss.params()
    grads, value = old("functional", "loss_grad")(loss, params, task.support)
    expected_value = mse_by_hand(weights(), task.support)
    expected = grads_at(weights(), task.support)
    assert params_relative_error(grads, dict(zip(params, expected, strict=True))) < TIGHT
    assert abs(float(value) - float(expected_value)) <= TIGHT * float(expected_value)

    vector = {n: torch.ones_like(p) for n, p in params.items()}
    product = old("functional", "loss_hvp")(loss, params, task.support, vector)
    new = tm.Ops(loss, None, batched=False).hvp(params, task.support, vector)
    assert all(torch.equal(product[n], new[n]) for n in params)


def test_old_operation_bundles_are_ops() -> None:
    loss, inner = task_loss(), tm.GradientDescent(STEPS, ALPHA)
    one = old("functional", "task_ops")(loss, inner)
    many = old("functional", "batched_ops")(loss, inner)
    assert isinstance(one, tm.Ops)
    assert isinstance(many, tm.Ops)
    assert (one.batched, many.batched) == (False, True)


def test_old_inner_steps_and_adaptation() -> None:
    loss, task, inner = task_loss(), one_task(), tm.GradientDescent(STEPS, ALPHA)
    params = loss.params()
    step, state = old("functional", "inner_step")(loss, inner, params, (), task.support)
    grads = grads_at(weights(), task.support)
    expected = {n: p - ALPHA * g for (n, p), g in zip(params.items(), grads, strict=True)}
    assert state == ()
    assert params_relative_error(step, expected) < TIGHT

    cotangent = ({n: torch.ones_like(p) for n, p in params.items()}, ())
    vjp = old("functional", "step_vjp")(loss, inner, params, (), task.support, cotangent)
    new = tm.Ops(loss, inner, batched=False).step_vjp(params, (), task.support, cotangent)
    assert all(torch.equal(vjp[0][n], new[0][n]) for n in params)

    counts = tm.OracleCounts()
    adapted = old("functional", "adapt")(loss, inner, params, [task.support] * STEPS, counts)
    rollout = algorithms.rollout(tm.Ops(loss, inner, batched=False), params, [task.support] * STEPS)
    assert all(torch.equal(adapted[n], rollout.params[n]) for n in params)
    assert counts.grad_evals == STEPS


def test_old_meta_gradients_equal_autograd_by_hand_and_count() -> None:
    loss, task, inner = task_loss(), one_task(), tm.GradientDescent(STEPS, ALPHA)
    params = loss.params()
    ops = tm.Ops(loss, inner, batched=False)
    support = [task.support] * STEPS
    expected = reference_meta_gradient(make_mlp(0), [task], STEPS, ALPHA)
    for name, arguments in (
        ("unrolled_meta_gradient", (ops, params, support, task.query)),
        ("recursion_meta_gradient", (ops, params, support, support, task.query)),
    ):
        counts = tm.OracleCounts()
        grads, _ = old("functional", name)(*arguments, counts)
        assert params_relative_error(grads, expected) < TIGHT, name
        assert (counts.grad_evals, counts.hvp_evals) == (STEPS + 1, STEPS)

    data = tm.TaskData(support, (), task.query)
    counts = tm.OracleCounts()
    grads, _ = old("functional", "first_order_meta_gradient")(
        ops, params, support, task.query, counts
    )
    new = algorithms.first_order_meta_gradient(ops, params, data)
    assert params_relative_error(grads, new.grads) < TIGHT
    assert counts.grad_evals == STEPS + 1

    counts = tm.OracleCounts()
    grads, _ = old("functional", "reptile_meta_gradient")(
        ops, loss, params, support, task.query, 2.0, counts
    )
    new = algorithms.reptile_meta_gradient(ops, params, data, scale=2.0)
    assert params_relative_error(grads, new.grads) < TIGHT
    assert counts.grad_evals == STEPS

    counts = tm.OracleCounts()
    grads, _ = old("functional", "hessian_free_meta_gradient")(
        ops, params, support, support, task.query, ALPHA, 1e-3, counts
    )
    new = algorithms.hessian_free_meta_gradient(ops, params, data, lr=ALPHA, delta=1e-3)
    assert params_relative_error(grads, new.grads) < TIGHT
    assert counts.grad_evals == 3 * STEPS + 1


def test_old_implicit_meta_gradient_is_the_dense_solve_on_a_quadratic() -> None:
    gen = torch.Generator().manual_seed(1)
    support, query = random_quadratic(DIM, gen), random_quadratic(DIM, gen)
    w = torch.randn(DIM, generator=gen, dtype=torch.float64)
    lam = 2.0
    inner = tm.Proximal(tm.GradientDescent(STEPS, ALPHA), lam)
    loss = tm.TaskLoss(Vector(w), quadratic_loss, ["w"])
    ops = tm.Ops(loss, inner, batched=False)
    params = loss.params()
    counts = tm.OracleCounts()
    grads, _ = old("functional", "implicit_meta_gradient")(
        ops, ops.hvp, params, [support] * STEPS, support, query, lam, DIM, 0.0, counts
    )
    phi = algorithms.rollout(ops, params, [support] * STEPS).params["w"]
    eye = torch.eye(DIM, dtype=torch.float64)
    expected = torch.linalg.solve(eye + support[0] / lam, query[0] @ phi - query[1])
    assert relative_error(grads["w"], expected) < TIGHT
    assert (counts.grad_evals, counts.hvp_evals) == (STEPS + 1, DIM)


def test_old_finite_differences_and_conjugate_gradient_on_a_quadratic() -> None:
    gen = torch.Generator().manual_seed(2)
    quadratic = random_quadratic(DIM, gen)
    c = torch.randn(DIM, generator=gen, dtype=torch.float64)
    loss = tm.TaskLoss(Vector(c), quadratic_loss, ["w"])
    params = loss.params()
    vector = {"w": torch.randn(DIM, generator=gen, dtype=torch.float64)}
    ops = tm.Ops(loss, None, batched=False)
    product = old("functional", "finite_difference_hvp")(ops.grad, params, quadratic, vector, 0.1)
    assert relative_error(product["w"], quadratic[0] @ vector["w"]) < TIGHT  # exact here

    matrix = random_spd(DIM, gen)

    def matvec(v: Params) -> Params:
        return {"w": matrix @ v["w"]}

    solution, iterations = old("functional", "conjugate_gradient")(matvec, {"w": c}, DIM)
    assert relative_error(solution["w"], torch.linalg.solve(matrix, c)) < TIGHT
    assert iterations == DIM


# ---------------------------------------------------------------- batching and compiling


def test_old_chunk_planning_still_plans() -> None:
    assert old("batching", "chunk_sizes")(25, 8) == [7, 6, 6, 6]
    assert old("batching", "chunk_sizes") is execution.chunk_sizes
    assert old("batching", "AUTO_CPU_TASK_ACTIVATIONS") == execution.AUTO_CPU_TASK_BYTES
    footprint = execution.TaskFootprint(1000, 1000, 4000, 10000, True)
    plan = old("batching", "plan_chunk_size")
    for setting in (None, 4, "auto"):
        assert plan(setting, 25, footprint) == execution.plan_chunks(setting, 25, footprint).size
    assert plan(None, 25, footprint) == 25


def test_old_compiled_ops_warns_that_it_no_longer_compiles() -> None:
    from torch_maml import compiling

    ops = tm.Ops(task_loss(), tm.GradientDescent(1, ALPHA), batched=False)
    with pytest.warns(DeprecationWarning, match="no longer compiles anything; pass compile=True"):
        assert compiling.compiled_ops(ops) is ops
