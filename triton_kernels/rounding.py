"""@triton.jit helpers shared by every kernel: the stochastic-rounding hash and the roundings from
fp32 registers to the parameter dtype.

They reproduce, bit for bit, the definitions written out once in ``lomo_kernels/reference.py``:

    mix32(x)  = lowbias32 (C. Wellons, "Prospecting for hash functions", 2018), modulo 2**32
    key       = mix32((seed mod 2**32) ^ mix32(step mod 2**32))       (host: reference.rounding_key)
    bits(i)   = mix32((i mod 2**32) ^ mix32((i >> 32) ^ key))         (i: flat element index)

All hash arithmetic is on uint32 tensors, so ``*`` wraps modulo 2**32 and ``>>`` is a logical
shift, exactly as the reference's masked int64 arithmetic.
"""

import functools
import math

import torch
import triton
import triton.language as tl

from ..reference import f32, rounding_key  # noqa: F401  (f32: the launchers' scalars)

_SIGN32 = tl.constexpr(0x80000000)
_F16_NAN = tl.constexpr(0x7E00)  # the canonical quiet NaNs (reference.CANONICAL_NAN)
_BF16_NAN = tl.constexpr(0x7FC0)
_TWO_M24 = tl.constexpr(5.9604644775390625e-08)  # 2**-24, exact in fp32


@triton.jit
def mix32(x):
    """lowbias32 of a uint32 tensor (or scalar)."""
    x ^= x >> 16
    x *= 0x7FEB352D
    x ^= x >> 15
    x *= 0x846CA68B
    x ^= x >> 16
    return x


@triton.jit
def high_key(idx, key):
    """mix32((i >> 32) ^ key): the per-call key folded with the high word of the int64 index ``i``.

    ``key`` is the int32 bit pattern of the uint32 host key. A kernel whose blocks never straddle a
    multiple of 2**32 elements computes this once per block instead of once per element."""
    return mix32((idx >> 32).to(tl.uint32) ^ key.to(tl.uint32, bitcast=True))


@triton.jit
def span_bits(first, local, key, INDEX64: tl.constexpr):
    """The random bits of the elements ``first + local``: ``first`` a scalar or one value per row
    (int64 when INDEX64), ``local`` int32 in [0, 2**31). All per-element work is 32-bit: the low
    word is a wrapping uint32 sum, and the high-word key is one value per call (32-bit indices:
    every tensor of fewer than 2**31 elements, whose high word is 0) or two per span (the first
    high word and the next) selected by the carry of that sum, never a hash per element."""
    k = key.to(tl.uint32, bitcast=True)
    lo0 = tl.cast(first, tl.uint32)  # i mod 2**32 (first may be a literal 0)
    lo = lo0 + local.to(tl.uint32)
    if INDEX64:
        hi = (first >> 32).to(tl.uint32)
        hkey = tl.where(lo < lo0, mix32((hi + 1) ^ k), mix32(hi ^ k))
    else:
        hkey = mix32(k)
    return mix32(lo ^ hkey)


@triton.jit
def random_bits(idx, hkey):
    """The 32 random bits of element ``idx`` (int32 or int64), given ``hkey = high_key(idx, key)``."""
    return mix32(idx.to(tl.uint32) ^ hkey)  # int64 -> uint32 keeps i mod 2**32


@triton.jit
def _pow2(k):
    # 2**k from its fp32 bit pattern (exact for -126 <= k <= 127; here -100 <= k <= 24).
    return ((k + 127) << 23).to(tl.float32, bitcast=True)


@triton.jit
def canonical_nan(x, y, DTYPE: tl.constexpr):
    """``y`` (fp32 ``x`` rounded to ``DTYPE``) with every lane where ``x`` is NaN set to the
    canonical quiet NaN of fp16 / bf16 (0x7E00 / 0x7FC0, docs/spec.md), not the 0x7FFF of the
    GPU's conversion instruction nor the payload the interpreter's numpy keeps."""
    if DTYPE == tl.float16:
        nan = tl.full([], _F16_NAN, tl.uint16).to(tl.float16, bitcast=True)
        y = tl.where(x != x, nan, y)
    elif DTYPE == tl.bfloat16:
        nan = tl.full([], _BF16_NAN, tl.uint16).to(tl.bfloat16, bitcast=True)
        y = tl.where(x != x, nan, y)
    return y


@triton.jit
def stochastic_bf16(x, bits):
    """Add the top 16 random bits to the fp32 pattern and truncate: E[result] = x."""
    b = x.to(tl.uint32, bitcast=True)
    b = b + (bits >> 16)  # no wrap: the largest finite pattern + 0xFFFF < 2**32
    b = tl.where(x != x, _BF16_NAN << 16, b) >> 16  # NaN: the canonical NaN (nearest rounding's)
    return b.to(tl.uint16).to(tl.bfloat16, bitcast=True)  # the top half is the bf16


@triton.jit
def stochastic_fp16(x, bits):
    """Round |x| up to the next point of the fp16 grid (spacing 2**k) with probability equal to
    the remainder's fraction, all in exact fp32 arithmetic (reference._sr_fp16)."""
    a = tl.abs(x)
    e = ((a.to(tl.int32, bitcast=True) >> 23) & 0xFF) - 127
    k = tl.minimum(tl.maximum(e - 10, -24), 100)  # fp16 spacing at |x|; subnormal floor 2**-24
    q = a * _pow2(-k)  # exact: a power-of-two scaling
    f = tl.floor(q)
    r = (bits >> 8).to(tl.float32) * _TWO_M24  # 24 random bits as a fraction in [0, 1), exact
    up = (r < q - f).to(tl.float32)  # q - f is exact
    y = tl.minimum((f + up) * _pow2(k), 65504.0)  # on the fp16 grid, never rounded up to Inf
    y = (y.to(tl.uint32, bitcast=True) | (x.to(tl.uint32, bitcast=True) & _SIGN32)).to(
        tl.float32, bitcast=True
    )  # copysign(y, x): y >= 0
    # NaN and |x| >= 65520 (which rounds to Inf) round to nearest, as tensor.to does.
    return canonical_nan(x, tl.where((x != x) | (a >= 65520.0), x, y).to(tl.float16), tl.float16)


