"""The checked entry point of ``grad_accumulate_`` (its schema is declared with the others in
ops.py; the math is ``reference.grad_accumulate_`` and docs/spec.md "Gradient accumulation")."""

from __future__ import annotations

from typing import Optional

import torch

from . import ops
from ._checks import number

#: The accumulation buffer's dtype for a gradient of each dtype: float32, or the gradient's own.
BUFFER_DTYPES = {
    torch.float32: (torch.float32,),
    torch.float16: (torch.float32, torch.float16),
    torch.bfloat16: (torch.float32, torch.bfloat16),
}


def check_accumulate(buf, grad, found_inf, loss_scale, rounding, buf_sq) -> None:
    """The argument checks of ``grad_accumulate_`` (every message names the argument)."""
    op = "grad_accumulate_"
    if not isinstance(buf, torch.Tensor) or not isinstance(grad, torch.Tensor):
        raise TypeError(f"{op}: buf and grad must be tensors")
    if grad.dtype not in BUFFER_DTYPES:
        raise TypeError(f"{op}: grad dtype must be float32, float16 or bfloat16, got {grad.dtype}")
    if buf.dtype not in BUFFER_DTYPES[grad.dtype]:
        raise TypeError(f"{op}: buf dtype must be float32 or the gradient's ({grad.dtype}), got "
                        f"{buf.dtype}")
    if buf.shape != grad.shape:
        raise ValueError(f"{op}: grad shape {tuple(grad.shape)} != buf shape {tuple(buf.shape)}")
    if buf.device != grad.device:
        raise ValueError(f"{op}: grad is on {grad.device}, buf on {buf.device}")
    if not buf.is_contiguous() or not grad.is_contiguous():
        raise ValueError(f"{op}: buf and grad must be contiguous")
    if rounding not in ops.ROUNDINGS:
        raise ValueError(f"{op}: rounding must be one of {ops.ROUNDINGS}, got {rounding!r}")
    number(loss_scale, f"{op}: loss_scale", gt=0.0)
    for name, t in (("found_inf", found_inf), ("buf_sq", buf_sq)):
        ops._check_scalar_tensor(op, name, t, buf.device)


def grad_accumulate_(
    buf: torch.Tensor, grad: torch.Tensor, *, first: bool, loss_scale: float = 1.0,
    found_inf: Optional[torch.Tensor] = None, buf_sq: Optional[torch.Tensor] = None,
    workspace: Optional[torch.Tensor] = None, rounding: str = "nearest", seed: int = 0,
    step: int = 0, backend: str = "auto",
) -> None:
    """Checked entry point of the accumulation kernel: ``buf = round(g / loss_scale)`` when
    ``first`` (``buf`` is not read), else ``round(buf + g / loss_scale)``, in float32 registers,
    rounded to ``buf``'s dtype (``rounding``: "nearest", or "stochastic" keyed by (seed, step,
    element index)). ``buf_sq`` is SET to ``sum(buf_new**2)``; ``found_inf`` is set to 1 when a
    new buffer value is NaN/Inf."""
    op = "grad_accumulate_"
    if not isinstance(first, bool):
        raise TypeError(f"{op}: first must be True or False, got {first!r}")
    check_accumulate(buf, grad, found_inf, loss_scale, rounding, buf_sq)
    ops._check_workspace(op, workspace, [buf.shape], backend, buf.device)
    impl = ops.get_impl(op, backend, buf.device)
    impl(buf, grad, found_inf, float(loss_scale), first, rounding, int(seed), int(step), buf_sq,
         workspace)
