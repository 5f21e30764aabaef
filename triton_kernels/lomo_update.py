"""Fused LOMO update (docs/spec.md "LOMO"): one pass over memory.

    g = preprocess(g)                         # / loss_scale, clamp, * clip_coef
    p = fma(-lr, g, p * (1 - lr * weight_decay))

Bytes moved: read p, read g, write p = 3 * sizeof(dtype) per element (6 B for bf16/fp16,
12 B for fp32), nothing else parameter-sized: the roofline is a copy of 2 tensors into 1.

One program per BLOCK elements. A view whose data does not start on a 16-byte boundary, with its
gradient equally misaligned, is peeled: block 0 also updates the few elements before the first
boundary and every block moves the rest in 16-byte vectors. ``found_inf`` is stored by the lanes
that see a non-finite gradient (no reduction). ``grad_sq``: each program sums its squares; a lone
program adds its sum itself, otherwise the last program (integer ticket) adds the partials in a
fixed order. ``lomo_update_multi_`` runs the same per-block code on every tensor of a list in one
launch per dtype, so each tensor ends bitwise as ``lomo_update_`` leaves it.
"""

import math

import numpy as np
import torch
import triton
import triton.language as tl

from . import launch as _l
from .launch import _F0, multi_offsets, record_fields, tile_record
from .reduce import PARTS, add_in_order, last_arrival, sum_parts
from .rounding import check_tensors, f32, is_finite, key_arg, load_clip_coef, load_lanes
from .rounding import loss_scale_args, round_span, unscale_clip

# 4096 elements = 16 per thread with 8 warps: two 16-byte vector loads of each bf16 input per
# thread, enough bytes in flight per SM to saturate HBM on H100 without a loop.
BLOCK = 4096
NUM_WARPS = 8
# fp16 stochastic rounding needs about twice the registers per element: 8 per thread there
SR_FP16_WARPS = 16
HEAD = tl.constexpr(8)  # room for the peeled head: at most 7 (2-byte dtypes) or 3 (fp32) elements
ORDER_CHUNK = tl.constexpr(16)  # per-tensor sums loaded at once when they are added in list order


@triton.jit
def _lomo_elems(p_ptr, g_ptr, offs, first, mask, found_inf_ptr, key, decay, neg_lr, scale,
                clip_value, clip_coef, LOSS_SCALE: tl.constexpr, CLIP_VALUE: tl.constexpr,
                HAS_CLIP_COEF: tl.constexpr, HAS_FOUND_INF: tl.constexpr,
                STOCHASTIC: tl.constexpr, GRAD_SQ: tl.constexpr, HEAD_BLOCK: tl.constexpr,
                INDEX64: tl.constexpr):
    """Update the elements ``offs`` (int32) of ``p_ptr``, whose flat indices in the tensor are
    ``first + offs`` (for the hash; ``mask`` None for a full block); returns their sum of
    unscaled squared gradients."""
    p = load_lanes(p_ptr + offs, mask, 0.0)
    g = load_lanes(g_ptr + offs, mask, 0.0).to(tl.float32)  # masked lanes: 0, finite, gsq + 0
    finite = is_finite(g)  # of the raw gradient, before unscaling
    gu, g = unscale_clip(g, scale, clip_value, clip_coef, LOSS_SCALE, CLIP_VALUE, HAS_CLIP_COEF)
    gsq = tl.full([], 0, tl.float32)
    if GRAD_SQ:
        gsq = tl.sum(gu * gu)
    # reference: torch.add(p * decay, g, alpha=-lr), one fused multiply-add
    new = tl.fma(neg_lr, g, p.to(tl.float32) * decay)
    new = round_span(new, first, offs, key, p_ptr.dtype.element_ty, STOCHASTIC, INDEX64)
    # A select, not a data-dependent store mask, so the store stays a 16-byte vector store.
    tl.store(p_ptr + offs, tl.where(finite, new, p), mask=mask)
    if HAS_FOUND_INF:
        # Each thread ORs the flags of its own 16 contiguous bytes (no shuffle, no barrier), and
        # only threads that saw a NaN/Inf store (the same 1.0): no block reduction, no atomics.
        # A masked-off lane never raises the flag: its g is the finite 0.0 of other= (gating the
        # body's flags by the mask as well costs fp32 LOMO 28 registers per thread, 67 -> 95).
        if HEAD_BLOCK:  # a few elements: one store each
            tl.store(found_inf_ptr + offs * 0, 1.0, mask=~finite & mask)
        else:
            VEC: tl.constexpr = 128 // p_ptr.dtype.element_ty.primitive_bitwidth
            n: tl.constexpr = offs.shape[0] // VEC
            bad = tl.max(tl.reshape((~finite).to(tl.int32), [n, VEC]), axis=1)
            tl.store(found_inf_ptr + tl.full([n], 0, tl.int32), 1.0, mask=bad > 0)
    return gsq


