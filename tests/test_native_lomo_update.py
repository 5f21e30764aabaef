"""What only the native (C++/CUDA) LOMO kernels have: their threads and CPU clones, the op schema
checks of the C++ entry points (opcheck, argument errors), and tensors beyond 2**32 elements. The
properties every backend shares (against the reference and float64, stochastic rounding,
non-finite gradients, layouts, the optimizer) are in test_lomo_update.py.

``torch.ops.lomo_kernels.lomo_update_`` runs the C++ kernel for CPU tensors and the CUDA kernel
for CUDA tensors; ``cuda_emulated`` runs the CUDA kernel in the SIMT emulation on CPU tensors
(conftest.NATIVE_TARGETS). The oracle always runs on CPU copies.
"""

import os

import pytest
import torch
from conftest import (NATIVE_TARGETS, requires_cuda, requires_cuda_emulation, requires_native,
                      results_per_cpu_isa, target_device, target_op, ulp_distance)
from oracle import DTYPES, rand, sr_edge_values, unaligned_view

from lomo_kernels import reference

pytestmark = [requires_native, pytest.mark.lomo]

OP = torch.ops.lomo_kernels.lomo_update_
HYPER_ALL = dict(lr=3e-3, wd=0.1, ls=1000.0, cgv=0.7, coef=0.37)  # non-power-of-two loss scale


def _args(h, device, rounding="nearest", seed=11, step=3, found_inf=None):
    coef = None if h["coef"] is None else torch.tensor(h["coef"], device=device)
    return (coef, found_inf, h["lr"], h["wd"], h["ls"], h["cgv"], rounding, seed, step)


def _bits(t):
    return t.view(torch.int32 if t.dtype == torch.float32 else torch.int16)


@pytest.mark.parametrize("ls, wd", [(1.0, 0.0), (1.0, 0.05), (512.0, 0.0), (1000.0, 0.1)])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_cpu_fast_and_guarded_blocks_agree(dtype, ls, wd):
    # The C++ loop takes a fast path on runs of 128 elements whose p and g are finite
    # (multipliers of at most 1; either rounding): it must give bitwise the reference's
    # parameters next to guarded runs (a NaN gradient, an Inf parameter), with a multiplier of
    # exactly 1 left out or not, and the same grad_sq as the stochastic fast path and the guarded
    # loop (clip_coef > 1).
    h = dict(lr=3e-3, wd=wd, ls=ls, cgv=0.0, coef=0.5)
    p0, g = rand((5003,), dtype, seed=7), rand((5003,), dtype, scale=3.0, seed=8)
    bad_g, bad_p = g.clone(), p0.clone()
    bad_g[1500], bad_p[3000], bad_p[4995] = float("nan"), float("inf"), float("-inf")
    for p_in, g_in in ((p0, g), (bad_p, bad_g)):
        for rounding in ("nearest", "stochastic"):
            out, ref = p_in.clone(), p_in.clone()
            OP(out, g_in, *_args(h, "cpu", rounding))
            reference.lomo_update_(ref, g_in, *_args(h, "cpu", rounding))
            assert torch.equal(_bits(out), _bits(ref)), rounding
    sums = []
    for rounding, coef in (("nearest", 0.5), ("stochastic", 0.5), ("nearest", 1.5)):
        acc = torch.zeros(1)
        OP(p0.clone(), g, *_args(dict(h, coef=coef), "cpu", rounding), acc)
        sums.append(acc)
    # guarded runs (an Inf parameter, one in the last run with its partial group) inside
    # otherwise fast blocks: the squared gradient in the same lanes and order
    acc = torch.zeros(1)
    OP(bad_p.clone(), g, *_args(h, "cpu"), acc)
    sums.append(acc)
    assert all(torch.equal(sums[0], s) for s in sums[1:])
    want = ((g.double() / ls) ** 2).sum()
    assert abs(sums[0].item() - want.item()) <= 1e-5 * want.item()


