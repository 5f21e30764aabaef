"""What only the native (C++/CUDA) AdaLomo kernels have: their threads and CPU clones, and the op
schema checks of the C++ entry points (opcheck, argument errors). The properties every backend
shares (against the reference and float64, stochastic rounding, non-finite gradients, determinism,
the optimizer) are in test_adalomo_update.py.

``torch.ops.lomo_kernels.adalomo_update_`` runs the C++ kernel for CPU tensors and the CUDA kernel
for CUDA tensors; ``cuda_emulated`` runs the CUDA kernel in the SIMT emulation on CPU tensors
(conftest.NATIVE_TARGETS).
"""

import pytest
import torch
from conftest import (NATIVE_TARGETS, requires_cuda_emulation, requires_native,
                      results_per_cpu_isa, target_device, target_op)
from oracle import EPS1, EPS2, adalomo_state, rand

from lomo_kernels import reference

pytestmark = [requires_native, pytest.mark.adalomo]

HYPER_ALL = dict(lr=3e-2, wd=0.1, ls=3.0, cgv=0.02, coef=0.7, beta=0.3, thr=1.0)


def _state(shape, seed, zeros=False):
    return adalomo_state(shape, seed, scale=1e-4, offset=1e-6, zeros=zeros)


def _call(fn, p, g, st, h, device, rounding="nearest", found=None, seed=5, step=2):
    dev = {k: v.to(device, copy=True) for k, v in st.items()}
    coef = None if h["coef"] is None else torch.tensor(h["coef"], device=device)
    fn(p, g, dev.get("exp_avg_sq_row"), dev.get("exp_avg_sq_col"), dev.get("exp_avg_sq"), coef,
       found, h["lr"], h["wd"], h["ls"], h["cgv"], h["beta"], EPS1, EPS2, h["thr"], rounding,
       seed, step)
    return {k: v.cpu() for k, v in dev.items()}


OP = torch.ops.lomo_kernels.adalomo_update_
_NEAREST_CASES = {"first_step": dict(lr=1e-2, wd=0.0, ls=1.0, cgv=0.0, coef=None, beta=0.0, thr=1.0),
                  "all": HYPER_ALL}


@pytest.mark.parametrize("hname", ["all", "first_step"])
@pytest.mark.parametrize("shape", [(37, 129), (3, 17, 33), (130, 4096)], ids=str)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_cpu_nearest_rounding_of_the_fp32_result(dtype, shape, hname):
    # The C++ apply pass's vector path for nearest rounding (finite step scalars; a decay of
    # exactly 1 left out under "first_step") must round the fp32 kernel's unrounded result
    # exactly as the reference rounds it.
    h = _NEAREST_CASES[hname]
    p0, g = rand(shape, dtype, seed=4), rand(shape, dtype, scale=0.05, seed=5)
    st0 = _state(shape, seed=6, zeros=hname == "first_step")
    out = p0.clone()
    _call(OP, out, g, st0, h, "cpu")
    out32 = p0.float()
    _call(OP, out32, g.float(), st0, h, "cpu")
    want = reference.round_to_dtype(out32, dtype, "nearest", 0, 0)
    assert not torch.equal(out, p0)
    assert torch.equal(out.view(torch.int16), want.view(torch.int16))




@pytest.mark.parametrize("target", ["cpu", pytest.param("cuda_emulated",
                                                        marks=requires_cuda_emulation)])
@pytest.mark.parametrize("shape", [(513, 1031), (278011,), (5, 33, 65)], ids=str)
def test_same_result_with_one_and_two_threads(shape, target, monkeypatch):
    # cpu: torch's intra-op threads; cuda_emulated: the OS threads that run the emulated blocks
    h = HYPER_ALL
    p0, g = rand(shape, torch.bfloat16, seed=10), rand(shape, torch.bfloat16, 0.05, seed=11)
    st0 = _state(shape, seed=12)
    old = torch.get_num_threads()
    outs = []
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            monkeypatch.setenv("LOMO_KERNELS_EMULATION_THREADS", str(threads))
            out = p0.clone()
            st = _call(target_op(target, "adalomo_update_"), out, g, st0, h, "cpu",
                       rounding="stochastic")
            outs.append((out, st))
    finally:
        torch.set_num_threads(old)
    (a, sa), (b, sb) = outs
    assert torch.equal(a.view(torch.int16), b.view(torch.int16))
    for k in sa:
        assert torch.equal(sa[k].view(torch.int32), sb[k].view(torch.int32))


