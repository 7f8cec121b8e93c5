"""Inner loops: GradientDescent (eq. 1), Momentum, Adam, Masked, a user's own, and which
estimator works with which.

Every reference here is independent of torch_maml: the inner loops are written out
by hand on lists of tensors (tests/problems.py, the MLP by ``mse_by_hand``),
differentiated with ``torch.autograd.grad(create_graph=True)``, or given in closed
form on quadratics. Gradients are float64 and compared at 1e-10 relative. Meta-SGD
runs here with the other loops against the hand-written references; its own tests are
in tests/test_meta_sgd.py, Proximal's in tests/test_proximal.py.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch import Tensor, nn

import torch_maml as tm
from tests.problems import (
    ALPHA,
    ESTIMATOR_CASES,
    SAME,
    STEPS,
    TIGHT,
    FixedBatches,
    HandLoop,
    Pair,
    Quadratic,
    RegressionSampler,
    adam_by_hand,
    by_name,
    estimator_case,
    hand_meta_gradient,
    make_mlp,
    meta_gradient,
    meta_sgd_by_hand,
    momentum_by_hand,
    mse_loss,
    params_relative_error,
    random_quadratic,
    random_spd,
    regression_tasks,
    relative_error,
    vector_meta_gradient,
    weights_and_step_sizes,
    wrapped_mlp,
)
from tests.typing_cases.user_components import HeavyBall, Traced
from torch_maml.inner import (
    AdamState,
    descent_lr,
    elementwise,
    proximal_lam,
    selects_parameters,
)

# ---------------------------------------------------------------- GradientDescent


def test_update_is_one_gradient_descent_step() -> None:
    inner = tm.GradientDescent(steps=3, lr=0.25)
    params = {"a": torch.tensor([1.0, 2.0], dtype=torch.float64), "b": torch.tensor(3.0)}
    grads = {"a": torch.tensor([4.0, -8.0], dtype=torch.float64), "b": torch.tensor(1.0)}
    state = inner.init(params)
    new, new_state = inner.update(params, grads, state)
    assert state == ()
    assert new_state == ()
    assert torch.equal(new["a"], torch.tensor([0.0, 4.0], dtype=torch.float64))
    assert torch.equal(new["b"], torch.tensor(2.75))
    assert torch.equal(params["a"], torch.tensor([1.0, 2.0], dtype=torch.float64))  # not in place


def test_is_an_inner_loop_and_immutable() -> None:
    inner = tm.GradientDescent(steps=2, lr=1)
    assert isinstance(inner, tm.InnerLoop)
    assert isinstance(inner, tm.GradientDescentSteps)
    assert descent_lr(inner) == 1.0
    assert isinstance(inner.lr, float)
    with pytest.raises(AttributeError):
        inner.steps = 3  # type: ignore[misc]


@pytest.mark.parametrize(
    ("kwargs", "error", "pattern"),
    [
        ({"steps": 0, "lr": 0.1}, ValueError, "'steps' must be a positive int \\(got 0\\)"),
        ({"steps": -2, "lr": 0.1}, ValueError, "'steps' must be a positive int \\(got -2\\)"),
        ({"steps": 2.0, "lr": 0.1}, TypeError, "'steps' must be a positive int \\(got 2.0\\)"),
        ({"steps": True, "lr": 0.1}, TypeError, "'steps' must be a positive int \\(got True\\)"),
        ({"steps": 1, "lr": 0.0}, ValueError, "'lr' must be a finite number > 0 \\(got 0.0\\)"),
        ({"steps": 1, "lr": -0.1}, ValueError, "'lr' must be a finite number > 0 \\(got -0.1\\)"),
        (
            {"steps": 1, "lr": math.nan},
            ValueError,
            "'lr' must be a finite number > 0 \\(got nan\\)",
        ),
        ({"steps": 1, "lr": "0.1"}, TypeError, "'lr' must be a finite number > 0 \\(got '0.1'\\)"),
        (
            {"steps": 1, "lr": 0.1, "L": 0},
            ValueError,
            "'L' must be a finite number > 0 \\(got 0.0\\)",
        ),
    ],
)
def test_bad_arguments_are_named(
    kwargs: dict[str, object], error: type[Exception], pattern: str
) -> None:
    with pytest.raises(error, match=pattern):
        tm.GradientDescent(**kwargs)  # type: ignore[arg-type]


# ---------------------------------------------------------------- meta gradients on the MLP

LOOPS: dict[str, tuple[tm.InnerLoop, HandLoop]] = {
    "momentum": (tm.Momentum(STEPS, lr=0.05, momentum=0.9), momentum_by_hand(0.05, 0.9, False)),
    "nesterov": (
        tm.Momentum(STEPS, lr=0.05, momentum=0.8, nesterov=True),
        momentum_by_hand(0.05, 0.8, True),
    ),
    "adam": (
        tm.Adam(STEPS, lr=0.01, betas=(0.8, 0.99), eps=1e-6),
        adam_by_hand(0.01, (0.8, 0.99), 1e-6),
    ),
    "meta-sgd": (tm.MetaSGD(STEPS), meta_sgd_by_hand()),
}


def build_model(loop: str) -> nn.Module:
    return wrapped_mlp(0) if loop == "meta-sgd" else make_mlp(0)


def model_meta_gradient(
    model: nn.Module,
    inner: tm.InnerLoop,
    estimator: tm.MetaGradientEstimator,
    tasks: Any,
    **options: Any,
) -> tm.typing.Params:
    grads, _ = meta_gradient(model, mse_loss, inner, estimator, tasks, **options)
    assert set(grads) == {n for n, _ in model.named_parameters()}
    return grads


@pytest.mark.parametrize(
    ("loop", "estimator"),
    [pytest.param(name, e, id=f"{name}-{e}") for name in LOOPS for e in ESTIMATOR_CASES],
)
def test_meta_gradient_equals_the_hand_unrolled_loop(loop: str, estimator: str) -> None:
    """Exact, FiniteSum (list, stacked, one by one) and Resampled == autograd by hand."""
    tasks = regression_tasks(3, torch.Generator().manual_seed(0))
    inner, hand = LOOPS[loop]
    weights, step_sizes = weights_and_step_sizes(build_model(loop))
    hand_tasks = [([t.support] * STEPS, [t.support] * STEPS, t.query) for t in tasks]
    model = build_model(loop)
    expected = by_name(model, hand_meta_gradient(hand, weights, step_sizes, hand_tasks))

    chosen, meta_batch, options = estimator_case(estimator, tasks)
    actual = model_meta_gradient(model, inner, chosen, meta_batch, **options)
    assert params_relative_error(actual, expected) < TIGHT


@pytest.mark.parametrize(
    ("loop", "tasks"),
    [pytest.param(name, count, id=f"{name}-{count}-tasks") for name in LOOPS for count in (3, 1)],
)
def test_resampled_takes_each_hessian_on_its_own_batch(loop: str, tasks: int) -> None:
    """Eq. 7 for any inner loop: the step Jacobians on D_j, the iterates on S_j."""
    generator = torch.Generator().manual_seed(3)
    samplers, hand_tasks = [], []
    for i in range(tasks):
        source = RegressionSampler(amplitude=1.0 + 0.5 * i, phase=0.3 * i)
        inner_batch = source.sample(6, generator)
        hessian_batch = source.sample(7, generator)
        outer_batch = source.sample(9, generator)
        samplers.append(FixedBatches({6: inner_batch, 7: hessian_batch, 9: outer_batch}))
        hand_tasks.append(([inner_batch] * STEPS, [hessian_batch] * STEPS, outer_batch))
    inner, hand = LOOPS[loop]
    weights, step_sizes = weights_and_step_sizes(build_model(loop))
    model = build_model(loop)
    expected = by_name(model, hand_meta_gradient(hand, weights, step_sizes, hand_tasks))
    estimator = tm.Resampled(inner_size=6, hessian_size=7, outer_size=9)
    actual = model_meta_gradient(model, inner, estimator, samplers)
    assert params_relative_error(actual, expected) < TIGHT
    # and it is not the unrolled gradient, whose Hessians are taken on the inner batches
    unrolled = hand_meta_gradient(
        hand, weights, step_sizes, [(s, s, outer) for s, _, outer in hand_tasks]
    )
    assert params_relative_error(actual, by_name(model, unrolled)) > 1e-4


@pytest.mark.slow
@pytest.mark.integration
@pytest.mark.parametrize("loop", list(LOOPS))
def test_compiled_meta_gradient_equals_the_hand_unrolled_loop(loop: str) -> None:
    tasks = regression_tasks(3, torch.Generator().manual_seed(0))
    inner, hand = LOOPS[loop]
    weights, step_sizes = weights_and_step_sizes(build_model(loop))
    hand_tasks = [([t.support] * STEPS, [t.support] * STEPS, t.query) for t in tasks]
    model = build_model(loop)
    expected = by_name(model, hand_meta_gradient(hand, weights, step_sizes, hand_tasks))
    actual = model_meta_gradient(  # the second call runs compiled code, the first eagerly
        model, inner, tm.FiniteSum(), tm.StackedTasks.stack(tasks), calls=2, compile=True
    )
    assert params_relative_error(actual, expected) < TIGHT


@pytest.mark.parametrize("steps", [1, 3])
def test_a_users_stateful_inner_loop_works_with_every_estimator(steps: int) -> None:
    """The recursion carries the optimizer state's cotangent too: FiniteSum == Exact ==
    autograd through the unrolled heavy-ball loop, by hand."""
    tasks = regression_tasks(3, torch.Generator().manual_seed(0))
    inner = HeavyBall(steps=steps, lr=0.05, momentum=0.9)
    hand_tasks = [([t.support] * steps, [t.support] * steps, t.query) for t in tasks]
    weights = [p.detach() for p in make_mlp(0).parameters()]
    reference = by_name(
        make_mlp(0), hand_meta_gradient(momentum_by_hand(0.05, 0.9, False), weights, [], hand_tasks)
    )
    for estimator in (tm.Exact(), tm.FiniteSum()):
        grads = model_meta_gradient(make_mlp(0), inner, estimator, tasks)
        assert params_relative_error(grads, reference) < TIGHT, type(estimator).__name__


# ---------------------------------------------------------------- closed forms on quadratics


def quadratic_task(dim: int, seed: int) -> tm.SupportQuery[Quadratic]:
    generator = torch.Generator().manual_seed(seed)
    return tm.SupportQuery(random_quadratic(dim, generator), random_quadratic(dim, generator))


@pytest.mark.parametrize("nesterov", [False, True])
def test_momentum_on_a_quadratic_matches_the_closed_form(nesterov: bool) -> None:
    """The state (w, b) moves linearly: d w_N / d w_0 is a block of T^N."""
    dim, lr, mu, steps = 4, 0.1, 0.7, 5
    task = quadratic_task(dim, 0)
    (a, c), (a_t, c_t) = task.support, task.query
    w0 = torch.randn(dim, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    w, b = w0, torch.zeros(dim, dtype=torch.float64)
    for _ in range(steps):
        g = a @ w - c
        b = mu * b + g
        w = w - lr * (g + mu * b if nesterov else b)
    eye = torch.eye(dim, dtype=torch.float64)
    if nesterov:
        top = torch.cat([eye - lr * (1 + mu) * a, -lr * mu * mu * eye], dim=1)
    else:
        top = torch.cat([eye - lr * a, -lr * mu * eye], dim=1)
    transition = torch.cat([top, torch.cat([a, mu * eye], dim=1)])
    jacobian = torch.linalg.matrix_power(transition, steps)[:dim, :dim]
    expected = jacobian.T @ (a_t @ w - c_t)

    inner = tm.Momentum(steps, lr=lr, momentum=mu, nesterov=nesterov)
    for estimator in (tm.Exact(), tm.FiniteSum()):
        assert relative_error(vector_meta_gradient(w0, inner, estimator, [task]), expected) < TIGHT


def adam_first_step_task(dim: int) -> tuple[tm.SupportQuery[Quadratic], Tensor]:
    """A quadratic task and w_0 = 0 where the last coordinate's gradient is exactly 0."""
    generator = torch.Generator().manual_seed(4)
    a = random_spd(dim, generator)  # coupled: the zero coordinate has a Hessian row
    c = torch.randn(dim, generator=generator, dtype=torch.float64)
    c[-1] = 0.0  # g(0) = -c
    return tm.SupportQuery((a, c), random_quadratic(dim, generator)), torch.zeros(
        dim, dtype=torch.float64
    )


