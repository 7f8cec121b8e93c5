"""The workloads of the benchmark, defined once for every implementation.

* ``sinusoid``: Finn et al.'s regression, a 1-40-40-1 ReLU MLP, 25 tasks of 10 support
  and 10 query points, inner step size 0.01.
* ``sinusoid-B1``: the same with a meta-batch of one task (nothing to vectorise).
* ``mlp640``: the same regression with a wide 1-640-640-1 ReLU MLP (0.4 M parameters,
  1.6 MiB in float32, few activations), 25 tasks.
* ``conv4``: the 4-block convnet of few-shot classification (3x3 convolutions with 64
  filters, batch normalisation with batch statistics, ReLU, 2x2 max pooling, a linear
  head), 8 tasks of 5-way 1-shot on 28x28 grey images with 5 query images per class,
  inner step size 0.4. Images are random: only the cost matters here.

Parameters are named as ``model.named_parameters()`` names them, with torch's layouts
(a linear weight is ``(out, in)``, a convolution's ``(out, in, kh, kw)``).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

Data = tuple[Tensor, Tensor, Tensor, Tensor]
"""``(x_support, y_support, x_query, y_query)``, each with a leading task dimension."""


@dataclass(frozen=True)
class Workload:
    name: str
    tasks: int
    alpha: float
    make_model: Callable[[], nn.Module]
    make_data: Callable[[int, torch.Generator, torch.dtype], Data]
    criterion: Callable[[Tensor, Tensor], Tensor]
    """``criterion(output, target)``: the loss of the model's output."""

    def loss_fn(self, model: nn.Module, batch: tuple[Tensor, Tensor]) -> Tensor:
        """``criterion(model(x), y)``: the loss closure of torch_maml, higher and TorchOpt."""
        x, y = batch
        return self.criterion(model(x), y)


def mlp(width: int) -> Callable[[], nn.Module]:
    """A factory of 1-``width``-``width``-1 ReLU MLPs."""

    def make() -> nn.Module:
        return nn.Sequential(
            nn.Linear(1, width), nn.ReLU(), nn.Linear(width, width), nn.ReLU(), nn.Linear(width, 1)
        )

    return make


def sinusoid_data(tasks: int, generator: torch.Generator, dtype: torch.dtype) -> Data:
    k = 10
    amplitude = 0.1 + 4.9 * torch.rand(tasks, 1, 1, generator=generator, dtype=dtype)
    phase = math.pi * torch.rand(tasks, 1, 1, generator=generator, dtype=dtype)
    x = 10 * torch.rand(tasks, 2 * k, 1, generator=generator, dtype=dtype) - 5
    y = amplitude * torch.sin(x - phase)
    return x[:, :k], y[:, :k], x[:, k:], y[:, k:]


def conv4_model() -> nn.Module:
    def block(channels_in: int) -> nn.Module:
        return nn.Sequential(
            nn.Conv2d(channels_in, 64, 3, padding=1),
            nn.BatchNorm2d(64, track_running_stats=False),
            nn.ReLU(),
            nn.MaxPool2d(2),
        )

    return nn.Sequential(block(1), block(64), block(64), block(64), nn.Flatten(), nn.Linear(64, 5))


def conv4_data(tasks: int, generator: torch.Generator, dtype: torch.dtype) -> Data:
    ways, query_per_class = 5, 5
    x_support = torch.randn(tasks, ways, 1, 28, 28, generator=generator, dtype=dtype)
    x_query = torch.randn(
        tasks, ways * query_per_class, 1, 28, 28, generator=generator, dtype=dtype
    )
    y_support = torch.arange(ways).repeat(tasks, 1)
    y_query = torch.arange(ways).repeat_interleave(query_per_class).repeat(tasks, 1)
    return x_support, y_support, x_query, y_query


WORKLOADS = {
    "sinusoid": Workload("sinusoid", 25, 0.01, mlp(40), sinusoid_data, F.mse_loss),
    "sinusoid-B1": Workload("sinusoid-B1", 1, 0.01, mlp(40), sinusoid_data, F.mse_loss),
    "mlp640": Workload("mlp640", 25, 0.01, mlp(640), sinusoid_data, F.mse_loss),
    "conv4": Workload("conv4", 8, 0.4, conv4_model, conv4_data, F.cross_entropy),
}


def setup(
    workload: Workload, dtype: torch.dtype, device: str, seed: int = 0
) -> tuple[nn.Module, Data]:
    """The model (seeded initialisation) and one meta-batch of data, on ``device``."""
    torch.manual_seed(seed)
    model = workload.make_model().to(device=device, dtype=dtype)
    data = workload.make_data(workload.tasks, torch.Generator().manual_seed(seed + 1), dtype)
    return model, tuple(t.to(device) for t in data)  # type: ignore[return-value]
