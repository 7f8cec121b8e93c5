"""Outer step sizes: Constant follows param_groups; SmoothnessAdaptive is eq. 14 / eq. 22.

SmoothnessAdaptive with given constants, then with constants estimated from data
(``from_data``) and re-estimated during training (``every``), on the cubics of
tests/problems.py, whose constants are known; and a user's stateful policy.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch import Tensor

import torch_maml as tm
from tests.problems import (
    CUBIC_DIM,
    Cubic,
    QuadraticSequence,
    Vector,
    cubic_family,
    cubic_loss,
    make_mlp,
    mse_by_hand,
    mse_loss,
    quadratic_loss,
    random_quadratic,
    regression_tasks,
)
from torch_maml import theory

INNER_LR = 0.05


def test_constant_uses_the_current_param_group_lr() -> None:
    gen = torch.Generator().manual_seed(0)
    meta_opt = tm.MetaOptimizer(
        make_mlp(0),
        mse_loss,
        inner_loop=tm.GradientDescent(steps=1, lr=INNER_LR),
        estimator=tm.FiniteSum(),
        step_size=tm.Constant(0.01),
    )
    tasks = regression_tasks(2, gen)
    assert meta_opt.param_groups[0]["lr"] == 0.01
    assert meta_opt.step(tasks).beta == 0.01
    meta_opt.param_groups[0]["lr"] = 0.003
    assert meta_opt.step(tasks).beta == 0.003


def query_grad_norm(weights: list[Tensor], task: tm.SupportQuery[tuple[Tensor, Tensor]]) -> float:
    w = [p.detach().clone().requires_grad_(True) for p in weights]
    grads = torch.autograd.grad(mse_by_hand(w, task.query), w)
    return float(torch.cat([g.reshape(-1) for g in grads]).norm())


@pytest.mark.parametrize("constants", ["theorem", "derived"])
@pytest.mark.parametrize("use_probe_tasks", [False, True])
def test_smoothness_adaptive_finite_sum_is_eq_22(constants: Any, use_probe_tasks: bool) -> None:
    gen = torch.Generator().manual_seed(1)
    tasks = regression_tasks(3, gen)
    probe = regression_tasks(2, gen) if use_probe_tasks else None
    model = make_mlp(0)
    weights = [p.detach().clone() for p in model.parameters()]
    policy = tm.SmoothnessAdaptive(L=2.0, rho=2.0, c_beta=80, b=0.3, constants=constants)
    steps = 2
    meta_opt = tm.MetaOptimizer(
        model,
        mse_loss,
        inner_loop=tm.GradientDescent(steps=steps, lr=INNER_LR),
        estimator=tm.FiniteSum(),
        step_size=policy,
    )
    assert meta_opt.param_groups[0]["lr"] == 1.0
    info = meta_opt.step(tasks, probe_tasks=probe)

    probe_tasks = probe if probe is not None else tasks
    mean_norm = sum(query_grad_norm(weights, t) for t in probe_tasks) / len(probe_tasks)
    lhat = theory.smoothness_finite_sum(
        alpha=INNER_LR, L=2.0, rho=2.0, steps=steps, b=0.3, grad_norm=mean_norm, constants=constants
    )
    assert info.lhat == pytest.approx(lhat, rel=1e-12)
    assert info.beta == pytest.approx(1.0 / (80 * lhat), rel=1e-12)
    assert info.grad_evals == len(tasks) * (steps + 1) + len(probe_tasks)
    assert info.hvp_evals == len(tasks) * steps


def test_smoothness_adaptive_resampling_is_eq_14_on_fresh_samples() -> None:
    """The probe gradient of each task is taken at w_k on a fresh sample of probe_size."""
    gen = torch.Generator().manual_seed(2)
    dim, steps, probe_size = 3, 2, 5
    w = torch.randn(dim, generator=gen, dtype=torch.float64)
    tasks = []
    probes = []
    for _ in range(2):
        s, t, p = (random_quadratic(dim, gen) for _ in range(3))
        probes.append(p)
        tasks.append(QuadraticSequence({1: [s] * steps, 2: [s] * steps, 3: [t], probe_size: [p]}))
    policy = tm.SmoothnessAdaptive(L=2.0, rho=1.5, c_beta=100, probe_size=probe_size, lr=0.5)
    meta_opt = tm.MetaOptimizer(
        Vector(w),
        quadratic_loss,
        inner_loop=tm.GradientDescent(steps=steps, lr=INNER_LR),
        estimator=tm.Resampled(inner_size=1, hessian_size=2, outer_size=3),
        step_size=policy,
    )
    info = meta_opt.step(tasks)
    mean_norm = sum(float((a @ w - c).norm()) for a, c in probes) / len(probes)
    lhat = theory.smoothness_resampling(
        alpha=INNER_LR, L=2.0, rho=1.5, steps=steps, grad_norm=mean_norm
    )
    assert info.lhat == pytest.approx(lhat, rel=1e-12)
    assert info.beta == pytest.approx(0.5 / (100 * lhat), rel=1e-12)
    assert info.grad_evals == 2 * (steps + 1) + 2


def test_smoothness_adaptive_probes_default_to_the_outer_size() -> None:
    gen = torch.Generator().manual_seed(3)
    s, t = random_quadratic(2, gen), random_quadratic(2, gen)
    task = QuadraticSequence({1: [s], 2: [s], 3: [t, t]})  # the probe draws the second size-3 batch
    meta_opt = tm.MetaOptimizer(
        Vector(torch.zeros(2, dtype=torch.float64)),
        quadratic_loss,
        inner_loop=tm.GradientDescent(steps=1, lr=INNER_LR),
        estimator=tm.Resampled(inner_size=1, hessian_size=2, outer_size=3),
        step_size=tm.SmoothnessAdaptive(L=2.0, rho=1.0, c_beta=100),
    )
    info = meta_opt.step([task])
    assert task.calls[3] == 2
    assert info.lhat is not None


def test_a_scheduler_scales_the_adaptive_step() -> None:
    gen = torch.Generator().manual_seed(4)
    tasks = regression_tasks(2, gen)
    meta_opt = tm.MetaOptimizer(
        make_mlp(0),
        mse_loss,
        inner_loop=tm.GradientDescent(steps=1, lr=INNER_LR),
        estimator=tm.FiniteSum(),
        step_size=tm.SmoothnessAdaptive(L=1.0, rho=0.0, c_beta=10),  # rho = 0: Lhat = (1+aL)^2 L
    )
    scheduler = torch.optim.lr_scheduler.StepLR(meta_opt, step_size=1, gamma=0.5)
    first = meta_opt.step(tasks)
    scheduler.step()
    second = meta_opt.step(tasks)
    assert first.lhat == second.lhat == pytest.approx((1 + INNER_LR) ** 2)
    assert second.beta == pytest.approx(first.beta / 2, rel=1e-15)


def test_smoothness_adaptive_needs_gradient_descent_and_checks_the_bound() -> None:
    class Other:
        steps = 1

        def init(self, params: tm.typing.Params) -> tm.typing.InnerState:
            return ()

        def update(
            self, params: tm.typing.Params, grads: tm.typing.Params, state: tm.typing.InnerState
        ) -> tuple[tm.typing.Params, tm.typing.InnerState]:
            return params, state

    policy = tm.SmoothnessAdaptive(L=1.0, rho=1.0, c_beta=80)
    with pytest.raises(TypeError, match="SmoothnessAdaptive needs a GradientDescent inner loop"):
        tm.MetaOptimizer(
            make_mlp(0), mse_loss, inner_loop=Other(), estimator=tm.FiniteSum(), step_size=policy
        )
    bound = theory.inner_lr_bound(4, 1.0)
    with pytest.warns(tm.InnerStepSizeWarning, match=f"{bound:.6g}") as record:
        tm.MetaOptimizer(
            make_mlp(0),
            mse_loss,
            inner_loop=tm.GradientDescent(steps=4, lr=2 * bound),
            estimator=tm.FiniteSum(),
            step_size=policy,
        )
    assert len(record) == 1
    assert record[0].filename == __file__


def test_b_is_refused_for_sampler_tasks() -> None:
    gen = torch.Generator().manual_seed(5)
    s = random_quadratic(2, gen)
    meta_opt = tm.MetaOptimizer(
        Vector(torch.zeros(2, dtype=torch.float64)),
        quadratic_loss,
        inner_loop=tm.GradientDescent(steps=1, lr=INNER_LR),
        estimator=tm.Resampled(inner_size=1, hessian_size=2, outer_size=3),
        step_size=tm.SmoothnessAdaptive(L=2.0, rho=1.0, c_beta=100, b=0.5),
    )
    before = meta_opt.generator.get_state()
    with pytest.raises(ValueError, match="'b' is the support/query gap of eq\\. 22"):
        meta_opt.step([QuadraticSequence({1: [s], 2: [s], 3: [s, s]})])
    assert torch.equal(meta_opt.generator.get_state(), before)


@pytest.mark.parametrize(
    ("kwargs", "error", "pattern"),
    [
        ({"L": 0.0, "rho": 1.0, "c_beta": 80}, ValueError, "'L' must be a finite number > 0"),
        ({"L": 1.0, "rho": -1.0, "c_beta": 80}, ValueError, "'rho' must be a finite number >= 0"),
        ({"L": 1.0, "rho": 1.0, "c_beta": 0}, ValueError, "'c_beta' must be a finite number > 0"),
        ({"L": 1.0, "rho": 1.0, "c_beta": 80, "b": -0.1}, ValueError, "'b' must be"),
        ({"L": 1.0, "rho": 1.0, "c_beta": 80, "probe_size": 0}, ValueError, "'probe_size'"),
        ({"L": 1.0, "rho": 1.0, "c_beta": 80, "constants": "eq21"}, ValueError, "'constants'"),
        ({"L": 1.0, "rho": 1.0, "c_beta": 80, "lr": -1}, ValueError, "'lr' must be"),
    ],
)
def test_bad_smoothness_arguments_are_named(
    kwargs: dict[str, Any], error: type[Exception], pattern: str
) -> None:
    with pytest.raises(error, match=pattern):
        tm.SmoothnessAdaptive(**kwargs)


@pytest.mark.parametrize("lr", [0.0, -1.0, float("nan"), float("inf")])
def test_constant_refuses_bad_lr(lr: float) -> None:
    with pytest.raises(ValueError, match=f"'lr' must be a finite number > 0 \\(got {lr}\\)"):
        tm.Constant(lr)


class NormalisedStep:
    """The stateful policy of docs/custom-components.md: a moving average of probe norms."""

    def __init__(self, lr: float, decay: float = 0.9) -> None:
        self.lr, self.decay = lr, decay

    def __call__(self, context: tm.StepContext) -> tm.StepSize:
        norm = context.mean_probe_grad_norm()
        average = self.decay * context.state.get("average", norm) + (1 - self.decay) * norm
        context.state["average"] = average
        return tm.StepSize(beta=context.lr / (1 + average))


def test_a_policy_keeps_its_state_in_the_optimizer_and_resumes_with_it() -> None:
    tasks = regression_tasks(2, torch.Generator().manual_seed(0))

    def build() -> tm.MetaOptimizer[torch.nn.Sequential, tuple[Tensor, Tensor]]:
        return tm.MetaOptimizer(
            make_mlp(0),
            mse_loss,
            inner_loop=tm.GradientDescent(steps=1, lr=INNER_LR),
            estimator=tm.FiniteSum(),
            step_size=NormalisedStep(0.01),
        )

    meta_opt = build()
    assert meta_opt.step_size_state == {}
    averages = []
    for _ in range(3):
        info = meta_opt.step(tasks)
        averages.append(meta_opt.step_size_state["average"])
        assert info.beta == pytest.approx(0.01 / (1 + averages[-1]), rel=1e-15)
    assert len(set(averages)) == 3  # the average moved, step by step

    # A failed step (a NaN query) keeps the state as it was.
    x, y = tasks[0].query
    bad = [tm.SupportQuery(tasks[0].support, (x, y * float("nan")))]
    with pytest.raises(tm.NonFiniteError):
        meta_opt.step(bad)
    assert meta_opt.step_size_state["average"] == averages[-1]

    # state_dict carries it: a resumed optimizer continues exactly.
    resumed = build()
    resumed.model.load_state_dict(meta_opt.model.state_dict())
    resumed.load_state_dict(meta_opt.state_dict())
    assert resumed.step_size_state == meta_opt.step_size_state
    assert resumed.step(tasks).beta == meta_opt.step(tasks).beta


# ---------------------------------------------------------------- SmoothnessAdaptive.from_data


def cubic_optimizer(policy: tm.SmoothnessAdaptive, w: Tensor) -> tm.MetaOptimizer[Vector, Cubic]:
    return tm.MetaOptimizer(
        Vector(w),
        cubic_loss,
        inner_loop=tm.GradientDescent(steps=3, lr=0.02),
        estimator=tm.FiniteSum(),
        step_size=policy,
        generator=torch.Generator().manual_seed(0),  # re-estimates draw their directions here
    )


def test_from_data_uses_the_estimates_in_eq_22() -> None:
    tasks, _ = cubic_family([0.5, 1.0])
    w = torch.full((CUBIC_DIM,), 0.1, dtype=torch.float64)
    est = tm.theory.estimate_smoothness(Vector(w), cubic_loss, tasks)
    policy = tm.SmoothnessAdaptive.from_data(Vector(w), cubic_loss, tasks, c_beta=80)
    assert (policy.L, policy.rho, policy.b) == (est.L, est.rho, est.b)
    assert abs(policy.rho - 1.0) < 1e-6
    by_hand = tm.SmoothnessAdaptive(L=est.L, rho=est.rho, c_beta=80, b=est.b or 0.0)
    info = cubic_optimizer(policy, w).step(tasks)
    expected = cubic_optimizer(by_hand, w).step(tasks)
    assert info.beta == expected.beta
    assert info.lhat == expected.lhat


def test_reestimates_every_k_steps_at_the_current_weights() -> None:
    tasks, _ = cubic_family([0.5, 1.0], seed=8)
    w = torch.full((CUBIC_DIM,), 0.1, dtype=torch.float64)
    policy = tm.SmoothnessAdaptive.from_data(Vector(w), cubic_loss, tasks, c_beta=80, every=2)
    meta_opt = cubic_optimizer(policy, w)
    infos = []
    for k in range(5):
        w_k = meta_opt.model.w.detach().clone()
        infos.append(meta_opt.step(tasks))
        state = meta_opt.step_size_state
        if k < 2:
            assert state == {}
        if k in (2, 4):  # re-estimated at w_k: the Hessian of (A, c, U, kappa) at w is
            true_l = 0.0  # A + kappa U diag(U^T w) U^T
            for task in tasks:
                for a, _, u, kappa in (task.support, task.query):
                    hessian = a + kappa * u @ torch.diag(u.T @ w_k) @ u.T
                    true_l = max(true_l, float(torch.linalg.eigvalsh(hessian).abs().max()))
            assert abs(state["L"] - true_l) / true_l < 1e-6
            assert abs(state["rho"] - 1.0) < 1e-6
    # A re-estimating step pays for it: its HVP count is far above FiniteSum's B*N.
    assert infos[0].hvp_evals == infos[1].hvp_evals == 2 * 3
    assert infos[2].hvp_evals > 10 * infos[1].hvp_evals


def test_reestimated_constants_are_saved_and_resume_exactly() -> None:
    tasks, _ = cubic_family([0.5, 1.0], seed=9)
    w = torch.full((CUBIC_DIM,), 0.1, dtype=torch.float64)
    # Bitwise the same after a resume, whatever the estimates' precision: 30 iterations.
    policy = tm.SmoothnessAdaptive.from_data(
        Vector(w), cubic_loss, tasks, c_beta=80, every=2, iterations=30, restarts=1
    )
    straight = cubic_optimizer(policy, w)
    for _ in range(5):
        straight.step(tasks)
    first = cubic_optimizer(policy, w)
    for _ in range(3):
        first.step(tasks)
    checkpoint = first.state_dict(), first.model.state_dict()
    resumed = cubic_optimizer(policy, torch.zeros(CUBIC_DIM, dtype=torch.float64))
    resumed.model.load_state_dict(checkpoint[1])
    resumed.load_state_dict(checkpoint[0])
    assert resumed.step_size_state == first.step_size_state != {}
    for _ in range(2):
        resumed.step(tasks)
    assert torch.equal(resumed.model.w, straight.model.w)
