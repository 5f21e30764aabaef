"""The public entry points of the ops: checked calls by backend name, and what can run where.

Every update is declared once with ``torch.library`` (lomo_kernels/_ops.py: schemas and fake
implementations that check shapes and dtypes); each backend registers its kernels
(lomo_kernels/backends/); the argument checks of the entry points below live in _op_checks.py
and the SIMT emulation's counters in emulation.py. This module gathers the public names.

Ops (namespace ``lomo_kernels``; mutated tensors marked ``!``; all return nothing; the
arguments after ``step`` have defaults):

    lomo_update_(param!, grad, clip_coef?, found_inf!?, lr, weight_decay, loss_scale,
                 clip_grad_value, rounding, seed, step, grad_sq!?, workspace!?)
    adalomo_update_(param!, grad, exp_avg_sq_row!?, exp_avg_sq_col!?, exp_avg_sq!?, clip_coef?,
                    found_inf!?, lr, weight_decay, loss_scale, clip_grad_value, beta, eps1, eps2,
                    clip_threshold, rounding, seed, step, grad_sq!?, workspace!?, stage,
                    global_rows, global_numel)
    lomo_update_multi_ / adalomo_update_multi_: the same for a list of small tensors (per-tensor
                    scalars as lists; AdaLomo: unfactored 0-d/1-d tensors only)
    golore_update_(r!, param!?, exp_avg!?, exp_avg_sq!?, momentum_buffer!?, clip_coef?,
                   found_inf!?, inner, lr, weight_decay, scale, beta1, beta2, eps, momentum,
                   rounding, seed, step)
    grad_accumulate_(buf!, grad, found_inf!?, loss_scale, first, rounding, seed, step,
                     buf_sq!?, workspace!?)

Argument conventions (every backend): ``loss_scale`` divides the gradient (1.0 = none),
``clip_grad_value <= 0`` disables value clipping, ``clip_coef`` is an optional 0-d float32 device
tensor (global-norm clipping), ``found_inf`` an optional 1-element float32 device tensor set to 1
when the gradient holds a NaN/Inf, ``rounding`` is ``"nearest"`` or ``"stochastic"``, ``seed`` and
``step`` key the stochastic-rounding hash (reference.py). ``grad_sq`` an optional 1-element
float32 device tensor to which the op adds ``sum((g / loss_scale)**2)`` (the gradient-norm side
output, read in the same pass). ``workspace`` an optional float32 device tensor of at least
``workspace_numel(...)`` elements, zero-filled when created and reused across calls, so that an
update allocates nothing (without one a backend allocates its scratch per call). The AdaLomo op
runs the three passes of docs/spec.md (statistics, update norm, apply) inside one call
(``stage=0``), the scalars between passes on the device; ``stage`` 1/2/3 run one pass each for a
sharded parameter, the caller all-reducing the workspace header in between
(``reference.adalomo_workspace_regions``).
``golore_update_`` is the inner optimizer of GoLore / GaLore (adamw or sgd) on a
projected gradient ``r`` (N written into ``r``) or, given ``param``, the whole full-rank update of
``param`` from its gradient ``r`` (reference.golore_update_ has the formulas).
``grad_accumulate_`` adds ``grad / loss_scale`` into the accumulation buffer ``buf`` (float32,
or the gradient's dtype with stochastic rounding; ``first`` writes instead of adding) and sets
``buf_sq`` to the squared norm of the new buffer (reference.grad_accumulate_).
The reference and Triton update ops take a float32 ``grad`` for a float16/bfloat16 ``param``
(such a buffer); the native kernels refuse it.

``torch.ops.lomo_kernels.<op>`` runs the fastest implementation registered for the tensor's
device (lomo_kernels/backends/). ``get_impl(op, backend, device)`` resolves an explicit backend
name (once per parameter, never per call) and raises a clear error when that backend cannot run
there; the kernel it returns is checked against the reference at its first use on CUDA
(lomo_kernels/selfcheck.py).

The backend ``cuda_emulated`` (the CUDA kernels run by a SIMT emulation on CPU tensors, built with
``LOMO_KERNELS_CUDA_EMULATION=1``; never chosen by ``auto``) has its own op namespace,
``lomo_kernels_cuda_emulated``, with no default implementation, so it never takes the CPU kernels'
place and a missing build is an error, not the reference.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch

from . import _ops, backends, reference, selfcheck
from ._checks import integer
from ._op_checks import (check_accumulate, check_adalomo_scalars, check_common, check_golore, check_golore_scalars,
                         check_multi, check_scalars, check_seed_step, check_state, check_workspace,
                         per_tensor, tensor_list)
from ._ops import (CONTRACT_VERSION, EMULATED_NAMESPACE, INNERS, OPS, ROUNDINGS, SINGLE_OF,
                   SUPPORTED_DTYPES, adalomo_state_shapes, golore_state_names)
from .backends import (BACKENDS, BackendFallbackWarning, available_backends, resolve_backend,
                       workspace_numel)
from .emulation import emulated_launch_count, emulation_stats, reset_emulated_launch_count

__all__ = [
    "BACKENDS", "ROUNDINGS", "INNERS", "SUPPORTED_DTYPES", "OPS", "SINGLE_OF", "EMULATED_NAMESPACE",
    "CONTRACT_VERSION", "BackendFallbackWarning", "available_backends", "resolve_backend",
    "get_impl", "workspace_numel", "adalomo_state_shapes", "golore_state_names", "grad_accumulate_", "lomo_update_",
    "adalomo_update_", "lomo_update_multi_", "adalomo_update_multi_", "golore_update_",
    "emulated_launch_count", "reset_emulated_launch_count", "emulation_stats",
]


def get_impl(op: str, backend: str, device: torch.device | str) -> Callable:
    """The callable implementing ``op`` for ``backend`` on ``device`` (resolved once).

    A backend without a multi-tensor kernel runs its single-tensor kernel once per tensor."""
    if op not in _ops.SCHEMAS:
        raise ValueError(f"unknown op {op!r}; ops are {OPS}")
    device = torch.device(device)
    backend = resolve_backend(backend, device)
    impl = backends.raw_impl(op, backend, device)
    if impl is None and op in SINGLE_OF:
        single = backends.raw_impl(SINGLE_OF[op], backend, device)
        loop = reference.lomo_multi_loop if op == "lomo_update_multi_" else reference.adalomo_multi_loop

        def impl(*args, **kwargs):
            loop(single, *args, **kwargs)

    if impl is None:
        raise RuntimeError(f"lomo_kernels: backend {backend!r} has no {op} on {device}")
    # on CUDA, checked against the reference at its first use per dtype (lomo_kernels/selfcheck.py);
    # a kernel that fails it hands over to what "auto" resolves to then
    return selfcheck.guard(op, backend, device, impl,
                           fallback=lambda dev: get_impl(op, "auto", dev))


def lomo_update_(
    param: torch.Tensor, grad: torch.Tensor, *, lr: float, weight_decay: float = 0.0,
    loss_scale: float = 1.0, clip_grad_value: float = 0.0, clip_coef: Optional[torch.Tensor] = None,
    found_inf: Optional[torch.Tensor] = None, grad_sq: Optional[torch.Tensor] = None,
    workspace: Optional[torch.Tensor] = None, rounding: str = "nearest", seed: int = 0,
    step: int = 0, backend: str = "auto",
) -> None:
    """Checked entry point of the fused LOMO update (docs/spec.md). Updates ``param`` in place."""
    op = "lomo_update_"
    check_common(op, param, grad, clip_coef, found_inf, rounding, grad_sq)
    check_scalars(op, lr, weight_decay, loss_scale, clip_grad_value)
    seed, step = check_seed_step(op, seed, step)
    check_workspace(op, workspace, [param.shape], backend, param.device)
    impl = get_impl(op, backend, param.device)
    impl(param, grad, clip_coef, found_inf, float(lr), float(weight_decay), float(loss_scale),
         float(clip_grad_value), rounding, seed, step, grad_sq, workspace)


def adalomo_update_(
    param: torch.Tensor, grad: torch.Tensor, *, exp_avg_sq_row: Optional[torch.Tensor] = None,
    exp_avg_sq_col: Optional[torch.Tensor] = None, exp_avg_sq: Optional[torch.Tensor] = None,
    lr: float, beta: float, weight_decay: float = 0.0, loss_scale: float = 1.0,
    clip_grad_value: float = 0.0, eps1: float = 1e-30, eps2: float = 1e-3,
    clip_threshold: float = 1.0, clip_coef: Optional[torch.Tensor] = None,
    found_inf: Optional[torch.Tensor] = None, grad_sq: Optional[torch.Tensor] = None,
    workspace: Optional[torch.Tensor] = None, rounding: str = "nearest", seed: int = 0,
    step: int = 0, stage: int = 0, global_rows: int = 0, global_numel: int = 0,
    backend: str = "auto",
) -> None:
    """Checked entry point of the AdaLomo update (docs/spec.md). Updates ``param`` and its state
    in place; ``stage`` 1-3 (with a workspace) run one pass each, for sharded parameters."""
    op = "adalomo_update_"
    check_common(op, param, grad, clip_coef, found_inf, rounding, grad_sq)
    check_adalomo_scalars(op, lr, weight_decay, loss_scale, clip_grad_value, beta, eps1, eps2,
                           clip_threshold)
    state = {"exp_avg_sq_row": exp_avg_sq_row, "exp_avg_sq_col": exp_avg_sq_col,
             "exp_avg_sq": exp_avg_sq}
    shapes = adalomo_state_shapes(param.shape)
    for name, t in state.items():
        if name in shapes:
            check_state(name, t, shapes[name], param)
        elif t is not None:
            raise ValueError(f"{op}: {name} must be None for a {param.dim()}-d parameter")
    seed, step = check_seed_step(op, seed, step)
    if integer(stage, f"{op}: stage") not in (0, 1, 2, 3):
        raise ValueError(f"{op}: stage must be 0 (all passes) or 1, 2, 3, got {stage!r}")
    integer(global_rows, f"{op}: global_rows")
    integer(global_numel, f"{op}: global_numel")
    if stage and workspace is None:
        raise ValueError(f"{op}: stage {stage} needs a workspace (ops.workspace_numel)")
    if global_rows < 0 or global_numel < 0 or (global_numel and global_numel < param.numel()):
        raise ValueError(f"{op}: global_rows / global_numel must be 0 (local) or the unsharded "
                         f"sizes, got {global_rows}, {global_numel}")
    check_workspace(op, workspace, [param.shape], backend, param.device)
    impl = get_impl(op, backend, param.device)
    impl(param, grad, exp_avg_sq_row, exp_avg_sq_col, exp_avg_sq, clip_coef, found_inf, float(lr),
         float(weight_decay), float(loss_scale), float(clip_grad_value), float(beta), float(eps1),
         float(eps2), float(clip_threshold), rounding, seed, step, grad_sq, workspace,
         int(stage), int(global_rows), int(global_numel))


def lomo_update_multi_(
    params, grads, *, lr, weight_decay=0.0, loss_scale=1.0, clip_grad_value=0.0,
    clip_coef=None, found_inf=None, grad_sq=None, workspace=None, rounding="nearest", seed=0,
    step=0, backend="auto",
) -> None:
    """LOMO on a list of (small) tensors in one call: each tensor exactly as ``lomo_update_``.
    ``lr``, ``weight_decay``, ``clip_grad_value``, ``seed``, ``step``: one value or one per tensor."""
    op = "lomo_update_multi_"
    params, grads = check_multi(op, params, grads, clip_coef, found_inf, rounding, grad_sq)
    if not params:
        return
    k = len(params)
    lr, wd, cgv = (per_tensor(op, name, v, k) for name, v in (
        ("lr", lr), ("weight_decay", weight_decay), ("clip_grad_value", clip_grad_value)))
    for i in range(k):
        check_scalars(op, lr[i], wd[i], loss_scale, cgv[i])
    device = params[0].device
    check_workspace(op, workspace, [p.shape for p in params], backend, device)
    get_impl(op, backend, device)(
        params, grads, clip_coef, found_inf, lr, wd, float(loss_scale), cgv, rounding,
        per_tensor(op, "seed", seed, k, int), per_tensor(op, "step", step, k, int),
        grad_sq, workspace)


def adalomo_update_multi_(
    params, grads, exp_avg_sqs, *, lr, beta, weight_decay=0.0, loss_scale=1.0,
    clip_grad_value=0.0, eps1=1e-30, eps2=1e-3, clip_threshold=1.0, clip_coef=None,
    found_inf=None, grad_sq=None, workspace=None, rounding="nearest", seed=0, step=0,
    backend="auto",
) -> None:
    """AdaLomo on a list of unfactored (0-d / 1-d) tensors in one call, each exactly as
    ``adalomo_update_``; per-tensor scalars as one value or a list."""
    op = "adalomo_update_multi_"
    params, grads = check_multi(op, params, grads, clip_coef, found_inf, rounding, grad_sq)
    exp_avg_sqs = tensor_list(op, "exp_avg_sqs", exp_avg_sqs)
    if len(exp_avg_sqs) != len(params):
        raise ValueError(f"{op}: {len(params)} params but {len(exp_avg_sqs)} exp_avg_sqs")
    for p, v in zip(params, exp_avg_sqs):
        if p.dim() > 1:
            raise ValueError(f"{op}: takes 0-d and 1-d tensors only, got shape {tuple(p.shape)}")
        check_state("exp_avg_sq", v, p.shape, p, op)
    if not params:
        return
    k = len(params)
    names = ("lr", "weight_decay", "clip_grad_value", "beta", "eps1", "eps2", "clip_threshold")
    lists = {name: per_tensor(op, name, v, k) for name, v in zip(names, (
        lr, weight_decay, clip_grad_value, beta, eps1, eps2, clip_threshold))}
    for i in range(k):
        check_adalomo_scalars(op, *(lists[n][i] for n in names[:2]), loss_scale,
                               *(lists[n][i] for n in names[2:]))
    device = params[0].device
    check_workspace(op, workspace, [p.shape for p in params], backend, device)
    get_impl(op, backend, device)(
        params, grads, exp_avg_sqs, clip_coef, found_inf, lists["lr"], lists["weight_decay"],
        float(loss_scale), *(lists[n] for n in names[2:]), rounding,
        per_tensor(op, "seed", seed, k, int), per_tensor(op, "step", step, k, int),
        grad_sq, workspace)


def golore_update_(
    r, *, param=None, exp_avg=None, exp_avg_sq=None, momentum_buffer=None, inner="adamw",
    lr=0.0, weight_decay=0.0, scale=1.0, beta1=0.9, beta2=0.999, eps=1e-8, momentum=0.0,
    clip_coef=None, found_inf=None, rounding="nearest", seed=0, step=1, backend="auto",
):
    """Checked entry point of the GoLore inner update (reference.golore_update_): N written into
    the float32 projected gradient ``r``, or, with ``param``, the full-rank update of ``param``
    from its gradient ``r``. State tensors are float32 of ``r``'s shape, updated in place."""
    state = {"exp_avg": exp_avg, "exp_avg_sq": exp_avg_sq, "momentum_buffer": momentum_buffer}
    check_golore_scalars(lr, weight_decay, scale, beta1, beta2, eps, momentum)
    seed, step = check_seed_step("golore_update_", seed, step)
    check_golore(r, param, state, clip_coef, found_inf, inner, float(momentum), rounding,
                  int(step))
    impl = get_impl("golore_update_", backend, r.device)
    impl(r, param, exp_avg, exp_avg_sq, momentum_buffer, clip_coef, found_inf, inner, float(lr),
         float(weight_decay), float(scale), float(beta1), float(beta2), float(eps),
         float(momentum), rounding, seed, step)



