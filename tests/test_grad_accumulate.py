"""grad_accumulate_ (docs/spec.md "Gradient accumulation"): the reference against float64, every
backend (native CPU, the CUDA kernel in the SIMT emulation, Triton in its interpreter) against
the reference: the buffer bitwise (float32 sums are one fp32 addition per element; 16-bit buffers
use the updates' stochastic-rounding hash), ``buf_sq`` to float32 summation accuracy, the
non-finite flag; the first write of a window never reads the buffer; argument checks."""

import math

import pytest
import torch
from conftest import requires_cuda_emulation, requires_native, requires_triton
from oracle import bits, rand, sr_edge_values, unaligned_view

from lomo_kernels import ops, reference

# (gradient dtype, buffer dtype): float32 buffers for every gradient, 16-bit buffers of the
# gradient's own dtype
PAIRS = [(torch.float32, torch.float32), (torch.bfloat16, torch.float32),
         (torch.float16, torch.float32), (torch.bfloat16, torch.bfloat16),
         (torch.float16, torch.float16)]
PAIR_IDS = ["f32", "bf16->f32", "f16->f32", "bf16", "f16"]
BACKENDS = [pytest.param("native", marks=requires_native),
            pytest.param("cuda_emulated", marks=requires_cuda_emulation),
            pytest.param("triton", marks=requires_triton)]
SIZES = [1, 7, 4097, 70001]
SCALES = [1.0, 1024.0, 1000.0]  # none, a power of two (an exact multiply), a division


def _call(backend, buf, g, first, ls=1.0, rounding="nearest", seed=5, step=9, sq=True):
    found = torch.zeros(1)
    buf_sq = torch.full((1,), -1.0) if sq else None
    impl = reference.grad_accumulate_ if backend == "torch" else ops.get_impl(
        "grad_accumulate_", backend, "cpu")
    impl(buf, g, found, ls, first, rounding, seed, step, buf_sq, None)
    return found, buf_sq


def _rounding(bdtype):
    return "nearest" if bdtype == torch.float32 else "stochastic"


def test_reference_matches_float64_sums():
    gs = [rand((1000,), torch.bfloat16, seed=s) for s in range(4)]
    buf = torch.full((1000,), float("nan"))  # a first write never reads it
    for k, g in enumerate(gs):
        found, sq = _call("torch", buf, g, first=k == 0, ls=4.0)
    want = sum(g.double() for g in gs) / 4.0
    assert torch.allclose(buf.double(), want, rtol=1e-6, atol=1e-7)
    assert math.isclose(sq.item(), float((buf.double() ** 2).sum()), rel_tol=1e-6)
    assert found.item() == 0.0


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("pair", PAIRS, ids=PAIR_IDS)
@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("ls", SCALES)
def test_backend_matches_reference(backend, pair, size, ls):
    gdtype, bdtype = pair
    g1, g2 = rand((size,), gdtype, scale=3.0, seed=1), rand((size,), gdtype, scale=3.0, seed=2)
    bufs = [torch.full((size,), float("nan"), dtype=bdtype) for _ in range(2)]
    rounding = _rounding(bdtype)
    for k, g in enumerate((g1, g2)):
        got = _call(backend, bufs[0], g, k == 0, ls, rounding, step=k)
        want = _call("torch", bufs[1], g, k == 0, ls, rounding, step=k)
        assert torch.equal(bits(bufs[0]), bits(bufs[1])), f"buffer differs after gradient {k}"
        assert got[0].item() == want[0].item() == 0.0
        assert math.isclose(got[1].item(), want[1].item(), rel_tol=2e-6)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("pair", PAIRS, ids=PAIR_IDS)
@pytest.mark.parametrize("offsets", [(1, 1), (2, 3), (0, 5)])
def test_unaligned_views_accumulate_like_aligned_tensors(backend, pair, offsets):
    gdtype, bdtype = pair
    shape = (3, 1031)
    g = unaligned_view(rand((3 * 1031 + 8,), gdtype, seed=3), offsets[1], shape)
    buf = unaligned_view(rand((3 * 1031 + 8,), bdtype, seed=4), offsets[0], shape)
    ref = buf.clone()
    rounding = _rounding(bdtype)
    got = _call(backend, buf, g, False, 1.0, rounding)
    want = _call("torch", ref, g.clone(), False, 1.0, rounding)
    assert torch.equal(bits(buf), bits(ref))
    assert math.isclose(got[1].item(), want[1].item(), rel_tol=2e-6)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("pair", PAIRS, ids=PAIR_IDS)
