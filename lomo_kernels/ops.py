"""Op contracts: every update is declared once here with ``torch.library`` and dispatched by
backend name.

Ops (namespace ``lomo_kernels``; mutated tensors marked ``!``; all return nothing):

    lomo_update_(param!, grad, clip_coef?, found_inf!?, lr, weight_decay, loss_scale,
                 clip_grad_value, rounding, seed, step)
    adalomo_update_(param!, grad, exp_avg_sq_row!?, exp_avg_sq_col!?, exp_avg_sq!?, clip_coef?,
                    found_inf!?, lr, weight_decay, loss_scale, clip_grad_value, beta, eps1, eps2,
                    clip_threshold, rounding, seed, step)

Argument conventions (every backend): ``loss_scale`` divides the gradient (1.0 = none),
``clip_grad_value <= 0`` disables value clipping, ``clip_coef`` is an optional 0-d float32 device
tensor (global-norm clipping), ``found_inf`` an optional 1-element float32 device tensor set to 1
when the gradient holds a NaN/Inf, ``rounding`` is ``"nearest"`` or ``"stochastic"``, ``seed`` and
``step`` key the stochastic-rounding hash (reference.py). The AdaLomo op runs the three passes of
docs/spec.md (statistics, update norm, apply) inside one call: the scalars between passes stay on
the device.

Dispatcher registrations: the pure-PyTorch reference is the default (CompositeExplicitAutograd);
the native extension ``lomo_kernels._C``, when it loads, registers CPU and CUDA kernels for the
same ops (``TORCH_LIBRARY_IMPL``); the Triton kernels are registered for CUDA when the native CUDA
kernels are absent. ``torch.ops.lomo_kernels.<op>`` therefore runs the fastest implementation for
the tensor's device. ``get_impl(op, backend, device)`` resolves an explicit backend name (once per
parameter, never per call) and raises a clear error when that backend cannot run there.
"""

from __future__ import annotations

import importlib
import os
import warnings
from typing import Callable, Optional, Union

import torch

from . import reference
from ._checks import number
from ._stack import user_stacklevel

BACKENDS = ("auto", "native", "triton", "torch")
ROUNDINGS = ("nearest", "stochastic")
SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)

_SCHEMAS = {
    "lomo_update_": (
        "(Tensor(a!) param, Tensor grad, Tensor? clip_coef, Tensor(b!)? found_inf, float lr, "
        "float weight_decay, float loss_scale, float clip_grad_value, str rounding, int seed, "
        "int step) -> ()"
    ),
    "adalomo_update_": (
        "(Tensor(a!) param, Tensor grad, Tensor(b!)? exp_avg_sq_row, Tensor(c!)? exp_avg_sq_col, "
        "Tensor(d!)? exp_avg_sq, Tensor? clip_coef, Tensor(e!)? found_inf, float lr, "
        "float weight_decay, float loss_scale, float clip_grad_value, float beta, float eps1, "
        "float eps2, float clip_threshold, str rounding, int seed, int step) -> ()"
    ),
}
OPS = tuple(_SCHEMAS)

for _name, _schema in _SCHEMAS.items():
    torch.library.define(f"lomo_kernels::{_name}", _schema)
    torch.library.impl(f"lomo_kernels::{_name}", "CompositeExplicitAutograd")(
        getattr(reference, _name)
    )
    # In-place ops return nothing: the fake implementation only has to exist.
    torch.library.register_fake(f"lomo_kernels::{_name}")(lambda *args, **kwargs: None)


# ---------------------------------------------------------------------------------------------
# Backend discovery: importing lomo_kernels never fails because an extension is missing.
# ---------------------------------------------------------------------------------------------

_STATUS: dict[str, str] = {}
_native = None
_triton = None

try:
    # importing the extension registers its CPU/CUDA kernels for the ops above
    _native = importlib.import_module("lomo_kernels._C")

    _STATUS["native"] = "loaded (cpu" + (", cuda)" if _native.has_cuda() else ")")
except Exception as exc:  # ImportError, or an undefined symbol from a mismatched torch build
    _native = None
    _STATUS["native"] = f"unavailable: {type(exc).__name__}: {exc}"

try:
    _triton = importlib.import_module("lomo_kernels.triton_kernels")

    _STATUS["triton"] = "loaded"
except Exception as exc:
    _triton = None
    _STATUS["triton"] = f"unavailable: {type(exc).__name__}: {exc}"

_STATUS["torch"] = "loaded"


def _native_cuda() -> bool:
    return _native is not None and _native.has_cuda()


if _triton is not None and not _native_cuda():
    for _name in OPS:
        torch.library.impl(f"lomo_kernels::{_name}", "CUDA")(getattr(_triton, _name))


