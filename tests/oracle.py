"""What every backend's tests share: seeded random data, the float64 evaluation of docs/spec.md (the
oracle next to the reference), and the tolerance checks of docs/spec.md.

Hyper-parameter dicts use one set of keys everywhere: ``lr``, ``wd`` (weight decay), ``ls`` (loss
scale), ``cgv`` (clip_grad_value, 0 = off), ``coef`` (clip_coef or None) and, for AdaLomo, ``beta``,
``thr`` (clip_threshold) and optionally ``eps1``, ``eps2``.

``BACKENDS_HERE``: every (backend, device) that runs on this machine, for the tests that run all of
them on the same inputs (the property-based fuzzing, tests/test_fuzz_backends.py).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

import pytest
import torch
from conftest import ulp_distance

from lomo_kernels import ops, reference

EPS1, EPS2 = 1e-30, 1e-3


def _backends_here() -> list:
    status = ops.available_backends()
    out = [("torch", "cpu")]
    out += [(b, "cpu") for b in ("native", "cuda_emulated") if status[b].startswith("loaded")]
    if os.environ.get("TRITON_INTERPRET", "0") == "1" and status["triton"].startswith("loaded"):
        out.append(("triton", "cpu"))  # the interpreter
    if torch.cuda.is_available():
        out += [("native", "cuda")] if "cuda" in status["native"] else []
        out += [("triton", "cuda")] if status["triton"].startswith("loaded") else []
    return out


BACKENDS_HERE = _backends_here()
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
#: (parameter dtype, gradient dtype): a 16-bit parameter with a float32 gradient (the accumulation
#: buffer the optimizers pass to the update ops, docs/accumulation.md); a "dtype" of the property
#: tables next to DTYPES (dtypes_of splits it).
F32_GRADS = [(torch.bfloat16, torch.float32), (torch.float16, torch.float32)]


def dtypes_of(dtype) -> tuple:
    """(parameter dtype, gradient dtype) of a property table's dtype: a torch.dtype is both."""
    return tuple(dtype) if isinstance(dtype, tuple) else (dtype, dtype)


# Shapes of LLM weights: the last dimension a multiple of 16 (the 16-byte vector paths), 1 x n and
# m x 1, and a 3-D parameter with >= 32 slices of [m, n] (the serial-slice branch).
LLM_SHAPES = [(4096,), (130, 4096), (3, 70, 512), (1, 4096), (4096, 1), (40, 8, 64)]


# both spellings of a dtype: the Python checks' (torch.bfloat16) and the C++ checks' (BFloat16)
DTYPE_NAMES = {torch.float32: r"(torch\.float32|Float)", torch.float16: r"(torch\.float16|Half)",
               torch.bfloat16: r"(torch\.bfloat16|BFloat16)"}


def grad_dtype_accepted(param_dtype, grad_dtype) -> bool:
    """docs/spec.md: the gradient has the parameter's dtype, or float32 for a 16-bit parameter."""
    return grad_dtype == param_dtype or (grad_dtype == torch.float32
                                         and param_dtype != torch.float32)


def grad_dtype_error(param_dtype, grad_dtype) -> str:
    """The refusal's message, naming both dtypes (either spelling)."""
    return (rf"grad dtype {DTYPE_NAMES[grad_dtype]} must be param's "
            rf"\({DTYPE_NAMES[param_dtype]}\) or float32")


def check_grad_dtype_rule(calls, param_dtype, grad_dtype, tensors) -> None:
    """Each of ``calls`` (an update of ``tensors[0]``, the parameter, by a gradient of
    ``grad_dtype``): an accepted pair of dtypes updates the parameter; any other is refused
    naming both dtypes, none of ``tensors`` (parameter, state) changed."""
    for call in calls:
        before = [t.clone() for t in tensors]
        if grad_dtype_accepted(param_dtype, grad_dtype):
            call()
            assert not torch.equal(tensors[0], before[0])
            continue
        with pytest.raises((TypeError, RuntimeError),
                           match=grad_dtype_error(param_dtype, grad_dtype)):
            call()
        for t, b in zip(tensors, before):
            assert torch.equal(t.view(torch.uint8), b.view(torch.uint8))


def rand(shape, dtype, scale=1.0, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=gen) * scale).to(dtype)