def grad_accumulate_(
    buf: torch.Tensor, grad: torch.Tensor, *, first: bool, loss_scale: float = 1.0,
    found_inf: Optional[torch.Tensor] = None, buf_sq: Optional[torch.Tensor] = None,
    workspace: Optional[torch.Tensor] = None, rounding: str = "nearest", seed: int = 0,
    step: int = 0, backend: str = "auto",
) -> None:
    """Checked entry point of the accumulation kernel: ``buf = round(g / loss_scale)`` when
    ``first`` (``buf`` is not read), else ``round(buf + g / loss_scale)``, in float32 registers,
    rounded to ``buf``'s dtype (``rounding``: "nearest", or "stochastic" keyed by (seed, step,
    element index)). ``buf_sq`` is SET to ``sum(buf_new**2)``; ``found_inf`` is set to 1 when a
    new buffer value is NaN/Inf."""
    op = "grad_accumulate_"
    check_accumulate(buf, grad, found_inf, loss_scale, first, rounding, buf_sq)
    seed, step = check_seed_step(op, seed, step)
    check_workspace(op, workspace, [buf.shape], backend, buf.device)
    get_impl(op, backend, buf.device)(buf, grad, found_inf, float(loss_scale), first, rounding,
                                      seed, step, buf_sq, workspace)

# Names of lomo_kernels.backends that this module held before backends had a module of their own
# (the extension, the Triton module, the status table, the resolution helpers), read through to
# their one home, so that code reading them here keeps working. Patch them in
# lomo_kernels.backends: a value set here would change nothing there.
_MOVED = {"_native": "_native", "_triton": "_triton", "_STATUS": "_STATUS",
          "_raw_impl": "raw_impl", "_can_run": "can_run", "_triton_interpret": "triton_interpret"}


def __getattr__(name: str):
    if name in _MOVED:
        return getattr(backends, _MOVED[name])
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
