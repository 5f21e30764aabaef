"""The GoLore / GaLore inner-optimizer reference (docs/spec.md "GoLore"). Part of the oracle in
lomo_kernels/reference.py, which re-exports it."""

from __future__ import annotations

import math

import torch

from .reference_common import _mark_found_inf, f32, round_to_dtype


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
