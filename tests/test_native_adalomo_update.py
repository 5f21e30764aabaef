"""The native (C++/CUDA) AdaLomo kernel against the reference and a float64 evaluation.

``torch.ops.lomo_kernels.adalomo_update_`` runs the C++ kernel for CPU tensors and the CUDA kernel
for CUDA tensors once ``lomo_kernels._C`` is loaded. Every case runs on each native target
(conftest.NATIVE_TARGETS): the C++ kernel, the CUDA kernel in the SIMT emulation on CPU tensors
(``cuda_emulated``, with the same tolerances as on a GPU) and, with a GPU, the CUDA kernel itself.
The oracle always runs on CPU copies.

The native kernels reduce in double over fixed partitions; the reference reduces in fp32 (its
``torch.linalg.vector_norm`` of a 0.5M-element fp32 tensor is off by ~2e-5 relative), so the two
differ in the last bits of lr_t and rms(u). Where an update almost cancels the parameter, that
shows as more than one ulp of the tiny result; those elements are checked against the size of
the terms instead (a pointwise relative error is meaningless there).
"""

import pytest
import torch
from conftest import (NATIVE_TARGETS, ODD_SIZES, requires_cuda_emulation, requires_native,
                      results_per_cpu_isa, target_device, target_op, ulp_distance)
from oracle import (DTYPES, EPS1, EPS2, LLM_SHAPES, adalomo_state, check_param, check_state,
                    f64_adalomo, rand)

import lomo_kernels
from lomo_kernels import reference

pytestmark = requires_native

OP = torch.ops.lomo_kernels.adalomo_update_
SHAPES = [(n,) for n in ODD_SIZES] + [(1, 4097), (4097, 1), (37, 129), (3, 17, 33), ()] + LLM_SHAPES
HYPER = {
    "first_step": dict(lr=1e-2, wd=0.0, ls=1.0, cgv=0.0, coef=None, beta=0.0, thr=1.0),
    "all": dict(lr=3e-2, wd=0.1, ls=3.0, cgv=0.02, coef=0.7, beta=0.3, thr=1.0),
    "clipped": dict(lr=1e-3, wd=0.01, ls=1024.0, cgv=0.0, coef=None, beta=0.9, thr=0.05),
}


def _state(shape, seed, zeros=False):
    return adalomo_state(shape, seed, scale=1e-4, offset=1e-6, zeros=zeros)


def _call(fn, p, g, st, h, device, rounding="nearest", found=None, seed=5, step=2):
    dev = {k: v.to(device, copy=True) for k, v in st.items()}
    coef = None if h["coef"] is None else torch.tensor(h["coef"], device=device)
    fn(p, g, dev.get("exp_avg_sq_row"), dev.get("exp_avg_sq_col"), dev.get("exp_avg_sq"), coef,
       found, h["lr"], h["wd"], h["ls"], h["cgv"], h["beta"], EPS1, EPS2, h["thr"], rounding,
       seed, step)
    return {k: v.cpu() for k, v in dev.items()}


@pytest.mark.parametrize("target", NATIVE_TARGETS)
@pytest.mark.parametrize("hname", list(HYPER))
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_matches_reference_and_float64(dtype, shape, hname, target):
    h = HYPER[hname]
    device = target_device(target)
    p0, g = rand(shape, dtype, seed=1), rand(shape, dtype, scale=0.05, seed=2)
    st0 = _state(shape, seed=3, zeros=hname == "first_step")
    out = p0.to(device, copy=True)
    st = _call(target_op(target, "adalomo_update_"), out, g.to(device), st0, h, device)
    ref = p0.clone()
    st_ref = _call(reference.adalomo_update_, ref, g, st0, h, "cpu")
    want = f64_adalomo(p0, g, st0, h)
    out = out.cpu()
    assert p0.numel() < 100 or not torch.equal(out, p0)  # it did update
    check_param(out, ref, want.p, want.size)
    check_state(st, st_ref, want.state)