@pytest.mark.parametrize("eps", [1e-8, 0.1])
def test_adam_with_an_exactly_zero_gradient_matches_the_first_step_closed_form(
    eps: float,
) -> None:
    """One Adam step is ``w - lr g / (|g| + eps)``: Jacobian ``I - lr diag(eps/(|g|+eps)^2) A``.

    Its derivative is finite at g = 0 (1/eps), where plain autograd through sqrt(v)
    gives NaN.
    """
    dim, lr = 3, 0.1
    task, w0 = adam_first_step_task(dim)
    (a, c), (a_t, c_t) = task.support, task.query
    g = a @ w0 - c
    assert g[-1] == 0.0
    w1 = w0 - lr * g / (g.abs() + eps)
    scale = eps / (g.abs() + eps) ** 2
    expected = (torch.eye(dim, dtype=torch.float64) - lr * torch.diag(scale) @ a).T @ (
        a_t @ w1 - c_t
    )
    for estimator in (tm.Exact(), tm.FiniteSum()):
        actual = vector_meta_gradient(w0, tm.Adam(1, lr=lr, eps=eps), estimator, [task])
        assert bool(torch.isfinite(actual).all())
        assert relative_error(actual, expected) < TIGHT


def test_adam_with_an_exactly_zero_gradient_over_several_steps() -> None:
    """Against Adam by hand with sqrt(max(v, 1e-300)), and central finite differences."""
    dim, lr, eps, steps = 3, 0.1, 0.1, 3
    task, w0 = adam_first_step_task(dim)
    init, step = adam_by_hand(lr, (0.9, 0.999), eps, sqrt=lambda v: v.clamp_min(1e-300).sqrt())
    start = w0.clone().requires_grad_(True)

    def hand_loss(vector: list[Tensor], batch: Quadratic) -> Tensor:
        a, c = batch
        value: Tensor = 0.5 * vector[0] @ a @ vector[0] - c @ vector[0]
        return value

    def meta_loss(weights: Tensor, create_graph: bool) -> Tensor:
        w, state = [weights], init([weights])
        for j in range(steps):
            g = torch.autograd.grad(hand_loss(w, task.support), w, create_graph=create_graph)
            w, state = step(j, w, g, state, [])
        return hand_loss(w, task.query)

    (expected,) = torch.autograd.grad(meta_loss(start, True), [start])
    for estimator in (tm.Exact(), tm.FiniteSum()):
        actual = vector_meta_gradient(w0, tm.Adam(steps, lr=lr, eps=eps), estimator, [task])
        assert relative_error(actual, expected) < TIGHT

    h = 1e-6
    differences = []
    for i in range(dim):
        e = torch.zeros(dim, dtype=torch.float64)
        e[i] = h
        up = meta_loss((w0 + e).requires_grad_(True), False)
        down = meta_loss((w0 - e).requires_grad_(True), False)
        differences.append((up - down).detach() / (2 * h))
    assert relative_error(expected, torch.stack(differences)) < 1e-4  # a kink at g = 0: O(h/eps)


