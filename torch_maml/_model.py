"""What the package needs to know about a user's module: which parameters, and BatchNorm.

Shared by :class:`~torch_maml.MetaOptimizer` and :func:`torch_maml.theory.estimate_smoothness`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Collection, Iterator
from typing import TypeAlias

from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

__all__ = ["ParamSelection", "batch_statistics_only", "select_parameters"]

ParamSelection: TypeAlias = Collection[str] | Callable[[str], bool]
"""Which parameters the inner loop adapts: names or module prefixes, or a predicate on names."""


@contextlib.contextmanager
def batch_statistics_only(model: nn.Module) -> Iterator[None]:
    """BatchNorm layers in training mode normalise with batch statistics, updating none.

    In a meta step, a layer would otherwise fold every task's and every inner step's
    statistics into its running ones (and, vectorised over tasks, fail to); with
    ``track_running_stats`` off for the duration, each batch is normalised by its
    own statistics, exactly as in training mode, and the buffers stay as they are.
    """
    layers = [
        m
        for m in model.modules()
        if isinstance(m, _BatchNorm) and m.training and m.track_running_stats
    ]
    for layer in layers:
        layer.track_running_stats = False
    try:
        yield
    finally:
        for layer in layers:
            layer.track_running_stats = True


def select_parameters(
    model: nn.Module, trainable: list[str], adapted: ParamSelection | None
) -> tuple[str, ...]:
    """The names of the trainable parameters that ``adapted`` selects (all if None)."""
    if adapted is None:
        return tuple(trainable)
    if callable(adapted):
        chosen = tuple(name for name in trainable if adapted(name))
    else:
        if isinstance(adapted, str) or not all(isinstance(e, str) for e in adapted):
            raise TypeError(
                "'adapted' must be a collection of parameter names or module prefixes, or a "
                f"predicate on names (got {adapted!r})"
            )
        frozen = {name for name, p in model.named_parameters() if not p.requires_grad}

        def selects(entry: str, name: str) -> bool:
            return name == entry or name.startswith(entry + ".")

        for entry in adapted:
            if not any(selects(entry, name) for name in trainable):
                why = (
                    "it is a parameter with requires_grad=False, which is never adapted"
                    if any(selects(entry, name) for name in frozen)
                    else f"the trainable parameters are {trainable}"
                )
                raise ValueError(f"'adapted' entry {entry!r} selects no trainable parameter: {why}")
        chosen = tuple(name for name in trainable if any(selects(e, name) for e in adapted))
    if not chosen:
        raise ValueError(
            f"'adapted' selects no trainable parameter (the trainable ones are {trainable})"
        )
    return chosen
