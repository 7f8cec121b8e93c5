"""Meta-SGD: learned elementwise step sizes (LearnedStepSizes and the MetaSGD inner loop).

The meta gradients of the weights and of the step sizes against closed forms on
quadratics, GradientDescent with equal step sizes, finite differences in alpha, and
the loop written by hand (tests/problems.py); then the wrapped model, the refusals,
ANIL with step sizes, adaptation, and a torch.optim outer step with a resume. The
hand-unrolled comparisons with every estimator are in tests/test_inner.py, with the
other inner loops.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from torch import Tensor, nn

import torch_maml as tm
from tests.problems import (
    SAME,
    STEPS,
    TIGHT,
    Quadratic,
    Vector,
    estimator_case,
    hand_meta_gradient,
    make_mlp,
    meta_gradient,
    meta_objective,
    meta_sgd_by_hand,
    mse_by_hand,
    mse_loss,
    params_relative_error,
    quadratic_loss,
    random_quadratic,
    regression_tasks,
    relative_error,
    weights_and_step_sizes,
    wrapped_mlp,
)


def quadratic_task(dim: int, seed: int) -> tm.SupportQuery[Quadratic]:
    generator = torch.Generator().manual_seed(seed)
    return tm.SupportQuery(random_quadratic(dim, generator), random_quadratic(dim, generator))


def wrapped_quadratic_loss(model: tm.LearnedStepSizes[Vector], batch: Quadratic) -> Tensor:
    return quadratic_loss(model.module, batch)


def meta_sgd_closed_form(
    w0: Tensor, step_sizes: Tensor, task: tm.SupportQuery[Quadratic], steps: int
) -> tuple[Tensor, Tensor]:
    """``(G_w, G_a)`` of Meta-SGD on a quadratic.

    ``w_{j+1} = (I - D A) w_j + D c`` with ``D = diag(a)``, so ``d w_N / d w_0 = (I - D A)^N``
    and ``d w_N / d a = -sum_j (I - D A)^(N-1-j) diag(g_j)``.
    """
    (a, c), (a_t, c_t) = task.support, task.query
    step = torch.eye(w0.numel(), dtype=torch.float64) - torch.diag(step_sizes) @ a
    w, gradients = w0, []
    for _ in range(steps):
        gradients.append(a @ w - c)
        w = w - step_sizes * gradients[-1]
    q = a_t @ w - c_t
    g_w = torch.linalg.matrix_power(step, steps).T @ q
    g_a = torch.zeros_like(w0)
    for j, g in enumerate(gradients):
        g_a = g_a - g * (torch.linalg.matrix_power(step, steps - 1 - j).T @ q)
    return g_w, g_a


def test_meta_sgd_on_a_quadratic_matches_the_closed_form() -> None:
    dim, steps = 4, 4
    task = quadratic_task(dim, 2)
    generator = torch.Generator().manual_seed(3)
    w0 = torch.randn(dim, generator=generator, dtype=torch.float64)
    step_sizes = 0.05 + 0.3 * torch.rand(dim, generator=generator, dtype=torch.float64)
    g_w, g_a = meta_sgd_closed_form(w0, step_sizes, task, steps)
    for estimator in (tm.Exact(), tm.FiniteSum()):
        model = tm.LearnedStepSizes(Vector(w0))
        with torch.no_grad():
            model.step_sizes.get_parameter("w").copy_(step_sizes)
        grads, _ = meta_gradient(
            model,
            wrapped_quadratic_loss,
            tm.MetaSGD(steps),
            estimator,
            tm.StackedTasks.stack([task, task]),  # vectorised
            task_chunk_size=None,
        )
        assert relative_error(grads["module.w"], g_w) < TIGHT
        assert relative_error(grads["step_sizes.w"], g_a) < TIGHT


def test_meta_sgd_with_equal_step_sizes_is_gradient_descent_and_gives_d_dalpha() -> None:
    """Weights: GradientDescent's meta gradient. Step sizes: summed, d L / d alpha."""
    alpha = 0.05
    tasks = regression_tasks(3, torch.Generator().manual_seed(6))
    plain = make_mlp(0)
    expected, _ = meta_gradient(
        plain, mse_loss, tm.GradientDescent(STEPS, alpha), tm.Exact(), tasks
    )
    model = tm.LearnedStepSizes(make_mlp(0), lr=alpha)
    actual, _ = meta_gradient(model, mse_loss, tm.MetaSGD(STEPS), tm.Exact(), tasks)
    weights = {name: actual[f"module.{name}"] for name in expected}
    assert params_relative_error(weights, expected) < SAME

    d_alpha = sum(float(g.sum()) for name, g in actual.items() if name.startswith("step_sizes."))
    h = 1e-5
    start = [p.detach() for p in plain.parameters()]
    differences = (
        meta_objective(tasks, STEPS, alpha + h, start)
        - meta_objective(tasks, STEPS, alpha - h, start)
    ) / (2 * h)
    assert abs(d_alpha - float(differences)) < 1e-6 * abs(d_alpha)


