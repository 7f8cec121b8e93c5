"""Task families with known answers, shared by the tests (float64 throughout).

Quadratic losses ``l(w) = 0.5 w^T A w - c^T w`` (SPEC section 7): a batch is the pair
``(A, c)``, and the meta gradients have closed forms. A small MLP with regression
data covers the non-quadratic case, where the Hessian changes along the inner path.
"""

from __future__ import annotations

import importlib.util
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from types import ModuleType

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import torch_maml as tm

Quadratic = tuple[Tensor, Tensor]
"""A quadratic loss as its batch: ``(A, c)``."""


class Vector(nn.Module):
    """A model that is just one parameter vector ``w``."""

    def __init__(self, w: Tensor) -> None:
        super().__init__()
        self.w = nn.Parameter(w.clone())


def quadratic_loss(model: Vector, batch: Quadratic) -> Tensor:
    a, c = batch
    loss: Tensor = 0.5 * model.w @ a @ model.w - c @ model.w
    return loss


def random_spd(dim: int, generator: torch.Generator, low: float = 0.5, high: float = 2.0) -> Tensor:
    """A symmetric positive definite matrix with eigenvalues in [low, high]."""
    q, _ = torch.linalg.qr(torch.randn(dim, dim, generator=generator, dtype=torch.float64))
    eig = low + (high - low) * torch.rand(dim, generator=generator, dtype=torch.float64)
    spd: Tensor = q @ torch.diag(eig) @ q.T
    return spd


def random_quadratic(dim: int, generator: torch.Generator) -> Quadratic:
    return random_spd(dim, generator), torch.randn(dim, generator=generator, dtype=torch.float64)


def closed_form_meta_gradient(
    w: Tensor,
    alpha: float,
    inner: Sequence[Quadratic],
    hessian: Sequence[Quadratic],
    outer: Quadratic,
) -> Tensor:
    """SPEC section 7: ``G = prod_j (I - alpha A_{D,j}) (A_T w_N - c_T)``.

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


def make_mlp(seed: int, width: int = 8) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(1, width), nn.Tanh(), nn.Linear(width, 1)).double()


def mse_loss(model: nn.Module, batch: tuple[Tensor, Tensor]) -> Tensor:
    x, y = batch
    return F.mse_loss(model(x), y)


def regression_tasks(
    count: int, generator: torch.Generator, support: int = 6, query: int = 9
) -> list[tm.SupportQuery[tuple[Tensor, Tensor]]]:
    """Sinusoid-like regression tasks with separate support and query points."""
    tasks = []
    for _ in range(count):
        amplitude = 0.5 + 2 * torch.rand((), generator=generator, dtype=torch.float64)
        phase = 3 * torch.rand((), generator=generator, dtype=torch.float64)

        def points(
            n: int, amplitude: Tensor = amplitude, phase: Tensor = phase
        ) -> tuple[Tensor, Tensor]:
            x = 4 * torch.rand(n, 1, generator=generator, dtype=torch.float64) - 2
            return x, amplitude * torch.sin(x + phase)

        tasks.append(tm.SupportQuery(points(support), points(query)))
    return tasks


class RegressionSampler:
    """A resampling regression task: fresh points of one sinusoid on every call."""

    def __init__(self, amplitude: float, phase: float) -> None:
        self.amplitude, self.phase = amplitude, phase

    def sample(self, size: int, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
        x = 4 * torch.rand(size, 1, generator=generator, dtype=torch.float64) - 2
        return x, self.amplitude * torch.sin(x + self.phase)


def relative_error(actual: Tensor, expected: Tensor) -> float:
    return float((actual - expected).norm() / expected.norm())


def params_relative_error(actual: tm.typing.Params, expected: tm.typing.Params) -> float:
    """Relative error of two parameter dicts, as one flat vector."""
    names = sorted(expected)
    flat_actual = torch.cat([actual[n].reshape(-1) for n in names])
    flat_expected = torch.cat([expected[n].reshape(-1) for n in names])
    return relative_error(flat_actual, flat_expected)


def mlp_by_hand(weights: Sequence[Tensor], x: Tensor) -> Tensor:
    """The MLP of :func:`make_mlp` written out: ``tanh(x W1^T + b1) W2^T + b2``."""
    w1, b1, w2, b2 = weights
    return torch.tanh(x @ w1.T + b1) @ w2.T + b2


def mse_by_hand(weights: Sequence[Tensor], batch: tuple[Tensor, Tensor]) -> Tensor:
    x, y = batch
    return ((mlp_by_hand(weights, x) - y) ** 2).mean()


def reference_meta_gradient(
    model: nn.Module,
    tasks: Sequence[tm.SupportQuery[tuple[Tensor, Tensor]]],
    steps: int,
    alpha: float,
) -> tm.typing.Params:
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
    tasks: Sequence[tm.SupportQuery[tuple[Tensor, Tensor]]],
    steps: int,
    alpha: float,
    weights: Sequence[Tensor],
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


EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


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