@triton.jit
def round_span(x, first, local, key, DTYPE: tl.constexpr, STOCHASTIC: tl.constexpr,
               INDEX64: tl.constexpr):
    """fp32 ``x`` of the elements ``first + local`` rounded to ``DTYPE`` (see span_bits)."""
    if STOCHASTIC and DTYPE == tl.bfloat16:
        return stochastic_bf16(x, span_bits(first, local, key, INDEX64))
    elif STOCHASTIC and DTYPE == tl.float16:
        return stochastic_fp16(x, span_bits(first, local, key, INDEX64))
    else:
        return canonical_nan(x, x.to(DTYPE), DTYPE)


@triton.jit
def round_to(x, idx, hkey, DTYPE: tl.constexpr, STOCHASTIC: tl.constexpr):
    """fp32 ``x`` rounded to ``DTYPE``: to nearest even, or stochastically for fp16/bf16.

    ``idx`` is the int64 flat element index and ``hkey = high_key(idx, key)`` (a scalar or a
    tensor); both are unused for nearest rounding."""
    if STOCHASTIC and DTYPE == tl.bfloat16:
        return stochastic_bf16(x, random_bits(idx, hkey))
    elif STOCHASTIC and DTYPE == tl.float16:
        return stochastic_fp16(x, random_bits(idx, hkey))
    else:
        return canonical_nan(x, x.to(DTYPE), DTYPE)


@triton.jit
def is_finite(x):
    """True where fp32 ``x`` is neither NaN nor +-Inf (a NaN compares false)."""
    return tl.abs(x) <= 3.4028234663852886e38


@triton.jit
def unscale_clip(g, scale, clip_value, clip_coef, LOSS_SCALE: tl.constexpr,
                 CLIP_VALUE: tl.constexpr, HAS_CLIP_COEF: tl.constexpr):
    """docs/spec.md gradient preprocessing of fp32 ``g``: (g / loss_scale, and that clamped and
    multiplied by the global-norm coefficient). LOSS_SCALE 0: none; 1: multiply by ``scale`` =
    1/loss_scale, an exact power of two, which gives the same bits as dividing and is cheaper;
    2: IEEE division by ``scale`` = loss_scale."""
    if LOSS_SCALE == 1:
        g = g * scale
    elif LOSS_SCALE == 2:
        g = tl.math.div_rn(g, scale)
    gc = g
    if CLIP_VALUE:
        gc = tl.minimum(tl.maximum(gc, -clip_value), clip_value)
    if HAS_CLIP_COEF:
        gc = gc * clip_coef
    return g, gc


@triton.jit
def load_lanes(ptr, mask, other):
    """tl.load of the lanes in ``mask`` (None: every lane, unmasked vector accesses); the others
    read ``other``: Triton leaves a masked-off lane undefined without it."""
    if mask is None:
        return tl.load(ptr)
    else:
        return tl.load(ptr, mask=mask, other=other)


@triton.jit
def load_clip_coef(clip_coef_ptr, HAS_CLIP_COEF: tl.constexpr):
    if HAS_CLIP_COEF:
        return tl.load(clip_coef_ptr).to(tl.float32)
    else:
        return 1.0


# ---------------------------------------------------------------------------------------------
# Host side: the scalars every launcher passes (float64 -> float32 exactly as reference.py does).
# ---------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=64)
def loss_scale_args(loss_scale: float):
    """(LOSS_SCALE mode, runtime scale argument) for ``preprocess``; see its docstring."""
    if loss_scale == 1.0:
        return 0, 1.0
    mant, exp = math.frexp(loss_scale)
    if mant == 0.5 and -126 <= 1 - exp <= 127:  # a power of two with a normal fp32 reciprocal
        return 1, 2.0 ** (1 - exp)
    return 2, f32(loss_scale)


@functools.lru_cache(maxsize=256)  # every parameter of a step hashes the same (seed, step)
def key_arg(seed: int, step: int) -> int:
    """reference.rounding_key as the int32 with the same bits: a uint32 >= 2**31 would be typed
    int64 by Triton and compile a second kernel variant."""
    key = rounding_key(int(seed), int(step))
    return key - (1 << 32) if key >= (1 << 31) else key


def check_tensors(op: str, param, grad, **optional):
    """Cheap checks that keep a kernel from reading or writing out of bounds (ops.py checks the
    rest for its public entry points)."""
    if grad.dtype not in (param.dtype, torch.float32) or grad.numel() != param.numel():
        raise ValueError(
            f"{op}: grad ({grad.dtype}, {grad.numel()} elements) does not match param "
            f"({param.dtype} or float32, {param.numel()} elements)"
        )
    for name, t in (("param", param), ("grad", grad), *optional.items()):
        if t is None:
            continue
        if not t.is_contiguous():
            raise ValueError(f"{op}: {name} must be contiguous")
        if t.device != param.device:
            raise ValueError(f"{op}: {name} is on {t.device}, param on {param.device}")
