"""AdaLomo update (SPEC.md "AdaLomo", "The fewest passes") in three passes over memory.

Factored (p of shape (..., m, n), viewed as B batches of m x n; state r (B, m), c (B, n)):
  pass 1  _stats_factored_kernel   read g, p: per tile, row and column sums of G = g*g + eps1,
                                   sum(p*p), a non-finite flag                  (4 B/elt bf16)
          _factors_kernel          tiny: r' = beta*r + (1-beta)*mean_n(G), c' likewise, and partial
                                   sums of r' for mean(r') (from the per-tile partials)
  pass 2  _unorm_factored_kernel   read g: per tile sum of (g * r'^-1/2 * c'^-1/2)^2  (2 B/elt bf16)
          _scalars_kernel          tiny, one program: mean(r') per batch, rms(u) (sum(u^2) =
                                   sum_b mean(r'_b) * pass-2 sum_b, since u = g*(r'/mean r')^-1/2 *
                                   c'^-1/2), rms(p), lr_t, 1 - lr_t*wd, the ok flag, found_inf
  pass 3  _apply_factored_kernel   read g, p, write p (and r, c when ok)         (6 B/elt bf16)
  => 12 B per element for bf16/fp16 (24 for fp32), plus ~0.25 B/elt of fp32 partials.
Unfactored (0-d and 1-d p, state v): pass 1 reads g, p, v and already knows u = g * v'^-1/2, so
the update norm needs no second pass: stats, scalars, apply (2 passes over memory).

Every scalar between passes lives in a device scratch buffer: no host synchronisation. Sums are
deterministic: each program writes its partial sum, and the next kernel adds the partials in a fixed
order (no atomics). When the gradient holds a NaN/Inf, the apply pass reads ok = 0 and writes
neither p nor the state. Kernels are compiled without fp contraction (enable_fp_fusion=False) so
that every op rounds as in reference.py (``g*g + eps1`` and ``p*decay - lr_t*u`` are not fused);
the reference's own fused ``torch.add(a, b, alpha)`` is an explicit tl.fma.
"""

import contextlib
import math

import torch
import triton
import triton.language as tl

from .rounding import check_tensors, f32, high_key, is_finite, key_arg, loss_scale_args
from .rounding import preprocess, round_to

TILE = 4096  # elements per program of the three passes (16 per thread with 8 warps)
NUM_WARPS = 8
SMALL_WARPS = 4  # the tiny kernels on the factors and scalars
# Block sizes of the tiny kernels: values per program and loop step (the tests shrink them, and
# TILE, to run every reduction loop several times on small shapes).
REDUCE = 4096  # [TB, LB] block of _factors_kernel
MAX_PARTS = 256  # most tile partials summed per loop step (TB, RCB, TPB)
SCALAR_BLOCK = 1024  # per-tile partials per loop step of _scalars_kernel


@triton.jit
def _rsqrt(x):
    # IEEE 1/sqrt(x): closer to torch's CPU rsqrt than the approximate rsqrt.approx.f32
    return tl.math.div_rn(1.0, tl.math.sqrt_rn(x))


@triton.jit
def _tile(m, n, tm, tn, BM: tl.constexpr, BN: tl.constexpr):
    """Program id -> (batch b, tile row pid_m, tile col pid_n) in batch-major order, so the tiles
    of one batch are contiguous; int64 row/col indices and flat offsets."""
    pid = tl.program_id(0)
    per_batch = tm * tn
    b = pid // per_batch
    pid_m = (pid - b * per_batch) // tn
    pid_n = pid - b * per_batch - pid_m * tn
    b = b.to(tl.int64)
    rows = pid_m.to(tl.int64) * BM + tl.arange(0, BM)
    cols = pid_n.to(tl.int64) * BN + tl.arange(0, BN)
    offs = (b * m + rows[:, None]) * n + cols[None, :]
    mask = (rows < m)[:, None] & (cols < n)[None, :]
    return pid, b, pid_m, pid_n, rows, cols, offs, mask


