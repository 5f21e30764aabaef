"""The native (C++/CUDA) LOMO kernel against the reference and a float64 evaluation.

Once ``lomo_kernels._C`` is loaded, ``torch.ops.lomo_kernels.lomo_update_`` runs the C++ kernel for
CPU tensors and the CUDA kernel for CUDA tensors (the reference is only the fallback), so these
tests call the op directly. Every case runs on each native target (conftest.NATIVE_TARGETS): the C++
kernel, the CUDA kernel in the SIMT emulation on CPU tensors (``cuda_emulated``, with the same
tolerances as on a GPU) and, with a GPU, the CUDA kernel itself. The oracle always runs on CPU copies.

On CPU the kernel is bitwise equal to the reference (the same fp32 operations: a division by the
loss scale, one fma for ``torch.add(p, g, alpha=-lr)``, the same hash). On CUDA the reference runs
torch's CUDA kernels, which divide by a scalar as a multiplication by its reciprocal, so there the
contract is docs/spec.md's tolerances.
"""

import pytest
import torch
from conftest import (NATIVE_TARGETS, ODD_SIZES, requires_cuda, requires_cuda_emulation,
                      requires_native, results_per_cpu_isa, target_device, target_op,
                      ulp_distance)
from oracle import DTYPES, LLM_SHAPES, f64_lomo, rand

import lomo_kernels
from lomo_kernels import reference

pytestmark = requires_native

OP = torch.ops.lomo_kernels.lomo_update_
SHAPES = [(n,) for n in ODD_SIZES] + [(1, 4097), (4097, 1), (37, 129), (3, 17, 33), ()] + LLM_SHAPES
HYPER = {
    "plain": dict(lr=1e-2, wd=0.0, ls=1.0, cgv=0.0, coef=None),
    "all": dict(lr=3e-3, wd=0.1, ls=1000.0, cgv=0.7, coef=0.37),  # non-power-of-two loss scale
    "pow2_scale": dict(lr=3e-2, wd=0.01, ls=1024.0, cgv=0.0, coef=None),
}


def _args(h, device, rounding="nearest", seed=11, step=3, found_inf=None):
    coef = None if h["coef"] is None else torch.tensor(h["coef"], device=device)
    return (coef, found_inf, h["lr"], h["wd"], h["ls"], h["cgv"], rounding, seed, step)


def _bits(t):
    return t.view(torch.int32 if t.dtype == torch.float32 else torch.int16)


def _run_both(p0, g, h, target, rounding="nearest"):
    device = target_device(target)
    out = p0.to(device, copy=True)
    target_op(target, "lomo_update_")(out, g.to(device), *_args(h, device, rounding))
    ref = p0.clone()
    reference.lomo_update_(ref, g, *_args(h, "cpu", rounding))
    return out.cpu(), ref


@pytest.mark.parametrize("target", NATIVE_TARGETS)
@pytest.mark.parametrize("hname", list(HYPER))
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_matches_reference_and_float64(dtype, shape, hname, target):
    h = HYPER[hname]
    p0, g = rand(shape, dtype, seed=1), rand(shape, dtype, scale=3.0, seed=2)
    out, ref = _run_both(p0, g, h, target)
    want, size = f64_lomo(p0, g, h)
    assert p0.numel() < 100 or not torch.equal(out, p0)  # it did update
    if target == "cpu":
        assert torch.equal(_bits(out), _bits(ref))
    if dtype == torch.float32:
        # relative 1e-5 of the terms (cancellation makes a pointwise relative error meaningless)
        assert ((out.double() - want).abs() <= 1e-5 * size + 1e-30).all()
        assert ((out.double() - ref.double()).abs() <= 1e-6 * size + 1e-30).all()
    else:
        assert ulp_distance(out, ref).max().item() <= 1
        assert ulp_distance(out, want.to(dtype)).max().item() <= 1


