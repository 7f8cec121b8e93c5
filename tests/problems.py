"""Problems with known answers, and the helpers the test modules share (float64 throughout).

* Constants: the inner step size, step counts and tolerances most tests use.
* Quadratic losses ``l(w) = 0.5 w^T A w - c^T w``: a batch is the pair ``(A, c)``, and
  the meta gradients have closed forms (``G = prod_j (I - alpha A_{D,j}) (A_T w_N - c_T)``
  for gradient descent, and the closed forms below for the other estimators).
* A small MLP with sinusoid regression data covers the non-quadratic case, where the
  Hessian changes along the inner path; it is also written out by hand
  (:func:`mse_by_hand`), so that references never go through torch_maml or torch.func.
* Hand-written inner loops on lists of tensors, differentiated with plain
  ``torch.autograd``: the independent references of the estimators' tests.
* Running a MetaOptimizer and reading what it wrote (:func:`meta_gradient`), and
  comparing results (:func:`params_relative_error`, :func:`snapshot`, :func:`same`,
  :func:`optimizer_state`).
* Every path a meta-batch can take (:class:`Path`, :data:`EVERY_PATH`): chunked or not,
  a list or stacked, compiled, or in a checked capture region; and a loss closure that
  turns bad on demand (:class:`Switch`), to reach compiled code with bad input.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path as FilePath
from types import ModuleType
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from hypothesis import strategies as st
from torch import Tensor, nn

import torch_maml as tm
from torch_maml.execution import CaptureSetting, ChunkSize
from torch_maml.typing import Params

# ---------------------------------------------------------------- constants

ALPHA = 0.1
"""The inner step size most tests use."""
STEPS = 3
"""The number of inner steps most tests use."""
DIM = 4
"""The dimension of the quadratic problems."""
LAM = 2.0
"""The proximal regularisation of the Proximal / Implicit tests."""
INNER, HESSIAN, OUTER = 2, 3, 4
"""Distinct sample sizes of the inner, Hessian and outer batches: :class:`QuadraticSequence`
keys on them, so a test knows which batch fed which term."""
TIGHT = 1e-10
"""Relative tolerance of a meta gradient against an independent computation."""
SAME = 1e-12
"""Relative tolerance of two code paths of one computation: equal up to rounding."""

Pair = tuple[Tensor, Tensor]
"""A regression batch ``(x, y)``."""
Weights = list[Tensor]
"""The MLP's weights as a list, for the hand-written references."""

# ---------------------------------------------------------------- quadratics

Quadratic = tuple[Tensor, Tensor]
"""A quadratic loss as its batch: ``(A, c)``."""


class Vector(nn.Module):
    """A model that is just one parameter vector ``w``."""

    def __init__(self, w: Tensor) -> None:
        super().__init__()
        self.w = nn.Parameter(w.clone())


def quadratic_loss_of(x: Tensor, batch: Quadratic) -> Tensor:
    """``0.5 x^T A x - c^T x``."""
    a, c = batch
    loss: Tensor = 0.5 * x @ a @ x - c @ x
    return loss


def quadratic_loss(model: Vector, batch: Quadratic) -> Tensor:
    return quadratic_loss_of(model.w, batch)


class TwoBlock(nn.Module):
    """``x = (a, f)``, two parameters of a quadratic, for selections: ``adapted=["a"]``."""

    def __init__(self, x: Tensor) -> None:
        super().__init__()
        self.a = nn.Parameter(x[:2].clone())
        self.f = nn.Parameter(x[2:].clone())


def two_block_loss(model: TwoBlock, batch: Quadratic) -> Tensor:
    return quadratic_loss_of(torch.cat([model.a, model.f]), batch)


def random_spd(dim: int, generator: torch.Generator, low: float = 0.5, high: float = 2.0) -> Tensor:
    """A symmetric positive definite matrix with eigenvalues in [low, high]."""
    q, _ = torch.linalg.qr(torch.randn(dim, dim, generator=generator, dtype=torch.float64))
    eig = low + (high - low) * torch.rand(dim, generator=generator, dtype=torch.float64)
    spd: Tensor = q @ torch.diag(eig) @ q.T
    return spd


def random_quadratic(dim: int, generator: torch.Generator) -> Quadratic:
    return random_spd(dim, generator), torch.randn(dim, generator=generator, dtype=torch.float64)


def support_query_pairs(
    count: int, gen: torch.Generator, dim: int = DIM
) -> tuple[list[tuple[Quadratic, Quadratic]], list[tm.SupportQuery[Quadratic]]]:
    """``count`` (support, query) quadratics, and the same as SupportQuery tasks."""
    pairs = [(random_quadratic(dim, gen), random_quadratic(dim, gen)) for _ in range(count)]
    return pairs, [tm.SupportQuery(s, t) for s, t in pairs]


