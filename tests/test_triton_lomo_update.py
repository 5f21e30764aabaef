"""The Triton LOMO kernel (and the shared rounding helpers) against the reference and float64.

Runs in the Triton interpreter on CPU tensors when there is no GPU (conftest sets
TRITON_INTERPRET=1), and on CUDA tensors when there is one. The oracle always runs on CPU copies.
"""

import os

import pytest
import torch
from conftest import ODD_SIZES, requires_cuda, requires_triton, ulp_distance
from oracle import f64_lomo
from oracle import rand as _rand
from triton_launches import capture

import lomo_kernels
from lomo_kernels import ops, reference

pytestmark = requires_triton

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
# CPU tensors only in the interpreter; CUDA tensors whenever a GPU exists.
DEVICES = (["cpu"] if INTERPRET else []) + (["cuda"] if torch.cuda.is_available() else [])
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
SHAPES = [(1, 300), (300, 1), (37, 129), (3, 17, 33), ()]

HYPER = {
    "plain": dict(lr=1e-2, wd=0.0, ls=1.0, cgv=0.0, coef=None),
    "wd": dict(lr=3e-2, wd=0.1, ls=1.0, cgv=0.0, coef=None),
    "clip": dict(lr=1e-2, wd=0.0, ls=1.0, cgv=0.5, coef=0.37),
    "all": dict(lr=3e-3, wd=0.1, ls=1000.0, cgv=0.7, coef=0.37),  # non-power-of-two loss scale
    "pow2_scale": dict(lr=1e-2, wd=0.01, ls=1024.0, cgv=0.0, coef=None),
}


def _f64_lomo(p, g, h):
    return f64_lomo(p, g, h)[0]


def _assert_close_to_f64(out, want64):
    if out.dtype == torch.float32:
        torch.testing.assert_close(out.double(), want64, rtol=1e-5, atol=1e-7)
    else:  # rounded once from fp32 math (1 ulp: the interpreter truncates bf16 stores)
        assert ulp_distance(out, want64.to(out.dtype)).max().item() <= 1


def _assert_matches_reference(out, ref, p0):
    if out.dtype == torch.float32:
        # The reference's torch.add(alpha) is one fma; the interpreter's tl.fma is not fused:
        # allow 2 ulp of the larger term of p*decay - lr*g (|p0| or, without cancellation, |ref|).
        bound = 2.4e-7 * torch.maximum(p0.abs(), ref.abs())
        assert ((out - ref).abs() <= bound).all()
    else:
        assert ulp_distance(out, ref).max().item() <= 1


def _run(impl, p, g, h, device, rounding="nearest", seed=0, step=1, found=None):
    coef = None if h["coef"] is None else torch.tensor(h["coef"], device=device)
    impl(p, g, coef, found, h["lr"], h["wd"], h["ls"], h["cgv"], rounding, seed, step)


def _triton_and_reference(shape, dtype, h, device, rounding="nearest", seed=0, step=1, data_seed=0):
    """(triton result, reference result computed on CPU, p0, g, found_inf) for one update."""
    p0 = _rand(shape, dtype, seed=data_seed)
    g = _rand(shape, dtype, scale=max(h["ls"], 1.0), seed=data_seed + 1)
    out = p0.to(device, copy=True)
    found = torch.zeros(1, device=device)
    _run(lomo_kernels.triton_kernels.lomo_update_, out, g.to(device), h, device, rounding, seed,
         step, found)
    ref = p0.clone()
    _run(reference.lomo_update_, ref, g, h, "cpu", rounding, seed, step)
    return out.cpu(), ref, p0, g, found.cpu()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("size", ODD_SIZES[:3])
@pytest.mark.parametrize("hname", list(HYPER))
def test_lomo_matches_reference_and_float64(device, dtype, size, hname):
    h = HYPER[hname]
    out, ref, p0, g, found = _triton_and_reference((size,), dtype, h, device)
    _assert_matches_reference(out, ref, p0)
    _assert_close_to_f64(out, _f64_lomo(p0, g, h))
    assert found.item() == 0.0


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_lomo_shapes(device, dtype, shape):
    h = HYPER["all"]
    out, ref, p0, g, _ = _triton_and_reference(shape, dtype, h, device)
    assert out.shape == p0.shape
    _assert_matches_reference(out, ref, p0)
    _assert_close_to_f64(out, _f64_lomo(p0, g, h))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype,hname", [(torch.float32, "all"), (torch.bfloat16, "all"),
                                         (torch.float16, "pow2_scale")])
