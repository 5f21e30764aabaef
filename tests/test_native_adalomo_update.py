"""The native (C++/CUDA) AdaLomo kernel against the reference and a float64 evaluation.

``torch.ops.lomo_kernels.adalomo_update_`` runs the C++ kernel for CPU tensors and the CUDA kernel
for CUDA tensors once ``lomo_kernels._C`` is loaded. The oracle always runs on CPU copies.

The native kernels reduce in double over fixed partitions; the reference reduces in fp32 (its
``torch.linalg.vector_norm`` of a 0.5M-element fp32 tensor is off by ~2e-5 relative), so the two
differ in the last bits of lr_t and rms(u). Where an update almost cancels the parameter, that
shows as more than one ulp of the tiny result; those elements are checked against the size of
the terms instead (a pointwise relative error is meaningless there).
"""

import math

import pytest
import torch
from conftest import (
    ODD_SIZES,
    requires_cuda,
    requires_native,
    results_per_cpu_isa,
    ulp_distance,
)

import lomo_kernels
from lomo_kernels import ops, reference

pytestmark = requires_native

OP = torch.ops.lomo_kernels.adalomo_update_
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
SHAPES = [(n,) for n in ODD_SIZES] + [(1, 4097), (4097, 1), (37, 129), (3, 17, 33), ()]
HYPER = {
    "first_step": dict(lr=1e-2, wd=0.0, ls=1.0, cgv=0.0, coef=None, beta=0.0, ct=1.0),
    "all": dict(lr=3e-2, wd=0.1, ls=3.0, cgv=0.02, coef=0.7, beta=0.3, ct=1.0),
    "clipped": dict(lr=1e-3, wd=0.01, ls=1024.0, cgv=0.0, coef=None, beta=0.9, ct=0.05),
}
EPS1, EPS2 = 1e-30, 1e-3
DEVICES = ["cpu", pytest.param("cuda", marks=requires_cuda)]


def _rand(shape, dtype, scale=1.0, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=gen) * scale).to(dtype)


def _state(shape, seed, zeros=False):
    gen = torch.Generator().manual_seed(seed)
    return {k: torch.zeros(s) if zeros else torch.rand(s, generator=gen) * 1e-4 + 1e-6
            for k, s in ops.adalomo_state_shapes(shape).items()}


def _call(fn, p, g, st, h, device, rounding="nearest", found=None, seed=5, step=2):
    dev = {k: v.to(device, copy=True) for k, v in st.items()}
    coef = None if h["coef"] is None else torch.tensor(h["coef"], device=device)
    fn(p, g, dev.get("exp_avg_sq_row"), dev.get("exp_avg_sq_col"), dev.get("exp_avg_sq"), coef,
       found, h["lr"], h["wd"], h["ls"], h["cgv"], h["beta"], EPS1, EPS2, h["ct"], rounding,
       seed, step)
    return {k: v.cpu() for k, v in dev.items()}


def _f64_adalomo(p, g, st, h):
    """SPEC.md in float64 (host scalars rounded to fp32 as every backend receives them).
    Returns the new parameter, the size of its terms, and the new state."""
    f32 = reference.f32
    g = g.double()
    if h["ls"] != 1.0:
        g = g / f32(h["ls"])
    if h["cgv"] > 0:
        g = g.clamp(-f32(h["cgv"]), f32(h["cgv"]))
    if h["coef"] is not None:
        g = g * f32(h["coef"])
    G = g * g + f32(EPS1)
    b, omb = f32(h["beta"]), f32(1 - h["beta"])
    if p.dim() >= 2:
        r = st["exp_avg_sq_row"].double() * b + omb * G.mean(-1)
        c = st["exp_avg_sq_col"].double() * b + omb * G.mean(-2)
        u = (r / r.mean(-1, keepdim=True)).rsqrt().unsqueeze(-1) * c.unsqueeze(-2).rsqrt() * g
        new_state = {"exp_avg_sq_row": r, "exp_avg_sq_col": c}
    else:
        v = st["exp_avg_sq"].double() * b + omb * G
        u = v.rsqrt() * g
        new_state = {"exp_avg_sq": v}
    n = p.numel()
    u = u / max(1.0, u.norm().item() / math.sqrt(n) / f32(h["ct"]))
    p64 = p.double()
    lr_t = f32(h["lr"]) * max(f32(EPS2), p64.norm().item() / math.sqrt(n))
    a, s = p64 * (1 - lr_t * f32(h["wd"])), lr_t * u
    return a - s, a.abs() + s.abs(), new_state