def closed_form_meta_gradient(
    w: Tensor,
    alpha: float,
    inner: Sequence[Quadratic],
    hessian: Sequence[Quadratic],
    outer: Quadratic,
) -> Tensor:
    """``G = prod_j (I - alpha A_{D,j}) (A_T w_N - c_T)`` (eq. 7 on quadratics).

    ``w_{j+1} = (I - alpha A_{S,j}) w_j + alpha c_{S,j}``, the product ordered with
    j = 0 leftmost.
    """
    eye = torch.eye(w.numel(), dtype=torch.float64)
    for a, c in inner:
        w = (eye - alpha * a) @ w + alpha * c
    a_t, c_t = outer
    product = eye
    for a, _ in hessian:
        product = product @ (eye - alpha * a)
    return product @ (a_t @ w - c_t)


def gd_last(
    w: Tensor,
    alpha: float,
    inner: Sequence[Quadratic],
    lam: float = 0.0,
    moving: slice = slice(None),
) -> Tensor:
    """``x_N`` of ``x_{j+1} = x_j - alpha P (A_j x_j - c_j + lam (x_j - w))``.

    ``P`` keeps the coordinates ``moving`` (an adapted selection), zeroing the others.
    """
    x = w.clone()
    for a, c in inner:
        step = torch.zeros_like(x)
        step[moving] = (a @ x - c + lam * (x - w))[moving]
        x = x - alpha * step
    return x


def proximal_last(
    w: Tensor, support: Quadratic, steps: int, lam: float, alpha: float = ALPHA
) -> Tensor:
    """``phi_N`` of proximal gradient descent on one support quadratic."""
    return gd_last(w, alpha, [support] * steps, lam)


def product_then(
    alpha: float, hessian: Sequence[Quadratic], vector: Tensor, moving: slice = slice(None)
) -> Tensor:
    """``prod_j (I - alpha A_{D,j} P) v``, j = 0 leftmost (the transposed Jacobians)."""
    eye = torch.eye(vector.numel(), dtype=torch.float64)
    projector = torch.zeros_like(eye)
    projector[moving, moving] = eye[moving, moving]
    product = eye
    for a, _ in hessian:
        product = product @ (eye - alpha * a @ projector)
    return product @ vector


def outer_grad(outer: Quadratic, x: Tensor) -> Tensor:
    """``A x - c``: the gradient of the quadratic ``outer`` at ``x``."""
    a, c = outer
    return a @ x - c


def implicit_closed_form(a_s: Tensor, lam: float, g: Tensor) -> Tensor:
    """``(I + A_S / lam)^{-1} g``: iMAML's implicit meta gradient on a quadratic."""
    eye = torch.eye(g.numel(), dtype=torch.float64)
    solution: Tensor = torch.linalg.solve(eye + a_s / lam, g)
    return solution


# ---------------------------------------------------------------- cubics: known smoothness

Cubic = tuple[Tensor, Tensor, Tensor, float]
"""A batch ``(A, c, U, kappa)``: ``0.5 w^T A w - c^T w + kappa/6 sum_k (U[:, k] . w)^3``.

Quadratics (``kappa = 0``) have Hessian ``A``: ``L = max |eig(A)|`` over every batch,
``rho = 0``, and ``b_i = ||(A_S - A_T) w - (c_S - c_T)||``. The cubic term with
orthonormal ``u_k`` makes the Hessian ``A + kappa sum_k (u_k . w) u_k u_k^T``, whose
change over ``w -> w + d`` is ``kappa sum_k (u_k . d) u_k u_k^T``, of norm at most
``kappa ||d||`` with equality for ``d = u_k``: ``rho = kappa`` exactly.
"""

CUBIC_DIM = 6


def cubic_loss(model: Vector, batch: Cubic) -> Tensor:
    a, c, u, kappa = batch
    w = model.w
    loss: Tensor = 0.5 * w @ a @ w - c @ w + kappa / 6 * ((u.T @ w) ** 3).sum()
    return loss


def spectrum_matrix(eigenvalues: list[float], generator: torch.Generator) -> Tensor:
    """A symmetric matrix with these eigenvalues, in a random basis."""
    dim = len(eigenvalues)
    q, _ = torch.linalg.qr(torch.randn(dim, dim, generator=generator, dtype=torch.float64))
    matrix: Tensor = q @ torch.diag(torch.tensor(eigenvalues, dtype=torch.float64)) @ q.T
    return matrix


