"""The op contract: every update declared once with ``torch.library`` (schemas), with fake (meta)
implementations that check shapes, dtypes and devices with ``torch._check``, so that
``torch.library.opcheck``, meta tensors and ``torch.compile`` tracing refuse a wrong call through
``torch.ops.lomo_kernels.<op>`` itself, as every backend's kernel does (the same messages as
csrc/checks.h). Nothing here runs an update: the kernels are registered by lomo_kernels/backends.

The arguments of each op are described in lomo_kernels/ops.py.

The same schemas are declared in a second namespace, ``lomo_kernels_cuda_emulated`` (the CUDA
kernels run by the SIMT emulation on CPU tensors), which has no default implementation.
"""

from __future__ import annotations

from typing import Optional, Sequence, Union

import torch

from ._checks import check_shape, choice, number

ROUNDINGS = ("nearest", "stochastic")
INNERS = ("adamw", "sgd")  # GoLore's inner optimizers
SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
NAMESPACE = "lomo_kernels"
EMULATED_NAMESPACE = "lomo_kernels_cuda_emulated"
# The version of the op schemas below; the native extension reports the one it was built for.
CONTRACT_VERSION = 4

SCHEMAS = {
    "lomo_update_": (
        "(Tensor(a!) param, Tensor grad, Tensor? clip_coef, Tensor(b!)? found_inf, float lr, "
        "float weight_decay, float loss_scale, float clip_grad_value, str rounding, int seed, "
        "int step, Tensor(c!)? grad_sq=None, Tensor(d!)? workspace=None) -> ()"
    ),
    "adalomo_update_": (
        "(Tensor(a!) param, Tensor grad, Tensor(b!)? exp_avg_sq_row, Tensor(c!)? exp_avg_sq_col, "
        "Tensor(d!)? exp_avg_sq, Tensor? clip_coef, Tensor(e!)? found_inf, float lr, "
        "float weight_decay, float loss_scale, float clip_grad_value, float beta, float eps1, "
        "float eps2, float clip_threshold, str rounding, int seed, int step, "
        "Tensor(f!)? grad_sq=None, Tensor(g!)? workspace=None, int stage=0, int global_rows=0, "
        "int global_numel=0) -> ()"
    ),
    "lomo_update_multi_": (
        "(Tensor(a!)[] params, Tensor[] grads, Tensor? clip_coef, Tensor(b!)? found_inf, "
        "float[] lr, float[] weight_decay, float loss_scale, float[] clip_grad_value, "
        "str rounding, int[] seed, int[] step, Tensor(c!)? grad_sq=None, "
        "Tensor(d!)? workspace=None) -> ()"
    ),
    "adalomo_update_multi_": (
        "(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] exp_avg_sqs, Tensor? clip_coef, "
        "Tensor(e!)? found_inf, float[] lr, float[] weight_decay, float loss_scale, "
        "float[] clip_grad_value, float[] beta, float[] eps1, float[] eps2, "
        "float[] clip_threshold, str rounding, int[] seed, int[] step, "
        "Tensor(f!)? grad_sq=None, Tensor(g!)? workspace=None) -> ()"
    ),
    "golore_update_": (
        "(Tensor(a!) r, Tensor(b!)? param, Tensor(c!)? exp_avg, Tensor(d!)? exp_avg_sq, "
        "Tensor(e!)? momentum_buffer, Tensor? clip_coef, Tensor(f!)? found_inf, str inner, "
        "float lr, float weight_decay, float scale, float beta1, float beta2, float eps, "
        "float momentum, str rounding, int seed, int step) -> ()"
    ),
    "grad_accumulate_": (
        "(Tensor(a!) buf, Tensor grad, Tensor(b!)? found_inf, float loss_scale, bool first, "
        "str rounding, int seed, int step, Tensor(c!)? buf_sq=None, "
        "Tensor(d!)? workspace=None) -> ()"
    ),
}
#: The accumulation buffer's dtype for a gradient of each dtype: float32, or the gradient's own.
BUFFER_DTYPES = {
    torch.float32: (torch.float32,),
    torch.float16: (torch.float32, torch.float16),
    torch.bfloat16: (torch.float32, torch.bfloat16),
}
OPS = tuple(SCHEMAS)
# The single-tensor op each multi-tensor op applies to every tensor of its list.
SINGLE_OF = {"lomo_update_multi_": "lomo_update_", "adalomo_update_multi_": "adalomo_update_"}


