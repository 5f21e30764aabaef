"""Backend discovery, status and resolution. Importing lomo_kernels never fails because an extension
or Triton is missing: each backend's loader says why it is unavailable instead.

Registration with the dispatcher, at import, in this order: the reference as every op's default
(default.py), the native extension's CPU and CUDA kernels (native.py), the Triton kernels for
CUDA where the native extension has no CUDA kernels (triton.py). ``torch.ops.lomo_kernels.<op>``
therefore runs the fastest implementation for the tensor's device.

``resolve_backend(backend, device)`` is what a backend name means on a device (``auto``: native,
then triton, then the reference, with a ``BackendFallbackWarning`` once per process and device
type when it lands on the slow reference where a fast backend normally runs); ``raw_impl`` is a
backend's own implementation of an op; ``can_run`` says why a backend cannot run somewhere. A
backend whose kernel disagreed with the reference on this machine (lomo_kernels/selfcheck.py) is
disabled on that device for the rest of the process (``disable``, ``disabled_reason``).
"""

from __future__ import annotations

import warnings
from typing import Callable, Optional

import torch

from .. import _ops, reference
from .._checks import check_shapes
from .._stack import user_stacklevel
from . import native as _native_backend
from . import default as _default_backend
from . import triton as _triton_backend

BACKENDS = ("auto", "native", "triton", "torch", "cuda_emulated")

_default_backend.register()
_native, _native_status, _emulated_status = _native_backend.load()
_triton, _triton_status_at_import = _triton_backend.load()
_STATUS: dict[str, str] = {"native": _native_status, "triton": _triton_status_at_import,
                           "torch": "loaded", "cuda_emulated": _emulated_status}


def native_has_cuda() -> bool:
    return _native is not None and _native.has_cuda()


if _triton is not None and not native_has_cuda():
    _triton_backend.register_for_cuda(_triton)


class BackendFallbackWarning(UserWarning):
    """``backend="auto"`` runs the slow pure-PyTorch reference on a device where a fast backend
    would normally run (given once per process and device type)."""


triton_interpret = _triton_backend.interpret


def _triton_status() -> str:
    """Triton is usable where it can run: on a CUDA device, or on CPU tensors in its interpreter."""
    if _triton is None:
        return _STATUS["triton"]
    if torch.cuda.is_available():
        return "loaded"
    if triton_interpret():
        return "loaded"  # (the interpreter runs CPU tensors: the tests' vehicle)
    return ("unavailable: no CUDA device (torch.cuda.is_available() is False); the Triton kernels "
            "run on CUDA GPUs, and on CPU tensors only in the Triton interpreter "
            "(TRITON_INTERPRET=1, for tests)")


def available_backends() -> dict[str, str]:
    """What can run here, and why not: ``{"native": "...", "triton": "...", "torch": "loaded",
    "cuda_emulated": "..."}``.
    A status starting with ``"loaded"`` can run; otherwise it says ``"unavailable: <reason>"``."""
    return {**_STATUS, "triton": _triton_status()}


def native_extension():
    """``lomo_kernels._C``, or None when it did not load (see ``available_backends()``)."""
    return _native


def triton_kernels():
    """``lomo_kernels.triton_kernels``, or None when it did not load."""
    return _triton


# ---------------------------------------------------------------------------------------------
# Backends disabled for this process by a failed self-check
# ---------------------------------------------------------------------------------------------

_disabled: dict[tuple, str] = {}  # (backend, device) -> why


def disable(backend: str, device: torch.device, why: str) -> None:
    _disabled.setdefault((backend, str(device)), why)


def disabled_reason(backend: str, device: torch.device) -> Optional[str]:
    return _disabled.get((backend, str(device)))


def enable_all() -> None:
    _disabled.clear()


# ---------------------------------------------------------------------------------------------
# Resolution
# ---------------------------------------------------------------------------------------------


def can_run(backend: str, device: torch.device) -> Optional[str]:
    """None when ``backend`` runs on ``device``, else the reason it cannot."""
    if backend == "torch":
        return None
    disabled = disabled_reason(backend, device)
    if disabled is not None:
        return f"disabled for this process: {disabled}"
    if backend == "native":
        if _native is None:
            return _STATUS["native"]
        if device.type == "cpu" or (device.type == "cuda" and _native.has_cuda()):
            return None
        return f"the native extension was built without {device.type} kernels"
    if backend == "triton":
        if _triton is None:
            return _STATUS["triton"]
        if device.type == "cuda" or (device.type == "cpu" and triton_interpret()):
            return None
        return f"Triton runs on CUDA tensors (CPU tensors only with TRITON_INTERPRET=1), got {device}"
    if backend == "cuda_emulated":
        if not _STATUS["cuda_emulated"].startswith("loaded"):
            return _STATUS["cuda_emulated"]
        if device.type == "cpu":
            return None
        return f"the CUDA emulation runs on CPU tensors, got {device}"
    raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")