@pytest.mark.parametrize("target", NATIVE_TARGETS)
@pytest.mark.parametrize("shape", [(278011,), (37, 129), (1,), (130, 4096)], ids=str)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_stochastic_rounding_bitwise_equal_to_reference(dtype, shape, target):
    h = HYPER["all"]
    p0, g = rand(shape, dtype, seed=3), rand(shape, dtype, scale=3.0, seed=4)
    out, ref = _run_both(p0, g, h, target, rounding="stochastic")
    near, _ = _run_both(p0, g, h, target, rounding="nearest")
    assert torch.equal(_bits(out), _bits(ref))
    assert ulp_distance(out, near).max().item() <= 1
    if p0.numel() > 1000:
        assert not torch.equal(out, near)  # some elements rounded the other way


@pytest.mark.parametrize("target", NATIVE_TARGETS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_stochastic_rounding_is_unbiased_and_keeps_tiny_updates(dtype, target):
    # p = 1 and decay 1 - 1e-4: p * decay is not representable, the nearest value is 1 again
    # (the update is lost), stochastic rounding lands on the two neighbours with the right odds.
    n, wd, lr = 1 << 16, 1e-3, 0.1
    op, device = target_op(target, "lomo_update_"), target_device(target)
    p = torch.ones(n, dtype=dtype, device=device)
    g = torch.zeros(n, dtype=dtype, device=device)
    near = p.clone()
    op(near, g, None, None, lr, wd, 1.0, 0.0, "nearest", 0, 1)
    assert (near == 1).all()
    x = float(torch.tensor(1 - lr * wd, dtype=torch.float32))
    means = []
    for step in range(1, 5):
        out = p.clone()
        op(out, g, None, None, lr, wd, 1.0, 0.0, "stochastic", 7, step)
        lo = float(out.min())
        assert set(out.unique().tolist()) <= {lo, 1.0} and lo < x < 1.0
        means.append(out.double().mean().item())
    mean, prob = sum(means) / len(means), (1.0 - x) / (1.0 - lo)  # P(round down)
    sigma = (1.0 - lo) * (prob * (1 - prob) / (n * len(means))) ** 0.5
    assert abs(mean - x) < 5 * sigma


@pytest.mark.parametrize("target", NATIVE_TARGETS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_non_finite_gradients_keep_the_parameter(dtype, target):
    h = HYPER["all"]
    device = target_device(target)
    p0, g = rand((4097,), dtype, seed=5), rand((4097,), dtype, seed=6)
    bad = torch.tensor([0, 9, 4000, 4096])
    g[bad] = torch.tensor([float("nan"), float("inf"), -float("inf"), float("nan")], dtype=dtype)
    found = torch.zeros(1, device=device)
    out = p0.to(device, copy=True)
    target_op(target, "lomo_update_")(out, g.to(device), *_args(h, device, found_inf=found))
    ref = p0.clone()
    ref_found = torch.zeros(1)
    reference.lomo_update_(ref, g, *_args(h, "cpu", found_inf=ref_found))
    out = out.cpu()
    assert found.item() == 1.0 and ref_found.item() == 1.0
    assert torch.equal(_bits(out[bad]), _bits(p0[bad]))
    good = torch.ones(4097, dtype=torch.bool)
    good[bad] = False
    assert not torch.equal(out[good], p0[good])
    if dtype == torch.float32:
        torch.testing.assert_close(out, ref, rtol=1e-6, atol=1e-7)
    else:
        assert ulp_distance(out, ref).max().item() <= (0 if target == "cpu" else 1)


@pytest.mark.parametrize("ls, wd", [(1.0, 0.0), (1.0, 0.05), (512.0, 0.0), (1000.0, 0.1)])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_cpu_fast_and_guarded_blocks_agree(dtype, ls, wd):
    # The C++ loop takes a fast path on blocks of 1024 elements whose p and g are finite (nearest
    # rounding, multipliers of at most 1): it must give bitwise the reference's parameters next
    # to guarded blocks (a NaN gradient, an Inf parameter), with a multiplier of exactly 1 left
    # out or not, and the same grad_sq as the guarded loop (stochastic rounding, clip_coef > 1).
    h = dict(lr=3e-3, wd=wd, ls=ls, cgv=0.0, coef=0.5)
    p0, g = rand((5003,), dtype, seed=7), rand((5003,), dtype, scale=3.0, seed=8)
    bad_g, bad_p = g.clone(), p0.clone()
    bad_g[1500], bad_p[3000] = float("nan"), float("inf")
    for p_in, g_in in ((p0, g), (bad_p, bad_g)):
        out, ref = p_in.clone(), p_in.clone()
        OP(out, g_in, *_args(h, "cpu"))
        reference.lomo_update_(ref, g_in, *_args(h, "cpu"))
        assert torch.equal(_bits(out), _bits(ref))
    sums = []
    for rounding, coef in (("nearest", 0.5), ("stochastic", 0.5), ("nearest", 1.5)):
        acc = torch.zeros(1)
        OP(p0.clone(), g, *_args(dict(h, coef=coef), "cpu", rounding), acc)
        sums.append(acc)
    assert torch.equal(sums[0], sums[1]) and torch.equal(sums[0], sums[2])
    want = ((g.double() / ls) ** 2).sum()
    assert abs(sums[0].item() - want.item()) <= 1e-5 * want.item()


@pytest.mark.parametrize("target", NATIVE_TARGETS)
def test_found_inf_is_only_ever_set(target):
    op, device = target_op(target, "lomo_update_"), target_device(target)
    p, g = rand((100,), torch.float32).to(device), rand((100,), torch.float32).to(device)
    found = torch.zeros(1, device=device)
    op(p, g, None, found, 1e-2, 0.0, 1.0, 0.0, "nearest", 0, 1)
    assert found.item() == 0.0  # finite gradients: untouched
    found.fill_(1.0)
    op(p, g, None, found, 1e-2, 0.0, 1.0, 0.0, "nearest", 0, 1)
    assert found.item() == 1.0  # never cleared by the kernel


@pytest.mark.parametrize("target", NATIVE_TARGETS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_empty_is_a_no_op(dtype, target):
    op, device = target_op(target, "lomo_update_"), target_device(target)
    for shape in [(0,), (3, 0), (0, 5)]:
        p = torch.empty(shape, dtype=dtype, device=device)
        found = torch.zeros(1, device=device)
        op(p, torch.empty_like(p), None, found, 1e-2, 0.0, 1.0, 0.0, "stochastic", 0, 1)
        assert found.item() == 0.0 and p.shape == shape


@pytest.mark.parametrize("target", NATIVE_TARGETS)
def test_unaligned_views_take_the_scalar_path(target):
    # storage offsets of 1..7 elements defeat the 16-byte vector loads; the results must not care
    device = target_device(target)
    base_p, base_g = rand((4200,), torch.bfloat16, seed=8), rand((4200,), torch.bfloat16, seed=9)
    h = HYPER["all"]
    for off in range(1, 8):
        p0, g = base_p[off : off + 4097], base_g[off : off + 4097]
        out = base_p.to(device, copy=True)[off : off + 4097]
        target_op(target, "lomo_update_")(out, g.to(device), *_args(h, device, "stochastic"))
        ref = p0.clone()
        reference.lomo_update_(ref, g, *_args(h, "cpu", "stochastic"))
        assert torch.equal(_bits(out.cpu()), _bits(ref))


@pytest.mark.parametrize("target", ["cpu", pytest.param("cuda_emulated",
                                                        marks=requires_cuda_emulation)])
def test_same_result_with_one_and_two_threads(target, monkeypatch):
    # cpu: torch's intra-op threads; cuda_emulated: the OS threads that run the emulated blocks
    h = HYPER["all"]
    p0, g = rand((513, 1031), torch.bfloat16, seed=10), rand((513, 1031), torch.bfloat16, seed=11)
    old = torch.get_num_threads()
    outs = []
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            monkeypatch.setenv("LOMO_KERNELS_EMULATION_THREADS", str(threads))
            out = p0.clone()
            target_op(target, "lomo_update_")(out, g, *_args(h, "cpu", "stochastic"))
            outs.append(out)
    finally:
        torch.set_num_threads(old)
    assert torch.equal(_bits(outs[0]), _bits(outs[1]))


_ISA_SCRIPT = """
import torch, lomo_kernels
from lomo_kernels import ops
torch.manual_seed(0)
out = []
for dtype in (torch.float32, torch.float16, torch.bfloat16):
    for rounding in ("nearest", "stochastic"):
        p = torch.randn(70001).to(dtype); g = (torch.randn(70001) * 3).to(dtype)
        acc = torch.zeros(1)
        for coef, cgv in ((torch.tensor(0.37), 0.7), (None, 0.0)):  # with and without clipping
            torch.ops.lomo_kernels.lomo_update_(p, g, coef, None, 3e-3, 0.1, 1000.0, cgv,
                                                rounding, 5, 2, acc)
            out += [p.float(), acc.clone()]
        # GoLore's full-rank AdamW update (the projected mode runs the same loop body in fp32)
        m, v = torch.randn(70001) * 1e-2, torch.rand(70001) * 1e-2
        torch.ops.lomo_kernels.golore_update_(g, p, m, v, None, None, None, "adamw", 3e-3, 0.1,
                                              1.0, 0.9, 0.999, 1e-8, 0.0, rounding, 5, 3)
        out += [p.float(), m, v]
torch.save(torch.cat(out), {path!r})
"""


def test_every_cpu_clone_rounds_the_same(tmp_path):
    # The baseline, AVX2 and AVX-512 clones of the CPU loops (LOMO_KERNELS_CPU_ISA caps the
    # choice) must give bitwise the same parameters (LOMO with its grad_sq, and GoLore's inner
    # update with its state); the baseline uses libm's fma.
    results = results_per_cpu_isa(_ISA_SCRIPT, tmp_path)
    assert torch.equal(results["base"].view(torch.int32), results["default"].view(torch.int32))
    assert torch.equal(results["avx2"].view(torch.int32), results["default"].view(torch.int32))


@pytest.mark.parametrize("target", NATIVE_TARGETS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_opcheck(dtype, target):
    op, device = target_op(target, "lomo_update_"), target_device(target)
    p, g = rand((37, 129), dtype).to(device), rand((37, 129), dtype, seed=1).to(device)
    found = torch.zeros(1, device=device)
    coef = torch.tensor(0.5, device=device)
    torch.library.opcheck(op, (p, g, coef, found, 1e-2, 0.1, 2.0, 0.5, "stochastic", 1, 2))
    torch.library.opcheck(op, (p, g, None, None, 1e-2, 0.0, 1.0, 0.0, "nearest", 0, 1))


@pytest.mark.parametrize("target", NATIVE_TARGETS)
def test_bad_inputs_name_the_argument(target):
    op, device = target_op(target, "lomo_update_"), target_device(target)
    p = torch.zeros(4, 6, device=device)
    g = torch.zeros(4, 6, device=device)
    ok = (None, None, 1e-2, 0.0, 1.0, 0.0, "nearest", 0, 1)
    cases = [
        ((p, g.t().contiguous().t()), ok, "grad must be contiguous"),
        ((p.t(), g.t()), ok, "param must be contiguous"),
        ((p, g.half()), ok, "grad dtype"),
        ((p, g[:3]), ok, "grad shape"),
        ((p.int(), g.int()), ok, "param must be float32, float16 or bfloat16"),
        ((p, g), ok[:6] + ("up",) + ok[7:], "rounding must be 'nearest' or 'stochastic'"),
        ((p, g), (torch.zeros(2, device=device),) + ok[1:], "clip_coef must be a 1-element"),
        ((p, g), (None, torch.zeros(1, dtype=torch.float64, device=device)) + ok[2:],
         "found_inf must be a 1-element float32"),
    ]
    for tensors, rest, msg in cases:
        with pytest.raises(RuntimeError, match=msg):
            op(*tensors, *rest)


@requires_cuda
def test_cuda_rejects_mixed_devices():
    p = torch.zeros(8, device="cuda")
    with pytest.raises(RuntimeError, match="grad is on"):
        OP(p, torch.zeros(8), None, None, 1e-2, 0.0, 1.0, 0.0, "nearest", 0, 1)
    with pytest.raises(RuntimeError, match="clip_coef must be"):
        OP(p, torch.zeros(8, device="cuda"), torch.tensor(1.0), None, 1e-2, 0.0, 1.0, 0.0,
           "nearest", 0, 1)


def _lomo_run(backend, dtype, rounding, steps=6):
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Linear(33, 65), torch.nn.GELU(), torch.nn.LayerNorm(65), torch.nn.Linear(65, 7)
    ).to(dtype)
    opt = lomo_kernels.Lomo(model, lr=1e-2, weight_decay=0.01, clip_grad_value=0.5,
                            backend=backend, rounding=rounding, seed=3)
    gen = torch.Generator().manual_seed(1)
    losses = []
    for _ in range(steps):
        x = torch.randn(16, 33, generator=gen).to(dtype)
        y = torch.randn(16, 7, generator=gen).to(dtype)
        loss = torch.nn.functional.mse_loss(model(x).float(), y.float())
        if opt.clip_grad_norm is not None:  # fp16: the loss scaler's overflow pass
            opt.grad_norm(loss)
        opt.fused_backward(loss, lr=1e-2)
        losses.append(loss.item())
    return losses, [p.detach().clone() for p in model.parameters()]


@pytest.mark.parametrize("backend", ["native", pytest.param("cuda_emulated",
                                                            marks=requires_cuda_emulation)])
@pytest.mark.parametrize(
    "dtype,rounding",
    [(d, r) for d in DTYPES for r in ("nearest", "stochastic")
     if d != torch.float32 or r == "nearest"],  # float32 parameters refuse stochastic rounding
    ids=str,
)
def test_optimizer_native_matches_torch_backend(dtype, rounding, backend):
    l_nat, p_nat = _lomo_run(backend, dtype, rounding)
    l_ref, p_ref = _lomo_run("torch", dtype, rounding)
    assert l_nat == l_ref  # bitwise equal updates on CPU give the same run
    for a, b in zip(p_nat, p_ref):
        assert torch.equal(_bits(a), _bits(b))
    assert l_nat[-1] < l_nat[0]


def _free_host_memory() -> int:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return 0


# On a GPU both roundings; emulated (4.3G elements, about a minute on 2 CPU cores) stochastic
# rounding only: the same 64-bit offsets, and the hash's high word besides.
@pytest.mark.parametrize("target,rounding", [
    pytest.param("cuda_emulated", "stochastic", marks=requires_cuda_emulation)] + (
    [("cuda", "nearest"), ("cuda", "stochastic")] if torch.cuda.is_available() else []))
def test_cuda_beyond_2_pow_32_elements(rounding, target):
    # 2**32 + 4101 bf16 elements (8 GiB each for p and g): 64-bit offsets, and the hash's high
    # half changes at 2**32. Constant values except in the last 8198 elements, which are checked
    # against the reference's formulas, as are elements around 2**31 and 2**32.
    n = 2**32 + 4101
    device = target_device(target)
    if device == "cpu" and _free_host_memory() < 20 * 2**30:
        pytest.skip("needs 16 GiB of host memory for 2 x 8 GiB (and 4 GiB to spare)")
    try:
        p = torch.empty(n, dtype=torch.bfloat16, device=device).fill_(0.75)
        g = torch.empty(n, dtype=torch.bfloat16, device=device).fill_(-1.5)
    except (torch.OutOfMemoryError, RuntimeError):
        pytest.skip(f"not enough {device} memory for 2 x 8 GiB")
    lo = n - 8198
    gen = torch.Generator().manual_seed(17)
    p[lo:] = torch.randn(n - lo, generator=gen).to(torch.bfloat16).to(device)
    g[lo:] = torch.randn(n - lo, generator=gen).to(torch.bfloat16).to(device)
    spots = torch.cat([torch.arange(2**31 - 9, 2**31 + 9), torch.arange(2**32 - 9, 2**32 + 9),
                       torch.arange(lo, n)])
    p_old, g_old = p[spots.to(device)].cpu(), g[spots.to(device)].cpu()
    target_op(target, "lomo_update_")(p, g, None, None, 1e-2, 0.1, 1.0, 0.0, rounding, 5, 9)
    new = p_old.float() * reference.f32(1 - 0.01 * 0.1)
    new = torch.add(new, g_old.float(), alpha=-1e-2)
    if rounding == "nearest":
        want = new.to(torch.bfloat16)
    else:
        key = reference.rounding_key(5, 9)
        hb = reference._mix32_t((spots >> 32) ^ key)
        bits = reference._mix32_t((spots & 0xFFFFFFFF) ^ hb)
        want = reference._sr_bf16(new, bits)
    got = p[spots.to(device)].cpu()
    assert ulp_distance(got, want).max().item() <= 1
    assert (got != p_old).any()
    del p, g
    if target == "cuda":
        torch.cuda.empty_cache()