def test_nonfinite_values_are_stored_and_flagged(backend, pair):
    gdtype, bdtype = pair
    g = rand((5000,), gdtype, seed=6)
    g[17] = float("nan")
    g[4444] = float("inf")
    buf = rand((5000,), bdtype, seed=7)
    found, sq = _call(backend, buf, g, False, 1.0, _rounding(bdtype))
    assert found.item() == 1.0
    assert torch.isnan(buf[17]) and torch.isinf(buf[4444])
    assert not math.isfinite(sq.item())
    clean = rand((5000,), gdtype, seed=8)
    found, _ = _call(backend, buf, clean, True, 1.0, _rounding(bdtype))
    assert found.item() == 0.0 and torch.isfinite(buf).all()  # a first write forgets them


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_stochastic_sums_of_edge_values_are_bitwise_the_reference(backend, dtype):
    # buf + g / 3 over edge values and NaN (with sign and payload) / Inf: every branch of the
    # stochastic rounding, the canonical NaN included, in the CPU's vector lanes (16 at a time)
    # and its scalar tail (11), at unaligned addresses.
    n = 2 * 1024 + 16 * 7 + 11
    buf = unaligned_view(torch.zeros(n + 8, dtype=dtype), 3, (n,))
    buf.copy_(sr_edge_values(n, seed=1))
    g = sr_edge_values(n, seed=2).roll(5).to(dtype)
    for i in (2, 40, n - 20, n - 3):  # in vector groups and in the tail
        g.view(torch.int16)[i] = -0x7F  # 0xFF81: a negative NaN with a payload
        buf[i + 1] = float("inf")
    g[0], buf[0] = 30.0, 65504.0  # 65514: the clamp to 65504 (fp16)
    ref = buf.clone()
    got = _call(backend, buf, g, False, 3.0, "stochastic", seed=0xDEADBEEF, step=2**31 + 5)
    want = _call("torch", ref, g, False, 3.0, "stochastic", seed=0xDEADBEEF, step=2**31 + 5)
    assert torch.equal(bits(buf), bits(ref))
    assert got[0].item() == want[0].item() == 1.0
    assert (bits(ref) == bits(torch.tensor(float("nan"), dtype=dtype))).sum() >= 4


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_sum_beyond_the_buffer_range_is_flagged(backend):
    g = torch.full((300,), 40000.0, dtype=torch.float16)
    buf = torch.full((300,), 40000.0, dtype=torch.float16)
    found, _ = _call(backend, buf, g, False, 1.0, "stochastic")
    assert found.item() == 1.0 and torch.isinf(buf).all()


@pytest.mark.parametrize("backend", ["torch"] + BACKENDS)
def test_empty_tensor_sets_buf_sq_to_zero(backend):
    buf, g = torch.empty(0), torch.empty(0)
    found, sq = _call(backend, buf, g, False)
    assert sq.item() == 0.0 and found.item() == 0.0


@pytest.mark.parametrize("backend", BACKENDS)
def test_without_buf_sq_and_found_inf(backend):
    g = rand((9000,), torch.bfloat16, seed=9)
    buf, ref = torch.zeros(9000), torch.zeros(9000)
    impl = ops.get_impl("grad_accumulate_", backend, "cpu")
    impl(buf, g, None, 2.0, False, "nearest", 0, 0, None, None)
    reference.grad_accumulate_(ref, g, None, 2.0, False, "nearest", 0, 0, None, None)
    assert torch.equal(buf, ref)


def test_stochastic_rounding_of_a_bf16_buffer_is_unbiased():
    """Many small additions into a bf16 buffer: stochastic rounding keeps their sum on average
    (nearest rounding loses every addition below half an ulp)."""
    n, k = 20000, 64
    buf = torch.ones(n, dtype=torch.bfloat16)
    small = torch.full((n,), 2.0**-10, dtype=torch.bfloat16)  # 1/8 of bf16's ulp at 1
    for i in range(k):
        reference.grad_accumulate_(buf, small, None, 1.0, False, "stochastic", 3, i)
    mean = buf.double().mean().item()
    assert abs(mean - (1.0 + k * 2.0**-10)) < 2e-3
    near = torch.ones(n, dtype=torch.bfloat16)
    for i in range(k):
        reference.grad_accumulate_(near, small, None, 1.0, False, "nearest", 3, i)
    assert near.double().mean().item() == 1.0


def test_checked_entry_point_refuses_bad_arguments():
    g = torch.zeros(10, dtype=torch.bfloat16)
    with pytest.raises(TypeError, match="buf dtype must be float32 or the gradient's"):
        ops.grad_accumulate_(torch.zeros(10, dtype=torch.float16), g, first=True)
    with pytest.raises(TypeError, match="buf dtype must be float32 or the gradient's"):
        ops.grad_accumulate_(torch.zeros(10, dtype=torch.bfloat16), torch.zeros(10), first=True)
    with pytest.raises(ValueError, match="shape"):
        ops.grad_accumulate_(torch.zeros(11), g, first=True)
    with pytest.raises(ValueError, match="contiguous"):
        ops.grad_accumulate_(torch.zeros(10, 2).T, torch.zeros(2, 10, dtype=torch.bfloat16),
                             first=True)
    with pytest.raises(ValueError, match="loss_scale"):
        ops.grad_accumulate_(torch.zeros(10), g, first=True, loss_scale=0.0)
    with pytest.raises(ValueError, match="buf_sq must be a 1-element float32"):
        ops.grad_accumulate_(torch.zeros(10), g, first=True, buf_sq=torch.zeros(2))
    with pytest.raises(TypeError, match="first must be True or False"):
        ops.grad_accumulate_(torch.zeros(10), g, first=1)
    with pytest.raises(ValueError, match="rounding"):
        ops.grad_accumulate_(torch.zeros(10), g, first=True, rounding="up")


def test_checked_entry_point_runs_every_loaded_backend():
    g = rand((777,), torch.bfloat16, seed=10)
    want = torch.zeros(777)
    reference.grad_accumulate_(want, g, None, 1.0, True, "nearest", 0, 0)
    for backend, status in ops.available_backends().items():
        if not status.startswith("loaded"):
            continue
        buf = torch.full((777,), 5.0)
        sq = torch.zeros(1)
        ops.grad_accumulate_(buf, g, first=True, buf_sq=sq, backend=backend)
        assert torch.equal(buf, want), backend
        assert math.isclose(sq.item(), float((want.double() ** 2).sum()), rel_tol=2e-6)


def test_opcheck():
    args = (torch.zeros(37, 129), torch.randn(37, 129).to(torch.bfloat16), torch.zeros(1), 4.0,
            False, "nearest", 3, 5, torch.zeros(1), None)
    torch.library.opcheck(torch.ops.lomo_kernels.grad_accumulate_, args)