@pytest.mark.parametrize("nesterov", [False, True])
def test_momentum_zero_is_gradient_descent(nesterov: bool) -> None:
    tasks = regression_tasks(3, torch.Generator().manual_seed(5))
    expected = model_meta_gradient(
        make_mlp(0), tm.GradientDescent(STEPS, 0.05), tm.FiniteSum(), tasks
    )
    inner = tm.Momentum(STEPS, 0.05, momentum=0.0, nesterov=nesterov)
    actual = model_meta_gradient(make_mlp(0), inner, tm.FiniteSum(), tasks)
    assert params_relative_error(actual, expected) < SAME


# ---------------------------------------------------------------- iterates against torch.optim


def quadratic_iterates(
    optimizer: Callable[[list[nn.Parameter]], torch.optim.Optimizer], steps: int
) -> list[Tensor]:
    generator = torch.Generator().manual_seed(9)
    a, c = random_quadratic(3, generator)
    c[0] = 0.0  # with w_0 = 0, coordinate 0 starts with an exactly zero gradient
    w = nn.Parameter(torch.zeros(3, dtype=torch.float64))
    opt = optimizer([w])
    iterates = []
    for _ in range(steps):
        (w.grad,) = torch.autograd.grad(0.5 * w @ a @ w - c @ w, [w])
        opt.step()
        iterates.append(w.detach().clone())
    return iterates