def cubic_batch(
    eigenvalues: list[float], kappa: float, generator: torch.Generator, columns: int = CUBIC_DIM
) -> Cubic:
    """A cubic with the quadratic part's spectrum given and ``columns`` directions ``u_k``."""
    dim = len(eigenvalues)
    u, _ = torch.linalg.qr(torch.randn(dim, dim, generator=generator, dtype=torch.float64))
    c = torch.randn(dim, generator=generator, dtype=torch.float64)
    return spectrum_matrix(eigenvalues, generator), c, u[:, :columns], kappa


def cubic_family(kappas: list[float], seed: int = 0) -> tuple[list[tm.SupportQuery[Cubic]], float]:
    """Support/query cubic tasks, one kappa per task; returns them and the true L at w = 0."""
    g = torch.Generator().manual_seed(seed)
    tasks, tops = [], []
    for i, kappa in enumerate(kappas):
        top = 1.0 + 0.5 * i
        # Eigenvalues of both signs; the largest |eig| has a gap of 25% to the next.
        support = [top, -0.75 * top, 0.5, 0.3, -0.2, 0.1]
        query = [-1.1 * top, 0.7 * top, 0.4, -0.3, 0.2, 0.05]
        tops.append(1.1 * top)
        tasks.append(tm.SupportQuery(cubic_batch(support, kappa, g), cubic_batch(query, kappa, g)))
    return tasks, max(tops)


# ---------------------------------------------------------------- samplers


class QuadraticSequence:
    """A sampler that hands out, for each ``size``, the next quadratic of a fixed list.

    Calls with ``size`` number k get ``families[size][k]``: a test that gives the
    inner, Hessian and outer batches different sizes knows exactly which quadratic
    each term used, whatever the order in which they are drawn.
    """

    def __init__(self, families: dict[int, list[Quadratic]]) -> None:
        self.families = families
        self.calls: defaultdict[int, int] = defaultdict(int)

    def sample(self, size: int, generator: torch.Generator | None = None) -> Quadratic:
        index = self.calls[size]
        self.calls[size] += 1
        return self.families[size][index]


class NoisyQuadratic:
    """Samples of a noisy quadratic: each sample has ``A + E`` and ``c + e``, noise iid.

    A batch of ``size`` samples is returned as its mean ``(A_bar, c_bar)``, the
    quadratic whose loss is the mean of the samples' losses. The population loss is
    the quadratic ``(A, c)``.
    """

    def __init__(self, a: Tensor, c: Tensor, noise: float) -> None:
        self.a, self.c, self.noise = a, c, noise

    def sample(self, size: int, generator: torch.Generator | None = None) -> Quadratic:
        dim = self.c.numel()
        e = torch.randn(size, dim, dim, generator=generator, dtype=torch.float64)
        sym = self.noise * (e + e.transpose(1, 2)) / 2
        v = self.noise * torch.randn(size, dim, generator=generator, dtype=torch.float64)
        return self.a + sym.mean(0), self.c + v.mean(0)


class RegressionSampler:
    """A resampling regression task: fresh points of one sinusoid on every call."""

    def __init__(self, amplitude: float, phase: float) -> None:
        self.amplitude, self.phase = amplitude, phase

    def sample(self, size: int, generator: torch.Generator | None = None) -> Pair:
        x = 4 * torch.rand(size, 1, generator=generator, dtype=torch.float64) - 2
        return x, self.amplitude * torch.sin(x + self.phase)


class FixedBatches:
    """A sampler that always returns the same batch for a given size."""

    def __init__(self, by_size: dict[int, Any]) -> None:
        self.by_size = by_size

    def sample(self, size: int, generator: torch.Generator | None = None) -> Any:
        return self.by_size[size]


class Recorder:
    """Wraps a sampler and records each batch it hands out, by size, in order."""

    def __init__(self, sampler: RegressionSampler) -> None:
        self.sampler = sampler
        self.batches: defaultdict[int, list[Pair]] = defaultdict(list)

    def sample(self, size: int, generator: torch.Generator | None = None) -> Pair:
        batch = self.sampler.sample(size, generator)
        self.batches[size].append(batch)
        return batch


# ---------------------------------------------------------------- the MLP


def make_mlp(seed: int, width: int = 8) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(1, width), nn.Tanh(), nn.Linear(width, 1)).double()


def mse_loss(model: nn.Module, batch: Pair) -> Tensor:
    x, y = batch
    return F.mse_loss(model(x), y)