@triton.jit
def _lomo_tile(p_ptr, g_ptr, found_inf_ptr, numel, head, tile, key, decay, neg_lr, scale,
               clip_value, clip_coef, BLOCK: tl.constexpr, ALIGNED: tl.constexpr,
               LOSS_SCALE: tl.constexpr, CLIP_VALUE: tl.constexpr, HAS_CLIP_COEF: tl.constexpr,
               HAS_FOUND_INF: tl.constexpr, STOCHASTIC: tl.constexpr, GRAD_SQ: tl.constexpr,
               INDEX64: tl.constexpr):
    """Block ``tile`` of the body (the elements from ``head`` on) of one tensor, and the head too
    in block 0; returns the block's sum of unscaled squared gradients."""
    if INDEX64:
        start = tile.to(tl.int64) * BLOCK
    else:
        start = tile * BLOCK
    # 64-bit arithmetic once per block (the block's base pointers), 32-bit per element
    pb = p_ptr + head + start
    gb = g_ptr + head + start
    if ALIGNED:  # the body starts on a 16-byte boundary in both tensors (so does every block)
        pb = tl.multiple_of(pb, 16)
        gb = tl.multiple_of(gb, 16)
    local = tl.arange(0, BLOCK)
    if start + BLOCK <= numel - head:  # full block: no mask, vector accesses for any numel
        gsq = _lomo_elems(pb, gb, local, start + head, None, found_inf_ptr, key, decay, neg_lr,
                          scale, clip_value, clip_coef, LOSS_SCALE, CLIP_VALUE, HAS_CLIP_COEF,
                          HAS_FOUND_INF, STOCHASTIC, GRAD_SQ, False, INDEX64)
    else:
        gsq = _lomo_elems(pb, gb, local, start + head, local < numel - head - start,
                          found_inf_ptr, key, decay, neg_lr, scale, clip_value, clip_coef,
                          LOSS_SCALE, CLIP_VALUE, HAS_CLIP_COEF, HAS_FOUND_INF, STOCHASTIC,
                          GRAD_SQ, False, INDEX64)
    if (tile == 0) & (head > 0):  # the peeled head, element by element
        h = tl.arange(0, HEAD)
        gsq += _lomo_elems(p_ptr, g_ptr, h, 0, h < head, found_inf_ptr, key, decay, neg_lr,
                           scale, clip_value, clip_coef, LOSS_SCALE, CLIP_VALUE, HAS_CLIP_COEF,
                           HAS_FOUND_INF, STOCHASTIC, GRAD_SQ, True, False)
    return gsq


@triton.jit
def add_to(ptr, value):
    """``*ptr += value`` by the one program that owns ``ptr`` at this point."""
    tl.store(ptr, tl.load(ptr, cache_modifier=".cg") + value)


@triton.jit(do_not_specialize=["numel", "head", "key", "tk"],
            do_not_specialize_on_alignment=["p_ptr", "g_ptr"])
