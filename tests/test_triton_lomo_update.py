"""What only the Triton LOMO kernel has: the shared rounding helpers on arbitrary values and indices,
the launcher's own argument checks, one compiled variant per dtype (no recompilation, no host
sync, on a GPU), and the multi-tensor launch over mixed dtypes and views. The properties every
backend shares (against the reference and float64, stochastic rounding, non-finite gradients,
layouts, the optimizer) are in test_lomo_update.py.

Runs in the Triton interpreter on CPU tensors when there is no GPU (conftest sets
TRITON_INTERPRET=1), and on CUDA tensors when there is one. The oracle always runs on CPU copies.
"""

import os

import pytest
import torch
from conftest import requires_cuda, requires_triton, ulp_distance
from oracle import rand as _rand
from triton_launches import capture

import lomo_kernels
from lomo_kernels import ops, reference

pytestmark = [requires_triton, pytest.mark.lomo, pytest.mark.backend_triton]

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
# CPU tensors only in the interpreter; CUDA tensors whenever a GPU exists.
DEVICES = (["cpu"] if INTERPRET else []) + (["cuda"] if torch.cuda.is_available() else [])


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


# ---------------------------------------------------------------- the launchers


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
        # (float32 is allowed: an accumulation buffer; another 16-bit dtype is not)
        ops.lomo_update_(p, g.to(torch.bfloat16 if p.dtype == torch.float16 else torch.float16),
                         lr=0.1, backend="triton")
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
        launch(p, g.half(), None, None, 0.1, 0.0, 1.0, 0.0, "nearest", 0, 0)  # (float32: allowed)
    with pytest.raises(ValueError, match="found_inf"):
        launch(p, g, None, torch.zeros(0, device=device), 0.1, 0.0, 1.0, 0.0, "nearest", 0, 0)
    before = p.clone()
    launch(p[:0], g[:0], None, None, 0.1, 0.0, 1.0, 0.0, "nearest", 0, 0)  # empty: a no-op
    assert torch.equal(p, before)


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