def regression_tasks(
    count: int, generator: torch.Generator, support: int = 6, query: int = 9
) -> list[tm.SupportQuery[Pair]]:
    """Sinusoid-like regression tasks with separate support and query points."""
    tasks = []
    for _ in range(count):
        amplitude = 0.5 + 2 * torch.rand((), generator=generator, dtype=torch.float64)
        phase = 3 * torch.rand((), generator=generator, dtype=torch.float64)

        def points(n: int, amplitude: Tensor = amplitude, phase: Tensor = phase) -> Pair:
            x = 4 * torch.rand(n, 1, generator=generator, dtype=torch.float64) - 2
            return x, amplitude * torch.sin(x + phase)

        tasks.append(tm.SupportQuery(points(support), points(query)))
    return tasks


def stacked_tasks(seed: int, tasks: int = 4) -> tm.StackedTasks[Pair]:
    """:func:`regression_tasks` stacked: a meta-batch with a leading task dimension."""
    return tm.StackedTasks.stack(regression_tasks(tasks, torch.Generator().manual_seed(seed)))


def mlp_by_hand(weights: Sequence[Tensor], x: Tensor) -> Tensor:
    """The MLP of :func:`make_mlp` written out: ``tanh(x W1^T + b1) W2^T + b2``."""
    w1, b1, w2, b2 = weights
    return torch.tanh(x @ w1.T + b1) @ w2.T + b2


def mse_by_hand(weights: Sequence[Tensor], batch: Pair) -> Tensor:
    x, y = batch
    return ((mlp_by_hand(weights, x) - y) ** 2).mean()


def reference_meta_gradient(
    model: nn.Module, tasks: Sequence[tm.SupportQuery[Pair]], steps: int, alpha: float
) -> Params:
    """Mean meta gradient of the MLP, by ``torch.autograd.grad(create_graph=True)``.

    Independent of torch_maml and torch.func: the network and its loss are written
    out by hand (:func:`mse_by_hand`) as functions of the weight tensors.
    """
    names = [n for n, _ in model.named_parameters()]
    total = [torch.zeros_like(p) for p in model.parameters()]
    for task in tasks:
        w0 = [p.detach().clone().requires_grad_(True) for p in model.parameters()]
        w = list(w0)
        for _ in range(steps):
            grads = torch.autograd.grad(mse_by_hand(w, task.support), w, create_graph=True)
            w = [p - alpha * g for p, g in zip(w, grads, strict=True)]
        meta = torch.autograd.grad(mse_by_hand(w, task.query), w0)
        total = [t + g for t, g in zip(total, meta, strict=True)]
    return {n: t / len(tasks) for n, t in zip(names, total, strict=True)}


def meta_objective(
    tasks: Sequence[tm.SupportQuery[Pair]], steps: int, alpha: float, weights: Sequence[Tensor]
) -> Tensor:
    """``mean_i l(w_N^i(w); T_i)`` of the MLP at ``weights``, by plain autograd steps."""
    total = torch.zeros((), dtype=torch.float64)
    for task in tasks:
        w = [p.detach().clone().requires_grad_(True) for p in weights]
        for _ in range(steps):
            grads = torch.autograd.grad(mse_by_hand(w, task.support), w)
            w = [
                (p - alpha * g).detach().requires_grad_(True) for p, g in zip(w, grads, strict=True)
            ]
        total = total + mse_by_hand(w, task.query).detach()
    return total / len(tasks)


MlpProblem = tuple[nn.Module, list[tm.SupportQuery[Pair]], int, float]
"""A random MLP, its meta-batch, the number of inner steps and the inner step size."""


@st.composite
def mlp_problems(draw: st.DrawFn) -> MlpProblem:
    """Hypothesis: MLPs of any small shape, with meta-batches, steps and step sizes."""
    seed = draw(st.integers(0, 2**16))
    features, width, outputs = (draw(st.integers(1, n)) for n in (3, 6, 2))
    tasks, support, query = (draw(st.integers(1, n)) for n in (3, 5, 5))
    steps, alpha = draw(st.integers(1, 4)), draw(st.floats(0.001, 0.3))
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(features, width), nn.Tanh(), nn.Linear(width, outputs)).double()

    def batch(n: int) -> Pair:
        x = torch.randn(n, features, generator=gen, dtype=torch.float64)
        return x, torch.randn(n, outputs, generator=gen, dtype=torch.float64)

    return (
        model,
        [tm.SupportQuery(batch(support), batch(query)) for _ in range(tasks)],
        steps,
        alpha,
    )


# ---------------------------------------------------------------- hand-written references