def _lomo_update_kernel(
    p_ptr, g_ptr, clip_coef_ptr, found_inf_ptr, grad_sq_ptr, ws_ptr,
    numel, head, decay, neg_lr, scale, clip_value, key, tk,
    BLOCK: tl.constexpr,
    # On/off features are compile-time so a disabled one costs nothing per element; they are fixed
    # for a training run. Per-step values (lr, key, loss scale value, clip_coef) and sizes are
    # runtime arguments: a new lr, step or shape never recompiles. ALIGNED stands for the 16-byte
    # alignment of the body (after the peeled head), so aligned and peeled views share a variant.
    ALIGNED: tl.constexpr, LOSS_SCALE: tl.constexpr, CLIP_VALUE: tl.constexpr,
    HAS_CLIP_COEF: tl.constexpr, HAS_FOUND_INF: tl.constexpr, STOCHASTIC: tl.constexpr,
    GRAD_SQ: tl.constexpr, INDEX64: tl.constexpr,
):
    pid = tl.program_id(0)
    gsq = _lomo_tile(p_ptr, g_ptr, found_inf_ptr, numel, head, pid, key, decay, neg_lr, scale,
                     clip_value, load_clip_coef(clip_coef_ptr, HAS_CLIP_COEF), BLOCK, ALIGNED,
                     LOSS_SCALE, CLIP_VALUE, HAS_CLIP_COEF, HAS_FOUND_INF, STOCHASTIC, GRAD_SQ,
                     INDEX64)
    if GRAD_SQ:
        ntiles = tl.num_programs(0)
        if ntiles == 1:
            add_to(grad_sq_ptr, gsq)
        else:  # workspace: partials in [4, 4 + ntiles), the ticket at tk
            tl.store(ws_ptr + 4 + pid, gsq)
            if last_arrival(ws_ptr, tk, ntiles):
                add_to(grad_sq_ptr, sum_parts(ws_ptr + 4, ntiles, PARTS))


@triton.jit
def add_sums_in_list_order(ws_ptr, grad_sq_ptr, gsq, t, slots, tk, ntensors, final,
                           CHUNK: tl.constexpr):
    """Multi-tensor grad_sq, called once per tensor ``t`` with its final sum: the sums of the
    whole list are added to grad_sq in list order (as the single-tensor ops called in a loop add
    them) by the last tensor to finish in the launch of the last dtype group (``final``: its
    number of tensors; 0 in the other launches)."""
    tl.store(ws_ptr + slots + t, gsq)
    if final != 0:
        if last_arrival(ws_ptr, tk + ntensors, final):
            acc = tl.load(grad_sq_ptr, cache_modifier=".cg")
            tl.store(grad_sq_ptr, add_in_order(acc, ws_ptr + slots, ntensors, CHUNK))