def inner_loop_iterates(inner: tm.InnerLoop, steps: int) -> list[Tensor]:
    generator = torch.Generator().manual_seed(9)
    a, c = random_quadratic(3, generator)
    c[0] = 0.0
    params = {"w": torch.zeros(3, dtype=torch.float64)}
    state = inner.init(params)
    iterates = []
    for _ in range(steps):
        params, state = inner.update(params, {"w": a @ params["w"] - c}, state)
        iterates.append(params["w"])
    return iterates


@pytest.mark.parametrize(
    ("inner", "optimizer"),
    [
        (
            tm.Momentum(6, lr=0.1, momentum=0.9),
            lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9),
        ),
        (
            tm.Momentum(6, lr=0.1, momentum=0.5, nesterov=True),
            lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.5, nesterov=True),
        ),
        (
            tm.Adam(6, lr=0.05, betas=(0.8, 0.95), eps=1e-3),
            lambda p: torch.optim.Adam(p, lr=0.05, betas=(0.8, 0.95), eps=1e-3),
        ),
        (tm.Adam(6, lr=0.05), lambda p: torch.optim.Adam(p, lr=0.05)),
    ],
    ids=["momentum", "nesterov", "adam", "adam-defaults"],
)
def test_iterates_are_those_of_torch_optim(
    inner: tm.InnerLoop, optimizer: Callable[[list[nn.Parameter]], torch.optim.Optimizer]
) -> None:
    expected = quadratic_iterates(optimizer, inner.steps)
    actual = inner_loop_iterates(inner, inner.steps)
    for mine, theirs in zip(actual, expected, strict=True):
        assert torch.allclose(mine, theirs, rtol=1e-13, atol=1e-15)


def test_the_state_is_a_pytree_of_tensors() -> None:
    params = {"a": torch.ones(2, dtype=torch.float64), "b": torch.ones(())}
    state = tm.Adam(2, 0.1).init(params)
    assert set(state) == set(AdamState.__annotations__) == {"m", "v", "t"}
    assert state["t"].dtype == torch.float64
    assert state["t"].item() == 0.0
    assert state["m"]["a"] is not state["v"]["a"]
    _, state = tm.Adam(2, 0.1).update(params, params, state)
    assert state["t"].item() == 1.0
    buffers = tm.Momentum(2, 0.1).init(params)
    assert set(buffers) == {"a", "b"}
    assert all(bool((b == 0).all()) for b in buffers.values())