def test_lomo_large(device, dtype, hname):
    # 278011 elements: 67 full blocks and a ragged tail
    h = HYPER[hname]
    out, ref, p0, g, _ = _triton_and_reference((ODD_SIZES[3],), dtype, h, device)
    _assert_matches_reference(out, ref, p0)
    _assert_close_to_f64(out, _f64_lomo(p0, g, h))


# ---------------------------------------------------------------- stochastic rounding


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("size,hname", [(1, "all"), (7, "plain"), (4097, "all"), (4097, "wd")])
def test_lomo_stochastic_rounding_is_bitwise_the_reference(device, dtype, size, hname):
    out, ref, *_ = _triton_and_reference((size,), dtype, HYPER[hname], device, "stochastic",
                                         seed=12345, step=7)
    assert torch.equal(out.view(torch.int16), ref.view(torch.int16))


@pytest.mark.parametrize("device", DEVICES)
def test_lomo_stochastic_rounding_is_bitwise_the_reference_large(device):
    out, ref, *_ = _triton_and_reference((ODD_SIZES[3],), torch.bfloat16, HYPER["clip"], device,
                                         "stochastic", seed=2**32 + 99, step=2**33 + 3)
    assert torch.equal(out.view(torch.int16), ref.view(torch.int16))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_lomo_stochastic_rounding_is_unbiased(device, dtype):
    # Every element starts at 1.0 and moves by lr*g = 1e-4: far below half an ulp of bf16/fp16 at 1
    # (2**-8 / 2**-11), so nearest rounding loses the update; the stochastic mean keeps it.
    n, seeds = 4097, 8
    g = torch.full((n,), 1.0, dtype=dtype, device=device)
    h = dict(lr=1e-4, wd=0.0, ls=1.0, cgv=0.0, coef=None)
    want = float(torch.tensor(1.0) - torch.tensor(1e-4))  # the fp32 result
    spacing = torch.finfo(dtype).eps / 2  # of the grid just below 1.0
    total = 0.0
    for s in range(seeds):
        p = torch.ones(n, dtype=dtype, device=device)
        _run(lomo_kernels.triton_kernels.lomo_update_, p, g, h, device, "stochastic", s, 1)
        assert ((p == 1.0) | (p == 1.0 - spacing)).all()  # one of the two neighbours
        assert (p == 1.0 - spacing).any() and (p == 1.0).any()
        total += p.double().sum().item()
    mean = total / (n * seeds)
    # within 5 standard errors (<= 0.5 spacing / sqrt(samples)) of the fp32 value
    assert abs(mean - want) <= 5 * 0.5 * spacing / (n * seeds) ** 0.5
    # the bias that stochastic rounding removes (nearest keeps 1.0; the interpreter's truncating
    # bf16 store gives 1 - spacing: biased either way)
    p = torch.ones(n, dtype=dtype, device=device)
    _run(lomo_kernels.triton_kernels.lomo_update_, p, g, h, device, "nearest", 0, 1)
    assert abs(p.double().mean().item() - want) > 0.5e-4


# A test-only kernel: the shared rounding helper on arbitrary fp32 values and element indices.
if ops.available_backends()["triton"] == "loaded":
    import triton
    import triton.language as tl

    from lomo_kernels.triton_kernels.rounding import high_key, key_arg, round_to

    @triton.jit
    def _round_kernel(x_ptr, y_ptr, n, base, key, BLOCK: tl.constexpr, STOCHASTIC: tl.constexpr):
        local = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        mask = local < n
        x = tl.load(x_ptr + local, mask=mask)
        idx = base + local  # the element index the hash sees
        y = round_to(x, idx, high_key(idx, key), y_ptr.dtype.element_ty, STOCHASTIC)
        tl.store(y_ptr + local, y, mask=mask)


