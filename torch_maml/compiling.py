"""``torch.compile`` for the batched operations, one step at a time.

What is compiled is the whole HVP recursion of a chunk of tasks, vmapped over tasks,
with its inner steps in ``scan`` loops: the loop bodies are compiled once, so the
compile time does not grow with the number of inner steps, and a meta step is one
call of compiled code. (:class:`~torch_maml.Exact`'s unrolled gradient is compiled
whole, as autograd needs it: its compile time grows with ``N``.)

Each :class:`~torch_maml.MetaOptimizer` gets functions with code objects of their
own, hence compile caches of their own: many optimizers over different models in
one process do not exhaust dynamo's recompile limit of a shared function.

If compilation fails (a model or loss that dynamo or the backend cannot handle),
the operation runs eagerly, with one :class:`CompileWarning`, and stays eager.
An error that the eager run raises too (bad input) is raised as it is.
"""

from __future__ import annotations

import dataclasses
import itertools
import types
import warnings
from collections.abc import Callable, Mapping
from typing import Any, TypeVar

import torch

from .errors import CompileWarning
from .functional import (
    Ops,
    OracleCounts,
    join_steps,
    recursion_meta_gradient,
    scanned_recursion,
    split_steps,
)

__all__ = ["compiled_ops"]

F = TypeVar("F", bound=Callable[..., Any])

_ids = itertools.count()


def _own_code(fn: F) -> F:
    """A copy of ``fn`` with a code object of its own: dynamo keys its cache on code."""
    code = fn.__code__.replace(co_name=f"{fn.__name__}_{next(_ids)}")
    copy = types.FunctionType(code, fn.__globals__, code.co_name, fn.__defaults__, fn.__closure__)
    result: F = copy  # type: ignore[assignment]  # same signature, same behaviour
    return result


class _Fallback:
    """Shared by one optimizer's operations: once one fails to compile, all run eagerly."""

    def __init__(self) -> None:
        self.eager = False

    def wrap(self, compiled: Callable[..., Any], eager: Callable[..., Any]) -> Callable[..., Any]:
        def call(*args: Any) -> Any:
            if self.eager:
                return eager(*args)
            try:
                return compiled(*args)
            except Exception as compile_error:
                result = eager(*args)  # an error here is the caller's: it propagates
                self.eager = True
                reason = str(compile_error).strip().splitlines()
                warnings.warn(
                    "torch.compile could not compile this MetaOptimizer's meta step "
                    f"({type(compile_error).__name__}: {reason[0] if reason else ''}); "
                    "it runs eagerly from now on. Pass compile=False to skip compilation.",
                    CompileWarning,
                    stacklevel=2,
                )
                return result

        return call


def compiled_ops(ops: Ops, options: Mapping[str, Any] | None = None) -> Ops:
    """``ops`` with the recursion and the unrolled gradient compiled by ``torch.compile``.

    The recursion is compiled whole, its steps in ``scan`` loops
    (:func:`~torch_maml.functional.scanned_recursion`): one graph per meta step, whose
    compile time does not depend on ``N``. Falls back to ``ops`` if compilation fails.

    Args:
        ops: the batched operations (see :func:`torch_maml.functional.batched_ops`).
        options: keyword arguments of ``torch.compile`` (default: ``fullgraph=True``,
            ``dynamic=False``, inductor).
    """
    settings: dict[str, Any] = {"fullgraph": True, "dynamic": False, **(options or {})}
    fallback = _Fallback()

    def core(params: Any, steps: int, inner: Any, hessian: Any, outer: Any) -> Any:
        return scanned_recursion(ops, params, steps, inner, hessian, outer)

    def eager_core(params: Any, steps: int, inner: Any, hessian: Any, outer: Any) -> Any:
        inner_batches, hessian_batches = join_steps(steps, *inner), join_steps(steps, *hessian)
        counts = OracleCounts()
        return recursion_meta_gradient(ops, params, inner_batches, hessian_batches, outer, counts)

    def unrolled(params: Any, inner: Any, outer: Any) -> Any:
        return ops.unrolled(params, inner, outer)

    def compile_(fn: Callable[..., Any], eager: Callable[..., Any]) -> Callable[..., Any]:
        return fallback.wrap(torch.compile(_own_code(fn), **settings), eager)

    compiled_core = compile_(core, eager_core)

    def recursion(params: Any, inner: Any, hessian: Any, outer: Any) -> Any:
        split = split_steps(inner)
        return compiled_core(params, len(inner), split, split_steps(hessian), outer)

    return dataclasses.replace(
        ops,
        recursion=recursion,
        unrolled=compile_(unrolled, ops.unrolled),
    )