def adalomo_state_shapes(shape: Union[torch.Size, tuple]) -> dict[str, tuple]:
    """Shapes of the AdaLomo second-moment state for a parameter of ``shape`` (docs/spec.md)."""
    shape = check_shape("adalomo_state_shapes: shape", shape)
    if len(shape) >= 2:
        return {"exp_avg_sq_row": shape[:-1], "exp_avg_sq_col": shape[:-2] + shape[-1:]}
    return {"exp_avg_sq": shape}


def golore_state_names(inner: str, momentum: float) -> tuple:
    """The float32 state tensors (each of ``r``'s shape) that ``golore_update_`` needs."""
    choice(inner, "golore_update_: inner", INNERS)
    if inner == "adamw":
        return ("exp_avg", "exp_avg_sq")
    return ("momentum_buffer",) if number(momentum, "golore_update_: momentum") != 0.0 else ()


# ---------------------------------------------------------------------------------------------
# Fake implementations: the checks every backend makes, on shapes, dtypes and devices only
# ---------------------------------------------------------------------------------------------

Tensor = torch.Tensor


def _shape(t: Tensor) -> tuple:
    return tuple(t.shape)


def _same_shape(a: Tensor, shape: Sequence) -> bool:
    return a.dim() == len(shape) and all(x == y for x, y in zip(a.shape, shape))


def _check_rounding(op: str, rounding: str) -> None:
    torch._check(rounding in ROUNDINGS,
                 lambda: f"{op}: rounding must be 'nearest' or 'stochastic', got '{rounding}'")


def _check_scalar(op: str, name: str, t: Optional[Tensor], device: torch.device) -> None:
    if t is None:
        return
    torch._check(t.numel() == 1 and t.dtype == torch.float32 and t.device == device,
                 lambda: f"{op}: {name} must be a 1-element float32 tensor on {device}, got "
                         f"{t.dtype} {_shape(t)} on {t.device}")


def _check_common(op: str, param: Tensor, grad: Tensor, clip_coef: Optional[Tensor],
                  found_inf: Optional[Tensor], grad_sq: Optional[Tensor]) -> None:
    torch._check(param.dtype in SUPPORTED_DTYPES,
                 lambda: f"{op}: param must be float32, float16 or bfloat16, got {param.dtype}")
    torch._check(grad.dtype == param.dtype or grad.dtype == torch.float32,
                 lambda: f"{op}: grad dtype {grad.dtype} must be param's ({param.dtype}) or "
                         "float32 (an accumulation buffer)")
    torch._check(_same_shape(grad, param.shape),
                 lambda: f"{op}: grad shape {_shape(grad)} != param shape {_shape(param)}")
    torch._check(grad.device == param.device,
                 lambda: f"{op}: grad is on {grad.device}, param on {param.device}")
    torch._check(param.is_contiguous(), lambda: f"{op}: param must be contiguous")
    torch._check(grad.is_contiguous(), lambda: f"{op}: grad must be contiguous")
    for name, t in (("clip_coef", clip_coef), ("found_inf", found_inf), ("grad_sq", grad_sq)):
        _check_scalar(op, name, t, param.device)


def _check_workspace(op: str, workspace: Optional[Tensor], device: torch.device) -> None:
    if workspace is None:
        return
    torch._check(workspace.dtype == torch.float32 and workspace.dim() == 1
                 and workspace.device == device and workspace.is_contiguous(),
                 lambda: f"{op}: workspace must be a contiguous 1-d float32 tensor on {device}, "
                         f"got {workspace.dtype} {_shape(workspace)} on {workspace.device}")


def _check_state(op: str, name: str, t: Optional[Tensor], shape: Sequence, like: Tensor,
                 what: str) -> None:
    """A float32 contiguous state tensor of ``shape`` on ``like``'s device (``what``: why it is
    required, for the message)."""
    torch._check(t is not None, lambda: f"{op}: {name} is required for {what}")
    torch._check(t.dtype == torch.float32 and _same_shape(t, shape) and t.device == like.device,
                 lambda: f"{op}: {name} must be float32 of shape {tuple(shape)} on {like.device}, "
                         f"got {t.dtype} {_shape(t)} on {t.device}")
    torch._check(t.is_contiguous(), lambda: f"{op}: {name} must be contiguous")


