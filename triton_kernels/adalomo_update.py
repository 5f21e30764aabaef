"""AdaLomo update (docs/spec.md "AdaLomo", "The fewest passes"): three passes over memory, three
launches, and the workspace header of the op contract (reference.WS_*).

Factored (p of shape (..., m, n), seen as S slices of m x n; state r (S, m), c (S, n)). Programs
own tiles of R rows x BN columns, R = nsub * SB rows walked SB at a time (SB x BN = 4096
elements per step); BN and SB are one of three compile-time buckets of n, nsub is a runtime
argument chosen by ``geometry`` (about P_MIN programs, balanced finishers).
  pass 1  _adalomo_stats_kernel   read g, p: row sums of G = g*g + eps1 per tile (workspace),
          column sums per tile, sum(p*p), sum(g_unscaled^2), a non-finite flag. The last tile of
          a column of tiles adds its column partials (header: column sums); the last tile of a
          row of tiles adds its row partials, forms the new r and its sum (workspace) and the
          scalars of its tiles; the last of those writes the header (sum p*p, the flag, sum r per
          slice) and adds grad_sq. (stage 1)                               4 B/elt bf16
  pass 2  _adalomo_unorm_kernel   read g: c' from the header's column sums (kept in the
          workspace), u with the new r, c' and mean(r); per tile sum(u*u), the last tile writes
          header[2]. (stage 2)                                             2 B/elt bf16
  pass 3  _adalomo_apply_kernel   read g, p, write p; r and c committed by the first tile of each
          row / column of tiles; nothing written (found_inf set) when the header's flag is up.
          (stage 3)                                                        6 B/elt bf16
  => 12 B per element for bf16/fp16 (24 for fp32), plus about 2/BN + 2/R fp32 of partials
  (written once, read once).
Unfactored (0-d, 1-d; state v): _vector_kernel. A tensor of at most TILE elements is updated by
one program in one launch (MODE 0); a larger one by a statistics pass (MODE 1, which knows u
already: sum(u*u) is delivered with the header after stage 1) and an apply pass (MODE 2).
_vector_multi_kernel runs the same tile code on a list of tensors (one launch per dtype).

Every scalar between passes lives in the workspace: no host synchronisation, no allocation with a
workspace. Sums are deterministic: partials in the workspace, added in a fixed order by the last
program to draw an integer ticket (reduce.py). Kernels are compiled without fp contraction
(enable_fp_fusion=False) so that every op rounds as in reference.py (``g*g + eps1`` and
``p*decay - lr_t*u`` are not fused); the reference's own fused ``torch.add(a, b, alpha)`` is an
explicit tl.fma. A division by the update-norm factor is skipped when that factor is 1 (exact).
"""

import functools
import math

import numpy as np
import torch
import triton
import triton.language as tl

from . import launch as _l
from .launch import _F0, multi_offsets, record_fields, tile_record
from .lomo_update import add_sums_in_list_order, add_to, checks, multi_checks
from .reduce import PARTS, last_arrival, sum_parts
from .rounding import f32, is_finite, key_arg, load_clip_coef, loss_scale_args, round_span
from .rounding import unscale_clip

TILE = 4096  # unfactored: elements per program
# Warps: registers per thread stay within the budget of tests/test_triton_compile.py
VECTOR_WARPS = 16  # unfactored: 8 elements (one 16-byte vector for bf16) per thread and tensor
NUM_WARPS = 8  # factored passes 2 and 3: 16 elements per thread
STATS_WARPS = 16  # factored pass 1 (94 registers with 8 warps, about 55 with 16)
# Factored: (SB, BN) per bucket of n, and the program count a tile shape aims for (rows per tile
# shrink down to one sub-block to keep the GPU busy on small matrices).
BUCKETS = ((128, 16, 256), (17, 64, 64), (0, 256, 16))  # (smallest n, SB, BN)
P_MIN = 1024
COL_FIN = 16  # column finisher: partial rows per step ([COL_FIN, BN] loads)
ROW_FIN = (16, 128)  # row finisher: [partial columns, rows] per step
HDR_FIN = (32, 32)  # header finisher: [slices, row tiles] per step
ORDER_CHUNK = tl.constexpr(16)  # per-tensor sums loaded at once (list-order grad_sq)
# _vector_multi_kernel: ptxas fits it in 92 registers without spilling under this cap (110
# without: the loop that applies a multi-tile tensor keeps the per-tensor scalars live)
MULTI_MAX_REGISTERS = 96
_OPTS = dict(enable_fp_fusion=False)  # op-by-op rounding as the reference (see module doc)


@triton.jit
def _rsqrt(x):
    # IEEE 1/sqrt(x): closer to torch's CPU rsqrt than the approximate rsqrt.approx.f32
    return tl.math.div_rn(1.0, tl.math.sqrt_rn(x))


@triton.jit
def _step_scalars(sum_pp, sum_uu, sqrt_numel, lr, eps2, weight_decay, clip_threshold):
    """(lr_t, 1 - lr_t*wd, max(1, rms(u)/clip_threshold)) as reference.py: rms(x) = ||x|| /
    sqrt(numel); the clamps propagate NaN like torch.clamp."""
    rms_p = tl.math.div_rn(tl.math.sqrt_rn(sum_pp), sqrt_numel)
    lr_t = lr * tl.maximum(rms_p, eps2, propagate_nan=tl.PropagateNan.ALL)
    rms_u = tl.math.div_rn(tl.math.sqrt_rn(sum_uu), sqrt_numel)
    denom = tl.maximum(tl.math.div_rn(rms_u, clip_threshold), 1.0,
                       propagate_nan=tl.PropagateNan.ALL)
    return lr_t, 1.0 - lr_t * weight_decay, denom


@triton.jit
def _update(p, u, denom, lr_t, decay, DIVIDE: tl.constexpr):
    """p * (1 - lr_t*wd) - lr_t * u / denom (DIVIDE False: denom is 1, the division is exact)."""
    if DIVIDE:
        u = tl.math.div_rn(u, denom)
    return p * decay - lr_t * u


