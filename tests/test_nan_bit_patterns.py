"""A NaN stored into a float16 / bfloat16 parameter is the canonical quiet NaN on every backend
(docs/spec.md, "Rounding on the way down"): 0x7E00 for float16, 0x7FC0 for bfloat16, whatever the
sign and payload of the fp32 NaN it is rounded from and whatever the device's conversion gives on
its own (the GPU's cvt instructions: 0x7FFF; torch's CPU ``.to()``: the payload, 0xFFFF for
bfloat16), for nearest and stochastic rounding.

The NaNs come from NaN parameters with finite gradients (which the updates do not skip): LOMO
updates each element on its own; in AdaLomo one NaN element makes rms(p), hence every element,
NaN.
"""

import os

import pytest
import torch
from conftest import requires_cuda_emulation, requires_native, requires_triton

from lomo_kernels import ops

CANONICAL = {torch.float16: 0x7E00, torch.bfloat16: 0x7FC0}
# quiet and signalling NaNs of both signs, with and without payload
NAN_BITS = {torch.float16: [0x7E00, 0xFE00, 0x7FFF, 0xFC01, 0x7C01],
            torch.bfloat16: [0x7FC0, 0xFFC0, 0x7FFF, 0xFF81, 0x7F81]}

BACKENDS = [
    pytest.param(("torch", "cpu"), id="torch"),
    pytest.param(("native", "cpu"), id="native-cpu", marks=requires_native),
    pytest.param(("cuda_emulated", "cpu"), id="cuda_emulated", marks=requires_cuda_emulation),
] + ([pytest.param(("triton", "cpu"), id="triton-interpreter", marks=requires_triton)]
     if os.environ.get("TRITON_INTERPRET", "0") == "1" else []) + (
    [pytest.param(("native", "cuda"), id="native-cuda", marks=requires_native),
     pytest.param(("triton", "cuda"), id="triton-cuda", marks=requires_triton)]
    if torch.cuda.is_available() else [])


def _param_with_nans(shape, dtype, every=3):
    """Random values, every ``every``-th element one of the NaN patterns (in turn)."""
    p = (torch.randn(shape, generator=torch.Generator().manual_seed(1)) * 0.1).to(dtype)
    bits = p.view(-1).view(torch.int16)
    nans = torch.tensor(NAN_BITS[dtype], dtype=torch.int32).to(torch.int16)
    idx = torch.arange(0, p.numel(), every)
    bits[idx] = nans[torch.arange(idx.numel()) % nans.numel()]
    return p


def _check(p, dtype, backend):
    bits = p.cpu().reshape(-1).view(torch.int16).to(torch.int32) & 0xFFFF
    isnan = torch.isnan(p.cpu().reshape(-1).float())
    assert isnan.any()
    wrong = torch.unique(bits[isnan & (bits != CANONICAL[dtype])])
    assert wrong.numel() == 0, (
        f"{backend}: NaN stored as {[hex(int(b)) for b in wrong]}, canonical is "
        f"{hex(CANONICAL[dtype])}")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("rounding", ["nearest", "stochastic"])
@pytest.mark.parametrize("shape", [(37,), (5000,)])
def test_lomo_stores_the_canonical_nan(backend, dtype, rounding, shape):
    name, device = backend
    p = _param_with_nans(shape, dtype).to(device)
    g = torch.randn(shape, generator=torch.Generator().manual_seed(2)).to(dtype).to(device)
    found = torch.zeros(1, device=device)
    ops.get_impl("lomo_update_", name, device)(p, g, None, found, 1e-2, 0.1, 1.0, 0.0, rounding,
                                               7, 3)
    assert found.item() == 0.0  # the gradients are finite: an update, not a skip
    _check(p, dtype, name)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("rounding", ["nearest", "stochastic"])
@pytest.mark.parametrize("shape", [(37,), (19, 40)])
def test_adalomo_stores_the_canonical_nan(backend, dtype, rounding, shape):
    name, device = backend
    p = _param_with_nans(shape, dtype, every=7).to(device)
    g = torch.randn(shape, generator=torch.Generator().manual_seed(2)).to(dtype).to(device)
    st = {k: torch.full(s, 0.5, device=device)
          for k, s in ops.adalomo_state_shapes(shape).items()}
    ops.get_impl("adalomo_update_", name, device)(
        p, g, st.get("exp_avg_sq_row"), st.get("exp_avg_sq_col"), st.get("exp_avg_sq"), None,
        None, 1e-2, 0.1, 1.0, 0.0, 0.5, 1e-30, 1e-3, 1.0, rounding, 7, 3)
    assert torch.isnan(p.float()).all()  # rms(p) is NaN: so is every element
    _check(p, dtype, name)
