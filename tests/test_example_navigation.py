"""examples/navigation_rl.py: the DiCE loss is unbiased, vectorises, and the example learns.

examples/ is not a package: the example is loaded from its file, as a user would run it.
"""

from __future__ import annotations

import math
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import torch
from torch import Tensor
from torch.func import grad, jacrev, vmap

import torch_maml as tm
from tests.problems import load_example


def hessian(f: Any) -> Any:
    """Reverse over reverse (torch.func.hessian's forward mode warns in torch 2.13)."""
    return jacrev(grad(f))


Z_MAX = 4.5
"""Largest |z-score| allowed for an unbiased Monte Carlo mean (about 7e-6 two-sided for
one Gaussian component; the draws are seeded, so a pass is reproducible)."""


@pytest.fixture(scope="module")
def navigation() -> ModuleType:
    return load_example("navigation_rl")


# ------------------------------------------------------------- DiCE, against a closed form
#
# A two-step linear-Gaussian chain in one dimension, theta = (b, k):
#   s_0 = 0,  a_t ~ N(b + k s_t, SIGMA^2),  s_{t+1} = s_t + a_t,  r_t = -(s_{t+1} - GOAL)^2.
# Then s_1 ~ N(b, SIGMA^2) and s_2 = (1 + k) s_1 + b + SIGMA eps_1, so
#   E[R] = -[(b - GOAL)^2 + SIGMA^2] - [((2 + k) b - GOAL)^2 + ((1 + k)^2 + 1) SIGMA^2],
# whose gradient and Hessian autograd gives exactly: an independent reference for the
# Monte Carlo means of the DiCE surrogate's derivatives (two steps, so the causal
# weighting and the baseline's box(W_{t-1}) factor both matter).

SIGMA, GOAL = 0.5, 1.0
THETA = (0.3, -0.5)
BATCHES, PER_BATCH = 20_000, 5


def expected_return(theta: Tensor) -> Tensor:
    b, k = theta[0], theta[1]
    first = (b - GOAL) ** 2 + SIGMA**2
    second = ((2 + k) * b - GOAL) ** 2 + ((1 + k) ** 2 + 1) * SIGMA**2
    return -(first + second)


def chain_log_probs_and_rewards(
    navigation: ModuleType, theta: Tensor, noise: Tensor
) -> tuple[Tensor, Tensor]:
    """Trajectories sampled at theta (detached), log-probabilities differentiable in it."""
    sampling = theta.detach()
    state = torch.zeros_like(noise[:, 0])
    states, actions, rewards = [], [], []
    for t in range(noise.shape[1]):
        action = sampling[0] + sampling[1] * state + SIGMA * noise[:, t]
        states.append(state)
        actions.append(action)
        state = state + action
        rewards.append(-((state - GOAL) ** 2))
    s, a = torch.stack(states, 1), torch.stack(actions, 1)
    mean = theta[0] + theta[1] * s
    log_probs = navigation.gaussian_log_prob(a.unsqueeze(-1), mean.unsqueeze(-1), SIGMA)
    return log_probs, torch.stack(rewards, 1)


def dice_objective(navigation: ModuleType, theta: Tensor, noise: Tensor) -> Tensor:
    """The example's surrogate return (minus its loss) on one batch of the chain."""
    log_probs, rewards = chain_log_probs_and_rewards(navigation, theta, noise)
    objective: Tensor = -navigation.dice_loss(log_probs, rewards)
    return objective


def reinforce_objective(navigation: ModuleType, theta: Tensor, noise: Tensor) -> Tensor:
    """A plain REINFORCE surrogate, sum_t l_t R_t: right gradient, biased Hessian."""
    log_probs, rewards = chain_log_probs_and_rewards(navigation, theta, noise)
    to_go = rewards.flip(1).cumsum(1).flip(1)
    return (log_probs * to_go).sum(1).mean()


def z_scores(samples: Tensor, truth: Tensor) -> Tensor:
    """|mean - truth| in standard errors of the mean, per component."""
    flat = samples.reshape(samples.shape[0], -1)
    error = flat.mean(0) - truth.reshape(-1)
    return error.abs() / (flat.std(0) / math.sqrt(flat.shape[0]))


