"""Deprecated: compilation is configured on the optimizer, and done by the execution layer.

``MetaOptimizer(..., compile=True)`` (or ``MetaObjective(..., compile=...)``) compiles
each chunk of tasks' whole computation, for every estimator (see
:mod:`torch_maml.execution`). :func:`compiled_ops` belonged to the operation bundle
of torch_maml 0.1, which no longer exists.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from typing import Any

from .ops import Ops

__all__ = ["compiled_ops"]


def compiled_ops(ops: Ops, options: Mapping[str, Any] | None = None) -> Ops:
    """Deprecated, and no longer compiles: returns ``ops`` after a warning saying so."""
    warnings.warn(
        "torch_maml.compiling.compiled_ops is deprecated and no longer compiles anything; "
        "pass compile=True (or a dict of torch.compile options) to MetaOptimizer, whose "
        "execution layer compiles whole meta steps",
        DeprecationWarning,
        stacklevel=2,
    )
    return ops