class BackendFallbackWarning(UserWarning):
    """``backend="auto"`` runs the slow pure-PyTorch reference on a device where a fast backend
    would normally run (given once per process and device type)."""


def _triton_interpret() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _triton_status() -> str:
    """Triton is usable where it can run: on a CUDA device, or on CPU tensors in its interpreter."""
    if _triton is None:
        return _STATUS["triton"]
    if torch.cuda.is_available():
        return "loaded"
    if _triton_interpret():
        return "loaded"  # (the interpreter runs CPU tensors: the tests' vehicle)
    return ("unavailable: no CUDA device (torch.cuda.is_available() is False); the Triton kernels "
            "run on CUDA GPUs, and on CPU tensors only in the Triton interpreter "
            "(TRITON_INTERPRET=1, for tests)")


def available_backends() -> dict[str, str]:
    """What can run here, and why not: ``{"native": "...", "triton": "...", "torch": "loaded"}``.
    A status starting with ``"loaded"`` can run; otherwise it says ``"unavailable: <reason>"``."""
    return {**_STATUS, "triton": _triton_status()}


def _can_run(backend: str, device: torch.device) -> str | None:
    """None when ``backend`` runs on ``device``, else the reason it cannot."""
    if backend == "torch":
        return None
    if backend == "native":
        if _native is None:
            return _STATUS["native"]
        if device.type == "cpu" or (device.type == "cuda" and _native.has_cuda()):
            return None
        return f"the native extension was built without {device.type} kernels"
    if backend == "triton":
        if _triton is None:
            return _STATUS["triton"]
        if device.type == "cuda" or (device.type == "cpu" and _triton_interpret()):
            return None
        return f"Triton runs on CUDA tensors (CPU tensors only with TRITON_INTERPRET=1), got {device}"
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
            if _can_run(candidate, device) is None:
                return candidate
        _warn_fallback(device)
        return "torch"
    reason = _can_run(backend, device)
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
    if device.type == "cpu":
        why = f"the native extension is {_STATUS['native']}"
        fix = (f"reinstall from the source tree so that the build sees the installed torch: "
               f"`{_REINSTALL}` (needs a C++ compiler)")
    else:
        why = f"native: {_can_run('native', device)}; triton: {_can_run('triton', device)}"
        fix = (f"`pip install triton`, or rebuild the native CUDA kernels with nvcc found (set "
               f"CUDA_HOME): `{_REINSTALL}`")
    warnings.warn(
        f"lomo_kernels: backend='auto' runs the pure-PyTorch reference on {device.type}, often "
        f"10-60x slower than the fused kernels, because {why}. To fix: {fix}. To silence: "
        "warnings.filterwarnings('ignore', category=lomo_kernels.BackendFallbackWarning).",
        BackendFallbackWarning,
        stacklevel=user_stacklevel(),
    )


def get_impl(op: str, backend: str, device: torch.device | str) -> Callable:
    """The callable implementing ``op`` for ``backend`` on ``device`` (resolved once)."""
    if op not in _SCHEMAS:
        raise ValueError(f"unknown op {op!r}; ops are {OPS}")
    backend = resolve_backend(backend, device)
    if backend == "torch":
        return getattr(reference, op)
    if backend == "triton":
        return getattr(_triton, op)
    # native: the dispatcher routes CPU/CUDA tensors to the C++ kernels registered by _C.
    return getattr(torch.ops.lomo_kernels, op)


def _check_common(op, param, grad, clip_coef, found_inf, rounding):
    if not isinstance(param, torch.Tensor) or not isinstance(grad, torch.Tensor):
        raise TypeError(f"{op}: param and grad must be tensors")
    if param.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"{op}: param dtype must be float32, float16 or bfloat16, got {param.dtype}")
    if grad.dtype != param.dtype:
        raise TypeError(f"{op}: grad dtype {grad.dtype} does not match param dtype {param.dtype}")
    if grad.shape != param.shape:
        raise ValueError(f"{op}: grad shape {tuple(grad.shape)} != param shape {tuple(param.shape)}")
    if grad.device != param.device:
        raise ValueError(f"{op}: grad is on {grad.device}, param on {param.device}")
    if not param.is_contiguous() or not grad.is_contiguous():
        raise ValueError(f"{op}: param and grad must be contiguous")
    if rounding not in ROUNDINGS:
        raise ValueError(f"{op}: rounding must be one of {ROUNDINGS}, got {rounding!r}")
    if clip_coef is not None and (
        clip_coef.numel() != 1 or clip_coef.dtype != torch.float32 or clip_coef.device != param.device
    ):
        raise ValueError(f"{op}: clip_coef must be a 1-element float32 tensor on {param.device}")
    if found_inf is not None and (
        found_inf.numel() != 1 or found_inf.dtype != torch.float32 or found_inf.device != param.device
    ):
        raise ValueError(f"{op}: found_inf must be a 1-element float32 tensor on {param.device}")


