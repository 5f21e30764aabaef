"""Argument checks of the op entry points (lomo_kernels.ops): tensors (kind, dtype, shape,
device, contiguity), scalars and lists of them, shapes. Each error names the op and the argument
and says what it expected, and is raised before any tensor changes (``TypeError`` for a value of
the wrong kind, ``ValueError`` for one out of range).
"""

from __future__ import annotations

import torch

from ._checks import choice, integer, number
from ._ops import BUFFER_DTYPES, INNERS, ROUNDINGS, SUPPORTED_DTYPES, golore_state_names
from .backends import workspace_numel

_INT64 = 2**63


def check_seed_step(op: str, seed, step, step_ge: int = 0) -> tuple[int, int]:
    """The stochastic-rounding key: integers (int64), ``step >= step_ge``."""
    seed = integer(seed, f"{op}: seed")
    step = integer(step, f"{op}: step", ge=step_ge)
    for name, v in (("seed", seed), ("step", step)):
        if not -_INT64 <= v < _INT64:
            raise ValueError(f"{op}: {name} must fit in 64 bits, got {v}")
    return seed, step


def _tensor(op, name, t, allow_none=False):
    if t is None and allow_none:
        return
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{op}: {name} must be a tensor{' or None' if allow_none else ''}, got "
                        f"{type(t).__name__}")


def check_scalar_tensor(op, name, t, device):
    _tensor(op, name, t, allow_none=True)
    if t is not None and (t.numel() != 1 or t.dtype != torch.float32 or t.device != device):
        raise ValueError(f"{op}: {name} must be a 1-element float32 tensor on {device}, got "
                         f"{t.dtype} of shape {tuple(t.shape)} on {t.device}")


def check_common(op, param, grad, clip_coef, found_inf, rounding, grad_sq=None):
    _tensor(op, "param", param)
    _tensor(op, "grad", grad)
    if param.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"{op}: param dtype must be float32, float16 or bfloat16, got {param.dtype}")
    if grad.dtype != param.dtype and grad.dtype != torch.float32:
        raise TypeError(f"{op}: grad dtype {grad.dtype} must be param's ({param.dtype}) or "
                        "float32 (an accumulation buffer)")
    if grad.shape != param.shape:
        raise ValueError(f"{op}: grad shape {tuple(grad.shape)} != param shape {tuple(param.shape)}")
    if grad.device != param.device:
        raise ValueError(f"{op}: grad is on {grad.device}, param on {param.device}")
    if not param.is_contiguous() or not grad.is_contiguous():
        raise ValueError(f"{op}: param and grad must be contiguous")
    choice(rounding, f"{op}: rounding", ROUNDINGS)
    for name, t in (("clip_coef", clip_coef), ("found_inf", found_inf), ("grad_sq", grad_sq)):
        check_scalar_tensor(op, name, t, param.device)


def check_workspace_tensor(op, workspace, device):
    _tensor(op, "workspace", workspace, allow_none=True)
    if workspace is not None and (
            workspace.dtype != torch.float32 or workspace.dim() != 1
            or workspace.device != device or not workspace.is_contiguous()):
        raise ValueError(f"{op}: workspace must be a contiguous 1-d float32 tensor on {device}, "
                         f"got {workspace.dtype} of shape {tuple(workspace.shape)} on "
                         f"{workspace.device}")


def check_workspace(op, workspace, shapes, backend, device):
    check_workspace_tensor(op, workspace, device)
    if workspace is None:
        return
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
    _tensor(op, name, t)
    if t.dtype != torch.float32 or tuple(t.shape) != tuple(shape) or t.device != param.device:
        raise ValueError(
            f"{op}: {name} must be float32 of shape {tuple(shape)} on {param.device}, "
            f"got {t.dtype} {tuple(t.shape)} on {t.device}"
        )
    if not t.is_contiguous():
        raise ValueError(f"{op}: {name} must be contiguous")


def tensor_list(op: str, name: str, values) -> list:
    """A list or tuple of tensors (a single tensor is refused: iterating it would split it)."""
    if isinstance(values, torch.Tensor) or not isinstance(values, (list, tuple)):
        raise TypeError(f"{op}: {name} must be a list of tensors, got {type(values).__name__}")
    return list(values)


def per_tensor(op, name, value, count, kind=float):
    """A scalar broadcast to ``count`` tensors, or a list of exactly ``count`` values, each checked
    to be a number (``kind=float``) or an integer (``kind=int``)."""
    values = list(value) if isinstance(value, (list, tuple)) else [value] * count
    if len(values) != count:
        raise ValueError(f"{op}: {name} has {len(values)} values for {count} tensors")
    if kind is int:
        return [integer(v, f"{op}: {name}") for v in values]
    return [number(v, f"{op}: {name}") for v in values]


