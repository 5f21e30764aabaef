"""Op contracts: every update is declared once here with ``torch.library`` and dispatched by
backend name.

Ops (namespace ``lomo_kernels``; mutated tensors marked ``!``; all return nothing):

    lomo_update_(param!, grad, clip_coef?, found_inf!?, lr, weight_decay, loss_scale,
                 clip_grad_value, rounding, seed, step)
    adalomo_update_(param!, grad, exp_avg_sq_row!?, exp_avg_sq_col!?, exp_avg_sq!?, clip_coef?,
                    found_inf!?, lr, weight_decay, loss_scale, clip_grad_value, beta, eps1, eps2,
                    clip_threshold, rounding, seed, step)
    golore_update_(r!, param!?, exp_avg!?, exp_avg_sq!?, momentum_buffer!?, clip_coef?,
                   found_inf!?, inner, lr, weight_decay, scale, beta1, beta2, eps, momentum,
                   rounding, seed, step)

Argument conventions (every backend): ``loss_scale`` divides the gradient (1.0 = none),
``clip_grad_value <= 0`` disables value clipping, ``clip_coef`` is an optional 0-d float32 device
tensor (global-norm clipping), ``found_inf`` an optional 1-element float32 device tensor set to 1
when the gradient holds a NaN/Inf, ``rounding`` is ``"nearest"`` or ``"stochastic"``, ``seed`` and
``step`` key the stochastic-rounding hash (reference.py). The AdaLomo op runs the three passes of
SPEC.md (statistics, update norm, apply) inside one call: the scalars between passes stay on the
device. ``golore_update_`` is the inner optimizer of GoLore / GaLore (adamw or sgd) on a
projected gradient ``r`` (N written into ``r``) or, given ``param``, the whole full-rank update of
``param`` from its gradient ``r`` (reference.golore_update_ has the formulas).

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
from typing import Callable

import torch

from . import reference

BACKENDS = ("auto", "native", "triton", "torch")
ROUNDINGS = ("nearest", "stochastic")
INNERS = ("adamw", "sgd")  # GoLore's inner optimizers
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
    "golore_update_": (
        "(Tensor(a!) r, Tensor(b!)? param, Tensor(c!)? exp_avg, Tensor(d!)? exp_avg_sq, "
        "Tensor(e!)? momentum_buffer, Tensor? clip_coef, Tensor(f!)? found_inf, str inner, "
        "float lr, float weight_decay, float scale, float beta1, float beta2, float eps, "
        "float momentum, str rounding, int seed, int step) -> ()"
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


def available_backends() -> dict[str, str]:
    """What loaded, and why not: ``{"native": "...", "triton": "...", "torch": "loaded"}``."""
    return dict(_STATUS)


def _triton_interpret() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


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
        return "torch"
    reason = _can_run(backend, device)
    if reason is not None:
        raise RuntimeError(f"lomo_kernels: backend {backend!r} cannot run on {device}: {reason}")
    return backend


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
    param, grad, *, lr, weight_decay=0.0, loss_scale=1.0, clip_grad_value=0.0, clip_coef=None,
    found_inf=None, rounding="nearest", seed=0, step=0, backend="auto",
):
    """Checked entry point of the fused LOMO update (SPEC.md). Updates ``param`` in place."""
    _check_common("lomo_update_", param, grad, clip_coef, found_inf, rounding)
    impl = get_impl("lomo_update_", backend, param.device)
    impl(param, grad, clip_coef, found_inf, float(lr), float(weight_decay), float(loss_scale),
         float(clip_grad_value), rounding, int(seed), int(step))


def adalomo_state_shapes(shape) -> dict[str, tuple]:
    """Shapes of the AdaLomo second-moment state for a parameter of ``shape`` (SPEC.md)."""
    shape = tuple(shape)
    if len(shape) >= 2:
        return {"exp_avg_sq_row": shape[:-1], "exp_avg_sq_col": shape[:-2] + shape[-1:]}
    return {"exp_avg_sq": shape}


def adalomo_update_(
    param, grad, *, exp_avg_sq_row=None, exp_avg_sq_col=None, exp_avg_sq=None, lr, beta,
    weight_decay=0.0, loss_scale=1.0, clip_grad_value=0.0, eps1=1e-30, eps2=1e-3,
    clip_threshold=1.0, clip_coef=None, found_inf=None, rounding="nearest", seed=0, step=0,
    backend="auto",
):
    """Checked entry point of the AdaLomo update (SPEC.md). Updates ``param`` and state in place."""
    _check_common("adalomo_update_", param, grad, clip_coef, found_inf, rounding)
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


def golore_state_names(inner: str, momentum: float) -> tuple:
    """The float32 state tensors (each of ``r``'s shape) that ``golore_update_`` needs."""
    if inner == "adamw":
        return ("exp_avg", "exp_avg_sq")
    if inner == "sgd":
        return ("momentum_buffer",) if momentum != 0.0 else ()
    raise ValueError(f"golore_update_: inner must be one of {INNERS}, got {inner!r}")


def _check_golore(r, param, state, clip_coef, found_inf, inner, momentum, rounding, step):
    op = "golore_update_"
    if not isinstance(r, torch.Tensor) or not (param is None or isinstance(param, torch.Tensor)):
        raise TypeError(f"{op}: r and param must be tensors")
    if param is None and r.dtype != torch.float32:
        raise TypeError(f"{op}: r (the projected gradient) must be float32, got {r.dtype}")
    if param is not None:
        if param.dtype not in SUPPORTED_DTYPES:
            raise TypeError(f"{op}: param dtype must be float32, float16 or bfloat16, got "
                            f"{param.dtype}")
        if r.dtype != param.dtype or r.shape != param.shape or r.device != param.device:
            raise ValueError(
                f"{op}: r (the gradient) must have param's dtype, shape and device: got {r.dtype} "
                f"{tuple(r.shape)} on {r.device}, param {param.dtype} {tuple(param.shape)} on "
                f"{param.device}")
        if not param.is_contiguous():
            raise ValueError(f"{op}: param must be contiguous")
    if not r.is_contiguous():
        raise ValueError(f"{op}: r must be contiguous")
    if rounding not in ROUNDINGS:
        raise ValueError(f"{op}: rounding must be one of {ROUNDINGS}, got {rounding!r}")
    for name, t in (("clip_coef", clip_coef), ("found_inf", found_inf)):
        if t is not None and (t.numel() != 1 or t.dtype != torch.float32 or t.device != r.device):
            raise ValueError(f"{op}: {name} must be a 1-element float32 tensor on {r.device}")
    need = golore_state_names(inner, momentum)
    for name, t in state.items():
        if name not in need:
            if t is not None:
                raise ValueError(f"{op}: {name} must be None for inner={inner!r} "
                                 f"with momentum={momentum}")
            continue
        if t is None:
            raise ValueError(f"{op}: {name} is required for inner={inner!r}")
        if t.dtype != torch.float32 or t.shape != r.shape or t.device != r.device:
            raise ValueError(
                f"{op}: {name} must be float32 of shape {tuple(r.shape)} on {r.device}, got "
                f"{t.dtype} {tuple(t.shape)} on {t.device}")
        if not t.is_contiguous():
            raise ValueError(f"{op}: {name} must be contiguous")
    if inner == "adamw" and step < 1:
        raise ValueError(f"{op}: step must be >= 1 for inner='adamw' (bias correction), got {step}")


def golore_update_(
    r, *, param=None, exp_avg=None, exp_avg_sq=None, momentum_buffer=None, inner="adamw",
    lr=0.0, weight_decay=0.0, scale=1.0, beta1=0.9, beta2=0.999, eps=1e-8, momentum=0.0,
    clip_coef=None, found_inf=None, rounding="nearest", seed=0, step=1, backend="auto",
):
    """Checked entry point of the GoLore inner update (reference.golore_update_): N written into
    the float32 projected gradient ``r``, or, with ``param``, the full-rank update of ``param``
    from its gradient ``r``. State tensors are float32 of ``r``'s shape, updated in place."""
    state = {"exp_avg": exp_avg, "exp_avg_sq": exp_avg_sq, "momentum_buffer": momentum_buffer}
    _check_golore(r, param, state, clip_coef, found_inf, inner, float(momentum), rounding,
                  int(step))
    impl = get_impl("golore_update_", backend, r.device)
    impl(r, param, exp_avg, exp_avg_sq, momentum_buffer, clip_coef, found_inf, inner, float(lr),
         float(weight_decay), float(scale), float(beta1), float(beta2), float(eps),
         float(momentum), rounding, int(seed), int(step))
