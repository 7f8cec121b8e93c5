r"""2D point navigation with multi-step MAML reinforcement learning (Finn et al. 2017, sec. 5.3).

A point agent starts at the origin of the plane; each task has a goal drawn uniformly
from ``[-0.5, 0.5]^2``. At each of ``H = 20`` time steps the agent picks a velocity
``a_t`` (each coordinate clipped to ``[-0.1, 0.1]``), moves to ``s_{t+1} = s_t +
clip(a_t)`` and receives the reward ``r_t = -||s_{t+1} - goal||``. The policy is
Gaussian, ``a_t ~ N(mu_w(s_t), sigma^2 I)``, with a 2-64-64-2 tanh network for the mean
(squashed by ``0.1 tanh`` into the action range) and a fixed ``sigma = 0.1``. It is
meta-trained so that ``N = 3`` policy-gradient steps on a new goal's trajectories steer
it to that goal. This is the resampling case of Ji, Yang & Liang (their eq. 6-7 and
Appendix A.1): the task loss is ``l_i(w) = -E_{tau ~ pi_w}[R(tau)]``, and every term of
the meta gradient is estimated from trajectories sampled fresh for it.

What it shows (seed 0, default run): on 20 held-out goals, the meta-trained policy
before adaptation stays near the origin (the goals' centre), with a mean return of
-7.5; three inner steps on 20 trajectories of a new goal take it there, to -2.84,
close to the -2.56 of a reference controller that knows the goal and heads straight
for it. The random initialisation adapted the same way goes from -9.6 to -7.6. The
final table gives these returns, and two plots go to ``--out`` (default
``docs/images``): the held-out returns before and after adaptation over meta-training
(``navigation_rl_returns.png``) and trajectories of the meta-trained policy before and
after adapting to four held-out goals (``navigation_rl_trajectories.png``).

Run it with::

    python examples/navigation_rl.py             # about 2 minutes on a 2-core CPU
    python examples/navigation_rl.py --quick     # a few seconds (used by the test suite)
    python examples/navigation_rl.py --seed 1 --inner-steps 2 --inner-lr 0.03
    python examples/navigation_rl.py --outer step --outer-lr 0.01

How trajectories are sampled at the current weights
===================================================

:class:`torch_maml.Resampled` asks each task for batches by ``task.sample(size,
generator)``, before any inner step is taken and without the weights: ``N`` inner
batches ``S_j``, ``N`` Hessian batches ``D_j`` and an outer batch ``T``. Trajectories
must come from the policy at the weights where each batch is used (``w_j`` for ``S_j``
and ``D_j``, ``w_N`` for ``T``), which are not known yet. So a task's ``sample``
returns the randomness of ``size`` trajectories, not the trajectories: a
:class:`NavigationBatch` holds the goal and ``size x H x 2`` standard-normal draws
``eps``. The loss closure, called by the optimizer with the weights ``theta`` it
differentiates at, rolls the trajectories out there, all ``size`` of them at once:
``a_t = mu_theta(s_t) + sigma eps_t``. For ``theta = w_j`` that is exactly a sample of
``size`` independent trajectories from ``pi_{w_j}`` (reparametrised sampling of a
Gaussian: ``mu + sigma eps`` with ``eps ~ N(0, I)`` has the law ``N(mu, sigma^2 I)``),
and independent ``eps`` give independent trajectories, so ``S_j``, ``D_j`` and ``T``
are fresh and mutually independent as eq. 7 asks. The rollout runs under
``torch.no_grad()``: the actions are samples, not functions of ``theta``, and the
states depend on ``theta`` only through them, so nothing is differentiated through
the dynamics: the estimator below is a score-function one, and a pathwise derivative
through the actions as well would count their dependence on ``theta`` twice.

Why the DiCE surrogate gives unbiased gradients and Hessians
============================================================

On the sampled trajectories, with ``l_t(theta) = log pi_theta(a_t | s_t)``, the loss is
the DiCE surrogate (Foerster et al., 2018) with a baseline term in the form of Mao et
al. (2019):

.. math::
    \mathcal{L}(\theta) = -\frac{1}{n} \sum_{\tau} \sum_{t=0}^{H-1}
        \Big[ \square\big(\textstyle\sum_{t' \le t} l_{t'}\big)\, r_t
        + \big(1 - \square(l_t)\big)\, \square\big(\textstyle\sum_{t' < t} l_{t'}\big)\, b_t
        \Big], \qquad \square(x) = \exp(x - \mathrm{stopgrad}(x)).

``box`` evaluates to 1 and its derivatives are those of ``exp(x)`` at the point, so
``grad box(W) = box(W) grad W`` and ``grad^2 box(W) = box(W) (grad^2 W + grad W grad
W^T)``. At ``theta = w``, where the trajectories were sampled, these are the
score-function (likelihood-ratio) identities for the density ``p_w(tau_{0:t}) =
prod_{t' <= t} pi_w(a_{t'} | s_{t'}) q(s_{t'+1} | s_{t'}, a_{t'})`` (the dynamics ``q``
do not depend on ``w``): ``E[r_t grad W_t] = grad E[r_t]`` and ``E[r_t (grad^2 W_t +
grad W_t grad W_t^T)] = grad^2 E[r_t]``, with ``W_t = sum_{t' <= t} l_{t'}`` so that a
reward is weighted by the actions before it only (causality). Hence the gradient and
the Hessian of the first term are unbiased estimates of ``-grad E[R]`` and ``-grad^2
E[R]`` at ``w``: what the inner steps (``S_j``), the Hessian batches (``D_j``) and the
outer gradient (``T``) of eq. 7 each need. The baseline term is zero in value and in
expectation of every derivative: given the history up to ``s_t``, ``E[grad l_t] = 0``
and ``E[grad^2 l_t + grad l_t grad l_t^T] = 0`` (derivatives of ``int pi = 1``), and
``b_t`` does not depend on trajectory ``tau``'s actions: it is the mean reward-to-go at
``t`` of the *other* trajectories of the batch (leave-one-out), a constant to autograd.
It cuts the variance of the first-order terms (to ``sum_t grad l_t (R_t - b_t)`` with
``R_t`` the reward-to-go) and, through ``box(W_{t-1})``, of the second-order ones. The
Monte Carlo mean of both derivatives is checked against a closed form in
``tests/test_example_navigation.py``. The value of the loss is minus the batch's mean
return, which is what the optimizer reports as the meta loss.

Choices:

* Estimator :class:`torch_maml.Resampled` ``(20, 20, 20)``: Finn's 20 trajectories per
  inner step, and as many for each Hessian batch and for the outer gradient. The
  meta-batch of 20 goals runs vectorised (``torch.func.vmap`` over goals: the tasks'
  batches have equal shapes, so the library stacks them; the vectorised meta gradient
  equals the task-by-task one, tested).
* ``N = 3`` inner steps of ``alpha = 0.02`` (``--inner-steps``, ``--inner-lr``). The
  loss is the total return, as in the paper, whose gradient is large (norm about 20 at
  the initialisation: 20 rewards, scores of ``1 / sigma = 10``), so ``alpha`` is small.
  From the random initialisation one step of 0.1 or more already lowers the return.
  Measured (seed 0): ``N = 2``, ``alpha = 0.03`` plateaued at a post-adaptation return
  of -3.3 to -3.5 in 400 to 600 iterations; ``N = 3``, ``alpha = 0.02`` reached -2.85.
* Horizon ``H = 20`` instead of Finn's 100, for CPU time: the rollout is sequential in
  ``t`` and a meta iteration's cost grows linearly with ``H`` (0.17 s at ``H = 20``,
  1.6 s at ``H = 100`` on this CPU), and longer horizons need more iterations too
  (with ``N = 2``, ``alpha = 0.004``, the post-adaptation return at ``H = 100`` was
  still -109 after 100 iterations, against -10 for the goal-aware controller). At full
  speed any goal is reached in 5 steps at most, so 20 steps still reward both getting
  to the goal and staying there. ``--horizon`` changes it.
* Fixed ``sigma = 0.1``, the action bound, not learned: a learned log-std would be
  adapted in the inner loop as well and can collapse or blow up in a few steps.
* Outer optimiser: ``meta_opt.meta_backward(tasks)`` and ``torch.optim.Adam`` (lr
  ``3e-3``, annealed to 0 along a cosine by ``torch.optim.lr_scheduler``), not Finn's
  TRPO: the library computes the meta gradient and any ``torch.optim`` optimiser takes
  the step. The estimates are heavy-tailed (meta-gradient norms of 5 typically, up to
  50): with a constant lr of 3e-3 one run collapsed after 360 iterations (the
  post-adaptation return fell from -2.9 to -10), and with the annealing it did not.
  ``--outer step`` takes ``meta_opt.step`` with ``tm.Constant`` (the scheduler then
  anneals the MetaOptimizer's own lr); 0.01 trained in the quick run, 0.03 sent the
  policy's mean to the action bound.
* ``--threads 1`` (default): torch's intra-op threads are set to 1 for the run (and
  restored after). The work is many small tensor operations, which threads do not
  speed up; on a shared 2-core CPU two threads made an iteration 40 times slower
  (6.1 s instead of 0.14 s), waiting on each other.

Everything is seeded by ``--seed``: the initialisation through ``torch.manual_seed``,
the training goals and the optimizer's draws through ``torch.Generator`` objects, and
the held-out goals and evaluation trajectories through others (the same evaluation
draws at every evaluation, so the curves compare policies on common random numbers).
A run prints the same numbers every time on the same machine and torch build.

References:
    C. Finn, P. Abbeel, S. Levine. Model-Agnostic Meta-Learning for Fast Adaptation of
    Deep Networks. ICML 2017.
    J. Foerster, G. Farquhar, M. Al-Shedivat, T. Rocktaeschel, E. Xing, S. Whiteson.
    DiCE: The Infinitely Differentiable Monte Carlo Estimator. ICML 2018.
    J. Mao, J. Foerster, T. Rocktaeschel, M. Al-Shedivat, G. Farquhar, S. Whiteson.
    A Baseline for Any Order Gradient Estimation in Stochastic Computation Graphs.
    ICML 2019.
"""

