"""Every backend on the shapes of LLM weights, through ``ops.get_impl`` (what the optimizers call).

The shapes where the vectorised paths run (oracle.LLM_SHAPES: last dimension a multiple of 16,
1 x n, m x 1, a 3-D parameter with >= 32 slices) and views whose data pointer is 1..7 elements past
a 16-byte boundary (the unaligned paths), for fp32/fp16/bf16 and nearest/stochastic rounding. The
backends: the reference, the native C++ kernels, the CUDA kernels in the SIMT emulation
(``cuda_emulated``), Triton (its interpreter on CPU) and, with a GPU, native CUDA and Triton on it.
All agree with the reference and a float64 evaluation within docs/spec.md's tolerances.
"""

import os

import pytest
import torch
from conftest import (requires_cuda_emulation, requires_native, requires_triton,
                      ulp_distance)
from oracle import (DTYPES, EPS1, EPS2, LLM_SHAPES, REFERENCE_F64_RTOL, adalomo_state, bits,
                    check_param, check_state, check_stochastic, f64_adalomo, f64_lomo, rand,
                    unaligned_view)

from lomo_kernels import ops, reference

_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
BACKENDS = [
    pytest.param(("torch", "cpu"), id="torch"),
    pytest.param(("native", "cpu"), id="native-cpu", marks=requires_native),
    pytest.param(("cuda_emulated", "cpu"), id="cuda_emulated", marks=requires_cuda_emulation),
] + ([pytest.param(("triton", "cpu"), id="triton-interpreter", marks=requires_triton)]
     if _INTERPRET else []) + (
    [pytest.param(("native", "cuda"), id="native-cuda", marks=requires_native),
     pytest.param(("triton", "cuda"), id="triton-cuda", marks=requires_triton)]
    if torch.cuda.is_available() else [])
ROUNDINGS = ["nearest", "stochastic"]
LOMO_H = dict(lr=3e-3, wd=0.1, ls=1000.0, cgv=0.7, coef=0.37)
ADALOMO_H = dict(lr=3e-2, wd=0.1, ls=3.0, cgv=0.02, coef=0.7, beta=0.3, thr=0.5)


def _lomo(backend, device, p, g, rounding, seed=11, step=3, out=None):
    """One LOMO update (in place of `out` when given, else of a copy of p): p on the CPU."""
    if out is None:
        out = p.to(device, copy=True)
    coef = torch.tensor(LOMO_H["coef"], device=device)
    ops.get_impl("lomo_update_", backend, device)(
        out, g.to(device), coef, None, LOMO_H["lr"], LOMO_H["wd"], LOMO_H["ls"], LOMO_H["cgv"],
        rounding, seed, step)
    return out.cpu()


def _adalomo(backend, device, p, g, st, rounding, seed=5, step=2, out=None):
    """One AdaLomo update (in place of `out` when given, else of a copy of p): (p, state) on the CPU."""
    if out is None:
        out = p.to(device, copy=True)
    dev = {k: v.to(device, copy=True) for k, v in st.items()}
    h = ADALOMO_H
    ops.get_impl("adalomo_update_", backend, device)(
        out, g.to(device), dev.get("exp_avg_sq_row"), dev.get("exp_avg_sq_col"),
        dev.get("exp_avg_sq"), torch.tensor(h["coef"], device=device), None, h["lr"], h["wd"],
        h["ls"], h["cgv"], h["beta"], EPS1, EPS2, h["thr"], rounding, seed, step)
    return out.cpu(), {k: v.cpu() for k, v in dev.items()}