def _special_values():
    x = torch.cat([
        torch.tensor([0.0, -0.0, float("nan"), float("inf"), -float("inf"), 65504.0, 65519.0,
                      65520.0, -65519.0, 1e-10, -3e-8, 2.0**-24, 2.0**-25, 6.1e-5, 3.3e38, -3.4e38,
                      1.0, -1.0, 2.0**-126, 1e-40]),
        torch.randn(500) * 3,
        torch.randn(200) * 1e-6,  # fp16 subnormals
        torch.randn(200) * 3e4,
        torch.exp(torch.randn(300) * 20) * torch.randn(300).sign(),  # many exponents
    ])
    return x.float()


def _reference_round(x, dtype, seed, step, base):
    """reference._sr_bf16/_sr_fp16 with the hash of element indices base, base+1, ..."""
    key = reference.rounding_key(seed, step)
    i = base + torch.arange(x.numel(), dtype=torch.int64)
    bits = reference._mix32_t((i & 0xFFFFFFFF) ^ reference._mix32_t((i >> 32) ^ key))
    return reference._sr_bf16(x, bits) if dtype == torch.bfloat16 else reference._sr_fp16(x, bits)


@pytest.mark.filterwarnings("ignore:.*encountered in:RuntimeWarning")  # interpreter, Inf/NaN
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("base", [0, 2**32 - 700, 5 * 2**32 + 3])
def test_rounding_helpers_are_bitwise_the_reference(device, dtype, base):
    # indices across and beyond 2**32 exercise the high-word half of the hash
    x = _special_values()
    seed, step = 0xDEADBEEF, 123
    y = torch.empty(x.shape, dtype=dtype, device=device)
    _round_kernel[(triton.cdiv(x.numel(), 256),)](x.to(device), y, x.numel(), base,
                                                    key_arg(seed, step), BLOCK=256, STOCHASTIC=True)
    want = _reference_round(x, dtype, seed, step, base)
    if base == 0:
        plain = reference.round_to_dtype(x, dtype, "stochastic", seed, step)
        torch.testing.assert_close(want, plain, rtol=0, atol=0, equal_nan=True)
    y = y.cpu()
    nan = torch.isnan(want)
    assert torch.equal(torch.isnan(y), nan)
    assert torch.equal(y[~nan].view(torch.int16), want[~nan].view(torch.int16))
    # nearest: what tensor.to does (1 ulp in the interpreter, which truncates bf16)
    y = torch.empty(x.shape, dtype=dtype, device=device)
    _round_kernel[(triton.cdiv(x.numel(), 256),)](x.to(device), y, x.numel(), base, 0, BLOCK=256,
                                                    STOCHASTIC=False)
    # (fp32 subnormals left out: the interpreter's bf16 conversion mishandles them)
    fin = torch.isfinite(x) & (x.abs() < 6e4) & ((x == 0) | (x.abs() >= 2.0**-126))
    assert ulp_distance(y.cpu()[fin], x[fin].to(dtype)).max().item() <= (1 if INTERPRET else 0)


def test_rounding_key_argument_is_an_int32_with_the_key_bits():
    # Triton types a uint32 >= 2**31 as int64: the launcher passes the same bits as an int32 so a
    # new step never compiles a second variant.
    for seed, step in [(0, 0), (1, 1), (123, 2**31), (2**40 + 5, 9), (0xFFFFFFFF, 0xFFFFFFFF)]:
        k = key_arg(seed, step)
        assert -(2**31) <= k < 2**31 and k % 2**32 == reference.rounding_key(seed, step)


# ---------------------------------------------------------------- determinism, non-finite


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype,rounding", [(torch.float32, "nearest"),
                                            (torch.bfloat16, "stochastic")])
def test_lomo_is_deterministic(device, dtype, rounding):
    a, *_ = _triton_and_reference((3 * 4096 + 5,), dtype, HYPER["all"], device, rounding, 5, 6)
    b, *_ = _triton_and_reference((3 * 4096 + 5,), dtype, HYPER["all"], device, rounding, 5, 6)
    assert torch.equal(a.view(torch.uint8), b.view(torch.uint8))


