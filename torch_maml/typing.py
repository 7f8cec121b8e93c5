"""Type aliases shared across torch_maml.

The package works on *parameter dicts* (``dict[str, Tensor]``, keyed by the names
of ``model.named_parameters()``), the form ``torch.func.functional_call`` takes.
A *batch* is whatever the user's loss closure takes: any pytree of tensors.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeAlias, TypeVar

import torch
from torch import Tensor

__all__ = ["Batch", "BatchT", "InnerState", "LossFn", "ModelT", "Params"]

Params: TypeAlias = dict[str, Tensor]
"""Adapted parameters by name: ``w``, ``w_j`` or a meta gradient ``G``."""

Batch: TypeAlias = Any
"""One batch of a task's data: any pytree of tensors the loss closure understands."""

InnerState: TypeAlias = Any
"""An inner optimiser's state (a pytree of tensors; ``()`` for plain gradient descent)."""

BatchT = TypeVar("BatchT")
"""The type of the batches that a loss closure takes and tasks hand out."""

ModelT = TypeVar("ModelT", bound=torch.nn.Module)
"""The type of the user's module, as the loss closure sees it."""

LossFn: TypeAlias = Callable[[ModelT, BatchT], Tensor]
"""``loss_fn(model, batch) -> scalar Tensor``: the user's loss of one batch."""
