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

import math
import struct

import torch

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

_M32 = 0xFFFFFFFF
# lowbias32 multipliers (C. Wellons, "Prospecting for hash functions", 2018).
_MUL1 = 0x7FEB352D
_MUL2 = 0x846CA68B


# ---------------------------------------------------------------------------------------------
# Stochastic rounding: the counter-based hash, written out once.
#
#   mix32(x)      = lowbias32: x ^= x >> 16; x *= 0x7feb352d; x ^= x >> 15; x *= 0x846ca68b;
#                   x ^= x >> 16                        (all arithmetic modulo 2**32)
#   key           = mix32((seed mod 2**32) ^ mix32(step mod 2**32))            (host, per call)
#   bits(i)       = mix32((i mod 2**32) ^ mix32((i >> 32) ^ key))      (i: flat element index)
#
# bf16:  r16 = bits >> 16; b = fp32 bit pattern of x; b = (b + r16) & 0xFFFF0000; the result is
#        that bit pattern (exactly representable in bf16). NaN stays NaN (rounded to nearest).
# fp16:  a = |x|; e = (bits(a) >> 23) - 127; k = max(e - 10, -24)  (the fp16 grid spacing 2**k);
#        q = a * 2**-k (exact); f = floor(q); up = (bits >> 8) * 2**-24 < q - f (both exact);
#        y = min((f + up) * 2**k, 65504) with the sign of x. |x| >= 65520 and NaN round to
#        nearest (Inf), as `tensor.to` does: stochastic rounding never turns a value that rounds
#        to a finite fp16 into Inf.
# Both give E[y] = x (unbiased) and every backend computes them bit for bit the same.
# ---------------------------------------------------------------------------------------------


def mix32(x: int) -> int:
    """lowbias32 on a Python int (host side)."""
    x &= _M32
    x ^= x >> 16
    x = (x * _MUL1) & _M32
    x ^= x >> 15
    x = (x * _MUL2) & _M32
    x ^= x >> 16
    return x


def rounding_key(seed: int, step: int) -> int:
    """Per-call key of the stochastic-rounding hash (host side, identical in every backend)."""
    return mix32((seed & _M32) ^ mix32(step & _M32))


def _mul32(x: torch.Tensor, c: int) -> torch.Tensor:
    # (x * c) mod 2**32 for int64 tensors holding values < 2**32, without int64 overflow:
    # split c into 16-bit halves so every partial product stays below 2**48.
    lo = x * (c & 0xFFFF)
    hi = ((x * (c >> 16)) & 0xFFFF) << 16
    return (lo + hi) & _M32


def _mix32_t(x: torch.Tensor) -> torch.Tensor:
    x = x ^ (x >> 16)
    x = _mul32(x, _MUL1)
    x = x ^ (x >> 15)
    x = _mul32(x, _MUL2)
    return x ^ (x >> 16)


def random_bits(numel: int, seed: int, step: int, device=None) -> torch.Tensor:
    """The 32 random bits of every element index ``0 .. numel-1``, as int64 in [0, 2**32)."""
    key = rounding_key(seed, step)
    i = torch.arange(numel, dtype=torch.int64, device=device)
    hi = _mix32_t((i >> 32) ^ key)
    return _mix32_t((i & _M32) ^ hi)


# A NaN stored in fp16 / bf16 is this quiet NaN (positive, no payload: what
# torch.tensor(float("nan"), dtype=...) holds) on every backend and device. x.to(dtype) does not
# promise it: on CPU it keeps the payload (fp16) or gives 0xFFFF (bf16), on a GPU 0x7FFF.
CANONICAL_NAN = {torch.float16: 0x7E00, torch.bfloat16: 0x7FC0}