# ---------------------------------------------------------------------------------------------
# Factored (>= 2-D) parameters
# ---------------------------------------------------------------------------------------------


@triton.jit
def _layout(S, m, n, nsub, SB: tl.constexpr, BN: tl.constexpr, INDEX64: tl.constexpr):
    """Tile counts, this program's tile (pn fastest) and the workspace slots: header (sum r per
    slice, column sums), then new r, new c, row partials [S, tn, m], column partials [S, tm, n],
    tile scalars [3, P], row-tile scalars [4, S*tm], tile sums of u*u [P]; ``geometry`` is the
    host's copy. (The tickets - row tiles, column tiles, pass 1, pass 2 - are at the end of the
    workspace, from ``tk``.)"""
    if INDEX64:
        S = S.to(tl.int64)
        m = m.to(tl.int64)
        n = n.to(tl.int64)
    R = nsub * SB
    tm = tl.maximum(1, (m + R - 1) // R)
    tn = (n + BN - 1) // BN
    P = S * tm * tn
    pid = tl.program_id(0)
    b = pid // (tm * tn)
    rem = pid - b * (tm * tn)
    pm = rem // tn
    sum_r = 4
    colsum = sum_r + S
    new_r = colsum + S * n
    new_c = new_r + S * m
    rowp = new_c + S * n
    colp = rowp + S * tn * m
    tilep = colp + S * tm * n
    rtp = tilep + 3 * P
    uup = rtp + 4 * S * tm
    return (R, tm, tn, P, b, pm, rem - pm * tn,
            (sum_r, colsum, new_r, new_c, rowp, colp, tilep, rtp, uup))


@functools.lru_cache(maxsize=4096)
def geometry(shape):
    """(S, m, n, SB, BN, nsub, P, (data, tickets)) of a factored parameter: rows per tile
    balance the two finishers (R * tn partials per row finisher, tm * BN per column finisher)
    while keeping about P_MIN programs when the matrix has that many sub-blocks."""
    S, m, n = math.prod(shape[:-2]), shape[-2], shape[-1]
    SB, BN = next((sb, bn) for lo, sb, bn in BUCKETS if n >= lo)
    tn = _l.cdiv(n, BN)
    ideal = BN * math.sqrt(max(m, 1) / max(n, 1)) / SB
    cap = S * _l.cdiv(m, SB) * tn // P_MIN
    nsub = max(1, min(round(ideal), cap))
    tm = max(1, _l.cdiv(m, nsub * SB))
    P = S * tm * tn
    data = 4 + S + S * n + S * m + S * n + S * tn * m + S * tm * n + 3 * P + 4 * S * tm + P
    return S, m, n, SB, BN, nsub, P, (data, S * tm + S * tn + 2)


@triton.jit(do_not_specialize=["S", "m", "nsub", "tk"])
def _adalomo_stats_kernel(
    g_ptr, p_ptr, row_ptr, clip_coef_ptr, grad_sq_ptr, ws_ptr,
    S, m, n, nsub, tk, scale, clip_value, eps1, beta, omb, n_f,
    SB: tl.constexpr, BN: tl.constexpr, LOSS_SCALE: tl.constexpr, CLIP_VALUE: tl.constexpr,
    HAS_CLIP_COEF: tl.constexpr, GRAD_SQ: tl.constexpr, INDEX64: tl.constexpr,
    CF: tl.constexpr, RF_T: tl.constexpr, RF_R: tl.constexpr, HF_S: tl.constexpr,
    HF_T: tl.constexpr,
):
    R, tm, tn, P, b, pm, pn, o = _layout(S, m, n, nsub, SB, BN, INDEX64)
    sum_r, colsum, new_r, new_c, rowp, colp, tilep, rtp, uup = o
    pid = tl.program_id(0)
    coef = load_clip_coef(clip_coef_ptr, HAS_CLIP_COEF)
    cols = (pn * BN).to(tl.int32) + tl.arange(0, BN)
    cmask = cols < n
    col_acc = tl.full([SB, BN], 0, tl.float32)
    pp_acc = tl.full([SB], 0, tl.float32)
    gs_acc = tl.full([SB], 0, tl.float32)
    bad_acc = tl.full([SB], 0, tl.float32)
    row0 = pm * R
    for it in range(nsub):
        rows = row0 + it * SB + tl.arange(0, SB)
        rmask = rows < m
        mask = rmask[:, None] & cmask[None, :]
        first = (b * m + rows) * n  # 64-bit once per row (INDEX64), 32-bit per element
        g = tl.load((g_ptr + first)[:, None] + cols[None, :], mask=mask).to(tl.float32)
        p = tl.load((p_ptr + first)[:, None] + cols[None, :], mask=mask).to(tl.float32)
        bad_acc = tl.maximum(bad_acc, tl.max((~is_finite(g)).to(tl.float32), axis=1))
        gu, g = unscale_clip(g, scale, clip_value, coef, LOSS_SCALE, CLIP_VALUE, HAS_CLIP_COEF)
        if GRAD_SQ:
            gs_acc += tl.sum(gu * gu, axis=1)
        sq = tl.where(mask, g * g + eps1, 0.0)
        col_acc += sq
        tl.store(ws_ptr + rowp + (b * tn + pn) * m + rows, tl.sum(sq, axis=1), mask=rmask)
        pp_acc += tl.sum(p * p, axis=1)
    colpart = tl.sum(col_acc, axis=0)
    if tm == 1:  # this tile holds all the slice's rows: its column sums are the sums
        tl.store(ws_ptr + colsum + b * n + cols, colpart, mask=cmask)
    else:
        tl.store(ws_ptr + colp + (b * tm + pm) * n + cols, colpart, mask=cmask)
    tl.store(ws_ptr + tilep + pid, tl.sum(pp_acc))
    tl.store(ws_ptr + tilep + P + pid, tl.sum(gs_acc))
    tl.store(ws_ptr + tilep + 2 * P + pid, tl.max(bad_acc))

    # The last tile of this column of tiles: column sums over the slice's local rows.
    tk_row = tk
    tk_col = tk_row + S * tm
    tk_1 = tk_col + S * tn
    col_done = False
    if tm > 1:
        col_done = last_arrival(ws_ptr, tk_col + b * tn + pn, tm)
    if col_done:
        acc = tl.full([CF, BN], 0, tl.float32)
        for j0 in range(0, tm, CF):
            j = j0 + tl.arange(0, CF)
            acc += tl.load(ws_ptr + colp + (b * tm + j)[:, None] * n + cols[None, :],
                           mask=(j < tm)[:, None] & cmask[None, :], other=0.0,
                           cache_modifier=".cg")
        tl.store(ws_ptr + colsum + b * n + cols, tl.sum(acc, axis=0), mask=cmask)

    # The last tile of this row of tiles: the new r of its rows, their sum, its tiles' scalars.
    row_done = tn == 1
    if tn > 1:
        row_done = last_arrival(ws_ptr, tk_row + b * tm + pm, tn)
    if row_done:
        rsum = tl.full([RF_R], 0, tl.float32)
        row_end = tl.minimum(row0 + R, m)
        for r0 in range(row0, row_end, RF_R):
            rows = r0 + tl.arange(0, RF_R)
            rmask = rows < row_end
            acc = tl.full([RF_T, RF_R], 0, tl.float32)
            for j0 in range(0, tn, RF_T):
                j = j0 + tl.arange(0, RF_T)
                acc += tl.load(ws_ptr + rowp + (b * tn + j)[:, None] * m + rows[None, :],
                               mask=(j < tn)[:, None] & rmask[None, :], other=0.0,
                               cache_modifier=".cg")
            old = tl.load(row_ptr + b * m + rows, mask=rmask, other=0.0)
            # reference: torch.add(r * beta, mean(G, -1), alpha=1-beta)
            new = tl.fma(omb, tl.math.div_rn(tl.sum(acc, axis=0), n_f), beta * old)
            tl.store(ws_ptr + new_r + b * m + rows, new, mask=rmask)
            rsum += tl.where(rmask, new, 0.0)
        first = tilep + (b * tm + pm) * tn
        st = S * tm
        rt = b * tm + pm
        tl.store(ws_ptr + rtp + rt, sum_parts(ws_ptr + first, tn, PARTS))
        tl.store(ws_ptr + rtp + st + rt, sum_parts(ws_ptr + first + P, tn, PARTS))
        tl.store(ws_ptr + rtp + 2 * st + rt, sum_parts(ws_ptr + first + 2 * P, tn, PARTS))
        tl.store(ws_ptr + rtp + 3 * st + rt, tl.sum(rsum))
        # The last row of tiles of the whole parameter: the header.
        if last_arrival(ws_ptr, tk_1, st):
            tl.store(ws_ptr, sum_parts(ws_ptr + rtp, st, PARTS))
            tl.store(ws_ptr + 1, sum_parts(ws_ptr + rtp + 2 * st, st, PARTS))
            if GRAD_SQ:
                add_to(grad_sq_ptr, sum_parts(ws_ptr + rtp + st, st, PARTS))
            for s0 in range(0, S, HF_S):
                s = s0 + tl.arange(0, HF_S)
                racc = tl.full([HF_S, HF_T], 0, tl.float32)
                for t0 in range(0, tm, HF_T):
                    t = t0 + tl.arange(0, HF_T)
                    racc += tl.load(ws_ptr + rtp + 3 * st + s[:, None] * tm + t[None, :],
                                    mask=(s < S)[:, None] & (t < tm)[None, :], other=0.0,
                                    cache_modifier=".cg")
                tl.store(ws_ptr + sum_r + s, tl.sum(racc, axis=1), mask=s < S)


@triton.jit
def _new_col(ws_ptr, col_ptr, colsum, b, n, cols, cmask, rows_f, beta, omb):
    """c' = beta * c + (1 - beta) * colsum / rows of the columns ``cols`` (pass 2)."""
    c = tl.load(ws_ptr + colsum + b * n + cols, mask=cmask, other=0.0)
    old = tl.load(col_ptr + b * n + cols, mask=cmask, other=1.0)
    # reference: torch.add(c * beta, colsum / rows, alpha=1-beta)
    return tl.fma(omb, tl.math.div_rn(c, rows_f), beta * old)


@triton.jit(do_not_specialize=["S", "m", "nsub", "tk"])
def _adalomo_unorm_kernel(
    g_ptr, col_ptr, clip_coef_ptr, ws_ptr,
    S, m, n, nsub, tk, rows_f, scale, clip_value, beta, omb,
    SB: tl.constexpr, BN: tl.constexpr, LOSS_SCALE: tl.constexpr, CLIP_VALUE: tl.constexpr,
    HAS_CLIP_COEF: tl.constexpr, INDEX64: tl.constexpr,
):
    R, tm, tn, P, b, pm, pn, o = _layout(S, m, n, nsub, SB, BN, INDEX64)
    sum_r, colsum, new_r, new_c, rowp, colp, tilep, rtp, uup = o
    coef = load_clip_coef(clip_coef_ptr, HAS_CLIP_COEF)
    cols = (pn * BN).to(tl.int32) + tl.arange(0, BN)
    cmask = cols < n
    c = _new_col(ws_ptr, col_ptr, colsum, b, n, cols, cmask, rows_f, beta, omb)
    cf = _rsqrt(c)
    mean_r = tl.math.div_rn(tl.load(ws_ptr + sum_r + b), rows_f)
    if pm == 0:  # kept for pass 3, which commits it
        tl.store(ws_ptr + new_c + b * n + cols, c, mask=cmask)
    uu = tl.full([SB], 0, tl.float32)
    for it in range(nsub):
        rows = pm * R + it * SB + tl.arange(0, SB)
        rmask = rows < m
        mask = rmask[:, None] & cmask[None, :]
        r = tl.load(ws_ptr + new_r + b * m + rows, mask=rmask, other=1.0)
        rf = _rsqrt(tl.math.div_rn(r, mean_r))  # rsqrt(r / mean(r))
        g = tl.load((g_ptr + (b * m + rows) * n)[:, None] + cols[None, :], mask=mask)
        gu, g = unscale_clip(g.to(tl.float32), scale, clip_value, coef, LOSS_SCALE, CLIP_VALUE,
                             HAS_CLIP_COEF)
        u = (rf[:, None] * cf[None, :]) * g
        uu += tl.sum(tl.where(mask, u * u, 0.0), axis=1)
    pid = tl.program_id(0)
    tl.store(ws_ptr + uup + pid, tl.sum(uu))
    if last_arrival(ws_ptr, tk + S * tm + S * tn + 1, P):
        tl.store(ws_ptr + 2, sum_parts(ws_ptr + uup, P, PARTS))


@triton.jit
def _apply_rows(p_ptr, g_ptr, row_ptr, ws_ptr, new_r, b, m, n, pm, pn, R, nsub, cols, cmask,
                cf, mean_r, coef, key, scale, clip_value, denom, lr_t, decay,
                SB: tl.constexpr, LOSS_SCALE: tl.constexpr, CLIP_VALUE: tl.constexpr,
                HAS_CLIP_COEF: tl.constexpr, STOCHASTIC: tl.constexpr, INDEX64: tl.constexpr,
                DIVIDE: tl.constexpr):
    for it in range(nsub):
        rows = pm * R + it * SB + tl.arange(0, SB)
        rmask = rows < m
        mask = rmask[:, None] & cmask[None, :]
        first = (b * m + rows) * n  # 64-bit once per row (INDEX64), 32-bit per element
        p_at = (p_ptr + first)[:, None] + cols[None, :]
        r = tl.load(ws_ptr + new_r + b * m + rows, mask=rmask, other=1.0)
        rf = _rsqrt(tl.math.div_rn(r, mean_r))
        g = tl.load((g_ptr + first)[:, None] + cols[None, :], mask=mask)
        gu, g = unscale_clip(g.to(tl.float32), scale, clip_value, coef, LOSS_SCALE, CLIP_VALUE,
                             HAS_CLIP_COEF)
        p = tl.load(p_at, mask=mask).to(tl.float32)
        new = _update(p, (rf[:, None] * cf[None, :]) * g, denom, lr_t, decay, DIVIDE)
        # the hash: 32-bit per element, its high-word key one value per call or two per row
        new = round_span(new, first[:, None], cols[None, :], key, p_ptr.dtype.element_ty,
                         STOCHASTIC, INDEX64)
        tl.store(p_at, new, mask=mask)
        if pn == 0:  # the state, written once per row
            tl.store(row_ptr + b * m + rows, r, mask=rmask)


@triton.jit(do_not_specialize=["S", "m", "nsub", "key"])
def _adalomo_apply_kernel(
    p_ptr, g_ptr, row_ptr, col_ptr, clip_coef_ptr, found_inf_ptr, ws_ptr,
    S, m, n, nsub, rows_f, sqrt_numel, scale, clip_value, lr, eps2, weight_decay,
    clip_threshold, key,
    SB: tl.constexpr, BN: tl.constexpr, LOSS_SCALE: tl.constexpr, CLIP_VALUE: tl.constexpr,
    HAS_CLIP_COEF: tl.constexpr, HAS_FOUND_INF: tl.constexpr, STOCHASTIC: tl.constexpr,
    INDEX64: tl.constexpr,
):
    R, tm, tn, P, b, pm, pn, o = _layout(S, m, n, nsub, SB, BN, INDEX64)
    sum_r, colsum, new_r, new_c, rowp, colp, tilep, rtp, uup = o
    if tl.load(ws_ptr + 1) > 0.0:  # a non-finite gradient: nothing is written
        if HAS_FOUND_INF:
            if tl.program_id(0) == 0:
                tl.store(found_inf_ptr, 1.0)
    else:
        lr_t, decay, denom = _step_scalars(tl.load(ws_ptr), tl.load(ws_ptr + 2), sqrt_numel, lr,
                                           eps2, weight_decay, clip_threshold)
        cols = (pn * BN).to(tl.int32) + tl.arange(0, BN)
        cmask = cols < n
        c = tl.load(ws_ptr + new_c + b * n + cols, mask=cmask, other=1.0)  # from pass 2
        cf = _rsqrt(c)
        mean_r = tl.math.div_rn(tl.load(ws_ptr + sum_r + b), rows_f)
        if pm == 0:  # the state, written once per column
            tl.store(col_ptr + b * n + cols, c, mask=cmask)
        coef = load_clip_coef(clip_coef_ptr, HAS_CLIP_COEF)
        if denom == 1.0:
            _apply_rows(p_ptr, g_ptr, row_ptr, ws_ptr, new_r, b, m, n, pm, pn, R, nsub, cols,
                        cmask, cf, mean_r, coef, key, scale, clip_value, denom, lr_t, decay, SB,
                        LOSS_SCALE, CLIP_VALUE, HAS_CLIP_COEF, STOCHASTIC, INDEX64, False)
        else:
            _apply_rows(p_ptr, g_ptr, row_ptr, ws_ptr, new_r, b, m, n, pm, pn, R, nsub, cols,
                        cmask, cf, mean_r, coef, key, scale, clip_value, denom, lr_t, decay, SB,
                        LOSS_SCALE, CLIP_VALUE, HAS_CLIP_COEF, STOCHASTIC, INDEX64, True)


# ---------------------------------------------------------------------------------------------
# Unfactored (0-d, 1-d) parameters
# ---------------------------------------------------------------------------------------------


@triton.jit
def _vector_work(p_ptr, g_ptr, v_ptr, found_inf_ptr, offs, mask, key, scale, clip_value,
                 clip_coef, eps1, beta, omb, sqrt_numel, lr, eps2, weight_decay, clip_threshold,
                 stats_ptr, MODE: tl.constexpr, LOSS_SCALE: tl.constexpr,
                 CLIP_VALUE: tl.constexpr, HAS_CLIP_COEF: tl.constexpr,
                 HAS_FOUND_INF: tl.constexpr, STOCHASTIC: tl.constexpr):
    """The elements ``offs`` of one unfactored tensor (``mask`` None: all of them). MODE 0: the
    whole tensor is here (statistics, then the update); 1: statistics only; 2: the update only,
    given the tensor's (sum p*p, flag, sum u*u) at ``stats_ptr``. Returns the sums of p*p, u*u,
    g_unscaled^2 and the non-finite flag (zeros in MODE 2)."""
    g = tl.load(g_ptr + offs, mask=mask).to(tl.float32)  # masked lanes read 0
    p = tl.load(p_ptr + offs, mask=mask).to(tl.float32)
    v = tl.load(v_ptr + offs, mask=mask)
    finite = is_finite(g)  # of the raw gradient
    gu, g = unscale_clip(g, scale, clip_value, clip_coef, LOSS_SCALE, CLIP_VALUE, HAS_CLIP_COEF)
    zero = tl.full([], 0, tl.float32)
    pp, uu, gs, bad = zero, zero, zero, zero
    if MODE != 2:
        gs = tl.sum(gu * gu)
        pp = tl.sum(p * p)
        bad = tl.max((~finite).to(tl.float32))
    v = tl.fma(omb, g * g + eps1, beta * v)  # torch.add(v * beta, G, alpha=1-beta)
    u = _rsqrt(v) * g
    if MODE != 2:
        if mask is None:
            uu = tl.sum(u * u)
        else:
            uu = tl.sum(tl.where(mask, u * u, 0.0))
    if MODE != 1:
        if MODE == 0:
            sum_pp, sum_uu, ok = pp, uu, bad == 0.0
        else:
            sum_pp, sum_uu = tl.load(stats_ptr), tl.load(stats_ptr + 2)
            ok = tl.load(stats_ptr + 1) == 0.0
        if ok:
            lr_t, decay, denom = _step_scalars(sum_pp, sum_uu, sqrt_numel, lr, eps2, weight_decay,
                                               clip_threshold)
            if denom == 1.0:
                new = _update(p, u, denom, lr_t, decay, False)
            else:
                new = _update(p, u, denom, lr_t, decay, True)
            new = round_span(new, 0, offs, key, p_ptr.dtype.element_ty, STOCHASTIC, False)
            tl.store(p_ptr + offs, new, mask=mask)
            tl.store(v_ptr + offs, v, mask=mask)
        elif HAS_FOUND_INF:
            tl.store(found_inf_ptr, 1.0)
    return pp, uu, gs, bad


@triton.jit
def _vector_tile(p_ptr, g_ptr, v_ptr, found_inf_ptr, numel, tile, key, scale, clip_value,
                 clip_coef, eps1, beta, omb, sqrt_numel, lr, eps2, weight_decay, clip_threshold,
                 stats_ptr, TILE: tl.constexpr, MODE: tl.constexpr, LOSS_SCALE: tl.constexpr,
                 CLIP_VALUE: tl.constexpr, HAS_CLIP_COEF: tl.constexpr,
                 HAS_FOUND_INF: tl.constexpr, STOCHASTIC: tl.constexpr):
    """Tile ``tile`` of an unfactored tensor (fewer than launch.MAX_SMALL elements: 32-bit
    offsets): _vector_work without a mask when the tile is full (16-byte vector accesses), with
    one for the last tile."""
    offs = tile * TILE + tl.arange(0, TILE)
    if (tile + 1) * TILE <= numel:
        pp, uu, gs, bad = _vector_work(p_ptr, g_ptr, v_ptr, found_inf_ptr, offs, None, key,
                                       scale, clip_value, clip_coef, eps1, beta, omb, sqrt_numel,
                                       lr, eps2, weight_decay, clip_threshold, stats_ptr, MODE,
                                       LOSS_SCALE, CLIP_VALUE, HAS_CLIP_COEF, HAS_FOUND_INF,
                                       STOCHASTIC)
    else:
        pp, uu, gs, bad = _vector_work(p_ptr, g_ptr, v_ptr, found_inf_ptr, offs, offs < numel,
                                       key, scale, clip_value, clip_coef, eps1, beta, omb,
                                       sqrt_numel, lr, eps2, weight_decay, clip_threshold,
                                       stats_ptr, MODE, LOSS_SCALE, CLIP_VALUE, HAS_CLIP_COEF,
                                       HAS_FOUND_INF, STOCHASTIC)
    return pp, uu, gs, bad


@triton.jit
def _vector_finish(ws_ptr, parts, stride, gtile, tile0, tiles, out_ptr, tk_slot, pp, uu, gs,
                   bad):
    """A tensor's statistics from its tiles' sums: a lone tile's own, or, by the last of its
    tiles, the fixed-order sums of their partials (``parts + q*stride + tile``). Writes
    (sum p*p, flag, sum u*u) at ``out_ptr`` (the header, or the tensor's statistics slots); returns
    (done: this program wrote them, the tensor's sum of g_unscaled^2)."""
    done = tiles == 1
    if tiles > 1:
        tl.store(ws_ptr + parts + gtile, pp)
        tl.store(ws_ptr + parts + stride + gtile, uu)
        tl.store(ws_ptr + parts + 2 * stride + gtile, gs)
        tl.store(ws_ptr + parts + 3 * stride + gtile, bad)
        done = last_arrival(ws_ptr, tk_slot, tiles)
        if done:
            first = ws_ptr + parts + tile0
            pp = sum_parts(first, tiles, PARTS)
            uu = sum_parts(first + stride, tiles, PARTS)
            gs = sum_parts(first + 2 * stride, tiles, PARTS)
            bad = sum_parts(first + 3 * stride, tiles, PARTS)
    if done:
        tl.store(out_ptr, pp)
        tl.store(out_ptr + 1, bad)
        tl.store(out_ptr + 2, uu)
    return done, gs


@triton.jit(do_not_specialize=["numel", "tk", "key"])
def _vector_kernel(
    p_ptr, g_ptr, v_ptr, clip_coef_ptr, found_inf_ptr, grad_sq_ptr, ws_ptr,
    numel, tk, scale, clip_value, eps1, beta, omb, sqrt_numel, lr, eps2, weight_decay,
    clip_threshold, key,
    TILE: tl.constexpr, MODE: tl.constexpr, LOSS_SCALE: tl.constexpr, CLIP_VALUE: tl.constexpr,
    HAS_CLIP_COEF: tl.constexpr, HAS_FOUND_INF: tl.constexpr, STOCHASTIC: tl.constexpr,
    GRAD_SQ: tl.constexpr,
):
    """An unfactored tensor. MODE 0: all of it (at most TILE elements) in one program; MODE 1
    (pass 1, stage 1): the header (sum p*p, flag, sum u*u) from per-tile partials in
    [4, 4 + 4*T), ticket at tk; MODE 2 (pass 2, stage 3): the update, from the header."""
    tile = tl.program_id(0)
    ntiles = tl.num_programs(0)
    pp, uu, gs, bad = _vector_tile(
        p_ptr, g_ptr, v_ptr, found_inf_ptr, numel, tile, key, scale, clip_value,
        load_clip_coef(clip_coef_ptr, HAS_CLIP_COEF), eps1, beta, omb, sqrt_numel, lr, eps2,
        weight_decay, clip_threshold, ws_ptr, TILE, MODE, LOSS_SCALE, CLIP_VALUE, HAS_CLIP_COEF,
        HAS_FOUND_INF, STOCHASTIC)
    done = True
    if MODE == 1:
        done, gs = _vector_finish(ws_ptr, 4, ntiles, tile, 0, ntiles, ws_ptr, tk, pp, uu, gs,
                                  bad)
    if GRAD_SQ:
        if MODE != 2 and done:
            add_to(grad_sq_ptr, gs)


# Multi-tensor forms: the same tile code on every tensor of a list, per-tensor values from the
# records (launch.Table; floats from F0: lr, weight_decay, clip value, beta, 1 - beta, eps1, eps2,
# clip_threshold, sqrt(numel)).


@triton.jit
def _vector_record(rec, DTYPE: tl.constexpr, GDTYPE: tl.constexpr, ALIGNED: tl.constexpr):
    p, g, numel, head, tile0, key = record_fields(rec, DTYPE, GDTYPE, ALIGNED)
    v = tl.load(rec.to(tl.pointer_type(tl.int64), bitcast=True) + 2).to(
        tl.pointer_type(tl.float32))
    if ALIGNED:
        v = tl.multiple_of(v, 16)
    f = (tl.load(rec + _F0), tl.load(rec + _F0 + 1), tl.load(rec + _F0 + 2),
         tl.load(rec + _F0 + 3), tl.load(rec + _F0 + 4), tl.load(rec + _F0 + 5),
         tl.load(rec + _F0 + 6), tl.load(rec + _F0 + 7), tl.load(rec + _F0 + 8))
    return p, g, v, numel, tile0, key, f


@triton.jit(do_not_specialize=["base", "ntensors", "ntiles", "first_tile", "final", "tk"])
def _vector_multi_kernel(
    p_ptr, g_ptr, clip_coef_ptr, found_inf_ptr, grad_sq_ptr, ws_ptr,
    base, ntensors, ntiles, first_tile, final, tk, scale,
    TILE: tl.constexpr, ALIGNED: tl.constexpr, LOSS_SCALE: tl.constexpr,
    CLIP_VALUE: tl.constexpr, HAS_CLIP_COEF: tl.constexpr, HAS_FOUND_INF: tl.constexpr,
    STOCHASTIC: tl.constexpr, GRAD_SQ: tl.constexpr,
):
    """The unfactored tensors of one dtype, in one launch: each tile is summed (MODE 1 of
    _vector_tile) and the last tile of a tensor to finish (integer ticket; a lone tile at once)
    updates all the tensor's tiles from those statistics (MODE 2). The same statistics and the
    same element code as _vector_kernel (MODE 0, or MODE 1 then 2): bitwise the same results.
    (A MODE 0 path for lone tiles here too would cost registers in the whole kernel.)"""
    tt, slots, stats, parts = multi_offsets(base, ntensors, ntiles)
    gtile, t, rec = tile_record(ws_ptr, base, ntensors, first_tile)
    p, g, v, numel, tile0, key, f = _vector_record(rec, p_ptr.dtype.element_ty,
                                                   g_ptr.dtype.element_ty, ALIGNED)
    coef = load_clip_coef(clip_coef_ptr, HAS_CLIP_COEF)
    st_ptr = ws_ptr + stats + 3 * t
    tiles = (numel + TILE - 1) // TILE
    pp, uu, gs, bad = _vector_tile(
        p, g, v, found_inf_ptr, numel, gtile - tile0, key, scale, f[2], coef, f[5], f[3], f[4],
        f[8], f[0], f[6], f[1], f[7], st_ptr, TILE, 1, LOSS_SCALE, CLIP_VALUE, HAS_CLIP_COEF,
        HAS_FOUND_INF, STOCHASTIC)
    done, gs = _vector_finish(ws_ptr, parts, ntiles, gtile, tile0, tiles, st_ptr, tk + t, pp, uu,
                              gs, bad)
    if done:
        tl.debug_barrier()  # the statistics this program just stored, seen by all its threads
        for j in range(tiles):
            _vector_tile(p, g, v, found_inf_ptr, numel, j, key, scale, f[2], coef, f[5], f[3],
                         f[4], f[8], f[0], f[6], f[1], f[7], st_ptr, TILE, 2, LOSS_SCALE,
                         CLIP_VALUE, HAS_CLIP_COEF, HAS_FOUND_INF, STOCHASTIC)
    if GRAD_SQ:
        if done:
            add_sums_in_list_order(ws_ptr, grad_sq_ptr, gs, t, slots, tk, ntensors, final,
                                   ORDER_CHUNK)


# ---------------------------------------------------------------------------------------------
# Launchers
# ---------------------------------------------------------------------------------------------


def _check_state(name, t, numel):
    if t is None or t.dtype != torch.float32 or t.numel() != numel:
        raise ValueError(
            f"adalomo_update_: {name} must be a float32 tensor of {numel} elements, got "
            f"{None if t is None else (t.dtype, t.numel())}"
        )


def launches(shape, stage: int = 0) -> int:
    """Kernel launches of one adalomo_update_ call (with a workspace)."""
    numel = math.prod(shape)
    if len(shape) >= 2:
        if stage == 0:
            return 3 if numel else 0
        return 1 if math.prod(shape[:-2]) * shape[-1] else 0
    if stage == 0:
        return 0 if numel == 0 else 1 if numel <= TILE else 2
    return 0 if stage == 2 or numel == 0 else 1


def need(shape):
    """(data, tickets) of one adalomo_update_ call on ``shape`` (any stage)."""
    if len(shape) >= 2:
        return geometry(tuple(shape))[-1]
    return 4 + 4 * max(1, _l.cdiv(math.prod(shape), TILE)), 1


def multi_need(shapes):
    """(data, tickets) of one adalomo_update_multi_ call on ``shapes``."""
    return _l.multi_need(len(shapes), sum(max(1, _l.cdiv(math.prod(s), TILE))
                                          for s in shapes))


def _empty_stage(stage, workspace, found_inf):
    """A local shard without elements (or without slices): header scalars only, by torch ops
    (no kernel has work; nothing is parameter-sized)."""
    if stage == 1:
        workspace[:3].zero_()
    elif stage == 3 and found_inf is not None:
        found_inf.copy_(torch.maximum(found_inf, (workspace[1:2] > 0).to(found_inf.dtype)))


def adalomo_update_(
    param, grad, exp_avg_sq_row, exp_avg_sq_col, exp_avg_sq, clip_coef, found_inf,
    lr, weight_decay, loss_scale, clip_grad_value, beta, eps1, eps2, clip_threshold,
    rounding, seed, step, grad_sq=None, workspace=None, stage=0, global_rows=0, global_numel=0,
):
    """Triton AdaLomo update of ``param`` and its state in place; same signature and semantics as
    ``reference.adalomo_update_`` (factored when ``exp_avg_sq_row`` is given; ``stage`` 1-3 need
    a workspace)."""
    checks("adalomo_update_", param, grad, clip_coef, found_inf, rounding, grad_sq,
           exp_avg_sq_row=exp_avg_sq_row, exp_avg_sq_col=exp_avg_sq_col, exp_avg_sq=exp_avg_sq,
           workspace=workspace)
    if stage not in (0, 1, 2, 3):
        raise ValueError(f"adalomo_update_: stage must be 0, 1, 2 or 3, got {stage!r}")
    if stage and workspace is None:
        raise ValueError("adalomo_update_: stages 1-3 need a workspace")
    numel = param.numel()
    if stage == 0 and numel == 0:
        return
    factored = exp_avg_sq_row is not None
    mode, scale = loss_scale_args(loss_scale)
    flags = dict(LOSS_SCALE=mode, CLIP_VALUE=clip_grad_value > 0,
                 HAS_CLIP_COEF=clip_coef is not None)
    stochastic = rounding == "stochastic" and param.dtype != torch.float32
    cc = clip_coef if clip_coef is not None else param  # placeholders are never dereferenced
    fi = found_inf if found_inf is not None else param
    gsq = grad_sq if grad_sq is not None else param
    numel_g = global_numel or numel
    if factored:
        if param.dim() < 2:
            raise ValueError("adalomo_update_: a factored state needs a parameter of >= 2 dims")
        S, m, n, SB, BN, nsub, P, need = geometry(tuple(param.shape))
        _check_state("exp_avg_sq_row", exp_avg_sq_row, S * m)
        _check_state("exp_avg_sq_col", exp_avg_sq_col, S * n)
        if S * n == 0:
            return _empty_stage(stage, workspace, found_inf)
        ws, tk = _l.scratch(workspace, *need, param)
        rows_f = f32(global_rows or m)
        # 32-bit offsets when every offset, masked lanes of the last tile included, fits
        index64 = max((S * m + nsub * SB) * n, ws.numel()) >= 2**31
        # 64-bit indices, and rows that are not 16-byte aligned (scalar accesses), take more
        # registers per element: 8 elements per thread then
        wide = index64 or n % 8 != 0
        tile = dict(SB=SB, BN=BN, INDEX64=index64, num_warps=STATS_WARPS if wide else NUM_WARPS,
                    **flags, **_OPTS)
        b32, omb32, cv32 = f32(beta), f32(1.0 - beta), f32(clip_grad_value)
        with _l.device_guard(param):
            if stage in (0, 1):
                _l.launch(_adalomo_stats_kernel, (P,),
                          grad, param, exp_avg_sq_row, cc, gsq, ws, S, m, n, nsub, tk, scale, cv32,
                          f32(eps1), b32, omb32, f32(n), GRAD_SQ=grad_sq is not None,
                          CF=COL_FIN, RF_T=ROW_FIN[0], RF_R=ROW_FIN[1], HF_S=HDR_FIN[0],
                          HF_T=HDR_FIN[1], **dict(tile, num_warps=STATS_WARPS))
            if stage in (0, 2):
                _l.launch(_adalomo_unorm_kernel, (P,),
                          grad, exp_avg_sq_col, cc, ws, S, m, n, nsub, tk, rows_f, scale, cv32, b32,
                          omb32, **tile)
            if stage in (0, 3):
                _l.launch(_adalomo_apply_kernel, (P,),
                          param, grad, exp_avg_sq_row, exp_avg_sq_col, cc, fi, ws, S, m, n, nsub,
                          rows_f, f32(math.sqrt(numel_g)), scale, cv32, f32(lr), f32(eps2),
                          f32(weight_decay), f32(clip_threshold), key_arg(seed, step),
                          HAS_FOUND_INF=found_inf is not None, STOCHASTIC=stochastic, **tile)
        return
    _check_state("exp_avg_sq", exp_avg_sq, numel)
    if numel == 0:
        return _empty_stage(stage, workspace, found_inf)
    if numel >= _l.MAX_SMALL:
        raise ValueError("adalomo_update_: an unfactored parameter needs fewer than 2**31 - 2**13 "
                         "elements on the Triton backend")
    ntiles = _l.cdiv(numel, TILE)
    # a float32 placeholder (never dereferenced) unless partial sums need a workspace
    ws, tk = workspace if workspace is not None else exp_avg_sq, 0
    if stage or ntiles > 1:
        ws, tk = _l.scratch(workspace, 4 + 4 * ntiles, 1, param)
    args = (param, grad, exp_avg_sq, cc, fi, gsq, ws, numel, tk, scale, f32(clip_grad_value),
            f32(eps1), f32(beta), f32(1.0 - beta), f32(math.sqrt(numel_g)), f32(lr), f32(eps2),
            f32(weight_decay), f32(clip_threshold), key_arg(seed, step))
    kw = dict(TILE=TILE, HAS_FOUND_INF=found_inf is not None, STOCHASTIC=stochastic,
              GRAD_SQ=grad_sq is not None, num_warps=VECTOR_WARPS, **flags, **_OPTS)
    modes = (0,) if stage == 0 and ntiles == 1 else (1, 2) if stage == 0 else (
        (1,) if stage == 1 else (2,) if stage == 3 else ())
    with _l.device_guard(param):
        for mode_ in modes:
            _l.launch(_vector_kernel, (ntiles,), *args, MODE=mode_, **kw)


def adalomo_update_multi_(
    params, grads, exp_avg_sqs, clip_coef, found_inf, lr, weight_decay, loss_scale,
    clip_grad_value, beta, eps1, eps2, clip_threshold, rounding, seed, step, grad_sq=None,
    workspace=None,
):
    """Triton AdaLomo update of every unfactored tensor of ``params`` (one launch per dtype), each
    bitwise as ``adalomo_update_`` leaves it; per-tensor scalars as lists
    (ops.adalomo_update_multi_)."""
    multi_checks("adalomo_update_multi_", params, grads, clip_coef, found_inf, rounding, grad_sq,
                 exp_avg_sqs)
    for p, v in zip(params, exp_avg_sqs):
        if p.dim() > 1 or v.dtype != torch.float32 or v.numel() != p.numel():
            if p.dim() > 1:
                raise ValueError("adalomo_update_multi_: takes 0-d and 1-d tensors only, got "
                                 f"shape {tuple(p.shape)}")
            _check_state("exp_avg_sq", v, p.numel())
    (params, grads, exp_avg_sqs, lr, weight_decay, clip_grad_value, beta, eps1, eps2,
     clip_threshold, seed, step) = _l.drop_empty(params, grads, exp_avg_sqs, lr, weight_decay,
                                                 clip_grad_value, beta, eps1, eps2,
                                                 clip_threshold, seed, step)
    k = len(params)
    if k == 0:
        return
    first = params[0]
    ntiles = sum(_l.cdiv(p.numel(), TILE) for p in params)
    ws, tk = _l.scratch(workspace, *_l.multi_need(k, ntiles), first)
    groups = _l.group_by_dtype(params, grads)
    table = _l.Table(ws, k, ntiles)
    tiles, firsts, aligned = _l.fill_records(table, params, grads, TILE, seed, step, groups,
                                             exp_avg_sqs, peel=False)
    f = table.floats
    numel = table.records[:, _l.NUMEL].astype(np.float64)
    beta64 = np.asarray(beta, dtype=np.float64)
    cgv = np.asarray(clip_grad_value, dtype=np.float64)
    for j, values in enumerate((lr, weight_decay, np.where(cgv > 0, cgv, np.inf), beta64,
                                1.0 - beta64, eps1, eps2, clip_threshold, np.sqrt(numel))):
        f[:, _l.F0 + j] = _l.f32s(values)
    table.send()
    mode, scale = loss_scale_args(loss_scale)
    with _l.device_guard(first):
        for n, idx in enumerate(groups):
            p0 = params[idx[0]]
            count = int(tiles[idx].sum())
            _l.launch(
                _vector_multi_kernel, (count,),
                p0, grads[idx[0]], clip_coef if clip_coef is not None else p0,
                found_inf if found_inf is not None else p0,
                grad_sq if grad_sq is not None else p0, ws,
                table.base, k, ntiles, firsts[n], len(idx) if n == len(groups) - 1 else 0, tk,
                scale, TILE=TILE, ALIGNED=aligned, LOSS_SCALE=mode,
                CLIP_VALUE=bool((cgv > 0).any()), HAS_CLIP_COEF=clip_coef is not None,
                HAS_FOUND_INF=found_inf is not None,
                STOCHASTIC=rounding == "stochastic" and p0.dtype != torch.float32,
                GRAD_SQ=grad_sq is not None, num_warps=VECTOR_WARPS, maxnreg=MULTI_MAX_REGISTERS,
                **_OPTS,
            )
