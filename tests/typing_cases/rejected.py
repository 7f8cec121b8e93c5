"""Usage that mypy --strict must reject.

Each line below carries the ``# type: ignore[code]`` of the error it must raise.
mypy runs with ``warn_unused_ignores`` (part of --strict): should torch_maml's
types stop rejecting one of these, the ignore becomes unused and mypy fails.
"""

from __future__ import annotations

from torch import Tensor, nn

import torch_maml as tm


def loss_fn(model: nn.Module, batch: tuple[Tensor, Tensor]) -> Tensor:
    x, y = batch
    loss: Tensor = ((model(x) - y) ** 2).mean()
    return loss


def loss_of_batch_only(batch: tuple[Tensor, Tensor]) -> Tensor:
    return batch[0].sum()


class NotAnEstimator:
    def estimate(self) -> None: ...


def rejected(model: nn.Module, x: Tensor) -> None:
    inner, fs, const = tm.GradientDescent(steps=2, lr=0.1), tm.FiniteSum(), tm.Constant(0.1)
    good = tm.MetaOptimizer(model, loss_fn, inner_loop=inner, estimator=fs, step_size=const)
    # A number where a StepSizePolicy belongs.
    tm.MetaOptimizer(model, loss_fn, inner_loop=inner, estimator=fs, step_size=0.1)  # type: ignore[arg-type]
    # An object that does not implement MetaGradientEstimator.
    bad = NotAnEstimator()
    tm.MetaOptimizer(model, loss_fn, inner_loop=inner, estimator=bad, step_size=const)  # type: ignore[arg-type]
    # A loss closure without the model argument.
    f = loss_of_batch_only
    tm.MetaOptimizer(model, f, inner_loop=inner, estimator=fs, step_size=const)  # type: ignore[arg-type]
    # Tasks whose batches are not what the loss closure takes.
    good.step([tm.SupportQuery(x, x)])  # type: ignore[arg-type]
    # A closure, as torch.optim.Optimizer.step would take.
    good.step(lambda: 0.0)  # type: ignore[arg-type]
    # The step count as a string.
    tm.GradientDescent(steps="2", lr=0.1)  # type: ignore[arg-type]
    # A field the step's result does not have.
    _ = good.step([tm.SupportQuery((x, x), (x, x))]).hessian  # type: ignore[attr-defined]
