"""Gradient accumulation (docs/spec.md "Gradient accumulation"): one pass over memory.

    buf = round(g / loss_scale)            # the window's first gradient (buf is not read)
    buf = round(buf + g / loss_scale)      # the others

``buf`` is float32 or the gradient's dtype (rounded to nearest or stochastically with the hash of
reference.py, bit for bit). ``buf_sq`` (when given) is SET to sum(buf_new**2): each program sums
its stored values squared; a lone program writes its sum, otherwise the last program (integer
ticket) writes the partials' sum in a fixed order. One program per BLOCK elements; a buffer and
gradient whose data do not start on a 16-byte boundary are peeled up to the first element where
both do (launch.peel), the rest moves in 16-byte vectors.
"""

import math

import torch
import triton
import triton.language as tl

from . import launch as _l
from .reduce import PARTS, last_arrival, sum_parts
from .rounding import is_finite, key_arg, loss_scale_args, round_span

BLOCK = 4096
NUM_WARPS = 8
SR_FP16_WARPS = 16  # fp16 stochastic rounding needs about twice the registers per element
HEAD = tl.constexpr(8)  # room for the peeled head: at most 7 (2-byte dtypes) or 3 (fp32) elements


@triton.jit
def _acc_elems(b_ptr, g_ptr, offs, first, mask, found_inf_ptr, key, scale,
               LOSS_SCALE: tl.constexpr, FIRST: tl.constexpr, HAS_FOUND_INF: tl.constexpr,
               STOCHASTIC: tl.constexpr, BUF_SQ: tl.constexpr, FULL: tl.constexpr,
               INDEX64: tl.constexpr):
    """Accumulate into the elements ``offs`` of ``b_ptr`` (flat indices ``first + offs``, for the
    hash; ``mask`` unused when FULL); returns the sum of their new values squared."""
    if FULL:
        g = tl.load(g_ptr + offs).to(tl.float32)
    else:
        g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    if LOSS_SCALE == 1:  # an exact power-of-two reciprocal
        g = g * scale
    elif LOSS_SCALE == 2:
        g = tl.math.div_rn(g, scale)
    if FIRST:
        new = g
    elif FULL:
        new = tl.load(b_ptr + offs).to(tl.float32) + g
    else:
        new = tl.load(b_ptr + offs, mask=mask, other=0.0).to(tl.float32) + g
    out = round_span(new, first, offs, key, b_ptr.dtype.element_ty, STOCHASTIC, INDEX64)
    if FULL:
        tl.store(b_ptr + offs, out)
    else:
        tl.store(b_ptr + offs, out, mask=mask)
    s = out.to(tl.float32)  # masked lanes hold 0: finite, adding nothing
    sq = tl.full([], 0, tl.float32)
    if BUF_SQ:
        sq = tl.sum(s * s)
    if HAS_FOUND_INF:
        bad = tl.max((~is_finite(s)).to(tl.int32))
        tl.store(found_inf_ptr, 1.0, mask=bad > 0)
    return sq


@triton.jit
def _acc_tile(b_ptr, g_ptr, found_inf_ptr, numel, head, tile, key, scale, BLOCK: tl.constexpr,
              ALIGNED: tl.constexpr, LOSS_SCALE: tl.constexpr, FIRST: tl.constexpr,
              HAS_FOUND_INF: tl.constexpr, STOCHASTIC: tl.constexpr, BUF_SQ: tl.constexpr,
              INDEX64: tl.constexpr):
    """Block ``tile`` of the body (the elements from ``head`` on), and the head in block 0."""
    if INDEX64:
        start = tile.to(tl.int64) * BLOCK
    else:
        start = tile * BLOCK
    bb = b_ptr + head + start
    gb = g_ptr + head + start
    if ALIGNED:  # the body starts on a 16-byte boundary in both tensors
        bb = tl.multiple_of(bb, 16)
        gb = tl.multiple_of(gb, 16)
    local = tl.arange(0, BLOCK)
    if start + BLOCK <= numel - head:  # full block: no mask, vector accesses
        sq = _acc_elems(bb, gb, local, start + head, None, found_inf_ptr, key, scale, LOSS_SCALE,
                        FIRST, HAS_FOUND_INF, STOCHASTIC, BUF_SQ, True, INDEX64)
    else:
        sq = _acc_elems(bb, gb, local, start + head, local < numel - head - start, found_inf_ptr,
                        key, scale, LOSS_SCALE, FIRST, HAS_FOUND_INF, STOCHASTIC, BUF_SQ, False,
                        INDEX64)
    if (tile == 0) & (head > 0):  # the peeled head, element by element
        h = tl.arange(0, HEAD)
        sq += _acc_elems(b_ptr, g_ptr, h, 0, h < head, found_inf_ptr, key, scale, LOSS_SCALE,
                         FIRST, HAS_FOUND_INF, STOCHASTIC, BUF_SQ, False, False)
    return sq


