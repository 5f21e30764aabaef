"""The fused GoLore inner update (``golore_update_``) of every backend against the reference and a
float64 evaluation of the formulas (reference.golore_update_).

Backends: the reference itself (against float64), the native CPU kernel (bitwise equal to the
reference: same float32 operations in the same order), the Triton kernel in the interpreter
(within 2 ulp: the interpreter does not fuse tl.fma) and the native CUDA kernel: in the SIMT emulation
on CPU tensors (``cuda_emulated``) and, with a GPU, on the GPU, with the same tolerances.
Modes: projected (``r`` is the float32 R, N written into it) and full rank (``param`` updated; ``r``
of its dtype, or float32 for a 16-bit ``param``: an accumulation buffer, oracle.F32_GRADS).
"""

import os

import pytest
import torch
from conftest import (requires_cuda_emulation, requires_native, requires_triton, target_device,
                      target_op, ulp_distance)

from oracle import F32_GRADS, dtypes_of, f64_golore

from lomo_kernels import ops, reference

OP = torch.ops.lomo_kernels.golore_update_
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
INNERS = [("adamw", 0.0), ("sgd", 0.9), ("sgd", 0.0)]
# odd sizes, and R of LLM layers: rank 128 of a 4096-wide projection, rank 8 of 14336 rows
PROJECTED = [(1,), (7,), (4097,), (37, 129), (128, 4096), (14336, 8)]
FULL = [(1,), (4097,), (37, 129)]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
H = dict(lr=3e-2, weight_decay=0.1, scale=0.7, beta1=0.9, beta2=0.999, eps=1e-8, step=3)


def _rand(shape, scale=1.0, seed=0, positive=False):
    gen = torch.Generator().manual_seed(seed)
    x = torch.rand(shape, generator=gen) if positive else torch.randn(shape, generator=gen)
    return x * scale


def _case(shape, inner, momentum, dtype=None, seed=0):
    """(r, param or None, state): fresh random data, state never zero."""
    st = {k: _rand(shape, 1e-2, seed + i + 1, positive=k == "exp_avg_sq") + (1e-6 if k ==
                                                                            "exp_avg_sq" else 0)
          for i, k in enumerate(ops.golore_state_names(inner, momentum))}
    if dtype is None:
        return _rand(shape, 0.1, seed), None, st
    pd, gd = dtypes_of(dtype)  # a 16-bit param may have a float32 gradient (a buffer)
    return _rand(shape, 0.1, seed).to(gd), _rand(shape, 1.0, seed + 7).to(pd), st


def _call(fn, r, p, st, inner, momentum, device="cpu", coef=None, found=None, rounding="nearest",
          seed=11, h=H):
    r = r.to(device, copy=True)
    p = None if p is None else p.to(device, copy=True)
    st = {k: v.to(device, copy=True) for k, v in st.items()}
    c = None if coef is None else torch.tensor(coef, device=device)
    fn(r, p, st.get("exp_avg"), st.get("exp_avg_sq"), st.get("momentum_buffer"), c, found, inner,
       h["lr"], h["weight_decay"], h["scale"], h["beta1"], h["beta2"], h["eps"], momentum,
       rounding, seed, h["step"])
    return r.cpu(), None if p is None else p.cpu(), {k: v.cpu() for k, v in st.items()}


def _f64(r, p, st, inner, momentum, coef=None, h=H):
    """The formulas in float64 (oracle.f64_golore) with this module's hyper-parameters."""
    return f64_golore(r, p, st, inner, momentum, coef, h)


def _close(got, want, size, rel):
    """|got - want| <= rel * (size of the terms): a pointwise relative error is meaningless where
    the terms cancel."""
    return ((got.double() - want).abs() <= rel * size + 1e-30).all()


def _check_against_f64(out, case, inner, momentum, rel=2e-6, coef=None):
    r_in, p_in, st_in = case
    r, p, st = out
    n, n_size, st64, st_size, p64, p_size = _f64(r_in, p_in, st_in, inner, momentum, coef)
    for k in st64:
        assert _close(st[k], st64[k], st_size[k], rel), k
    if p is None:
        assert _close(r, n, n_size, 4 * rel)  # N: a few roundings more
    elif p.dtype == torch.float32:
        assert _close(p, p64, p_size, 4 * rel)
    else:  # rounded once from float32 math
        assert (ulp_distance(p, p64.to(p.dtype)) <= 1).all()