from __future__ import annotations

import argparse
import copy
import math
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import NamedTuple

import matplotlib

matplotlib.use("Agg")  # files only, no screen
import matplotlib.pyplot as plt
import torch
from torch import Tensor, nn
from torch.func import functional_call
from tqdm import tqdm

import torch_maml as tm

HORIZON = 20
"""``H``: time steps per trajectory (Finn's is 100; see the module docstring)."""
MAX_SPEED = 0.1
"""Each coordinate of an action is clipped to ``[-MAX_SPEED, MAX_SPEED]``."""
ACTION_STD = 0.1
"""``sigma``: the policy's fixed standard deviation, per coordinate."""
GOAL_RANGE = 0.5
"""Goals are uniform in ``[-GOAL_RANGE, GOAL_RANGE]^2``."""
HIDDEN = 64
"""Width of the policy network's two hidden layers."""
TRAJECTORIES = 20
"""Trajectories per inner step, per Hessian batch and per outer batch (Finn's 20)."""
INNER_STEPS = 3
"""``N``: inner policy-gradient steps, in training and at evaluation."""
INNER_LR = 0.02
"""``alpha``: the inner step size."""
META_BATCH = 20
"""Goals per meta iteration (Finn's 20)."""
ITERATIONS = 600
"""Default meta iterations: about 2 minutes on a 2-core CPU."""
EVAL_GOALS = 20
"""Held-out goals of the evaluations."""
EVAL_TRAJECTORIES = 50
"""Trajectories per held-out goal over which a return is averaged."""
EVALUATIONS = 10
"""Evaluations over meta-training (besides the one at the start)."""
EVAL_SEED_OFFSET = 1_000_003
"""Held-out goals and their draws come from generators seeded from ``seed`` plus this."""
QUICK_ITERATIONS, QUICK_META_BATCH, QUICK_EVAL_GOALS, QUICK_EVALUATIONS = 40, 10, 10, 4
"""``--quick``: iterations, goals per iteration, held-out goals and evaluations."""
DEFAULT_OUTER_LR = {"adam": 3e-3, "step": 0.01}
"""The outer step size of each ``--outer`` choice when ``--outer-lr`` is not given."""
PLOT_GOALS = 4
"""Goals whose trajectories are drawn, and trajectories drawn per goal: 4."""


