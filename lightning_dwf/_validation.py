"""Argument checks shared by the plain-PyTorch functions and the callback.

Every check raises early with a message that names the argument and the fix.
"""

from __future__ import annotations

import math
from typing import Any

from lightning_dwf.core.functional import SUPPORTED_BITS

#: Depths above this train poorly (D-Gating follow-up: no gain beyond D = 4, more instability).
MAX_RECOMMENDED_DEPTH = 6


def check_depth(depth: Any) -> int:
    """Return ``depth`` if it is an int >= 2, else raise."""
    if isinstance(depth, bool) or not isinstance(depth, int):
        raise TypeError(
            f"`depth` must be an int >= 2 (the number of factors D), got {depth!r} of type {type(depth).__name__}."
        )
    if depth < 2:
        raise ValueError(f"`depth` must be >= 2 (D=2 is the lasso, D=3 the recommended default), got {depth}.")
    return depth


def check_nonnegative(name: str, value: Any, hint: str = "") -> float:
    """Return ``value`` as float if it is a finite real >= 0, else raise."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"`{name}` must be a finite float >= 0, got {value!r} of type {type(value).__name__}.{hint}")
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"`{name}` must be a finite float >= 0, got {value!r}.{hint}")
    return float(value)


def check_positive(name: str, value: Any, hint: str = "") -> float:
    """Return ``value`` as float if it is a finite real > 0, else raise."""
    value = check_nonnegative(name, value, hint)
    if value == 0:
        raise ValueError(f"`{name}` must be > 0, got 0.{hint}")
    return value


def check_int(name: str, value: Any, minimum: int, hint: str = "") -> int:
    """Return ``value`` if it is an int (not a bool) >= ``minimum``, else raise naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"`{name}` must be an int >= {minimum}, got {value!r} of type {type(value).__name__}.{hint}")
    if value < minimum:
        raise ValueError(f"`{name}` must be an int >= {minimum}, got {value}.{hint}")
    return value


def check_target(name: str, value: Any) -> float:
    """Return ``value`` if it is a sparsity (fraction of zero weights) in (0, 1), else raise."""
    value = check_positive(name, value)
    if not value < 1:
        raise ValueError(f"`{name}` is a fraction of zero weights in (0, 1), e.g. 0.95; got {value}.")
    return value


def check_fraction(name: str, value: Any, upper: float, upper_inclusive: bool, meaning: str) -> float:
    """Return ``value`` as float if it lies in ``[0, upper]`` (or ``[0, upper)``), else raise naming ``meaning``."""
    inside = not isinstance(value, bool) and isinstance(value, (int, float)) and 0 <= value
    if not (inside and (value <= upper if upper_inclusive else value < upper)):
        bracket = "]" if upper_inclusive else ")"
        raise ValueError(f"`{name}` is {meaning}; it must be in [0, {upper:g}{bracket}, got {value!r}.")
    return float(value)


def check_bits(bits: Any, name: str = "quantize_bits") -> int | None:
    """Return ``bits`` if it is None, 8 or 4 (bits per stored value of the per-channel grid), else raise naming
    ``name``."""
    if isinstance(bits, bool) or bits not in SUPPORTED_BITS:
        raise ValueError(f"`{name}` must be None (float weights), 8 or 4 (bits per stored value), got {bits!r}.")
    return bits


def check_choice(name: str, value: Any, choices: tuple[str, ...]) -> str:
    """Return ``value`` if it is one of ``choices``, else raise."""
    if value not in choices:
        raise ValueError(f"`{name}` must be one of {choices}, got {value!r}.")
    return value


def check_patterns(name: str, value: Any) -> tuple[str, ...]:
    """Return a tuple of strings (glob patterns, tensor names) from a string or a sequence of strings."""
    if value is None:
        return ()
    if isinstance(value, str):
        return (value,)
    if not all(isinstance(v, str) for v in value):
        raise TypeError(f"`{name}` must be a string or a list of strings (e.g. ['encoder.*']), got {value!r}.")
    return tuple(value)


def set_field(config: object, name: str, value: object) -> None:
    """Store a normalized value on a frozen dataclass (only from its ``__post_init__``)."""
    object.__setattr__(config, name, value)