@triton.jit(do_not_specialize=["base", "ntensors", "ntiles", "first_tile", "final", "tk"])
def _lomo_update_multi_kernel(
    p_ptr, g_ptr, clip_coef_ptr, found_inf_ptr, grad_sq_ptr, ws_ptr,
    base, ntensors, ntiles, first_tile, final, tk, scale,
    BLOCK: tl.constexpr, ALIGNED: tl.constexpr, LOSS_SCALE: tl.constexpr,
    CLIP_VALUE: tl.constexpr, HAS_CLIP_COEF: tl.constexpr, HAS_FOUND_INF: tl.constexpr,
    STOCHASTIC: tl.constexpr, GRAD_SQ: tl.constexpr,
):
    """The tensors of one dtype (``p_ptr``, ``g_ptr``: the first of them, for the parameters' and
    the gradients' dtypes); program ``pid``
    updates tile ``first_tile + pid`` of the call's tile table (launch.multi_layout)."""
    tt, slots, stats, parts = multi_offsets(base, ntensors, ntiles)
    gtile, t, rec = tile_record(ws_ptr, base, ntensors, first_tile)
    # (ALIGNED is about the bodies, after each head: _lomo_tile states it, not the record)
    p, g, numel, head, tile0, key = record_fields(rec, p_ptr.dtype.element_ty,
                                                  g_ptr.dtype.element_ty, False)
    gsq = _lomo_tile(p, g, found_inf_ptr, numel, head, gtile - tile0, key, tl.load(rec + _F0),
                     tl.load(rec + _F0 + 1), scale, tl.load(rec + _F0 + 2),
                     load_clip_coef(clip_coef_ptr, HAS_CLIP_COEF), BLOCK, ALIGNED, LOSS_SCALE,
                     CLIP_VALUE, HAS_CLIP_COEF, HAS_FOUND_INF, STOCHASTIC, GRAD_SQ, False)
    if GRAD_SQ:
        # this tensor's sum formed as _lomo_update_kernel forms it: one block's own, or the
        # fixed-order sum of its blocks' partials by the last of them
        tiles = tl.maximum(1, (numel - head + BLOCK - 1) // BLOCK)
        done = tiles == 1
        if tiles > 1:
            tl.store(ws_ptr + parts + gtile, gsq)
            done = last_arrival(ws_ptr, tk + t, tiles)
            if done:
                gsq = sum_parts(ws_ptr + parts + tile0, tiles, PARTS)
        if done:
            add_sums_in_list_order(ws_ptr, grad_sq_ptr, gsq, t, slots, tk, ntensors, final,
                                   ORDER_CHUNK)


def _warps(dtype, rounding) -> int:
    return SR_FP16_WARPS if dtype == torch.float16 and rounding == "stochastic" else NUM_WARPS


def checks(op, param, grad, clip_coef, found_inf, rounding, grad_sq, **state):
    """What the launchers check themselves (ops.py checks the rest for its entry points)."""
    check_tensors(op, param, grad, clip_coef=clip_coef, found_inf=found_inf, grad_sq=grad_sq,
                  **state)
    for name, t in (("clip_coef", clip_coef), ("found_inf", found_inf), ("grad_sq", grad_sq)):
        if t is not None and (t.numel() < 1 or not t.is_floating_point()):
            raise ValueError(f"{op}: {name} must be a 1-element float tensor")
    if rounding not in ("nearest", "stochastic"):
        raise ValueError(f"{op}: rounding must be 'nearest' or 'stochastic', got {rounding!r}")


def multi_checks(op, params, grads, clip_coef, found_inf, rounding, grad_sq, states=None):
    """``checks`` for a list: the shared tensors once, then each tensor's own (a few attribute
    reads per tensor; the full checks only to word the error)."""
    if len(grads) != len(params) or (states is not None and len(states) != len(params)):
        raise ValueError(f"{op}: params, grads (and exp_avg_sqs) differ in length")
    if not params:
        return
    p0 = params[0]
    checks(op, p0, grads[0], clip_coef, found_inf, rounding, grad_sq)
    device = p0.device
    for i, (p, g) in enumerate(zip(params, grads)):
        v = states[i] if states is not None else p
        if not (g.dtype in (p.dtype, torch.float32) and g.numel() == p.numel()
                and p.is_contiguous()
                and g.is_contiguous() and v.is_contiguous() and p.device == device
                and g.device == device and v.device == device):
            check_tensors(op, p, g, first_param=p0, exp_avg_sq=v)


def need(shape):
    """(data, tickets) of one lomo_update_ call: header and one partial per block; one ticket."""
    return 4 + max(1, _l.cdiv(math.prod(shape), BLOCK)), 1


def lomo_update_(
    param, grad, clip_coef, found_inf, lr, weight_decay, loss_scale, clip_grad_value,
    rounding, seed, step, grad_sq=None, workspace=None,
):
    """Triton LOMO update of ``param`` in place; same signature and result as
    ``reference.lomo_update_`` (stochastic rounding bit for bit)."""
    checks("lomo_update_", param, grad, clip_coef, found_inf, rounding, grad_sq)
    numel = param.numel()
    if numel == 0:
        return
    head, aligned = _l.peel(param, grad)
    ntiles = max(1, _l.cdiv(numel - head, BLOCK))
    # 32-bit tile offsets only when the last tile's end (start + BLOCK, and head + start) stays
    # below 2**31: otherwise the full-block test wraps and the last tile runs past the tensor
    index64 = head + ntiles * BLOCK >= 2**31
    # the workspace holds the partial sums of grad_sq; otherwise a float32 placeholder (never
    # dereferenced) keeps the kernel signature, hence the compiled variant, the same
    ws, tk = workspace if workspace is not None else grad_sq, 0
    if grad_sq is not None and ntiles > 1:
        ws, tk = _l.scratch(workspace, 4 + ntiles, 1, param)
    elif ws is None:
        ws = param
    mode, scale = loss_scale_args(loss_scale)
    with _l.device_guard(param):
        _l.launch(
            _lomo_update_kernel, (ntiles,),
            param, grad,
            clip_coef if clip_coef is not None else param,  # placeholders: never dereferenced
            found_inf if found_inf is not None else param,
            grad_sq if grad_sq is not None else param, ws,
            numel, head, f32(1.0 - lr * weight_decay), f32(-lr), scale, f32(clip_grad_value),
            key_arg(seed, step), tk,
            BLOCK=BLOCK, ALIGNED=aligned, LOSS_SCALE=mode, CLIP_VALUE=clip_grad_value > 0,
            HAS_CLIP_COEF=clip_coef is not None, HAS_FOUND_INF=found_inf is not None,
            STOCHASTIC=rounding == "stochastic" and param.dtype != torch.float32,
            GRAD_SQ=grad_sq is not None, INDEX64=index64,
            num_warps=_warps(param.dtype, rounding),
        )


def multi_tiles(shapes) -> int:
    return sum(max(1, _l.cdiv(math.prod(s), BLOCK)) for s in shapes)


def multi_need(shapes):
    """(data, tickets) of one lomo_update_multi_ call on ``shapes``."""
    return _l.multi_need(len(shapes), multi_tiles(shapes))


def lomo_update_multi_(
    params, grads, clip_coef, found_inf, lr, weight_decay, loss_scale, clip_grad_value,
    rounding, seed, step, grad_sq=None, workspace=None,
):
    """Triton LOMO update of every tensor of ``params`` (one launch per dtype), each bitwise as
    ``lomo_update_`` leaves it; per-tensor scalars as lists (ops.lomo_update_multi_)."""
    multi_checks("lomo_update_multi_", params, grads, clip_coef, found_inf, rounding, grad_sq)
    params, grads, lr, weight_decay, clip_grad_value, seed, step = _l.drop_empty(
        params, grads, lr, weight_decay, clip_grad_value, seed, step)
    k = len(params)
    if k == 0:
        return
    first = params[0]
    ntiles = multi_tiles([p.shape for p in params])
    ws, tk = _l.scratch(workspace, *_l.multi_need(k, ntiles), first)
    groups = _l.group_by_dtype(params, grads)
    table = _l.Table(ws, k, ntiles)
    tiles, firsts, aligned = _l.fill_records(table, params, grads, BLOCK, seed, step, groups)
    lr64 = np.asarray(lr, dtype=np.float64)
    cgv = np.asarray(clip_grad_value, dtype=np.float64)
    f = table.floats
    f[:, _l.F0] = _l.f32s(1.0 - lr64 * np.asarray(weight_decay, dtype=np.float64))
    f[:, _l.F0 + 1] = _l.f32s(-lr64)
    f[:, _l.F0 + 2] = np.where(cgv > 0, _l.f32s(cgv), np.inf)  # off: a clamp to +-inf is exact
    mode, scale = loss_scale_args(loss_scale)
    with _l.device_guard(first):
        table.send()  # on the stream of the parameters' device, before the launches that read it
        for n, idx in enumerate(groups):
            p0 = params[idx[0]]
            _l.launch(
                _lomo_update_multi_kernel, (int(tiles[idx].sum()),),
                p0, grads[idx[0]], clip_coef if clip_coef is not None else p0,
                found_inf if found_inf is not None else p0,
                grad_sq if grad_sq is not None else p0, ws,
                table.base, k, ntiles, firsts[n], len(idx) if n == len(groups) - 1 else 0, tk,
                scale,
                BLOCK=BLOCK, ALIGNED=aligned, LOSS_SCALE=mode, CLIP_VALUE=bool((cgv > 0).any()),
                HAS_CLIP_COEF=clip_coef is not None, HAS_FOUND_INF=found_inf is not None,
                STOCHASTIC=rounding == "stochastic" and p0.dtype != torch.float32,
                GRAD_SQ=grad_sq is not None, num_warps=_warps(p0.dtype, rounding),
            )
