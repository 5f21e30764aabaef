"""The backends the kernel property tests run on, each with what it promises (docs/spec.md), and the
runner that parametrises a property over them.

A property (test_lomo_update.py, test_adalomo_update.py) is written once and runs on every backend
that can run here: the reference (pure PyTorch), the native C++ kernels on CPU (``cpu``), the CUDA
kernels of csrc/ in the SIMT emulation on CPU tensors (``cuda_emulated``), the Triton kernels in
the Triton interpreter (``triton-interpreter``, when there is no GPU) and, with a GPU, the native
CUDA kernels (``cuda``) and the Triton kernels (``triton-cuda``). The oracle (the reference and the
float64 evaluation of oracle.py) always runs on CPU copies.

What differs between backends is data, kept here: the device of their tensors, the callable that
takes an op's positional arguments, whether nearest rounding is bitwise the reference's (the C++
CPU kernels do the same fp32 operations), and the tolerance family of their comparisons
(``native``: the C++/CUDA source, reductions in double over fixed partitions; ``triton``: the
interpreter has no fused multiply-add and sums in another order). Each tolerance is the one the
backend's tests have always had.

``cases(backends, rows, slow_if=...)`` makes the parameter list: one ``pytest.param`` per
(backend, row), with the backend's skip marks, its marker (``backend_<name>``, e.g.
``-m backend_triton``) and ``slow`` where ``slow_if(backend, *row)`` says so (large tensors on the
emulation or the interpreter, which run them at a few MB/s).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Callable, Iterable, Optional

import pytest
import torch
from conftest import requires_cuda_emulation, requires_native, requires_triton, ulp_distance

from lomo_kernels import ops, reference

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
GPU = torch.cuda.is_available()


@dataclass(frozen=True)
class Backend:
    id: str  # the pytest id
    name: str  # its name in lomo_kernels.ops.BACKENDS (the optimizers' backend=...)
    family: str  # "reference", "native" or "triton": the tolerances of docs/spec.md it is held to
    device: str  # where its tensors live
    namespace: Optional[str] = None  # torch.ops namespace of a dispatcher backend
    bitwise: bool = False  # nearest rounding bitwise equal to the reference on the same device
    slow: bool = False  # runs on a CPU emulation or interpreter: large tensors are slow
    marks: tuple = ()

    def op(self, name: str) -> Callable:
        """The callable that runs op ``name`` on this backend (the op's positional arguments)."""
        if self.family == "reference":
            return getattr(reference, name)
        if self.family == "triton":
            from lomo_kernels import triton_kernels

            return getattr(triton_kernels, name)
        return getattr(getattr(torch.ops, self.namespace), name)

    def __repr__(self) -> str:
        return self.id


REFERENCE = Backend("reference", "torch", "reference", "cpu", bitwise=True)
NATIVE_CPU = Backend("cpu", "native", "native", "cpu", namespace="lomo_kernels", bitwise=True,
                     marks=(requires_native,))
CUDA_EMULATED = Backend("cuda_emulated", "cuda_emulated", "native", "cpu",
                        namespace=ops.EMULATED_NAMESPACE, slow=True,
                        marks=(requires_cuda_emulation,))
TRITON_INTERPRETER = Backend("triton-interpreter", "triton", "triton", "cpu", slow=True,
                             marks=(requires_triton,))
NATIVE_CUDA = Backend("cuda", "native", "native", "cuda", namespace="lomo_kernels", marks=(
    pytest.mark.skipif(not ops.available_backends()["native"].startswith("loaded (cpu, cuda)"),
                       reason=f"native CUDA kernels: {ops.available_backends()['native']}"),))
TRITON_CUDA = Backend("triton-cuda", "triton", "triton", "cuda", marks=(requires_triton,))

#: Every backend that can be asked to run here (a GPU adds the CUDA ones; the interpreter runs
#: only without one, as conftest sets TRITON_INTERPRET=1 then).
ALL = [REFERENCE, NATIVE_CPU, CUDA_EMULATED] + ([TRITON_INTERPRETER] if INTERPRET else []) + (
    [NATIVE_CUDA, TRITON_CUDA] if GPU else [])
KERNELS = [b for b in ALL if b.family != "reference"]  # the kernels checked against the oracle
NATIVE = [b for b in ALL if b.family == "native"]  # the C++/CUDA source, with its op schemas
#: Backends whose ops are registered with the dispatcher (opcheck, torch.compile)
DISPATCHED = NATIVE


def numel(shape) -> int:
    return math.prod(shape)


def large_on_emulation(backend: Backend, shape, *_rest, limit: int = 20000) -> bool:
    """The default ``slow`` rule: more than ``limit`` elements on an emulation or interpreter."""
    return backend.slow and numel(shape) > limit


def cases(backends: Iterable[Backend], rows: Iterable, slow_if=large_on_emulation,
          keep=None) -> list:
    """``pytest.param(backend, *row)`` for every backend and row (a tuple of the other
    arguments), with the backend's marks, and ``slow`` where ``slow_if(backend, *row)``; only
    the pairs where ``keep(backend, *row)`` (when given) is true."""
    out = []
    for backend in backends:
        for row in rows:
            row = row if isinstance(row, tuple) else (row,)
            if keep is not None and not keep(backend, *row):
                continue
            marks = list(backend.marks) + [getattr(pytest.mark, f"backend_{backend.name}")]
            if slow_if is not None and slow_if(backend, *row):
                marks.append(pytest.mark.slow)
            ids = "-".join([backend.id] + [_id(v) for v in row])
            out.append(pytest.param(backend, *row, marks=marks, id=ids))
    return out


def _id(value) -> str:
    if isinstance(value, torch.dtype):
        return str(value).replace("torch.", "")
    if isinstance(value, tuple) and value and all(isinstance(v, torch.dtype) for v in value):
        return "-grad-".join(_id(v) for v in value)  # (parameter, gradient) dtypes
    if isinstance(value, tuple):
        return "x".join(str(v) for v in value) if value else "0d"
    return str(value)


def runs_compare(backend: Backend, dtype: torch.dtype, rounding: str) -> bool:
    """Whether a training run on ``backend`` can be compared with the torch backend's. The Triton
    interpreter stores fp16/bf16 by truncation (biased by up to an ulp, where a GPU rounds to
    nearest): over several nearest-rounded steps its run drifts from the reference's by more than
    the tolerance. Its stochastic rounding (the kernel's own) and fp32 compare."""
    return not (backend.id == "triton-interpreter" and dtype != torch.float32
                and rounding == "nearest")


def assert_runs_close(losses, ref_losses, params, ref_params, exact: bool) -> None:
    """A training run on a backend that is not bitwise the reference's, against the torch
    backend's: losses within 1e-5 (float32) or 1e-2, parameters within 1e-5 (float32) or 2 ulp
    with more than 90% of them equal (per-element ulp differences in one step may change the next
    step's gradients)."""
    torch.testing.assert_close(losses, ref_losses, rtol=1e-5 if exact else 1e-2, atol=0)
    for a, b in zip(params, ref_params):
        if exact:
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
        else:
            assert ulp_distance(a, b).max().item() <= 2
            assert (a == b).float().mean().item() > 0.9