def resolve_backend(backend: str, device: torch.device | str) -> str:
    """The concrete backend ``backend`` means on ``device`` (``auto``: native, triton, torch)."""
    device = torch.device(device)
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        for candidate in ("native", "triton"):
            if candidate == "triton" and device.type == "cpu":
                continue  # the interpreter is a test vehicle, never an automatic choice
            if can_run(candidate, device) is None:
                return candidate
        _warn_fallback(device)
        return "torch"
    reason = can_run(backend, device)
    if reason is not None:
        raise RuntimeError(f"lomo_kernels: backend {backend!r} cannot run on {device}: {reason}")
    return backend


_FALLBACK_WARNED: set = set()
_REINSTALL = "pip install --no-build-isolation --force-reinstall --no-deps ."


def _warn_fallback(device: torch.device) -> None:
    """Say once per process and device type that "auto" fell back to the slow reference where a
    native or Triton backend normally runs (CPU: native; CUDA: native or Triton)."""
    if device.type not in ("cpu", "cuda") or device.type in _FALLBACK_WARNED:
        return
    _FALLBACK_WARNED.add(device.type)
    disabled = disabled_reason("native", device)
    if disabled is not None:
        why = f"the native backend is disabled for this process: {disabled}"
        fix = "run `python -m lomo_kernels` and report its output"
    elif device.type == "cpu":
        why = f"the native extension is {_STATUS['native']}"
        fix = (f"reinstall from the source tree so that the build sees the installed torch: "
               f"`{_REINSTALL}` (needs a C++ compiler)")
    else:
        why = f"native: {can_run('native', device)}; triton: {can_run('triton', device)}"
        fix = (f"`pip install triton`, or rebuild the native CUDA kernels with nvcc found (set "
               f"CUDA_HOME): `{_REINSTALL}`")
    warnings.warn(
        f"lomo_kernels: backend='auto' runs the pure-PyTorch reference on {device.type}, often "
        f"10-60x slower than the fused kernels, because {why}. To fix: {fix}. To silence: "
        "warnings.filterwarnings('ignore', category=lomo_kernels.BackendFallbackWarning).",
        BackendFallbackWarning,
        stacklevel=user_stacklevel(),
    )


def _has_native_kernel(op: str, device: torch.device) -> bool:
    key = "CUDA" if device.type == "cuda" else "CPU"
    return torch._C._dispatch_has_kernel_for_dispatch_key(f"{_ops.NAMESPACE}::{op}", key)


def raw_impl(op: str, backend: str, device: torch.device) -> Optional[Callable]:
    """The backend's own implementation of ``op``, or None when it has none (no first-use check:
    what the doctor tests)."""
    if backend == "torch":
        return getattr(reference, op)
    if backend == "triton":
        return getattr(_triton, op, None)
    if backend == "cuda_emulated":  # its own namespace: only the ops the emulated build registers
        ns = _ops.EMULATED_NAMESPACE
        has = torch._C._dispatch_has_kernel_for_dispatch_key(f"{ns}::{op}", "CPU")
        return getattr(getattr(torch.ops, ns), op) if has else None
    # native: the dispatcher routes CPU/CUDA tensors to the C++ kernels registered by _C.
    return getattr(torch.ops.lomo_kernels, op) if _has_native_kernel(op, device) else None


def workspace_numel(op: str, shapes, *, backend: str = "auto",
                    device: torch.device | str = "cpu") -> int:
    """float32 elements of the workspace ``op`` needs on ``backend``: for a single-tensor op, enough
    for any one of ``shapes``; for a multi-tensor op, for the whole list in one call. Allocate it
    once with ``torch.zeros`` and pass it to every call (never smaller, never shared between
    streams)."""
    if not isinstance(op, str) or op not in _ops.SCHEMAS:
        raise ValueError(f"workspace_numel: op must be one of {_ops.OPS}, got {op!r}")
    shapes = check_shapes(op, shapes)
    if not isinstance(device, (str, torch.device)):
        raise TypeError(f"workspace_numel: device must be a torch.device or a string such as "
                        f"'cpu', got {type(device).__name__}")
    device = torch.device(device)
    backend = resolve_backend(backend, device)
    if backend in ("native", "cuda_emulated") and _native is not None:
        # the native CPU kernels' need, or the CUDA kernels' (also what the emulation runs)
        cuda = backend == "cuda_emulated" or device.type == "cuda"
        fn = getattr(_native, "workspace_numel_cuda" if cuda else "workspace_numel", None)
    else:
        fn = getattr({"torch": reference, "triton": _triton}.get(backend), "workspace_numel", None)
    need = fn(op, shapes) if fn is not None else 0
    return max(int(need), reference.workspace_numel(op, shapes))
