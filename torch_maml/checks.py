"""Argument checks shared by the components: one message format everywhere.

Messages name the argument, what it must be, and what was given, e.g.
``'steps' must be a positive int (got 0)``.
"""

from __future__ import annotations

import math
from numbers import Real


def _describe(value: object) -> str:
    if isinstance(value, (bool, int, float, str)) or value is None:
        return repr(value)
    return f"an object of type {type(value).__name__}"


def positive_int(name: str, value: object) -> int:
    """Return ``value`` if it is an int >= 1 (not a bool), else raise."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"'{name}' must be a positive int (got {_describe(value)})")
    if value < 1:
        raise ValueError(f"'{name}' must be a positive int (got {value})")
    return value


def optional_positive_int(name: str, value: object) -> int | None:
    """Like :func:`positive_int`, but ``None`` passes through."""
    return None if value is None else positive_int(name, value)


def _real(name: str, value: object, requirement: str) -> float:
    if isinstance(value, bool) or not isinstance(value, Real):
        raise TypeError(f"'{name}' must be {requirement} (got {_describe(value)})")
    result = float(value)
    if not math.isfinite(result):
        raise ValueError(f"'{name}' must be {requirement} (got {result})")
    return result


def positive_float(name: str, value: object) -> float:
    """Return ``value`` as a float if it is a finite real number > 0, else raise."""
    result = _real(name, value, "a finite number > 0")
    if result <= 0:
        raise ValueError(f"'{name}' must be a finite number > 0 (got {result})")
    return result


def nonnegative_float(name: str, value: object) -> float:
    """Return ``value`` as a float if it is a finite real number >= 0, else raise."""
    result = _real(name, value, "a finite number >= 0")
    if result < 0:
        raise ValueError(f"'{name}' must be a finite number >= 0 (got {result})")
    return result


def unit_interval(name: str, value: object) -> float:
    """Return ``value`` as a float if it is a real number in [0, 1), else raise."""
    result = _real(name, value, "in [0, 1)")
    if not 0 <= result < 1:
        raise ValueError(f"'{name}' must be in [0, 1) (got {result})")
    return result
