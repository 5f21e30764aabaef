"""Argument checks shared by the optimizers and the op entry points.

Every check names the argument and says what it accepts: ``TypeError`` for a value of the wrong
kind (a string, a bool, None where a number is needed), ``ValueError`` for a number out of range
(NaN and Inf included).
"""

from __future__ import annotations

import math
import numbers
from typing import Any, Optional

import torch


def _as_float(value: Any, name: str, accepts: str) -> float:
    """``value`` as a float when it is a real number (bool excluded) or a 1-element tensor."""
    if isinstance(value, torch.Tensor) and value.numel() == 1 and not value.dtype.is_complex:
        if value.dtype == torch.bool:
            raise TypeError(f"{name} must be {accepts}, got a bool tensor")
        return float(value.detach().reshape(()).item())
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be {accepts}, got {value!r} ({type(value).__name__})")
    return float(value)


def number(
    value: Any,
    name: str,
    *,
    gt: Optional[float] = None,
    ge: Optional[float] = None,
    le: Optional[float] = None,
    none_ok: bool = False,
    none_means: str = "off",
) -> Optional[float]:
    """Check that ``value`` is a finite real number within the bounds; returns it as a float
    (None when ``none_ok`` and it is None)."""
    bounds = [f"> {gt:g}" if gt is not None else "", f">= {ge:g}" if ge is not None else "",
              f"<= {le:g}" if le is not None else ""]
    accepts = "a finite number" + "".join(f" {b}" for b in bounds if b)
    if none_ok:
        accepts = f"None ({none_means}) or {accepts}"
    if value is None:
        if none_ok:
            return None
        raise TypeError(f"{name} must be {accepts}, got None")
    v = _as_float(value, name, accepts)
    if (not math.isfinite(v) or (gt is not None and not v > gt) or (ge is not None and not v >= ge)
            or (le is not None and not v <= le)):
        raise ValueError(f"{name} must be {accepts}, got {value!r}")
    return v


def integer(value: Any, name: str, *, ge: Optional[int] = None) -> int:
    """Check that ``value`` is an integer (bool excluded) ``>= ge``; returns it as an int."""
    accepts = "an integer" + (f" >= {ge}" if ge is not None else "")
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be {accepts}, got {value!r} ({type(value).__name__})")
    if ge is not None and value < ge:
        raise ValueError(f"{name} must be {accepts}, got {value!r}")
    return int(value)


def choice(value: Any, name: str, accepted: tuple) -> Any:
    """Check that ``value`` is one of ``accepted``."""
    if not isinstance(value, str) or value not in accepted:
        raise ValueError(f"{name} must be one of {accepted}, got {value!r}")
    return value


def eps_pair(value: Any, name: str = "eps") -> tuple:
    """AdaLomo's ``eps``: a pair ``(eps1, eps2)`` of finite numbers >= 0."""
    accepts = "a pair (eps1, eps2) of finite numbers >= 0, such as (1e-30, 1e-3)"
    if isinstance(value, (str, bytes)) or not isinstance(value, (tuple, list)) or len(value) != 2:
        raise TypeError(f"{name} must be {accepts}, got {value!r}")
    for i, v in enumerate(value):
        number(v, f"{name}[{i}]", ge=0.0)
    return tuple(value)


def check_shape(where: str, shape) -> tuple:
    """One shape: a ``torch.Size`` or a list/tuple of integers >= 0 (not a tensor)."""
    if isinstance(shape, torch.Size):  # valid by construction (and symbolic under tracing)
        return tuple(shape)
    if (isinstance(shape, (torch.Tensor, str, bytes))
            or not isinstance(shape, (torch.Size, list, tuple))
            or not all(isinstance(d, numbers.Integral) and not isinstance(d, bool) for d in shape)):
        raise TypeError(f"{where} must be a torch.Size or a sequence of integers such as "
                        f"p.shape, got {shape!r} ({type(shape).__name__})")
    if any(d < 0 for d in shape):
        raise ValueError(f"{where} has a negative size: {tuple(shape)}")
    return tuple(int(d) for d in shape)


def check_shapes(op: str, shapes) -> list[list[int]]:
    """``workspace_numel``'s shapes: a list (or tuple) of shapes (``check_shape``)."""
    if isinstance(shapes, (torch.Tensor, str, bytes)) or not isinstance(shapes, (list, tuple)):
        raise TypeError(f"workspace_numel({op!r}): shapes must be a list of shapes (each a "
                        f"torch.Size or a sequence of integers >= 0), such as "
                        f"[p.shape for p in params], got {type(shapes).__name__}")
    return [list(check_shape(f"workspace_numel({op!r}): shapes[{i}]", shape))
            for i, shape in enumerate(shapes)]