# ---------------------------------------------------------------- the reference vs float64


@pytest.mark.parametrize("inner,momentum", INNERS)
@pytest.mark.parametrize("shape", [(7,), (37, 129), (128, 4096)], ids=str)
def test_reference_projected_matches_float64(inner, momentum, shape):
    case = _case(shape, inner, momentum)
    _check_against_f64(_call(reference.golore_update_, *case, inner, momentum), case, inner,
                       momentum)


@pytest.mark.parametrize("inner,momentum", INNERS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_reference_full_rank_matches_float64(inner, momentum, dtype):
    case = _case((37, 129), inner, momentum, dtype)
    out = _call(reference.golore_update_, *case, inner, momentum, coef=0.6)
    _check_against_f64(out, case, inner, momentum, coef=0.6)
    assert torch.equal(out[0], case[0])  # full rank: the gradient is only read


def test_step_one_adam_is_the_sign_of_the_gradient():
    # t = 1 from zero moments: N = g / (|g| + eps) exactly as Adam's first step.
    r = _rand((5, 9), 0.3)
    m, v = torch.zeros(5, 9), torch.zeros(5, 9)
    out = r.clone()
    reference.golore_update_(out, None, m, v, None, None, None, "adamw", 0.0, 0.0, 1.0, 0.9, 0.999,
                             0.0, 0.0, "nearest", 0, 1)
    torch.testing.assert_close(out, torch.sign(r), rtol=1e-6, atol=0)


# ---------------------------------------------------------------- native CPU: bitwise reference


@requires_native
@pytest.mark.parametrize("inner,momentum", INNERS)
@pytest.mark.parametrize("shape", PROJECTED, ids=str)
def test_native_cpu_projected_is_the_reference(inner, momentum, shape):
    case = _case(shape, inner, momentum, seed=3)
    got = _call(OP, *case, inner, momentum, coef=0.8)
    want = _call(reference.golore_update_, *case, inner, momentum, coef=0.8)
    assert torch.equal(got[0], want[0])
    assert all(torch.equal(got[2][k], want[2][k]) for k in want[2])
    _check_against_f64(got, case, inner, momentum, coef=0.8)


@requires_native
@pytest.mark.parametrize("rounding", ["nearest", "stochastic"])
@pytest.mark.parametrize("inner,momentum", INNERS)
@pytest.mark.parametrize("dtype", DTYPES + F32_GRADS, ids=str)
@pytest.mark.parametrize("shape", FULL, ids=str)
def test_native_cpu_full_rank_is_the_reference(shape, dtype, inner, momentum, rounding):
    case = _case(shape, inner, momentum, dtype, seed=5)
    got = _call(OP, *case, inner, momentum, rounding=rounding)
    want = _call(reference.golore_update_, *case, inner, momentum, rounding=rounding)
    assert torch.equal(got[1].view(torch.uint8), want[1].view(torch.uint8))
    assert all(torch.equal(got[2][k], want[2][k]) for k in want[2])
    if rounding == "nearest":
        _check_against_f64(got, case, inner, momentum)


@requires_native
@pytest.mark.parametrize("dtype,inner,momentum,rounding", [
    (torch.bfloat16, "adamw", 0.0, "stochastic"), (torch.float16, "sgd", 0.9, "nearest"),
    (torch.float32, "sgd", 0.0, "nearest"), (F32_GRADS[0], "adamw", 0.0, "stochastic")], ids=str)
def test_native_cpu_full_rank_large(dtype, inner, momentum, rounding):
    # many work units: every unit's flags and hash offsets
    test_native_cpu_full_rank_is_the_reference((278011,), dtype, inner, momentum, rounding)


# ---------------------------------------------------------------- Triton (interpreter on CPU)

TRITON_DEVICES = (["cpu"] if INTERPRET else []) + (["cuda"] if torch.cuda.is_available() else [])


def _assert_near_reference(got, want, case, inner, momentum, coef=None):
    """Within a few float32 ulp of the size of the terms (the interpreter rounds tl.fma's product
    and sum separately; CUDA fuses fma where the CPU reference does too, but differs in order of
    nothing else), 1 ulp of bf16/fp16 for the stored parameter."""
    r, p, st = got
    r0, p0, st0 = want
    n, n_size, _, st_size, _, p_size = _f64(case[0], case[1], case[2], inner, momentum, coef)
    ulp = 1.2e-7
    for k in st0:
        assert ((st[k] - st0[k]).abs() <= 4 * ulp * st_size[k]).all(), k
    if p is None:
        assert ((r - r0).abs() <= 16 * ulp * n_size).all()
    elif p.dtype == torch.float32:
        assert ((p - p0).abs() <= 16 * ulp * p_size).all()
    else:
        assert (ulp_distance(p, p0) <= 1).all()


@requires_triton
@pytest.mark.parametrize("device", TRITON_DEVICES)
@pytest.mark.parametrize("inner,momentum", INNERS)
@pytest.mark.parametrize("shape", [(7,), (37, 129), (128, 4096)], ids=str)
def test_triton_projected_matches_reference(shape, inner, momentum, device):
    from lomo_kernels import triton_kernels

    case = _case(shape, inner, momentum, seed=9)
    got = _call(triton_kernels.golore_update_, *case, inner, momentum, device, coef=0.8)
    want = _call(reference.golore_update_, *case, inner, momentum, coef=0.8)
    _assert_near_reference(got, want, case, inner, momentum, coef=0.8)
    _check_against_f64(got, case, inner, momentum, coef=0.8)


@requires_triton
@pytest.mark.parametrize("device", TRITON_DEVICES)
@pytest.mark.parametrize("rounding", ["nearest", "stochastic"])
@pytest.mark.parametrize("inner,momentum", INNERS)
@pytest.mark.parametrize("dtype", DTYPES + F32_GRADS, ids=str)
def test_triton_full_rank_matches_reference(dtype, inner, momentum, rounding, device):
    from lomo_kernels import triton_kernels

    case = _case((4097,), inner, momentum, dtype, seed=13)
    got = _call(triton_kernels.golore_update_, *case, inner, momentum, device, rounding=rounding)
    want = _call(reference.golore_update_, *case, inner, momentum, rounding=rounding)
    _assert_near_reference(got, want, case, inner, momentum)


# ---------------------------------------------------------------- CUDA


CUDA_TARGETS = [pytest.param("cuda_emulated", marks=requires_cuda_emulation)] + (
    ["cuda"] if torch.cuda.is_available() else [])


@requires_native
@pytest.mark.parametrize("target", CUDA_TARGETS)
@pytest.mark.parametrize("rounding", ["nearest", "stochastic"])
@pytest.mark.parametrize("inner,momentum", INNERS)
@pytest.mark.parametrize("dtype", [None, *DTYPES, *F32_GRADS], ids=str)
@pytest.mark.parametrize("shape", [(7,), (37, 129), (128, 4096), (278011,)], ids=str)
def test_native_cuda_matches_reference(shape, dtype, inner, momentum, rounding, target):
    case = _case(shape, inner, momentum, dtype, seed=17)
    device = target_device(target)
    found = torch.zeros(1, device=device)
    got = _call(target_op(target, "golore_update_"), *case, inner, momentum, device, coef=0.8,
                found=found, rounding=rounding)
    want = _call(reference.golore_update_, *case, inner, momentum, coef=0.8, rounding=rounding)
    _assert_near_reference(got, want, case, inner, momentum, coef=0.8)
    assert found.item() == 0.0


# ---------------------------------------------------------------- non-finite r: nothing changes


def _backends():
    out = [("torch", "cpu")]
    if ops.available_backends()["native"].startswith("loaded"):
        out.append(("native", "cpu"))
    if INTERPRET and ops.available_backends()["triton"] == "loaded":
        out.append(("triton", "cpu"))
    if ops.available_backends()["cuda_emulated"].startswith("loaded"):
        out.append(("cuda_emulated", "cpu"))
    if torch.cuda.is_available():
        out += [("native", "cuda"), ("triton", "cuda")]
    return out


@pytest.mark.parametrize("backend,device", _backends())
@pytest.mark.parametrize("dtype", [None, torch.bfloat16, F32_GRADS[0]], ids=str)  # None: projected
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
@pytest.mark.parametrize("inner,momentum", INNERS)
def test_non_finite_r_leaves_param_and_state_untouched(inner, momentum, bad, dtype, backend,
                                                       device):
    full = dtype is not None
    r, p, st = _case((33, 65), inner, momentum, dtype, seed=19)
    r[5, 7] = bad
    r, p = r.to(device), None if p is None else p.to(device)
    st = {k: v.to(device) for k, v in st.items()}
    r0, p0, st0 = r.clone(), None if p is None else p.clone(), {k: v.clone() for k, v in st.items()}
    found = torch.zeros(1, device=device)
    ops.golore_update_(r, param=p, inner=inner, momentum=momentum, lr=0.1, found_inf=found,
                       step=2, backend=backend, **st)
    assert found.item() == 1.0
    assert all(torch.equal(st[k], st0[k]) for k in st)
    if full:
        assert torch.equal(p, p0) and torch.equal(r.view(torch.int16), r0.view(torch.int16))
    else:
        assert torch.isnan(r).all()  # N is poisoned: nothing computed from it can be applied


@pytest.mark.parametrize("backend,device", _backends())
def test_clean_r_leaves_found_inf_alone(backend, device):
    r, _, st = _case((9, 4), "adamw", 0.0, seed=21)
    found = torch.zeros(1, device=device)
    ops.golore_update_(r.to(device), found_inf=found, step=1, backend=backend,
                       **{k: v.to(device) for k, v in st.items()})
    assert found.item() == 0.0


# ---------------------------------------------------------------- op contract and bad input


@pytest.mark.parametrize("full", [False, True])
@pytest.mark.parametrize("inner,momentum", INNERS)
def test_opcheck_golore_update(inner, momentum, full):
    r, p, st = _case((9, 17), inner, momentum, torch.bfloat16 if full else None, seed=23)
    args = (r, p, st.get("exp_avg"), st.get("exp_avg_sq"), st.get("momentum_buffer"),
            torch.tensor(0.5), torch.zeros(1), inner, 1e-2, 0.1, 0.5, 0.9, 0.99, 1e-8, momentum,
            "stochastic", 3, 4)
    torch.library.opcheck(OP, args)


def _native_and_python():
    out = [lambda r, **kw: ops.golore_update_(r, backend="torch", **kw)]
    if ops.available_backends()["native"].startswith("loaded"):
        def native(r, *, param=None, exp_avg=None, exp_avg_sq=None, momentum_buffer=None,
                   inner="adamw", momentum=0.0, step=1):
            OP(r, param, exp_avg, exp_avg_sq, momentum_buffer, None, None, inner, 0.1, 0.0, 1.0,
               0.9, 0.999, 1e-8, momentum, "nearest", 0, step)
        out.append(native)
    if ops.available_backends()["cuda_emulated"].startswith("loaded"):
        def emulated(r, *, param=None, exp_avg=None, exp_avg_sq=None, momentum_buffer=None,
                     inner="adamw", momentum=0.0, step=1):
            target_op("cuda_emulated", "golore_update_")(
                r, param, exp_avg, exp_avg_sq, momentum_buffer, None, None, inner, 0.1, 0.0, 1.0,
                0.9, 0.999, 1e-8, momentum, "nearest", 0, step)
        out.append(emulated)
    return out


@pytest.mark.parametrize("call", _native_and_python())
def test_bad_arguments_are_named(call):
    r, z = torch.zeros(4, 5), torch.zeros(4, 5)
    with pytest.raises((ValueError, RuntimeError), match="inner must be"):
        call(r, inner="adam")
    with pytest.raises((ValueError, RuntimeError), match="exp_avg_sq is required"):
        call(r, exp_avg=z)
    with pytest.raises((ValueError, RuntimeError), match="exp_avg must be float32 of shape"):
        call(r, exp_avg=torch.zeros(5, 4), exp_avg_sq=z)
    with pytest.raises((ValueError, RuntimeError), match="momentum_buffer must be None"):
        call(r, inner="sgd", momentum_buffer=z)
    with pytest.raises((ValueError, RuntimeError), match="momentum_buffer is required"):
        call(r, inner="sgd", momentum=0.9)
    with pytest.raises((TypeError, RuntimeError), match="r .the projected gradient. must be"):
        call(r.bfloat16(), inner="sgd")
    with pytest.raises((ValueError, RuntimeError), match="r .the gradient. must have param's"):
        call(r.half(), param=torch.zeros(4, 5, dtype=torch.bfloat16), inner="sgd")
    with pytest.raises((ValueError, RuntimeError), match="step must be >= 1"):
        call(r, exp_avg=z, exp_avg_sq=z.clone(), step=0)
    with pytest.raises((ValueError, RuntimeError), match="r must be contiguous"):
        call(torch.zeros(5, 4).T, inner="sgd")