@pytest.mark.filterwarnings("ignore:.*encountered in:RuntimeWarning")  # interpreter, Inf/NaN
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("hname", ["plain", "all"])
def test_lomo_nonfinite_gradients_leave_those_elements_unchanged(device, dtype, hname):
    h = HYPER[hname]
    n = 4096 + 100  # bad values in a full block and in the tail block
    p0 = _rand((n,), dtype, seed=3)
    g = _rand((n,), dtype, seed=4)
    bad = torch.tensor([0, 17, 4095, 4096, n - 1])
    g[bad] = torch.tensor([float("nan"), float("inf"), -float("inf"), float("nan"), float("inf")],
                          dtype=dtype)
    out = p0.to(device, copy=True)
    found = torch.zeros(1, device=device)
    _run(lomo_kernels.triton_kernels.lomo_update_, out, g.to(device), h, device, "stochastic", 1,
         1, found)
    out = out.cpu()
    assert found.item() == 1.0
    assert torch.equal(out[bad].view(torch.uint8), p0[bad].view(torch.uint8))
    ref, ref_found = p0.clone(), torch.zeros(1)
    _run(reference.lomo_update_, ref, g, h, "cpu", "stochastic", 1, 1, ref_found)
    assert ref_found.item() == 1.0
    _assert_matches_reference(out, ref, p0)
    ok = torch.ones(n, dtype=torch.bool)
    ok[bad] = False
    assert not torch.equal(out[ok], p0[ok])  # the rest was updated
    # a flag already raised by another parameter stays raised by a clean one
    clean = p0.to(device, copy=True)
    _run(lomo_kernels.triton_kernels.lomo_update_, clean, _rand((n,), dtype).to(device), h,
         device, found=found)
    assert found.item() == 1.0


@requires_cuda
def test_lomo_no_host_sync_and_no_recompile_on_cuda():
    # Per-step values (lr, seed, step) are runtime arguments: one compiled variant, no host sync.
    from lomo_kernels.triton_kernels import lomo_update as mod

    def variants():
        return sum(len(c[0]) for c in mod._lomo_update_kernel.device_caches.values())

    p = torch.randn(10000, device="cuda").to(torch.bfloat16)
    g = torch.randn(10000, device="cuda").to(torch.bfloat16)
    found, coef = torch.zeros(1, device="cuda"), torch.tensor(0.5, device="cuda")
    mod.lomo_update_(p, g, coef, found, 0.1, 0.01, 1.0, 0.0, "stochastic", 1, 1)
    n0 = variants()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for seed, step, lr in [(1, 2, 0.05), (7, 3, 1e-3), (2**33, 2**31 + 7, 0.2)]:
            mod.lomo_update_(p, g, coef, found, lr, 0.01, 1.0, 0.0, "stochastic", seed, step)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert variants() == n0
    assert found.item() == 0.0


# ---------------------------------------------------------------- through ops and the optimizer


@pytest.mark.parametrize("device", DEVICES)
def test_ops_dispatches_to_triton_and_checks_arguments(device):
    impl = ops.get_impl("lomo_update_", "triton", device)
    assert impl is lomo_kernels.triton_kernels.lomo_update_
    p = _rand((8, 6), torch.bfloat16).to(device)
    g = _rand((8, 6), torch.bfloat16, seed=1).to(device)
    ref = p.cpu().clone()
    ops.lomo_update_(p, g, lr=0.1, weight_decay=0.1, backend="triton")
    reference.lomo_update_(ref, g.cpu(), None, None, 0.1, 0.1, 1.0, 0.0, "nearest", 0, 0)
    assert ulp_distance(p.cpu(), ref).max().item() <= 1
    with pytest.raises(ValueError, match="contiguous"):
        ops.lomo_update_(p.t(), g.t(), lr=0.1, backend="triton")
    with pytest.raises(TypeError, match="dtype"):
        ops.lomo_update_(p, g.float(), lr=0.1, backend="triton")
    with pytest.raises(ValueError, match="shape"):
        ops.lomo_update_(p, g[:4], lr=0.1, backend="triton")
    with pytest.raises(ValueError, match="rounding"):
        ops.lomo_update_(p, g, lr=0.1, rounding="up", backend="triton")
    # the launcher itself refuses what would read or write out of bounds
    launch = lomo_kernels.triton_kernels.lomo_update_
    with pytest.raises(ValueError, match="grad must be contiguous"):
        launch(p, g.t().contiguous().t(), None, None, 0.1, 0.0, 1.0, 0.0, "nearest", 0, 0)
    with pytest.raises(ValueError, match="does not match"):
        launch(p, g.reshape(-1)[:40], None, None, 0.1, 0.0, 1.0, 0.0, "nearest", 0, 0)
    with pytest.raises(ValueError, match="does not match"):
        launch(p, g.float(), None, None, 0.1, 0.0, 1.0, 0.0, "nearest", 0, 0)
    with pytest.raises(ValueError, match="found_inf"):
        launch(p, g, None, torch.zeros(0, device=device), 0.1, 0.0, 1.0, 0.0, "nearest", 0, 0)
    before = p.clone()
    launch(p[:0], g[:0], None, None, 0.1, 0.0, 1.0, 0.0, "nearest", 0, 0)  # empty: a no-op
    assert torch.equal(p, before)


