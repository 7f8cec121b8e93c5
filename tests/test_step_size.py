"""Outer step sizes: Constant follows param_groups; SmoothnessAdaptive is eq. 14 / eq. 22.

SmoothnessAdaptive with given constants (eq. 14 and 22 worked out by hand on quadratics
whose probe gradients have integer norms), the weights moved by the policy's beta (not by
``param_groups``' lr), then with constants estimated from data (``from_data``) and
re-estimated during training (``every``), on the cubics of tests/problems.py, whose
constants are known; and a user's stateful policy, whose state a step that fails after it
ran leaves as it was.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch import Tensor

import torch_maml as tm
from tests.problems import (
    CUBIC_DIM,
    Cubic,
    Quadratic,
    QuadraticSequence,
    Vector,
    closed_form_meta_gradient,
    cubic_family,
    cubic_loss,
    make_mlp,
    mse_loss,
    optimizer_state,
    outer_grad,
    quadratic_loss,
    random_quadratic,
    regression_tasks,
    same,
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


def diagonal(a: tuple[float, float], c: tuple[float, float]) -> Quadratic:
    """The quadratic ``0.5 w^T diag(a) w - c^T w``, whose gradient is ``a * w - c``."""
    return torch.diag(torch.tensor(a, dtype=torch.float64)), torch.tensor(c, dtype=torch.float64)


# At w_0 = (1, 1) the query gradients a * w_0 - c are Pythagorean: (3, 4) and (6, 8), of norms
# 5 and 10 (mean 7.5); those of the probe tasks are (5, 12) and (8, 15), of norms 13 and 17
# (mean 15).
W0 = (1.0, 1.0)
TASKS = [
    tm.SupportQuery(diagonal((1.0, 2.0), (0.0, 0.0)), diagonal((1.0, 2.0), (-2.0, -2.0))),
    tm.SupportQuery(diagonal((2.0, 1.0), (1.0, 0.0)), diagonal((3.0, 1.0), (-3.0, -7.0))),
]
PROBES = [
    tm.SupportQuery(diagonal((1.0, 1.0), (0.0, 0.0)), diagonal((1.0, 1.0), (-4.0, -11.0))),
    tm.SupportQuery(diagonal((1.0, 1.0), (0.0, 0.0)), diagonal((1.0, 1.0), (-7.0, -14.0))),
]

# Eq. 22 by hand, with alpha = 0.05, L = 2, rho = 2, N = 2, b = 0.3: q = 1 + alpha L = 1.1,
# (1 + alpha L)^(2N) L = 1.4641 * 2 = 2.9282.
#   eq. 21 ("theorem"): C_b = C_L = (alpha rho + rho / L q^(N-1)) q^(2N) = (0.1 + 1.1) 1.4641
#       = 1.75692;
#   the proof of Proposition 7 ("derived"): K = q^(N-1) alpha rho + rho / L q^N (q^(N-1) - 1)
#       = 0.11 + 1.21 * 0.1 = 0.231, C_L = K q^N = 0.27951, C_b = K (q^N - 1) = 0.04851.
EQ_22 = {
    ("theorem", 7.5): 2.9282 + 1.75692 * 0.3 + 1.75692 * 7.5,  # 16.632176
    ("theorem", 15.0): 2.9282 + 1.75692 * 0.3 + 1.75692 * 15.0,  # 29.809076
    ("derived", 7.5): 2.9282 + 0.04851 * 0.3 + 0.27951 * 7.5,  # 5.039078
    ("derived", 15.0): 2.9282 + 0.04851 * 0.3 + 0.27951 * 15.0,  # 7.135403
}


def quadratic_optimizer(policy: tm.StepSizePolicy) -> tm.MetaOptimizer[Vector, Quadratic]:
    return tm.MetaOptimizer(
        Vector(torch.tensor(W0, dtype=torch.float64)),
        quadratic_loss,
        inner_loop=tm.GradientDescent(steps=2, lr=INNER_LR),
        estimator=tm.FiniteSum(),
        step_size=policy,
    )


@pytest.mark.parametrize("constants", ["theorem", "derived"])
@pytest.mark.parametrize("use_probe_tasks", [False, True])
def test_smoothness_adaptive_finite_sum_is_eq_22(constants: Any, use_probe_tasks: bool) -> None:
    policy = tm.SmoothnessAdaptive(L=2.0, rho=2.0, c_beta=80, b=0.3, constants=constants)
    meta_opt = quadratic_optimizer(policy)
    assert meta_opt.param_groups[0]["lr"] == 1.0
    probe = PROBES if use_probe_tasks else None
    info = meta_opt.step(TASKS, probe_tasks=probe)

    lhat = EQ_22[constants, 15.0 if use_probe_tasks else 7.5]
    assert info.lhat == pytest.approx(lhat, rel=1e-12)
    assert info.beta == pytest.approx(1.0 / (80 * lhat), rel=1e-12)
    # B (N + 1) gradients and B N HVPs, and one probe gradient per probe task.
    assert info.grad_evals == 2 * 3 + 2
    assert info.hvp_evals == 2 * 2


def test_smoothness_adaptive_resampling_is_eq_14_on_fresh_samples() -> None:
    """The probe gradient of each task is taken at w_k on a fresh sample of probe_size."""
    gen = torch.Generator().manual_seed(2)
    steps, probe_size = 2, 5
    w = torch.tensor(W0, dtype=torch.float64)
    # Probe gradients at w: (3, 4) and (5, 12), of norms 5 and 13 (mean 9).
    probes = [diagonal((1.0, 1.0), (-2.0, -3.0)), diagonal((1.0, 1.0), (-4.0, -11.0))]
    tasks = []
    for p in probes:
        s, t = random_quadratic(2, gen), random_quadratic(2, gen)
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
    # Eq. 13 and 14 by hand, with alpha = 0.05, L = 2, rho = 1.5, N = 2 (q = 1.1):
    # C_L = (q^(N-1) alpha rho + rho / L q^N (q^(N-1) - 1)) q^N
    #     = (1.1 * 0.075 + 0.75 * 1.21 * 0.1) * 1.21 = 0.17325 * 1.21 = 0.2096325,
    # Lhat = q^(2N) L + C_L * 9 = 2.9282 + 1.8866925 = 4.8148925.
    lhat = 2.9282 + 0.2096325 * 9.0
    assert info.lhat == pytest.approx(lhat, rel=1e-12)
    assert info.beta == pytest.approx(0.5 / (100 * lhat), rel=1e-12)
    assert info.grad_evals == 2 * (steps + 1) + 2


def meta_gradient_by_hand(w: Tensor) -> Tensor:
    """The mean meta gradient of TASKS at ``w`` (N = 2): eq. 12 on quadratics, closed form."""
    return torch.stack(
        [
            closed_form_meta_gradient(w, INNER_LR, [t.support] * 2, [t.support] * 2, t.query)
            for t in TASKS
        ]
    ).mean(0)


class FixedBeta:
    """A policy whose beta is not its lr: ``beta_k = 0.03`` whatever ``param_groups``."""

    lr = 0.5

    def __call__(self, context: tm.StepContext) -> tm.StepSize:
        return tm.StepSize(beta=0.03)


def test_the_weights_move_by_the_policys_beta_not_by_the_lr() -> None:
    """``w_{k+1} = w_k - beta_k G(w_k)`` with the policy's ``beta_k``; ``param_groups[0]["lr"]``
    only reaches the step through the policy (SmoothnessAdaptive multiplies it)."""
    meta_opt = quadratic_optimizer(tm.SmoothnessAdaptive(L=2.0, rho=2.0, c_beta=80, b=0.3, lr=0.5))
    w0 = torch.tensor(W0, dtype=torch.float64)
    info = meta_opt.step(TASKS)
    beta = 0.5 / (80 * EQ_22["theorem", 7.5])  # lr / (c_beta Lhat(w_0)), about 3.8e-4
    assert info.beta == pytest.approx(beta, rel=1e-12)
    w1 = w0 - beta * meta_gradient_by_hand(w0)
    torch.testing.assert_close(meta_opt.model.w.detach(), w1, rtol=1e-13, atol=0)

    # A scheduler's lr: beta_k = 0.25 / (c_beta Lhat(w_1)), the query gradients now at w_1.
    meta_opt.param_groups[0]["lr"] = 0.25
    info = meta_opt.step(TASKS)
    norms = [float(outer_grad(t.query, w1).norm()) for t in TASKS]
    lhat = 2.9282 + 1.75692 * 0.3 + 1.75692 * sum(norms) / 2  # eq. 22 as in EQ_22
    beta = 0.25 / (80 * lhat)
    assert info.beta == pytest.approx(beta, rel=1e-12)
    w2 = w1 - beta * meta_gradient_by_hand(w1)
    torch.testing.assert_close(meta_opt.model.w.detach(), w2, rtol=1e-13, atol=0)

    # A user's policy whose beta has nothing to do with the lr.
    meta_opt = quadratic_optimizer(FixedBeta())
    assert meta_opt.param_groups[0]["lr"] == 0.5
    info = meta_opt.step(TASKS)
    assert info.beta == 0.03
    w1 = w0 - 0.03 * meta_gradient_by_hand(w0)
    torch.testing.assert_close(meta_opt.model.w.detach(), w1, rtol=1e-13, atol=0)


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


# ---------------------------------------------------------------- failing after the policy ran


class CountingStep:
    """A stateful policy: counts its calls in the optimizer's state; ``beta`` as set."""

    lr = 0.05

    def __init__(self) -> None:
        self.beta = 0.05

    def __call__(self, context: tm.StepContext) -> tm.StepSize:
        context.state["calls"] = context.state.get("calls", 0) + 1
        return tm.StepSize(beta=self.beta)