class NavigationBatch(NamedTuple):
    """What a task's ``sample`` returns: the goal and the noise of ``size`` trajectories.

    The trajectories themselves are rolled out by :func:`loss_fn`, at the weights it is
    called with (see the module docstring).
    """

    goal: Tensor
    """The task's goal, shape ``(2,)``."""
    noise: Tensor
    """Standard-normal ``eps``, shape ``(size, H, 2)``: ``a_t = mu(s_t) + sigma eps_t``."""


class NavigationTask:
    """One goal: a :class:`torch_maml.Sampler` of trajectory noise.

    (A plain class rather than a dataclass: the test suite loads this file without
    registering it as a module, which dataclasses need.)

    Args:
        goal: the goal, shape ``(2,)``; its dtype is the noise's.
        horizon: time steps per trajectory.
    """

    def __init__(self, goal: Tensor, horizon: int = HORIZON) -> None:
        self.goal = goal
        self.horizon = horizon

    def sample(self, size: int, generator: torch.Generator | None = None) -> NavigationBatch:
        """The noise of ``size`` fresh independent trajectories, and the goal."""
        noise = torch.randn(size, self.horizon, 2, generator=generator, dtype=self.goal.dtype)
        return NavigationBatch(self.goal, noise)


class Trajectories(NamedTuple):
    """A batch of rolled-out trajectories, without gradient."""

    states: Tensor
    """``s_0..s_{H-1}``, shape ``(size, H, 2)``."""
    actions: Tensor
    """``a_0..a_{H-1}`` as sampled (before clipping), shape ``(size, H, 2)``."""
    rewards: Tensor
    """``r_0..r_{H-1}``, shape ``(size, H)``."""
    end: Tensor
    """The final states ``s_H``, shape ``(size, 2)``."""


