"""Pure-PyTorch reference of every lomo_kernels op: the oracle every backend is tested against.

It computes exactly what docs/spec.md specifies, step by step in the order ``lomo-optim`` 0.1.1
uses, so that with ``rounding="nearest"`` it reproduces ``lomo_optim.Lomo`` /
``lomo_optim.AdaLomo``.
It is readable, not fast: it allocates fp32 copies of the parameter and gradient (the very thing
the fused kernels avoid).

Host-side scalars (``1 - lr * weight_decay``, ``-lr``, ``beta``, ``1 - beta``) are computed in
float64 from the Python arguments and rounded once to float32, as ``lomo-optim``'s Python code
does; every backend follows that convention.

Where this deviates from ``lomo-optim`` (and docs/spec.md), on purpose:
  * non-finite gradient elements never reach the parameter. LOMO leaves each element whose
    gradient is NaN/Inf unchanged; AdaLomo leaves the whole parameter and its state unchanged
    (its statistics would be poisoned). Either way ``found_inf`` (if given) is set to 1.
    ``lomo-optim`` writes NaN into the parameter.
  * parameters of more than two dimensions are factored over their last two dimensions
    (docs/spec.md); ``lomo-optim`` crashes on them.
  * the sums behind AdaLomo's rms(p), rms(u) and its row/column means accumulate in float64
    (``lomo-optim``: float32 torch reductions, ~1e-3 off over tens of millions of elements on
    CPU; docs/spec.md "How the sums are accumulated").
  * a NaN stored in fp16 / bf16 is the canonical quiet NaN (CANONICAL_NAN).
"""

from __future__ import annotations

import torch

# The shared pieces, AdaLomo and GoLore live in their own modules; this module is the one name
# every caller imports (reference.lomo_update_, reference.WS_HEADER, ...).
from .reference_adalomo import (  # noqa: F401
    WS_BAD, WS_HEADER, WS_SUM_PP, WS_SUM_UU, adalomo_update_, adalomo_workspace_numel,
    adalomo_workspace_regions,
)
from .reference_common import (  # noqa: F401
    CANONICAL_NAN, _add_grad_sq, _mark_found_inf, _mix32_t, _preprocess, _sr_bf16, _sr_fp16, f32,
    mix32, random_bits, round_to_dtype, rounding_key,
)
from .reference_golore import golore_scalars, golore_update_  # noqa: F401

__all__ = [
    "lomo_update_",
    "adalomo_update_",
    "golore_update_",
    "golore_scalars",
    "grad_accumulate_",
    "round_to_dtype",
    "random_bits",
    "rounding_key",
    "mix32",
    "f32",
    "lomo_update_multi_",
    "adalomo_update_multi_",
    "adalomo_workspace_regions",
    "adalomo_workspace_numel",
    "workspace_numel",
    "lomo_multi_loop",
    "adalomo_multi_loop",
]


# ---------------------------------------------------------------------------------------------
# LOMO
# ---------------------------------------------------------------------------------------------


def lomo_update_(
    param, grad, clip_coef, found_inf, lr, weight_decay, loss_scale, clip_grad_value,
    rounding, seed, step, grad_sq=None, workspace=None,
):
    """p = p * (1 - lr * weight_decay) - lr * g, with g preprocessed (docs/spec.md), in place.

    ``grad_sq`` (optional 1-element float32): ``sum((g / loss_scale)**2)`` of this parameter is
    added to it (the gradient-norm side output). ``workspace`` is backend scratch; the reference
    needs none."""
    if param.numel() == 0:
        return
    _add_grad_sq(grad_sq, grad, loss_scale)
    g32 = _preprocess(grad, loss_scale, clip_grad_value, clip_coef)
    p32 = param.to(torch.float32)
    new = p32
    if weight_decay != 0.0:
        new = new * f32(1.0 - lr * weight_decay)
    new = torch.add(new, g32, alpha=-lr)  # one fused multiply-add per element, as lomo-optim
    out = round_to_dtype(new, param.dtype, rounding, seed, step)
    finite = torch.isfinite(grad)
    param.copy_(torch.where(finite, out, param))
    _mark_found_inf(found_inf, ~finite)


# ---------------------------------------------------------------------------------------------
# Gradient accumulation (docs/spec.md "Gradient accumulation")
# ---------------------------------------------------------------------------------------------