def reestimating() -> tm.SmoothnessAdaptive:
    """SmoothnessAdaptive re-estimating L, rho and b at every step after the first."""
    return tm.SmoothnessAdaptive(
        L=2.0, rho=2.0, c_beta=80, every=1, estimate_options={"iterations": 10, "restarts": 1}
    )


class Watched:
    """Wraps a policy; keeps a copy of the state it left in its last call's context."""

    def __init__(self, policy: Any) -> None:
        self.policy = policy
        self.wrote: dict[str, Any] | None = None

    @property
    def lr(self) -> float:
        return float(self.policy.lr)

    def __call__(self, context: tm.StepContext) -> tm.StepSize:
        size: tm.StepSize = self.policy(context)
        self.wrote = copy.deepcopy(context.state)
        return size


MLP_TASKS = regression_tasks(2, torch.Generator().manual_seed(6))
Optimizer = tm.MetaOptimizer[torch.nn.Sequential, tuple[Tensor, Tensor]]


def scaled_query(scale: float) -> list[tm.SupportQuery[tuple[Tensor, Tensor]]]:
    """MLP_TASKS with their query targets times ``scale``."""
    return [tm.SupportQuery(t.support, (t.query[0], t.query[1] * scale)) for t in MLP_TASKS]


def set_beta(beta: float) -> Callable[[Optimizer, Watched], None]:
    def arm(meta_opt: Optimizer, watched: Watched) -> None:
        watched.policy.beta = beta

    return arm


