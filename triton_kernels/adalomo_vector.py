"""AdaLomo on unfactored (0-d, 1-d) parameters: _vector_kernel (one tensor: one launch, or a
statistics launch and an apply launch when it has more than one tile) and _vector_multi_kernel (a
list of tensors of one dtype in one launch), the same tile code in both (see adalomo_update.py)."""

import triton
import triton.language as tl

from .adalomo_math import rsqrt_rn, step_scalars, update_elements
from .launch import _F0, multi_offsets, record_fields, tile_record
from .lomo_update import add_sums_in_list_order, add_to
from .reduce import PARTS, last_arrival, sum_parts
from .rounding import is_finite, load_clip_coef, load_lanes, round_span, unscale_clip

ORDER_CHUNK = tl.constexpr(16)  # per-tensor sums loaded at once (list-order grad_sq)


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
    # masked lanes: g = p = 0 (finite, nothing in the sums), v = 1 (a finite rsqrt)
    g = load_lanes(g_ptr + offs, mask, 0.0).to(tl.float32)
    p = load_lanes(p_ptr + offs, mask, 0.0).to(tl.float32)
    v = load_lanes(v_ptr + offs, mask, 1.0)
    finite = is_finite(g)  # of the raw gradient
    gu, g = unscale_clip(g, scale, clip_value, clip_coef, LOSS_SCALE, CLIP_VALUE, HAS_CLIP_COEF)
    zero = tl.full([], 0, tl.float32)
    pp, uu, gs, bad = zero, zero, zero, zero
    if MODE != 2:
        gs = tl.sum(gu * gu)
        pp = tl.sum(p * p)
        bad = tl.max((~finite).to(tl.float32))
    v = tl.fma(omb, g * g + eps1, beta * v)  # torch.add(v * beta, G, alpha=1-beta)
    u = rsqrt_rn(v) * g
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
            lr_t, decay, denom = step_scalars(sum_pp, sum_uu, sqrt_numel, lr, eps2, weight_decay,
                                              clip_threshold)
            if denom == 1.0:
                new = update_elements(p, u, denom, lr_t, decay, False)
            else:
                new = update_elements(p, u, denom, lr_t, decay, True)
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
