"""The AdaLomo reference (docs/spec.md "AdaLomo"): the one-call op and its three stages over the
public workspace header, with every sum that decides the update accumulated in float64. Part of
the oracle in lomo_kernels/reference.py, which re-exports it."""

from __future__ import annotations

import math

import torch

from .reference_common import _add_grad_sq, _mark_found_inf, _preprocess, f32, round_to_dtype

# The sums that decide an AdaLomo update (rms(p), rms(u), the row and column means of G, the mean
# of r) accumulate in float64: torch's float32 reductions on CPU are about 1e-3 off over tens of
# millions of elements (torch.linalg.vector_norm over SmolLM2-135M's 49152 x 576 embedding:
# 1.7e-3, bench/norm_accuracy.py), which would scale a whole update by that much. lomo-optim sums
# in float32 (docs/spec.md says where this differs). Each sum is rounded to float32 where a kernel
# stores it (the workspace header), and what is computed from it follows the kernels' order, so
# that the staged form (stages 1-3) and the one-call form give the same bits.


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
