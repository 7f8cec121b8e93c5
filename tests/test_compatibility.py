"""Which estimator works with which inner loop: the table of the README and docs, enforced.

Every pair either computes a finite meta gradient, or refuses with a TypeError that
names the estimator (or the policy) and the inner loop it needs, before any weight moves.
"""

from __future__ import annotations

import re
from collections.abc import Callable

import pytest
import torch
from torch import nn

import torch_maml as tm
from tests.problems import make_mlp, mse_loss, regression_tasks

LOOPS: dict[str, Callable[[], tm.InnerLoop]] = {
    "GradientDescent": lambda: tm.GradientDescent(steps=2, lr=0.1),
    "Momentum": lambda: tm.Momentum(steps=2, lr=0.1),
    "Adam": lambda: tm.Adam(steps=2, lr=0.01),
    "MetaSGD": lambda: tm.MetaSGD(steps=2),
    "Proximal": lambda: tm.Proximal(tm.Momentum(steps=2, lr=0.1), lam=1.0),
}
ESTIMATORS: dict[str, Callable[[], tm.MetaGradientEstimator]] = {
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
        (loop, "Reptile"): "Reptile() takes its scale 1 / (N * lr) from a GradientDescent"
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


def build(loop: str) -> nn.Module:
    model = make_mlp(0)
    return tm.LearnedStepSizes(model, lr=0.1) if loop == "MetaSGD" else model


@pytest.mark.parametrize("estimator", list(ESTIMATORS))
@pytest.mark.parametrize("loop", list(LOOPS))
def test_estimator_with_inner_loop(loop: str, estimator: str) -> None:
    model = build(loop)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    meta_opt = tm.MetaOptimizer(
        model,
        mse_loss,
        inner_loop=LOOPS[loop](),
        estimator=ESTIMATORS[estimator](),
        step_size=tm.Constant(0.01),
    )
    tasks = regression_tasks(2, torch.Generator().manual_seed(0))
    refused = REFUSED.get((loop, estimator))
    if refused is None:
        meta_opt.zero_grad()
        meta_opt.meta_backward(tasks)
        grads = [p.grad for p in model.parameters() if p.requires_grad]
        assert all(g is not None and bool(torch.isfinite(g).all()) for g in grads)
        assert any(bool(g.abs().sum() > 0) for g in grads if g is not None)
    else:
        with pytest.raises(TypeError, match="^" + re.escape(refused)):
            meta_opt.step(tasks)
        for key, value in model.state_dict().items():
            assert torch.equal(value, before[key])


@pytest.mark.parametrize("loop", list(LOOPS))
def test_smoothness_adaptive_needs_gradient_descent(loop: str) -> None:
    policy = tm.SmoothnessAdaptive(L=1.0, rho=1.0, c_beta=80)
    if loop == "GradientDescent":
        tm.MetaOptimizer(
            build(loop),
            mse_loss,
            inner_loop=LOOPS[loop](),
            estimator=tm.FiniteSum(),
            step_size=policy,
        )
        return
    with pytest.raises(TypeError, match=r"^SmoothnessAdaptive needs a GradientDescent inner loop"):
        tm.MetaOptimizer(
            build(loop),
            mse_loss,
            inner_loop=LOOPS[loop](),
            estimator=tm.FiniteSum(),
            step_size=policy,
        )