def _nearest(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """fp32 ``x`` rounded to nearest even in ``dtype`` (tensor.to), NaN -> CANONICAL_NAN."""
    y = x.to(dtype)
    if dtype not in CANONICAL_NAN:
        return y
    nan = torch.tensor(CANONICAL_NAN[dtype], dtype=torch.int32).to(torch.int16).view(dtype)
    return torch.where(torch.isnan(x), nan.to(x.device), y)


def _sr_bf16(x: torch.Tensor, bits: torch.Tensor) -> torch.Tensor:
    b = x.contiguous().view(torch.int32).to(torch.int64) & _M32
    b = (b + (bits >> 16)) & 0xFFFF0000
    b = torch.where(b >= 2**31, b - 2**32, b).to(torch.int32)
    y = b.view(torch.float32).to(torch.bfloat16)  # exact: the low 16 bits are zero
    return torch.where(torch.isnan(x), _nearest(x, torch.bfloat16), y)


def _pow2(k: torch.Tensor) -> torch.Tensor:
    # 2**k as float32 built from its bit pattern (exact for -126 <= k <= 127).
    return ((k + 127) << 23).to(torch.int32).view(torch.float32)


def _sr_fp16(x: torch.Tensor, bits: torch.Tensor) -> torch.Tensor:
    a = x.abs()
    e = ((a.contiguous().view(torch.int32) >> 23) & 0xFF).to(torch.int64) - 127
    k = torch.clamp(e - 10, min=-24, max=100)
    q = a * _pow2(-k)
    f = torch.floor(q)
    r = (bits >> 8).to(torch.float32) * 2.0**-24
    y = (f + (r < q - f).to(torch.float32)) * _pow2(k)
    y = torch.clamp(y, max=65504.0).copysign(x)
    nearest = _nearest(x, torch.float16)
    return torch.where(torch.isnan(x) | (a >= 65520.0), nearest, y.to(torch.float16))


def round_to_dtype(x: torch.Tensor, dtype: torch.dtype, rounding: str, seed: int, step: int):
    """Round the fp32 tensor ``x`` to ``dtype`` (nearest-even, or stochastic: see above); a NaN
    becomes CANONICAL_NAN in fp16 / bf16."""
    if rounding not in ("nearest", "stochastic"):
        raise ValueError(f"rounding must be 'nearest' or 'stochastic', got {rounding!r}")
    if rounding == "nearest" or dtype == torch.float32:
        return _nearest(x, dtype)
    bits = random_bits(x.numel(), seed, step, x.device).view(x.shape)
    if dtype == torch.bfloat16:
        return _sr_bf16(x, bits)
    if dtype == torch.float16:
        return _sr_fp16(x, bits)
    raise TypeError(f"stochastic rounding needs a float16 or bfloat16 target, got {dtype}")


# ---------------------------------------------------------------------------------------------
# Shared preprocessing (docs/spec.md "Gradient preprocessing"), in lomo-optim's order.
# ---------------------------------------------------------------------------------------------


def f32(v: float) -> float:
    """Round a host float64 scalar to the nearest float32 (the value a kernel receives).
    Every backend's launcher rounds its scalars with this one function."""
    try:
        return struct.unpack("f", struct.pack("f", v))[0]
    except OverflowError:  # beyond the float32 range: rounds to infinity
        return math.copysign(math.inf, v)


def _preprocess(g, loss_scale, clip_grad_value, clip_coef):
    g32 = g.to(torch.float32)
    if loss_scale != 1.0:
        g32 = g32 / f32(loss_scale)
    if clip_grad_value > 0:
        g32 = g32.clamp(-f32(clip_grad_value), f32(clip_grad_value))
    if clip_coef is not None:
        g32 = g32 * clip_coef.to(torch.float32)
    return g32


def _add_grad_sq(grad_sq, grad, loss_scale):
    """grad_sq += sum(g_unscaled ** 2): after dividing by the loss scale, before value clipping and
    clip_coef (what grad_norm() measures). Summed in float64, added in float32."""
    if grad_sq is not None:
        g32 = grad.to(torch.float32)
        if loss_scale != 1.0:
            g32 = g32 / f32(loss_scale)
        grad_sq.add_(torch.sum(g32.double() * g32.double()).to(grad_sq.dtype).view_as(grad_sq))


def _mark_found_inf(found_inf, bad: torch.Tensor):
    if found_inf is not None:
        found_inf.copy_(torch.maximum(found_inf, bad.any().to(found_inf.dtype)).view_as(found_inf))


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
# AdaLomo
# ---------------------------------------------------------------------------------------------


# The sums that decide an AdaLomo update (rms(p), rms(u), the row and column means of G, the mean
# of r) accumulate in float64: torch's float32 reductions on CPU are about 1e-3 off over tens of
# millions of elements (torch.linalg.vector_norm on a 49152 x 576 tensor: 1.6e-3), which would
# scale a whole update by that much. lomo-optim sums in float32 (docs/spec.md says where this
# differs). Each sum is rounded to float32 where a kernel stores it (the workspace header), and
# what is computed from it follows the kernels' order, so that the staged form (stages 1-3) and
# the one-call form give the same bits.


def _sum64(x: torch.Tensor, dim=None, keepdim: bool = False) -> torch.Tensor:
    """sum(x) over ``dim`` (all: None) in float64, rounded to float32 (a header slot)."""
    x64 = x.double()
    s = x64.sum() if dim is None else x64.sum(dim=dim, keepdim=keepdim)
    return s.float()


def _rms_of(sum_sq: torch.Tensor, numel: int) -> torch.Tensor:
    """sqrt(sum_sq / numel) in float64 from the float32 sum, rounded once to float32."""
    return torch.sqrt(sum_sq.double() / numel).float()


def _rms(x: torch.Tensor) -> torch.Tensor:
    """rms(x) = ||x||_2 / sqrt(numel(x)), the sum of squares accumulated in float64."""
    x64 = x.double()
    return _rms_of((x64 * x64).sum().float(), x.numel())


def _mean_rows(sq: torch.Tensor) -> torch.Tensor:
    """mean(G, dim=-1) in float64, rounded once to float32 (a kernel divides its float64 row sum)."""
    return (sq.double().sum(dim=-1) / sq.shape[-1]).float()


# ---------------------------------------------------------------------------------------------
# The AdaLomo workspace: the public header every backend shares (docs/spec.md, "Workspace").
#
# A float32 1-D tensor owned by the caller, zero-filled when created and sized by
# ``lomo_kernels.ops.workspace_numel``. Between calls it holds zeros or stale values; a backend's
# private region (after the header) must be left so that the next call works (ticket counters
# back to zero). The header is what a sharded caller all-reduces (sum) between the stages:
#
#   [WS_SUM_PP]            sum(p*p) over the local elements                   (after stage 1)
#   [WS_BAD]               > 0 when a local gradient element is NaN/Inf        (after stage 1)
#   [WS_SUM_UU]            sum(u*u) over the local elements                   (after stage 2)
#   [WS_HEADER, +S)        factored: sum of the new r over each slice's local rows (stage 1)
#   [WS_HEADER + S, +S*n)  factored: column sums of G = g*g + eps1 over local rows  (stage 1)
# (S = slices, n = columns.) The reference keeps the new r after that ([.., +S*m)).
# ---------------------------------------------------------------------------------------------
WS_SUM_PP, WS_BAD, WS_SUM_UU = 0, 1, 2
WS_HEADER = 4


def _geometry(shape):
    """(slices, m, n) of a factored parameter (dim >= 2), else None."""
    if len(shape) < 2:
        return None
    m, n = shape[-2], shape[-1]
    return (math.prod(shape[:-2]), m, n)


def adalomo_workspace_regions(shape):
    """[(start, stop), ...] of the header to all-reduce after stage 1, and after stage 2.

    Sharded on dim 0, a 2-D parameter splits its rows: the column sums and the sum of r span
    shards. A parameter of 3 or more dims splits whole slices, so only the scalars do."""
    after1 = [(WS_SUM_PP, WS_BAD + 1)]
    if len(shape) == 2:
        after1.append((WS_HEADER, WS_HEADER + 1 + shape[-1]))
    return after1, [(WS_SUM_UU, WS_SUM_UU + 1)]


def adalomo_workspace_numel(shape) -> int:
    """float32 elements of the reference's workspace for one parameter of ``shape``."""
    geo = _geometry(tuple(shape))
    if geo is None:
        return WS_HEADER
    s, m, n = geo
    return WS_HEADER + s + s * n + s * m


def adalomo_update_(
    param, grad, exp_avg_sq_row, exp_avg_sq_col, exp_avg_sq, clip_coef, found_inf,
    lr, weight_decay, loss_scale, clip_grad_value, beta, eps1, eps2, clip_threshold,
    rounding, seed, step, grad_sq=None, workspace=None, stage=0, global_rows=0, global_numel=0,
):
    """One AdaLomo update of ``param`` in place (docs/spec.md), with its second-moment state.

    Factored (``param.dim() >= 2``): ``exp_avg_sq_row`` (shape ``param.shape[:-1]``) and
    ``exp_avg_sq_col`` (shape ``param.shape[:-2] + param.shape[-1:]``), ``exp_avg_sq`` None.
    Unfactored (``param.dim() <= 1``): ``exp_avg_sq`` (shape of ``param``), the others None.
    All state is float32. ``beta`` is the host-computed ``1 - t ** decay``.

    ``stage`` 0 runs the three passes in one call. ``stage`` 1, 2, 3 run one pass each, for a
    parameter sharded across ranks: the caller all-reduces the workspace header
    (``adalomo_workspace_regions``) after stages 1 and 2, and ``global_rows`` / ``global_numel``
    give the unsharded sizes that means and RMS divide by (0: the local sizes). The state and
    ``param`` are written in stage 3 only, and not at all when the (reduced) header says a
    gradient was non-finite.
    """
    if stage == 0:
        if param.numel() == 0:
            return
        _add_grad_sq(grad_sq, grad, loss_scale)
        _adalomo_one_call(param, grad, exp_avg_sq_row, exp_avg_sq_col, exp_avg_sq, clip_coef,
                          found_inf, lr, weight_decay, loss_scale, clip_grad_value, beta, eps1,
                          eps2, clip_threshold, rounding, seed, step)
        return
    if workspace is None:
        raise ValueError("adalomo_update_: stages 1-3 need a workspace")
    (_adalomo_stage1, _adalomo_stage2, _adalomo_stage3)[stage - 1](
        param, grad, exp_avg_sq_row, exp_avg_sq_col, exp_avg_sq, clip_coef, found_inf, grad_sq,
        workspace, lr, weight_decay, loss_scale, clip_grad_value, beta, eps1, eps2,
        clip_threshold, rounding, seed, step,
        global_rows or (param.shape[-2] if param.dim() >= 2 else 0),
        global_numel or param.numel())


def _adalomo_one_call(param, grad, exp_avg_sq_row, exp_avg_sq_col, exp_avg_sq, clip_coef,
                      found_inf, lr, weight_decay, loss_scale, clip_grad_value, beta, eps1, eps2,
                      clip_threshold, rounding, seed, step):
    """The three passes in lomo-optim's order, the sums in float64 (the oracle of stage 0)."""
    g32 = _preprocess(grad, loss_scale, clip_grad_value, clip_coef)
    bad = ~torch.isfinite(grad)
    ok = ~bad.any()
    sq = g32 * g32 + f32(eps1)
    b, omb = f32(beta), f32(1.0 - beta)
    if exp_avg_sq_row is not None:
        m = sq.shape[-2]
        row = torch.add(exp_avg_sq_row * b, _mean_rows(sq), alpha=omb)
        col = torch.add(exp_avg_sq_col * b, _sum64(sq, dim=-2) / m, alpha=omb)
        r_factor = (row / (_sum64(row, dim=-1, keepdim=True) / m)).rsqrt().unsqueeze(-1)
        c_factor = col.unsqueeze(-2).rsqrt()
        u = (r_factor * c_factor) * g32
        exp_avg_sq_row.copy_(torch.where(ok, row, exp_avg_sq_row))
        exp_avg_sq_col.copy_(torch.where(ok, col, exp_avg_sq_col))
    else:
        v = torch.add(exp_avg_sq * b, sq, alpha=omb)
        u = v.rsqrt() * g32
        exp_avg_sq.copy_(torch.where(ok, v, exp_avg_sq))
    u = u / (_rms(u) / f32(clip_threshold)).clamp(min=1.0)
    p32 = param.to(torch.float32)
    lr_t = f32(lr) * _rms(p32).clamp(min=f32(eps2))  # rms(p) before the update, on device
    new = p32
    if weight_decay != 0.0:
        new = new * (1.0 - lr_t * f32(weight_decay))
    new = new - lr_t * u
    out = round_to_dtype(new, param.dtype, rounding, seed, step)
    param.copy_(torch.where(ok, out, param))
    _mark_found_inf(found_inf, bad)


# The staged form (sharded parameters). Sums are float64 here and stored as float32 in the
# header; every division uses the global sizes. A parameter whose local shard is empty still
# takes part (its sums are zero).


def _ws_views(ws, param):
    geo = _geometry(tuple(param.shape))
    if geo is None:
        return None, None, None
    s, m, n = geo
    h = WS_HEADER
    return (ws[h: h + s], ws[h + s: h + s + s * n].view(s, n),
            ws[h + s + s * n: h + s + s * n + s * m].view(s, m))


def _adalomo_stage1(param, grad, row, col, v, clip_coef, found_inf, grad_sq, ws, lr,
                    weight_decay, loss_scale, clip_grad_value, beta, eps1, eps2, clip_threshold,
                    rounding, seed, step, global_rows, global_numel):
    ws[:WS_SUM_UU + 1].zero_()
    geo = _geometry(tuple(param.shape))
    sum_r, colsum, new_r = _ws_views(ws, param)
    if geo is not None:
        sum_r.zero_()
        colsum.zero_()
    if param.numel() == 0:
        return
    _add_grad_sq(grad_sq, grad, loss_scale)
    p64 = param.double()
    ws[WS_SUM_PP] = _sum64(p64 * p64)
    ws[WS_BAD] = (~torch.isfinite(grad)).any().float()
    if geo is None:
        return
    s, m, n = geo
    g32 = _preprocess(grad, loss_scale, clip_grad_value, clip_coef).reshape(s, m, n)
    sq = g32 * g32 + f32(eps1)
    r = torch.add(row.reshape(s, m) * f32(beta), _mean_rows(sq), alpha=f32(1.0 - beta))
    new_r.copy_(r)
    sum_r.copy_(_sum64(r, dim=-1))
    colsum.copy_(_sum64(sq, dim=-2))


def _staged_u(param, grad, row, col, v, clip_coef, ws, loss_scale, clip_grad_value, beta, eps1,
              global_rows):
    """(u, new c or new v) from the reduced header (stages 2 and 3)."""
    g32 = _preprocess(grad, loss_scale, clip_grad_value, clip_coef)
    b, omb = f32(beta), f32(1.0 - beta)
    geo = _geometry(tuple(param.shape))
    if geo is None:
        vn = torch.add(v * b, g32 * g32 + f32(eps1), alpha=omb)
        return vn.rsqrt() * g32, vn
    s, m, n = geo
    sum_r, colsum, new_r = _ws_views(ws, param)
    c = torch.add(col.reshape(s, n) * b, colsum / global_rows, alpha=omb)
    mean_r = (sum_r / global_rows).unsqueeze(-1)
    u = ((new_r / mean_r).rsqrt().unsqueeze(-1) * c.rsqrt().unsqueeze(-2)) * g32.reshape(s, m, n)
    return u.reshape(param.shape), c


def _adalomo_stage2(param, grad, row, col, v, clip_coef, found_inf, grad_sq, ws, lr,
                    weight_decay, loss_scale, clip_grad_value, beta, eps1, eps2, clip_threshold,
                    rounding, seed, step, global_rows, global_numel):
    ws[WS_SUM_UU] = 0.0
    if ws[WS_BAD] > 0:
        return
    u, _ = _staged_u(param, grad, row, col, v, clip_coef, ws, loss_scale, clip_grad_value, beta,
                     eps1, global_rows)
    u64 = u.double()
    ws[WS_SUM_UU] = _sum64(u64 * u64)


def _adalomo_stage3(param, grad, row, col, v, clip_coef, found_inf, grad_sq, ws, lr,
                    weight_decay, loss_scale, clip_grad_value, beta, eps1, eps2, clip_threshold,
                    rounding, seed, step, global_rows, global_numel):
    if ws[WS_BAD] > 0:
        _mark_found_inf(found_inf, torch.ones((), dtype=torch.bool))
        return
    # an empty shard still commits its copy of the (replicated) column state
    u, state = _staged_u(param, grad, row, col, v, clip_coef, ws, loss_scale, clip_grad_value,
                         beta, eps1, global_rows)
    rms_u = _rms_of(ws[WS_SUM_UU], global_numel)
    rms_p = _rms_of(ws[WS_SUM_PP], global_numel)
    u = u / (rms_u / f32(clip_threshold)).clamp(min=1.0)
    p32 = param.to(torch.float32)
    lr_t = f32(lr) * rms_p.clamp(min=f32(eps2))
    new = p32
    if weight_decay != 0.0:
        new = new * (1.0 - lr_t * f32(weight_decay))
    new = new - lr_t * u
    param.copy_(round_to_dtype(new, param.dtype, rounding, seed, step))
    if v is not None:
        v.copy_(state)
    else:
        _, _, new_r = _ws_views(ws, param)
        row.copy_(new_r.view_as(row))
        col.copy_(state.view_as(col))


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


# ---------------------------------------------------------------------------------------------
# GoLore / GaLore: the inner optimizer on the projected gradient R (docs/spec.md "GoLore")
# ---------------------------------------------------------------------------------------------


def golore_scalars(inner, lr, weight_decay, scale, beta1, beta2, eps, momentum, step):
    """The float32 scalars of one ``golore_update_`` call, computed once on the host in float64
    and rounded to float32 (every backend receives exactly these values):

    ``b1, omb1 = 1 - b1, b2, omb2 = 1 - b2, bc1 = 1 - b1**step, bc2 = 1 - b2**step, eps,
    momentum, decay = 1 - lr * weight_decay, neg_lr_scale = -lr * scale``."""
    bc1 = 1.0 - beta1**step if inner == "adamw" else 1.0
    bc2 = 1.0 - beta2**step if inner == "adamw" else 1.0
    return {
        "b1": f32(beta1), "omb1": f32(1.0 - beta1), "b2": f32(beta2), "omb2": f32(1.0 - beta2),
        "bc1": f32(bc1), "bc2": f32(bc2), "eps": f32(eps), "momentum": f32(momentum),
        "decay": f32(1.0 - lr * weight_decay), "neg_lr_scale": f32(-lr * scale),
    }


def golore_update_(
    r, param, exp_avg, exp_avg_sq, momentum_buffer, clip_coef, found_inf, inner, lr,
    weight_decay, scale, beta1, beta2, eps, momentum, rounding, seed, step,
):
    """The inner optimizer of GoLore / GaLore on ``r``, element-wise, fp32 state.

    ``g = r * clip_coef`` (clip_coef optional), then, in float32 and in this order:

        adamw:  m = fma(g, 1 - b1, m * b1);  v = fma(g * g, 1 - b2, v * b2)
                N = (m / (1 - b1**step)) / (sqrt(v / (1 - b2**step)) + eps)
        sgd:    buf = buf * momentum + g;  N = buf       (no buffer when momentum == 0: N = g)

    Two modes:
      * ``param`` None ("projected"): ``r`` is the projected gradient R (float32) and is
        overwritten with N; the caller back-projects N into the weight.
      * ``param`` given ("full rank"): ``r`` is the gradient (``param``'s dtype and shape, only
        read) and ``param = round(fma(N, -lr * scale, param * (1 - lr * weight_decay)))``, with
        ``rounding`` as for the other updates (the hash of (seed, step, element index)).

    A NaN/Inf anywhere in ``r`` leaves ``param`` and the whole state untouched, sets ``found_inf``
    and (projected mode) fills ``r`` with NaN, so that anything computed from N is not finite and
    is never applied. ``step`` (>= 1) is this parameter's update count, for Adam's bias correction.
    """
    if r.numel() == 0:
        return
    s = golore_scalars(inner, lr, weight_decay, scale, beta1, beta2, eps, momentum, step)
    g = r.to(torch.float32)
    ok = torch.isfinite(g).all()  # of the raw r, before clip_coef
    if clip_coef is not None:
        g = g * clip_coef.to(torch.float32)
    if inner == "adamw":
        m = torch.add(exp_avg * s["b1"], g, alpha=s["omb1"])  # one fma per element
        v = torch.add(exp_avg_sq * s["b2"], g * g, alpha=s["omb2"])
        # sqrt in float64 rounded once to float32 is the correctly rounded float32 sqrt (as the
        # kernels' IEEE sqrt); torch's vectorised CPU sqrt is off by an ulp now and then.
        n = (m / s["bc1"]) / ((v / s["bc2"]).double().sqrt().float() + s["eps"])
        exp_avg.copy_(torch.where(ok, m, exp_avg))
        exp_avg_sq.copy_(torch.where(ok, v, exp_avg_sq))
    elif inner == "sgd":
        n = g
        if momentum_buffer is not None:
            n = momentum_buffer * s["momentum"] + g
            momentum_buffer.copy_(torch.where(ok, n, momentum_buffer))
    else:
        raise ValueError(f"golore_update_: inner must be 'adamw' or 'sgd', got {inner!r}")
    if param is None:
        r.copy_(torch.where(ok, n, torch.full_like(n, math.nan)))
    else:
        new = torch.add(param.to(torch.float32) * s["decay"], n, alpha=s["neg_lr_scale"])
        out = round_to_dtype(new, param.dtype, rounding, seed, step)
        param.copy_(torch.where(ok, out, param))
    _mark_found_inf(found_inf, ~ok)