def test_meta_sgd_d_dalpha_on_a_quadratic_matches_the_closed_form() -> None:
    """``d L / d alpha = -sum_j q^T (I - alpha A)^(N-1-j) g_j`` for gradient descent."""
    dim, steps, alpha = 4, 5, 0.2
    task = quadratic_task(dim, 7)
    (a, c), (a_t, c_t) = task.support, task.query
    w0 = torch.randn(dim, generator=torch.Generator().manual_seed(8), dtype=torch.float64)
    w, gradients = w0, []
    for _ in range(steps):
        gradients.append(a @ w - c)
        w = w - alpha * gradients[-1]
    q = a_t @ w - c_t
    step = torch.eye(dim, dtype=torch.float64) - alpha * a
    expected = -sum(
        float(q @ torch.linalg.matrix_power(step, steps - 1 - j) @ g)
        for j, g in enumerate(gradients)
    )
    model = tm.LearnedStepSizes(Vector(w0), lr=alpha)
    grads, _ = meta_gradient(
        model,
        wrapped_quadratic_loss,
        tm.MetaSGD(steps),
        tm.FiniteSum(),
        tm.StackedTasks.stack([task, task]),
    )
    assert abs(float(grads["step_sizes.w"].sum()) - expected) < TIGHT * abs(expected)


# ---------------------------------------------------------------- the wrapped model


def test_learned_step_sizes_mirror_the_trainable_parameters() -> None:
    net = make_mlp(0)
    net[0].bias.requires_grad_(False)
    model = tm.LearnedStepSizes(net, lr=0.25)
    names = [name for name, _ in model.named_parameters()]
    assert names == [
        "module.0.weight",
        "module.0.bias",  # frozen: no step size
        "module.2.weight",
        "module.2.bias",
        "step_sizes.0.weight",
        "step_sizes.2.weight",
        "step_sizes.2.bias",
    ]
    assert [name for name, _ in model.named_step_sizes()] == ["0.weight", "2.weight", "2.bias"]
    for name, a in model.named_step_sizes():
        weight = net.get_parameter(name)
        assert a.shape == weight.shape
        assert a.dtype == weight.dtype
        assert bool((a == 0.25).all())
    x = torch.randn(5, 1, dtype=torch.float64)
    assert torch.equal(model(x), net(x))
    assert model.module is net


@pytest.mark.parametrize("batched", [False, True])
def test_the_inner_gradient_of_the_step_sizes_is_zero(batched: bool) -> None:
    """The task loss does not use the step sizes: per task and vectorised, zeros."""
    model = wrapped_mlp(0)
    names = [name for name, _ in model.named_parameters()]
    loss = tm.TaskLoss(model, mse_loss, names)
    params = loss.params()
    tasks = regression_tasks(2, torch.Generator().manual_seed(0))
    batch = tasks[0].support
    if batched:
        stacked = tm.StackedTasks.stack(tasks)
        batch = stacked.support
        params = {name: p.expand(2, *p.shape) for name, p in params.items()}
    grads, _ = tm.Ops(loss, tm.MetaSGD(1), batched=batched).grad(params, batch)
    for name in names:
        if name.startswith("step_sizes."):
            assert torch.equal(grads[name], torch.zeros_like(params[name]))
        else:
            assert bool((grads[name] != 0).any())


def test_meta_sgd_refuses_a_model_that_is_not_wrapped() -> None:
    model = make_mlp(0)
    before = [p.detach().clone() for p in model.parameters()]
    meta_opt = tm.MetaOptimizer(
        model,
        mse_loss,
        inner_loop=tm.MetaSGD(2),
        estimator=tm.FiniteSum(),
        step_size=tm.Constant(1),
    )
    tasks = regression_tasks(2, torch.Generator().manual_seed(0))
    message = (
        r"MetaSGD needs the model wrapped in LearnedStepSizes \(model = "
        r"tm.LearnedStepSizes\(net, lr=0.01\)\), whose parameters are named 'module.\*' "
        r"\(weights\) and 'step_sizes.\*' \(got a parameter named '0.weight'\)"
    )
    with pytest.raises(ValueError, match=message):
        meta_opt.step(tasks)
    with pytest.raises(ValueError, match=message):
        meta_opt.meta_backward(tasks)
    with pytest.raises(ValueError, match=message):
        meta_opt.adapt(tasks[0])
    for p, old in zip(model.parameters(), before, strict=True):
        assert torch.equal(p, old)
        assert p.grad is None
    assert meta_opt.meta_steps == 0


