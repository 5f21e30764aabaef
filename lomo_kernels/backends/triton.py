"""The Triton backend: the kernels of triton_kernels/ (installed as ``lomo_kernels.triton_kernels``),
registered for the ops' CUDA key where the native extension has no CUDA kernels. They run on CUDA
tensors, and on CPU tensors only in the Triton interpreter (``TRITON_INTERPRET=1``, for tests).
"""

from __future__ import annotations

import importlib
import os
from types import ModuleType
from typing import Optional, Tuple

import torch

from .. import _ops


def load() -> Tuple[Optional[ModuleType], str]:
    """(the Triton kernels' module or None, its import status)."""
    try:
        return importlib.import_module("lomo_kernels.triton_kernels"), "loaded"
    except Exception as exc:
        return None, f"unavailable: {type(exc).__name__}: {exc}"


def register_for_cuda(kernels: ModuleType) -> None:
    for name in _ops.OPS:
        if hasattr(kernels, name):
            torch.library.impl(f"{_ops.NAMESPACE}::{name}", "CUDA")(getattr(kernels, name))


def interpret() -> bool:
    """The Triton interpreter is on (CPU tensors run, for tests)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"