def check_multi(op, params, grads, clip_coef, found_inf, rounding, grad_sq):
    params, grads = tensor_list(op, "params", params), tensor_list(op, "grads", grads)
    if len(params) != len(grads):
        raise ValueError(f"{op}: {len(params)} params but {len(grads)} grads")
    for p, g in zip(params, grads):
        check_common(op, p, g, clip_coef, found_inf, rounding, grad_sq)
    if params and any(p.device != params[0].device for p in params):
        raise ValueError(f"{op}: every tensor must be on one device")
    return params, grads


def check_golore_scalars(lr, weight_decay, scale, beta1, beta2, eps, momentum) -> None:
    op = "golore_update_"
    number(lr, f"{op}: lr", ge=0.0)
    number(weight_decay, f"{op}: weight_decay", ge=0.0)
    number(scale, f"{op}: scale")
    for name, v in (("beta1", beta1), ("beta2", beta2), ("momentum", momentum)):
        if number(v, f"{op}: {name} (in [0, 1))", ge=0.0) >= 1.0:
            raise ValueError(f"{op}: {name} must be in [0, 1), got {v!r}")
    number(eps, f"{op}: eps", ge=0.0)


def check_golore(r, param, state, clip_coef, found_inf, inner, momentum, rounding, step):
    op = "golore_update_"
    _tensor(op, "r", r)
    _tensor(op, "param", param, allow_none=True)
    if param is None and r.dtype != torch.float32:
        raise TypeError(f"{op}: r (the projected gradient) must be float32, got {r.dtype}")
    if param is not None:
        if param.dtype not in SUPPORTED_DTYPES:
            raise TypeError(f"{op}: param dtype must be float32, float16 or bfloat16, got "
                            f"{param.dtype}")
        if (r.dtype not in (param.dtype, torch.float32) or r.shape != param.shape
                or r.device != param.device):
            raise ValueError(
                f"{op}: r (the gradient) must have param's dtype (or float32), shape and device: "
                f"got {r.dtype} {tuple(r.shape)} on {r.device}, param {param.dtype} "
                f"{tuple(param.shape)} on {param.device}")
        if not param.is_contiguous():
            raise ValueError(f"{op}: param must be contiguous")
    if not r.is_contiguous():
        raise ValueError(f"{op}: r must be contiguous")
    choice(rounding, f"{op}: rounding", ROUNDINGS)
    for name, t in (("clip_coef", clip_coef), ("found_inf", found_inf)):
        check_scalar_tensor(op, name, t, r.device)
    need = golore_state_names(inner, momentum)
    for name, t in state.items():
        if name not in need:
            if t is not None:
                raise ValueError(f"{op}: {name} must be None for inner={inner!r} "
                                 f"with momentum={momentum}")
            continue
        if t is None:
            raise ValueError(f"{op}: {name} is required for inner={inner!r}")
        _tensor(op, name, t)
        if t.dtype != torch.float32 or t.shape != r.shape or t.device != r.device:
            raise ValueError(
                f"{op}: {name} must be float32 of shape {tuple(r.shape)} on {r.device}, got "
                f"{t.dtype} {tuple(t.shape)} on {t.device}")
        if not t.is_contiguous():
            raise ValueError(f"{op}: {name} must be contiguous")
    if inner == "adamw" and step < 1:
        raise ValueError(f"{op}: step must be >= 1 for inner='adamw' (bias correction), got {step}")


def check_accumulate(buf, grad, found_inf, loss_scale, first, rounding, buf_sq) -> None:
    """The argument checks of ``grad_accumulate_`` (every message names the argument)."""
    op = "grad_accumulate_"
    if not isinstance(first, bool):
        raise TypeError(f"{op}: first must be True or False, got {first!r}")
    _tensor(op, "buf", buf)
    _tensor(op, "grad", grad)
    if grad.dtype not in BUFFER_DTYPES:
        raise TypeError(f"{op}: grad dtype must be float32, float16 or bfloat16, got {grad.dtype}")
    if buf.dtype not in BUFFER_DTYPES[grad.dtype]:
        raise TypeError(f"{op}: buf dtype must be float32 or the gradient's ({grad.dtype}), got "
                        f"{buf.dtype}")
    if buf.shape != grad.shape:
        raise ValueError(f"{op}: grad shape {tuple(grad.shape)} != buf shape {tuple(buf.shape)}")
    if buf.device != grad.device:
        raise ValueError(f"{op}: grad is on {grad.device}, buf on {buf.device}")
    if not buf.is_contiguous() or not grad.is_contiguous():
        raise ValueError(f"{op}: buf and grad must be contiguous")
    choice(rounding, f"{op}: rounding", ROUNDINGS)
    number(loss_scale, f"{op}: loss_scale", gt=0.0)
    for name, t in (("found_inf", found_inf), ("buf_sq", buf_sq)):
        check_scalar_tensor(op, name, t, buf.device)