def test_meta_sgd_needs_the_step_sizes_of_the_adapted_weights() -> None:
    model = wrapped_mlp(0)
    before = [p.detach().clone() for p in model.parameters()]
    meta_opt = tm.MetaOptimizer(
        model,
        mse_loss,
        inner_loop=tm.MetaSGD(2),
        estimator=tm.FiniteSum(),
        step_size=tm.Constant(1),
        adapted=["module.2"],
    )
    message = (
        r"MetaSGD: the weight 'module.2.weight' has no step size 'step_sizes.2.weight' among "
        r"the adapted parameters: with adapted=..., select each weight's step size with it "
        r"\(e.g. adapted=\['module.head', 'step_sizes.head'\]\)"
    )
    with pytest.raises(ValueError, match=message):
        meta_opt.step(regression_tasks(2, torch.Generator().manual_seed(0)))
    for p, old in zip(model.parameters(), before, strict=True):
        assert torch.equal(p, old)
    with pytest.raises(ValueError, match="MetaSGD adapts no weight"):
        tm.MetaSGD(1).init({"step_sizes.w": torch.ones(2)})
    with pytest.raises(ValueError, match=r"the step size 'step_sizes.w' has shape \(3,\)"):
        tm.MetaSGD(1).update(
            {"module.w": torch.ones(2), "step_sizes.w": torch.ones(3)},
            {"module.w": torch.ones(2), "step_sizes.w": torch.zeros(3)},
            (),
        )


@pytest.mark.parametrize("estimator", ["exact", "finite-sum", "finite-sum-stacked"])
def test_meta_sgd_adapting_the_head_only(estimator: str) -> None:
    """ANIL with learned step sizes for the head: the body's step sizes get no gradient."""
    tasks = regression_tasks(3, torch.Generator().manual_seed(10))
    model = wrapped_mlp(0)
    weights, step_sizes = weights_and_step_sizes(model)
    total = [torch.zeros_like(p) for p in weights + step_sizes[2:]]
    for task in tasks:
        w0 = [p.detach().clone().requires_grad_(True) for p in weights]
        a = [s.detach().clone().requires_grad_(True) for s in step_sizes[2:]]
        w = list(w0)
        for _ in range(STEPS):
            g = torch.autograd.grad(mse_by_hand(w, task.support), w[2:], create_graph=True)
            w = w[:2] + [p - ai * gi for p, ai, gi in zip(w[2:], a, g, strict=True)]
        meta = torch.autograd.grad(mse_by_hand(w, task.query), w0 + a)
        total = [t + m / len(tasks) for t, m in zip(total, meta, strict=True)]
    names = [name for name, _ in model.named_parameters()]
    expected = dict(zip(names[:4] + names[6:], total, strict=True))

    chosen, meta_batch, options = estimator_case(estimator, tasks)
    actual, _ = meta_gradient(
        model,
        mse_loss,
        tm.MetaSGD(STEPS),
        chosen,
        meta_batch,
        adapted=["module.2", "step_sizes.2"],
        **options,
    )
    assert params_relative_error({n: actual[n] for n in expected}, expected) < TIGHT
    for name in ("step_sizes.0.weight", "step_sizes.0.bias"):
        assert torch.equal(actual[name], torch.zeros_like(actual[name]))


def test_meta_sgd_adapt_moves_the_weights_by_their_step_sizes() -> None:
    model = wrapped_mlp(0)
    task = regression_tasks(1, torch.Generator().manual_seed(11))[0]
    weights, step_sizes = weights_and_step_sizes(model)
    w = [p.detach().clone().requires_grad_(True) for p in weights]
    for _ in range(5):
        g = torch.autograd.grad(mse_by_hand(w, task.support), w)
        w = [
            (p - a * gi).detach().requires_grad_(True)
            for p, a, gi in zip(w, step_sizes, g, strict=True)
        ]
    meta_opt = tm.MetaOptimizer(
        model,
        mse_loss,
        inner_loop=tm.MetaSGD(STEPS),
        estimator=tm.FiniteSum(),
        step_size=tm.Constant(1),
    )
    adapted = meta_opt.adapt(task, steps=5)
    names = [name for name, _ in model.named_parameters()]
    for name, expected in zip(names, w + step_sizes, strict=True):
        assert torch.allclose(adapted[name], expected, rtol=SAME, atol=1e-14), name
    for name, a in model.named_step_sizes():
        assert torch.equal(adapted[f"step_sizes.{name}"], a.detach())


