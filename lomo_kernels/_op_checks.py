"""The argument checks of the public entry points (lomo_kernels.ops): Python errors that name the
argument and the accepted values, raised before any backend runs (``TypeError`` for a wrong kind,
``ValueError`` for a wrong value). The ops' fake implementations (_ops.py) check the same shapes,
dtypes and devices inside the dispatcher, for calls that bypass these entry points.
"""

from __future__ import annotations

import torch

from ._checks import number
from ._ops import ROUNDINGS, SUPPORTED_DTYPES, golore_state_names
from .backends import workspace_numel


def check_scalar_tensor(op, name, t, device):
    if t is not None and (
        not isinstance(t, torch.Tensor) or t.numel() != 1 or t.dtype != torch.float32
        or t.device != device
    ):
        raise ValueError(f"{op}: {name} must be a 1-element float32 tensor on {device}")


def check_common(op, param, grad, clip_coef, found_inf, rounding, grad_sq=None):
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
    for name, t in (("clip_coef", clip_coef), ("found_inf", found_inf), ("grad_sq", grad_sq)):
        check_scalar_tensor(op, name, t, param.device)


def check_workspace(op, workspace, shapes, backend, device):
    if workspace is None:
        return
    if (not isinstance(workspace, torch.Tensor) or workspace.dtype != torch.float32
            or workspace.dim() != 1 or workspace.device != device
            or not workspace.is_contiguous()):
        raise ValueError(f"{op}: workspace must be a contiguous 1-d float32 tensor on {device}")
    need = workspace_numel(op, shapes, backend=backend, device=device)
    if workspace.numel() < need:
        raise ValueError(f"{op}: workspace has {workspace.numel()} elements, needs {need} "
                         "(ops.workspace_numel)")


def check_scalars(op: str, lr, weight_decay, loss_scale, clip_grad_value) -> None:
    number(lr, f"{op}: lr", ge=0.0)
    number(weight_decay, f"{op}: weight_decay", ge=0.0)
    number(loss_scale, f"{op}: loss_scale", gt=0.0)
    number(clip_grad_value, f"{op}: clip_grad_value (<= 0: off)")


def check_adalomo_scalars(op, lr, weight_decay, loss_scale, clip_grad_value, beta, eps1, eps2,
                          clip_threshold) -> None:
    check_scalars(op, lr, weight_decay, loss_scale, clip_grad_value)
    number(beta, f"{op}: beta", ge=0.0, le=1.0)
    number(eps1, f"{op}: eps1", ge=0.0)
    number(eps2, f"{op}: eps2", ge=0.0)
    number(clip_threshold, f"{op}: clip_threshold", gt=0.0)


def check_state(name, t, shape, param, op="adalomo_update_"):
    if t is None:
        raise ValueError(f"{op}: {name} is required for a {param.dim()}-d parameter")
    if t.dtype != torch.float32 or tuple(t.shape) != tuple(shape) or t.device != param.device:
        raise ValueError(
            f"{op}: {name} must be float32 of shape {tuple(shape)} on {param.device}, "
            f"got {t.dtype} {tuple(t.shape)} on {t.device}"
        )
    if not t.is_contiguous():
        raise ValueError(f"{op}: {name} must be contiguous")


def per_tensor(op, name, value, count, kind=float):
    """A scalar broadcast to ``count`` tensors, or a list of exactly ``count`` values."""
    values = list(value) if isinstance(value, (list, tuple)) else [value] * count
    if len(values) != count:
        raise ValueError(f"{op}: {name} has {len(values)} values for {count} tensors")
    return [kind(v) for v in values]


def check_multi(op, params, grads, clip_coef, found_inf, rounding, grad_sq):
    params, grads = list(params), list(grads)
    if len(params) != len(grads):
        raise ValueError(f"{op}: {len(params)} params but {len(grads)} grads")
    for p, g in zip(params, grads):
        check_common(op, p, g, clip_coef, found_inf, rounding, grad_sq)
    if params and any(p.device != params[0].device for p in params):
        raise ValueError(f"{op}: every tensor must be on one device")
    return params, grads


def check_golore(r, param, state, clip_coef, found_inf, inner, momentum, rounding, step):
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