@pytest.mark.parametrize("target", NATIVE_TARGETS)
@pytest.mark.parametrize("shape", [(278011,), (37, 129), (3, 17, 33), (130, 4096), (40, 8, 64)],
                         ids=str)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_stochastic_rounding_of_the_fp32_result(dtype, shape, target):
    # The fp32 kernel on the upcast inputs yields the unrounded result (the partition and hence
    # every sum is the same for every dtype); stochastic rounding must be the reference's rounding
    # of it, with the same (seed, step, index) hash.
    h = HYPER["all"]
    op, device = target_op(target, "adalomo_update_"), target_device(target)
    p0, g = rand(shape, dtype, seed=4), rand(shape, dtype, scale=0.05, seed=5)
    st0 = _state(shape, seed=6)
    out = p0.to(device, copy=True)
    _call(op, out, g.to(device), st0, h, device, rounding="stochastic", seed=9, step=4)
    out32 = p0.float().to(device)
    _call(op, out32, g.float().to(device), st0, h, device)
    want = reference.round_to_dtype(out32.cpu(), dtype, "stochastic", 9, 4)
    if target == "cpu":
        assert torch.equal(out.cpu().view(torch.int16), want.view(torch.int16))
    else:
        assert ulp_distance(out.cpu(), want).max().item() <= 1
    near = p0.to(device, copy=True)
    _call(op, near, g.to(device), st0, h, device, seed=9, step=4)
    assert ulp_distance(out.cpu(), near.cpu()).max().item() <= 1
    assert not torch.equal(out.cpu(), near.cpu())


@pytest.mark.parametrize("hname", ["all", "first_step"])
@pytest.mark.parametrize("shape", [(37, 129), (3, 17, 33), (130, 4096)], ids=str)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_cpu_nearest_rounding_of_the_fp32_result(dtype, shape, hname):
    # The C++ apply pass's vector path for nearest rounding (finite step scalars; a decay of
    # exactly 1 left out under "first_step") must round the fp32 kernel's unrounded result
    # exactly as the reference rounds it.
    h = HYPER[hname]
    p0, g = rand(shape, dtype, seed=4), rand(shape, dtype, scale=0.05, seed=5)
    st0 = _state(shape, seed=6, zeros=hname == "first_step")
    out = p0.clone()
    _call(OP, out, g, st0, h, "cpu")
    out32 = p0.float()
    _call(OP, out32, g.float(), st0, h, "cpu")
    want = reference.round_to_dtype(out32, dtype, "nearest", 0, 0)
    assert not torch.equal(out, p0)
    assert torch.equal(out.view(torch.int16), want.view(torch.int16))