class Evaluation(NamedTuple):
    """Mean return over the held-out goals, before and after adaptation."""

    pre: float
    post: float


class Result(NamedTuple):
    """The final numbers of a run, as printed in its table."""

    meta_pre_return: float
    """Meta-trained policy, as is, on the held-out goals."""
    meta_post_return: float
    """Meta-trained policy after ``N`` inner steps on each goal's trajectories."""
    baseline_pre_return: float
    """The same policy at its random initialisation (not meta-trained), as is."""
    baseline_post_return: float
    """The random initialisation after ``N`` inner steps."""
    oracle_return: float
    """A reference that knows the goal and heads straight for it (:func:`oracle_return`)."""
    iterations: int
    """Meta iterations run."""
    train_seconds: float
    """Wall-clock time of the training loop, evaluations included."""
    curve: list[tuple[int, Evaluation]]
    """The held-out returns over meta-training, by iteration (0: the initialisation)."""
    plots: list[Path]
    """The PNG files written."""


class GaussianPolicy(nn.Module):
    """``pi_w(a | s) = N(mu_w(s), sigma^2 I)``: ``mu_w = MAX_SPEED tanh(MLP(s))``.

    Its forward pass gives the mean ``mu_w(s)``; ``sigma`` is a constant.

    Args:
        hidden: width of the two hidden layers.
        std: ``sigma``.
    """

    def __init__(self, hidden: int = HIDDEN, std: float = ACTION_STD) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(2, hidden),
            nn.Tanh(),
            nn.Linear(hidden, hidden),
            nn.Tanh(),
            nn.Linear(hidden, 2),
        )
        self.std = std

    def forward(self, states: Tensor) -> Tensor:
        return MAX_SPEED * torch.tanh(self.net(states))


NavigationMetaOptimizer = tm.MetaOptimizer[GaussianPolicy, NavigationBatch]


def rollout(mean: Callable[[Tensor], Tensor], std: float, batch: NavigationBatch) -> Trajectories:
    """Roll out the batch's trajectories with ``a_t = mean(s_t) + std eps_t``, no gradient.

    All trajectories step together: one call of ``mean`` per time step.
    """
    goal, noise = batch
    with torch.no_grad():
        state = torch.zeros_like(noise[:, 0])
        states, actions, rewards = [], [], []
        for t in range(noise.shape[1]):
            action = mean(state) + std * noise[:, t]
            states.append(state)
            actions.append(action)
            state = state + action.clamp(-MAX_SPEED, MAX_SPEED)
            rewards.append(-torch.linalg.vector_norm(state - goal, dim=-1))
        return Trajectories(
            torch.stack(states, 1), torch.stack(actions, 1), torch.stack(rewards, 1), state
        )


def magic_box(x: Tensor) -> Tensor:
    """DiCE's ``box(x) = exp(x - stopgrad(x))``: 1 in value, ``d box = box dx``."""
    return torch.exp(x - x.detach())