def _mlp(dtype, seed=0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(
        torch.nn.Linear(6, 16), torch.nn.Tanh(), torch.nn.LayerNorm(16), torch.nn.Linear(16, 3)
    ).to(dtype)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype,rounding", [(torch.float32, "nearest"),
                                            (torch.bfloat16, "stochastic")])
def test_lomo_optimizer_triton_matches_torch_over_steps(device, dtype, rounding):
    gen = torch.Generator().manual_seed(1)
    x, y = torch.randn(8, 6, generator=gen), torch.randn(8, 3, generator=gen)
    losses, finals = {}, {}
    for backend in ("triton", "torch"):
        model = _mlp(dtype).to(device)
        opt = lomo_kernels.Lomo(model, lr=0.05, weight_decay=0.01, clip_grad_norm=1.0,
                                backend=backend, rounding=rounding, seed=3)
        losses[backend] = []
        for _ in range(4):
            loss = torch.nn.functional.mse_loss(model(x.to(device, dtype)).float(), y.to(device))
            opt.grad_norm(loss)  # global-norm clipping: clip_coef stays a device tensor
            loss = torch.nn.functional.mse_loss(model(x.to(device, dtype)).float(), y.to(device))
            opt.fused_backward(loss, lr=0.05)
            losses[backend].append(loss.item())
        finals[backend] = [p.detach().cpu() for p in model.parameters()]
    assert losses["triton"][-1] < losses["triton"][0]
    torch.testing.assert_close(losses["triton"], losses["torch"], rtol=1e-5 if dtype ==
                               torch.float32 else 1e-2, atol=0)
    for a, b in zip(finals["triton"], finals["torch"]):
        if dtype == torch.float32:
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
        else:  # per-element ulp differences in one step may change the next step's gradients
            assert ulp_distance(a, b).max().item() <= 2
            assert (a == b).float().mean().item() > 0.9


# ---------------------------------------------------------------- unaligned views, multi-tensor


def _lomo_all(impl_args, p, g, device, ws_shapes):
    found, acc = torch.zeros(1, device=device), torch.zeros(1, device=device)
    ws = torch.zeros(lomo_kernels.triton_kernels.workspace_numel("lomo_update_", ws_shapes),
                     device=device)
    lomo_kernels.triton_kernels.lomo_update_(p, g, torch.tensor(0.9, device=device), found,
                                             *impl_args, acc, ws)
    return found.cpu(), acc.cpu()