def grad_accumulate_(buf, grad, found_inf, loss_scale, first, rounding, seed, step, buf_sq=None,
                     workspace=None):
    """``buf = round(g / loss_scale)`` (``first``) or ``round(buf + g / loss_scale)``, in place.

    ``buf`` float32 or ``grad``'s dtype; the sum in float32, rounded to ``buf``'s dtype as the
    updates round a parameter (``rounding``, the hash of (seed, step, element index)); a
    ``first`` write never reads ``buf`` (it may hold anything). ``buf_sq`` (optional 1-element
    float32) is SET to ``sum(buf_new**2)`` of the stored values (summed in float64): the squared
    norm of the accumulated gradient. ``found_inf`` is set to 1 when a stored value is NaN/Inf
    (a non-finite gradient, or a sum beyond the buffer's range)."""
    if buf.numel() == 0:
        if buf_sq is not None:
            buf_sq.zero_()
        return
    g32 = grad.to(torch.float32)
    if loss_scale != 1.0:
        g32 = g32 / f32(loss_scale)
    new = g32 if first else buf.to(torch.float32) + g32
    out = round_to_dtype(new, buf.dtype, rounding, seed, step)
    buf.copy_(out)
    stored = out.to(torch.float64)
    if buf_sq is not None:
        buf_sq.copy_((stored * stored).sum().to(buf_sq.dtype).view_as(buf_sq))
    _mark_found_inf(found_inf, ~torch.isfinite(stored))



# ---------------------------------------------------------------------------------------------
# Multi-tensor forms: many small parameters in one call (one launch on GPU backends). Each
# tensor is updated exactly as the single-tensor op would (bitwise, within a backend); per-tensor
# scalars come as lists. AdaLomo's multi form takes unfactored (0-d / 1-d) parameters only.
# ---------------------------------------------------------------------------------------------


def lomo_multi_loop(single, params, grads, clip_coef, found_inf, lr, weight_decay, loss_scale,
                    clip_grad_value, rounding, seed, step, grad_sq=None, workspace=None):
    """The multi-tensor LOMO op as a loop of ``single`` (any backend's lomo_update_)."""
    for i, (p, g) in enumerate(zip(params, grads)):
        single(p, g, clip_coef, found_inf, lr[i], weight_decay[i], loss_scale, clip_grad_value[i],
               rounding, seed[i], step[i], grad_sq, workspace)


def adalomo_multi_loop(single, params, grads, exp_avg_sqs, clip_coef, found_inf, lr,
                       weight_decay, loss_scale, clip_grad_value, beta, eps1, eps2,
                       clip_threshold, rounding, seed, step, grad_sq=None, workspace=None):
    """The multi-tensor AdaLomo op as a loop of ``single`` (any backend's adalomo_update_)."""
    for i, (p, g, v) in enumerate(zip(params, grads, exp_avg_sqs)):
        single(p, g, None, None, v, clip_coef, found_inf, lr[i], weight_decay[i], loss_scale,
               clip_grad_value[i], beta[i], eps1[i], eps2[i], clip_threshold[i], rounding,
               seed[i], step[i], grad_sq, workspace)


def lomo_update_multi_(
    params, grads, clip_coef, found_inf, lr, weight_decay, loss_scale, clip_grad_value,
    rounding, seed, step, grad_sq=None, workspace=None,
):
    lomo_multi_loop(lomo_update_, params, grads, clip_coef, found_inf, lr, weight_decay,
                    loss_scale, clip_grad_value, rounding, seed, step, grad_sq, workspace)


def adalomo_update_multi_(
    params, grads, exp_avg_sqs, clip_coef, found_inf, lr, weight_decay, loss_scale,
    clip_grad_value, beta, eps1, eps2, clip_threshold, rounding, seed, step, grad_sq=None,
    workspace=None,
):
    adalomo_multi_loop(adalomo_update_, params, grads, exp_avg_sqs, clip_coef, found_inf, lr,
                       weight_decay, loss_scale, clip_grad_value, beta, eps1, eps2,
                       clip_threshold, rounding, seed, step, grad_sq, workspace)


def workspace_numel(op: str, shapes) -> int:
    """float32 workspace elements the reference needs (the staged AdaLomo header and new r)."""
    if op.startswith("adalomo"):
        return max([adalomo_workspace_numel(s) for s in shapes] + [WS_HEADER])
    return WS_HEADER