def dice_loss(log_probs: Tensor, rewards: Tensor) -> Tensor:
    """Minus the DiCE surrogate return with a leave-one-out baseline (module docstring).

    Args:
        log_probs: ``log pi_theta(a_t | s_t)`` of the sampled actions, shape ``(n, H)``,
            differentiable in ``theta``; ``n >= 2`` for the baseline (none for ``n = 1``).
        rewards: ``r_t``, shape ``(n, H)``, without gradient.

    Returns:
        A scalar equal to minus the mean return, whose derivatives of every order at the
        sampling weights are unbiased estimates of those of ``-E[R]``.
    """
    n = rewards.shape[0]
    cumulative = log_probs.cumsum(dim=1)  # W_t = sum_{t' <= t} l_t'
    to_go = rewards.flip(1).cumsum(1).flip(1)  # R_t = sum_{t' >= t} r_t'
    baseline = (to_go.sum(0, keepdim=True) - to_go) / max(n - 1, 1)  # others' mean R_t
    surrogate = (
        magic_box(cumulative) * rewards
        + (1 - magic_box(log_probs)) * magic_box(cumulative - log_probs) * baseline
    )
    return -surrogate.sum(1).mean()


def gaussian_log_prob(actions: Tensor, mean: Tensor, std: float) -> Tensor:
    """``log N(a; mean, std^2 I)`` summed over the action's coordinates, up to a constant.

    The constant (``-log std - log(2 pi) / 2`` per coordinate) does not depend on the
    weights, so it changes neither the surrogate's value (``box(x) = 1``) nor its
    derivatives.
    """
    return (-0.5 * ((actions - mean) / std) ** 2).sum(-1)


def loss_fn(policy: GaussianPolicy, batch: NavigationBatch) -> Tensor:
    """Minus the DiCE surrogate return of trajectories rolled out at ``policy``'s weights.

    ``policy`` carries the weights ``theta`` the optimizer evaluates at; the noise of
    ``batch`` is turned into trajectories from ``pi_theta``, then the log-probabilities
    of their actions are computed with gradient in one pass over all states.
    """
    trajectories = rollout(policy, policy.std, batch)
    log_probs = gaussian_log_prob(trajectories.actions, policy(trajectories.states), policy.std)
    return dice_loss(log_probs, trajectories.rewards)


def sample_tasks(
    count: int, generator: torch.Generator, horizon: int = HORIZON
) -> list[NavigationTask]:
    """``count`` goals uniform in ``[-GOAL_RANGE, GOAL_RANGE]^2``, one task each."""
    goals = torch.empty(count, 2).uniform_(-GOAL_RANGE, GOAL_RANGE, generator=generator)
    return [NavigationTask(goal, horizon) for goal in goals]


def make_meta_optimizer(
    policy: GaussianPolicy, inner_steps: int, inner_lr: float, outer_lr: float, seed: int
) -> NavigationMetaOptimizer:
    """The MetaOptimizer of this example: N inner steps, Resampled(20, 20, 20), Constant.

    The ``Constant`` step size is what ``meta_opt.step`` uses (``--outer step``);
    ``meta_backward`` (``--outer adam``) only computes the gradient and ignores it.
    """
    return tm.MetaOptimizer(
        policy,
        loss_fn,
        inner_loop=tm.GradientDescent(steps=inner_steps, lr=inner_lr),
        estimator=tm.Resampled(TRAJECTORIES, TRAJECTORIES, TRAJECTORIES),
        step_size=tm.Constant(outer_lr),
        generator=torch.Generator().manual_seed(seed),
    )


def adapted_mean(policy: GaussianPolicy, params: dict[str, Tensor]) -> Callable[[Tensor], Tensor]:
    """The policy's mean ``mu`` at the weights ``params`` (from ``meta_opt.adapt``)."""

    def mean(states: Tensor) -> Tensor:
        output: Tensor = functional_call(policy, params, (states,))
        return output

    return mean


