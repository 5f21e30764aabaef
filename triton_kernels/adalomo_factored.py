"""AdaLomo on factored (>= 2-D) parameters: the three passes described in adalomo_update.py
(_adalomo_stats_kernel, _adalomo_unorm_kernel, _adalomo_apply_kernel) and the tiling they share
(_layout; its host copy is adalomo_update.geometry)."""

import triton
import triton.language as tl

from .adalomo_math import rsqrt_rn, step_scalars, update_elements
from .lomo_update import add_to
from .reduce import PARTS, last_arrival, sum_parts
from .rounding import is_finite, load_clip_coef, round_span, unscale_clip


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
        # masked lanes read 0: finite, and nothing in the sums below (other=: Triton leaves
        # them undefined without it)
        g = tl.load((g_ptr + first)[:, None] + cols[None, :], mask=mask, other=0.0).to(
            tl.float32)
        p = tl.load((p_ptr + first)[:, None] + cols[None, :], mask=mask, other=0.0).to(
            tl.float32)
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
    cf = rsqrt_rn(c)
    mean_r = tl.math.div_rn(tl.load(ws_ptr + sum_r + b), rows_f)
    if pm == 0:  # kept for pass 3, which commits it
        tl.store(ws_ptr + new_c + b * n + cols, c, mask=cmask)
    uu = tl.full([SB], 0, tl.float32)
    for it in range(nsub):
        rows = pm * R + it * SB + tl.arange(0, SB)
        rmask = rows < m
        mask = rmask[:, None] & cmask[None, :]
        r = tl.load(ws_ptr + new_r + b * m + rows, mask=rmask, other=1.0)
        rf = rsqrt_rn(tl.math.div_rn(r, mean_r))  # rsqrt(r / mean(r))
        g = tl.load((g_ptr + (b * m + rows) * n)[:, None] + cols[None, :], mask=mask, other=0.0)
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
        rf = rsqrt_rn(tl.math.div_rn(r, mean_r))
        g = tl.load((g_ptr + first)[:, None] + cols[None, :], mask=mask, other=0.0)
        gu, g = unscale_clip(g.to(tl.float32), scale, clip_value, coef, LOSS_SCALE, CLIP_VALUE,
                             HAS_CLIP_COEF)
        p = tl.load(p_at, mask=mask, other=0.0).to(tl.float32)
        new = update_elements(p, (rf[:, None] * cf[None, :]) * g, denom, lr_t, decay, DIVIDE)
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
        lr_t, decay, denom = step_scalars(tl.load(ws_ptr), tl.load(ws_ptr + 2), sqrt_numel, lr,
                                          eps2, weight_decay, clip_threshold)
        cols = (pn * BN).to(tl.int32) + tl.arange(0, BN)
        cmask = cols < n
        c = tl.load(ws_ptr + new_c + b * n + cols, mask=cmask, other=1.0)  # from pass 2
        cf = rsqrt_rn(c)
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