@pytest.mark.parametrize("target", NATIVE_TARGETS)
@pytest.mark.parametrize("shape", [(4097,), (37, 129), (3, 17, 33), (130, 4096)], ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_non_finite_gradient_leaves_everything_unchanged(dtype, shape, target):
    h = HYPER["all"]
    op, device = target_op(target, "adalomo_update_"), target_device(target)
    p0, g = rand(shape, dtype, seed=7), rand(shape, dtype, scale=0.05, seed=8)
    g.view(-1)[g.numel() // 2] = float("nan") if dtype == torch.float16 else float("inf")
    st0 = _state(shape, seed=9)
    out = p0.to(device, copy=True)
    found = torch.zeros(1, device=device)
    st = _call(op, out, g.to(device), st0, h, device, found=found)
    assert found.item() == 1.0
    assert torch.equal(out.cpu(), p0)
    for k in st0:
        assert torch.equal(st[k], st0[k])
    # and a clean gradient afterwards still updates
    g.view(-1)[g.numel() // 2] = 0.01
    found.zero_()
    _call(op, out, g.to(device), st0, h, device, found=found)
    assert found.item() == 0.0 and not torch.equal(out.cpu(), p0)


@pytest.mark.parametrize("target", NATIVE_TARGETS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_empty_is_a_no_op(dtype, target):
    op, device = target_op(target, "adalomo_update_"), target_device(target)
    for shape in [(0,), (3, 0), (0, 5), (2, 0, 4)]:
        p = torch.empty(shape, dtype=dtype, device=device)
        st = {k: v.to(device) for k, v in _state(shape, 0).items()}
        found = torch.zeros(1, device=device)
        op(p, torch.empty_like(p), st.get("exp_avg_sq_row"), st.get("exp_avg_sq_col"),
           st.get("exp_avg_sq"), None, found, 1e-2, 0.0, 1.0, 0.0, 0.5, EPS1, EPS2, 1.0,
           "nearest", 0, 1)
        assert found.item() == 0.0


@pytest.mark.parametrize("target", ["cpu", pytest.param("cuda_emulated",
                                                        marks=requires_cuda_emulation)])
@pytest.mark.parametrize("shape", [(513, 1031), (278011,), (5, 33, 65)], ids=str)
def test_same_result_with_one_and_two_threads(shape, target, monkeypatch):
    # cpu: torch's intra-op threads; cuda_emulated: the OS threads that run the emulated blocks
    h = HYPER["all"]
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


@pytest.mark.parametrize("target", [t for t in NATIVE_TARGETS if t != "cpu"])
def test_cuda_is_deterministic(target):
    h = HYPER["all"]
    op, device = target_op(target, "adalomo_update_"), target_device(target)
    shape = (1031, 2053)
    p0, g = rand(shape, torch.bfloat16, seed=13), rand(shape, torch.bfloat16, 0.05, seed=14)
    st0 = _state(shape, seed=15)
    results = []
    for _ in range(2):
        out = p0.to(device, copy=True)
        st = _call(op, out, g.to(device), st0, h, device, rounding="stochastic")
        results.append((out.cpu(), st))
    assert torch.equal(results[0][0].view(torch.int16), results[1][0].view(torch.int16))
    for k in st0:
        assert torch.equal(results[0][1][k], results[1][1][k])


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


def _adalomo_run(backend, dtype, steps=6):
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Conv1d(3, 8, 5), torch.nn.GELU(), torch.nn.Flatten(), torch.nn.Linear(8 * 12, 7)
    ).to(dtype)  # a 3-d conv weight (factored over its last two dims), 2-d and 1-d params
    opt = lomo_kernels.AdaLomo(model, lr=1e-2, weight_decay=0.01, clip_grad_value=1.0,
                               backend=backend, seed=3)
    gen = torch.Generator().manual_seed(1)
    losses = []
    for _ in range(steps):
        x = torch.randn(16, 3, 16, generator=gen).to(dtype)
        y = torch.randn(16, 7, generator=gen).to(dtype)
        loss = torch.nn.functional.mse_loss(model(x).float(), y.float())
        opt.fused_backward(loss, lr=1e-2)
        losses.append(loss.item())
    return losses, [p.detach().clone() for p in model.parameters()]


@pytest.mark.parametrize("backend", ["native", pytest.param("cuda_emulated",
                                                            marks=requires_cuda_emulation)])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_optimizer_native_matches_torch_backend(dtype, backend):
    l_nat, p_nat = _adalomo_run(backend, dtype)
    l_ref, p_ref = _adalomo_run("torch", dtype)
    for a, b in zip(l_nat, l_ref):
        assert abs(a - b) <= 1e-3 * abs(b)
    assert l_nat[-1] < l_nat[0]
    for a, b in zip(p_nat, p_ref):
        if dtype == torch.float32:
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
        else:
            assert ulp_distance(a, b).max().item() <= 2  # 6 steps of <= 1 ulp, rarely compounded


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
        for coef, cgv in ((torch.tensor(0.37), 0.7), (None, 0.0)):  # with and without clipping
            torch.ops.lomo_kernels.adalomo_update_(
                p, g, st.get("exp_avg_sq_row"), st.get("exp_avg_sq_col"), st.get("exp_avg_sq"),
                coef, None, 3e-3, 0.1, 1000.0, cgv, 0.3, 1e-30, 1e-3, 0.05, "stochastic", 5, 2,
                acc)
            out += [p.float().flatten(), acc.clone()] + [v.flatten() for v in st.values()]
torch.save(torch.cat(out), {path!r})
"""


def test_every_cpu_clone_computes_the_same(tmp_path):
    # The baseline, AVX2 and AVX-512 clones (LOMO_KERNELS_CPU_ISA caps the choice) hold the
    # 16 lanes of every sum in vectors of different widths; the sums, the state and the
    # parameters must still be bitwise the same.
    results = results_per_cpu_isa(_ISA_SCRIPT, tmp_path)
    assert torch.equal(results["base"].view(torch.int32), results["default"].view(torch.int32))
    assert torch.equal(results["avx2"].view(torch.int32), results["default"].view(torch.int32))