@triton.jit
def _clip_coef(clip_coef_ptr, HAS_CLIP_COEF: tl.constexpr):
    if HAS_CLIP_COEF:
        return tl.load(clip_coef_ptr).to(tl.float32)
    else:
        return 1.0


# ---------------------------------------------------------------------------------------------
# Factored (>= 2-D) parameters
# ---------------------------------------------------------------------------------------------


@triton.jit
def _stats_factored_kernel(
    g_ptr, p_ptr, clip_coef_ptr, row_part_ptr, col_part_ptr, pp_part_ptr, bad_part_ptr,
    m, n, tm, tn, scale, clip_value, eps1,
    BM: tl.constexpr, BN: tl.constexpr,
    LOSS_SCALE: tl.constexpr, CLIP_VALUE: tl.constexpr, HAS_CLIP_COEF: tl.constexpr,
):
    pid, b, pid_m, pid_n, rows, cols, offs, mask = _tile(m, n, tm, tn, BM, BN)
    g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    p = tl.load(p_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    bad = tl.max((~is_finite(g)).to(tl.float32))  # of the raw gradient
    g = preprocess(g, scale, clip_value, _clip_coef(clip_coef_ptr, HAS_CLIP_COEF),
                   LOSS_SCALE, CLIP_VALUE, HAS_CLIP_COEF)
    sq = tl.where(mask, g * g + eps1, 0.0)
    # row_part[b, pid_n, i] and col_part[b, pid_m, j]: reduced over the tiles by _factors_kernel
    tl.store(row_part_ptr + (b * tn + pid_n) * m + rows, tl.sum(sq, axis=1), mask=rows < m)
    tl.store(col_part_ptr + (b * tm + pid_m) * n + cols, tl.sum(sq, axis=0), mask=cols < n)
    tl.store(pp_part_ptr + pid, tl.sum(p * p))
    tl.store(bad_part_ptr + pid, bad)


@triton.jit
def _ema_of_mean(part_ptr, state_ptr, new_ptr, sum_ptr, b, chunk, L, T, nchunks, count, beta, omb,
                 TB: tl.constexpr, LB: tl.constexpr, WITH_SUM: tl.constexpr):
    """new[b, i] = beta * state[b, i] + (1 - beta) * (sum_t part[b, t, i]) / count for the LB
    indices i of ``chunk``; optionally the chunk's sum of new (for mean(r'))."""
    idx = chunk.to(tl.int64) * LB + tl.arange(0, LB)
    lmask = idx < L
    acc = tl.zeros([TB, LB], dtype=tl.float32)
    for t0 in range(0, T, TB):  # fixed order over the tile partials: deterministic
        t = t0 + tl.arange(0, TB)
        ptrs = part_ptr + (b * T + t[:, None]) * L + idx[None, :]
        acc += tl.load(ptrs, mask=(t < T)[:, None] & lmask[None, :], other=0.0)
    mean = tl.math.div_rn(tl.sum(acc, axis=0), count)
    old = tl.load(state_ptr + b * L + idx, mask=lmask, other=0.0)
    new = tl.fma(omb, mean, beta * old)  # reference: torch.add(state * beta, mean, alpha=1-beta)
    tl.store(new_ptr + b * L + idx, new, mask=lmask)
    if WITH_SUM:
        tl.store(sum_ptr + b * nchunks + chunk, tl.sum(tl.where(lmask, new, 0.0)))


@triton.jit
def _factors_kernel(
    row_part_ptr, col_part_ptr, row_state_ptr, col_state_ptr, row_new_ptr, col_new_ptr,
    rsum_part_ptr, m, n, tm, tn, rc, cc, n_row_programs, m_f, n_f, beta, omb,
    TBR: tl.constexpr, RB: tl.constexpr, TBC: tl.constexpr, CB: tl.constexpr,
):
    # One launch for both factors: the first B*rc programs do rows, the next B*cc columns.
    pid = tl.program_id(0)
    if pid < n_row_programs:
        b = pid // rc
        _ema_of_mean(row_part_ptr, row_state_ptr, row_new_ptr, rsum_part_ptr, b.to(tl.int64),
                     pid - b * rc, m, tn, rc, n_f, beta, omb, TBR, RB, True)
    else:
        q = pid - n_row_programs
        b = q // cc
        _ema_of_mean(col_part_ptr, col_state_ptr, col_new_ptr, rsum_part_ptr, b.to(tl.int64),
                     q - b * cc, n, tm, cc, m_f, beta, omb, TBC, CB, False)


@triton.jit
def _unorm_factored_kernel(
    g_ptr, clip_coef_ptr, row_new_ptr, col_new_ptr, uu_part_ptr,
    m, n, tm, tn, scale, clip_value,
    BM: tl.constexpr, BN: tl.constexpr,
    LOSS_SCALE: tl.constexpr, CLIP_VALUE: tl.constexpr, HAS_CLIP_COEF: tl.constexpr,
):
    pid, b, pid_m, pid_n, rows, cols, offs, mask = _tile(m, n, tm, tn, BM, BN)
    g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    g = preprocess(g, scale, clip_value, _clip_coef(clip_coef_ptr, HAS_CLIP_COEF),
                   LOSS_SCALE, CLIP_VALUE, HAS_CLIP_COEF)
    # mean(r') is not known yet (it needs every row): sum (g r'^-1/2 c'^-1/2)^2 here, and
    # _scalars_kernel multiplies each batch's sum by its mean(r').
    rs = _rsqrt(tl.load(row_new_ptr + b * m + rows, mask=rows < m, other=1.0))
    cs = _rsqrt(tl.load(col_new_ptr + b * n + cols, mask=cols < n, other=1.0))
    w = (rs[:, None] * cs[None, :]) * g
    tl.store(uu_part_ptr + pid, tl.sum(tl.where(mask, w * w, 0.0)))


@triton.jit(do_not_specialize=["key"])
def _apply_factored_kernel(
    p_ptr, g_ptr, clip_coef_ptr, row_new_ptr, col_new_ptr, rmean_ptr, scal_ptr,
    row_state_ptr, col_state_ptr,
    m, n, tm, tn, scale, clip_value, key,
    BM: tl.constexpr, BN: tl.constexpr,
    LOSS_SCALE: tl.constexpr, CLIP_VALUE: tl.constexpr, HAS_CLIP_COEF: tl.constexpr,
    STOCHASTIC: tl.constexpr,
):
    pid, b, pid_m, pid_n, rows, cols, offs, mask = _tile(m, n, tm, tn, BM, BN)
    if tl.load(scal_ptr + 3) != 0.0:  # ok: the gradient is finite (else nothing is written)
        denom = tl.load(scal_ptr)
        lr_t = tl.load(scal_ptr + 1)
        decay = tl.load(scal_ptr + 2)
        g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        g = preprocess(g, scale, clip_value, _clip_coef(clip_coef_ptr, HAS_CLIP_COEF),
                       LOSS_SCALE, CLIP_VALUE, HAS_CLIP_COEF)
        p = tl.load(p_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        r = tl.load(row_new_ptr + b * m + rows, mask=rows < m, other=1.0)
        c = tl.load(col_new_ptr + b * n + cols, mask=cols < n, other=1.0)
        rf = _rsqrt(tl.math.div_rn(r, tl.load(rmean_ptr + b)))  # rsqrt(r / mean(r))
        cf = _rsqrt(c)
        u = tl.math.div_rn((rf[:, None] * cf[None, :]) * g, denom)
        new = p * decay - lr_t * u
        new = round_to(new, offs, high_key(offs, key), p_ptr.dtype.element_ty, STOCHASTIC)
        tl.store(p_ptr + offs, new, mask=mask)
        # The state, written once: by the first tile column (rows) and first tile row (cols).
        if pid_n == 0:
            tl.store(row_state_ptr + b * m + rows, r, mask=rows < m)
        if pid_m == 0:
            tl.store(col_state_ptr + b * n + cols, c, mask=cols < n)


# ---------------------------------------------------------------------------------------------
# Unfactored (0-d, 1-d) parameters
# ---------------------------------------------------------------------------------------------


@triton.jit
def _vector_u(g_ptr, v_ptr, clip_coef_ptr, offs, mask, scale, clip_value, eps1, beta, omb,
              LOSS_SCALE: tl.constexpr, CLIP_VALUE: tl.constexpr, HAS_CLIP_COEF: tl.constexpr):
    """(raw g, v' = beta*v + (1-beta)*G, u = v'^-1/2 * g) for the elements ``offs``."""
    graw = tl.load(g_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    g = preprocess(graw, scale, clip_value, _clip_coef(clip_coef_ptr, HAS_CLIP_COEF),
                   LOSS_SCALE, CLIP_VALUE, HAS_CLIP_COEF)
    v = tl.load(v_ptr + offs, mask=mask, other=1.0)
    v = tl.fma(omb, g * g + eps1, beta * v)  # torch.add(v * beta, G, alpha=1-beta)
    return graw, v, _rsqrt(v) * g


@triton.jit
def _stats_vector_kernel(
    g_ptr, p_ptr, v_ptr, clip_coef_ptr, pp_part_ptr, uu_part_ptr, bad_part_ptr,
    numel, scale, clip_value, eps1, beta, omb,
    BLOCK: tl.constexpr,
    LOSS_SCALE: tl.constexpr, CLIP_VALUE: tl.constexpr, HAS_CLIP_COEF: tl.constexpr,
):
    pid = tl.program_id(0)
    offs = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < numel
    graw, v, u = _vector_u(g_ptr, v_ptr, clip_coef_ptr, offs, mask, scale, clip_value, eps1,
                           beta, omb, LOSS_SCALE, CLIP_VALUE, HAS_CLIP_COEF)
    p = tl.load(p_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    tl.store(pp_part_ptr + pid, tl.sum(p * p))
    tl.store(uu_part_ptr + pid, tl.sum(tl.where(mask, u * u, 0.0)))
    tl.store(bad_part_ptr + pid, tl.max((~is_finite(graw)).to(tl.float32)))


@triton.jit(do_not_specialize=["key"])
def _apply_vector_kernel(
    p_ptr, g_ptr, v_ptr, clip_coef_ptr, scal_ptr,
    numel, scale, clip_value, eps1, beta, omb, key,
    BLOCK: tl.constexpr,
    LOSS_SCALE: tl.constexpr, CLIP_VALUE: tl.constexpr, HAS_CLIP_COEF: tl.constexpr,
    STOCHASTIC: tl.constexpr,
):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < numel
    if tl.load(scal_ptr + 3) != 0.0:  # ok
        graw, v, u = _vector_u(g_ptr, v_ptr, clip_coef_ptr, offs, mask, scale, clip_value, eps1,
                               beta, omb, LOSS_SCALE, CLIP_VALUE, HAS_CLIP_COEF)
        u = tl.math.div_rn(u, tl.load(scal_ptr))
        p = tl.load(p_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        new = p * tl.load(scal_ptr + 2) - tl.load(scal_ptr + 1) * u
        new = round_to(new, offs, high_key(offs, key), p_ptr.dtype.element_ty, STOCHASTIC)
        tl.store(p_ptr + offs, new, mask=mask)
        tl.store(v_ptr + offs, v, mask=mask)


# ---------------------------------------------------------------------------------------------
# The scalars between pass 2 and pass 3 (one program)
# ---------------------------------------------------------------------------------------------


@triton.jit
def _scalars_kernel(
    pp_part_ptr, uu_part_ptr, bad_part_ptr, rsum_part_ptr, rmean_ptr, scal_ptr, found_inf_ptr,
    T, B, rc, tpb, m_f, sqrt_numel, lr, eps2, weight_decay, clip_threshold,
    SB: tl.constexpr, FACTORED: tl.constexpr, BB: tl.constexpr, RCB: tl.constexpr,
    TPB: tl.constexpr, HAS_FOUND_INF: tl.constexpr,
):
    """scal = [max(1, rms(u)/clip_threshold), lr_t, 1 - lr_t*wd, ok]; rmean[b] = mean(r'_b)."""
    pp = tl.zeros([SB], dtype=tl.float32)
    uu = tl.zeros([SB], dtype=tl.float32)
    bad = tl.zeros([SB], dtype=tl.float32)
    for t0 in range(0, T, SB):  # the per-tile partials, in a fixed order
        t = t0 + tl.arange(0, SB)
        pp += tl.load(pp_part_ptr + t, mask=t < T, other=0.0)
        bad = tl.maximum(bad, tl.load(bad_part_ptr + t, mask=t < T, other=0.0))
        if not FACTORED:
            uu += tl.load(uu_part_ptr + t, mask=t < T, other=0.0)
    sum_uu = tl.sum(uu)
    if FACTORED:
        # sum(u^2) = sum_b mean(r'_b) * S_b, S_b = the pass-2 sums of batch b's tiles; several
        # batches at a time ([BB, .] blocks) so that many small matrices stay cheap.
        acc = tl.zeros([BB], dtype=tl.float32)
        for b0 in range(0, B, BB):
            bb = b0 + tl.arange(0, BB).to(tl.int64)
            bm = bb < B
            racc = tl.zeros([BB, RCB], dtype=tl.float32)
            for c0 in range(0, rc, RCB):
                c = c0 + tl.arange(0, RCB)
                racc += tl.load(rsum_part_ptr + bb[:, None] * rc + c[None, :],
                                mask=bm[:, None] & (c < rc)[None, :], other=0.0)
            rmean = tl.math.div_rn(tl.sum(racc, axis=1), m_f)
            tl.store(rmean_ptr + bb, rmean, mask=bm)
            sacc = tl.zeros([BB, TPB], dtype=tl.float32)
            for s0 in range(0, tpb, TPB):
                s = s0 + tl.arange(0, TPB)
                sacc += tl.load(uu_part_ptr + bb[:, None] * tpb + s[None, :],
                                mask=bm[:, None] & (s < tpb)[None, :], other=0.0)
            acc += tl.where(bm, rmean * tl.sum(sacc, axis=1), 0.0)
        sum_uu = tl.sum(acc)
    any_bad = tl.max(bad)
    # As reference.py: rms(x) = ||x|| / sqrt(numel); clamps propagate NaN like torch.clamp.
    rms_p = tl.math.div_rn(tl.math.sqrt_rn(tl.sum(pp)), sqrt_numel)
    lr_t = lr * tl.maximum(rms_p, eps2, propagate_nan=tl.PropagateNan.ALL)
    rms_u = tl.math.div_rn(tl.math.sqrt_rn(sum_uu), sqrt_numel)
    denom = tl.maximum(tl.math.div_rn(rms_u, clip_threshold), 1.0,
                       propagate_nan=tl.PropagateNan.ALL)
    tl.store(scal_ptr, denom)
    tl.store(scal_ptr + 1, lr_t)
    tl.store(scal_ptr + 2, 1.0 - lr_t * weight_decay)
    tl.store(scal_ptr + 3, 1.0 - any_bad)
    if HAS_FOUND_INF:
        tl.store(found_inf_ptr, 1.0, mask=any_bad > 0.0)


# ---------------------------------------------------------------------------------------------
# Launcher
# ---------------------------------------------------------------------------------------------


def _pow2_at_least(x: int) -> int:
    return 1 << (max(1, x) - 1).bit_length()


def _tile_shape(m: int, n: int):
    """BM x BN <= TILE: square-ish 64 x 64 for large matrices (row and column partials then cost
    1/64 + 1/64 fp32 per element), full width for short rows, full height for narrow columns."""
    bn = min(_pow2_at_least(n), max(64, TILE // _pow2_at_least(m)))
    bm = min(_pow2_at_least(m), TILE // bn)
    return bm, bn


def _reduce_shape(T: int, L: int):
    """[TB, LB] block of _ema_of_mean: TB tile partials x LB indices, about 4096 values."""
    tb = min(_pow2_at_least(T), MAX_PARTS)
    return tb, min(_pow2_at_least(L), max(1, REDUCE // tb))


class _Scratch:
    """One fp32 device allocation carved into 128-byte aligned sections (aligned vector loads)."""

    def __init__(self, device, **sizes):
        offsets, total = {}, 0
        for name, size in sizes.items():
            offsets[name] = total
            total += -(-max(size, 1) // 32) * 32
        buf = torch.empty(total, dtype=torch.float32, device=device)
        for name, size in sizes.items():
            setattr(self, name, buf[offsets[name]: offsets[name] + max(size, 1)])


def _check_state(name, t, numel):
    if t is None or t.dtype != torch.float32 or t.numel() != numel:
        raise ValueError(
            f"adalomo_update_: {name} must be a float32 tensor of {numel} elements, got "
            f"{None if t is None else (t.dtype, t.numel())}"
        )


def adalomo_update_(
    param, grad, exp_avg_sq_row, exp_avg_sq_col, exp_avg_sq, clip_coef, found_inf,
    lr, weight_decay, loss_scale, clip_grad_value, beta, eps1, eps2, clip_threshold,
    rounding, seed, step, grad_sq=None, workspace=None, stage=0, global_rows=0, global_numel=0,
):
    """Triton AdaLomo update of ``param`` and its state in place; same signature and semantics as
    ``reference.adalomo_update_`` (factored when ``exp_avg_sq_row`` is given)."""
    if grad_sq is not None or stage != 0:
        raise NotImplementedError(
            "adalomo_update_: grad_sq and stages are not implemented by the Triton backend yet")
    check_tensors("adalomo_update_", param, grad, exp_avg_sq_row=exp_avg_sq_row,
                  exp_avg_sq_col=exp_avg_sq_col, exp_avg_sq=exp_avg_sq, clip_coef=clip_coef,
                  found_inf=found_inf)
    for name, t in (("clip_coef", clip_coef), ("found_inf", found_inf)):
        if t is not None and (t.numel() < 1 or not t.is_floating_point()):
            raise ValueError(f"adalomo_update_: {name} must be a 1-element float tensor")
    if rounding not in ("nearest", "stochastic"):
        raise ValueError(
            f"adalomo_update_: rounding must be 'nearest' or 'stochastic', got {rounding!r}")
    numel = param.numel()
    if numel == 0:
        return
    factored = exp_avg_sq_row is not None
    if factored:
        if param.dim() < 2:
            raise ValueError("adalomo_update_: a factored state needs a parameter of >= 2 dims")
        m, n = param.shape[-2], param.shape[-1]
        B = numel // (m * n)
        _check_state("exp_avg_sq_row", exp_avg_sq_row, B * m)
        _check_state("exp_avg_sq_col", exp_avg_sq_col, B * n)
    else:
        _check_state("exp_avg_sq", exp_avg_sq, numel)

    mode, scale = loss_scale_args(loss_scale)
    flags = dict(LOSS_SCALE=mode, CLIP_VALUE=clip_grad_value > 0,
                 HAS_CLIP_COEF=clip_coef is not None)
    stochastic = rounding == "stochastic" and param.dtype != torch.float32
    cc = clip_coef if clip_coef is not None else param  # placeholders are never dereferenced
    fi = found_inf if found_inf is not None else param
    b32, omb32, cv32 = f32(beta), f32(1.0 - beta), f32(clip_grad_value)
    # Host scalars as reference.py rounds them: f32(lr), f32(eps2), f32(weight_decay), ...
    tail = (f32(math.sqrt(numel)), f32(lr), f32(eps2), f32(weight_decay), f32(clip_threshold))
    opts = dict(enable_fp_fusion=False)  # op-by-op rounding as the reference (see module doc)
    key = key_arg(seed, step)

    with torch.cuda.device(param.device) if param.is_cuda else contextlib.nullcontext():
        if factored:
            bm, bn = _tile_shape(m, n)
            tm, tn = triton.cdiv(m, bm), triton.cdiv(n, bn)
            tpb = tm * tn
            T = B * tpb
            tbr, rb = _reduce_shape(tn, m)
            tbc, cb = _reduce_shape(tm, n)
            rc, ccn = triton.cdiv(m, rb), triton.cdiv(n, cb)
            s = _Scratch(param.device, row_part=B * tn * m, col_part=B * tm * n, pp=T, bad=T,
                         uu=T, row_new=B * m, col_new=B * n, rsum=B * rc, rmean=B, scal=4)
            _stats_factored_kernel[(T,)](
                grad, param, cc, s.row_part, s.col_part, s.pp, s.bad,
                m, n, tm, tn, scale, cv32, f32(eps1), BM=bm, BN=bn, **flags,
                num_warps=NUM_WARPS, **opts)
            _factors_kernel[(B * rc + B * ccn,)](
                s.row_part, s.col_part, exp_avg_sq_row, exp_avg_sq_col, s.row_new, s.col_new,
                s.rsum, m, n, tm, tn, rc, ccn, B * rc, f32(m), f32(n), b32, omb32,
                TBR=tbr, RB=rb, TBC=tbc, CB=cb, num_warps=SMALL_WARPS, **opts)
            _unorm_factored_kernel[(T,)](
                grad, cc, s.row_new, s.col_new, s.uu, m, n, tm, tn, scale, cv32,
                BM=bm, BN=bn, **flags, num_warps=NUM_WARPS, **opts)
            rcb, tpbb = min(_pow2_at_least(rc), MAX_PARTS), min(_pow2_at_least(tpb), MAX_PARTS)
            bb = min(_pow2_at_least(B), max(1, 2 * SCALAR_BLOCK // max(rcb, tpbb)))
            _scalars_kernel[(1,)](
                s.pp, s.uu, s.bad, s.rsum, s.rmean, s.scal, fi,
                T, B, rc, tpb, f32(m), *tail,
                SB=min(_pow2_at_least(T), SCALAR_BLOCK), FACTORED=True, BB=bb, RCB=rcb, TPB=tpbb,
                HAS_FOUND_INF=found_inf is not None, num_warps=SMALL_WARPS, **opts)
            _apply_factored_kernel[(T,)](
                param, grad, cc, s.row_new, s.col_new, s.rmean, s.scal,
                exp_avg_sq_row, exp_avg_sq_col, m, n, tm, tn, scale, cv32, key,
                BM=bm, BN=bn, **flags, STOCHASTIC=stochastic, num_warps=NUM_WARPS, **opts)
        else:
            T = triton.cdiv(numel, TILE)
            s = _Scratch(param.device, pp=T, bad=T, uu=T, scal=4)
            _stats_vector_kernel[(T,)](
                grad, param, exp_avg_sq, cc, s.pp, s.uu, s.bad,
                numel, scale, cv32, f32(eps1), b32, omb32, BLOCK=TILE, **flags,
                num_warps=NUM_WARPS, **opts)
            _scalars_kernel[(1,)](
                s.pp, s.uu, s.bad, s.pp, s.scal, s.scal, fi,  # rsum/rmean unused (not FACTORED)
                T, 1, 1, 1, 1.0, *tail,
                SB=min(_pow2_at_least(T), SCALAR_BLOCK), FACTORED=False, BB=1, RCB=1, TPB=1,
                HAS_FOUND_INF=found_inf is not None, num_warps=SMALL_WARPS, **opts)
            _apply_vector_kernel[(T,)](
                param, grad, exp_avg_sq, cc, s.scal,
                numel, scale, cv32, f32(eps1), b32, omb32, key, BLOCK=TILE, **flags,
                STOCHASTIC=stochastic, num_warps=NUM_WARPS, **opts)
