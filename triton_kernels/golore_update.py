"""GoLore / GaLore inner optimizer (reference.golore_update_), element-wise over ``r``, in two
kernels:

  _golore_check_kernel    read r: any NaN/Inf -> a device flag (every writer stores 1)
  _golore_update_kernel   read the flag; if clean, new fp32 state and N, then
                          projected mode: r = N; full-rank mode: p = round(p*decay - lr*scale*N)
                          else: projected mode fills r with NaN, found_inf = 1

Bytes per element (adamw, projected): read r twice, read and write m and v, write r:
(2 + 4 + 1) * 4 = 28 B. ``r`` is small (r x n or m x r), the GEMMs around this kernel dominate.
Per-step values (lr, step's bias corrections, the rounding key) are runtime arguments; only the
inner optimizer, the mode and the on/off features are compile-time. Compiled without fp
contraction so every op rounds as reference.py; its fused ``torch.add(a, b, alpha)`` is tl.fma.
"""

import contextlib

import torch
import triton
import triton.language as tl

from ..reference import golore_scalars
from .rounding import high_key, is_finite, key_arg, round_to

BLOCK = 4096
NUM_WARPS = 8
_INNER = {"adamw": 0, "sgd": 1}


@triton.jit
def _golore_check_kernel(r_ptr, flag_ptr, numel, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    x = tl.load(r_ptr + offs, mask=offs < numel, other=0.0).to(tl.float32)
    nbad = tl.sum((~is_finite(x)).to(tl.int32), axis=0)
    tl.store(flag_ptr, 1, mask=nbad > 0)  # every writer stores the same 1: no atomics


@triton.jit(do_not_specialize=["key"])
def _golore_update_kernel(
    r_ptr, p_ptr, m_ptr, v_ptr, buf_ptr, clip_coef_ptr, flag_ptr, found_inf_ptr,
    numel, b1, omb1, b2, omb2, bc1, bc2, eps, momentum, decay, neg_lr_scale, key,
    BLOCK: tl.constexpr, ADAM: tl.constexpr, MOMENTUM: tl.constexpr, FULL: tl.constexpr,
    HAS_CLIP_COEF: tl.constexpr, HAS_FOUND_INF: tl.constexpr, STOCHASTIC: tl.constexpr,
):
    pid = tl.program_id(0)
    start = pid.to(tl.int64) * BLOCK  # 64-bit: numel may exceed 2**31
    offs = start + tl.arange(0, BLOCK)
    mask = offs < numel
    if tl.load(flag_ptr) == 0:
        g = tl.load(r_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        if HAS_CLIP_COEF:
            g = g * tl.load(clip_coef_ptr).to(tl.float32)
        if ADAM:
            m = tl.fma(g, omb1, tl.load(m_ptr + offs, mask=mask, other=0.0) * b1)
            v = tl.fma(g * g, omb2, tl.load(v_ptr + offs, mask=mask, other=0.0) * b2)
            n = tl.math.div_rn(tl.math.div_rn(m, bc1),
                               tl.math.sqrt_rn(tl.math.div_rn(v, bc2)) + eps)
            tl.store(m_ptr + offs, m, mask=mask)
            tl.store(v_ptr + offs, v, mask=mask)
        elif MOMENTUM:
            n = tl.load(buf_ptr + offs, mask=mask, other=0.0) * momentum + g
            tl.store(buf_ptr + offs, n, mask=mask)
        else:
            n = g
        if FULL:
            p = tl.load(p_ptr + offs, mask=mask, other=0.0).to(tl.float32)
            new = tl.fma(n, neg_lr_scale, p * decay)
            # A power-of-two block never straddles a multiple of 2**32: one high key per block.
            new = round_to(new, offs, high_key(start, key), p_ptr.dtype.element_ty, STOCHASTIC)
            tl.store(p_ptr + offs, new, mask=mask)
        else:
            tl.store(r_ptr + offs, n, mask=mask)
    else:
        if not FULL:
            tl.store(r_ptr + offs, tl.full([BLOCK], float("nan"), tl.float32), mask=mask)
        if HAS_FOUND_INF:
            tl.store(found_inf_ptr, 1.0, mask=pid == 0)


def golore_update_(
    r, param, exp_avg, exp_avg_sq, momentum_buffer, clip_coef, found_inf, inner, lr,
    weight_decay, scale, beta1, beta2, eps, momentum, rounding, seed, step,
):
    """Triton GoLore inner update; same signature and result as ``reference.golore_update_``."""
    op = "golore_update_"
    if inner not in _INNER:
        raise ValueError(f"{op}: inner must be 'adamw' or 'sgd', got {inner!r}")
    if rounding not in ("nearest", "stochastic"):
        raise ValueError(f"{op}: rounding must be 'nearest' or 'stochastic', got {rounding!r}")
    full = param is not None
    if full and (r.dtype not in (param.dtype, torch.float32) or r.numel() != param.numel()):
        raise ValueError(f"{op}: r (the gradient) must match param's dtype (or be float32) and "
                         "size")
    if not full and r.dtype != torch.float32:
        raise ValueError(f"{op}: r (the projected gradient) must be float32, got {r.dtype}")
    adam, mom = inner == "adamw", inner == "sgd" and momentum != 0.0
    needs = {"exp_avg": adam, "exp_avg_sq": adam, "momentum_buffer": mom}
    state = {"exp_avg": exp_avg, "exp_avg_sq": exp_avg_sq, "momentum_buffer": momentum_buffer}
    for name, t in (*state.items(), ("param", param), ("r", r), ("clip_coef", clip_coef),
                    ("found_inf", found_inf)):
        if t is None:
            if needs.get(name):
                raise ValueError(f"{op}: {name} is required for inner={inner!r}")
            continue
        if not t.is_contiguous() or t.device != r.device:
            raise ValueError(f"{op}: {name} must be contiguous and on {r.device}")
        if name in needs and (t.dtype != torch.float32 or t.numel() != r.numel()):
            raise ValueError(f"{op}: {name} must be float32 with {r.numel()} elements")
    numel = r.numel()
    if numel == 0:
        return
    s = golore_scalars(inner, lr, weight_decay, scale, beta1, beta2, eps, momentum, step)
    placeholder = r  # never dereferenced when the matching flag is off
    grid = (triton.cdiv(numel, BLOCK),)
    with torch.cuda.device(r.device) if r.is_cuda else contextlib.nullcontext():
        flag = torch.zeros(1, dtype=torch.int32, device=r.device)
        _golore_check_kernel[grid](r, flag, numel, BLOCK=BLOCK, num_warps=NUM_WARPS)
        _golore_update_kernel[grid](
            r, param if full else placeholder,
            exp_avg if adam else placeholder, exp_avg_sq if adam else placeholder,
            momentum_buffer if mom else placeholder,
            clip_coef if clip_coef is not None else placeholder, flag,
            found_inf if found_inf is not None else placeholder,
            numel, s["b1"], s["omb1"], s["b2"], s["omb2"], s["bc1"], s["bc2"], s["eps"],
            s["momentum"], s["decay"], s["neg_lr_scale"], key_arg(seed, step),
            BLOCK=BLOCK, ADAM=adam, MOMENTUM=mom, FULL=full,
            HAS_CLIP_COEF=clip_coef is not None, HAS_FOUND_INF=found_inf is not None,
            STOCHASTIC=full and rounding == "stochastic" and param.dtype != torch.float32,
            num_warps=NUM_WARPS, enable_fp_fusion=False,
        )
