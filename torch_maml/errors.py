"""Exceptions and warnings that torch_maml raises on its own account."""

from __future__ import annotations

import sys
import warnings

__all__ = [
    "CaptureWarning",
    "CompileWarning",
    "InnerStepSizeWarning",
    "NonFiniteError",
    "VectorizationWarning",
    "warn_user",
]


class NonFiniteError(FloatingPointError):
    """A meta step produced a NaN or infinite loss, meta gradient or step size.

    Raised before any weight changes: the model and the optimizer are left exactly
    as they were before the failing call.
    """


class InnerStepSizeWarning(UserWarning):
    """The inner step size breaks the bound of the paper's convergence guarantee.

    Propositions 3-4 and Theorems 5 and 9 of Ji, Yang & Liang need
    ``alpha < (2**(1/(2N)) - 1) / L``. The bound is sufficient, not necessary:
    training may still converge above it, but the paper's guarantee no longer applies.
    """


class CompileWarning(UserWarning):
    """``torch.compile`` could not compile a MetaOptimizer's meta step: it runs eagerly.

    Issued once per optimizer; the results are the same, only slower.
    """


class VectorizationWarning(UserWarning):
    """A model could not run vectorised over tasks: its tasks run one by one.

    Issued once per optimizer, with the reason (a forward pass that writes a buffer
    in place, Python control flow on tensor values, an operation ``torch.func.vmap``
    does not support...). The results are the same, only slower on small models.
    """


class CaptureWarning(UserWarning):
    """A meta step could not be captured as a CUDA graph: it runs eagerly.

    Issued once per optimizer and reason (samplers, tasks that do not stack, a
    component that synchronises with the host...). The results are the same.
    """


def warn_user(message: str, category: type[Warning]) -> None:
    """``warnings.warn`` attributed to the first caller outside torch_maml and torch.

    The warnings of a meta step come from deep inside it, at a depth that depends on the
    path it took; the line that matters to the user is theirs.
    """
    frame = sys._getframe(1)  # the caller of this function: stacklevel 2
    level = 2
    while frame.f_back is not None and (
        frame.f_globals.get("__name__", "").split(".")[0] in ("torch_maml", "torch")
        or frame.f_code.co_filename.startswith("<")  # generated code (a dataclass's __init__)
    ):
        frame = frame.f_back
        level += 1
    warnings.warn(message, category, stacklevel=level)