@pytest.mark.parametrize("ls, wd", [(1.0, 0.0), (1.0, 0.05), (512.0, 0.0), (1000.0, 0.1)])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_cpu_fast_run_with_non_finite_values_is_redone_guarded(dtype, ls, wd):
    # Without value clipping the C++ fast path computes a run before it knows whether the run
    # held NaN/Inf; a run that did gets its p back and takes the guarded loop. Bad values in the
    # middle of runs, two in one run, in the first and last element of a run and in the partial
    # group at the end: the parameters bitwise the reference's, found_inf set by a bad gradient
    # only, and the squared gradient of finite gradients unchanged by a bad parameter.
    h = dict(lr=3e-3, wd=wd, ls=ls, cgv=0.0, coef=None)
    p0, g = rand((5003,), dtype, seed=17), rand((5003,), dtype, scale=3.0, seed=18)
    cases = {"g": [(1500, "nan"), (1510, "inf"), (2048, "-inf"), (2175, "nan")],
             "p": [(128, "nan"), (3000, "inf"), (3001, "nan"), (4995, "-inf")]}
    for rounding in ("nearest", "stochastic"):
        sums = {}
        for which in ("none", "g", "p"):
            p_in, g_in = p0.clone(), g.clone()
            for i, v in cases.get(which, []):
                (g_in if which == "g" else p_in)[i] = float(v)
            out, ref = p_in.clone(), p_in.clone()
            acc, found = torch.zeros(1), torch.zeros(1)
            OP(out, g_in, *_args(h, "cpu", rounding, found_inf=found), acc)
            reference.lomo_update_(ref, g_in, *_args(h, "cpu", rounding))
            assert torch.equal(_bits(out), _bits(ref)), (rounding, which)
            assert found.item() == (1.0 if which == "g" else 0.0), (rounding, which)
            sums[which] = acc
        assert torch.equal(sums["none"], sums["p"]) and not torch.isfinite(sums["g"]).all()