def _check_adalomo_state(op: str, param: Tensor, row: Optional[Tensor], col: Optional[Tensor],
                         v: Optional[Tensor]) -> None:
    given = {"exp_avg_sq_row": row, "exp_avg_sq_col": col, "exp_avg_sq": v}
    shapes = adalomo_state_shapes(param.shape)
    what = f"a {param.dim()}-d parameter"
    for name, t in given.items():
        if name in shapes:
            _check_state(op, name, t, shapes[name], param, what)
        else:
            torch._check(t is None, lambda: f"{op}: {name} must be None for {what}")


def _check_lists(op: str, k: int, grads: Sequence, **lists: Sequence) -> None:
    torch._check(len(grads) == k, lambda: f"{op}: {k} params but {len(grads)} grads")
    for name, values in lists.items():
        torch._check(len(values) == k,
                     lambda: f"{op}: {name} has {len(values)} values for {k} tensors")


def lomo_update_fake(param, grad, clip_coef, found_inf, lr, weight_decay, loss_scale,
                     clip_grad_value, rounding, seed, step, grad_sq=None, workspace=None):
    op = "lomo_update_"
    _check_common(op, param, grad, clip_coef, found_inf, grad_sq)
    _check_rounding(op, rounding)
    _check_workspace(op, workspace, param.device)


def adalomo_update_fake(param, grad, exp_avg_sq_row, exp_avg_sq_col, exp_avg_sq, clip_coef,
                        found_inf, lr, weight_decay, loss_scale, clip_grad_value, beta, eps1, eps2,
                        clip_threshold, rounding, seed, step, grad_sq=None, workspace=None,
                        stage=0, global_rows=0, global_numel=0):
    op = "adalomo_update_"
    _check_common(op, param, grad, clip_coef, found_inf, grad_sq)
    _check_adalomo_state(op, param, exp_avg_sq_row, exp_avg_sq_col, exp_avg_sq)
    _check_rounding(op, rounding)
    torch._check(stage in (0, 1, 2, 3),
                 lambda: f"{op}: stage must be 0 (all passes) or 1, 2, 3, got {stage}")
    torch._check(stage == 0 or workspace is not None,
                 lambda: f"{op}: stage {stage} needs a workspace (ops.workspace_numel)")
    torch._check(global_rows >= 0 and global_numel >= 0
                 and (global_numel == 0 or global_numel >= param.numel()),
                 lambda: f"{op}: global_rows / global_numel must be 0 (local) or the unsharded "
                         f"sizes, got {global_rows}, {global_numel}")
    _check_workspace(op, workspace, param.device)


def lomo_update_multi_fake(params, grads, clip_coef, found_inf, lr, weight_decay, loss_scale,
                           clip_grad_value, rounding, seed, step, grad_sq=None, workspace=None):
    op = "lomo_update_multi_"
    _check_lists(op, len(params), grads, lr=lr, weight_decay=weight_decay,
                 clip_grad_value=clip_grad_value, seed=seed, step=step)
    for p, g in zip(params, grads):
        _check_common(op, p, g, clip_coef, found_inf, grad_sq)
        torch._check(p.device == params[0].device,
                     lambda: f"{op}: every tensor must be on one device")
    _check_rounding(op, rounding)
    if params:
        _check_workspace(op, workspace, params[0].device)


def adalomo_update_multi_fake(params, grads, exp_avg_sqs, clip_coef, found_inf, lr, weight_decay,
                              loss_scale, clip_grad_value, beta, eps1, eps2, clip_threshold,
                              rounding, seed, step, grad_sq=None, workspace=None):
    op = "adalomo_update_multi_"
    k = len(params)
    _check_lists(op, k, grads, lr=lr, weight_decay=weight_decay, clip_grad_value=clip_grad_value,
                 beta=beta, eps1=eps1, eps2=eps2, clip_threshold=clip_threshold, seed=seed,
                 step=step)
    torch._check(len(exp_avg_sqs) == k,
                 lambda: f"{op}: {k} params but {len(exp_avg_sqs)} exp_avg_sqs")
    for p, g, v in zip(params, grads, exp_avg_sqs):
        _check_common(op, p, g, clip_coef, found_inf, grad_sq)
        torch._check(p.device == params[0].device,
                     lambda: f"{op}: every tensor must be on one device")
        torch._check(p.dim() <= 1,
                     lambda: f"{op}: takes 0-d and 1-d tensors only, got shape {_shape(p)}")
        _check_state(op, "exp_avg_sq", v, p.shape, p, f"a {p.dim()}-d parameter")
    _check_rounding(op, rounding)
    if params:
        _check_workspace(op, workspace, params[0].device)


