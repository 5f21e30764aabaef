"""Fused LOMO update (SPEC.md "LOMO"): one pass over memory.

    g = preprocess(g)                         # / loss_scale, clamp, * clip_coef
    p = fma(-lr, g, p * (1 - lr * weight_decay))

Bytes moved: read p, read g, write p = 3 * sizeof(dtype) per element (6 B for bf16/fp16,
12 B for fp32), nothing else parameter-sized: the roofline is a copy of 2 tensors into 1.
"""

import contextlib

import torch
import triton
import triton.language as tl

from .rounding import check_tensors, f32, high_key, is_finite, key_arg, loss_scale_args
from .rounding import preprocess, round_to

# 4096 elements = 16 per thread with 8 warps: two 16-byte vector loads of each bf16 input per
# thread, enough bytes in flight per SM to saturate HBM on H100 without a loop.
BLOCK = 4096
NUM_WARPS = 8


@triton.jit
def _lomo_block(p_ptr, g_ptr, offs, mask, hkey, decay, neg_lr, scale, clip_value, clip_coef,
                LOSS_SCALE: tl.constexpr, CLIP_VALUE: tl.constexpr, HAS_CLIP_COEF: tl.constexpr,
                STOCHASTIC: tl.constexpr):
    """Update the elements ``offs`` (masked by ``mask``, or None for a full block); returns the
    number of non-finite gradients seen."""
    p = tl.load(p_ptr + offs, mask=mask)
    g = tl.load(g_ptr + offs, mask=mask).to(tl.float32)  # masked lanes read 0: finite
    finite = is_finite(g)  # of the raw gradient, before unscaling
    g = preprocess(g, scale, clip_value, clip_coef, LOSS_SCALE, CLIP_VALUE, HAS_CLIP_COEF)
    # reference: torch.add(p * decay, g, alpha=-lr), one fused multiply-add
    new = tl.fma(neg_lr, g, p.to(tl.float32) * decay)
    new = round_to(new, offs, hkey, p_ptr.dtype.element_ty, STOCHASTIC)
    # A select, not a data-dependent store mask, so the store stays a 16-byte vector store.
    tl.store(p_ptr + offs, tl.where(finite, new, p), mask=mask)
    return tl.sum((~finite).to(tl.int32), axis=0)


@triton.jit(do_not_specialize=["key"])
def _lomo_update_kernel(
    p_ptr, g_ptr, clip_coef_ptr, found_inf_ptr,
    numel, decay, neg_lr, scale, clip_value, key,
    BLOCK: tl.constexpr,
    # On/off features are compile-time so a disabled one costs nothing per element; they are fixed
    # for a training run (at most a handful of variants). Per-step values (lr, key, loss scale
    # value, clip_coef) are runtime arguments: a new lr or step never recompiles.
    LOSS_SCALE: tl.constexpr, CLIP_VALUE: tl.constexpr, HAS_CLIP_COEF: tl.constexpr,
    HAS_FOUND_INF: tl.constexpr, STOCHASTIC: tl.constexpr,
):
    start = tl.program_id(0).to(tl.int64) * BLOCK  # 64-bit: numel may exceed 2**31
    offs = start + tl.arange(0, BLOCK)
    # A power-of-two block never straddles a multiple of 2**32: one high key per block.
    hkey = high_key(start, key)
    clip_coef = 1.0
    if HAS_CLIP_COEF:
        clip_coef = tl.load(clip_coef_ptr).to(tl.float32)
    if start + BLOCK <= numel:  # full block: no mask, so loads/stores vectorise for any numel
        nbad = _lomo_block(p_ptr, g_ptr, offs, None, hkey, decay, neg_lr, scale, clip_value,
                           clip_coef, LOSS_SCALE, CLIP_VALUE, HAS_CLIP_COEF, STOCHASTIC)
    else:  # the tail block
        nbad = _lomo_block(p_ptr, g_ptr, offs, offs < numel, hkey, decay, neg_lr, scale,
                           clip_value, clip_coef, LOSS_SCALE, CLIP_VALUE, HAS_CLIP_COEF, STOCHASTIC)
    if HAS_FOUND_INF:
        # Every writer stores the same 1.0: deterministic without atomics.
        tl.store(found_inf_ptr, 1.0, mask=nbad > 0)


def lomo_update_(
    param, grad, clip_coef, found_inf, lr, weight_decay, loss_scale, clip_grad_value,
    rounding, seed, step, grad_sq=None, workspace=None,
):
    """Triton LOMO update of ``param`` in place; same signature and result as
    ``reference.lomo_update_`` (stochastic rounding bit for bit)."""
    if grad_sq is not None:
        raise NotImplementedError("lomo_update_: grad_sq is not implemented by the Triton backend yet")
    check_tensors("lomo_update_", param, grad, clip_coef=clip_coef, found_inf=found_inf)
    for name, t in (("clip_coef", clip_coef), ("found_inf", found_inf)):
        if t is not None and (t.numel() < 1 or not t.is_floating_point()):
            raise ValueError(f"lomo_update_: {name} must be a 1-element float tensor")
    if rounding not in ("nearest", "stochastic"):
        raise ValueError(
            f"lomo_update_: rounding must be 'nearest' or 'stochastic', got {rounding!r}")
    numel = param.numel()
    if numel == 0:
        return
    mode, scale = loss_scale_args(loss_scale)
    with torch.cuda.device(param.device) if param.is_cuda else contextlib.nullcontext():
        _lomo_update_kernel[(triton.cdiv(numel, BLOCK),)](
            param, grad,
            clip_coef if clip_coef is not None else param,  # placeholders: never dereferenced
            found_inf if found_inf is not None else param,
            numel, f32(1.0 - lr * weight_decay), f32(-lr), scale, f32(clip_grad_value),
            key_arg(seed, step),
            BLOCK=BLOCK,
            LOSS_SCALE=mode, CLIP_VALUE=clip_grad_value > 0, HAS_CLIP_COEF=clip_coef is not None,
            HAS_FOUND_INF=found_inf is not None,
            STOCHASTIC=rounding == "stochastic" and param.dtype != torch.float32,
            num_warps=NUM_WARPS,
        )
