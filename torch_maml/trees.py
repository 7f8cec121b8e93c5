"""Arithmetic over parameter dicts and optimiser states: the one place it is written.

A :data:`~torch_maml.typing.Params` dict maps names to tensors; an inner loop's
state is any pytree of tensors. These helpers are elementwise, so they hold for a
single task and for tensors with a leading task dimension alike. Reductions that
must stay per task (inner products, norms) are :class:`~torch_maml.Ops` methods.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import Tensor

# torch.func's own pytree utilities: torch has no public pytree module in the releases
# this package supports, and these functions have been stable since torch 1.13.
from torch.utils._pytree import tree_flatten, tree_leaves, tree_map, tree_unflatten

from .typing import Params

__all__ = [
    "add",
    "axpy",
    "detach",
    "flatten",
    "leaves",
    "rebuild",
    "requiring_grad",
    "unflatten",
    "zeros_like",
]

flatten = tree_flatten
unflatten = tree_unflatten


def add(a: Params, b: Params) -> Params:
    """``a + b``, name by name."""
    return {name: x + b[name] for name, x in a.items()}


def axpy(alpha: float, x: Params, y: Params) -> Params:
    """``y + alpha * x``, name by name (BLAS's axpy)."""
    return {name: y[name].add(t, alpha=alpha) for name, t in x.items()}


def _map(fn: Callable[[Tensor], Tensor], tree: Any) -> Any:
    """``fn`` on every tensor of a pytree; dicts, tuples and lists of tensors directly.

    The direct cases are every parameter dict and the built-in inner loops' states:
    they skip the general pytree machinery, whose cost shows in small meta steps.
    """
    if isinstance(tree, Tensor):
        return fn(tree)
    if type(tree) is dict:
        return {k: _map(fn, v) for k, v in tree.items()}
    if type(tree) is tuple or type(tree) is list:
        return type(tree)(_map(fn, v) for v in tree)
    return tree_map(lambda t: fn(t) if isinstance(t, Tensor) else t, tree)


def detach(tree: Any) -> Any:
    """Every tensor of a pytree, detached."""
    return _map(Tensor.detach, tree)


def zeros_like(tree: Any) -> Any:
    """A pytree of the same structure with every tensor replaced by zeros."""
    return _map(torch.zeros_like, tree)


def _leaf(t: Tensor) -> Tensor:
    return t.detach().requires_grad_(True) if t.is_floating_point() else t


def requiring_grad(tree: Any) -> Any:
    """Detached copies of a pytree's floating point tensors, as leaves that require grad."""
    return _map(_leaf, tree)


def leaves(tree: Any) -> list[Any]:
    """The leaves of a pytree, in order; dicts, tuples and lists of tensors directly."""
    if isinstance(tree, Tensor):
        return [tree]
    if type(tree) is dict:
        return [leaf for v in tree.values() for leaf in leaves(v)]
    if type(tree) is tuple or type(tree) is list:
        return [leaf for v in tree for leaf in leaves(v)]
    return tree_leaves(tree)


def rebuild(tree: Any, values: Iterator[Any]) -> Any:
    """A pytree of ``tree``'s structure with its leaves taken in order from ``values``."""
    if isinstance(tree, Tensor):
        return next(values)
    if type(tree) is dict:
        return {k: rebuild(v, values) for k, v in tree.items()}
    if type(tree) is tuple or type(tree) is list:
        return type(tree)(rebuild(v, values) for v in tree)
    flat, spec = tree_flatten(tree)
    return tree_unflatten([next(values) for _ in flat], spec)