def _check_lomo(out, p0, g, rounding):
    ref = p0.clone()
    reference.lomo_update_(ref, g, torch.tensor(LOMO_H["coef"]), None, LOMO_H["lr"], LOMO_H["wd"],
                           LOMO_H["ls"], LOMO_H["cgv"], rounding, 11, 3)
    want, size = f64_lomo(p0, g, LOMO_H)
    if rounding == "nearest" or p0.dtype == torch.float32:
        check_param(out, ref, want, size, ref_rtol=1e-6)
    else:
        check_stochastic(out, ref, want, size, ref_rtol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", LLM_SHAPES, ids=str)
@pytest.mark.parametrize("rounding", ROUNDINGS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_lomo(dtype, rounding, shape, backend):
    p0, g = rand(shape, dtype, seed=1), rand(shape, dtype, scale=1000.0, seed=2)
    out = _lomo(*backend, p0, g, rounding)
    assert not torch.equal(out, p0)
    _check_lomo(out, p0, g, rounding)


def _check_adalomo(out, st, p0, g, st0, rounding, backend):
    ref = p0.clone()
    st_ref = {k: v.clone() for k, v in st0.items()}
    h = ADALOMO_H
    reference.adalomo_update_(ref, g, st_ref.get("exp_avg_sq_row"), st_ref.get("exp_avg_sq_col"),
                              st_ref.get("exp_avg_sq"), torch.tensor(h["coef"]), None, h["lr"],
                              h["wd"], h["ls"], h["cgv"], h["beta"], EPS1, EPS2, h["thr"],
                              rounding, 5, 2)
    want = f64_adalomo(p0, g, st0, h)
    assert want.rms_u > 1.05 * h["thr"]  # the update normalisation bites
    check_state(st, st_ref, want.state)
    f64_rtol = REFERENCE_F64_RTOL if backend[0] == "torch" else 1e-5
    if rounding == "nearest" or p0.dtype == torch.float32:
        check_param(out, ref, want.p, want.size, f64_rtol=f64_rtol)
    else:
        # fp32 values differ from the reference's by the order of the sums (several ulps)
        check_stochastic(out, ref, want.p, want.size, min_equal=0.995)
        if backend[0] in ("native", "cuda_emulated"):  # and its nearest rounding within an ulp
            near, _ = _adalomo(*backend, p0, g, st0, "nearest")
            assert ulp_distance(out, near).max().item() <= 1
            assert not torch.equal(out, near)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", LLM_SHAPES, ids=str)
@pytest.mark.parametrize("rounding", ROUNDINGS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_adalomo(dtype, rounding, shape, backend):
    p0, g = rand(shape, dtype, seed=3), rand(shape, dtype, scale=0.05, seed=4)
    st0 = adalomo_state(shape, seed=5, scale=1e-4, offset=1e-6)
    out, st = _adalomo(*backend, p0, g, st0, rounding)
    assert not torch.equal(out, p0)
    _check_adalomo(out, st, p0, g, st0, rounding, backend)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("op", ["lomo_update_", "adalomo_update_"])
@pytest.mark.parametrize("rounding", ROUNDINGS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_unaligned_views(dtype, rounding, op, backend):
    # param and grad start 1..7 elements (2..28 bytes) past a 16-byte boundary; the bytes of the
    # storage around the view must be left alone
    backend_name, device = backend
    for shape in [(33, 512), (4101,)]:
        for off in range(1, 8):
            numel = torch.Size(shape).numel()
            base_p = rand((numel + 16,), dtype, seed=off).to(device)
            base_g = rand((numel + 16,), dtype, scale=1000.0 if op == "lomo_update_" else 0.05,
                          seed=off + 10).to(device)
            before = base_p.cpu().clone()
            p = unaligned_view(base_p, off, shape)
            g = unaligned_view(base_g, 8 - off, shape)  # a different misalignment
            assert p.is_contiguous() and p.data_ptr() % 16 != 0 or dtype == torch.float32
            p0, g0 = p.cpu().clone(), g.cpu().clone()
            if op == "lomo_update_":
                _check_lomo(_lomo(backend_name, device, p0, g, rounding, out=p), p0, g0, rounding)
            else:
                st0 = adalomo_state(shape, seed=off, scale=1e-4, offset=1e-6)
                _, st = _adalomo(backend_name, device, p0, g, st0, rounding, out=p)
                _check_adalomo(p.cpu(), st, p0, g0, st0, rounding, backend)
            after = base_p.cpu()
            assert torch.equal(bits(after[:off]), bits(before[:off])), (shape, off)
            assert torch.equal(bits(after[off + numel:]), bits(before[off + numel:])), (shape, off)