def chain_estimates(
    navigation: ModuleType,
    objective: str,
    per_batch: int = PER_BATCH,
) -> tuple[Tensor, Tensor]:
    """Per-batch gradient and Hessian estimates, and their Monte Carlo draws, at THETA."""
    functions = {"dice": dice_objective, "reinforce": reinforce_objective}

    def f(theta: Tensor, noise: Tensor) -> Tensor:
        value: Tensor = functions[objective](navigation, theta, noise)
        return value

    theta = torch.tensor(THETA, dtype=torch.float64)
    generator = torch.Generator().manual_seed(2024)
    noise = torch.randn(BATCHES, per_batch, 2, generator=generator, dtype=torch.float64)
    grads = vmap(grad(f), in_dims=(None, 0))(theta, noise)
    hessians = vmap(hessian(f), in_dims=(None, 0))(theta, noise)
    return grads, hessians


@pytest.fixture(scope="module")
def dice_estimates(navigation: ModuleType) -> tuple[Tensor, Tensor]:
    return chain_estimates(navigation, "dice")


def test_dice_gradient_and_hessian_are_unbiased(dice_estimates: tuple[Tensor, Tensor]) -> None:
    theta = torch.tensor(THETA, dtype=torch.float64)
    true_grad = grad(expected_return)(theta)
    true_hessian = hessian(expected_return)(theta)
    grads, hessians = dice_estimates

    # On the reference machine the largest z-scores are about 1.4 (gradient) and 1.9
    # (Hessian); an unbiased estimator stays below 4.5 for all but ~1e-5 of seeds.
    assert z_scores(grads, true_grad).max() < Z_MAX
    hessian_z = z_scores(hessians, true_hessian).reshape(2, 2)
    assert hessian_z[0, 0] < Z_MAX
    assert hessian_z[0, 1] < Z_MAX
    assert hessian_z[1, 1] < Z_MAX
    # The estimates are symmetric, as a Hessian must be.
    torch.testing.assert_close(hessians, hessians.transpose(1, 2), rtol=0, atol=1e-12)


def test_the_test_detects_a_biased_hessian(navigation: ModuleType) -> None:
    """Plain REINFORCE's Hessian misses sum_t grad l grad W^T: the z-test rejects it."""
    theta = torch.tensor(THETA, dtype=torch.float64)
    grads, hessians = chain_estimates(navigation, "reinforce")
    assert z_scores(grads, grad(expected_return)(theta)).max() < Z_MAX  # unbiased gradient
    assert z_scores(hessians, hessian(expected_return)(theta)).max() > 10 * Z_MAX


def test_dice_baseline_reduces_variance_without_bias(
    navigation: ModuleType, dice_estimates: tuple[Tensor, Tensor]
) -> None:
    """One trajectory per batch has no (leave-one-out) baseline: same mean, more variance."""
    theta = torch.tensor(THETA, dtype=torch.float64)
    with_baseline, _ = dice_estimates
    alone, _ = chain_estimates(navigation, "dice", per_batch=1)
    assert z_scores(alone, grad(expected_return)(theta)).max() < Z_MAX
    # per trajectory: a batch of 5 with the baseline vs 5 x (1 without)
    variance_with = with_baseline.var(0) * PER_BATCH
    variance_alone = alone.var(0)
    assert (variance_with < 0.8 * variance_alone).all()  # measured: 0.60 and 0.64


# ------------------------------------------------------------- the example's loss closure


def small_policy(navigation: ModuleType) -> torch.nn.Module:
    torch.manual_seed(0)
    policy: torch.nn.Module = navigation.GaussianPolicy(hidden=8).double()
    return policy