def set_lr(lr: float) -> Callable[[Optimizer, Watched], None]:
    def arm(meta_opt: Optimizer, watched: Watched) -> None:
        meta_opt.param_groups[0]["lr"] = lr

    return arm


AFTER_THE_POLICY: list[
    tuple[str, Callable[[], Any], Callable[[Optimizer, Watched], None], Any, str]
] = [
    # (name, policy, what makes the step fail, its meta-batch, the error it gets)
    ("infinite beta", CountingStep, set_beta(math.inf), MLP_TASKS, "returned beta=inf"),
    ("NaN query", CountingStep, set_beta(0.05), scaled_query(math.nan), "non-finite outer loss"),
    ("overflowing weights", CountingStep, set_beta(1e308), scaled_query(1e3), "non-finite weights"),
    ("re-estimate, then infinite beta", reestimating, set_lr(math.inf), MLP_TASKS, "beta=inf"),
    (
        "re-estimate, then NaN query",
        reestimating,
        set_lr(1.0),
        scaled_query(math.nan),
        "outer loss",
    ),
    (
        "re-estimate, then overflowing weights",
        reestimating,
        set_lr(1e308),
        scaled_query(1e9),
        "non-finite weights",
    ),
]


@pytest.mark.parametrize("nan_policy", ["raise", "skip"])
@pytest.mark.parametrize(
    ("name", "policy", "arm", "tasks", "message"),
    AFTER_THE_POLICY,
    ids=[case[0] for case in AFTER_THE_POLICY],
)
def test_a_step_that_fails_after_the_policy_ran_keeps_the_policys_state(
    name: str,
    policy: Callable[[], Any],
    arm: Callable[[Optimizer, Watched], None],
    tasks: Any,
    message: str,
    nan_policy: Any,
) -> None:
    """The policy changes its state, then the step fails (beta, meta gradient or new weights
    not finite): the state, and everything else, stays bitwise as it was."""
    watched = Watched(policy())
    meta_opt: Optimizer = tm.MetaOptimizer(
        make_mlp(0),
        mse_loss,
        inner_loop=tm.GradientDescent(steps=1, lr=INNER_LR),
        estimator=tm.FiniteSum(),
        step_size=watched,
        generator=torch.Generator().manual_seed(0),
        nan_policy=nan_policy,
    )
    for _ in range(2):  # history: a step count, a policy state (re-estimated at k = 1)
        meta_opt.step(MLP_TASKS)
    meta_opt.meta_backward(MLP_TASKS)  # and gradients to be left alone
    assert meta_opt.step_size_state != {}
    arm(meta_opt, watched)
    before = optimizer_state(meta_opt)
    watched.wrote = None
    if nan_policy == "raise":
        with pytest.raises(tm.NonFiniteError, match=message):
            meta_opt.step(tasks, probe_tasks=MLP_TASKS)
        assert same(optimizer_state(meta_opt), before)
    else:
        assert meta_opt.step(tasks, probe_tasks=MLP_TASKS).skipped
        after = optimizer_state(meta_opt)
        kept = (0, 1, 2, 5, 7)  # weights, .grad, buffers, meta_steps, step_size_state
        assert same([after[i] for i in kept], [before[i] for i in kept])
        assert after[6] == before[6] + 1  # skipped_steps
    # The policy did run, and left another state than the optimizer's.
    assert watched.wrote is not None
    assert not same(watched.wrote, meta_opt.step_size_state)


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