def test_the_inner_loops_are_immutable_inner_loops() -> None:
    for inner in (tm.Momentum(2, 1), tm.Adam(2, 1), tm.MetaSGD(2)):
        assert isinstance(inner, tm.InnerLoop)
        assert descent_lr(inner) is None
        with pytest.raises(AttributeError):
            inner.steps = 3  # type: ignore[misc]
    adam = tm.Adam(2, 1, betas=[0, 0.5])  # type: ignore[arg-type]
    assert adam.betas == (0.0, 0.5)
    assert isinstance(tm.Momentum(2, 1, momentum=0).momentum, float)


@pytest.mark.parametrize(
    ("build", "error", "message"),
    [
        (lambda: tm.Momentum(0, 0.1), ValueError, "'steps' must be a positive int (got 0)"),
        (lambda: tm.Momentum(1, 0.0), ValueError, "'lr' must be a finite number > 0 (got 0.0)"),
        (lambda: tm.Momentum(1, -1), ValueError, "'lr' must be a finite number > 0 (got -1.0)"),
        (lambda: tm.Momentum(1, 0.1, 1.5), ValueError, "'momentum' must be in [0, 1) (got 1.5)"),
        (lambda: tm.Momentum(1, 0.1, 1), ValueError, "'momentum' must be in [0, 1) (got 1.0)"),
        (lambda: tm.Momentum(1, 0.1, -0.1), ValueError, "'momentum' must be in [0, 1) (got -0.1)"),
        (
            lambda: tm.Momentum(1, 0.1, math.nan),
            ValueError,
            "'momentum' must be in [0, 1) (got nan)",
        ),
        (
            lambda: tm.Momentum(1, 0.1, "0.9"),  # type: ignore[arg-type]
            TypeError,
            "'momentum' must be in [0, 1) (got '0.9')",
        ),
        (
            lambda: tm.Momentum(1, 0.1, nesterov=1),  # type: ignore[arg-type]
            TypeError,
            "'nesterov' must be a bool (got 1)",
        ),
        (lambda: tm.Adam(0, 0.1), ValueError, "'steps' must be a positive int (got 0)"),
        (
            lambda: tm.Adam(1.5, 0.1),  # type: ignore[arg-type]
            TypeError,
            "'steps' must be a positive int (got 1.5)",
        ),
        (lambda: tm.Adam(1, 0), ValueError, "'lr' must be a finite number > 0 (got 0.0)"),
        (
            lambda: tm.Adam(1, 0.1, betas=(1.0, 0.999)),
            ValueError,
            "'betas[0]' must be in [0, 1) (got 1.0)",
        ),
        (
            lambda: tm.Adam(1, 0.1, betas=(0.9, -0.5)),
            ValueError,
            "'betas[1]' must be in [0, 1) (got -0.5)",
        ),
        (
            lambda: tm.Adam(1, 0.1, betas=(0.9,)),  # type: ignore[arg-type]
            TypeError,
            "'betas' must be a pair of numbers in [0, 1) (got (0.9,))",
        ),
        (
            lambda: tm.Adam(1, 0.1, betas=0.9),  # type: ignore[arg-type]
            TypeError,
            "'betas' must be a pair of numbers in [0, 1) (got an object of type float)",
        ),
        (lambda: tm.Adam(1, 0.1, eps=0), ValueError, "'eps' must be a finite number > 0 (got 0.0)"),
        (
            lambda: tm.Adam(1, 0.1, eps=-1e-8),
            ValueError,
            "'eps' must be a finite number > 0 (got -1e-08)",
        ),
    ],
)
def test_bad_momentum_and_adam_arguments_are_named(
    build: Callable[[], object], error: type[Exception], message: str
) -> None:
    with pytest.raises(error) as raised:
        build()
    assert str(raised.value) == message


# ---------------------------------------------------------------- Masked: a public selection


def masked_or_selected(
    inner: tm.InnerLoop,
    estimator: tm.MetaGradientEstimator,
    selection: tm.ParamSelection,
    tasks: Any,
    masked: bool,
) -> tuple[tm.typing.Params, tm.MetaBackwardInfo]:
    if masked:
        return meta_gradient(make_mlp(0), mse_loss, tm.Masked(inner, selection), estimator, tasks)
    return meta_gradient(make_mlp(0), mse_loss, inner, estimator, tasks, adapted=selection)


