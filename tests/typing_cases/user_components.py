"""Components a user writes in their own package, against torch_maml's public Protocols.

This module stands for third-party code: it imports nothing private. mypy --strict
checks it (tests/test_static.py), and the test modules of the components check that
each works when passed to a MetaOptimizer (tests/test_inner.py, tests/test_objective.py,
tests/test_step_size.py).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

import torch_maml as tm
from torch_maml.typing import InnerState, Params


class HeavyBall:
    """Gradient descent with heavy-ball momentum: ``v' = mu v + g``, ``w' = w - lr v'``."""

    def __init__(self, steps: int, lr: float, momentum: float) -> None:
        self.steps = steps
        self.lr = lr
        self.momentum = momentum

    def init(self, params: Params) -> InnerState:
        return {name: torch.zeros_like(p) for name, p in params.items()}

    def update(self, params: Params, grads: Params, state: InnerState) -> tuple[Params, InnerState]:
        velocity = {name: self.momentum * state[name] + grads[name] for name in params}
        return {name: p - self.lr * velocity[name] for name, p in params.items()}, velocity


class Traced:
    """A transparent wrapper of the user's: any inner loop, its steps counted.

    It forwards every attribute it does not define to the wrapped loop (``steps``,
    and ``descent_lr`` of a gradient-descent loop), so it is accepted wherever the
    wrapped loop is.
    """

    def __init__(self, inner_loop: tm.InnerLoop) -> None:
        self.inner_loop = inner_loop
        self.updates = 0

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__") or "inner_loop" not in self.__dict__:
            raise AttributeError(name)  # copy and pickle look for these before __init__ ran
        return getattr(self.inner_loop, name)

    def init(self, params: Params) -> InnerState:
        return self.inner_loop.init(params)

    def update(self, params: Params, grads: Params, state: InnerState) -> tuple[Params, InnerState]:
        self.updates += 1
        return self.inner_loop.update(params, grads, state)


class FirstOrder:
    """First-order MAML: ``G_i = grad l(w_N; query)``, dropping the Hessian product."""

    def meta_gradient(
        self,
        objective: tm.MetaObjective,
        params: Params,
        tasks: Sequence[tm.Task[Any]],
        generator: torch.Generator,
    ) -> tm.MetaGradient:
        counts = tm.OracleCounts()
        total: Params = {name: torch.zeros_like(p) for name, p in params.items()}
        losses = []
        for task in tasks:
            if not isinstance(task, tm.SupportQuery):
                raise TypeError("FirstOrder here supports SupportQuery tasks only")
            support = [task.support] * objective.inner_loop.steps
            adapted = objective.adapt(params, support, counts)
            grads, loss = objective.loss_grad(adapted, task.query)
            counts.grad_evals += 1
            total = {name: total[name] + grads[name] for name in total}
            losses.append(loss.detach())
        return tm.MetaGradient(
            grads={name: g / len(tasks) for name, g in total.items()},
            loss=torch.stack(losses).mean(),
            grad_evals=counts.grad_evals,
            hvp_evals=counts.hvp_evals,
        )


class InverseSqrtDecay:
    """``beta_k = lr / sqrt(1 + k)``, on top of the param group's lr."""

    def __init__(self, lr: float) -> None:
        self.lr = lr

    def __call__(self, context: tm.StepContext) -> tm.StepSize:
        return tm.StepSize(beta=context.lr / math.sqrt(1 + context.step))


def regression_loss(model: nn.Sequential, batch: tuple[Tensor, Tensor]) -> Tensor:
    """A loss closure typed with the user's own module class."""
    x, y = batch
    return torch.nn.functional.mse_loss(model(x), y)


def build(model: nn.Sequential) -> tm.MetaOptimizer[nn.Sequential, tuple[Tensor, Tensor]]:
    """All three custom components passed in, type-checked against the Protocols."""
    return tm.MetaOptimizer(
        model,
        regression_loss,
        inner_loop=HeavyBall(steps=3, lr=0.05, momentum=0.9),
        estimator=FirstOrder(),
        step_size=InverseSqrtDecay(0.01),
    )


def train_step(
    meta_opt: tm.MetaOptimizer[nn.Sequential, tuple[Tensor, Tensor]],
    tasks: list[tm.SupportQuery[tuple[Tensor, Tensor]]],
) -> float:
    info: tm.MetaStepInfo = meta_opt.step(tasks)
    adapted: dict[str, Tensor] = meta_opt.adapt(tasks[0])
    assert adapted
    return float(info.loss) + info.beta + info.grad_evals + info.hvp_evals