@triton.jit(do_not_specialize=["numel", "head", "key", "tk"],
            do_not_specialize_on_alignment=["b_ptr", "g_ptr"])
def _grad_accumulate_kernel(
    b_ptr, g_ptr, found_inf_ptr, buf_sq_ptr, ws_ptr, numel, head, scale, key, tk,
    BLOCK: tl.constexpr, ALIGNED: tl.constexpr, LOSS_SCALE: tl.constexpr, FIRST: tl.constexpr,
    HAS_FOUND_INF: tl.constexpr, STOCHASTIC: tl.constexpr, BUF_SQ: tl.constexpr,
    INDEX64: tl.constexpr,
):
    pid = tl.program_id(0)
    sq = _acc_tile(b_ptr, g_ptr, found_inf_ptr, numel, head, pid, key, scale, BLOCK, ALIGNED,
                   LOSS_SCALE, FIRST, HAS_FOUND_INF, STOCHASTIC, BUF_SQ, INDEX64)
    if BUF_SQ:
        ntiles = tl.num_programs(0)
        if ntiles == 1:
            tl.store(buf_sq_ptr, sq)
        else:  # workspace: partials in [4, 4 + ntiles), the ticket at tk
            tl.store(ws_ptr + 4 + pid, sq)
            if last_arrival(ws_ptr, tk, ntiles):
                tl.store(buf_sq_ptr, sum_parts(ws_ptr + 4, ntiles, PARTS))


def need(shape):
    """(data, tickets) of one call: header and one partial per block; one ticket."""
    return 4 + max(1, _l.cdiv(math.prod(shape), BLOCK)), 1


def grad_accumulate_(buf, grad, found_inf, loss_scale, first, rounding, seed, step, buf_sq=None,
                     workspace=None):
    """Triton accumulation into ``buf`` in place; same signature and result as
    ``reference.grad_accumulate_`` (stochastic rounding bit for bit)."""
    op = "grad_accumulate_"
    if grad.numel() != buf.numel() or buf.dtype not in (torch.float32, grad.dtype):
        raise ValueError(f"{op}: grad ({grad.dtype}, {grad.numel()} elements) does not fit buf "
                         f"({buf.dtype}, {buf.numel()} elements)")
    for name, t in (("buf", buf), ("grad", grad), ("found_inf", found_inf), ("buf_sq", buf_sq)):
        if t is not None and (not t.is_contiguous() or t.device != buf.device):
            raise ValueError(f"{op}: {name} must be contiguous, on {buf.device}")
    if rounding not in ("nearest", "stochastic"):
        raise ValueError(f"{op}: rounding must be 'nearest' or 'stochastic', got {rounding!r}")
    numel = buf.numel()
    if numel == 0:
        if buf_sq is not None:
            buf_sq.zero_()
        return
    head, aligned = _l.peel(buf, grad)
    ntiles = max(1, _l.cdiv(numel - head, BLOCK))
    ws, tk = workspace if workspace is not None else buf_sq, 0
    if buf_sq is not None and ntiles > 1:
        ws, tk = _l.scratch(workspace, 4 + ntiles, 1, buf)
    elif ws is None:
        ws = buf
    mode, scale = loss_scale_args(loss_scale)
    stochastic = rounding == "stochastic" and buf.dtype != torch.float32
    with _l.device_guard(buf):
        _l.launch(
            _grad_accumulate_kernel, (ntiles,),
            buf, grad,
            found_inf if found_inf is not None else buf,  # placeholders: never dereferenced
            buf_sq if buf_sq is not None else buf, ws,
            numel, head, scale, key_arg(seed, step), tk,
            BLOCK=BLOCK, ALIGNED=aligned, LOSS_SCALE=mode, FIRST=bool(first),
            HAS_FOUND_INF=found_inf is not None, STOCHASTIC=stochastic,
            BUF_SQ=buf_sq is not None, INDEX64=numel >= 2**31,
            num_warps=SR_FP16_WARPS if stochastic and buf.dtype == torch.float16 else NUM_WARPS,
        )
