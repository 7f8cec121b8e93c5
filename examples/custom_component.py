"""Bring your own components: a meta-gradient estimator and a step-size policy of your own.

torch_maml's parts are Protocols (``tm.InnerLoop``, ``tm.MetaGradientEstimator``,
``tm.StepSizePolicy``): any class with the right methods is accepted by
``tm.MetaOptimizer``, and ``mypy --strict`` checks it against the Protocol, with no
subclassing and no registration. This example writes two, as a user would in their
own code, and uses them to fix a real problem.

The problem: meta-training the sinusoid regressor of ``examples/sinusoid.py`` with the
library's own update (``meta_opt.step`` and a ``tm.Constant`` step size) is fast while
it lasts, but a step size large enough to be fast lets one meta-batch's large meta
gradient throw the weights far away: with ``beta = 0.2`` the run below stops with
``tm.NonFiniteError`` (the library refuses the step and keeps the last good weights).
Two small components fix it:

* ``ClippedNorm(estimator, max_norm)``, an estimator that wraps any other (here
  ``tm.FiniteSum()``) and rescales its meta gradient to norm at most ``max_norm``:
  gradient clipping, as a component that composes with every estimator.
* ``WarmupInverseSqrt(lr, warmup)``, a step-size policy: ``beta_k`` grows linearly to
  ``lr`` over ``warmup`` steps, then decays as ``lr * sqrt(warmup / k)``. It reads the
  param group's current ``lr`` from the step's context, so a
  ``torch.optim.lr_scheduler`` would still act on top of it.

The run trains the same initialisation on the same tasks (10 per meta-batch) twice:
``Constant(0.2)`` with ``FiniteSum``, and ``WarmupInverseSqrt(0.2, 50)`` with
``ClippedNorm(FiniteSum(), 10)``.
It prints the held-out query MSE after adaptation and saves the training curves to
``--out`` (default ``docs/images``) as ``custom_component.png``.

Run it with::

    python examples/custom_component.py            # about a minute on a 2-core CPU
    python examples/custom_component.py --quick    # seconds (the test suite's run)
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NamedTuple

import matplotlib

matplotlib.use("Agg")  # files only, no screen
import matplotlib.pyplot as plt
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call
from tqdm import tqdm

import torch_maml as tm
from torch_maml.typing import Params

Batch = tuple[Tensor, Tensor]


# ---------------------------------------------------------------- the user's components


class ClippedNorm:
    """Any estimator's meta gradient, rescaled to a norm of at most ``max_norm``.

    Implements ``tm.MetaGradientEstimator``: one method, ``meta_gradient``.
    """

    def __init__(self, estimator: tm.MetaGradientEstimator, max_norm: float) -> None:
        if not max_norm > 0:
            raise ValueError(f"'max_norm' must be > 0 (got {max_norm})")
        self.estimator = estimator
        self.max_norm = max_norm
        self.clipped = 0
        """How many meta gradients were rescaled so far."""

    def meta_gradient(
        self,
        objective: tm.MetaObjective,
        params: Params,
        tasks: Sequence[tm.Task[Any]],
        generator: torch.Generator,
    ) -> tm.MetaGradient:
        result = self.estimator.meta_gradient(objective, params, tasks, generator)
        norm = torch.cat([g.reshape(-1) for g in result.grads.values()]).norm()
        if not bool(norm > self.max_norm):  # NaN stays NaN, for MetaOptimizer to catch
            return result
        self.clipped += 1
        scale = self.max_norm / norm
        return result._replace(grads={name: g * scale for name, g in result.grads.items()})


class WarmupInverseSqrt:
    """``beta_k = lr * min((k + 1) / warmup, sqrt(warmup / (k + 1)))``.

    Implements ``tm.StepSizePolicy``: an ``lr`` (the param group's initial value) and
    ``__call__(context) -> tm.StepSize``.
    """

    def __init__(self, lr: float, warmup: int) -> None:
        self.lr = lr
        self.warmup = warmup

    def __call__(self, context: tm.StepContext) -> tm.StepSize:
        k = context.step + 1
        return tm.StepSize(beta=context.lr * min(k / self.warmup, math.sqrt(self.warmup / k)))


# ---------------------------------------------------------------- the experiment


class Run(NamedTuple):
    """One meta-training run."""

    losses: list[float]
    """Meta loss (mean post-adaptation query loss) at each iteration reached."""
    post_mse: float
    """Held-out query MSE after adaptation from the final weights (NaN: adaptation diverges)."""
    failure: str | None
    """Why it stopped early, if it did."""


class Result(NamedTuple):
    """Both runs, and the plot."""

    constant: Run
    custom: Run
    clipped: int
    """How many meta gradients ClippedNorm rescaled."""
    plot: Path


def sample_tasks(
    count: int, generator: torch.Generator, k: int = 10
) -> list[tm.SupportQuery[Batch]]:
    """Sinusoid tasks as in examples/sinusoid.py: amplitude 0.1-5, phase 0-pi, x in [-5, 5]."""
    amplitude = torch.empty(count, 1, 1).uniform_(0.1, 5.0, generator=generator)
    phase = torch.empty(count, 1, 1).uniform_(0.0, math.pi, generator=generator)
    x = torch.empty(count, 2 * k, 1).uniform_(-5.0, 5.0, generator=generator)
    y = amplitude * torch.sin(x - phase)
    return [tm.SupportQuery((x[i, :k], y[i, :k]), (x[i, k:], y[i, k:])) for i in range(count)]


def loss_fn(model: nn.Module, batch: Batch) -> Tensor:
    x, y = batch
    return F.mse_loss(model(x), y)


def make_model(seed: int) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Linear(1, 40), nn.ReLU(), nn.Linear(40, 40), nn.ReLU(), nn.Linear(40, 1)
    )


def held_out_mse(
    meta_opt: tm.MetaOptimizer[nn.Sequential, Batch], tasks: list[tm.SupportQuery[Batch]]
) -> float:
    total = 0.0
    for task in tasks:
        adapted = meta_opt.adapt(task)
        with torch.no_grad():
            total += loss_fn_at(meta_opt.model, adapted, task.query)
    return total / len(tasks)


def loss_fn_at(model: nn.Module, weights: Params, batch: Batch) -> float:
    x, y = batch
    return float(F.mse_loss(functional_call(model, weights, (x,)), y))


def train(
    meta_opt: tm.MetaOptimizer[nn.Sequential, Batch],
    iterations: int,
    meta_batch: int,
    seed: int,
    label: str,
) -> tuple[list[float], str | None]:
    generator = torch.Generator().manual_seed(seed)
    losses: list[float] = []
    for _ in tqdm(range(iterations), desc=label, leave=False, disable=None):
        try:
            losses.append(float(meta_opt.step(sample_tasks(meta_batch, generator)).loss))
        except tm.NonFiniteError as error:
            return losses, str(error).split(";")[0]
    return losses, None


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iterations", type=int, default=600)
    parser.add_argument("--beta", type=float, default=0.2, help="outer step size of both runs")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="120 iterations instead of 600")
    parser.add_argument("--out", type=Path, default=Path("docs/images"))
    args = parser.parse_args(argv)
    if args.quick:
        args.iterations = 120
    return args


def main(argv: list[str] | None = None) -> Result:
    args = parse_args(argv)
    meta_batch = 10
    held_out = sample_tasks(50, torch.Generator().manual_seed(args.seed + 1_000_003))
    inner = tm.GradientDescent(steps=5, lr=0.01)
    clipped = ClippedNorm(tm.FiniteSum(), max_norm=10.0)
    setups: dict[str, tuple[tm.MetaGradientEstimator, tm.StepSizePolicy]] = {
        f"FiniteSum + Constant({args.beta})": (tm.FiniteSum(), tm.Constant(args.beta)),
        f"ClippedNorm(FiniteSum) + WarmupInverseSqrt({args.beta})": (
            clipped,
            WarmupInverseSqrt(args.beta, warmup=50),
        ),
    }
    runs = []
    for label, (estimator, step_size) in setups.items():
        meta_opt = tm.MetaOptimizer(
            make_model(args.seed),  # the same initialisation for both
            loss_fn,
            inner_loop=inner,
            estimator=estimator,
            step_size=step_size,
        )
        losses, failure = train(meta_opt, args.iterations, meta_batch, args.seed, label)
        runs.append(Run(losses, held_out_mse(meta_opt, held_out), failure))

    args.out.mkdir(parents=True, exist_ok=True)
    plot = args.out / "custom_component.png"
    figure, axes = plt.subplots(figsize=(7, 4))
    for (label, _), run in zip(setups.items(), runs, strict=True):
        stopped = f" (stopped at {len(run.losses)}: NaN)" if run.failure else ""
        axes.plot(range(1, len(run.losses) + 1), run.losses, label=label + stopped, linewidth=1)
    axes.set(xlabel="meta iteration", ylabel="meta loss", yscale="log", title="Own components")
    axes.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(plot, dpi=120)
    plt.close(figure)

    print(f"{'run':<52}{'iterations':>11}{'held-out MSE after adaptation':>31}")
    for (label, _), run in zip(setups.items(), runs, strict=True):
        mse = f"{run.post_mse:.4f}" if math.isfinite(run.post_mse) else "diverges"
        print(f"{label:<52}{len(run.losses):>11}{mse:>31}")
        if run.failure:
            print(f"  stopped: {run.failure}")
    print(f"ClippedNorm rescaled {clipped.clipped} of {len(runs[1].losses)} meta gradients")
    print(f"plot: {plot}")
    return Result(runs[0], runs[1], clipped.clipped, plot)


if __name__ == "__main__":
    main()