def evaluate(
    meta_opt: NavigationMetaOptimizer, tasks: Sequence[NavigationTask], seed: int
) -> Evaluation:
    """Mean return over ``tasks`` before and after ``N`` inner steps on each.

    The adaptation's trajectories and the evaluation's come from a generator seeded
    with ``seed``, so that every call draws the same noise (and none from the
    optimizer's own generator).
    """
    generator = torch.Generator().manual_seed(seed)
    policy = meta_opt.model
    pre = post = 0.0
    for task in tasks:
        adapted = meta_opt.adapt(task, inner_size=TRAJECTORIES, generator=generator)
        before = rollout(policy, policy.std, task.sample(EVAL_TRAJECTORIES, generator))
        after = rollout(
            adapted_mean(policy, adapted),
            policy.std,
            task.sample(EVAL_TRAJECTORIES, generator),
        )
        pre += before.rewards.sum(1).mean().item()
        post += after.rewards.sum(1).mean().item()
    return Evaluation(pre=pre / len(tasks), post=post / len(tasks))


def oracle_return(tasks: Sequence[NavigationTask], std: float, seed: int) -> float:
    """Mean return of a reference that knows the goal: ``mu(s) = clip(goal - s)``.

    It heads straight for the goal at full speed and then holds, with the same
    exploration noise ``sigma`` as the policy: a strong reference (not proven optimal)
    that puts the learned returns in perspective.
    """
    generator = torch.Generator().manual_seed(seed)
    total = 0.0
    for task in tasks:

        def mean(states: Tensor, goal: Tensor = task.goal) -> Tensor:
            return (goal - states).clamp(-MAX_SPEED, MAX_SPEED)

        paths = rollout(mean, std, task.sample(EVAL_TRAJECTORIES, generator))
        total += paths.rewards.sum(1).mean().item()
    return total / len(tasks)


def train(
    meta_opt: NavigationMetaOptimizer,
    *,
    iterations: int,
    meta_batch: int,
    horizon: int,
    outer: str,
    outer_lr: float,
    generator: torch.Generator,
    evaluate_at: set[int],
    evaluation: Callable[[], Evaluation],
) -> list[tuple[int, Evaluation]]:
    """Meta-train ``meta_opt.model``; return the held-out evaluations along the way."""
    adam = torch.optim.Adam(meta_opt.model.parameters(), lr=outer_lr) if outer == "adam" else None
    # The outer step size decays to 0 along a cosine; for --outer step the scheduler
    # drives the MetaOptimizer's own lr, which tm.Constant reads.
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(adam or meta_opt, T_max=iterations)
    curve = [(0, evaluation())]
    window: list[float] = []
    start = time.perf_counter()
    progress = tqdm(range(1, iterations + 1), desc="meta-training", unit="it", disable=None)
    for iteration in progress:
        tasks = sample_tasks(meta_batch, generator, horizon)
        if adam is None:
            loss = meta_opt.step(tasks).loss
        else:
            adam.zero_grad()
            loss = meta_opt.meta_backward(tasks).loss
            adam.step()
        schedule.step()
        window.append(-loss.item())  # the outer batches' mean return after adaptation
        if iteration in evaluate_at:
            result = evaluation()
            curve.append((iteration, result))
            train_return = sum(window) / len(window)
            progress.set_postfix(post=f"{result.post:.2f}")
            tqdm.write(
                f"iteration {iteration:4d}/{iterations}  training return (adapted) "
                f"{train_return:7.3f}  held-out pre {result.pre:7.3f}  post {result.post:7.3f}"
                f"  ({time.perf_counter() - start:5.1f} s)"
            )
            window.clear()
    progress.close()
    return curve


