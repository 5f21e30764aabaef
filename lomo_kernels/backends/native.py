"""The native backend: the C++ (CPU) and CUDA kernels of csrc/, compiled into ``lomo_kernels._C``
by ``pip install``, and the same CUDA source built for the SIMT emulation on CPU tensors
(``cuda_emulated``, with ``LOMO_KERNELS_CUDA_EMULATION=1``).

``load()`` imports the extension, refuses a build for another op contract (a stale build: a clear
status, never an aborted import) and lets it register its kernels for the ops' CPU and CUDA keys
(and for the emulated namespace). It returns the extension (or None) and the status lines of
``native`` and ``cuda_emulated``.
"""

from __future__ import annotations

import importlib
from types import ModuleType
from typing import Optional, Tuple

from .._ops import CONTRACT_VERSION


def load() -> Tuple[Optional[ModuleType], str, str]:
    """(the extension or None, native's status, cuda_emulated's status)."""
    try:
        ext = importlib.import_module("lomo_kernels._C")
        built = ext.contract_version() if hasattr(ext, "contract_version") else 1
        if built != CONTRACT_VERSION:
            raise ImportError(
                f"lomo_kernels._C was built for op contract {built}, this checkout declares "
                f"{CONTRACT_VERSION} (a stale build): rebuild it with "
                "`pip install --no-build-isolation -e .`"
            )
        ext.register_kernels()  # adds its CPU/CUDA kernels to the ops
        status = "loaded (cpu" + (", cuda)" if ext.has_cuda() else ")")
    except Exception as exc:  # ImportError, or an undefined symbol from a mismatched torch build
        return None, f"unavailable: {type(exc).__name__}: {exc}", (
            f"unavailable: {type(exc).__name__}: {exc}")
    if ext.has_cuda_emulation():
        emulated = "loaded (cpu)"
    else:
        emulated = ("unavailable: the native extension was built without "
                    "LOMO_KERNELS_CUDA_EMULATION=1")
    return ext, status, emulated