def grads_at(weights: Weights, batch: Pair) -> Weights:
    """``grad l(w; batch)`` of the hand-written MLP, by torch.autograd."""
    leaves = [p.detach().clone().requires_grad_(True) for p in weights]
    return list(torch.autograd.grad(mse_by_hand(leaves, batch), leaves))


def descend(
    weights: Weights,
    batch: Pair,
    steps: int,
    alpha: float,
    lam: float = 0.0,
    moving: tuple[int, ...] = (0, 1, 2, 3),
) -> list[Weights]:
    """Iterates ``w_0..w_N`` of (proximal) gradient descent on the hand-written MLP."""
    iterates = [weights]
    for _ in range(steps):
        current = iterates[-1]
        grads = grads_at(current, batch)
        iterates.append(
            [
                p - alpha * (g + lam * (p - w)) if k in moving else p
                for k, (p, g, w) in enumerate(zip(current, grads, weights, strict=True))
            ]
        )
    return iterates


def heavy_ball_by_hand(
    steps: int, lr: float, momentum: float, weights: Weights, batch: Pair
) -> Weights:
    """The last iterate of heavy-ball momentum (``b' = mu b + g``, ``w' = w - lr b'``)."""
    w, velocity = weights, [torch.zeros_like(p) for p in weights]
    for _ in range(steps):
        grads = grads_at(w, batch)
        velocity = [momentum * b + g for b, g in zip(velocity, grads, strict=True)]
        w = [p - lr * b for p, b in zip(w, velocity, strict=True)]
    return w


def mean_by_hand(
    model: nn.Module,
    tasks: Sequence[tm.SupportQuery[Pair]],
    per_task: Callable[[Weights, tm.SupportQuery[Pair]], Weights],
) -> Params:
    """The mean over tasks of a per-task result computed by hand, by parameter name."""
    weights = [p.detach().clone() for p in model.parameters()]
    names = [n for n, _ in model.named_parameters()]
    total = [torch.zeros_like(p) for p in weights]
    for task in tasks:
        total = [t + g for t, g in zip(total, per_task(weights, task), strict=True)]
    return {n: t / len(tasks) for n, t in zip(names, total, strict=True)}


def norm(vector: Weights) -> Tensor:
    return torch.sqrt(sum(((v * v).sum() for v in vector), torch.zeros((), dtype=torch.float64)))


def flat(weights: Weights) -> Tensor:
    return torch.cat([w.reshape(-1) for w in weights])


def unflat(vector: Tensor, like: Weights) -> Weights:
    pieces, start = [], 0
    for w in like:
        pieces.append(vector[start : start + w.numel()].view_as(w))
        start += w.numel()
    return pieces


def dense_hessian(fn: Callable[[Tensor], Tensor], x: Tensor) -> Tensor:
    """The full Hessian of ``fn`` at ``x``, row by row, by double backward."""
    point = x.detach().clone().requires_grad_(True)
    (gradient,) = torch.autograd.grad(fn(point), point, create_graph=True)
    rows = [torch.autograd.grad(gradient[i], point, retain_graph=True)[0] for i in range(x.numel())]
    return torch.stack(rows)


def query_gradient_scale(
    weights: Weights,
    tasks: Sequence[tm.SupportQuery[Pair]],
    steps: int,
    alpha: float,
    moving: tuple[int, ...] = (0, 1, 2, 3),
) -> float:
    """``mean_i ||grad l(w_N^i; T_i)||`` of the hand-written MLP: the size of the vectors the
    recursion of eq. 12 starts from.

    Rounding in a meta gradient is relative to these (a meta gradient much smaller than
    them comes from cancellation in the product of eq. 12, and keeps their absolute
    rounding), so they are the floor of a relative comparison of two meta gradients.
    """
    total = 0.0
    for task in tasks:
        last = descend(weights, task.support, steps, alpha, moving=moving)[-1]
        total += float(norm(grads_at(last, task.query)))
    return total / len(tasks)


# ---------------------------------------------------------------- hand-written inner loops

State = list[Tensor]
HandInit = Callable[[list[Tensor]], State]
HandStep = Callable[
    [int, list[Tensor], Sequence[Tensor], State, list[Tensor]], tuple[list[Tensor], State]
]
"""``(j, w_j, g_j, s_j, step sizes) -> (w_{j+1}, s_{j+1})`` on lists of tensors."""
HandLoop = tuple[HandInit, HandStep]
HandTask = tuple[list[Pair], list[Pair], Pair]
"""One task by hand: its inner batches, its Hessian batches, its outer batch."""


