"""The pieces every reference op shares (lomo_kernels/reference.py is the oracle; docs/spec.md the
contract): the stochastic-rounding hash and the rounding to 16 bits, the float32 rounding of host
scalars, and the gradient preprocessing in lomo-optim's order."""

from __future__ import annotations

import math
import struct

import torch

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