@pytest.mark.filterwarnings("ignore:.*encountered in:RuntimeWarning")  # interpreter, Inf/NaN
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("p_off,g_off", [(3, 3), (1, 1), (3, 5), (0, 2)])
def test_lomo_unaligned_views_update_like_aligned_tensors(device, dtype, p_off, g_off):
    # (3, 3), (1, 1): equally misaligned, the kernel peels the head and vectorises the body;
    # (3, 5), (0, 2): not peelable. Either way: bitwise the update of aligned copies, nothing
    # outside the view touched, a non-finite gradient in the head and in the body skipped.
    n = 2 * 4096 + 37
    base_p = _rand((n + 16,), dtype, seed=21).to(device)
    base_g = _rand((n + 16,), dtype, seed=22).to(device)
    base_g[g_off + 1] = float("nan")
    base_g[g_off + 5000] = float("inf")
    p, g = base_p[p_off: p_off + n], base_g[g_off: g_off + n]
    if p_off == g_off and p_off:
        assert lomo_kernels.triton_kernels.launch.peel(p, g)[0] > 0
    p_copy, g_copy = p.clone(), g.clone()
    before = base_p.clone()
    args = (3e-2, 0.1, 4.0, 0.5, "stochastic", 7, 9)
    f1, a1 = _lomo_all(args, p, g, device, [(n,)])
    f2, a2 = _lomo_all(args, p_copy, g_copy, device, [(n,)])
    assert torch.equal(p.cpu().view(torch.uint8), p_copy.cpu().view(torch.uint8))
    assert f1.item() == f2.item() == 1.0
    assert torch.isnan(a1).all() and torch.isnan(a2).all()  # the true norm of a NaN gradient
    outside = torch.ones(n + 16, dtype=torch.bool)
    outside[p_off: p_off + n] = False
    assert torch.equal(base_p.cpu()[outside], before.cpu()[outside])
    for i in (1, 5000):
        assert torch.equal(p.cpu()[i: i + 1].view(torch.uint8),
                           before.cpu()[p_off + i: p_off + i + 1].view(torch.uint8))
    # and the squared norm of a finite gradient does not depend on the peeling
    g_fin = torch.nan_to_num(g, nan=0.5, posinf=0.5)
    f1, a1 = _lomo_all(args, p, g_fin, device, [(n,)])
    f2, a2 = _lomo_all(args, p_copy, g_fin.clone(), device, [(n,)])
    torch.testing.assert_close(a1, a2, rtol=1e-6, atol=0)
    want = ((g_fin.cpu().double() / 4.0) ** 2).sum()
    torch.testing.assert_close(a1.double(), want.view(1), rtol=1e-5, atol=0)


@pytest.mark.parametrize("device", DEVICES)
def test_lomo_multi_with_mixed_dtypes_and_views_is_bitwise_the_single_op(device):
    # two dtype groups (two launches), interleaved in the list, peeled and unpeeled views; grad_sq
    # adds the per-tensor sums in list order across the groups
    base = _rand((9000,), torch.bfloat16, seed=5).to(device)
    gbase = _rand((9000,), torch.bfloat16, seed=6).to(device)
    params = [base[3:4500], _rand((33,), torch.float32, seed=7).to(device), base[4600:4607],
              _rand((5000,), torch.float32, seed=8).to(device), base[4700:8900]]
    grads = [gbase[3:4500], _rand((33,), torch.float32, seed=9).to(device), gbase[4601:4608],
             _rand((5000,), torch.float32, seed=10).to(device), gbase[4700:8900]]
    k = len(params)
    lr, wd, cgv = [0.01 * (i + 1) for i in range(k)], [0.1, 0.0] * 2 + [0.1], [0.0, 0.2] * 2 + [0.0]
    seed, step = list(range(k)), [5] * k
    tk = lomo_kernels.triton_kernels
    shapes = [p.shape for p in params]
    want = [p.clone() for p in params]
    f1, a1 = torch.zeros(1, device=device), torch.full((1,), 0.25, device=device)
    ws = torch.zeros(tk.workspace_numel("lomo_update_", shapes), device=device)
    snapshot = base.clone()
    for i in range(k):  # the single op on copies that keep each view's misalignment
        tmp = snapshot.clone() if params[i].dtype == torch.bfloat16 else None
        p_i = tmp[params[i].storage_offset(): params[i].storage_offset() + params[i].numel()] \
            if tmp is not None else want[i]
        tk.lomo_update_(p_i, grads[i], None, f1, lr[i], wd[i], 2.0, cgv[i], "stochastic",
                        seed[i], step[i], a1, ws)
        want[i] = p_i.clone()
    f2, a2 = torch.zeros(1, device=device), torch.full((1,), 0.25, device=device)
    ws = torch.zeros(tk.workspace_numel("lomo_update_multi_", shapes), device=device)
    with capture(run=True) as seen:
        tk.lomo_update_multi_(params, grads, None, f2, lr, wd, 2.0, cgv, "stochastic", seed, step,
                              a2, ws)
    assert len(seen) == 2
    assert all(torch.equal(a.cpu(), b.cpu()) for a, b in zip(params, want))
    assert torch.equal(a1.cpu(), a2.cpu()) and f1.item() == f2.item() == 0.0