def test_meta_sgd_with_torch_optim_adam_and_a_state_dict_round_trip() -> None:
    """meta_backward fills every .grad (step sizes too); torch.optim.Adam steps on them."""
    tasks = regression_tasks(3, torch.Generator().manual_seed(12))
    model = wrapped_mlp(0)
    weights, step_sizes = weights_and_step_sizes(model)
    hand_tasks = [([t.support] * STEPS, [t.support] * STEPS, t.query) for t in tasks]
    expected = hand_meta_gradient(meta_sgd_by_hand(), weights, step_sizes, hand_tasks)
    meta_opt = tm.MetaOptimizer(
        model,
        mse_loss,
        inner_loop=tm.MetaSGD(STEPS),
        estimator=tm.FiniteSum(),
        step_size=tm.Constant(1),
    )
    adam = torch.optim.Adam(model.parameters(), lr=1e-3)
    adam.zero_grad()
    meta_opt.meta_backward(tasks)
    before = [p.detach().clone() for p in model.parameters()]
    for p, g in zip(model.parameters(), expected, strict=True):
        assert p.grad is not None
        assert relative_error(p.grad, g) < TIGHT
    adam.step()
    for p, old, g in zip(model.parameters(), before, expected, strict=True):
        # Adam's first step: lr * g / (|g| + eps), the sign of g nearly
        assert torch.allclose(p.detach(), old - 1e-3 * g / (g.abs() + 1e-8), rtol=0, atol=1e-15)

    # MetaOptimizer.step and the state_dicts: a fresh model and optimizer resume exactly.
    meta_opt.step(tasks)
    saved_model, saved_opt = model.state_dict(), meta_opt.state_dict()
    other = tm.LearnedStepSizes(make_mlp(1), lr=0.5)
    resumed = tm.MetaOptimizer(
        other,
        mse_loss,
        inner_loop=tm.MetaSGD(STEPS),
        estimator=tm.FiniteSum(),
        step_size=tm.Constant(1),
    )
    other.load_state_dict(saved_model)
    resumed.load_state_dict(saved_opt)
    meta_opt.step(tasks)
    resumed.step(tasks)
    for (name, p), q in zip(model.named_parameters(), other.parameters(), strict=True):
        assert torch.equal(p, q), name
    assert resumed.meta_steps == meta_opt.meta_steps == 2
    mismatched = tm.MetaOptimizer(
        tm.LearnedStepSizes(make_mlp(1)),
        mse_loss,
        inner_loop=tm.MetaSGD(STEPS + 1),
        estimator=tm.FiniteSum(),
        step_size=tm.Constant(1),
    )
    with pytest.raises(ValueError, match=r"inner_loop: saved 'MetaSGD\(steps=3\)'"):
        mismatched.load_state_dict(saved_opt)


@pytest.mark.parametrize(
    ("build", "error", "message"),
    [
        (lambda: tm.MetaSGD(0), ValueError, "'steps' must be a positive int (got 0)"),
        (
            lambda: tm.MetaSGD(True),
            TypeError,
            "'steps' must be a positive int (got True)",
        ),
        (
            lambda: tm.LearnedStepSizes(nn.Linear(1, 1), lr=0),
            ValueError,
            "'lr' must be a finite number > 0 (got 0.0)",
        ),
        (
            lambda: tm.LearnedStepSizes(3),  # type: ignore[type-var]
            TypeError,
            "'module' must be a torch.nn.Module (got an object of type int)",
        ),
        (
            lambda: tm.LearnedStepSizes(nn.Linear(1, 1).requires_grad_(False)),
            ValueError,
            "'module' has no trainable parameters (none with requires_grad=True)",
        ),
    ],
)
def test_bad_arguments_are_named(
    build: Callable[[], object], error: type[Exception], message: str
) -> None:
    with pytest.raises(error) as raised:
        build()
    assert str(raised.value) == message