def _check_scalars(op: str, lr, weight_decay, loss_scale, clip_grad_value) -> None:
    number(lr, f"{op}: lr", ge=0.0)
    number(weight_decay, f"{op}: weight_decay", ge=0.0)
    number(loss_scale, f"{op}: loss_scale", gt=0.0)
    number(clip_grad_value, f"{op}: clip_grad_value (<= 0: off)")


def _check_state(name, t, shape, param):
    if t is None:
        raise ValueError(f"adalomo_update_: {name} is required for a {param.dim()}-d parameter")
    if t.dtype != torch.float32 or tuple(t.shape) != tuple(shape) or t.device != param.device:
        raise ValueError(
            f"adalomo_update_: {name} must be float32 of shape {tuple(shape)} on {param.device}, "
            f"got {t.dtype} {tuple(t.shape)} on {t.device}"
        )
    if not t.is_contiguous():
        raise ValueError(f"adalomo_update_: {name} must be contiguous")


def lomo_update_(
    param: torch.Tensor, grad: torch.Tensor, *, lr: float, weight_decay: float = 0.0,
    loss_scale: float = 1.0, clip_grad_value: float = 0.0, clip_coef: Optional[torch.Tensor] = None,
    found_inf: Optional[torch.Tensor] = None, rounding: str = "nearest", seed: int = 0,
    step: int = 0, backend: str = "auto",
) -> None:
    """Checked entry point of the fused LOMO update (docs/spec.md). Updates ``param`` in place."""
    _check_common("lomo_update_", param, grad, clip_coef, found_inf, rounding)
    _check_scalars("lomo_update_", lr, weight_decay, loss_scale, clip_grad_value)
    impl = get_impl("lomo_update_", backend, param.device)
    impl(param, grad, clip_coef, found_inf, float(lr), float(weight_decay), float(loss_scale),
         float(clip_grad_value), rounding, int(seed), int(step))


def adalomo_state_shapes(shape: Union[torch.Size, tuple]) -> dict[str, tuple]:
    """Shapes of the AdaLomo second-moment state for a parameter of ``shape`` (docs/spec.md)."""
    shape = tuple(shape)
    if len(shape) >= 2:
        return {"exp_avg_sq_row": shape[:-1], "exp_avg_sq_col": shape[:-2] + shape[-1:]}
    return {"exp_avg_sq": shape}


def adalomo_update_(
    param: torch.Tensor, grad: torch.Tensor, *, exp_avg_sq_row: Optional[torch.Tensor] = None,
    exp_avg_sq_col: Optional[torch.Tensor] = None, exp_avg_sq: Optional[torch.Tensor] = None,
    lr: float, beta: float, weight_decay: float = 0.0, loss_scale: float = 1.0,
    clip_grad_value: float = 0.0, eps1: float = 1e-30, eps2: float = 1e-3,
    clip_threshold: float = 1.0, clip_coef: Optional[torch.Tensor] = None,
    found_inf: Optional[torch.Tensor] = None, rounding: str = "nearest", seed: int = 0,
    step: int = 0, backend: str = "auto",
) -> None:
    """Checked entry point of the AdaLomo update (docs/spec.md). Updates ``param`` and state in
    place."""
    _check_common("adalomo_update_", param, grad, clip_coef, found_inf, rounding)
    _check_scalars("adalomo_update_", lr, weight_decay, loss_scale, clip_grad_value)
    number(beta, "adalomo_update_: beta", ge=0.0, le=1.0)
    number(eps1, "adalomo_update_: eps1", ge=0.0)
    number(eps2, "adalomo_update_: eps2", ge=0.0)
    number(clip_threshold, "adalomo_update_: clip_threshold", gt=0.0)
    state = {"exp_avg_sq_row": exp_avg_sq_row, "exp_avg_sq_col": exp_avg_sq_col,
             "exp_avg_sq": exp_avg_sq}
    shapes = adalomo_state_shapes(param.shape)
    for name, t in state.items():
        if name in shapes:
            _check_state(name, t, shapes[name], param)
        elif t is not None:
            raise ValueError(f"adalomo_update_: {name} must be None for a {param.dim()}-d parameter")
    impl = get_impl("adalomo_update_", backend, param.device)
    impl(param, grad, exp_avg_sq_row, exp_avg_sq_col, exp_avg_sq, clip_coef, found_inf, float(lr),
         float(weight_decay), float(loss_scale), float(clip_grad_value), float(beta), float(eps1),
         float(eps2), float(clip_threshold), rounding, int(seed), int(step))
