"""Shared fixtures and markers. Collection never touches a GPU."""

import os

# Without a GPU the Triton kernels run in the interpreter on CPU tensors. It must be chosen
# before triton (imported by lomo_kernels) decorates any kernel.
if "TRITON_INTERPRET" not in os.environ and not os.environ.get("CUDA_VISIBLE_DEVICES", "x") == "":
    import torch

    if not torch.cuda.is_available():
        os.environ["TRITON_INTERPRET"] = "1"
elif "TRITON_INTERPRET" not in os.environ:
    os.environ["TRITON_INTERPRET"] = "1"

import pytest  # noqa: E402
import torch  # noqa: E402

import lomo_kernels  # noqa: E402
from lomo_kernels import ops  # noqa: E402

requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
requires_triton = pytest.mark.skipif(
    "loaded" not in ops.available_backends()["triton"],
    reason=f"Triton backend: {ops.available_backends()['triton']}",
)
requires_native = pytest.mark.skipif(
    "loaded" not in ops.available_backends()["native"],
    reason=f"native backend: {ops.available_backends()['native']}",
)

# (dtype, atol, rtol) for comparisons against the float64 evaluation of the formulas.
TOLERANCES = [
    (torch.float32, 1e-6, 1e-5),
    (torch.float16, 1e-3, 1e-3),
    (torch.bfloat16, 1e-2, 1e-2),
]
ODD_SIZES = [1, 7, 4097, 278011]


def ulp_distance(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Elementwise distance in units in the last place of a's dtype (a, b same 16-bit dtype)."""
    assert a.dtype == b.dtype and a.dtype in (torch.float16, torch.bfloat16)
    ia = a.contiguous().view(torch.int16).to(torch.int32)
    ib = b.contiguous().view(torch.int16).to(torch.int32)
    # map sign-magnitude to a monotonic integer line
    ia = torch.where(ia < 0, -(ia & 0x7FFF), ia)
    ib = torch.where(ib < 0, -(ib & 0x7FFF), ib)
    return (ia - ib).abs()


@pytest.fixture
def gen():
    """A fresh, seeded generator per test (fresh random data per check, never zeros)."""
    return torch.Generator().manual_seed(torch.randint(0, 2**31 - 1, ()).item())