MASKED_CASES: list[tuple[str, tm.InnerLoop, tm.MetaGradientEstimator]] = [
    ("FiniteSum", tm.GradientDescent(STEPS, ALPHA), tm.FiniteSum()),
    ("Exact", tm.GradientDescent(STEPS, ALPHA), tm.Exact()),
    ("FirstOrder", tm.GradientDescent(STEPS, ALPHA), tm.FirstOrder()),
    ("HessianFree", tm.GradientDescent(STEPS, ALPHA), tm.HessianFree(1e-3)),
    ("FiniteSum, Adam", tm.Adam(STEPS, 0.01), tm.FiniteSum()),
    ("Implicit", tm.Proximal(tm.GradientDescent(STEPS, ALPHA), 2.0), tm.Implicit(cg_steps=20)),
]


@pytest.mark.parametrize(
    ("name", "inner", "estimator"), MASKED_CASES, ids=[c[0] for c in MASKED_CASES]
)
@pytest.mark.parametrize(
    "selection", [["2"], lambda name: name.startswith("2.")], ids=["prefix", "predicate"]
)
def test_masked_as_the_inner_loop_is_the_adapted_selection(
    name: str,
    inner: tm.InnerLoop,
    estimator: tm.MetaGradientEstimator,
    selection: tm.ParamSelection,
) -> None:
    tasks = regression_tasks(3, torch.Generator().manual_seed(6))
    expected, expected_info = masked_or_selected(inner, estimator, selection, tasks, False)
    actual, info = masked_or_selected(inner, estimator, selection, tasks, True)
    assert params_relative_error(actual, expected) < SAME
    assert (info.grad_evals, info.hvp_evals) == (expected_info.grad_evals, expected_info.hvp_evals)
    every, _ = meta_gradient(make_mlp(0), mse_loss, inner, estimator, tasks)
    assert params_relative_error(actual, every) > 1e-3  # the selection mattered


def test_masked_as_the_inner_loop_takes_the_same_steps_as_the_adapted_selection() -> None:
    """Everything the optimizer derives from the selection follows a Masked inner loop too:
    ``adapted``, ``adapt``, and the smoothness re-estimates of SmoothnessAdaptive, whose
    L, rho and b are measured on the adapted parameters."""
    tasks = regression_tasks(3, torch.Generator().manual_seed(7))
    runs = []
    for masked in (False, True):
        model = make_mlp(0)
        inner: tm.InnerLoop = tm.GradientDescent(2, ALPHA)
        meta_opt: tm.MetaOptimizer[nn.Module, Pair] = tm.MetaOptimizer(
            model,
            mse_loss,
            inner_loop=tm.Masked(inner, ["2"]) if masked else inner,
            estimator=tm.FiniteSum(),
            step_size=tm.SmoothnessAdaptive(
                L=1.0, rho=1.0, c_beta=80, every=1, estimate_options={"iterations": 20}
            ),
            generator=torch.Generator().manual_seed(0),
            adapted=None if masked else ["2"],
        )
        infos = [meta_opt.step(tasks) for _ in range(2)]
        runs.append((meta_opt.adapted, infos, meta_opt.adapt(tasks[0]), dict(model.state_dict())))
    (adapted, infos, weights, state), (m_adapted, m_infos, m_weights, m_state) = runs
    assert m_adapted == adapted == ("2.weight", "2.bias")
    assert [(i.beta, i.lhat) for i in m_infos] == [(i.beta, i.lhat) for i in infos]
    assert all(torch.equal(m_weights[n], weights[n]) for n in weights)
    assert all(torch.equal(m_state[n], state[n]) for n in state)


def test_masked_forwards_what_the_estimators_need_of_its_inner_loop() -> None:
    """The optional methods of the wrapped loop, found as the estimators find them."""
    descent = tm.Masked(tm.GradientDescent(2, 0.1), ["head"])
    assert isinstance(descent, tm.InnerLoop)
    assert (descent.steps, descent.descent_lr()) == (2, 0.1)
    assert (descent_lr(descent), proximal_lam(descent)) == (0.1, None)
    assert selects_parameters(descent)
    assert elementwise(descent)
    proximal = tm.Masked(tm.Proximal(tm.GradientDescent(3, 0.1), 2.0), ["head"])
    assert (proximal.steps, proximal.proximal_lam()) == (3, 2.0)
    assert (descent_lr(proximal), proximal_lam(proximal)) == (None, 2.0)
    assert descent_lr(tm.Masked(tm.Momentum(2, 0.1), ["head"])) is None
    assert not selects_parameters(tm.GradientDescent(2, 0.1))
    names = ["body.weight", "head.weight", "head.bias"]
    assert descent.adapted_names(names) == ("head.weight", "head.bias")
    assert tm.Masked(descent, ["head.bias"]).adapted_names(names) == ("head.bias",)


