"""Shared fixtures and markers. Collection never touches a GPU."""

import os

# Without a GPU the Triton kernels run in the interpreter on CPU tensors. The choice must be made
# before triton (imported by lomo_kernels) decorates any kernel.
if "TRITON_INTERPRET" not in os.environ:
    import torch

    if not torch.cuda.is_available():
        os.environ["TRITON_INTERPRET"] = "1"

import pytest  # noqa: E402
import torch  # noqa: E402

from lomo_kernels import ops  # noqa: E402

requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
requires_triton = pytest.mark.skipif(
    not ops.available_backends()["triton"].startswith("loaded"),
    reason=f"Triton backend: {ops.available_backends()['triton']}",
)
requires_native = pytest.mark.skipif(
    not ops.available_backends()["native"].startswith("loaded"),
    reason=f"native backend: {ops.available_backends()['native']}",
)

ODD_SIZES = [1, 7, 4097, 278011]


@pytest.fixture
def one_thread():
    """Small matrices: one thread is faster and steadier than OpenMP threads on a shared CPU.
    (``pytestmark = pytest.mark.usefixtures("one_thread")``)"""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


def ulp_distance(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Elementwise distance in units in the last place between two fp16/bf16 tensors."""
    assert a.dtype == b.dtype and a.dtype in (torch.float16, torch.bfloat16)

    def line(x):  # sign-magnitude bit pattern -> monotonic integer line
        i = x.contiguous().view(torch.int16).to(torch.int32)
        return torch.where(i < 0, -(i & 0x7FFF), i)

    return (line(a) - line(b)).abs()
