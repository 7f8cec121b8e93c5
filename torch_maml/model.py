"""The user's module as a function of its adapted parameters: ``l(w; batch)``.

:class:`TaskLoss` evaluates ``loss_fn(model, batch)`` with some of the module's
parameters replaced by other tensors (an inner-loop iterate, a vmapped batch of
them), and puts the module's own parameters back afterwards, whatever happens.

The replacement is made in each place a parameter is registered: a parameter
tied between two layers, or a submodule reachable under two names, is replaced
everywhere at once and restored everywhere exactly once. (``torch.func.functional_call``
restores a submodule registered under two names twice, the second time with the
replacement, and leaves it in the model.)

Also here: which parameters are meta-learned and adapted (:func:`select_parameters`),
and what a meta step does to BatchNorm layers (:func:`batch_statistics_only`).
"""

from __future__ import annotations

import contextlib
import types
from collections.abc import Callable, Collection, Iterator, Sequence
from typing import Any, TypeAlias, cast

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from .typing import Batch, LossFn, ModelT, Params

__all__ = [
    "ParamSelection",
    "TaskLoss",
    "batch_norm_by_formula",
    "batch_statistics_only",
    "meta_step_mode",
    "resolve_selection",
    "restoring_buffers",
    "select_parameters",
    "unwrap_compiled",
]

ParamSelection: TypeAlias = Collection[str] | Callable[[str], bool]
"""Which parameters the inner loop adapts: names or module prefixes, or a predicate on names."""

Slot: TypeAlias = tuple[nn.Module, str]
"""A place a parameter is registered: ``module._parameters[name]``."""


def unwrap_compiled(model: ModelT) -> ModelT:
    """The module that ``torch.compile(module)`` wrapped, or ``model`` itself.

    Meta steps differentiate twice through the forward pass and swap weights in and
    out of the module, which a dynamo-compiled module does not support; the
    original module computes the same function eagerly (``compile=True`` of the
    MetaOptimizer compiles whole meta steps instead).
    """
    original = getattr(model, "_orig_mod", None)
    if isinstance(original, nn.Module) and type(model).__name__ == "OptimizedModule":
        return cast(ModelT, original)  # the same module, not compiled
    return model


class TaskLoss:
    """``l(w; batch)``: the user's loss closure as a function of the adapted weights.

    ``loss_fn(model, batch)`` is called with the user's own module, the parameters
    named in ``params`` replaced in every place they are registered; the other
    parameters and the buffers are the module's own. The module is restored when
    the call returns or raises.

    Args:
        model: the user's module.
        loss_fn: ``loss_fn(model, batch) -> scalar Tensor``.
        names: the names (as in ``model.named_parameters()``) of the meta parameters.
    """

    def __init__(self, model: ModelT, loss_fn: LossFn[ModelT, Any], names: Sequence[str]) -> None:
        self.model: nn.Module = model
        self.loss_fn: LossFn[Any, Any] = loss_fn
        self.names = tuple(names)
        self._slots = _parameter_slots(model, self.names)

    def __call__(self, params: Params, batch: Batch) -> Tensor:
        """The loss of ``batch`` at the weights ``params``, checked to be a real scalar."""
        with self.swapped(params):
            out = self.loss_fn(self.model, batch)
        return _checked_loss(out)

    @contextlib.contextmanager
    def swapped(self, params: Params) -> Iterator[None]:
        """The module with the parameters ``params`` in place of its own, restored after."""
        saved: list[tuple[nn.Module, str, Any]] = []
        try:
            for name, value in params.items():
                for module, attr in self._slots[name]:
                    saved.append((module, attr, module._parameters[attr]))
                    module._parameters[attr] = value  # type: ignore[assignment]  # a Tensor
            yield
        finally:
            for module, attr, original in reversed(saved):
                module._parameters[attr] = original

    def params(self) -> Params:
        """The current values of the meta parameters, detached: ``w_k``."""
        named = dict(self.model.named_parameters())
        return {name: named[name].detach() for name in self.names}


def _checked_loss(out: object) -> Tensor:
    if not isinstance(out, Tensor):
        raise TypeError(
            f"'loss_fn' must return a scalar Tensor (got an object of type {type(out).__name__})"
        )
    if out.ndim != 0:
        raise ValueError(
            "'loss_fn' must return a scalar Tensor "
            f"(got a Tensor of shape {tuple(out.shape)}); reduce it, e.g. with .mean()"
        )
    if not out.is_floating_point():
        raise TypeError(f"'loss_fn' must return a floating point Tensor (got dtype {out.dtype})")
    return out


def _parameter_slots(model: nn.Module, names: Sequence[str]) -> dict[str, list[Slot]]:
    """Every distinct place each named parameter is registered, by its name."""
    named = dict(model.named_parameters())
    places: dict[int, list[Slot]] = {}
    seen: set[tuple[int, str]] = set()
    for _, module in model.named_modules(remove_duplicate=False):
        for attr, parameter in module._parameters.items():
            if parameter is not None and (id(module), attr) not in seen:
                seen.add((id(module), attr))
                places.setdefault(id(parameter), []).append((module, attr))
    return {name: places[id(named[name])] for name in names}