def golore_update_fake(r, param, exp_avg, exp_avg_sq, momentum_buffer, clip_coef, found_inf,
                       inner, lr, weight_decay, scale, beta1, beta2, eps, momentum, rounding,
                       seed, step):
    op = "golore_update_"
    torch._check(inner in INNERS,
                 lambda: f"{op}: inner must be 'adamw' or 'sgd', got '{inner}'")
    if param is not None:
        torch._check(param.dtype in SUPPORTED_DTYPES,
                     lambda: f"{op}: param must be float32, float16 or bfloat16, got "
                             f"{param.dtype}")
        torch._check(r.dtype in (param.dtype, torch.float32) and _same_shape(r, param.shape)
                     and r.device == param.device,
                     lambda: f"{op}: r (the gradient) must have param's dtype (or float32), "
                             "shape and device: "
                             f"got {r.dtype} {_shape(r)} on {r.device}, param {param.dtype} "
                             f"{_shape(param)} on {param.device}")
        torch._check(param.is_contiguous(), lambda: f"{op}: param must be contiguous")
    else:
        torch._check(r.dtype == torch.float32,
                     lambda: f"{op}: r (the projected gradient) must be float32, got {r.dtype}")
    torch._check(r.is_contiguous(), lambda: f"{op}: r must be contiguous")
    _check_scalar(op, "clip_coef", clip_coef, r.device)
    _check_scalar(op, "found_inf", found_inf, r.device)
    need = golore_state_names(inner, momentum)
    for name, t in (("exp_avg", exp_avg), ("exp_avg_sq", exp_avg_sq),
                    ("momentum_buffer", momentum_buffer)):
        if name in need:
            _check_state(op, name, t, r.shape, r, f"inner='{inner}'")
        else:
            torch._check(t is None, lambda: f"{op}: {name} must be None for inner='{inner}' "
                                            f"with momentum={momentum}")
    _check_rounding(op, rounding)
    torch._check(inner != "adamw" or step >= 1,
                 lambda: f"{op}: step must be >= 1 for inner='adamw' (bias correction), got {step}")


def grad_accumulate_fake(buf, grad, found_inf, loss_scale, first, rounding, seed, step,
                         buf_sq=None, workspace=None):
    op = "grad_accumulate_"
    torch._check(grad.dtype in BUFFER_DTYPES,
                 lambda: f"{op}: grad dtype must be float32, float16 or bfloat16, got {grad.dtype}")
    torch._check(buf.dtype in BUFFER_DTYPES.get(grad.dtype, ()),
                 lambda: f"{op}: buf dtype must be float32 or the gradient's ({grad.dtype}), got "
                         f"{buf.dtype}")
    torch._check(_same_shape(grad, buf.shape),
                 lambda: f"{op}: grad shape {_shape(grad)} != buf shape {_shape(buf)}")
    torch._check(grad.device == buf.device,
                 lambda: f"{op}: grad is on {grad.device}, buf on {buf.device}")
    torch._check(buf.is_contiguous() and grad.is_contiguous(),
                 lambda: f"{op}: buf and grad must be contiguous")
    _check_scalar(op, "found_inf", found_inf, buf.device)
    _check_scalar(op, "buf_sq", buf_sq, buf.device)
    _check_rounding(op, rounding)
    _check_workspace(op, workspace, buf.device)


FAKES = {
    "lomo_update_": lomo_update_fake,
    "adalomo_update_": adalomo_update_fake,
    "lomo_update_multi_": lomo_update_multi_fake,
    "adalomo_update_multi_": adalomo_update_multi_fake,
    "golore_update_": golore_update_fake,
    "grad_accumulate_": grad_accumulate_fake,
}

for _name, _schema in SCHEMAS.items():
    for _namespace in (NAMESPACE, EMULATED_NAMESPACE):
        torch.library.define(f"{_namespace}::{_name}", _schema)
        torch.library.register_fake(f"{_namespace}::{_name}")(FAKES[_name])