def test_loss_is_minus_mean_return_and_its_gradient_is_gpomdp(navigation: ModuleType) -> None:
    """Value: -mean return. Gradient: -mean_tau sum_t grad l_t (R_t - b_t), by hand."""
    policy = small_policy(navigation)
    task = navigation.NavigationTask(torch.tensor([0.3, -0.2], dtype=torch.float64), horizon=6)
    batch = task.sample(7, torch.Generator().manual_seed(0))
    params = list(policy.parameters())

    loss = navigation.loss_fn(policy, batch)
    gradient = torch.autograd.grad(loss, params)

    paths = navigation.rollout(policy, policy.std, batch)
    torch.testing.assert_close(loss, -paths.rewards.sum(1).mean(), rtol=1e-14, atol=0)
    log_probs = navigation.gaussian_log_prob(paths.actions, policy(paths.states), policy.std)
    to_go = paths.rewards.flip(1).cumsum(1).flip(1)
    others_mean = (to_go.sum(0, keepdim=True) - to_go) / (to_go.shape[0] - 1)
    by_hand = -(log_probs * (to_go - others_mean)).sum(1).mean()
    expected = torch.autograd.grad(by_hand, params)
    for got, want in zip(gradient, expected, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


def test_samplers_run_vectorised_with_the_same_meta_gradient(navigation: ModuleType) -> None:
    """Same-shaped sampler tasks: vmap over goals equals the task-by-task autograd path."""
    goals = torch.tensor([[0.3, -0.2], [-0.4, 0.1], [0.0, 0.45]], dtype=torch.float64)
    tasks = [navigation.NavigationTask(goal, horizon=5) for goal in goals]

    def run(tasks: list[Any], chunk: int | None) -> tuple[Tensor, int]:
        """The meta gradient ``meta_backward`` writes, and how often the loss was called."""
        count = 0

        def counting_loss(policy: torch.nn.Module, batch: Any) -> Tensor:
            nonlocal count
            count += 1
            loss: Tensor = navigation.loss_fn(policy, batch)
            return loss

        policy = small_policy(navigation)
        meta_opt = tm.MetaOptimizer(
            policy,
            counting_loss,
            inner_loop=tm.GradientDescent(steps=2, lr=0.05),
            estimator=tm.Resampled(4, 5, 6),
            step_size=tm.Constant(1.0),
            generator=torch.Generator().manual_seed(0),
            task_chunk_size=chunk,
        )
        info = meta_opt.meta_backward(tasks)
        steps = 2
        assert (info.grad_evals, info.hvp_evals) == (len(tasks) * (steps + 1), len(tasks) * steps)
        grads = []
        for p in policy.parameters():
            assert p.grad is not None
            grads.append(p.grad.reshape(-1))
        return torch.cat(grads), count

    one_by_one, calls_one_by_one = run(tasks, 1)
    vectorised, calls_vectorised = run(tasks, None)
    _, calls_one_task = run(tasks[:1], None)
    # All three goals in each call of the loss: as many calls as for one goal alone.
    assert calls_vectorised == calls_one_task
    assert calls_one_by_one > calls_vectorised
    assert one_by_one.norm() > 0
    torch.testing.assert_close(vectorised, one_by_one, rtol=1e-10, atol=1e-12)


# ------------------------------------------------------------- the program


def test_quick_run_learns_to_adapt(
    navigation: ModuleType, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    threads = torch.get_num_threads()
    result = navigation.main(["--quick", "--out", str(tmp_path)])
    assert torch.get_num_threads() == threads  # the example restores the thread count

    # Seeded, hence deterministic: on the reference machine (torch 2.13 CPU) the quick
    # run's mean returns are -13.08 before adaptation and -4.74 after, and -9.42 and
    # -7.52 for the random initialisation; a goal-aware controller gets -2.55. The
    # margins of 1 leave a factor of 2.8 or more for other CPUs and torch builds.
    assert result.meta_post_return > result.meta_pre_return + 1.0
    assert result.meta_post_return > result.baseline_post_return + 1.0
    # The curve starts at the random initialisation, evaluated on the same draws.
    assert result.curve[0] == (0, (result.baseline_pre_return, result.baseline_post_return))
    # Nothing beats knowing the goal by much (the reference is not optimal, but close).
    assert result.oracle_return > result.meta_post_return

    for plot in result.plots:
        assert plot.parent == tmp_path
        assert plot.stat().st_size > 10_000
        assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    out = capsys.readouterr().out
    assert "meta-trained (MAML)" in out
    assert "random init baseline" in out


@pytest.mark.parametrize(
    "argv", [["--iterations", "0"], ["--inner-lr", "0"], ["--horizon", "0"], ["--outer", "x"]]
)
def test_rejects_bad_arguments(
    navigation: ModuleType, argv: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exit_info:
        navigation.main(argv)
    assert exit_info.value.code == 2
    assert "error" in capsys.readouterr().err