def plot_returns(
    curve: list[tuple[int, Evaluation]],
    baseline: Evaluation,
    oracle: float,
    inner_steps: int,
    path: Path,
) -> None:
    """Held-out mean return before and after adaptation, over meta-training."""
    iterations = [iteration for iteration, _ in curve]
    figure, axes = plt.subplots(figsize=(6.5, 5))
    axes.plot(
        iterations,
        [e.post for _, e in curve],
        "-o",
        markersize=4,
        color="tab:blue",
        label=f"MAML, after {inner_steps} inner steps",
    )
    axes.plot(
        iterations,
        [e.pre for _, e in curve],
        "--s",
        markersize=4,
        color="tab:blue",
        alpha=0.6,
        label="MAML, before adaptation",
    )
    axes.axhline(
        baseline.post,
        color="tab:gray",
        linestyle="-",
        label=f"random init, after {inner_steps} inner steps",
    )
    axes.axhline(
        baseline.pre, color="tab:gray", linestyle="--", label="random init, before adaptation"
    )
    axes.axhline(oracle, color="black", linestyle=":", label="goal-aware reference")
    axes.set(
        xlabel="meta iteration",
        ylabel="mean return (held-out goals)",
        title="2D navigation: return before and after adaptation",
    )
    axes.margins(y=0.08)  # the reference line clear of the frame
    # Below the axes, where it cannot cover a curve whatever the run's numbers.
    axes.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.16), ncol=2)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def plot_trajectories(
    meta_opt: NavigationMetaOptimizer,
    tasks: Sequence[NavigationTask],
    inner_steps: int,
    path: Path,
    seed: int,
) -> None:
    """Trajectories of the meta-trained policy before and after adapting to each task."""
    generator = torch.Generator().manual_seed(seed)
    policy = meta_opt.model
    figure, axes = plt.subplots(1, 2, figsize=(9, 4.6), sharex=True, sharey=True)
    titles = ("before adaptation", f"after {inner_steps} inner steps")
    colors = [f"C{i}" for i in range(10)]
    for index, task in enumerate(tasks):
        goal = task.goal
        adapted = meta_opt.adapt(task, inner_size=TRAJECTORIES, generator=generator)
        means: list[Callable[[Tensor], Tensor]] = [policy, adapted_mean(policy, adapted)]
        for axis, mean in zip(axes, means, strict=True):
            paths = rollout(mean, policy.std, task.sample(PLOT_GOALS, generator))
            points = torch.cat([paths.states, paths.end.unsqueeze(1)], dim=1)
            for line in points:
                axis.plot(line[:, 0], line[:, 1], color=colors[index], alpha=0.7, linewidth=1)
            axis.plot(
                goal[0],
                goal[1],
                marker="*",
                markersize=14,
                color=colors[index],
                markeredgecolor="black",
            )
    for axis, title in zip(axes, titles, strict=True):
        axis.plot(0, 0, "ko", markersize=4)
        axis.set(xlim=(-0.8, 0.8), ylim=(-0.8, 0.8), aspect="equal", title=title, xlabel="x")
    axes[0].set_ylabel("y")
    figure.suptitle("Meta-trained policy, 4 held-out goals (stars), 4 trajectories each")
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """The command line; see the module docstring."""
    parser = argparse.ArgumentParser(
        description="Meta-train a 2D navigation policy with multi-step MAML RL (Finn et al. 2017)."
    )
    parser.add_argument(
        "--iterations", type=int, default=None, help="meta iterations (default: 300, quick: 40)"
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of everything (default: 0)")
    parser.add_argument(
        "--quick",
        action="store_true",
        help="a run of a few seconds: 40 iterations of 10 goals, 10 held-out goals",
    )
    parser.add_argument(
        "--horizon",
        type=int,
        default=HORIZON,
        help="H, steps per trajectory (default: %(default)s)",
    )
    parser.add_argument(
        "--inner-steps", type=int, default=INNER_STEPS, help="N (default: %(default)s)"
    )
    parser.add_argument(
        "--inner-lr", type=float, default=INNER_LR, help="alpha (default: %(default)s)"
    )
    parser.add_argument(
        "--outer",
        choices=sorted(DEFAULT_OUTER_LR),
        default="adam",
        help="outer update: meta_backward + Adam (default), or meta_opt.step with Constant",
    )
    parser.add_argument(
        "--outer-lr",
        type=float,
        default=None,
        help="outer step size (default: 3e-3 for adam, 0.01 for step)",
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch's intra-op threads during the run (default: 1, see the docstring)",
    )
    parser.add_argument(
        "--out", type=Path, default=Path("docs/images"), help="where the PNG plots go"
    )
    args = parser.parse_args(argv)
    if args.iterations is not None and args.iterations < 1:
        parser.error(f"--iterations must be at least 1 (got {args.iterations})")
    if args.threads < 1:
        parser.error(f"--threads must be at least 1 (got {args.threads})")
    if args.horizon < 1:
        parser.error(f"--horizon must be at least 1 (got {args.horizon})")
    if args.inner_steps < 1:
        parser.error(f"--inner-steps must be at least 1 (got {args.inner_steps})")
    for name in ("inner_lr", "outer_lr"):
        value = getattr(args, name)
        if value is not None and not value > 0:
            parser.error(f"--{name.replace('_', '-')} must be > 0 (got {value})")
    return args


def run(args: argparse.Namespace) -> Result:
    """Meta-train, evaluate, plot and print the table; see :func:`main`."""
    iterations: int = args.iterations or (QUICK_ITERATIONS if args.quick else ITERATIONS)
    meta_batch = QUICK_META_BATCH if args.quick else META_BATCH
    eval_goals = QUICK_EVAL_GOALS if args.quick else EVAL_GOALS
    evaluations = QUICK_EVALUATIONS if args.quick else EVALUATIONS
    inner_steps: int = args.inner_steps
    horizon: int = args.horizon
    inner_lr: float = args.inner_lr
    outer: str = args.outer
    outer_lr: float = args.outer_lr or DEFAULT_OUTER_LR[outer]

    torch.manual_seed(args.seed)
    policy = GaussianPolicy()
    settings = (inner_steps, inner_lr, outer_lr, args.seed + 1)  # its draws: seed + 1
    baseline_opt = make_meta_optimizer(copy.deepcopy(policy), *settings)  # never meta-trained
    meta_opt = make_meta_optimizer(policy, *settings)
    eval_seed = args.seed + EVAL_SEED_OFFSET
    held_out = sample_tasks(eval_goals, torch.Generator().manual_seed(eval_seed), horizon)
    evaluate_at = {math.ceil(k * iterations / evaluations) for k in range(1, evaluations + 1)}

    print(
        f"MAML RL on 2D navigation: {iterations} iterations x {meta_batch} goals, "
        f"N={inner_steps} inner steps of lr {inner_lr}, {TRAJECTORIES} trajectories of "
        f"{horizon} steps per batch, outer {outer} lr {outer_lr}, seed {args.seed}",
        flush=True,
    )
    start = time.perf_counter()
    curve = train(
        meta_opt,
        iterations=iterations,
        meta_batch=meta_batch,
        horizon=horizon,
        outer=outer,
        outer_lr=outer_lr,
        generator=torch.Generator().manual_seed(args.seed),
        evaluate_at=evaluate_at,
        evaluation=lambda: evaluate(meta_opt, held_out, eval_seed),
    )
    train_seconds = time.perf_counter() - start
    trained = curve[-1][1]
    untrained = evaluate(baseline_opt, held_out, eval_seed)
    oracle = oracle_return(held_out, policy.std, eval_seed)

    args.out.mkdir(parents=True, exist_ok=True)
    plots = [args.out / "navigation_rl_returns.png", args.out / "navigation_rl_trajectories.png"]
    plot_returns(curve, untrained, oracle, inner_steps, plots[0])
    plot_trajectories(meta_opt, held_out[:PLOT_GOALS], inner_steps, plots[1], eval_seed + 1)

    print(
        f"\nMean return on {eval_goals} held-out goals ({EVAL_TRAJECTORIES} trajectories "
        f"each, {inner_steps} inner steps on {TRAJECTORIES} trajectories):"
    )
    print(f"{'policy':<22}{'pre-adaptation':>16}{'post-adaptation':>17}")
    print(f"{'meta-trained (MAML)':<22}{trained.pre:>16.3f}{trained.post:>17.3f}")
    print(f"{'random init baseline':<22}{untrained.pre:>16.3f}{untrained.post:>17.3f}")
    print(f"{'goal-aware reference':<22}{oracle:>16.3f}{'(knows the goal)':>17}")
    print(f"training: {train_seconds:.1f} s")
    print("plots: " + ", ".join(str(p) for p in plots))
    return Result(
        meta_pre_return=trained.pre,
        meta_post_return=trained.post,
        baseline_pre_return=untrained.pre,
        baseline_post_return=untrained.post,
        oracle_return=oracle,
        iterations=iterations,
        train_seconds=train_seconds,
        curve=curve,
        plots=plots,
    )


def main(argv: list[str] | None = None) -> Result:
    """Run the example with the command line ``argv`` (default: ``sys.argv[1:]``).

    Returns:
        The final numbers of the table, the curve over meta-training, and the plots.
    """
    args = parse_args(argv)
    threads = torch.get_num_threads()
    torch.set_num_threads(args.threads)  # see the module docstring; restored on return
    try:
        return run(args)
    finally:
        torch.set_num_threads(threads)


if __name__ == "__main__":
    main()