def _check_param(out, ref, want, size):
    if out.dtype == torch.float32:
        assert ((out.double() - want).abs() <= 1e-5 * size + 1e-30).all()
        assert ((out.double() - ref.double()).abs() <= 1e-4 * size + 1e-30).all()
    else:
        near_cancel_ok = lambda x, tol: (x.double() - want).abs() <= tol * size  # noqa: E731
        assert ((ulp_distance(out, want.to(out.dtype)) <= 1) | near_cancel_ok(out, 1e-5)).all()
        assert ((ulp_distance(out, ref) <= 1) | near_cancel_ok(out, 1e-4)).all()


def _check_state(got, ref, want):
    for k in want:
        assert ((got[k].double() - want[k]).abs() <= 1e-5 * want[k].abs()).all(), k
        assert ((got[k] - ref[k]).abs() <= 1e-5 * ref[k].abs()).all(), k


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("hname", list(HYPER))
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_matches_reference_and_float64(dtype, shape, hname, device):
    h = HYPER[hname]
    p0, g = _rand(shape, dtype, seed=1), _rand(shape, dtype, scale=0.05, seed=2)
    st0 = _state(shape, seed=3, zeros=hname == "first_step")
    out = p0.to(device, copy=True)
    st = _call(OP, out, g.to(device), st0, h, device)
    ref = p0.clone()
    st_ref = _call(reference.adalomo_update_, ref, g, st0, h, "cpu")
    want, size, st_want = _f64_adalomo(p0, g, st0, h)
    out = out.cpu()
    assert p0.numel() < 100 or not torch.equal(out, p0)  # it did update
    _check_param(out, ref, want, size)
    _check_state(st, st_ref, st_want)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape", [(278011,), (37, 129), (3, 17, 33)], ids=str)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_stochastic_rounding_of_the_fp32_result(dtype, shape, device):
    # The fp32 kernel on the upcast inputs yields the unrounded result (on CPU the partition and
    # hence every sum is the same for every dtype); stochastic rounding must be the reference's
    # rounding of it, with the same (seed, step, index) hash.
    h = HYPER["all"]
    p0, g = _rand(shape, dtype, seed=4), _rand(shape, dtype, scale=0.05, seed=5)
    st0 = _state(shape, seed=6)
    out = p0.to(device, copy=True)
    _call(OP, out, g.to(device), st0, h, device, rounding="stochastic", seed=9, step=4)
    out32 = p0.float().to(device)
    _call(OP, out32, g.float().to(device), st0, h, device)
    want = reference.round_to_dtype(out32.cpu(), dtype, "stochastic", 9, 4)
    if device == "cpu":
        assert torch.equal(out.cpu().view(torch.int16), want.view(torch.int16))
    else:
        assert ulp_distance(out.cpu(), want).max().item() <= 1
    near = p0.to(device, copy=True)
    _call(OP, near, g.to(device), st0, h, device, seed=9, step=4)
    assert ulp_distance(out.cpu(), near.cpu()).max().item() <= 1
    assert not torch.equal(out.cpu(), near.cpu())


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape", [(4097,), (37, 129), (3, 17, 33)], ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_non_finite_gradient_leaves_everything_unchanged(dtype, shape, device):
    h = HYPER["all"]
    p0, g = _rand(shape, dtype, seed=7), _rand(shape, dtype, scale=0.05, seed=8)
    g.view(-1)[g.numel() // 2] = float("nan") if dtype == torch.float16 else float("inf")
    st0 = _state(shape, seed=9)
    out = p0.to(device, copy=True)
    found = torch.zeros(1, device=device)
    st = _call(OP, out, g.to(device), st0, h, device, found=found)
    assert found.item() == 1.0
    assert torch.equal(out.cpu(), p0)
    for k in st0:
        assert torch.equal(st[k], st0[k])
    # and a clean gradient afterwards still updates
    g.view(-1)[g.numel() // 2] = 0.01
    found.zero_()
    _call(OP, out, g.to(device), st0, h, device, found=found)
    assert found.item() == 0.0 and not torch.equal(out.cpu(), p0)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_empty_is_a_no_op(dtype, device):
    for shape in [(0,), (3, 0), (0, 5), (2, 0, 4)]:
        p = torch.empty(shape, dtype=dtype, device=device)
        st = {k: v.to(device) for k, v in _state(shape, 0).items()}
        found = torch.zeros(1, device=device)
        OP(p, torch.empty_like(p), st.get("exp_avg_sq_row"), st.get("exp_avg_sq_col"),
           st.get("exp_avg_sq"), None, found, 1e-2, 0.0, 1.0, 0.0, 0.5, EPS1, EPS2, 1.0,
           "nearest", 0, 1)
        assert found.item() == 0.0


@pytest.mark.parametrize("shape", [(513, 1031), (278011,), (5, 33, 65)], ids=str)
def test_same_result_with_one_and_two_threads(shape):
    h = HYPER["all"]
    p0, g = _rand(shape, torch.bfloat16, seed=10), _rand(shape, torch.bfloat16, 0.05, seed=11)
    st0 = _state(shape, seed=12)
    old = torch.get_num_threads()
    outs = []
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            out = p0.clone()
            st = _call(OP, out, g, st0, h, "cpu", rounding="stochastic")
            outs.append((out, st))
    finally:
        torch.set_num_threads(old)
    (a, sa), (b, sb) = outs
    assert torch.equal(a.view(torch.int16), b.view(torch.int16))
    for k in sa:
        assert torch.equal(sa[k].view(torch.int32), sb[k].view(torch.int32))


@requires_cuda
def test_cuda_is_deterministic():
    h = HYPER["all"]
    shape = (1031, 2053)
    p0, g = _rand(shape, torch.bfloat16, seed=13), _rand(shape, torch.bfloat16, 0.05, seed=14)
    st0 = _state(shape, seed=15)
    results = []
    for _ in range(2):
        out = p0.cuda()
        st = _call(OP, out, g.cuda(), st0, h, "cuda", rounding="stochastic")
        results.append((out.cpu(), st))
    assert torch.equal(results[0][0].view(torch.int16), results[1][0].view(torch.int16))
    for k in st0:
        assert torch.equal(results[0][1][k], results[1][1][k])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape", [(37, 129), (4097,), (2, 3, 5)], ids=str)
def test_opcheck(shape, device):
    p = _rand(shape, torch.bfloat16).to(device)
    g = _rand(shape, torch.bfloat16, 0.05, seed=1).to(device)
    st = {k: v.to(device) for k, v in _state(shape, 2).items()}
    found = torch.zeros(1, device=device)
    coef = torch.tensor(0.5, device=device)
    args = (p, g, st.get("exp_avg_sq_row"), st.get("exp_avg_sq_col"), st.get("exp_avg_sq"), coef,
            found, 1e-2, 0.1, 2.0, 0.5, 0.3, EPS1, EPS2, 1.0, "stochastic", 1, 2)
    torch.library.opcheck(OP, args)


@pytest.mark.parametrize("device", DEVICES)
def test_bad_inputs_name_the_argument(device):
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
            OP(*head, *tail)
    with pytest.raises(RuntimeError, match="rounding must be"):
        OP(p, g, row, col, None, *tail[:10], "up", 0, 1)


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


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_optimizer_native_matches_torch_backend(dtype):
    l_nat, p_nat = _adalomo_run("native", dtype)
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