def test_masked_steps_only_the_selection() -> None:
    inner = tm.Masked(tm.Momentum(2, 0.5, momentum=0.5), lambda name: name != "frozen")
    params = {"moving": torch.ones(2), "frozen": torch.ones(2)}
    grads = {"moving": torch.full((2,), 2.0), "frozen": torch.full((2,), 2.0)}
    state = inner.init(params)
    assert set(state) == {"moving"}  # the wrapped loop's state, of the selection only
    new, state = inner.update(params, grads, state)
    assert torch.equal(new["moving"], torch.zeros(2))
    assert new["frozen"] is params["frozen"]


@pytest.mark.parametrize(
    ("build", "error", "message"),
    [
        (
            lambda: tm.Masked(tm.GradientDescent(2, 0.1), "head"),
            TypeError,
            "'selection' must be a collection of parameter names or module prefixes, or a "
            "predicate on names (got 'head')",
        ),
        (
            lambda: tm.Masked(tm.GradientDescent(2, 0.1), [1]),  # type: ignore[list-item]
            TypeError,
            "'selection' must be a collection of parameter names or module prefixes, or a "
            "predicate on names (got [1])",
        ),
        (
            lambda: tm.Masked(tm.GradientDescent(2, 0.1), None),  # type: ignore[arg-type]
            TypeError,
            "'selection' must be a collection of parameter names or module prefixes, or a "
            "predicate on names (got None)",
        ),
        (
            lambda: tm.Masked("gd", ["head"]),  # type: ignore[arg-type]
            TypeError,
            "'inner_loop' must implement the InnerLoop protocol (got an object of type str)",
        ),
    ],
    ids=["a string", "not names", "None", "not an inner loop"],
)
def test_bad_masks_are_named(
    build: Callable[[], object], error: type[Exception], message: str
) -> None:
    with pytest.raises(error, match=f"^{re.escape(message)}$"):
        build()


def test_a_mask_that_selects_nothing_is_refused_when_the_optimizer_is_built() -> None:
    with pytest.raises(
        ValueError,
        match=re.escape(
            "'selection' entry 'tail' selects no trainable parameter: the trainable parameters "
            "are ['0.weight', '0.bias', '2.weight', '2.bias']"
        ),
    ):
        tm.MetaOptimizer(
            make_mlp(0),
            mse_loss,
            inner_loop=tm.Masked(tm.GradientDescent(2, ALPHA), ["tail"]),
            estimator=tm.FiniteSum(),
            step_size=tm.Constant(0.1),
        )


# ---------------------------------------------------------------- a user's wrapper


def wrapper_runs(
    estimator: tm.MetaGradientEstimator, step_size: Callable[[], tm.StepSizePolicy]
) -> list[tuple[list[tm.MetaStepInfo], dict[str, Tensor]]]:
    """Two steps with GradientDescent, then with a user's transparent wrapper of it."""
    tasks = regression_tasks(3, torch.Generator().manual_seed(8))
    runs = []
    for wrapped in (False, True):
        model = make_mlp(0)
        inner: tm.InnerLoop = tm.GradientDescent(STEPS, ALPHA)
        traced = Traced(inner)
        meta_opt: tm.MetaOptimizer[nn.Module, Pair] = tm.MetaOptimizer(
            model,
            mse_loss,
            inner_loop=traced if wrapped else inner,
            estimator=estimator,
            step_size=step_size(),
            generator=torch.Generator().manual_seed(0),
        )
        infos = [meta_opt.step(tasks) for _ in range(2)]
        runs.append((infos, dict(model.state_dict())))
        assert (traced.updates > 0) == wrapped  # the wrapper's steps were the ones taken
    return runs


@pytest.mark.parametrize(
    ("estimator", "step_size"),
    [
        (tm.HessianFree(1e-3), lambda: tm.Constant(0.1)),
        (tm.Reptile(), lambda: tm.Constant(0.1)),
        (tm.FiniteSum(), lambda: tm.SmoothnessAdaptive(L=1.0, rho=1.0, c_beta=80, b=0.1)),
    ],
    ids=["HessianFree", "Reptile", "SmoothnessAdaptive"],
)
def test_a_transparent_wrapper_of_gradient_descent_is_gradient_descent(
    estimator: tm.MetaGradientEstimator, step_size: Callable[[], tm.StepSizePolicy]
) -> None:
    """Whatever needs gradient descent (HessianFree, Reptile()'s scale 1/(N alpha),
    SmoothnessAdaptive's eq. 22) takes a wrapper that forwards ``descent_lr``: the same
    steps, bitwise."""
    assert descent_lr(Traced(tm.GradientDescent(1, ALPHA))) == ALPHA
    (infos, state), (wrapped_infos, wrapped_state) = wrapper_runs(estimator, step_size)
    for info, wrapped in zip(infos, wrapped_infos, strict=True):
        assert (wrapped.beta, wrapped.lhat, wrapped.grad_evals, wrapped.hvp_evals) == (
            info.beta,
            info.lhat,
            info.grad_evals,
            info.hvp_evals,
        )
        assert torch.equal(wrapped.loss, info.loss)
    assert all(torch.equal(wrapped_state[n], state[n]) for n in state)


