"""Op contracts: every update is declared once here with ``torch.library`` and dispatched by
backend name.

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

Dispatcher registrations: the pure-PyTorch reference is the default (CompositeExplicitAutograd);
the native extension ``lomo_kernels._C``, when it loads, registers CPU and CUDA kernels for the
same ops (``register_kernels()``, after a contract-version check); the Triton kernels are
registered for CUDA when the native CUDA kernels are absent. ``torch.ops.lomo_kernels.<op>``
therefore runs the fastest implementation for the tensor's device. ``get_impl(op, backend,
device)`` resolves an explicit backend name (once per parameter, never per call) and raises a
clear error when that backend cannot run there.
The kernel ``get_impl`` returns is checked against the reference at its first use on CUDA
(lomo_kernels/selfcheck.py).

The backend ``cuda_emulated`` (the CUDA kernels run by a SIMT emulation on CPU tensors, built with
``LOMO_KERNELS_CUDA_EMULATION=1``; never chosen by ``auto``) has its own op namespace,
``lomo_kernels_cuda_emulated``, with no default implementation, so it never takes the CPU kernels'
place and a missing build is an error, not the reference.
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

BACKENDS = ("auto", "native", "triton", "torch", "cuda_emulated")
EMULATED_NAMESPACE = "lomo_kernels_cuda_emulated"
ROUNDINGS = ("nearest", "stochastic")
INNERS = ("adamw", "sgd")  # GoLore's inner optimizers
SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)

_SCHEMAS = {
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
OPS = tuple(_SCHEMAS)

SINGLE_OF = {"lomo_update_multi_": "lomo_update_", "adalomo_update_multi_": "adalomo_update_"}

for _name, _schema in _SCHEMAS.items():
    torch.library.define(f"lomo_kernels::{_name}", _schema)
    torch.library.impl(f"lomo_kernels::{_name}", "CompositeExplicitAutograd")(
        getattr(reference, _name)
    )
    # In-place ops return nothing: the fake implementation only has to exist.
    torch.library.register_fake(f"lomo_kernels::{_name}")(lambda *args, **kwargs: None)
    torch.library.define(f"{EMULATED_NAMESPACE}::{_name}", _schema)
    torch.library.register_fake(f"{EMULATED_NAMESPACE}::{_name}")(lambda *args, **kwargs: None)


# ---------------------------------------------------------------------------------------------
# Backend discovery: importing lomo_kernels never fails because an extension is missing.
# ---------------------------------------------------------------------------------------------

_STATUS: dict[str, str] = {}
_native = None
_triton = None

# The version of the op schemas above; the native extension reports the one it was built for.
CONTRACT_VERSION = 4

try:
    _native = importlib.import_module("lomo_kernels._C")
    _built = _native.contract_version() if hasattr(_native, "contract_version") else 1
    if _built != CONTRACT_VERSION:
        raise ImportError(
            f"lomo_kernels._C was built for op contract {_built}, this checkout declares "
            f"{CONTRACT_VERSION} (a stale build): rebuild it with "
            "`pip install --no-build-isolation -e .`"
        )
    _native.register_kernels()  # adds its CPU/CUDA kernels to the ops above
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
if _native is None:
    _STATUS["cuda_emulated"] = _STATUS["native"]
elif _native.has_cuda_emulation():
    _STATUS["cuda_emulated"] = "loaded (cpu)"
else:
    _STATUS["cuda_emulated"] = (
        "unavailable: the native extension was built without LOMO_KERNELS_CUDA_EMULATION=1"
    )


def _native_cuda() -> bool:
    return _native is not None and _native.has_cuda()


if _triton is not None and not _native_cuda():
    for _name in OPS:
        if hasattr(_triton, _name):
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
    """What can run here, and why not: ``{"native": "...", "triton": "...", "torch": "loaded",
    "cuda_emulated": "..."}``.
    A status starting with ``"loaded"`` can run; otherwise it says ``"unavailable: <reason>"``."""
    return {**_STATUS, "triton": _triton_status()}


def _can_run(backend: str, device: torch.device) -> str | None:
    """None when ``backend`` runs on ``device``, else the reason it cannot."""
    if backend == "torch":
        return None
    from . import selfcheck

    disabled = selfcheck.disabled_reason(backend, device)
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
        if device.type == "cuda" or (device.type == "cpu" and _triton_interpret()):
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
    from . import selfcheck

    disabled = selfcheck.disabled_reason("native", device)
    if disabled is not None:
        why = f"the native backend is disabled for this process: {disabled}"
        fix = "run `python -m lomo_kernels` and report its output"
    elif device.type == "cpu":
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


def _has_native_kernel(op: str, device: torch.device) -> bool:
    key = "CUDA" if device.type == "cuda" else "CPU"
    return torch._C._dispatch_has_kernel_for_dispatch_key(f"lomo_kernels::{op}", key)


def _raw_impl(op: str, backend: str, device: torch.device) -> Callable | None:
    """The backend's own implementation of ``op``, or None when it has none (no first-use check:
    what the doctor tests)."""
    if backend == "torch":
        return getattr(reference, op)
    if backend == "triton":
        return getattr(_triton, op, None)
    if backend == "cuda_emulated":  # its own namespace: only the ops the emulated build registers
        has = torch._C._dispatch_has_kernel_for_dispatch_key(f"{EMULATED_NAMESPACE}::{op}", "CPU")
        return getattr(getattr(torch.ops, EMULATED_NAMESPACE), op) if has else None
    # native: the dispatcher routes CPU/CUDA tensors to the C++ kernels registered by _C.
    return getattr(torch.ops.lomo_kernels, op) if _has_native_kernel(op, device) else None


def get_impl(op: str, backend: str, device: torch.device | str) -> Callable:
    """The callable implementing ``op`` for ``backend`` on ``device`` (resolved once).

    A backend without a multi-tensor kernel runs its single-tensor kernel once per tensor."""
    if op not in _SCHEMAS:
        raise ValueError(f"unknown op {op!r}; ops are {OPS}")
    device = torch.device(device)
    backend = resolve_backend(backend, device)
    impl = _raw_impl(op, backend, device)
    if impl is None and op in SINGLE_OF:
        single = _raw_impl(SINGLE_OF[op], backend, device)
        loop = reference.lomo_multi_loop if op == "lomo_update_multi_" else reference.adalomo_multi_loop

        def impl(*args, **kwargs):
            loop(single, *args, **kwargs)

    if impl is None:
        raise RuntimeError(f"lomo_kernels: backend {backend!r} has no {op} on {device}")
    from . import selfcheck

    # on CUDA, checked against the reference at its first use per dtype (lomo_kernels/selfcheck.py)
    return selfcheck.guard(op, backend, device, impl)


def workspace_numel(op: str, shapes, *, backend: str = "auto",
                    device: torch.device | str = "cpu") -> int:
    """float32 elements of the workspace ``op`` needs on ``backend``: for a single-tensor op, enough
    for any one of ``shapes``; for a multi-tensor op, for the whole list in one call. Allocate it
    once with ``torch.zeros`` and pass it to every call (never smaller, never shared between
    streams)."""
    if op not in _SCHEMAS:
        raise ValueError(f"unknown op {op!r}; ops are {OPS}")
    device = torch.device(device)
    backend = resolve_backend(backend, device)
    shapes = [list(s) for s in shapes]
    if backend in ("native", "cuda_emulated") and _native is not None:
        # the native CPU kernels' need, or the CUDA kernels' (also what the emulation runs)
        cuda = backend == "cuda_emulated" or device.type == "cuda"
        fn = getattr(_native, "workspace_numel_cuda" if cuda else "workspace_numel", None)
    else:
        fn = getattr({"torch": reference, "triton": _triton}.get(backend), "workspace_numel", None)
    need = fn(op, shapes) if fn is not None else 0
    return max(int(need), reference.workspace_numel(op, shapes))


def _check_scalar_tensor(op, name, t, device):
    if t is not None and (
        not isinstance(t, torch.Tensor) or t.numel() != 1 or t.dtype != torch.float32
        or t.device != device
    ):
        raise ValueError(f"{op}: {name} must be a 1-element float32 tensor on {device}")


def _check_common(op, param, grad, clip_coef, found_inf, rounding, grad_sq=None):
    if not isinstance(param, torch.Tensor) or not isinstance(grad, torch.Tensor):
        raise TypeError(f"{op}: param and grad must be tensors")
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
    if rounding not in ROUNDINGS:
        raise ValueError(f"{op}: rounding must be one of {ROUNDINGS}, got {rounding!r}")
    for name, t in (("clip_coef", clip_coef), ("found_inf", found_inf), ("grad_sq", grad_sq)):
        _check_scalar_tensor(op, name, t, param.device)


def _check_workspace(op, workspace, shapes, backend, device):
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


def _check_scalars(op: str, lr, weight_decay, loss_scale, clip_grad_value) -> None:
    number(lr, f"{op}: lr", ge=0.0)
    number(weight_decay, f"{op}: weight_decay", ge=0.0)
    number(loss_scale, f"{op}: loss_scale", gt=0.0)
    number(clip_grad_value, f"{op}: clip_grad_value (<= 0: off)")


def _check_adalomo_scalars(op, lr, weight_decay, loss_scale, clip_grad_value, beta, eps1, eps2,
                           clip_threshold) -> None:
    _check_scalars(op, lr, weight_decay, loss_scale, clip_grad_value)
    number(beta, f"{op}: beta", ge=0.0, le=1.0)
    number(eps1, f"{op}: eps1", ge=0.0)
    number(eps2, f"{op}: eps2", ge=0.0)
    number(clip_threshold, f"{op}: clip_threshold", gt=0.0)


def _check_state(name, t, shape, param, op="adalomo_update_"):
    if t is None:
        raise ValueError(f"{op}: {name} is required for a {param.dim()}-d parameter")
    if t.dtype != torch.float32 or tuple(t.shape) != tuple(shape) or t.device != param.device:
        raise ValueError(
            f"{op}: {name} must be float32 of shape {tuple(shape)} on {param.device}, "
            f"got {t.dtype} {tuple(t.shape)} on {t.device}"
        )
    if not t.is_contiguous():
        raise ValueError(f"{op}: {name} must be contiguous")


def lomo_update_(
    param: torch.Tensor, grad: torch.Tensor, *, lr: float, weight_decay: float = 0.0,
    loss_scale: float = 1.0, clip_grad_value: float = 0.0, clip_coef: Optional[torch.Tensor] = None,
    found_inf: Optional[torch.Tensor] = None, grad_sq: Optional[torch.Tensor] = None,
    workspace: Optional[torch.Tensor] = None, rounding: str = "nearest", seed: int = 0,
    step: int = 0, backend: str = "auto",
) -> None:
    """Checked entry point of the fused LOMO update (docs/spec.md). Updates ``param`` in place."""
    op = "lomo_update_"
    _check_common(op, param, grad, clip_coef, found_inf, rounding, grad_sq)
    _check_scalars(op, lr, weight_decay, loss_scale, clip_grad_value)
    _check_workspace(op, workspace, [param.shape], backend, param.device)
    impl = get_impl(op, backend, param.device)
    impl(param, grad, clip_coef, found_inf, float(lr), float(weight_decay), float(loss_scale),
         float(clip_grad_value), rounding, int(seed), int(step), grad_sq, workspace)


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
    found_inf: Optional[torch.Tensor] = None, grad_sq: Optional[torch.Tensor] = None,
    workspace: Optional[torch.Tensor] = None, rounding: str = "nearest", seed: int = 0,
    step: int = 0, stage: int = 0, global_rows: int = 0, global_numel: int = 0,
    backend: str = "auto",
) -> None:
    """Checked entry point of the AdaLomo update (docs/spec.md). Updates ``param`` and its state
    in place; ``stage`` 1-3 (with a workspace) run one pass each, for sharded parameters."""
    op = "adalomo_update_"
    _check_common(op, param, grad, clip_coef, found_inf, rounding, grad_sq)
    _check_adalomo_scalars(op, lr, weight_decay, loss_scale, clip_grad_value, beta, eps1, eps2,
                           clip_threshold)
    state = {"exp_avg_sq_row": exp_avg_sq_row, "exp_avg_sq_col": exp_avg_sq_col,
             "exp_avg_sq": exp_avg_sq}
    shapes = adalomo_state_shapes(param.shape)
    for name, t in state.items():
        if name in shapes:
            _check_state(name, t, shapes[name], param)
        elif t is not None:
            raise ValueError(f"{op}: {name} must be None for a {param.dim()}-d parameter")
    if stage not in (0, 1, 2, 3):
        raise ValueError(f"{op}: stage must be 0 (all passes) or 1, 2, 3, got {stage!r}")
    if stage and workspace is None:
        raise ValueError(f"{op}: stage {stage} needs a workspace (ops.workspace_numel)")
    if global_rows < 0 or global_numel < 0 or (global_numel and global_numel < param.numel()):
        raise ValueError(f"{op}: global_rows / global_numel must be 0 (local) or the unsharded "
                         f"sizes, got {global_rows}, {global_numel}")
    _check_workspace(op, workspace, [param.shape], backend, param.device)
    impl = get_impl(op, backend, param.device)
    impl(param, grad, exp_avg_sq_row, exp_avg_sq_col, exp_avg_sq, clip_coef, found_inf, float(lr),
         float(weight_decay), float(loss_scale), float(clip_grad_value), float(beta), float(eps1),
         float(eps2), float(clip_threshold), rounding, int(seed), int(step), grad_sq, workspace,
         int(stage), int(global_rows), int(global_numel))


def _per_tensor(op, name, value, count, kind=float):
    """A scalar broadcast to ``count`` tensors, or a list of exactly ``count`` values."""
    values = list(value) if isinstance(value, (list, tuple)) else [value] * count
    if len(values) != count:
        raise ValueError(f"{op}: {name} has {len(values)} values for {count} tensors")
    return [kind(v) for v in values]


def _check_multi(op, params, grads, clip_coef, found_inf, rounding, grad_sq):
    params, grads = list(params), list(grads)
    if len(params) != len(grads):
        raise ValueError(f"{op}: {len(params)} params but {len(grads)} grads")
    for p, g in zip(params, grads):
        _check_common(op, p, g, clip_coef, found_inf, rounding, grad_sq)
    if params and any(p.device != params[0].device for p in params):
        raise ValueError(f"{op}: every tensor must be on one device")
    return params, grads


def lomo_update_multi_(
    params, grads, *, lr, weight_decay=0.0, loss_scale=1.0, clip_grad_value=0.0,
    clip_coef=None, found_inf=None, grad_sq=None, workspace=None, rounding="nearest", seed=0,
    step=0, backend="auto",
) -> None:
    """LOMO on a list of (small) tensors in one call: each tensor exactly as ``lomo_update_``.
    ``lr``, ``weight_decay``, ``clip_grad_value``, ``seed``, ``step``: one value or one per tensor."""
    op = "lomo_update_multi_"
    params, grads = _check_multi(op, params, grads, clip_coef, found_inf, rounding, grad_sq)
    if not params:
        return
    k = len(params)
    lr, wd, cgv = (_per_tensor(op, name, v, k) for name, v in (
        ("lr", lr), ("weight_decay", weight_decay), ("clip_grad_value", clip_grad_value)))
    for i in range(k):
        _check_scalars(op, lr[i], wd[i], loss_scale, cgv[i])
    device = params[0].device
    _check_workspace(op, workspace, [p.shape for p in params], backend, device)
    get_impl(op, backend, device)(
        params, grads, clip_coef, found_inf, lr, wd, float(loss_scale), cgv, rounding,
        _per_tensor(op, "seed", seed, k, int), _per_tensor(op, "step", step, k, int),
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
    params, grads = _check_multi(op, params, grads, clip_coef, found_inf, rounding, grad_sq)
    exp_avg_sqs = list(exp_avg_sqs)
    if len(exp_avg_sqs) != len(params):
        raise ValueError(f"{op}: {len(params)} params but {len(exp_avg_sqs)} exp_avg_sqs")
    for p, v in zip(params, exp_avg_sqs):
        if p.dim() > 1:
            raise ValueError(f"{op}: takes 0-d and 1-d tensors only, got shape {tuple(p.shape)}")
        _check_state("exp_avg_sq", v, p.shape, p, op)
    if not params:
        return
    k = len(params)
    names = ("lr", "weight_decay", "clip_grad_value", "beta", "eps1", "eps2", "clip_threshold")
    lists = {name: _per_tensor(op, name, v, k) for name, v in zip(names, (
        lr, weight_decay, clip_grad_value, beta, eps1, eps2, clip_threshold))}
    for i in range(k):
        _check_adalomo_scalars(op, *(lists[n][i] for n in names[:2]), loss_scale,
                               *(lists[n][i] for n in names[2:]))
    device = params[0].device
    _check_workspace(op, workspace, [p.shape for p in params], backend, device)
    get_impl(op, backend, device)(
        params, grads, exp_avg_sqs, clip_coef, found_inf, lists["lr"], lists["weight_decay"],
        float(loss_scale), *(lists[n] for n in names[2:]), rounding,
        _per_tensor(op, "seed", seed, k, int), _per_tensor(op, "step", step, k, int),
        grad_sq, workspace)


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


# ---------------------------------------------------------------------------------------------
# The SIMT emulation's counters (backend "cuda_emulated")
# ---------------------------------------------------------------------------------------------


def _emulation():
    if not _STATUS["cuda_emulated"].startswith("loaded"):
        raise RuntimeError(f"lomo_kernels: cuda_emulated is {_STATUS['cuda_emulated']}")
    return _native


def emulated_launch_count() -> int:
    """Kernel launches the CUDA emulation ran since the last ``reset_emulated_launch_count()``."""
    return _emulation().emulated_launch_count()


def reset_emulated_launch_count() -> None:
    _emulation().reset_emulated_launch_count()


def emulation_stats() -> dict:
    """The emulation's counters: launches, blocks, threads, context_switches, fibers."""
    return dict(_emulation().emulation_stats())


from ._grad_accumulate import grad_accumulate_  # noqa: E402  (the entry point uses get_impl)