def gradient_descent_by_hand(lr: float) -> HandLoop:
    def init(w: list[Tensor]) -> State:
        return []

    def step(
        j: int, w: list[Tensor], g: Sequence[Tensor], state: State, a: list[Tensor]
    ) -> tuple[list[Tensor], State]:
        return [p - lr * gi for p, gi in zip(w, g, strict=True)], state

    return init, step


def momentum_by_hand(lr: float, mu: float, nesterov: bool) -> HandLoop:
    def init(w: list[Tensor]) -> State:
        return [torch.zeros_like(p) for p in w]

    def step(
        j: int, w: list[Tensor], g: Sequence[Tensor], b: State, a: list[Tensor]
    ) -> tuple[list[Tensor], State]:
        b = [mu * bi + gi for bi, gi in zip(b, g, strict=True)]
        d = [gi + mu * bi for gi, bi in zip(g, b, strict=True)] if nesterov else b
        return [p - lr * di for p, di in zip(w, d, strict=True)], b

    return init, step


def adam_by_hand(
    lr: float,
    betas: tuple[float, float],
    eps: float,
    sqrt: Callable[[Tensor], Tensor] = torch.sqrt,
) -> HandLoop:
    b1, b2 = betas

    def init(w: list[Tensor]) -> State:
        return [torch.zeros_like(p) for p in w] + [torch.zeros_like(p) for p in w]

    def step(
        j: int, w: list[Tensor], g: Sequence[Tensor], state: State, a: list[Tensor]
    ) -> tuple[list[Tensor], State]:
        n = len(w)
        m = [b1 * mi + (1 - b1) * gi for mi, gi in zip(state[:n], g, strict=True)]
        v = [b2 * vi + (1 - b2) * gi * gi for vi, gi in zip(state[n:], g, strict=True)]
        t = j + 1
        new = [
            p - lr * (mi / (1 - b1**t)) / (sqrt(vi / (1 - b2**t)) + eps)
            for p, mi, vi in zip(w, m, v, strict=True)
        ]
        return new, m + v

    return init, step


def meta_sgd_by_hand() -> HandLoop:
    def init(w: list[Tensor]) -> State:
        return []

    def step(
        j: int, w: list[Tensor], g: Sequence[Tensor], state: State, a: list[Tensor]
    ) -> tuple[list[Tensor], State]:
        return [p - ai * gi for p, ai, gi in zip(w, a, g, strict=True)], state

    return init, step


def hand_meta_gradient(
    loop: HandLoop,
    weights: Sequence[Tensor],
    step_sizes: Sequence[Tensor],
    tasks: Sequence[HandTask],
) -> list[Tensor]:
    """Mean meta gradient, with respect to ``weights + step_sizes``, by plain autograd.

    A step whose Hessian batch is its inner batch is unrolled as it is; otherwise by
    the surrogate ``F_D(w, s) + stopgrad(F_S(w, s) - F_D(w, s))``: the values of the
    inner batches, the derivative of the Hessian batches (eq. 7).
    """
    init, step = loop
    total: list[Tensor] | None = None
    for inner, hessian, outer in tasks:
        w0 = [p.detach().clone().requires_grad_(True) for p in weights]
        a = [s.detach().clone().requires_grad_(True) for s in step_sizes]
        w, state = list(w0), init(w0)
        for j, (batch, hess) in enumerate(zip(inner, hessian, strict=True)):
            g_hess = torch.autograd.grad(mse_by_hand(w, hess), w, create_graph=True)
            w_hess, state_hess = step(j, w, g_hess, state, a)
            if hess is batch:
                w, state = w_hess, state_hess
                continue
            g_inner = torch.autograd.grad(mse_by_hand(w, batch), w, create_graph=True)
            w_inner, state_inner = step(j, w, g_inner, state, a)
            w = [h + (i - h).detach() for h, i in zip(w_hess, w_inner, strict=True)]
            state = [h + (i - h).detach() for h, i in zip(state_hess, state_inner, strict=True)]
        meta = list(torch.autograd.grad(mse_by_hand(w, outer), w0 + a))
        total = meta if total is None else [t + g for t, g in zip(total, meta, strict=True)]
    assert total is not None
    return [t / len(tasks) for t in total]


def wrapped_mlp(seed: int) -> tm.LearnedStepSizes[nn.Sequential]:
    """The MLP in LearnedStepSizes, its step sizes drawn in [0.02, 0.08]."""
    model = tm.LearnedStepSizes(make_mlp(seed), lr=0.05)
    generator = torch.Generator().manual_seed(100 + seed)
    with torch.no_grad():
        for _, a in model.named_step_sizes():
            a.copy_(0.02 + 0.06 * torch.rand(a.shape, generator=generator, dtype=a.dtype))
    return model