@pytest.mark.parametrize("rounding", ["nearest", "stochastic"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_cpu_fast_run_that_overflows(dtype, rounding):
    # Finite p and g whose new value overflows, inside a run the fast path takes (it rounds
    # without the NaN select): the parameters must be the reference's bitwise (the Inf
    # included), the squared gradient the same as without the overflow, and found_inf left
    # alone (no gradient was non-finite).
    big = torch.finfo(dtype).max
    h = dict(lr=big / 256, wd=0.0, ls=1.0, cgv=0.0, coef=None)
    p0, g = rand((1000,), dtype, seed=3), rand((1000,), dtype, seed=4)
    g[200] = -1.0
    tall = p0.clone()
    tall[200] = big
    sums = []
    for p_in in (p0, tall):
        out, ref, acc, found = p_in.clone(), p_in.clone(), torch.zeros(1), torch.zeros(1)
        OP(out, g, *_args(h, "cpu", rounding, found_inf=found), acc)
        reference.lomo_update_(ref, g, *_args(h, "cpu", rounding))
        assert torch.equal(_bits(out), _bits(ref))
        assert found.item() == 0.0
        sums.append(acc)
    assert torch.isinf(out[200]) and torch.isfinite(out[:200]).all()
    assert torch.equal(sums[0], sums[1])


@pytest.mark.parametrize("target", NATIVE_TARGETS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_stochastic_rounding_of_edge_values_is_bitwise_the_reference(target, dtype):
    # p = 0 and a float32 gradient -x with lr 1: the new parameter is x itself, rounded. Finite
    # inputs and multipliers of at most 1 take the CPU's vector path (the hash in vector lanes),
    # 16 elements at a time and a tail of 11; single and multi-tensor calls, unaligned views.
    device = target_device(target)
    x = sr_edge_values(2 * 1024 + 16 * 7 + 11)
    g = unaligned_view(torch.zeros(x.numel() + 8), 5, x.shape)
    g.copy_(-x)
    p = unaligned_view(torch.zeros(x.numel() + 8, dtype=dtype), 3, x.shape)
    h = dict(lr=1.0, wd=0.0, ls=1.0, cgv=0.0, coef=None)
    ref = p.clone()
    reference.lomo_update_(ref, g, *_args(h, "cpu", "stochastic", 12345, 7))
    out = p.to(device, copy=True)
    target_op(target, "lomo_update_")(out, g.to(device), *_args(h, device, "stochastic", 12345, 7))
    assert torch.equal(_bits(out.cpu()), _bits(ref))
    small = torch.zeros(37, dtype=dtype)  # multi-tensor: the same rounding of each tensor
    outs = [p.to(device, copy=True), small.to(device, copy=True)]
    target_op(target, "lomo_update_multi_")(
        outs, [g.to(device), -x[:37].to(device)], None, None, [1.0, 1.0], [0.0, 0.0], 1.0,
        [0.0, 0.0], "stochastic", [12345, 3], [7, 8])
    ref_small = small.clone()
    reference.lomo_update_(ref_small, -x[:37], *_args(h, "cpu", "stochastic", 3, 8))
    assert torch.equal(_bits(outs[0].cpu()), _bits(ref))
    assert torch.equal(_bits(outs[1].cpu()), _bits(ref_small))
    assert torch.isinf(ref.float()).any()  # the edges were reached: a rounding to Inf
    if dtype == torch.float16:
        assert (ref.float().abs() == 65504).any()
        assert ((ref.float().abs() < 2.0**-14) & (ref != 0)).any()  # subnormals


@pytest.mark.parametrize("target", ["cpu", pytest.param("cuda_emulated",
                                                        marks=requires_cuda_emulation)])
def test_same_result_with_one_and_two_threads(target, monkeypatch):
    # cpu: torch's intra-op threads; cuda_emulated: the OS threads that run the emulated blocks
    h = HYPER_ALL
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


@pytest.mark.slow  # four subprocesses that each import torch: about a minute on 2 cores
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


def _host_memory(field: str = "MemTotal:") -> int:
    """A field of /proc/meminfo in bytes: MemTotal, the machine's memory, decides whether the test
    can run here at all; MemAvailable (free now, which changes from run to run) only guards a run
    that was asked for against being killed for memory."""
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith(field):
                return int(line.split()[1]) * 1024
    return 0


HUGE = "LOMO_KERNELS_TEST_HUGE"  # set to 1 to run the tests that need 16 GiB of host memory
_HUGE_REASON = (f"2**32 elements need 2 x 8 GiB of host memory: set {HUGE}=1 to run it (on a "
                "machine with at least 20 GiB; CI sets it)")


# On a GPU both roundings; emulated (4.3G elements, about a minute on 2 CPU cores) stochastic
# rounding only: the same 64-bit offsets, and the hash's high word besides. It runs when asked
# for (never because memory happens to be free): CPU memory for it is opt-in, and its skip says so.
@pytest.mark.slow
@pytest.mark.big_memory
@pytest.mark.parametrize("target,rounding", [
    pytest.param("cuda_emulated", "stochastic", marks=requires_cuda_emulation)] + (
    [("cuda", "nearest"), ("cuda", "stochastic")] if torch.cuda.is_available() else []))
def test_cuda_beyond_2_pow_32_elements(rounding, target):
    # 2**32 + 4101 bf16 elements (8 GiB each for p and g): 64-bit offsets, and the hash's high
    # half changes at 2**32. Constant values except in the last 8198 elements, which are checked
    # against the reference's formulas, as are elements around 2**31 and 2**32.
    n = 2**32 + 4101
    device = target_device(target)
    if device == "cpu":
        if os.environ.get(HUGE) != "1":
            pytest.skip(_HUGE_REASON)
        if _host_memory() < 20 * 2**30:
            pytest.skip(f"needs 20 GiB of host memory for 2 x 8 GiB, this machine has "
                        f"{_host_memory() / 2**30:.1f} GiB")
        if _host_memory("MemAvailable:") < 17 * 2**30:  # asked for, but would be OOM-killed
            pytest.skip(f"{HUGE}=1, but only {_host_memory('MemAvailable:') / 2**30:.1f} GiB of "
                        "host memory is free now, 17 GiB are needed for 2 x 8 GiB")
    elif torch.cuda.get_device_properties(0).total_memory < 18 * 2**30:
        pytest.skip("needs 18 GiB of GPU memory for 2 x 8 GiB")
    p = torch.empty(n, dtype=torch.bfloat16, device=device).fill_(0.75)
    g = torch.empty(n, dtype=torch.bfloat16, device=device).fill_(-1.5)
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