def adalomo_state(shape, seed=0, scale=1.0, offset=0.1, zeros=False):
    """Positive second-moment state of the documented shapes (zeros: the first step)."""
    gen = torch.Generator().manual_seed(seed)
    return {k: torch.zeros(s) if zeros else torch.rand(s, generator=gen) * scale + offset
            for k, s in ops.adalomo_state_shapes(shape).items()}


def bits(t: torch.Tensor) -> torch.Tensor:
    """The bit patterns of a float tensor, for bitwise comparisons."""
    return t.view({4: torch.int32, 2: torch.int16}[t.element_size()])


def sr_edge_values(n, seed=0):
    """n finite float32 values on which every branch of the 16-bit stochastic roundings runs:
    signed zeros, fp16 and fp32 subnormals, fp16's top (65504 <= |x| < 65520 clamps to 65504,
    beyond rounds to Inf), bf16's top (a carry into Inf), and numbers of every exponent."""
    edges = torch.tensor([0.0, -0.0, 65504.0, 65510.0, -65519.99, 65520.0, -7e4, 1e5, 2.0**-24,
                          -(2.0**-25), 3e-8, 6.1e-5, -6.1e-5, 1e-40, -1e-45, 2.0**-126, 3.3e38,
                          3.3895e38, -3.4028e38, 1.0, -1.0, 1.0 + 2.0**-20])
    gen = torch.Generator().manual_seed(seed)
    rest = torch.exp(torch.randn(n, generator=gen) * 12) * torch.randn(n, generator=gen).sign()
    return torch.cat([edges, rest[: n - 2 * len(edges)], edges])  # the edges at both ends


def unaligned_view(base: torch.Tensor, offset: int, shape) -> torch.Tensor:
    """A contiguous view of ``shape`` starting ``offset`` elements into ``base``'s storage: its data
    pointer is not 16-byte aligned for 1..7 (fp16/bf16) or 1..3, 5..7 (fp32) elements."""
    return base.view(-1)[offset: offset + math.prod(shape)].view(shape)


def _preprocess64(g, h):
    f32 = reference.f32  # every backend receives its host scalars rounded to fp32
    g = g.double()
    if h["ls"] != 1.0:
        g = g / f32(h["ls"])
    if h["cgv"] > 0:
        g = g.clamp(-f32(h["cgv"]), f32(h["cgv"]))
    if h["coef"] is not None:
        g = g * f32(h["coef"])
    return g


def f64_lomo(p, g, h):
    """docs/spec.md's LOMO in float64: (new p, the size of its terms)."""
    f32 = reference.f32
    g = _preprocess64(g, h)
    a, b = p.double() * f32(1 - h["lr"] * h["wd"]), f32(-h["lr"]) * g
    return a + b, a.abs() + b.abs()


@dataclass
class AdaLomo64:
    p: torch.Tensor  # the new parameter
    size: torch.Tensor  # |p * decay| + |lr_t * u|: the scale of a cancellation error
    state: dict
    rms_u: float  # before the update normalisation


def f64_adalomo(p, g, state, h) -> AdaLomo64:
    """docs/spec.md's AdaLomo in float64, factored over the last two dims (batched over the rest);
    ``h["eps1"]``, ``h["eps2"]`` default to EPS1, EPS2."""
    f32 = reference.f32
    g = _preprocess64(g, h)
    eps1, eps2 = h.get("eps1", EPS1), h.get("eps2", EPS2)
    G = g * g + f32(eps1)
    b, omb = f32(h["beta"]), f32(1 - h["beta"])
    if p.dim() >= 2:
        r = state["exp_avg_sq_row"].double() * b + omb * G.mean(-1)
        c = state["exp_avg_sq_col"].double() * b + omb * G.mean(-2)
        u = (r / r.mean(-1, keepdim=True)).rsqrt().unsqueeze(-1) * c.unsqueeze(-2).rsqrt() * g
        new_state = {"exp_avg_sq_row": r, "exp_avg_sq_col": c}
    else:
        v = state["exp_avg_sq"].double() * b + omb * G
        u = v.rsqrt() * g
        new_state = {"exp_avg_sq": v}
    n = max(p.numel(), 1)
    rms_u = u.norm().item() / math.sqrt(n)
    u = u / max(1.0, rms_u / f32(h["thr"]))
    p64 = p.double()
    lr_t = f32(h["lr"]) * max(f32(eps2), p64.norm().item() / math.sqrt(n))
    a, s = p64 * (1 - lr_t * f32(h["wd"])), lr_t * u
    return AdaLomo64(a - s, a.abs() + s.abs(), new_state, rms_u)