def weights_and_step_sizes(model: nn.Module) -> tuple[list[Tensor], list[Tensor]]:
    """The MLP's weights and (for a LearnedStepSizes model) its step sizes."""
    if isinstance(model, tm.LearnedStepSizes):
        return list(model.module.parameters()), [a for _, a in model.named_step_sizes()]
    return list(model.parameters()), []


def by_name(model: nn.Module, values: Sequence[Tensor]) -> Params:
    return {name: v for (name, _), v in zip(model.named_parameters(), values, strict=True)}


# ---------------------------------------------------------------- running the optimizer

ESTIMATOR_CASES = [
    "exact",
    "exact-one-by-one",
    "finite-sum",
    "finite-sum-stacked",
    "finite-sum-one-by-one",
    "resampled",
    "resampled-one-by-one",
]


def estimator_case(
    name: str, tasks: list[tm.SupportQuery[Pair]]
) -> tuple[tm.MetaGradientEstimator, Sequence[tm.Task[Any]], dict[str, Any]]:
    """The estimator, the meta-batch and the options of one way to compute the same G.

    Every case computes the unrolled meta gradient of the support/query tasks.
    """
    one_by_one: dict[str, Any] = {"task_chunk_size": 1} if name.endswith("one-by-one") else {}
    if name.startswith("exact"):
        return tm.Exact(), tasks, one_by_one
    if name == "finite-sum-stacked":
        return tm.FiniteSum(), tm.StackedTasks.stack(tasks), {"task_chunk_size": None}
    if name.startswith("finite-sum"):
        return tm.FiniteSum(), tasks, one_by_one
    # Samplers that always return the support set (6 points) or the query set (9):
    # eq. 7 with every Hessian batch the inner batch, the unrolled derivative.
    samplers = [FixedBatches({6: task.support, 9: task.query}) for task in tasks]
    return tm.Resampled(inner_size=6, hessian_size=6, outer_size=9), samplers, one_by_one


def meta_gradient(
    model: nn.Module,
    loss_fn: Any,
    inner_loop: tm.InnerLoop,
    estimator: tm.MetaGradientEstimator,
    tasks: Any,
    calls: int = 1,
    **options: Any,
) -> tuple[Params, tm.MetaBackwardInfo]:
    """The meta gradient that ``meta_backward`` writes into each ``.grad``, and its info.

    The optimizer draws from a generator seeded with 0 (for sampler tasks); the
    parameters that get no ``.grad`` (frozen ones) are left out. With ``calls``, the
    result of the last of that many calls (with ``compile``, the first runs eagerly;
    sampler tasks draw anew at each call).
    """
    meta_opt = tm.MetaOptimizer(
        model,
        loss_fn,
        inner_loop=inner_loop,
        estimator=estimator,
        step_size=tm.Constant(1.0),
        generator=torch.Generator().manual_seed(0),
        **options,
    )
    for _ in range(calls):
        meta_opt.zero_grad()
        info = meta_opt.meta_backward(tasks)
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return grads, info


def mlp_meta_gradient(
    inner_loop: tm.InnerLoop, estimator: tm.MetaGradientEstimator, tasks: Any, **options: Any
) -> Params:
    """:func:`meta_gradient` of ``make_mlp(0)`` with the mean squared error."""
    grads, _ = meta_gradient(make_mlp(0), mse_loss, inner_loop, estimator, tasks, **options)
    return grads


def vector_meta_gradient(
    w: Tensor,
    inner_loop: tm.InnerLoop,
    estimator: tm.MetaGradientEstimator,
    tasks: Any,
    **options: Any,
) -> Tensor:
    """:func:`meta_gradient` of the quadratic model ``Vector(w)``."""
    grads, _ = meta_gradient(Vector(w), quadratic_loss, inner_loop, estimator, tasks, **options)
    return grads["w"]


# ---------------------------------------------------------------- comparisons


def relative_error(actual: Tensor, expected: Tensor) -> float:
    return float((actual - expected).norm() / expected.norm())


def params_relative_error(actual: Params, expected: Params) -> float:
    """Relative error of two parameter dicts, as one flat vector."""
    names = sorted(expected)
    flat_actual = torch.cat([actual[n].reshape(-1) for n in names])
    flat_expected = torch.cat([expected[n].reshape(-1) for n in names])
    return relative_error(flat_actual, flat_expected)


def snapshot(model: nn.Module) -> Params:
    """A copy of the model's parameters, by name."""
    return {name: p.detach().clone() for name, p in model.named_parameters()}