def test_a_transparent_wrapper_of_another_loop_is_refused_like_it() -> None:
    with pytest.raises(TypeError, match="HessianFree needs a GradientDescent inner loop"):
        tm.MetaOptimizer(
            make_mlp(0),
            mse_loss,
            inner_loop=Traced(tm.Momentum(2, 0.1)),
            estimator=tm.HessianFree(1e-3),
            step_size=tm.Constant(0.1),
        )


# ---------------------------------------------------------------- which estimator, which loop

COMPATIBILITY_LOOPS: dict[str, Callable[[], tm.InnerLoop]] = {
    "GradientDescent": lambda: tm.GradientDescent(steps=2, lr=0.1),
    "Momentum": lambda: tm.Momentum(steps=2, lr=0.1),
    "Adam": lambda: tm.Adam(steps=2, lr=0.01),
    "MetaSGD": lambda: tm.MetaSGD(steps=2),
    "Proximal": lambda: tm.Proximal(tm.Momentum(steps=2, lr=0.1), lam=1.0),
}
COMPATIBILITY_ESTIMATORS: dict[str, Callable[[], tm.MetaGradientEstimator]] = {
    "Exact": tm.Exact,
    "FiniteSum": tm.FiniteSum,
    "FirstOrder": tm.FirstOrder,
    "Reptile": tm.Reptile,
    "Reptile(scale)": lambda: tm.Reptile(scale=1.0),
    "HessianFree": lambda: tm.HessianFree(1e-3),
    "Implicit": lambda: tm.Implicit(cg_steps=5),
}
REFUSED = {
    # (inner loop, estimator): what the message starts with
    **{
        (loop, "Reptile"): "Reptile() needs a GradientDescent inner loop: it takes its scale "
        "1 / (N * lr) from it"
        for loop in ("Momentum", "Adam", "MetaSGD", "Proximal")
    },
    **{
        (loop, "HessianFree"): "HessianFree needs a GradientDescent inner loop"
        for loop in ("Momentum", "Adam", "MetaSGD", "Proximal")
    },
    **{
        (loop, "Implicit"): "Implicit needs a Proximal inner loop"
        for loop in ("GradientDescent", "Momentum", "Adam", "MetaSGD")
    },
}


def compatibility_model(loop: str) -> nn.Module:
    model = make_mlp(0)
    return tm.LearnedStepSizes(model, lr=0.1) if loop == "MetaSGD" else model


@pytest.mark.parametrize("estimator", list(COMPATIBILITY_ESTIMATORS))
@pytest.mark.parametrize("loop", list(COMPATIBILITY_LOOPS))
def test_estimator_with_inner_loop(loop: str, estimator: str) -> None:
    """Every pair computes a finite, nonzero meta gradient, or is refused with a TypeError
    that names what the estimator needs, when the optimizer is built: nothing changes."""
    model = compatibility_model(loop)
    before = {k: v.clone() for k, v in model.state_dict().items()}

    def build() -> tm.MetaOptimizer[nn.Module, Pair]:
        return tm.MetaOptimizer(
            model,
            mse_loss,
            inner_loop=COMPATIBILITY_LOOPS[loop](),
            estimator=COMPATIBILITY_ESTIMATORS[estimator](),
            step_size=tm.Constant(0.01),
        )

    refused = REFUSED.get((loop, estimator))
    if refused is None:
        meta_opt = build()
        meta_opt.meta_backward(regression_tasks(2, torch.Generator().manual_seed(0)))
        grads = [p.grad for p in model.parameters() if p.requires_grad]
        assert all(g is not None and bool(torch.isfinite(g).all()) for g in grads)
        assert any(bool(g.abs().sum() > 0) for g in grads if g is not None)
        return
    with pytest.raises(TypeError, match="^" + re.escape(refused)):
        build()
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key])
    assert all(p.grad is None for p in model.parameters())


@pytest.mark.parametrize("loop", [*COMPATIBILITY_LOOPS, "Adam(lr=0.1)"])
def test_smoothness_adaptive_needs_gradient_descent(loop: str) -> None:
    inner = tm.Adam(2, 0.1) if loop == "Adam(lr=0.1)" else COMPATIBILITY_LOOPS[loop]()

    def build() -> tm.MetaOptimizer[nn.Module, Pair]:
        return tm.MetaOptimizer(
            compatibility_model(loop),
            mse_loss,
            inner_loop=inner,
            estimator=tm.FiniteSum(),
            step_size=tm.SmoothnessAdaptive(L=1.0, rho=1.0, c_beta=80),
        )

    if loop == "GradientDescent":
        build()
        return
    with pytest.raises(TypeError, match=r"^SmoothnessAdaptive needs a GradientDescent inner loop"):
        build()