@pytest.mark.parametrize("target", NATIVE_TARGETS)
@pytest.mark.parametrize("shape", [(37, 129), (4097,), (2, 3, 5)], ids=str)
def test_opcheck(shape, target):
    device = target_device(target)
    p = rand(shape, torch.bfloat16).to(device)
    g = rand(shape, torch.bfloat16, 0.05, seed=1).to(device)
    st = {k: v.to(device) for k, v in _state(shape, 2).items()}
    found = torch.zeros(1, device=device)
    coef = torch.tensor(0.5, device=device)
    args = (p, g, st.get("exp_avg_sq_row"), st.get("exp_avg_sq_col"), st.get("exp_avg_sq"), coef,
            found, 1e-2, 0.1, 2.0, 0.5, 0.3, EPS1, EPS2, 1.0, "stochastic", 1, 2)
    torch.library.opcheck(target_op(target, "adalomo_update_"), args)


@pytest.mark.parametrize("target", NATIVE_TARGETS)
def test_bad_inputs_name_the_argument(target):
    op, device = target_op(target, "adalomo_update_"), target_device(target)
    p = torch.zeros(4, 6, device=device)
    g = torch.zeros(4, 6, device=device)
    row, col = torch.zeros(4, device=device), torch.zeros(6, device=device)
    v = torch.zeros(6, device=device)
    tail = (None, None, 1e-2, 0.0, 1.0, 0.0, 0.5, EPS1, EPS2, 1.0, "nearest", 0, 1)
    cases = [
        ((p, g, None, col, None), "exp_avg_sq_row is required for a 2-d parameter"),
        ((p, g, row, torch.zeros(5, device=device), None), "exp_avg_sq_col must be float32 of shape"),
        ((p, g, row.double(), col, None), "exp_avg_sq_row must be float32"),
        ((p, g, row, col, v), "exp_avg_sq must be None for a 2-d parameter"),
        ((p[0], g[0], None, None, None), "exp_avg_sq is required for a 1-d parameter"),
        ((p[0], g[0], row, None, v), "exp_avg_sq_row must be None"),
        ((p, g.bfloat16(), row, col, None), "grad dtype"),
        ((p.t(), g.t(), torch.zeros(6, device=device), torch.zeros(4, device=device), None),
         "param must be contiguous"),
    ]
    for head, msg in cases:
        with pytest.raises(RuntimeError, match=msg):
            op(*head, *tail)
    with pytest.raises(RuntimeError, match="rounding must be"):
        op(p, g, row, col, None, *tail[:10], "up", 0, 1)


_ISA_SCRIPT = """
import torch, lomo_kernels
from lomo_kernels import ops
torch.manual_seed(0)
out = []
for dtype in (torch.float32, torch.float16, torch.bfloat16):
    for shape in ((70001,), (67, 1031), (3, 5, 37)):
        p = torch.randn(shape).to(dtype); g = (torch.randn(shape) * 3).to(dtype)
        st = {{k: torch.rand(s) + 0.1 for k, s in ops.adalomo_state_shapes(shape).items()}}
        acc = torch.zeros(1)
        for coef, cgv, rounding in ((torch.tensor(0.37), 0.7, "stochastic"),  # clipping
                                    (None, 0.0, "stochastic"), (None, 0.0, "nearest")):
            torch.ops.lomo_kernels.adalomo_update_(
                p, g, st.get("exp_avg_sq_row"), st.get("exp_avg_sq_col"), st.get("exp_avg_sq"),
                coef, None, 3e-3, 0.1, 1000.0, cgv, 0.3, 1e-30, 1e-3, 0.05, rounding, 5, 2, acc)
            out += [p.float().flatten(), acc.clone()] + [v.flatten() for v in st.values()]
torch.save(torch.cat(out), {path!r})
"""


@pytest.mark.slow  # four subprocesses that each import torch: about a minute on 2 cores
def test_every_cpu_clone_computes_the_same(tmp_path):
    # The baseline, AVX2 and AVX-512 clones (LOMO_KERNELS_CPU_ISA caps the choice) hold the
    # 16 lanes of every sum in vectors of different widths; the sums, the state and the
    # parameters must still be bitwise the same.
    results = results_per_cpu_isa(_ISA_SCRIPT, tmp_path)
    assert torch.equal(results["base"].view(torch.int32), results["default"].view(torch.int32))
    assert torch.equal(results["avx2"].view(torch.int32), results["default"].view(torch.int32))