def optimizer_state(optimizer: tm.MetaOptimizer[Any, Any]) -> list[Any]:
    """Everything a failed step must leave as it was: the weights, their ``.grad``, the
    buffers, the optimizer's state dict (step counts, lr, policy state), its generator."""
    model = optimizer.model
    return [
        {n: p.detach().clone() for n, p in model.named_parameters()},
        {n: None if p.grad is None else p.grad.clone() for n, p in model.named_parameters()},
        {n: b.clone() for n, b in model.named_buffers()},
        optimizer.state_dict(),
        optimizer.generator.get_state(),
        optimizer.meta_steps,
        optimizer.skipped_steps,
        optimizer.step_size_state,
    ]


def same(a: Any, b: Any) -> bool:
    """Bitwise equality of nested tensors, dicts, lists and plain values."""
    if isinstance(a, Tensor):
        return isinstance(b, Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b, strict=True))
    return bool(a == b)


# ---------------------------------------------------------------- every path


@dataclass(frozen=True)
class Path:
    """One way a MetaOptimizer runs a meta-batch.

    ``chunk`` is its ``task_chunk_size``; ``stacked`` hands it a :class:`tm.StackedTasks`
    rather than a list; ``compile`` compiles with dynamo's ``"eager"`` backend (the
    first call of a compiled configuration runs eagerly: :attr:`calls` says how many
    calls reach compiled code); ``capture="check"`` runs the region a GPU would capture,
    with host synchronisation forbidden, on the CPU.
    """

    chunk: ChunkSize
    stacked: bool
    compile: bool = False
    capture: CaptureSetting = "auto"

    @property
    def calls(self) -> int:
        """Calls that make the last one run compiled code (where compiled)."""
        return 2 if self.compile else 1

    @property
    def vectorised(self) -> bool:
        """Whether several tasks of a meta-batch of four run at once."""
        return self.chunk != 1

    def options(self) -> dict[str, Any]:
        """The MetaOptimizer's keyword arguments for this path."""
        return {
            "task_chunk_size": self.chunk,
            "compile": {"backend": "eager"} if self.compile else False,
            "capture": self.capture,
        }

    def meta_batch(self, tasks: Sequence[tm.SupportQuery[Any]]) -> Any:
        """The tasks as this path takes them: a list, or stacked."""
        return tm.StackedTasks.stack(tasks) if self.stacked else list(tasks)

    def __str__(self) -> str:
        kind = "compiled " if self.compile else "checked " if self.capture == "check" else ""
        return f"{kind}chunk={self.chunk} {'stacked' if self.stacked else 'list'}"


PATHS = [
    *(Path(chunk, stacked) for chunk in (1, 2, None, "auto") for stacked in (False, True)),
    Path(None, True, compile=True),
    Path(2, False, compile=True),
    Path(None, False, capture="check"),
    Path(1, True, capture="check"),
]
"""Every task_chunk_size as a list and stacked, two compiled paths and two checked ones."""

EVERY_PATH = [
    pytest.param(path, id=str(path), marks=[pytest.mark.integration] if path.compile else [])
    for path in PATHS
]
""":data:`PATHS` as pytest parameters: the compiled ones are integration tests."""


class Switch:
    """A loss closure that is ``mse_loss`` until switched on, then ``bad``.

    A good history first (a compiled configuration compiles on good input), then the
    bad input reaches the code that runs from then on.
    """

    def __init__(self, bad: Callable[[nn.Module, Any], Tensor], on: bool = False) -> None:
        self.bad, self.on = bad, on

    def __call__(self, model: nn.Module, batch: Pair) -> Tensor:
        return self.bad(model, batch) if self.on else mse_loss(model, batch)


# ---------------------------------------------------------------- examples

EXAMPLES = FilePath(__file__).resolve().parent.parent / "examples"


def load_example(name: str) -> ModuleType:
    """``examples/<name>.py`` as a module: examples/ is not a package, and a user runs the
    file itself, so it is loaded from its path."""
    path = EXAMPLES / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"torch_maml_example_{name}", path)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def torchrun(*arguments: str) -> subprocess.CompletedProcess[str]:
    """``torchrun --standalone --nproc_per_node=2 *arguments`` from the repository's root.

    The job must exit with status 0: an abort at exit, after the work, fails too.
    """
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    environment = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK")}
    done = subprocess.run(
        [*launcher, *arguments],
        cwd=EXAMPLES.parent,
        env=environment,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert done.returncode == 0, f"{done.stdout[-2000:]}\n{done.stderr[-3000:]}"
    return done