def f64_golore(r, p, st, inner, momentum, coef, h):
    """golore_update_'s formulas (reference.golore_update_) in float64 with the host scalars every
    backend receives; ``h``: lr, weight_decay, scale, beta1, beta2, eps, step. Returns
    (N, |terms of N|, new state, |terms of state|, new p, |terms of p|)."""
    s = reference.golore_scalars(inner, h["lr"], h["weight_decay"], h["scale"], h["beta1"],
                                 h["beta2"], h["eps"], momentum, h["step"])
    g = r.double() * (1.0 if coef is None else reference.f32(coef))
    new, size = {}, {}
    if inner == "adamw":
        m0, v0 = st["exp_avg"].double(), st["exp_avg_sq"].double()
        m, v = s["b1"] * m0 + s["omb1"] * g, s["b2"] * v0 + s["omb2"] * g * g
        new.update(exp_avg=m, exp_avg_sq=v)
        size.update(exp_avg=(s["b1"] * m0).abs() + (s["omb1"] * g).abs(), exp_avg_sq=v)
        den = (v / s["bc2"]).sqrt() + s["eps"]
        n = (m / s["bc1"]) / den
        n_size = size["exp_avg"] / s["bc1"] / den
    elif momentum:
        b0 = st["momentum_buffer"].double()
        n = b0 * s["momentum"] + g
        new["momentum_buffer"] = n
        n_size = size["momentum_buffer"] = (b0 * s["momentum"]).abs() + g.abs()
    else:
        n, n_size = g, g.abs()
    if p is None:
        return n, n_size, new, size, None, None
    a, b = p.double() * s["decay"], s["neg_lr_scale"] * n
    return n, n_size, new, size, a + b, a.abs() + (s["neg_lr_scale"] * n_size).abs()


# ---------------------------------------------------------------- docs/spec.md tolerances


# The reference reduces in fp32 (torch.linalg.vector_norm over 0.5M elements is ~2e-5 off), the
# kernels in double: against float64 the reference gets this much of the size of the terms.
REFERENCE_F64_RTOL = 1e-4


def check_param(out, ref, want, size, *, ref_rtol=1e-4, f64_rtol=1e-5):
    """A backend's parameter against the reference's and the float64 value: fp32 within f64_rtol of
    the size of the terms (a pointwise relative error is meaningless where they cancel), fp16/bf16
    within 1 ulp, except where the result cancels to far below its terms (there the fp32 error of
    the terms exceeds an ulp of the tiny result, for the reference as much as for the kernel)."""
    if out.dtype == torch.float32:
        assert ((out.double() - want).abs() <= f64_rtol * size + 1e-30).all()
        assert ((out.double() - ref.double()).abs() <= ref_rtol * size + 1e-30).all()
    else:
        def near_cancel(tol):
            return (out.double() - want).abs() <= tol * size

        assert ((ulp_distance(out, want.to(out.dtype)) <= 1) | near_cancel(f64_rtol)).all()
        assert ((ulp_distance(out, ref) <= 1) | near_cancel(ref_rtol)).all()


def check_state(got, ref, want, rtol=1e-5):
    for k in want:
        assert ((got[k].double() - want[k]).abs() <= rtol * want[k].abs()).all(), k
        assert ((got[k] - ref[k]).abs() <= rtol * ref[k].abs()).all(), k


def check_stochastic(out, ref, want, size, *, ref_rtol=1e-4, min_equal=0.999):
    """Stochastic rounding (same hash in every backend): the reference's bits, except where the
    fp32 values before the rounding differ by a few ulps (another order of the sums, an unfused
    fma) and a random threshold falls in between (fp16 draws 24 random bits, bf16 16: a k-ulp
    difference flips an fp16 element with probability k / 2**13), or where the result cancels to
    far below its terms."""
    near_cancel = (out.double() - want).abs() <= ref_rtol * size
    assert ((ulp_distance(out, ref) <= 1) | near_cancel).all()
    assert (bits(out) == bits(ref)).float().mean().item() >= min_equal
    assert ((ulp_distance(out, want.to(out.dtype)) <= 1) | near_cancel).all()
