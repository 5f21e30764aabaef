"""AdaLomo update (docs/spec.md "AdaLomo", "The fewest passes"): three passes over memory, three
launches, and the workspace header of the op contract (reference.WS_*). This module holds the
launchers and the host-side tiling (``geometry``); the kernels are in adalomo_factored.py (>= 2-D),
adalomo_vector.py (0-d, 1-d) and their shared arithmetic in adalomo_math.py.

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

from . import launch as _l
from .adalomo_factored import _adalomo_apply_kernel, _adalomo_stats_kernel, _adalomo_unorm_kernel
from .adalomo_vector import _vector_kernel, _vector_multi_kernel
from .lomo_update import checks, multi_checks
from .rounding import f32, key_arg, loss_scale_args

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
# _vector_multi_kernel: ptxas fits it in 92 registers without spilling under this cap (110
# without: the loop that applies a multi-tile tensor keeps the per-tensor scalars live)
MULTI_MAX_REGISTERS = 96
_OPTS = dict(enable_fp_fusion=False)  # op-by-op rounding as the reference (see module doc)


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
    mode, scale = loss_scale_args(loss_scale)
    with _l.device_guard(first):
        table.send()  # on the stream of the parameters' device, before the launches that read it
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