@contextlib.contextmanager
def meta_step_mode(model: nn.Module) -> Iterator[None]:
    """The model as a meta step sees it: batch statistics, and buffers restored after."""
    with restoring_buffers(model), batch_statistics_only(model):
        yield


@contextlib.contextmanager
def restoring_buffers(model: nn.Module) -> Iterator[None]:
    """Every buffer written inside is put back as it was when the block ends.

    A forward pass that writes a buffer in place (a call counter, a cache) sees its
    writes during a meta step; the step ends with every buffer as it began, whichever
    path ran it (one task at a time writes once per task, vectorised once per chunk).
    No host synchronisation: a captured step restores its buffers on every replay.
    """
    buffers = [b for b in model.buffers() if b is not None]
    versions = [b._version for b in buffers]
    saved = [b.clone() for b in buffers]
    try:
        yield
    finally:
        with torch.no_grad():
            for buffer, version, value in zip(buffers, versions, saved, strict=True):
                if buffer._version != version:
                    buffer.copy_(value)


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


@contextlib.contextmanager
def batch_norm_by_formula(model: nn.Module) -> Iterator[None]:
    """BatchNorm layers that normalise by batch statistics compute them by formula.

    ``(x - mean) / sqrt(var + eps) * weight + bias`` over the batch (and spatial)
    dimensions, as torch's batch-norm kernel computes it, to rounding. That kernel's
    backward cannot be traced for compilation under ``vmap`` (torch 2.15 refuses to read
    a tensor's ``data`` there); the formula is plain operations, differentiable to any
    order. Layers that normalise by their running statistics are left as they are.
    """
    layers = [
        m
        for m in model.modules()
        if isinstance(m, _BatchNorm)
        and (m.training or (m.running_mean is None and m.running_var is None))
    ]
    own = [layer.__dict__.get("forward") for layer in layers]  # a forward set on the instance
    for layer in layers:
        layer.forward = types.MethodType(_batch_norm_formula, layer)  # type: ignore[method-assign]
    try:
        yield
    finally:
        for layer, forward in zip(layers, own, strict=True):
            if forward is None:
                del layer.forward
            else:
                layer.forward = forward  # type: ignore[method-assign]


def _batch_norm_formula(layer: _BatchNorm, x: Tensor) -> Tensor:
    dims = [0, *range(2, x.ndim)]
    mean = x.mean(dims, keepdim=True)
    var = x.var(dims, unbiased=False, keepdim=True)
    out = (x - mean) * torch.rsqrt(var + layer.eps)
    if layer.affine:
        shape = [1, -1] + [1] * (x.ndim - 2)
        out = out * layer.weight.reshape(shape) + layer.bias.reshape(shape)
    return out


def resolve_selection(
    selection: ParamSelection,
    names: Sequence[str],
    frozen: Collection[str] = (),
    argument: str = "adapted",
) -> tuple[str, ...]:
    """The names of ``names`` that ``selection`` picks, in the order of ``names``.

    Args:
        selection: parameter names or module prefixes, or a predicate on names.
        names: the meta parameters' names.
        frozen: names of parameters with ``requires_grad=False``, for the message
            when an entry selects one of them.
        argument: the name of the argument that gave ``selection``, for the messages.

    Raises:
        ValueError: an entry selects no name, or nothing is selected.
    """
    names = list(names)
    if callable(selection):
        chosen = tuple(name for name in names if selection(name))
    else:

        def selects(entry: str, name: str) -> bool:
            return name == entry or name.startswith(entry + ".")

        for entry in selection:
            if not any(selects(entry, name) for name in names):
                why = (
                    "it is a parameter with requires_grad=False, which is never adapted"
                    if any(selects(entry, name) for name in frozen)
                    else f"the trainable parameters are {names}"
                )
                raise ValueError(
                    f"'{argument}' entry {entry!r} selects no trainable parameter: {why}"
                )
        chosen = tuple(name for name in names if any(selects(e, name) for e in selection))
    if not chosen:
        raise ValueError(
            f"'{argument}' selects no trainable parameter (the trainable ones are {names})"
        )
    return chosen


def select_parameters(
    model: nn.Module, trainable: Sequence[str], adapted: ParamSelection | None
) -> tuple[str, ...]:
    """The names of the trainable parameters that ``adapted`` selects (all if None)."""
    if adapted is None:
        return tuple(trainable)
    if not callable(adapted) and (
        isinstance(adapted, str) or not all(isinstance(e, str) for e in adapted)
    ):
        raise TypeError(
            "'adapted' must be a collection of parameter names or module prefixes, or a "
            f"predicate on names (got {adapted!r})"
        )
    frozen = [name for name, p in model.named_parameters() if not p.requires_grad]
    return resolve_selection(adapted, trainable, frozen)
